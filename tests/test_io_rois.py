"""Tests of calseg.io.rois: ImageJ ROI zips <-> label images, on synthetic and real ROI sets."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import roifile
from skimage.draw import disk

from calseg.io.recordings import read_recording
from calseg.io.rois import RoiError, read_imagej_rois, write_imagej_rois


def _synthetic() -> np.ndarray:
    lab = np.zeros((40, 50), dtype=np.uint32)
    rr, cc = disk((12, 12), 8, shape=lab.shape)
    lab[rr, cc] = 3
    lab[25:35, 30:48] = 7  # rectangle
    lab[0:6, 40:50] = 11  # touches the top and right border
    lab[20:23, 5:6] = 20  # thin 1-px-wide bar
    return lab


def test_round_trip_is_exact_for_simple_shapes(tmp_path):
    lab = _synthetic()
    path = write_imagej_rois(lab, tmp_path / "RoiSet.zip")
    assert path.suffix == ".zip"
    with zipfile.ZipFile(path) as zf:
        assert len(zf.namelist()) == 4
    rois = roifile.ImagejRoi.fromfile(path)
    assert [r.name for r in rois] == ["label-3", "label-7", "label-11", "label-20"]
    assert all(r.roitype == roifile.ROI_TYPE.POLYGON for r in rois)
    rect = rois[1].coordinates()
    assert len(rect) == 4  # collinear vertices removed: a rectangle has 4 corners
    back = read_imagej_rois(path, lab.shape)
    assert back.dtype == np.uint32 and back.shape == lab.shape
    np.testing.assert_array_equal(back, lab)


def test_hole_and_split_label_keep_largest_outline(tmp_path):
    lab = np.zeros((30, 30), dtype=np.uint16)
    lab[5:15, 5:15] = 1
    lab[9:11, 9:11] = 0  # hole: the polygon fills it on read-back
    lab[20:22, 20:22] = 2
    lab[22:25, 22:25] = 2  # two diagonal pieces: the larger (3 x 3) is written
    back = read_imagej_rois(write_imagej_rois(lab, tmp_path / "r.zip"), lab.shape)
    assert (back == 1).sum() == 100
    assert (back == 2).sum() == 9 and (back[22:25, 22:25] == 2).all()


def test_real_fissa_rois(real_file):
    rec = read_recording(real_file("fissa_b_AVG_A01.tif"))
    labels = read_imagej_rois(real_file("fissa_b_rois.zip"), rec.frames.shape[1:])
    assert labels.shape == (21, 14)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert ids.tolist() == [1, 2]
    assert counts.tolist() == [22, 37]
    assert labels[:, -1].any()  # the ROI that touches the border reaches the last column


def test_real_sima_rois(real_file):
    rec = read_recording(real_file("sima_example.tif"), max_frames=1)
    labels = read_imagej_rois(real_file("sima_example_imageJ_ROIs.zip"), rec.frames.shape[1:])
    assert labels.shape == (128, 256)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert ids.tolist() == [1, 2]
    # freehand outlines spanning x 75..96 / 33..50 and y 76..98 / 43..56 (from the zip)
    assert 300 < counts[0] < 420 and 150 < counts[1] < 250
    ys, xs = np.nonzero(labels == 2)
    assert xs.min() >= 33 and xs.max() < 50 and ys.min() >= 43 and ys.max() < 56


def test_bad_roi_files(tmp_path):
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    with pytest.raises(RoiError, match="empty"):
        read_imagej_rois(empty, (10, 10))
    junk = tmp_path / "junk.zip"
    junk.write_text("not a zip")
    with pytest.raises(RoiError, match="not an ImageJ ROI"):
        read_imagej_rois(junk, (10, 10))
    no_rois = tmp_path / "no_rois.zip"
    with zipfile.ZipFile(no_rois, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(RoiError):
        read_imagej_rois(no_rois, (10, 10))
    far = roifile.ImagejRoi.frompoints(np.array([[500, 500], [510, 500], [510, 510]]))
    far_path = tmp_path / "far.roi"
    far.tofile(far_path)
    with pytest.raises(RoiError, match="different"):
        read_imagej_rois(far_path, (20, 20))
    with pytest.raises(RoiError, match="no label"):
        write_imagej_rois(np.zeros((8, 8), np.uint16), tmp_path / "none.zip")


def test_rois_past_the_16_bit_coordinate_range_keep_their_place(tmp_path):
    """A 12th attack run: a cell at x = 66000 of a 70000 px wide recording was written at
    left = 464 (66000 - 65536): the ROI format's bounds and integer coordinates are 16-bit.
    Such ROIs carry sub-pixel (float, absolute) coordinates; ROIs inside 32767 px stay in
    the integer form ImageJ fills exactly."""
    labels = np.zeros((16, 70000), np.uint16)
    labels[4:9, 66000:66006] = 1  # past 65535: wrapped before
    labels[2:6, 40000:40003] = 2  # 32768-65535: read as negative by the format's int16
    labels[10:14, 100:104] = 3
    path = write_imagej_rois(labels, tmp_path / "wide.zip")
    np.testing.assert_array_equal(read_imagej_rois(path, labels.shape), labels)
    rois = {r.name: r for r in roifile.roiread(path)}
    for name, x0 in (("label-1", 66000), ("label-2", 40000)):
        assert rois[name].options & roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION, name
        assert rois[name].subpixel_coordinates[:, 0].min() == x0
    assert not rois["label-3"].options & roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
