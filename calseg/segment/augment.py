"""Image + label augmentation of recordings for fine-tuning (numpy / OpenCV, no extra library).

:func:`augment_recording` turns one ``(T, H, W)`` recording and its ``(T, H, W)`` label stack
into a plausible *different* recording of the same cells: one set of parameters per call
(per variant), applied to every frame alike, as a different microscope or session would be.

Order (a camera-like chain, like the simulator's):

1. **Geometry** (image and labels together; labels nearest-neighbour, never interpolated):
   random flip(s), rotation by a multiple of 90 degrees (only 180 for non-square frames, so
   the shape is kept), random crop of ``crop_scale`` of each side resized back to ``(H, W)``
   at a random position (zoom; labels nearest), elastic deformation (a Gaussian-smoothed
   random displacement field, Simard et al. 2003, ICDAR: ``elastic_alpha_px`` peak
   displacement, ``elastic_sigma_px`` smoothness). Image pixels that come from outside the
   frame take the frame's 1st percentile (background), labels 0.
2. **Blur**: Gaussian, sigma ``U(0, blur_sigma_max_px)`` (labels unchanged: the cell is
   where it is).
3. **Intensity** on the recording's own scale: ``x' = offset + gain * lo + range *
   contrast * ((x - lo) / range) ** gamma`` with ``lo, range`` the recording's 1st percentile
   and 1st-99.8th percentile range, ``gain ~ U(gain_range)`` scaling the level above zero,
   ``offset ~ U(offset_range) * range``, ``gamma ~ exp(U(-log_gamma, log_gamma))``.
4. **Noise**: Poisson-Gaussian with a random camera: photo-electrons ``e = max(x' - lo', 0)
   / g`` with gain ``g`` drawn so the recording's 99.8th percentile holds
   ``U(photons_range)`` photo-electrons, ``Poisson(e)`` (normal approximation above 50 e-,
   :func:`calseg.simulate.render.shot_noise`), plus read noise ``N(0, U(read_noise_range))``
   e-, then back to ADU.
5. **Range**: rounded and clipped to the output dtype (``uint16``: 0..65535, 12-bit data
   stays 12-bit unless the gain pushes it up; ``uint8``: 0..255); float input stays float32.

Every draw is recorded in the returned parameter dict (JSON-able), with the seed.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calseg.simulate.render import shot_noise


class AugmentError(ValueError):
    """Image and labels cannot be augmented together (shape or dtype mismatch)."""


class AugmentConfig(BaseModel):
    """Ranges of the random augmentation (module docstring). ``p_*``: probability per
    variant that a step is applied."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    p_flip: float = Field(0.5, ge=0, le=1, description="probability of each axis flip")
    p_rot90: float = Field(0.5, ge=0, le=1)
    p_crop: float = Field(0.5, ge=0, le=1)
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="crop side fraction range")
    p_elastic: float = Field(0.3, ge=0, le=1)
    elastic_alpha_px: float = Field(3.0, ge=0, le=50)
    elastic_sigma_px: float = Field(8.0, gt=0, le=200)
    p_blur: float = Field(0.5, ge=0, le=1)
    blur_sigma_max_px: float = Field(1.5, ge=0, le=20)
    gain_range: tuple[float, float] = Field((0.5, 2.0))
    offset_range: tuple[float, float] = Field((-0.05, 0.2), description="x the recording range")
    log_gamma: float = Field(0.4, ge=0, le=2)
    contrast_range: tuple[float, float] = Field((0.5, 1.0))
    p_noise: float = Field(0.7, ge=0, le=1)
    photons_range: tuple[float, float] = Field((30.0, 3000.0), description="e- at the 99.8 pct")
    read_noise_range: tuple[float, float] = Field((0.5, 10.0), description="read noise (e-)")


def _remap(img: np.ndarray, mx: np.ndarray, my: np.ndarray, nearest: bool, fill: float):
    """cv2.remap for float32 images / uint32 labels (labels via float64-safe index trick)."""
    if nearest:
        xi = np.clip(np.rint(mx), -1, img.shape[1]).astype(np.int64)
        yi = np.clip(np.rint(my), -1, img.shape[0]).astype(np.int64)
        out_of = (xi < 0) | (xi >= img.shape[1]) | (yi < 0) | (yi >= img.shape[0])
        res = img[np.clip(yi, 0, img.shape[0] - 1), np.clip(xi, 0, img.shape[1] - 1)]
        res = res.copy()
        res[out_of] = fill
        return res
    return cv2.remap(
        img.astype(np.float32),
        mx.astype(np.float32),
        my.astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(fill),
    )


