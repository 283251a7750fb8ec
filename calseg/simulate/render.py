"""From cytosolic Ca2+ to camera counts: GECI indicator, cell texture, optics, defects, camera.

The physical chain (DESIGN.md section 3), in order:

1. **Indicator.** Per cell, the fraction of Ca2+-bound GCaMP follows a Hill curve
   ``h(c) = c^n / (c^n + Kd^n)`` (GCaMP6s Kd 144 nM, n 2.9; 6f 375 nM, 2.27; 6m 167 nM, 2.96;
   Chen et al. 2013, Nature 499:295). Its kinetics are a first-order filter across frames with
   the indicator's rise / decay time constants (exact exponential for the frame interval), so
   they matter only when frames are fast. Relative fluorescence
   ``f = fmin + (1 - fmin) * b`` with ``fmin = Fmin / Fmax = 1 / dynamic_range`` (Fmax = 1).
   Each cell has an expression level (log-normal, sigma 0.25).
2. **Scene.** ``f`` times a static texture: dim nucleus (GCaMP is cytosolic), dim membrane line,
   smooth within-cell variation. Tissue outside cells is dark.
3. **Geometry defects** (stage drift, jitter, radial distortion, chromatic aberration) are per
   frame coordinate maps applied with nearest-neighbour sampling of the label image, so the
   ground-truth labels move exactly with the image.
4. **Optics.** z-projection of an out-of-focus layer, Gaussian PSF (sigma in px), global defocus
   per frame, local defocus, motion (kernel) blur.
5. **Light.** Background (uniform + non-uniform), tissue autofluorescence, debris (absorbing or
   bright particles), photobleaching of the indicator (exponential per frame), vignetting.
6. **Camera.** Expected photo-electrons = light * ``photon_scale`` (photo-electrons per pixel
   for an indicator at Fmax with texture 1), Poisson shot noise (normal approximation above
   50 e-), full-well clipping
   (saturation), fixed-pattern gain (PRNU) and offset (DSNU), Gaussian read noise, patterned
   (row-banding) read-out noise, then ``ADU = offset + gain * electrons`` rounded and clipped to
   the ADC range (12 or 16 bit stored as uint16; 8 bit as uint8).

**Intensity scale.** The output is camera ADU: ``ADU = offset_adu + gain_adu_per_e *
photo-electrons``, with the per-video ``offset_adu``, ``gain_adu_per_e`` and ``photon_scale``
recorded in the metadata (``defects["camera"]``). Nothing is normalised per frame, so a frame's
mean rises and falls with the number of active cells.

**Implementation.** Per-video parameters and static fields (cell texture, chromatic-aberration
map, local-defocus weights, background, vignetting, PRNU / DSNU) are made once; then each frame
runs the chain above in float32 on its own (memory: the output stacks plus a few frames), with
OpenCV Gaussian / kernel filters (same kernels and borders as ``scipy.ndimage``, tested) and
frames spread over threads. Each frame draws its noise from its own generator seeded from the
rendering stream, so a seed reproduces the video bit for bit whatever the thread count. Shot
noise is exact Poisson below :data:`NORMAL_APPROX_MIN_E` expected photo-electrons and its normal
approximation above (see :func:`shot_noise` for the error).

Each defect has a severity in [0, 1]. Per video, a defect is present with probability
``defect_severity`` and then has severity ``defect_severity * U(0.5, 1)``; the parameters drawn
from that severity (per frame where physical) are recorded in the metadata dict.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from calseg.simulate.geometry import Tissue

Indicator = Literal["GCaMP6s", "GCaMP6f", "GCaMP6m"]


@dataclass(frozen=True)
class IndicatorSpec:
    """GECI properties. Kd (uM) and Hill n from Chen et al. 2013 (Nature 499:295), dynamic range
    Fmax/Fmin approximately the in-vitro values of the same paper, kinetics from the half rise
    and half decay times after action potentials there (tau = t_half / ln 2, approximate)."""

    kd_uM: float
    hill_n: float
    dynamic_range: float
    tau_rise_s: float
    tau_decay_s: float


INDICATORS: dict[str, IndicatorSpec] = {
    "GCaMP6s": IndicatorSpec(0.144, 2.90, 63.2, 0.18 / np.log(2), 1.80 / np.log(2)),
    "GCaMP6f": IndicatorSpec(0.375, 2.27, 51.8, 0.05 / np.log(2), 0.40 / np.log(2)),
    "GCaMP6m": IndicatorSpec(0.167, 2.96, 38.1, 0.08 / np.log(2), 1.20 / np.log(2)),
}

DEFECTS = (
    "nonuniform_background",
    "spontaneous_luminescence",
    "radial_distortion",
    "chromatic_aberration",
    "patterned_readout_noise",
    "gaussian_noise",
    "defocus",
    "local_defocus",
    "motion_blur",
    "photobleaching",
    "drift",
    "debris",
    "z_projection",
    "saturation",
    "dropped_frames",
    "duplicated_frames",
    "low_contrast",
    "vignetting",
)
"""Defect families; DESIGN.md section 3 (source's families plus those real recordings show)."""


class RenderError(ValueError):
    """Raised for inconsistent rendering inputs."""


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


def hill(c_uM: np.ndarray, indicator: Indicator | str) -> np.ndarray:
    """Ca2+-bound fraction of the indicator, ``c^n / (c^n + Kd^n)``; same shape as ``c_uM``."""
    spec = INDICATORS[indicator]
    cn = np.power(np.maximum(c_uM, 0.0), spec.hill_n)
    return cn / (cn + spec.kd_uM**spec.hill_n)


def indicator_fluorescence(
    calcium_uM: np.ndarray,
    indicator: Indicator | str,
    frame_interval_s: float,
    fmin_frac: float | None = None,
) -> np.ndarray:
    """Relative indicator fluorescence per cell and frame (Fmax = 1).

    Args:
        calcium_uM: (N, T) cytosolic Ca2+ (uM) at the frame times.
        indicator: GCaMP variant (key of :data:`INDICATORS`).
        frame_interval_s: time between frames (s), for the indicator kinetics.
        fmin_frac: Fmin / Fmax; default 1 / dynamic range of the indicator.

    Returns:
        (N, T) float32 fluorescence in [fmin_frac, 1].
    """
    spec = INDICATORS[indicator]
    h = hill(np.asarray(calcium_uM, np.float64), indicator)
    b = np.empty_like(h)
    b[:, 0] = h[:, 0]
    a_rise = np.exp(-frame_interval_s / spec.tau_rise_s)
    a_decay = np.exp(-frame_interval_s / spec.tau_decay_s)
    for t in range(1, h.shape[1]):
        prev = b[:, t - 1]
        a = np.where(h[:, t] > prev, a_rise, a_decay)
        b[:, t] = h[:, t] + (prev - h[:, t]) * a
    fmin = 1.0 / spec.dynamic_range if fmin_frac is None else fmin_frac
    return (fmin + (1.0 - fmin) * b).astype(np.float32)


def active_mask(
    calcium_uM: np.ndarray, threshold_uM: float = 0.1, low_uM: float | None = None
) -> np.ndarray:
    """Which cells are active in which frames (DESIGN.md section 4).

    Args:
        calcium_uM: (N, T) Ca2+ (uM).
        threshold_uM: a cell is active when c > threshold (source: 0.1 uM).
        low_uM: optional hysteresis: once active, a cell stays active until c <= low_uM.

    Returns:
        (N, T) bool.
    """
    c = np.asarray(calcium_uM)
    on = c > threshold_uM
    if low_uM is None:
        return on
    if low_uM >= threshold_uM:
        raise RenderError(f"hysteresis low level {low_uM} must be below {threshold_uM} uM")
    out = np.empty_like(on)
    state = on[:, 0].copy()
    out[:, 0] = state
    for t in range(1, c.shape[1]):
        state = on[:, t] | (state & (c[:, t] > low_uM))
        out[:, t] = state
    return out


def _severities(rng: np.random.Generator, defect_severity: float) -> dict[str, float]:
    sev = {}
    for name in DEFECTS:
        present = defect_severity > 0 and rng.uniform() < defect_severity
        strength = defect_severity * rng.uniform(0.5, 1.0)
        sev[name] = float(strength) if present else 0.0
    return sev


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


def _frame_source_index(
    rng: np.random.Generator, n_out: int, n_src: int, sev_drop: float, sev_dup: float
) -> tuple[np.ndarray, list[int], list[int]]:
    src = np.zeros(n_out, np.int64)
    dropped, duplicated = [], []
    p_drop, p_dup = 0.08 * sev_drop, 0.08 * sev_dup
    for t in range(1, n_out):
        u = rng.uniform()
        step = 1
        if u < p_drop and src[t - 1] + 2 + (n_out - 1 - t) <= n_src - 1:
            step = 2
            dropped.append(t)
        elif p_drop <= u < p_drop + p_dup:
            step = 0
            duplicated.append(t)
        src[t] = src[t - 1] + step
    return src, dropped, duplicated


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Render a recording and its exact ground truth.

    Args:
        tissue: the geometry (labels (H, W), cell i has id i + 1).
        calcium_uM: (N, T_src) cytosolic Ca2+ (uM) at consecutive frame times; T_src may exceed
            ``n_frames`` to leave room for dropped frames.
        rng: the rendering random stream.
        frame_interval_s: time between frames (s).
        n_frames: frames to output (default T_src).
        indicator: GCaMP variant.
        defect_severity: global defect severity in [0, 1] (0 = clean physics only).
        bit_depth: 16 (uint16, 12- or 16-bit ADC) or 8 (uint8).
        threshold_uM, hysteresis_low_uM: activity definition for the labels.
        n_threads: frames rendered in parallel (default: the CPUs available to the process,
            at most 4). The output does not depend on it: each frame draws its noise from its
            own generator seeded from ``rng``.
        imaging: optional pinned imaging parameters (keys of
            :class:`calseg.simulate.config.ImagingOverrides`: ``gain_adu_per_e``,
            ``offset_adu``, ``read_noise_e``, ``adc_bits``, ``photon_scale_e``, ``background``,
            ``autofluorescence``, ``vignetting``, ``psf_sigma_px``, ``bleach_tau_s``,
            ``fmin_over_fmax``). Each replaces the value drawn at random (after the draw, so
            the random stream and everything else stay the same).

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
    if bit_depth not in (8, 16):
        raise RenderError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if n_threads is None:
        n_threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if n_threads < 1:
        raise RenderError(f"n_threads must be >= 1 (frames rendered in parallel), got {n_threads}")
    h, w = tissue.labels.shape
    im = {k: v for k, v in (imaging or {}).items() if v is not None}
    sev = _severities(rng, defect_severity)
    d: dict[str, dict] = {k: {"severity": v} for k, v in sev.items()}
    times = np.arange(t_out) * frame_interval_s

    # --- frame timing (dropped / duplicated frames) -------------------------------------
    src, dropped, duplicated = _frame_source_index(
        rng, t_out, n_src, sev["dropped_frames"], sev["duplicated_frames"]
    )
    d["dropped_frames"]["frames"] = dropped
    d["duplicated_frames"]["frames"] = duplicated
    cal = calcium_uM[:, src]

    # --- indicator ---------------------------------------------------------------------
    spec = INDICATORS[indicator]
    fmin = 1.0 / spec.dynamic_range
    lc = sev["low_contrast"]
    fmin_eff = float(im.get("fmin_over_fmax", fmin + lc * (0.5 - fmin)))
    d["low_contrast"]["fmin_over_fmax"] = float(fmin_eff)
    fcell = indicator_fluorescence(calcium_uM, indicator, frame_interval_s, fmin_eff)[:, src]
    expression = rng.lognormal(0.0, 0.25, n).astype(np.float32)
    fcell *= expression[:, None]
    act = active_mask(cal, threshold_uM, hysteresis_low_uM)
    # Spontaneous luminescence: inactive cells that brighten without Ca2+ (not in the labels).
    sl = sev["spontaneous_luminescence"]
    if sl > 0:
        n_lum = max(1, int(round(0.05 * sl * n)))
        cells = rng.choice(n, n_lum, replace=False)
        onset = rng.uniform(0, t_out, n_lum)
        width = rng.uniform(1.0, 4.0, n_lum)
        amp = (0.2 + 0.6 * sl) * rng.uniform(0.5, 1.0, n_lum)
        tt = np.arange(t_out)[None, :]
        bump = amp[:, None] * np.exp(-0.5 * ((tt - onset[:, None]) / width[:, None]) ** 2)
        fcell[cells] += (bump * ~act[cells]).astype(np.float32)
        d["spontaneous_luminescence"].update(
            {"cells": (cells + 1).tolist(), "peak_frame": onset.tolist(), "amplitude": amp.tolist()}
        )
    fcell0 = np.vstack([np.zeros((1, t_out), np.float32), fcell]).T  # (T, N + 1), id 0 = dark

    # --- photobleaching ----------------------------------------------------------------
    pb = sev["photobleaching"]
    tau_b = float(np.inf if pb == 0 else times[-1] / (0.05 + 1.0 * pb) + frame_interval_s)
    tau_b = float(im.get("bleach_tau_s", tau_b))
    bleach = np.exp(-times / tau_b).astype(np.float32)
    d["photobleaching"].update({"tau_s": tau_b, "factor_per_frame": bleach.tolist()})
    fcell0 *= bleach[:, None]

    # All per-video parameters and static fields are drawn first (same order as the chain);
    # the frames are then rendered one at a time in float32 (bounded memory), each frame with
    # its own noise generator seeded from ``rng``, so the output does not depend on threading.

    # --- geometry: drift, jitter, radial distortion, chromatic aberration -------------------
    tex, tex_meta = cell_texture(tissue, rng)
    yy, xx = np.indices((h, w), dtype=np.float32)
    dr = sev["drift"]
    drift_v = rng.normal(0, 1, 2) * 0.15 * dr  # px per frame
    jit = rng.normal(0, 0.8 * dr, (t_out, 2)) if dr > 0 else np.zeros((t_out, 2))
    shift = np.arange(t_out)[:, None] * drift_v[None, :] + jit
    d["drift"].update({"shift_px_per_frame": shift.round(3).tolist()})
    k1 = float(rng.choice([-1, 1]) * 0.25 * sev["radial_distortion"])
    d["radial_distortion"]["k1"] = k1
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rnorm2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (cy**2 + cx**2)
    fac = 1.0 + k1 * rnorm2
    by, bx = cy + (yy - cy) * fac, cx + (xx - cx) * fac  # (H, W) float32 source coordinates
    moved = dr > 0 or k1 != 0
    ca = sev["chromatic_aberration"]
    ca_idx = None
    if ca > 0:
        # Lateral chromatic aberration across the emission band: part of the light is imaged
        # with a slightly different magnification.
        mag = 1.0 + 0.01 * ca
        d["chromatic_aberration"]["magnification"] = mag
        sy = np.clip(np.rint(cy + (yy - cy) / mag), 0, h - 1).astype(np.int64)
        sx = np.clip(np.rint(cx + (xx - cx) / mag), 0, w - 1).astype(np.int64)
        ca_idx = (sy * w + sx).ravel()

    # --- optics parameters ---------------------------------------------------------------
    psf = float(im.get("psf_sigma_px", rng.uniform(0.7, 1.3)))
    zp = sev["z_projection"]
    wz = 0.5 * zp
    if zp > 0:
        d["z_projection"].update({"out_of_focus_weight": wz, "out_of_focus_sigma_px": 4.0})
    df = sev["defocus"]
    sig = np.full(t_out, psf)
    if df > 0:
        sig = psf + np.abs(rng.normal(1.5 * df, 0.7 * df, t_out))
    d["defocus"].update({"psf_sigma_px": psf, "sigma_px_per_frame": sig.round(3).tolist()})
    ld = sev["local_defocus"]
    ld_m = None
    if ld > 0:
        m = _smooth_field(rng, (h, w), max(h, w) / 6)
        m = np.clip(m, 0, None) * ld
        ld_m = np.clip(m / (m.max() + 1e-9) * ld, 0, 1).astype(np.float32)
        d["local_defocus"].update({"sigma_px": 3.0, "max_weight": float(ld_m.max())})
    mb = sev["motion_blur"]
    mb_kernels: dict[int, np.ndarray] = {}
    if mb > 0:
        frames = np.flatnonzero(rng.uniform(size=t_out) < 0.3 * mb + 0.05)
        length = int(round(3 + 8 * mb))
        angles = rng.uniform(0, 180, frames.size)
        for t, ang in zip(frames, angles, strict=True):
            k = np.zeros((length, length), np.float32)
            k[length // 2, :] = 1.0
            k = ndimage.rotate(k, ang, reshape=False, order=1)
            mb_kernels[int(t)] = (k / k.sum()).astype(np.float32)
        d["motion_blur"].update(
            {"frames": frames.tolist(), "length_px": length, "angle_deg": angles.tolist()}
        )

    # --- light: background, autofluorescence, debris, vignetting ---------------------------
    bg = float(rng.uniform(0.01, 0.03) * (1 + 4 * lc))
    af = float(rng.uniform(0.005, 0.02) * (1 + 4 * lc))
    bg = float(im.get("background", bg))
    af = float(im.get("autofluorescence", af))
    d["low_contrast"].update({"background": bg, "autofluorescence": af})
    light_static = np.full((h, w), bg, np.float32) + af * (tissue.labels > 0)
    nb = sev["nonuniform_background"]
    if nb > 0:
        field = _smooth_field(rng, (h, w), max(h, w) / 5)
        grad = rng.normal(0, 1, 2)
        plane = (grad[0] * (yy - cy) / h + grad[1] * (xx - cx) / w).astype(np.float32)
        light_static += (0.04 * nb * np.clip(field + plane + 2.0, 0, None)).astype(np.float32)
        d["nonuniform_background"].update({"amplitude": 0.04 * nb, "gradient": grad.tolist()})
    light_static = light_static.astype(np.float32)
    db = sev["debris"]
    debris = None
    if db > 0:
        n_deb = int(rng.integers(1, 2 + int(8 * db)))
        pos = rng.uniform([0, 0], [h, w], (n_deb, 2))
        vel = rng.normal(0, 0.3 * db, (n_deb, 2))
        rad = rng.uniform(2, 3 + 8 * db, n_deb)
        kind = rng.choice(["dark", "bright"], n_deb)
        strength = rng.uniform(0.3, 0.9, n_deb)
        debris = (pos, vel, rad, kind, strength)
        d["debris"].update(
            {
                "position_px": pos.tolist(),
                "velocity_px_per_frame": vel.tolist(),
                "radius_px": rad.tolist(),
                "kind": kind.tolist(),
                "strength": strength.tolist(),
            }
        )
    vg = float(im.get("vignetting", 0.1 + 0.5 * sev["vignetting"]))
    d["vignetting"]["falloff_at_corner"] = vg
    vignette = (1.0 - vg * rnorm2).astype(np.float32)

    # --- camera parameters ---------------------------------------------------------------------
    photon_scale = float(rng.uniform(1500, 3000))  # e- per px at Fmax, texture 1
    if bit_depth == 8:
        adc_bits = 8
        gain = float(160.0 / photon_scale * rng.uniform(0.8, 1.25))
        offset = float(rng.uniform(5, 15))
        read_e = float(rng.uniform(1.0, 3.0))
    else:
        adc_bits = int(rng.choice([12, 16]))
        gain = float(rng.uniform(0.8, 1.25) * (0.5 if adc_bits == 12 else 2.0))
        offset = float(rng.uniform(90, 110) if adc_bits == 12 else rng.uniform(90, 500))
        read_e = float(rng.uniform(1.0, 2.5))
    gn = sev["gaussian_noise"]
    read_e *= 1 + 5 * gn
    photon_scale = float(im.get("photon_scale_e", photon_scale))
    gain = float(im.get("gain_adu_per_e", gain))
    offset = float(im.get("offset_adu", offset))
    read_e = float(im.get("read_noise_e", read_e))
    if bit_depth == 16 and "adc_bits" in im:
        adc_bits = int(im["adc_bits"])
    peak_e = float(photon_scale * np.percentile(tex[tex > 0], 95) * expression.max())
    full_well = 30000.0
    sat = sev["saturation"]
    if sat > 0:
        full_well = peak_e * (1.0 - 0.6 * sat)
    prnu = (1.0 + 0.01 * rng.standard_normal((h, w))).astype(np.float32)
    dsnu = (0.5 * rng.standard_normal((h, w))).astype(np.float32)
    pr = sev["patterned_readout_noise"]
    row_sigma = float(3.0 * pr * read_e + pr * 5)
    if pr > 0:
        d["patterned_readout_noise"]["row_sigma_e"] = row_sigma
    vmax = 2**adc_bits - 1
    noise_seed = int(rng.integers(0, 2**63 - 1))
    # Static per-pixel fields folded once: light is multiplied by the vignetting and by
    # photon_scale; the ADC maps electrons * PRNU + DSNU to ``offset + gain * (...)``.
    vig_e = vignette * np.float32(photon_scale)  # (H, W) e- per unit light

    # --- per-frame rendering --------------------------------------------------------------------
    image = np.empty((t_out, h, w), np.uint8 if bit_depth == 8 else np.uint16)
    labels_out = np.empty((t_out, h, w), np.uint32)
    act0 = np.vstack([np.zeros((1, t_out), bool), act]).T  # (T, N + 1)
    lab_flat = tissue.labels.ravel()
    tex_flat = tex.ravel()
    lab_static = tissue.labels.astype(np.uint32)
    tex_static = tex
    idx_dtype = np.int32 if h * w < 2**31 else np.int64  # flat pixel index
    if debris is not None:
        pos, vel, rad, kind, strength = debris

    def render_frame(t: int) -> None:
        # Geometry: nearest-neighbour source pixel per output pixel (labels move exactly).
        if moved:
            sy = np.rint(by - np.float32(shift[t, 0])).astype(idx_dtype)
            sx = np.rint(bx - np.float32(shift[t, 1])).astype(idx_dtype)
            invalid = (sy < 0) | (sy >= h) | (sx < 0) | (sx >= w)
            np.clip(sy, 0, h - 1, out=sy)
            np.clip(sx, 0, w - 1, out=sx)
            sy *= w
            sy += sx
            idx = sy.ravel()
            lab_t = lab_flat[idx].reshape(h, w).astype(np.uint32)
            lab_t[invalid] = 0
            tex_t = tex_flat[idx].reshape(h, w)
            tex_t[invalid] = 0.0
        else:
            lab_t, tex_t = lab_static, tex_static
        scene = fcell0[t][lab_t]
        scene *= tex_t
        labels_out[t] = np.where(act0[t][lab_t], lab_t, 0)
        if ca_idx is not None:
            scene = 0.6 * scene + 0.4 * scene.ravel()[ca_idx].reshape(h, w)
        # Optics (2-D Gaussian blurs; scipy.ndimage's 'reflect' border = cv2.BORDER_REFLECT).
        if zp > 0:
            scene = (1 - wz) * scene + wz * _gauss(scene, 4.0, 4.0)
        scene = _gauss(scene, float(sig[t]), 3.0)
        if ld_m is not None:
            blur = _gauss(scene, 3.0, 4.0)
            blur -= scene
            blur *= ld_m
            scene += blur  # (1 - m) * scene + m * blur
        k = mb_kernels.get(t)
        if k is not None:
            scene = _convolve_nearest(scene, k)
        # Light: background + autofluorescence, debris, vignetting.
        light = scene
        light += light_static
        if debris is not None:
            for i in range(len(rad)):
                py, px = pos[i] + vel[i] * t
                y0, y1 = int(max(py - 3 * rad[i], 0)), int(min(py + 3 * rad[i] + 1, h))
                x0, x1 = int(max(px - 3 * rad[i], 0)), int(min(px + 3 * rad[i] + 1, w))
                if y0 >= y1 or x0 >= x1:
                    continue
                gy, gx = yy[y0:y1, x0:x1] - py, xx[y0:y1, x0:x1] - px
                blob = np.exp(-0.5 * (gy * gy + gx * gx) / rad[i] ** 2) * strength[i]
                if kind[i] == "dark":
                    light[y0:y1, x0:x1] *= 1.0 - blob
                else:
                    light[y0:y1, x0:x1] += 0.3 * blob
        light *= vig_e  # expected photo-electrons
        # Camera.
        frng = np.random.default_rng([noise_seed, t])
        electrons = shot_noise(light, frng)
        np.minimum(electrons, full_well, out=electrons)
        electrons *= prnu
        electrons += dsnu
        read = frng.standard_normal((h, w), dtype=np.float32)
        read *= read_e
        electrons += read
        if pr > 0:
            electrons += frng.standard_normal((h, 1), dtype=np.float32) * np.float32(row_sigma)
        electrons *= gain
        electrons += offset
        np.rint(electrons, out=electrons)
        np.clip(electrons, 0, vmax, out=electrons)
        image[t] = electrons

    if n_threads > 1 and t_out > 1:
        # NumPy, OpenCV and the generators release the GIL on whole-frame operations.
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(render_frame, range(t_out)))
    else:
        for t in range(t_out):
            render_frame(t)

    d["saturation"].update({"full_well_e": full_well})
    d["gaussian_noise"]["read_noise_e"] = read_e
    d["camera"] = {
        "severity": 0.0,
        "photon_scale_e_at_fmax": photon_scale,
        "gain_adu_per_e": gain,
        "offset_adu": offset,
        "read_noise_e": read_e,
        "adc_bits": adc_bits,
        "prnu_sigma": 0.01,
        "dsnu_sigma_e": 0.5,
        "max_adu": vmax,
        "shot_noise": f"Poisson; normal approximation above {NORMAL_APPROX_MIN_E:g} e-",
    }
    meta = {
        "defects": d,
        "texture": tex_meta,
        "indicator": indicator,
        "frame_source_index": src.tolist(),
        "n_active_per_frame": act.sum(0).tolist(),
    }
    return image, labels_out, cal.astype(np.float32), meta
