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


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (N, 3) uint8 colours."""
    import colorsys

    return np.array([360 * colorsys.rgb_to_hsv(*(c / 255.0))[0] for c in rgb])


def test_ground_truth_colour_is_never_a_cell_colour():
    from calseg.io.overlays import PALETTE_GAP_DEG

    hues = _hue(label_colors(np.arange(1, 20_001)))
    gt_hue = _hue(np.array([GT_COLOR]))[0]
    lo, hi = PALETTE_GAP_DEG
    assert lo < gt_hue < hi
    assert not ((hues > lo + 0.5) & (hues < hi - 0.5)).any()  # rounding to uint8 aside
    assert np.abs(hues - gt_hue).min() > 20  # degrees of hue between GT and any cell


def test_choose_frames_shows_every_cell_then_the_whole_recording():
    from calseg.io.overlays import choose_frames

    labels = np.zeros((29, 8, 8), np.uint16)
    labels[16, 2:5, 2:5] = 1  # a cell labelled in frames 16 and 19 only (fissa A02's case)
    labels[19, 2:5, 2:5] = 1
    labels[3, 0:2, 0:2] = 2
    idx = choose_frames(29, 12, labels)
    assert len(idx) == 12 and {3, 16, 19}.issubset(idx)
    assert idx.min() <= 2 and idx.max() >= 26  # spread over the whole recording
    many = np.zeros((100, 4, 40), np.uint16)
    for i in range(40):  # 40 cells, one per frame 60..99: all after the first 60 frames
        many[60 + i, 0, i] = i + 1
    idx = choose_frames(100, 12, many)
    assert len(idx) == 12 and (idx >= 60).sum() >= 6  # labelled frames first
    assert choose_frames(5, 12).tolist() == [0, 1, 2, 3, 4]
    gt = np.zeros((10, 4, 4), np.uint16)
    gt[7, 1, 1] = 5  # ground truth counts as labelled too
    assert 7 in choose_frames(10, 3, None, gt)


def test_scale_bar_and_time_captions():
    from calseg.io.overlays import nice_length, scale_bar, time_text

    assert [nice_length(x) for x in (0.9, 1, 3.7, 47, 180)] == [0.5, 1, 2, 20, 100]
    length, label = scale_bar(256, 0.5, 2.0)  # 128 px at 0.5 um/px: 64 um wide tile
    assert label.replace("µ", "u") == "10 um" and length == pytest.approx(40.0)
    length, label = scale_bar(256, None, 1.0)
    assert label == "50 px (pixel size unknown)" and length == 50
    assert time_text(16, 0.5).replace("·", "-") == "frame 16 - 8 s"
    assert time_text(16, None) == "frame 16"


def test_random_weights_banner_and_traces_axis(tmp_path):
    frames, labels = _recording()
    plain = iio.imread(contact_sheet(frames, labels, tmp_path / "a.png", title="rec"))
    warned = iio.imread(
        contact_sheet(frames, labels, tmp_path / "b.png", title="rec", warning="RANDOM weights")
    )
    red = (warned[..., 0] > 180) & (warned[..., 1] < 60) & (warned[..., 2] < 60)
    assert (
        red.sum() > 1000
        and red.sum()
        > 20 * ((plain[..., 0] > 180) & (plain[..., 1] < 60) & (plain[..., 2] < 60)).sum()
    )
    traces = np.linspace(0, 2, frames.shape[0])[None]
    img = iio.imread(
        contact_sheet(
            frames, labels, tmp_path / "c.png", traces=traces, trace_ids=[9], frame_interval_s=0.5
        )  # fmt: skip
    )
    colour = label_colors(np.array(9))
    assert (np.abs(img.astype(int) - colour).sum(-1) == 0).sum() > 50  # cell 9's colour


def test_activity_image(tmp_path):
    from calseg.io.overlays import activity_image

    amap = np.zeros((20, 30), np.float32)
    amap[5:10, 5:10] = 12.0
    img = iio.imread(activity_image(amap, tmp_path / "a.png", threshold=5.0, title="x"))
    assert img.ndim == 3 and img.shape[1] > 256  # small maps upscaled
    with pytest.raises(ValueError, match="H, W"):
        activity_image(np.zeros((2, 3, 4)), tmp_path / "b.png")


def test_a_long_warning_wraps_inside_the_sheet(tmp_path):
    """The random-weights banner is wrapped to the sheet's width (it was clipped at the right
    edge: '... or configure a SA'): every line fits, no word is lost, and the red strip grows
    by one text line per extra line."""
    from calseg.io.overlays import _font, _wrap_to_width

    text = "SAM2 ran with RANDOM weights (no pretrained or trained checkpoint), " * 4
    font = _font(13)
    lines = _wrap_to_width(text, font, 468)
    assert len(lines) > 2 and all(font.getlength(x) <= 468 for x in lines)
    assert " ".join(lines) == " ".join(text.split())
    frames, labels = _recording()
    short, long_ = (
        iio.imread(contact_sheet(frames, labels, tmp_path / f"{i}.png", title="r", warning=w))
        for i, w in enumerate(("RANDOM weights", text))
    )
    rows = [((im[..., 0] > 180) & (im[..., 1] < 60) & (im[..., 2] < 60)).any(1).sum()
            for im in (short, long_)]  # fmt: skip
    assert rows[1] >= rows[0] + 17 * (len(_wrap_to_width(text, font, short.shape[1] - 12)) - 1)
    assert long_.shape[0] > short.shape[0]


def test_trace_caption_says_when_rows_are_a_selection():
    """Found by a new-user check: the page said "44 cells" and the sheet "dF/F of 40 cells"
    without saying the panel shows only the 40 largest peaks (MAX_TRACES_ON_SHEET)."""
    from calseg.io.overlays import trace_caption

    assert trace_caption("dF/F", 12) == "dF/F of 12 cells"
    assert trace_caption("dF/F", 1, 1) == "dF/F of 1 cell"
    assert trace_caption("dF/F", 40, 44) == "dF/F of the 40 cells with the largest peaks, of 44"


def test_a_pixel_at_the_float32_maximum_draws_white_without_overflow():
    """Found by a new-user check: a float32 recording with one pixel at the float32 maximum
    leaked "RuntimeWarning: overflow encountered in multiply" from the grey mapping."""
    import warnings

    frame = np.full((8, 8), 100.0, np.float32)
    frame[2, 3] = np.finfo(np.float32).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = render_overlay(frame, None, 0.0, 127.5)
    assert tuple(rgb[2, 3]) == (255, 255, 255) and tuple(rgb[0, 0]) == (200, 200, 200)


@pytest.mark.parametrize("value", [0.0, -3.0, 2.0**53, -(2.0**60), 1e300, 1.7e308, -1.7e308])
def test_display_range_of_a_flat_recording_is_never_empty(value):
    """A 9th attack run: a constant recording at |value| >= 2^53 got ``hi = lo + 1 == lo``,
    and its preview and every viewer frame answered 422 ("needs lo < hi")."""
    from calseg.io.overlays import _gray

    lo, hi = display_range(np.full((2, 4, 4), value))
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi
    assert lo <= value <= hi
    assert _gray(np.full((4, 4), value), lo, hi).dtype == np.uint8  # draws
