"""Recordings with no calcium signal: camera noise only, for false-positive checks.

A segmentation method should report no cell on a recording that holds none (issue 17 item 2).
:func:`noise_only_recording` draws one such recording: a flat or smoothly uneven illumination
level (photo-electrons per pixel), optionally decaying over time (photobleaching,
``level x (1 - bleach x (1 - exp(-t / tau)))``), plus a slow additive baseline drift (a random
low-order polynomial in time, as from a warming camera or focus creep), observed through
Poisson (shot) or Gaussian noise, a gain (ADU per e-), a camera offset (ADU) and an ADC of 8 or
16 bits (rounded and clipped to its range). Nothing in it is a cell: no pixel shares a
transient with its neighbours. :func:`noise_conditions` draws the parameters of a sample of
such recordings over the ranges of issue 17 (Poisson and Gaussian, offsets, bleaching, drift,
8- and 16-bit, 20-2000 frames, sides 64-1024 px) under a pixel budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

NoiseKind = Literal["poisson", "gaussian"]


@dataclass
class NoiseCondition:
    """Parameters of one noise-only recording (lengths px, levels e- or ADU)."""

    kind: NoiseKind = "poisson"
    n_frames: int = 100
    height: int = 100
    width: int = 100
    level_e: float = 100.0  # mean photo-electrons per pixel per frame
    gain_adu_per_e: float = 1.0
    offset_adu: float = 100.0
    read_noise_e: float = 2.0  # Gaussian kind: SD = sqrt(level + read^2) e-
    bits: int = 16
    bleach_fraction: float = 0.0  # fraction of the level lost by the end
    drift_fraction: float = 0.0  # peak additive drift as a fraction of the level
    uneven: float = 0.0  # illumination falls by this fraction from centre to corner
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)


def noise_only_recording(c: NoiseCondition) -> np.ndarray:
    """One noise-only recording (module docstring).

    Returns:
        ``(T, H, W)`` uint8 (``bits`` 8) or uint16 (``bits`` 16) array in ADU.
    """
    rng = np.random.default_rng(c.seed)
    t = np.arange(c.n_frames, dtype=np.float64)
    tau = max(c.n_frames / 3.0, 1.0)
    bleach = 1.0 - c.bleach_fraction * (1.0 - np.exp(-t / tau)) / (
        1.0 - np.exp(-(c.n_frames - 1) / tau) if c.n_frames > 1 else 1.0
    )
    coef = rng.normal(0, 1, 3)
    x = t / max(c.n_frames - 1, 1)
    drift = coef[0] * x + coef[1] * x**2 + coef[2] * np.sin(2 * np.pi * x)
    drift = drift / max(np.abs(drift).max(), 1e-9) * c.drift_fraction * c.level_e
    yy, xx = np.mgrid[0 : c.height, 0 : c.width].astype(np.float32)
    r2 = ((yy - c.height / 2) / c.height) ** 2 + ((xx - c.width / 2) / c.width) ** 2
    illum = (1.0 - c.uneven * r2 / 0.5).astype(np.float32)
    maxv = 2**c.bits - 1
    dtype = np.uint8 if c.bits == 8 else np.uint16
    out = np.empty((c.n_frames, c.height, c.width), dtype)
    for i in range(c.n_frames):
        lam = np.maximum(c.level_e * bleach[i] * illum + drift[i], 0.0)
        if c.kind == "poisson":
            e = rng.poisson(lam).astype(np.float32)
            e += rng.normal(0, c.read_noise_e, lam.shape).astype(np.float32)
        else:
            e = lam + rng.normal(0, 1, lam.shape).astype(np.float32) * np.sqrt(
                lam + c.read_noise_e**2
            ).astype(np.float32)
        adu = np.rint(e * c.gain_adu_per_e + c.offset_adu)
        out[i] = np.clip(adu, 0, maxv).astype(dtype)
    return out


def noise_conditions(
    n: int, seed: int = 0, max_pixels: int = 4_000_000, max_side: int = 1024
) -> list[NoiseCondition]:
    """``n`` noise-only conditions drawn over the ranges of issue 17 (module docstring).

    Frames log-uniform in 20-2000, sides log-uniform in 64-``max_side`` (height and width
    drawn apart), then frames cut so that ``T x H x W <= max_pixels`` (at least 20 frames; the
    side shrinks when even 20 frames do not fit). Kinds alternate Poisson / Gaussian, bits
    alternate 8 / 16 in pairs; level log-uniform 0.5-2000 e-, gain 0.2-5 ADU/e- (8-bit: scaled
    so the mean sits below 60 % of the range), offset 0-500 ADU (8-bit: 0-30), bleaching 0-60 %
    in half the recordings, drift up to 30 % of the level in half, uneven illumination 0-50 %.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind: NoiseKind = "poisson" if i % 2 == 0 else "gaussian"
        bits = 8 if (i // 2) % 2 == 0 else 16
        frames = int(round(np.exp(rng.uniform(np.log(20), np.log(2000)))))
        h = int(round(np.exp(rng.uniform(np.log(64), np.log(max_side)))))
        w = int(round(np.exp(rng.uniform(np.log(64), np.log(max_side)))))
        while 20 * h * w > max_pixels and max(h, w) > 64:
            h, w = max(64, int(h * 0.8)), max(64, int(w * 0.8))
        frames = max(20, min(frames, max_pixels // (h * w)))
        level = float(np.exp(rng.uniform(np.log(0.5), np.log(2000))))
        gain = float(np.exp(rng.uniform(np.log(0.2), np.log(5))))
        offset = float(rng.uniform(0, 500))
        if bits == 8:
            offset = float(rng.uniform(0, 30))
            gain = min(gain, (0.6 * 255 - offset) / (level + 4 * np.sqrt(level) + 1))
        out.append(
            NoiseCondition(
                kind=kind,
                n_frames=frames,
                height=h,
                width=w,
                level_e=level,
                gain_adu_per_e=gain,
                offset_adu=offset,
                read_noise_e=float(rng.uniform(0.5, 10)),
                bits=bits,
                bleach_fraction=float(rng.uniform(0, 0.6)) if rng.random() < 0.5 else 0.0,
                drift_fraction=float(rng.uniform(0, 0.3)) if rng.random() < 0.5 else 0.0,
                uneven=float(rng.uniform(0, 0.5)),
                seed=seed * 100_003 + i,
            )
        )
    return out
