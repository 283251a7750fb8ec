"""What a job will cost before it runs: memory, disk and time estimates, per-user limits and
quotas, and the admission check :func:`check_admission` that :func:`calseg.service.jobs.submit_job`
runs before a job is queued.

One estimate function per job kind (named by its entry in :mod:`calseg.service.kinds`:
:func:`estimate_simulate`,
:func:`estimate_finetune`, :func:`estimate_infer`, :func:`estimate_evaluate`), each taking the
kind's validated parameters (:mod:`calseg.service.schemas`) and the sizes of what the job reads
(:class:`JobInputs`, resolved from the database by :func:`resolve_inputs`), returning a
:class:`CostEstimate` (peak resident memory of the worker in bytes, bytes written to the
artifact store and embedding cache, worker seconds) with its named terms.

Every estimate is ``fixed part + sum of (constant x size)``; the constants
(:data:`CONSTANTS`) were measured on this repository's reference machine (2-core AMD EPYC,
CPU only, torch 2 threads; BENCHMARKS.md "Machine") by ``python -m calseg.bench --only costs``
(:func:`calseg.bench.bench_costs`), which runs real jobs of each kind through
:func:`calseg.service.jobs.run_job`, each in its own process, at two sizes, and prints every
measured peak RSS, store bytes and wall time next to the estimate: the estimate must lie at or
above the measurement (within the stated factor) for the job sizes it was measured at. A
worker faster than the reference machine (a GPU) sets ``settings.cost_time_scale`` (< 1).

Limits (:class:`JobLimits`): server settings (``job_max_memory_bytes``, ``job_max_disk_bytes``,
``job_max_time_s``, ``max_queued_jobs``, ``max_running_jobs``, ``allowed_devices``), each
replaceable per user by an admin (``users.max_*`` columns, migration 0003;
``PUT /api/users/{name}/limits``, ``calseg users limits``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from calseg.service.models import Job, Recording, User
from calseg.service.settings import Settings

GIB = 1024**3

# ------------------------------------------------------------------------------ constants

CONSTANTS: dict[str, float] = {
    # -- process baselines (bytes): peak RSS (VmHWM) of a worker running the smallest job of a
    #    kind (costs bench: simulate 147-175 MiB, baseline infer 266 MiB at 16 x 128^2)
    "base_rss_numpy_b": 0.35 * GIB,
    "base_rss_torch_b": 0.9 * GIB,  # torch + SAM2 tiny loaded, before any frame is encoded
    "sam2_activation_b_per_px": 1400.0,  # encoder activations per model-input px and frame of
    # an encoder batch: infer S=256 -> 1130 MiB, S=512 -> 2114-2158 MiB, encoder_batch_size 4
    # -- simulate
    "sim_render_px_s": 1.9e7,  # rendered + written px per second (dataset bench: 17.9 1024^2
    # frames/s written)
    "sim_cell_steps_s": 2.5e7,  # integrator cell-steps per second (sim bench: 2.4e7-3.7e7)
    "sim_mem_b_per_px": 14.0,  # peak bytes per px of ONE video (T H W): uint16 image + uint32
    # labels held while written, plus the writer's copies (render bench: 2.0 GiB at 180 x 1024^2)
    "sim_mem_b_per_frame_px": 64.0,  # per px of one frame: static fields, per-frame temporaries
    "sim_disk_b_per_px": 1.7,  # bytes on disk per px: zlib-1 image (0.45 x 2 B measured at
    # 1024^2) + labels + cells + calcium; costs bench: 1.6 B/px at 3 x 16 x 128^2 (1.2 MiB),
    # 1.36 B/px at 3 x 40 x 256^2 (10.2 MiB), 1.4 B/px at 2 x 200 x 256^2 (35 MiB)
    "sim_fixed_s": 4.0,  # imports, geometry, preview, manifest per job
    "sim_step_s": 2.0e-5,  # one integrator step of the batched tissues, beyond the per-cell
    # work (96^2 pouch of 71 cells, 3600 s at dt 0.01 s: 7.8 s, 0.5 s at dt 0.2; 2026-12-08)
    "sim_sample_s": 1.5e-6,  # one recorded sample of a video (activity mask and window search:
    # frame interval 0.01 against 1 s over 3600 s, 8.3 against 7.8 s)
    "sim_record_b_per_sample": 6.0,  # per cell and recorded sample, all videos at once:
    # float32 calcium + two boolean masks (25.6 M samples: 128 MiB; 256 M: 1.33 GiB; a 12th
    # attack run's horizon 36000 s at 0.01 s frames, estimated 0.35 GiB, peaked at 1.47 GB)
    # -- SAM2 (hiera tiny, CPU, 2 threads)
    "sam2_fixed_s": 10.0,  # building the model and loading weights (costs bench: 4-18 s)
    "sam2_encode_s_512": 0.45,  # one frame through the image encoder at S = 512 (sam2 bench at
    # load 1.6: 8 frames re-encoded per step at 0.287 steps/s); scales with S^2
    "sam2_decode_s": 0.4,  # one automatic prompt decoded and post-processed at inference
    # (sam2 bench at load 1.6: 0.206 frames/s with 7.6 prompts per 512^2 frame; at load 9.7:
    # 54 prompts in 25.6 s at S=256 and 32.7 s at S=512): barely depends on S
    "sam2_prompts_per_512px_frame": 16.0,  # planning value: automatic prompts follow active
    # cells (7.6 and 6.75 per 256-512^2 frame measured); 2x that, scaled by frame area
    "sam2_train_prompt_s_512": 0.03,  # one prompt of a decoder training step, forward and
    # backward (sam2 bench: 0.23 s per step of 8 prompts at 512); scales with S^2
    "sam2_train_encode_s_512": 1.4,  # one frame through the encoder with backward (lora/full:
    # about 3x the forward pass)
    "sam2_decoder_params": 4.2e6,  # prompt encoder + mask decoder (what decoder mode trains)
    "sam2_train_prompt_b_512": 24.0 * 2**20,  # one prompt of a training micro-batch at S=512:
    # the decoder's activations kept for backward, scaling with (S/512)^2 (hiera tiny, random
    # weights, batch 8 -> 40, loss at low resolution: 1476 -> 2263 MiB peak, 24.6 MiB per
    # prompt; the small SAM2's narrower decoder 10.0, PROMPT_MEMORY_FACTOR)
    "sam2_loss_b_per_px": 52.0,  # per prompt, per output mask and per px of the loss grid
    # (S^2 for loss_resolution "full", (S/4)^2 for "low"): logits, sigmoid, focal and Dice
    # terms and their gradients (small SAM2, batch 8 -> 64: 22.7 MiB per prompt at full
    # resolution against 10.0 at low, one mask; with multimask_output 42.3, about 2.5 masks)
    "sam2_multimask_masks": 2.5,
    "val_prompt_px_s": 6.0e6,  # validation: frame px per second per prompt (distance transform
    # + IoU on the full frame: 2.7e6-6.3e6 at 1024^2-256^2, load 12)
    # -- infer / evaluate, per recording pixel
    "infer_px_s": 4.0e6,  # activity, cell ROIs, traces, exports: px per second (costs bench:
    # 40 x 256^2 baseline in 5.1-15.5 s at load 6-11)
    "infer_mem_b_per_px": 32.0,  # frames, activity maps, label stack: baseline jobs peaked
    # at 266 / 320 / 541 MiB for 0.26 / 2.6 / 13 M px (costs bench): 21-22 B per px; calseg
    # segment peaked at 1.69 / 5.29 GiB for 10 / 40 frames of 2048^2 (42 / 168 M px): 31 B
    # per px (BENCHMARKS.md "Job cost estimates"); 24 let a suggested --max-frames run OOM
    "preprocess_mem_b_per_px": 40.0,  # float32 copies of the frames while preprocessing
    # (background opening at 40 x 256^2: 413 vs 320 MiB without, 36 B per px)
    "infer_disk_b_per_px": 2.5,  # labels.tif, overlay.gif, traces (costs bench: 0.7 MiB for
    # 16 x 128^2, 2.4-2.9 MiB for 40 x 256^2)
    "gauss_tap_px_s": 3.0e8,  # separable Gaussian: taps x px per second (scipy
    # ndimage.gaussian_filter on 40 x 64^2 at sigma 20-400: 2.7e8-3.2e8, load 6.5)
    "opening_tap_px_s": 5.0e7,  # grey opening with a disk: footprint px x px per second (256^2
    # at r = 10-40: 3.5e7-8.8e7; skimage's rolling ball 4e8-5.6e8, counted at this rate)
    "infer_fixed_s": 4.0,
    # -- traces, events and ROIs of each cell (pipelines.traces.write_trace_exports), per cell
    #    and frame: `python scripts/trace_export_cost.py` (1024-4096 cells x 64-128 frames:
    #    10-17 us and 45-50 B per cell-frame in two runs, 2026-12-07, load 1-3)
    "trace_cell_frame_s": 1.5e-5,
    "trace_cell_frame_b": 50.0,
    "trace_mem_b_per_cell_frame": 64.0,  # F, F0, dF/F, z as float64 and the table's copies
}
"""Constants of the estimates (units in each name: ``_s`` seconds, ``_b`` bytes, ``_px_s``
per second), measured on the reference machine (module docstring). The "costs bench" numbers
come from ``python -m calseg.bench costs`` (BENCHMARKS.md "Job cost estimates"), the others
from the sections of ``python -m calseg.bench`` named. Times are for a machine without other
load: on the shared 2-core machine at load 7-10 the same jobs ran 2-10x longer."""

MODEL_TIME_FACTOR = {"t": 1.0, "s": 1.2, "b+": 2.1, "l": 5.8, "calseg": 1.0}
"""Encoder time of a SAM2 size relative to hiera tiny, from the image encoders' parameter
counts in the SAM2 README (Hiera t/s/b+/l: 27.9/34.2/69.2/212.5 M of 38.9/46/80.8/224.4 M
total; compute grows with the encoder's width and depth alike). ``calseg``: the small SAM2
trained here (``sam2_small_calseg``, narrower and shallower than tiny), given tiny's figure
(not measured on its own: an overestimate)."""

PROMPT_MEMORY_FACTOR = {"calseg": 0.4}
"""Decoder activations per training prompt relative to hiera tiny's (the four SAM2.1 sizes
share the decoder design; the small SAM2 trained here has a narrower one: 9.2 against 23.7
MiB per prompt at S=512, measured with the attack run's batch-size sweep, 2026-12-08)."""

MODEL_PARAMS = {"t": 38.9e6, "s": 46.0e6, "b+": 80.8e6, "l": 224.4e6, "calseg": 1.33e6}
"""SAM2.1 parameters per size (SAM2 README, "Model Description"); ``calseg``: the small SAM2
trained here (README, "The SAM2 base")."""


def _size(model: str) -> str:
    return model.rsplit("_", 1)[-1]


def embedding_bytes(image_size: int) -> int:
    """Bytes of one frame's cached SAM2 features (float16): image embedding 256 x (S/16)^2 plus
    high-resolution features 32 x (S/4)^2 and 64 x (S/8)^2 = 8 S^2 bytes
    (:func:`calseg.segment.embeddings.encode_frames`)."""
    s = int(image_size)
    return 2 * (256 * (s // 16) ** 2 + 32 * (s // 4) ** 2 + 64 * (s // 8) ** 2)


def _encode_s(model: str, image_size: int) -> float:
    """Seconds to embed one frame (encoder time grows with the pixels of the model input)."""
    return (
        CONSTANTS["sam2_encode_s_512"]
        * (image_size / 512) ** 2
        * MODEL_TIME_FACTOR.get(_size(model), 6.0)
    )


def _model_rss(model: str, image_size: int = 512, encoder_batch: int = 4) -> float:
    """RSS of torch + one SAM2 model (fp32 weights beyond tiny's) + the encoder's activations
    for a batch of ``encoder_batch`` frames at ``image_size``."""
    c = CONSTANTS
    extra_weights = 4 * (MODEL_PARAMS.get(_size(model), 224.4e6) - MODEL_PARAMS["t"])
    activations = c["sam2_activation_b_per_px"] * image_size**2 * encoder_batch
    return (
        c["base_rss_torch_b"]
        + extra_weights
        + activations * MODEL_TIME_FACTOR.get(_size(model), 6.0)
    )


def planned_prompts(max_prompts: int, height: int, width: int) -> int:
    """Prompts per frame the estimates plan for: ``sam2_prompts_per_512px_frame`` scaled by
    the frame's area (at least 4), at most ``max_prompts``."""
    area = height * width / 512**2
    return int(
        min(max_prompts, max(4, math.ceil(CONSTANTS["sam2_prompts_per_512px_frame"] * area)))
    )


# ------------------------------------------------------------------------------ estimates


@dataclass
class CostEstimate:
    """Estimated peak memory (bytes), disk written (bytes) and worker time (s) of a job, with
    the named terms they add up from (``parts``: ``{"time:train": s, "memory:embeddings": b,
    ...}``) and the sizes used (``inputs``)."""

    memory_bytes: float
    disk_bytes: float
    time_s: float
    parts: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (bytes as integers, seconds and parts to 4 significant digits)."""
        return {
            "memory_bytes": int(self.memory_bytes),
            "disk_bytes": int(self.disk_bytes),
            "time_s": float(f"{self.time_s:.4g}"),
            "parts": {k: float(f"{v:.4g}") for k, v in self.parts.items()},
            "inputs": self.inputs,
        }

    def describe(self) -> str:
        """One line: ``memory 1.2 GiB, disk 300 MiB, time 40 s``."""
        return (
            f"memory {_fmt('memory', self.memory_bytes)}, disk {_fmt('disk', self.disk_bytes)}, "
            f"time {_fmt('time', self.time_s)}"
        )


@dataclass
class VideoShape:
    """Frames and frame size of one recording or simulated video."""

    n_frames: int
    height: int
    width: int

    @property
    def px(self) -> float:
        return float(self.n_frames) * self.height * self.width


@dataclass
class JobInputs:
    """Sizes of what a job reads, resolved from the database (:func:`resolve_inputs`).

    ``recording``: the uploaded recording (infer, simulate fitted to it); ``videos``: the
    referenced dataset's videos with their split (finetune, evaluate; infer of a simulated
    video: that one video)."""

    recording: VideoShape | None = None
    videos: list[tuple[str, VideoShape]] = field(default_factory=list)


def estimate_simulate(params: Any, inputs: JobInputs, time_scale: float = 1.0) -> CostEstimate:
    """Simulate job: ``n_videos`` videos of ``T x H x W`` px, written one at a time.

    * time = fixed + n_videos x (n_cells x horizon / dt) / ``sim_cell_steps_s`` + horizon /
      dt x ``sim_step_s`` (the batched integrator's steps) + n_videos x samples x
      ``sim_sample_s`` + n_videos x T H W / ``sim_render_px_s``; samples =
      :func:`calseg.simulate.dataset.recorded_samples` (one per frame interval over at least
      ``search_horizon_s``, whatever the window), horizon = samples x frame interval; n_cells
      from :func:`calseg.simulate.geometry.estimate_n_cells`.
    * memory = numpy baseline + ``sim_record_b_per_sample`` x n_videos x n_cells x samples
      (every tissue's calcium recorded at once) + ``sim_mem_b_per_px`` x T H W (one video
      held while it is rendered and written) + ``sim_mem_b_per_frame_px`` x H W. A 12th attack
      run: a horizon of 36000 s at 0.01 s frames was estimated at 0.35 GiB and 14 s and took
      1.47 GB and 110 s.
    * disk = ``sim_disk_b_per_px`` x n_videos x T H W.

    A fit to a recording (``recording_id``) replaces frame size and count by the recording's.
    """
    from calseg.simulate.dataset import recorded_samples
    from calseg.simulate.geometry import estimate_n_cells

    c = CONSTANTS
    t, h, w = params.n_frames, params.height, params.width
    if inputs.recording is not None:
        t, h, w = inputs.recording.n_frames, inputs.recording.height, inputs.recording.width
    n = int(params.n_videos)
    px = float(t) * h * w
    samples = recorded_samples(t, params.frame_interval_s, params.warmup_s, params.search_horizon_s)
    horizon = samples * params.frame_interval_s
    try:
        cells = estimate_n_cells(h, w, params.tissue_shape, params.mean_cell_area_px)
    except (ValueError, ZeroDivisionError):
        cells = 5000
    steps = horizon / params.dt_s
    t_int = n * cells * steps / c["sim_cell_steps_s"] + steps * c["sim_step_s"]
    t_int += n * samples * c["sim_sample_s"]
    t_render = n * px / c["sim_render_px_s"]
    t_fit = px / c["infer_px_s"] if inputs.recording is not None else 0.0
    recorded = c["sim_record_b_per_sample"] * n * cells * samples
    mem = (
        c["base_rss_numpy_b"]
        + recorded
        + c["sim_mem_b_per_px"] * px
        + c["sim_mem_b_per_frame_px"] * h * w
    )
    disk = c["sim_disk_b_per_px"] * n * px * (params.bit_depth / 16)
    parts = {
        "time:integrate": t_int * time_scale,
        "time:render+write": t_render * time_scale,
        "time:fit": t_fit * time_scale,
        "memory:one video": c["sim_mem_b_per_px"] * px,
        "memory:recorded calcium": recorded,
        "disk:videos": disk,
    }
    total = (c["sim_fixed_s"] + t_int + t_render + t_fit) * time_scale
    return CostEstimate(
        mem,
        disk,
        total,
        parts,
        {"n_videos": n, "n_frames": t, "height": h, "width": w, "n_cells": cells},
    )


def _infer_one(params: Any, shape: VideoShape, *, sam2: bool, cache: bool) -> dict[str, float]:
    """Terms of segmenting one recording (time in reference seconds, bytes)."""
    c = CONSTANTS
    px = shape.px
    frame_px = float(shape.height) * shape.width
    sigma = float(getattr(params, "smooth_sigma_px", 0.0) or 0.0)
    taps = 2 * (2 * int(4 * sigma + 0.5) + 1) if sigma > 0 else 0  # scipy truncate=4, 2 axes
    terms = {
        "time:analysis": px / c["infer_px_s"],
        "time:smoothing": px * taps / c["gauss_tap_px_s"],
        "memory:frames": c["infer_mem_b_per_px"] * px,
        "disk:outputs": c["infer_disk_b_per_px"] * px,
    }
    background = getattr(params, "background", None)
    if background:
        r = float(params.background_radius_px)
        if background == "gaussian":
            cost = frame_px * 2 * (2 * int(4 * r + 0.5) + 1) / c["gauss_tap_px_s"]
        else:  # grey opening with a disk / rolling ball: footprint area x pixels
            cost = frame_px * (math.pi * r * r) / c["opening_tap_px_s"]
        terms["time:background"] = cost + px / c["infer_px_s"]
    if getattr(params, "register_drift", False):
        terms["time:registration"] = 2 * px / c["infer_px_s"]
    if (
        background
        or getattr(params, "register_drift", False)
        or getattr(params, "bleach_correction", None)
    ):
        terms["memory:preprocess"] = c["preprocess_mem_b_per_px"] * px
    if sam2:
        s = int(params.image_size)
        frames = shape.n_frames if params.target == "active" else 1
        prompts = planned_prompts(params.max_prompts_per_frame, shape.height, shape.width)
        dec = c["sam2_decode_s"] * prompts * frames
        if params.mode == "video":
            dec *= 20  # SAM2 propagation: memory attention per object and frame (BENCHMARKS)
        terms["time:load model"] = c["sam2_fixed_s"]
        terms["time:encode"] = frames * _encode_s(params.model, s)
        terms["time:decode"] = dec
        terms["memory:embeddings"] = frames * embedding_bytes(s)
        if cache:
            terms["disk:embedding cache"] = frames * embedding_bytes(s)
    return terms


def _infer_totals(terms: dict[str, float], base_memory: float, time_scale: float) -> CostEstimate:
    time_s = CONSTANTS["infer_fixed_s"] + sum(v for k, v in terms.items() if k.startswith("time:"))
    mem = base_memory + sum(v for k, v in terms.items() if k.startswith("memory:"))
    disk = sum(v for k, v in terms.items() if k.startswith("disk:"))
    parts = {k: (v * time_scale if k.startswith("time:") else v) for k, v in terms.items()}
    return CostEstimate(mem, disk, time_s * time_scale, parts)


def estimate_infer(params: Any, inputs: JobInputs, time_scale: float = 1.0) -> CostEstimate:
    """Infer job on one recording of T x H x W px.

    * time = fixed + T H W / ``infer_px_s`` (activity, cell ROIs, traces, exports)
      + smoothing T H W x 2 (2 round(4 sigma) + 1) / ``gauss_tap_px_s`` (scipy's Gaussian,
      truncated at 4 sigma, on both image axes) + background (one H x W image: disk area x H W /
      ``opening_tap_px_s``, or Gaussian taps) + SAM2: model load + T x encoder time(S, model)
      + T x :func:`planned_prompts` x ``sam2_decode_s`` (video mode: 20x the decoder).
    * memory = baseline (numpy, or :func:`_model_rss`: torch, weights, encoder activations of
      ``encoder_batch_size`` frames at S) + ``infer_mem_b_per_px`` x T H W + T x
      :func:`embedding_bytes` (SAM2 keeps every embedded frame).
    * disk = ``infer_disk_b_per_px`` x T H W + the embedding cache (T x embedding_bytes).

    The prompt count is a planning value (:func:`planned_prompts`): automatic prompts follow
    active cells, so a very active recording costs more than estimated.
    """
    shape = inputs.recording or (inputs.videos[0][1] if inputs.videos else VideoShape(1, 1, 1))
    sam2 = params.method == "sam2"
    terms = _infer_one(params, shape, sam2=sam2, cache=True)
    base = (
        _model_rss(params.model, params.image_size, params.encoder_batch_size)
        if sam2
        else CONSTANTS["base_rss_numpy_b"]
    )
    est = _infer_totals(terms, base, time_scale)
    est.inputs = {"n_frames": shape.n_frames, "height": shape.height, "width": shape.width}
    return est


def frames_within_memory(params: Any, shape: VideoShape, memory_bytes: float) -> int:
    """The most leading frames of a recording of ``shape`` that an infer job with ``params``
    can segment within ``memory_bytes`` by :func:`estimate_infer` (0 when not even one frame
    fits; ``shape.n_frames`` when all do). The estimate grows with the frame count, so a
    bisection over 1..T finds it."""

    def fits(t: int) -> bool:
        one = VideoShape(t, shape.height, shape.width)
        return estimate_infer(params, JobInputs(recording=one)).memory_bytes <= memory_bytes

    lo, hi = 0, int(shape.n_frames)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def estimate_finetune(params: Any, inputs: JobInputs, time_scale: float = 1.0) -> CostEstimate:
    """Finetune job on a simulate job's dataset.

    Frames embedded: per training video (K + 1) x min(frames_per_video, T) (K =
    ``augment_variants``), per validation video min(val_frames_per_video, T).

    * time = embedding (frames x encoder time(S, model)) + training: steps x grad_accum x
      batch_size x ``sam2_train_prompt_s_512`` (S/512)^2, plus for ``lora``/``full`` each
      micro-batch's distinct frames (``frames_per_step``, else up to batch_size: at most the
      training frames) through the encoder with backward
      (``sam2_train_encode_s_512``) + validation: (steps / val_every + 1) x validation frames
      x min(val_max_prompts_per_frame, :func:`planned_prompts`) x (H W / ``val_prompt_px_s``
      + a decoder forward); the training part is capped by ``time_limit_s`` when given.
    * memory = :func:`_model_rss` + the trained weights' gradients and AdamW moments (3 x 4 B
      per trained parameter: decoder ``sam2_decoder_params``, lora 1.5x that, full all) + the
      embedded frames' features (:func:`embedding_bytes`) and model-grid labels (4 S^2 each;
      lora/full: also the model input, 2 S^2) + one video loaded (6 B per px) + for lora/full
      the encoder activations of a micro-batch with backward (3x the forward's) + a
      micro-batch's prompts: batch_size x (``sam2_train_prompt_b_512`` (S/512)^2 +
      ``sam2_loss_b_per_px`` x masks x loss px), masks 1 or ``sam2_multimask_masks``, loss px
      S^2 (``loss_resolution="full"``) or (S/4)^2. A 12th attack run: the estimate was 2.18
      GiB at batch sizes 8, 128 and 512 alike, where batch 128 with a full-resolution
      multimask loss peaked at 6.7 GB.
    * disk = embedding cache (frames x embedding bytes; none for lora/full) + checkpoints
      (best: trained weights x 4 B; last: x 3 with AdamW's moments; full: the whole model).
    """
    c = CONSTANTS
    s = int(params.image_size)
    emb = embedding_bytes(s)
    train = [v for split, v in inputs.videos if split == "train"]
    val = [v for split, v in inputs.videos if split == "val"]
    k = int(getattr(params, "augment_variants", 0) or 0)
    n_train_frames = sum((k + 1) * min(params.frames_per_video, v.n_frames) for v in train)
    n_val_frames = sum(min(params.val_frames_per_video, v.n_frames) for v in val)
    frames = n_train_frames + n_val_frames
    encoder_trained = params.train_mode in ("lora", "full")
    enc = _encode_s(params.model, s)
    scale = (s / 512) ** 2
    micro = params.steps * params.grad_accum
    t_train = micro * params.batch_size * c["sam2_train_prompt_s_512"] * scale
    # lora/full: a micro-batch re-encodes the distinct frames its prompts come from:
    # frames_per_step when set, else as many as it has prompts (drawn from every training
    # frame). It was charged at most 8, where a batch of 64 prompts re-encodes up to 64
    # frames with gradients (a seventh attack run's reading of finetune._features_for)
    frames_per_micro = min(
        params.batch_size,
        getattr(params, "frames_per_step", None) or params.batch_size,
        max(1, n_train_frames),
    )
    if encoder_trained:
        t_train += (
            micro
            * frames_per_micro
            * c["sam2_train_encode_s_512"]
            * scale
            * MODEL_TIME_FACTOR.get(_size(params.model), 6.0)
        )
    if params.time_limit_s is not None:
        t_train = min(t_train, float(params.time_limit_s) / time_scale)
    n_val = (params.steps // params.val_every + 1) if val else 0
    # each validation prompt: the decoder forward plus a distance transform and an IoU over
    # the whole frame (calseg.segment.finetune.validate)
    t_val = n_val * sum(
        min(params.val_frames_per_video, v.n_frames)
        * min(params.val_max_prompts_per_frame, planned_prompts(10**9, v.height, v.width))
        * (
            float(v.height) * v.width / c["val_prompt_px_s"]
            + c["sam2_train_prompt_s_512"] * scale / 3
        )
        for v in val
    )
    t_embed = frames * enc
    weights = 4 * MODEL_PARAMS.get(_size(params.model), 224.4e6)
    trained = {
        "decoder": c["sam2_decoder_params"],
        "lora": c["sam2_decoder_params"] * 1.5,
        "full": MODEL_PARAMS.get(_size(params.model), 224.4e6),
    }[params.train_mode]
    per_frame = emb + 4 * s * s + (2 * s * s if encoder_trained else 0)
    largest = max((v.px for v in train + val), default=0.0)
    masks = c["sam2_multimask_masks"] if getattr(params, "multimask_output", False) else 1.0
    loss_px = s * s if getattr(params, "loss_resolution", "low") == "full" else (s / 4) ** 2
    per_prompt = (
        c["sam2_train_prompt_b_512"] * scale * PROMPT_MEMORY_FACTOR.get(_size(params.model), 1.0)
        + c["sam2_loss_b_per_px"] * masks * loss_px
    )
    memory = {
        "memory:prompt batch": params.batch_size * per_prompt,
        "memory:gradients+optimiser": 3 * 4 * trained,
        "memory:embedded frames": frames * per_frame,
        "memory:one video": 6 * largest,
        "memory:encoder activations": (
            3 * c["sam2_activation_b_per_px"] * s * s * frames_per_micro if encoder_trained else 0.0
        ),
    }
    disk = {
        "disk:embedding cache": 0.0 if encoder_trained else frames * emb,
        # best.pt (trained weights) and last.pt (+ AdamW's two moments)
        "disk:checkpoints": 4 * trained * (1 + 3) + (weights if params.train_mode == "full" else 0),
    }
    time_terms = {
        "time:load model": c["sam2_fixed_s"],
        "time:embed": t_embed,
        "time:train": t_train,
        "time:validate": t_val,
    }
    total = (c["infer_fixed_s"] + sum(time_terms.values())) * time_scale
    parts = {k2: v * time_scale for k2, v in time_terms.items()} | memory | disk
    return CostEstimate(
        _model_rss(params.model, s, params.encoder_batch_size) + sum(memory.values()),
        sum(disk.values()),
        total,
        parts,
        {
            "train_videos": len(train),
            "val_videos": len(val),
            "frames_embedded": frames,
            "image_size": s,
        },
    )


def estimate_evaluate(params: Any, inputs: JobInputs, time_scale: float = 1.0) -> CostEstimate:
    """Evaluate job: every video of ``split`` segmented by the base SAM2, the fine-tuned model
    (when ``model_job_id``) and the classical baseline. The SAM2 models share the frozen
    encoder's embeddings (cached by encoder hash), so each video is embedded once and decoded
    once per SAM2 model; memory is that of the largest video's infer job (videos run one at a
    time)."""
    videos = [v for split, v in inputs.videos if split == params.split]
    n_sam2 = 2 if params.model_job_id else 1
    time_s = 0.0
    disk = 0.0
    memory = 0.0
    parts: dict[str, float] = {}
    for shape in videos:
        terms = _infer_one(params, shape, sam2=True, cache=True)
        base = _infer_one(params, shape, sam2=False, cache=False)
        t = sum(v for k, v in terms.items() if k.startswith("time:"))
        t += (n_sam2 - 1) * terms.get("time:decode", 0.0)
        t += sum(v for k, v in base.items() if k.startswith("time:"))
        time_s += t + CONSTANTS["infer_fixed_s"]
        disk += terms.get("disk:embedding cache", 0.0)
        memory = max(memory, sum(v for k, v in terms.items() if k.startswith("memory:")))
    parts["time:segment videos"] = time_s * time_scale
    parts["memory:largest video"] = memory
    parts["disk:embedding cache"] = disk
    return CostEstimate(
        _model_rss(params.model, params.image_size, params.encoder_batch_size) + memory,
        disk + 1e6,
        time_s * time_scale,
        parts,
        {"videos": len(videos), "split": params.split},
    )


# ------------------------------------------------------------------------------ inputs


def _dataset_videos(session: Session, job_id: str | None) -> list[tuple[str, VideoShape]]:
    """``(split, shape)`` of each video of a simulate job: from its result when it succeeded,
    else from its parameters (a fit to a recording takes the recording's frame size and count;
    videos are split as :meth:`SimulationConfig.split_of` does)."""
    job = session.get(Job, job_id) if job_id else None
    if job is None or job.kind != "simulate":
        return []
    videos = (job.result or {}).get("videos") if job.state == "succeeded" else None
    if videos:
        return [
            (
                str(v.get("split", "train")),
                VideoShape(int(v["n_frames"]), int(v["height"]), int(v["width"])),
            )
            for v in videos
        ]
    p = job.params or {}
    shape = VideoShape(
        int(p.get("n_frames", 64)), int(p.get("height", 256)), int(p.get("width", 256))
    )
    rec = session.get(Recording, p["recording_id"]) if p.get("recording_id") else None
    if rec is not None:
        shape = VideoShape(rec.n_frames, rec.height, rec.width)
    n = int(p.get("n_videos", 4))
    n_test, n_val = int(p.get("n_test_videos", 1)), int(p.get("n_val_videos", 1))
    out = []
    for i in range(n):
        split = "test" if i >= n - n_test else "val" if i >= n - n_test - n_val else "train"
        out.append((split, shape))
    return out


def job_read_options(params: Any, rec: Recording) -> dict[str, Any] | None:
    """The reading options a job reads its recording ``rec`` with, where the job gives any
    (``axes``, ``channel``, ``interleaved_channels``, or a ``z_projection`` other than the
    upload's): the upload's options (``rec.read_options``) overridden by the job's. ``None``
    when the job gives none, so the recording reads as uploaded (its stored shape holds).

    Raises:
        calseg.io.recordings.RecordingError: an unknown option name.
    """
    from calseg.io.recordings import merge_read_options

    given = {k: getattr(params, k, None) for k in ("axes", "channel", "interleaved_channels")}
    stored = dict(rec.read_options or {})
    z = getattr(params, "z_projection", None)
    if z is not None and z != stored.get("z_projection", "max"):
        given["z_projection"] = z
    if all(v is None for v in given.values()):
        return None
    return merge_read_options(stored, **given)


def recording_shape(rec: Recording, params: Any, settings: Settings | None) -> VideoShape:
    """The shape ``(frames, height, width)`` a job reads ``rec`` with: the stored one, or,
    where the job gives reading options (:func:`job_read_options`), the one its options make,
    from the file's headers (no pixel decoded). The stored shape alone let a job read a
    stack uploaded as 1 frame of 600 Z planes as 600 frames (``axes="TYX"``), estimated at 4 s
    and 360 MiB for a run of 16 s and 1.6 GB, up to 2^26 pixels a stored frame (a seventh
    attack run). A file these options cannot read keeps the stored shape (the submit check
    answers 422 for it)."""
    stored = VideoShape(rec.n_frames, rec.height, rec.width)
    if settings is None:
        return stored
    from calseg.io.recordings import RecordingError, RecordingReader
    from calseg.service.store import get_store

    try:
        options = job_read_options(params, rec)
        if options is None:
            return stored
        path = get_store(settings.artifact_dir).path(rec.relpath)
        with RecordingReader(path, **options, limits=settings.read_limits()) as reader:
            return VideoShape(reader.n_frames, reader.info.height, reader.info.width)
    except (RecordingError, OSError):
        return stored


def resolve_inputs(
    session: Session, kind: str, params: Any, settings: Settings | None = None
) -> JobInputs:
    """The sizes a job's estimate needs: its recording (as the job's reading options read it,
    :func:`recording_shape`, with ``settings``) and/or its dataset's videos."""
    inputs = JobInputs()
    rec_id = getattr(params, "recording_id", None)
    if rec_id:
        rec = session.get(Recording, rec_id)
        if rec is not None:
            inputs.recording = recording_shape(rec, params, settings)
    ds = getattr(params, "dataset_job_id", None)
    if ds and kind in ("finetune", "evaluate", "infer"):
        videos = _dataset_videos(session, ds)
        if kind == "infer":
            job = session.get(Job, ds)
            named = (job.result or {}).get("videos") if job is not None else None
            video_id = getattr(params, "video_id", None)
            if named:
                for entry, (split, shape) in zip(named, videos, strict=False):
                    if entry.get("id") == video_id:
                        videos = [(split, shape)]
                        break
            videos = videos[:1]
        inputs.videos = videos
    return inputs


