"""Segment a recording: SAM2 with automatic prompts, or the classical baseline.

SAM2 path (:func:`segment_recording` with ``method="sam2"``):

1. per-recording normalisation (:mod:`calseg.segment.embeddings`), pad/resize to the model grid;
2. frame embeddings with the frozen encoder, cached on disk when ``cache_dir`` is given;
3. prompts from the recording's own activity (:mod:`calseg.segment.prompts`): one positive
   point per active seed territory per frame, neighbours' points as negatives;
4. each prompt -> one mask logit map, mapped back to H x W: the single-mask output when the
   decoder was fine-tuned that way (``multimask_output`` recorded in the checkpoint), else the
   best of SAM2's three masks by predicted IoU (SAM's rule);
5. masks rejected when empty, containing not their own positive point, smaller than
   ``min_mask_area_px``, larger than ``max_mask_area_fraction`` of the frame, or with a negative
   object-score logit; duplicates suppressed (NMS by mask IoU, higher predicted IoU wins);
   the kept masks are composed per pixel: a pixel inside several kept masks goes to the one
   with the highest logit there (each cell keeps its own mask; no order effects); id = the
   prompt's cell id, hence consistent across frames.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from calseg.fmt import plural
from calseg.progress import ProgressFn, null_progress, scaled
from calseg.segment.decode import (
    MIN_FRAMES_FOR_ACTIVITY,
    InferenceConfig,
    SegmentationResult,
    assemble_frame,
    decode_frame_prompts,
    embed_recording,
    prepare_recording,
)
from calseg.segment.embeddings import FrameGeometry
from calseg.segment.model import LoadedSAM2, load_sam2
from calseg.segment.prompts import Activity, compute_activity, frame_prompts

__all__ = [
    "MIN_FRAMES_FOR_ACTIVITY",
    "InferenceConfig",
    "SegmentationResult",
    "assemble_frame",
    "decode_frame_prompts",
    "embed_recording",
    "prepare_recording",
    "segment_recording",
    "video_mode_refusal",
]


class SegmentOptionError(ValueError):
    """A segmentation request that cannot run as given (unknown method, invalid
    :class:`InferenceConfig` field, a model that cannot run in the mode asked); raised before
    any segmentation work."""


def video_mode_refusal(
    config: str | None, checkpoint: str | Path | None, prior_mode: str | None
) -> str:
    """Why mode ``"video"`` cannot run a SAM2 whose masks are a correction of a disc prior
    (``prior_mode`` ``"residual"`` or ``"prompt"``: CalSeg's small SAM2 and fine-tunes with
    ``mask_prior`` set): video propagation feeds SAM2's own masks to its memory, with no place
    for the disc. The one message for the run (:func:`segment_recording`) and the service's
    check at submit (:mod:`calseg.service.jobs`)."""
    name = Path(checkpoint).name if checkpoint else "no checkpoint"
    what = f"{config} ({name})" if config else name
    detail = f" (mask_prior {prior_mode!r})" if prior_mode else ""
    return (
        f"mode 'video' cannot run {what}: its masks are a correction of a disc prior{detail}, "
        "which SAM2's video propagation cannot add; use mode "
        "'image', or a SAM2 checkpoint without a mask prior (an official sam2.1_hiera_*.pt)"
    )


def segment_recording(
    frames: np.ndarray,
    config: InferenceConfig,
    *,
    checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    model: LoadedSAM2 | None = None,
    activity: Activity | None = None,
    frame_interval_s: float | None = None,
    base_checkpoint: Path | str | None = None,
) -> SegmentationResult:
    """Segment the calcium-active cells of a recording, frame by frame (``mode="image"``) or
    with SAM2 video propagation (``mode="video"``, :mod:`calseg.segment.video`).

    Args:
        frames: ``(T, H, W)`` (or ``(H, W)``) grayscale recording, 8/16/32-bit int or float,
            any size; NaN/Inf allowed (treated as background).
        config: :class:`InferenceConfig`.
        checkpoint: SAM2 or CalSeg fine-tuned checkpoint (``None``: random weights, see
            :func:`calseg.segment.model.load_sam2`). Ignored by the baseline.
        cache_dir: embedding cache directory (``None``: no disk cache).
        progress: :data:`calseg.progress.ProgressFn`.
        model: an already loaded model (skips loading; ``checkpoint`` is then ignored).
        activity: precomputed :func:`compute_activity` of ``frames`` with the same parameters
            (``target="cells"``: only its cell-size estimate is used, so it is made once).
        frame_interval_s: s per frame, ``None`` when not known: used by the cell-size estimate
            (:func:`calseg.analysis.cellsize.activity_lag_frames`) when no diameter is given.
        base_checkpoint: the configured base SAM2, one place a fine-tuned ``checkpoint``'s
            base is looked for (:func:`calseg.segment.model.base_candidates`).

    Returns:
        :class:`SegmentationResult` with ``labels`` of shape ``(T, H, W)`` uint32.
    """
    progress = progress or null_progress
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    frames, norm, geom = prepare_recording(frames, config)
    warnings: list[str] = []
    if norm["n_nonfinite"]:
        warnings.append(
            f"{norm['n_nonfinite']} NaN/Inf pixel value(s): at rest in the activity map, left "
            "out of the cells' mean F (calseg.analysis.traces)"
        )
    if config.target == "cells":  # all cells on a projection: no activity needed
        from calseg.segment.projection import segment_cells_recording

        estimate = None  # the activity map's cell-size estimate, when one was passed: one pass
        if activity is not None and config.cell_diameter_px is None:
            st = activity.stats
            if st.get("cell_diameter_source") in ("estimated", "prior"):
                estimate = (
                    float(st["cell_diameter_px"]),
                    st["cell_diameter_source"] == "estimated",
                )
        res = segment_cells_recording(
            frames,
            config,
            checkpoint=checkpoint,
            base_checkpoint=base_checkpoint,
            cache_dir=cache_dir,
            model=model,
            warnings=warnings,
            estimated_diameter=estimate,
            frame_interval_s=frame_interval_s,
        )
        res.normalisation = res.normalisation or norm
        progress(1.0, "done", f"{int(res.labels[0].max())} cells on the projection")
        return res
    if frames.shape[0] < MIN_FRAMES_FOR_ACTIVITY:
        warnings.append(
            f"only {frames.shape[0]} frame(s): activity is a change over time, so a recording "
            f"this short cannot show which cells are active (give at least "
            f"{MIN_FRAMES_FOR_ACTIVITY} frames)"
        )
    progress(0.01, "activity", "computing dF/F and seeds")
    if activity is None:
        activity = compute_activity(frames, config.activity_params(frames, frame_interval_s))
    timings["activity_s"] = time.perf_counter() - t0
    act_stats = dict(activity.stats)
    act_stats.setdefault("cell_diameter_estimated", False)
    if activity.stats["n_seeds"] == 0:
        warnings.append("no supra-threshold activity found: the label stack is empty")

    if config.method == "classical":
        from calseg.segment.baseline import baseline_labels

        labels = baseline_labels(activity, config.min_region_px)
        timings["total_s"] = time.perf_counter() - t0
        n = len(np.unique(labels[labels > 0]))
        progress(1.0, "done", f"classical: {plural(n, 'cell')}")
        return SegmentationResult(labels, [], norm, None, warnings, act_stats, timings)

    t1 = time.perf_counter()
    loaded = model or load_sam2(
        config.model,
        checkpoint,
        image_size=config.image_size,
        device=config.device,
        base_checkpoint=base_checkpoint,
    )
    if loaded.info.image_size != geom.image_size:
        geom = FrameGeometry(geom.height, geom.width, loaded.info.image_size)
    if loaded.info.random_weights:
        warnings.append("SAM2 has RANDOM weights (no checkpoint): masks are not meaningful")
    if config.mode == "video" and loaded.info.prior_mode:
        # a tenth attack run: every video-mode job with CalSeg's small SAM2 failed with a
        # 4000-character state-dict error
        raise SegmentOptionError(
            video_mode_refusal(loaded.info.config, loaded.info.checkpoint, loaded.info.prior_mode)
        )
    timings["load_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    prompts_by_frame = [
        frame_prompts(
            activity,
            t,
            n_negative=config.n_negative_points,
            max_prompts=config.max_prompts_per_frame,
        )
        for t in range(frames.shape[0])
    ]
    need = [t for t, p in enumerate(prompts_by_frame) if p]
    labels = np.zeros(frames.shape, dtype=np.uint32)
    records: list[dict] = []
    if config.mode == "video" and need:
        from calseg.segment.video import segment_video

        labels, records, vstats = segment_video(
            loaded, frames, norm, geom, activity, config, progress=scaled(progress, 0.02, 0.99)
        )
        timings["video_s"] = time.perf_counter() - t1
        timings["video"] = vstats.to_dict()
    elif need:
        emb = embed_recording(
            loaded,
            frames[need],
            norm,
            geom,
            cache_dir=cache_dir,
            batch_size=config.encoder_batch_size,
            progress=scaled(progress, 0.02, 0.7),
        )
        timings["embed_s"] = time.perf_counter() - t1
        timings["frames_embedded"] = emb.n_computed
        timings["frames_from_cache"] = emb.n_cached
        t1 = time.perf_counter()
        dec_progress = scaled(progress, 0.7, 0.99)
        for j, t in enumerate(need):
            logits, scores, objs = decode_frame_prompts(
                loaded, emb, j, geom, prompts_by_frame[t], config, as_crops=True
            )
            labels[t], recs = assemble_frame(
                logits, scores, objs, prompts_by_frame[t], config, shape=labels.shape[1:]
            )
            records.extend(recs)
            dec_progress((j + 1) / len(need), "decode", f"frame {t + 1}/{frames.shape[0]}")
        timings["decode_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    progress(1.0, "done", f"{sum(r['kept'] for r in records)} masks kept of {len(records)}")
    return SegmentationResult(
        labels, records, norm, loaded.info.to_dict(), warnings, act_stats, timings
    )
