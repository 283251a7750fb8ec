"""Domain-gap score: how far a set of simulated recordings is from a set of real ones.

Everything is measured after a per-recording normalisation (:func:`normalise_resting`: the
resting image's 1st percentile -> 0, 99th -> 1), so a plain gain or offset difference does
not count; contrast, noise, blur and cell size do. The resting image (10th temporal
percentile) is used for the histogram, spectrum and cell size, so the amount of Ca2+ activity
in a recording (a property of the tissue, not of the imaging) hardly moves the score.

Low-level statistics (:func:`set_statistics`, one value per set of recordings):

* ``histogram``: 1-D Wasserstein-1 distance (``scipy.stats.wasserstein_distance``) between
  the pooled intensity distributions of the resting images (10th temporal percentile), in
  :func:`normalise_resting` units.
  Reference scale 0.05.
* ``noise``: the noise curve (temporal noise std against mean, from the photon-transfer fit
  :func:`calseg.simulate.fit.fit_noise_curve` on the normalised frames) compared at 5 levels
  (10-90 % of the common mean range) as the mean ``|ln(std_real / std_sim)|``. Reference 0.5
  (a factor 1.65 in noise).
* ``spectrum``: radially averaged power spectrum of the normalised resting image
  (:func:`calseg.simulate.fit.radial_power_spectrum`, 32 bins over 0-0.5 cycles/px),
  each normalised to unit total power, compared as the RMS difference of ``log10`` power.
  Reference 0.5 decade.
* ``cell_size``: ``|ln(r_real / r_sim)|`` of the characteristic cell radius of the resting
  image (:func:`calseg.analysis.cellsize.estimate_cell_diameter`, radius = diameter / 2).
  Reference 0.5.

**Score** = mean over the four components of ``component / reference``: 0 for identical
statistics, about 1 when every statistic differs by its reference amount. The references are
round numbers chosen so that each term is of order 1 for a clearly visible difference; they
are constants of this module (:data:`REFERENCE_SCALES`), so scores are comparable between runs.

Feature space (:func:`frechet_distance`): Fréchet distance between Gaussians fitted to SAM2
image-encoder embeddings (global average of ``image_embed``, 256-d), the FID formula (Heusel
et al. 2017). With the random-weight encoder available here this is a weak feature space (a
random projection of the image, not learned features), and with fewer frames than dimensions
the covariance is rank-deficient (a ridge of 1e-6 x trace / d is added): compare it only
between simulations scored against the same real set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import linalg, stats

from calseg.analysis.cellsize import estimate_cell_diameter
from calseg.segment.embeddings import compute_normalisation
from calseg.simulate.fit import (
    FitError,
    fit_noise_curve,
    radial_power_spectrum,
)

REFERENCE_SCALES = {"histogram": 0.05, "noise": 0.5, "spectrum": 0.5, "cell_size": 0.5}
"""Reference scale of each component (see module docstring)."""
MAX_HIST_SAMPLES = 200_000


class GapError(ValueError):
    """The frame sets cannot be compared (empty, wrong shape, too few frames)."""


@dataclass
class SetStatistics:
    """Low-level statistics of a set of normalised recordings.

    ``hist_sample``: pooled normalised pixel values (subsample); ``noise_mean`` /
    ``noise_std``: pooled noise curve (normalised units); ``freq`` / ``log10_power``: mean
    normalised spectrum; ``cell_radius_px``: median characteristic radius.
    """

    hist_sample: np.ndarray
    noise_mean: np.ndarray
    noise_std: np.ndarray
    freq: np.ndarray
    log10_power: np.ndarray
    cell_radius_px: float
    n_recordings: int
    n_frames: int


def resting_image(frames: np.ndarray) -> np.ndarray:
    """``(H, W)`` 10th temporal percentile of a ``(T, H, W)`` recording: the cells at rest
    (a cell is active in fewer than 90 % of the frames in all but fluttering tissue)."""
    return np.quantile(np.asarray(frames, np.float32), 0.1, axis=0)


def normalise_resting(frames: np.ndarray) -> np.ndarray:
    """``(T, H, W)`` float32 frames in units of the resting image: its 1st percentile -> 0,
    its 99th -> 1 (the resting image is the 10th temporal percentile, :func:`resting_image`).
    Unlike a percentile of all frames, this scale hardly depends on how much of the recording
    is active."""
    a = np.asarray(frames, np.float32)
    lo, hi = np.percentile(resting_image(a), [1, 99])
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
        hi = hi if hi > lo else lo + 1.0
    return (a - np.float32(lo)) / np.float32(hi - lo)


def _check(recordings: list[np.ndarray]) -> list[np.ndarray]:
    if not recordings:
        raise GapError("the frame set is empty; give at least one (T, H, W) recording")
    out = []
    for r in recordings:
        a = np.asarray(r)
        if a.ndim != 3 or a.shape[0] < 3 or min(a.shape[1:]) < 8:
            raise GapError(
                f"each recording must be (T, H, W) with T >= 3 and H, W >= 8, got {a.shape}"
            )
        out.append(a)
    return out


def set_statistics(recordings: list[np.ndarray], seed: int = 0) -> SetStatistics:
    """Statistics of a set of ``(T, H, W)`` recordings (module docstring).

    Raises:
        GapError: empty set, a recording with fewer than 3 frames or sides under 8 px.
    """
    recs = _check(recordings)
    rng = np.random.default_rng(seed)
    per = max(1, MAX_HIST_SAMPLES // len(recs))
    samples, nm, ns, psd, radii = [], [], [], [], []
    f_ref = None
    for a in recs:
        x = normalise_resting(a)
        ref = resting_image(x)
        flat = ref.ravel()
        samples.append(flat[rng.integers(0, flat.size, min(per, flat.size))])
        try:
            nc = fit_noise_curve(x, n_bins=12)
            nm.extend(nc.mean_adu)
            ns.extend(np.sqrt(np.maximum(nc.var_adu2, 1e-12)).tolist())
        except FitError:
            pass
        f0, pm = radial_power_spectrum(ref)
        pm = pm / max(pm.sum(), 1e-30)
        if f_ref is None:
            f_ref = f0
        psd.append(np.interp(f_ref, f0, np.log10(np.maximum(pm, 1e-30))))
        radii.append(estimate_cell_diameter(ref).diameter_px / 2.0)
    order = np.argsort(nm)
    return SetStatistics(
        hist_sample=np.concatenate(samples),
        noise_mean=np.asarray(nm)[order],
        noise_std=np.asarray(ns)[order],
        freq=np.asarray(f_ref),
        log10_power=np.mean(psd, axis=0),
        cell_radius_px=float(np.nanmedian(radii)) if np.isfinite(radii).any() else float("nan"),
        n_recordings=len(recs),
        n_frames=int(sum(a.shape[0] for a in recs)),
    )


@dataclass
class GapReport:
    """Components (raw distances), the combined score and a few descriptive values."""

    score: float
    components: dict[str, float]
    scaled: dict[str, float]
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)


def _noise_distance(a: SetStatistics, b: SetStatistics) -> float:
    if len(a.noise_mean) < 2 or len(b.noise_mean) < 2:
        return float("nan")
    lo = max(a.noise_mean.min(), b.noise_mean.min())
    hi = min(a.noise_mean.max(), b.noise_mean.max())
    if not hi > lo:  # no common range: compare the median noise levels
        return abs(math.log(np.median(a.noise_std) / np.median(b.noise_std)))
    levels = lo + (hi - lo) * np.linspace(0.1, 0.9, 5)
    sa = np.interp(levels, a.noise_mean, a.noise_std)
    sb = np.interp(levels, b.noise_mean, b.noise_std)
    return float(np.mean(np.abs(np.log(sa / sb))))


def gap_from_statistics(real: SetStatistics, sim: SetStatistics) -> GapReport:
    """Combine two sets' statistics into a :class:`GapReport` (module docstring)."""
    n = min(len(real.freq), len(sim.freq))
    comps = {
        "histogram": float(stats.wasserstein_distance(real.hist_sample, sim.hist_sample)),
        "noise": _noise_distance(real, sim),
        "spectrum": float(
            np.sqrt(
                np.mean(
                    (real.log10_power[:n] - np.interp(real.freq[:n], sim.freq, sim.log10_power))
                    ** 2
                )
            )
        ),
        "cell_size": float(abs(math.log(real.cell_radius_px / sim.cell_radius_px)))
        if real.cell_radius_px > 0 and sim.cell_radius_px > 0
        else float("nan"),
    }
    scaled = {k: v / REFERENCE_SCALES[k] for k, v in comps.items() if math.isfinite(v)}
    score = float(np.mean(list(scaled.values()))) if scaled else float("nan")
    return GapReport(
        score=score,
        components=comps,
        scaled=scaled,
        details={
            "cell_radius_px": {"real": real.cell_radius_px, "sim": sim.cell_radius_px},
            "n_frames": {"real": real.n_frames, "sim": sim.n_frames},
            "reference_scales": dict(REFERENCE_SCALES),
        },
    )