def as_sam2_runs(session: Session, params: Any, settings: Settings) -> Any:
    """``params`` with the ``model`` and ``image_size`` SAM2 will run at: a CalSeg checkpoint
    runs as it was trained whatever is asked (:func:`calseg.segment.model.load_sam2`), the
    fine-tuned one of ``model_job_id`` (its job's ``model_info``) or else the configured base
    (``settings.sam2_checkpoint``, e.g. the bundled small SAM2). Estimated at the size asked,
    an infer job at ``image_size`` 64 that ran at 512 was charged 1/64 of its encoder time and
    embedding memory (a seventh attack run). Unchanged for parameters without ``image_size``
    or where the checkpoint runs at the size asked (Meta's, or none)."""
    if not hasattr(params, "image_size") or not hasattr(params, "model"):
        return params
    shape = None
    model_job = getattr(params, "model_job_id", None)
    if model_job:
        job = session.get(Job, model_job)
        info = ((job.result or {}).get("model_info") or {}) if job is not None else {}
        if info.get("config") and info.get("image_size"):
            shape = (str(info["config"]), int(info["image_size"]))
    if shape is None:
        from calseg.segment.model import checkpoint_run_shape

        shape = checkpoint_run_shape(settings.sam2_checkpoint)
    if shape is None:
        return params
    return params.model_copy(update={"model": shape[0], "image_size": shape[1]})


