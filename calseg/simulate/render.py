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
   for an indicator at Fmax with texture 1), Poisson shot noise, full-well clipping
   (saturation), fixed-pattern gain (PRNU) and offset (DSNU), Gaussian read noise, patterned
   (row-banding) read-out noise, then ``ADU = offset + gain * electrons`` rounded and clipped to
   the ADC range (12 or 16 bit stored as uint16; 8 bit as uint8).

**Intensity scale.** The output is camera ADU: ``ADU = offset_adu + gain_adu_per_e *
photo-electrons``, with the per-video ``offset_adu``, ``gain_adu_per_e`` and ``photon_scale``
recorded in the metadata (``defects["camera"]``). Nothing is normalised per frame, so a frame's
mean rises and falls with the number of active cells.

Each defect has a severity in [0, 1]. Per video, a defect is present with probability
``defect_severity`` and then has severity ``defect_severity * U(0.5, 1)``; the parameters drawn
from that severity (per frame where physical) are recorded in the metadata dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    """Zero-mean, unit-std smooth random field (H, W) float32."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
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
    h, w = tissue.labels.shape
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
    fmin_eff = fmin + lc * (0.5 - fmin)
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
    bleach = np.exp(-times / tau_b).astype(np.float32)
    d["photobleaching"].update({"tau_s": tau_b, "factor_per_frame": bleach.tolist()})
    fcell0 *= bleach[:, None]

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
    moved = dr > 0 or k1 != 0
    if moved:
        fac = 1.0 + k1 * rnorm2
        by, bx = cy + (yy - cy) * fac, cx + (xx - cx) * fac
        sy = np.rint(by[None] - shift[:, 0, None, None]).astype(np.int64)
        sx = np.rint(bx[None] - shift[:, 1, None, None]).astype(np.int64)
        valid = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        np.clip(sy, 0, h - 1, out=sy)
        np.clip(sx, 0, w - 1, out=sx)
        lab_t = np.where(valid, tissue.labels[sy, sx], 0).astype(np.uint32)
        tex_t = np.where(valid, tex[sy, sx], 0.0).astype(np.float32)
    else:
        lab_t = np.broadcast_to(tissue.labels, (t_out, h, w))
        tex_t = np.broadcast_to(tex, (t_out, h, w))
    tt_idx = np.arange(t_out)[:, None, None]
    scene = fcell0[tt_idx, lab_t] * tex_t  # (T, H, W) float32
    labels_out = np.where(np.vstack([np.zeros((1, t_out), bool), act]).T[tt_idx, lab_t], lab_t, 0)
    labels_out = labels_out.astype(np.uint32)
    ca = sev["chromatic_aberration"]
    if ca > 0:
        # Lateral chromatic aberration across the emission band: part of the light is imaged
        # with a slightly different magnification.
        mag = 1.0 + 0.01 * ca
        d["chromatic_aberration"]["magnification"] = mag
        sy = np.clip(np.rint(cy + (yy - cy) / mag), 0, h - 1).astype(np.int64)
        sx = np.clip(np.rint(cx + (xx - cx) / mag), 0, w - 1).astype(np.int64)
        scene = 0.6 * scene + 0.4 * scene[:, sy, sx]

    # --- optics --------------------------------------------------------------------------
    psf = float(rng.uniform(0.7, 1.3))
    zp = sev["z_projection"]
    if zp > 0:
        wz = 0.5 * zp
        scene = (1 - wz) * scene + wz * ndimage.gaussian_filter(scene, (0, 4.0, 4.0))
        d["z_projection"].update({"out_of_focus_weight": wz, "out_of_focus_sigma_px": 4.0})
    df = sev["defocus"]
    sig = np.full(t_out, psf)
    if df > 0:
        sig = psf + np.abs(rng.normal(1.5 * df, 0.7 * df, t_out))
    d["defocus"].update({"psf_sigma_px": psf, "sigma_px_per_frame": sig.round(3).tolist()})
    if np.allclose(sig, sig[0]):
        scene = ndimage.gaussian_filter(scene, (0, sig[0], sig[0]), truncate=3.0)
    else:
        for t in range(t_out):
            scene[t] = ndimage.gaussian_filter(scene[t], sig[t], truncate=3.0)
    ld = sev["local_defocus"]
    if ld > 0:
        m = _smooth_field(rng, (h, w), max(h, w) / 6)
        m = np.clip(m, 0, None) * ld
        m = np.clip(m / (m.max() + 1e-9) * ld, 0, 1).astype(np.float32)
        scene = (1 - m) * scene + m * ndimage.gaussian_filter(scene, (0, 3.0, 3.0))
        d["local_defocus"].update({"sigma_px": 3.0, "max_weight": float(m.max())})
    mb = sev["motion_blur"]
    if mb > 0:
        frames = np.flatnonzero(rng.uniform(size=t_out) < 0.3 * mb + 0.05)
        length = int(round(3 + 8 * mb))
        angles = rng.uniform(0, 180, frames.size)
        for t, ang in zip(frames, angles, strict=True):
            k = np.zeros((length, length), np.float32)
            k[length // 2, :] = 1.0
            k = ndimage.rotate(k, ang, reshape=False, order=1)
            scene[t] = ndimage.convolve(scene[t], k / k.sum(), mode="nearest")
        d["motion_blur"].update(
            {"frames": frames.tolist(), "length_px": length, "angle_deg": angles.tolist()}
        )

    # --- light: background, autofluorescence, debris, vignetting ---------------------------
    bg = float(rng.uniform(0.01, 0.03) * (1 + 4 * lc))
    af = float(rng.uniform(0.005, 0.02) * (1 + 4 * lc))
    d["low_contrast"].update({"background": bg, "autofluorescence": af})
    light_static = np.full((h, w), bg, np.float32) + af * (tissue.labels > 0)
    nb = sev["nonuniform_background"]
    if nb > 0:
        field = _smooth_field(rng, (h, w), max(h, w) / 5)
        grad = rng.normal(0, 1, 2)
        plane = (grad[0] * (yy - cy) / h + grad[1] * (xx - cx) / w).astype(np.float32)
        light_static += (0.04 * nb * np.clip(field + plane + 2.0, 0, None)).astype(np.float32)
        d["nonuniform_background"].update({"amplitude": 0.04 * nb, "gradient": grad.tolist()})
    light = scene + light_static[None]
    db = sev["debris"]
    if db > 0:
        n_deb = int(rng.integers(1, 2 + int(8 * db)))
        pos = rng.uniform([0, 0], [h, w], (n_deb, 2))
        vel = rng.normal(0, 0.3 * db, (n_deb, 2))
        rad = rng.uniform(2, 3 + 8 * db, n_deb)
        kind = rng.choice(["dark", "bright"], n_deb)
        strength = rng.uniform(0.3, 0.9, n_deb)
        for t in range(t_out):
            for i in range(n_deb):
                py, px = pos[i] + vel[i] * t
                y0, y1 = int(max(py - 3 * rad[i], 0)), int(min(py + 3 * rad[i] + 1, h))
                x0, x1 = int(max(px - 3 * rad[i], 0)), int(min(px + 3 * rad[i] + 1, w))
                if y0 >= y1 or x0 >= x1:
                    continue
                gy, gx = yy[y0:y1, x0:x1] - py, xx[y0:y1, x0:x1] - px
                blob = np.exp(-0.5 * (gy * gy + gx * gx) / rad[i] ** 2) * strength[i]
                if kind[i] == "dark":
                    light[t, y0:y1, x0:x1] *= 1.0 - blob
                else:
                    light[t, y0:y1, x0:x1] += 0.3 * blob
        d["debris"].update(
            {
                "position_px": pos.tolist(),
                "velocity_px_per_frame": vel.tolist(),
                "radius_px": rad.tolist(),
                "kind": kind.tolist(),
                "strength": strength.tolist(),
            }
        )
    vg = 0.1 + 0.5 * sev["vignetting"]
    d["vignetting"]["falloff_at_corner"] = vg
    light *= (1.0 - vg * rnorm2)[None]

    # --- camera -----------------------------------------------------------------------------
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
    electrons = rng.poisson(light * photon_scale).astype(np.float32)
    peak_e = float(photon_scale * np.percentile(tex[tex > 0], 95) * expression.max())
    full_well = 30000.0
    sat = sev["saturation"]
    if sat > 0:
        full_well = peak_e * (1.0 - 0.6 * sat)
    np.minimum(electrons, full_well, out=electrons)
    prnu = (1.0 + 0.01 * rng.standard_normal((h, w))).astype(np.float32)
    dsnu = (0.5 * rng.standard_normal((h, w))).astype(np.float32)
    electrons *= prnu[None]
    electrons += dsnu[None]
    electrons += rng.standard_normal(electrons.shape, dtype=np.float32) * read_e
    pr = sev["patterned_readout_noise"]
    if pr > 0:
        rows = rng.standard_normal((t_out, h, 1)).astype(np.float32) * (3.0 * pr * read_e + pr * 5)
        electrons += rows
        d["patterned_readout_noise"]["row_sigma_e"] = float(3.0 * pr * read_e + pr * 5)
    adu = np.rint(offset + gain * electrons)
    vmax = 2**adc_bits - 1
    np.clip(adu, 0, vmax, out=adu)
    image = adu.astype(np.uint8 if bit_depth == 8 else np.uint16)
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
    }
    meta = {
        "defects": d,
        "texture": tex_meta,
        "indicator": indicator,
        "frame_source_index": src.tolist(),
        "n_active_per_frame": act.sum(0).tolist(),
    }
    return image, labels_out, cal.astype(np.float32), meta
