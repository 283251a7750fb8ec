"""From cytosolic Ca2+ to camera counts: :func:`render_video` runs a chain of named stages.

A recording is rendered by a chain of :class:`~calseg.simulate.stages.Stage` objects
(:mod:`calseg.simulate.stages`) in the physical order of DESIGN.md section 3. Each stage has
its own parameters (dataclass fields: the constants of its model, with units and sources in its
docstring) and its own random stream, keyed by its name
(:func:`~calseg.simulate.stages.stage_seed`), so adding, removing or re-configuring one stage
changes no other stage's draws. A :class:`~calseg.simulate.stages.Defect` is a stage with a
severity in [0, 1]; the parameters it draws from that severity (per frame where physical) are
recorded per video in the manifest's ``defects`` entry of its name.

The chain (:func:`default_stages`), in order:

1. **Acquisition timing.** ``dropped_frames``, ``duplicated_frames``: which calcium frame each
   output frame shows.
2. **Indicator.** ``low_contrast`` (poor dynamic range, bright background), ``indicator``: the
   GECI's Hill curve and kinetics per cell (:mod:`calseg.simulate.indicator`; GCaMP6s Kd 144
   nM, n 2.9; 6f 375 nM, 2.27; 6m 167 nM, 2.96; Chen et al. 2013, Nature 499:295), relative
   fluorescence ``f = fmin + (1 - fmin) * b`` with ``fmin = Fmin / Fmax = 1 / dynamic_range``
   (Fmax = 1), times a per-cell expression level (log-normal, sigma 0.25). Then
   ``spontaneous_luminescence`` (inactive cells that brighten without Ca2+) and
   ``photobleaching`` (exponential per frame).
3. **Scene and geometry.** ``texture`` (dim nucleus, dim membrane, smooth within-cell variation;
   dark outside the tissue); ``drift`` (stage drift and jitter) and ``radial_distortion``
   describe where each output pixel looks in the sample; ``scene`` samples the label image and
   the texture there (nearest neighbour, so the ground-truth labels move exactly with the image)
   and paints ``f`` times the texture; ``chromatic_aberration``.
4. **Optics.** ``z_projection`` (out-of-focus layer), ``psf`` (Gaussian PSF, sigma in px) with
   ``defocus`` (global, per frame), ``local_defocus``, ``motion_blur`` (kernel blur).
5. **Light.** ``background`` (uniform background + tissue autofluorescence),
   ``nonuniform_background``, ``debris`` (absorbing or bright particles),
   ``illumination_flicker`` (excitation light changing frame to frame), ``vignetting``.
6. **Camera.** ``camera``: expected photo-electrons = light * ``photon_scale`` (photo-electrons
   per pixel for an indicator at Fmax with texture 1), Poisson shot noise (normal
   approximation above 50 e-, :func:`shot_noise`), full-well clipping, fixed-pattern gain (PRNU)
   and offset (DSNU), Gaussian read noise; ``saturation`` (a lower full well),
   ``gaussian_noise`` (more read noise), ``patterned_readout_noise`` (row banding),
   ``auto_gain`` (the camera's automatic gain control), then ``adc``: ``ADU = offset + gain *
   electrons`` rounded and clipped to the ADC range (12 or 16 bit stored as uint16; 8 bit as
   uint8).
7. **Acquisition software.** ``contrast_normalisation``: each frame rescaled to its own
   percentiles.

**Intensity scale.** The output is camera ADU: ``ADU = offset_adu + gain_adu_per_e *
photo-electrons``, with the per-video ``offset_adu``, ``gain_adu_per_e`` and ``photon_scale``
recorded in the metadata (``defects["camera"]``). By default nothing is normalised per frame,
so a frame's mean rises and falls with the number of active cells. The global intensity
defects (``illumination_flicker``, ``auto_gain``, ``contrast_normalisation``;
:data:`INTENSITY_DEFECTS`) change that on purpose; they are off unless switched on
(``defects={"auto_gain": {"enabled": True}}`` or a fixed ``{"severity": s}``;
:class:`calseg.simulate.config.DefectSetting`), so datasets without them are unchanged. They
change the image only, never the ground truth.

**Adding a defect.** Write a :class:`~calseg.simulate.stages.Defect` subclass (a dataclass
with a unique ``name``, its parameters as fields, ``plan`` for the per-video draws and
``apply`` for the per-frame work) and put it at its physical place in
:data:`~calseg.simulate.stages.STAGE_TYPES` (or pass a chain with it as ``stages=``). Its
stream is its own, so every other stage draws and renders as before (shown byte for byte in
``tests/test_simulate_render.py::test_adding_a_defect_changes_no_other_stage``); make it off
by default (``enabled_by_default = False``) and existing datasets stay byte for byte the same
(their manifests gain its entry at severity 0).

**Severity.** Per video, an enabled defect is present with probability ``defect_severity`` and
then has severity ``defect_severity * U(0.5, 1)`` (both drawn from its own stream); a setting
may fix its severity or switch it off.

**Implementation.** Every stage first prepares the video (per-video parameters and static
fields: texture, distortion map, local-defocus weights, background, vignetting, PRNU / DSNU,
per-frame parameter series) in chain order; then each frame runs the per-frame work of the
stages that have some, in float32 (memory: the output stacks plus a few frames per thread),
frames spread over threads. Each frame draws its noise from its own per-stage streams, so a
seed reproduces the video bit for bit whatever the thread count.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from calseg.fmt import first_of
from calseg.progress import ProgressFn, check_cancelled
from calseg.simulate.geometry import Tissue
from calseg.simulate.indicator import (
    INDICATORS,
    Indicator,
    IndicatorSpec,
    active_mask,
    hill,
    indicator_fluorescence,
)
from calseg.simulate.stages import (
    DEFAULT_DEFECTS,
    DEFECTS,
    INTENSITY_DEFECTS,
    NORMAL_APPROX_MIN_E,
    STAGE_TYPES,
    Defect,
    Frame,
    RenderError,
    Stage,
    Video,
    cell_texture,
    default_stages,
    draw_severity,
    shot_noise,
    stage_key,
    stage_seed,
)

__all__ = [
    "DEFAULT_DEFECTS",
    "DEFECTS",
    "INDICATORS",
    "INTENSITY_DEFECTS",
    "NORMAL_APPROX_MIN_E",
    "STAGE_TYPES",
    "Defect",
    "Frame",
    "Indicator",
    "IndicatorSpec",
    "RenderError",
    "Stage",
    "Video",
    "active_mask",
    "cell_texture",
    "default_stages",
    "draw_severity",
    "hill",
    "indicator_fluorescence",
    "render_video",
    "shot_noise",
    "stage_key",
    "stage_seed",
]


def _check_defect_settings(
    settings: Mapping[str, Mapping[str, Any]] | None, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, setting in (settings or {}).items():
        if name not in names:
            raise RenderError(f"unknown defect {name!r}; use one of {sorted(names)}")
        setting = dict(setting or {})
        extra = set(setting) - {"enabled", "severity"}
        if extra:
            raise RenderError(
                f"defect {name!r}: unknown setting(s) {first_of([repr(k) for k in sorted(extra)])}"
            )
        enabled, severity = setting.get("enabled"), setting.get("severity")
        if not (enabled is None or isinstance(enabled, bool)):
            raise RenderError(f"defect {name!r}: enabled must be true, false or null")
        if severity is not None and (
            isinstance(severity, bool)
            or not isinstance(severity, int | float)
            or not 0.0 <= float(severity) <= 1.0
        ):
            raise RenderError(
                f"defect {name!r}: severity must be a number in [0, 1], got {severity!r}"
            )
        if enabled is False and severity:
            raise RenderError(f"defect {name!r}: disabled but given severity {severity}")
        out[name] = setting
    return out


def _render_frames(
    video: Video,
    stages: Sequence[Stage],
    image: np.ndarray,
    labels: np.ndarray,
    n_threads: int,
    progress: ProgressFn | None,
    stage_seconds: dict[str, float] | None,
) -> None:
    """Run the per-frame stages on every frame, ``n_threads`` frames at a time, reporting
    progress from the calling thread at most every half second (and after the last frame); an
    exception from ``progress`` (e.g. a cancellation) stops the rendering."""
    lock = threading.Lock()

    def render_frame(t: int) -> None:
        check_cancelled()  # also from the pool's threads (the job's process-wide token)
        frame = Frame(t)
        if stage_seconds is None:
            for stage in stages:
                stage.apply(video, frame)
        else:
            spent = []
            for stage in stages:
                start = time.perf_counter()
                stage.apply(video, frame)
                spent.append((stage.name, time.perf_counter() - start))
            with lock:
                for name, s in spent:
                    stage_seconds[name] = stage_seconds.get(name, 0.0) + s
        image[t] = frame.pixels
        labels[t] = frame.ground_truth

    n_out = video.n_frames
    last_report = time.monotonic()

    def report(done: int) -> None:
        nonlocal last_report
        now = time.monotonic()
        if progress is not None and (done == n_out or now - last_report >= 0.5):
            last_report = now
            progress(done / n_out, "render", f"frame {done}/{n_out}")

    if n_threads > 1 and n_out > 1:
        # NumPy, OpenCV and the generators release the GIL on whole-frame operations.
        pool = ThreadPoolExecutor(n_threads)
        try:
            for done, _ in enumerate(pool.map(render_frame, range(n_out)), 1):
                report(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for t in range(n_out):
            render_frame(t)
            report(t + 1)


def render_video(
    tissue: Tissue,
    calcium_uM: np.ndarray,
    rng: np.random.Generator,
    frame_interval_s: float,
    n_frames: int | None = None,
    indicator: Indicator | str = "GCaMP6s",
    defect_severity: float = 0.3,
    bit_depth: Literal[8, 16] = 16,
    threshold_uM: float = 0.1,
    hysteresis_low_uM: float | None = None,
    n_threads: int | None = None,
    imaging: dict | None = None,
    *,
    defects: Mapping[str, Mapping[str, Any]] | None = None,
    stages: Sequence[Stage] | None = None,
    progress: ProgressFn | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Render a recording and its exact ground truth through the chain of stages.

    Args:
        tissue: the geometry (labels (H, W), cell i has id i + 1).
        calcium_uM: (N, T_src) cytosolic Ca2+ (uM) at consecutive frame times; T_src may exceed
            ``n_frames`` to leave room for dropped frames.
        rng: the rendering random stream; one base seed is drawn from it, from which every
            stage's own stream derives (:func:`stage_seed`).
        frame_interval_s: time between frames (s).
        n_frames: frames to output (default T_src).
        indicator: GCaMP variant.
        defect_severity: global defect severity in [0, 1] (0 = clean physics only).
        bit_depth: 16 (uint16, 12- or 16-bit ADC) or 8 (uint8).
        threshold_uM, hysteresis_low_uM: activity definition for the labels.
        n_threads: frames rendered in parallel (default: the CPUs available to the process,
            at most 4). The output does not depend on it: each frame draws its noise from its
            own streams.
        imaging: optional pinned imaging parameters (keys of
            :class:`calseg.simulate.config.ImagingOverrides`: ``gain_adu_per_e``,
            ``offset_adu``, ``read_noise_e``, ``adc_bits``, ``photon_scale_e``, ``background``,
            ``autofluorescence``, ``vignetting``, ``psf_sigma_px``, ``bleach_tau_s``,
            ``fmin_over_fmax``). Each replaces the value drawn at random (after the draw, so
            the random streams and everything else stay the same).
        defects: per-defect settings ``{name: {"enabled": bool | None, "severity": float |
            None}}`` (:func:`draw_severity`); e.g. ``{"auto_gain": {"enabled": True}}`` draws
            it like the others, ``{"drift": {"severity": 0}}`` removes drift.
        stages: the chain (default :func:`default_stages`); the objects are copied, not
            changed. A custom chain can add a stage anywhere without changing the others'
            draws.
        progress: optional :data:`calseg.progress.ProgressFn`, called from this thread with
            the fraction of frames rendered (stage ``"render"``) at most every 0.5 s and after
            the last frame; an exception it raises stops the rendering.
        stage_seconds: if a dict is given, the per-frame seconds spent in each stage (summed
            over frames and threads) are added to it (for benchmarks).

    Returns:
        ``(image, labels, calcium, meta)``: image (T, H, W) uint16 (uint8 for 8 bit) camera ADU;
        labels (T, H, W) uint32 instance ids (cell index + 1) of the ACTIVE cells, moved with the
        image; calcium (N, T) float32 uM at the frames shown (after dropped / duplicated frames);
        meta: ``{"defects": {name: {..., "severity": s}}, "texture": ..., "frame_source_index":
        [...], ...}`` (JSON-serialisable).
    """
    calcium_uM = np.asarray(calcium_uM, np.float32)
    n, n_src = calcium_uM.shape
    if n != tissue.n_cells:
        raise RenderError(f"calcium has {n} cells but the tissue has {tissue.n_cells}")
    if indicator not in INDICATORS:
        raise RenderError(f"unknown indicator {indicator!r}; use one of {sorted(INDICATORS)}")
    t_out = n_src if n_frames is None else int(n_frames)
    if not 1 <= t_out <= n_src:
        raise RenderError(f"n_frames={t_out} must be between 1 and the {n_src} calcium frames")
    if not 0.0 <= float(defect_severity) <= 1.0:
        raise RenderError(f"defect_severity must be in [0, 1], got {defect_severity}")
    if bit_depth not in (8, 16):
        raise RenderError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if n_threads is None:
        n_threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if n_threads < 1:
        raise RenderError(f"n_threads must be >= 1 (frames rendered in parallel), got {n_threads}")
    chain = [copy.copy(s) for s in (default_stages() if stages is None else stages)]
    names = [s.name for s in chain]
    if len(set(names)) != len(names):
        raise RenderError(f"stage names must be unique, got {names}")
    video = Video(
        tissue=tissue,
        calcium_src=calcium_uM,
        frame_interval_s=float(frame_interval_s),
        n_frames=t_out,
        indicator=indicator,
        bit_depth=int(bit_depth),
        threshold_uM=threshold_uM,
        hysteresis_low_uM=hysteresis_low_uM,
        imaging={k: v for k, v in (imaging or {}).items() if v is not None},
        defect_severity=float(defect_severity),
        defect_settings=_check_defect_settings(
            defects, [s.name for s in chain if isinstance(s, Defect)]
        ),
        base_seed=int(rng.integers(0, 2**63 - 1)),
    )
    per_frame = [stage for stage in chain if stage.prepare(video)]
    h, w = video.shape
    image = np.empty((t_out, h, w), np.uint8 if bit_depth == 8 else np.uint16)
    labels = np.empty((t_out, h, w), np.uint32)
    _render_frames(video, per_frame, image, labels, n_threads, progress, stage_seconds)
    for stage in chain:
        stage.finish(video)
    meta = {
        "defects": video.records,
        "texture": video.texture_meta,
        "indicator": indicator,
        "frame_source_index": video.frame_source_index.tolist(),
        "n_active_per_frame": video.active.sum(0).tolist(),
    }
    return image, labels, video.calcium.astype(np.float32), meta
