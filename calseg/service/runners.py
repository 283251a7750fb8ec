"""Job runners: one function per job kind, calling the science in :mod:`calseg`.

Each runner takes its validated parameters and a :class:`calseg.service.context.JobContext`
(progress, a working folder in the artifact store, artifact and metric registration, logging and
lookup of referenced jobs) and returns the job's ``result`` dict (JSON-compatible). Runners
import the science lazily, so the worker starts fast and torch is loaded only by jobs that use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calseg.fmt import plural
from calseg.progress import scaled

if TYPE_CHECKING:
    from calseg.service.context import JobContext


class RunnerError(ValueError):
    """A job cannot run with what it was given (bad reference, missing video, ...)."""


def _summary_rows(summary: Any) -> list[tuple[str, str, float]]:
    """(model, metric, value) triples of the summary metrics of an EvaluationReport.

    ``summary`` is a list of per-model dicts ``{"model": name, "<metric>_mean": value, ...}``
    (:func:`calseg.segment.evaluate.summarise`); ``{model: {metric: value}}`` is accepted too.
    Missing (None) values are skipped.
    """
    from calseg.segment.evaluate import METRIC_KEYS

    if isinstance(summary, dict):
        summary = [{"model": m, **v} for m, v in summary.items() if isinstance(v, dict)]
    rows: list[tuple[str, str, float]] = []
    for entry in summary:
        for name in METRIC_KEYS:
            value = entry.get(f"{name}_mean", entry.get(name))
            if isinstance(value, int | float | np.floating | np.integer):
                rows.append((str(entry.get("model")), name, float(value)))
    return rows


# ------------------------------------------------------------------------------ simulate


def run_simulate(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Simulate a dataset (``calseg-dataset`` v1) and register its manifest and a preview.

    Artifacts: ``manifest.json`` (kind ``dataset-manifest``; the dataset folder is its parent),
    ``preview.png`` (contact sheet of the first video with its ground-truth labels).
    """
    from calseg.io.dataset import load_dataset
    from calseg.io.overlays import contact_sheet
    from calseg.simulate.dataset import simulate_dataset

    config = params.to_config()
    fit_info = None
    if getattr(params, "recording_id", None):
        from calseg.io.recordings import read_recording
        from calseg.service.costs import JobInputs, estimate_simulate
        from calseg.simulate.fit import fit_recording

        rec = read_recording(
            ctx.recording_path(params.recording_id),
            **ctx.recording_read_options(params.recording_id),
            limits=ctx.settings.read_limits(),
        )
        ctx.progress(0.0, "fit", f"fitting the simulator to recording {params.recording_id}")
        fit = fit_recording(rec.frames, rec.info.frame_interval_s, rec.info.pixel_size_um)
        config = fit.to_config(config)  # fitted fields replace the given ones
        fit_info = fit.to_dict()
        fit_path = ctx.workdir / "fit.json"
        fit_path.write_text(json.dumps({"fit": fit_info, "config": config.model_dump(mode="json")}))
        ctx.add_artifact("fit.json", fit_path, kind="simulation-fit")
        for note in fit.notes:
            ctx.log(f"fit: {note}")
        # admitted at the recording's size; the fitted field, frames and cells are what renders
        ctx.readmit(
            estimate_simulate(config, JobInputs(), float(ctx.settings.cost_time_scale)),
            f"the simulation fitted to recording {params.recording_id} ({config.n_videos} "
            f"videos of {config.n_frames} frames of {config.height} x {config.width} px, "
            f"cells of {config.mean_cell_area_px:.0f} px)",
        )
    out_dir = ctx.workdir / "dataset"
    ctx.log(f"simulating into {out_dir}")
    manifest_path = Path(simulate_dataset(config, out_dir, scaled(ctx.progress, 0.0, 0.9)))
    ctx.add_artifact("manifest.json", manifest_path, kind="dataset-manifest")
    dataset = load_dataset(manifest_path)
    if not dataset.videos:
        raise RunnerError("the simulator wrote a dataset without videos")

    ctx.progress(0.92, "preview", "contact sheet of the first video")
    first = dataset.videos[0]
    sheet = contact_sheet(
        first.load_image(),
        first.load_labels(),
        ctx.workdir / "preview.png",
        n=12,
        title=f"simulated {first.id}: {first.pattern_class} ({first.split} split)",
        subtitle="ground-truth active cells (coloured); their calcium below",
        traces=first.load_calcium(),
        trace_unit="cytosolic Ca2+ (µM)",
        frame_interval_s=first.frame_interval_s,
        pixel_size_um=first.pixel_size_um,
    )
    ctx.add_artifact("preview.png", Path(sheet), kind="preview")

    splits: dict[str, int] = {}
    for v in dataset.videos:
        splits[v.split] = splits.get(v.split, 0) + 1
    keys = ("id", "split", "pattern_class", "n_frames", "height", "width", "n_cells")
    return {
        "dataset_relpath": ctx.relpath(manifest_path.parent),
        "n_videos": len(dataset.videos),
        "splits": splits,
        "videos": [{k: getattr(v, k) for k in keys} for v in dataset.videos],
        **({"fitted_to_recording": params.recording_id, "fit": fit_info} if fit_info else {}),
    }


