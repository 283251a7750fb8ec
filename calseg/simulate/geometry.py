"""Epithelial tissue geometry: Voronoi cells, neighbour graph and edge-weighted Laplacian.

Follows the source (Soundararajan et al. 2021, DESIGN.md section 2): cell centroids, 6 Lloyd
iterations, Voronoi cells clipped to an oval pouch (aspect about 1.43) or to the rectangular
field of view. Cells are rasterised directly on the pixel grid: assigning each pixel to its
nearest centroid (``scipy.spatial.cKDTree``) *is* the discrete Voronoi diagram, and Lloyd
relaxation moves each centroid to the mean of its pixels.

Edge weights of the Laplacian are shared edge lengths in the source's pixels, as the source
weights them (its Figure S1 notebook: the length of the line two cell polygons share):

- **Length on the pixel grid.** A straight edge of length ``l`` at angle ``theta`` separates
  ``l |sin theta|`` horizontally and ``l |cos theta|`` vertically adjacent pixel pairs, so
  ``hypot(horizontal pairs, vertical pairs)`` is ``l`` at any angle (tested, within 2 %). The
  earlier weight, ``pi/4`` times all pairs, is right only on average over angles. Lattice-born
  tissues have edges at preferred angles, and it measured them 3.0, 2.2, 1.4 and 1.2 % short at
  60, 100, 224 and 300 px cells against the exact Voronoi ridges of the same seeds; ``hypot``
  is within 0.35 % at all four (``python scripts/edge_length_study.py``). ``hypot`` is taken
  over a pair's whole shared boundary, so a boundary that is not straight comes out shorter:
  an L of two 12 px legs counts 12 horizontal and 12 vertical pairs, hence 17 px, not 24.
  Voronoi tissues have straight edges; wavy outlines (``irregularity``) come out a little
  shorter than their arc length, and a segmented real tissue with curved shared boundaries is
  coupled somewhat more weakly than its membranes' length.
- **Source pixels.** Lengths are multiplied by ``sqrt(reference_area / mean_cell_area)`` with
  the reference 223.8 px: the mean cell area of the published 3255-cell pouch (the pouch the
  published fractions below refer to), measured on its polygons
  (``scripts/published_pouch_study.py``). DESIGN.md's 185-224 px spans the published pouch
  sizes; CalSeg used their midpoint, 204 px, until 2026-12-07. With this scaling the model's
  ``Dp`` keeps its published meaning, and coupling is a property of the tissue, not of the
  render scale (tested: 60, 100 and 224 px cells couple within 1 %). The summed edge weight of
  an interior cell is 56.6 source px on a CalSeg pouch and 57.2 on the published one.

Measured against the published behaviour (issue 17 item 4; published: spikes ~3 %, transients
~23 %, waves and fluttering 100 % of cells with c > 0.1 uM at any time in 3600 s of published
Euler):

- CalSeg's pouches (``python scripts/tissue_activity_study.py --seeds 100:124``: 24 pouches of
  ~3255 cells, 100 px cells, c sampled every 5 s): transients 20.2 % (SD 5.1, 11.8-32.6),
  spikes 3.1 % (SD 0.2), waves and fluttering 100 %.
- CalSeg's model on the published pouch itself (``scripts/published_pouch_study.py``, 24
  draws): transients 21.1 % (SD 5.4), spikes 3.0 %; with every edge given the mean length 21.2
  % (12 draws), so the neighbour graph carries it, not the spread of edge lengths.
- Before (pi/4-weighted counts, 204 px reference): transients 13.9 % (SD 2.8, seeds 100-111).
  The reference area alone (x1.047 on the old weights, ``--coupling-scale 1.0474`` at commit
  6da79e3) gave 17.5 % (SD 4.1, 24 pouches), the length estimator the rest. The fraction is
  steep in the coupling: x1.1 on the old weights gave 25.5 %, dropping ``pi/4`` 62 %.
- Not the cause: the share of six-sided cells (``--jitter 1``: 50 % of interior cells, as on
  the published pouch's 51 %, against 76 % by default: transients 20.7 %, SD 4.4, on the same
  24 seeds). Nor, measured on the old weights over seeds 100-103: the published code's one-step
  lag of the ER calcium ``s`` and its clipping of c, p >= 0 (no change on the same draws); the
  initial state of another version of the published code, c ~ U(0.055, 0.059) and p ~ U(0.07,
  0.09) uM instead of c = p = 0 (``--initial-state rest``: the same fractions to 0.1 point); the
  render scale (``--cell-area-px 100`` and 204: within the seed spread); the IP3R recovery
  constants of DESIGN.md's single-cell check (``--ktau 1 --taumax 1000``: lower, not higher);
  sampling c every Euler step instead of every 5 s (``--sample-s 0.2``: the same fractions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from calseg.progress import check_cancelled

REFERENCE_CELL_AREA_PX = 223.8  # mean cell area of the published 3255-cell pouch (module docstring)
POUCH_ASPECT = 1.43  # major/minor axis of the source's oval pouch
MIN_CELLS, MAX_CELLS = 50, 5000
TissueShape = Literal["pouch", "rectangle"]


class GeometryError(ValueError):
    """Raised for an impossible tissue request or an unusable label image."""


@dataclass
class Tissue:
    """A rasterised epithelial tissue.

    Attributes:
        labels: (H, W) uint32 label image, 0 = outside the tissue, cell i has id i + 1.
        centroids: (N, 2) float64 centroids (row, col) in px.
        areas: (N,) int64 cell areas (px).
        laplacian: (N, N) CSR float64 graph Laplacian, off-diagonal = edge weight (scaled px),
            diagonal = -row sum (rows sum to 0).
        edge_px: (N, N) CSR int64 raw counts of shared boundary pixel pairs.
        boundary: (N,) bool, True for cells touching the tissue edge or the image border.
        info: how the tissue was made (shape, seeds, scale factor...).
    """

    labels: np.ndarray
    centroids: np.ndarray
    areas: np.ndarray
    laplacian: sp.csr_matrix
    edge_px: sp.csr_matrix
    boundary: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def degree(self) -> np.ndarray:
        """(N,) int number of neighbours per cell."""
        return np.diff(self.edge_px.indptr).astype(np.int64)

    def stats(self) -> dict:
        """Degree and area statistics (interior = not touching the tissue edge)."""
        deg = self.degree
        interior = ~self.boundary
        return {
            "n_cells": self.n_cells,
            "mean_degree_all": float(deg.mean()),
            "mean_degree_interior": float(deg[interior].mean()) if interior.any() else float("nan"),
            "min_degree_interior": int(deg[interior].min()) if interior.any() else 0,
            "max_degree_interior": int(deg[interior].max()) if interior.any() else 0,
            "mean_area_px": float(self.areas.mean()),
        }


def tissue_mask(height: int, width: int, shape: TissueShape, margin: float = 0.04) -> np.ndarray:
    """(H, W) bool region occupied by tissue.

    ``"pouch"``: the largest ellipse of aspect 1.43 (major axis along the longer image side)
    that fits inside the frame with a ``margin`` (fraction of the side); ``"rectangle"``: the
    whole field of view.
    """
    if shape == "rectangle":
        return np.ones((height, width), bool)
    if shape != "pouch":
        raise GeometryError(f"unknown tissue shape {shape!r}; use 'pouch' or 'rectangle'")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    long_side, short_side = max(height, width), min(height, width)
    a = long_side * (1 - 2 * margin) / 2
    b = a / POUCH_ASPECT
    if b > short_side * (1 - 2 * margin) / 2:
        b = short_side * (1 - 2 * margin) / 2
        a = b * POUCH_ASPECT
    ay, ax = (a, b) if height > width else (b, a)
    yy, xx = np.ogrid[:height, :width]
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0


def estimate_n_cells(height: int, width: int, shape: TissueShape, mean_cell_area_px: float) -> int:
    """Number of cells a tissue of this size and mean cell area (px) will have."""
    area = float(tissue_mask(height, width, shape).sum())
    return int(round(area / mean_cell_area_px))


def _assign(
    pix: np.ndarray,
    seeds: np.ndarray,
    star: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Index of the owning seed for each pixel (nearest, or star-convex perturbed nearest)."""
    tree = cKDTree(seeds)
    if star is None:
        return tree.query(pix, k=1, workers=1)[1]
    k = min(4, seeds.shape[0])
    d, idx = tree.query(pix, k=k, workers=1)
    amp, phase, order = star
    dy = pix[:, None, 0] - seeds[idx, 0]
    dx = pix[:, None, 1] - seeds[idx, 1]
    theta = np.arctan2(dy, dx)
    # Radial profile 1 + sum_m a_m cos(m theta + phi_m): a star-convex outline per cell.
    prof = np.ones_like(d)
    for m in range(order.shape[0]):
        prof += amp[idx, m] * np.cos(order[m] * theta + phase[idx, m])
    return idx[np.arange(idx.shape[0]), np.argmin(d / prof, axis=1)]


