"""Job runners: one function per job kind, calling the science in :mod:`calseg`.

Each runner takes its validated parameters and a :class:`calseg.service.jobs.JobContext`
(progress, a working folder in the artifact store, artifact and metric registration, logging and
lookup of referenced jobs) and returns the job's ``result`` dict (JSON-compatible). Runners
import the science lazily, so the worker starts fast and torch is loaded only by jobs that use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calseg.progress import scaled

if TYPE_CHECKING:
    from calseg.service.jobs import JobContext


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
        from calseg.simulate.fit import fit_recording

        rec = read_recording(ctx.recording_path(params.recording_id))
        ctx.progress(0.0, "fit", f"fitting the simulator to recording {params.recording_id}")
        fit = fit_recording(rec.frames, rec.info.frame_interval_s, rec.info.pixel_size_um)
        config = fit.to_config(config)  # fitted fields replace the given ones
        fit_info = fit.to_dict()
        fit_path = ctx.workdir / "fit.json"
        fit_path.write_text(json.dumps({"fit": fit_info, "config": config.model_dump(mode="json")}))
        ctx.add_artifact("fit.json", fit_path, kind="simulation-fit")
        for note in fit.notes:
            ctx.log(f"fit: {note}")
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
        title=f"{first.id} ({first.pattern_class}): ground truth",
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

CURVE_METRICS = {
    "train": {"loss": "loss", "train_iou": "train_iou"},
    "val": {"val_mean_iou": "val_iou"},
}
"""History keys recorded as training-curve metrics: ``{entry kind: {history key: metric}}``
(the metric's subset is the entry kind)."""


class TrainingCurve:
    """``on_history`` callback of :func:`calseg.segment.finetune.finetune`: stores the training
    curve as metrics with steps (``loss`` and ``train_iou``, subset ``train``; ``val_iou``,
    subset ``val``). Rows are buffered and written at most every ``interval_s`` seconds (and by
    :meth:`flush`), so a fast training loop does not write the database at every step.
    """

    def __init__(self, ctx: JobContext, interval_s: float = 2.0) -> None:
        import time

        self.ctx, self.interval_s = ctx, interval_s
        self._clock = time.monotonic
        self._last = self._clock()
        self._rows: list[tuple[str, float, str | None, str | None, int | None]] = []

    def __call__(self, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        step = entry.get("step")
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
    curve = TrainingCurve(ctx)
    try:
        res = finetune(
            dataset,
            ctx.workdir / "model",
            config,
            base_checkpoint=base,
            cache_dir=ctx.settings.cache_dir / "embeddings",
            progress=scaled(ctx.progress, 0.0, 0.97),
            on_history=curve,
        )
    finally:
        curve.flush()
    for w in res.warnings:
        ctx.warn(w)
    ctx.add_artifact("checkpoint.pt", Path(res.checkpoint), kind="checkpoint")
    history_path = ctx.workdir / "history.json"
    history_path.write_text(json.dumps(ctx.jsonable(res.history), indent=1))
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
    return {
        "model_info": res.model_info,
        "warnings": list(ctx.warnings),
        "steps": len(res.history),
        "final_loss": final_loss,
        "best_val_iou": res.best_val_iou,
        "base_checkpoint": str(base) if base else None,
    }


# ------------------------------------------------------------------------------ infer


def _infer_config(params: Any) -> Any:
    """InferenceConfig from parameters (``method`` included when the config has it)."""
    return params.to_config()


def run_infer(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Segment a recording (uploaded, or a simulated video) into an instance label stack.

    Optional preprocessing first (:func:`calseg.preprocess.preprocess`, params
    ``register_drift``, ``background``, ``bleach_correction``; all off by default).
    Artifacts: ``labels.tif`` (T, H, W label stack), ``overlay.png`` (contact sheet),
    ``overlay.gif`` (animation); ``traces.csv``/``.parquet``, ``events.csv``/``.parquet``,
    ``patterns.json``, ``waves.json``, ``rois.zip`` (and ``calseg.nwb`` with ``nwb``) when the
    trace export succeeds (:func:`calseg.io.tables.write_trace_exports`). Metric:
    ``foreground_fraction`` (labelled pixel fraction).
    """
    from calseg.io.dataset import DatasetError, load_dataset
    from calseg.io.labels import write_label_stack
    from calseg.io.overlays import animation, contact_sheet, display_range
    from calseg.io.recordings import read_recording
    from calseg.segment.infer import segment_recording

    gt = None
    if params.recording_id:
        path = ctx.recording_path(params.recording_id)
        source: dict[str, Any] = {
            "type": "recording",
            "recording_id": params.recording_id,
            "relpath": ctx.relpath(path),
        }
    else:
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
    if params.recording_id:
        recording = read_recording(path, z_projection=params.z_projection)
        frames = recording.frames
        for note in recording.info.warnings:  # e.g. a header that lies about the frame count
            ctx.warn(f"reading {path.name}: {note}")
    else:
        frames, gt = video.load_image(), video.load_labels()
    t, h, w = frames.shape
    ctx.log(f"recording {path.name}: {t} frames of {h} x {w} px, {frames.dtype}")
    if params.recording_id:
        dt, px_um = recording.info.frame_interval_s, recording.info.pixel_size_um
    else:
        dt, px_um = video.frame_interval_s, video.pixel_size_um
    dt, px_um = params.frame_interval_s or dt, params.pixel_size_um or px_um
    if not dt:
        dt = 1.0
        ctx.warn("recording has no frame interval in its metadata: 1 s assumed for traces")
    pre_report = None
    if params.register_drift or params.background or params.bleach_correction:
        from calseg.preprocess import PreprocessError, PreprocessOptions, preprocess

        ctx.progress(0.02, "preprocess", "registration / background / bleaching")
        opts = PreprocessOptions(
            register=params.register_drift,
            background=params.background,
            background_radius_px=params.background_radius_px,
            bleach=params.bleach_correction,
        )
        try:
            frames, rep = preprocess(frames, dt, opts)
        except PreprocessError as exc:
            raise RunnerError(f"preprocessing failed: {exc}") from exc
        pre_report = rep.to_dict()
        for step in rep.steps:
            ctx.log(f"preprocess: {step}")

    checkpoint = None
    if params.method == "sam2":
        if params.model_job_id:
            checkpoint = ctx.artifact_path(params.model_job_id, "checkpoint.pt", kind="finetune")
        elif ctx.settings.sam2_checkpoint is None:
            ctx.warn("no model_job_id and no CALSEG_SAM2_CHECKPOINT: base SAM2 has RANDOM weights")
        else:
            checkpoint = ctx.settings.sam2_checkpoint
    res = segment_recording(
        frames,
        _infer_config(params),
        checkpoint=checkpoint,
        cache_dir=ctx.settings.cache_dir / "embeddings",
        progress=scaled(ctx.progress, 0.03, 0.85),
    )
    for wmsg in res.warnings:
        ctx.warn(wmsg)
    labels = np.asarray(res.labels)
    if labels.shape != frames.shape:
        raise RunnerError(
            f"segmentation returned labels of shape {labels.shape} for frames {frames.shape}"
        )

    ctx.progress(0.86, "write", "label stack")
    labels_path = ctx.workdir / "labels.tif"
    write_label_stack(labels_path, labels)
    ctx.add_artifact("labels.tif", labels_path, kind="labels")
    exp: dict[str, Any] = {}
    try:  # traces, events, patterns and ROIs: useful extras, never a reason to fail the job
        from calseg.io.tables import write_trace_exports

        exp = write_trace_exports(
            ctx.workdir, frames, labels, dt, pixel_size_um=px_um, nwb=params.nwb
        )
        kinds = {".csv": "table", ".parquet": "table", ".json": "analysis", ".nwb": "nwb"}
        for name, p in exp["paths"].items():
            ctx.add_artifact(name, p, kind=kinds.get(Path(name).suffix, "rois"))
        ctx.log(
            f"traces: {exp['n_cells']} cells ({exp['n_flagged']} flagged: tiny F0), "
            f"{exp['n_events']} events, {dt:g} s/frame; pattern {exp['pattern_class']}, "
            f"{exp['n_waves']} waves"
        )
    except Exception as exc:  # noqa: BLE001
        ctx.warn(f"traces/events export failed: {exc}")
    n_cells = int(len(np.unique(labels[labels > 0])))
    ctx.progress(0.9, "overlay", "contact sheet")
    legend = f"{params.method}: {n_cells} cells predicted (coloured)"
    if gt is not None:
        legend += "; ground truth: yellow outlines"
    sheet = contact_sheet(
        frames, labels, ctx.workdir / "overlay.png", n=12, gt=gt, title=f"{path.name}: {legend}"
    )
    ctx.add_artifact("overlay.png", Path(sheet), kind="overlay")
    ctx.progress(0.94, "overlay", "animation")
    gif = animation(frames, labels, ctx.workdir / "overlay.gif")
    ctx.add_artifact(Path(gif).name, Path(gif), kind="animation")

    fg = float((labels > 0).mean())
    ctx.add_metric("foreground_fraction", fg, model=params.method)
    lo, hi = display_range(frames)
    return {
        "source": source,
        "method": params.method,
        "model_job_id": params.model_job_id,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "n_frames": t,
        "height": h,
        "width": w,
        "dtype": str(frames.dtype),
        "n_cells": n_cells,
        "foreground_fraction": fg,
        "frame_interval_s": dt,
        "pixel_size_um": px_um,
        "preprocess": pre_report,
        "pattern_class": exp.get("pattern_class"),
        "n_events": exp.get("n_events"),
        "display_range": [float(lo), float(hi)],
        "prompts": ctx.jsonable(_prompt_summary(res.prompts)),
        "normalisation": ctx.jsonable(res.normalisation),
        "model_info": ctx.jsonable(res.model_info),
        "warnings": list(ctx.warnings),
    }


def _prompt_summary(prompts: Any) -> Any:
    """A short JSON description of the prompts (their count, not every coordinate)."""
    try:
        return {"count": len(prompts)}
    except TypeError:
        return None


# ------------------------------------------------------------------------------ evaluate


def run_evaluate(params: Any, ctx: JobContext) -> dict[str, Any]:
    """Compare fine-tuned vs base SAM2 vs the classical baseline on held-out videos.

    Metrics: one row per (summary metric, model) with ``subset`` = the split.
    Artifacts: ``report.json`` (``EvaluationReport.to_dict()``), ``report.txt`` (its table).
    """
    from calseg.segment.evaluate import evaluate_dataset

    dataset = ctx.dataset_dir(params.dataset_job_id)
    models: dict[str, tuple[str, Path | None]] = {}
    if params.model_job_id:
        models["fine-tuned"] = (
            "sam2",
            ctx.artifact_path(params.model_job_id, "checkpoint.pt", kind="finetune"),
        )
    models["base"] = ("sam2", ctx.settings.sam2_checkpoint)
    if ctx.settings.sam2_checkpoint is None:
        ctx.warn("base SAM2 has RANDOM weights (CALSEG_SAM2_CHECKPOINT is not set)")
    models["baseline"] = ("baseline", None)
    ctx.log(f"evaluating {', '.join(models)} on split {params.split!r} of {dataset}")
    report = evaluate_dataset(
        dataset,
        models,
        split=params.split,
        config=params.to_config(),
        cache_dir=ctx.settings.cache_dir / "embeddings",
        progress=scaled(ctx.progress, 0.0, 0.97),
    )
    rows = _summary_rows(report.summary)
    if not rows:
        raise RunnerError(f"the evaluation report has no summary metrics: {report.summary!r}")
    for model, name, value in rows:
        ctx.add_metric(name, value, model=model, subset=params.split)
    table = report.to_table()
    (ctx.workdir / "report.txt").write_text(table + "\n")
    ctx.add_artifact("report.txt", ctx.workdir / "report.txt", kind="report")
    (ctx.workdir / "report.json").write_text(json.dumps(ctx.jsonable(report.to_dict()), indent=1))
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


RUNNERS: dict[str, Callable[[Any, JobContext], dict[str, Any]]] = {
    "simulate": run_simulate,
    "finetune": run_finetune,
    "infer": run_infer,
    "evaluate": run_evaluate,
}
"""The runner of each job kind."""
