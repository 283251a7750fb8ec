"""Segmentation metrics for label images and label stacks (plain numpy).

Conventions (shared with :mod:`calseg.segment.evaluate`):

* A *label image* is an ``(H, W)`` integer array, 0 = background, one id per cell (ROI).
  A *label stack* is ``(T, H, W)``; ids are stable across frames.
* Foreground metrics treat every non-zero pixel as "active cell" (semantic).
  IoU = |P & G| / |P | G|, Dice = 2 |P & G| / (|P| + |G|) (Dice 1945; Jaccard 1912).
  When prediction and ground truth are both empty, IoU = Dice = 1.0 (perfect agreement:
  nothing to find, nothing found).
* Instance metrics match predicted to ground-truth ROIs one-to-one with the Hungarian
  algorithm (``scipy.optimize.linear_sum_assignment``) so that the *number* of pairs with
  IoU >= ``iou_threshold`` is maximal and, among such matchings, their summed IoU (the rule of
  cellpose's ``metrics._true_positive``, Stringer et al. 2021: cost
  ``-(IoU >= thr) - IoU / (2 n_min)``, ``n_min`` = the smaller ROI count, so one more pair
  above the threshold always outweighs any IoU gain). Maximising the summed IoU alone can
  undercount: at a threshold of 0.3 it may prefer two pairs of IoU 0.45 and 0.2 over two of
  0.35 and 0.32. A pair counts as a true positive when its IoU >= ``iou_threshold``.
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN),
  ap = TP / (TP + FP + FN). "AP50" in CalSeg's tables is this ``ap`` at IoU >= 0.5: the
  "average precision" of cellpose (Stringer et al. 2021) and StarDist (Schmidt et al. 2018)
  at one IoU threshold, *not* COCO's AP (area under a precision-recall curve from ranked
  detection scores, averaged over IoU 0.50-0.95). With no predicted and no ground-truth
  ROI every one of these is 1.0; a ratio with a zero denominator otherwise is 0.0.
  ``mean_matched_iou`` is the mean IoU over true-positive pairs, ``None`` when there are none.
* Error kinds (:data:`ERROR_KINDS`; the merge/split taxonomy of Caicedo et al. 2019,
  "Evaluation of deep learning strategies for nucleus segmentation in fluorescence images",
  Cytometry A 95:952): after the matching, an unmatched ROI *touches* another when their IoU
  is at least :data:`TOUCH_IOU`. An unmatched predicted ROI (a false positive) is
  ``fp_false`` when it touches no ground-truth ROI (found where no cell is), ``fp_merge`` when
  it touches two or more (it spans cells), else ``fp_partial`` (one cell, IoU below the
  threshold: too small, too large or off-centre). An unmatched ground-truth ROI (a false
  negative) is ``fn_missed`` when no predicted ROI touches it, ``fn_split`` when two or more
  do (the cell is cut into pieces), else ``fn_partial``. So ``fp = fp_false + fp_merge +
  fp_partial`` and ``fn = fn_missed + fn_split + fn_partial``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

MAD_TO_SIGMA = 1.4826
"""Gaussian consistency constant of the median absolute deviation: sigma = 1.4826 MAD
(1 / Phi^-1(3/4); Rousseeuw & Croux 1993). CalSeg's one home for it (noise of traces, frames,
projections and camera fits)."""


def diff_noise_sd(absdiff: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Noise SD from absolute consecutive-frame differences ``|x[t+1] - x[t]|`` (any shape):
    ``1.4826 median|d| / sqrt(2)`` along ``axis`` (``None``: pooled), and where that median is
    0 (whole-number data with few counts repeat between frames, so half or more of the
    differences are exactly 0 although the data are noisy) ``mean|d| sqrt(pi) / 2`` instead
    (E|d| = sigma_d sqrt(2/pi) for Gaussian d, and sigma_d = sigma sqrt(2)). Both are
    independent of the recording's offset; the median is robust to activity, the mean sees
    discrete noise. CalSeg's one home for this estimator (per-pixel noise of the activity map,
    pooled noise of the offset note).

    Returns:
        An array of ``absdiff``'s shape without ``axis`` (same float dtype), or a float for
        ``axis=None``.
    """
    sd = MAD_TO_SIGMA * np.median(absdiff, axis=axis) / np.sqrt(2.0)
    zero = sd == 0
    if np.any(zero):
        sd = np.where(zero, (np.sqrt(np.pi) / 2.0) * np.mean(absdiff, axis=axis), sd)
    return float(sd) if axis is None else sd.astype(np.result_type(absdiff.dtype, np.float32))


