"""Preprocessing with known answers: drift, bleaching rate, background (calseg.preprocess)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from calseg.preprocess import (
    PreprocessError,
    PreprocessOptions,
    correct_photobleaching,
    preprocess,
    register_drift,
    subtract_background,
    z_project,
)


def _texture(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 50 * ndimage.gaussian_filter(rng.standard_normal((h, w)), 2.0)).astype(np.float32)


def test_register_drift_recovers_known_subpixel_shifts():
    base = _texture()
    true = np.array([[0.0, 0.0], [1.3, -0.7], [-2.6, 2.2], [0.4, 3.5]])
    frames = np.stack([ndimage.shift(base, s, order=3, mode="nearest") for s in true])
    frames = np.concatenate([np.repeat(frames[:1], 3, axis=0), frames[1:]])  # reference frames
    reg, shifts = register_drift(frames, upsample=20, n_reference=3)
    np.testing.assert_allclose(shifts[3:], true[1:], atol=0.15)
    np.testing.assert_allclose(shifts[:3], 0.0, atol=0.05)
    # the registered frames line up with the reference (away from the repeated edges)
    inner = (slice(None), slice(6, -6), slice(6, -6))
    assert np.abs(reg[inner] - base[6:-6, 6:-6]).max() < 2.0  # of a 50-unit texture


def test_photobleaching_rate_recovered_and_mean_flattened():
    dt, tau = 2.0, 150.0
    t = np.arange(100) * dt
    rng = np.random.default_rng(1)
    base = _texture()
    frames = base[None] * np.exp(-t / tau)[:, None, None]
    frames += rng.normal(0, 0.5, frames.shape).astype(np.float32)
    out, info = correct_photobleaching(frames, dt, "exp")
    assert info["tau_s"][0] == pytest.approx(tau, rel=0.02)
    assert info["loss_fraction"] == pytest.approx(1 - np.exp(-t[-1] / tau), abs=0.01)
    means = out.reshape(len(t), -1).mean(axis=1)
    assert np.ptp(means) / means[0] < 0.01  # was 1 - exp(-198/150) = 73 % lost


def test_biexponential_bleaching():
    dt = 1.0
    t = np.arange(300) * dt
    curve = 0.5 * np.exp(-t / 10.0) + 0.5 * np.exp(-t / 200.0)
    frames = (200 * curve)[:, None, None] * np.ones((1, 16, 16), np.float32)
    out, info = correct_photobleaching(frames, dt, "biexp")
    np.testing.assert_allclose(info["tau_s"], [10.0, 200.0], rtol=0.05)
    np.testing.assert_allclose(out[:, 0, 0], 200 * curve[0], rtol=1e-3)


def test_bleach_fit_failures_are_clear():
    with pytest.raises(PreprocessError, match="at least 5 frames"):
        correct_photobleaching(np.ones((3, 8, 8)), 1.0)
    with pytest.raises(PreprocessError, match="exp or biexp"):
        correct_photobleaching(np.ones((10, 8, 8)), 1.0, "linear")  # type: ignore[arg-type]
    with pytest.raises(PreprocessError, match="frame_interval_s"):
        correct_photobleaching(np.ones((10, 8, 8)), 0.0)


def test_background_removed_cells_kept():
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    ramp = 300 + 2.0 * xx + 1.0 * yy  # uneven illumination + offset
    cells = np.zeros((h, w))
    for cy, cx in [(20, 20), (50, 70), (75, 30)]:
        cells[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 100.0  # discs of radius 5 px
    frames = np.repeat((ramp + cells)[None], 4, axis=0).astype(np.float32)
    far = cells == 0
    out, bg = subtract_background(frames, "opening", 12.0)
    assert np.abs(np.median(out[0][far])) < 5.0  # steep ramp of 300..586 gone
    assert np.median(out[0][cells > 0]) > 80.0  # cells keep most of their 100
    out, bg = subtract_background(frames, "gaussian", 15.0)
    assert np.abs(np.median(out[0][far])) < 10.0
    # ImageJ's rolling ball (radius in px and intensity units): on a gentle slope
    gentle = np.repeat((300 + 0.2 * xx + cells)[None], 3, axis=0).astype(np.float32)
    out, bg = subtract_background(gentle, "rolling_ball", 30.0)
    assert np.abs(np.median(out[0][far])) < 5.0
    assert np.median(out[0][cells > 0]) > 80.0
    with pytest.raises(PreprocessError, match="rolling_ball, opening or gaussian"):
        subtract_background(frames, "tophat", 10)  # type: ignore[arg-type]


def test_z_project_and_pipeline_defaults():
    st = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(z_project(st, "max"), st[:, 2])
    np.testing.assert_array_equal(z_project(st, "mean"), st[:, 1])
    with pytest.raises(PreprocessError):
        z_project(st[0])
    frames = np.ones((4, 8, 8), np.uint16)
    out, rep = preprocess(frames, 1.0)
    assert out is frames and rep.steps == []  # all off by default: the data is untouched
    out, rep = preprocess(
        np.repeat(_texture()[None], 6, axis=0), 1.0, PreprocessOptions(register_drift=True)
    )
    assert rep.max_shift_px == pytest.approx(0.0, abs=0.05) and len(rep.steps) == 1


def test_non_finite_values_are_filled_before_every_step():
    """A tenth attack run: registration of a partly-NaN recording failed with skimage's own
    "NaN values found", and the background step said "no finite value: every value is NaN
    or Inf ... check the export" of a file half of whose values were finite. NaN and Inf are
    now set to their pixel's median over time before any step, and the report says so."""
    from calseg.preprocess import fill_non_finite

    rng = np.random.default_rng(0)
    t = np.arange(40)[:, None, None]
    frames = (100.0 * np.exp(-t / 80.0) + rng.normal(0, 1, (40, 32, 32))).astype(np.float64)
    frames[:, 5:9, 5:9] += 50.0
    holey = frames.copy()
    holey[rng.random(frames.shape) < 0.5] = np.nan  # about half of the values
    holey[3, 0, 0], holey[7, 1, 1] = np.inf, -np.inf
    holey[:, 20, 20] = np.nan  # a pixel with no finite value: the median of all
    for opts in (
        PreprocessOptions(register_drift=True),
        PreprocessOptions(background="gaussian", background_radius_px=8),
        PreprocessOptions(background="opening", background_radius_px=8),
        PreprocessOptions(bleach_correction="exp"),
    ):
        out, rep = preprocess(holey, 1.0, opts)
        assert np.isfinite(out).all(), opts
        assert "NaN/Inf value(s)" in rep.steps[0], rep.steps
    filled, n = fill_non_finite(holey)
    assert n == int((~np.isfinite(holey)).sum())
    keep = np.isfinite(holey)
    np.testing.assert_array_equal(filled[keep], holey[keep].astype(np.float32))
    assert abs(float(filled[0, 20, 20]) - float(np.nanmedian(holey))) < 1e-3
    assert fill_non_finite(frames)[1] == 0
    with pytest.raises(PreprocessError, match="no finite value"):
        fill_non_finite(np.full((3, 8, 8), np.nan))


