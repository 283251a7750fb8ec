"""Tests of calseg.io.recordings on the real recordings and on synthetic files (bad ones too)."""

from __future__ import annotations

import os
import struct

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from calseg.io.recordings import (
    MIN_FRAME_SIDE,
    Recording,
    RecordingError,
    RecordingInfo,
    iter_recording,
    natural_sort_key,
    probe_recording,
    read_recording,
)


def stack(t: int = 5, h: int = 24, w: int = 32, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=(t, h, w)).astype(dtype)


# ------------------------------------------------------------------------- real recordings


def test_real_sima_example(real_file):
    path = real_file("sima_example.tif")
    info = probe_recording(path)
    assert (info.n_frames, info.height, info.width) == (20, 128, 256)
    assert info.dtype == "uint16" and info.axes == "TYX" and info.format == "imagej-tiff"
    assert info.header_frames is None
    assert info.pixel_size_um is None  # 72 dpi inch resolution is not a calibration
    rec = read_recording(path)
    assert rec.frames.shape == (20, 128, 256) and rec.frames.dtype == np.uint16
    assert int(rec.frames.max()) == 4094  # documented range 0..4094
    np.testing.assert_array_equal(rec.frames, tifffile.imread(path))


def test_real_badmeta_header_lies_about_frame_count(real_file):
    path = real_file("sima_example-tiffs_0_badmeta.tif")
    info = probe_recording(path)
    assert info.n_frames == 1 and (info.height, info.width) == (173, 173)
    assert info.header_frames == 3500
    assert any("3500" in w and "holds 1" in w for w in info.warnings)
    rec = read_recording(path)
    assert rec.frames.shape == (1, 173, 173) and rec.frames.dtype == np.uint16
    assert rec.info.header_frames == 3500
    with tifffile.TiffFile(path) as tf:
        np.testing.assert_array_equal(rec.frames[0], tf.pages[0].asarray())


@pytest.mark.parametrize(
    "name", ["fissa_b_AVG_A01.tif", "fissa_b_AVG_A02.tif", "fissa_b_AVG_A03.tif"]
)
def test_real_fissa_tiny_frames(name, real_file):
    rec = read_recording(real_file(name))
    # (the three trials all hold 29 frames of 21 x 14 px)
    assert rec.frames.shape == (29, 21, 14) and rec.frames.dtype == np.uint16
    assert rec.info.axes == "TYX" and rec.info.file_axes == "QYX"
    assert rec.frames.min() >= 36


def test_real_astrocast_slices_and_calibration(real_file):
    path = real_file("astrocast_sample_1.tiff")
    rec = read_recording(path)
    raw = tifffile.imread(path)
    assert raw.shape == (75, 100, 100) and raw.dtype == np.uint16
    assert rec.frames.shape == (75, 100, 100)
    # ImageJ calibration c0 = -32768, c1 = 1: signed data stored unsigned
    assert rec.frames.dtype == np.float32
    np.testing.assert_array_equal(rec.frames, raw.astype(np.float32) - 32768)
    assert rec.frames.min() >= 0 and rec.frames.max() < 100
    assert rec.info.file_axes == "ZYX" and rec.info.axes == "TYX"
    assert rec.info.pixel_size_um == pytest.approx(1.0)
    assert any("slices" in w for w in rec.info.warnings)
    assert any("calibration" in w for w in rec.info.warnings)


def test_real_astrocast_hdf5(real_file):
    path = real_file("astrocast_sample_1_dff.h5")
    info = probe_recording(path)
    assert (info.n_frames, info.height, info.width, info.dtype) == (75, 100, 100, "uint16")
    assert info.format == "hdf5" and info.pixel_size_um == pytest.approx(1.0)
    rec = read_recording(f"{path}:/dff/ch0", max_frames=10)
    assert rec.frames.shape == (10, 100, 100)
    assert any("first 10 of 75" in w for w in rec.info.warnings)


# ------------------------------------------------------------------------ synthetic: good


def test_plain_tiff_round_trip_and_max_frames(tmp_path):
    data = stack(7)
    path = tmp_path / "rec.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    rec = read_recording(path)
    assert isinstance(rec, Recording) and isinstance(rec.info, RecordingInfo)
    np.testing.assert_array_equal(rec.frames, data)
    part = read_recording(path, max_frames=3)
    np.testing.assert_array_equal(part.frames, data[:3])
    assert part.info.n_frames == 3
    d = probe_recording(path).to_dict()
    assert d["n_frames"] == 7 and d["stored_shape"] == [7, 24, 32]


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_iter_recording_chunks(tmp_path, compression):
    data = stack(10, 16, 16)
    path = tmp_path / "long.tif"
    tifffile.imwrite(path, data, photometric="minisblack", compression=compression)
    chunks = list(iter_recording(path, chunk_frames=4))
    assert [t0 for t0, _ in chunks] == [0, 4, 8]
    assert [c.shape[0] for _, c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), data)
    with pytest.raises(RecordingError, match="chunk_frames"):
        next(iter_recording(path, chunk_frames=0))


def test_compressed_tiff_reads_pages(tmp_path):
    data = stack(6)
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib")
    np.testing.assert_array_equal(read_recording(path, max_frames=4).frames, data[:4])


def test_bigtiff(tmp_path):
    data = stack(4)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, bigtiff=True, photometric="minisblack")
    info = probe_recording(path)
    assert info.format == "bigtiff" and info.n_frames == 4
    np.testing.assert_array_equal(read_recording(path).frames, data)


def test_uint16_near_max_never_wraps(tmp_path):
    data = np.full((3, 16, 16), 65530, dtype=np.uint16)
    data[1, 4:8, 4:8] = 65535
    path = tmp_path / "sat.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    rec = read_recording(path)
    assert rec.frames.dtype == np.uint16
    assert int(rec.frames.min()) == 65530 and int(rec.frames.max()) == 65535
    assert any("16 pixels at the uint16 maximum 65535" in w for w in rec.info.warnings)


def test_float_nan_inf_kept_and_counted(tmp_path):
    data = np.random.default_rng(1).random((4, 16, 16)).astype(np.float64)
    data[0, :2, :] = np.nan  # 32 NaN (a NaN border)
    data[2, 5, 5] = np.inf
    data[3, 6, 6] = -np.inf
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    rec = read_recording(path)
    assert rec.frames.dtype == np.float32
    assert np.isnan(rec.frames).sum() == 32 and np.isinf(rec.frames).sum() == 2
    assert any("32 NaN and 2 Inf" in w for w in rec.info.warnings)


def test_rgb_frames_to_grayscale(tmp_path):
    rgb = np.zeros((3, 16, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure red: luma 0.299 * 200 = 59.8 -> 60
    rgb[1, ..., 1] = 100  # + green: 59.8 + 58.7 = 118.5 -> 118 (round half to even) or 119
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    rec = read_recording(path)
    assert rec.frames.shape == (3, 16, 20) and rec.frames.dtype == np.uint8
    assert int(rec.frames[0, 0, 0]) == 60
    assert int(rec.frames[1, 0, 0]) in (118, 119)
    assert rec.info.axes == "TYXS"
    assert any("grayscale" in w for w in rec.info.warnings)


def test_5d_tzcyx_imagej_picks_channel_and_projects_z(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, size=(4, 3, 2, 16, 20)).astype(np.uint16)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.4, 1 / 0.4),
        metadata={"axes": "TZCYX", "finterval": 0.5, "unit": "um"},
    )
    info = probe_recording(path)
    assert info.axes == "TZCYX" and info.n_frames == 4
    assert info.frame_interval_s == pytest.approx(0.5)
    assert info.pixel_size_um == pytest.approx(0.4)
    rec = read_recording(path, channel=1)
    np.testing.assert_array_equal(rec.frames, data[:, :, 1].max(axis=1))
    assert any("channel 1 of 2" in w for w in rec.info.warnings)
    assert any("projection over 3 Z" in w for w in rec.info.warnings)
    with pytest.raises(RecordingError, match="channel 2 does not exist"):
        read_recording(path, channel=2)


def test_ome_tiff_metadata(tmp_path):
    data = stack(5, 16, 20)[:, None]  # T C Y X with C = 1
    path = tmp_path / "rec.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "TCYX",
            "PhysicalSizeX": 650,
            "PhysicalSizeXUnit": "nm",
            "TimeIncrement": 250,
            "TimeIncrementUnit": "ms",
        },
    )
    info = probe_recording(path)
    assert info.format == "ome-tiff" and info.n_frames == 5
    assert info.pixel_size_um == pytest.approx(0.65)
    assert info.frame_interval_s == pytest.approx(0.25)
    np.testing.assert_array_equal(read_recording(path).frames, data[:, 0])


def test_ambiguous_4d_needs_axes_override(tmp_path):
    data = stack(6, 16, 20).reshape(3, 2, 16, 20)
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with pytest.raises(RecordingError, match="ambiguous.*--axes"):
        probe_recording(path)
    rec = read_recording(path, axes="TZYX")
    np.testing.assert_array_equal(rec.frames, data.max(axis=1))
    rec = read_recording(path, axes="TCYX", channel=1)
    np.testing.assert_array_equal(rec.frames, data[:, 1])
    with pytest.raises(RecordingError, match="one letter per dimension"):
        read_recording(path, axes="TYX")
    with pytest.raises(RecordingError, match="not valid"):
        read_recording(path, axes="TQYX")