__all__ = [
    "MAD_TO_SIGMA",
    "ERROR_KINDS",
    "TOUCH_IOU",
    "error_kinds",
    "diff_noise_sd",
    "MetricsInputError",
    "matching_cost",
    "foreground_scores",
    "foreground_scores_stack",
    "instance_iou_matrix",
    "match_instances",
    "match_instances_stack",
    "bootstrap_ci",
    "stratified_bootstrap_ci",
]


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95 % CI of the mean of ``values`` (1-D float; Efron & Tibshirani
    1993): ``n_boot`` resamples with replacement, seeded by ``seed``. ``[low, high]``, or
    None with fewer than 3 values (too few to resample meaningfully). The one-group case of
    :func:`stratified_bootstrap_ci` (the same random draws, so the same interval)."""
    return stratified_bootstrap_ci([values], n_boot, seed)


def stratified_bootstrap_ci(
    groups: list[np.ndarray], n_boot: int = 2000, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap 95 % CI of the MEAN OF GROUP MEANS (e.g. the mean over videos of
    each video's mean per-prompt IoU gain): every resample draws each group's values with
    replacement within the group, so the statistic keeps the groups' weights. ``groups``: 1-D
    float arrays; empty ones are left out. ``[low, high]``, or None when fewer than 3 values
    are left in all."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if sum(len(g) for g in groups) < 3:
        return None
    rng = np.random.default_rng(seed)
    means = np.mean(
        [g[rng.integers(0, len(g), (n_boot, len(g)))].mean(axis=1) for g in groups], axis=0
    )
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


class MetricsInputError(ValueError):
    """Raised when prediction and ground truth cannot be compared (shape or dtype mismatch)."""


def _check_pair(pred: np.ndarray, gt: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise MetricsInputError(
            f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; "
            "map the prediction back to the recording's frame size first"
        )
    if pred.ndim != ndim:
        raise MetricsInputError(f"expected {ndim}-D arrays, got shape {pred.shape}")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
            raise MetricsInputError(
                f"{name} must be a boolean mask or an integer label image, got dtype {a.dtype}"
            )
    return pred, gt


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


def _foreground_from_counts(tp: int, fp: int, fn: int, n_pixels: int) -> dict:
    union = tp + fp + fn
    both_empty = union == 0
    return {
        "iou": _ratio(tp, union, 1.0),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "pixel_accuracy": _ratio(n_pixels - fp - fn, n_pixels, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0 if both_empty else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if both_empty else 0.0),
        "tp_pixels": int(tp),
        "fp_pixels": int(fp),
        "fn_pixels": int(fn),
        "n_pixels": int(n_pixels),
    }


def foreground_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Foreground (active-cell vs background) agreement of one label image or label stack.

    Args:
        pred: predicted label image ``(H, W)`` or stack ``(T, H, W)``, integer or bool;
            non-zero = active cell.
        gt: ground truth of the same shape.

    Returns:
        ``{"iou", "dice", "pixel_accuracy", "precision", "recall"}`` (floats in [0, 1]) and the
        pixel counts ``tp_pixels``, ``fp_pixels``, ``fn_pixels``, ``n_pixels``. Pixels of a
        stack are pooled. Both empty: IoU = Dice = 1.0 (see module docstring).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim not in (2, 3):
        raise MetricsInputError(f"expected (H, W) or (T, H, W) arrays, got shape {pred.shape}")
    pred, gt = _check_pair(pred, gt, pred.ndim)
    p = pred != 0
    g = gt != 0
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return _foreground_from_counts(tp, fp, fn, p.size)


def foreground_scores_stack(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Foreground scores of a ``(T, H, W)`` stack: pooled over pixels and averaged per frame.

    Returns:
        The pooled :func:`foreground_scores` of the whole stack, plus ``frame_mean_iou`` and
        ``frame_mean_dice`` (mean over frames of the per-frame values, empty-empty frames = 1.0)
        and ``n_frames``.
    """
    pred, gt = _check_pair(pred, gt, 3)
    p = (pred != 0).reshape(pred.shape[0], -1)
    g = (gt != 0).reshape(gt.shape[0], -1)
    tp = np.count_nonzero(p & g, axis=1)
    fp = np.count_nonzero(p, axis=1) - tp
    fn = np.count_nonzero(g, axis=1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_f = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
        dice_f = np.where(union > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    out = _foreground_from_counts(int(tp.sum()), int(fp.sum()), int(fn.sum()), p.size)
    out["frame_mean_iou"] = float(iou_f.mean()) if len(iou_f) else 1.0
    out["frame_mean_dice"] = float(dice_f.mean()) if len(dice_f) else 1.0
    out["n_frames"] = int(pred.shape[0])
    return out


def _ids_and_index(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True)`` of a 1-D label array, without a sort when the
    ids are non-negative and at most a few times the pixel count (the usual label image): a
    ``bincount`` finds the ids and a lookup table indexes them, O(pixels + max id)."""
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    if flat.size and flat.min() >= 0 and int(flat.max()) <= 4 * flat.size + 65536:
        ids = np.flatnonzero(np.bincount(flat))
        lut = np.zeros(int(flat.max()) + 1, np.int64)
        lut[ids] = np.arange(len(ids))
        return ids.astype(flat.dtype), lut[flat]
    return np.unique(flat, return_inverse=True)


def instance_iou_matrix(
    pred_labels: np.ndarray, gt_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every predicted ROI with every ground-truth ROI of one label image.

    Built from one ``np.bincount`` of the joint (pred, gt) index, so the cost is
    O(pixels + n_pred * n_gt), with no per-pair loop.

    Args:
        pred_labels: ``(H, W)`` integer label image (0 = background).
        gt_labels: ``(H, W)`` integer label image.

    Returns:
        ``(iou, pred_ids, gt_ids)``: ``iou`` is ``(n_pred, n_gt)`` float64; ``pred_ids`` and
        ``gt_ids`` are the sorted non-zero ids labelling its rows and columns.
    """
    pred_labels, gt_labels = _check_pair(pred_labels, gt_labels, 2)
    p_ids, p_inv = _ids_and_index(pred_labels.ravel())
    g_ids, g_inv = _ids_and_index(gt_labels.ravel())
    n_p, n_g = len(p_ids), len(g_ids)
    overlap = np.bincount(p_inv * n_g + g_inv, minlength=n_p * n_g).reshape(n_p, n_g)
    # drop background rows/columns (id 0 sorts first when present)
    p_keep = p_ids != 0
    g_keep = g_ids != 0
    area_p = overlap.sum(axis=1)[p_keep]
    area_g = overlap.sum(axis=0)[g_keep]
    inter = overlap[np.ix_(p_keep, g_keep)].astype(np.float64)
    union = area_p[:, None] + area_g[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, p_ids[p_keep], g_ids[g_keep]


TOUCH_IOU = 0.1
"""IoU from which an unmatched ROI counts as touching another (:func:`error_kinds`): a
predicted ROI half the size of a cell and lying half on it has IoU 0.2 with it; two 11 px
cells whose outlines only meet have IoU 0."""

ERROR_KINDS = ("fp_false", "fp_merge", "fp_partial", "fn_missed", "fn_split", "fn_partial")
"""The error kinds of the instance metrics, in display order (module docstring)."""


def error_kinds(
    iou: np.ndarray,
    matched_rows: np.ndarray,
    matched_cols: np.ndarray,
    touch: float = TOUCH_IOU,
) -> dict[str, int]:
    """Why each unmatched ROI of one label image is unmatched (module docstring, "Error kinds").

    Args:
        iou: ``(n_pred, n_gt)`` IoU matrix (:func:`instance_iou_matrix`).
        matched_rows, matched_cols: the indices of the true-positive pairs (1-D int arrays of
            one length).
        touch: IoU from which two ROIs touch (:data:`TOUCH_IOU`).

    Returns:
        ``{kind: count}`` for every kind of :data:`ERROR_KINDS` (ints).
    """
    n_p, n_g = iou.shape
    touching = iou >= touch
    free_p = np.ones(n_p, bool)
    free_g = np.ones(n_g, bool)
    free_p[np.asarray(matched_rows, dtype=np.int64)] = False
    free_g[np.asarray(matched_cols, dtype=np.int64)] = False
    per_p = touching.sum(axis=1)[free_p]
    per_g = touching.sum(axis=0)[free_g]
    return {
        "fp_false": int(np.count_nonzero(per_p == 0)),
        "fp_merge": int(np.count_nonzero(per_p >= 2)),
        "fp_partial": int(np.count_nonzero(per_p == 1)),
        "fn_missed": int(np.count_nonzero(per_g == 0)),
        "fn_split": int(np.count_nonzero(per_g >= 2)),
        "fn_partial": int(np.count_nonzero(per_g == 1)),
    }


def _instance_from_counts(tp: int, fp: int, fn: int, matched_ious: list[float]) -> dict:
    empty = tp + fp + fn == 0
    return {
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": _ratio(tp, tp + fp, 1.0 if empty else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if empty else 0.0),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0 if empty else 0.0),
        "ap": _ratio(tp, tp + fp + fn, 1.0 if empty else 0.0),
        "mean_matched_iou": float(np.mean(matched_ious)) if matched_ious else None,
    }


def matching_cost(iou: np.ndarray, thr: float) -> np.ndarray:
    """Cost matrix whose minimum one-to-one assignment has the most pairs with IoU >= ``thr``
    and, among those, the largest summed IoU (cellpose's rule, module docstring).

    Args:
        iou: ``(n_pred, n_gt)`` float IoU matrix; thr: the IoU threshold.

    Returns:
        ``(n_pred, n_gt)`` float64 costs ``-(iou >= thr) - iou / (2 min(n_pred, n_gt))``: the
        IoU term sums to at most 1/2 over any assignment, less than one more pair above ``thr``.
    """
    n_min = max(1, min(iou.shape))
    return -(iou >= thr).astype(np.float64) - iou / (2.0 * n_min)


def _match(
    pred_labels: np.ndarray, gt_labels: np.ndarray, thr: float
) -> tuple[int, int, int, list, dict[str, int]]:
    """``(tp, fp, fn, matched IoUs, error kinds)`` of one label image."""
    iou, p_ids, g_ids = instance_iou_matrix(pred_labels, gt_labels)
    if iou.size == 0:
        empty = np.zeros(0, np.int64)
        return 0, len(p_ids), len(g_ids), [], error_kinds(iou, empty, empty)
    rows, cols = linear_sum_assignment(matching_cost(iou, thr))
    vals = iou[rows, cols]
    good = vals >= thr
    tp = int(np.count_nonzero(good))
    kinds = error_kinds(iou, rows[good], cols[good])
    return tp, len(p_ids) - tp, len(g_ids) - tp, [float(v) for v in vals[good]], kinds


def match_instances(
    pred_labels: np.ndarray, gt_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict:
    """One-to-one matching of predicted and ground-truth ROIs in one label image: the most
    pairs with IoU >= ``iou_threshold``, then the largest summed IoU (module docstring).

    Args:
        pred_labels: ``(H, W)`` integer label image, 0 = background.
        gt_labels: ``(H, W)`` integer label image.
        iou_threshold: minimum IoU (in (0, 1]) of a matched pair to count as a true positive.

    Returns:
        ``{"tp", "fp", "fn", "precision", "recall", "f1", "ap", "mean_matched_iou"}`` and the
        counts of :data:`ERROR_KINDS` (conventions in the module docstring).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise MetricsInputError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    tp, fp, fn, ious, kinds = _match(pred_labels, gt_labels, iou_threshold)
    return {**_instance_from_counts(tp, fp, fn, ious), **kinds}


def match_instances_stack(
    pred_labels: np.ndarray, gt_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict:
    """Instance matching of a ``(T, H, W)`` label stack, frame by frame, counts summed.

    Each frame is matched on its own (a cell is an instance where it is active in that
    frame); TP/FP/FN are summed over frames and the ratios computed from the totals
    (micro average). ``mean_matched_iou`` is the mean over all true-positive pairs of all frames.

    Returns:
        The keys of :func:`match_instances` (error kinds summed over frames) plus ``n_frames``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise MetricsInputError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pred_labels, gt_labels = _check_pair(pred_labels, gt_labels, 3)
    tp = fp = fn = 0
    ious: list[float] = []
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    for t in range(pred_labels.shape[0]):
        a, b, c, d, e = _match(pred_labels[t], gt_labels[t], iou_threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
        ious.extend(d)
        for k, v in e.items():
            kinds[k] += v
    out = {**_instance_from_counts(tp, fp, fn, ious), **kinds}
    out["n_frames"] = int(pred_labels.shape[0])
    return out
