"""Partial-label evaluation on real recordings: recall of labelled cells, detections per
frame, and a whole-field "model" that must not look good."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.analysis.metrics import MetricsInputError
from calseg.io.rois import read_imagej_rois
from calseg.pipelines.real_eval import prediction_footprints, score_partial_labels


def _rois() -> np.ndarray:
    rois = np.zeros((40, 60), np.uint32)
    rois[5:15, 5:15] = 1  # 100 px
    rois[20:30, 30:42] = 2  # 120 px
    return rois


def test_perfect_prediction_in_some_frames_is_found():
    rois = _rois()
    pred = np.zeros((6, 40, 60), np.uint32)
    pred[1:4][:, rois == 1] = 7  # cell 1 active in frames 1-3, other ids
    pred[2][rois == 2] = 9
    pred[:, 35:38, 50:55] = 3  # an unlabelled cell: not a false positive (partial labels)
    s = score_partial_labels(pred, rois)
    assert s.n_labelled == 2
    assert s.recall_50 == 1.0 and s.recall_30 == 1.0
    assert s.recall_any_frame_50 == 1.0
    assert s.best_iou == [1.0, 1.0]
    assert s.detections_per_frame == pytest.approx((6 + 3 + 1) / 6)
    assert s.plausible


def test_shifted_masks_pass_at_03_not_at_05():
    rois = _rois()
    pred = np.zeros((2, 40, 60), np.uint32)
    pred[:, 5:15, 10:20] = 1  # 10x10 square shifted by 5 px: IoU = 50 / 150 = 0.33
    s = score_partial_labels(pred, rois)
    assert s.best_iou[0] == pytest.approx(1 / 3)
    assert s.recall_30 == 0.5 and s.recall_50 == 0.0


def test_whole_field_mask_does_not_look_good():
    rois = _rois()
    pred = np.ones((5, 40, 60), np.uint32)  # "everything is one active cell"
    s = score_partial_labels(pred, rois)
    assert s.recall_30 == 0.0 and s.recall_50 == 0.0  # IoU = 120 / 2400 = 0.05
    assert s.recall_any_frame_30 == 0.0
    assert s.coverage == 1.0 and not s.plausible


def test_one_detection_per_pixel_is_implausible():
    rois = _rois()
    pred = np.arange(1, 5 * 40 * 60 + 1, dtype=np.uint32).reshape(5, 40, 60)
    s = score_partial_labels(pred, rois)
    assert s.detections_per_frame == 2400
    assert s.recall_30 == 0.0 and not s.plausible


def test_footprint_keeps_the_typical_shape():
    pred = np.zeros((4, 10, 10), np.uint32)
    pred[:, 2:5, 2:5] = 1
    pred[0, 2:9, 2:9] = 1  # one frame where the mask leaked
    fp = prediction_footprints(pred)
    assert np.array_equal(fp == 1, pred[1] == 1)


def _footprints_by_loop(pred: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """The definition, one id at a time (the implementation before it was vectorised)."""
    t = pred.shape[0]
    out = np.zeros(pred.shape[1:], np.uint32)
    best = np.zeros(pred.shape[1:], np.int64)
    for i in np.unique(pred[pred != 0]):
        m = pred == i
        present = int(m.reshape(t, -1).any(axis=1).sum())
        count = m.sum(axis=0)
        fp = (count >= max(1, min_fraction * present)) & (count > best)
        out[fp] = i
        best[fp] = count[fp]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_footprints_match_their_definition_on_overlapping_ids(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 6, size=(7, 12, 9)).astype(np.uint16)  # ids overlap everywhere
    pred[rng.random(pred.shape) < 0.4] = 0
    pred[:, :3] = 0  # a background band
    for mf in (0.5, 0.2, 0.9):
        assert np.array_equal(prediction_footprints(pred, mf), _footprints_by_loop(pred, mf))
    assert not prediction_footprints(np.zeros((3, 4, 4), np.uint8)).any()


def test_bad_inputs():
    with pytest.raises(MetricsInputError, match="no ROI"):
        score_partial_labels(np.zeros((2, 4, 4), np.uint32), np.zeros((4, 4), np.uint32))
    with pytest.raises(MetricsInputError, match="must be"):
        score_partial_labels(np.zeros((2, 4, 4), np.uint32), np.ones((4, 5), np.uint32))


@pytest.mark.parametrize(
    "recording, rois, shape",
    [
        ("sima_example.tif", "sima_example_imageJ_ROIs.zip", (20, 128, 256)),
        ("fissa_b_AVG_A01.tif", "fissa_b_rois.zip", (29, 21, 14)),
    ],
)
def test_real_rois_whole_field_and_oracle(recording, rois, shape, real_file):
    real_file(recording)
    lab = read_imagej_rois(real_file(rois), shape[1:])
    whole = np.ones(shape, np.uint32)
    s = score_partial_labels(whole, lab)
    assert s.recall_30 == 0.0  # the ROIs are small against the field (fissa: 37 / 294 px)
    oracle = np.broadcast_to(lab, shape).astype(np.uint32)
    o = score_partial_labels(oracle, lab)
    assert o.recall_50 == 1.0 and o.n_labelled == 2
