"""The per-frame steps of SAM2 segmentation, shared by image mode (:mod:`calseg.segment.infer`),
video mode (:mod:`calseg.segment.video`) and all cells on a projection
(:mod:`calseg.segment.projection`): :class:`InferenceConfig`, :class:`SegmentationResult`,
normalisation (:func:`prepare_recording`), embedding (:func:`embed_recording`), one frame's
decoder run (:func:`decode_frame_prompts`) and the composition of its masks
(:func:`assemble_frame`). It imports none of those three modules (they import it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi

from calseg.progress import ProgressFn
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
from calseg.segment.model import LoadedSAM2, inference_prior_radius, run_decoder
from calseg.segment.prompts import (
    ActivityParams,
    pack_points,
)

MIN_FRAMES_FOR_ACTIVITY = 3
"""Fewer frames than this leave no baseline (F0) to measure a change against."""

ACTIVE_CELL_DIAMETER_PX = CellParams().cell_diameter_px
"""Cell-size prior (px, 11: the simulator's default cells of 100 px, about 11.3 px across) where
no ``cell_diameter_px`` is given and the recording gives no estimate
(:func:`calseg.analysis.cellsize.cell_diameter_or_prior`; both targets), or no recording is at
hand (:meth:`InferenceConfig.activity_params` without frames)."""

CONFIG_ALIASES = {"projection_cell_diameter_px": "cell_diameter_px"}
"""Old :class:`InferenceConfig` field name -> its one name (still accepted, also by the infer
job: :func:`apply_config_aliases`)."""


def apply_config_aliases(data: object) -> object:
    """``data`` (a parameter dict) with the old names of :data:`CONFIG_ALIASES` renamed.

    Raises:
        ValueError: an old name and its new name both given, with different values.
    """
    if not isinstance(data, dict) or not any(k in data for k in CONFIG_ALIASES):
        return data
    out = dict(data)
    for old, new in CONFIG_ALIASES.items():
        if old in out:
            value = out.pop(old)
            if out.get(new) is not None and out[new] != value:
                raise ValueError(f"{old} is the old name of {new}: give one of them")
            out[new] = value
    return out


class InferenceConfig(BaseModel):
    """Parameters of :func:`segment_recording` (units: px, dF/F, %)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _method_alias(cls, data: object) -> object:
        # "baseline" was the classical method's old name (calseg.segment.choice)
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            from calseg.segment.choice import canonical_method

            data = {**data, "method": canonical_method(data["method"])}
        return apply_config_aliases(data)

    @model_validator(mode="after")
    def _check_percentiles(self):  # noqa: ANN202 - pydantic validator returns the model
        check_percentiles(self.low_percentile, self.high_percentile)
        return self

    method: Literal["classical", "sam2"] = Field(
        "sam2",
        description="'classical': activity map + cell territories, no weights "
        "(calseg.segment.baseline); 'sam2': SAM2 prompted by the activity ('baseline' is "
        "accepted for 'classical'). This library default serves callers that configure SAM2; "
        "what users get by default (calseg segment, the infer job, the page: method 'auto') is "
        "chosen by calseg.segment.choice.best_method",
    )
    target: Literal["active", "cells"] = Field(
        "active",
        description="'active': the cells active in each frame (activity prompts); 'cells': all "
        "cells visible on a temporal projection (calseg.segment.projection), a label stack "
        "constant in time (one image: 'mode' does not apply)",
    )
    projection: Literal["mean", "max", "std"] = Field(
        "mean", description="target='cells': temporal projection the cells are found on"
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
    cell_diameter_px: float | None = Field(
        None,
        gt=1,
        le=1000,
        description="typical cell diameter (px), an override; None: estimated from the "
        "recording (calseg.analysis.cellsize, both targets), the 11 px prior "
        "(ACTIVE_CELL_DIAMETER_PX) where it finds none. Over 1 px (a cell spans pixels) and "
        "at most 1000 px (a quarter of a 4096 px frame); 'projection_cell_diameter_px' is its "
        "old name",
    )
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
    single_region: bool = Field(
        True,
        description="keep only the connected part of each SAM2 mask that holds its prompt "
        "point (the largest part when the point is outside): a cell is one region; without it "
        "a mask's scattered islands all became one 'cell'",
    )
    multimask_output: bool | None = Field(
        None,
        description="None: as the fine-tuned checkpoint was trained (SAM's 3 candidates picked "
        "by predicted IoU for base models); True/False to force",
    )
    decoder_batch_size: int = Field(64, ge=1)

    def activity_params(
        self, frames: np.ndarray | None = None, frame_interval_s: float | None = None
    ) -> ActivityParams:
        """The :class:`ActivityParams` these settings describe. The cell diameter: the one
        given; else estimated from ``frames`` (``(T, H, W)``, with ``frame_interval_s``, s per
        frame or ``None`` when not known; :func:`calseg.analysis.cellsize.cell_diameter_or_prior`);
        else (no frames, or no estimate) the 11 px prior :data:`ACTIVE_CELL_DIAMETER_PX`."""
        d = self.cell_diameter_px
        source = "given" if d is not None else "prior"
        if d is None and frames is not None:
            from calseg.analysis.cellsize import cell_diameter_or_prior

            d, found = cell_diameter_or_prior(
                frames, ACTIVE_CELL_DIAMETER_PX, frame_interval_s=frame_interval_s
            )
            source = "estimated" if found else "prior"
        return ActivityParams(
            smooth_sigma_px=self.smooth_sigma_px,
            f0_percentile=self.f0_percentile,
            threshold_k=self.threshold_k,
            min_dff=self.min_dff,
            detrend=self.detrend,
            min_region_px=self.min_region_px,
            cells=CellParams(
                cell_diameter_px=d or ACTIVE_CELL_DIAMETER_PX,
                support_fraction=self.cell_support_fraction,
                active_fraction=self.cell_active_fraction,
            ),
            cell_diameter_source=source,
        )


@dataclass
class SegmentationResult:
    """Output of :func:`segment_recording`.

    ``labels``: ``(T, H, W)`` uint32 label stack (0 background, ids stable across frames).
    ``prompts``: one dict per prompt (frame, seed_id, x, y, z, negatives, score, kept, reason).
    ``normalisation``: the per-recording normalisation applied. ``model_info``:
    :meth:`ModelInfo.to_dict` or ``None`` for the classical method. ``timings``: seconds per stage.
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
    prior_radius = inference_prior_radius(loaded.info, geometry.scale, config.cell_diameter_px)
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
                prior_radius=prior_radius,
                prior_mode=loaded.info.prior_mode,
            )
            best = iou.argmax(dim=1)
            ar = torch.arange(len(chunk), device=device)
            low_best = low[ar, best][:, None].float()
            full = logits_to_frame(low_best, geometry)[:, 0]
            logits.append(full.to(torch.float16).cpu().numpy())
            scores.append(iou[ar, best].float().cpu().numpy())
            objs.append(obj[:, 0].float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(scores), np.concatenate(objs)


def _prompt_region(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """The 8-connected part of the ``(H, W)`` bool ``mask`` that holds pixel ``(y, x)``, or its
    largest part when the pixel is outside the mask (labelled within the mask's bounding box)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[y0:y1, x0:x1]
    lab, n = ndi.label(box, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    inside = y0 <= y < y1 and x0 <= x < x1 and lab[y - y0, x - x0] > 0
    keep = lab[y - y0, x - x0] if inside else int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = lab == keep
    return out


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
    if config.single_region and len(masks):
        masks = np.stack([_prompt_region(m, q.y, q.x) for m, q in zip(masks, prompts, strict=True)])
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
