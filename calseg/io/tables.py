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
    threshold,rest,truncated

Frames count from 0. ``offset_frame`` is exclusive, the first frame after the event (Python's
slice convention: ``dff[onset_frame:offset_frame]`` is the event), so it equals T for an event
still running in the last frame (``truncated`` 1). ``amplitude`` is the peak dF/F, ``auc`` dF/F
x s, ``threshold`` the dF/F level that started the event and ``rest`` the trace's resting dF/F.

The same two tables are also written as Apache Parquet (``traces.parquet``, ``events.parquet``;
pyarrow, columns and names as the CSVs, float32 F/F0/dF/F, NaN kept as NaN) for pandas, R arrow
and Polars, and optionally as NWB 2 (:func:`write_nwb`, needs ``pip install calseg[nwb]``).
"""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from calseg.analysis.events import Event
from calseg.progress import check_cancelled

__all__ = [
    "EVENT_COLUMNS",
    "write_events_parquet",
    "write_nwb",
    "write_traces_parquet",
    "TRACE_COLUMNS",
    "TableError",
    "read_events_csv",
    "read_traces_csv",
    "write_events_csv",
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
            check_cancelled()
            cid = int(ids[i])
            w.writerows(
                (cid, j, _fmt(times[j]), _fmt(f[i, j]), _fmt(f0[i, j]), _fmt(dff[i, j]))
                for j in range(t)
            )
    return path


CSV_CHUNK_BYTES = 3 * 2**20
"""Bytes of lines (about 65,000 traces rows) parsed at once by :func:`_parse_rows`."""


def _parse_rows(fh: Any, n_columns: int, path: str | Path) -> np.ndarray:
    """``(rows, n_columns)`` float64 of the numeric CSV lines left in ``fh`` (empty fields
    NaN), parsed by NumPy's C reader :data:`CSV_CHUNK_BYTES` of lines at a time.

    Every field as a Python string and float (``csv.reader`` into lists) took about 24 bytes of
    memory per byte of file: the viewer's three requests for one 70 MB ``traces.csv`` took the
    API up by 5.1 GB (a sixth attack run); here the chunk's text and the array grow with it.

    Raises:
        TableError: a line that is not ``n_columns`` numbers.
    """
    import io
    import re

    empty = re.compile(r"(?<=,)(?=,|\r?$)|^(?=,)", re.MULTILINE)
    parts = []
    while True:
        lines = fh.readlines(CSV_CHUNK_BYTES)
        if not lines:
            break
        text = empty.sub("nan", "".join(lines))
        try:
            chunk = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise TableError(f"{path}: {exc}") from None
        if chunk.size and chunk.shape[1] != n_columns:
            raise TableError(f"{path}: rows of {chunk.shape[1]} fields, not {n_columns}")
        parts.append(chunk.reshape(-1, n_columns))
    return np.concatenate(parts) if parts else np.zeros((0, n_columns))


def read_traces_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a traces CSV back into arrays.

    Returns:
        ``{"ids": (N,) int64, "time_s": (T,) float64, "F", "F0", "dff": (N, T) float64}``
        (empty cells -> NaN).

    Raises:
        TableError: wrong header, or rows that do not form a full cell x frame grid.
    """
    with Path(path).open(newline="") as fh:
        header = tuple(next(csv.reader([fh.readline()]), ()))
        if header != TRACE_COLUMNS:
            raise TableError(f"{path}: header {header} is not {TRACE_COLUMNS}")
        a = _parse_rows(fh, len(TRACE_COLUMNS), path)
    if not len(a):
        return {
            "ids": np.zeros(0, np.int64),
            "time_s": np.zeros(0),
            **{k: np.zeros((0, 0)) for k in ("F", "F0", "dff")},
        }
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


def write_traces_parquet(
    path: str | Path,
    ids: np.ndarray,
    f: np.ndarray,
    f0: np.ndarray,
    dff: np.ndarray,
    frame_interval_s: float,
) -> Path:
    """Write traces in the long format of :func:`write_traces_csv` as Parquet (pyarrow).

    Columns ``cell_id`` int64, ``frame`` int64, ``time_s`` float64, ``F``, ``F0``, ``dff``
    float32 (NaN where flagged). Raises :class:`TableError` when shapes disagree.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.asarray(ids, dtype=np.int64)
    f, f0, dff = (np.asarray(a, dtype=np.float32) for a in (f, f0, dff))
    if f.ndim != 2 or f.shape[0] != ids.shape[0] or f0.shape != f.shape or dff.shape != f.shape:
        raise TableError(
            f"ids {ids.shape}, F {f.shape}, F0 {f0.shape}, dF/F {dff.shape}: need (N,) and (N, T)"
        )
    n, t = f.shape
    table = pa.table(
        {
            "cell_id": np.repeat(ids, t),
            "frame": np.tile(np.arange(t, dtype=np.int64), n),
            "time_s": np.tile(np.arange(t) * float(frame_interval_s), n),
            "F": f.ravel(),
            "F0": f0.ravel(),
            "dff": dff.ravel(),
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_events_parquet(path: str | Path, events: list[Event]) -> Path:
    """Write events as Parquet, columns :data:`EVENT_COLUMNS` (int64 frames and ids, float64
    times and values, bool ``truncated``); an empty list writes a typed, empty table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    schema = pa.schema([(f.name, kinds[str(f.type)]) for f in fields(Event)])
    cols = {c: [getattr(e, c) for e in events] for c in EVENT_COLUMNS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), path)
    return path