def estimate(session: Session, kind: str, params: Any, settings: Settings) -> CostEstimate:
    """The cost estimate of a job of ``kind`` with validated ``params``; an infer job's
    ``method="auto"`` is first resolved as its runner will resolve it
    (:func:`calseg.segment.choice.resolve_method`), so a job that will run SAM2 is estimated
    with SAM2's costs."""
    if kind == "infer" and getattr(params, "method", None) == "auto":
        from calseg.segment.choice import resolve_method

        method, _ = resolve_method(
            params.method, model_job_id=params.model_job_id, checkpoint=settings.sam2_checkpoint
        )
        params = params.model_copy(update={"method": method})
    params = as_sam2_runs(session, params, settings)
    from calseg.service.kinds import get

    return get(kind).load_estimate()(
        params, resolve_inputs(session, kind, params, settings), float(settings.cost_time_scale)
    )


# ------------------------------------------------------------------------------ limits


@dataclass
class JobLimits:
    """What one user may run: per job (memory, disk, time) and at once (queued, running)."""

    max_job_memory_bytes: int
    max_job_disk_bytes: int
    max_job_time_s: float
    max_queued_jobs: int
    max_running_jobs: int | None
    max_storage_bytes: int | None = None
    """Storage quota (bytes; None: none), :func:`storage_used_bytes` counts against it."""
    sources: dict[str, str] = field(default_factory=dict)
    """``{limit: "user" | "server"}``: whether the user's own value or the server's applies."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_job_memory_bytes": self.max_job_memory_bytes,
            "max_job_disk_bytes": self.max_job_disk_bytes,
            "max_job_time_s": self.max_job_time_s,
            "max_queued_jobs": self.max_queued_jobs,
            "max_running_jobs": self.max_running_jobs,
            "max_storage_bytes": self.max_storage_bytes,
            "sources": dict(self.sources),
        }


USER_LIMIT_FIELDS = (
    "max_job_memory_bytes",
    "max_job_disk_bytes",
    "max_job_time_s",
    "max_queued_jobs",
    "max_running_jobs",
    "max_storage_bytes",
)
"""Columns of ``users`` that replace the server's setting of the same name when not NULL
(``max_storage_bytes``: the server's ``max_user_storage_bytes``)."""


def physical_memory_bytes() -> int:
    """Physical memory of this machine (``sysconf``; 16 GiB when it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def server_limits(settings: Settings) -> dict[str, Any]:
    """The server's default limits (``job_max_memory_bytes`` None: 80 % of this machine's
    physical memory, the machine the embedded service's worker shares)."""
    mem = settings.job_max_memory_bytes
    if mem is None:
        mem = int(0.8 * physical_memory_bytes())
    return {
        "max_job_memory_bytes": int(mem),
        "max_job_disk_bytes": int(settings.job_max_disk_bytes),
        "max_job_time_s": float(settings.job_max_time_s),
        "max_queued_jobs": int(settings.max_queued_jobs),
        "max_running_jobs": settings.max_running_jobs,
        "max_storage_bytes": settings.max_user_storage_bytes,
    }


def effective_limits(
    user: User | None, settings: Settings, session: Session | None = None
) -> JobLimits:
    """The limits of ``user``: their own where an admin set one, else the server's. With a
    ``session`` the user's values are read from the database (the api's token cache holds
    users without their limits, :mod:`calseg.service.auth`)."""
    values = server_limits(settings)
    sources = dict.fromkeys(values, "server")
    own_values: dict[str, Any] = {}
    if user is not None and session is not None:
        row = session.execute(
            select(*(getattr(User, n) for n in USER_LIMIT_FIELDS)).where(User.id == user.id)
        ).first()
        own_values = dict(zip(USER_LIMIT_FIELDS, row, strict=True)) if row else {}
    elif user is not None:
        own_values = {n: getattr(user, n, None) for n in USER_LIMIT_FIELDS}
    for name in USER_LIMIT_FIELDS:
        own = own_values.get(name)
        if own is not None:
            values[name] = own
            sources[name] = "user"
    return JobLimits(**values, sources=sources)


# ------------------------------------------------------------------------------ admission


LEFT_RESOURCES = ("free disk", "storage quota")
"""Resources whose limit is what is left of them, not a fixed amount; both are compared with
the job's disk estimate."""


class JobTooCostly(ValueError):
    """The job's estimated memory, disk or time is over the owner's limit (API: 422).

    ``estimate`` (:class:`CostEstimate`), ``limits`` (:class:`JobLimits`) and ``over``
    (``[(resource, estimate, limit)]``) say by how much."""

    def __init__(self, kind: str, est: CostEstimate, limits: JobLimits, over: list) -> None:
        self.kind, self.estimate, self.limits, self.over = kind, est, limits, over
        parts = "; ".join(_over_text(what, e, lim) for what, e, lim in over)
        families = {"disk" if w in LEFT_RESOURCES else w for w, _, _ in over}
        top = sorted(
            ((k, v) for k, v in est.parts.items() if k.split(":")[0] in families),
            key=lambda kv: -kv[1],
        )[:3]
        biggest = ", ".join(f"{k.split(':', 1)[1]} {_fmt(k.split(':')[0], v)}" for k, v in top)
        quota = (
            "; delete recordings or jobs you no longer need (DELETE /api/recordings/ID, "
            "/api/jobs/ID) to free your storage quota"
            if any(w == "storage quota" for w, _, _ in over)
            else ""
        )
        super().__init__(
            f"this {kind} job is estimated to need more than you may use: {parts} (largest "
            f"parts: {biggest}){quota}; make it smaller, or ask an admin to raise your limit "
            "(PUT /api/users/<you>/limits, `calseg users limits`)"
        )

    def errors(self) -> list[dict[str, Any]]:
        """One pydantic-style error per resource over its limit (``input`` = the estimate)."""
        return [
            {
                "type": "cost_limit",
                "loc": ["body", "params"],
                "msg": f"estimated {_over_text(what, e, lim)}",
                "input": float(e),
            }
            for what, e, lim in self.over
        ]


class QuotaExceeded(RuntimeError):
    """The owner has as many queued or running jobs as their quota allows (API: 429)."""


def _over_text(what: str, value: float, limit: float) -> str:
    """``memory 3 GiB > limit 2 GiB``, or for what is left (:data:`LEFT_RESOURCES`)
    ``storage quota: 1.79 MiB needed, 0 MiB left`` (it said "storage quota 1.79 MiB > limit
    0 MiB" of a 2 MiB quota, read as a quota of 0: a lab admin's check)."""
    if what in LEFT_RESOURCES:
        return f"{what}: {_fmt('disk', value)} needed, {_fmt('disk', limit)} left"
    return f"{what} {_fmt(what, value)} > limit {_fmt(what, limit)}"


def _fmt(what: str, value: float) -> str:
    if what == "time":
        return f"{value:.3g} s" + (f" ({value / 3600:.3g} h)" if value >= 3600 else "")
    if value >= 1024 * GIB:
        return f"{value / (1024 * GIB):.3g} TiB"
    return f"{value / GIB:.3g} GiB" if value >= 0.1 * GIB else f"{value / 1024**2:.3g} MiB"


def allowed_devices(settings: Settings) -> list[str]:
    """Devices jobs may ask for: ``settings.allowed_devices``, or (None) ``auto`` and ``cpu``
    plus ``cuda`` when torch sees a GPU in this process (the embedded service's worker runs on
    the same machine)."""
    if settings.allowed_devices is not None:
        return list(settings.allowed_devices)
    devices = ["auto", "cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch, no GPU
        pass
    return devices


def check_device(kind: str, params: Any, settings: Settings) -> None:
    """Refuse (ParamsError, 422 on ``params.device``) a device this server does not run jobs
    on (:func:`allowed_devices`). Also run by ``POST /api/jobs/estimate``, which answered
    ``fits`` for a device that the submit then refused (a new-user check)."""
    from calseg.service.schemas import ParamsError

    device = getattr(params, "device", None)
    if device is None:
        return
    allowed = allowed_devices(settings)
    if device not in allowed:
        raise ParamsError(
            kind,
            [
                {
                    "type": "device",
                    "loc": ("device",),
                    "msg": f"this server runs jobs on {', '.join(allowed)}; "
                    f"{device!r} is not one of them",
                    "input": device,
                }
            ],
        )


def check_admission(
    session: Session,
    kind: str,
    params: Any,
    owner: User | None,
    settings: Settings,
    replacing_job_id: str | None = None,
) -> CostEstimate:
    """Refuse a job before it is queued: a device the server does not run (ParamsError, 422),
    a full queue quota (:class:`QuotaExceeded`, 429), or an estimate over the owner's limits
    (:class:`JobTooCostly`, 422). ``owner`` None (internal calls) is checked against the
    server's limits without a quota. ``replacing_job_id``: the job a retry runs again (its old
    files and estimate do not count against the storage quota).

    Returns:
        The job's :class:`CostEstimate` (within the limits).
    """
    check_device(kind, params, settings)
    limits = effective_limits(owner, settings, session)
    if owner is not None:
        active = (
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.owner_id == owner.id, Job.state.in_(("queued", "running")))
            )
            or 0
        )
        if active >= limits.max_queued_jobs:
            raise QuotaExceeded(
                f"user {owner.name} has {active} queued or running jobs and may have "
                f"{limits.max_queued_jobs} (quota); wait for some to end or cancel some (an "
                "admin can raise max_queued_jobs)"
            )
    est = estimate(session, kind, params, settings)
    left = storage_left_bytes(session, owner, limits, replacing_job_id)
    over = RunningLimits(limits, reserved_disk_bytes(session), left).over(est, settings)
    if over:
        raise JobTooCostly(kind, est, limits, over)
    return est


