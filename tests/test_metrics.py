"""Metrics against hand-computed values."""

import numpy as np
import pytest

from calseg.analysis.metrics import (
    ERROR_KINDS,
    MetricsInputError,
    bootstrap_ci,
    foreground_scores,
    foreground_scores_stack,
    instance_iou_matrix,
    match_instances,
    match_instances_stack,
    stratified_bootstrap_ci,
)


def test_foreground_scores_known_masks():
    pred = np.zeros((4, 5), dtype=np.uint32)
    gt = np.zeros((4, 5), dtype=np.uint32)
    pred[0, 0:4] = 1  # 4 px
    gt[0, 2:5] = 7  # 3 px, overlap 2 px (cols 2, 3)
    s = foreground_scores(pred, gt)
    # intersection 2, union 5, |P| + |G| = 7, wrong pixels 3 of 20
    assert s["iou"] == pytest.approx(2 / 5)
    assert s["dice"] == pytest.approx(4 / 7)
    assert s["pixel_accuracy"] == pytest.approx(17 / 20)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert (s["tp_pixels"], s["fp_pixels"], s["fn_pixels"]) == (2, 2, 1)


def test_foreground_empty_cases():
    z = np.zeros((3, 3), dtype=np.uint16)
    s = foreground_scores(z, z)
    assert s["iou"] == 1.0 and s["dice"] == 1.0 and s["pixel_accuracy"] == 1.0
    one = z.copy()
    one[1, 1] = 1
    s = foreground_scores(one, z)  # false positive only
    assert s["iou"] == 0.0 and s["dice"] == 0.0 and s["pixel_accuracy"] == pytest.approx(8 / 9)


def test_foreground_stack_pooled_and_frame_mean():
    pred = np.zeros((2, 2, 2), dtype=np.uint8)
    gt = np.zeros((2, 2, 2), dtype=np.uint8)
    pred[0, 0, 0] = gt[0, 0, 0] = 1  # frame 0 perfect (IoU 1)
    pred[1, 0, :] = 1  # frame 1: P = 2 px, G = 1 px, overlap 1 -> IoU 1/2
    gt[1, 0, 0] = 1
    s = foreground_scores_stack(pred, gt)
    assert s["iou"] == pytest.approx(2 / 3)  # pooled: inter 2, union 3
    assert s["frame_mean_iou"] == pytest.approx(0.75)
    assert s["n_frames"] == 2


