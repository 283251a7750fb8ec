"""CSV exports of per-cell traces and events (read by the ``csv`` module, pandas, R, Excel).

Traces use the **long ("tidy") format**, one row per cell and frame::

    cell_id,frame,time_s,F,F0,dff

chosen over a wide table (one column per frame) because it holds F, F0 and dF/F in one file,
stays a fixed 6 columns for recordings of thousands of frames (spreadsheet column limits), and
loads directly into pandas/R for grouping by cell. ``time_s = frame * frame_interval_s``; F and F0
are in the recording's intensity units; ``dff`` is empty (NaN) for traces flagged by the tiny-F0
guard. Floats are written with 7 significant digits (float32 precision).

Events: one row per event, the fields of :class:`calseg.analysis.events.Event`::

    cell_id,onset_frame,peak_frame,offset_frame,onset_s,peak_s,duration_s,amplitude,auc,
    threshold,truncated
"""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from calseg.analysis.events import Event

__all__ = [
    "EVENT_COLUMNS",
    "TRACE_COLUMNS",
    "TableError",
    "read_events_csv",
    "read_traces_csv",
    "write_events_csv",
    "write_trace_exports",
    "write_traces_csv",
]

TRACE_COLUMNS = ("cell_id", "frame", "time_s", "F", "F0", "dff")
EVENT_COLUMNS = tuple(f.name for f in fields(Event))


class TableError(ValueError):
    """Inconsistent arrays for a table, or a CSV that is not a CalSeg table."""


def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.7g}"


def write_traces_csv(
    path: str | Path,
    ids: np.ndarray,
    f: np.ndarray,
    f0: np.ndarray,
    dff: np.ndarray,
    frame_interval_s: float,
) -> Path:
    """Write traces in long format (module docstring).

    Args:
        path: output ``.csv`` (parents created, replaced if present).
        ids: ``(N,)`` cell ids.
        f, f0, dff: ``(N, T)`` F, F0 (recording units) and dF/F (NaN written as empty).
        frame_interval_s: time between frames (s).

    Returns:
        The path written (``N * T`` data rows plus a header).

    Raises:
        TableError: shapes disagree.
    """
    ids = np.asarray(ids)
    f, f0, dff = (np.asarray(a, dtype=np.float64) for a in (f, f0, dff))
    n = ids.shape[0]
    if (
        ids.ndim != 1
        or f.ndim != 2
        or f.shape[0] != n
        or f0.shape != f.shape
        or dff.shape != f.shape
    ):
        raise TableError(
            f"ids {ids.shape}, F {f.shape}, F0 {f0.shape}, dF/F {dff.shape}: need (N,) and (N, T)"
        )
    t = f.shape[1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    times = np.arange(t) * float(frame_interval_s)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TRACE_COLUMNS)
        for i in range(n):
            cid = int(ids[i])
            w.writerows(
                (cid, j, _fmt(times[j]), _fmt(f[i, j]), _fmt(f0[i, j]), _fmt(dff[i, j]))
                for j in range(t)
            )
    return path