# ------------------------------------------------------------------------------ finetune

_DIAGNOSTICS = ("mask_area", "target_area", "logit_max", "object_score", "iou_pred")
CURVE_METRICS = {
    "train": {"loss": "loss", "train_iou": "train_iou", **{k: k for k in _DIAGNOSTICS}},
    "val": {
        "val_mean_iou": "val_iou",
        "val_f1": "val_f1",
        "val_fg_iou": "val_fg_iou",
        "disc_prior_iou": "disc_prior_iou",
        **{f"val_{k}": f"val_{k}" for k in _DIAGNOSTICS},
    },
}
"""History keys recorded as training-curve metrics: ``{entry kind: {history key: metric}}``
(the metric's subset is the entry kind)."""


MAX_CURVE_POINTS = 500
"""Most training steps of one run whose curve rows are stored (:class:`TrainingCurve`)."""


class TrainingCurve:
    """``on_history`` callback of :func:`calseg.segment.finetune.finetune`: stores the training
    curve as metrics with steps (:data:`CURVE_METRICS`: ``loss``, ``train_iou`` and the
    collapse diagnostics mask area, logit max, object score and IoU head, subset ``train``;
    ``val_iou``, ``disc_prior_iou`` and the ``val_`` diagnostics, subset ``val``). Rows are
    buffered and written at most every ``interval_s`` seconds (and by :meth:`flush`), so a
    fast training loop does not write the database at every step. Of a run of ``steps``
    steps, the training rows of at most :data:`MAX_CURVE_POINTS` steps are kept (every k-th
    step and the last; validation rows all): about 6.5 rows per step made 19,466 rows for 3000
    steps, a 1.5 MB job record polled every 2 s by the page, and an admitted 10^6-step run
    would have made 6.5 M (a new user's check).
    """

    def __init__(self, ctx: JobContext, interval_s: float = 2.0, steps: int | None = None) -> None:
        import time

        self.ctx, self.interval_s = ctx, interval_s
        self.steps = steps
        self.stride = max(1, math.ceil(steps / MAX_CURVE_POINTS)) if steps else 1
        self._clock = time.monotonic
        self._last = self._clock()
        self._rows: list[tuple[str, float, str | None, str | None, int | None]] = []

    def __call__(self, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        step = entry.get("step")
        if kind == "train" and isinstance(step, int) and step % self.stride and step != self.steps:
            return
        for key, metric in CURVE_METRICS.get(str(kind), {}).items():
            value = entry.get(key)
            if isinstance(value, int | float) and step is not None:
                self._rows.append((metric, float(value), None, str(kind), int(step)))
        if self._rows and self._clock() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows now."""
        rows, self._rows = self._rows, []
        self._last = self._clock()
        self.ctx.add_metrics(rows)


def run_finetune(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Fine-tune SAM2's prompt encoder + mask decoder on a simulate job's dataset.

    Artifacts: ``checkpoint.pt`` (kind ``checkpoint``), ``history.json`` (training history).
    Metrics: the training curve while it trains (:class:`TrainingCurve`: ``loss``,
    ``train_iou``, ``val_iou`` with their steps), then ``final_loss``, ``best_val_iou`` (when
    validated). Warnings of the trainer (e.g.
    random weights because no ``CALSEG_SAM2_CHECKPOINT`` was given) go to the log and result.
    """
    from calseg.segment.finetune import finetune

    dataset = ctx.dataset_dir(params.dataset_job_id)
    config = params.to_config()
    base = ctx.settings.sam2_checkpoint
    if base is None:
        ctx.warn(
            "CALSEG_SAM2_CHECKPOINT is not set: fine-tuning starts from RANDOM SAM2 weights; "
            "the model will not segment real recordings well"
        )
    curve = TrainingCurve(ctx, steps=config.steps)
    try:
        res = finetune(
            dataset,
            ctx.workdir / "model",
            config,
            base_checkpoint=base,
            cache_dir=ctx.embedding_cache_dir,
            progress=scaled(ctx.progress, 0.0, 0.97),
            on_history=curve,
        )
    finally:
        curve.flush()
    for w in res.warnings:
        ctx.warn(w)
    from calseg.segment.model import rewrite_checkpoint_metadata
    from calseg.service.context import public_data

    # users download it: no server folder in its provenance (an 11th attack run)
    rewrite_checkpoint_metadata(res.checkpoint, lambda meta: public_data(meta, ctx.settings))
    ctx.add_artifact("checkpoint.pt", Path(res.checkpoint), kind="checkpoint")
    history_path = ctx.workdir / "history.json"
    history_path.write_text(
        json.dumps(public_data(ctx.jsonable(res.history), ctx.settings), indent=1)
    )
    ctx.add_artifact("history.json", history_path, kind="history")

    final_loss = None
    for entry in reversed(res.history):
        if isinstance(entry, dict) and entry.get("loss") is not None:
            final_loss = float(entry["loss"])
            break
    if final_loss is not None:
        ctx.add_metric("final_loss", final_loss, subset="train")
    if res.best_val_iou is not None:
        ctx.add_metric("best_val_iou", float(res.best_val_iou), subset="val")
    if res.best_score is not None:  # the selected checkpoint's score (config.select_by)
        ctx.add_metric(f"best_val_{config.select_by}", float(res.best_score), subset="val")
    from calseg.service.context import public_text

    return {
        "model_info": res.model_info,
        "warnings": list(ctx.warnings),
        # optimiser steps taken: the history also holds validation, prior and skipped rows
        # (a 12th attack run: 4 steps asked, "steps": 8 reported)
        "steps": sum(1 for h in res.history if isinstance(h, dict) and h.get("kind") == "train"),
        "final_loss": final_loss,
        "best_val_iou": res.best_val_iou,
        "best_step": res.best_step,
        "best_score": res.best_score,
        "select_by": config.select_by,
        "improved": res.improved,
        "base_checkpoint": public_text(str(base), ctx.settings) if base else None,
    }


# ------------------------------------------------------------------------------ infer


def _infer_config(params: Any) -> Any:
    """InferenceConfig from parameters (``method`` included when the config has it)."""
    return params.to_config()


@dataclass
class _InferInput:
    """The frames an infer job segments and where they came from (``source``: the job
    result's description, which the viewer reads the frames back by)."""

    frames: np.ndarray
    gt: np.ndarray | None
    path: Path
    name: str
    title: str
    frame_interval_s: float | None
    pixel_size_um: float | None
    source: dict[str, Any]


def _read_infer_input(params: Any, ctx: JobContext) -> _InferInput:
    """Read an infer job's recording (with its upload's read options, overridden by the job's)
    or simulated video (with its ground truth)."""
    from calseg.io.dataset import DatasetError, load_dataset
    from calseg.io.recordings import merge_read_options, read_recording

    if params.recording_id:
        path = ctx.recording_path(params.recording_id)
        read_options = merge_read_options(
            ctx.recording_read_options(params.recording_id),
            **{k: getattr(params, k, None) for k in ("axes", "channel", "interleaved_channels")},
            z_projection=params.z_projection,
        )
        ctx.progress(0.01, "read", f"reading {path.name}")
        recording = read_recording(path, **read_options, limits=ctx.settings.read_limits())
        for note in recording.info.warnings:  # e.g. a header that lies about the frame count
            ctx.warn(f"reading {path.name}: {note}")
        info = recording.info
        source: dict[str, Any] = {
            "type": "recording",
            "recording_id": params.recording_id,
            "relpath": ctx.relpath(path),
            "read_options": read_options,  # the viewer reads its frames the same way
        }
        return _InferInput(
            recording.frames,
            None,
            path,
            path.name,
            path.name,
            info.frame_interval_s,
            info.pixel_size_um,
            source,
        )
    dataset = ctx.dataset_dir(params.dataset_job_id)
    try:
        video = load_dataset(dataset).video(params.video_id)
    except DatasetError as exc:
        raise RunnerError(str(exc)) from exc
    path = dataset / video.image
    source = {
        "type": "dataset",
        "dataset_job_id": params.dataset_job_id,
        "video_id": params.video_id,
        "relpath": ctx.relpath(path),
        "gt_relpath": ctx.relpath(dataset / video.labels),
        "split": video.split,
        "pattern_class": video.pattern_class,
    }
    ctx.progress(0.01, "read", f"reading {path.name}")
    return _InferInput(
        video.load_image(),
        video.load_labels(),
        path,
        params.video_id,
        # "simulated as": the class it was made with, not the class found (a new-user check
        # read "v005 (transients...)" beside a found class "fluttering" as a contradiction)
        f"{params.video_id} (simulated as {video.pattern_class}, {video.split} split)",
        video.frame_interval_s,
        video.pixel_size_um,
        source,
    )


def run_infer(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Segment a recording (uploaded, or a simulated video) into an instance label stack.

    Reads the input (:func:`_read_infer_input`), then the one pipeline of ``calseg segment``
    (:func:`calseg.pipelines.segment.segment_and_export`: optional preprocessing, ``method
    "auto"`` by the default rule, SAM2 fine-tuned when ``model_job_id`` names a model; labels,
    overlays, activity map, tables, and ``diagnosis.json`` when nothing was found). Metric:
    ``foreground_fraction`` (labelled pixel fraction) under the model's one name.
    """
    from calseg.pipelines.segment import artifact_kind, segment_and_export
    from calseg.preprocess import PreprocessError, PreprocessOptions
    from calseg.segment.choice import CLASSICAL, MODEL_JOB_REASON, canonical_method

    inp = _read_infer_input(params, ctx)
    t, h, w = inp.frames.shape
    ctx.log(f"recording {inp.path.name}: {plural(t, 'frame')} of {h} x {w} px, {inp.frames.dtype}")
    model = None
    if params.model_job_id and canonical_method(params.method) != CLASSICAL:
        model = ctx.artifact_path(params.model_job_id, "checkpoint.pt", kind="finetune")
    try:
        run = segment_and_export(
            inp.frames,
            ctx.workdir,
            params.config_values(),
            name=inp.name,
            title=inp.title,
            frame_interval_s=params.frame_interval_s or inp.frame_interval_s,
            pixel_size_um=params.pixel_size_um or inp.pixel_size_um,
            preprocess=PreprocessOptions(
                register_drift=params.register_drift,
                background=params.background,
                background_radius_px=params.background_radius_px,
                bleach_correction=params.bleach_correction,
            ),
            model=model,
            model_reason=MODEL_JOB_REASON,
            configured_checkpoint=ctx.settings.sam2_checkpoint,
            cache_dir=ctx.embedding_cache_dir,
            gt=inp.gt,
            nwb=params.nwb,
            report=lambda level, text: (ctx.warn if level == "warning" else ctx.log)(text),
            progress=scaled(ctx.progress, 0.02, 0.97),
            before_traces=lambda n_cells, n_frames: _readmit_with_cells(
                params, ctx, n_cells, n_frames
            ),
        )
    except PreprocessError as exc:
        raise RunnerError(f"preprocessing failed: {exc}") from exc
    for level, text in run.outputs.lines(inp.path.name, "OUT", diagnosis_level="info"):
        (ctx.warn if level == "warning" else ctx.log)(
            f"{'check: ' if level == 'note' else ''}{text}"
        )
    for art, p in run.outputs.paths.items():
        ctx.add_artifact(art, p, kind=artifact_kind(art))
    return _infer_result(params, ctx, inp, run)


def _readmit_with_cells(params: Any, ctx: JobContext, n_cells: int, n_frames: int) -> None:
    """The infer job admitted again once its cells are known: its estimate plus the traces,
    events and ROIs of ``n_cells`` cells over ``n_frames`` frames
    (:func:`calseg.service.costs.with_cell_traces`)."""
    from calseg.service.costs import with_cell_traces

    scale = float(ctx.settings.cost_time_scale)
    ctx.readmit(
        with_cell_traces(ctx.estimate(), n_cells, n_frames, scale),
        f"the traces, events and ROIs of {plural(n_cells, 'cell')} over "
        f"{plural(n_frames, 'frame')}",
    )


def _infer_result(params: Any, ctx: JobContext, inp: _InferInput, run: Any) -> dict[str, Any]:
    """The infer job's result (the page reads it) and its ``foreground_fraction`` metric."""
    from calseg.io.overlays import display_range

    out, frames = run.outputs, run.frames
    t, h, w = frames.shape
    fg = float((out.labels > 0).mean())
    ctx.add_metric("foreground_fraction", fg, model=out.model_label)
    lo, hi = display_range(frames)
    res = out.segmentation
    finite = frames if frames.dtype.kind in "uib" else frames[np.isfinite(frames)]
    data_range = [float(finite.min()), float(finite.max())] if finite.size else [0.0, 1.0]
    result = {
        "source": inp.source,
        **out.to_result(),
        "model_job_id": params.model_job_id,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "recording_name": inp.path.name if params.recording_id else None,
        "n_frames": t,
        "height": h,
        "width": w,
        "dtype": str(frames.dtype),
        "foreground_fraction": fg,
        "frame_interval_s": run.frame_interval_s,
        "frame_interval_known": run.frame_interval_known,
        "pixel_size_um": run.pixel_size_um,
        "preprocess": run.preprocess,
        "display_range": [float(lo), float(hi)],
        "data_range": data_range,
        "prompts": ctx.jsonable(_prompt_summary(res.prompts)),
        "normalisation": ctx.jsonable(res.normalisation),
        "model_info": ctx.jsonable(res.model_info),
        "warnings": list(ctx.warnings),
    }
    if out.n_cells:  # a simulated video whose class the rules read otherwise: say so
        from calseg.pipelines.validate_patterns import class_disagreement_note

        note = class_disagreement_note(
            inp.source.get("pattern_class"),
            result["pattern_class"],
            result["pattern_reason"],
            t,
            run.frame_interval_s,
        )
        if note:
            result["notes"].append(note)
    return result


def _prompt_summary(prompts: Any) -> Any:
    """A short JSON description of the prompts (their count, not every coordinate)."""
    try:
        return {"count": len(prompts)}
    except TypeError:
        return None


# ------------------------------------------------------------------------------ evaluate


def run_evaluate(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Compare SAM2 fine-tuned vs SAM2 untuned vs classical on held-out videos.

    Metrics: one row per (summary metric, model) with ``subset`` = the split; models go by
    their one names (:func:`calseg.segment.choice.evaluation_models`, e.g. "SAM2 untuned
    (random weights)").
    Artifacts: ``report.json`` (``EvaluationReport.to_dict()``), ``report.txt`` (its table).
    """
    from calseg.segment.choice import RANDOM_SUFFIX, evaluation_models
    from calseg.segment.evaluate import evaluate_dataset

    dataset = ctx.dataset_dir(params.dataset_job_id)
    finetuned = None
    if params.model_job_id:
        finetuned = ctx.artifact_path(params.model_job_id, "checkpoint.pt", kind="finetune")
    models = evaluation_models(finetuned, ctx.settings.sam2_checkpoint)
    for name in models:
        if name.endswith(RANDOM_SUFFIX):
            ctx.warn(f"{name}: SAM2 with RANDOM weights (CALSEG_SAM2_CHECKPOINT is not set)")
    ctx.log(f"evaluating {', '.join(models)} on split {params.split!r} of {dataset}")
    report = evaluate_dataset(
        dataset,
        models,
        split=params.split,
        config=params.to_config(),
        cache_dir=ctx.embedding_cache_dir,
        progress=scaled(ctx.progress, 0.0, 0.97),
        base_checkpoint=ctx.settings.sam2_checkpoint,
    )
    rows = _summary_rows(report.summary)
    if not rows:
        raise RunnerError(f"the evaluation report has no summary metrics: {report.summary!r}")
    for model, name, value in rows:
        ctx.add_metric(name, value, model=model, subset=params.split)
    from calseg.service.context import public_data, public_text

    table = report.to_table()
    (ctx.workdir / "report.txt").write_text(public_text(table, ctx.settings) + "\n")
    ctx.add_artifact("report.txt", ctx.workdir / "report.txt", kind="report")
    report_data = public_data(ctx.jsonable(report.to_dict()), ctx.settings)  # no server folder
    (ctx.workdir / "report.json").write_text(json.dumps(report_data, indent=1))
    ctx.add_artifact("report.json", ctx.workdir / "report.json", kind="report")
    summary = {
        m: {n: (v if math.isfinite(v) else None) for mm, n, v in rows if mm == m}
        for m in dict.fromkeys(r[0] for r in rows)
    }
    return {
        "split": params.split,
        "models": {k: [v[0], str(v[1]) if v[1] else None] for k, v in models.items()},
        "summary": summary,
        "table": table,
        "warnings": list(ctx.warnings),
    }
