"""The rendering chain's stages: from cytosolic Ca2+ to camera counts, one named step each.

A :class:`Stage` has a name, its own parameters (dataclass fields: the constants of its model,
with units and sources in its docstring) and its own random stream keyed by its name
(:func:`stage_seed`). A :class:`Defect` is a stage with a severity in [0, 1]
(:func:`draw_severity`); what it draws from that severity (per frame where physical) is
recorded in the manifest's ``defects`` entry of its name. :data:`STAGE_TYPES` lists the
default chain in the physical order of DESIGN.md section 3; :func:`calseg.simulate.render.
render_video` runs it (the module docstring there describes the whole chain).

Every stage first :meth:`Stage.prepare` s the :class:`Video` (per-video parameters and static
fields) in chain order, reading what earlier stages left there; then each :class:`Frame` runs
the :meth:`Stage.apply` of the stages with per-frame work, in float32, on worker threads.

**Random streams.** ``render_video`` draws one 63-bit base seed from the rendering stream it is
given; each stage's per-video stream is ``SeedSequence([base, key(name), 0])`` and its per-frame
stream (noise) ``SeedSequence([base, key(name), 1, t])``, with ``key`` the first 8 bytes of the
SHA-256 of the name (:func:`stage_key`; not Python's salted ``hash()``). Adding, removing or
re-configuring a stage therefore changes no other stage's draws, and frames draw their noise
independently of the thread that renders them.

Filters: OpenCV Gaussian / kernel filters with the kernels and borders of ``scipy.ndimage``
(tested). Shot noise is exact Poisson below :data:`NORMAL_APPROX_MIN_E` expected
photo-electrons and its normal approximation above (:func:`shot_noise`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
from scipy import ndimage

from calseg.simulate.geometry import Tissue
from calseg.simulate.indicator import INDICATORS, active_mask, indicator_fluorescence


class RenderError(ValueError):
    """Raised for inconsistent rendering inputs."""


# --------------------------------------------------------------------------------------------
# Image-formation helpers

NORMAL_APPROX_MIN_E = 50.0
"""Expected photo-electrons per pixel above which shot noise uses the normal approximation."""


def shot_noise(
    expected_e: np.ndarray, rng: np.random.Generator, min_normal_e: float = NORMAL_APPROX_MIN_E
) -> np.ndarray:
    """Photon shot noise: photo-electron counts for expected counts ``expected_e``.

    Where the expectation ``lam`` exceeds ``min_normal_e`` the Poisson draw is replaced by its
    normal approximation ``rint(lam + sqrt(lam) * z)``, z ~ N(0, 1) (clipped at 0); below it the
    draw is exact Poisson. The approximation keeps the Poisson mean (rounding bias < 1e-3 e-) and
    variance (``lam + 1/12`` from the rounding, relative error <= 1/(12 * 50) = 0.17 %); what it
    drops is the skewness ``1/sqrt(lam)`` (<= 0.14 at 50 e-, 0.02 at the 2,000-3,000 e- of a
    bright cell), far below what the read noise and quantisation of the camera leave visible
    (central limit theorem; e.g. Devroye 1986, Non-Uniform Random Variate Generation, ch. X).

    Args:
        expected_e: (...) float32 expected photo-electrons (>= 0).
        rng: random generator; draws ``expected_e.size`` float32 normals, then Poisson
            variates for the pixels below ``min_normal_e``.
        min_normal_e: threshold (e-); ``np.inf`` gives exact Poisson everywhere.

    Returns:
        float32 array of the same shape, integer-valued photo-electron counts.
    """
    lam = np.asarray(expected_e, np.float32)
    out = rng.standard_normal(lam.shape, dtype=np.float32)
    out *= np.sqrt(np.maximum(lam, 0))
    out += lam
    np.rint(out, out=out)
    np.maximum(out, 0, out=out)
    low = lam < min_normal_e
    if low.any():
        out[low] = rng.poisson(np.maximum(lam[low], 0).astype(np.float64))
    return out


def _gauss(img: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    """2-D Gaussian blur of an (H, W) float32 frame, as ``scipy.ndimage.gaussian_filter(img,
    sigma, truncate=truncate)`` (same kernel radius and 'reflect' border) but with OpenCV."""
    r = int(truncate * sigma + 0.5)
    return cv2.GaussianBlur(
        img, (2 * r + 1, 2 * r + 1), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
    )


def _convolve_nearest(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.convolve(img, kernel, mode='nearest')`` for an (H, W) float32 frame and a
    square kernel, with OpenCV (correlation with the flipped kernel, same origin)."""
    n = kernel.shape[0]
    a = n // 2 - (0 if n % 2 else 1)
    return cv2.filter2D(
        img, -1, kernel[::-1, ::-1].copy(), anchor=(a, a), borderType=cv2.BORDER_REPLICATE
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (H, W) float32: white noise blurred with a
    Gaussian of ``sigma`` px. For ``sigma >= 8`` px the noise is drawn and blurred on a grid
    ``sigma // 4`` times coarser and interpolated bilinearly (the field varies over ``sigma``, so
    this is the same kind of field at a fraction of the cost)."""
    if sigma < 8:
        noise = rng.standard_normal(shape, dtype=np.float32)
        f = _gauss(noise, sigma, 4.0)
    else:
        step = int(sigma // 4)
        small = (-(-shape[0] // step) + 1, -(-shape[1] // step) + 1)
        noise = rng.standard_normal(small, dtype=np.float32)
        f = ndimage.gaussian_filter(noise, sigma / step)
        f = cv2.resize(f, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return (f - f.mean()) / (f.std() + 1e-12)


def cell_texture(tissue: Tissue, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Static multiplicative texture (H, W) float32 of the cells: dim nucleus, dim membrane,
    smooth within-cell variation; 0 outside the tissue. Returns (texture, parameters)."""
    lab = tissue.labels
    h, w = lab.shape
    inside = lab > 0
    yy, xx = np.indices((h, w), dtype=np.float32)
    cen = np.vstack([[0.0, 0.0], tissue.centroids]).astype(np.float32)
    radius = np.concatenate([[1.0], np.sqrt(tissue.areas / np.pi)]).astype(np.float32)
    n = tissue.n_cells
    # Nucleus offset from the centroid, radius and dimming per cell.
    off = rng.normal(0, 0.15, (n + 1, 2)).astype(np.float32) * radius[:, None]
    nuc_r = rng.uniform(0.35, 0.5, n + 1).astype(np.float32)
    nuc_depth = float(rng.uniform(0.3, 0.5))
    dy = yy - (cen[lab, 0] + off[lab, 0])
    dx = xx - (cen[lab, 1] + off[lab, 1])
    rho = np.sqrt(dy * dy + dx * dx) / radius[lab]
    nucleus = 1.0 / (1.0 + np.exp(np.clip((rho - nuc_r[lab]) / 0.06, -50, 50)))
    tex = 1.0 - nuc_depth * nucleus
    # Membrane: pixels with a 4-neighbour of another label are dimmer.
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[1:, :] |= lab[:-1, :] != lab[1:, :]
    mem = float(rng.uniform(0.6, 0.85))
    tex = np.where(edge, tex * mem, tex)
    var = float(rng.uniform(0.05, 0.15))
    tex *= 1.0 + var * _smooth_field(rng, (h, w), 1.5)
    tex = np.where(inside, np.clip(tex, 0.05, None), 0.0).astype(np.float32)
    return tex, {"nucleus_dimming": nuc_depth, "membrane_factor": mem, "within_cell_cv": var}