def test_png_and_jpeg_single_frame(tmp_path):
    img16 = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100).astype(np.uint16)
    png = tmp_path / "frame.png"
    Image.fromarray(img16).save(png)
    rec = read_recording(png)
    assert rec.info.format == "png" and rec.frames.shape == (1, 20, 24)
    assert rec.frames.dtype == np.uint16
    np.testing.assert_array_equal(rec.frames[0], img16)
    jpg = tmp_path / "frame.jpg"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(jpg)
    rec = read_recording(jpg)
    assert rec.frames.shape == (1, 20, 24) and rec.frames.dtype == np.uint8
    assert abs(int(rec.frames[0, 10, 10]) - 128) <= 2
    assert any("lossy" in w for w in rec.info.warnings)


def test_folder_of_frames_sorted_naturally(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(11):  # f1 .. f11: natural order differs from string order
        tifffile.imwrite(folder / f"f{t + 1}.tif", np.full((16, 18), t, np.uint16))
    (folder / "notes.txt").write_text("acquisition notes")
    info = probe_recording(folder)
    assert info.format == "folder" and info.n_frames == 11
    assert any("ignored 1" in w for w in info.warnings)
    rec = read_recording(folder, max_frames=11)
    np.testing.assert_array_equal(rec.frames[:, 0, 0], np.arange(11))
    assert natural_sort_key("f2.tif") < natural_sort_key("f10.tif")
    tifffile.imwrite(folder / "f12.tif", np.zeros((16, 20), np.uint16))
    with pytest.raises(RecordingError, match="f12.tif has shape"):
        read_recording(folder)


def test_hdf5_first_3d_and_named_dataset(tmp_path):
    data = stack(6, 16, 16)
    path = tmp_path / "rec.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("meta/times", data=np.arange(6.0))
        h5.create_dataset("raw/green", data=data)
        h5.create_dataset("raw/red", data=data[::-1]).attrs["frame_interval_s"] = 0.1
    rec = read_recording(path)
    np.testing.assert_array_equal(rec.frames, data)
    assert any("/raw/red" in w for w in rec.info.warnings)
    rec = read_recording(f"{path}:/raw/red")
    np.testing.assert_array_equal(rec.frames, data[::-1])
    assert rec.info.frame_interval_s == pytest.approx(0.1)
    with pytest.raises(RecordingError, match="no dataset '/raw/blue'.*raw/green"):
        read_recording(f"{path}:/raw/blue")


def test_an_interval_from_metadata_that_is_not_finite_is_unknown(tmp_path):
    """A tenth attack run: an HDF5 ``fps`` of 1e-310 gave a frame interval of inf, stored as
    JSON ``Infinity`` on SQLite and refused by PostgreSQL (422 at upload for a valid file).
    An interval or pixel size that is not a positive finite number is unknown, whichever
    reader derived it."""
    data = stack(6, 16, 16)
    for fps, expected in ((1e-310, None), (4.0, 0.25), (float("nan"), None), (-2.0, None)):
        path = tmp_path / "fps.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("data", data=data).attrs["fps"] = fps
        info = probe_recording(path)
        assert info.frame_interval_s == (None if expected is None else pytest.approx(expected))
        assert read_recording(path).info.frame_interval_s == info.frame_interval_s
    info = RecordingInfo("x.tif", "tiff", 6, 16, 16, "uint16", "TYX",
                         frame_interval_s=float("inf"), pixel_size_um=0.0)  # fmt: skip
    assert info.frame_interval_s is None and info.pixel_size_um is None


def test_file_axes_that_cannot_be_right_are_not_used_and_say_so(tmp_path):
    """A tenth attack run: an HDF5 axes attribute "YYX" gave a 422 calling the file "probably
    damaged", and "SYX" (S of 6, not colour samples) was read as TYX without a word. Both are
    read from the shape now, each with a warning that names the file's axes."""
    data = stack(6, 16, 16)
    for axes, words in (
        ("YYX", "name a dimension twice"),
        ("SYX", "colour samples (S)"),
        ("TYXQ", "does not fit its 3-D shape"),  # an 11th attack run: ignored without a word
    ):
        path = tmp_path / f"{axes}.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("data", data=data).attrs["axes"] = axes
        rec = read_recording(path)
        assert rec.info.axes == "TYX" and rec.frames.shape == (6, 16, 16)
        assert any(words in w and repr(axes) in w for w in rec.info.warnings), rec.info.warnings


def test_npy_and_content_sniffing(tmp_path):
    data = stack(3, 16, 16)
    npy = tmp_path / "rec.npy"
    np.save(npy, data)
    np.testing.assert_array_equal(read_recording(npy).frames, data)
    # a TIFF named .png is read as TIFF, with a warning
    mislabelled = tmp_path / "rec.png"
    tifffile.imwrite(mislabelled, data, photometric="minisblack")
    rec = read_recording(mislabelled)
    np.testing.assert_array_equal(rec.frames, data)
    assert any("content is TIFF" in w for w in rec.info.warnings)


def test_signed_and_constant_data(tmp_path):
    data = np.full((2, 16, 16), -5, dtype=np.int16)
    path = tmp_path / "signed.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    rec = read_recording(path)
    assert rec.frames.dtype == np.float32 and float(rec.frames.min()) == -5.0
    assert any("int16 read as float32" in w for w in rec.info.warnings)
    assert any("constant" in w for w in rec.info.warnings)


def test_avi_video(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "rec.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write MJPG AVI here")
    for t in range(5):
        writer.write(np.full((24, 32, 3), 40 * t + 20, np.uint8))
    writer.release()
    rec = read_recording(path)
    assert rec.info.format == "video"
    assert rec.frames.shape == (5, 24, 32) and rec.frames.dtype == np.uint8
    np.testing.assert_allclose(rec.frames[:, 12, 16], 40 * np.arange(5) + 20, atol=4)
    assert rec.info.frame_interval_s == pytest.approx(0.1)


def _mpeg4_video(path, n_frames: int, n_streams: int = 1) -> None:
    """A video of ``n_streams`` MPEG-4 Part 2 streams of ``n_frames`` black 16 x 16 frames
    (container from ``path``'s suffix)."""
    import av

    with av.open(str(path), "w") as c:
        streams = [c.add_stream("mpeg4", rate=10) for _ in range(n_streams)]
        for s in streams:
            s.height, s.width, s.pix_fmt = 16, 16, "yuv420p"
        for _ in range(n_frames):
            for s in streams:
                img = np.zeros((16, 16, 3), np.uint8)
                for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(packet)
        for s in streams:
            for packet in s.encode():
                c.mux(packet)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # frame count in the header / counted
def test_a_video_of_too_many_frames_is_refused(tmp_path, monkeypatch, suffix):
    """Found by a new user's attack run (2026-12-07): video frames decode in order, about
    48 us each even when tiny, and the pixel budget let a video of small frames hold millions
    of them (the upload check and a preview of the last frame decode them all, in the API).
    Over MAX_VIDEO_FRAMES frames a video is refused, whether its header counts them or not.
    (Writing this test found that no small MPEG-4 Part 2 video could be read: the decoder's
    scratch images need 53,760 px, over the frame cap the reader gave it.)"""
    pytest.importorskip("av")
    import calseg.io.file_safety as file_safety

    path = tmp_path / f"rec{suffix}"
    _mpeg4_video(path, 40)
    assert probe_recording(path).n_frames == 40
    assert read_recording(path).frames.shape == (40, 16, 16)
    monkeypatch.setattr(file_safety, "MAX_VIDEO_FRAMES", 39)
    with pytest.raises(RecordingError, match="frames; CalSeg reads at most 39 frames of a video"):
        probe_recording(path)


def test_an_mp4_declaring_millions_of_samples_is_refused_before_ffmpeg_opens_it(tmp_path):
    """Found by a second attack run (2026-12-07): an MP4 whose ``stsz`` declares 6e7 samples
    of one constant size (975 bytes, no table) took FFmpeg to 4.1 GB while opening it, before
    the frame limit could be checked. Samples are counted from the boxes first."""
    pytest.importorskip("av")
    path = tmp_path / "rec.mp4"
    _mpeg4_video(path, 5)
    assert probe_recording(path).n_frames == 5
    raw = bytearray(path.read_bytes())
    at = raw.index(b"stsz") + 12  # version/flags, sample size, then the sample count
    assert struct.unpack(">I", raw[at : at + 4])[0] == 5
    raw[at : at + 4] = struct.pack(">I", 60_000_000)
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match="boxes declare 60,000,000 samples in all"):
        probe_recording(path)


@pytest.mark.parametrize("n_streams, readable", [(2, True), (5, False)])
def test_a_video_of_many_streams_is_refused(tmp_path, n_streams, readable):
    """Found by a third attack run (2026-12-07): FFmpeg decodes a packet of every stream while
    it reads the header, and a PNG stream allocates the frame its header declares: 8 streams
    in a 2 kB AVI took 2.2 GB, and streams past the first 64 had no frame cap at all (16 kB:
    4.1 GB). FFmpeg is told MAX_VIDEO_STREAMS: the AVI demuxer then refuses the file (the
    Matroska one reads the first 4 tracks), before any stream is decoded."""
    pytest.importorskip("av")
    path = tmp_path / "streams.avi"
    _mpeg4_video(path, 3, n_streams)
    if readable:
        assert probe_recording(path).n_frames == 3
    else:
        with pytest.raises(RecordingError, match="FFmpeg cannot open it"):
            probe_recording(path)