def test_preprocessing_gives_the_same_result_in_any_float_units():
    """An 11th attack run: registration of the same float recording x1e20 failed (float32
    sums overflowed into NaN, then skimage's "NaN values found"), and at x1e-30 every shift
    came out 0. Preprocessing works on float data of any scale as camera counts (a power of
    two, exact) and gives the frames back in the recording's units."""
    base = _texture()
    true = np.array([[0.0, 0.0], [1.3, -0.7], [-2.6, 2.2], [0.4, 3.5]])
    frames = np.stack([ndimage.shift(base, s, order=3, mode="nearest") for s in true])
    frames = np.concatenate([np.repeat(frames[:1], 3, axis=0), frames[1:]] * 3)
    opts = PreprocessOptions(register_drift=True, background="opening", background_radius_px=8)
    ref, ref_rep = preprocess(frames, 1.0, opts)
    for k in (-100, -66, 66, 100):  # about x1e-30, x1e-20, x1e20, x1e30
        out, rep = preprocess(np.ldexp(frames, k), 1.0, opts)
        assert rep.max_shift_px == pytest.approx(ref_rep.max_shift_px, abs=1e-6), k
        np.testing.assert_allclose(np.ldexp(out, -k), ref, rtol=1e-5, atol=1e-4)


def test_a_background_step_that_removes_the_resting_level_is_reported():
    """An 11th attack run: on tissue that fills the field, background 'gaussian' at 8 px left
    F0 near -7 and every event gone, with a note blaming the cells. Every spatial method takes
    the cells' resting fluorescence for background there; the report now warns, and says to
    leave the step off. Cells apart on a dark background keep their resting level: no
    warning."""
    rng = np.random.default_rng(0)
    tissue = _texture(64, 64)[None] + rng.normal(0, 1, (30, 64, 64)).astype(np.float32)
    gaussian = PreprocessOptions(background="gaussian", background_radius_px=8)
    _, rep = preprocess(tissue, 1.0, gaussian)
    assert len(rep.warnings) == 1 and "leave the background step off" in rep.warnings[0]
    sparse = np.full((30, 64, 64), 20.0, np.float32) + rng.normal(0, 1, (30, 64, 64))
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((12, 12), (12, 48), (48, 30)):
        sparse[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 25] += 400.0  # cells 10 px across
    sparse[:, 40:, :] += np.linspace(0, 30, 64)[None, None, :]  # an illumination slope
    opening = PreprocessOptions(background="opening", background_radius_px=12)
    _, rep = preprocess(sparse.astype(np.float32), 1.0, opening)
    assert rep.warnings == [], rep.warnings


def test_fill_non_finite_matches_numpy_medians_and_leaves_the_input_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lean fill (medians only of the pixels with a hole, sorted in blocks) gives numpy's
    nanmedian per pixel, also above 600 frames (where numpy runs a Python function per
    pixel) and across several blocks, and does not change the caller's array."""
    from calseg import preprocess as pp

    rng = np.random.default_rng(3)
    frames = rng.normal(100, 5, (650, 12, 10)).astype(np.float32)
    frames[rng.random(frames.shape) < 0.05] = np.nan
    frames[5, 2, 2] = np.inf
    frames[:, 4, 4] = np.nan  # no finite value: the recording's median
    before = frames.copy()
    ref = np.where(np.isfinite(frames), frames, np.nan)
    with warnings.catch_warnings():  # the all-NaN pixel
        warnings.simplefilter("ignore", RuntimeWarning)
        per_pixel = np.nanmedian(ref, axis=0)
    per_pixel[4, 4] = np.nanmedian(ref)
    expected = np.where(np.isnan(ref), per_pixel[None], ref)
    for block_bytes in (pp.FILL_BLOCK_BYTES, 4 * 650 * 7):  # one block; blocks of 7 pixels
        monkeypatch.setattr(pp, "FILL_BLOCK_BYTES", block_bytes)
        out, n = pp.fill_non_finite(frames)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
        assert n == int((~np.isfinite(before)).sum()) and out.dtype == np.float32
        np.testing.assert_array_equal(frames, before)
