"""Tests of calseg.io.labels: lossless label stacks, uint16 (ImageJ) or uint32 on disk."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from calseg.io.labels import LabelStackError, read_label_stack, write_label_stack


def _labels(t: int = 4, h: int = 20, w: int = 24) -> np.ndarray:
    lab = np.zeros((t, h, w), dtype=np.uint32)
    lab[:, 2:6, 3:9] = 1
    lab[1:, 10:16, 12:20] = 42
    lab[2, 0:3, 20:24] = 65535
    return lab


def test_uint16_round_trip_is_imagej_hyperstack(tmp_path):
    lab = _labels()
    path = write_label_stack(tmp_path / "sub" / "labels.tif", lab)
    back = read_label_stack(path)
    assert back.dtype == np.uint32 and back.shape == lab.shape
    np.testing.assert_array_equal(back, lab)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej
        assert tf.series[0].dtype == np.uint16
        assert tf.series[0].axes == "TYX"
        assert tf.imagej_metadata["frames"] == 4
        assert tf.pages[0].compression == 8  # deflate: lossless and read by ImageJ


def test_ids_above_65535_are_written_as_uint32(tmp_path):
    lab = _labels()
    lab[3, 18:20, 0:4] = 70_000
    path = write_label_stack(tmp_path / "big_ids.tif", lab)
    with tifffile.TiffFile(path) as tf:
        assert tf.series[0].dtype == np.uint32
    back = read_label_stack(path)
    np.testing.assert_array_equal(back, lab)
    assert int(back.max()) == 70_000


def test_2d_label_image_becomes_one_frame(tmp_path):
    lab2d = _labels()[2]
    back = read_label_stack(write_label_stack(tmp_path / "one.tif", lab2d))
    assert back.shape == (1, *lab2d.shape)
    np.testing.assert_array_equal(back[0], lab2d)


def test_bad_labels_are_refused(tmp_path):
    with pytest.raises(LabelStackError, match="negative"):
        write_label_stack(tmp_path / "neg.tif", np.full((2, 8, 8), -1, np.int32))
    with pytest.raises(LabelStackError, match="non-integer"):
        write_label_stack(tmp_path / "f.tif", np.full((8, 8), 0.5))
    with pytest.raises(LabelStackError, match=r"\(T, H, W\)"):
        write_label_stack(tmp_path / "4d.tif", np.zeros((2, 2, 8, 8), np.uint16))
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(LabelStackError, match="empty"):
        read_label_stack(empty)
