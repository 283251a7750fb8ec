"""The trace pipeline of one segmented recording: traces -> F0 -> dF/F -> events -> pattern
class -> waves, written as tables (:mod:`calseg.io.tables`) and ROIs (:mod:`calseg.io.rois`).

Used by the segment-and-export pipeline (:func:`calseg.pipelines.segment.segment_to_folder`:
``calseg segment`` and the infer job) and by ``calseg analyze``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from calseg.analysis.events import detect_events
from calseg.analysis.evidence import baseline_notes, clearly_above_noise, region_evidence
from calseg.analysis.patterns import (
    PatternThresholds,
    analyse_patterns,
    cell_geometry,
    event_clusters,
    significant_amplitude,
    significant_events,
)
from calseg.analysis.traces import (
    DEFAULT_WINDOW_S,
    baseline_f0,
    cell_traces,
    dff,
    footprint_image,
)
from calseg.analysis.waves import waves_from_events
from calseg.io.rois import write_imagej_rois
from calseg.io.tables import (
    write_events_csv,
    write_events_parquet,
    write_nwb,
    write_traces_csv,
    write_traces_parquet,
)

__all__ = ["write_trace_exports"]


_TH = PatternThresholds()
"""The default pattern thresholds, for the text of ``patterns.json``'s significance note."""


