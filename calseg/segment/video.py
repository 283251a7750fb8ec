"""SAM2 video propagation for CalSeg (``InferenceConfig(mode="video")``).

Image mode (:mod:`calseg.segment.infer`) decodes every frame on its own; a cell's id is
consistent across frames because each prompt carries its cell ROI's id. Video mode adds SAM2's
memory (Ravi et al. 2024, section 4: memory encoder, memory bank, memory attention): each cell
ROI that is active somewhere in a window of frames becomes one SAM2 *object* whose id is the
ROI id; it is prompted ONCE, on the frame of that window where the ROI's mean activity z is
highest (positive point = the ROI's anchor, negatives = the nearest other anchors, exactly the
image-mode prompt of that frame), and ``SAM2VideoPredictor.propagate_in_video`` then tracks
its mask through every frame of the window, conditioning each frame on the prompted frame and
the previous frames' memories. So the mask shape of a cell comes from the model's tracking,
while (with ``video_gate_by_activity``, default) the *presence* of a cell in a frame still
comes from the recording's activity: a tracked mask is painted in frame t only when its ROI is
active there (DESIGN.md section 4: a cell is in the label image when it is active).

Memory is bounded for long recordings:

* frames are streamed: the predictor's ``images`` is a lazy view that normalises, pads/resizes
  and ImageNet-normalises ONE frame when the predictor asks for it (nothing is held for the
  whole recording; SAM2's predictor keeps only the last frame's features);
* the recording is processed in windows of ``video_window_frames`` frames; a fresh predictor
  state per window (ids stay consistent because they are ROI ids, not tracker ids);
* inside a window, per object, non-conditioning outputs older than the memory the model can
  read (``num_maskmem`` frames for mask memories, ``max_obj_ptrs_in_encoder`` for object
  pointers; 7 and 16 in all SAM2.1 configs) are dropped as soon as the tracker moves on, and
  at most ``video_max_cond_frames`` conditioning frames are attended to;
* ``offload_state_to_cpu`` on CUDA keeps the per-frame outputs in host memory (SAM2's option).

The predictor is a ``sam2.sam2_video_predictor.SAM2VideoPredictor`` built from the same config
and holding a copy of the loaded model's weights (base or fine-tuned). Video mode runs the
image encoder on every frame of a window (no embedding cache: the predictor computes features
itself), and the memory attention once per object and frame, so it is slower than image mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from calseg.progress import ProgressFn, null_progress
from calseg.segment.embeddings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameGeometry,
    frames_to_model,
    logits_to_frame,
    normalise_frames,
)
from calseg.segment.prompts import Activity, FramePrompt, frame_prompts

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from calseg.segment.decode import InferenceConfig
    from calseg.segment.model import LoadedSAM2

log = logging.getLogger(__name__)


class _LazyFrames:
    """Sequence of model-input frames ``(3, S, S)`` float32, computed when indexed.

    Stands in for the ``images`` tensor of a SAM2 inference state, so a window of a long
    recording is never materialised at model resolution. ``n_loaded`` counts frame loads.
    """

    def __init__(self, frames: np.ndarray, norm: dict, geom: FrameGeometry, device) -> None:
        import torch

        self.frames = frames
        self.norm = norm
        self.geom = geom
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.n_loaded = 0

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        x = frames_to_model(normalise_frames(self.frames[i : i + 1], self.norm), self.geom)[0]
        self.n_loaded += 1
        return (x.expand(3, -1, -1) - self.mean) / self.std


def _float_memory_predictor_class():
    """``SAM2VideoPredictor`` that keeps memory features in float32 (SAM2 stores them as
    bfloat16 and relies on CUDA bfloat16 autocast to mix them with float32 weights; on CPU,
    without autocast, that mix fails)."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    class FloatMemoryVideoPredictor(SAM2VideoPredictor):
        def _run_single_frame_inference(self, *args, **kwargs):
            out, masks = super()._run_single_frame_inference(*args, **kwargs)
            if out["maskmem_features"] is not None:
                out["maskmem_features"] = out["maskmem_features"].float()
            return out, masks

        def _run_memory_encoder(self, *args, **kwargs):
            feats, pos = super()._run_memory_encoder(*args, **kwargs)
            return feats.float(), pos

    return FloatMemoryVideoPredictor


