"""Optional preprocessing of a recording before segmentation and traces (all off by default).

Steps, applied by :func:`preprocess` in this order (each is also a function of its own):

1. **Drift registration** (:func:`register_drift`): the translation of every frame against a
   reference (mean of the first frames) by phase correlation with sub-pixel upsampling (Guizar-
   Sicairos, Thurman & Fienup 2008, Opt Lett 33:156; ``skimage.registration.
   phase_cross_correlation``, plain cross-correlation of Hann-windowed frames), then each frame
   shifted back (``scipy.ndimage.shift``, linear
   interpolation, edges repeated). Rigid translation only: stage drift and jitter, not tissue
   deformation.
2. **Background subtraction** (:func:`subtract_background`): a static background estimated on
   the temporal median image: a morphological opening with a flat disk (the "sliding
   paraboloid/rolling ball" idea of Sternberg 1983, Computer 16:22, with a flat ball so it is
   independent of the intensity scale), ImageJ's rolling ball itself
   (``skimage.restoration.rolling_ball``) or a wide Gaussian blur, subtracted from every frame.
   It removes camera offset, autofluorescence and uneven illumination that would otherwise sit
   in F0 and shrink dF/F. The radius must exceed the cell radius.
3. **Photobleaching correction** (:func:`correct_photobleaching`): the "exponential fitting"
   method of Miura (2020, F1000Research 9:1494; Fiji's Bleach Correction): fit
   ``a exp(-t / tau) + c`` (or a sum of two exponentials) to the mean intensity of each frame
   and divide every frame by ``fit(t) / fit(0)``. The mean over the whole field changes little
   with the activity of a few cells; tissue-wide waves do bias it: leave correction off when
   activity covers the field and the recording is short, or use a window of F0
   (:func:`calseg.analysis.traces.baseline_f0`), which follows slow bleaching by itself.

Z-projection happens when reading (:mod:`calseg.io.recordings` max-projects a Z axis when the
file also has T); :func:`z_project` offers the mean or median instead for a ``(T, Z, H, W)``
array read with ``axes=`` override.

Arrays: frames ``(T, H, W)`` in, ``float32`` ``(T, H, W)`` out (the recording's units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage, optimize

from calseg.analysis.scale import unit_exponent
from calseg.fmt import fmt_num
from calseg.progress import check_cancelled

__all__ = [
    "PreprocessError",
    "PreprocessOptions",
    "correct_photobleaching",
    "preprocess",
    "register_drift",
    "subtract_background",
    "z_project",
]


class PreprocessError(ValueError):
    """Bad input to preprocessing; the message says what to change."""


def _frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 3 or arr.dtype.kind not in "uif":
        raise PreprocessError(f"frames must be a real (T, H, W) array, got {arr.dtype} {arr.shape}")
    return arr


BASELINE_KEPT_FRACTION = 0.1
"""A background step that leaves less than this fraction of the tissue's resting level
(:func:`resting_level` over :func:`tissue_mask`) is reported: dF/F needs a resting level well
above zero. Cells apart on a darker background are the tissue there and keep theirs."""


def tissue_mask(frames: np.ndarray, max_frames: int = 64) -> np.ndarray:
    """``(H, W)`` bool: the tissue of the resting image
    (:func:`calseg.analysis.cellsize.tissue_interior_distance` > 0) of at most ``max_frames``
    evenly spaced frames; the whole field where none is found."""
    from calseg.analysis.cellsize import resting_image, tissue_interior_distance

    arr = np.asarray(frames)
    sample = _spaced_frames(arr, max_frames)
    mask = tissue_interior_distance(resting_image(sample)) > 0
    return mask if mask.any() else np.ones(arr.shape[1:], bool)


def _spaced_frames(arr: np.ndarray, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` evenly spaced frames of ``(T, H, W)`` ``arr``."""
    idx = np.unique(np.linspace(0, arr.shape[0] - 1, min(max_frames, arr.shape[0])).astype(int))
    return arr[idx]


def resting_level(frames: np.ndarray, where: np.ndarray, max_frames: int = 64) -> float:
    """The resting level of the brightest structures among the pixels ``where``: the 90th
    percentile over them of the per-pixel 20th temporal percentile (the F0 of dF/F), from at
    most ``max_frames`` evenly spaced frames (input units). The 90th, not the median: the
    tissue mask of cells lying apart also holds their blurred rims and the background
    between them."""
    arr = np.asarray(frames)
    sample = _spaced_frames(arr, max_frames)
    return float(np.percentile(np.percentile(sample, 20.0, axis=0)[where], 90.0))