def test_shape_mismatch_raises():
    with pytest.raises(MetricsInputError):
        foreground_scores(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(MetricsInputError):
        match_instances(np.zeros((2, 2), float), np.zeros((2, 2), int))


def test_iou_matrix_values():
    gt = np.zeros((6, 6), dtype=np.uint32)
    gt[0:2, 0:2] = 5  # 4 px
    gt[3:6, 3:6] = 9  # 9 px
    pred = np.zeros((6, 6), dtype=np.uint32)
    pred[0:2, 0:3] = 2  # 6 px, overlap 4 with id 5 -> IoU 4/6
    pred[4:6, 4:6] = 3  # 4 px inside id 9 -> IoU 4/9
    iou, pids, gids = instance_iou_matrix(pred, gt)
    assert list(pids) == [2, 3] and list(gids) == [5, 9]
    np.testing.assert_allclose(iou, [[4 / 6, 0.0], [0.0, 4 / 9]])


def test_hungarian_matching_counts():
    gt = np.zeros((10, 10), dtype=np.uint32)
    gt[0:4, 0:4] = 1  # 16 px
    gt[0:4, 6:10] = 2  # 16 px
    gt[6:10, 0:4] = 3  # 16 px, missed entirely
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 10  # 12 px in gt 1: IoU 12/16 = 0.75 -> TP
    pred[0:2, 6:10] = 11  # 8 px in gt 2: IoU 8/16 = 0.5 -> TP at threshold 0.5
    pred[6:10, 6:10] = 12  # on background -> FP
    m = match_instances(pred, gt, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["ap"] == pytest.approx(2 / 4)
    assert m["mean_matched_iou"] == pytest.approx((0.75 + 0.5) / 2)
    strict = match_instances(pred, gt, 0.6)  # the 0.5 pair no longer counts
    assert (strict["tp"], strict["fp"], strict["fn"]) == (1, 2, 2)


def test_error_kinds_name_each_unmatched_roi():
    """One of each kind on a 20 x 40 field of 4 x 4 px cells, counted by hand."""
    gt = np.zeros((20, 40), dtype=np.uint32)
    pred = np.zeros_like(gt)
    gt[0:4, 0:4] = 1  # split: two halves of 8 px, IoU 0.5 each; one is matched
    pred[0:4, 0:2], pred[0:4, 2:4] = 10, 11  # the other is an fp_partial (touches cell 1)
    gt[0:4, 8:12], gt[0:4, 12:16] = 2, 3  # merged: one 4 x 8 ROI over both, IoU 0.5 each
    pred[0:4, 8:16] = 12  # matched to one of them; the other cell: fn_partial (touches 12)
    gt[10:14, 0:4] = 4  # missed
    pred[10:14, 20:24] = 13  # on no cell: fp_false
    gt[10:14, 30:34] = 5  # cut into three 4 x 1 px strips, IoU 4/16 each: fn_split
    for j in range(3):
        pred[10:14, 30 + j] = 20 + j  # three fp_partial
    gt[16:20, 8:12], gt[16:20, 12:16] = 6, 7  # a 4 x 6 px ROI over both, IoU 12/28 each
    pred[16:20, 9:15] = 30  # fp_merge; cells 6 and 7 are fn_partial
    m = match_instances(pred, gt, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 6, 5)  # 8 predicted ROIs, 7 cells
    kinds = {k: m[k] for k in ERROR_KINDS}
    assert kinds == {
        "fp_false": 1,
        "fp_merge": 1,
        "fp_partial": 4,
        "fn_missed": 1,
        "fn_split": 1,
        "fn_partial": 3,
    }
    assert m["fp"] == m["fp_false"] + m["fp_merge"] + m["fp_partial"]
    assert m["fn"] == m["fn_missed"] + m["fn_split"] + m["fn_partial"]
    stack = match_instances_stack(np.stack([pred, pred]), np.stack([gt, np.zeros_like(gt)]))
    # frame 2 has no cell: all 8 predicted ROIs are fp_false there
    assert stack["fp_false"] == 1 + 8 and stack["fn_split"] == 1 and stack["fp_merge"] == 1


def test_hungarian_prefers_global_optimum():
    # one prediction overlaps two cells; the assignment must pick the larger IoU
    gt = np.zeros((4, 8), dtype=np.uint32)
    gt[:, 0:4] = 1
    gt[:, 4:8] = 2
    pred = np.zeros_like(gt)
    pred[:, 1:5] = 4  # 16 px: 12 in gt1 (IoU 12/20), 4 in gt2 (IoU 4/28)
    m = match_instances(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["mean_matched_iou"] == pytest.approx(12 / 20)


def test_instance_empty_conventions_and_stack():
    z = np.zeros((3, 3), dtype=np.uint32)
    m = match_instances(z, z)
    assert m["f1"] == 1.0 and m["tp"] == 0 and m["mean_matched_iou"] is None
    one = z.copy()
    one[0, 0] = 1
    assert match_instances(one, z)["precision"] == 0.0
    stack_p = np.stack([one, z, one])
    stack_g = np.stack([one, one, z])
    s = match_instances_stack(stack_p, stack_g)
    # frame 0 TP, frame 1 FN, frame 2 FP
    assert (s["tp"], s["fp"], s["fn"], s["n_frames"]) == (1, 1, 1, 3)
    assert s["f1"] == pytest.approx(0.5)


def test_iou_matrix_matches_pairwise_definition_on_many_cells():
    """The one-bincount IoU matrix equals |P & G| / |P | G| computed pair by pair, on a field
    of hundreds of overlapping ROIs (timing is in ``python -m calseg.bench --only metrics``)."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 60, size=(64, 64)).astype(np.uint32)
    pred = np.roll(gt, 1, axis=1) * (rng.random(gt.shape) < 0.9)
    iou, pids, gids = instance_iou_matrix(pred.astype(np.uint32), gt)
    assert iou.shape == (len(pids), len(gids)) == (59, 59)
    for a, i in enumerate(pids[::7]):
        for b, j in enumerate(gids[::5]):
            p, g = pred == i, gt == j
            want = np.count_nonzero(p & g) / np.count_nonzero(p | g)
            assert iou[7 * a, 5 * b] == pytest.approx(want), (i, j)


def test_matching_maximises_pairs_above_threshold_then_iou():
    """At IoU 0.3 the maximum-summed-IoU assignment pairs A with X (0.5) and leaves B with Y
    (0.2, below the threshold): 1 TP. Two pairs above 0.3 exist (A-Y 0.35, B-X 0.32), and the
    cellpose rule finds them: 2 TP."""
    iou = np.array([[0.5, 0.35], [0.32, 0.20]])
    from scipy.optimize import linear_sum_assignment

    from calseg.analysis.metrics import matching_cost

    r, c = linear_sum_assignment(iou, maximize=True)
    assert int((iou[r, c] >= 0.3).sum()) == 1  # the old rule undercounts
    r, c = linear_sum_assignment(matching_cost(iou, 0.3))
    assert sorted(iou[r, c].tolist()) == [0.32, 0.35]
    # among matchings with as many pairs above the threshold, the larger summed IoU wins
    iou2 = np.array([[0.9, 0.6], [0.6, 0.55]])
    r, c = linear_sum_assignment(matching_cost(iou2, 0.5))
    assert sorted(zip(r.tolist(), c.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_match_instances_counts_the_most_pairs_on_label_images():
    """As label images: pred A overlaps gt X most (IoU 0.40), but pairing A-X leaves B-Y at
    0.27, under 0.3 (1 TP, what summed-IoU matching gave); A-Y and B-X both reach 0.32."""
    gt = np.zeros((1, 49), np.uint32)
    gt[0, 0:28] = 1  # X, 28 px
    gt[0, 28:49] = 2  # Y, 21 px
    pred = np.zeros_like(gt)
    pred[0, 0:16] = pred[0, 28:40] = 1  # A: 16 px of X, 12 of Y
    pred[0, 16:28] = pred[0, 40:49] = 2  # B: 12 px of X, 9 of Y
    iou, _, _ = instance_iou_matrix(pred, gt)
    np.testing.assert_allclose(iou, [[16 / 40, 12 / 37], [12 / 37, 9 / 33]])
    m = match_instances(pred, gt, 0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["mean_matched_iou"] == pytest.approx(12 / 37)
    assert match_instances(pred, gt, 0.5)["tp"] == 0


def test_bootstrap_cis_cover_the_mean_and_keep_group_weights():
    assert bootstrap_ci(np.array([1.0, 2.0])) is None  # too few to resample
    lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    # constant groups: every resample gives the mean of group means (1 + 3) / 2 = 2, not the
    # pooled mean (1 x 10 + 3 x 2) / 12 = 1.33 that resampling all values together targets
    lo, hi = stratified_bootstrap_ci([np.ones(10), np.full(2, 3.0), np.zeros(0)])
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    lo, hi = stratified_bootstrap_ci([np.array([0.0, 1.0] * 20), np.array([0.5] * 5)])
    assert lo < 0.5 < hi and hi - lo < 0.3  # only the first group varies
    assert stratified_bootstrap_ci([np.ones(2)]) is None