NWB_INSTALL_HINT = "NWB export needs pynwb: pip install 'calseg[nwb]'"


def write_nwb(
    path: str | Path,
    ids: np.ndarray,
    f: np.ndarray,
    dff: np.ndarray,
    footprints: np.ndarray,
    frame_interval_s: float,
    pixel_size_um: float | None = None,
    description: str = "CalSeg segmentation and traces",
) -> Path:
    """Write ROIs and traces as an NWB 2 file (pynwb, optional extra ``[nwb]``).

    Layout (NWB ophys conventions): ``processing/ophys/ImageSegmentation/PlaneSegmentation``
    with one ``pixel_mask`` per cell (its ``(x, y, weight)`` pixels, weight 1: NWB's sparse
    form; a dense ``(H, W)`` ``image_mask`` per cell made a 272 MB file of 16,380 cells of a
    128 x 128 recording, a 12th attack run) and a ``cell_id`` column;
    ``processing/ophys/Fluorescence/F`` and ``processing/ophys/DfOverF/dff`` RoiResponseSeries
    ``(T, N)`` (NWB stores time first) with ``rate = 1 / frame_interval_s``.

    Args:
        path: output ``.nwb``; ids: ``(N,)`` cell ids; f, dff: ``(N, T)`` F and dF/F;
        footprints: ``(H, W)`` label image (cell ``ids[i]`` = its pixels);
        frame_interval_s: s per frame; pixel_size_um: um per px (recorded in the imaging
        plane's grid spacing when given).

    Raises:
        TableError: pynwb is not installed (message: how to install it), or shapes disagree.
    """
    try:
        from datetime import UTC, datetime

        from pynwb import NWBHDF5IO, NWBFile
        from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel
    except ImportError as exc:
        raise TableError(NWB_INSTALL_HINT) from exc
    import uuid

    ids = np.asarray(ids, dtype=np.int64)
    f = np.asarray(f, dtype=np.float32)
    dff = np.asarray(dff, dtype=np.float32)
    lab = np.asarray(footprints)
    if f.shape != dff.shape or f.ndim != 2 or f.shape[0] != ids.shape[0] or lab.ndim != 2:
        raise TableError(f"ids {ids.shape}, F {f.shape}, dF/F {dff.shape}, labels {lab.shape}")
    nwb = NWBFile(
        session_description=description,
        identifier=str(uuid.uuid4()),
        session_start_time=datetime.now(UTC),
    )
    device = nwb.create_device(name="microscope", description="unknown (not in the recording)")
    plane = nwb.create_imaging_plane(
        name="ImagingPlane",
        optical_channel=OpticalChannel(
            name="GECI", description="calcium indicator", emission_lambda=np.nan
        ),
        description="the recording's imaging plane",
        device=device,
        excitation_lambda=np.nan,
        indicator="unknown",
        location="unknown",
        imaging_rate=1.0 / float(frame_interval_s),
        grid_spacing=[float(pixel_size_um)] * 2 if pixel_size_um else None,
        grid_spacing_unit="micrometers",
    )
    ophys = nwb.create_processing_module(name="ophys", description="CalSeg cells and traces")
    seg = ImageSegmentation()
    ophys.add(seg)
    ps = seg.create_plane_segmentation(
        name="PlaneSegmentation", description="CalSeg cells", imaging_plane=plane
    )
    ps.add_column(name="cell_id", description="CalSeg label id")
    flat = lab.ravel()
    order = np.argsort(flat, kind="stable")  # every cell's pixels in one pass, no loop over
    bounds = np.searchsorted(flat[order], np.stack([ids, ids + 1]))  # the image per cell
    width = lab.shape[1]
    for i, cid in enumerate(ids):
        if i % 256 == 0:
            check_cancelled()
        px = order[bounds[0, i] : bounds[1, i]]
        mask = [(int(p % width), int(p // width), 1.0) for p in px]
        ps.add_roi(pixel_mask=mask, cell_id=int(cid))
    region = ps.create_roi_table_region(region=list(range(len(ids))), description="all cells")
    rate = 1.0 / float(frame_interval_s)
    fl = Fluorescence(name="Fluorescence")
    df = DfOverF(name="DfOverF")
    ophys.add(fl)  # in the file's tree before the series link to the ROI table
    ophys.add(df)
    fl.create_roi_response_series(name="F", data=f.T, rois=region, unit="a.u.", rate=rate)
    df.create_roi_response_series(name="dff", data=dff.T, rois=region, unit="1", rate=rate)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path