def test_a_video_is_charged_its_decoder_bytes_per_pixel(tmp_path):
    """Found by a third attack run (2026-12-07): 64 frames of 16-bit RGBA PNG (4720^2) in a
    185 kB MP4 were charged as RGB24 (3 bytes a pixel) and took 19 s for one preview of the
    last frame. The budget counts what the decoder produces: 8 bytes a pixel here."""
    av = pytest.importorskip("av")
    from calseg.io.recordings import ReadLimits, RecordingTooLarge

    path = tmp_path / "rgba64.mov"
    with av.open(str(path), "w") as c:
        s = c.add_stream("png", rate=10)
        s.height, s.width, s.pix_fmt = 32, 32, "rgba64be"
        for _ in range(3):
            img = np.zeros((32, 32, 4), np.uint16)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgba64le")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    assert probe_recording(path, limits=ReadLimits(max_bytes=3 * 32 * 32 * 8)).n_frames == 3
    with pytest.raises(RecordingTooLarge, match="24,576 bytes"):
        probe_recording(path, limits=ReadLimits(max_bytes=3 * 32 * 32 * 8 - 1))


# ------------------------------------------------------------------------ synthetic: bad


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(RecordingError, match=r"empty \(0 bytes\).*copy the file again"):
        probe_recording(path)


def test_non_image_with_tif_name(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("frame,intensity\n0,12\n")
    with pytest.raises(RecordingError, match="not a valid TIFF.*looks like text"):
        read_recording(path)


def test_truncated_tiff(tmp_path):
    for kw in ({}, {"compression": "zlib"}, {"imagej": True}):
        full = tmp_path / "full.tif"
        tifffile.imwrite(full, stack(10, 32, 32), photometric="minisblack", **kw)
        raw = full.read_bytes()
        cut = tmp_path / "cut.tif"
        cut.write_bytes(raw[: int(len(raw) * 0.6)])
        with pytest.raises(RecordingError, match="truncated.*copy"):
            probe_recording(cut)
        with pytest.raises(RecordingError, match="truncated"):
            read_recording(cut)


def test_truncated_within_last_page(tmp_path):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, stack(4, 32, 32), photometric="minisblack", compression="zlib")
    raw = full.read_bytes()
    # find the last page's data and cut into it, keeping every image directory intact
    with tifffile.TiffFile(full) as tf:
        off, cnt = tf.pages[-1].dataoffsets[0], tf.pages[-1].databytecounts[0]
    if off + cnt < len(raw) - 200:
        pytest.skip("layout differs: last page data not at the end")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: off + cnt // 2])
    with pytest.raises(RecordingError, match="truncated"):
        probe_recording(cut)


def test_unsupported_extension_and_missing(tmp_path):
    path = tmp_path / "rec.oib"  # Olympus OIB: no reader here
    path.write_bytes(b"\xd0\xcf\x11\xe0" + bytes(100))
    with pytest.raises(RecordingError, match="unsupported file format '.oib'.*TIFF"):
        probe_recording(path)
    czi = tmp_path / "rec.czi"  # a CZI goes to bioio (optional extra); the test machine lacks it
    czi.write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(RecordingError, match=r"rec.czi.*(bioio|TIFF)"):
        probe_recording(czi)
    with pytest.raises(RecordingError, match="no such file"):
        probe_recording(tmp_path / "absent.tif")


def test_zero_frames(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("rec", shape=(0, 16, 16), dtype=np.uint16)
    with pytest.raises(RecordingError, match="0 frames"):
        probe_recording(path)
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(RecordingError, match="0 frames"):
        probe_recording(folder)


def test_frames_too_small(tmp_path):
    path = tmp_path / "line.tif"
    tifffile.imwrite(path, stack(5, MIN_FRAME_SIDE - 1, 40), photometric="minisblack")
    with pytest.raises(RecordingError, match=f"too small \\(minimum {MIN_FRAME_SIDE}"):
        probe_recording(path)
    ok = tmp_path / "ok.tif"
    tifffile.imwrite(ok, stack(2, MIN_FRAME_SIDE, MIN_FRAME_SIDE), photometric="minisblack")
    assert probe_recording(ok).height == MIN_FRAME_SIDE


def test_garbage_after_tiff_header(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 10**9) + os.urandom(64))
    with pytest.raises(RecordingError, match="damaged or truncated"):
        probe_recording(path)


def test_imagej_without_axes_many_channels_read_as_frames(tmp_path):
    data = stack(12, 16, 16)
    path = tmp_path / "ij_noaxes.tif"
    tifffile.imwrite(path, data, imagej=True)  # tifffile tags this as 12 channels
    rec = read_recording(path)
    np.testing.assert_array_equal(rec.frames, data)
    assert rec.info.file_axes == "CYX" and rec.info.axes == "TYX"
    assert any("12 channels" in w for w in rec.info.warnings)
    two = tmp_path / "two_channels.tif"
    tifffile.imwrite(two, data[:2], imagej=True, metadata={"axes": "CYX"})
    rec = read_recording(two, channel=1)
    assert rec.frames.shape == (1, 16, 16)
    np.testing.assert_array_equal(rec.frames[0], data[1])
    # a few images with no axes are channels too (the file says so): one frame, and the note
    # says how to read them as frames (a user's 3-frame stack gave one frame and no hint)
    few = tmp_path / "few_noaxes.tif"
    tifffile.imwrite(few, data[:3], imagej=True)
    rec = read_recording(few)
    assert rec.frames.shape == (1, 16, 16) and rec.info.axes == "CYX"
    assert any("one frame" in w and "--axes TYX" in w for w in rec.info.warnings), rec.info
    rec = read_recording(few, axes=rec.info.warnings[0].rsplit("--axes ", 1)[1].split()[0])
    np.testing.assert_array_equal(rec.frames, data[:3])


def test_interleaved_channels(tmp_path):
    data = stack(12, 16, 16)  # images alternate c0, c1, c2, c0, ...
    path = tmp_path / "interleaved.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    rec = read_recording(path, interleaved_channels=3, channel=2)
    np.testing.assert_array_equal(rec.frames, data[2::3])
    assert rec.info.n_frames == 4
    part = read_recording(path, interleaved_channels=3, channel=1, max_frames=2)
    np.testing.assert_array_equal(part.frames, data[1:6:3])
    with pytest.raises(RecordingError, match="not a multiple of 5"):
        read_recording(path, interleaved_channels=5)


def test_non_ascii_and_dotted_names(tmp_path):
    folder = tmp_path / "Zellen ü" / ".." / "Zellen ü"
    (tmp_path / "Zellen ü").mkdir()
    path = folder / "Aufnahme-µ_ü.tif"
    data = stack(2, 16, 16)
    tifffile.imwrite(path, data, photometric="minisblack")
    np.testing.assert_array_equal(read_recording(path).frames, data)


def test_no_video_decoder_gives_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # as on a machine without PyAV
    path = tmp_path / "rec.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(RecordingError, match="no installed video decoder.*pip install av"):
        probe_recording(path)


def test_damaged_video_message_names_no_server_path(tmp_path):
    path = tmp_path / "rec.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(RecordingError, match="rec.mp4: FFmpeg cannot open it") as err:
        probe_recording(path)
    assert str(tmp_path) not in str(err.value)


def test_planar_rgb_three_frame_stack_hint_and_override(tmp_path):
    data = stack(3, 16, 16)
    path = tmp_path / "three.tif"
    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    info = probe_recording(path)
    assert info.n_frames == 1 and any("--axes TYX" in w for w in info.warnings)
    np.testing.assert_array_equal(read_recording(path, axes="TYX").frames, data)


# ------------------------------------------------------------- frames read wrong (issue 13)


def test_tiff_written_one_series_per_frame_reads_every_frame(tmp_path):
    """``TiffWriter.write()`` called once per frame leaves 30 one-image series: 30 frames, in
    order, with a note; series of different shapes keep the old rule (the first series)."""
    data = stack(30, 40, 48)
    path = tmp_path / "loop.tif"
    with tifffile.TiffWriter(path) as tw:
        for frame in data:
            tw.write(frame)
    with tifffile.TiffFile(path) as tf:
        assert len(tf.series) == 30  # what the file is
    info = probe_recording(path)
    assert (info.n_frames, info.height, info.width) == (30, 40, 48)
    assert any("30 image series" in w for w in info.warnings)
    np.testing.assert_array_equal(read_recording(path).frames, data)
    chunks = list(iter_recording(path, chunk_frames=7))
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), data)
    mixed = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(mixed) as tw:
        tw.write(data[:3], photometric="minisblack")
        tw.write(data[0, :10, :10])
    assert probe_recording(mixed).n_frames == 3


