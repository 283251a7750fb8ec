"""Evaluation on real recordings with partial labels (a few hand-drawn ImageJ ROIs).

Real recordings here come with outlines of only some of their cells (sima: 2 ROIs; fissa: 2),
drawn on the whole recording, with no frame-by-frame activity. What can be measured:

* **Recall of the labelled cells.** A predicted ``(T, H, W)`` label stack (ids stable across
  frames) is turned into one footprint per predicted id: the pixels that id covers in at least
  half of the frames where it appears at all (:func:`prediction_footprints`; a cell that
  is segmented in a few frames keeps its typical shape, not the union of every frame's
  mask). Labelled ROIs are matched one-to-one to footprints (Hungarian, on IoU); a labelled
  cell counts as found at ``IoU >= 0.5`` and at ``IoU >= 0.3`` (the looser threshold for
  hand-drawn outlines of small cells, whose boundary alone is a large part of their area).
  A second, per-frame figure ``recall_any_frame_*``: a labelled cell is found when, in any
  frame, a predicted instance overlaps it at that IoU (the "frames where it is active").
* **Detections per frame**: mean number of predicted instances per frame, and the mean
  fraction of the field they cover.

Precision cannot be measured: an unmatched prediction may be an unlabelled cell. So that a
model cannot look good by marking everything: (1) IoU punishes over-large masks (a mask of
the whole 128 x 256 field has IoU = ROI area / field area ~ 0.003 with a 100 px ROI: recall 0
at 0.3 and 0.5, tested); (2) the report always shows detections per frame and covered
fraction next to recall; (3) ``plausible`` is False when the predictions cover more than
:data:`MAX_PLAUSIBLE_COVERAGE` of the field on average or there are more detections per frame
than :data:`MAX_PLAUSIBLE_DETECTIONS_PER_100X100` per 100 x 100 px, and the report marks such
rows.

All cells on a projection (``InferenceConfig(target="cells")``): :func:`score_projection`
scores the single label image the same way (coverage bound
:data:`MAX_PLAUSIBLE_COVERAGE_CELLS`, since packed tissue fills the field), and
:func:`grid_control` gives the chance level it must beat: square tiles of one cell's area,
which use nothing of the image, match many of a handful of ROIs at IoU 0.3.
:func:`roi_activity` says, per ROI, why the activity target did or did not fire.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from calseg.analysis.metrics import (
    MAD_TO_SIGMA,
    MetricsInputError,
    instance_iou_matrix,
    matching_cost,
)

MAX_PLAUSIBLE_COVERAGE = 0.5
"""Mean fraction of the field covered by predictions above which a result is implausible
(active cells of a calcium recording rarely cover half the field in most frames)."""
MAX_PLAUSIBLE_DETECTIONS_PER_100X100 = 200.0
"""More detections per frame per 10^4 px than this (a cell under ~50 px) is implausible."""
IOU_THRESHOLDS = (0.5, 0.3)


@dataclass
class PartialLabelScores:
    """Scores of one prediction against partial labels (module docstring).

    ``n_labelled``: labelled ROIs; ``recall_50`` / ``recall_30``: fraction of them matched
    (footprints, one-to-one) at IoU >= 0.5 / 0.3; ``recall_any_frame_50`` / ``_30``: found
    in any frame; ``best_iou``: per labelled ROI, the best footprint IoU; ``detections_per_frame``;
    ``coverage``: mean covered fraction of the field; ``plausible``.
    """

    n_labelled: int
    recall_50: float
    recall_30: float
    recall_any_frame_50: float
    recall_any_frame_30: float
    best_iou: list[float]
    detections_per_frame: float
    coverage: float
    n_frames: int
    plausible: bool

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)


def prediction_footprints(pred: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """One ``(H, W)`` uint32 label image of the footprints of a ``(T, H, W)`` label stack.

    Pixel p belongs to id i when i covers p in at least ``min_fraction`` of the frames where
    i appears; where footprints overlap the id covering p in more frames wins (the smaller id
    on a tie). Vectorised over the stack's labelled pixels (one sort of (id, pixel) and (id,
    frame) codes), so the cost does not grow with the number of ids times the stack size.

    Raises:
        MetricsInputError: not a 3-D integer stack.
    """
    pred = np.asarray(pred)
    if pred.ndim != 3 or not np.issubdtype(pred.dtype, np.integer):
        raise MetricsInputError(f"expected a (T, H, W) integer label stack, got {pred.shape}")
    t, h, w = pred.shape
    n_pix = h * w
    out = np.zeros(n_pix, np.uint32)
    flat = pred.reshape(t, n_pix)
    tt, pp = np.nonzero(flat)
    if len(tt) == 0:
        return out.reshape(h, w)
    ids = flat[tt, pp].astype(np.int64)
    # frames in which each id appears at all
    id_frame = np.unique(ids * t + tt)
    uid, present = np.unique(id_frame // t, return_counts=True)
    # frames in which each id covers each pixel
    codes, count = np.unique(ids * n_pix + pp, return_counts=True)
    cid, cpix = np.divmod(codes, n_pix)
    need = np.maximum(1.0, min_fraction * present[np.searchsorted(uid, cid)])
    keep = count >= need
    cid, cpix, count = cid[keep], cpix[keep], count[keep]
    # per pixel the id with the most frames, the smaller id on a tie
    order = np.lexsort((cid, -count, cpix))
    cpix, cid = cpix[order], cid[order]
    first = np.ones(len(cpix), bool)
    first[1:] = cpix[1:] != cpix[:-1]
    out[cpix[first]] = cid[first].astype(np.uint32)
    return out.reshape(h, w)


def _one_to_one_recall(iou: np.ndarray, thr: float) -> int:
    if iou.size == 0:
        return 0
    r, c = linear_sum_assignment(matching_cost(iou, thr))  # most pairs >= thr, then IoU
    return int(np.count_nonzero(iou[r, c] >= thr))


def score_partial_labels(pred: np.ndarray, rois: np.ndarray) -> PartialLabelScores:
    """Score a predicted label stack against a partial ROI label image.

    Args:
        pred: ``(T, H, W)`` integer label stack (0 = background, ids stable over frames).
        rois: ``(H, W)`` integer label image of the labelled cells (e.g. from
            :func:`calseg.io.rois.read_imagej_rois`), at least one ROI.

    Returns:
        :class:`PartialLabelScores`.

    Raises:
        MetricsInputError: shapes differ, wrong dimensions or dtypes, or no ROI.
    """
    pred = np.asarray(pred)
    rois = np.asarray(rois)
    if pred.ndim != 3 or rois.ndim != 2 or pred.shape[1:] != rois.shape:
        raise MetricsInputError(
            f"prediction {pred.shape} must be (T, H, W) with (H, W) = ROI image {rois.shape}"
        )
    n_lab = len(np.unique(rois[rois != 0]))
    if n_lab == 0:
        raise MetricsInputError("the ROI label image holds no ROI")
    t, h, w = pred.shape
    fps = prediction_footprints(pred)
    iou_fp, _, _ = instance_iou_matrix(fps, rois)  # (n_pred, n_gt)
    best = iou_fp.max(axis=0) if iou_fp.shape[0] else np.zeros(n_lab)
    rec = {thr: _one_to_one_recall(iou_fp, thr) / n_lab for thr in IOU_THRESHOLDS}
    any_best = np.zeros(n_lab)
    n_det = 0
    covered = 0
    for f in range(t):
        iou_f, pids, _ = instance_iou_matrix(pred[f], rois)
        n_det += len(pids)
        covered += int(np.count_nonzero(pred[f]))
        if iou_f.shape[0]:
            any_best = np.maximum(any_best, iou_f.max(axis=0))
    det = n_det / t
    cov = covered / (t * h * w)
    plausible = cov <= MAX_PLAUSIBLE_COVERAGE and det <= (
        MAX_PLAUSIBLE_DETECTIONS_PER_100X100 * h * w / 1e4
    )
    return PartialLabelScores(
        n_labelled=n_lab,
        recall_50=rec[0.5],
        recall_30=rec[0.3],
        recall_any_frame_50=float(np.mean(any_best >= 0.5)),
        recall_any_frame_30=float(np.mean(any_best >= 0.3)),
        best_iou=[float(v) for v in best],
        detections_per_frame=float(det),
        coverage=float(cov),
        n_frames=t,
        plausible=bool(plausible),
    )


MAX_PLAUSIBLE_COVERAGE_CELLS = 0.95
"""For ``target="cells"`` (all cells on a projection) densely packed tissue legitimately
covers most of the field; only a mask of (nearly) the whole field is implausible."""


def score_projection(labels: np.ndarray, rois: np.ndarray) -> PartialLabelScores:
    """Score an all-cells label image (``target="cells"``, one projection) against ROIs.

    As :func:`score_partial_labels` on the single frame (footprint = the label image itself),
    with the coverage bound :data:`MAX_PLAUSIBLE_COVERAGE_CELLS` instead of the active-cell one.
    Compare with :func:`grid_control`: with a handful of ROIs a cell-sized tiling that knows
    nothing of the image already matches many of them at IoU 0.3.

    Args:
        labels: ``(H, W)`` label image, or a ``(T, H, W)`` stack constant in time (frame 0 used).
        rois: ``(H, W)`` ROI label image.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3:
        labels = labels[0]
    sc = score_partial_labels(labels[None], rois)
    h, w = labels.shape
    sc.plausible = bool(
        sc.coverage <= MAX_PLAUSIBLE_COVERAGE_CELLS
        and sc.detections_per_frame <= MAX_PLAUSIBLE_DETECTIONS_PER_100X100 * h * w / 1e4
    )
    return sc