def make_tissue(
    height: int,
    width: int,
    mean_cell_area_px: float,
    shape: TissueShape = "pouch",
    rng: np.random.Generator | None = None,
    lloyd_iterations: int = 6,
    jitter: float = 0.5,
    irregularity: float = 0.0,
) -> Tissue:
    """Build a Voronoi tissue of jittered, Lloyd-relaxed centroids on the pixel grid.

    Args:
        height, width: image size (px).
        mean_cell_area_px: target mean cell area (px); N = tissue area / this, 50 <= N <= 5000.
        shape: ``"pouch"`` (oval, aspect 1.43) or ``"rectangle"`` (whole field).
        rng: random generator (geometry stream).
        lloyd_iterations: Lloyd relaxation steps (source: 6).
        jitter: centroid jitter on a hexagonal lattice, as a fraction of the lattice spacing
            (uniform in a disc of that radius).
        irregularity: 0 = straight Voronoi edges; up to 1 = wavy star-convex outlines (random
            Fourier radial profile per cell, amplitude 0.25 * irregularity).

    Returns:
        A :class:`Tissue`.
    """
    rng = rng or np.random.default_rng()
    mask = tissue_mask(height, width, shape)
    area = float(mask.sum())
    n_target = int(round(area / mean_cell_area_px))
    if not MIN_CELLS <= n_target <= MAX_CELLS:
        raise GeometryError(
            f"a {height}x{width} {shape} with mean cell area {mean_cell_area_px:g} px holds "
            f"{n_target} cells; CalSeg tissues have {MIN_CELLS}-{MAX_CELLS} cells: change the "
            "image size or mean_cell_area_px"
        )
    # Hexagonal lattice with the target density, jittered, kept inside the tissue.
    spacing = np.sqrt(2 * area / (np.sqrt(3) * n_target))
    rows = np.arange(-1, height / (spacing * np.sqrt(3) / 2) + 2)
    pts = []
    for i in rows:
        y = i * spacing * np.sqrt(3) / 2
        xs = np.arange(-1, width / spacing + 2) * spacing + (spacing / 2 if int(i) % 2 else 0.0)
        pts.append(np.stack([np.full_like(xs, y), xs], axis=1))
    seeds = np.concatenate(pts)
    ang = rng.uniform(0, 2 * np.pi, seeds.shape[0])
    rad = jitter * spacing * np.sqrt(rng.uniform(0, 1, seeds.shape[0]))
    seeds = seeds + np.stack([rad * np.sin(ang), rad * np.cos(ang)], axis=1)
    iy = np.clip(np.rint(seeds[:, 0]).astype(int), 0, height - 1)
    ix = np.clip(np.rint(seeds[:, 1]).astype(int), 0, width - 1)
    inside = (
        (seeds[:, 0] >= 0)
        & (seeds[:, 0] <= height - 1)
        & (seeds[:, 1] >= 0)
        & (seeds[:, 1] <= width - 1)
        & mask[iy, ix]
    )
    seeds = seeds[inside]
    pix = np.argwhere(mask).astype(np.float64)
    star = None
    if irregularity > 0:
        order = np.array([2.0, 3.0, 5.0])
        amp = rng.uniform(0, 0.25 * irregularity / 3 * 2, (seeds.shape[0], order.size))
        phase = rng.uniform(0, 2 * np.pi, (seeds.shape[0], order.size))
        star = (amp, phase, order)
    for _ in range(lloyd_iterations):
        check_cancelled()
        owner = np.asarray(_assign(pix, seeds, None))
        cnt = np.bincount(owner, minlength=seeds.shape[0])
        keep = cnt > 0
        sy = np.bincount(owner, pix[:, 0], seeds.shape[0])
        sx = np.bincount(owner, pix[:, 1], seeds.shape[0])
        seeds = np.stack([sy[keep] / cnt[keep], sx[keep] / cnt[keep]], axis=1)
        if star is not None:
            star = (star[0][keep], star[1][keep], star[2])
    owner = np.asarray(_assign(pix, seeds, star))
    labels = np.zeros((height, width), np.uint32)
    labels[mask] = owner.astype(np.uint32) + 1
    tissue = tissue_from_labels(labels, relabel=True)
    tissue.info.update(
        {
            "source": "voronoi",
            "shape": shape,
            "lloyd_iterations": lloyd_iterations,
            "jitter": jitter,
            "irregularity": irregularity,
        }
    )
    return tissue


