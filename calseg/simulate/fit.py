"""Fit the simulator to a real recording: estimate its imaging parameters from the frames.

:func:`fit_recording` measures a ``(T, H, W)`` recording and :meth:`RecordingFit.to_config`
turns the measurements into a :class:`~calseg.simulate.config.SimulationConfig` whose
``imaging`` overrides pin the renderer's camera, light and optics to them ("simulate like this
recording"). Estimators (all plain numpy/scipy, one function each):

* **Noise model** (:func:`fit_noise_curve`): photon-transfer curve. For a camera
  ``ADU = offset + g (P + R)`` with ``P ~ Poisson(lambda)`` photo-electrons and ``R ~ N(0,
  sigma_r^2)`` read noise, ``var = g (mean - offset) + g^2 sigma_r^2`` (Janesick 2007, Photon
  Transfer, SPIE; the Poisson-Gaussian model of Foi et al. 2008, IEEE TIP 17:1737). Variance
  is measured on differences of consecutive frames, ``d = x[t+1] - x[t]``, which removes the
  static scene and fixed-pattern noise; ``var = (1.4826 MAD(d))^2 / 2`` per bin of the pair
  mean (MAD: robust to the minority of pixels whose Ca2+ signal changes between frames).
  Weighted least squares of ``var = a mean + b`` over equal-count bins gives the gain
  ``g = a`` (ADU per e-).
* **Offset, read noise, background** (:func:`split_dark_level`): ``b`` alone cannot separate
  the offset from the read noise, nor background light from the offset. The split uses the
  third cumulant of the darkest pixels' temporal fluctuations: Poisson light has
  ``kappa_3 = g^3 lambda`` while read noise (Gaussian) and quantisation (uniform) have 0, so
  ``lambda = kappa_3 / g^3``, ``sigma_r^2 = kappa_2 / g^2 - lambda`` and ``offset = mean -
  g lambda``. When that is not measurable (``kappa_3`` below 3 standard errors, or no
  shot-noise skewness as with analogue PMT detectors) the darkest pixels are taken as dark
  (``lambda = 0``): the read noise is then the effective noise floor ``sqrt(sigma_r^2 +
  lambda)``, which gives the same noise curve, and the background light 0.
* **PSF width** (:func:`fit_psf_sigma`): radially averaged power spectrum ``P(f)`` of the
  temporal mean image minus its (known) white-noise floor, fitted by
  ``log P = c - alpha log f - 4 pi^2 sigma^2 f^2`` (a power-law scene, Field 1987 JOSA A
  4:2379, blurred by a Gaussian PSF whose transfer function is ``exp(-2 pi^2 sigma^2 f^2)``).
* **Photobleaching** (:func:`fit_bleaching`): Theil-Sen slope of ``log`` of the per-frame
  median tissue signal (camera offset and background removed) against time; robust to
  transient Ca2+ activity in a minority of frames.
* **Cell size**: :func:`calseg.analysis.cellsize.estimate_cell_diameter`, CalSeg's one cell-size
  estimator (the ``cells`` target uses it too): scale-space energy of the resting image.
* **Frame interval, pixel size**: from the file's metadata when present, else the simulator's
  defaults (recorded as such in ``notes``).
* **Intensity range**: output bit depth and ADC range from the maximum value.
* **Indicator dynamic range**: peak ``F / F0`` of the brightest responding pixels, turned into
  the indicator's ``Fmin / Fmax`` (:func:`fmin_from_peak_ratio`).

Every estimate is recorded with how it was obtained in :attr:`RecordingFit.notes`.

On data that are not from a camera the same model gives *effective* parameters: for a
photon-counting two-photon PMT recording (sima_example.tif) the "photo-electron" is a detected
photon (gain ~900 ADU per photon, read noise 0, a fraction of a photon per dark pixel), which
is what the renderer needs to reproduce its noise; they are not a statement about a camera.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import ValidationError
from scipy import ndimage as ndi
from scipy import stats

from calseg.analysis.cellsize import estimate_cell_diameter
from calseg.analysis.metrics import MAD_TO_SIGMA
from calseg.fmt import fmt_num
from calseg.io.recordings import (
    FRAME_INTERVAL_RANGE_S,
    PIXEL_SIZE_RANGE_UM,
    RecordingError,
    usable_unit,
)
from calseg.progress import check_cancelled
from calseg.simulate.config import (
    MAX_FRAMES,
    MAX_MODEL_TIME_S,
    MAX_SIDE_PX,
    ImagingOverrides,
    SimulationConfig,
)
from calseg.simulate.geometry import MAX_CELLS, MIN_CELLS, estimate_n_cells
from calseg.simulate.render import INDICATORS, hill

RESTING_CA_UM = 0.06
"""Resting cytosolic Ca2+ of the tissue model (DESIGN.md section 2: 0.056-0.069 uM)."""
PEAK_CA_UM = 1.2
"""Peak cytosolic Ca2+ of the tissue model (DESIGN.md section 2: 1.15-1.34 uM)."""
MEAN_TEXTURE = 0.85
"""Mean of the renderer's cell texture (nucleus and membrane dimming; measured on the
renderer's ``cell_texture``: 0.82-0.88)."""
HIGHPASS_NOISE_FRACTION = 8.0 / 9.0
"""Variance of white noise left by ``x - box3x3(x)``: ``1 - 2/9 + 9/81``."""
MAX_FIT_FRAMES = 64
"""Frames used by the noise / dark-level / PSF / cell-size estimators (memory bound)."""
PSF_SCENE_ALPHA = 2.0
"""Power-law exponent of the unblurred scene's power spectrum (natural images ~ f^-2:
Field 1987, JOSA A 4:2379; van der Schaaf & van Hateren 1996, Vision Res 36:2759). On the
simulator's tissues sigma 0.7-2.0 px is recovered within 15 % with it (tests/test_fit.py)."""


