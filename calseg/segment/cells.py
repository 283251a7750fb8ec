"""Cell ROIs (territories) of the active cells of a recording, from the recording alone.

Neighbouring epithelial cells are often active together (intercellular transients and waves),
so the supra-threshold pixels of one frame form clusters of several cells. The cells are
separated by their static structure, seen best where they are active:

1. **Reference image** ``R``: per pixel the mean over frames of the active signal,
   ``mean_t(max(F_t - F0, 0) * active_t)`` (F0 and activity from
   :mod:`calseg.segment.prompts`). Texture that multiplies the indicator signal (a dim,
   GCaMP-excluding nucleus; a dim membrane line; DESIGN.md section 3) is sharpest here; dF/F
   or z = dF / sigma(F0) would divide most of it away again.
2. **Support**: pixels active in at least one frame whose ``R`` is at least
   ``support_fraction`` of the local maximum of ``R`` (Gaussian-smoothed by 1 px, window of
   two cell diameters). This cuts the optical halo (PSF, out-of-focus light) that a pure noise
   threshold keeps around bright cells. ``Rn`` = ``R`` / that local maximum.
3. **Seeds** (one per cell): dark blobs of ``Rn`` at the nucleus scale, i.e. local maxima of
   the scale-normalised Laplacian of Gaussian ``s^2 LoG(Rn)``, ``s`` =
   ``nucleus_radius_fraction`` x r / sqrt(2) (r = ``cell_diameter_px`` / 2; Lindeberg 1998
   blob detection), kept only when surrounded by brighter cytoplasm: at radii 0.55 r and 0.75 r
   the ``ring_quantile`` quantile over 16 directions of (ring - centre) must exceed
   ``ring_contrast_min`` (a junction of three membranes is dark too, but not surrounded).
   Strongest first, seeds closer than ``seed_min_distance_fraction`` x diameter to a stronger
   one are dropped.
4. **Territories**: every support pixel goes to its nearest seed within the support
   (compact watershed on a flat landscape, i.e. a geodesic Voronoi partition; epithelial cells
   are close to the Voronoi cells of their centres). Then a size prior with the expected area
   ``A = pi r^2``: a territory larger than ``split_area_factor`` x A is split into
   ``round(area / A)`` parts by k-means on its pixel coordinates; one smaller than
   ``merge_area_factor`` x A is merged into the neighbour it touches most.
5. **Activity per frame**: a territory is active in frame t when more than ``active_fraction``
   of its pixels are supra-threshold there; then the whole territory is the cell's mask
   (a cell is active or not as a whole, DESIGN.md section 4).

Defaults were chosen on simulated 256 x 256 recordings (mean cell area 100 px, equivalent
diameter 11.3 px); set ``cell_diameter_px`` for other magnifications.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from calseg.progress import check_cancelled


class CellParamsError(ValueError):
    """Raised for invalid :class:`CellParams` (e.g. a non-positive cell diameter)."""


@dataclass
class CellParams:
    """Parameters of :func:`cell_territories` (lengths in px, fractions dimensionless)."""

    cell_diameter_px: float = 11.0
    support_fraction: float = 0.3
    nucleus_radius_fraction: float = 0.42
    ring_contrast_min: float = 0.0
    ring_quantile: float = 0.2
    ring_uniformity: float = 0.0
    seed_min_distance_fraction: float = 0.6
    split_area_factor: float = 1.7
    merge_area_factor: float = 0.35
    active_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.cell_diameter_px > 1:
            raise CellParamsError(
                f"cell_diameter_px must be > 1 px, got {self.cell_diameter_px}; give the "
                "typical cell diameter in pixels of the recording"
            )
        for name in ("support_fraction", "ring_quantile", "active_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise CellParamsError(f"{name} must be in [0, 1), got {v}")
        if not self.split_area_factor > self.merge_area_factor > 0:
            raise CellParamsError(
                "need split_area_factor > merge_area_factor > 0, got "
                f"{self.split_area_factor} and {self.merge_area_factor}"
            )


@dataclass
class CellMap:
    """Static cell ROIs of a recording.

    ``reference``: ``(H, W)`` float32 ``Rn`` (reference image / local maximum);
    ``support``: ``(H, W)`` bool; ``seeds``: ``(N0, 2)`` int (row, col) seeds before the size
    prior; ``territories``: ``(H, W)`` uint32, ids ``1..N`` (0 outside cells);
    ``anchors``: ``(N, 2)`` int (row, col), per territory id ``i`` at row ``i - 1`` the pixel
    farthest from its border (a prompt point inside the cell).
    """

    reference: np.ndarray
    support: np.ndarray
    seeds: np.ndarray
    territories: np.ndarray
    anchors: np.ndarray
    stats: dict = field(default_factory=dict)


def reference_image(df: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``mean_t(max(dF_t, 0) * active_t)``: ``(H, W)`` float32 from ``(T, H, W)`` dF
    (F - F0, input units) and ``active`` (bool)."""
    acc = np.zeros(df.shape[1:], np.float64)
    for t in range(df.shape[0]):  # frame by frame: no (T, H, W) temporary
        check_cancelled()
        acc += np.where(active[t], np.maximum(df[t], 0.0), 0.0)
    return (acc / max(1, df.shape[0])).astype(np.float32)