def tissue_from_labels(
    labels: np.ndarray,
    relabel: bool = True,
    reference_area_px: float = REFERENCE_CELL_AREA_PX,
) -> Tissue:
    """Build the tissue (neighbour graph, Laplacian) from a label image, e.g. a segmented real
    tissue or a Voronoi rasterisation.

    Args:
        labels: (H, W) integer label image, 0 = background, one id per cell.
        relabel: renumber ids to 1..N in order of first appearance-free sorted ids (cell i has
            id i + 1). Must be True unless ids already are exactly 1..N.
        reference_area_px: the source's mean cell area (px) used to scale edge lengths
            (default 223.8, the published 3255-cell pouch; module docstring).

    Returns:
        A :class:`Tissue` with weights = hypot(horizontally, vertically adjacent boundary
        pixel pairs) * sqrt(reference_area_px / mean cell area), in source px; ``edge_px``
        keeps the raw pair counts (both directions together).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise GeometryError(
            f"label image must be a 2-D integer array, got {lab.dtype} of shape {lab.shape}"
        )
    if lab.min() < 0:
        raise GeometryError("label image has negative ids; use 0 for background, >0 for cells")
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if ids.size < 2:
        raise GeometryError("label image must contain at least two cells")
    if ids.size > MAX_CELLS:
        raise GeometryError(f"label image has {ids.size} cells; at most {MAX_CELLS} supported")
    if relabel:
        lut = np.zeros(int(ids.max()) + 1, np.uint32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
        lab = lut[lab]
    elif not np.array_equal(ids, np.arange(1, ids.size + 1)):
        raise GeometryError("ids are not 1..N; pass relabel=True")
    lab = lab.astype(np.uint32)
    n = ids.size
    flat = lab.ravel()
    areas = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    yy, xx = np.indices(lab.shape)
    cy = np.bincount(flat, yy.ravel(), n + 1)[1:] / np.maximum(areas, 1)
    cx = np.bincount(flat, xx.ravel(), n + 1)[1:] / np.maximum(areas, 1)

    # Shared edges: horizontal and vertical 4-connected pixel pairs with two different non-zero
    # labels, counted apart: a straight edge of length l at angle theta is crossed by
    # l |sin theta| horizontal and l |cos theta| vertical pairs, so hypot(h, v) = l whatever
    # the angle (module docstring).
    def pair_counts(a: np.ndarray, b: np.ndarray) -> sp.csr_matrix:
        sel = (a != b) & (a > 0) & (b > 0)
        i, j = a[sel].astype(np.int64) - 1, b[sel].astype(np.int64) - 1
        m = sp.coo_matrix((np.ones(i.size, np.int64), (i, j)), shape=(n, n)).tocsr()
        m = (m + m.T).tocsr()
        m.sum_duplicates()
        return m

    horizontal = pair_counts(lab[:, :-1].ravel(), lab[:, 1:].ravel())
    vertical = pair_counts(lab[:-1, :].ravel(), lab[1:, :].ravel())
    edge = (horizontal + vertical).tocsr()
    length = (horizontal.multiply(horizontal) + vertical.multiply(vertical)).astype(np.float64)
    length = sp.csr_matrix(length).sqrt()
    # Cells touching the background or the image border.
    bnd = np.zeros(n + 1, bool)
    outer = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    bnd[outer] = True
    bg_pairs = np.concatenate(
        [
            np.where(lab[:, :-1] == 0, lab[:, 1:], 0).ravel(),
            np.where(lab[:, 1:] == 0, lab[:, :-1], 0).ravel(),
            np.where(lab[:-1, :] == 0, lab[1:, :], 0).ravel(),
            np.where(lab[1:, :] == 0, lab[:-1, :], 0).ravel(),
        ]
    )
    bnd[bg_pairs] = True
    scale = float(np.sqrt(reference_area_px / float(areas.mean())))
    w = length * scale
    lap = (w - sp.diags(np.asarray(w.sum(axis=1)).ravel())).tocsr()
    return Tissue(
        labels=lab,
        centroids=np.stack([cy, cx], axis=1),
        areas=areas,
        laplacian=lap,
        edge_px=edge,
        boundary=bnd[1:],
        info={"source": "labels", "edge_scale": float(scale)},
    )
