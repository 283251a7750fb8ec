"""Server-side frame rendering of the viewer (api.frames): overlay styles, colours, ground
truth modes and the display range, on small synthetic stacks with known pixel values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from api.frames import GAP_PX, SINGLE_ID, Stacks, range_headers, render_png
from calseg.io.overlays import label_colors


def _stacks() -> Stacks:
    frames = np.zeros((2, 10, 12), np.uint16)
    frames[:, :, 6:] = 1000  # left half dark, right half bright
    labels = np.zeros((2, 10, 12), np.uint32)
    labels[0, 2:7, 1:5] = 3  # cell 3: rows 2-6, columns 1-4
    labels[0, 2:7, 7:11] = 9
    gt = np.zeros_like(labels)
    gt[0, 1:9, 1:11] = 1
    return Stacks(frames, labels, gt, lo=0.0, hi=1000.0, vmin=0.0, vmax=1000.0)


def _img(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_styles_alpha_and_colours() -> None:
    s = _stacks()
    plain = _img(render_png(s, 0, overlay=False))
    assert plain[0, 0].tolist() == [0, 0, 0] and plain[0, 11].tolist() == [255, 255, 255]
    fill = _img(render_png(s, 0, style="fill", alpha=1.0))
    c3 = label_colors(np.array([3]))[0].tolist()
    assert fill[4, 2].tolist() == c3 and fill[2, 1].tolist() == c3  # inside and on the edge
    outline = _img(render_png(s, 0, style="outline", alpha=1.0))
    assert outline[2, 1].tolist() == c3  # the edge drawn ...
    assert outline[4, 2].tolist() == [0, 0, 0]  # ... the inside left as the frame
    half = _img(render_png(s, 0, style="fill", alpha=0.5))
    assert half[4, 2].tolist() == np.rint(0.5 * np.array(c3)).astype(int).tolist()
    single = _img(render_png(s, 0, style="fill", alpha=1.0, colors="single"))
    cs = label_colors(np.array([SINGLE_ID]))[0].tolist()
    assert single[4, 2].tolist() == cs and single[4, 8].tolist() == cs
    inst = _img(render_png(s, 0, style="fill", alpha=1.0))
    assert inst[4, 2].tolist() != inst[4, 8].tolist()  # two cells, two colours


def test_ground_truth_modes_and_display_range() -> None:
    s = _stacks()
    beside = _img(render_png(s, 0, gt=1, style="fill", alpha=1.0))
    assert beside.shape == (10, 2 * 12 + GAP_PX, 3)
    assert (beside[:, 12 : 12 + GAP_PX] == 255).all()
    c1 = label_colors(np.array([1]))[0].tolist()
    assert beside[1, 12 + GAP_PX + 1].tolist() == c1  # gt cell 1 in the right panel
    instead = _img(render_png(s, 0, gt=2, style="fill", alpha=1.0))
    assert instead.shape == (10, 12, 3) and instead[1, 1].tolist() == c1
    narrow = _img(render_png(s, 1, overlay=False, lo=0, hi=2000))
    assert narrow[0, 11].tolist() == [128, 128, 128]  # 1000 of 0..2000 -> mid gray
    low = _img(render_png(s, 1, overlay=False, lo=999, hi=1000))
    assert low[0, 11].tolist() == [255, 255, 255] and low[0, 0].tolist() == [0, 0, 0]
    # (lo=1e308 with hi=inf drew an all-black frame with 200: a new-user check; so did
    # lo=-1e308 with hi=1e308, whose width overflows: a 12th attack run)
    for bad in ({"lo": 5, "hi": 5}, {"alpha": 1.5}, {"style": "x"}, {"colors": "x"},
                {"lo": 1e308, "hi": float("inf")}, {"lo": float("nan"), "hi": 5},
                {"lo": -1e308, "hi": 1e308}):  # fmt: skip
        with pytest.raises(ValueError):
            render_png(s, 0, **bad)
    h = range_headers(s)
    assert (h["X-Display-Lo"], h["X-Display-Hi"], h["X-Data-Max"], h["X-Frames"]) == (
        "0",
        "1000",
        "1000",
        "2",
    )


def test_the_data_range_of_a_frame_is_its_own_at_any_scale() -> None:
    """An 11th attack run: a preview of float data of about 1e-28 reported X-Data-Max 1e-06
    (the range was widened to at least 1e-6 in the data's units). The maximum is the frame's
    own; only a flat frame gets a range around its value."""
    from api.frames import frame_ranges

    frame = np.linspace(0.0, 2.5e-28, 64, dtype=np.float32).reshape(8, 8)
    _, _, vmin, vmax = frame_ranges(frame)
    assert vmin == 0.0 and vmax == pytest.approx(2.5e-28, rel=1e-6)
    _, _, vmin, vmax = frame_ranges(np.full((8, 8), 7.0, np.float32))
    assert (vmin, vmax) == (7.0, 8.0)


def test_a_jobs_recorded_flat_data_range_is_widened_as_a_previews(tmp_path) -> None:
    """A 12th attack run: an infer job of a constant recording said X-Data-Min = X-Data-Max
    = 7 (its recorded range, not widened), where the recording's preview said 7..8."""
    import tifffile

    from api.frames import load_stacks

    tifffile.imwrite(tmp_path / "f.tif", np.full((3, 8, 8), 7, np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", np.zeros((3, 8, 8), np.uint32), photometric="minisblack")
    stacks = load_stacks(
        tmp_path / "f.tif", tmp_path / "l.tif", None, simulated=True,
        display_range=(7.0, 8.0), data_range=(7.0, 7.0),
    )  # fmt: skip
    h = range_headers(stacks)
    assert (h["X-Data-Min"], h["X-Data-Max"]) == ("7", "8"), h