def with_cell_traces(
    est: CostEstimate, n_cells: int, n_frames: int, time_scale: float = 1.0
) -> CostEstimate:
    """``est`` with the cost of the traces, events and ROIs of ``n_cells`` cells over
    ``n_frames`` frames added (:data:`CONSTANTS` ``trace_*``): per cell and frame, which an
    estimate per recorded pixel does not see. A 9th attack run made every pixel of a 128 x 128
    px recording a cell (16,199 cells; ``cell_diameter_px`` 1.01, ``min_region_px`` 1): its
    infer job ran 4-8x and wrote 17-18x its estimate. Known once the segmentation has run:
    the infer job is admitted again then (:func:`readmit`)."""
    c = CONSTANTS
    cell_frames = float(n_cells) * float(n_frames)
    parts = dict(est.parts)
    parts["time:traces per cell"] = cell_frames * c["trace_cell_frame_s"] * time_scale
    parts["disk:traces per cell"] = cell_frames * c["trace_cell_frame_b"]
    parts["memory:traces per cell"] = cell_frames * c["trace_mem_b_per_cell_frame"]
    return CostEstimate(
        est.memory_bytes + parts["memory:traces per cell"],
        est.disk_bytes + parts["disk:traces per cell"],
        est.time_s + parts["time:traces per cell"],
        parts,
        {**est.inputs, "n_cells": int(n_cells)},
    )


