"""GECI (GCaMP) indicator physics and the ground-truth activity of a cell.

Per cell, the fraction of Ca2+-bound indicator follows a Hill curve ``h(c) = c^n / (c^n +
Kd^n)`` (GCaMP6s Kd 144 nM, n 2.9; 6f 375 nM, 2.27; 6m 167 nM, 2.96; Chen et al. 2013, Nature
499:295, DESIGN.md section 3), filtered across frames with the indicator's rise / decay time
constants (exact exponential for the frame interval, so the kinetics matter only when frames
are fast). Relative fluorescence ``f = fmin + (1 - fmin) * b`` with ``fmin = Fmin / Fmax = 1 /
dynamic_range`` (Fmax = 1). A cell is active in a frame when its Ca2+ is above a threshold
(source: 0.1 uM), optionally with hysteresis (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from calseg.progress import check_cancelled

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
        check_cancelled()
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
        raise ValueError(f"hysteresis low level {low_uM} must be below {threshold_uM} uM")
    out = np.empty_like(on)
    state = on[:, 0].copy()
    out[:, 0] = state
    for t in range(1, c.shape[1]):
        state = on[:, t] | (state & (c[:, t] > low_uM))
        out[:, t] = state
    return out
