"""Fine-tune SAM2's prompt encoder and mask decoder on a simulated ``calseg-dataset``.

:func:`finetune` runs a :class:`Trainer` (setup, resume, step, validate, checkpoint; hooks for
the loss and for prompt sampling; the config read by concern through :data:`CONFIG_GROUPS`).

Design (DESIGN.md sections 4-6, and the source code's mistakes it avoids):

* The image encoder is frozen; every training/validation frame is embedded once (per-recording
  normalisation, :mod:`calseg.segment.embeddings`) and cached on disk. Training calls
  ``sam_prompt_encoder`` and ``sam_mask_decoder`` directly on cached features
  (:func:`calseg.segment.model.run_decoder`), never ``predict()``.
* Augmentation vs cached embeddings (``augment_variants`` = K): augmenting images at every
  step would need the encoder at every step (5-30x slower on CPU, DESIGN.md section 6), so
  each training video gets K augmented copies (:mod:`calseg.segment.augment`: intensity,
  Poisson-Gaussian noise, blur, flips/rot90, zoom crops, elastic; labels moved with the
  image), made once with a seed from (run seed, video, k) and embedded once like extra
  videos; the cache key is the hash of the augmented model input, so reruns hit the cache.
  Cost: (K + 1) x the training frames' embedding time and cache disk (4 MiB per frame at
  512 px in fp32, 2 MiB as stored in fp16). Variety beyond K comes from the simulator's own
  per-video randomisation (camera, optics, defects drawn per video).
* Instance targets: each prompt's target is ITS OWN cell's mask in that frame (not the union of
  all active cells). The positive point is sampled near the cell's centre (``prompt_point=
  "deep"``, the default: within 0.75 of the largest edge distance) or, with ``"eroded"``,
  inside the cell's mask eroded by a 5x5 square (falls back to the un-eroded mask for tiny
  cells); up to ``n_negative_points`` negatives come
  from other active cells of the frame or from the background ring around the cell. A fraction
  ``background_prompt_fraction`` of prompts is placed on background pixels with an empty target
  and object-score target 0, so frames without any active cell still give a finite loss.
* Mask output (``multimask_output``): by default the decoder's single-mask output, in
  training, validation and inference alike (SAM's choice for prompts of several points; CalSeg
  prompts carry negatives). With ``multimask_output=True``, SAM's three candidates: the mask
  loss is taken on the lowest-loss candidate and the IoU head is trained on all three; at
  validation/inference the candidate with the highest predicted IoU is used. Measured on the
  demo dataset (seed 0, 150 steps, random encoder): the IoU head then stays flat (0.005-0.008
  for every prompt), so the argmax picked a candidate covering the whole frame, which inference
  rejected as too large -- the fine-tuned IoU of 0.000 in the demo.
* Loss (SAM, Kirillov et al. 2023; SAM2, Ravi et al. 2024): ``focal_weight`` x sigmoid focal
  loss (Lin et al. 2017, gamma 2) + ``dice_weight`` x soft Dice loss on the (lowest-loss)
  mask, on cell prompts only (as SAM2's loss, which supervises masks only where the object is
  present), + ``iou_weight`` x MSE between the IoU head and the true IoU of every candidate,
  + ``object_weight`` x BCE on the object-score logit. Defaults differ from SAM's 20:1 focal
  weight and alpha 0.25, measured (random tiny encoder, 128 px, simulated cells of 2-6
  low-res pixels): with focal 20 / alpha 0.25 every pixel logit went negative (mean per-mask
  max logit +0.37 at step 0, -2 by step 20) while the object score stayed about +8 (so not
  object-score gating), and Dice smoothed by 1 scores an empty mask nearly as well as a right
  one on such small targets; prompted val IoU fell from 0.004 to 0.0. Focal weight 1, alpha
  0.75 (foreground up-weighted) and Dice smoothing 1e-3 train instead (numbers in the commit
  history and BENCHMARKS).
  Computed by default on the decoder's S/4 logits against the area-averaged (soft) target
  (``loss_resolution="low"``, ~5x cheaper on CPU) or on logits upsampled to S (``"full"``).
* AdamW; linear warm-up then cosine decay to ``min_lr_ratio`` x lr, stepped once per OPTIMISER
  step (not per micro-batch); gradient accumulation ``grad_accum``; gradients clipped to
  ``max_grad_norm`` AFTER unscaling when AMP (CUDA float16 + GradScaler) is on; steps with a
  non-finite loss or gradient norm are skipped and counted (abort after
  ``max_nonfinite_steps`` in a row).
* Disc prior (``mask_prior="residual"``, issue 14): the decoder's logits are added to those
  of a disc of the training cells' mean radius at the prompt point
  (:func:`calseg.segment.model.disc_prior_logits`), so training learns a correction of the
  disc and step 0 already scores the disc. Measured: on synthetic discs of radius 3 or 7 px
  (held out) the residual decoder reaches prompted IoU 0.64 vs 0.43 for the disc and 0.22 for
  the plain decoder (tests/test_segment_finetune.py); on simulated recordings (seed 7, 128 px,
  150 steps) neither beats the disc (plain 0.065, residual 0.759 vs disc 0.759). With
  :data:`DECODER_VS_DISC_RECIPE` (frames upsampled 4x to 512 px, training points near the
  cell's centre, ``prompt_point="deep"``, as validation and inference prompt; 1500 steps) the
  residual decoder on the RANDOM frozen encoder beats the disc on held-out videos: seed 7
  0.771 vs 0.759 (the decoder as initialised: 0.760), seed 11 0.769 vs 0.755 (0.750);
  ``scripts/decoder_vs_disc.py`` and README.md.
* Validation every ``val_every`` steps on the val split, by video: one prompt per ground-truth
  cell and frame (point = deepest pixel of the eroded mask), IoU of the chosen mask with the
  cell in the frame grid; video IoU = mean over prompts; ``val_mean_iou`` = mean over videos
  (a diagnostic, next to the disc prior's, the ``"prior"`` history row). With
  ``select_by="f1"`` (default) each validation also runs inference as ``infer`` does
  (:func:`validate_inference`) and the checkpoint with the best instance F1 (then foreground
  IoU) is kept; ``"prompted_iou"``: the best ``val_mean_iou``. The best checkpoint is kept
  (``best.pt``: prompt encoder + mask decoder weights + metadata, ~17 MB for the tiny model).
  ``last.pt`` adds optimiser/scheduler state for resuming an interrupted run with the same
  config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi

from calseg.analysis.metrics import stratified_bootstrap_ci
from calseg.progress import ProgressFn, null_progress, scaled
from calseg.segment._data import DatasetError, split_videos
from calseg.segment.augment import AugmentConfig, augment_recording
from calseg.segment.embeddings import (
    FrameEmbeddings,
    FrameGeometry,
    check_percentiles,
    compute_normalisation,
    encode_frames,
    encoder_features,
    frames_to_model,
    labels_to_model,
    logits_to_frame,
    normalise_frames,
)
from calseg.segment.infer import embed_recording
from calseg.segment.model import (
    LoadedSAM2,
    _torch_load,
    encoder_hash,
    file_sha256,
    load_sam2,
    run_decoder,
    save_finetuned_checkpoint,
    trainable_parameter_names,
)
from calseg.segment.prompts import pack_points, pack_prompts

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Raised when too many consecutive optimiser steps had a non-finite loss or gradient."""