def running_job_limits(session: Session, job: Job, settings: Settings) -> RunningLimits:
    """What a job that has started may still use (:class:`RunningLimits`): its owner's limits,
    what is left of their storage quota and of the free disk with everything but this job
    counted (other jobs' estimates reserved, this job's own estimate not)."""
    owner = session.get(User, job.owner_id) if job.owner_id else None
    limits = effective_limits(owner, settings, session)
    reserved = reserved_disk_bytes(session)
    if job.state in ("queued", "running"):
        reserved -= int(job.estimated_disk_bytes or 0)
    return RunningLimits(
        limits, max(reserved, 0), storage_left_bytes(session, owner, limits, job.id)
    )


@dataclass
class RunningLimits:
    """What one job may use, at its admission (:func:`check_admission`) or once it has started
    (:func:`running_job_limits`): ``limits`` (the owner's :class:`JobLimits`),
    ``reserved_bytes`` (other queued and running jobs' disk estimates), ``storage_left``
    (bytes left of the owner's quota without this job; None: no quota)."""

    limits: JobLimits
    reserved_bytes: int
    storage_left: int | None

    def over(self, est: CostEstimate, settings: Settings) -> list[tuple[str, float, float]]:
        """:func:`over_limits` of ``est`` against these."""
        return over_limits(est, self.limits, settings, self.reserved_bytes, self.storage_left)

    def disk_bytes(self, settings: Settings) -> int:
        """The most a job may write: the owner's ``max_job_disk_bytes``, what is left of
        their storage quota, and the free disk less ``min_free_disk_bytes`` and the other
        jobs' reserve (as :func:`over_limits` compares estimates with)."""
        room = [int(self.limits.max_job_disk_bytes)]
        if self.storage_left is not None:
            room.append(int(self.storage_left))
        free = disk_room_bytes(settings, self.reserved_bytes)
        if free is not None:
            room.append(free)
        return min(room)


