"""Cell footprints on a temporal projection: every cell visible in the recording, active or not.

The default target of CalSeg is the *active* cells of each frame (:mod:`calseg.segment.prompts`:
a pixel is active when its noise-normalised dF exceeds ``threshold_k`` robust SDs). Hand-drawn
ROIs of real recordings outline cells on an average image instead, and short, noisy recordings
often hold no supra-threshold pixel at all (measured, BENCHMARKS.md "Sim-to-real": on
``sima_example.tif``, 20 frames, the per-pixel noise SD is ~940 counts on a median of 898, so
within the two labelled ROIs under 1 % of the pixels ever pass z > 5, although the ROI-mean
traces reach dF/F 0.28 and 0.68). ``target="cells"`` segments the cells on a projection of
the recording instead:

1. **Projection** ``P`` (:func:`projection_image`): the temporal ``mean`` (default: the
   average image the ROIs are drawn on; its noise is 1/sqrt(T) of a frame's), ``max`` or
   ``std`` over frames (non-finite pixels ignored), then a Gaussian of ``smooth_sigma_px``
   (1 px) against the remaining shot noise.
2. **Cell size** (:func:`estimate_cell_diameter`) unless given: the scale ``s`` of the
   strongest dark blobs (nuclei, which exclude cytosolic indicators such as GCaMP) of the
   projection, from the scale-normalised Laplacian of Gaussian ``s^2 LoG(P)`` (Lindeberg 1998):
   the mean of the top 10 % of its local maxima is maximal at ``s*``. The cell diameter follows
   from the nucleus/cell ratio that :mod:`calseg.segment.cells` assumes (nucleus LoG scale
   ``0.42 r / sqrt(2)``), ``d = 2 sqrt(2) s* / 0.42``, clipped to ``[4, min(H, W) / 2]`` px
   (a field smaller than two cells cannot show their scale).
3. **Cells**: foreground = pixels of ``P`` minus its 1st percentile (the dark level) above
   ``support_fraction`` of the local maximum over two diameters (as the support of
   :mod:`calseg.segment.cells`), opened, with its holes (the dark nuclei) filled; then
   :func:`calseg.segment.cells.cell_territories` on it: one seed per dark nucleus surrounded
   by brighter cytoplasm, geodesic Voronoi territories with the cell-size prior. One home for
   cell ROIs: the same code separates active cells in the ``active`` target.

Limits, measured (``tests/test_segment_projection.py``, BENCHMARKS.md): on synthetic packed
cells with dark nuclei the diameter is recovered (16.8 px) and 0.91 of the cells are found at
IoU >= 0.5; on the two real recordings one of two hand-drawn ROIs is matched at IoU >= 0.3,
which is chance level (cell-sized grid tiles match as many,
:func:`calseg.analysis.real_eval.grid_control`). Cells without a dark nucleus (nuclear
indicators, bright somata on a dark neuropil) give no nucleus seeds: each connected part of
the foreground then gets one seed and the size prior splits it, and the diameter estimate
follows whatever dark blobs there are: give ``cell_diameter_px`` for such recordings.

Nothing here reads labels. Output: one ``(H, W)`` uint32 label image (ids ``1..N``) and the
anchors (a point well inside each cell) for SAM2 prompts on the projection image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from calseg.segment.cells import CellMap, CellParams, cell_territories

ProjectionKind = Literal["mean", "max", "std"]
NUCLEUS_RADIUS_FRACTION = CellParams().nucleus_radius_fraction
"""Nucleus LoG scale / (cell radius / sqrt(2)), as assumed by :mod:`calseg.segment.cells`."""
MIN_CELL_DIAMETER_PX = 4.0


class ProjectionError(ValueError):
    """Bad input to the projection segmentation (wrong shape, unknown projection)."""


@dataclass
class ProjectionCells:
    """Cells found on a projection.

    ``labels``: ``(H, W)`` uint32, ids ``1..N`` (0 background); ``projection``: ``(H, W)``
    float32 smoothed projection ``P`` (input units); ``anchors``: ``(N, 2)`` int (row, col) of
    cell id ``i + 1``; ``cell_diameter_px``: the diameter used; ``estimated``: whether it was
    estimated from ``P``; ``cells``: the :class:`CellMap`.
    """

    labels: np.ndarray
    projection: np.ndarray
    anchors: np.ndarray
    cell_diameter_px: float
    estimated: bool
    kind: str
    cells: CellMap
    stats: dict = field(default_factory=dict)


def projection_image(frames: np.ndarray, kind: ProjectionKind = "mean") -> np.ndarray:
    """Temporal projection of a recording.

    Args:
        frames: ``(T, H, W)`` or ``(H, W)`` recording, any numeric dtype; NaN/Inf ignored
            (a pixel never finite becomes the median of the projection).
        kind: ``"mean"``, ``"max"`` or ``"std"`` over frames.

    Returns:
        ``(H, W)`` float32 (input units).

    Raises:
        ProjectionError: not 2-D/3-D, or an unknown ``kind``.
    """
    f = np.asarray(frames)
    if f.ndim == 2:
        f = f[None]
    if f.ndim != 3 or 0 in f.shape:
        raise ProjectionError(f"expected a (T, H, W) recording, got shape {np.shape(frames)}")
    if kind not in ("mean", "max", "std"):
        raise ProjectionError(f"unknown projection {kind!r}: use 'mean', 'max' or 'std'")
    # frame by frame (float64 accumulators): no float copy of the whole recording
    n = np.zeros(f.shape[1:], np.int64)
    s1 = np.zeros(f.shape[1:], np.float64)
    s2 = np.zeros(f.shape[1:], np.float64)
    mx = np.full(f.shape[1:], -np.inf)
    for t in range(f.shape[0]):
        x = np.asarray(f[t], np.float64)
        ok = np.isfinite(x)
        x = np.where(ok, x, 0.0)
        n += ok
        s1 += x
        if kind == "std":
            s2 += x * x
        if kind == "max":
            mx = np.where(ok, np.maximum(mx, x), mx)
    ok = n > 0
    nn = np.maximum(n, 1)
    if kind == "mean":
        p = s1 / nn
    elif kind == "max":
        p = mx
    else:
        mean = s1 / nn
        p = np.sqrt(np.maximum(s2 / nn - mean * mean, 0.0))
    if not ok.all():
        p = np.where(ok, p, float(np.median(p[ok])) if ok.any() else 0.0)
    return p.astype(np.float32)


def estimate_cell_diameter(image: np.ndarray, scales: np.ndarray | None = None) -> float:
    """Typical cell diameter (px) of a projection from the scale of its dark nuclei.

    See the module docstring (step 2). ``scales``: LoG scales tried (px; default 1 to 6 in
    0.5 px steps, i.e. cell diameters 6.7 to 40 px before clipping).

    Returns:
        diameter in px, clipped to ``[4, min(H, W) / 2]`` (at least 4).
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ProjectionError(f"expected an (H, W) image, got shape {img.shape}")
    lo, hi = np.percentile(img, [1, 99])
    img = (img - lo) / max(float(hi - lo), 1e-6)
    scales = np.arange(1.0, 6.01, 0.5) if scales is None else np.asarray(scales, float)
    resp = []
    for s in scales:
        b = s * s * ndi.gaussian_laplace(img, s)  # dark blobs positive
        peaks = b[(ndi.maximum_filter(b, size=int(2 * s) | 1) == b) & (b > 0)]
        if peaks.size == 0:
            resp.append(-np.inf)
            continue
        top = np.sort(peaks)[-max(3, peaks.size // 10) :]
        resp.append(float(top.mean()))
    s_best = float(scales[int(np.argmax(resp))])
    d = 2.0 * np.sqrt(2.0) * s_best / NUCLEUS_RADIUS_FRACTION
    upper = max(MIN_CELL_DIAMETER_PX, min(img.shape) / 2.0)
    return float(np.clip(d, MIN_CELL_DIAMETER_PX, upper))


def segment_projection(
    frames: np.ndarray,
    *,
    kind: ProjectionKind = "mean",
    cell_diameter_px: float | None = None,
    support_fraction: float = 0.3,
    smooth_sigma_px: float = 1.0,
    min_region_px: int = 4,
) -> ProjectionCells:
    """All cells visible on a temporal projection (module docstring).

    Args:
        frames: ``(T, H, W)`` recording (or one ``(H, W)`` image), input units.
        kind: projection (:func:`projection_image`).
        cell_diameter_px: typical cell diameter (px); ``None``: :func:`estimate_cell_diameter`.
        support_fraction: :attr:`CellParams.support_fraction` (fraction of the local maximum
            a pixel needs to belong to a cell).
        smooth_sigma_px: Gaussian smoothing of the projection (px, 0 = none).
        min_region_px: cells smaller than this are dropped.

    Returns:
        :class:`ProjectionCells` (``labels`` ``(H, W)`` uint32).

    Raises:
        ProjectionError: bad shape or projection name.
        calseg.segment.cells.CellParamsError: bad diameter or fraction.
    """
    p = projection_image(frames, kind)
    if smooth_sigma_px > 0:
        p = ndi.gaussian_filter(p, smooth_sigma_px).astype(np.float32)
    estimated = cell_diameter_px is None
    d = estimate_cell_diameter(p) if estimated else float(cell_diameter_px)
    ref = (p - np.percentile(p, 1)).astype(np.float32)
    # foreground as cells.py's support (fraction of the local maximum over 2 diameters), with
    # the dark nuclei filled in: they belong to their cell, and their centres are the seeds
    local_max = ndi.maximum_filter(ndi.gaussian_filter(ref, 1.0), size=int(2 * d) | 1)
    fg = ref / np.maximum(local_max, 1e-6) > support_fraction
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg))
    cmap = cell_territories(
        ref[None], fg[None], CellParams(cell_diameter_px=d, support_fraction=0.0)
    )
    labels = cmap.territories
    if labels.any():  # dark nuclei inside the support belong to their cell (ROIs include them)
        holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
        if holes.any():
            _, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
            labels = np.where(holes, labels[iy, ix], labels).astype(np.uint32)
            cmap.territories = labels
    if min_region_px > 1 and labels.any():
        from calseg.segment.cells import territory_anchors

        sizes = np.bincount(labels.ravel())
        small = sizes < min_region_px
        small[0] = False
        if small.any():
            labels = np.where(small[labels], 0, labels)
            ids = np.unique(labels)
            lut = np.zeros(int(labels.max()) + 1, np.uint32)
            lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1, dtype=np.uint32)
            labels = lut[labels]
            cmap.territories = labels
            cmap.anchors = territory_anchors(labels)
    stats = {
        "projection": kind,
        "cell_diameter_px": d,
        "cell_diameter_estimated": estimated,
        "n_cells": int(labels.max()),
        "coverage": float(np.count_nonzero(labels) / labels.size),
    }
    return ProjectionCells(labels, p, cmap.anchors, d, estimated, kind, cmap, stats)