class FinetuneConfig(BaseModel):
    """Fine-tuning settings (validated, unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_percentiles(self):  # noqa: ANN202 - pydantic validator returns the model
        check_percentiles(self.low_percentile, self.high_percentile)
        return self

    model: str = "sam2.1_hiera_t"
    image_size: int = Field(512, ge=64, le=2048, multiple_of=32)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    val_every: int = Field(50, ge=1)
    frames_per_video: int = Field(16, ge=1, description="frames per training video embedded")
    val_frames_per_video: int = Field(8, ge=1)
    val_max_prompts_per_frame: int = Field(32, ge=1)
    seed: int = 0
    focal_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the sigmoid focal loss (SAM/SAM2 use 20 with alpha 0.25; on "
        "cells covering ~0.2 % of the frame that drove every pixel logit negative, see the "
        "module docstring)",
    )
    dice_weight: float = Field(1.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)
    object_weight: float = Field(1.0, ge=0)
    focal_alpha: float = Field(
        0.75, ge=0, le=1, description="focal weight of foreground pixels (1 - alpha: background)"
    )
    focal_gamma: float = Field(2.0, ge=0)
    dice_smooth: float = Field(
        1e-3,
        gt=0,
        description="additive smoothing of the soft Dice ratio; 1 (a common default) makes an "
        "empty mask nearly as good as a right one on targets of a few low-res pixels",
    )
    n_negative_points: int = Field(2, ge=0, le=8)
    multimask_output: bool = Field(
        False,
        description="True: SAM's three candidate masks, mask loss on the lowest-loss one, IoU "
        "head trained on all three, inference picks by the IoU head; False: the single-mask "
        "output (SAM's choice for prompts with several points), identical in training, "
        "validation and inference",
    )
    mask_prior: Literal["none", "residual", "prompt"] = Field(
        "none",
        description="a disc of the training cells' mean radius at each prompt's positive "
        "point (calseg.segment.model.disc_prior_logits): 'residual' adds its logits to the "
        "decoder's, so the decoder learns a correction of the disc; 'prompt' gives it to the "
        "prompt encoder as SAM's mask input; recorded in the checkpoint and used by inference",
    )
    background_prompt_fraction: float = Field(0.1, ge=0, le=1)
    erosion_px: int = Field(5, ge=1, description="side of the square erosion for prompt points")
    prompt_point: Literal["eroded", "deep"] = Field(
        "deep",
        description="where a training prompt's positive point is drawn: 'eroded': anywhere in "
        "the cell eroded by erosion_px (SAM's uniform sampling); 'deep' (default): among the "
        "pixels at least 0.75 x the cell's largest distance from its edge, like the point "
        "prompted validation uses (deepest pixel; scripts/decoder_vs_disc.py seed 7 at 512 px: "
        "held-out gain over the disc prior +0.013 with 'deep', +0.007 with 'eroded'). "
        "Inference's activity anchors are not all that deep: on the demo's 3 held-out videos "
        "43, 42 and 11 % lie within 3 px of their cell's edge, where 0.2-11 % of their masks "
        "reach IoU 0.5 (68-99 % deeper in; scripts/prompt_depth_study.py)",
    )
    max_grad_norm: float = Field(1.0, gt=0)
    amp: bool = Field(True, description="float16 autocast + GradScaler (CUDA only)")
    device: str = "auto"
    encoder_batch_size: int = Field(4, ge=1)
    low_percentile: float = Field(0.5, ge=0, lt=100)
    high_percentile: float = Field(99.8, gt=0, le=100)
    max_nonfinite_steps: int = Field(10, ge=1)
    time_limit_s: float | None = Field(None, gt=0, description="stop early after this long")
    loss_resolution: Literal["low", "full"] = Field(
        "low",
        description="'low': loss on the decoder's S/4 logits vs the area-averaged target "
        "(about 5x faster on CPU); 'full': logits upsampled to S",
    )
    resume: bool = True
    select_by: Literal["f1", "prompted_iou"] = Field(
        "f1",
        description="how best.pt is chosen among the validations: 'f1' scores what inference "
        "does (activity prompts from the image, the same decoding and post-processing; "
        "instance F1 at IoU 0.5 vs the ground truth, foreground IoU breaking ties); "
        "'prompted_iou': one oracle point per true cell (diagnostic)",
    )
    train_mode: Literal["decoder", "lora", "full"] = Field(
        "decoder",
        description="'decoder': prompt encoder + mask decoder on CACHED embeddings (frozen "
        "encoder); 'lora': plus LoRA factors on the encoder's attention qkv layers; 'full': "
        "plus every image-encoder weight (meant for a GPU). lora/full change the encoder, so "
        "embeddings cannot be cached: every step re-encodes its frames",
    )
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(8.0, gt=0)
    encoder_lr: float | None = Field(
        None,
        gt=0,
        description="lr of encoder weights (None: lr for LoRA, lr / 10 for full fine-tuning "
        "of a pretrained checkpoint, the scratch lr for full training from random weights)",
    )
    recipe: Literal["auto", "finetune", "scratch"] = Field(
        "auto",
        description="learning-rate recipe (see training_recipe): 'finetune' gentle (lr, "
        "warmup_steps, min_lr_ratio as given; encoder lr / 10 in full mode), 'scratch' for "
        "train_mode=full from random weights (scratch_lr for every weight, scratch_warmup_"
        "fraction of the steps as warm-up, cosine to scratch_min_lr_ratio); 'auto': scratch "
        "when train_mode=full and the base has random weights, else finetune",
    )
    scratch_lr: float = Field(2e-3, gt=0, description="recipe 'scratch': peak lr of all weights")
    scratch_warmup_fraction: float = Field(0.05, ge=0, lt=1)
    scratch_min_lr_ratio: float = Field(0.02, ge=0, le=1)
    frames_per_step: int | None = Field(
        None,
        ge=1,
        description="lora/full: cell prompts of a micro-batch come from this many frames "
        "(each frame is re-encoded with gradients, the cost of a step; None: prompts drawn "
        "from every frame)",
    )
    prompt_mix: dict[Literal["point", "box", "box+point"], float] = Field(
        default_factory=lambda: {"point": 1.0},
        description="relative frequency of cell prompt types: 'point' (positive point + "
        "negatives), 'box' (the cell's bounding box, jittered), 'box+point' (both)",
    )
    box_jitter: float = Field(
        0.1, ge=0, le=0.5, description="box corners moved by up to this x the box side"
    )
    augment_variants: int = Field(
        0,
        ge=0,
        le=16,
        description="K augmented variants of every training video (calseg.segment.augment), "
        "each embedded once and cached like an extra video: (K + 1) x the embedding time and "
        "cache disk of the training frames; validation videos are never augmented",
    )
    augment: AugmentConfig | None = Field(
        None, description="augmentation ranges (None: the AugmentConfig defaults)"
    )

    @model_validator(mode="after")
    def _check_mix(self):  # noqa: ANN202 - pydantic validator returns the model
        if any(v < 0 for v in self.prompt_mix.values()) or sum(self.prompt_mix.values()) <= 0:
            raise ValueError(
                f"prompt_mix needs non-negative weights with a positive sum, got {self.prompt_mix}"
            )
        return self

    def group(self, name: str) -> MappingProxyType:
        """The fields of one concern (:data:`CONFIG_GROUPS`: ``"model"``, ``"data"``,
        ``"prompts"``, ``"loss"``, ``"optimiser"``, ``"validation"``, ``"checkpointing"``) as a
        read-only ``{field: value}`` mapping; what :class:`Trainer` reads. The parameters stay
        one flat set for the job API, the CLI and the page (one name per parameter)."""
        try:
            names = CONFIG_GROUPS[name]
        except KeyError:
            raise KeyError(f"no config group {name!r}; one of {sorted(CONFIG_GROUPS)}") from None
        return MappingProxyType({n: getattr(self, n) for n in names})

    def fingerprint(self) -> str:
        """Hash of the settings that define a run (for resuming)."""
        d = self.model_dump(exclude={"resume", "time_limit_s", "device", "val_every"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


CONFIG_GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model",
        "image_size",
        "device",
        "train_mode",
        "recipe",
        "lora_rank",
        "lora_alpha",
        "mask_prior",
        "multimask_output",
        "encoder_batch_size",
    ),
    "data": (
        "seed",
        "frames_per_video",
        "frames_per_step",
        "low_percentile",
        "high_percentile",
        "augment_variants",
        "augment",
    ),
    "prompts": (
        "batch_size",
        "prompt_mix",
        "prompt_point",
        "erosion_px",
        "n_negative_points",
        "background_prompt_fraction",
        "box_jitter",
    ),
    "loss": (
        "focal_weight",
        "focal_alpha",
        "focal_gamma",
        "dice_weight",
        "dice_smooth",
        "iou_weight",
        "object_weight",
        "loss_resolution",
    ),
    "optimiser": (
        "steps",
        "lr",
        "encoder_lr",
        "weight_decay",
        "warmup_steps",
        "min_lr_ratio",
        "scratch_lr",
        "scratch_warmup_fraction",
        "scratch_min_lr_ratio",
        "grad_accum",
        "max_grad_norm",
        "amp",
        "max_nonfinite_steps",
    ),
    "validation": ("val_every", "val_frames_per_video", "val_max_prompts_per_frame"),
    "checkpointing": ("select_by", "resume", "time_limit_s"),
}
""":class:`FinetuneConfig`'s fields by concern (issue 16 item 3): each field in exactly one
group (``tests/test_segment_trainer.py`` checks it, so a new field must be placed)."""


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    ``checkpoint``: best (or, without a val split, last) fine-tuned checkpoint;
    ``history``: one dict per optimiser step (``kind="train"``) and per validation
    (``kind="val"``); ``best_val_iou``: best ``val_mean_iou`` (prompted IoU, a diagnostic; None
    without a val split). ``best_step`` / ``best_score``: the step of ``checkpoint`` and its
    selection score (``config.select_by``: ``val_f1`` or ``val_mean_iou``); ``improved``:
    whether any step after 0 scored higher than the initial model (False adds the warning
    "no step improved on the initial model"); None without a val split.
    """

    checkpoint: Path
    history: list[dict]
    best_val_iou: float | None
    model_info: dict
    warnings: list[str]
    timings: dict = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    best_step: int | None = None
    best_score: float | None = None
    improved: bool | None = None


@dataclass
class _Video:
    id: str
    frames_idx: np.ndarray  # indices into the recording of the embedded frames
    emb: FrameEmbeddings
    geometry: FrameGeometry
    labels: np.ndarray  # (F, H, W) uint32 frame grid, embedded frames only
    labels_model: np.ndarray  # (F, S, S) uint32 model grid
    eroded_points: list[dict]  # per frame: {id: (n, 2) array of (row, col)}
    boxes: list[dict] = field(default_factory=list)  # per frame: {id: (x0, y0, x1, y1)} px
    x: object = None  # (F, 1, S, S) float16 model input (lora/full: re-encoded every step)


def _calseg_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("calseg")
    except Exception:  # not installed as a distribution
        return None