def readmit(
    session: Session, job_id: str, est: CostEstimate, settings: Settings, why: str = ""
) -> CostEstimate:
    """Admission again, for a job that has started, with an estimate made from what it now
    knows: the inputs of its references once they have ended (a fine-tune of a dataset that
    was still being simulated when it was admitted, estimated then from the parameters), or
    the configuration its runner derived (a simulation fitted to a recording renders the
    fitted field, frame count and cell size, not the recording's). Within the owner's limits,
    the job's reserve on the disk and their quota (``jobs.estimated_disk_bytes``) becomes
    ``est``'s disk; over them, :class:`JobTooCostly` (an 8th attack run: a 640 kB upload
    of 5000 frames of 8 x 8 px, admitted as a simulation of that size, rendered 5000 x 104 x
    104 px videos and wrote 119 x its estimate, past its owner's quota).

    Args:
        session: database session (committed by the caller).
        job_id: the running job.
        est: its new estimate.
        why: what the estimate is of, for the message ("the simulation fitted to ...").

    Returns:
        ``est``.

    Raises:
        JobTooCostly: over a limit (its message begins with ``why``).
    """
    job = session.get(Job, job_id)
    if job is None:
        return est
    running = running_job_limits(session, job, settings)
    over = running.over(est, settings)
    if over:
        exc = JobTooCostly(job.kind, est, running.limits, over)
        if why:
            exc.args = (f"{why}: {exc.args[0]}",)
        raise exc
    job.estimated_disk_bytes = int(est.disk_bytes)
    return est


