"""``instance_iou_matrix`` indexes label ids without a sort (metrics._ids_and_index);
it must give exactly what the sort-based definition gives, for every kind of label image."""

import numpy as np
import pytest

from calseg.analysis.metrics import instance_iou_matrix


def _by_unique(pred: np.ndarray, gt: np.ndarray):
    p_ids = np.unique(pred)
    g_ids = np.unique(gt)
    p_ids, g_ids = p_ids[p_ids != 0], g_ids[g_ids != 0]
    iou = np.zeros((len(p_ids), len(g_ids)))
    for a, i in enumerate(p_ids):
        for b, j in enumerate(g_ids):
            inter = np.count_nonzero((pred == i) & (gt == j))
            union = np.count_nonzero((pred == i) | (gt == j))
            iou[a, b] = inter / union if union else 0.0
    return iou, p_ids, g_ids


@pytest.mark.parametrize(
    "dtype, high",
    [(np.uint16, 9), (np.uint32, 2**31), (np.int64, 40), (np.int32, 7), (bool, 2)],
)
def test_iou_matrix_matches_its_definition(dtype, high):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, high, size=8)  # large ids take the sort path
    pred = ids[rng.integers(0, 8, size=(16, 12))].astype(dtype)
    gt = ids[rng.integers(0, 8, size=(16, 12))].astype(dtype)
    got = instance_iou_matrix(pred, gt)
    want = _by_unique(pred, gt)
    np.testing.assert_allclose(got[0], want[0])
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])


def test_iou_matrix_with_negative_ids_and_empty_images():
    pred = np.array([[-3, 0], [5, 5]])
    gt = np.array([[-3, -3], [5, 0]])
    iou, p, g = instance_iou_matrix(pred, gt)
    assert list(p) == [-3, 5] and list(g) == [-3, 5]
    np.testing.assert_allclose(iou, [[0.5, 0.0], [0.0, 0.5]])
    iou, p, g = instance_iou_matrix(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8))
    assert iou.shape == (0, 0)