def _two_channel(n_frames: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GCaMP-like channel (noise + a transient) and a dim static structural channel,
    interleaved c0, c1, c0, ... as 2 * n_frames images (the issue's 80-image file)."""
    rng = np.random.default_rng(seed)
    green = rng.poisson(300, (n_frames, 32, 32)).astype(np.uint16)
    green[10:14, 8:16, 8:16] += 900  # a calcium transient
    red = rng.poisson(60, (n_frames, 32, 32)).astype(np.uint16)
    images = np.stack([green, red], axis=1).reshape(-1, 32, 32)
    return images, green, red


def test_interleaved_channels_are_detected_and_can_be_split(tmp_path):
    images, green, red = _two_channel()
    path = tmp_path / "two_channels.tif"
    tifffile.imwrite(path, images, photometric="minisblack")
    info = probe_recording(path)
    assert info.n_frames == 80 and info.suspected_channels == 2
    assert any("--interleaved-channels 2 --channel 0..1" in w for w in info.warnings), info.warnings
    rec = read_recording(path)
    assert rec.info.suspected_channels == 2  # the full read says so too
    split = read_recording(path, interleaved_channels=2, channel=0)
    np.testing.assert_array_equal(split.frames, green)
    assert split.info.suspected_channels is None  # a choice was made: no warning
    np.testing.assert_array_equal(
        read_recording(path, interleaved_channels=2, channel=1).frames, red
    )


def test_an_interleave_that_cannot_be_read_is_not_offered(tmp_path, real_file):
    """Found by a new-user check: fissa_b_AVG_A02 (29 images) was told to read itself as 3
    interleaved channels, which the reader then refused (29 is no multiple of 3). The note now
    says the count does not fit, and offers no reading."""
    images, _, _ = _two_channel()
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, images[:79], photometric="minisblack")  # one image short
    for info in (probe_recording(path), read_recording(path).info):
        assert info.suspected_channels is None
        (w,) = [w for w in info.warnings if "interleaved" in w]
        assert "file's 79 images are no multiple of 2" in w and "--interleaved-channels" not in w
    fissa = read_recording(real_file("fissa_b_AVG_A02.tif")).info
    assert not any("--interleaved-channels" in w for w in fissa.warnings), fissa.warnings


def test_one_channel_recordings_are_not_called_interleaved(tmp_path, real_file):
    """No warning on single-channel data: random frames, a simulated-like drifting recording,
    and the real sima recording."""
    path = tmp_path / "noise.tif"
    tifffile.imwrite(path, stack(60, 32, 32), photometric="minisblack")
    assert probe_recording(path).suspected_channels is None
    _, green, _ = _two_channel(60)
    tifffile.imwrite(path, green, photometric="minisblack")
    assert probe_recording(path).suspected_channels is None
    sima = probe_recording(real_file("sima_example.tif"))
    assert sima.suspected_channels is None and not any("interleaved" in w for w in sima.warnings)


def test_interleave_scores_measure_alternation():
    from calseg.io.recordings import INTERLEAVE_THRESHOLD, interleave_scores

    images, green, _ = _two_channel()
    scores = interleave_scores(images)
    assert scores[2] > 10 * INTERLEAVE_THRESHOLD and scores[4] < INTERLEAVE_THRESHOLD
    three = np.stack([green, green // 2, green // 4], axis=1).reshape(-1, 32, 32)
    s3 = interleave_scores(three)
    assert s3[3] > INTERLEAVE_THRESHOLD and s3[2] < INTERLEAVE_THRESHOLD
    assert interleave_scores(np.zeros((12, 8, 8))) == {2: 0.0, 3: 0.0, 4: 0.0}
    assert interleave_scores(green[:5]) == {}  # too few images for any k


def test_read_limits_checked_before_decoding(tmp_path):
    from calseg.io.recordings import ReadLimits, RecordingReader, RecordingTooLarge

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack(20, 64, 64), photometric="minisblack")
    with pytest.raises(RecordingTooLarge, match=r"81,920 pixels .* limit of 80,000") as err:
        probe_recording(path, limits=ReadLimits(max_pixels=80_000))
    assert err.value.pixels == 20 * 64 * 64 and "Nothing was decoded" in str(err.value)
    with pytest.raises(RecordingTooLarge, match="163,840 bytes"):
        read_recording(path, limits=ReadLimits(max_bytes=100_000))
    # exactly at the limits: accepted, and frames decode on demand
    with RecordingReader(path, limits=ReadLimits(81_920, 163_840)) as reader:
        assert reader.frame(19).shape == (64, 64) and reader.n_frames == 20
    h5 = tmp_path / "chunks.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset(
            "rec", shape=(4, 64, 64), dtype="u2", chunks=(4, 64, 64), maxshape=(None, 64, 64)
        )
    with pytest.raises(RecordingTooLarge, match="chunks of"):
        probe_recording(h5, limits=ReadLimits(max_bytes=30_000))


def test_hdf5_gzip_shuffle_fletcher32_read_within_bounds(tmp_path):
    """The HDF5 filters CalSeg accepts read exactly (chunks verified before HDF5 decodes)."""
    data = stack(6, 40, 40)
    path = tmp_path / "gz.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "rec", data=data, chunks=(2, 20, 40), compression="gzip", shuffle=True,
            fletcher32=True,
        )  # fmt: skip
    np.testing.assert_array_equal(read_recording(path).frames, data)
    np.testing.assert_array_equal(
        read_recording(path, interleaved_channels=3, channel=1).frames, data[1::3]
    )


def test_reading_options_are_validated(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, stack(4, 16, 16), photometric="minisblack")
    for bad, msg in (({"channel": -1}, "non-negative"), ({"channel": True}, "non-negative"),
                     ({"interleaved_channels": 0}, "positive"), ({"z_projection": "sum"}, "one of"),
                     ({"axes": "QYX"}, "not valid")):  # fmt: skip
        with pytest.raises(RecordingError, match=msg):
            probe_recording(path, **bad)


def test_a_recording_with_no_finite_value_is_flagged_at_the_probe(tmp_path):
    """Found by a new-user check: an all-NaN TIFF was accepted at upload without a word (the
    job failed later); the probe (upload) and the reader now say there is nothing to segment."""
    from calseg.io.recordings import probe_recording

    data = np.full((5, 16, 16), np.nan, np.float32)
    data[2, 3, 3] = np.inf
    path = tmp_path / "allnan.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    (w,) = [w for w in probe_recording(path).warnings if "finite" in w]
    assert w.startswith("no finite value in the frames checked: every value is NaN or Inf")
    (w,) = [w for w in read_recording(path).info.warnings if "finite" in w]
    assert w.startswith("no finite value: every value is NaN or Inf")
    data[4, 0, 0] = 1.0  # one finite value: counted as before, not flagged
    tifffile.imwrite(path, data, photometric="minisblack")
    assert not any("no finite value" in w for w in read_recording(path).info.warnings)


def test_a_refused_hdf5_is_named_by_its_file(tmp_path):
    """Found by a new-user check: reading ``grp_ext.h5:/g/real`` said "real is refused: it
    points at other files (/g/ext is an external link ...)": the subject was the dataset's last
    name, and the plain dataset read seemed to be the link. The file is named, and the message
    says the file holds the link."""
    import h5py

    path = tmp_path / "grp_ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("g/real", data=stack(6, 16, 16))
        f["g/ext"] = h5py.ExternalLink("/etc/passwd", "/x")
    with pytest.raises(RecordingError) as err:
        read_recording(f"{path}:/g/real")
    text = str(err.value)
    assert text.startswith("grp_ext.h5 is refused: the file holds links to other files")
    assert "/g/ext is an external link to /etc/passwd:/x" in text


def _unlimited_vds(path, source, beside_real_data: bool) -> None:
    """An HDF5 file whose 1-D virtual dataset ``/leak`` maps one value of every frame of
    ``source:/rec`` with an *unlimited* mapping (HDF5 then opens the source to size it)."""
    from h5py import h5d, h5f, h5p, h5s, h5t

    u = h5s.UNLIMITED
    vspace = h5s.create_simple((0,), (u,))
    vspace.select_hyperslab((0,), (u,), stride=(1,), block=(1,))
    sspace = h5s.create_simple((1, 1, 1), (u, 1, 1))
    sspace.select_hyperslab((0, 0, 0), (u, 1, 1), stride=(1, 1, 1), block=(1, 1, 1))
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_virtual(vspace, str(source).encode(), b"rec", sspace)
    fid = h5f.create(str(path).encode(), h5f.ACC_TRUNC)
    h5d.create(fid, b"leak", h5t.NATIVE_UINT16, vspace, dcpl=dcpl).close()
    fid.close()
    if beside_real_data:  # a harmless 3-D dataset sorts first: it would be the one read
        with h5py.File(path, "a") as f:
            f["a_real"] = stack(6, 16, 16)


_READ_IN_CHILD = """
import sys
from calseg.io.recordings import RecordingError, probe_recording
try:
    probe_recording(sys.argv[1])
except RecordingError as exc:
    print("REFUSED", exc)
else:
    print("ACCEPTED")
"""