def grid_control(rois: np.ndarray, cell_diameter_px: float, n_offsets: int = 4) -> dict:
    """Chance level of the projection recall: a square grid of tiles with the area of a cell of
    diameter ``cell_diameter_px`` (side ``d sqrt(pi) / 2``), which uses nothing of the image,
    scored like a segmentation; mean over ``n_offsets`` x ``n_offsets`` grid offsets.

    Returns:
        ``{"recall_50", "recall_30", "best_iou_max", "side_px"}`` (means over offsets, and the
        best single IoU seen).
    """
    rois = np.asarray(rois)
    h, w = rois.shape
    side = float(cell_diameter_px) * np.sqrt(np.pi) / 2
    yy, xx = np.mgrid[:h, :w]
    r50, r30, best = [], [], 0.0
    for oy in np.linspace(0, side, n_offsets, endpoint=False):
        for ox in np.linspace(0, side, n_offsets, endpoint=False):
            g = ((yy + oy) // side).astype(np.int64) * (w + 2) + ((xx + ox) // side) + 1
            sc = score_partial_labels(g.astype(np.uint32)[None], rois)
            r50.append(sc.recall_50)
            r30.append(sc.recall_30)
            best = max(best, max(sc.best_iou))
    return {
        "recall_50": float(np.mean(r50)),
        "recall_30": float(np.mean(r30)),
        "best_iou_max": float(best),
        "side_px": side,
    }


def roi_activity(frames: np.ndarray, rois: np.ndarray, params=None) -> list[dict]:  # noqa: ANN001
    """Why the activity target does (not) find a labelled cell: per ROI, its mean trace and
    what the per-pixel activity rule of :func:`calseg.segment.prompts.compute_activity` sees.

    Per ROI id (ascending): ``area_px``; ``f0``: 20th percentile of the ROI-mean trace
    (input units); ``peak_dff``: max of (trace - f0) / f0; ``trace_z``: max of
    (trace - f0) / sigma, sigma = 1.4826 median |first difference| / sqrt(2) (the noise rule of
    :func:`calseg.segment.prompts.noise_model`, on the ROI mean); ``pixel_z_max`` and
    ``pixel_z_median_of_max``: per-pixel z of ``compute_activity`` (max over the ROI, and the
    median over its pixels of each pixel's max over time); ``frac_px_above``: fraction of the
    ROI's pixels with z above the threshold in some frame; ``frac_px_active``: the same after
    the minimum-region rule (what the cell ROIs are built from); plus, for the recording,
    ``noise_sigma_median`` and ``median_f``.

    Args:
        frames: ``(T, H, W)`` recording; rois: ``(H, W)`` ROI label image;
        params: :class:`calseg.segment.prompts.ActivityParams` (default: the defaults).
    """
    from calseg.segment.prompts import compute_activity

    f = np.asarray(frames, dtype=np.float32)
    rois = np.asarray(rois)
    act = compute_activity(f, params)
    thr = act.threshold
    zmax = act.z.max(axis=0)
    above = (act.z > thr).any(axis=0)
    active = act.active.any(axis=0)
    out = []
    for i in [int(v) for v in np.unique(rois) if v]:
        m = rois == i
        tr = f[:, m].mean(axis=1)
        f0 = float(np.percentile(tr, 20))
        sd = (
            MAD_TO_SIGMA * float(np.median(np.abs(np.diff(tr)))) / np.sqrt(2)
            if len(tr) > 1
            else 0.0
        )
        out.append(
            {
                "roi": i,
                "area_px": int(m.sum()),
                "f0": f0,
                "peak_dff": float((tr.max() - f0) / f0) if f0 > 0 else float("nan"),
                "trace_z": float((tr.max() - f0) / sd) if sd > 0 else float("nan"),
                "pixel_z_max": float(zmax[m].max()),
                "pixel_z_median_of_max": float(np.median(zmax[m])),
                "frac_px_above": float(above[m].mean()),
                "frac_px_active": float(active[m].mean()),
                "threshold_z": float(thr),
                "noise_sigma_median": float(act.stats["noise_sigma_median"]),
                "median_f": float(np.median(f)),
                "n_frames": int(f.shape[0]),
            }
        )
    return out


def oracle_point_iou(
    loaded,  # noqa: ANN001 - calseg.segment.model.LoadedSAM2
    frames: np.ndarray,
    rois: np.ndarray,
    cache_dir=None,  # noqa: ANN001 - Path | None
) -> list[float]:
    """Diagnostic, NOT an inference result: SAM2's mask for one positive point at the deepest
    pixel of each labelled ROI, on the temporal mean projection of the recording, and its IoU
    with the ROI. The prompt comes from the label, so this measures only how well the
    decoder outlines a cell it is pointed at in real images (mask quality across the domain
    gap), independent of detection (the activity prompts). Per-recording normalisation as in
    inference; the mask output is chosen as :func:`calseg.segment.infer.decode_frame_prompts`
    does (single-mask for decoders trained that way, else the best of three by the IoU head).

    Args:
        loaded: a loaded SAM2 (base or fine-tuned).
        frames: ``(T, H, W)`` recording.
        rois: ``(H, W)`` label image of the labelled cells.
        cache_dir: embedding cache (optional).

    Returns:
        one IoU per ROI id (ascending ids).
    """
    from scipy import ndimage as ndi

    from calseg.segment.embeddings import FrameGeometry, compute_normalisation
    from calseg.segment.infer import InferenceConfig, decode_frame_prompts, embed_recording
    from calseg.segment.prompts import FramePrompt

    frames = np.asarray(frames)
    proj = frames.astype(np.float32).mean(axis=0)[None]
    geom = FrameGeometry(proj.shape[1], proj.shape[2], loaded.info.image_size)
    emb = embed_recording(loaded, proj, compute_normalisation(proj), geom, cache_dir=cache_dir)
    ids = [int(i) for i in np.unique(rois) if i]
    prompts = []
    for i in ids:
        dist = ndi.distance_transform_edt(rois == i)
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        prompts.append(FramePrompt(frame=0, seed_id=i, x=int(c), y=int(r), z=float("nan")))
    logits, _, _ = decode_frame_prompts(loaded, emb, 0, geom, prompts, InferenceConfig())
    masks = logits > 0
    out = []
    for k, i in enumerate(ids):
        g = rois == i
        union = np.count_nonzero(masks[k] | g)
        out.append(float(np.count_nonzero(masks[k] & g) / union) if union else 0.0)
    return out
