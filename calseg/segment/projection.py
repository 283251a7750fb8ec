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
2. **Cell size** (:func:`projection_cell_diameter`) unless given: the one estimator of CalSeg,
   :func:`calseg.analysis.cellsize.estimate_cell_diameter` (scale-space energy of the
   recording's resting image and the spatial covariance of its changes; within 20 % on 26 of
   the 32 videos of the accuracy suite's tuning set and 26 of its 32 held-out videos),
   clipped to ``[4, min(H, W) / 2]`` px (a field smaller than two cells cannot show their
   scale); the 11 px prior where it finds no scale.
3. **Cells**: foreground = pixels of ``P`` minus its 1st percentile (the dark level) above
   ``support_fraction`` of the local maximum over two diameters (as the support of
   :mod:`calseg.segment.cells`), opened, with its holes (the dark nuclei) filled; then
   :func:`calseg.segment.cells.cell_territories` on it: one seed per dark nucleus surrounded
   by brighter cytoplasm, geodesic Voronoi territories with the cell-size prior. One home for
   cell ROIs: the same code separates active cells in the ``active`` target. A seed is kept
   only with evidence of a cell above the noise of the projection itself (half the difference
   of the even- and odd-frame projections, or for a single image a noise SD estimated from
   the image, :func:`projection_noise`); on a recording or an image of noise alone no cell is
   found (issue 17 item 2).

Limits, measured (``tests/test_segment_projection.py``, BENCHMARKS.md): on synthetic packed
cells with dark nuclei, all equally bright, the estimator finds no cell-scale structure (the
11 px prior is used) and, given their diameter, 0.91 of the cells are found at IoU >= 0.5; on
sima_example the estimate is 8.0 px against hand-drawn ROIs of 16-21 px, which then match
nothing (given 20 px, one of the two ROIs is matched at IoU >= 0.3, which is chance level:
cell-sized grid tiles match as many, :func:`calseg.pipelines.real_eval.grid_control`). Cells
without a dark nucleus (nuclear indicators, bright somata on a dark neuropil) give no nucleus
seeds: each connected part of the foreground then gets one seed and the size prior splits it.
The diameter estimate follows the cell-scale brightness structure of the resting image,
whatever made it: give ``cell_diameter_px`` where the cell size is known.

Nothing here reads labels. Output: one ``(H, W)`` uint32 label image (ids ``1..N``) and the
anchors (a point well inside each cell) for SAM2 prompts on the projection image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from calseg.analysis.metrics import MAD_TO_SIGMA
from calseg.analysis.scale import unit_exponent
from calseg.segment.cells import CellMap, CellParams, cell_territories

ProjectionKind = Literal["mean", "max", "std"]


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


def projection_noise(
    frames: np.ndarray, kind: ProjectionKind = "mean", smooth_sigma_px: float = 1.0
) -> np.ndarray | None:
    """The projection's noise alone: half the difference of the projections of the even and
    the odd frames, smoothed like the projection (``(H, W)`` float32, input units).

    For the mean projection ``P = (P_even + P_odd) / 2`` of independent frames, ``(P_even -
    P_odd) / 2`` has exactly the noise of ``P`` and none of its static structure (cells,
    background, illumination); slow changes (bleaching, drift) cancel between interleaved
    halves. For ``max`` and ``std`` it is an approximation. Activity that differs between even
    and odd frames adds to it, which only makes the evidence test stricter.

    One image (a ``(H, W)`` array or a single frame) has no second half: its noise SD is
    estimated from the image itself, ``1.4826 MAD(Laplacian) / sqrt(20)`` (the 4-neighbour
    Laplacian of white noise of SD ``s`` has SD ``sqrt(20) s``; the MAD ignores most of the
    cells' structure, and what remains only raises the estimate, a stricter test), and the
    null is a fixed-seed Gaussian field of that SD. Before, a single image had no null and
    every part of its foreground became cells (a noise image of 100 x 100 px: 106 "cells").
    A recording whose even and odd frames give the same projection (one image repeated, or
    each frame stored twice) is treated as that one image.

    Returns:
        the noise image, or ``None`` for an empty or non-numeric input.
    """
    f = np.asarray(frames)
    if f.ndim == 2:
        f = f[None]
    if f.ndim != 3 or f.shape[0] < 1 or min(f.shape[1:]) < 3:
        return None
    d = None
    if f.shape[0] > 1:
        d = (projection_image(f[0::2], kind) - projection_image(f[1::2], kind)) / 2.0
        if not np.any(np.nan_to_num(d)):
            # the even and odd frames are the same images (one image repeated, or every frame
            # stored twice): no temporal noise to measure, so the recording is one image
            # (a new-user check: a noise image repeated 20 times gave 34 "cells" on 90 % of
            # the field, while the same image once gave none)
            d = None
    if d is None:
        img = np.nan_to_num(np.asarray(f[0] if f.shape[0] == 1 else projection_image(f, kind),
                                       dtype=np.float64))  # fmt: skip
        lap = 4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
        sd = MAD_TO_SIGMA * float(np.median(np.abs(lap - np.median(lap)))) / np.sqrt(20.0)
        d = np.random.default_rng(0).normal(0.0, sd, img.shape)
    if smooth_sigma_px > 0:
        d = ndi.gaussian_filter(d, smooth_sigma_px)
    return d.astype(np.float32)


def projection_cell_diameter(frames: np.ndarray, frame_interval_s: float | None = None) -> float:
    """The cell diameter (px) the ``cells`` target uses when none is given:
    :func:`calseg.analysis.cellsize.cell_diameter_or_prior` with the cell-size prior of
    :class:`CellParams` (11 px): the recording's estimate (``frame_interval_s``: s per frame,
    ``None`` when not known), clipped to ``[4, min(H, W) / 2]``."""
    from calseg.analysis.cellsize import cell_diameter_or_prior

    prior = CellParams().cell_diameter_px
    return cell_diameter_or_prior(frames, prior, frame_interval_s=frame_interval_s)[0]


def segment_projection(
    frames: np.ndarray,
    *,
    kind: ProjectionKind = "mean",
    cell_diameter_px: float | None = None,
    support_fraction: float = 0.3,
    smooth_sigma_px: float = 1.0,
    min_region_px: int = 4,
    noise_evidence: bool = True,
    estimated_diameter: tuple[float, bool] | None = None,
    frame_interval_s: float | None = None,
) -> ProjectionCells:
    """All cells visible on a temporal projection (module docstring).

    Args:
        frames: ``(T, H, W)`` recording (or one ``(H, W)`` image), input units.
        kind: projection (:func:`projection_image`).
        cell_diameter_px: typical cell diameter (px); ``None``: :func:`projection_cell_diameter`.
        support_fraction: :attr:`CellParams.support_fraction` (fraction of the local maximum
            a pixel needs to belong to a cell).
        smooth_sigma_px: Gaussian smoothing of the projection (px, 0 = none).
        min_region_px: cells smaller than this are dropped.
        noise_evidence: label a region only with evidence of a cell above the recording's
            own noise (default): :func:`projection_noise` is the ``null`` of
            :func:`calseg.segment.cells.cell_territories` (a nucleus, or a bright soma,
            standing out of the noise at Bonferroni level over the field's pixels, so that a
            recording of noise alone gives about 0.05 false cells; issue 17 item 2,
            ``tests/test_noise_only.py``, ``python scripts/noise_only_study.py``). ``False``:
            every part of the foreground becomes cells (the behaviour before).
        estimated_diameter: ``(diameter px, estimated)`` that
            :func:`calseg.analysis.cellsize.cell_diameter_or_prior` already returned for these
            ``frames`` with the 11 px prior (e.g. the activity map's, so a recording's cell size
            is estimated once, not twice); used only when ``cell_diameter_px`` is ``None``.
        frame_interval_s: s per frame (``None``: not known), for the cell-size estimate.

    Returns:
        :class:`ProjectionCells` (``labels`` ``(H, W)`` uint32).

    Raises:
        ProjectionError: bad shape or projection name.
        calseg.segment.cells.CellParamsError: bad diameter or fraction.
    """
    p = projection_image(frames, kind)
    if smooth_sigma_px > 0:
        p = ndi.gaussian_filter(p, smooth_sigma_px).astype(np.float32)
    if cell_diameter_px is None:
        if estimated_diameter is None:
            from calseg.analysis.cellsize import cell_diameter_or_prior

            estimated_diameter = cell_diameter_or_prior(
                frames, CellParams().cell_diameter_px, frame_interval_s=frame_interval_s
            )
        d, estimated = float(estimated_diameter[0]), bool(estimated_diameter[1])
        source = "estimated" if estimated else "prior"
    else:
        d, estimated, source = float(cell_diameter_px), False, "given"
    k = unit_exponent(p)  # any float scale as camera counts (exact), as compute_activity does
    ref = np.ldexp((p - np.percentile(p, 1)).astype(np.float32), k)
    # foreground as cells.py's support (fraction of the local maximum over 2 diameters), with
    # the dark nuclei filled in: they belong to their cell, and their centres are the seeds
    local_max = ndi.maximum_filter(ndi.gaussian_filter(ref, 1.0), size=int(2 * d) | 1)
    fg = ref / np.maximum(local_max, 1e-6) > support_fraction
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg))
    null = projection_noise(frames, kind, smooth_sigma_px) if noise_evidence else None
    if null is not None and k:
        null = np.ldexp(np.asarray(null, np.float32), k)
    cmap = cell_territories(
        ref[None], fg[None], CellParams(cell_diameter_px=d, support_fraction=0.0), null=null
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
        "cell_diameter_source": source,
        "n_cells": int(labels.max()),
        "coverage": float(np.count_nonzero(labels) / labels.size),
        "support_px": int(cmap.stats.get("support_px", 0)),
        "n_seeds": int(cmap.stats.get("n_seeds", 0)),
        "n_seeds_rejected_by_noise": int(cmap.stats.get("n_seeds_rejected_by_noise", 0)),
    }
    return ProjectionCells(labels, p, cmap.anchors, d, estimated, kind, cmap, stats)