def domain_gap(real: list[np.ndarray], sim: list[np.ndarray]) -> GapReport:
    """Low-level domain-gap score between real and simulated recordings.

    Args:
        real: list of ``(T, H, W)`` real recordings (T >= 3), any numeric dtype.
        sim: list of ``(T, H, W)`` simulated recordings.

    Returns:
        :class:`GapReport` (``score`` >= 0; lower = closer).

    Raises:
        GapError: see :func:`set_statistics`.
    """
    return gap_from_statistics(set_statistics(real), set_statistics(sim))


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID formula).

    ``d^2 = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` (Dowson & Landau 1982;
    Heusel et al. 2017). A ridge of ``1e-6 * mean eigenvalue`` keeps the square root defined
    for rank-deficient covariances (fewer samples than dimensions).

    Args:
        feat_a: ``(N, D)`` features (N >= 2).
        feat_b: ``(M, D)`` features (M >= 2), same D.

    Returns:
        the distance ``d^2`` (>= 0, in squared feature units).

    Raises:
        GapError: fewer than 2 rows or mismatched dimensions.
    """
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise GapError(f"need (N, D) and (M, D) features with N, M >= 2, got {a.shape}, {b.shape}")
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.shape[1]
    ridge = 1e-6 * max(np.trace(ca) + np.trace(cb), 1e-12) / (2 * d)
    ca = ca + ridge * np.eye(d)
    cb = cb + ridge * np.eye(d)
    covmean = linalg.sqrtm(ca @ cb)
    covmean = np.real(covmean)
    val = float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))
    return max(val, 0.0)


def sam2_features(
    recordings: list[np.ndarray],
    loaded,  # noqa: ANN001 - calseg.segment.model.LoadedSAM2
    max_frames: int = 16,
    cache_dir=None,  # noqa: ANN001 - Path | None
) -> np.ndarray:
    """``(N, 256)`` float64 SAM2 image-encoder features: the spatial mean of ``image_embed``
    of up to ``max_frames`` evenly spaced frames per recording (per-recording normalisation,
    the embedding cache of :mod:`calseg.segment.embeddings` when ``cache_dir`` is given)."""
    from calseg.segment.embeddings import FrameGeometry
    from calseg.segment.infer import embed_recording

    out = []
    for a in _check(recordings):
        idx = np.unique(np.linspace(0, a.shape[0] - 1, min(max_frames, a.shape[0])).astype(int))
        geom = FrameGeometry(a.shape[1], a.shape[2], loaded.info.image_size)
        emb = embed_recording(loaded, a[idx], compute_normalisation(a), geom, cache_dir=cache_dir)
        out.append(emb.image_embed.float().mean(dim=(2, 3)).numpy().astype(np.float64))
    return np.concatenate(out)