@pytest.mark.parametrize("beside_real_data", [False, True], ids=["alone", "beside-real-data"])
def test_an_unlimited_virtual_dataset_never_opens_its_source(tmp_path, beside_real_data):
    """Found by a new user's attack run (2026-12-07): a virtual dataset with an unlimited
    mapping makes HDF5 open the files it names as soon as its extent is asked for, and the
    reader listed every dataset with its shape before it refused virtual datasets: the API
    opened any server path an upload named, and its 422 told the source's frame count
    (``/leak (75,)``); beside a real dataset the upload was accepted and the path opened on
    every read. The source here is a FIFO, so an open blocks: the read (in a child process)
    must be refused, naming the virtual dataset, within the timeout, and no writer is needed."""
    import subprocess
    import sys

    fifo = tmp_path / "victim.h5"
    os.mkfifo(fifo)
    path = tmp_path / "leak.h5"
    _unlimited_vds(path, fifo, beside_real_data)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _READ_IN_CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the reader opened the virtual dataset's source (it blocked on the FIFO)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED leak.h5 is refused: /leak is an HDF5 virtual dataset")
    assert str(fifo) in out.stdout  # named in the refusal, never opened


def test_an_unlimited_virtual_dataset_opens_its_source_in_bare_h5py(tmp_path):
    """The attack above is real: bare h5py sizes the dataset from the source's frames."""
    source = tmp_path / "victim.h5"
    with h5py.File(source, "w") as f:
        f["rec"] = stack(75, 4, 4)
    path = tmp_path / "leak.h5"
    _unlimited_vds(path, source, beside_real_data=False)
    with h5py.File(path, "r") as f:
        assert f["leak"].shape == (75,)


def test_tiff_pages_of_mixed_shapes_are_bounded(tmp_path):
    """Found by a new user's attack run (2026-12-07): 25,000 tiny pages in two alternating
    shapes (2.85 MB) took 52 s of the API's CPU to probe (tifffile's generic series compares
    every page with every earlier page of its shape). More than MAX_MIXED_TIFF_PAGES pages of
    mixed shapes are refused before tifffile parses them; as many of one shape are read."""
    from calseg.io.file_safety import MAX_MIXED_TIFF_PAGES

    n = MAX_MIXED_TIFF_PAGES + 2
    mixed, uniform = tmp_path / "mixed.tif", tmp_path / "uniform.tif"
    with tifffile.TiffWriter(mixed) as tw:
        for i in range(n):
            tw.write(np.zeros((8, 8 + i % 2), np.uint8), photometric="minisblack")
    tifffile.imwrite(uniform, np.zeros((n, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(RecordingError, match="pages of 2 different kinds") as err:
        probe_recording(mixed)
    assert f"more than {MAX_MIXED_TIFF_PAGES:,} image directories" in str(err.value)
    assert probe_recording(uniform).n_frames == n


def test_tiff_strip_tables_shared_between_pages_and_too_many_strips_are_refused(
    tmp_path, monkeypatch
):
    """Found by a new user's attack run (2026-12-07): 32 pages whose strip tables were one
    shared 1 M-entry table of the file (8 MB) took the API from 1.0 to 2.8 GB (tifffile builds
    the table's tuples for every page), and a single page's oversized table grew memory 10x
    its size. Pages sharing a table are refused; so are more than MAX_TIFF_SEGMENTS strips."""
    import calseg.io.file_safety as file_safety

    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, stack(2, 64, 8).astype(np.uint8), rowsperstrip=1)
    assert probe_recording(path).n_frames == 2
    with tifffile.TiffFile(path) as tf:  # page 1's two tables -> page 0's (same counts)
        patches = [
            (tf.pages[1].tags[tag].offset + 8, tf.pages[0].tags[tag].valueoffset)
            for tag in (273, 279)
        ]
    raw = bytearray(path.read_bytes())
    for at, value in patches:
        raw[at : at + 4] = struct.pack("<I", value)
    shared = tmp_path / "shared.tif"
    shared.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match="directories 0 and 1 share one table of 64 strip"):
        probe_recording(shared)
    monkeypatch.setattr(file_safety, "MAX_TIFF_SEGMENTS", 100)
    with pytest.raises(RecordingError, match="more than 100 strips or tiles in all"):
        probe_recording(path)


def _tiff_of_overlapping_strip_tables(path, pages: int, rows: int, shift: int) -> None:
    """``pages`` pages of ``rows`` one-row strips of 8 px, each page's StripOffsets and
    StripByteCounts pointing ``shift`` bytes further into one table pair the file holds once
    (a crafted file; ``shift`` 0: the same table)."""
    tags = 9
    ifd = 2 + 12 * tags + 4
    tables = 8 + pages * ifd
    counts_at = tables + 4 * (rows + pages * shift)
    pixels = counts_at + 4 * (rows + pages * shift)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for k in range(pages):
        nxt = 8 + (k + 1) * ifd if k + 1 < pages else 0
        entries = [(256, 4, 1, 8), (257, 4, 1, rows), (258, 3, 1, 8), (259, 3, 1, 1),
                   (262, 3, 1, 1), (273, 4, rows, tables + 4 * k * shift), (277, 3, 1, 1),
                   (278, 4, 1, 1), (279, 4, rows, counts_at + 4 * k * shift)]  # fmt: skip
        out += struct.pack("<H", tags) + b"".join(struct.pack("<HHII", *e) for e in entries)
        out += struct.pack("<I", nxt)
    n_entries = rows + pages * shift
    out += np.full(n_entries, pixels, "<u4").tobytes() + np.full(n_entries, 8, "<u4").tobytes()
    out += bytes(8)
    path.write_bytes(bytes(out))


def test_tiff_tables_that_overlap_are_refused(tmp_path):
    """Pages whose strip tables are one table shifted by a word each dodge the shared-table
    test, and directories may overlap too: what the directories and tables claim must fit in
    the file, so the walk, and tifffile after it, read each byte of it at most once."""
    path = tmp_path / "overlap.tif"
    _tiff_of_overlapping_strip_tables(path, pages=64, rows=4096, shift=1)
    with pytest.raises(RecordingError, match="claim more bytes than the file holds"):
        probe_recording(path)
    _tiff_of_overlapping_strip_tables(path, pages=2, rows=64, shift=64)  # apart: read
    assert probe_recording(path).n_frames == 2


def _pages_sharing_page0_description(path, chars: int) -> None:
    """3 pages whose ImageDescription entries all point at page 0's (``chars`` long)."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            text = "x" * chars if k == 0 else f"page {k}"
            tw.write(stack(1, 16, 16, np.uint8)[0], description=text, metadata=None)
    with tifffile.TiffFile(path) as tf:
        at = [p.tags[270].offset for p in tf.pages[1:]]
        count, value = tf.pages[0].tags[270].count, tf.pages[0].tags[270].valueoffset
    raw = bytearray(path.read_bytes())
    for a in at:  # the entry's count and value offset: page 0's
        raw[a + 4 : a + 12] = struct.pack("<II", count, value)
    path.write_bytes(bytes(raw))


def test_tiff_values_shared_between_pages(tmp_path):
    """Found by a second attack run (2026-12-07): every page's ImageDescription pointing at
    one 8 MB stretch, 400 pages, took 3.1 GB (the reader loads it for each page). A large
    value shared between directories counts once per directory against the file's size; a
    small one (ImageJ shares its description and resolutions between pages) once."""
    from calseg.io.file_safety import MAX_SHARED_TIFF_VALUE

    path = tmp_path / "shared_value.tif"
    _pages_sharing_page0_description(path, MAX_SHARED_TIFF_VALUE + 1000)
    with pytest.raises(RecordingError, match="claim more bytes than the file holds"):
        probe_recording(path)
    _pages_sharing_page0_description(path, 100)
    assert probe_recording(path).n_frames == 3


def test_tiff_subifds_are_walked(tmp_path, monkeypatch):
    """Found by a second attack run (2026-12-07): the walk followed only the chain of pages,
    while tifffile reads every SubIFD (1 M SubIFD pointers, 4 MB: 41 s; SubIFDs sharing a
    strip table: 3 GB; a directory listed 4 times by each of 12 nested SubIFDs: 4^12 pages).
    SubIFDs are walked too: each directory once, counted against the limits, and any SubIFD
    makes the file "mixed" (tifffile's quadratic generic series)."""
    import calseg.io.file_safety as file_safety

    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        for _ in range(3):  # pages of 32 x 32, each with one 16 x 16 sub-image
            tw.write(stack(1, 32, 32, np.uint8)[0], subifds=1, photometric="minisblack")
            tw.write(stack(1, 16, 16, np.uint8)[0], subfiletype=1, photometric="minisblack")
    assert probe_recording(path).n_frames == 3
    monkeypatch.setattr(file_safety, "MAX_MIXED_TIFF_PAGES", 4)
    with pytest.raises(RecordingError, match="SubIFDs"):
        probe_recording(path)
    monkeypatch.undo()
    with tifffile.TiffFile(path) as tf:  # page 1's SubIFD -> page 0's: reached twice
        entry = tf.pages[1].tags[330]
        target = tf.pages[0].tags[330].value[0]
    raw = bytearray(path.read_bytes())
    raw[entry.offset + 8 : entry.offset + 12] = struct.pack("<I", target)
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match="reached twice through SubIFDs"):
        probe_recording(path)


@pytest.mark.parametrize(
    "pixels, tiffdata",
    [('SizeT="268435456"', ""), ('SizeT="2"', '<TiffData IFD="0" PlaneCount="268435456"/>')],
    ids=["size-t", "plane-count"],
)
def test_ome_xml_plane_counts_are_bounded_before_tifffile_sizes_the_series(
    tmp_path, pixels, tiffdata
):
    """Found by a second attack run (2026-12-07): OME-XML saying SizeT="268435456" in a
    558-byte file took 20 s and 4.1 GB: tifffile builds a list entry per declared plane
    before CalSeg's budget check. Counts and indices over MAX_TIFF_PAGES are refused first."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
        'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder='
        f'"XYZCT" Type="uint8" SizeX="16" SizeY="16" SizeZ="1" SizeC="1" {pixels}>'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="1"/>{tiffdata}</Pixels></Image></OME>'
    )
    path = tmp_path / "bomb.ome.tif"
    tifffile.imwrite(path, stack(2, 16, 16, np.uint8), description=xml, metadata=None)
    with pytest.raises(RecordingError, match="its OME-XML declares .*268,435,456"):
        probe_recording(path)


def test_hdf5_chunks_of_many_frames_are_bounded(tmp_path, monkeypatch):
    """Found by a second attack run (2026-12-07): a 1 MB HDF5 file stored as one 1 GiB deflate
    chunk took 50 s and 2.1 GB to probe (each frame read decodes the whole chunk, twice). A
    chunk larger than one frame and than MAX_HDF5_CHUNK_BYTES is refused; one frame per chunk
    is read at any size."""
    import calseg.io.file_safety as file_safety

    many, one = tmp_path / "many.h5", tmp_path / "one.h5"
    with h5py.File(many, "w") as f:
        f.create_dataset("rec", data=stack(8, 64, 64), chunks=(8, 64, 64), compression="gzip")
    with h5py.File(one, "w") as f:
        f.create_dataset("rec", data=stack(8, 64, 64), chunks=(1, 64, 64), compression="gzip")
    assert probe_recording(many).n_frames == 8
    monkeypatch.setattr(file_safety, "MAX_HDF5_CHUNK_BYTES", 10_000)  # 1 frame: 8,192 bytes
    with pytest.raises(RecordingError, match="more than one frame .* every frame read decodes"):
        probe_recording(many)
    assert probe_recording(one).n_frames == 8
    rgb = tmp_path / "rgb.h5"  # a frame of rows x columns x 3 samples, chunked whole
    with h5py.File(rgb, "w") as f:
        f.create_dataset("rec", data=np.zeros((4, 64, 64, 3), np.uint8), chunks=(1, 64, 64, 3))
    assert probe_recording(rgb, axes="TYXS").n_frames == 4


def test_the_frame_limit_counts_every_z_slice_a_frame_decodes(tmp_path):
    """Found by a second attack run (2026-12-07): an ImageJ Z-stack of 32 slices of 8192^2 px
    per frame whose pages share one 64 kB deflate strip (73 kB) took 21 s and 2.2 GB to probe:
    each frame of 8192^2 was within max_frame_pixels, but one frame decodes all 32 slices.
    The limit now counts every stored value a frame decodes (413 before decoding)."""
    from calseg.io.recordings import ReadLimits, RecordingTooLarge

    path = tmp_path / "zstack.tif"
    tifffile.imwrite(path, np.zeros((2, 4, 32, 32), np.uint8), imagej=True,
                     metadata={"axes": "TZYX"})  # fmt: skip
    assert probe_recording(path, limits=ReadLimits(max_frame_pixels=4 * 32 * 32)).n_frames == 2
    with pytest.raises(RecordingTooLarge, match="each decoded from 4,096 stored values"):
        probe_recording(path, limits=ReadLimits(max_frame_pixels=4 * 32 * 32 - 1))


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path, monkeypatch):
    """Found by a new user's attack run (2026-12-07): a 531 kB progressive JPEG of 4,000
    near-empty scans took 19 s of the API's CPU at upload and on every preview (the decoder
    passes over the image once per scan). Pillow's own progressive JPEG (a handful of scans)
    is read; with the cap below its scan count it is refused, naming the scans."""
    import calseg.io.file_safety as file_safety

    path = tmp_path / "prog.jpg"
    Image.fromarray(stack(1, 64, 64, np.uint8)[0]).save(path, progressive=True)
    with open(path, "rb") as fh:
        n = file_safety.check_jpeg_scans(fh)
    assert 2 <= n <= 20
    assert read_recording(path).frames.shape == (1, 64, 64)
    monkeypatch.setattr(file_safety, "MAX_JPEG_SCANS", n - 1)
    with pytest.raises(RecordingError, match=f"a JPEG of more than {n - 1} scans"):
        probe_recording(path)


def test_hdf5_groups_nested_deep_are_refused_and_datasets_found_in_order(tmp_path):
    """Found by a third attack run (2026-12-07): 3,000 nested groups (395 kB, under the link
    cap) took 111 s to probe: HDF5's own visit re-resolves every object's path. CalSeg walks
    the groups itself, at most MAX_HDF5_DEPTH deep, each once (a hard link back to a group is
    no cycle), finding datasets in the order HDF5's visit gives."""
    from calseg.io import file_safety

    path = tmp_path / "tree.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros(3)
        f["b/c"] = stack(4, 16, 16)
        f["d"] = stack(4, 16, 16)
        f["b/e/loop"] = f["b"]  # a hard link back up: a cycle
        f["soft"] = h5py.SoftLink("/d")
    with h5py.File(path, "r") as f:
        assert [n for n, _ in file_safety.check_hdf5_file(f)] == ["a", "b/c", "d"]
    assert read_recording(path).frames.shape == (4, 16, 16)  # /b/c, the first 3-D one
    deep = tmp_path / "deep.h5"
    with h5py.File(deep, "w") as f:
        f["/".join(f"g{i}" for i in range(file_safety.MAX_HDF5_DEPTH + 2)) + "/rec"] = stack()
    with pytest.raises(RecordingError, match="nested more than 32 deep"):
        probe_recording(deep)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_images_of_many_segments_are_refused(tmp_path, monkeypatch, fmt):
    """Found by a third attack run (2026-12-07): 2.5 M empty APP segments in a 10 MB JPEG took
    7 s and 375 MB, 800,000 empty ancillary chunks in a 9.6 MB PNG 5 s (Pillow parses and
    keeps each). Pillow's own images read; with the cap under their segment count, refused."""
    import calseg.io.file_safety as file_safety

    path = tmp_path / f"img.{'jpg' if fmt == 'jpeg' else 'png'}"
    Image.fromarray(stack(1, 32, 32, np.uint8)[0]).save(path)
    assert read_recording(path).frames.shape == (1, 32, 32)
    monkeypatch.setattr(file_safety, "MAX_IMAGE_SEGMENTS", 0)
    what = "marker segments before its first scan" if fmt == "jpeg" else "besides the image data"
    with pytest.raises(RecordingError, match=f"more than 0 .*{what}"):
        probe_recording(path)