def _ring_contrast(
    img: np.ndarray, pts: np.ndarray, radii: tuple[float, ...], q: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per point, over 16 directions of (brightest ring value - centre): the ``q`` quantile
    and the maximum."""
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    rings = []
    for rho in radii:
        yy = pts[:, 0, None] + rho * np.sin(ang)[None]
        xx = pts[:, 1, None] + rho * np.cos(ang)[None]
        v = ndi.map_coordinates(img, [yy.ravel(), xx.ravel()], order=1, mode="nearest")
        rings.append(v.reshape(len(pts), -1))
    ring = np.max(np.stack(rings), axis=0)
    centre = img[pts[:, 0], pts[:, 1]]
    c = ring - centre[:, None]
    return np.quantile(c, q, axis=1), c.max(axis=1)


def _greedy_min_distance(pts: np.ndarray, score: np.ndarray, min_dist: float) -> np.ndarray:
    """Indices of points kept strongest-first with Euclidean spacing >= ``min_dist``."""
    from scipy.spatial import cKDTree

    order = np.argsort(-score, kind="stable")
    if len(pts) == 0:
        return order
    tree = cKDTree(pts)
    taken = np.zeros(len(pts), bool)
    suppressed = np.zeros(len(pts), bool)
    for i in order:
        if suppressed[i]:
            continue
        taken[i] = True
        for j in tree.query_ball_point(pts[i], r=max(min_dist - 1e-9, 0.0)):
            if j != i:
                suppressed[j] = True
    return np.flatnonzero(taken)


def apply_size_prior(
    territories: np.ndarray, expected_area_px: float, split_factor: float, merge_factor: float
) -> np.ndarray:
    """Split territories larger than ``split_factor`` x the expected area (k-means on pixel
    coordinates into ``round(area / expected)`` parts) and merge those smaller than
    ``merge_factor`` x it into the neighbour they share the longest border with.

    Returns:
        ``(H, W)`` uint32 territories relabelled ``1..N``.
    """
    out = np.zeros(territories.shape, np.uint32)
    nid = 0
    for i, sl in enumerate(ndi.find_objects(territories), start=1):
        if sl is None:
            continue
        m = territories[sl] == i
        area = int(m.sum())
        k = int(round(area / expected_area_px)) if area > split_factor * expected_area_px else 1
        sub = out[sl]
        if k <= 1:
            nid += 1
            sub[m] = nid
            continue
        yy, xx = np.nonzero(m)
        pts = np.stack([yy, xx], 1).astype(np.float64)
        init = pts[np.linspace(0, len(pts) - 1, k).round().astype(int)]
        lab = _kmeans_labels(pts, init)
        for j in range(k):
            sel = lab == j
            if sel.any():
                nid += 1
                sub[yy[sel], xx[sel]] = nid
    areas = np.bincount(out.ravel(), minlength=nid + 1)
    # each region's bounding box, grown by the regions merged into it: a region's pixels are
    # looked for in its box, not the whole frame (which was quadratic in the region count:
    # 60,000 one-pixel cells of cell_diameter_px 1.01)
    boxes = {j: [s.start for s in b] + [s.stop for s in b]
             for j, b in enumerate(ndi.find_objects(out), start=1) if b is not None}  # fmt: skip
    h, w = out.shape
    for i in np.flatnonzero((areas > 0) & (areas < merge_factor * expected_area_px)):
        if i == 0:
            continue
        y0, x0, y1, x1 = boxes[i]
        win = (slice(max(y0 - 1, 0), min(y1 + 1, h)), slice(max(x0 - 1, 0), min(x1 + 1, w)))
        sub = out[win]
        m = sub == i
        nb = sub[ndi.binary_dilation(m) & ~m]
        nb = nb[(nb > 0) & (nb != i)]
        if nb.size:
            t = int(np.bincount(nb).argmax())
            sub[m] = t
            bt = boxes[t]
            boxes[t] = [min(bt[0], y0), min(bt[1], x0), max(bt[2], y1), max(bt[3], x1)]
    # relabel 1..N
    ids = np.unique(out)
    ids = ids[ids > 0]
    lut = np.zeros(int(out.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[out]


KMEANS_ITERATIONS = 10
"""Lloyd iterations of the split (scipy's ``kmeans2`` default)."""
KMEANS_DIRECT_MAX = 1 << 24
"""Points x clusters up to which scipy's ``kmeans2`` runs (its every iteration measures every
point against every cluster); above, the same iterations with nearest clusters from a k-d
tree."""


def _kmeans_labels(pts: np.ndarray, init: np.ndarray) -> np.ndarray:
    """Cluster of each of ``pts`` ``(N, 2)`` after :data:`KMEANS_ITERATIONS` Lloyd iterations
    from the centroids ``init`` ``(k, 2)`` (a cluster left empty keeps its centroid), as
    scipy's ``kmeans2(pts, init, minit="matrix")``: that directly while ``N x k`` is at most
    :data:`KMEANS_DIRECT_MAX`, else with a k-d tree (``N log k`` per iteration). A sixth
    attack run's 220 x 220 px region at ``cell_diameter_px`` 1.01 asked for 60,000 clusters of
    48,400 points: a job of 2.5 minutes estimated at 6.6 s, hours at 1 Mpx."""
    if len(pts) * len(init) <= KMEANS_DIRECT_MAX:
        from scipy.cluster.vq import kmeans2

        return kmeans2(pts, init, iter=KMEANS_ITERATIONS, minit="matrix", seed=0)[1]
    from scipy.spatial import cKDTree

    def nearest(centres: np.ndarray) -> np.ndarray:
        # of two clusters at the same distance the lower index, as scipy's vq
        d, j = cKDTree(centres).query(pts, k=2)
        tie = d[:, 1] <= d[:, 0]
        return np.where(tie, j.min(axis=1), j[:, 0])

    centres = init.copy()
    k = len(centres)
    for _ in range(KMEANS_ITERATIONS):
        lab = nearest(centres)
        n = np.bincount(lab, minlength=k)
        filled = n > 0
        for c in range(2):
            sums = np.bincount(lab, pts[:, c], minlength=k)
            centres[filled, c] = sums[filled] / n[filled]
    return nearest(centres)


def territory_anchors(territories: np.ndarray) -> np.ndarray:
    """Per territory (ids 1..N), the (row, col) of its pixel farthest from its border:
    ``(N, 2)`` int (a point well inside the cell, like the training prompts' eroded masks)."""
    n = int(territories.max())
    out = np.zeros((n, 2), np.int64)
    for i, sl in enumerate(ndi.find_objects(territories), start=1):
        if sl is None:
            continue
        m = np.pad(territories[sl] == i, 1)
        dist = ndi.distance_transform_edt(m)
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out[i - 1] = (r - 1 + sl[0].start, c - 1 + sl[1].start)
    return out


SEED_FALSE_ALARMS = 0.05
"""Expected number of seeds (cells) that pure noise may pass on one image when a noise image
is given to :func:`cell_territories` (issue 17 item 2: at most about 0.05 false cells)."""


def null_z(n_tests: int, alpha: float = SEED_FALSE_ALARMS) -> float:
    """One-sided Gaussian threshold ``k`` with ``n_tests x P(z > k) = alpha`` (Bonferroni):
    ``k = -Phi^-1(alpha / n_tests)``; e.g. 3.3 for 10 tests, 5.3 for 1e6."""
    from scipy.special import ndtri

    return float(-ndtri(alpha / max(int(n_tests), 1)))


def _null_stats(values: np.ndarray, support: np.ndarray, window: float) -> tuple[float, np.ndarray]:
    """Mean over ``support`` and local SD map of a null statistic image: the SD in a Gaussian
    window of ``window`` px around each pixel (noise varies over the field, e.g. with the
    illumination under shot noise), never under the global SD's half (floored at 1e-12)."""
    v = np.asarray(values, np.float64)
    mu = float(v[support].mean())
    dev2 = np.where(support, (v - mu) ** 2, 0.0)
    w = ndi.gaussian_filter(support.astype(np.float64), window)
    local = np.sqrt(ndi.gaussian_filter(dev2, window) / np.maximum(w, 1e-6))
    glob = float(np.sqrt(dev2[support].mean()))
    return mu, np.maximum(local, max(0.5 * glob, 1e-12))


def _minus_quadratic(img: np.ndarray) -> np.ndarray:
    """``img`` minus its least-squares quadratic surface ``a + b y + c x + d y^2 + e xy + f
    x^2`` (fitted on at most ~65k pixels on a grid): removes a smooth illumination fall-off
    (vignetting), whose slope at the frame edge would otherwise reflect into a fold that
    blob filters see as a blob."""
    h, w = img.shape
    step = max(1, int(np.sqrt(h * w / 65536)))
    yy, xx = np.mgrid[0:h:step, 0:w:step]
    y, x = yy.ravel() / h - 0.5, xx.ravel() / w - 0.5
    a = np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], 1)
    coef, *_ = np.linalg.lstsq(a, img[::step, ::step].ravel().astype(np.float64), rcond=None)
    gy, gx = np.mgrid[0:h, 0:w]
    gy, gx = gy / h - 0.5, gx / w - 0.5
    surf = coef[0] + coef[1] * gy + coef[2] * gx + coef[3] * gy * gy + coef[4] * gx * gy
    surf += coef[5] * gx * gx
    return (img - surf).astype(np.float32)


