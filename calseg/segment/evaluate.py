"""Evaluate segmentation models on a dataset split, by video.

For every model (SAM2 untuned, SAM2 fine-tuned, classical...) and every video of the
split, :func:`calseg.segment.infer.segment_recording` segments the recording (prompts from the
image only) and the label stack is scored against the ground truth with
:mod:`calseg.analysis.metrics`:

* foreground (active-cell pixels pooled over all frames): ``iou``, ``dice``,
  ``pixel_accuracy``;
* instances (one-to-one matching per frame with the most pairs at IoU >= 0.5, then the
  largest summed IoU, :func:`calseg.analysis.metrics.matching_cost`; counts summed over
  frames): ``precision``, ``recall``, ``f1``, ``ap50`` (= TP / (TP + FP + FN) at IoU >= 0.5,
  the cellpose / StarDist "average precision", not COCO's AP), ``mean_matched_iou``.

The summary gives per model the mean over videos and, with at least 3 videos, a percentile
bootstrap 95 % CI of the mean (2000 resamples of videos, seed 0; Efron & Tibshirani 1993).
The same aggregation is repeated per group of videos (``groups``): per ``pattern_class`` and
per defect family (a video belongs to every family whose ``severity`` in the manifest's
``defects`` is > 0, and to ``none`` when it has no defect), so a video can count in several
defect groups. The video is the resampling unit everywhere: frames of one video are not
independent samples. The frozen encoder is shared
by base and fine-tuned SAM2 models, so frame embeddings computed for one are reused from the
cache by the other; the activity analysis (prompts) is computed once per video.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calseg.analysis.metrics import (
    ERROR_KINDS,
    bootstrap_ci,
    foreground_scores,
    match_instances_stack,
)
from calseg.progress import ProgressFn, check_cancelled, null_progress, scaled
from calseg.segment._data import DatasetError, split_videos
from calseg.segment.infer import (
    InferenceConfig,
    SegmentOptionError,
    segment_recording,
    video_mode_refusal,
)
from calseg.segment.prompts import compute_activity

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "iou",
    "dice",
    "pixel_accuracy",
    "precision",
    "recall",
    "f1",
    "ap50",
    "mean_matched_iou",
)


class ModelSpecError(ValueError):
    """Raised for a malformed ``models`` mapping."""


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class EvaluationReport:
    """Per model x video metric rows and per model summaries.

    ``rows``: dicts with ``model``, ``method``, ``video``, ``pattern_class``, ``defects``
    (families present), ``n_frames``, the :data:`METRIC_KEYS` and ``seconds``. ``summary``:
    per model ``{"model", "n_videos", "<metric>_mean", "<metric>_ci95": [lo, hi] | None}``.
    ``groups``: the same per (``group_by`` in ``"pattern_class"``/``"defect"``, ``group``,
    model).
    """

    rows: list[dict]
    summary: list[dict]
    split: str = "test"
    groups: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_table(self) -> str:
        """Plain-text table: one line per model (means over videos, CI when available)."""
        cols = ["iou", "dice", "pixel_accuracy", "f1", "ap50", "mean_matched_iou"]
        head = f"{'model':<32} {'videos':>6} " + " ".join(f"{c[:14]:>14}" for c in cols)
        lines = [head, "-" * len(head)]
        for s in self.summary:
            cells = []
            for c in cols:
                m = s.get(f"{c}_mean")
                ci = s.get(f"{c}_ci95")
                txt = "n/a" if m is None else f"{m:.3f}"
                if ci is not None and m is not None:
                    txt += f"±{(ci[1] - ci[0]) / 2:.2f}"
                cells.append(f"{txt:>14}")
            lines.append(f"{s['model'][:32]:<32} {s['n_videos']:>6} " + " ".join(cells))
        lines.append(
            f"split={self.split}; ± = half-width of the bootstrap 95 % CI over videos; "
            "ap50 = TP / (TP + FP + FN) at IoU >= 0.5 (cellpose/StarDist, not COCO AP)"
        )
        if self.groups:
            gcols = ["iou", "f1", "ap50"]
            head = f"{'group':<34} {'model':<32} {'videos':>6} " + " ".join(
                f"{c:>12}" for c in gcols
            )
            lines += ["", "by pattern class and by defect family (no CI: < 3 videos)", head]
            lines.append("-" * len(head))
            for g in self.groups:
                cells = []
                for c in gcols:
                    m, ci = g.get(f"{c}_mean"), g.get(f"{c}_ci95")
                    txt = "n/a" if m is None else f"{m:.3f}"
                    if ci is not None and m is not None:
                        txt += f"±{(ci[1] - ci[0]) / 2:.2f}"
                    cells.append(f"{txt:>12}")
                label = f"{g['group_by']}={g['group']}"[:34]
                lines.append(
                    f"{label:<34} {g['model'][:32]:<32} {g['n_videos']:>6} " + " ".join(cells)
                )
        lines += ["", f"why ROIs and cells went unmatched (summed over videos; {ERRORS_NOTE})"]
        for s in self.summary:
            lines.append(f"{s['model'][:32]:<32} {error_breakdown(s.get('errors') or {})}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able dict (NaN -> None)."""
        return {
            "split": self.split,
            "config": self.config,
            "models": self.models,
            "rows": [{k: _clean(v) for k, v in r.items()} for r in self.rows],
            "summary": self.summary,
            "groups": self.groups,
            "warnings": self.warnings,
        }