def _jpeg_with(path, insert: bytes) -> None:
    """A 32 x 32 JPEG (Pillow's) with ``insert`` placed right after its frame header (SOF0)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(stack(1, 32, 32, np.uint8)[0]).save(buf, format="JPEG")
    j = buf.getvalue()
    sof = j.index(b"\xff\xc0")
    end = sof + 2 + struct.unpack(">H", j[sof + 2 : sof + 4])[0]
    path.write_bytes(j[:end] + insert + j[end:])


def test_jpeg_headers_pillow_would_walk_for_long_are_refused(tmp_path):
    """Found by a fourth attack run (2026-12-07): the segment walk stopped at the frame header,
    but Pillow's header parse goes on to the first scan, in Python, a byte at a time between
    segments: 12.5 M empty APP segments after the frame header (50 MB) took 46 s and 1.8 GB,
    50 M fill bytes (50 MB) 70 s, and both were accepted. The same files, small: refused;
    a few fill bytes (which the standard allows) and a few segments there still read."""
    few_fill, few_app = tmp_path / "few_fill.jpg", tmp_path / "few_app.jpg"
    _jpeg_with(few_fill, b"\xff" * 16)
    _jpeg_with(few_app, b"\xff\xe1\x00\x02" * 8)
    for path in (few_fill, few_app):
        assert read_recording(path).frames.shape == (1, 32, 32)
    many_app, many_fill, junk = (tmp_path / n for n in ("app.jpg", "fill.jpg", "junk.jpg"))
    _jpeg_with(many_app, b"\xff\xe1\x00\x02" * 2000)
    _jpeg_with(many_fill, b"\xff" * 5000)
    _jpeg_with(junk, b"\x00" * 5000)  # stray bytes: Pillow skips them one by one too
    assert Image.open(many_fill).size == (32, 32)  # Pillow itself walks through them
    with pytest.raises(RecordingError, match="more than 1,024 marker segments before its first"):
        probe_recording(many_app)
    for path in (many_fill, junk):
        with pytest.raises(RecordingError, match="more than 4,096 fill or stray bytes"):
            probe_recording(path)


def test_png_of_many_small_image_data_chunks_is_refused(tmp_path):
    """Found by a fourth attack run (2026-12-07): empty IDAT chunks were not counted, and
    Pillow reads each chunk header in Python (4 M empty ones, 48 MB: 8.2 s a read). The image
    data split into 40 chunks of ordinary size reads; 2,000 empty chunks before it are refused."""
    import zlib

    img = stack(1, 64, 64, np.uint8)[0]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in img), 0)
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    parts = [raw[i : i + len(raw) // 40 + 1] for i in range(0, len(raw), len(raw) // 40 + 1)]
    split, empty = tmp_path / "split.png", tmp_path / "empty.png"
    split.write_bytes(head + b"".join(chunk(b"IDAT", p) for p in parts) + chunk(b"IEND", b""))
    empty.write_bytes(head + chunk(b"IDAT", b"") * 2000 + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    assert len(parts) >= 40
    np.testing.assert_array_equal(read_recording(split).frames[0], img)
    assert np.asarray(Image.open(empty)).shape == (64, 64)  # Pillow reads through them
    with pytest.raises(RecordingError, match="image data chunks of under 256 bytes"):
        probe_recording(empty)


def test_tiff_metadata_of_fewer_values_than_its_pages_is_refused(tmp_path):
    """Found by a fourth attack run (2026-12-07): ImageJ metadata saying images=2 over 48
    compressed 8192 x 8192 pages sharing one strip (71 kB) made tifffile decode all 48 pages
    (3.2 GB) before failing to reshape them, past the decode budget, which counted the 2
    declared frames. A file whose pages hold more values than its metadata describes is
    refused when it is opened; tifffile's series keeps the 48 pages."""
    path = tmp_path / "lying.tif"
    desc = "ImageJ=1.11a\nimages=2\nframes=2\nhyperstack=true\n"
    tifffile.imwrite(path, stack(48, 64, 64, np.uint8), description=desc, metadata=None,
                     compression="zlib")  # fmt: skip
    with tifffile.TiffFile(path) as tf:
        assert tf.series[0].shape == (2, 64, 64) and len(tf.series[0].pages) == 48
    with pytest.raises(RecordingError, match="metadata does not describe the file"):
        probe_recording(path)


