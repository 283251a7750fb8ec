"""Segment one recording and write everything a user reads: the one pipeline behind
``calseg segment`` and the service's infer job (:func:`calseg.service.runners.run_infer`).

:func:`segment_and_export` is the whole recipe from frames read to files written (frame
interval, optional preprocessing, the method rule, segmentation, outputs); both front doors
only read the recording and report what it says. :func:`segment_to_folder` is its last step.

Into ``out_dir``:

* ``labels.tif`` (label stack), ``traces.csv``/``.parquet``, ``events.csv``/``.parquet``,
  ``patterns.json``, ``waves.json``, ``rois.zip`` (and ``calseg.nwb``):
  :func:`calseg.pipelines.traces.write_trace_exports`;
* ``overlay.png`` (contact sheet: frames where cells are labelled, time, scale bar, the model's
  name, a red banner when its weights are random, the cells' dF/F traces) and ``overlay.gif``;
* ``activity.png`` and ``activity.tif``: the activity map (max z-score over time,
  :func:`calseg.segment.diagnose.activity_map`) with the threshold, the cells outlined;
* ``diagnosis.json`` when the default target found no cell: why, and the next steps with the
  numbers they would change (:func:`calseg.segment.diagnose.explain_empty`).

:meth:`SegmentOutputs.lines` gives the summary for a terminal or a job log, each line with a
level (``info``, ``note`` for a plausibility check, ``warning``), and :meth:`to_result` the
fields of the job result the page shows.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calseg.fmt import fmt_num, plural
from calseg.io.recordings import FRAME_INTERVAL_RANGE_S, PIXEL_SIZE_RANGE_UM, usable_unit
from calseg.progress import ProgressFn, null_progress, scaled
from calseg.segment.infer import SegmentOptionError

if TYPE_CHECKING:
    from collections.abc import Callable

    from calseg.preprocess import PreprocessOptions
    from calseg.segment.decode import InferenceConfig

ACTIVITY_MAP_MAX_VOXELS = 200_000_000
"""For ``target="cells"`` the activity map is an extra pass over the recording (3 float32
copies); above this many voxels (T x H x W) it is skipped, said so."""
MAX_TRACES_ON_SHEET = 40
"""At most this many dF/F traces (the largest peaks) are drawn under the contact sheet."""

ARTIFACT_KINDS = {
    "labels.tif": "labels",
    "overlay.png": "overlay",
    "overlay.gif": "animation",
    "activity.png": "activity-map",
    "activity.tif": "activity-map",
    "diagnosis.json": "analysis",
}
"""Kind of each artifact this module writes (the exports' kinds come from their suffix)."""


def artifact_kind(name: str) -> str:
    """The artifact kind of an output file name (for the service's artifact table)."""
    if name in ARTIFACT_KINDS:
        return ARTIFACT_KINDS[name]
    return {".csv": "table", ".parquet": "table", ".json": "analysis", ".nwb": "nwb"}.get(
        Path(name).suffix, "rois"
    )


@dataclass
class SegmentOutputs:
    """What :func:`segment_to_folder` made and measured.

    ``labels`` ``(T, H, W)`` uint32; ``paths`` artifact name -> file; ``method``
    (``"classical"``/``"sam2"``) and ``model_label`` (its one name, e.g. ``"SAM2 untuned
    (random weights)"``); ``n_cells``; ``coverage`` (fraction of the field labelled in any
    frame); ``exports`` (:func:`~calseg.pipelines.traces.write_trace_exports`' summary, arrays left
    out); ``diagnosis`` (dict, empty result only); ``warnings``; ``notes`` (plausibility).
    """

    labels: np.ndarray
    paths: dict[str, Path]
    method: str
    model_label: str
    random_weights: bool
    n_cells: int
    coverage: float
    target: str
    exports: dict[str, Any] = field(default_factory=dict)
    diagnosis: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segmentation: Any = None
    method_reason: str | None = None

    def lines(
        self, recording: str = "REC", out_dir: str = "OUT", diagnosis_level: str = "warning"
    ) -> list[tuple[str, str]]:
        """``(level, text)`` lines summarising the outputs (levels ``info``, ``note``,
        ``warning``); commands in suggestions name ``recording`` and ``out_dir``. The "why no
        cell" line has ``diagnosis_level``: the service logs it as ``info``, because its page
        shows :attr:`diagnosis` in a box of its own (as a warning it was shown twice)."""
        out: list[tuple[str, str]] = []
        t = self.labels.shape[0]
        unit = "region" if self.target == "cells" else "cell"
        what = "found on the projection" if self.target == "cells" else "active"
        out.append(
            (
                "info",
                f"{self.model_label}: {plural(self.n_cells, unit)} ({what}) labelled over "
                f"{plural(t, 'frame')}, {100 * self.coverage:.1f} % of the field",
            )
        )
        d, _ = self.cell_diameter()
        source = (getattr(self.segmentation, "activity", None) or {}).get("cell_diameter_source")
        if d is not None:
            from calseg.segment.cells import CellParams

            prior = CellParams().cell_diameter_px
            clipped = f"the {prior:g} px prior clipped to half the field" if d < prior else ""
            how = {
                "estimated": " (estimated from the recording; --cell-diameter-px overrides)",
                "prior": f" ({clipped or 'the prior'}: no cell scale could be estimated from "
                "the recording; --cell-diameter-px overrides)",
            }.get(source, "")
            out.append(("info", f"cell diameter {d:.1f} px{how}"))
        if self.n_cells:
            out.extend(export_lines(self.exports, self.target, self.coverage, notes=False))
        for n in self.notes:
            out.append(("note", n))
        for w in self.warnings:
            out.append(("warning", w))
        if self.diagnosis:
            from calseg.segment.diagnose import cli_flags

            out.append((diagnosis_level, f"why no cell: {self.diagnosis['reason']}"))
            for s in self.diagnosis["suggestions"]:
                cmd = (
                    f"calseg segment {shlex.quote(str(recording))} {shlex.quote(str(out_dir))} "
                    f"{cli_flags(s['params'])}"
                )
                out.append(("info", f"try: {s['text']}: {cmd}"))
                out.append(("info", f"     {s['expected']}"))
        return out

    def cell_diameter(self) -> tuple[float | None, bool]:
        """``(cell diameter used in px, whether it was estimated from the recording)``;
        ``(None, False)`` when the segmentation recorded none."""
        stats = getattr(self.segmentation, "activity", None) or {}
        d = stats.get("cell_diameter_px")
        return (float(d) if d is not None else None), bool(stats.get("cell_diameter_estimated"))

    def to_result(self) -> dict[str, Any]:
        """JSON-able fields for a job result (the page reads them)."""
        ex = {k: v for k, v in self.exports.items() if k not in ("paths", "ids", "dff")}
        d, estimated = self.cell_diameter()
        return {
            "method": self.method,
            "model_label": self.model_label,
            "random_weights": self.random_weights,
            "method_reason": self.method_reason,
            "target": self.target,
            "n_cells": self.n_cells,
            "coverage": self.coverage,
            "cell_diameter_px": d,
            "cell_diameter_estimated": estimated,
            "cell_diameter_source": (getattr(self.segmentation, "activity", None) or {}).get(
                "cell_diameter_source"
            ),
            "n_events": ex.get("n_events"),
            "n_significant_events": ex.get("n_significant_events"),
            "significant_event_amplitude": ex.get("significant_event_amplitude"),
            "pattern_class": ex.get("pattern_class"),
            "pattern_reason": ex.get("pattern_reason"),
            "evidence": ex.get("evidence"),
            "evidence_summary": (
                _evidence_text(ex.get("evidence"), self.coverage)
                if self.target == "cells" and ex.get("evidence")
                else None
            ),
            "diagnosis": self.diagnosis,
            "notes": list(self.notes),
        }


def export_lines(
    exports: dict[str, Any],
    target: str = "active",
    coverage: float | None = None,
    notes: bool = True,
) -> list[tuple[str, str]]:
    """``(level, text)`` lines of :func:`calseg.pipelines.traces.write_trace_exports`' summary:
    events detected vs significant, the regions' evidence (``target="cells"``), the pattern
    class with its reason, flagged traces and (``notes``) the plausibility notes."""
    if not exports:
        return []
    out: list[tuple[str, str]] = []
    out.append(
        (
            "info",
            f"{plural(exports['n_events'], 'event')} detected (events.csv); "
            f"{exports['n_significant_events']} of them significant (large enough to count for "
            "the pattern class"
            + (
                f": peak dF/F >= {fmt_num(floor, 3)}, events.csv amplitude"
                if (floor := exports.get("significant_event_amplitude")) is not None
                else ""
            )
            + "; patterns.json features.n_events)",
        )
    )
    ev = exports.get("evidence")
    if target == "cells" and ev:
        from calseg.analysis.evidence import evidence_summary

        cov = exports.get("coverage", 0.0) if coverage is None else coverage
        out.append(("info", evidence_summary(ev, cov)))
    out.append(
        ("info", f"pattern: {exports['pattern_class']} ({exports.get('pattern_reason', '')})")
    )
    if exports.get("n_flagged"):
        out.append(
            (
                "note",
                f"{plural(exports['n_flagged'], 'trace')} flagged: F0 too small for dF/F "
                "(left empty in traces.csv)",
            )
        )
    if notes:
        out.extend(("note", n) for n in exports.get("notes", []))
    return out


def _evidence_text(ev: dict | None, coverage: float) -> str | None:
    from calseg.analysis.evidence import evidence_summary

    return evidence_summary(ev, coverage) if ev else None


NO_FRAME_INTERVAL = "no frame interval in the recording's metadata: 1 s assumed for traces"
"""What both front doors say when a recording has no frame interval (traces then count frames
as seconds)."""


def check_recording_units(
    frame_interval_s: float | None,
    pixel_size_um: float | None,
    names: tuple[str, str] = ("frame_interval_s", "pixel_size_um"),
) -> None:
    """Refuse a given frame interval or pixel size outside :data:`FRAME_INTERVAL_RANGE_S` /
    :data:`PIXEL_SIZE_RANGE_UM`, or not finite (``None``: not given, fine).

    Raises:
        SegmentOptionError: naming the parameter (``names``: how the caller calls them, e.g.
            the CLI's flags), the value and the range.
    """
    for value, name, (lo, hi), unit in (
        (frame_interval_s, names[0], FRAME_INTERVAL_RANGE_S, "s"),
        (pixel_size_um, names[1], PIXEL_SIZE_RANGE_UM, "µm"),
    ):
        if value is not None and not usable_unit(value, (lo, hi)):
            raise SegmentOptionError(
                f"{name} {value}: must be a number from {lo:g} to {hi:g} {unit}"
            )


@dataclass
class SegmentRun:
    """What :func:`segment_and_export` did: the outputs (:class:`SegmentOutputs`), the frames it
    segmented (``(T, H, W)``, preprocessed when asked), the method chosen with its checkpoint
    and reason, the frame interval (s) and whether the file gave it, the pixel size (µm per px
    or ``None``) and the preprocessing report (:meth:`calseg.preprocess.PreprocessReport.to_dict`
    or ``None``)."""

    outputs: SegmentOutputs
    frames: np.ndarray
    method: str
    reason: str
    checkpoint: Path | None
    frame_interval_s: float
    frame_interval_known: bool
    pixel_size_um: float | None
    preprocess: dict[str, Any] | None


def choose_model(
    method: str,
    *,
    model: Path | str | None = None,
    model_reason: str = "SAM2: a model was given",
    configured: Path | str | None = None,
) -> tuple[str, Path | None, str]:
    """``(method, checkpoint, reason)`` of a segmentation request.

    ``method`` ``"auto"`` with a ``model`` (a fine-tuned job's checkpoint, the CLI's
    ``--checkpoint``) is SAM2 with it, said by ``model_reason``; otherwise the one rule of
    :func:`calseg.segment.choice.resolve_method` over the ``configured`` SAM2 checkpoint (the
    setting ``sam2_checkpoint``). SAM2 runs ``model`` when given, else ``configured``.

    Raises:
        SegmentOptionError: ``method`` is not auto, classical (``baseline``) or sam2.
    """
    from calseg.segment.choice import AUTO, CLASSICAL, SAM2, canonical_method, resolve_method

    name = canonical_method(method)
    if name not in (AUTO, CLASSICAL, SAM2):
        raise SegmentOptionError(f"method must be auto, classical or sam2, not {method!r}")
    if name == AUTO and model is not None:
        return SAM2, Path(model), model_reason
    chosen, reason = resolve_method(name, model_job_id=None, checkpoint=configured)
    ckpt = model if model is not None else configured
    return chosen, (Path(ckpt) if chosen == SAM2 and ckpt is not None else None), reason


def segment_and_export(
    frames: np.ndarray,
    out_dir: Path,
    config: dict[str, Any],
    *,
    name: str,
    frame_interval_s: float | None,
    pixel_size_um: float | None,
    preprocess: PreprocessOptions | None = None,
    model: Path | str | None = None,
    model_reason: str = "SAM2: a model was given",
    configured_checkpoint: Path | str | None = None,
    cache_dir: Path | None = None,
    gt: np.ndarray | None = None,
    title: str | None = None,
    nwb: bool = False,
    report: Callable[[str, str], None] | None = None,
    progress: ProgressFn | None = None,
    before_traces: Callable[[int, int], None] | None = None,
) -> SegmentRun:
    """Segment one recording and write its outputs: the recipe shared by ``calseg segment``
    and the infer job.

    Steps: the frame interval (``frame_interval_s``, the file's unless overridden; none: 1 s,
    reported as :data:`NO_FRAME_INTERVAL`), the optional preprocessing
    (:func:`calseg.preprocess.preprocess`), the method (:func:`choose_model`), then
    :func:`segment_to_folder`.

    Args:
        frames: ``(T, H, W)`` recording as read.
        out_dir: output folder (created).
        config: fields of :class:`calseg.segment.infer.InferenceConfig`; its ``method`` may be
            ``"auto"`` (resolved here).
        name: the recording's file name; title: first line of the pictures (default name).
        frame_interval_s: s per frame or ``None``; pixel_size_um: µm per px or ``None``.
        preprocess: :class:`calseg.preprocess.PreprocessOptions` (``None``: none).
        model, model_reason, configured_checkpoint: see :func:`choose_model`.
        cache_dir: SAM2 embedding cache; gt: ``(T, H, W)`` ground truth of a simulated video.
        nwb: also write ``calseg.nwb``.
        report: ``report(level, text)`` with level ``"warning"`` or ``"log"``.
        progress: :data:`calseg.progress.ProgressFn`.
        before_traces: called as ``before_traces(n_cells, n_frames)`` once the cells are
            known, before their traces, events and ROIs are written (the infer job admits
            itself again there: their cost grows with the cells); may raise to stop.

    Returns:
        :class:`SegmentRun`.

    Raises:
        SegmentOptionError: a bad method or configuration field (before any work).
        calseg.preprocess.PreprocessError: the preprocessing failed.
    """
    from pydantic import ValidationError

    from calseg.segment.infer import InferenceConfig

    report = report or (lambda _level, _text: None)
    progress = progress or null_progress
    method, checkpoint, reason = choose_model(
        config.get("method", "auto"),
        model=model,
        model_reason=model_reason,
        configured=configured_checkpoint,
    )
    try:
        icfg = InferenceConfig(**{**config, "method": method})
    except ValidationError as exc:
        raise SegmentOptionError(str(exc)) from None
    usable = {}
    for key, value, bounds, what in (
        ("dt", frame_interval_s, FRAME_INTERVAL_RANGE_S, "frame interval"),
        ("px", pixel_size_um, PIXEL_SIZE_RANGE_UM, "pixel size"),
    ):
        usable[key] = value if usable_unit(value, bounds) else None
        if value is not None and value != 0 and usable[key] is None:
            report("warning", f"{what} {value} outside {bounds[0]:g}-{bounds[1]:g}: not used")
    frame_interval_s, pixel_size_um = usable["dt"], usable["px"]
    dt_known = bool(frame_interval_s)
    dt = float(frame_interval_s) if frame_interval_s else 1.0
    if not dt_known:
        report("warning", NO_FRAME_INTERVAL)
    pre_report = None
    if preprocess is not None and preprocess.any:
        from calseg.preprocess import preprocess as run_preprocess

        progress(0.0, "preprocess", "registration / background / bleaching")
        frames, rep = run_preprocess(frames, dt, preprocess)
        pre_report = rep.to_dict()
        for step in rep.steps:
            report("log", f"preprocess: {step}")
        for warning in rep.warnings:
            report("warning", f"preprocess: {warning}")
    report("log", f"method: {reason}")
    out = segment_to_folder(
        frames,
        out_dir,
        icfg,
        name=name,
        title=title,
        frame_interval_s=dt,
        frame_interval_known=dt_known,
        pixel_size_um=pixel_size_um,
        checkpoint=checkpoint,
        cache_dir=cache_dir,
        gt=gt,
        nwb=nwb,
        method_reason=reason,
        progress=scaled(progress, 0.01, 1.0),
        before_traces=before_traces,
        base_checkpoint=configured_checkpoint,  # where a fine-tune's base may be
    )
    return SegmentRun(
        out, frames, method, reason, checkpoint, dt, dt_known, pixel_size_um, pre_report
    )


def random_weights_text(label: str) -> str:
    """The one warning every output carries when SAM2 ran with random weights."""
    return (
        f"{label}: SAM2 ran with RANDOM weights (no pretrained or trained checkpoint), so its "
        "masks say nothing about cells; use the classical method, or configure a SAM2 "
        "checkpoint (CALSEG_SAM2_CHECKPOINT)"
    )


def segment_to_folder(
    frames: np.ndarray,
    out_dir: Path,
    config: Any,
    *,
    name: str,
    frame_interval_s: float,
    pixel_size_um: float | None,
    frame_interval_known: bool = True,
    checkpoint: Path | str | None = None,
    cache_dir: Path | None = None,
    gt: np.ndarray | None = None,
    title: str | None = None,
    nwb: bool = False,
    method_reason: str | None = None,
    progress: ProgressFn | None = None,
    before_traces: Callable[[int, int], None] | None = None,
    base_checkpoint: Path | str | None = None,
) -> SegmentOutputs:
    """Segment ``frames`` with ``config`` and write all outputs to ``out_dir`` (module
    docstring).

    Args:
        frames: ``(T, H, W)`` recording (already preprocessed, if asked).
        out_dir: output folder (created).
        config: :class:`calseg.segment.infer.InferenceConfig` (``method`` already chosen).
        name: the recording's file name (titles, commands).
        frame_interval_s: s per frame (traces; captions say seconds only when
            ``frame_interval_known``); pixel_size_um: µm per px or ``None``.
        checkpoint, cache_dir, base_checkpoint: as
            :func:`calseg.segment.infer.segment_recording`.
        gt: ``(T, H, W)`` ground truth of a simulated video (yellow outlines).
        title: first line of the pictures (default ``name``).
        nwb: also write ``calseg.nwb``; method_reason: why this method (the default rule).
        progress: :data:`calseg.progress.ProgressFn`.
        before_traces: as :func:`segment_and_export`.

    Returns:
        :class:`SegmentOutputs`.
    """
    from calseg.io.labels import write_label_stack
    from calseg.io.overlays import activity_image, animation, contact_sheet
    from calseg.segment.choice import label_of_result
    from calseg.segment.diagnose import activity_map, explain_empty
    from calseg.segment.infer import MIN_FRAMES_FOR_ACTIVITY, segment_recording
    from calseg.segment.prompts import compute_activity

    progress = progress or null_progress
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    warnings: list[str] = []
    activity = None
    known_interval = frame_interval_s if frame_interval_known else None  # for the cell size
    progress(0.0, "activity", "activity map")
    if (
        frames.ndim == 3
        and frames.shape[0] >= MIN_FRAMES_FOR_ACTIVITY
        and (config.target == "active" or frames.size <= ACTIVITY_MAP_MAX_VOXELS)
    ):
        activity_params = config.activity_params(frames, known_interval)
        activity = compute_activity(frames, activity_params)
    elif config.target == "cells":
        if frames.ndim != 3 or frames.shape[0] < MIN_FRAMES_FOR_ACTIVITY:
            n = frames.shape[0] if frames.ndim == 3 else 1
            why = f"{n} frame(s), under the {MIN_FRAMES_FOR_ACTIVITY} an activity map needs"
        else:
            why = (
                f"{frames.size} voxels is more than the {ACTIVITY_MAP_MAX_VOXELS} an extra pass "
                "for target=cells is allowed"
            )
        warnings.append(f"no activity map: {why}")
    res = segment_recording(
        frames,
        config,
        checkpoint=checkpoint,
        cache_dir=cache_dir,
        progress=scaled(progress, 0.05, 0.8),
        activity=activity,  # target=cells reuses its cell-size estimate
        frame_interval_s=known_interval,
        base_checkpoint=base_checkpoint,
    )
    warnings.extend(res.warnings)
    given = getattr(config, "cell_diameter_px", None)
    side = min(frames.shape[-2:]) if frames.ndim >= 2 else 0
    if given is not None and side and given > side / 2:
        warnings.append(
            f"the given cell diameter ({given:g} px) is more than half the field's smaller side "
            f"({side} px): at most a cell or two fit; check --cell-diameter-px"
        )
    warnings.extend(_model_override_warnings(config, res.model_info))
    labels = np.asarray(res.labels)
    method = config.method
    label = label_of_result(method, res.model_info)
    random = method == "sam2" and label.endswith("(random weights)")
    paths: dict[str, Path] = {}
    progress(0.82, "write", "label stack")
    paths["labels.tif"] = Path(write_label_stack(out_dir / "labels.tif", labels))
    n_cells = int(len(np.unique(labels[labels > 0])))
    fp = (labels != 0).any(axis=0) if labels.ndim == 3 else labels != 0
    coverage = float(fp.mean()) if fp.size else 0.0
    if before_traces is not None:
        before_traces(n_cells, int(labels.shape[0]) if labels.ndim == 3 else 1)

    exports: dict[str, Any] = {}
    try:  # traces, events, patterns and ROIs: useful extras, never a reason to fail
        from calseg.pipelines.traces import write_trace_exports

        exports = write_trace_exports(
            out_dir,
            frames,
            labels,
            frame_interval_s,
            pixel_size_um=pixel_size_um,
            nwb=nwb,
            target=config.target,
        )
        paths.update({k: Path(v) for k, v in exports["paths"].items()})
    except Exception as exc:  # noqa: BLE001
        from calseg.io.tables import NWB_INSTALL_HINT

        if nwb and NWB_INSTALL_HINT in str(exc):
            raise
        warnings.append(f"traces/events export failed: {exc}")
    notes = list(exports.get("notes", []))
    notes.extend(_model_default_notes(config, res.model_info))

    if config.target == "active" and exports and n_cells:
        silent = sorted(
            set(np.asarray(exports["ids"]).tolist())
            - {int(i) for i in _event_cells(out_dir / "events.csv")}
        )
        if silent:
            shown = ", ".join(map(str, silent[:10])) + (", ..." if len(silent) > 10 else "")
            notes.append(
                f"{plural(len(silent), 'cell')} labelled active but without an event in the "
                f"dF/F trace (cell id{'s' if len(silent) > 1 else ''} {shown}): an event "
                "needs 2 frames in a row above 3 noise SDs of the cell's mean trace, so the "
                "activity was brief or weak; treat them as unconfirmed"
            )
    if activity is not None:
        notes.extend(noise_notes(frames, activity.stats))
    from calseg.analysis.evidence import offset_notes

    notes.extend(offset_notes(frames))
    diagnosis = None
    if config.target == "active" and n_cells == 0 and activity is not None:
        if method == "sam2" and activity.stats.get("n_seeds", 0) > 0:
            from calseg.segment.baseline import baseline_labels
            from calseg.segment.diagnose import explain_masks_rejected

            classical = baseline_labels(activity, config.min_region_px)
            n_classical = int(len(np.unique(classical[classical > 0])))
            diag = explain_masks_rejected(res.prompts, n_classical, label)
        else:
            diag = explain_empty(
                frames, activity.z, activity.dff, config.threshold_k, config.min_region_px,
                params=activity_params,
            )  # fmt: skip
        diagnosis = diag.to_dict(name, "OUT")
        warnings = [w for w in warnings if not w.startswith("no supra-threshold activity")]
    elif config.target == "cells" and n_cells == 0 and res.activity.get("n_cells") == 0:
        from calseg.segment.diagnose import explain_empty_projection

        diag = explain_empty_projection(frames, res.activity, config.cell_diameter_px)
        diagnosis = diag.to_dict(name, "OUT")
        warnings = [w for w in warnings if not w.startswith("no cell found on the")]
    if diagnosis is not None:
        (out_dir / "diagnosis.json").write_text(json.dumps(diagnosis, indent=1))
        paths["diagnosis.json"] = out_dir / "diagnosis.json"

    progress(0.88, "overlay", "activity map")
    dt_shown = frame_interval_s if frame_interval_known else None
    fp_labels = _footprints(labels)
    if activity is not None:
        import tifffile

        amap = activity_map(activity.z)
        tifffile.imwrite(out_dir / "activity.tif", amap)
        paths["activity.tif"] = out_dir / "activity.tif"
        paths["activity.png"] = activity_image(
            amap,
            out_dir / "activity.png",
            threshold=config.threshold_k,
            title=f"{title or name}: activity map",
            subtitle=f"max z over time; white: > {config.threshold_k:g} in some frame "
            f"({100 * float(np.mean(amap > config.threshold_k)):.0f} % of px); cells coloured",
            labels=fp_labels if fp_labels.any() else None,
            pixel_size_um=pixel_size_um,
        )
    progress(0.9, "overlay", "contact sheet")
    warn_text = random_weights_text(label) if random else None
    unit = "region" if config.target == "cells" else "cell"
    legend = f"{label}: {plural(n_cells, unit)} (coloured)"
    if gt is not None:
        legend += "; ground truth: yellow outlines"
    if n_cells == 0:
        legend += "; nothing found (activity.png, and the why in diagnosis.json)"
    traces, trace_ids = _sheet_traces(exports)
    paths["overlay.png"] = Path(
        contact_sheet(
            frames,
            labels,
            out_dir / "overlay.png",
            n=12,
            gt=gt,
            title=title or name,
            subtitle=legend,
            warning=warn_text,
            traces=traces,
            trace_ids=trace_ids,
            traces_chosen_from=len(exports["ids"]) if traces is not None else None,
            frame_interval_s=dt_shown,
            pixel_size_um=pixel_size_um,
        )
    )
    progress(0.95, "overlay", "animation")
    paths["overlay.gif"] = Path(
        animation(
            frames,
            labels,
            out_dir / "overlay.gif",
            gt=gt,
            frame_interval_s=dt_shown,
            pixel_size_um=pixel_size_um,
            warning="RANDOM SAM2 weights: masks not meaningful" if random else None,
        )
    )
    if random:
        warnings = [w for w in warnings if not w.startswith("SAM2 has RANDOM weights")]
        warnings.insert(0, random_weights_text(label))
    progress(1.0, "done", f"{plural(n_cells, 'cell')}")
    return SegmentOutputs(
        labels=labels,
        paths=paths,
        method=method,
        model_label=label,
        random_weights=random,
        n_cells=n_cells,
        coverage=coverage,
        target=config.target,
        exports={k: v for k, v in exports.items() if k not in ("ids", "dff")},
        diagnosis=diagnosis,
        warnings=list(dict.fromkeys(warnings)),
        notes=notes,
        segmentation=res,
        method_reason=method_reason,
    )


QUANTISED_NOISE = 0.3
"""A median per-pixel noise SD below this (in the recording's units) on whole-number data means
the values mostly repeat between frames (Poisson counts of mean under about 0.2 per pixel):
the noise is discrete and its z-scores approximate."""


def _model_override_warnings(config: InferenceConfig, model_info: dict | None) -> list[str]:
    """A warning when a SAM2 checkpoint fixed the model or input size and the request asked
    for other, non-default ones (a fine-tuned or trained-here checkpoint runs as it was
    trained; the job's stored parameters would otherwise show a model that did not run)."""
    info = model_info or {}
    if config.method != "sam2" or not info:
        return []
    fields = type(config).model_fields
    out = []
    for key, used in (("model", info.get("config")), ("image_size", info.get("image_size"))):
        asked = getattr(config, key)
        if used is not None and asked != fields[key].default and asked != used:
            out.append(
                f"{key} {asked} was asked for, but the checkpoint runs as it was trained: "
                f"{key} {used} was used"
            )
    return out


def _model_default_notes(config: InferenceConfig, model_info: dict | None) -> list[str]:
    """A note when SAM2 ran another architecture than the (default) model setting names: with
    no official checkpoint configured, the small SAM2 trained here runs, as it was trained (a
    new-user check read the unchanged setting "sam2.1_hiera_t" beside the run as the model
    used). Explicitly asked-for models that did not run get a warning instead
    (:func:`_model_override_warnings`)."""
    info = model_info or {}
    used = info.get("config")
    if config.method != "sam2" or not used:
        return []
    fields = type(config).model_fields
    if config.model != fields["model"].default or used == config.model:
        return []
    ckpt = Path(str(info.get("checkpoint") or "")).name or "its checkpoint"
    return [
        f"SAM2 ran {used} at {info.get('image_size')} px from {ckpt}: the model setting "
        f"({config.model}, the default) names Meta's architectures, and a checkpoint fixes its "
        "own (none of Meta's is configured here: CALSEG_SAM2_CHECKPOINT)"
    ]


def noise_notes(frames: np.ndarray, stats: dict[str, Any]) -> list[str]:
    """Plausibility of the activity map's z-scores: a note when the median per-pixel noise SD
    (:func:`calseg.segment.prompts.noise_model`) is below :data:`QUANTISED_NOISE` units on
    whole-number data (photon counts near zero repeat between frames; the noise model then
    uses the mean absolute difference, and z-scores of such discrete noise are approximate),
    or, when every frame is the
    same image, a note saying so (there is then no noise and no activity at all)."""
    sigma = float(stats.get("noise_sigma_median", 1.0))
    sample = np.asarray(frames).reshape(-1)[:: max(1, np.asarray(frames).size // 200_000)]
    sample = sample[np.isfinite(sample)]
    whole = sample.size > 0 and bool(np.all(sample == np.round(sample)))
    if not (whole and sigma < QUANTISED_NOISE):
        return []
    frames = np.asarray(frames)
    if frames.shape[0] > 1 and bool((frames == frames[:1]).all()):
        # not few photons: nothing changes at all (one image repeated, or a still)
        return [
            f"every one of the {frames.shape[0]} frames is the same image: nothing changes "
            "over time, so there is no activity to find; check that the file is the time "
            "series (not one image saved repeatedly)"
        ]
    return [
        f"the per-pixel noise estimate is {sigma:.2g} (median over pixels): the recording's "
        "values are whole numbers that mostly repeat from frame to frame (few photons per "
        "pixel), so the noise is far from Gaussian and the activity map's z-scores are only "
        "approximate; judge activity by dF/F and the traces, or bin pixels (e.g. sum 2 x 2 "
        "pixels) before segmenting"
    ]


def _event_cells(events_csv: Path) -> set[int]:
    """Cell ids with at least one row in an events CSV (empty set when it is missing)."""
    if not events_csv.is_file():
        return set()
    from calseg.io.tables import read_events_csv

    return {int(e["cell_id"]) for e in read_events_csv(events_csv)}


def _footprints(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` label image of each cell's footprint (its last labelled pixel wins)."""
    lab = np.asarray(labels)
    if lab.ndim == 2:
        return lab
    return lab.max(axis=0)


def _sheet_traces(exports: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The dF/F rows (and their ids) drawn under the contact sheet: the
    :data:`MAX_TRACES_ON_SHEET` cells with the largest peaks."""
    ids, dff = exports.get("ids"), exports.get("dff")
    if ids is None or dff is None or len(ids) == 0:
        return None, None
    dff = np.asarray(dff, dtype=np.float64)
    with np.errstate(all="ignore"):
        peak = np.nanmax(np.where(np.isfinite(dff), dff, -np.inf), axis=1)
    order = np.argsort(-peak)[:MAX_TRACES_ON_SHEET]
    order = np.sort(order)
    return dff[order], np.asarray(ids)[order]