def segment_cells_recording(
    frames: np.ndarray,
    config,  # noqa: ANN001 - calseg.segment.infer.InferenceConfig
    *,
    checkpoint=None,  # noqa: ANN001 - Path | None
    base_checkpoint=None,  # noqa: ANN001 - Path | None
    cache_dir=None,  # noqa: ANN001 - Path | None
    model=None,  # noqa: ANN001 - LoadedSAM2 | None
    warnings: list[str] | None = None,
    estimated_diameter: tuple[float, bool] | None = None,
    frame_interval_s: float | None = None,
):  # noqa: ANN201 - calseg.segment.infer.SegmentationResult
    """``target="cells"`` of :func:`calseg.segment.infer.segment_recording`.

    Classical: :func:`segment_projection`'s label image. SAM2: the projection image
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
        checkpoint, base_checkpoint, cache_dir, model: as for ``segment_recording``.
        warnings: list to extend (reader / NaN warnings already collected).
        estimated_diameter: as for :func:`segment_projection` (an estimate already made).
        frame_interval_s: s per frame (``None``: not known), for the cell-size estimate.

    Returns:
        ``SegmentationResult`` whose ``labels`` is a ``(T, H, W)`` uint32 stack constant in
        time (the cells do not move; ``labels[0]`` is the single-frame label image) and whose
        ``activity`` holds the projection statistics.
    """
    import time

    from calseg.segment.decode import (
        SegmentationResult,
        assemble_frame,
        decode_frame_prompts,
        embed_recording,
    )
    from calseg.segment.embeddings import FrameGeometry, compute_normalisation
    from calseg.segment.prompts import FramePrompt

    t0 = time.perf_counter()
    warnings = list(warnings or [])
    frames = np.asarray(frames)
    pc = segment_projection(
        frames,
        kind=config.projection,
        cell_diameter_px=config.cell_diameter_px,
        support_fraction=config.cell_support_fraction,
        estimated_diameter=estimated_diameter,
        frame_interval_s=frame_interval_s,
    )
    stats = dict(pc.stats)
    timings = {"projection_s": time.perf_counter() - t0}
    if pc.labels.max() == 0:
        warnings.append(f"no cell found on the {config.projection} projection")
    if config.method == "classical" or pc.labels.max() == 0:
        labels = np.broadcast_to(pc.labels, frames.shape).copy()
        timings["total_s"] = time.perf_counter() - t0
        return SegmentationResult(labels, [], {}, None, warnings, stats, timings)

    from calseg.segment.model import load_sam2

    proj = projection_image(frames, config.projection)[None]
    norm = compute_normalisation(proj, config.low_percentile, config.high_percentile)
    loaded = model or load_sam2(
        config.model,
        checkpoint,
        image_size=config.image_size,
        device=config.device,
        base_checkpoint=base_checkpoint,
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
    logits, scores, objs = decode_frame_prompts(loaded, emb, 0, geom, prompts, cfg, as_crops=True)
    lab, records = assemble_frame(logits, scores, objs, prompts, cfg, shape=(h, w))
    labels = np.broadcast_to(lab, frames.shape).copy()
    stats["n_masks_kept"] = int(sum(r["kept"] for r in records))
    timings["total_s"] = time.perf_counter() - t0
    return SegmentationResult(
        labels, records, norm, loaded.info.to_dict(), warnings, stats, timings
    )