def video_predictor(loaded: LoadedSAM2):
    """A ``SAM2VideoPredictor`` with the loaded model's config, image size and weights.

    Built once per :class:`LoadedSAM2` and kept on it (``loaded._video_predictor``); the weights
    are COPIED then, so later in-place changes to ``loaded.model`` are not seen by it (load the
    checkpoint again instead). Costs one more model in memory (156 MB for the tiny config).
    ``fill_hole_area`` is 0 (the optional CUDA extension is not built here); other settings
    are SAM2's video defaults (``binarize_mask_from_pts_for_mem_enc``), as in
    ``sam2.build_sam.build_sam2_video_predictor``.
    """
    cached = getattr(loaded, "_video_predictor", None)
    if cached is not None:
        return cached
    import torch
    from hydra.utils import instantiate

    from calseg.segment.model import compose_sam2_config

    overrides = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=0",
    ]
    cfg = compose_sam2_config(loaded.info.config, int(loaded.info.image_size), overrides)
    device = next(loaded.model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pred = instantiate(cfg.model, _recursive_=True)
    if device.type != "cuda":  # CUDA: SAM2's own setting, bfloat16 memories under autocast
        pred.__class__ = _float_memory_predictor_class()  # adds two methods, no state
    pred.load_state_dict(loaded.model.state_dict())
    pred.calseg_autocast = device.type == "cuda"
    import functools

    import sam2.sam2_video_predictor as svp
    from tqdm import tqdm

    svp.tqdm = functools.partial(tqdm, disable=True)  # progress goes through ProgressFn
    pred = pred.to(device).eval()
    for p in pred.parameters():
        p.requires_grad_(False)
    loaded._video_predictor = pred  # type: ignore[attr-defined]
    return pred


def _init_state(pred, images: _LazyFrames, size: int, offload_state_to_cpu: bool) -> dict:
    """``SAM2VideoPredictor.init_state`` without reading a JPEG folder: frames come from
    ``images``; the 'video resolution' is the model grid (S x S), mapped back to H x W by
    :func:`calseg.segment.embeddings.logits_to_frame`."""
    from collections import OrderedDict

    import torch

    device = pred.device
    st: dict = {
        "images": images,
        "num_frames": len(images),
        "offload_video_to_cpu": True,
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": size,
        "video_width": size,
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }
    return st


@dataclass
class VideoStats:
    """What video mode did: windows, objects, and the memory actually held.

    ``max_outputs_held``: the largest number of per-frame outputs (conditioning +
    non-conditioning) any one object held at once; ``frames_loaded``: frames converted to
    model input (each frame of a window once per encoder pass, plus prompt frames).
    """

    n_windows: int = 0
    window_frames: int = 0
    n_objects: int = 0
    object_frames: int = 0
    max_outputs_held: int = 0
    memory_frames_kept: int = 0
    frames_loaded: int = 0
    windows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able dict (without the per-window list)."""
        return {k: v for k, v in self.__dict__.items() if k != "windows"}


def _window_prompts(activity: Activity, a: int, b: int, config: InferenceConfig) -> list:
    """One prompt per cell ROI active in frames ``[a, b)``: the image-mode prompt of the
    ROI's highest-mean-z frame of the window."""
    best: dict[int, FramePrompt] = {}
    for t in range(a, b):
        for q in frame_prompts(
            activity,
            t,
            n_negative=config.n_negative_points,
            max_prompts=config.max_prompts_per_frame,
        ):
            if q.seed_id not in best or q.z > best[q.seed_id].z:
                best[q.seed_id] = q
    return sorted(best.values(), key=lambda q: (q.frame, q.seed_id))


def segment_video(
    loaded: LoadedSAM2,
    frames: np.ndarray,
    norm: dict,
    geom: FrameGeometry,
    activity: Activity,
    config: InferenceConfig,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, list[dict], VideoStats]:
    """Segment a recording with SAM2 video propagation (see module docstring).

    Args:
        loaded: SAM2 model (its weights are copied into a video predictor once).
        frames: ``(T, H, W)`` recording (input units; any dtype).
        norm: per-recording normalisation (:func:`compute_normalisation`).
        geom: frame geometry (model grid side = ``loaded.info.image_size``).
        activity: :func:`calseg.segment.prompts.compute_activity` of ``frames``.
        config: :class:`calseg.segment.infer.InferenceConfig` (``video_*`` fields, mask
            thresholds ``mask_threshold``, ``min_mask_area_px``, ``max_mask_area_fraction``).
        progress: :data:`calseg.progress.ProgressFn`.

    Returns:
        ``(labels (T, H, W) uint32, prompt records, VideoStats)``; label ids are cell ROI ids,
        so consistent over the whole recording and across windows.
    """
    import torch

    progress = progress or null_progress
    pred = video_predictor(loaded)
    pred.max_cond_frames_in_attn = int(config.video_max_cond_frames)
    keep = max(int(pred.num_maskmem), int(pred.max_obj_ptrs_in_encoder)) + 1
    t_all, h, w = frames.shape
    s = loaded.info.image_size
    win = int(config.video_window_frames)
    labels = np.zeros((t_all, h, w), dtype=np.uint32)
    records: list[dict] = []
    stats = VideoStats(window_frames=win, memory_frames_kept=keep)
    max_area = config.max_mask_area_fraction * h * w
    on = activity.cell_active
    offload = bool(config.video_offload_state_to_cpu and pred.device.type == "cuda")
    seen_ids: set[int] = set()
    n_win = (t_all + win - 1) // win
    for wi, a in enumerate(range(0, t_all, win)):
        b = min(t_all, a + win)
        prompts = _window_prompts(activity, a, b, config)
        info = {"start": a, "stop": b, "n_objects": len(prompts)}
        stats.windows.append(info)
        stats.n_windows += 1
        if not prompts:
            progress((wi + 1) / n_win, "video", f"window {wi + 1}/{n_win}: no active cell")
            continue
        images = _LazyFrames(frames[a:b], norm, geom, pred.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=pred.calseg_autocast)
        with torch.inference_mode(), amp:
            state = _init_state(pred, images, s, offload)
            for q in prompts:
                pts = [(q.x, q.y), *q.negatives]
                coords = geom.to_model_points(np.asarray(pts, dtype=np.float32))
                lab = np.array([1] + [0] * len(q.negatives), dtype=np.int32)
                pred.add_new_points_or_box(
                    state,
                    frame_idx=q.frame - a,
                    obj_id=int(q.seed_id),
                    points=coords,
                    labels=lab,
                    normalize_coords=True,  # model-grid px / S (the state's 'video' size) * S
                )
                rec = q.to_dict()
                rec.update(window=wi, kept=True, reason=None, mode="video")
                records.append(rec)
            obj_ids = [int(i) for i in state["obj_ids"]]
            seen_ids.update(obj_ids)
            stats.n_objects = len(seen_ids)
            for fi, ids, masks in pred.propagate_in_video(state, start_frame_idx=0):
                t = a + int(fi)
                # drop outputs the memory attention can no longer read (bounded state)
                for od in state["output_dict_per_obj"].values():
                    nc = od["non_cond_frame_outputs"]
                    for old in [k for k in nc if k < fi - keep]:
                        del nc[old]
                    held = len(nc) + len(od["cond_frame_outputs"])
                    stats.max_outputs_held = max(stats.max_outputs_held, held)
                full = logits_to_frame(masks.float().cpu(), geom)[:, 0].numpy()  # (O, H, W)
                stats.object_frames += len(ids)
                labels[t] = _compose(full, [int(i) for i in ids], on, t, config, max_area)
                progress(
                    (wi + (fi + 1) / (b - a)) / n_win, "video", f"frame {t + 1}/{t_all} tracked"
                )
        stats.frames_loaded += images.n_loaded
        del state, images
    return labels, records, stats


def _compose(
    logits: np.ndarray,
    ids: list[int],
    cell_active: np.ndarray | None,
    t: int,
    config: InferenceConfig,
    max_area: float,
) -> np.ndarray:
    """One frame's label image from the tracked objects' logits ``(O, H, W)``: an object is
    painted where its logit > ``mask_threshold``, if (gated) its ROI is active in frame ``t``
    and its mask area is within ``[min_mask_area_px, max_area]``; overlaps go to the highest
    logit (as in image mode)."""
    masks = logits > config.mask_threshold
    areas = masks.reshape(len(masks), -1).sum(1)
    ok = (areas >= config.min_mask_area_px) & (areas <= max_area)
    if config.video_gate_by_activity and cell_active is not None:
        ok &= np.array([i < cell_active.shape[1] and bool(cell_active[t, i]) for i in ids])
    out = np.zeros(logits.shape[1:], dtype=np.uint32)
    if not ok.any():
        return out
    sel = np.flatnonzero(ok)
    lg = np.where(masks[sel], logits[sel].astype(np.float32), -np.inf)
    winner = np.argmax(lg, axis=0)
    covered = masks[sel].any(axis=0)
    out[covered] = np.asarray(ids, dtype=np.uint32)[sel][winner[covered]]
    return out