def _select_frames(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` frame indices, evenly spread over frames with active cells, plus ~10 %
    frames without any (so the model also sees "nothing active")."""
    t = labels.shape[0]
    active = labels.reshape(t, -1).any(axis=1)
    act = np.flatnonzero(active)
    empty = np.flatnonzero(~active)
    n_empty = min(len(empty), max(0, int(round(0.1 * n))) if len(act) else n)
    n_act = min(len(act), n - n_empty)
    pick_a = act[np.linspace(0, len(act) - 1, n_act).round().astype(int)] if n_act else act[:0]
    pick_e = (
        empty[np.linspace(0, len(empty) - 1, n_empty).round().astype(int)] if n_empty else empty[:0]
    )
    return np.unique(np.concatenate([pick_a, pick_e])).astype(int)


def _eroded_points(
    label_img: np.ndarray, erosion_px: int, deep_fraction: float | None = None
) -> dict[int, np.ndarray]:
    """``{cell id: (n, 2) int (row, col)}`` of pixels inside the cell eroded by a square of side
    ``erosion_px`` (the un-eroded mask when erosion empties it). ``deep_fraction`` f: instead,
    the pixels whose distance to the cell's edge is at least f x the cell's largest (always
    including the deepest pixel, the point validation prompts with)."""
    out: dict[int, np.ndarray] = {}
    struct = np.ones((erosion_px, erosion_px), dtype=bool)
    for i, sl in enumerate(ndi.find_objects(label_img), start=1):
        if sl is None:
            continue
        pad = erosion_px
        r0, c0 = max(sl[0].start - pad, 0), max(sl[1].start - pad, 0)
        sub = label_img[r0 : sl[0].stop + pad, c0 : sl[1].stop + pad] == i
        if deep_fraction is not None:
            dist = ndi.distance_transform_edt(sub)
            er = dist >= deep_fraction * dist.max()
        else:
            er = ndi.binary_erosion(sub, structure=struct) if erosion_px > 1 else sub
        if not er.any():
            er = sub
        rr, cc = np.nonzero(er)
        out[i] = np.stack([rr + r0, cc + c0], axis=1)
    return out


def _prepare_video(
    loaded: LoadedSAM2,
    video,
    n_frames: int,
    cfg: FinetuneConfig,
    cache_dir: Path | None,
    progress: ProgressFn,
    variant: int = 0,
) -> _Video:
    """Load, (augment,) normalise and embed one video's selected frames. ``variant`` k > 0:
    the k-th augmented copy (:func:`calseg.segment.augment.augment_recording` with seed
    :func:`variant_seed`), normalised on its own; its embeddings are cached under the hash of
    the augmented model input, so a rerun with the same seed and ranges hits the cache."""
    image = np.asarray(video.load_image())
    labels = np.asarray(video.load_labels()).astype(np.uint32)
    if image.shape != labels.shape or image.ndim != 3:
        raise DatasetError(
            f"video {video.id}: image {image.shape} and labels {labels.shape} must be equal (T,H,W)"
        )
    idx = _select_frames(labels, n_frames)
    vid_id = str(video.id)
    sel, lab = image[idx], labels[idx]
    if variant:
        sel, lab, _ = augment_recording(
            sel, lab, variant_seed(cfg.seed, vid_id, variant), cfg.augment
        )
        vid_id = f"{vid_id}~aug{variant}"
        norm = compute_normalisation(sel, cfg.low_percentile, cfg.high_percentile)
    else:
        norm = compute_normalisation(image, cfg.low_percentile, cfg.high_percentile)
    geom = FrameGeometry(image.shape[1], image.shape[2], loaded.info.image_size)
    x = None
    if cfg.train_mode == "decoder":
        emb = embed_recording(
            loaded,
            sel,
            norm,
            geom,
            cache_dir=cache_dir,
            batch_size=cfg.encoder_batch_size,
            progress=progress,
        )
    else:  # the encoder is trained: keep the model input, encode at every step
        x = frames_to_model(normalise_frames(sel, norm), geom).half()
        emb = None
    return _Video(
        id=vid_id,
        frames_idx=idx,
        emb=emb,
        geometry=geom,
        labels=lab,
        labels_model=labels_to_model(lab, geom),
        eroded_points=[
            _eroded_points(lab[f], cfg.erosion_px, _deep_fraction(cfg)) for f in range(len(idx))
        ],
        boxes=[_cell_boxes(lab[f]) for f in range(len(idx))],
        x=x,
    )


DEEP_FRACTION = 0.75
"""``prompt_point="deep"``: points at least this fraction of the cell's largest
edge distance inside (0.75 of a 5.7 px radius: within about 1.4 px of the centre)."""


def _deep_fraction(cfg: FinetuneConfig) -> float | None:
    return DEEP_FRACTION if cfg.prompt_point == "deep" else None


def variant_seed(seed: int, video_id: str, variant: int) -> int:
    """63-bit seed of augmented variant ``variant`` of video ``video_id`` in a run with
    ``seed`` (stable across runs and machines: SHA-256 of the three)."""
    h = hashlib.sha256(f"{seed}:{video_id}:{variant}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _cell_boxes(label_img: np.ndarray) -> dict[int, tuple[float, float, float, float]]:
    """``{cell id: (x0, y0, x1, y1)}`` bounding boxes in frame pixels (inclusive)."""
    out = {}
    for i, sl in enumerate(ndi.find_objects(label_img), start=1):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
    return out


def training_recipe(cfg: FinetuneConfig, random_base: bool) -> FinetuneConfig:
    """The config with its learning-rate recipe resolved (``recipe`` becomes the one used).

    ``"finetune"`` (a pretrained base, e.g. Meta's ``sam2.1_hiera_*.pt``): unchanged; the
    encoder of ``train_mode="full"`` gets ``lr / 10`` unless ``encoder_lr`` is given, so
    pretrained features move gently. ``"scratch"`` (``train_mode="full"`` from random
    weights, e.g. the small SAM2 of :mod:`calseg.segment.pretrain`): nothing is pretrained,
    so every weight -- encoder, neck, ``conv_s0``/``conv_s1``, ``no_mem_embed``, prompt
    encoder and decoder -- gets ``scratch_lr``, a linear warm-up over
    ``scratch_warmup_fraction`` of the steps (at least 10; Adam's early steps are noisy on
    untrained transformers, Goyal et al. 2017 / the SAM2 recipe's warm-up) and a cosine decay
    to ``scratch_min_lr_ratio``. ``"auto"`` picks scratch for a random-weight base in full
    mode, else finetune.
    """
    recipe = cfg.recipe
    if recipe == "auto":
        recipe = "scratch" if (cfg.train_mode == "full" and random_base) else "finetune"
    if recipe == "finetune":
        return cfg.model_copy(update={"recipe": "finetune"})
    return cfg.model_copy(
        update={
            "recipe": "scratch",
            "lr": cfg.scratch_lr,
            "encoder_lr": cfg.encoder_lr or cfg.scratch_lr,
            "warmup_steps": max(10, int(round(cfg.scratch_warmup_fraction * cfg.steps))),
            "min_lr_ratio": cfg.scratch_min_lr_ratio,
        }
    )


DECODER_VS_DISC_RECIPE: dict[str, object] = {
    "image_size": 512,
    "mask_prior": "residual",
    "prompt_point": "deep",
    "select_by": "prompted_iou",
    "steps": 1500,
    "val_every": 250,
}
"""Decoder-only training that beats the disc prior on held-out videos with a RANDOM frozen
encoder (issue 14 item 1): 128 px frames upsampled 4x to 512 px (encoder tokens of 4 frame px,
an S/4 mask grid of 1 frame px), the disc as a residual, training points near the cell centre
as validation and inference prompt, selection by validation prompted IoU. Chosen on the
seed-7 dataset of ``scripts/decoder_vs_disc.py`` (``sam2.1_hiera_t``: gain +0.013, 95 % CI
[+0.009, +0.017], 4 of 4 test videos) and confirmed unchanged on seed 11 (+0.015 [+0.009,
+0.020], 4 of 4); numbers and the settings that did not work in README.md."""


def decoder_vs_disc_config(**overrides: object) -> FinetuneConfig:
    """:class:`FinetuneConfig` of :data:`DECODER_VS_DISC_RECIPE` with ``overrides`` (any
    FinetuneConfig field) on top."""
    return FinetuneConfig(**{**DECODER_VS_DISC_RECIPE, **overrides})


def _frame_pool(
    items: list[tuple[int, int, int]], cfg: FinetuneConfig, rng
) -> list[tuple[int, int, int]]:
    """The cell prompts of ``cfg.frames_per_step`` random frames (lora/full), else all
    ``items`` (``(video, frame, cell id)`` triples)."""
    if cfg.frames_per_step is None or cfg.train_mode == "decoder" or not items:
        return items
    frames = sorted({(v, f) for v, f, _ in items})
    k = min(cfg.frames_per_step, len(frames))
    pick = {frames[int(i)] for i in rng.choice(len(frames), size=k, replace=False)}
    return [it for it in items if (it[0], it[1]) in pick]


def _train_modules(model, cfg: FinetuneConfig) -> None:
    """Put the modules being trained in train mode: prompt encoder and mask decoder, and
    for ``train_mode="full"`` the image encoder too (the rest stays in eval mode)."""
    model.sam_prompt_encoder.train()
    model.sam_mask_decoder.train()
    if cfg.train_mode == "full":
        model.image_encoder.train()


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    prog = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def _sample_batch(
    videos: list[_Video], items: list[tuple[int, int, int]], cfg: FinetuneConfig, rng
) -> tuple[list[tuple[int, int, int]], np.ndarray, np.ndarray]:
    """Sample prompts: ``(items (video, frame, id; id 0 = background), coords (B,N,2) frame px,
    labels (B,N))``. Cell prompts are points, boxes or both, drawn by ``cfg.prompt_mix``
    (box corners first with SAM labels 2/3, as ``SAM2ImagePredictor`` encodes boxes)."""
    chosen: list[tuple[int, int, int]] = []
    pos: list[tuple[float, float]] = []
    negs: list[list[tuple[float, float]]] = []
    boxes: list[tuple[float, float, float, float] | None] = []
    kinds = sorted(cfg.prompt_mix)
    weights = np.array([cfg.prompt_mix[k] for k in kinds], dtype=float)
    weights /= weights.sum()
    for _ in range(cfg.batch_size):
        if not items or rng.random() < cfg.background_prompt_fraction:
            v = int(rng.integers(len(videos)))
            f = int(rng.integers(len(videos[v].frames_idx)))
            lab = videos[v].labels[f]
            bg = np.flatnonzero(lab.ravel() == 0)
            if bg.size == 0:
                continue
            r, c = np.unravel_index(int(rng.choice(bg)), lab.shape)
            chosen.append((v, f, 0))
            pos.append((float(c), float(r)))
            negs.append([])
            boxes.append(None)
            continue
        kind = kinds[int(rng.choice(len(kinds), p=weights))]
        v, f, cid = items[int(rng.integers(len(items)))]
        pts = videos[v].eroded_points[f][cid]
        r, c = pts[int(rng.integers(len(pts)))]
        neg: list[tuple[float, float]] = []
        others = [k for k in videos[v].eroded_points[f] if k != cid]
        lab = videos[v].labels[f]
        for _k in range(cfg.n_negative_points):
            if others and rng.random() < 0.5:
                o = videos[v].eroded_points[f][others[int(rng.integers(len(others)))]]
                rr, cc = o[int(rng.integers(len(o)))]
            else:  # background ring: up to 6 px from the cell, outside every active cell
                rr, cc = _ring_point(lab, cid, videos[v].boxes[f][cid], rng)
                if rr < 0:
                    continue
            neg.append((float(cc), float(rr)))
        box = None
        if kind != "point":
            x0, y0, x1, y1 = videos[v].boxes[f][cid]
            jx = cfg.box_jitter * (x1 - x0 + 1)
            jy = cfg.box_jitter * (y1 - y0 + 1)
            d = rng.uniform(-1, 1, 4) * np.array([jx, jy, jx, jy])
            h, w = lab.shape
            box = (
                float(np.clip(x0 + d[0], 0, w - 1)),
                float(np.clip(y0 + d[1], 0, h - 1)),
                float(np.clip(x1 + d[2], 0, w - 1)),
                float(np.clip(y1 + d[3], 0, h - 1)),
            )
        chosen.append((v, f, cid))
        boxes.append(box)
        if kind == "box":
            pos.append(None)
            negs.append([])
        else:
            pos.append((float(c), float(r)))
            negs.append(neg)
    coords, labels = pack_prompts(pos, negs, boxes)
    return chosen, coords, labels


RING_PX = 6
"""Background negatives lie within this many px (dilation steps) of the prompted cell."""


def _ring_point(
    lab: np.ndarray, cid: int, box: tuple[float, float, float, float], rng
) -> tuple[int, int]:
    """A random background pixel within :data:`RING_PX` dilation steps of cell ``cid`` in the
    label image ``lab`` (``(-1, -1)`` when there is none); ``box``: the cell's inclusive
    ``(x0, y0, x1, y1)``. Dilates a crop around the cell, not the whole frame (the same
    pixels: the ring cannot reach beyond RING_PX of the box)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    r0, c0 = max(y0 - RING_PX, 0), max(x0 - RING_PX, 0)
    sub = lab[r0 : y1 + 1 + RING_PX, c0 : x1 + 1 + RING_PX]
    ring = ndi.binary_dilation(sub == cid, iterations=RING_PX) & (sub == 0)
    idx = np.flatnonzero(ring.ravel())
    if idx.size == 0:
        return -1, -1
    r, c = np.unravel_index(int(rng.choice(idx)), sub.shape)
    return int(r + r0), int(c + c0)


def _losses(logits, iou_pred, obj_logits, target, is_obj, cfg: FinetuneConfig) -> dict:
    """Per-batch losses. ``logits`` (B,C,S,S), ``iou_pred`` (B,C), ``obj_logits`` (B,1),
    ``target`` (B,1,S,S) float {0,1}, ``is_obj`` (B,) float {0,1}."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    t = target.expand_as(logits)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = cfg.focal_alpha * t + (1 - cfg.focal_alpha) * (1 - t)
    focal = (alpha_t * ce * (1 - p_t) ** cfg.focal_gamma).flatten(2).mean(-1)  # (B,C)
    inter = (p * t).flatten(2).sum(-1)
    sm = cfg.dice_smooth
    dice = 1 - (2 * inter + sm) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + sm)  # (B,C)
    per_mask = cfg.focal_weight * focal + cfg.dice_weight * dice
    best = per_mask.argmin(dim=1)
    ar = torch.arange(len(best), device=logits.device)
    # mask loss on cell prompts only (SAM2's training loss: masks of prompts whose target
    # object is absent are not supervised, only the object score is); background prompts
    # teach "no object" through the object-score BCE
    n_obj = is_obj.sum()
    mask_loss = (per_mask[ar, best] * is_obj).sum() / n_obj.clamp(min=1)
    with torch.no_grad():
        hard = logits > 0
        tb = t >= 0.5
        i_ = (hard & tb).flatten(2).sum(-1).float()
        u_ = (hard | tb).flatten(2).sum(-1).float()
        true_iou = torch.where(u_ > 0, i_ / u_.clamp(min=1), torch.ones_like(u_))
    w = is_obj[:, None].expand_as(true_iou)
    iou_mse = ((iou_pred.float() - true_iou) ** 2 * w).sum() / w.sum().clamp(min=1)
    obj = F.binary_cross_entropy_with_logits(obj_logits.float()[:, 0], is_obj)
    total = mask_loss + cfg.iou_weight * iou_mse + cfg.object_weight * obj
    with torch.no_grad():  # collapse diagnostics (cell prompts only)
        on = is_obj > 0
        chosen = logits[ar, best]  # (B, S, S)
        stats = _mask_stats(
            chosen[on], tb[ar, best][on], obj_logits.float()[on, 0], iou_pred.float()[ar, best][on]
        )
    return {
        "loss": total,
        "focal": focal[ar, best].mean(),
        "dice": dice[ar, best].mean(),
        "iou_mse": iou_mse,
        "object_bce": obj,
        "train_iou": (true_iou[ar, best] * is_obj).sum() / n_obj.clamp(min=1),
        **stats,
    }


def _mask_stats(logits, target, obj_logits, iou_pred) -> dict:
    """Collapse diagnostics of cell prompts, as 0-d tensors (NaN for an empty batch):
    ``mask_area`` / ``target_area`` (px of logit > 0 / of the target, on the logits' grid),
    ``logit_max`` (max logit per mask), ``object_score`` (sigmoid of the object-score logit;
    below 0.5 SAM2 blanks the mask) and ``iou_pred`` (the IoU head), each a mean over prompts.
    ``logits`` (B, S, S) float, ``target`` (B, S, S) bool, ``obj_logits`` / ``iou_pred`` (B,).
    Empty dict for a batch without cell prompts.
    """
    import torch

    if logits.shape[0] == 0:
        return {}
    return {
        "mask_area": (logits > 0).flatten(1).sum(1).float().mean(),
        "target_area": target.flatten(1).sum(1).float().mean(),
        "logit_max": logits.flatten(1).amax(1).mean(),
        "object_score": torch.sigmoid(obj_logits).mean(),
        "iou_pred": iou_pred.mean(),
    }


def mean_cell_radius(videos: list[_Video]) -> float:
    """Radius in frame px of a disc with the mean cell area over every labelled cell of
    ``videos``' embedded frames (``sqrt(mean area / pi)``; 0.0 without any cell)."""
    areas = [np.bincount(lab.ravel())[1:] for vid in videos for lab in vid.labels if lab.any()]
    a = np.concatenate(areas) if areas else np.zeros(0)
    a = a[a > 0]
    return float(np.sqrt(a.mean() / np.pi)) if a.size else 0.0


def mean_cell_radius_model(videos: list[_Video]) -> float:
    """:func:`mean_cell_radius` in model px (each cell's area scaled by its video's
    ``geometry.scale`` squared)."""
    areas = [
        np.bincount(lab.ravel())[1:] * vid.geometry.scale**2
        for vid in videos
        for lab in vid.labels
        if lab.any()
    ]
    a = np.concatenate(areas) if areas else np.zeros(0)
    a = a[a > 0]
    return float(np.sqrt(a.mean() / np.pi)) if a.size else 0.0


def _disc(shape: tuple[int, int], xy: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disc of ``radius`` px centred on the point ``xy = (x, y)`` (frame px)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - xy[0]) ** 2 + (yy - xy[1]) ** 2 <= radius**2


def validate(
    loaded: LoadedSAM2,
    videos: list[_Video],
    cfg: FinetuneConfig,
    *,
    disc_radius: float | None = None,
    keep_prompt_ious: bool = False,
) -> dict:
    """Prompted IoU on validation videos (see module docstring). Returns
    ``{"val_mean_iou", "per_video": {id: iou}, "n_prompts"}`` and collapse diagnostics, means
    over prompts: ``val_mask_area`` / ``val_target_area`` (frame px of the mask / of the cell),
    and for the model only ``val_logit_max`` (max low-res logit), ``val_object_score``
    (sigmoid of the object-score logit) and ``val_iou_pred`` (the IoU head).

    ``disc_radius`` (frame px): score the DISC PRIOR instead of the model -- each prompt's
    mask is a disc of that radius at its positive point, no image used (the reference any
    trained decoder must beat; same prompts, same scoring).

    ``keep_prompt_ious``: also return ``"prompt_ious": {video id: [IoU per prompt]}``, the
    prompts in a fixed order (frame, then cell id), so two calls on the same videos pair up.
    """
    import torch

    model = loaded.model
    device = next(model.parameters()).device
    per_video: dict[str, float] = {}
    prompt_ious: dict[str, list[float]] = {}
    n_total = 0
    stats: dict[str, list[float]] = {
        k: []
        for k in (
            "val_mask_area",
            "val_target_area",
            "val_logit_max",
            "val_object_score",
            "val_iou_pred",
        )
    }
    model.eval()
    for vid in videos:
        ious: list[float] = []
        for f in range(len(vid.frames_idx)):
            lab = vid.labels[f]
            ids = [i for i in np.unique(lab) if i][: cfg.val_max_prompts_per_frame]
            if not ids:
                continue
            pos, negs = [], []
            for i in ids:
                m = lab == i
                dist = ndi.distance_transform_edt(m)
                r, c = np.unravel_index(int(np.argmax(dist)), m.shape)
                pos.append((float(c), float(r)))
            xy = np.array(pos)
            for k in range(len(ids)):
                d = ((xy - xy[k]) ** 2).sum(1)
                d[k] = np.inf
                order = [j for j in np.argsort(d)[: cfg.n_negative_points] if np.isfinite(d[j])]
                negs.append([pos[j] for j in order])
            if disc_radius is not None:
                masks = np.stack([_disc(lab.shape, xy, disc_radius) for xy in pos])
            else:
                coords, plabels = pack_points(pos, negs)
                coords = vid.geometry.to_model_points(coords)
                emb, high = vid.emb.get(f, device)
                with torch.no_grad():
                    low, iou, obj = run_decoder(
                        model,
                        emb,
                        high,
                        torch.from_numpy(coords).to(device),
                        torch.from_numpy(plabels).to(device),
                        multimask_output=cfg.multimask_output,
                        prior_radius=loaded.info.prior_radius,
                        prior_mode=loaded.info.prior_mode,
                    )
                    ar = torch.arange(len(ids), device=device)
                    pick = iou.argmax(1)
                    best = low[ar, pick][:, None].float()
                    masks = (logits_to_frame(best, vid.geometry)[:, 0] > 0).cpu().numpy()
                    stats["val_logit_max"] += best.flatten(1).amax(1).tolist()
                    stats["val_object_score"] += torch.sigmoid(obj.float()[:, 0]).tolist()
                    stats["val_iou_pred"] += iou.float()[ar, pick].tolist()
            for k, i in enumerate(ids):
                g = lab == i
                inter = np.count_nonzero(masks[k] & g)
                union = np.count_nonzero(masks[k] | g)
                ious.append(inter / union if union else 1.0)
                stats["val_mask_area"].append(float(np.count_nonzero(masks[k])))
                stats["val_target_area"].append(float(np.count_nonzero(g)))
        if ious:
            per_video[vid.id] = float(np.mean(ious))
            n_total += len(ious)
            prompt_ious[vid.id] = ious
    mean = float(np.mean(list(per_video.values()))) if per_video else None
    out = {"val_mean_iou": mean, "per_video": per_video, "n_prompts": n_total}
    if keep_prompt_ious:
        out["prompt_ious"] = prompt_ious
    out.update({k: float(np.mean(v)) for k, v in stats.items() if v})
    return out


def _selection_score(res: dict, cfg: FinetuneConfig) -> list[float] | None:
    """The value best.pt maximises: ``[val_f1, val_fg_iou]`` (compared in that order) for
    ``select_by="f1"``, ``[val_mean_iou]`` for ``"prompted_iou"``; None when not scored. A
    list, not a tuple, so that it round-trips through JSON (history, resume)."""
    if cfg.select_by == "f1":
        if res.get("val_f1") is None:
            return None
        return [float(res["val_f1"]), float(res.get("val_fg_iou") or 0.0)]
    v = res.get("val_mean_iou")
    return None if v is None else [float(v)]


def _fmt_score(score: list[float] | None) -> str:
    return "none" if not score else f"{score[0]:.4f}"


def validate_inference(
    loaded: LoadedSAM2,
    videos: list[_Video],
    activities: list,
    cfg: FinetuneConfig,
) -> dict:
    """Score what inference does on the validation videos' embedded frames.

    Per frame: activity prompts (:func:`calseg.segment.prompts.frame_prompts` of the video's
    :class:`~calseg.segment.prompts.Activity`, computed on the whole recording as ``infer``
    does), :func:`calseg.segment.decode.decode_frame_prompts` and
    :func:`calseg.segment.decode.assemble_frame` with :func:`inference_config`; the label stack
    of those frames is scored against the ground truth with
    :func:`calseg.segment.evaluate.score_labels` (instance F1 at IoU 0.5 per frame, foreground
    IoU). Returns ``{"val_f1", "val_fg_iou"}`` (means over videos) and ``"per_video_f1"``.
    """
    from calseg.segment.decode import assemble_frame, decode_frame_prompts
    from calseg.segment.evaluate import score_labels
    from calseg.segment.prompts import frame_prompts

    icfg = inference_config(cfg)
    f1s: dict[str, float] = {}
    ious: list[float] = []
    loaded.model.eval()
    for vid, act in zip(videos, activities, strict=True):
        pred = np.zeros_like(vid.labels)
        for j, t in enumerate(vid.frames_idx):
            prompts = frame_prompts(
                act,
                int(t),
                n_negative=icfg.n_negative_points,
                max_prompts=icfg.max_prompts_per_frame,
            )
            if not prompts:
                continue
            logits, scores, objs = decode_frame_prompts(
                loaded, vid.emb, j, vid.geometry, prompts, icfg, as_crops=True
            )
            pred[j], _ = assemble_frame(logits, scores, objs, prompts, icfg, shape=pred.shape[1:])
        sc = score_labels(pred, vid.labels)
        f1s[vid.id] = float(sc["f1"])
        ious.append(float(sc["iou"]))
    return {
        "val_f1": float(np.mean(list(f1s.values()))) if f1s else None,
        "val_fg_iou": float(np.mean(ious)) if ious else None,
        "per_video_f1": f1s,
    }


def inference_config(cfg: FinetuneConfig):  # noqa: ANN201 - InferenceConfig (lazy import)
    """The :class:`calseg.segment.decode.InferenceConfig` validation runs inference with:
    SAM2, this run's model, image size, percentiles, negatives and mask output, every other
    setting (activity, thresholds, post-processing) at the inference defaults."""
    from calseg.segment.decode import InferenceConfig

    return InferenceConfig(
        method="sam2",
        model=cfg.model,
        image_size=cfg.image_size,
        device=cfg.device,
        low_percentile=cfg.low_percentile,
        high_percentile=cfg.high_percentile,
        n_negative_points=cfg.n_negative_points,
        multimask_output=cfg.multimask_output,
    )


def heldout_prompted_iou(
    checkpoint: Path | str,
    dataset: Path | str,
    *,
    split: str = "test",
    frames_per_video: int = 8,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> dict:
    """Prompted IoU of a fine-tuned checkpoint and of the disc prior on held-out videos, with
    the same code (:func:`validate`), frames and prompts: the table issue 14 asks for.

    The disc's radius is the one recorded at training (``disc_prior_radius_px``: the training
    cells' :func:`mean_cell_radius`, frame px). Returns ``{"decoder", "disc prior"}`` (means
    over videos), ``"gain"`` (decoder minus disc prior) with ``"gain_ci95"`` (a bootstrap 95 %
    CI that resamples the paired per-prompt differences within each video,
    :func:`calseg.analysis.metrics.stratified_bootstrap_ci`; it covers prompt sampling, not
    a new set of videos), ``"videos_improved"`` (videos where the decoder scores higher),
    ``"per_video": {id: {"decoder", "disc prior"}}``, ``"n_prompts"``, ``"radius_px"``,
    ``"videos"``.

    Raises:
        DatasetError: no video in ``split``; ValueError: not a fine-tuned checkpoint.
    """
    obj = _torch_load(Path(checkpoint))  # tensors and plain data only: never a file's code
    meta = obj.get("metadata", {})
    if "finetune_config" not in meta:
        raise ValueError(f"{checkpoint} is not a CalSeg fine-tuned checkpoint")
    cfg = FinetuneConfig(
        **dict(
            meta["finetune_config"],
            val_frames_per_video=frames_per_video,
            device=device,
            resume=False,
        )
    )
    radius = meta.get("disc_prior_radius_px")
    loaded = load_sam2(cfg.model, checkpoint, image_size=cfg.image_size, device=device)
    entries = split_videos(dataset, split)
    if not entries:
        raise DatasetError(f"dataset {dataset} has no video in the {split!r} split")
    # frames are embedded once by the checkpoint's own encoder (a full / LoRA checkpoint
    # carries a trained encoder; the cache key holds its hash), as decoder mode prepares them
    prep = cfg.model_copy(update={"train_mode": "decoder"})
    videos = [
        _prepare_video(loaded, v, frames_per_video, prep, cache_dir, null_progress) for v in entries
    ]
    if radius is None:  # checkpoints written before the field: the held-out cells' own
        radius = mean_cell_radius(videos)
    dec = validate(loaded, videos, cfg, keep_prompt_ious=True)
    disc = validate(loaded, videos, cfg, disc_radius=radius, keep_prompt_ious=True)
    diffs = [
        np.asarray(dec["prompt_ious"][k]) - np.asarray(disc["prompt_ious"][k])
        for k in dec["prompt_ious"]
    ]
    gain = None
    if dec["val_mean_iou"] is not None and disc["val_mean_iou"] is not None:
        gain = dec["val_mean_iou"] - disc["val_mean_iou"]
    return {
        "decoder": dec["val_mean_iou"],
        "disc prior": disc["val_mean_iou"],
        "gain": gain,
        "gain_ci95": stratified_bootstrap_ci(diffs),
        "videos_improved": sum(int(d.mean() > 0) for d in diffs),
        "per_video": {
            k: {"decoder": dec["per_video"][k], "disc prior": disc["per_video"].get(k)}
            for k in dec["per_video"]
        },
        "n_prompts": dec["n_prompts"],
        "radius_px": float(radius),
        "videos": [v.id for v in videos],
    }


def _features_for(
    model, videos: list[_Video], chosen: list[tuple[int, int, int]], cfg: FinetuneConfig, device
) -> tuple:
    """Image features of each prompt's frame: ``(image_embed (B,256,S/16,S/16), [feat_s0,
    feat_s1])``. Cached embeddings for ``train_mode="decoder"``; otherwise the batch's
    distinct frames are encoded now, with gradients (LoRA / full fine-tuning)."""
    import torch

    if cfg.train_mode == "decoder":
        emb = torch.stack([videos[v].emb.image_embed[f] for v, f, _ in chosen])
        s0 = torch.stack([videos[v].emb.feat_s0[f] for v, f, _ in chosen])
        s1 = torch.stack([videos[v].emb.feat_s1[f] for v, f, _ in chosen])
        return emb.to(device, torch.float32), [
            s0.to(device, torch.float32),
            s1.to(device, torch.float32),
        ]
    keys = sorted({(v, f) for v, f, _ in chosen})
    pos = {k: i for i, k in enumerate(keys)}
    x = torch.stack([videos[v].x[f] for v, f in keys]).to(device, torch.float32)
    s0, s1, emb = encoder_features(model, x)
    sel = torch.tensor([pos[(v, f)] for v, f, _ in chosen], device=device)
    return emb[sel], [s0[sel], s1[sel]]


def _batch_losses(
    model,
    videos: list[_Video],
    chosen: list[tuple[int, int, int]],
    coords: np.ndarray,
    plabels: np.ndarray,
    cfg: FinetuneConfig,
    device,
    use_amp: bool,
    prior_radius: float | None = None,
) -> dict:
    """Forward pass and losses (:func:`_losses`) of one micro-batch of sampled prompts
    (frame-pixel ``coords`` (B, N, 2), ``plabels`` (B, N)); autocast float16 when
    ``use_amp``."""
    import torch

    mcoords = np.concatenate(
        [videos[c[0]].geometry.to_model_points(coords[k : k + 1]) for k, c in enumerate(chosen)]
    )
    target = np.stack([(videos[v].labels_model[f] == cid) & (cid > 0) for v, f, cid in chosen])
    target_t = torch.from_numpy(target[:, None].astype(np.float32)).to(device)
    is_obj = torch.tensor([float(c[2] > 0) for c in chosen], device=device)
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        emb, high = _features_for(model, videos, chosen, cfg, device)
        low, iou, obj = run_decoder(
            model,
            emb,
            high,
            torch.from_numpy(mcoords).to(device),
            torch.from_numpy(plabels).to(device),
            multimask_output=cfg.multimask_output,
            prior_radius=prior_radius,
            prior_mode=cfg.mask_prior,
        )
    if cfg.loss_resolution == "full":
        logits = torch.nn.functional.interpolate(
            low.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
        )
    else:  # decoder resolution S/4; target area-averaged to the same grid (soft)
        logits = low.float()
        target_t = torch.nn.functional.adaptive_avg_pool2d(target_t, low.shape[-2:])
    return _losses(logits, iou, obj, target_t, is_obj, cfg)


def _unscale_and_clip(params: list, opt, scaler, max_grad_norm: float) -> float:
    """Unscale the accumulated (loss-scaled) gradients, THEN clip their global L2 norm to
    ``max_grad_norm`` (clipping scaled gradients would clip at ``scale x max_grad_norm``, the
    source code's mistake, DESIGN.md section 5). Returns the unscaled norm before clipping
    (``inf``/``nan`` when a gradient overflowed). A no-op unscale when the scaler is disabled.
    """
    import torch

    scaler.unscale_(opt)
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))


def _trainable_groups(loaded: LoadedSAM2, cfg: FinetuneConfig) -> tuple[list, list]:
    """``(decoder params, encoder params)`` to train; applies LoRA wrappers for ``"lora"``.

    Decoder params: prompt encoder + mask decoder without ``conv_s0``/``conv_s1``
    (:func:`calseg.segment.model.trainable_parameter_names`). Encoder params: none for
    ``"decoder"``, the LoRA factors for ``"lora"``, and for ``"full"`` every weight that
    makes the image features: image encoder, ``conv_s0``, ``conv_s1``, ``no_mem_embed``."""
    model = loaded.model
    names = set(trainable_parameter_names(model))
    dec = [p for n, p in model.named_parameters() if n in names]
    enc: list = []
    if cfg.train_mode == "lora":
        from calseg.segment.lora import apply_lora, lora_parameters

        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        enc = list(lora_parameters(model).values())
    elif cfg.train_mode == "full":
        # everything image segmentation uses: the encoder (trunk + neck), the decoder's
        # high-resolution projections conv_s0/conv_s1 and no_mem_embed (added to the
        # lowest-resolution features, calseg.segment.embeddings.encoder_features)
        dec_ids = {id(p) for p in dec}
        enc = list(model.image_encoder.parameters()) + [model.no_mem_embed]
        enc += [
            p
            for m in (model.sam_mask_decoder.conv_s0, model.sam_mask_decoder.conv_s1)
            for p in m.parameters()
            if id(p) not in dec_ids
        ]
    return dec, enc


def _encoder_state(loaded: LoadedSAM2, cfg: FinetuneConfig) -> dict | None:
    """What a checkpoint stores of a trained encoder (None for ``"decoder"``)."""
    if cfg.train_mode == "lora":
        from calseg.segment.lora import lora_state_dict

        return {
            "kind": "lora",
            "state": lora_state_dict(loaded.model),
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
        }
    if cfg.train_mode == "full":  # conv_s0/conv_s1 travel with the mask decoder's state
        sd = loaded.model.image_encoder.state_dict()
        return {
            "kind": "full",
            "state": {k: v.detach().cpu() for k, v in sd.items()},
            "no_mem_embed": loaded.model.no_mem_embed.detach().cpu().clone(),
        }
    return None


def _restore_encoder(loaded: LoadedSAM2, enc: dict | None) -> None:
    """Put a resumed run's encoder state back (LoRA factors unmerged, or full weights)."""
    import torch

    if not enc:
        return
    if enc["kind"] == "lora":
        from calseg.segment.lora import lora_parameters

        params = lora_parameters(loaded.model)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(enc["state"][n])
    else:
        loaded.model.image_encoder.load_state_dict(enc["state"])
        if "no_mem_embed" in enc:
            with torch.no_grad():
                loaded.model.no_mem_embed.copy_(enc["no_mem_embed"])


PromptSampler = Callable[
    [list[_Video], list[tuple[int, int, int]], FinetuneConfig, np.random.Generator],
    tuple[list[tuple[int, int, int]], np.ndarray, np.ndarray],
]
"""Prompt-sampling hook of :class:`Trainer`: ``(videos, pool, config, rng) -> (chosen, coords,
labels)`` -- ``pool`` the ``(video, frame, cell id)`` items to draw from, ``chosen`` the drawn
items (cell id 0: a background prompt), ``coords`` ``(B, N, 2)`` float frame px (x, y),
``labels`` ``(B, N)`` int SAM point labels (1 positive, 0 negative, 2/3 box corners). Default
:func:`_sample_batch`; it must draw from ``rng`` only, so a seed gives the same run."""

LossFn = Callable[..., dict]
"""Loss hook of :class:`Trainer`: called as ``loss_fn(model, videos, chosen, coords, labels,
config, device, use_amp, prior_radius)`` on one micro-batch; returns a dict of 0-d tensors with
at least ``"loss"`` (the value back-propagated; every entry is logged per step). Default
:func:`_batch_losses` (focal + Dice + IoU MSE + object BCE, :func:`_losses`)."""


class Trainer:
    """SAM2 training as an object (issue 16 item 3, in the style of micro-sam's ``SamTrainer``
    and sam2's ``training.trainer.Trainer``): :meth:`setup`, :meth:`resume`, :meth:`step`,
    :meth:`validate` and :meth:`checkpoint`, driven by :meth:`fit`; :func:`finetune` is
    ``Trainer(...).fit()``.

    Hooks: ``loss_fn`` (:data:`LossFn`, default :func:`_batch_losses`) and ``prompt_sampler``
    (:data:`PromptSampler`, default :func:`_sample_batch`). The config is read by concern
    through :meth:`FinetuneConfig.group` (``"model"``, ``"data"``, ``"prompts"``, ``"loss"``,
    ``"optimiser"``, ``"validation"``, ``"checkpointing"``: :data:`CONFIG_GROUPS`); the job's
    parameters stay one flat set so that the API, the CLI and the page use one name each.

    State after :meth:`setup`: ``loaded`` (:class:`~calseg.segment.model.LoadedSAM2`),
    ``videos`` / ``vals`` (training videos incl. augmented variants / validation videos),
    ``optimiser``, ``scheduler``, ``scaler``, ``global_step`` (optimiser steps done),
    ``history`` (the entries :func:`finetune` documents), ``best`` (``{"step", "score",
    "init"}`` of the selection score), ``best_val_iou`` (prompted IoU, a diagnostic),
    ``warnings`` and ``timings`` (s).

    A step-by-step run (``setup(); resume(); validate(); while ...: step()``) draws the same
    random numbers as :meth:`fit`, so a seed gives the same weights either way
    (``tests/test_segment_trainer.py``).
    """

    def __init__(
        self,
        dataset: Path,
        out_dir: Path,
        config: FinetuneConfig,
        *,
        base_checkpoint: Path | None = None,
        cache_dir: Path | None = None,
        progress: ProgressFn | None = None,
        on_history: Callable[[dict], None] | None = None,
        loss_fn: LossFn | None = None,
        prompt_sampler: PromptSampler | None = None,
    ) -> None:
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.config = config
        self.base_checkpoint = base_checkpoint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out_dir / "embeddings"
        self.progress = progress or null_progress
        self.on_history = on_history
        self.loss_fn: LossFn = loss_fn or _batch_losses
        self.prompt_sampler: PromptSampler = prompt_sampler or _sample_batch
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self.history: list[dict] = []
        self.best_val_iou: float | None = None
        self.best: dict = {"step": None, "score": None, "init": None}
        self.global_step = 0
        self.start_step = 0
        self.best_path = self.out_dir / "best.pt"
        self.last_path = self.out_dir / "last.pt"
        self._set_up = False
        self._bad_steps = 0
        self.prior_iou: float | None = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Load the base SAM2 (and the recipe it implies), embed the training and validation
        frames, build the optimiser, scheduler and AMP scaler, and the checkpoint metadata.

        Raises:
            DatasetError: no training video.
        """
        import torch

        self.t_start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        train_v = split_videos(self.dataset, "train")
        val_v = split_videos(self.dataset, "val")
        if not train_v:
            raise DatasetError(f"dataset {self.dataset} has no video in the 'train' split")
        if not val_v:
            self.warnings.append(
                "no 'val' split: the checkpoint is the last step, not the best by val IoU"
            )
        cfg = self.config
        loaded = load_sam2(
            cfg.model, self.base_checkpoint, image_size=cfg.image_size, device=cfg.device
        )
        cfg = self.config = training_recipe(cfg, loaded.info.random_weights)
        if loaded.info.random_weights and cfg.recipe != "scratch":
            self.warnings.append(
                "base SAM2 has RANDOM weights (no checkpoint): the frozen encoder's features are "
                "random, so fine-tuned masks stay poor"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._embed(train_v, val_v)
        self._build_optimiser()
        self._metadata()
        self._set_up = True

    def _embed(self, train_v: list, val_v: list) -> None:
        cfg, progress, cache_dir = self.config, self.progress, self.cache_dir
        data = cfg.group("data")
        progress(0.0, "embed", "embedding training frames")
        n_all = len(train_v) + len(val_v)
        videos: list[_Video] = []
        n_var = data["augment_variants"] + 1
        for k, v in enumerate(train_v):
            for variant in range(n_var):
                a = 0.3 * (k + variant / n_var) / n_all
                b = 0.3 * (k + (variant + 1) / n_var) / n_all
                videos.append(
                    _prepare_video(
                        self.loaded,
                        v,
                        data["frames_per_video"],
                        cfg,
                        cache_dir,
                        scaled(progress, a, b),
                        variant=variant,
                    )
                )
        vals: list[_Video] = []
        for k, v in enumerate(val_v):
            j = len(train_v) + k
            vals.append(
                _prepare_video(
                    self.loaded,
                    v,
                    cfg.group("validation")["val_frames_per_video"],
                    cfg,
                    cache_dir,
                    scaled(progress, 0.3 * j / n_all, 0.3 * (j + 1) / n_all),
                )
            )
        self.activities = []  # what inference prompts from: activity of each val recording
        if cfg.group("checkpointing")["select_by"] == "f1":
            from calseg.segment.prompts import compute_activity

            icfg = inference_config(cfg)
            self.activities = []
            for v in val_v:  # with the recording's own cell-size estimate, as infer does
                image = np.asarray(v.load_image())
                params = icfg.activity_params(image, v.frame_interval_s)
                self.activities.append(compute_activity(image, params))
        self.timings["embed_s"] = time.perf_counter() - self.t_start
        self.videos, self.vals = videos, vals
        self.items = [
            (vi, f, cid)
            for vi, vid in enumerate(videos)
            for f in range(len(vid.frames_idx))
            for cid in vid.eroded_points[f]
        ]
        if not self.items:
            self.warnings.append(
                "no active cell in the sampled training frames: only background prompts"
            )

    def _build_optimiser(self) -> None:
        import torch

        cfg, loaded = self.config, self.loaded
        opt_cfg = cfg.group("optimiser")
        if cfg.mask_prior != "none":  # the model now includes the disc prior
            loaded.info.prior_radius = mean_cell_radius_model(self.videos)
            loaded.info.prior_radius_frame_px = mean_cell_radius(self.videos)
            loaded.info.prior_mode = cfg.mask_prior
        self.base_encoder_sha = encoder_hash(loaded)  # of the BASE encoder, before any change
        dec_params, enc_params = _trainable_groups(loaded, cfg)
        self.params = dec_params + enc_params
        for p in self.params:
            p.requires_grad_(True)
        groups = [{"params": dec_params, "lr": opt_cfg["lr"]}]
        if enc_params:
            enc_lr = opt_cfg["encoder_lr"] or (
                opt_cfg["lr"] if cfg.train_mode == "lora" else opt_cfg["lr"] / 10
            )
            groups.append({"params": enc_params, "lr": enc_lr})
            n_enc = sum(p.numel() for p in enc_params)
            if cfg.train_mode == "full" and self.device.type != "cuda":
                self.warnings.append(
                    "train_mode=full on a CPU: every step back-propagates through the whole "
                    "image encoder; meant for a GPU (use 'lora' or 'decoder' here)"
                )
            self.warnings.append(
                f"train_mode={cfg.train_mode}: the encoder is trained ({n_enc} parameters), so "
                "embeddings are recomputed every step (no cache)"
            )
        self.optimiser = torch.optim.AdamW(groups, weight_decay=opt_cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, lambda s: _lr_factor(s, cfg)
        )
        self.use_amp = bool(opt_cfg["amp"] and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _metadata(self) -> None:
        cfg, loaded, dataset = self.config, self.loaded, self.dataset
        self.fingerprint = cfg.fingerprint()
        manifest = Path(dataset) / "manifest.json" if Path(dataset).is_dir() else Path(dataset)
        self.meta_base = {
            "finetune_config": cfg.model_dump(),
            "train_mode": cfg.train_mode,
            "dataset": str(dataset),
            "dataset_manifest": str(manifest.resolve()),
            "dataset_manifest_sha256": file_sha256(manifest),
            "train_videos": [v.id for v in self.videos],
            "val_videos": [v.id for v in self.vals],
            "fingerprint": self.fingerprint,
            "encoder_sha256": self.base_encoder_sha,
            "parent_checkpoint": (
                str(self.base_checkpoint) if self.base_checkpoint else loaded.info.checkpoint
            ),
            "parent_checkpoint_sha256": loaded.info.checkpoint_sha256,
            "calseg_version": _calseg_version(),
            "mask_prior": {
                "mode": loaded.info.prior_mode,
                "radius_model_px": loaded.info.prior_radius,
                # the same disc in frame px (inference keeps it there:
                # calseg.segment.model.inference_prior_radius)
                "radius_frame_px": loaded.info.prior_radius_frame_px,
            },
            "disc_prior_radius_px": mean_cell_radius(self.videos),  # the reference row's disc
        }

    def _require_setup(self) -> None:
        if not self._set_up:
            raise RuntimeError("Trainer.setup() must run first")

    # --------------------------------------------------------------- resume
    def resume(self) -> bool:
        """Continue from ``last.pt`` when ``config.resume`` and it belongs to this run (same
        :meth:`FinetuneConfig.fingerprint`): weights, optimiser, scheduler, scaler, history,
        selection and the random stream (re-seeded from ``(seed, step)``). Returns whether it
        resumed; a ``last.pt`` of another run is left alone (a warning says so)."""

        self._require_setup()
        if not (self.config.group("checkpointing")["resume"] and self.last_path.exists()):
            return False
        state = _torch_load(self.last_path)  # tensors and plain data only
        if state.get("metadata", {}).get("fingerprint") != self.fingerprint or (
            "optimizer" not in state
        ):
            self.warnings.append(f"{self.last_path} belongs to a different run; starting afresh")
            return False
        model = self.model
        model.sam_prompt_encoder.load_state_dict(state["sam_prompt_encoder"])
        model.sam_mask_decoder.load_state_dict(state["sam_mask_decoder"])
        _restore_encoder(self.loaded, state.get("encoder"))
        self.optimiser.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_step = self.global_step = int(state["metadata"]["step"])
        self.history = list(state["metadata"].get("history", []))
        self.best_val_iou = state["metadata"].get("best_val_iou")
        self.best.update(state["metadata"].get("selection") or {})
        self.rng = np.random.default_rng([self.config.seed, self.start_step])
        self.warnings.append(f"resumed from {self.last_path} at step {self.start_step}")
        return True

    # -------------------------------------------------------------- history
    def add_history(self, entry: dict) -> None:
        """Append a history entry and hand it to ``on_history`` (whose errors are logged and
        ignored: a broken live-curve sink must not stop training)."""
        self.history.append(entry)
        if self.on_history is not None:
            try:
                self.on_history(entry)
            except Exception:
                log.exception("on_history callback failed for %s", entry.get("kind"))

    def _metrics_now(self, step: int, val_iou: float | None) -> dict:
        train = [h for h in self.history if h.get("kind") == "train"]
        recent = [h["loss"] for h in train[-10:]]
        return {
            "step": step,
            "val_mean_iou": val_iou,
            "best_val_iou": self.best_val_iou,
            "train_loss_last10_mean": float(np.mean(recent)) if recent else None,
            "train_iou_last10_mean": (
                float(np.mean([h["train_iou"] for h in train[-10:]])) if train else None
            ),
        }

    # ----------------------------------------------------------- checkpoint
    def checkpoint(self, which: Literal["best", "last"], **meta: object) -> Path:
        """Write ``best.pt`` (prompt encoder + mask decoder (+ trained encoder) weights and
        metadata) or ``last.pt`` (that + optimiser, scheduler and scaler state, for
        :meth:`resume`) at the current step; ``meta`` adds or overrides metadata fields.
        Returns the path."""
        self._require_setup()
        step = self.global_step
        enc = _encoder_state(self.loaded, self.config)
        if which == "last":
            md = dict(
                self.meta_base,
                step=step,
                history=self.history,
                best_val_iou=self.best_val_iou,
                selection=self.best,
                **meta,
            )
            extra = {
                "optimizer": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            save_finetuned_checkpoint(self.loaded, self.last_path, md, encoder=enc, extra=extra)
            return self.last_path
        md = dict(self.meta_base, step=step, **meta)
        save_finetuned_checkpoint(self.loaded, self.best_path, md, encoder=enc)
        return self.best_path

    # ------------------------------------------------------------- validate
    def disc_prior(self) -> float | None:
        """Prompted val IoU of a disc of the training cells' mean radius at each validation
        prompt (:func:`validate` with ``disc_radius``): the reference every step must beat.
        Added to the history (``kind="prior"``) on a fresh run. None without a val split."""
        self._require_setup()
        if not self.vals:
            return None
        disc_r = mean_cell_radius(self.videos)
        prior = validate(self.loaded, self.vals, self.config, disc_radius=disc_r)
        self.prior_iou = prior["val_mean_iou"]
        if self.start_step == 0:
            self.add_history(
                {
                    "kind": "prior",
                    "step": 0,
                    "name": "disc prior",
                    "radius_px": disc_r,
                    "val_mean_iou": self.prior_iou,
                    "per_video": prior["per_video"],
                    "n_prompts": prior["n_prompts"],
                }
            )
        return self.prior_iou

    def validate(self) -> dict:
        """Validate at the current step: prompted IoU (:func:`validate`) and, with
        ``select_by="f1"``, inference as ``infer`` runs it (:func:`validate_inference`);
        append the ``kind="val"`` history entry, write ``best.pt`` when the selection score
        improved and ``last.pt`` after step 0. Returns the entry."""
        self._require_setup()
        cfg, step = self.config, self.global_step
        if cfg.train_mode != "decoder":  # the encoder changed: embed val frames afresh
            self.model.eval()
            for vid in self.vals:
                vid.emb = encode_frames(
                    self.loaded, vid.x.float(), cache_dir=None, batch_size=cfg.encoder_batch_size
                )
        res = validate(self.loaded, self.vals, cfg)
        if self.activities:
            res.update(validate_inference(self.loaded, self.vals, self.activities, cfg))
        entry = {
            "kind": "val",
            "step": step,
            **res,
            "disc_prior_iou": self.prior_iou,
            "time_s": time.perf_counter() - self.t_start,
        }
        self.add_history(entry)
        v = res["val_mean_iou"]
        if v is not None and (self.best_val_iou is None or v > self.best_val_iou):
            self.best_val_iou = v
        score = _selection_score(res, cfg)
        best = self.best
        if step == 0 or best["init"] is None:
            best["init"] = score
        if score is not None and (best["score"] is None or score > best["score"]):
            best.update(step=step, score=score)
            self.checkpoint(
                "best",
                val_mean_iou=v,
                metrics=self._metrics_now(step, v),
                selection={"select_by": cfg.select_by, "step": step, "score": score},
            )
        if step > 0:
            self.checkpoint("last")  # resumable after every validation
        from calseg.fmt import fmt_num

        shown = f"val F1 {fmt_num(res.get('val_f1'), 3)}, " if self.activities else ""
        self.progress(
            0.3 + 0.7 * step / cfg.steps,
            "validate",
            f"step {step}: {shown}prompted val IoU {fmt_num(v, 3)}",
        )
        return entry

    # ----------------------------------------------------------------- step
    def train_mode(self) -> None:
        """Put the trained modules in train mode (:func:`_train_modules`)."""
        _train_modules(self.model, self.config)

    def step(self) -> dict:
        """One optimiser step: ``grad_accum`` micro-batches of prompts from ``prompt_sampler``,
        losses from ``loss_fn``, gradients unscaled and clipped to ``max_grad_norm``, AdamW and
        the LR schedule stepped once. A step with a non-finite loss or gradient norm is skipped
        (``kind="skipped"``; :class:`TrainingDivergedError` after ``max_nonfinite_steps`` in a
        row). Returns the history entry (``kind`` ``"train"`` or ``"skipped"``)."""
        import torch

        self._require_setup()
        cfg = self.config
        opt_cfg = cfg.group("optimiser")
        opt, scaler = self.optimiser, self.scaler
        step = self.global_step
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        finite = True
        for _micro in range(opt_cfg["grad_accum"]):
            pool = _frame_pool(self.items, cfg, self.rng)
            chosen, coords, plabels = self.prompt_sampler(self.videos, pool, cfg, self.rng)
            if not chosen:
                continue
            ls = self.loss_fn(
                self.model,
                self.videos,
                chosen,
                coords,
                plabels,
                cfg,
                self.device,
                self.use_amp,
                self.loaded.info.prior_radius,
            )
            if not torch.isfinite(ls["loss"]):
                finite = False
                break
            scaler.scale(ls["loss"] / opt_cfg["grad_accum"]).backward()
            for k, v in ls.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / opt_cfg["grad_accum"]
        grad_norm = float("nan")
        if finite and logs:
            grad_norm = _unscale_and_clip(self.params, opt, scaler, opt_cfg["max_grad_norm"])
            if not math.isfinite(grad_norm) and not self.use_amp:
                finite = False
        if not finite or not logs:
            self._bad_steps += 1
            opt.zero_grad(set_to_none=True)  # (no scaler.update(): nothing was unscaled)
            entry = {"kind": "skipped", "step": step, "reason": "non-finite"}
            self.add_history(entry)
            if self._bad_steps >= opt_cfg["max_nonfinite_steps"]:
                raise TrainingDivergedError(
                    f"{self._bad_steps} consecutive steps with non-finite loss/gradients at "
                    f"step {step}; lower lr or check the data"
                )
            self.global_step += 1
            self.scheduler.step()
            return entry
        self._bad_steps = 0
        scaler.step(opt)
        scaler.update()
        lr = opt.param_groups[0]["lr"]
        self.scheduler.step()  # once per optimiser step
        self.global_step += 1
        entry = {
            "kind": "train",
            "step": self.global_step,
            "lr": lr,
            "grad_norm": grad_norm,
            "time_s": time.perf_counter() - self.t_start,
            **{k: round(v, 6) for k, v in logs.items()},
        }
        self.add_history(entry)
        return entry

    # ------------------------------------------------------------------ fit
    def fit(self) -> FinetuneResult:
        """The whole run: :meth:`setup`, :meth:`resume`, the disc prior, validation at step 0,
        then :meth:`step` until ``steps`` (or ``time_limit_s``) with :meth:`validate` every
        ``val_every`` steps and at the end; writes ``best.pt``, ``last.pt`` and
        ``history.json``. Returns :class:`FinetuneResult`. After a :meth:`setup` by hand,
        ``fit`` neither sets up nor resumes again: call :meth:`resume` yourself first if a
        ``last.pt`` should be continued."""
        if not self._set_up:
            self.setup()
            self.resume()
        cfg = self.config
        progress = self.progress
        if self.vals:
            self.disc_prior()
        if self.vals and self.start_step == 0:
            self.validate()
        t_train = time.perf_counter()
        train_progress = scaled(progress, 0.3, 1.0)
        self.train_mode()
        while self.global_step < cfg.steps:
            limit = cfg.group("checkpointing")["time_limit_s"]
            if limit and time.perf_counter() - self.t_start > limit:
                self.warnings.append(f"time limit {limit} s reached at step {self.global_step}")
                break
            entry = self.step()
            if entry["kind"] != "train":
                continue
            step = self.global_step
            done_here = step - self.start_step  # steps run in this process (resume-aware ETA)
            eta_s = (time.perf_counter() - t_train) / done_here * (cfg.steps - step)
            train_progress(
                step / cfg.steps,
                "train",
                f"step {step}/{cfg.steps} loss {entry['loss']:.4f} ETA {eta_s:.0f} s",
            )
            if self.vals and (step % cfg.val_every == 0 or step == cfg.steps):
                self.validate()
                self.train_mode()
        self.timings["train_s"] = time.perf_counter() - t_train
        return self.finish()

    def finish(self) -> FinetuneResult:
        """After the last step: a final validation if the last entry is not one, ``last.pt``,
        ``best.pt`` when none was selected (no val split), the "no step improved" warning,
        ``history.json``; the weights are frozen again. Returns :class:`FinetuneResult`."""
        self._require_setup()
        cfg, step = self.config, self.global_step
        if self.vals and (not self.history or self.history[-1].get("kind") != "val"):
            self.validate()
        self.checkpoint("last")
        self.model.eval()
        for p in self.params:
            p.requires_grad_(False)
        if not self.vals or not self.best_path.exists():
            self.checkpoint("best", val_mean_iou=None, metrics=self._metrics_now(step, None))
        improved = None
        best = self.best
        if self.vals and best["step"] is not None:
            improved = best["step"] > 0
            if not improved:
                msg = (
                    f"no step improved on the initial model ({cfg.select_by} "
                    f"{_fmt_score(best['init'])} at step 0): best.pt is the initial model, "
                    "not fine-tuned"
                )
                self.warnings.append(msg)
                log.warning(msg)
        self.timings["total_s"] = time.perf_counter() - self.t_start
        (self.out_dir / "history.json").write_text(
            json.dumps({"history": self.history, "timings": self.timings})
        )
        self.progress(
            1.0,
            "done",
            f"best step {best['step']} ({cfg.select_by} {_fmt_score(best['score'])})",
        )
        return FinetuneResult(
            best_step=best["step"],
            best_score=best["score"][0] if best["score"] else None,
            improved=improved,
            checkpoint_sha256=file_sha256(self.best_path),
            checkpoint=self.best_path,
            history=self.history,
            best_val_iou=self.best_val_iou,
            model_info=self.loaded.info.to_dict(),
            warnings=self.warnings,
            timings=self.timings,
        )


def finetune(
    dataset: Path,
    out_dir: Path,
    config: FinetuneConfig,
    *,
    base_checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    on_history: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune (or, ``train_mode`` ``"lora"`` / ``"full"``, train) SAM2 on a dataset's train
    split: ``Trainer(...).fit()`` (:class:`Trainer`).

    Args:
        dataset: ``calseg-dataset`` v1 directory (train and, ideally, val split).
        out_dir: output directory (``best.pt``, ``last.pt``, ``history.json``).
        config: :class:`FinetuneConfig`.
        base_checkpoint: SAM2 checkpoint to start from (``None``: ``$CALSEG_SAM2_CHECKPOINT`` or
            random weights, with a warning in the result).
        cache_dir: embedding cache directory (default ``out_dir / "embeddings"``).
        progress: :data:`calseg.progress.ProgressFn`.
        on_history: called with every history entry as it is appended (a live training curve):
            ``{"kind": "train", "step", "lr", "grad_norm", "time_s", "loss", "focal", "dice",
            "iou_mse", "object_bce", "train_iou", "mask_area", "target_area", "logit_max",
            "object_score", "iou_pred"}`` (the last five: :func:`_mask_stats`, absent on a step
            without cell prompts), ``{"kind": "val", "step", "val_mean_iou", "per_video",
            "n_prompts", "val_mask_area", "val_target_area", "val_logit_max",
            "val_object_score", "val_iou_pred", "disc_prior_iou", "time_s"}`` (see
            :func:`validate`), once ``{"kind": "prior", "step": 0, "name": "disc prior",
            "radius_px", "val_mean_iou", "per_video", "n_prompts"}`` (the disc prior of
            :func:`validate` with the training cells' :func:`mean_cell_radius`, the reference
            row) or ``{"kind": "skipped", "step", "reason"}``.
            Entries restored from ``last.pt`` on resume are not replayed. An exception raised
            by the callback is logged and ignored (it must not kill a training run).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        DatasetError: no training video / no usable frame. TrainingDivergedError.
    """
    return Trainer(
        dataset,
        out_dir,
        config,
        base_checkpoint=base_checkpoint,
        cache_dir=cache_dir,
        progress=progress,
        on_history=on_history,
    ).fit()


def initial_model(
    dataset: Path,
    out_dir: Path,
    config: FinetuneConfig,
    *,
    base_checkpoint: Path | None = None,
    cache_dir: Path | None = None,
) -> FinetuneResult:
    """The decoder AS INITIALISED by a :func:`finetune` run of ``config`` (same seed, base,
    prior and data): one optimiser step at lr 1e-12, so ``best.pt`` holds the initial weights.

    The reference that separates learning from set-up: with ``mask_prior="residual"`` the
    untrained decoder's random correction alone moves the disc prior a little (held-out
    prompted IoU +0.003 at 256 px and +0.002 at 512 px on the seed-7 dataset of
    ``scripts/decoder_vs_disc.py``, -0.005 on seed 11), so "beats the disc prior" counts as
    learning only when the trained decoder also beats this model.
    """
    cfg = config.model_copy(update={"steps": 1, "lr": 1e-12, "warmup_steps": 0, "resume": False})
    return finetune(dataset, out_dir, cfg, base_checkpoint=base_checkpoint, cache_dir=cache_dir)