@pytest.mark.parametrize("kind", ["imagej", "shaped", "ndpi"])
def test_many_identical_tiff_pages_never_take_tifffiles_quadratic_series(
    tmp_path, monkeypatch, kind
):
    """Found by a fourth attack run (2026-12-07): identical pages whose metadata does not fit
    them (ImageJ images=0, a shaped shape of another size) or NDPI tags make tifffile build
    its generic series, which compares each page with every earlier one: 32,000 8 x 8 pages
    (3.6 MB) took 128 s to upload and 150 s per preview. Above MAX_MIXED_TIFF_PAGES pages
    (here lowered to 16) CalSeg takes tifffile's uniform series instead: the generic one is
    never built, and every page is a frame."""
    from calseg.io import file_safety

    monkeypatch.setattr(file_safety, "MAX_MIXED_TIFF_PAGES", 16)

    def quadratic(self):  # noqa: ANN001, ANN202
        raise AssertionError("tifffile's generic series was built")

    monkeypatch.setattr(tifffile.TiffFile, "_series_generic", quadratic)
    path = tmp_path / f"{kind}.tif"
    extra: dict = {
        "imagej": {"description": "ImageJ=1.11a\nimages=0\nframes=0\n"},
        "shaped": {"description": '{"shape": [1, 3, 3]}'},
        "ndpi": {"extratags": [(271, "s", 0, "Hamamatsu", False), (65420, "I", 1, 1, False)]},
    }[kind]
    data = stack(40, 8, 8, np.uint8)
    tifffile.imwrite(path, data, metadata=None, **extra)
    got = read_recording(path).frames
    assert got.shape == (40, 8, 8)
    np.testing.assert_array_equal(got, data)


