"""Automatic prompts from the recording itself (never from labels).

Activity (all computed per recording, float32):

* ``F``: optionally (``detrend``) each frame shifted by its additive offset
  (:func:`frame_offsets`: the median change of the recording's dimmest 30 % of pixels; removes
  global background drift whenever those are not active), then smoothed with a Gaussian
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

Cells (instance identities, stable over the recording): static cell ROIs ("territories")
separated by the cells' texture where they are active, with a cell-size prior
(:mod:`calseg.segment.cells`). A territory is active in a frame when most of its pixels are.

Per-frame prompts: for every territory active in a frame, the positive point is the
territory's anchor (its pixel farthest from its border, i.e. well inside the cell, like the
eroded-mask points of training); the anchors of the ``n_negative`` nearest other territories
are negative points. The mask SAM2 returns for that prompt carries the territory's id, so ids
are consistent across frames by construction. Nothing here reads labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from calseg.analysis.metrics import MAD_TO_SIGMA, diff_noise_sd
from calseg.analysis.scale import unit_exponent
from calseg.progress import check_cancelled
from calseg.segment.cells import (
    CellMap,
    CellParams,
    cell_territories,
    territory_activity,
)


@dataclass
class ActivityParams:
    """Parameters of the activity map and seed detection (units: px, dimensionless dF/F).

    Defaults chosen on a simulated 256 x 256 dataset (mean cell area 100 px): spatial smoothing
    of the frames lowered foreground IoU (it bleeds activity into neighbours), so it is off.
    ``cells`` holds the cell-ROI parameters (:class:`calseg.segment.cells.CellParams`, e.g.
    ``cell_diameter_px``).
    """

    smooth_sigma_px: float = 0.0
    f0_percentile: float = 20.0
    f0_floor_fraction: float = 0.25
    threshold_k: float = 5.0
    min_dff: float = 0.0
    detrend: bool = True
    min_region_px: int = 15
    cells: CellParams = field(default_factory=CellParams)
    cell_diameter_source: str = "given"
    """Where ``cells.cell_diameter_px`` came from: ``given`` (the caller's), ``estimated``
    (from the recording) or ``prior`` (the 11 px prior: no estimate)."""


@dataclass
class Activity:
    """Activity analysis of one ``(T, H, W)`` recording.

    ``dff``: ``(T, H, W)`` float32 dF/F; ``z``: ``(T, H, W)`` float32 (F - F0) / noise sigma;
    ``peak``: ``(H, W)`` float32 max-over-time active z; ``threshold``: z threshold;
    ``seeds``: ``(N, 2)`` int (row, col) anchor point of cell id ``i + 1`` (inside the cell);
    ``territories``: ``(H, W)`` uint32 cell ROIs, ids ``1..N`` (0 outside active cells);
    ``active``: ``(T, H, W)`` bool supra-threshold pixels;
    ``cell_active``: ``(T, N + 1)`` bool, cell id active in frame (column 0 unused);
    ``cells``: the :class:`calseg.segment.cells.CellMap`.
    """

    dff: np.ndarray
    z: np.ndarray
    peak: np.ndarray
    threshold: float
    seeds: np.ndarray
    territories: np.ndarray
    active: np.ndarray
    stats: dict = field(default_factory=dict)
    cell_active: np.ndarray | None = None
    cells: CellMap | None = None


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
        # per pixel; mean |difference| where the median is 0 (few counts repeat between
        # frames). Before, such pixels fell to a floor of 0.1 % of F0, so the same pixels with
        # a constant added gave 30 cells or 0: astrocast_sample_1 as TIFF with its ImageJ
        # calibration, or as HDF5.
        raw = diff_noise_sd(np.abs(np.diff(f, axis=0)), axis=0)
    else:  # single frame: spatial robust spread of the frame around its smoothed version
        resid = f[0] - ndi.median_filter(f[0], size=3)
        raw = np.full(f0.shape, MAD_TO_SIGMA * float(np.median(np.abs(resid))), np.float32)
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


DETREND_REFERENCE_FRAMES = 64
"""Frames (evenly spaced) whose per-pixel median is the reference image of
:func:`frame_offsets` (bounds its memory: 64 x 512 x 512 float32 is 67 MB)."""
DETREND_DIM_FRACTION = 0.3
"""Fraction of the pixels, the dimmest of the reference image, whose change gives a frame's
offset (:func:`frame_offsets`). Set, not tuned: the simulator's pouch covers about 40-55 % of
its field, so the dimmest 30 % are background with a margin; in a field full of tissue they
are its dimmest parts. The one value was then checked on the tuning set (4a11ccd)."""


def frame_offsets(f: np.ndarray) -> np.ndarray:
    """Additive offset of each frame: ``(T,)`` float64, in ``f``'s units, median 0.

    The median, over the dimmest :data:`DETREND_DIM_FRACTION` of the pixels of a reference
    image (the per-pixel median of :data:`DETREND_REFERENCE_FRAMES` frames; pixels constant in
    all of them, such as a registration's padding, left out), of the frame's difference from
    it; minus the median of those. A change of every pixel (background
    drift) moves it; calcium activity, which brightens cells, reaches the dimmest pixels last:
    around a pouch they are background, which is never active. The median of the frame's own
    values, used before, jumped whenever a wave brightened a tissue covering about half the
    field (its rank moved from background into tissue: 348 to 1278 counts on make demo's video
    v000), and the background then read as active in every quiet frame (50 cell ROIs outside
    the tissue, active in 1800 ROI-frames).

    Args:
        f: ``(T, H, W)`` float32 recording.
    """
    t_len = f.shape[0]
    ref_idx = np.unique(np.linspace(0, t_len - 1, min(t_len, DETREND_REFERENCE_FRAMES)).round())
    sample = f[ref_idx.astype(int)]
    ref = np.median(sample, axis=0)
    varying = np.ptp(sample, axis=0) > 0  # not padding that never changes (registration)
    if not varying.any():
        varying[:] = True
    dim = varying & (ref <= np.quantile(ref[varying], DETREND_DIM_FRACTION))
    offsets = np.empty(t_len)
    for t in range(t_len):
        check_cancelled()
        offsets[t] = float(np.median(f[t][dim] - ref[dim]))
    return offsets - float(np.median(offsets))


def compute_activity(frames: np.ndarray, params: ActivityParams | None = None) -> Activity:
    """dF/F, peak map, seeds and seed territories of a recording (see module docstring).

    Args:
        frames: ``(T, H, W)`` recording in input units (any int/float dtype; NaN/Inf -> F0).
        params: :class:`ActivityParams`.

    Returns:
        :class:`Activity`.
    """

    p = params or ActivityParams()
    f = np.asarray(frames, dtype=np.float32)
    if f.ndim != 3:
        raise ValueError(f"expected a (T, H, W) recording, got shape {f.shape}")
    finite = np.isfinite(f)
    if not finite.all():
        fill = float(np.median(f[finite])) if finite.any() else 0.0
        f = np.where(finite, f, fill).astype(np.float32)
    k = unit_exponent(f)  # float data of any scale as camera counts (exact: a power of two)
    if k:
        f = np.ldexp(f, k)
    gain = 2.0**k
    drift = None
    if p.detrend and f.shape[0] > 1:
        drift = frame_offsets(f)
        f = f - drift[:, None, None].astype(np.float32)
    if p.smooth_sigma_px > 0:  # frame by frame (the same numbers): cancellable between frames
        smooth = np.empty_like(f)
        for t in range(f.shape[0]):
            check_cancelled()
            ndi.gaussian_filter(f[t], p.smooth_sigma_px, output=smooth[t])
        f = smooth
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
            check_cancelled()
            if active[t].any():
                lab, n = ndi.label(active[t])
                sizes = np.bincount(lab.ravel(), minlength=n + 1)
                small = sizes < p.min_region_px
                small[0] = False
                active[t][small[lab]] = False
    peak = np.where(active, z, 0.0).max(axis=0).astype(np.float32)
    cmap = cell_territories(df, active, p.cells)
    if p.min_region_px > 1 and cmap.territories.any():  # drop ROIs smaller than a region
        sizes = np.bincount(cmap.territories.ravel())
        small = sizes < p.min_region_px
        small[0] = False
        if small.any():
            from calseg.segment.cells import territory_anchors

            terr = np.where(small[cmap.territories], 0, cmap.territories)
            ids = np.unique(terr)
            lut = np.zeros(int(terr.max()) + 1, np.uint32)
            lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1, dtype=np.uint32)
            cmap.territories = lut[terr]
            cmap.anchors = territory_anchors(cmap.territories)
    territories = cmap.territories
    seeds = cmap.anchors
    cell_active = territory_activity(territories, active, p.cells.active_fraction)
    stats = {
        "f0_percentile": p.f0_percentile,
        "smooth_sigma_px": p.smooth_sigma_px,
        "noise_sigma_median": sigma_med / gain,
        "threshold_k": threshold,
        "min_dff": p.min_dff,
        "detrend_max_abs": float(np.abs(drift).max()) / gain if drift is not None else 0.0,
        "threshold": float(threshold),
        "n_seeds": int(len(seeds)),
        "n_cells": int(len(seeds)),
        "cell_diameter_px": float(p.cells.cell_diameter_px),
        "cell_diameter_source": p.cell_diameter_source,
        "cell_diameter_estimated": p.cell_diameter_source == "estimated",
        "active_fraction": float(active.mean()),
    }
    return Activity(
        dff, z, peak, threshold, np.asarray(seeds), territories, active, stats, cell_active, cmap
    )


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
    """Prompts of one frame: one positive point per cell ROI active in that frame (its anchor,
    well inside the cell), plus the anchors of the ``n_negative`` nearest other cells as
    negatives. At most ``max_prompts`` (highest mean z first)."""
    terr = activity.territories
    n = int(terr.max())
    if n == 0:
        return []
    if activity.cell_active is not None:
        on = np.flatnonzero(activity.cell_active[frame])
        on = on[on > 0]
    else:
        on = np.unique(terr[activity.active[frame] & (terr > 0)])
    if len(on) == 0:
        return []
    zt = activity.z[frame]
    idx = terr.ravel()
    cnt = np.maximum(np.bincount(idx, minlength=n + 1), 1)
    mean_z = np.bincount(idx, weights=zt.ravel(), minlength=n + 1) / cnt
    anchors = np.asarray(activity.seeds)
    prompts = [
        FramePrompt(frame, int(i), int(anchors[i - 1, 1]), int(anchors[i - 1, 0]), float(mean_z[i]))
        for i in on
    ]
    prompts.sort(key=lambda q: -q.z)  # strongest first
    prompts = prompts[:max_prompts]
    if n_negative > 0 and n > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(anchors)
        k = min(n, n_negative + 1)
        for q in prompts:
            _, nn = tree.query([q.y, q.x], k=k)
            nn = np.atleast_1d(nn)
            q.negatives = [
                (int(anchors[j, 1]), int(anchors[j, 0])) for j in nn if j + 1 != q.seed_id
            ][:n_negative]
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


def pack_prompts(
    positives: list[tuple[float, float] | None],
    negatives: list[list[tuple[float, float]]],
    boxes: list[tuple[float, float, float, float] | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Pack mixed prompts (points, boxes, both) into SAM2's padded point arrays.

    A box ``(x0, y0, x1, y1)`` becomes two leading points labelled 2 (top-left) and 3
    (bottom-right), SAM/SAM2's box encoding (``SAM2ImagePredictor._predict`` concatenates box
    corners before the points the same way). Then the positive point (label 1, if any) and the
    negatives (label 0); padding -1.

    Args:
        positives: per prompt an (x, y) positive point, or ``None`` (box-only prompt).
        negatives: per prompt a list of (x, y) negative points.
        boxes: per prompt a box in frame pixels, or ``None``.

    Returns:
        ``coords`` ``(B, N, 2)`` float32, ``labels`` ``(B, N)`` int32.

    Raises:
        ValueError: a prompt with neither a positive point nor a box, or unequal list lengths.
    """
    b = len(positives)
    if not (len(negatives) == len(boxes) == b):
        raise ValueError("positives, negatives and boxes must have one entry per prompt")
    rows: list[list[tuple[float, float, int]]] = []
    for p, ng, bx in zip(positives, negatives, boxes, strict=True):
        if p is None and bx is None:
            raise ValueError("a prompt needs a positive point or a box")
        row: list[tuple[float, float, int]] = []
        if bx is not None:
            row += [(bx[0], bx[1], 2), (bx[2], bx[3], 3)]
        if p is not None:
            row.append((p[0], p[1], 1))
        row += [(x, y, 0) for x, y in ng]
        rows.append(row)
    n = max((len(r) for r in rows), default=1)
    coords = np.zeros((b, n, 2), dtype=np.float32)
    labels = -np.ones((b, n), dtype=np.int32)
    for i, row in enumerate(rows):
        for j, (x, y, lab) in enumerate(row):
            coords[i, j] = (x, y)
            labels[i, j] = lab
    return coords, labels
