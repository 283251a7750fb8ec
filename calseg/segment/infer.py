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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calseg.progress import ProgressFn, null_progress, scaled
from calseg.segment.cells import CellParams
from calseg.segment.embeddings import (
    FrameEmbeddings,
    FrameGeometry,
    as_frame_stack,
    check_percentiles,
    compute_normalisation,
    encode_frames,
    frames_to_model,
    logits_to_frame,
    normalise_frames,
)
from calseg.segment.model import LoadedSAM2, load_sam2, run_decoder
from calseg.segment.prompts import (
    Activity,
    ActivityParams,
    compute_activity,
    frame_prompts,
    pack_points,
)

log = logging.getLogger(__name__)


MIN_FRAMES_FOR_ACTIVITY = 3
"""Fewer frames than this leave no baseline (F0) to measure a change against."""


class InferenceConfig(BaseModel):
    """Parameters of :func:`segment_recording` (units: px, dF/F, %)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_percentiles(self):  # noqa: ANN202 - pydantic validator returns the model
        check_percentiles(self.low_percentile, self.high_percentile)
        return self

    method: Literal["sam2", "baseline"] = "sam2"
    target: Literal["active", "cells"] = Field(
        "active",
        description="'active': the cells active in each frame (activity prompts); 'cells': all "
        "cells visible on a temporal projection (calseg.segment.projection), a label stack "
        "constant in time (one image: 'mode' does not apply)",
    )
    projection: Literal["mean", "max", "std"] = Field(
        "mean", description="target='cells': temporal projection the cells are found on"
    )
    projection_cell_diameter_px: float | None = Field(
        None,
        gt=1,
        le=1000,
        description="target='cells': cell diameter (px); None = estimated from the projection",
    )
    mode: Literal["image", "video"] = Field(
        "image",
        description="'image': every frame decoded on its own (embeddings cacheable); 'video': "
        "SAM2 video propagation with memory (calseg.segment.video), cells prompted once per "
        "window and tracked",
    )
    video_window_frames: int = Field(
        64, ge=2, le=100_000, description="video mode: frames per predictor state (memory bound)"
    )
    video_max_cond_frames: int = Field(
        4, ge=1, le=64, description="video mode: prompted frames each frame attends to"
    )
    video_offload_state_to_cpu: bool = Field(
        True, description="video mode on CUDA: keep per-frame outputs in host memory"
    )
    video_gate_by_activity: bool = Field(
        True,
        description="video mode: paint a tracked cell only in frames where its ROI is active",
    )
    model: str = "sam2.1_hiera_t"
    image_size: int = Field(512, ge=64, le=2048, multiple_of=32)
    device: str = "auto"
    encoder_batch_size: int = Field(4, ge=1, le=64)
    # normalisation (per recording)
    low_percentile: float = Field(0.5, ge=0, lt=100)
    high_percentile: float = Field(99.8, gt=0, le=100)
    # activity map / prompts
    smooth_sigma_px: float = Field(0.0, ge=0)
    f0_percentile: float = Field(20.0, ge=0, le=100)
    threshold_k: float = Field(5.0, gt=0)
    min_dff: float = Field(0.0, ge=0)
    detrend: bool = True
    min_region_px: int = Field(15, ge=1)
    # cell ROIs (calseg.segment.cells)
    cell_diameter_px: float = Field(11.0, gt=1, le=1000, description="typical cell diameter")
    cell_support_fraction: float = Field(0.3, ge=0, lt=1)
    cell_active_fraction: float = Field(0.5, ge=0, lt=1)
    n_negative_points: int = Field(2, ge=0, le=8)
    max_prompts_per_frame: int = Field(256, ge=1)
    # mask post-processing
    mask_threshold: float = 0.0
    nms_iou: float = Field(0.5, gt=0, le=1)
    min_mask_area_px: int = Field(4, ge=1)
    max_mask_area_fraction: float = Field(0.05, gt=0, le=1)
    use_object_score: bool = True
    require_point_in_mask: bool = True
    multimask_output: bool | None = Field(
        None,
        description="None: as the fine-tuned checkpoint was trained (SAM's 3 candidates picked "
        "by predicted IoU for base models); True/False to force",
    )
    decoder_batch_size: int = Field(64, ge=1)

    def activity_params(self) -> ActivityParams:
        """The :class:`ActivityParams` these settings describe."""
        return ActivityParams(
            smooth_sigma_px=self.smooth_sigma_px,
            f0_percentile=self.f0_percentile,
            threshold_k=self.threshold_k,
            min_dff=self.min_dff,
            detrend=self.detrend,
            min_region_px=self.min_region_px,
            cells=CellParams(
                cell_diameter_px=self.cell_diameter_px,
                support_fraction=self.cell_support_fraction,
                active_fraction=self.cell_active_fraction,
            ),
        )


@dataclass
class SegmentationResult:
    """Output of :func:`segment_recording`.

    ``labels``: ``(T, H, W)`` uint32 label stack (0 background, ids stable across frames).
    ``prompts``: one dict per prompt (frame, seed_id, x, y, z, negatives, score, kept, reason).
    ``normalisation``: the per-recording normalisation applied. ``model_info``:
    :meth:`ModelInfo.to_dict` or ``None`` for the baseline. ``timings``: seconds per stage.
    """

    labels: np.ndarray
    prompts: list[dict]
    normalisation: dict
    model_info: dict | None
    warnings: list[str]
    activity: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def prepare_recording(
    frames: np.ndarray, config: InferenceConfig
) -> tuple[np.ndarray, dict, FrameGeometry]:
    """Check a recording and normalise it: ``(frames (T,H,W), normalisation, geometry)``."""
    frames = as_frame_stack(frames)
    norm = compute_normalisation(frames, config.low_percentile, config.high_percentile)
    geom = FrameGeometry(frames.shape[1], frames.shape[2], config.image_size)
    return frames, norm, geom


def embed_recording(
    loaded: LoadedSAM2,
    frames: np.ndarray,
    normalisation: dict,
    geometry: FrameGeometry,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> FrameEmbeddings:
    """Normalise, pad/resize and embed a ``(T, H, W)`` recording (float16 features, CPU)."""
    x = frames_to_model(normalise_frames(frames, normalisation), geometry)
    return encode_frames(loaded, x, cache_dir=cache_dir, batch_size=batch_size, progress=progress)


def decode_frame_prompts(
    loaded: LoadedSAM2,
    emb: FrameEmbeddings,
    frame: int,
    geometry: FrameGeometry,
    prompts: list,
    config: InferenceConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run SAM2 on one frame's prompts.

    Returns:
        ``(logits (B, H, W) float16 mask logits in frame pixels, scores (B,) predicted IoU,
        object_logits (B,))``.
    """
    import torch

    device = next(loaded.model.parameters()).device
    image_embed, high = emb.get(frame, device)
    multimask = config.multimask_output
    if multimask is None:
        multimask = True if loaded.info.multimask_output is None else loaded.info.multimask_output
    logits, scores, objs = [], [], []
    for b0 in range(0, len(prompts), config.decoder_batch_size):
        chunk = prompts[b0 : b0 + config.decoder_batch_size]
        coords, labels = pack_points(
            [(q.x, q.y) for q in chunk], [list(q.negatives) for q in chunk]
        )
        coords = geometry.to_model_points(coords)
        with torch.no_grad():
            low, iou, obj = run_decoder(
                loaded.model,
                image_embed,
                high,
                torch.from_numpy(coords).to(device),
                torch.from_numpy(labels).to(device),
                multimask_output=multimask,
            )
            best = iou.argmax(dim=1)
            ar = torch.arange(len(chunk), device=device)
            low_best = low[ar, best][:, None].float()
            full = logits_to_frame(low_best, geometry)[:, 0]
            logits.append(full.to(torch.float16).cpu().numpy())
            scores.append(iou[ar, best].float().cpu().numpy())
            objs.append(obj[:, 0].float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(scores), np.concatenate(objs)


def assemble_frame(
    logits: np.ndarray,
    scores: np.ndarray,
    objs: np.ndarray,
    prompts: list,
    config: InferenceConfig,
) -> tuple[np.ndarray, list[dict]]:
    """Filter, de-duplicate and compose one frame's masks into a label image.

    Args:
        logits: ``(B, H, W)`` mask logits (or bool masks) of the frame's ``B`` prompts.
        scores: ``(B,)`` predicted IoU; ``objs``: ``(B,)`` object-score logits.
        prompts: the ``B`` :class:`calseg.segment.prompts.FramePrompt`.
        config: thresholds (:class:`InferenceConfig`).

    Returns:
        ``(label image (H, W) uint32, per-prompt dicts with score/kept/reason)``. A pixel in
        several kept masks gets the id of the mask with the highest logit there.
    """
    logits = np.asarray(logits)
    if logits.dtype == bool:
        masks = logits
        logits = masks.astype(np.float32)
    else:
        masks = logits > config.mask_threshold
    h, w = masks.shape[1:]
    max_area = config.max_mask_area_fraction * h * w
    areas = masks.reshape(len(masks), -1).sum(1)
    records = []
    candidates = []
    for i, q in enumerate(prompts):
        rec = q.to_dict()
        rec.update(score=float(scores[i]), object_logit=float(objs[i]), area_px=int(areas[i]))
        reason = None
        if areas[i] == 0:
            reason = "empty"
        elif config.require_point_in_mask and not masks[i, q.y, q.x]:
            reason = "point-outside-mask"
        elif areas[i] < config.min_mask_area_px:
            reason = "too-small"
        elif areas[i] > max_area:
            reason = "too-large"
        elif config.use_object_score and objs[i] < 0:
            reason = "no-object"
        rec["reason"] = reason
        rec["kept"] = False
        records.append(rec)
        if reason is None:
            candidates.append(i)
    kept: list[int] = []
    flat = masks.reshape(len(masks), -1)
    for i in sorted(candidates, key=lambda j: -scores[j]):
        dup = False
        for k in kept:
            inter = np.count_nonzero(flat[i] & flat[k])
            if inter and inter / (areas[i] + areas[k] - inter) >= config.nms_iou:
                dup = True
                break
        if dup:
            records[i]["reason"] = "duplicate"
            continue
        kept.append(i)
        records[i]["kept"] = True
    out = np.zeros((h, w), dtype=np.uint32)
    if kept:
        kept_logits = np.where(masks[kept], logits[kept].astype(np.float32), -np.inf)
        winner = np.argmax(kept_logits, axis=0)
        ids = np.array([prompts[i].seed_id for i in kept], dtype=np.uint32)
        covered = masks[kept].any(axis=0)
        out[covered] = ids[winner[covered]]
    return out, records


def segment_recording(
    frames: np.ndarray,
    config: InferenceConfig,
    *,
    checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    model: LoadedSAM2 | None = None,
    activity: Activity | None = None,
) -> SegmentationResult:
    """Segment the calcium-active cells of a recording, frame by frame (``mode="image"``) or
    with SAM2 video propagation (``mode="video"``, :mod:`calseg.segment.video`).

    Args:
        frames: ``(T, H, W)`` (or ``(H, W)``) grayscale recording, 8/16/32-bit int or float,
            any size; NaN/Inf allowed (treated as background).
        config: :class:`InferenceConfig`.
        checkpoint: SAM2 or CalSeg fine-tuned checkpoint (``None``: ``$CALSEG_SAM2_CHECKPOINT``
            or random weights, see :func:`calseg.segment.model.load_sam2`). Ignored by the
            baseline.
        cache_dir: embedding cache directory (``None``: no disk cache).
        progress: :data:`calseg.progress.ProgressFn`.
        model: an already loaded model (skips loading; ``checkpoint`` is then ignored).
        activity: precomputed :func:`compute_activity` of ``frames`` with the same parameters.

    Returns:
        :class:`SegmentationResult` with ``labels`` of shape ``(T, H, W)`` uint32.
    """
    progress = progress or null_progress
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    frames, norm, geom = prepare_recording(frames, config)
    warnings: list[str] = []
    if norm["n_nonfinite"]:
        warnings.append(f"{norm['n_nonfinite']} NaN/Inf pixels treated as background")
    if config.target == "cells":  # all cells on a projection: no activity needed
        from calseg.segment.projection import segment_cells_recording

        res = segment_cells_recording(
            frames,
            config,
            checkpoint=checkpoint,
            cache_dir=cache_dir,
            model=model,
            warnings=warnings,
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
        activity = compute_activity(frames, config.activity_params())
    timings["activity_s"] = time.perf_counter() - t0
    act_stats = dict(activity.stats)
    if activity.stats["n_seeds"] == 0:
        warnings.append("no supra-threshold activity found: the label stack is empty")

    if config.method == "baseline":
        from calseg.segment.baseline import baseline_labels

        labels = baseline_labels(activity, config.min_region_px)
        timings["total_s"] = time.perf_counter() - t0
        progress(1.0, "done", f"baseline: {int(labels.max() > 0)} ids")
        return SegmentationResult(labels, [], norm, None, warnings, act_stats, timings)

    t1 = time.perf_counter()
    loaded = model or load_sam2(
        config.model, checkpoint, image_size=config.image_size, device=config.device
    )
    if loaded.info.image_size != geom.image_size:
        geom = FrameGeometry(geom.height, geom.width, loaded.info.image_size)
    if loaded.info.random_weights:
        warnings.append("SAM2 has RANDOM weights (no checkpoint): masks are not meaningful")
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
                loaded, emb, j, geom, prompts_by_frame[t], config
            )
            labels[t], recs = assemble_frame(logits, scores, objs, prompts_by_frame[t], config)
            records.extend(recs)
            dec_progress((j + 1) / len(need), "decode", f"frame {t + 1}/{frames.shape[0]}")
        timings["decode_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    progress(1.0, "done", f"{sum(r['kept'] for r in records)} masks kept of {len(records)}")
    return SegmentationResult(
        labels, records, norm, loaded.info.to_dict(), warnings, act_stats, timings
    )