def test_complex_and_out_of_float32_range_data_are_refused_with_the_cause(tmp_path):
    """Found by a new-user check: a complex TIFF was read as its real part under a leaked
    ComplexWarning, and finite float64 values near 1e300 became Inf in the cast to float32 (a
    leaked RuntimeWarning), then were refused as 'no finite value ... check the export'."""
    import warnings

    cplx, huge = tmp_path / "complex.tif", tmp_path / "huge.tif"
    tifffile.imwrite(cplx, (np.ones((5, 16, 16)) * (1 + 2j)).astype(np.complex64))
    tifffile.imwrite(huge, np.full((5, 16, 16), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak
        with pytest.raises(RecordingError, match="stores complex values"):
            read_recording(cplx)
        with pytest.raises(RecordingError, match="values up to 1e\\+300, beyond float32"):
            read_recording(huge)
        fine = tmp_path / "fine.tif"
        tifffile.imwrite(fine, np.full((5, 16, 16), 1e30))
        assert read_recording(fine).frames.dtype == np.float32


def test_a_recording_larger_than_the_available_memory_is_refused_before_it_is_read(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``np.empty`` of more than the free memory succeeds on Linux (overcommit) and the
    process is killed while the frames are filled in, so every command that reads a recording
    whole (analyze, fit-sim, gap, the workers) ran out of memory instead of saying so. The
    reader now compares the decoded bytes with the available memory first; the CLI says it
    as an error. Here the machine is said to have 1 MB available."""
    from typer.testing import CliRunner

    import calseg.machine
    from calseg.cli import app

    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, np.zeros((40, 128, 128), np.uint16))  # 1.25 MiB decoded
    monkeypatch.setattr(calseg.machine, "available_memory_bytes", lambda: 1_000_000)
    with pytest.raises(RecordingError, match=r"too large to read into memory \(40 frames"):
        read_recording(rec)
    assert read_recording(rec, max_frames=20).frames.shape == (20, 128, 128)
    r = CliRunner().invoke(app, ["fit-sim", str(rec)])
    assert r.exit_code == 2, r.output
    assert "too large to read into memory" in " ".join(r.output.split())
    monkeypatch.setattr(calseg.machine, "available_memory_bytes", lambda: None)
    assert read_recording(rec).frames.shape == (40, 128, 128)


def test_hdf5_reads_are_split_to_a_bounded_chunk_count(tmp_path, monkeypatch) -> None:
    """HDF5 holds memory for every chunk one read call touches (about 6 KB each), so reads
    are split (file_safety.hdf5_read_in_blocks) to at most MAX_HDF5_CHUNKS_PER_READ chunks.
    The pieces must give exactly the whole read, for ints, slices with steps, and chunk
    rows too large on their own (then split along the next dimension)."""
    from calseg.io import file_safety

    monkeypatch.setattr(file_safety, "MAX_HDF5_CHUNKS_PER_READ", 7)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        shape = tuple(int(x) for x in rng.integers(2, 20, 3))
        chunks = tuple(int(x) for x in rng.integers(1, 4, 3))
        data = rng.random(shape)
        index = []
        for n in shape:
            if rng.random() < 0.2:
                index.append(int(rng.integers(0, n)))
            else:
                a = int(rng.integers(0, n))
                index.append(slice(a, int(rng.integers(a + 1, n + 1)), int(rng.integers(1, 4))))
        index = tuple(index)
        touched: list[int] = []

        def read(i: tuple, shape=shape, chunks=chunks, data=data, touched=touched):
            n_chunks = 1
            for sel, n, c in zip(i, shape, chunks, strict=True):
                if isinstance(sel, slice):
                    n_chunks *= len({k // c for k in range(*sel.indices(n))})
            touched.append(n_chunks)
            return data[i]

        got = file_safety.hdf5_read_in_blocks(read, index, shape, chunks)
        assert np.array_equal(got, data[index]), (shape, chunks, index)
        assert max(touched) <= 7
        checked += len(touched) > 1
    assert checked > 50  # most reads were split
    # through the reader: a file of small chunks reads the same, in pieces
    data = rng.integers(0, 60000, (30, 64, 64), dtype=np.uint16)
    path = tmp_path / "small_chunks.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("rec", data=data, chunks=(1, 4, 4), compression="gzip")
    assert np.array_equal(read_recording(path).frames, data)


def test_an_hdf5_stored_in_millions_of_chunks_is_refused_before_reading(tmp_path) -> None:
    """A 1.4 kB upload of 200 x 256 x 256 in chunks of one value took an infer job to 21 GiB
    (a new-user check). More than file_safety.MAX_HDF5_CHUNKS chunks are refused at once."""
    import time

    path = tmp_path / "tiny.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("rec", shape=(200, 256, 256), dtype="uint8", chunks=(1, 1, 1))
    t0 = time.perf_counter()
    with pytest.raises(RecordingError, match="13,107,200 chunks of 1 x 1 x 1 values"):
        probe_recording(path)
    assert time.perf_counter() - t0 < 5


def _raw_npy(path, header: str, payload: bytes = b"", version: int = 1):
    """A ``.npy`` (version 1.0 or 2.0) with ``header`` as its header text, padded as NumPy
    pads it."""
    text = header.encode("latin1")
    n_len = 2 if version == 1 else 4
    pad = 64 - (8 + n_len + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    magic = b"\x93NUMPY" + bytes([version, 0])
    path.write_bytes(magic + len(text).to_bytes(n_len, "little") + text + payload)
    return path


@pytest.mark.parametrize(
    ("header", "said"),
    [
        ("{'descr': '<u2', 'fortran_order': False, 'shape': (-1, 32, 32), }", "negative size"),
        ("{'descr': '<u1', 'fortran_order': False, 'shape': (2**62, 2**62, 16), }", "plain"),
        ("__import__('os').system('touch /tmp/calseg_pwned')", "not a plain NumPy header"),
    ],
)
def test_npy_headers_are_refused_in_calsegs_words(tmp_path, header: str, said: str) -> None:
    """A new user's attack files: a negative shape said 'frames 0..0 requested but ... has
    frames 0..-2', and headers NumPy's literal parser refuses leaked '<ast.BinOp object at
    0x7f...>'; a 10 MB header leaked NumPy's advice to load with allow_pickle=True."""
    path = _raw_npy(tmp_path / "h.npy", header, bytes(4096))
    with pytest.raises(RecordingError) as err:
        probe_recording(path)
    msg = str(err.value)
    assert said in msg and "ast." not in msg and "0x7f" not in msg, msg
    assert not os.path.exists("/tmp/calseg_pwned")
    head = "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 4, 4), }" + " " * 20_000
    big = _raw_npy(tmp_path / "big.npy", head, bytes(64), version=2)
    with pytest.raises(RecordingError) as err:
        probe_recording(big)
    assert "allow_pickle" not in str(err.value) and "longer" in str(err.value), str(err.value)


def test_a_jpeg_pillow_refuses_names_pillows_reason_and_mpo_files_read(tmp_path):
    """Found by a fourth attack run (2026-12-07): a JPEG that Pillow's JPEG plugin refused
    answered "cannot be decoded as an image ('MPO')", a KeyError of Pillow's (MPO is no opener
    of its own). The plugin's reason is given now; a multi-picture (MPO) file, which the JPEG
    plugin opens, still reads its first picture."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\x02\x00\x00")
    with pytest.raises(RecordingError, match=r"cannot be decoded as an image \(no marker found\)"):
        probe_recording(bad)
    lossless16 = tmp_path / "lossless16.jpg"  # a lossless JPEG of 16-bit samples (SOF3)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(lossless16)
    buf = bytearray(lossless16.read_bytes())
    sof = buf.index(b"\xff\xc0")
    buf[sof + 1], buf[sof + 4] = 0xC3, 16
    lossless16.write_bytes(bytes(buf))
    with pytest.raises(RecordingError, match="lossless, arithmetic-coded\\): export the recording"):
        probe_recording(lossless16)
    mpo = tmp_path / "two.jpg"
    first, second = (Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (100, 200))
    first.save(mpo, format="MPO", save_all=True, append_images=[second])
    rec = read_recording(mpo)
    assert rec.frames.shape == (1, 32, 32) and abs(float(rec.frames.mean()) - 100) < 2
    assert "image holds 2 frames; read the first only" in rec.info.warnings


def test_reading_hdf5_empties_hdf5s_plugin_search_path(tmp_path):
    """Defence behind the filter check: once CalSeg has read an HDF5 file, HDF5 has no folder
    to load a filter plugin from (it had /usr/local/hdf5/lib/plugin by default)."""
    from h5py import h5pl

    path = tmp_path / "rec.h5"
    with h5py.File(path, "w") as f:
        f["rec"] = stack(4, 16, 16)
    h5pl.append(str(tmp_path).encode())
    assert h5pl.size() >= 1
    assert read_recording(path).frames.shape == (4, 16, 16)
    assert h5pl.size() == 0


def test_fifth_attack_run_tiff_classes_are_refused_or_bounded(tmp_path, monkeypatch):
    """Found by a fifth attack run (2026-12-07), one file per class, small:
    tiles far larger than their image (64 x 64 pages of one 32768^2 deflate tile took the API
    to 4.2 GB), pages of more than MAX_TIFF_KINDS kinds (4,096 distinct shapes: 66 s in
    tifffile's pyramid search), a MetaMorph UIC1 tag of 10^6 entries (34 s, 1.55 GB). Honest
    files beside them read."""
    from calseg.io import file_safety

    ok_tiles = tmp_path / "ok_tiles.tif"  # a writer's fixed 256 px tiles on a small image
    tifffile.imwrite(ok_tiles, stack(3, 64, 64), tile=(256, 256), compression="zlib",
                     photometric="minisblack")  # fmt: skip
    assert read_recording(ok_tiles).frames.shape == (3, 64, 64)
    big_tiles = tmp_path / "big_tiles.tif"
    tifffile.imwrite(big_tiles, stack(2, 64, 64), tile=(2048, 2048), compression="zlib")
    with pytest.raises(RecordingError, match="tiles of width 2,048 for an image of width 64"):
        probe_recording(big_tiles)

    kinds = tmp_path / "kinds.tif"
    with tifffile.TiffWriter(kinds) as tw:
        for i in range(file_safety.MAX_TIFF_KINDS + 1):
            tw.write(np.zeros((4, 4 + i), np.uint8), photometric="minisblack")
    with pytest.raises(RecordingError, match="more than 64 different kinds"):
        probe_recording(kinds)

    uic1 = tmp_path / "uic1.tif"
    tifffile.imwrite(uic1, stack(2, 16, 16), extratags=[(33628, "I", 5000, [0] * 5000, False)])
    with pytest.raises(RecordingError, match="UIC1 tag holds 5,000 entries"):
        probe_recording(uic1)


def test_tifffiles_micro_manager_builder_and_pyramid_search_are_never_run_at_scale(
    tmp_path, monkeypatch
):
    """Found by a fifth attack run (2026-12-07): tifffile's Micro-Manager stack builder sizes a
    list by the index map's largest indices, cubed, when the set's other files are out of
    reach (a 376-byte file: 5.4 GB); its pyramid search compares every series with every other
    (a file written one TiffWriter.write() per frame, 20,000 frames: 57 s). CalSeg never runs
    the first (tifffile goes on to the file's other metadata) and skips the second over more
    than MAX_TIFF_KINDS series."""
    import tifffile.tifffile as tt

    from calseg.io import file_safety

    def builder(self):  # noqa: ANN001, ANN202
        raise AssertionError("tifffile's Micro-Manager builder ran")

    monkeypatch.setattr(tt.TiffFile, "is_mmstack", property(lambda self: True))
    monkeypatch.setattr(tt.TiffFile, "_series_mmstack", builder)
    path = tmp_path / "mm.tif"
    tifffile.imwrite(path, stack(4, 16, 16), photometric="minisblack")
    assert read_recording(path).frames.shape == (4, 16, 16)

    assert getattr(tt.pyramidize_series, "_calseg_guard", False)
    many = [object()] * (file_safety.MAX_TIFF_KINDS + 1)  # would raise if looked at
    assert tt.pyramidize_series(many, reduced=True) is None
    with pytest.raises(AttributeError):  # a few series still get tifffile's search
        tt.pyramidize_series([object(), object()])


def test_packbits_longer_than_any_encoding_of_its_output_is_refused():
    """Found by a fifth attack run (2026-12-07): 20 MB of PackBits no-op bytes (0x80) in a strip
    every page pointed at took 101 s to probe (the decoder is Python, bounded only by its
    output). An honest encoding decodes; one longer than any encoding of its output, refused."""
    from calseg.io.file_safety import UnsafeRecording, _packbits_decode

    assert _packbits_decode(b"\xfe\x07\x02abc", out=6) == b"\x07\x07\x07abc"
    with pytest.raises(UnsafeRecording, match="longer than any encoding of the 6 bytes"):
        _packbits_decode(b"\x80" * 100 + b"\xfe\x07\x02abc", out=6)


def test_ome_tiffdata_mapping_every_page_many_times_is_refused():
    """Found by a fifth attack run (2026-12-07): 40,000 TiffData elements with no IFD,
    PlaneCount or NumPlanes over 4,000 pages (1.46 MB) took 103 s to probe: tifffile maps every
    page for each. Counted now; the same elements with an IFD each are fine."""
    from calseg.io.file_safety import UnsafeRecording, check_ome_sizes

    def xml(attrs: str, n: int) -> str:
        planes = "".join(f"<TiffData {attrs.format(i=i)}/>" for i in range(n))
        return (
            '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
            f'<Pixels SizeT="{n}" SizeZ="1" SizeC="1">{planes}</Pixels></Image></OME>'
        )

    check_ome_sizes(xml('IFD="{i}" PlaneCount="1"', 300), n_pages=4000)
    with pytest.raises(UnsafeRecording, match="TiffData elements that map 1,004,000 planes in all"):
        check_ome_sizes(xml("", 300), n_pages=4000)


def test_jpeg_of_many_exif_segments_is_refused(tmp_path):
    """Found by a fifth attack run (2026-12-07): Pillow appends each EXIF segment to the bytes
    so far: 1,000 of 64 KiB (65 MB) took 30 s and 320 MB. A JPEG with its one EXIF reads."""
    exif = Image.Exif()
    exif[0x010F] = "CalSeg"  # Make
    one = tmp_path / "one.jpg"
    Image.fromarray(stack(1, 32, 32, np.uint8)[0]).save(one, exif=exif)
    assert read_recording(one).frames.shape == (1, 32, 32)
    many = tmp_path / "many.jpg"
    _jpeg_with(many, b"\xff\xe1\x00\x08Exif\x00\x00" * 20)
    with pytest.raises(RecordingError, match="more than 8 EXIF segments"):
        probe_recording(many)