def score_labels(pred: np.ndarray, gt: np.ndarray) -> dict:
    """All evaluation metrics of one predicted ``(T, H, W)`` label stack vs ground truth,
    the counts of :data:`calseg.analysis.metrics.ERROR_KINDS` (why each unmatched ROI is
    unmatched, summed over frames) included."""
    fg = foreground_scores(pred, gt)
    inst = match_instances_stack(pred, gt, 0.5)
    return {
        "iou": fg["iou"],
        "dice": fg["dice"],
        "pixel_accuracy": fg["pixel_accuracy"],
        "precision": inst["precision"],
        "recall": inst["recall"],
        "f1": inst["f1"],
        "ap50": inst["ap"],
        "mean_matched_iou": inst["mean_matched_iou"],
        "tp": inst["tp"],
        "fp": inst["fp"],
        "fn": inst["fn"],
        **{k: inst[k] for k in ERROR_KINDS},
    }


ERRORS_NOTE = (
    "touching = IoU >= 0.1; merge/split as in Caicedo et al. 2019, "
    "calseg.analysis.metrics.error_kinds"
)
"""Where the error-kind lines of :func:`error_breakdown` come from, for table captions."""


def error_breakdown(errors: dict[str, int]) -> str:
    """One line saying why the unmatched ROIs and cells are unmatched, in shares of each.

    Args:
        errors: counts of :data:`calseg.analysis.metrics.ERROR_KINDS` (a summary's
            ``errors``; missing kinds count 0).

    Returns:
        e.g. ``"120 unmatched ROIs: 10 % on no cell, 20 % span cells, 70 % partial; 90
        unmatched cells: 5 % missed, 60 % split, 35 % partial"``; ``"no unmatched ROIs"`` /
        ``"no unmatched cells"`` for a side with none. Shares are rounded each on its own, so
        they may not add up to exactly 100 %.
    """
    from calseg.fmt import plural

    def part(names: tuple[str, str, str], labels: tuple[str, str, str], what: str) -> str:
        counts = [int(errors.get(n) or 0) for n in names]
        total = sum(counts)
        if total == 0:
            return f"no unmatched {what}"
        shares = ", ".join(
            f"{100 * c / total:.0f} % {label}" for c, label in zip(counts, labels, strict=True)
        )
        return f"{plural(total, 'unmatched ' + what.rstrip('s'), 'unmatched ' + what)}: {shares}"

    rois = part(
        ("fp_false", "fp_merge", "fp_partial"), ("on no cell", "span cells", "partial"), "ROIs"
    )
    cells = part(("fn_missed", "fn_split", "fn_partial"), ("missed", "split", "partial"), "cells")
    return f"{rois}; {cells}"