def read_traces_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a traces CSV back into arrays.

    Returns:
        ``{"ids": (N,) int64, "time_s": (T,) float64, "F", "F0", "dff": (N, T) float64}``
        (empty cells -> NaN).

    Raises:
        TableError: wrong header, or rows that do not form a full cell x frame grid.
    """
    with Path(path).open(newline="") as fh:
        r = csv.reader(fh)
        header = tuple(next(r, ()))
        if header != TRACE_COLUMNS:
            raise TableError(f"{path}: header {header} is not {TRACE_COLUMNS}")
        rows = list(r)
    if not rows:
        return {
            "ids": np.zeros(0, np.int64),
            "time_s": np.zeros(0),
            **{k: np.zeros((0, 0)) for k in ("F", "F0", "dff")},
        }
    a = np.array([[float(v) if v != "" else np.nan for v in row] for row in rows])
    ids = np.unique(a[:, 0].astype(np.int64))
    frames = np.unique(a[:, 1].astype(np.int64))
    if len(a) != len(ids) * len(frames):
        raise TableError(
            f"{path}: {len(a)} rows do not form {len(ids)} cells x {len(frames)} frames"
        )
    ci = np.searchsorted(ids, a[:, 0].astype(np.int64))
    fi = np.searchsorted(frames, a[:, 1].astype(np.int64))
    out: dict[str, np.ndarray] = {"ids": ids, "time_s": np.full(len(frames), np.nan)}
    out["time_s"][fi] = a[:, 2]
    for col, name in ((3, "F"), (4, "F0"), (5, "dff")):
        m = np.full((len(ids), len(frames)), np.nan)
        m[ci, fi] = a[:, col]
        out[name] = m
    return out


def write_events_csv(path: str | Path, events: list[Event]) -> Path:
    """Write events, one row per event (columns :data:`EVENT_COLUMNS`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(EVENT_COLUMNS)
        for e in events:
            w.writerow(
                [
                    _fmt(v) if isinstance(v, float) else int(v)
                    for v in (getattr(e, c) for c in EVENT_COLUMNS)
                ]
            )
    return path


def read_events_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read an events CSV: a list of dicts with typed values (int frames/ids, float times, bool).

    Raises:
        TableError: wrong header.
    """
    types = {f.name: f.type for f in fields(Event)}
    with Path(path).open(newline="") as fh:
        r = csv.DictReader(fh)
        if tuple(r.fieldnames or ()) != EVENT_COLUMNS:
            raise TableError(f"{path}: header {r.fieldnames} is not {EVENT_COLUMNS}")
        out = []
        for row in r:
            d: dict[str, Any] = {}
            for k, v in row.items():
                typ = str(types[k])
                if typ == "bool":
                    d[k] = v in ("1", "True", "true")
                elif typ == "int":
                    d[k] = int(v)
                else:
                    d[k] = float(v) if v != "" else float("nan")
            out.append(d)
    return out


def write_trace_exports(
    out_dir: str | Path,
    frames: np.ndarray,
    labels: np.ndarray,
    frame_interval_s: float,
    window_s: float | None = None,
    k: float = 3.0,
) -> dict[str, Any]:
    """Traces, dF/F, events and ROIs of one segmented recording, written for the user's tools.

    Args:
        out_dir: folder for ``traces.csv``, ``events.csv`` and ``rois.zip`` (ImageJ ROI set of
            each cell's footprint, the union of its pixels over time).
        frames: ``(T, H, W)`` recording; labels: ``(T, H, W)`` label stack or ``(H, W)``.
        frame_interval_s: time between frames (s).
        window_s, k: F0 window (s; ``None`` = the default of
            :func:`~calseg.analysis.traces.baseline_f0`) and event threshold (x noise), see
            :func:`calseg.analysis.traces.baseline_f0` and
            :func:`calseg.analysis.events.detect_events`.

    Returns:
        ``{"paths": {name: Path}, "n_cells": int, "n_events": int, "n_flagged": int}``;
        ``rois.zip`` is absent when there is no cell.
    """
    from calseg.analysis.events import detect_events
    from calseg.analysis.traces import (
        DEFAULT_WINDOW_S,
        baseline_f0,
        cell_traces,
        dff,
        footprint_image,
    )
    from calseg.io.rois import write_imagej_rois

    out = Path(out_dir)
    ids, f = cell_traces(frames, labels)
    f0 = baseline_f0(f, frame_interval_s, window_s=window_s or DEFAULT_WINDOW_S)
    d, flags = dff(f, f0)
    events = detect_events(d, frame_interval_s, k=k, cell_ids=ids)
    paths = {
        "traces.csv": write_traces_csv(out / "traces.csv", ids, f, f0, d, frame_interval_s),
        "events.csv": write_events_csv(out / "events.csv", events),
    }
    if len(ids):
        paths["rois.zip"] = write_imagej_rois(footprint_image(labels), out / "rois.zip")
    return {
        "paths": paths,
        "n_cells": len(ids),
        "n_events": len(events),
        "n_flagged": int(flags.sum()),
    }