# --------------------------------------------------------------------------------------------
# Random streams keyed by stage name


def stage_key(name: str) -> int:
    """Stable 64-bit key of a stage name: the first 8 bytes of its SHA-256 (little endian).

    Unlike Python's ``hash()`` (salted per process) it is the same on every run and machine.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def stage_seed(base_seed: int, name: str, *extra: int) -> np.random.SeedSequence:
    """Seed of the random stream of stage ``name`` for a rendering with ``base_seed``.

    The entropy is a fixed-length word list ``[base (2 words), key(name) (2 words), *extra]``
    (32-bit words), so two different ``(name, extra)`` never share a stream. The renderer uses
    ``extra = (0,)`` for a stage's per-video stream and ``(1, t)`` for its stream of frame t.

    Args:
        base_seed: 0 <= base_seed < 2**64 (drawn once per video from the rendering stream).
        name: stage name.
        extra: further non-negative integers < 2**32.
    """
    key = stage_key(name)
    m = 0xFFFFFFFF
    words = [base_seed & m, (base_seed >> 32) & m, key & m, key >> 32, *(int(e) for e in extra)]
    return np.random.SeedSequence(words)


# --------------------------------------------------------------------------------------------
# What the stages share


@dataclass(eq=False)
class CameraSettings:
    """Per-video camera parameters (set by the ``camera`` stage, adjusted by ``saturation`` and
    ``gaussian_noise``; recorded as ``defects["camera"]``).

    Attributes:
        photon_scale_e: photo-electrons per px of an indicator at Fmax with texture 1.
        gain_adu_per_e: ADC gain (ADU per photo-electron).
        offset_adu: ADC offset (ADU).
        read_noise_e: Gaussian read noise (photo-electrons rms).
        adc_bits: ADC range (8, 12 or 16 bit).
        full_well_e: full-well capacity (photo-electrons); counts above it are clipped.
        prnu: (H, W) float32 per-pixel gain, 1 + N(0, ``prnu_sigma``).
        dsnu: (H, W) float32 per-pixel offset (e-), N(0, ``dsnu_sigma_e``).
    """

    photon_scale_e: float
    gain_adu_per_e: float
    offset_adu: float
    read_noise_e: float
    adc_bits: int
    full_well_e: float
    prnu: np.ndarray
    dsnu: np.ndarray
    prnu_sigma: float = 0.01
    dsnu_sigma_e: float = 0.5

    @property
    def max_adu(self) -> int:
        return 2**self.adc_bits - 1


@dataclass(eq=False)
class Video:
    """One recording being rendered: its inputs and what the stages made of it so far.

    Stages fill the attributes below ``records`` in chain order during
    :meth:`Stage.prepare`; the per-frame :meth:`Stage.apply` only reads them. Shapes: T output
    frames, N cells, (H, W) frame.

    Attributes:
        tissue: the geometry (labels (H, W), cell i has id i + 1).
        calcium_src: (N, T_src) float32 cytosolic Ca2+ (uM) at consecutive frame times.
        frame_interval_s: time between frames (s).
        n_frames: T.
        indicator: GCaMP variant (key of :data:`INDICATORS`).
        bit_depth: 16 (uint16) or 8 (uint8) output.
        threshold_uM, hysteresis_low_uM: activity definition of the ground truth.
        imaging: pinned imaging parameters (keys of
            :class:`calseg.simulate.config.ImagingOverrides`).
        defect_severity: global defect severity in [0, 1].
        defect_settings: per-defect ``{"enabled": bool | None, "severity": float | None}``.
        base_seed: base of the per-stage random streams (:func:`stage_seed`).
        records: ``{stage name: {..., "severity": s}}``, the manifest's ``defects``.
        frame_steps: (T,) int64 calcium frames advanced before each output frame (0 for the
            first; 2 after a dropped frame, 0 for a duplicated one).
        fmin_over_fmax: indicator Fmin / Fmax (``low_contrast``).
        light_level_scale: factor on background and autofluorescence (``low_contrast``).
        calcium: (N, T) float32 Ca2+ at the frames shown (``indicator``).
        active: (N, T) bool ground-truth activity (``indicator``).
        expression: (N,) float32 indicator expression level per cell (``indicator``).
        cell_fluorescence: (T, N + 1) float32 relative fluorescence per frame and cell id
            (id 0 = no cell, always 0) (``indicator``, then luminescence and bleaching).
        texture: (H, W) float32 static texture (``texture``).
        texture_meta: texture parameters (``texture``).
        shift_px: (T, 2) float64 sample shift (row, col) px per frame, or None (``drift``).
        source_rows, source_cols: (H, W) float32 sample coordinates seen by each output pixel
            through the lens, or None for the identity (``radial_distortion``).
        psf_sigma_px: in-focus Gaussian PSF sigma (px) (``psf``).
        blur_sigma_px: (T,) float64 PSF sigma per frame (``psf``, ``defocus``).
        static_light: (H, W) float32 background + autofluorescence (``background``,
            ``nonuniform_background``).
        illumination: (T,) float32 relative excitation intensity per frame
            (``illumination_flicker``; ones otherwise).
        vignette: (H, W) float32 relative light collection (``vignetting``), or None.
        camera: the camera parameters (``camera``, ``saturation``, ``gaussian_noise``).
    """

    tissue: Tissue
    calcium_src: np.ndarray
    frame_interval_s: float
    n_frames: int
    indicator: str
    bit_depth: int
    threshold_uM: float
    hysteresis_low_uM: float | None
    imaging: dict[str, Any]
    defect_severity: float
    defect_settings: dict[str, dict[str, Any]]
    base_seed: int
    records: dict[str, dict] = field(default_factory=dict)
    frame_steps: np.ndarray | None = None
    fmin_over_fmax: float | None = None
    light_level_scale: float = 1.0
    calcium: np.ndarray | None = None
    active: np.ndarray | None = None
    expression: np.ndarray | None = None
    cell_fluorescence: np.ndarray | None = None
    texture: np.ndarray | None = None
    texture_meta: dict = field(default_factory=dict)
    shift_px: np.ndarray | None = None
    source_rows: np.ndarray | None = None
    source_cols: np.ndarray | None = None
    psf_sigma_px: float = 1.0
    blur_sigma_px: np.ndarray | None = None
    static_light: np.ndarray | None = None
    illumination: np.ndarray | None = None
    vignette: np.ndarray | None = None
    camera: CameraSettings | None = None

    def __post_init__(self) -> None:
        if self.frame_steps is None:
            self.frame_steps = np.ones(self.n_frames, np.int64)
            self.frame_steps[0] = 0
        if self.illumination is None:
            self.illumination = np.ones(self.n_frames, np.float32)
        h, w = self.shape
        self._grid: tuple[np.ndarray, np.ndarray] | None = None
        self._radius2: np.ndarray | None = None
        self.center = ((h - 1) / 2, (w - 1) / 2)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) frame shape."""
        return self.tissue.labels.shape

    @property
    def n_cells(self) -> int:
        return self.tissue.n_cells

    @property
    def n_source_frames(self) -> int:
        return int(self.calcium_src.shape[1])

    @property
    def frame_source_index(self) -> np.ndarray:
        """(T,) int64 calcium frame shown in each output frame."""
        return np.cumsum(self.frame_steps)

    @property
    def times_s(self) -> np.ndarray:
        """(T,) float64 acquisition time of each output frame (s)."""
        return np.arange(self.n_frames) * self.frame_interval_s

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel row and column coordinates, two (H, W) float32 arrays (made once)."""
        if self._grid is None:
            yy, xx = np.indices(self.shape, dtype=np.float32)
            self._grid = (yy, xx)
        return self._grid

    @property
    def radius2(self) -> np.ndarray:
        """(H, W) float32 squared distance to the frame centre over that of the corners."""
        if self._radius2 is None:
            yy, xx = self.grid
            cy, cx = self.center
            self._radius2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(cy**2 + cx**2)
        return self._radius2

    def stream(self, name: str) -> np.random.Generator:
        """Per-video random stream of stage ``name``."""
        return np.random.default_rng(stage_seed(self.base_seed, name, 0))

    def frame_stream(self, name: str, t: int) -> np.random.Generator:
        """Random stream of stage ``name`` for frame ``t`` (independent of rendering order)."""
        return np.random.default_rng(stage_seed(self.base_seed, name, 1, t))

    def record(self, name: str, **values: Any) -> None:
        """Add ``values`` to the manifest entry ``defects[name]``."""
        self.records.setdefault(name, {"severity": 0.0}).update(values)


@dataclass(eq=False)
class Frame:
    """One frame on its way through the chain (made and used by one thread).

    Attributes:
        t: output frame index.
        pixels: (H, W) float32 image; its unit follows the chain: relative fluorescence
            (scene, optics), relative light (light), photo-electrons (camera), ADU (after
            ``adc``).
        ground_truth: (H, W) uint32 label image of the active cells (set by ``scene``).
    """

    t: int
    pixels: np.ndarray | None = None
    ground_truth: np.ndarray | None = None


class Stage:
    """One named step of the rendering chain.

    Subclasses set ``name`` (its random stream and its manifest entry) and may override:

    * :meth:`prepare`: per-video parameters and static fields, drawn from ``video.stream(name)``;
      returns whether the stage has per-frame work for this video;
    * :meth:`apply`: the per-frame work (called from worker threads: it may change ``frame``
      only, never ``video`` or ``self``, except for per-frame slots of arrays made in prepare);
    * :meth:`finish`: after the last frame (record what the frames measured).

    A stage object holds the state of one rendering: :func:`render_video` works on copies.
    """

    name: ClassVar[str] = ""

    def prepare(self, video: Video) -> bool:
        return False

    def apply(self, video: Video, frame: Frame) -> None:
        raise NotImplementedError(f"stage {self.name!r} has no per-frame work")

    def finish(self, video: Video) -> None:
        return None


def draw_severity(
    rng: np.random.Generator,
    defect_severity: float,
    setting: Mapping[str, Any] | None = None,
    enabled_by_default: bool = True,
) -> float:
    """Severity of one defect in one video.

    Always draws two uniforms from ``rng`` (presence, strength), so what the defect draws
    next does not depend on its setting. Enabled defects (by default, or ``"enabled": True``)
    are present with probability ``defect_severity`` and then have severity ``defect_severity *
    U(0.5, 1)``; ``"severity": s`` fixes it to ``s``; ``"enabled": False`` gives 0.

    Args:
        rng: the defect's own stream.
        defect_severity: global severity in [0, 1].
        setting: ``{"enabled": bool | None, "severity": float | None}`` (missing = None).
        enabled_by_default: whether the defect is drawn when ``enabled`` is None.

    Returns:
        Severity in [0, 1].
    """
    presence, strength = rng.uniform(), rng.uniform(0.5, 1.0)
    setting = setting or {}
    enabled, fixed = setting.get("enabled"), setting.get("severity")
    if enabled is False:
        return 0.0
    if fixed is not None:
        return float(fixed)
    if enabled is None and not enabled_by_default:
        return 0.0
    return float(defect_severity * strength) if presence < defect_severity else 0.0


class Defect(Stage):
    """A stage with a severity: :meth:`prepare` draws it (:func:`draw_severity`), records it
    and calls :meth:`plan`, which every defect runs, present or not, so its manifest entry
    always holds its neutral parameters too."""

    enabled_by_default: ClassVar[bool] = True
    severity: float = 0.0

    def prepare(self, video: Video) -> bool:
        rng = video.stream(self.name)
        setting = video.defect_settings.get(self.name)
        self.severity = draw_severity(rng, video.defect_severity, setting, self.enabled_by_default)
        video.records[self.name] = {"severity": self.severity}
        return self.plan(video, rng)

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        """Per-video parameters at ``self.severity``; returns whether to run :meth:`apply`."""
        return False


# --------------------------------------------------------------------------------------------
# 1. Acquisition timing


@dataclass
class DroppedFrames(Defect):
    """Frames lost between camera and disk: the frame after a dropped one shows the calcium two
    frame intervals later. Each frame after the first is dropped with probability
    ``probability * severity`` (as long as the calcium frames still cover the recording).
    Records ``frames`` (indices of the output frames after a gap)."""

    name: ClassVar[str] = "dropped_frames"
    probability: float = 0.08

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        n_out, n_src = video.n_frames, video.n_source_frames
        p = self.probability * self.severity
        draws = rng.uniform(size=n_out)
        steps = video.frame_steps
        dropped, src = [], 0
        for t in range(1, n_out):
            # room: the later frames still advance by at least 1 each
            if draws[t] < p and src + 2 + (n_out - 1 - t) <= n_src - 1:
                steps[t] = 2
                dropped.append(t)
            src += int(steps[t])
        video.record(self.name, frames=dropped)
        return False


@dataclass
class DuplicatedFrames(Defect):
    """Frames written twice (e.g. a frame grabber repeating its buffer): the frame shows the
    same calcium as the one before. Each frame after the first (not already after a dropped
    frame) is repeated with probability ``probability * severity``. Records ``frames``."""

    name: ClassVar[str] = "duplicated_frames"
    probability: float = 0.08

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        draws = rng.uniform(size=video.n_frames)
        p = self.probability * self.severity
        steps = video.frame_steps
        duplicated = [t for t in range(1, video.n_frames) if draws[t] < p and steps[t] == 1]
        steps[duplicated] = 0
        video.record(self.name, frames=duplicated)
        return False


# --------------------------------------------------------------------------------------------
# 2. Indicator


@dataclass
class LowContrast(Defect):
    """Poor indicator contrast: Fmin / Fmax raised from ``1 / dynamic_range`` towards
    ``fmin_over_fmax_at_1`` and background + autofluorescence scaled by ``1 + light_gain *
    severity`` (applied by the ``background`` stage). Records ``fmin_over_fmax`` (and, from
    ``background``, the ``background`` and ``autofluorescence`` levels)."""

    name: ClassVar[str] = "low_contrast"
    fmin_over_fmax_at_1: float = 0.5
    light_gain: float = 4.0

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        fmin = 1.0 / INDICATORS[video.indicator].dynamic_range
        drawn = fmin + self.severity * (self.fmin_over_fmax_at_1 - fmin)
        video.fmin_over_fmax = float(video.imaging.get("fmin_over_fmax", drawn))
        video.light_level_scale = 1.0 + self.light_gain * self.severity
        video.record(self.name, fmin_over_fmax=video.fmin_over_fmax)
        return False


@dataclass
class IndicatorResponse(Stage):
    """GECI fluorescence per cell and frame (:func:`indicator_fluorescence` at the frames shown)
    times a per-cell expression level ``LogNormal(0, expression_sigma)``; also the ground-truth
    activity (:func:`active_mask`) and the calcium at the frames shown."""

    name: ClassVar[str] = "indicator"
    expression_sigma: float = 0.25

    def prepare(self, video: Video) -> bool:
        rng = video.stream(self.name)
        src = video.frame_source_index
        video.calcium = video.calcium_src[:, src]
        fcell = indicator_fluorescence(
            video.calcium_src, video.indicator, video.frame_interval_s, video.fmin_over_fmax
        )[:, src]
        video.expression = rng.lognormal(0.0, self.expression_sigma, video.n_cells).astype(
            np.float32
        )
        video.active = active_mask(video.calcium, video.threshold_uM, video.hysteresis_low_uM)
        fluo = np.zeros((video.n_frames, video.n_cells + 1), np.float32)
        fluo[:, 1:] = (fcell * video.expression[:, None]).T
        video.cell_fluorescence = fluo
        return False


@dataclass
class SpontaneousLuminescence(Defect):
    """Cells that brighten without Ca2+ (not in the ground truth): ``round(cell_fraction *
    severity * N)`` cells (at least 1), each a Gaussian bump in time (peak frame U(0, T), width
    U(1, 4) frames, amplitude ``(0.2 + 0.6 * severity) * U(0.5, 1)`` of Fmax) added while the
    cell is inactive. Records ``cells`` (ids), ``peak_frame``, ``amplitude``."""

    name: ClassVar[str] = "spontaneous_luminescence"
    cell_fraction: float = 0.05

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev = self.severity
        if sev <= 0:
            return False
        n, n_out = video.n_cells, video.n_frames
        n_lum = max(1, int(round(self.cell_fraction * sev * n)))
        cells = rng.choice(n, n_lum, replace=False)
        onset = rng.uniform(0, n_out, n_lum)
        width = rng.uniform(1.0, 4.0, n_lum)
        amp = (0.2 + 0.6 * sev) * rng.uniform(0.5, 1.0, n_lum)
        tt = np.arange(n_out)[None, :]
        bump = amp[:, None] * np.exp(-0.5 * ((tt - onset[:, None]) / width[:, None]) ** 2)
        video.cell_fluorescence[:, cells + 1] += (bump * ~video.active[cells]).T.astype(np.float32)
        video.record(
            self.name,
            cells=(cells + 1).tolist(),
            peak_frame=onset.tolist(),
            amplitude=amp.tolist(),
        )
        return False


@dataclass
class Photobleaching(Defect):
    """Exponential loss of indicator fluorescence, ``exp(-t / tau)``, with ``tau = duration /
    (0.05 + severity) + frame interval`` (infinite at severity 0; pinned by ``imaging``
    ``bleach_tau_s``). Records ``tau_s`` and ``factor_per_frame``."""

    name: ClassVar[str] = "photobleaching"

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        times = video.times_s
        sev = self.severity
        tau = float(np.inf if sev == 0 else times[-1] / (0.05 + sev) + video.frame_interval_s)
        tau = float(video.imaging.get("bleach_tau_s", tau))
        factor = np.exp(-times / tau).astype(np.float32)
        video.record(self.name, tau_s=tau, factor_per_frame=factor.tolist())
        video.cell_fluorescence *= factor[:, None]
        return False


# --------------------------------------------------------------------------------------------
# 3. Scene and geometry


@dataclass
class CellTexture(Stage):
    """Static cell texture (:func:`cell_texture`): dim nucleus, membrane, within-cell
    variation; 0 outside the tissue."""

    name: ClassVar[str] = "texture"

    def prepare(self, video: Video) -> bool:
        video.texture, video.texture_meta = cell_texture(video.tissue, video.stream(self.name))
        return False


@dataclass
class Drift(Defect):
    """Stage drift and jitter: the sample moves by ``t * v + j_t`` px at frame t, with ``v ~
    N(0, (velocity_px_per_frame * severity)^2)`` per axis and jitter ``j_t ~ N(0, (jitter_px *
    severity)^2)``. Records ``shift_px_per_frame`` ((T, 2) row, col)."""

    name: ClassVar[str] = "drift"
    velocity_px_per_frame: float = 0.15
    jitter_px: float = 0.8

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev, n_out = self.severity, video.n_frames
        velocity = rng.normal(0, 1, 2) * self.velocity_px_per_frame * sev
        jitter = rng.normal(0, self.jitter_px * sev, (n_out, 2)) if sev > 0 else 0.0
        shift = np.arange(n_out)[:, None] * velocity[None, :] + jitter
        shift = np.broadcast_to(shift, (n_out, 2)).astype(np.float64)
        video.record(self.name, shift_px_per_frame=shift.round(3).tolist())
        video.shift_px = shift if sev > 0 else None
        return False


@dataclass
class RadialDistortion(Defect):
    """Barrel / pincushion distortion: output pixel at normalised radius r looks at radius ``r
    (1 + k1 r^2)`` (r^2 relative to the corner), ``k1 = +-k1_at_1 * severity``. Records
    ``k1``."""

    name: ClassVar[str] = "radial_distortion"
    k1_at_1: float = 0.25

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        k1 = float(rng.choice([-1, 1]) * self.k1_at_1 * self.severity)
        video.record(self.name, k1=k1)
        if k1 != 0:
            yy, xx = video.grid
            cy, cx = video.center
            factor = 1.0 + np.float32(k1) * video.radius2
            video.source_rows = (cy + (yy - cy) * factor).astype(np.float32)
            video.source_cols = (cx + (xx - cx) * factor).astype(np.float32)
        return False


@dataclass
class SceneFormation(Stage):
    """The in-focus image of the sample and its ground truth: each output pixel takes the cell
    id and texture at its sample coordinates (lens map minus drift, nearest neighbour; outside
    the frame = no tissue), then ``pixels = f[t, id] * texture`` and ``ground_truth = id`` where
    that cell is active (else 0). The labels therefore move exactly with the image."""

    name: ClassVar[str] = "scene"

    def prepare(self, video: Video) -> bool:
        h, w = video.shape
        self.moved = video.shift_px is not None or video.source_rows is not None
        if self.moved:
            yy, xx = video.grid
            self.rows = video.source_rows if video.source_rows is not None else yy
            self.cols = video.source_cols if video.source_cols is not None else xx
        self.labels = video.tissue.labels.astype(np.uint32)
        self.labels_flat = video.tissue.labels.ravel()
        self.texture_flat = video.texture.ravel()
        # (T, N + 1) bool: id 0 (no cell) never active
        self.active = np.zeros((video.n_frames, video.n_cells + 1), bool)
        self.active[:, 1:] = video.active.T
        self.index_dtype = np.int32 if h * w < 2**31 else np.int64
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        h, w = video.shape
        t = frame.t
        if self.moved:
            sy, sx = self.rows, self.cols
            if video.shift_px is not None:
                sy = sy - np.float32(video.shift_px[t, 0])
                sx = sx - np.float32(video.shift_px[t, 1])
            sy = np.rint(sy).astype(self.index_dtype)
            sx = np.rint(sx).astype(self.index_dtype)
            outside = (sy < 0) | (sy >= h) | (sx < 0) | (sx >= w)
            np.clip(sy, 0, h - 1, out=sy)
            np.clip(sx, 0, w - 1, out=sx)
            sy *= w
            sy += sx
            index = sy.ravel()
            ids = self.labels_flat[index].reshape(h, w).astype(np.uint32, copy=False)
            ids[outside] = 0
            texture = self.texture_flat[index].reshape(h, w)
            texture[outside] = 0.0
        else:
            ids, texture = self.labels, video.texture
        pixels = video.cell_fluorescence[t][ids]
        pixels *= texture
        frame.pixels = pixels
        frame.ground_truth = np.where(self.active[t][ids], ids, 0)  # uint32 like ids


@dataclass
class ChromaticAberration(Defect):
    """Lateral chromatic aberration across the emission band: a fraction ``shifted_fraction`` of
    the light is imaged with magnification ``1 + magnification_at_1 * severity``. Records
    ``magnification``."""

    name: ClassVar[str] = "chromatic_aberration"
    magnification_at_1: float = 0.01
    shifted_fraction: float = 0.4

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        if self.severity <= 0:
            return False
        h, w = video.shape
        mag = 1.0 + self.magnification_at_1 * self.severity
        video.record(self.name, magnification=mag)
        yy, xx = video.grid
        cy, cx = video.center
        sy = np.clip(np.rint(cy + (yy - cy) / mag), 0, h - 1).astype(np.int64)
        sx = np.clip(np.rint(cx + (xx - cx) / mag), 0, w - 1).astype(np.int64)
        self.index = (sy * w + sx).ravel()
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        scene = frame.pixels
        a = self.shifted_fraction
        frame.pixels = (1 - a) * scene + a * scene.ravel()[self.index].reshape(scene.shape)


# --------------------------------------------------------------------------------------------
# 4. Optics


@dataclass
class ZProjection(Defect):
    """Light from an out-of-focus layer (a z-projection through the tissue): ``(1 - w) scene +
    w G(scene, sigma_px)`` with ``w = weight_at_1 * severity``. Records
    ``out_of_focus_weight``, ``out_of_focus_sigma_px``."""

    name: ClassVar[str] = "z_projection"
    weight_at_1: float = 0.5
    sigma_px: float = 4.0

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        if self.severity <= 0:
            return False
        self.weight = self.weight_at_1 * self.severity
        video.record(
            self.name, out_of_focus_weight=self.weight, out_of_focus_sigma_px=self.sigma_px
        )
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        scene, wz = frame.pixels, self.weight
        frame.pixels = (1 - wz) * scene + wz * _gauss(scene, self.sigma_px, 4.0)


@dataclass
class PointSpreadFunction(Stage):
    """Gaussian PSF, sigma ``U(sigma_low_px, sigma_high_px)`` per video (pinned by ``imaging``
    ``psf_sigma_px``), widened per frame by ``defocus``; truncated at 3 sigma."""

    name: ClassVar[str] = "psf"
    sigma_low_px: float = 0.7
    sigma_high_px: float = 1.3

    def prepare(self, video: Video) -> bool:
        rng = video.stream(self.name)
        drawn = rng.uniform(self.sigma_low_px, self.sigma_high_px)
        video.psf_sigma_px = float(video.imaging.get("psf_sigma_px", drawn))
        video.blur_sigma_px = np.full(video.n_frames, video.psf_sigma_px)
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        frame.pixels = _gauss(frame.pixels, float(video.blur_sigma_px[frame.t]), 3.0)


@dataclass
class Defocus(Defect):
    """Global defocus per frame: PSF sigma ``psf + |N(mean_px_at_1 * severity, (sd_px_at_1 *
    severity)^2)|``. Records ``psf_sigma_px`` and ``sigma_px_per_frame``."""

    name: ClassVar[str] = "defocus"
    mean_px_at_1: float = 1.5
    sd_px_at_1: float = 0.7

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev, psf = self.severity, video.psf_sigma_px
        if sev > 0:
            extra = np.abs(
                rng.normal(self.mean_px_at_1 * sev, self.sd_px_at_1 * sev, video.n_frames)
            )
            video.blur_sigma_px = psf + extra
        video.record(
            self.name, psf_sigma_px=psf, sigma_px_per_frame=video.blur_sigma_px.round(3).tolist()
        )
        return False


@dataclass
class LocalDefocus(Defect):
    """Regions out of focus (tilted or uneven sample): ``(1 - m) scene + m G(scene, sigma_px)``
    with ``m`` a smooth random field (correlation length a sixth of the frame) scaled to a
    maximum of ``severity``. Records ``sigma_px``, ``max_weight``."""

    name: ClassVar[str] = "local_defocus"
    sigma_px: float = 3.0

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev = self.severity
        if sev <= 0:
            return False
        h, w = video.shape
        m = np.clip(_smooth_field(rng, (h, w), max(h, w) / 6), 0, None) * sev
        self.weight = np.clip(m / (m.max() + 1e-9) * sev, 0, 1).astype(np.float32)
        video.record(self.name, sigma_px=self.sigma_px, max_weight=float(self.weight.max()))
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        scene = frame.pixels
        blur = _gauss(scene, self.sigma_px, 4.0)
        blur -= scene
        blur *= self.weight
        scene += blur  # (1 - m) * scene + m * blur


@dataclass
class MotionBlur(Defect):
    """Motion (kernel) blur in some frames: each frame is blurred with probability
    ``frame_probability_at_1 * severity + 0.05`` by a line kernel of ``3 + 8 * severity`` px at
    an angle U(0, 180) degrees. Records ``frames``, ``length_px``, ``angle_deg``."""

    name: ClassVar[str] = "motion_blur"
    frame_probability_at_1: float = 0.3

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev = self.severity
        if sev <= 0:
            return False
        frames = np.flatnonzero(
            rng.uniform(size=video.n_frames) < self.frame_probability_at_1 * sev + 0.05
        )
        length = int(round(3 + 8 * sev))
        angles = rng.uniform(0, 180, frames.size)
        self.kernels: dict[int, np.ndarray] = {}
        for t, angle in zip(frames, angles, strict=True):
            k = np.zeros((length, length), np.float32)
            k[length // 2, :] = 1.0
            k = ndimage.rotate(k, angle, reshape=False, order=1)
            self.kernels[int(t)] = (k / k.sum()).astype(np.float32)
        video.record(self.name, frames=frames.tolist(), length_px=length, angle_deg=angles.tolist())
        return bool(self.kernels)

    def apply(self, video: Video, frame: Frame) -> None:
        kernel = self.kernels.get(frame.t)
        if kernel is not None:
            frame.pixels = _convolve_nearest(frame.pixels, kernel)


# --------------------------------------------------------------------------------------------
# 5. Light


@dataclass
class Background(Stage):
    """Uniform background ``U(0.01, 0.03)`` plus tissue autofluorescence ``U(0.005, 0.02)``
    (fractions of an indicator at Fmax), both times ``light_level_scale`` (``low_contrast``)
    and pinned by ``imaging`` ``background`` / ``autofluorescence``. Recorded in the
    ``low_contrast`` entry (the levels that defect raises)."""

    name: ClassVar[str] = "background"

    def prepare(self, video: Video) -> bool:
        rng = video.stream(self.name)
        scale = video.light_level_scale
        background = float(rng.uniform(0.01, 0.03) * scale)
        autofluorescence = float(rng.uniform(0.005, 0.02) * scale)
        background = float(video.imaging.get("background", background))
        autofluorescence = float(video.imaging.get("autofluorescence", autofluorescence))
        video.record(LowContrast.name, background=background, autofluorescence=autofluorescence)
        light = np.full(video.shape, background, np.float32)
        light += np.float32(autofluorescence) * (video.tissue.labels > 0)
        video.static_light = light
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        frame.pixels += video.static_light


@dataclass
class NonuniformBackground(Defect):
    """Smooth uneven background: ``amplitude_at_1 * severity * max(field + plane + 2, 0)``,
    ``field`` a unit smooth random field (correlation length a fifth of the frame), ``plane`` a
    random gradient N(0, 1) per frame height / width. Added to the ``background`` stage's light.
    Records ``amplitude``, ``gradient``."""

    name: ClassVar[str] = "nonuniform_background"
    amplitude_at_1: float = 0.04

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev = self.severity
        if sev <= 0:
            return False
        h, w = video.shape
        yy, xx = video.grid
        cy, cx = video.center
        smooth = _smooth_field(rng, (h, w), max(h, w) / 5)
        grad = rng.normal(0, 1, 2)
        plane = (grad[0] * (yy - cy) / h + grad[1] * (xx - cx) / w).astype(np.float32)
        amplitude = self.amplitude_at_1 * sev
        video.static_light += (amplitude * np.clip(smooth + plane + 2.0, 0, None)).astype(
            np.float32
        )
        video.record(self.name, amplitude=amplitude, gradient=grad.tolist())
        return False


@dataclass
class Debris(Defect):
    """Particles over the tissue, drifting: ``U{1, 1 + 8 severity}`` Gaussian blobs (radius U(2,
    3 + 8 severity) px, velocity N(0, (0.3 severity)^2) px per frame, strength U(0.3, 0.9)),
    each absorbing (light times ``1 - blob``) or bright (``+ 0.3 blob``). Records positions,
    velocities, radii, kinds and strengths."""

    name: ClassVar[str] = "debris"

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        sev = self.severity
        if sev <= 0:
            return False
        h, w = video.shape
        n = int(rng.integers(1, 2 + int(8 * sev)))
        self.position = rng.uniform([0, 0], [h, w], (n, 2))
        self.velocity = rng.normal(0, 0.3 * sev, (n, 2))
        self.radius = rng.uniform(2, 3 + 8 * sev, n)
        self.kind = rng.choice(["dark", "bright"], n)
        self.strength = rng.uniform(0.3, 0.9, n)
        self.rows, self.cols = video.grid
        video.record(
            self.name,
            position_px=self.position.tolist(),
            velocity_px_per_frame=self.velocity.tolist(),
            radius_px=self.radius.tolist(),
            kind=self.kind.tolist(),
            strength=self.strength.tolist(),
        )
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        h, w = video.shape
        yy, xx = self.rows, self.cols
        light = frame.pixels
        for i, rad in enumerate(self.radius):
            py, px = self.position[i] + self.velocity[i] * frame.t
            y0, y1 = int(max(py - 3 * rad, 0)), int(min(py + 3 * rad + 1, h))
            x0, x1 = int(max(px - 3 * rad, 0)), int(min(px + 3 * rad + 1, w))
            if y0 >= y1 or x0 >= x1:
                continue
            gy, gx = yy[y0:y1, x0:x1] - py, xx[y0:y1, x0:x1] - px
            blob = np.exp(-0.5 * (gy * gy + gx * gx) / rad**2) * self.strength[i]
            if self.kind[i] == "dark":
                light[y0:y1, x0:x1] *= 1.0 - blob
            else:
                light[y0:y1, x0:x1] += 0.3 * blob


@dataclass
class IlluminationFlicker(Defect):
    """Excitation light changing from frame to frame (off by default).

    All light (fluorescence, autofluorescence, background, bright debris: all excited by the
    lamp) is multiplied by ``1 + rms_at_1 * severity * z_t``, floored at 0.05, where ``z_t``
    has unit variance and mixes two components: slow lamp fluctuation, a stationary AR(1)
    process with lag-one correlation ``U(0, max_correlation)`` (arc wander drifts over several
    frames), and, with a share ``U(0, 1)`` of the variance, a periodic beat ``sqrt(2) sin(2 pi t
    / P + phi)``, ``P ~ U(2.2, 20)`` frames (mains ripple or LED PWM aliased by the frame rate).

    Typical amplitudes: arc wander makes the output of a DC arc lamp fluctuate strongly; with
    active stabilisation it stays within about 1 % relative standard deviation ("Optical output
    stabilization method for direct current arc lamps", Rev. Sci. Instrum., LSU Chemistry
    publication 2822, https://digitalcommons.lsu.edu/chemistry_pubs/2822/); LED sources are
    steadier. ``rms_at_1 = 0.10`` (10 % rms at severity 1) stands for a badly aligned or ageing
    arc lamp, severity 0.1 (1 %) for a good one; the upper end is our assumption, not a
    measurement.

    Records ``rms_fraction``, ``lag1_correlation``, ``periodic_share``, ``period_frames``,
    ``factor_per_frame``.
    """

    name: ClassVar[str] = "illumination_flicker"
    enabled_by_default: ClassVar[bool] = False
    rms_at_1: float = 0.10
    max_correlation: float = 0.9
    min_period_frames: float = 2.2
    max_period_frames: float = 20.0
    floor: float = 0.05

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        n_out = video.n_frames
        rho = float(rng.uniform(0.0, self.max_correlation))
        share = float(rng.uniform(0.0, 1.0))
        period = float(rng.uniform(self.min_period_frames, self.max_period_frames))
        phase = float(rng.uniform(0.0, 2 * np.pi))
        innovations = rng.standard_normal(n_out)
        if self.severity <= 0:
            return False
        slow = np.empty(n_out)
        slow[0] = innovations[0]
        for t in range(1, n_out):
            slow[t] = rho * slow[t - 1] + np.sqrt(1 - rho**2) * innovations[t]
        beat = np.sqrt(2.0) * np.sin(2 * np.pi * np.arange(n_out) / period + phase)
        z = np.sqrt(1 - share) * slow + np.sqrt(share) * beat
        rms = self.rms_at_1 * self.severity
        factor = np.maximum(1.0 + rms * z, self.floor).astype(np.float32)
        video.illumination = video.illumination * factor
        self.factor = factor
        video.record(
            self.name,
            rms_fraction=rms,
            lag1_correlation=rho,
            periodic_share=share,
            period_frames=period,
            factor_per_frame=factor.round(5).tolist(),
        )
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        frame.pixels *= self.factor[frame.t]


@dataclass
class Vignetting(Defect):
    """Light collection falling off towards the corners: ``1 - v r^2`` (r^2 relative to the
    corner), ``v = base + per_severity * severity`` (pinned by ``imaging`` ``vignetting``).
    Always applied (every objective vignettes a little). Records ``falloff_at_corner``."""

    name: ClassVar[str] = "vignetting"
    base: float = 0.1
    per_severity: float = 0.5

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        v = float(video.imaging.get("vignetting", self.base + self.per_severity * self.severity))
        video.record(self.name, falloff_at_corner=v)
        video.vignette = (1.0 - v * video.radius2).astype(np.float32)
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        frame.pixels *= video.vignette


# --------------------------------------------------------------------------------------------
# 6. Camera


@dataclass
class Camera(Stage):
    """Sensor: expected photo-electrons ``light * photon_scale``, shot noise
    (:func:`shot_noise`), full-well clipping, PRNU (gain 1 + N(0, 0.01^2) per pixel), DSNU
    (N(0, 0.5^2) e- per pixel), Gaussian read noise. Per video (``imaging`` may pin each):
    ``photon_scale`` U(1500, 3000) e-; 16-bit output: a 12- or 16-bit ADC, gain U(0.8, 1.25) x
    0.5 (12 bit) or x 2 (16 bit) ADU/e-, offset U(90, 110) (12 bit) or U(90, 500) ADU, read
    noise U(1, 2.5) e-; 8-bit output: gain ``160 / photon_scale * U(0.8, 1.25)``, offset U(5,
    15), read noise U(1, 3) e-. Full well 30,000 e- (``saturation`` lowers it). Shot and read
    noise are drawn from the frame's own stream. Records ``defects["camera"]``."""

    name: ClassVar[str] = "camera"
    full_well_e: float = 30000.0

    def prepare(self, video: Video) -> bool:
        rng = video.stream(self.name)
        im = video.imaging
        photon_scale = float(rng.uniform(1500, 3000))
        if video.bit_depth == 8:
            adc_bits = 8
            gain = float(160.0 / photon_scale * rng.uniform(0.8, 1.25))
            offset = float(rng.uniform(5, 15))
            read_e = float(rng.uniform(1.0, 3.0))
        else:
            adc_bits = int(rng.choice([12, 16]))
            gain = float(rng.uniform(0.8, 1.25) * (0.5 if adc_bits == 12 else 2.0))
            offset = float(rng.uniform(90, 110) if adc_bits == 12 else rng.uniform(90, 500))
            read_e = float(rng.uniform(1.0, 2.5))
        if video.bit_depth == 16 and "adc_bits" in im:
            adc_bits = int(im["adc_bits"])
        h, w = video.shape
        video.camera = CameraSettings(
            photon_scale_e=float(im.get("photon_scale_e", photon_scale)),
            gain_adu_per_e=float(im.get("gain_adu_per_e", gain)),
            offset_adu=float(im.get("offset_adu", offset)),
            read_noise_e=float(im.get("read_noise_e", read_e)),
            adc_bits=adc_bits,
            full_well_e=self.full_well_e,
            prnu=(1.0 + 0.01 * rng.standard_normal((h, w))).astype(np.float32),
            dsnu=(0.5 * rng.standard_normal((h, w))).astype(np.float32),
        )
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        cam = video.camera
        light = frame.pixels
        light *= np.float32(cam.photon_scale_e)  # expected photo-electrons
        rng = video.frame_stream(self.name, frame.t)
        electrons = shot_noise(light, rng)
        np.minimum(electrons, cam.full_well_e, out=electrons)
        electrons *= cam.prnu
        electrons += cam.dsnu
        read = rng.standard_normal(electrons.shape, dtype=np.float32)
        read *= np.float32(cam.read_noise_e)
        electrons += read
        frame.pixels = electrons

    def finish(self, video: Video) -> None:
        cam = video.camera
        video.records[self.name] = {
            "severity": 0.0,
            "photon_scale_e_at_fmax": cam.photon_scale_e,
            "gain_adu_per_e": cam.gain_adu_per_e,
            "offset_adu": cam.offset_adu,
            "read_noise_e": cam.read_noise_e,
            "adc_bits": cam.adc_bits,
            "prnu_sigma": cam.prnu_sigma,
            "dsnu_sigma_e": cam.dsnu_sigma_e,
            "max_adu": cam.max_adu,
            "shot_noise": f"Poisson; normal approximation above {NORMAL_APPROX_MIN_E:g} e-",
        }


@dataclass
class Saturation(Defect):
    """Full well below the brightest pixels: ``peak * (1 - clip_at_1 * severity)`` with
    ``peak`` the expected photo-electrons of the 95th-percentile texture in the most expressing
    cell at Fmax. Records ``full_well_e``."""

    name: ClassVar[str] = "saturation"
    clip_at_1: float = 0.6

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        cam = video.camera
        if self.severity > 0:
            tex = video.texture
            peak_e = cam.photon_scale_e * np.percentile(tex[tex > 0], 95) * video.expression.max()
            cam.full_well_e = float(peak_e * (1.0 - self.clip_at_1 * self.severity))
        video.record(self.name, full_well_e=cam.full_well_e)
        return False


@dataclass
class GaussianNoise(Defect):
    """Extra Gaussian read noise: read noise times ``1 + gain_at_1 * severity`` (unless pinned
    by ``imaging`` ``read_noise_e``). Records ``read_noise_e``."""

    name: ClassVar[str] = "gaussian_noise"
    gain_at_1: float = 5.0

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        cam = video.camera
        if "read_noise_e" not in video.imaging:
            cam.read_noise_e *= 1 + self.gain_at_1 * self.severity
        video.record(self.name, read_noise_e=cam.read_noise_e)
        return False


@dataclass
class PatternedReadoutNoise(Defect):
    """Row banding of the read-out: each row of a frame gets an offset N(0, s^2) e-, ``s = (3
    read noise + 5) * severity``, from the frame's own stream. Records ``row_sigma_e``."""

    name: ClassVar[str] = "patterned_readout_noise"

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        if self.severity <= 0:
            return False
        self.row_sigma = float(3.0 * self.severity * video.camera.read_noise_e + 5 * self.severity)
        video.record(self.name, row_sigma_e=self.row_sigma)
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        rng = video.frame_stream(self.name, frame.t)
        rows = rng.standard_normal((frame.pixels.shape[0], 1), dtype=np.float32)
        rows *= np.float32(self.row_sigma)
        frame.pixels += rows


@dataclass
class AutoGain(Defect):
    """The camera's automatic gain control (off by default), as GenICam ``GainAuto =
    Continuous``: after each frame the camera compares the frame's mean signal with a target
    and moves its analogue gain towards it, damped, within limits; the new gain applies from
    the next frame (one-frame lag). So when a calcium wave brightens the field, the gain drops
    and every cell, active or not, dims a frame later.

    Per frame, with ``m_t`` the frame's mean expected photo-electrons (metered from the cell
    fluorescence, texture, background, illumination and vignetting; blur, drift, debris and
    noise are left out, which moves the mean by a few per cent at most) and ``g_t`` the
    relative gain (``g_0 = 1``)::

        e_t = log(target / (g_t m_t))
        g_{t+1} = clip(g_t exp(damping * e_t), 1 / max_gain, max_gain)   if |e_t| > tolerance
        g_{t+1} = g_t                                                   otherwise

    ``target = m_0 exp(N(0, target_sd_at_1^2 severity^2))`` (the camera had not settled when
    the recording started, so the first frames ramp); ``damping = min_damping + (max_damping -
    min_damping) * severity`` per frame: Basler's ``GrayValueAdjustmentDamping`` ranges 0 to
    0.78 (default 0.68; higher = faster; https://docs.baslerweb.com/gray-value-adjustment-damping,
    https://docs.baslerweb.com/gain-auto), our range 0.1 to 0.78. ``max_gain`` 8 (18 dB: FLIR's
    auto exposure uses a gain range of 0 to 18 dB by default, Spinnaker "Auto Algorithm
    Control"; taken here as +-18 dB around the starting gain);
    ``tolerance`` 0.02 (2 % dead band, so a steady scene leaves the gain alone). The gain
    multiplies the photo-electrons and read noise before the ADC (``ADU = offset + gain g_t
    e``). Records ``target_e``, ``damping``, ``tolerance``, ``gain_per_frame``.
    """

    name: ClassVar[str] = "auto_gain"
    enabled_by_default: ClassVar[bool] = False
    min_damping: float = 0.1
    max_damping: float = 0.78
    target_sd_at_1: float = 0.2
    max_gain: float = 8.0
    tolerance: float = 0.02

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        target_log_offset = float(rng.normal(0.0, self.target_sd_at_1))
        sev = self.severity
        if sev <= 0:
            return False
        mean_e = expected_frame_mean_e(video)
        target = float(mean_e[0] * np.exp(target_log_offset * sev))
        damping = self.min_damping + (self.max_damping - self.min_damping) * sev
        gain = np.ones(video.n_frames)
        for t in range(video.n_frames - 1):
            error = np.log(target / max(gain[t] * mean_e[t], 1e-9))
            g = gain[t] * np.exp(damping * error) if abs(error) > self.tolerance else gain[t]
            gain[t + 1] = np.clip(g, 1.0 / self.max_gain, self.max_gain)
        self.gain = gain.astype(np.float32)
        video.record(
            self.name,
            target_e=target,
            damping=damping,
            tolerance=self.tolerance,
            gain_per_frame=self.gain.round(5).tolist(),
        )
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        frame.pixels *= self.gain[frame.t]


def expected_frame_mean_e(video: Video) -> np.ndarray:
    """Mean expected photo-electrons per pixel of each frame, (T,) float64, from what the
    stages prepared: sum over cells of fluorescence x (texture x vignetting summed over the
    cell's pixels), plus background x vignetting, times illumination and photon scale. Blur
    (mean-preserving away from the border), drift, debris and noise are left out."""
    h, w = video.shape
    vignette = video.vignette if video.vignette is not None else np.ones(video.shape, np.float32)
    weight = (video.texture * vignette).ravel()
    per_cell = np.bincount(video.tissue.labels.ravel(), weights=weight, minlength=video.n_cells + 1)
    light = video.cell_fluorescence.astype(np.float64) @ per_cell
    if video.static_light is not None:
        light += float((video.static_light * vignette).sum(dtype=np.float64))
    return video.camera.photon_scale_e * video.illumination * light / (h * w)


@dataclass
class AnalogToDigital(Stage):
    """ADC: ``ADU = offset + gain * electrons``, rounded and clipped to ``[0, 2^bits - 1]``."""

    name: ClassVar[str] = "adc"

    def prepare(self, video: Video) -> bool:
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        cam = video.camera
        adu = frame.pixels
        adu *= np.float32(cam.gain_adu_per_e)
        adu += np.float32(cam.offset_adu)
        np.rint(adu, out=adu)
        np.clip(adu, 0, cam.max_adu, out=adu)


# --------------------------------------------------------------------------------------------
# 7. Acquisition software


@dataclass
class ContrastNormalisation(Defect):
    """Each frame stretched to its own percentiles, as acquisition or export software does
    (off by default; DESIGN.md section 5 names per-frame normalisation as a mistake of the
    source, and recordings made that way exist).

    As ImageJ's Process > Enhance Contrast with "normalize" on every slice
    (``ij.plugin.ContrastEnhancer.stretchHistogram``, ``defaultSaturated = 0.35``;
    https://imagej.net/ij/developer/source/ij/plugin/ContrastEnhancer.java.html): ``saturated``
    per cent of the pixels (half at each end) are clipped, the frame's ADU range ``[low, high]``
    between them is mapped linearly onto the whole output range (0-255 for 8-bit, 0-65535 for
    16-bit output), rounded.
    ``saturated = min_saturated_percent + (max_saturated_percent - min_saturated_percent) *
    severity``: 0.1 to 2 %; ImageJ's default is 0.35 %. Records ``saturated_percent``,
    ``low_adu_per_frame``, ``high_adu_per_frame``.
    """

    name: ClassVar[str] = "contrast_normalisation"
    enabled_by_default: ClassVar[bool] = False
    min_saturated_percent: float = 0.1
    max_saturated_percent: float = 2.0

    def plan(self, video: Video, rng: np.random.Generator) -> bool:
        if self.severity <= 0:
            return False
        span = self.max_saturated_percent - self.min_saturated_percent
        self.saturated_percent = self.min_saturated_percent + span * self.severity
        self.out_max = 255 if video.bit_depth == 8 else 65535
        self.low = np.zeros(video.n_frames, np.int64)
        self.high = np.zeros(video.n_frames, np.int64)
        video.record(self.name, saturated_percent=self.saturated_percent)
        return True

    def apply(self, video: Video, frame: Frame) -> None:
        adu = frame.pixels  # integer-valued float32 in [0, max_adu]
        hist = np.bincount(adu.astype(np.int32).ravel(), minlength=video.camera.max_adu + 1)
        threshold = int(adu.size * self.saturated_percent / 200.0)
        low = int(np.searchsorted(np.cumsum(hist), threshold, side="right"))
        high = len(hist) - 1 - int(np.searchsorted(np.cumsum(hist[::-1]), threshold, side="right"))
        high = max(high, low + 1)
        self.low[frame.t], self.high[frame.t] = low, high
        adu -= np.float32(low)
        adu *= np.float32(self.out_max / (high - low))
        np.rint(adu, out=adu)
        np.clip(adu, 0, self.out_max, out=adu)

    def finish(self, video: Video) -> None:
        if self.severity > 0:
            video.record(
                self.name,
                low_adu_per_frame=self.low.tolist(),
                high_adu_per_frame=self.high.tolist(),
            )


# --------------------------------------------------------------------------------------------
# The chain

STAGE_TYPES: tuple[type[Stage], ...] = (
    DroppedFrames,
    DuplicatedFrames,
    LowContrast,
    IndicatorResponse,
    SpontaneousLuminescence,
    Photobleaching,
    CellTexture,
    Drift,
    RadialDistortion,
    SceneFormation,
    ChromaticAberration,
    ZProjection,
    PointSpreadFunction,
    Defocus,
    LocalDefocus,
    MotionBlur,
    Background,
    NonuniformBackground,
    Debris,
    IlluminationFlicker,
    Vignetting,
    Camera,
    Saturation,
    GaussianNoise,
    PatternedReadoutNoise,
    AutoGain,
    AnalogToDigital,
    ContrastNormalisation,
)
"""Stage types of the default chain, in physical order (DESIGN.md section 3)."""

DEFECTS: tuple[str, ...] = tuple(s.name for s in STAGE_TYPES if issubclass(s, Defect))
"""Names of the defect families (DESIGN.md section 3: the source's families plus those real
recordings show, plus global intensity changes), in chain order."""

INTENSITY_DEFECTS: tuple[str, ...] = (
    IlluminationFlicker.name,
    AutoGain.name,
    ContrastNormalisation.name,
)
"""Global intensity changes from frame to frame; off unless enabled (issue 17)."""

DEFAULT_DEFECTS: tuple[str, ...] = tuple(
    s.name for s in STAGE_TYPES if issubclass(s, Defect) and s.enabled_by_default
)
"""Defects drawn by default (all but :data:`INTENSITY_DEFECTS`)."""


def default_stages() -> list[Stage]:
    """A fresh default chain (one object per stage type of :data:`STAGE_TYPES`)."""
    return [cls() for cls in STAGE_TYPES]
