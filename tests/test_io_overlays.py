"""Tests of calseg.io.overlays: display range, overlay pixels, contact sheet PNG, animated GIF."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from calseg.io.overlays import (
    GT_COLOR,
    animation,
    contact_sheet,
    display_range,
    label_colors,
    render_overlay,
)


def _recording(t: int = 9, h: int = 21, w: int = 14) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.normal(100.0, 5.0, size=(t, h, w)).astype(np.float32)
    frames += np.linspace(0, 800, t, dtype=np.float32)[:, None, None]  # brightening recording
    labels = np.zeros((t, h, w), dtype=np.uint32)
    labels[:, 3:8, 3:8] = 1
    labels[4:, 12:18, 5:12] = 9
    return frames, labels


def test_display_range_is_over_whole_recording_and_nan_safe():
    frames, _ = _recording()
    frames[0, 0, :] = np.nan
    frames[1, 0, 0] = np.inf
    lo, hi = display_range(frames, 0.0, 100.0)
    finite = frames[np.isfinite(frames)]
    assert lo == pytest.approx(finite.min()) and hi == pytest.approx(finite.max())
    lo, hi = display_range(frames)
    assert lo < 200 and hi > 800  # spans the first (dark) and last (bright) frames
    assert display_range(np.full((2, 4, 4), np.nan)) == (0.0, 1.0)
    c_lo, c_hi = display_range(np.full((2, 4, 4), 7.0))
    assert c_lo == 7.0 and c_hi > c_lo


def test_render_overlay_changes_only_labelled_pixels():
    frames, labels = _recording()
    lo, hi = display_range(frames)
    plain = render_overlay(frames[5], None, lo, hi)
    over = render_overlay(frames[5], labels[5], lo, hi)
    assert over.shape == (21, 14, 3) and over.dtype == np.uint8
    changed = np.any(over != plain, axis=-1)
    assert changed[labels[5] > 0].mean() > 0.9
    assert not changed[labels[5] == 0].any()
    # outline pixels carry the id's exact colour
    assert tuple(over[3, 5]) == tuple(label_colors(np.array(1)))
    # gt outlines in the gt colour
    gt = np.zeros((21, 14), np.uint16)
    gt[10:20, 2:12] = 4
    with_gt = render_overlay(frames[5], labels[5], lo, hi, gt=gt)
    assert tuple(with_gt[10, 2]) == GT_COLOR


def test_label_colours_stable_and_distinct():
    ids = np.arange(1, 200)
    c1, c2 = label_colors(ids), label_colors(ids.copy())
    np.testing.assert_array_equal(c1, c2)
    assert len({tuple(c) for c in c1}) > 190
    assert tuple(label_colors(np.array(0))) == (0, 0, 0)
    assert not any(tuple(c) == GT_COLOR for c in c1)


def test_contact_sheet_png(tmp_path):
    frames, labels = _recording()
    traces = np.random.default_rng(1).normal(size=(9, frames.shape[0]))
    path = contact_sheet(
        frames, labels, tmp_path / "sheet.png", n=6, gt=labels[0], title="t", traces=traces
    )
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[2] == 3
    # 21 x 14 frames are upscaled (factor 13 -> 273 x 182 tiles), 6 tiles in a grid
    assert img.shape[0] > 2 * 273 and img.shape[1] > 2 * 182
    n_cols = img.shape[1] // 182
    assert n_cols in (2, 3, 4)


def test_animation_gif_frame_count(tmp_path):
    frames, labels = _recording(t=12)
    path = animation(frames, labels, tmp_path / "rec.gif", fps=5, gt=labels[0])
    gif = iio.imread(path, index=None)
    assert gif.shape[0] == 12
    assert gif.shape[1] >= 256  # upscaled from 21 px
    path = animation(frames, labels[0], tmp_path / "short.gif", max_frames=4)
    assert iio.imread(path, index=None).shape[0] == 4