def write_trace_exports(
    out_dir: str | Path,
    frames: np.ndarray | None,
    labels: np.ndarray,
    frame_interval_s: float,
    window_s: float | None = None,
    k: float = 3.0,
    pixel_size_um: float | None = None,
    nwb: bool = False,
    traces: tuple[np.ndarray, np.ndarray] | None = None,
    target: str = "active",
) -> dict[str, Any]:
    """Traces, dF/F, events, pattern class, waves and ROIs of one segmented recording.

    Args:
        out_dir: folder for ``traces.csv``/``.parquet``, ``events.csv``/``.parquet``,
            ``patterns.json`` (:func:`calseg.analysis.patterns.analyse_patterns`),
            ``waves.json`` (:func:`calseg.analysis.waves.waves_from_events`), ``rois.zip``
            (ImageJ ROI set of each cell's footprint, the union of its pixels over time) and,
            with ``nwb=True``, ``calseg.nwb`` (:func:`calseg.io.tables.write_nwb`).
        frames: ``(T, H, W)`` recording; labels: ``(T, H, W)`` label stack or ``(H, W)``.
        frame_interval_s: time between frames (s).
        window_s, k: F0 window (s; ``None`` = the default of
            :func:`~calseg.analysis.traces.baseline_f0`) and event threshold (x noise), see
            :func:`calseg.analysis.traces.baseline_f0` and
            :func:`calseg.analysis.events.detect_events`.
        pixel_size_um: um per px for wave speeds (``None``: speeds in px/s, said in waves.json).
        nwb: also write NWB (needs the ``[nwb]`` extra; :class:`calseg.io.tables.TableError`
            without it).
        traces: ``(ids, F)`` already measured (e.g. by
            :func:`calseg.analysis.traces.cell_traces_chunked` on a recording too large for
            memory); ``frames`` is then not used and may be ``None``.
        target: ``"active"`` (cells found by their activity) or ``"cells"`` (regions found on
            a projection, :mod:`calseg.segment.projection`): then only the regions with cell
            evidence (:func:`region_evidence`) enter the pattern class, and the class is
            ``"none"`` unless they clearly outnumber the noise reference
            (:func:`clearly_above_noise`).

    Returns:
        ``{"paths": {name: Path}, "n_cells", "n_events" (detected), "n_significant_events"
        (those the pattern class counts), "significant_event_amplitude": the peak dF/F from
        which an event is significant (None: none is), "n_flagged": int, "pattern_class": str,
        "pattern_reason": str, "n_waves": int, "coverage": labelled fraction of the field,
        "evidence": region_evidence(...), "notes": [plausibility notes], "ids": (N,) cell
        ids, "dff": (N, T) dF/F}``; ``rois.zip`` is absent when there is no cell.
        ``patterns.json`` carries ``events`` (detected, significant,
        significant_from_amplitude), ``regions`` (evidence) and ``notes`` besides the
        :class:`~calseg.analysis.patterns.PatternResult`.
    """
    out = Path(out_dir)
    ids, f = traces if traces is not None else cell_traces(frames, labels)
    f0 = baseline_f0(f, frame_interval_s, window_s=window_s or DEFAULT_WINDOW_S)
    d, flags = dff(f, f0)
    events = detect_events(d, frame_interval_s, k=k, cell_ids=ids)
    t = f.shape[1]
    paths = {
        "traces.csv": write_traces_csv(out / "traces.csv", ids, f, f0, d, frame_interval_s),
        "events.csv": write_events_csv(out / "events.csv", events),
        "traces.parquet": write_traces_parquet(
            out / "traces.parquet", ids, f, f0, d, frame_interval_s
        ),
        "events.parquet": write_events_parquet(out / "events.parquet", events),
    }
    lab_arr = np.asarray(labels)
    fp_any = lab_arr if lab_arr.ndim == 2 else (lab_arr != 0).any(axis=0)
    coverage = float(np.count_nonzero(fp_any) / fp_any.size) if fp_any.size else 0.0
    evidence = region_evidence(ids, d, events, frame_interval_s, k)
    notes = baseline_notes(frames, f, f0, d)
    pattern_labels = labels
    if target == "cells":  # regions without cell evidence never make a pattern class
        keep = np.zeros(int(lab_arr.max()) + 1 if lab_arr.size else 1, dtype=bool)
        keep[[i for i in evidence["with_events"] if i < keep.size]] = True
        pattern_labels = np.where(keep[lab_arr], lab_arr, 0)
    pattern = analyse_patterns(events, pattern_labels, t, frame_interval_s, pixel_size_um)
    if target == "cells" and not clearly_above_noise(evidence):
        pattern.pattern_class = "none"
        pattern.reason = (
            f"no pattern class from projection regions: {evidence['n_with_events']} with a "
            f"calcium event are not clearly more than noise gives "
            f"({evidence['null_with_events']} with an equally large negative transient)"
        )
    sig = significant_events(events)
    sig_floor = significant_amplitude(events)
    geo = cell_geometry(pattern_labels, pixel_size_um or 1.0)
    waves = waves_from_events(
        sig, event_clusters(sig, geo, t, frame_interval_s), geo, frame_interval_s
    )
    unit = "um" if pixel_size_um else "px"
    pj = out / "patterns.json"
    n_sig = len(sig)
    pj.write_text(
        json.dumps(
            {
                **pattern.to_dict(),
                "frame_interval_s": frame_interval_s,
                "events": {
                    "detected": len(events),
                    "significant": n_sig,
                    "significant_from_amplitude": sig_floor,
                    "note": "detected = every event in events.csv; significant = those the "
                    "pattern class counts (features.n_events): peak dF/F (events.csv "
                    f"amplitude) >= significant_from_amplitude, the larger of "
                    f"{_TH.min_event_amplitude:g} and {_TH.relative_event_amplitude:g} x the "
                    "95th-percentile amplitude",
                },
                "target": target,
                "regions": {**evidence, "coverage": coverage},
                "notes": notes,
            },
            indent=1,
        )
    )
    wj = out / "waves.json"
    wj.write_text(
        json.dumps(
            {
                "length_unit": unit,
                "speed_unit": f"{unit}/s",
                "pixel_size_um": pixel_size_um,
                "waves": [w.to_dict() for w in waves],
            },
            indent=1,
        )
    )
    paths["patterns.json"] = pj
    paths["waves.json"] = wj
    if len(ids):
        fp = footprint_image(labels)
        paths["rois.zip"] = write_imagej_rois(fp, out / "rois.zip")
        if nwb:
            paths["calseg.nwb"] = write_nwb(
                out / "calseg.nwb", ids, f, d, fp, frame_interval_s, pixel_size_um
            )
    return {
        "paths": paths,
        "n_cells": len(ids),
        "n_events": len(events),
        "n_significant_events": n_sig,
        "significant_event_amplitude": sig_floor,
        "n_flagged": int(flags.sum()),
        "pattern_class": pattern.pattern_class,
        "pattern_reason": pattern.reason,
        "n_waves": len(waves),
        "coverage": coverage,
        "evidence": evidence,
        "notes": notes,
        "ids": ids,
        "dff": d,
    }