class FitError(RecordingError):
    """The recording cannot be fitted (too few frames, constant, ...); says what to do."""


@dataclass
class NoiseCurve:
    """Photon-transfer curve: binned pair mean ``mean_adu`` vs temporal variance ``var_adu2``.

    ``gain_adu_per_e`` = slope, ``intercept_adu2`` = variance at mean 0, ``r2`` = weighted
    coefficient of determination of the line fit, ``gain_se`` = standard error of the slope.
    """

    mean_adu: list[float]
    var_adu2: list[float]
    n_per_bin: list[int]
    gain_adu_per_e: float
    intercept_adu2: float
    gain_se: float
    r2: float


def _as_float_stack(frames: np.ndarray, min_frames: int = 3) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 3:
        raise FitError(f"expected a (T, H, W) recording, got shape {a.shape}")
    if a.shape[0] < min_frames:
        raise FitError(
            f"the recording has {a.shape[0]} frame(s); fitting the noise model needs at least "
            f"{min_frames} frames (it compares consecutive frames)"
        )
    a = a.astype(np.float32)  # exact for integer data up to 2^24; sums are taken in float64
    if not np.isfinite(a).all():
        raise FitError("the recording contains NaN/Inf pixels; fit only finite recordings")
    if a.max() == a.min():
        raise FitError("the recording is constant: nothing to fit")
    return a