def _local_contrast(response: np.ndarray, d: float) -> np.ndarray:
    """A filter response minus its mean over a window of 4 cell diameters (removes the
    smooth part: e.g. the constant LoG of a curved illumination; a LoG response of cells
    averages to about 0 over several cells)."""
    return response - ndi.uniform_filter(response, size=int(4 * d) | 1, mode="nearest")


def cell_territories(
    df: np.ndarray,
    active: np.ndarray,
    params: CellParams | None = None,
    null: np.ndarray | None = None,
) -> CellMap:
    """Static cell ROIs of the active cells (see module docstring).

    Args:
        df: ``(T, H, W)`` float32 F - F0 (input units).
        active: ``(T, H, W)`` bool supra-threshold pixels.
        params: :class:`CellParams`.
        null: optional ``(H, W)`` image of the reference image's noise alone (same units,
            e.g. the half difference of two interleaved half-recordings,
            :func:`calseg.segment.projection.projection_noise`). When given, a region is
            labelled only with evidence of a cell above that noise: a nucleus seed needs its
            dark-blob response ``s^2 LoG`` above the null's mean by ``null_z(support px)``
            null SDs (the same filter on ``null``, over the support; Bonferroni over pixels,
            since a seed is a local maximum of that response), and a part of the support
            without nucleus seed gets its one seed only when it is a bright blob at the cell
            scale (``-r^2/2 LoG`` at its anchor, same rule). Pure noise then passes about
            :data:`SEED_FALSE_ALARMS` seeds per image.

    Returns:
        :class:`CellMap`; ``stats["n_seeds_rejected_by_noise"]`` counts seeds the null test
        dropped.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    p = params or CellParams()
    if df.shape != active.shape or df.ndim != 3:
        raise ValueError(f"dF {df.shape} and active {active.shape} must be equal (T, H, W)")
    d = float(p.cell_diameter_px)
    r = d / 2
    area = np.pi * r * r
    ref = reference_image(df, active)
    local_max = ndi.maximum_filter(ndi.gaussian_filter(ref, 1.0), size=int(2 * d) | 1)
    rn = (ref / np.maximum(local_max, 1e-6)).astype(np.float32)
    support = (rn > p.support_fraction) & active.any(axis=0)
    support = ndi.binary_opening(support)
    seeds = np.zeros((0, 2), np.int64)
    terr = np.zeros(ref.shape, np.uint32)
    n_rejected = 0
    z_kept = np.zeros(0)
    if null is not None and np.shape(null) != ref.shape:
        raise ValueError(f"null image {np.shape(null)} must have the frame shape {ref.shape}")
    if support.any():
        sn = max(0.5, p.nucleus_radius_fraction * r / np.sqrt(2))
        blob = sn * sn * ndi.gaussian_laplace(rn, sn)  # dark blobs (nuclei) positive
        k_px = null_z(2 * int(support.sum()))  # two families of tests: dark and bright blobs
        if null is not None:  # the same filters on the reference and on noise alone
            # (in the reference's own units: dividing by the local maximum would turn a smooth
            # illumination into steps; the local median removes its curvature)
            null = np.asarray(null, np.float32)
            # the mean dF, unmasked and unclipped: zeros outside the active pixels / support
            # would be dark blobs themselves, and clipping flattens the darkest corners
            ev_ref = np.zeros(df.shape[1:], np.float64)
            for t in range(df.shape[0]):
                ev_ref += df[t]
            ev_ref = _minus_quadratic((ev_ref / max(1, df.shape[0])).astype(np.float32))
            ev_dark = _local_contrast(sn * sn * ndi.gaussian_laplace(ev_ref, sn), d)
            mu, sd = _null_stats(sn * sn * ndi.gaussian_laplace(null, sn), support, 2 * d)
        cand = peak_local_max(
            np.where(support, blob, 0.0),
            min_distance=2,
            threshold_abs=1e-6,
            exclude_border=False,
            labels=support.astype(np.int32),
        )
        if len(cand) and null is not None:
            # a dark blob needs the image around it: within 2 filter scales of the frame edge
            # the filter sees the edge's reflection (a smooth illumination fall-off becomes a
            # dark crease there), which is no evidence of a nucleus
            b = 2.0 * sn
            h, w = ref.shape
            inner = (
                (cand[:, 0] >= b) & (cand[:, 0] < h - b) & (cand[:, 1] >= b) & (cand[:, 1] < w - b)
            )
            z = (ev_dark[cand[:, 0], cand[:, 1]] - mu) / sd[cand[:, 0], cand[:, 1]]
            ok = inner & (z > k_px)
            z_kept = z[ok]
            n_rejected += int((~ok).sum())
            cand = cand[ok]
        if len(cand):
            smooth = ndi.gaussian_filter(rn, 0.7)
            low, high = _ring_contrast(smooth, cand, (0.55 * r, 0.75 * r), p.ring_quantile)
            ok = (low > p.ring_contrast_min) & (low >= p.ring_uniformity * np.maximum(high, 0))
            cand = cand[ok]
        # every connected part of the support gets at least one seed (its deepest point);
        # with a null image only when that part is a bright blob at the cell scale
        lab_sup, n_sup = ndi.label(support)
        if n_sup:
            seeded = np.zeros(n_sup + 1, bool)
            if len(cand):
                seeded[lab_sup[cand[:, 0], cand[:, 1]]] = True
            unseeded = np.flatnonzero(~seeded[1:]) + 1
            if null is None:
                extra = [territory_anchors((lab_sup == k).astype(np.uint32)) for k in unseeded]
            else:  # bright blobs at the cell scale, above the local level (not a dome of light)
                extra = []
                sc = r / np.sqrt(2)
                bright = _local_contrast(-sc * sc * ndi.gaussian_laplace(ev_ref, sc), d)
                mu_b, sd_b = _null_stats(-sc * sc * ndi.gaussian_laplace(null, sc), support, 2 * d)
                zb = np.where(np.isin(lab_sup, unseeded), (bright - mu_b) / sd_b, 0.0)
                m = int(np.ceil(4 * sc))
                zb[:m], zb[-m:], zb[:, :m], zb[:, -m:] = 0, 0, 0, 0
                pk = peak_local_max(zb, min_distance=max(2, int(d / 2)), threshold_abs=k_px)
                n_rejected += int(len(unseeded) > 0 and len(pk) == 0)
                extra = [pk] if len(pk) else []
            for a in extra:
                cand = np.vstack([cand, a])
        score = blob[cand[:, 0], cand[:, 1]] if len(cand) else np.zeros(0)
        keep = _greedy_min_distance(cand, score, p.seed_min_distance_fraction * d)
        seeds = cand[keep].astype(np.int64)
        markers = np.zeros(ref.shape, np.int32)
        markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
        # (support parts without a seed stay unlabelled: the watershed floods from seeds)
        if len(seeds):
            flat = np.zeros(ref.shape, np.float32)
            terr = watershed(flat, markers, mask=support, compactness=1.0).astype(np.uint32)
            terr = apply_size_prior(terr, area, p.split_area_factor, p.merge_area_factor)
            if null is not None:  # evidence per cell: a part split off without a seed goes
                has_seed = np.zeros(int(terr.max()) + 1, bool)
                has_seed[terr[seeds[:, 0], seeds[:, 1]]] = True
                has_seed[0] = False
                ids = np.flatnonzero(has_seed)
                lut = np.zeros(int(terr.max()) + 1, np.uint32)
                lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
                terr = lut[terr]
    anchors = territory_anchors(terr)
    stats = {
        "cell_diameter_px": d,
        "n_seeds": int(len(seeds)),
        "n_cells": int(terr.max()),
        "support_px": int(support.sum()),
        "n_seeds_rejected_by_noise": n_rejected,
        "seed_evidence_z": [round(float(v), 1) for v in np.sort(z_kept)[:5]],
    }
    return CellMap(rn, support, seeds, terr, anchors, stats)


def territory_activity(
    territories: np.ndarray, active: np.ndarray, active_fraction: float = 0.5
) -> np.ndarray:
    """Which territory is active in which frame.

    Args:
        territories: ``(H, W)`` uint32 ids ``0..N``.
        active: ``(T, H, W)`` bool supra-threshold pixels.
        active_fraction: a territory is active when more than this fraction of its pixels is.

    Returns:
        ``(T, N + 1)`` bool; column 0 (background) is always False.
    """
    n = int(territories.max())
    idx = territories.ravel()
    count = np.maximum(np.bincount(idx, minlength=n + 1), 1)
    out = np.zeros((active.shape[0], n + 1), bool)
    for t in range(active.shape[0]):
        check_cancelled()
        frac = np.bincount(idx, weights=active[t].ravel(), minlength=n + 1) / count
        out[t] = frac > active_fraction
    out[:, 0] = False
    return out
