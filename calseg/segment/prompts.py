"""Automatic prompts from the recording itself (never from labels).

Activity (all computed per recording, float32):

* ``F``: optionally (``detrend``) each frame shifted by the difference between its median and the
  median of all frame medians (removes photobleaching / global background drift as long as
  fewer than half of the pixels are active at once), then smoothed with a Gaussian
  (``smooth_sigma_px``) to suppress shot noise.
* ``F0``: per-pixel baseline = the ``f0_percentile``-th percentile of ``F`` over time
  (a standard F0 estimate for sparse calcium activity, e.g. Grienberger & Konnerth 2012).
* ``dF/F = (F - F0) / max(F0, floor)``, ``floor`` = ``f0_floor_fraction`` x median F0, so dark
  pixels do not explode (F0 includes any camera offset; dF/F is then an underestimate, used
  only as an optional minimum-amplitude guard ``min_dff``, off by default).
* Noise: a Poisson-Gaussian camera model, sigma as a function of F0 (:func:`noise_model`):
  per pixel ``1.4826 * median_t |F_t - F_{t-1}| / sqrt(2)`` (first differences are insensitive
  to slow calcium transients), then the median of that over pixels in 16 quantile bins of F0,
  interpolated back (robust to the few active pixels, and works for short recordings).
  ``z = (F - F0) / sigma``. A pixel is active in a frame when ``z > threshold_k`` and
  ``dF/F > min_dff``; supra-threshold fragments smaller than ``min_region_px`` are dropped.

Seeds (instance identities, stable over the recording): local maxima of the peak map
(max over time of the active ``z``, smoothed with ``seed_smooth_sigma_px``), at least
``seed_min_distance_px`` apart. The seed territories are the watershed of ``-peak map`` from
the seeds, restricted to pixels that are active in at least one frame.

Per-frame prompts: for every seed territory containing active pixels in a frame, the active
pixel of highest ``z`` in that territory is the positive point; the positive points of the
nearest other active territories in the same frame are negative points. The mask SAM2 returns
for that prompt carries the seed's id, so ids are consistent across frames by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi


@dataclass
class ActivityParams:
    """Parameters of the activity map and seed detection (units: px, dimensionless dF/F).

    Defaults chosen on a simulated 256 x 256 dataset (mean cell area 100 px): spatial smoothing
    of the frames lowered foreground IoU (it bleeds activity into neighbours), so it is off.
    """

    smooth_sigma_px: float = 0.0
    f0_percentile: float = 20.0
    f0_floor_fraction: float = 0.25
    threshold_k: float = 5.0
    min_dff: float = 0.0
    seed_smooth_sigma_px: float = 1.0
    seed_min_distance_px: int = 4
    detrend: bool = True
    min_region_px: int = 15


@dataclass
class Activity:
    """Activity analysis of one ``(T, H, W)`` recording.

    ``dff``: ``(T, H, W)`` float32 dF/F; ``z``: ``(T, H, W)`` float32 (F - F0) / noise sigma;
    ``peak``: ``(H, W)`` float32 max-over-time active z; ``threshold``: z threshold;
    ``seeds``: ``(N, 2)`` int (row, col) of seed points, seed id ``i + 1``;
    ``territories``: ``(H, W)`` uint32 seed territories (0 outside activity);
    ``active``: ``(T, H, W)`` bool supra-threshold pixels.
    """

    dff: np.ndarray
    z: np.ndarray
    peak: np.ndarray
    threshold: float
    seeds: np.ndarray
    territories: np.ndarray
    active: np.ndarray
    stats: dict = field(default_factory=dict)


def noise_model(f: np.ndarray, f0: np.ndarray, n_bins: int = 16) -> tuple[np.ndarray, float]:
    """Per-pixel noise SD as a function of baseline F0 (Poisson-Gaussian camera noise).

    Args:
        f: ``(T, H, W)`` float32 (smoothed) recording.
        f0: ``(H, W)`` float32 baseline.
        n_bins: quantile bins of F0.

    Returns:
        ``(sigma (H, W) float32, median sigma)``; sigma > 0.
    """
    t = f.shape[0]
    if t >= 2:  # (with T = 2 the per-pixel value is one |difference|; the bin median fixes it)
        raw = 1.4826 * np.median(np.abs(np.diff(f, axis=0)), axis=0) / np.sqrt(2.0)
    else:  # single frame: spatial robust spread of the frame around its smoothed version
        resid = f[0] - ndi.median_filter(f[0], size=3)
        raw = np.full(f0.shape, 1.4826 * float(np.median(np.abs(resid))), np.float32)
    raw = raw.astype(np.float32)
    edges = np.unique(np.quantile(f0, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 3:
        sig = np.full(f0.shape, float(np.median(raw)), np.float32)
    else:
        which = np.clip(np.searchsorted(edges, f0, side="right") - 1, 0, len(edges) - 2)
        centres, values = [], []
        for b in range(len(edges) - 1):
            sel = which == b
            if sel.any():
                centres.append(float(np.median(f0[sel])))
                values.append(float(np.median(raw[sel])))
        sig = np.interp(f0, centres, values).astype(np.float32)
    med = float(np.median(sig))
    # floor: a quarter of the typical noise; for noise-free (flat) data 0.1 % of the baseline
    floor = 0.25 * med if med > 0 else max(1e-3 * float(np.median(np.abs(f0))), 1e-6)
    return np.maximum(sig, floor).astype(np.float32), med


def compute_activity(frames: np.ndarray, params: ActivityParams | None = None) -> Activity:
    """dF/F, peak map, seeds and seed territories of a recording (see module docstring).

    Args:
        frames: ``(T, H, W)`` recording in input units (any int/float dtype; NaN/Inf -> F0).
        params: :class:`ActivityParams`.

    Returns:
        :class:`Activity`.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    p = params or ActivityParams()
    f = np.asarray(frames, dtype=np.float32)
    if f.ndim != 3:
        raise ValueError(f"expected a (T, H, W) recording, got shape {f.shape}")
    finite = np.isfinite(f)
    if not finite.all():
        fill = float(np.median(f[finite])) if finite.any() else 0.0
        f = np.where(finite, f, fill).astype(np.float32)
    drift = None
    if p.detrend and f.shape[0] > 1:
        med_t = np.median(f.reshape(f.shape[0], -1), axis=1)
        drift = med_t - np.median(med_t)
        f = f - drift[:, None, None].astype(np.float32)
    if p.smooth_sigma_px > 0:
        f = ndi.gaussian_filter(f, sigma=(0, p.smooth_sigma_px, p.smooth_sigma_px))
    f0 = np.percentile(f, p.f0_percentile, axis=0).astype(np.float32)
    df = f - f0[None]
    floor = max(float(np.median(np.abs(f0))) * p.f0_floor_fraction, 1e-6)
    dff = (df / np.maximum(f0, floor)[None]).astype(np.float32)
    sigma, sigma_med = noise_model(f, f0)
    z = (df / sigma[None]).astype(np.float32)
    threshold = float(p.threshold_k)
    active = (z > threshold) & (dff > p.min_dff)
    if p.min_region_px > 1:
        for t in range(active.shape[0]):
            if active[t].any():
                lab, n = ndi.label(active[t])
                sizes = np.bincount(lab.ravel(), minlength=n + 1)
                small = sizes < p.min_region_px
                small[0] = False
                active[t][small[lab]] = False
    peak = np.where(active, z, 0.0).max(axis=0).astype(np.float32)
    peak_s = ndi.gaussian_filter(peak, p.seed_smooth_sigma_px) if p.seed_smooth_sigma_px else peak
    region = active.any(axis=0)
    if region.any():
        seeds = peak_local_max(
            np.where(region, peak_s, 0.0),
            min_distance=max(1, int(p.seed_min_distance_px)),
            threshold_abs=1e-12,
            exclude_border=False,
            labels=region.astype(np.int32),
        )
    else:
        seeds = np.zeros((0, 2), dtype=np.int64)
    markers = np.zeros(peak.shape, dtype=np.int32)
    if len(seeds):
        markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
        territories = watershed(-peak_s, markers=markers, mask=region).astype(np.uint32)
    else:
        territories = np.zeros(peak.shape, dtype=np.uint32)
    stats = {
        "f0_percentile": p.f0_percentile,
        "smooth_sigma_px": p.smooth_sigma_px,
        "noise_sigma_median": sigma_med,
        "threshold_k": threshold,
        "min_dff": p.min_dff,
        "detrend_max_abs": float(np.abs(drift).max()) if drift is not None else 0.0,
        "threshold": float(threshold),
        "n_seeds": int(len(seeds)),
        "active_fraction": float(active.mean()),
    }
    return Activity(dff, z, peak, threshold, np.asarray(seeds), territories, active, stats)