def segment_cells_recording(
    frames: np.ndarray,
    config,  # noqa: ANN001 - calseg.segment.infer.InferenceConfig
    *,
    checkpoint=None,  # noqa: ANN001 - Path | None
    cache_dir=None,  # noqa: ANN001 - Path | None
    model=None,  # noqa: ANN001 - LoadedSAM2 | None
    warnings: list[str] | None = None,
):  # noqa: ANN201 - calseg.segment.infer.SegmentationResult
    """``target="cells"`` of :func:`calseg.segment.infer.segment_recording`.

    Baseline: :func:`segment_projection`'s label image. SAM2: the projection image
    (``config.projection``, unsmoothed, per-image normalisation) is embedded once and every
    cell found by :func:`segment_projection` is prompted by its anchor (positive) and the
    anchors of its ``n_negative_points`` nearest cells (negatives) -- the same automatic prompt
    rule as the active target, from the image, never from labels; masks are filtered and
    composed by :func:`calseg.segment.infer.assemble_frame`, with the largest allowed mask
    raised to 4 expected cell areas where ``max_mask_area_fraction`` of the field is smaller
    (small fields).

    Args:
        frames: ``(T, H, W)`` recording (checked, finite or not).
        config: :class:`calseg.segment.infer.InferenceConfig` with ``target="cells"``.
        checkpoint, cache_dir, model: as for ``segment_recording``.
        warnings: list to extend (reader / NaN warnings already collected).

    Returns:
        ``SegmentationResult`` whose ``labels`` is a ``(T, H, W)`` uint32 stack constant in
        time (the cells do not move; ``labels[0]`` is the single-frame label image) and whose
        ``activity`` holds the projection statistics.
    """
    import time

    from calseg.segment.embeddings import FrameGeometry, compute_normalisation
    from calseg.segment.infer import (
        SegmentationResult,
        assemble_frame,
        decode_frame_prompts,
        embed_recording,
    )
    from calseg.segment.prompts import FramePrompt

    t0 = time.perf_counter()
    warnings = list(warnings or [])
    frames = np.asarray(frames)
    pc = segment_projection(
        frames,
        kind=config.projection,
        cell_diameter_px=config.projection_cell_diameter_px,
        support_fraction=config.cell_support_fraction,
    )
    stats = dict(pc.stats)
    timings = {"projection_s": time.perf_counter() - t0}
    if pc.labels.max() == 0:
        warnings.append(f"no cell found on the {config.projection} projection")
    if config.method == "baseline" or pc.labels.max() == 0:
        labels = np.broadcast_to(pc.labels, frames.shape).copy()
        timings["total_s"] = time.perf_counter() - t0
        return SegmentationResult(labels, [], {}, None, warnings, stats, timings)

    from calseg.segment.model import load_sam2

    proj = projection_image(frames, config.projection)[None]
    norm = compute_normalisation(proj, config.low_percentile, config.high_percentile)
    loaded = model or load_sam2(
        config.model, checkpoint, image_size=config.image_size, device=config.device
    )
    if loaded.info.random_weights:
        warnings.append("SAM2 has RANDOM weights (no checkpoint): masks are not meaningful")
    geom = FrameGeometry(proj.shape[1], proj.shape[2], loaded.info.image_size)
    emb = embed_recording(loaded, proj, norm, geom, cache_dir=cache_dir, batch_size=1)
    anchors = np.asarray(pc.anchors)
    prompts = [
        FramePrompt(0, i + 1, int(anchors[i, 1]), int(anchors[i, 0]), 0.0)
        for i in range(len(anchors))
    ][: config.max_prompts_per_frame]
    if config.n_negative_points > 0 and len(anchors) > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(anchors)
        k = min(len(anchors), config.n_negative_points + 1)
        for q in prompts:
            _, nn = tree.query([q.y, q.x], k=k)
            q.negatives = [
                (int(anchors[j, 1]), int(anchors[j, 0]))
                for j in np.atleast_1d(nn)
                if j + 1 != q.seed_id
            ][: config.n_negative_points]
    h, w = proj.shape[1:]
    cell_area = np.pi * (pc.cell_diameter_px / 2) ** 2
    frac = max(config.max_mask_area_fraction, min(1.0, 4 * cell_area / (h * w)))
    cfg = config.model_copy(update={"max_mask_area_fraction": frac})
    logits, scores, objs = decode_frame_prompts(loaded, emb, 0, geom, prompts, cfg)
    lab, records = assemble_frame(logits, scores, objs, prompts, cfg)
    labels = np.broadcast_to(lab, frames.shape).copy()
    stats["n_masks_kept"] = int(sum(r["kept"] for r in records))
    timings["total_s"] = time.perf_counter() - t0
    return SegmentationResult(
        labels, records, norm, loaded.info.to_dict(), warnings, stats, timings
    )
