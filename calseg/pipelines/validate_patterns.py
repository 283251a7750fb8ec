"""Pattern classification validated on simulated tissue of known class (``calseg
validate-patterns``; BENCHMARKS.md): :func:`validate_patterns` renders one tissue per (seed,
class) with :mod:`calseg.simulate` and measures it with the pattern rules of
:mod:`calseg.analysis.patterns`; :func:`format_confusion` prints the confusion matrix.
"""

from __future__ import annotations

import numpy as np

from calseg.analysis.events import detect_events
from calseg.analysis.patterns import (
    PATTERN_CLASSES,
    PatternResult,
    analyse_patterns,
    cell_geometry,
    event_clusters,
    events_from_calcium,
    significant_events,
)
from calseg.analysis.traces import baseline_f0, cell_traces, dff
from calseg.analysis.waves import waves_from_events
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import iter_videos

#: the simulated recordings of :func:`validate_patterns` (pouch, ~60 px cells, 240 x 5 s frames)
VALIDATION_VIDEO = {
    "height": 192,
    "width": 192,
    "mean_cell_area_px": 60.0,
    "n_frames": 240,
    "frame_interval_s": 5.0,
}


def class_disagreement_note(
    simulated: str | None,
    found: str | None,
    reason: str | None,
    n_frames: int,
    frame_interval_s: float | None,
) -> str | None:
    """A note when a simulated video's pattern class (how it was made) differs from the class
    the pattern rules read from it; ``None`` when they agree or either is unknown.

    Args:
        simulated: the class the video was simulated with; found: the class found, with the
            rule's ``reason``; n_frames: frames segmented; frame_interval_s: s per frame.

    Returns:
        Text for people: both classes, the rule's reason, and how the recording's length
        compares with the recordings the rules were validated on (:data:`VALIDATION_VIDEO`).
    """
    if not simulated or not found or simulated == found:
        return None
    dt = frame_interval_s or 1.0
    length_s, valid_s = (
        n_frames * dt,
        VALIDATION_VIDEO["n_frames"] * VALIDATION_VIDEO["frame_interval_s"],
    )
    checked = (
        f"{VALIDATION_VIDEO['n_frames']} frames of {VALIDATION_VIDEO['frame_interval_s']:g} s "
        f"({valid_s / 60:g} min; calseg validate-patterns, BENCHMARKS.md 'Pattern classes')"
    )
    tail = (
        f"the rules were validated on simulated recordings of {checked}, not on shorter "
        "ones: a few minutes can show another pattern than the tissue's whole course"
        if length_s < valid_s
        else f"on simulated recordings of {checked} the rules confuse spikes and transients most"
    )
    because = f" ({reason})" if reason else ""
    return (
        f"simulated as {simulated}, but the pattern rules read {found}{because} from "
        f"{n_frames} frames ({length_s / 60:.3g} min): {tail}"
    )


def simulated_recording_pattern(
    video: dict, frame_interval_s: float, pixel_size_um: float
) -> PatternResult:
    """Pattern class of one simulated video through the measuring pipeline.

    Traces from the rendered ``video["image"]`` over the true cell label image
    (``video["tissue"].labels``, all cells), F0 and dF/F with the defaults of
    :mod:`calseg.analysis.traces`, events by :func:`calseg.analysis.events.detect_events`, then
    :func:`~calseg.analysis.patterns.analyse_patterns`. Segmentation is deliberately left out:
    this measures the pattern rules, not the segmenter.
    """
    labels = video["tissue"].labels
    ids, f = cell_traces(video["image"], labels)
    d, _ = dff(f, baseline_f0(f, frame_interval_s))
    events = detect_events(d, frame_interval_s, cell_ids=ids)
    return analyse_patterns(events, labels, f.shape[1], frame_interval_s, pixel_size_um)