@dataclass
class FramePrompt:
    """One point prompt: positive point (x=col, y=row, frame px), its activity z score,
    negative points (x, y) and the seed id."""

    frame: int
    seed_id: int
    x: int
    y: int
    z: float
    negatives: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return {
            "frame": self.frame,
            "seed_id": self.seed_id,
            "x": self.x,
            "y": self.y,
            "z": round(self.z, 3),
            "negatives": [list(n) for n in self.negatives],
        }


def frame_prompts(
    activity: Activity, frame: int, *, n_negative: int = 2, max_prompts: int = 256
) -> list[FramePrompt]:
    """Prompts of one frame: one positive point per active seed territory (active pixel of
    highest z there), plus the ``n_negative`` nearest other prompts' points
    as negatives. At most ``max_prompts`` (strongest dF/F first)."""
    terr = activity.territories
    act = activity.active[frame] & (terr > 0)
    if not act.any():
        return []
    ids = terr[act]
    vals = activity.z[frame][act]
    flat_idx = np.flatnonzero(act)
    # brightest pixel per territory: sort by (id, value) and take the last of each id
    order = np.lexsort((vals, ids))
    ids_s = ids[order]
    last = np.r_[ids_s[1:] != ids_s[:-1], True]
    best = order[last]
    rows, cols = np.unravel_index(flat_idx[best], terr.shape)
    prompts = [
        FramePrompt(frame, int(ids[b]), int(c), int(r), float(vals[b]))
        for b, r, c in zip(best, rows, cols, strict=True)
    ]
    prompts.sort(key=lambda q: -q.z)  # strongest first
    prompts = prompts[:max_prompts]
    if n_negative > 0 and len(prompts) > 1:
        xy = np.array([[q.x, q.y] for q in prompts], dtype=np.float64)
        d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        nn = np.argsort(d, axis=1)[:, :n_negative]
        for i, q in enumerate(prompts):
            q.negatives = [(prompts[j].x, prompts[j].y) for j in nn[i] if np.isfinite(d[i, j])]
    return prompts


def pack_points(
    positives: list[tuple[float, float]], negatives: list[list[tuple[float, float]]]
) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-prompt points into SAM2's padded arrays.

    Args:
        positives: one (x, y) positive point per prompt.
        negatives: per prompt, a list of (x, y) negative points (any length).

    Returns:
        ``coords`` ``(B, N, 2)`` float32 and ``labels`` ``(B, N)`` int32 (1 positive,
        0 negative, -1 padding ignored by the prompt encoder).
    """
    b = len(positives)
    n = 1 + max((len(v) for v in negatives), default=0)
    coords = np.zeros((b, n, 2), dtype=np.float32)
    labels = -np.ones((b, n), dtype=np.int32)
    for i in range(b):
        coords[i, 0] = positives[i]
        labels[i, 0] = 1
        for j, pt in enumerate(negatives[i]):
            coords[i, 1 + j] = pt
            labels[i, 1 + j] = 0
    return coords, labels
