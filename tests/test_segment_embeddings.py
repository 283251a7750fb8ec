"""Normalisation, geometry and the embedding cache."""

import numpy as np
import pytest
import torch

from calseg.segment.embeddings import (
    FrameGeometry,
    RecordingError,
    as_frame_stack,
    compute_normalisation,
    frames_to_model,
    labels_to_model,
    logits_to_frame,
    normalise_frames,
)


def test_uint16_near_max_does_not_wrap():
    rng = np.random.default_rng(0)
    frames = rng.integers(65000, 65536, size=(5, 16, 16)).astype(np.uint16)
    frames[0, 0, 0] = 65535
    frames[1, 1, 1] = 65000
    norm = compute_normalisation(frames, 0.0, 100.0)
    assert norm["low"] == 65000.0 and norm["high"] == 65535.0
    out = normalise_frames(frames, norm)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[0, 0, 0] == pytest.approx(1.0) and out[1, 1, 1] == pytest.approx(0.0)
    # monotone: brighter input never maps lower (a wrap would break this)
    order = np.argsort(frames.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)


def test_normalisation_is_per_recording_not_per_frame():
    frames = np.stack([np.full((8, 8), 100.0), np.full((8, 8), 200.0)])
    frames[0, 0, 0] = 0.0
    norm = compute_normalisation(frames, 0.0, 100.0)
    out = normalise_frames(frames, norm)
    # a per-frame normalisation would stretch both flat frames to the same value
    assert out[0, 1, 1] == pytest.approx(0.5) and out[1, 1, 1] == pytest.approx(1.0)


def test_nan_inf_are_excluded_and_zeroed():
    frames = np.linspace(0, 10, 2 * 4 * 4).reshape(2, 4, 4).astype(np.float32)
    frames[0, 0, 0] = np.nan
    frames[1, 3, 3] = np.inf
    norm = compute_normalisation(frames, 0.0, 100.0)
    assert norm["n_nonfinite"] == 2
    assert np.isfinite(norm["low"]) and np.isfinite(norm["high"])
    out = normalise_frames(frames, norm)
    assert np.isfinite(out).all() and out[0, 0, 0] == 0.0 and out[1, 3, 3] == 0.0
    with pytest.raises(RecordingError):
        compute_normalisation(np.full((1, 2, 2), np.nan))


def test_as_frame_stack_shapes():
    assert as_frame_stack(np.zeros((5, 6))).shape == (1, 5, 6)
    with pytest.raises(RecordingError):
        as_frame_stack(np.zeros((2, 5, 6, 3)))


@pytest.mark.parametrize("hw", [(21, 14), (173, 173), (100, 100), (128, 256)])
def test_geometry_round_trip_maps_masks_back_exactly(hw):
    h, w = hw
    geom = FrameGeometry(h, w, 64)
    rng = np.random.default_rng(1)
    frames = rng.random((2, h, w)).astype(np.float32)
    x = frames_to_model(frames, geom)
    assert tuple(x.shape) == (2, 1, 64, 64)
    # a rectangle in frame pixels, through the model grid (labels) and back (logits)
    lab = np.zeros((h, w), np.uint32)
    lab[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 3
    lm = labels_to_model(lab, geom)
    assert lm.shape == (64, 64) and set(np.unique(lm)) <= {0, 3}
    logits = torch.from_numpy(np.where(lm > 0, 10.0, -10.0).astype(np.float32))[None, None]
    back = logits_to_frame(logits, geom)[0, 0].numpy() > 0
    assert back.shape == (h, w)
    inter = np.count_nonzero(back & (lab > 0))
    union = np.count_nonzero(back | (lab > 0))
    assert inter / union > 0.75


def test_to_model_points_pixel_centres():
    geom = FrameGeometry(50, 100, 64)  # padded side 100 -> scale 0.64
    pts = geom.to_model_points(np.array([[0.0, 0.0], [99.0, 49.0]]))
    np.testing.assert_allclose(pts[0], [0.5 * 0.64 - 0.5] * 2, atol=1e-6)
    np.testing.assert_allclose(pts[1], [99.5 * 0.64 - 0.5, 49.5 * 0.64 - 0.5], atol=1e-5)
    with pytest.raises(ValueError):
        FrameGeometry(10, 10, 100)


def test_normalisation_finds_finite_values_off_its_stride():
    """Above MAX_PERCENTILE_SAMPLES the percentiles read every k-th value; a recording whose
    finite values all fall between those was refused as having none."""
    from calseg.io.recordings import NO_FINITE_VALUE, RecordingError
    from calseg.segment.embeddings import MAX_PERCENTILE_SAMPLES

    n = MAX_PERCENTILE_SAMPLES + 1000  # stride 2: the even indices
    frames = np.full(n, np.nan, np.float32)
    frames[1::2] = np.linspace(0, 10, frames[1::2].size)
    norm = compute_normalisation(frames.reshape(1, 1, n), 0.0, 100.0)
    assert norm["low"] == 0.0 and norm["high"] == pytest.approx(10.0)
    with pytest.raises(RecordingError, match="no finite value") as err:
        compute_normalisation(np.full((2, 4, 4), np.inf, np.float32))
    assert str(err.value) == NO_FINITE_VALUE
