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


def _zero_tiles_tiff(path, shape: tuple[int, ...]) -> None:
    """A TIFF declaring ``shape`` uint32 ids, all zero, in zlib tiles: a few hundred kB."""
    tile = np.zeros((512, 512), np.uint32)
    planes = int(np.prod(shape[:-2]))
    n = planes * ((shape[-2] + 511) // 512) * ((shape[-1] + 511) // 512)
    tifffile.imwrite(
        path, (tile for _ in range(n)), shape=shape, dtype=np.uint32, tile=(512, 512),
        photometric="minisblack", compression="zlib",
    )  # fmt: skip


def test_a_label_file_that_does_not_fit_is_refused_from_its_header(tmp_path):
    """A new user's attack: a 3.7 MB label TIFF declaring 4 x 30000 x 30000 ids made
    `calseg analyze` allocate 13.4 GiB (a traceback), and a 0.9 MB one of 30000 x 30000 took
    4.5 GB and 18 s before 'do not fit the recording'. The shape is now checked against the
    recording before decoding (here 2 x 8000 x 8000, 512 MB as uint32)."""
    import resource

    path = tmp_path / "bomb.tif"
    _zero_tiles_tiff(path, (2, 8000, 8000))
    assert path.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LabelStackError, match=r"do not fit the recording \(20, 32, 32\)"):
        read_label_stack(path, fits=(20, 32, 32))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, grown_mb
    lab = _labels(20, 32, 32)
    ok = write_label_stack(tmp_path / "ok.tif", lab)
    assert read_label_stack(ok, fits=(20, 32, 32)).shape == (20, 32, 32)
    one = write_label_stack(tmp_path / "one.tif", lab[3])
    assert read_label_stack(one, fits=(20, 32, 32)).shape == (1, 32, 32)
    with pytest.raises(LabelStackError, match="do not fit"):
        read_label_stack(ok, fits=(19, 32, 32))


def test_label_files_are_read_confined_like_recordings(tmp_path):
    """Label TIFFs go through the recordings' TIFF opening: a directory chain that loops is
    refused in one line, and a file that is not a TIFF says so."""
    loop = tmp_path / "loop.tif"
    write_label_stack(loop, _labels(4, 8, 8)[:1])
    raw = bytearray(loop.read_bytes())
    first = int.from_bytes(raw[4:8], "little")
    n = int.from_bytes(raw[first : first + 2], "little")
    end = first + 2 + 12 * n
    raw[end : end + 4] = first.to_bytes(4, "little")  # the next directory is itself
    loop.write_bytes(bytes(raw))
    with pytest.raises(LabelStackError, match="loops back"):
        read_label_stack(loop)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(LabelStackError, match="junk.tif"):
        read_label_stack(junk)


def test_a_label_stack_larger_than_the_available_memory_is_refused_before_decoding(
    tmp_path, monkeypatch
):
    """Without a recording to fit (fits=None) the stack is still budgeted: its stored samples
    plus the uint32 copy against the machine's available memory, from the header."""
    import calseg.machine

    path = write_label_stack(tmp_path / "l.tif", _labels(4, 20, 24))  # uint16: 6 bytes per id
    need = 4 * 20 * 24 * 6
    monkeypatch.setattr(calseg.machine, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(LabelStackError, match="more than the .* available .nothing was decoded"):
        read_label_stack(path)
    monkeypatch.setattr(calseg.machine, "available_memory_bytes", lambda: need)
    assert read_label_stack(path).shape == (4, 20, 24)
