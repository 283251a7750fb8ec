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


DECODE_CHUNK_BYTES = 128 * 2**20
"""Most bytes of full-frame float32 mask logits one decoder call makes
(:func:`decode_chunk_size`): ``decoder_batch_size`` prompts of a 512 px square, fewer of
larger frames (one at a time at 8192 px)."""


def decode_chunk_size(config: InferenceConfig, geometry: FrameGeometry) -> int:
    """Prompts per decoder call: ``config.decoder_batch_size``, fewer where their full-frame
    logits (``side x side`` float32 each, the padded square before the crop to the frame)
    would pass :data:`DECODE_CHUNK_BYTES`; at least 1."""
    per_prompt = 4 * geometry.side * geometry.side
    return int(max(1, min(config.decoder_batch_size, DECODE_CHUNK_BYTES // per_prompt)))


@dataclass
class PromptMask:
    """One prompt's mask, kept as the crop of the frame that holds it (what
    :func:`assemble_frame` needs, without a frame-sized array per prompt).

    ``y0``, ``x0``: the crop's first row and column (frame px); ``mask``: ``(h, w)`` bool, the
    mask (its part holding the prompt with ``single_region``); ``logits``: ``(h, w)`` float32
    mask logits there (the mask itself as 1.0 where the input was a bool mask); ``area``: mask
    pixels; ``holds_point``: whether the mask covers the prompt's pixel. A mask larger than
    ``max_mask_area_fraction`` of the frame (refused by :func:`assemble_frame` as too large)
    keeps its ``area`` but an empty crop."""

    y0: int
    x0: int
    mask: np.ndarray
    logits: np.ndarray
    area: int
    holds_point: bool


def prompt_mask(logit: np.ndarray, prompt: object, config: InferenceConfig) -> PromptMask:
    """The :class:`PromptMask` of one prompt's ``(H, W)`` mask logits (or bool mask):
    thresholded at ``config.mask_threshold``, reduced to the part holding the prompt's pixel
    with ``config.single_region`` (:func:`_prompt_region`), cropped to its bounding box."""
    logit = np.asarray(logit)
    if logit.dtype == bool:
        m, values = logit, None
    else:
        m, values = logit > config.mask_threshold, logit
    h, w = m.shape
    if config.single_region:
        m = _prompt_region(m, prompt.y, prompt.x)
    area = int(np.count_nonzero(m))
    holds = bool(0 <= prompt.y < h and 0 <= prompt.x < w and m[prompt.y, prompt.x])
    empty = np.zeros((0, 0), bool)
    if area == 0 or area > config.max_mask_area_fraction * h * w:
        return PromptMask(0, 0, empty, empty.astype(np.float32), area, holds)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = m[box]
    lg = crop.astype(np.float32) if values is None else values[box].astype(np.float32)
    return PromptMask(int(rows[0]), int(cols[0]), crop.copy(), lg, area, holds)


def decode_frame_prompts(
    loaded: LoadedSAM2,
    emb: FrameEmbeddings,
    frame: int,
    geometry: FrameGeometry,
    prompts: list,
    config: InferenceConfig,
    *,
    as_crops: bool = False,
) -> tuple[np.ndarray | list[PromptMask], np.ndarray, np.ndarray]:
    """Run SAM2 on one frame's prompts, :func:`decode_chunk_size` prompts per decoder call.

    Args:
        loaded, emb, frame, geometry: the model, the recording's embeddings, the frame index
            in them and the frame geometry.
        prompts: the frame's :class:`calseg.segment.prompts.FramePrompt`.
        config: :class:`InferenceConfig`.
        as_crops: return each prompt's mask as a :class:`PromptMask` (memory of the masks,
            not of ``B`` frames: what :func:`assemble_frame` needs) instead of dense logits.
            A sixth attack run's 5,000 prompts on 512 px frames took over 7.9 GB as dense
            logits and masks, against an estimate of 2.6 GiB.

    Returns:
        ``(logits, scores (B,) predicted IoU, object_logits (B,))``; ``logits`` is ``(B, H,
        W)`` float16 mask logits in frame pixels, or with ``as_crops`` a list of ``B``
        :class:`PromptMask`.
    """
    import torch

    device = next(loaded.model.parameters()).device
    image_embed, high = emb.get(frame, device)
    multimask = config.multimask_output
    if multimask is None:
        multimask = True if loaded.info.multimask_output is None else loaded.info.multimask_output
    prior_radius = inference_prior_radius(loaded.info, geometry.scale, config.cell_diameter_px)
    size = decode_chunk_size(config, geometry)
    logits: list = []
    scores, objs = [], []
    for b0 in range(0, len(prompts), size):
        chunk = prompts[b0 : b0 + size]
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
            full = logits_to_frame(low_best, geometry)[:, 0].to(torch.float16).cpu().numpy()
            if as_crops:
                logits.extend(prompt_mask(lg, q, config) for lg, q in zip(full, chunk, strict=True))
            else:
                logits.append(full)
            scores.append(iou[ar, best].float().cpu().numpy())
            objs.append(obj[:, 0].float().cpu().numpy())
    if not as_crops:
        shape = (0, geometry.height, geometry.width)
        logits = np.concatenate(logits) if logits else np.zeros(shape, np.float16)
    return (
        logits,
        np.concatenate(scores) if scores else np.zeros(0, np.float32),
        np.concatenate(objs) if objs else np.zeros(0, np.float32),
    )


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
    logits: np.ndarray | list[PromptMask],
    scores: np.ndarray,
    objs: np.ndarray,
    prompts: list,
    config: InferenceConfig,
    shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Filter, de-duplicate and compose one frame's masks into a label image.

    Args:
        logits: ``(B, H, W)`` mask logits (or bool masks) of the frame's ``B`` prompts, or their
            ``B`` :class:`PromptMask` (``decode_frame_prompts(..., as_crops=True)``).
        scores: ``(B,)`` predicted IoU; ``objs``: ``(B,)`` object-score logits.
        prompts: the ``B`` :class:`calseg.segment.prompts.FramePrompt`.
        config: thresholds (:class:`InferenceConfig`).
        shape: ``(H, W)`` of the frame; needed with :class:`PromptMask` input.

    Returns:
        ``(label image (H, W) uint32, per-prompt dicts with score/kept/reason)``. A pixel in
        several kept masks gets the id of the mask with the highest logit there (the first
        kept, by predicted IoU, on a tie).
    """
    if isinstance(logits, np.ndarray):
        if logits.ndim != 3:
            raise ValueError(f"expected (B, H, W) mask logits, got shape {logits.shape}")
        shape = logits.shape[1:]
        masks = [prompt_mask(lg, q, config) for lg, q in zip(logits, prompts, strict=True)]
    else:
        masks = list(logits)
        if shape is None:
            raise ValueError("assemble_frame needs the frame's shape with PromptMask input")
    h, w = shape
    max_area = config.max_mask_area_fraction * h * w
    records = []
    candidates = []
    for i, (q, pm) in enumerate(zip(prompts, masks, strict=True)):
        rec = q.to_dict()
        rec.update(score=float(scores[i]), object_logit=float(objs[i]), area_px=int(pm.area))
        reason = None
        if pm.area == 0:
            reason = "empty"
        elif config.require_point_in_mask and not pm.holds_point:
            reason = "point-outside-mask"
        elif pm.area < config.min_mask_area_px:
            reason = "too-small"
        elif pm.area > max_area:
            reason = "too-large"
        elif config.use_object_score and objs[i] < 0:
            reason = "no-object"
        rec["reason"] = reason
        rec["kept"] = False
        records.append(rec)
        if reason is None:
            candidates.append(i)
    kept: list[int] = []
    for i in sorted(candidates, key=lambda j: -scores[j]):
        a = masks[i]
        dup = False
        for k in kept:
            inter = _overlap(a, masks[k])
            if inter and inter / (a.area + masks[k].area - inter) >= config.nms_iou:
                dup = True
                break
        if dup:
            records[i]["reason"] = "duplicate"
            continue
        kept.append(i)
        records[i]["kept"] = True
    out = np.zeros((h, w), dtype=np.uint32)
    best = np.full((h, w), -np.inf, dtype=np.float32)
    for i in kept:  # in kept order: the first keeps a pixel on a tie, as argmax did
        pm = masks[i]
        box = (slice(pm.y0, pm.y0 + pm.mask.shape[0]), slice(pm.x0, pm.x0 + pm.mask.shape[1]))
        win = pm.mask & (pm.logits > best[box])
        best[box][win] = pm.logits[win]
        out[box][win] = prompts[i].seed_id
    return out, records


def _overlap(a: PromptMask, b: PromptMask) -> int:
    """Pixels two :class:`PromptMask` share."""
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return 0
    sa = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    sb = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(sa & sb))