def summarise(rows: list[dict], model_names: list[str]) -> list[dict]:
    """Per-model means over videos (+ bootstrap CI with >= 3 videos), and ``errors``: the
    :data:`calseg.analysis.metrics.ERROR_KINDS` counts summed over the videos (rows without
    them, from before they were counted, add nothing)."""
    out = []
    for name in model_names:
        mr = [r for r in rows if r["model"] == name]
        s: dict = {"model": name, "n_videos": len(mr)}
        for k in METRIC_KEYS:
            vals = np.array([r[k] for r in mr if r.get(k) is not None], dtype=np.float64)
            s[f"{k}_mean"] = float(vals.mean()) if len(vals) else None
            s[f"{k}_ci95"] = bootstrap_ci(vals) if len(vals) else None
        s["errors"] = {k: int(sum(r.get(k) or 0 for r in mr)) for k in ERROR_KINDS}
        s["seconds_total"] = float(sum(r.get("seconds", 0.0) for r in mr))
        out.append(s)
    return out


def defect_families(defects: dict | None) -> list[str]:
    """Defect families present in a video: manifest ``defects`` entries with severity > 0
    (``["none"]`` when there is none)."""
    fams = sorted(
        k
        for k, v in (defects or {}).items()
        if isinstance(v, dict) and float(v.get("severity", 0.0) or 0.0) > 0
    )
    return fams or ["none"]


def _groups_of(row: dict, key: str) -> list:
    v = row.get(key)
    return v if isinstance(v, list) else [v]


def summarise_groups(rows: list[dict], model_names: list[str]) -> list[dict]:
    """Per-model summaries (:func:`summarise`) within each pattern class and defect family.

    Returns:
        Dicts ``{"group_by": "pattern_class" | "defect", "group", "model", "n_videos",
        "<metric>_mean", "<metric>_ci95"}``, sorted by group_by, group, then model order.
    """
    out: list[dict] = []
    for group_by, key in (("pattern_class", "pattern_class"), ("defect", "defects")):
        values = sorted({g for r in rows for g in _groups_of(r, key) if g is not None})
        for g in values:
            sub = [r for r in rows if g in _groups_of(r, key)]
            for s in summarise(sub, model_names):
                if s["n_videos"]:
                    out.append({"group_by": group_by, "group": g, **s})
    return out