def simulated_wave_speeds(
    video: dict, frame_interval_s: float, pixel_size_um: float, threshold_uM: float = 0.1
) -> tuple[float | None, float | None]:
    """Speed (um/s) of the largest wave of a simulated video, from the true Ca2+ onsets
    (:func:`~calseg.analysis.patterns.events_from_calcium`) and from the rendered video (the
    measuring pipeline of :func:`simulated_recording_pattern`, significant events); ``None``
    where no wave of >= 10 cells is found."""
    labels = video["tissue"].labels
    geo = cell_geometry(labels, pixel_size_um)
    cal = video["calcium"]
    t = cal.shape[1]
    truth = events_from_calcium(cal, threshold_uM, frame_interval_s, np.arange(1, len(cal) + 1))
    ids, f = cell_traces(video["image"], labels)
    d, _ = dff(f, baseline_f0(f, frame_interval_s))
    seen = significant_events(detect_events(d, frame_interval_s, cell_ids=ids))
    speeds = []
    for ev in (truth, seen):
        w = waves_from_events(
            ev, event_clusters(ev, geo, t, frame_interval_s), geo, frame_interval_s
        )
        speeds.append(w[0].speed_um_s if w else None)
    return speeds[0], speeds[1]


def validate_patterns(
    seeds: list[int],
    classes: tuple[str, ...] = PATTERN_CLASSES,
    video: dict | None = None,
    defect_severity: float = 0.3,
) -> dict:
    """Confusion matrix of :func:`~calseg.analysis.patterns.analyse_patterns` on simulated
    videos of known class.

    One simulated tissue per (seed, class) (:class:`calseg.simulate.config.SimulationConfig`
    with ``video`` overriding :data:`VALIDATION_VIDEO`), measured by
    :func:`simulated_recording_pattern`.

    Returns:
        ``{"classes": [...], "labels": [... + "none"], "matrix": [[count]] (rows = true class,
        columns = predicted, order of "labels"), "accuracy": float, "n": int,
        "rows": [{"seed", "true", "predicted", "reason", "features"}], "config": {...}}``;
        rows of waves videos also hold ``wave_speed_true_um_s`` and ``wave_speed_video_um_s``
        (:func:`simulated_wave_speeds`).
    """
    vid = {**VALIDATION_VIDEO, **(video or {})}
    labels = [*classes, "none"]
    mat = np.zeros((len(classes), len(labels)), np.int64)
    rows = []
    for seed in seeds:
        cfg = SimulationConfig(
            n_videos=len(classes),
            pattern_classes=list(classes),
            n_val_videos=0,
            n_test_videos=0,
            seed=int(seed),
            defect_severity=defect_severity,
            **vid,
        )
        for v in iter_videos(cfg):
            res = simulated_recording_pattern(v, cfg.frame_interval_s, cfg.pixel_size_um)
            mat[classes.index(v["pattern_class"]), labels.index(res.pattern_class)] += 1
            row = {
                "seed": int(seed),
                "true": v["pattern_class"],
                "predicted": res.pattern_class,
                "reason": res.reason,
                "features": res.features,
            }
            if v["pattern_class"] == "waves":
                row["wave_speed_true_um_s"], row["wave_speed_video_um_s"] = simulated_wave_speeds(
                    v, cfg.frame_interval_s, cfg.pixel_size_um, cfg.activity_threshold_uM
                )
            rows.append(row)
    n = int(mat.sum())
    return {
        "classes": list(classes),
        "labels": labels,
        "matrix": mat.tolist(),
        "accuracy": float(np.trace(mat[:, : len(classes)]) / n) if n else 0.0,
        "n": n,
        "rows": rows,
        "config": {**vid, "defect_severity": defect_severity, "seeds": list(seeds)},
    }


def format_confusion(report: dict) -> str:
    """The confusion matrix of :func:`validate_patterns` as a Markdown table."""
    labels = report["labels"]
    lines = [
        "| true \\ predicted | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for cls, row in zip(report["classes"], report["matrix"], strict=True):
        lines.append(f"| {cls} | " + " | ".join(str(v) for v in row) + " |")
    lines.append(f"\naccuracy {report['accuracy']:.3f} on {report['n']} simulated recordings")
    pairs = [
        (r["wave_speed_true_um_s"], r["wave_speed_video_um_s"])
        for r in report["rows"]
        if r.get("wave_speed_true_um_s") and r.get("wave_speed_video_um_s")
    ]
    if pairs:
        tv = np.array(pairs)
        rel = np.abs(tv[:, 1] / tv[:, 0] - 1)
        lines.append(
            f"wave speed, video vs true Ca2+ onsets ({len(pairs)} waves): true "
            f"{np.median(tv[:, 0]):.3g} um/s median ({tv[:, 0].min():.3g}-{tv[:, 0].max():.3g}), "
            f"|relative error| median {np.median(rel):.3f}, max {rel.max():.3f}"
        )
    return "\n".join(lines)