@np.errstate(over="ignore", invalid="ignore")  # values far beyond counts: FitError below
def fit_noise_curve(frames: np.ndarray, n_bins: int = 24, max_pairs: int = 4_000_000) -> NoiseCurve:
    """Photon-transfer curve from consecutive-frame differences (see module docstring).

    Args:
        frames: ``(T, H, W)`` recording in camera units (ADU), T >= 3.
        n_bins: equal-count bins of the pair mean.
        max_pairs: at most this many pixel pairs are used (strided subsample).

    Returns:
        :class:`NoiseCurve` (level of a bin: median of ``9/8 M``, see the code comments).
        Bins touching the ADC limits (a pair with a value at the
        recording's minimum or maximum) are dropped: clipping shrinks the variance there.

    Raises:
        FitError: fewer than 3 frames, non-finite or constant recording, or fewer than 3
            usable bins.
    """
    a = _as_float_stack(frames)
    diff = a[1:] - a[:-1]
    # Spatial high-pass of each difference image: Ca2+ changes are smooth over a cell (and
    # blurred by the PSF), the noise is white. e = d - box3(d) has variance
    # (7/9) v(p) + (1/81) sum_3x3 v(q); with v linear in the mean that is a * M + (8/9) b with
    # M = (7/9) m + (1/9) box3(m), so bins of M give an unbiased slope. m is the pixel's
    # temporal mean (noise / sqrt(T)), not the pair mean: binning by a noisy level would
    # attenuate the slope (errors in variables).
    diff -= ndi.uniform_filter(diff, size=(1, 3, 3), mode="reflect")
    level = a.mean(axis=0)
    level = (7.0 / 9.0) * level + (1.0 / 9.0) * ndi.uniform_filter(level, size=3)
    mm = np.broadcast_to(level, diff.shape)
    x0, x1 = a[:-1].ravel(), a[1:].ravel()
    lo, hi = a.min(), a.max()
    keep = (x0 > lo) & (x1 > lo) & (x0 < hi) & (x1 < hi)
    m = mm.ravel()[keep]
    d = diff.ravel()[keep]
    if m.size > max_pairs:
        step = int(math.ceil(m.size / max_pairs))
        m, d = m[::step], d[::step]
    if m.size < 30 * n_bins:
        n_bins = max(3, m.size // 30)
    order = np.argsort(m, kind="stable")
    means, vars_, counts = [], [], []
    for chunk in np.array_split(order, n_bins):
        if chunk.size < 20:
            continue
        dd = d[chunk]
        mad = np.median(np.abs(dd - np.median(dd)))
        # back to the pixel scale: var = (a M + (8/9) b) * 9/8 = a m' + b with m' = 9/8 M
        v = (MAD_TO_SIGMA * mad) ** 2 / 2.0 / HIGHPASS_NOISE_FRACTION
        if v <= 0:  # integer data with most differences 0: fall back to the plain variance
            v = float(np.var(dd)) / 2.0 / HIGHPASS_NOISE_FRACTION
        # the MAD measures the typical (median) pixel of the bin: pair it with the median level
        means.append(float(np.median(m[chunk])) / HIGHPASS_NOISE_FRACTION)
        vars_.append(float(v))
        counts.append(int(chunk.size))
    if len(means) < 3:
        raise FitError("too few distinct intensity levels to fit a noise curve")
    mx, vy, n = np.array(means), np.array(vars_), np.array(counts, float)
    # SE of a MAD variance estimate ~ var * sqrt(2 * 2.72 / n) (MAD efficiency 0.37 for
    # normal data); weights 1 / SE^2.
    w = n / np.maximum(vy, 1e-12) ** 2
    x = np.column_stack([mx, np.ones_like(mx)])
    wx = x * w[:, None]
    try:
        cov = np.linalg.inv(x.T @ wx)
    except np.linalg.LinAlgError:  # e.g. an ImageJ calibration of c1 = 1e30: levels of 1e34
        cov = np.full((2, 2), np.nan)
    coef = cov @ (wx.T @ vy)
    if not np.isfinite(coef).all():
        raise FitError(
            "no noise curve can be fitted: the intensity levels "
            f"({fmt_num(float(mx.min()))} to {fmt_num(float(mx.max()))}) and their variances "
            "give no finite line (calibrated or rescaled values far from camera counts?)"
        )
    resid = vy - x @ coef
    dof = max(1, len(mx) - 2)
    s2 = float((w * resid**2).sum() / dof)
    ybar = float((w * vy).sum() / w.sum())
    ss_tot = float((w * (vy - ybar) ** 2).sum())
    r2 = 1.0 - float((w * resid**2).sum()) / ss_tot if ss_tot > 0 else 0.0
    return NoiseCurve(
        mean_adu=mx.tolist(),
        var_adu2=vy.tolist(),
        n_per_bin=counts,
        gain_adu_per_e=float(coef[0]),
        intercept_adu2=float(coef[1]),
        gain_se=float(math.sqrt(max(cov[0, 0] * s2, 0.0))),
        r2=float(r2),
    )


@dataclass
class DarkLevel:
    """Camera offset, read noise and background light from the darkest pixels.

    ``method``: ``"third-cumulant"`` or ``"dark-pixels"`` (with the reason when the third
    cumulant was measurable but implied a negative offset; see module docstring).
    ``dark_mean_adu``: mean level of the darkest pixels; ``background_e``: their light
    (photo-electrons per frame); ``kappa3_z``: third cumulant / its standard error.
    """

    offset_adu: float
    read_noise_e: float
    background_e: float
    dark_mean_adu: float
    method: str
    kappa3_z: float


def split_dark_level(
    frames: np.ndarray, gain_adu_per_e: float, dark_fraction: float = 0.1
) -> DarkLevel:
    """Offset / read noise / background split from the darkest pixels (module docstring).

    Args:
        frames: ``(T, H, W)`` recording (ADU), T >= 3.
        gain_adu_per_e: gain from :func:`fit_noise_curve` (> 0).
        dark_fraction: fraction of pixels (lowest temporal mean) treated as the dark region.

    Returns:
        :class:`DarkLevel`. Unbiased k-statistics per pixel over time (Fisher 1930), averaged
        over the dark pixels; the standard error of ``kappa_3`` is taken from the spread of
        the per-pixel estimates.
    """
    a = _as_float_stack(frames)
    g = float(gain_adu_per_e)
    if not g > 0:
        raise FitError(f"gain must be positive to split the dark level, got {g}")
    t = a.shape[0]
    mean_img = a.mean(axis=0, dtype=np.float64)
    thr = np.quantile(mean_img, dark_fraction)
    sel = mean_img <= thr
    x = a[:, sel].astype(np.float64)  # (T, n)
    dev = x - x.mean(axis=0)
    m2 = (dev**2).mean(axis=0)
    m3 = (dev**3).mean(axis=0)
    k2 = m2 * t / (t - 1)
    k3 = m3 * t * t / ((t - 1) * (t - 2))
    k2m, k3m = float(k2.mean()), float(k3.mean())
    k3_se = float(k3.std(ddof=1) / math.sqrt(max(k3.size, 2))) if k3.size > 1 else float("inf")
    z = k3m / k3_se if k3_se > 0 else 0.0
    dark_mean = float(x.mean())
    lam = k3m / g**3 if z > 3 else 0.0
    lam = float(min(max(lam, 0.0), k2m / g**2))
    method = "third-cumulant" if z > 3 else "dark-pixels"
    if dark_mean - g * lam < 0:  # an offset below 0 ADU: the skewness is not shot noise
        lam, method = 0.0, "dark-pixels (the third cumulant implied an offset below 0 ADU)"
    read2 = max(k2m / g**2 - lam - 1.0 / (12 * g * g), 0.0)  # minus quantisation 1/12 ADU^2
    return DarkLevel(
        offset_adu=float(dark_mean - g * lam),
        read_noise_e=float(math.sqrt(read2)),
        background_e=lam,
        dark_mean_adu=dark_mean,
        method=method,
        kappa3_z=float(z),
    )


def radial_power_spectrum(image: np.ndarray, n_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of an ``(H, W)`` image (mean removed, Hann window).

    Returns:
        ``(f, p)``: bin-centre spatial frequencies (cycles/px, in (0, 0.5]) and mean power
        ``|FFT|^2 / (sum of window^2)`` per bin; white noise of variance v gives ``p = v``.
    """
    img = np.asarray(image, np.float64)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w)) if min(h, w) > 8 else np.ones((h, w))
    x = (img - img.mean()) * win
    p = np.abs(np.fft.fft2(x)) ** 2 / (win**2).sum()
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    fr = np.sqrt(fy**2 + fx**2).ravel()
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.digitize(fr, edges) - 1
    ok = (idx >= 0) & (idx < n_bins) & (fr > 0)
    s = np.bincount(idx[ok], p.ravel()[ok], n_bins)
    c = np.bincount(idx[ok], minlength=n_bins)
    f = 0.5 * (edges[1:] + edges[:-1])
    good = c > 0
    return f[good], s[good] / c[good]


def fit_psf_sigma(mean_image: np.ndarray, alpha: float = PSF_SCENE_ALPHA) -> tuple[float, dict]:
    """Gaussian PSF sigma (px) from the power spectrum of a temporal mean image.

    The white floor (temporal noise / T plus fixed-pattern noise, both white) is the median
    power above 0.42 cycles/px; bins more than 1x the floor above it are fitted by
    ``log(P - floor) + alpha log f = c - 4 pi^2 sigma^2 f^2`` (least squares in sigma^2).

    Args:
        mean_image: ``(H, W)`` temporal mean of the recording (at least 16 x 16).
        alpha: power-law exponent of the unblurred scene (default 2, natural images).

    Returns:
        ``(sigma_px, details)``: the fitted sigma (0 when the spectrum shows no Gaussian
        roll-off or too few bins are above the floor) and the fit (frequencies used, floor).
    """
    f, p = radial_power_spectrum(mean_image)
    hi = f > 0.42
    if hi.sum() < 2:
        return 0.0, {"n_freq": 0, "note": "image too small for a power spectrum"}
    floor = float(np.median(p[hi]))
    sig = p - floor
    use = (sig > floor) & (f > 0.03) & ~hi
    if use.sum() < 3:
        return 0.0, {"n_freq": int(use.sum()), "note": "signal below 2x the white floor"}
    ff, ss = f[use], sig[use]
    y = np.log(ss) + alpha * np.log(ff)
    x = np.column_stack([np.ones_like(ff), -4 * math.pi**2 * ff**2])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    s2 = float(coef[1])
    sigma = math.sqrt(s2) if s2 > 0 else 0.0
    resid = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
    return sigma, {
        "n_freq": int(use.sum()),
        "f_max": float(ff.max()),
        "white_floor": floor,
        "alpha": alpha,
        "rms_log_residual": resid,
    }


def fit_bleaching(
    frames: np.ndarray, frame_interval_s: float, dark_level_adu: float
) -> tuple[float, dict]:
    """Photobleaching time constant (in the unit of ``frame_interval_s``; pass 1.0 for
    frames) of the recording (module docstring).

    Args:
        frames: ``(T, H, W)`` recording (ADU).
        frame_interval_s: time between frames (s).
        dark_level_adu: offset + background light (ADU) to subtract.

    Returns:
        ``(tau_s, details)``; ``tau_s = inf`` when the signal does not decay significantly
        (Theil-Sen 95 % interval of the slope includes 0) or rises.
    """
    a = np.asarray(frames)
    if a.ndim != 3 or a.shape[0] < 3:
        raise FitError(f"need a (T, H, W) recording with T >= 3, got shape {a.shape}")
    mean_img = np.zeros(a.shape[1:], np.float64)
    for f in range(a.shape[0]):  # frame by frame: no float copy of the whole recording
        check_cancelled()
        mean_img += a[f]
    mean_img /= a.shape[0]
    tissue = mean_img > np.quantile(mean_img, 0.5)
    y = np.array([np.median(a[f][tissue]) for f in range(a.shape[0])], np.float64)
    y -= dark_level_adu
    t = np.arange(a.shape[0]) * frame_interval_s
    if not np.isfinite(y).all() or (y <= 0).any():
        return math.inf, {"note": "tissue signal not finite or not above the dark level"}
    slope, icpt, lo, hi = stats.theilslopes(np.log(y), t, alpha=0.95)
    details = {"log_slope_per_s": float(slope), "slope_ci95": [float(lo), float(hi)]}
    if hi >= 0 or slope >= 0:
        return math.inf, details
    return float(-1.0 / slope), details


def fmin_from_peak_ratio(peak_ratio: float, indicator: str = "GCaMP6s") -> float | None:
    """Indicator ``Fmin / Fmax`` that makes a resting-to-peak transient of the tissue model
    (``RESTING_CA_UM`` to ``PEAK_CA_UM``) reach ``F / F0 = peak_ratio``.

    With ``h0 = hill(c_rest)``, ``h1 = hill(c_peak)``: ``R (m + (1 - m) h0) = m + (1 - m) h1``,
    so ``m = (h1 - R h0) / (R (1 - h0) - (1 - h1))``. Returns ``None`` when ``R`` is at or
    beyond what the indicator can show with ``m -> 0`` (keep the indicator's own range) or
    ``R <= 1``.
    """
    h0 = float(hill(np.array(RESTING_CA_UM), indicator))
    h1 = float(hill(np.array(PEAK_CA_UM), indicator))
    r = float(peak_ratio)
    den = r * (1 - h0) - (1 - h1)
    if r <= 1.0 or den <= 0:
        return None
    m = (h1 - r * h0) / den
    if not 0 < m < 1:
        return None
    return float(m)


@dataclass
class RecordingFit:
    """Everything measured on one recording (units in the names), plus how.

    ``imaging`` holds the values for :class:`~calseg.simulate.config.ImagingOverrides`.
    """

    height: int
    width: int
    n_frames: int
    frame_interval_s: float | None
    pixel_size_um: float | None
    gain_adu_per_e: float
    offset_adu: float
    read_noise_e: float
    background_e: float
    background_adu: float
    background_nonuniformity: float
    photon_scale_e: float
    psf_sigma_px: float
    bleach_tau_frames: float
    cell_radius_px: float
    mean_cell_area_px: float
    tissue_fraction: float
    peak_f_over_f0: float
    fmin_over_fmax: float | None
    bit_depth: int
    adc_bits: int
    max_value: float
    noise_curve: dict
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able dict (``inf`` -> None)."""

        def clean(v):  # noqa: ANN001, ANN202
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    def bleach_tau_s(self, frame_interval_s: float | None = None) -> float:
        """Bleaching time constant (s) at ``frame_interval_s`` (default: the recording's)."""
        fi = frame_interval_s or self.frame_interval_s
        if fi is None:
            raise FitError("no frame interval known: pass frame_interval_s")
        return self.bleach_tau_frames * fi

    def imaging(self, frame_interval_s: float | None = None) -> ImagingOverrides:
        """The fitted values as renderer overrides (bleaching converted to s with
        ``frame_interval_s``, default the recording's, else the simulator's default 5 s)."""
        fi = frame_interval_s or self.frame_interval_s or SimulationConfig().frame_interval_s
        tau = self.bleach_tau_s(fi) if math.isfinite(self.bleach_tau_frames) else 1e12
        return ImagingOverrides(
            gain_adu_per_e=min(max(self.gain_adu_per_e, 1e-3), 1000.0),
            offset_adu=min(max(self.offset_adu, 0.0), 65535.0),
            read_noise_e=min(max(self.read_noise_e, 0.0), 1000.0),
            adc_bits=self.adc_bits if self.bit_depth == 16 else None,
            photon_scale_e=min(max(self.photon_scale_e, 1.0), 1e7),
            background=min(max(self.background_e / self.photon_scale_e, 0.0), 10.0),
            psf_sigma_px=min(max(self.psf_sigma_px, 0.3), 50.0),
            bleach_tau_s=min(max(tau, 1e-3), 1e12),
            fmin_over_fmax=self.fmin_over_fmax,
            vignetting=0.0,
        )

    def to_config(self, base: SimulationConfig | None = None, **overrides) -> SimulationConfig:
        """A :class:`SimulationConfig` that renders recordings like this one.

        Frame size, frame count and frame interval come from the recording, clipped to the
        simulator's bounds: sides are at least 32 px and the field is enlarged (keeping the
        cell size) until it holds the simulator's minimum number of cells. The fitted camera,
        light and optics go to ``imaging`` (pinned; the defects drawn at ``base``'s
        ``defect_severity`` still add the simulator's own randomisation on top). ``base``
        supplies every other field; ``overrides`` replace fields last.
        """
        base = base or SimulationConfig()
        d = base.model_dump()
        area = float(min(max(self.mean_cell_area_px, 10.0), 10000.0))
        shape = "rectangle" if self.tissue_fraction > 0.8 else "pouch"
        h, w = min(max(32, self.height), MAX_SIDE_PX), min(max(32, self.width), MAX_SIDE_PX)
        # each side grows until the field holds enough cells or both reach the limit (a
        # 8 x 5000 px field gave 32 x 4096 px, 10 cells, refused: a tenth attack run)
        while estimate_n_cells(h, w, shape, area) < MIN_CELLS and min(h, w) < MAX_SIDE_PX:
            h, w = min(int(h * 1.25) + 1, MAX_SIDE_PX), min(int(w * 1.25) + 1, MAX_SIDE_PX)
        while estimate_n_cells(h, w, shape, area) > MAX_CELLS:
            area *= 1.25
        dt = d["frame_interval_s"]
        if self.frame_interval_s is not None:
            dt = float(min(max(self.frame_interval_s, d["dt_s"]), 600.0))
        # the model time is bounded too: 420 frames of 10 min gave 252,000 s, refused
        n_frames = int(min(self.n_frames, MAX_FRAMES, MAX_MODEL_TIME_S // dt))
        d.update(
            height=h,
            width=w,
            n_frames=max(2, n_frames),
            frame_interval_s=dt,
            mean_cell_area_px=min(area, 10000.0),
            tissue_shape=shape,
            bit_depth=self.bit_depth,
        )
        d["imaging"] = self.imaging(d["frame_interval_s"]).model_dump()
        if self.pixel_size_um is not None:
            d["pixel_size_um"] = float(min(max(self.pixel_size_um, 1e-3), 100.0))
        d.update(overrides)
        try:
            return SimulationConfig.model_validate(d)
        except ValidationError as exc:  # whatever a recording gave that the bounds above miss
            reasons = "; ".join(e["msg"] for e in exc.errors())
            raise FitError(
                f"the fitted simulation is not one the simulator can run: {reasons}"
            ) from None


CAMERA_GAIN_RANGE_ADU_PER_E = (0.05, 50.0)
"""Gains cameras give without electron multiplication (sCMOS and CCD: about 0.1-20 ADU/e-,
e.g. Huang et al. 2013, Nat Methods 10:653 for sCMOS); outside it the fit is flagged."""
MIN_READ_NOISE_E = 0.1
"""A fitted read noise below this (e-) is flagged: none could be separated from shot noise."""


def plausibility_notes(gain_adu_per_e: float, read_noise_e: float, n_frames: int) -> list[str]:
    """Notes on fitted numbers that are implausible for a camera, with the likely reason.

    Args:
        gain_adu_per_e: fitted gain; read_noise_e: fitted read noise (e-); n_frames: frames.

    Returns:
        Zero to two notes (the numbers stay: they are what reproduces the recording's noise).
    """
    lo, hi = CAMERA_GAIN_RANGE_ADU_PER_E
    out = []
    if not lo <= gain_adu_per_e <= hi:
        out.append(
            f"gain {gain_adu_per_e:.4g} ADU/e- is outside what cameras give without electron "
            f"multiplication ({lo:g}-{hi:g} ADU/e-): these are probably not raw camera counts "
            "(photon-counting PMT data such as two-photon recordings, EM gain, or rescaled / "
            "averaged data). The fitted gain, offset and read noise are effective values that "
            "reproduce the recording's noise in the simulator, not the camera's"
        )
    if read_noise_e < MIN_READ_NOISE_E:
        out.append(
            f"read noise fitted as {read_noise_e:.2g} e-: the variance-versus-mean line leaves "
            "no intensity-independent noise (photon counting, or a dark offset already "
            f"subtracted{'; only ' + str(n_frames) + ' frames' if n_frames < 50 else ''}), so "
            "the simulator renders none"
        )
    return out


def fit_recording(
    frames: np.ndarray,
    frame_interval_s: float | None = None,
    pixel_size_um: float | None = None,
    indicator: str = "GCaMP6s",
) -> RecordingFit:
    """Estimate a recording's imaging parameters (module docstring).

    Args:
        frames: ``(T, H, W)`` recording in camera units (uint8/uint16/float), T >= 3.
        frame_interval_s: time between frames (s) from the file's metadata, if known.
        pixel_size_um: pixel size (um), if known.
        indicator: GCaMP variant assumed for the dynamic-range mapping.

    Returns:
        :class:`RecordingFit`.

    Raises:
        FitError: fewer than 3 frames, non-finite or constant data, no usable noise curve.
    """
    if indicator not in INDICATORS:
        raise FitError(f"unknown indicator {indicator!r}; use one of {sorted(INDICATORS)}")
    notes: list[str] = []
    # metadata outside what any recording has (an ImageJ finterval of 1e-320 s: a tenth
    # attack run) is not used, as segmentation does not use it
    for value, bounds, what in (
        (frame_interval_s, FRAME_INTERVAL_RANGE_S, "frame interval (s)"),
        (pixel_size_um, PIXEL_SIZE_RANGE_UM, "pixel size (um)"),
    ):
        if value is not None and not usable_unit(value, bounds):
            notes.append(f"{what} {value:g} outside {bounds[0]:g}-{bounds[1]:g}: not used")
    if not usable_unit(frame_interval_s, FRAME_INTERVAL_RANGE_S):
        frame_interval_s = None
    if not usable_unit(pixel_size_um, PIXEL_SIZE_RANGE_UM):
        pixel_size_um = None
    raw = np.asarray(frames)
    # The noise, dark-level, PSF and cell-size estimators use the first MAX_FIT_FRAMES frames
    # (float32 copy: 64 x 1024^2 px = 256 MiB); bleaching reads every frame, one at a time.
    a = _as_float_stack(raw[:MAX_FIT_FRAMES])
    t, h, w = a.shape
    if raw.shape[0] > MAX_FIT_FRAMES:
        notes.append(
            f"noise, dark level, PSF and cells fitted on the first {MAX_FIT_FRAMES} of "
            f"{raw.shape[0]} frames; bleaching on all"
        )
    details: dict = {}
    nc = fit_noise_curve(a)
    g = nc.gain_adu_per_e
    if not g > 0:
        notes.append(
            f"noise curve slope {g:.3g} <= 0 (variance does not grow with intensity): gain set "
            "to 1 ADU/e-; the noise is then modelled as read noise only"
        )
        g = 1.0
    dark = split_dark_level(a, g)
    details["dark_level"] = asdict(dark)
    notes.append(
        f"offset/read noise/background split by {dark.method} "
        f"(third-cumulant z = {dark.kappa3_z:.1f}; > 3 needed)"
    )
    mean_img = a.mean(axis=0)
    dark_level = dark.offset_adu + g * dark.background_e
    # Non-uniformity of the background: coefficient of variation of the smoothed low-level map.
    low_img = np.quantile(a, 0.2, axis=0)
    smooth = ndi.gaussian_filter(low_img, max(h, w) / 8.0)
    bgmask = mean_img <= np.quantile(mean_img, 0.25)
    # relative to the background above the camera offset; where that is under 1 % of the
    # level (all of it offset, as in uniform noise) the ratio means nothing: NaN, reported as
    # null (an 11th attack run read 1.3e8-4e11 on uniform Poisson data; a floor of 1e-9 ADU)
    level = float(np.mean(smooth[bgmask]))
    above = level - dark.offset_adu
    nonuni = float(np.std(smooth[bgmask]) / above) if above > 0.01 * abs(level) else float("nan")
    # PSF: white noise left in the mean image = mean temporal variance / T.
    var_px = np.clip(g * (mean_img - dark.offset_adu) + g * g * dark.read_noise_e**2, 0, None)
    psf, psf_d = fit_psf_sigma(mean_img)
    details["psf"] = psf_d
    if psf == 0.0:
        notes.append("no Gaussian roll-off in the power spectrum: PSF sigma set to 0.3 px")
    # Bleaching.
    if frame_interval_s is None:
        notes.append("no frame interval in the metadata: simulator default kept")
    tau_frames, bl_d = fit_bleaching(raw, 1.0, dark_level)
    details["bleaching"] = bl_d
    # Cells.
    size = estimate_cell_diameter(a, frame_interval_s)
    details["cell_size"] = size.to_dict()
    radius = size.diameter_px / 2.0
    if not math.isfinite(radius):
        notes.append("no characteristic cell scale found: simulator default cell area kept")
        radius = math.sqrt(SimulationConfig().mean_cell_area_px / math.pi)
    area = math.pi * radius**2
    tissue = mean_img > dark_level + 3 * math.sqrt(max(var_px.min(), 1e-9) / t) + 0.05 * (
        np.quantile(mean_img, 0.99) - dark_level
    )
    tissue_fraction = float(tissue.mean())
    # Resting level and dynamic range of the responding pixels.
    f0 = np.quantile(a, 0.2, axis=0) - dark_level
    fpk = np.quantile(a, 0.95 if t >= 20 else 1.0, axis=0) - dark_level
    bright = tissue & (f0 > 0.1 * np.quantile(np.clip(f0, 0, None), 0.9))
    if bright.sum() >= 10:
        ratio = fpk[bright] / f0[bright]
        peak_ratio = float(np.quantile(ratio, 0.99))
        f0_level = float(np.quantile(f0[bright], 0.9))
    else:
        peak_ratio = 1.0
        f0_level = float(max(np.quantile(mean_img, 0.9) - dark_level, 1.0))
        notes.append("hardly any tissue above the dark level: resting level from the 90th pct")
    fmin = fmin_from_peak_ratio(peak_ratio, indicator)
    spec = INDICATORS[indicator]
    fmin_used = fmin if fmin is not None else 1.0 / spec.dynamic_range
    if fmin is None:
        notes.append(
            f"peak F/F0 {peak_ratio:.2f} is outside what the Fmin/Fmax mapping covers: the "
            "indicator's own dynamic range kept"
        )
    h0 = float(hill(np.array(RESTING_CA_UM), indicator))
    f0_rel = fmin_used + (1 - fmin_used) * h0
    photon_scale = f0_level / g / (f0_rel * MEAN_TEXTURE)
    notes.extend(plausibility_notes(float(g), float(dark.read_noise_e), int(raw.shape[0])))
    maxv = float(raw.max())
    if raw.dtype == np.uint8:
        bit_depth, adc_bits = 8, 8
    else:
        bit_depth, adc_bits = 16, (12 if maxv <= 4095 else 16)
    return RecordingFit(
        height=h,
        width=w,
        n_frames=int(raw.shape[0]),
        frame_interval_s=frame_interval_s,
        pixel_size_um=pixel_size_um,
        gain_adu_per_e=float(g),
        offset_adu=float(dark.offset_adu),
        read_noise_e=float(dark.read_noise_e),
        background_e=float(dark.background_e),
        background_adu=float(dark_level),
        background_nonuniformity=nonuni,
        photon_scale_e=float(photon_scale),
        psf_sigma_px=float(psf),
        bleach_tau_frames=float(tau_frames),
        cell_radius_px=float(radius),
        mean_cell_area_px=float(area),
        tissue_fraction=tissue_fraction,
        peak_f_over_f0=peak_ratio,
        fmin_over_fmax=fmin,
        bit_depth=bit_depth,
        adc_bits=adc_bits,
        max_value=maxv,
        noise_curve=asdict(nc),
        details=details,
        notes=notes,
    )