def augment_recording(
    image: np.ndarray,
    labels: np.ndarray,
    seed: int,
    config: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One augmented variant of a recording and its label stack (module docstring).

    Args:
        image: ``(T, H, W)`` (or ``(H, W)``) recording, uint8/uint16/float.
        labels: label stack of the same shape, integer (0 = background).
        seed: variant seed (the whole variant is a function of ``(image, labels, seed,
            config)``).
        config: :class:`AugmentConfig` (default ranges when None).

    Returns:
        ``(image', labels', params)``: same shapes and dtypes as the input; ``params`` records
        every draw.

    Raises:
        AugmentError: shapes differ, or labels are not integer.
    """
    cfg = config or AugmentConfig()
    img = np.asarray(image)
    lab = np.asarray(labels)
    squeeze = img.ndim == 2
    if squeeze:
        img, lab = img[None], lab[None]
    if img.shape != lab.shape or img.ndim != 3:
        raise AugmentError(
            f"image {np.shape(image)} and labels {np.shape(labels)} must have the same "
            "(T, H, W) shape"
        )
    if not np.issubdtype(lab.dtype, np.integer):
        raise AugmentError(f"labels must be integer, got {lab.dtype}")
    rng = np.random.default_rng(seed)
    t, h, w = img.shape
    x = img.astype(np.float32)
    y = lab.copy()
    lo, hi = (float(v) for v in np.percentile(x, [1, 99.8]))
    rng_ = max(hi - lo, 1e-6)
    p: dict = {"seed": int(seed)}
    # 1. geometry -----------------------------------------------------------------------
    if rng.random() < cfg.p_flip:
        x, y = x[:, ::-1], y[:, ::-1]
        p["flip_rows"] = True
    if rng.random() < cfg.p_flip:
        x, y = x[:, :, ::-1], y[:, :, ::-1]
        p["flip_cols"] = True
    if rng.random() < cfg.p_rot90:
        k = int(rng.integers(1, 4)) if h == w else 2
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        p["rot90"] = k
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    yy, xx = np.indices((h, w), dtype=np.float64)
    mx, my = xx.copy(), yy.copy()
    moved = False
    if rng.random() < cfg.p_crop:
        s = float(rng.uniform(*cfg.crop_scale))
        ch, cw = max(2, s * h), max(2, s * w)
        y0 = float(rng.uniform(0, h - ch)) if h > ch else 0.0
        x0 = float(rng.uniform(0, w - cw)) if w > cw else 0.0
        # output pixel centre -> source pixel centre inside the crop window
        mx = x0 + (xx + 0.5) * (cw / w) - 0.5
        my = y0 + (yy + 0.5) * (ch / h) - 0.5
        p["crop"] = {"scale": s, "row0": y0, "col0": x0}
        moved = True
    if rng.random() < cfg.p_elastic and cfg.elastic_alpha_px > 0:
        dx = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)), (0, 0), cfg.elastic_sigma_px)
        dy = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)), (0, 0), cfg.elastic_sigma_px)
        scale = cfg.elastic_alpha_px / max(np.abs(dx).max(), np.abs(dy).max(), 1e-12)
        mx = mx + dx * scale
        my = my + dy * scale
        p["elastic"] = {"alpha_px": cfg.elastic_alpha_px, "sigma_px": cfg.elastic_sigma_px}
        moved = True
    if moved:
        x = np.stack([_remap(x[f], mx, my, False, lo) for f in range(t)])
        y = np.stack([_remap(y[f], mx, my, True, 0) for f in range(t)])
    # 2. blur ---------------------------------------------------------------------------
    if rng.random() < cfg.p_blur and cfg.blur_sigma_max_px > 0:
        sb = float(rng.uniform(0, cfg.blur_sigma_max_px))
        if sb > 0.05:
            x = np.stack([cv2.GaussianBlur(x[f], (0, 0), sb) for f in range(t)])
        p["blur_sigma_px"] = sb
    # 3. intensity ----------------------------------------------------------------------
    gain = float(rng.uniform(*cfg.gain_range))
    off = float(rng.uniform(*cfg.offset_range)) * rng_
    gamma = float(math.exp(rng.uniform(-cfg.log_gamma, cfg.log_gamma)))
    contrast = float(rng.uniform(*cfg.contrast_range))
    z = np.clip((x - lo) / rng_, 0, None)
    x = (gain * (lo + off) + gain * rng_ * contrast * z**gamma).astype(np.float32)
    p.update(gain=gain, offset=off, gamma=gamma, contrast=contrast)
    # 4. noise --------------------------------------------------------------------------
    if rng.random() < cfg.p_noise:
        base = gain * (lo + off)
        top = gain * rng_ * contrast
        photons = float(math.exp(rng.uniform(*np.log(cfg.photons_range))))
        read = float(rng.uniform(*cfg.read_noise_range))
        g = max(top, 1e-6) / photons  # ADU per e-
        e = np.clip((x - base) / g, 0, None)
        e = shot_noise(e, rng) + rng.standard_normal(e.shape, dtype=np.float32) * read
        x = (base + g * e).astype(np.float32)
        p["noise"] = {"photons_at_top": photons, "read_noise_e": read, "adu_per_e": g}
    # 5. range --------------------------------------------------------------------------
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        x = np.clip(np.rint(x), info.min, info.max).astype(img.dtype)
    else:
        x = x.astype(np.float32)
    y = y.astype(lab.dtype)
    if squeeze:
        x, y = x[0], y[0]
    return x, y, p