def storage_used_bytes(session: Session, owner_id: str, exclude_job_id: str | None = None) -> int:
    """Bytes a user has on the server: their uploaded recordings (``recordings.size_bytes``),
    the folders their ended jobs left (``jobs.stored_bytes``, measured when each ended; for a
    job that started but was not measured, its estimate; a job that never started wrote
    nothing) and the estimated writes of their queued and running jobs
    (``jobs.estimated_disk_bytes``, the embedding-cache part of the estimate included: it errs
    on the side of the disk). The embedding cache itself (a folder per user, pruned together
    on its own: :func:`calseg.service.jobproc.prune_embedding_cache`) is not counted once a
    job has ended. ``exclude_job_id``: a job left out (one being retried, whose old files go and
    whose new estimate is what is checked)."""
    others = Job.id != exclude_job_id if exclude_job_id is not None else True
    recordings = session.scalar(
        select(func.coalesce(func.sum(Recording.size_bytes), 0)).where(
            Recording.owner_id == owner_id
        )
    )
    unmeasured = case((Job.started_at.is_not(None), Job.estimated_disk_bytes), else_=0)
    ended = session.scalar(
        select(func.coalesce(func.sum(func.coalesce(Job.stored_bytes, unmeasured)), 0)).where(
            Job.owner_id == owner_id, Job.state.not_in(("queued", "running")), others
        )
    )
    active = session.scalar(
        select(func.coalesce(func.sum(Job.estimated_disk_bytes), 0)).where(
            Job.owner_id == owner_id, Job.state.in_(("queued", "running")), others
        )
    )
    return int(recordings or 0) + int(ended or 0) + int(active or 0)