def evaluate_dataset(
    dataset: Path,
    models: dict[str, tuple[str, Path | None]],
    *,
    split: str = "test",
    config: InferenceConfig | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    base_checkpoint: Path | str | None = None,
) -> EvaluationReport:
    """Segment every video of ``split`` with every model and score it.

    Args:
        dataset: ``calseg-dataset`` v1 directory.
        models: display name -> ``("sam2", checkpoint or None for the base model)``,
            ``("classical", None)`` (``"baseline"``, its old name, is accepted) or ``("disc",
            checkpoint)``: the no-image reference of a checkpoint fine-tuned with a disc prior
            (the same automatic prompts, each mask a disc of the training cells' mean radius;
            :data:`calseg.segment.choice.LABEL_DISC`).
        split: dataset split to evaluate (``"test"`` by default).
        config: inference settings shared by all models (``method`` is set per model).
        cache_dir: embedding cache shared by all SAM2 models (``None``: a temporary folder for
            this evaluation, so base and fine-tuned models, which share the frozen encoder,
            still embed every frame only once).
        progress: :data:`calseg.progress.ProgressFn`.
        base_checkpoint: the configured base SAM2, one place a fine-tuned checkpoint's base
            is looked for (:func:`calseg.segment.model.base_candidates`).

    Returns:
        :class:`EvaluationReport`.

    Raises:
        ModelSpecError: a bad ``models`` entry.
        DatasetError: no video in ``split``.
        SegmentOptionError: mode ``"video"`` with a SAM2 model whose masks correct a disc
            prior (:func:`calseg.segment.infer.video_mode_refusal`), before any video is
            segmented.
    """
    from calseg.segment.model import load_sam2

    progress = progress or null_progress
    config = config or InferenceConfig()
    if not models:
        raise ModelSpecError("models is empty; give e.g. {'classical': ('classical', None)}")
    from calseg.segment.choice import canonical_method

    for name, spec in models.items():
        if not (
            isinstance(spec, tuple | list)
            and len(spec) == 2
            and canonical_method(str(spec[0])) in ("sam2", "classical", "disc")
            and (canonical_method(str(spec[0])) != "disc" or spec[1] is not None)
        ):
            raise ModelSpecError(
                f"model {name!r}: expected ('sam2', checkpoint|None), ('classical', None) or "
                f"('disc', checkpoint fine-tuned with a disc prior), got {spec!r}"
            )
    models = {n: (canonical_method(str(m)), c) for n, (m, c) in models.items()}
    videos = split_videos(dataset, split)
    if not videos:
        raise DatasetError(f"dataset {dataset} has no video in the {split!r} split")
    if cache_dir is None and sum(m in ("sam2", "disc") for m, _ in models.values()) > 1:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="calseg-eval-emb-") as tmp:
            return evaluate_dataset(
                dataset,
                models,
                split=split,
                config=config,
                cache_dir=Path(tmp),
                progress=progress,
                base_checkpoint=base_checkpoint,
            )
    warnings: list[str] = []
    loaded_models = {}
    model_infos: dict[str, dict | None] = {}
    for name, (method, ckpt) in models.items():
        if method in ("sam2", "disc"):
            loaded = load_sam2(
                config.model,
                ckpt,
                image_size=config.image_size,
                device=config.device,
                base_checkpoint=base_checkpoint,
            )
            if method == "disc":  # the same prompts, a disc of the training cells' radius each
                if loaded.info.prior_radius is None:
                    raise ModelSpecError(
                        f"model {name!r}: {ckpt} was not fine-tuned with a disc prior "
                        "(mask_prior 'residual' or 'prompt'), so it records no disc radius"
                    )
                loaded.info.prior_mode = "disc"
            elif config.mode == "video" and config.target == "active" and loaded.info.prior_mode:
                # before any video is segmented (it failed at the first video of this model)
                raise SegmentOptionError(
                    f"model {name!r}: "
                    + video_mode_refusal(loaded.info.config, ckpt, loaded.info.prior_mode)
                )
            loaded_models[name] = loaded
            model_infos[name] = loaded.info.to_dict()
            if loaded.info.random_weights and method == "sam2":
                warnings.append(f"{name}: SAM2 with RANDOM weights")
        else:
            model_infos[name] = None
    rows: list[dict] = []
    n_jobs = len(videos) * len(models)
    job = 0
    for vid in videos:
        check_cancelled()
        image = np.asarray(vid.load_image())
        gt = np.asarray(vid.load_labels()).astype(np.uint32)
        activity = compute_activity(image, config.activity_params(image, vid.frame_interval_s))
        for name, (method, ckpt) in models.items():
            check_cancelled()
            t0 = time.perf_counter()
            cfg = config.model_copy(update={"method": "sam2" if method == "disc" else method})
            res = segment_recording(
                image,
                cfg,
                checkpoint=ckpt,
                cache_dir=cache_dir,
                progress=scaled(
                    progress,
                    job / n_jobs,
                    (job + 1) / n_jobs,
                    f"{name} on {vid.id} ({job + 1}/{n_jobs})",
                ),
                model=loaded_models.get(name),
                activity=activity,
                frame_interval_s=vid.frame_interval_s,
            )
            row = {
                "model": name,
                "method": method,
                "video": vid.id,
                "pattern_class": vid.pattern_class,
                "defects": defect_families(vid.defects),
                "n_frames": int(image.shape[0]),
                **score_labels(res.labels, gt),
                "seconds": time.perf_counter() - t0,
                "frames_embedded": int(res.timings.get("frames_embedded", 0)),
                "frames_from_cache": int(res.timings.get("frames_from_cache", 0)),
            }
            rows.append(row)
            job += 1
            log.info("%s on %s: IoU %.3f F1 %.3f", name, vid.id, row["iou"], row["f1"])
    progress(1.0, "done", f"evaluated {len(models)} models on {len(videos)} videos")
    return EvaluationReport(
        rows=rows,
        summary=summarise(rows, list(models)),
        groups=summarise_groups(rows, list(models)),
        split=split,
        config=config.model_dump(),
        models=model_infos,
        warnings=warnings,
    )