FILL_BLOCK_BYTES = 64 * 2**20
"""Most bytes of one block of pixel time series sorted at once by :func:`fill_non_finite`."""

GLOBAL_MEDIAN_SAMPLE = 2**22
"""Most values :func:`fill_non_finite` takes the median of for pixels with no finite value
(evenly spaced over the recording: the exact median of every finite value up to 4 Mi values)."""


def _nanmedian_over_time(series: np.ndarray) -> np.ndarray:
    """Median over axis 0 of a ``(T, N)`` float32 block, NaN ignored (NaN where a column has no
    finite value): one sort (NaN sorts last), then the middle of each column's finite values;
    numpy's nanmedian along an axis runs a Python function per column above 600 frames."""
    s = np.sort(series, axis=0)
    k = np.count_nonzero(~np.isnan(s), axis=0)
    cols = np.arange(s.shape[1])
    lo, hi = np.maximum((k - 1) // 2, 0), np.maximum(k // 2, 0)
    med = 0.5 * (s[lo, cols] + s[hi, cols])
    return np.where(k > 0, med, np.float32(np.nan)).astype(np.float32)


def fill_non_finite(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """``frames`` with every NaN or +-Inf replaced by its pixel's temporal median of the finite
    values (a pixel with none: the median of the finite values, from at most
    :data:`GLOBAL_MEDIAN_SAMPLE` evenly spaced ones), and how many were replaced.

    Registration, background filters and the bleaching fit spread one NaN over a window, a
    frame or the whole recording: a partly-NaN recording failed registration with skimage's
    own "NaN values found" and the background step with "no finite value ... check the export"
    though half the file was finite (a tenth attack run). A filled value is a pixel at rest,
    as segmentation treats a non-finite value (:func:`calseg.segment.prompts.compute_activity`).

    Memory: the float32 copy it returns, a 1-byte mask per value and blocks of at most
    :data:`FILL_BLOCK_BYTES` (medians only of the pixels that have a non-finite value); it
    made three more full-size copies before.

    Returns:
        ``(frames, n_filled)``: the input itself when all values are finite (or not float),
        else a float32 copy.

    Raises:
        PreprocessError: no finite value at all.
    """
    arr = _frames(frames)
    if arr.dtype.kind != "f":
        return arr, 0
    bad = ~np.isfinite(arr)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return arr, 0
    if n_bad == arr.size:
        raise PreprocessError("no finite value: every value is NaN or Inf; nothing to preprocess")
    out = arr.astype(np.float32)  # a copy: the caller's frames are not changed
    out[bad] = np.nan
    n_t = out.shape[0]
    ys, xs = np.nonzero(bad.any(axis=0))
    fallback = np.float32(np.nan)
    if bad.all(axis=0).any():  # pixels with no finite value: the recording's median
        flat = out.reshape(-1)
        sample = flat[:: max(1, flat.size // GLOBAL_MEDIAN_SAMPLE)]
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:  # every finite value falls between the sampled ones
            sample = flat[np.isfinite(flat)]
        fallback = np.float32(np.median(sample))
    del bad
    step = max(1, FILL_BLOCK_BYTES // (4 * n_t))
    for i in range(0, len(ys), step):  # each block gathered once: medians, then its holes
        block = out[:, ys[i : i + step], xs[i : i + step]]
        medians = _nanmedian_over_time(block)
        medians[np.isnan(medians)] = fallback
        holes = np.isnan(block)
        block[holes] = np.broadcast_to(medians, block.shape)[holes]
        out[:, ys[i : i + step], xs[i : i + step]] = block
    return out, n_bad


def z_project(stack: np.ndarray, method: Literal["max", "mean", "median"] = "max") -> np.ndarray:
    """Project a ``(T, Z, H, W)`` stack over Z to ``(T, H, W)`` float32.

    Raises:
        PreprocessError: not 4-D or unknown method.
    """
    arr = np.asarray(stack)
    if arr.ndim != 4:
        raise PreprocessError(f"z_project needs (T, Z, H, W), got shape {arr.shape}")
    fn = {"max": np.max, "mean": np.mean, "median": np.median}.get(method)
    if fn is None:
        raise PreprocessError(f"z projection must be max, mean or median, got {method!r}")
    return fn(arr, axis=1).astype(np.float32)


def register_drift(
    frames: np.ndarray, upsample: int = 10, n_reference: int = 10, max_shift_px: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Remove rigid drift: estimate each frame's shift against a reference and undo it.

    Args:
        frames: ``(T, H, W)``.
        upsample: sub-pixel precision 1 / ``upsample`` px (phase-correlation upsampling).
        n_reference: reference = mean of the first ``n_reference`` frames.
        max_shift_px: shifts larger than this (px) are treated as failures and set to 0
            (``None`` = no limit).

    Returns:
        ``registered`` ``(T, H, W)`` float32 and ``shifts`` ``(T, 2)`` float64 (rows, columns),
        the displacement of each frame relative to the reference (px; the frame content moved
        by ``+shift``, it is shifted by ``-shift``).
    """
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation

    arr = _frames(frames).astype(np.float32)
    # a Hann window tapers the frame edges: the FFT's wrap-around would otherwise correlate the
    # image borders (not periodic) and pull the estimate towards 0 (measured bias 0.2-0.25 px)
    win = window("hann", arr.shape[1:]).astype(np.float32)
    ref = arr[: max(1, n_reference)].mean(axis=0)
    ref_f = np.fft.fft2((ref - ref.mean()) * win)  # transformed once, not once per frame
    shifts = np.zeros((arr.shape[0], 2))
    out = np.empty_like(arr)
    for t in range(arr.shape[0]):
        check_cancelled()
        s, _, _ = phase_cross_correlation(
            ref_f,
            np.fft.fft2((arr[t] - arr[t].mean()) * win),
            space="fourier",
            upsample_factor=max(1, upsample),
            normalization=None,
            disambiguate=False,
        )
        # phase_cross_correlation returns the shift that registers arr[t] onto ref
        s = np.asarray(s, dtype=np.float64)
        if max_shift_px is not None and np.hypot(*s) > max_shift_px:
            s = np.zeros(2)
        shifts[t] = -s
        out[t] = ndimage.shift(arr[t], s, order=1, mode="nearest")
    return out, shifts


def subtract_background(
    frames: np.ndarray,
    method: Literal["rolling_ball", "opening", "gaussian"] = "opening",
    radius_px: float = 50.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract a static background estimated on the temporal median image.

    Args:
        frames: ``(T, H, W)``.
        method: ``"opening"`` (default; grey opening with a flat disk of ``radius_px``, then
            a ``radius_px`` box mean: follows illumination slopes of any steepness),
            ``"rolling_ball"`` (ImageJ's algorithm, a ball of ``radius_px`` in px *and*
            intensity units, so it cannot follow slopes steeper than ~1 unit/px: scale
            the data first or use ``"opening"``) or ``"gaussian"`` (blur of sigma ``radius_px``;
            it also lifts the background near bright cells).
        radius_px: larger than the largest cell radius (px).

    Returns:
        ``corrected`` ``(T, H, W)`` float32 (may hold small negative values: noise around a
        zero background) and ``background`` ``(H, W)`` float32.
    """
    arr = _frames(frames)
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise PreprocessError(f"background radius must be > 0 px, got {radius_px}")
    med = np.median(arr, axis=0).astype(np.float64)
    if method == "rolling_ball":
        from skimage.restoration import rolling_ball

        bg = rolling_ball(med, radius=float(radius_px))
    elif method == "opening":
        from skimage.morphology import disk

        r = max(1, int(round(radius_px)))
        bg = ndimage.grey_opening(med, footprint=disk(r), mode="nearest")
        bg = ndimage.uniform_filter(bg, size=r, mode="nearest")  # remove the disk's facets
    elif method == "gaussian":
        bg = ndimage.gaussian_filter(med, float(radius_px), mode="nearest")
    else:
        raise PreprocessError(
            f"background method must be rolling_ball, opening or gaussian, got {method!r}"
        )
    bg = bg.astype(np.float32)
    return arr.astype(np.float32) - bg[None], bg


def _exp1(t, a, tau, c):  # noqa: ANN001, ANN202
    return a * np.exp(-t / tau) + c


def _exp2(t, a1, tau1, a2, tau2, c):  # noqa: ANN001, ANN202
    return a1 * np.exp(-t / tau1) + a2 * np.exp(-t / tau2) + c


def correct_photobleaching(
    frames: np.ndarray, frame_interval_s: float, model: Literal["exp", "biexp"] = "exp"
) -> tuple[np.ndarray, dict]:
    """Divide out photobleaching fitted as an exponential decay of the mean frame intensity.

    Args:
        frames: ``(T, H, W)`` (background already subtracted, ideally: a constant offset is
            absorbed by the fit's ``c`` but is divided too).
        frame_interval_s: s per frame.
        model: ``"exp"``: ``a exp(-t/tau) + c``; ``"biexp"``: two exponentials + ``c``.

    Returns:
        ``corrected`` ``(T, H, W)`` float32 and ``info`` ``{"model", "tau_s": [...],
        "params": {...}, "loss_fraction": 1 - fit(end)/fit(0)}``.

    Raises:
        PreprocessError: too few frames (< 5 for exp, < 8 for biexp), bad interval, or the fit
            does not converge (the mean does not decay: leave correction off).
    """
    arr = _frames(frames)
    if not (np.isfinite(frame_interval_s) and frame_interval_s > 0):
        raise PreprocessError(f"frame_interval_s must be > 0 s, got {frame_interval_s}")
    n = arr.shape[0]
    need = 5 if model == "exp" else 8
    if n < need:
        raise PreprocessError(f"bleach correction ({model}) needs at least {need} frames, got {n}")
    t = np.arange(n) * float(frame_interval_s)
    m = arr.reshape(n, -1).mean(axis=1, dtype=np.float64)
    span = t[-1] if t[-1] > 0 else 1.0
    drop = max(m[0] - m[-1], 1e-12 * max(abs(m[0]), 1.0))
    try:
        if model == "exp":
            p0 = [drop, span / 2, m[-1]]
            p, _ = optimize.curve_fit(
                _exp1,
                t,
                m,
                p0=p0,
                bounds=([0, span / 1e4, -np.inf], [np.inf, span * 1e3, np.inf]),
                maxfev=20000,
            )
            fit, taus = _exp1(t, *p), [float(p[1])]
            names = ("a", "tau_s", "c")
        elif model == "biexp":
            p0 = [drop / 2, span / 10, drop / 2, span, m[-1]]
            lo = [0, span / 1e4, 0, span / 1e4, -np.inf]
            hi = [np.inf, span * 1e3, np.inf, span * 1e3, np.inf]
            p, _ = optimize.curve_fit(_exp2, t, m, p0=p0, bounds=(lo, hi), maxfev=20000)
            fit, taus = _exp2(t, *p), sorted([float(p[1]), float(p[3])])
            names = ("a1", "tau1_s", "a2", "tau2_s", "c")
        else:
            raise PreprocessError(f"bleach model must be exp or biexp, got {model!r}")
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, PreprocessError):
            raise
        raise PreprocessError(
            f"the exponential bleaching fit did not converge ({exc}); the mean intensity may not "
            "decay: leave bleach correction off"
        ) from exc
    if not (np.all(np.isfinite(fit)) and fit.min() > 0):
        raise PreprocessError(
            "the fitted bleaching curve reaches 0 or below (offset not subtracted?): subtract "
            "the background first or leave bleach correction off"
        )
    scale = (fit / fit[0]).astype(np.float32)
    out = arr.astype(np.float32) / scale[:, None, None]
    info = {
        "model": model,
        "tau_s": taus,
        "params": {k: float(v) for k, v in zip(names, p, strict=True)},
        "loss_fraction": float(1.0 - fit[-1] / fit[0]),
    }
    return out, info


MIN_BLEACH_LOSS = 0.005
"""A fitted bleaching curve that loses less than this fraction of the mean intensity over the
recording is not applied (no measurable bleaching; its tau is not identifiable)."""


@dataclass
class PreprocessOptions:
    """Which preprocessing steps to run (all off by default); see the module docstring.

    The names are the infer job's parameters and the CLI's flags (``--register-drift``,
    ``--bleach-correction``): one name per parameter across API, CLI and library.

    Attributes:
        register_drift: drift registration on/off; register_upsample: sub-pixel factor.
        background: ``None``, ``"opening"``, ``"rolling_ball"`` or ``"gaussian"``;
            background_radius_px.
        bleach_correction: ``None``, ``"exp"`` or ``"biexp"``.
    """

    register_drift: bool = False
    register_upsample: int = 10
    background: Literal["rolling_ball", "opening", "gaussian"] | None = None
    background_radius_px: float = 50.0
    bleach_correction: Literal["exp", "biexp"] | None = None

    @property
    def any(self) -> bool:
        """True when at least one step is on."""
        return bool(self.register_drift or self.background or self.bleach_correction)


@dataclass
class PreprocessReport:
    """What :func:`preprocess` did (JSON-serialisable via :meth:`to_dict`)."""

    options: dict
    steps: list[str] = field(default_factory=list)
    max_shift_px: float | None = None
    bleach: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)


def preprocess(
    frames: np.ndarray, frame_interval_s: float, options: PreprocessOptions | None = None
) -> tuple[np.ndarray, PreprocessReport]:
    """Run the enabled steps (registration, background, bleaching; module docstring order).

    Returns:
        frames (unchanged input when no step is on, else float32 ``(T, H, W)``) and a
        :class:`PreprocessReport`.
    """
    opt = options or PreprocessOptions()
    rep = PreprocessReport(options=asdict(opt))
    out = _frames(frames)
    k = 0
    if opt.register_drift or opt.background or opt.bleach_correction:
        out, n_filled = fill_non_finite(out)
        if n_filled:
            rep.steps.append(
                f"{n_filled} NaN/Inf value(s) ({100 * n_filled / out.size:.3g} %) set to their "
                "pixel's median over time first"
            )
        # float data of any scale worked on as camera counts, then scaled back (exact): the
        # registration's float32 sums overflowed at x1e20 and its products vanished at x1e-30
        # (an 11th attack run)
        k = unit_exponent(out)
        if k:
            out = np.ldexp(out.astype(np.float32), k)
    if opt.register_drift:
        out, shifts = register_drift(out, upsample=opt.register_upsample)
        rep.max_shift_px = float(np.hypot(*shifts.T).max()) if len(shifts) else 0.0
        rep.steps.append(f"registered: largest drift {rep.max_shift_px:.2f} px")
    if opt.background:
        tissue = tissue_mask(out)
        f0_before = resting_level(out, tissue)
        out, _ = subtract_background(out, opt.background, opt.background_radius_px)
        rep.steps.append(
            f"background subtracted ({opt.background}, {opt.background_radius_px:g} px)"
        )
        f0_after = resting_level(out, tissue)
        if not f0_after > BASELINE_KEPT_FRACTION * abs(f0_before):
            # an 11th attack run: 'gaussian' at 8 px on dense tissue left F0 near -7 and every
            # event gone, and a bleaching fit after it read "the mean fell 93.9 %"
            rep.warnings.append(
                f"the background step left a resting level near zero (F0 of the tissue's "
                f"brightest tenth "
                f"{fmt_num(float(np.ldexp(f0_after, -k)))}, was "
                f"{fmt_num(float(np.ldexp(f0_before, -k)))}): it took the cells' resting "
                "fluorescence for background, so dF/F = (F - F0) / F0 is undefined and events "
                "and a bleaching fit after it are not meaningful. A spatial background is only "
                "told from cells where they lie apart on a darker background; on tissue that "
                "fills the field, leave the background step off."
            )
    if opt.bleach_correction:
        corrected, rep.bleach = correct_photobleaching(out, frame_interval_s, opt.bleach_correction)
        taus = ", ".join(f"{x:.3g}" for x in rep.bleach["tau_s"])
        lost = 100 * rep.bleach["loss_fraction"]
        duration = (out.shape[0] - 1) * float(frame_interval_s)
        if rep.bleach["loss_fraction"] < MIN_BLEACH_LOSS:
            # a decay this small is within noise: its tau means nothing; dividing would only
            # add the fit's noise (the message used to read "tau 37 s, 0.0 % lost")
            rep.bleach["applied"] = False
            rep.steps.append(
                f"photobleaching: none measurable ({opt.bleach_correction} fit: {lost:.2g} % of "
                f"the mean intensity lost over the recording's {duration:.3g} s, under "
                f"{100 * MIN_BLEACH_LOSS:g} %); not corrected"
            )
        else:
            out = corrected
            rep.bleach["applied"] = True
            tau_note = ""
            tau_list = rep.bleach["tau_s"]
            if max(tau_list) > 10 * duration:
                tau_note = (
                    f"; tau {max(tau_list):.3g} s is far longer than the recording, so the "
                    "decay is nearly linear and tau is not identifiable: only the drop is"
                )
            if min(tau_list) < 2 * float(frame_interval_s):
                tau_note += (
                    f"; tau {min(tau_list):.3g} s is shorter than 2 frames: a drop over the "
                    "first frames (shutter, focus), not bleaching; check them"
                )
            rep.steps.append(
                f"photobleaching corrected ({opt.bleach_correction}: the mean intensity fell "
                f"{lost:.1f} % over the recording's {duration:.3g} s; tau {taus} s{tau_note})"
            )
    if k:
        out = np.ldexp(out, -k)
        if rep.bleach is not None:  # amplitudes and offsets back in the recording's units
            for name, value in rep.bleach["params"].items():
                if not name.startswith("tau"):
                    rep.bleach["params"][name] = float(np.ldexp(value, -k))
    return out, rep