def storage_left_bytes(
    session: Session, owner: User | None, limits: JobLimits, exclude_job_id: str | None = None
) -> int | None:
    """What ``owner`` may still store under their quota (bytes, at least 0); None without an
    owner or a quota. ``exclude_job_id``: as :func:`storage_used_bytes`."""
    if owner is None or limits.max_storage_bytes is None:
        return None
    used = storage_used_bytes(session, owner.id, exclude_job_id)
    return max(int(limits.max_storage_bytes) - used, 0)


def free_disk_bytes(settings: Settings) -> int | None:
    """Free bytes on the file system of the local artifact store (``shutil.disk_usage``);
    None for a remote store (``store_url``) or when it cannot be read."""
    import shutil

    if settings.store_url:
        return None
    folder = settings.artifact_dir
    while not folder.exists() and folder != folder.parent:  # not made yet: its parent's disk
        folder = folder.parent
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def disk_room_bytes(settings: Settings, reserved_bytes: int = 0) -> int | None:
    """What a job may write and still leave ``settings.min_free_disk_bytes`` free on the
    artifact store's disk: its free bytes less that and less ``reserved_bytes`` (the other
    queued and running jobs' estimates), at least 0; None where the free disk is not known
    (:func:`free_disk_bytes`)."""
    free = free_disk_bytes(settings)
    if free is None:
        return None
    return max(free - settings.min_free_disk_bytes - reserved_bytes, 0)


def reserved_disk_bytes(session: Session) -> int:
    """Bytes the queued and running jobs of all users were estimated to write
    (``jobs.estimated_disk_bytes``, kept at admission; jobs admitted before migration 0006
    count 0). A running job's bytes already written count twice (in the reserve and no longer
    in the free disk): the reserve errs on the side of the disk."""
    total = session.scalar(
        select(func.coalesce(func.sum(Job.estimated_disk_bytes), 0)).where(
            Job.state.in_(("queued", "running"))
        )
    )
    return int(total or 0)


def over_limits(
    est: CostEstimate,
    limits: JobLimits,
    settings: Settings,
    reserved_bytes: int = 0,
    storage_left: int | None = None,
) -> list[tuple[str, float, float]]:
    """``[(resource, estimate, limit)]`` of each resource the estimate exceeds: the owner's
    memory, disk and time limits, the free disk of the artifact store less
    ``settings.min_free_disk_bytes`` and less ``reserved_bytes`` (the estimates of the queued
    and running jobs, :func:`reserved_disk_bytes`) ("free disk"; a new-user check got ``fits``
    for 134 GB of writes with 66 GB free, and three 36 GiB jobs were admitted one after the
    other with 59 GiB free), and what is left of the owner's storage quota (``storage_left``,
    :func:`storage_left_bytes`; None: no quota) ("storage quota")."""
    checks = [
        ("memory", est.memory_bytes, limits.max_job_memory_bytes),
        ("disk", est.disk_bytes, limits.max_job_disk_bytes),
        ("time", est.time_s, limits.max_job_time_s),
    ]
    room = disk_room_bytes(settings, reserved_bytes)
    if room is not None:
        checks.append(("free disk", est.disk_bytes, room))
    if storage_left is not None:
        checks.append(("storage quota", est.disk_bytes, storage_left))
    return [(what, value, limit) for what, value, limit in checks if value > limit]
