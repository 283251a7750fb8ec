"""Read calcium-imaging recordings into ``(T, H, W)`` frame stacks.

Formats (detected from the file's first bytes, the extension only as a fallback):

* TIFF via :mod:`tifffile`: plain, BigTIFF, ImageJ hyperstacks (including frames stored as
  slices, and ImageJ calibrations such as ``c0=-32768`` for signed 16-bit data stored
  unsigned), OME-TIFF, and the TIFF variants tifffile reads (LSM, STK, ...).
* single PNG / JPEG images (one frame), via Pillow.
* folders of single-frame TIFF / PNG / JPEG files, sorted naturally (``f2`` before ``f10``).
* HDF5 via :mod:`h5py`: ``file.h5`` (first 3-D dataset) or ``file.h5:/group/dataset``.
* NumPy ``.npy`` arrays (memory-mapped).
* AVI / MP4 / MOV / MKV via imageio when a video plugin (pyav, imageio-ffmpeg) is installed,
  else OpenCV's FFmpeg backend; else a :class:`RecordingError`.
* Nikon ND2, Zeiss CZI and Leica LIF through bioio and its plugins, an optional extra
  (``pip install 'calseg[bioio]'``); without it a :class:`RecordingError` says so.

Axis handling: the stored axes are detected (letters ``T`` time, ``Z`` depth, ``C`` channel,
``Y``, ``X``, ``S`` colour samples) from the file's metadata or, when it has none, from the
shape; ``axes=`` overrides them. RGB(A) frames become grayscale (ITU-R BT.601 luma weights
0.299, 0.587, 0.114, the weights Pillow's ``"L"`` conversion uses), one channel of a
multi-channel recording is picked, Z is projected (``z_projection``: max by default, mean or
median) when the file also has a T axis and read
as T when it has none (ImageJ files often store time series as slices). Every such decision is
written to :attr:`RecordingInfo.warnings`.

Frames smaller than :data:`MIN_FRAME_SIDE` (8 px) on either side are refused: such data is
almost always a mis-read axis (a 3-sample colour axis taken for rows) or a line scan, and no
cell of a few pixels across can be segmented in it. The tiny real test recording (21 x 14 px)
passes.

Every failure is raised as :class:`RecordingError` with a message that says what is wrong with
the file and what to do about it, never a library traceback.

Untrusted files (uploads): a reader reads the given file and nothing else, and decodes no more
than the file declares (:mod:`calseg.io.file_safety`: files that name other files, HDF5
external storage/virtual datasets/links, OME-TIFF multi-file references, video playlists and
data references, decompression bombs are refused with a :class:`RecordingError` naming the
feature). Opening a recording reads headers only; :class:`ReadLimits` (a pixel and a byte
budget) is checked against the header before any pixel is decoded
(:class:`RecordingTooLarge`); frames are then decoded on demand, a chunk at a time
(:class:`RecordingReader`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calseg.io import file_safety
from calseg.io.file_safety import UnsafeRecording
from calseg.progress import check_cancelled

__all__ = [
    "MIN_FRAME_SIDE",
    "ReadLimits",
    "Recording",
    "RecordingError",
    "RecordingInfo",
    "RecordingReader",
    "RecordingTooLarge",
    "merge_read_options",
    "natural_sort_key",
    "probe_recording",
    "iter_recording",
    "read_recording",
]

MIN_FRAME_SIDE = 8
"""Smallest accepted frame height and width, in pixels."""

MAX_CHANNELS = 7
"""More channels than this (ImageJ's composite limit) with no T or Z axis are read as frames."""

AXIS_LETTERS = "TZCYXS"
"""Axis letters CalSeg understands: time, depth, channel, rows, columns, colour samples."""

_TIFF_EXT = (".tif", ".tiff", ".btf", ".tf2", ".tf8", ".lsm", ".stk", ".ome.tif", ".ome.tiff")
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_HDF5_EXT = (".h5", ".hdf5", ".hdf", ".he5")
_VIDEO_EXT = (".avi", ".mp4", ".mov", ".mkv", ".m4v", ".wmv")
_BIOIO_EXT = (".nd2", ".czi", ".lif")
BIOIO_INSTALL_HINT = "pip install 'calseg[bioio]'"
_FOLDER_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
UPLOAD_SUFFIXES = _TIFF_EXT + _IMAGE_EXT + _HDF5_EXT + (".npy",) + _VIDEO_EXT + _BIOIO_EXT
"""File name endings of single files the readers take (the page's upload box accepts these)."""
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's RGB -> "L"

_SUPPORTED = (
    "TIFF / BigTIFF / ImageJ / OME-TIFF, PNG, JPEG, HDF5 (.h5, optionally file.h5:/dataset), "
    "NumPy .npy, AVI/MP4 video, ND2/CZI/LIF (with the [bioio] extra), or a folder of "
    "single-frame TIFF/PNG/JPEG files"
)
_CONVERT_HINT = "convert it to TIFF (e.g. in Fiji: File > Save As > Tiff...) and try again"


class RecordingError(ValueError):
    """A recording cannot be read; the message says what is wrong and what to do."""


class RecordingTooLarge(RecordingError):
    """The recording decodes to more pixels or bytes than :class:`ReadLimits` allow.

    Attributes:
        pixels: frames x rows x columns of the recording as read.
        nbytes: bytes decoded (the larger of the stored samples and the frames returned).
        limits: the limits it exceeds.
    """

    def __init__(self, message: str, *, pixels: int, nbytes: int, limits: ReadLimits) -> None:
        super().__init__(message)
        self.pixels, self.nbytes, self.limits = pixels, nbytes, limits


@dataclass(frozen=True)
class ReadLimits:
    """Decode budget of one recording, checked against the header before any pixel is decoded.

    Attributes:
        max_pixels: most frames x rows x columns (the recording as read); None = no limit.
        max_bytes: most bytes decoded: every stored sample (all channels, Z planes, colour
            samples, in the stored dtype) and the frames returned (their dtype); also the
            largest HDF5 chunk. None = no limit.
        max_frame_pixels: most values decoded for one frame (rows x columns x the Z slices,
            channels and colour samples it is read from); None = no limit. A server decodes
            single frames in its API process (the upload check, previews), where one frame of
            the 2^31-pixel recording budget is gigabytes (an attacker's 1 MB TIFF of one
            30000 x 30000 frame took the API to 23 GB and the OOM killer).
    """

    max_pixels: int | None = None
    max_bytes: int | None = None
    max_frame_pixels: int | None = None


@dataclass
class RecordingInfo:
    """What a recording file holds, as CalSeg will read it.

    Attributes:
        path: the file (or folder) path as given, including an HDF5 ``:/dataset`` suffix.
        format: ``"tiff"``, ``"bigtiff"``, ``"imagej-tiff"``, ``"ome-tiff"``, ``"png"``,
            ``"jpeg"``, ``"folder"``, ``"hdf5"``, ``"npy"``, ``"video"`` or ``"bioio"``.
        n_frames: number of frames T of the ``(T, H, W)`` stack that is (or would be) returned.
        height: frame height H in px.
        width: frame width W in px.
        dtype: dtype of the returned frames: ``"uint8"``, ``"uint16"`` or ``"float32"``.
        axes: the stored data's axes as CalSeg interprets them, one letter of ``TZCYXS`` per
            stored dimension (e.g. ``"TYX"``, ``"TZCYX"``); passing it as ``axes=`` to
            :func:`read_recording` reproduces the same reading.
        header_frames: the frame count the file's header claimed, only when it differs from
            the frames actually present (``None`` otherwise).
        frame_interval_s: time between frames in s, from metadata, or ``None``.
        pixel_size_um: pixel width in um, from metadata, or ``None``.
        warnings: human-readable notes on every conversion or oddity.
        stored_shape: shape of the stored data (before axis handling).
        file_axes: axes letters as the file/reader reported them (e.g. tifffile's ``"QYX"``,
            ``"ZYX"`` for ImageJ slices); ``""`` when the file says nothing.
        suspected_channels: ``k`` when the first images look like ``k`` interleaved channels
            (:func:`suspected_interleave`; a warning says so), else None.
    """

    path: str
    format: str
    n_frames: int
    height: int
    width: int
    dtype: str
    axes: str
    header_frames: int | None = None
    frame_interval_s: float | None = None
    pixel_size_um: float | None = None
    warnings: list[str] = field(default_factory=list)
    stored_shape: tuple[int, ...] = ()
    file_axes: str = ""
    suspected_channels: int | None = None

    def __post_init__(self) -> None:
        # Whatever a reader derived from a file's metadata (an HDF5 ``fps`` of 1e-310 gave an
        # interval of inf, stored as JSON ``Infinity`` by SQLite and refused by PostgreSQL: a
        # tenth attack run), an interval or pixel size that is not a positive finite number
        # is unknown.
        self.frame_interval_s = _positive(self.frame_interval_s)
        self.pixel_size_um = _positive(self.pixel_size_um)

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict of all fields."""
        d = asdict(self)
        d["stored_shape"] = list(self.stored_shape)
        return d


@dataclass
class Recording:
    """A recording in memory.

    Attributes:
        frames: ``(T, H, W)`` array, dtype uint8, uint16 or float32 (float32 when the file is
            float, signed or wider than 16 bit, or when an ImageJ calibration was applied).
        info: what was read and every conversion made (see :class:`RecordingInfo`).
    """

    frames: np.ndarray
    info: RecordingInfo


# --------------------------------------------------------------------------------------------
# tifffile logs (not raises) most of what is wrong with a file; capture it per thread.


class _ThreadLogCapture(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(self.local, "sink", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False


_TIFF_LOG = _ThreadLogCapture()
logging.getLogger("tifffile").addFilter(_TIFF_LOG)
file_safety.install_bounded_tiff_codecs()  # zlib/LZMA/PackBits: at most the declared size
file_safety.install_tiff_series_guard()  # no pyramid search over thousands of series


@contextmanager
def _capture_tifffile_log() -> Iterator[list[str]]:
    previous = getattr(_TIFF_LOG.local, "sink", None)
    sink: list[str] = []
    _TIFF_LOG.local.sink = sink
    try:
        yield sink
    finally:
        _TIFF_LOG.local.sink = previous
        if previous is not None:
            previous.extend(sink)


# --------------------------------------------------------------------------------------------
# A "source": stored shape, dtype, axes hints, metadata and a reader of index tuples.

Reader = Callable[[tuple], np.ndarray]


@dataclass
class _Source:
    path: Path
    display: str
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    reader: Reader
    file_axes: str = ""
    axes: str | None = None  # letters of TZCYXS or "?" (unknown) per dim, when metadata says
    rgb: bool = False  # an S axis of size 3/4 holds colour
    z_means_slices: bool = False  # ImageJ/OME named the axis Z explicitly
    frame_interval_s: float | None = None
    pixel_size_um: float | None = None
    header_claim: int | None = None  # frame count the header claims, compared after planning
    calibration: tuple[float, float] | None = None
    lossy: bool = False
    warnings: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    decoded_bytes: int | None = None  # bytes a full decode produces; None: shape x itemsize
    sequential: bool = False  # frames decode in order only (video): read in one pass

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing must not mask the real error
                pass
        self.closers.clear()


def natural_sort_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically (``f2`` before ``f10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _split_hdf5_path(path: str | Path) -> tuple[Path, str | None]:
    s = os.fspath(path)
    if os.path.exists(s):
        return Path(s), None
    m = re.match(r"^(.*\.(?:h5|hdf5|hdf|he5)):(/?.*)$", s, flags=re.IGNORECASE)
    if m and os.path.exists(m.group(1)):
        return Path(m.group(1)), m.group(2) or None
    return Path(s), None


def _sniff(path: Path) -> str | None:
    """Format from the file's first bytes, or None when unrecognised."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return "tiff"
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
        if head[:3] == b"\xff\xd8\xff":
            return "jpeg"
        if head[:6] == b"\x93NUMPY":
            return "npy"
        if head[:8] == b"\x89HDF\r\n\x1a\n":
            return "hdf5"
        if file_safety.sniff_video_format(head) is not None:
            return "video"
        for offset in (512, 1024, 2048):  # HDF5 with a user block
            fh.seek(offset)
            if fh.read(8) == b"\x89HDF\r\n\x1a\n":
                return "hdf5"
    return None


_DEFAULT_SUFFIX = {"tiff": ".tif", "png": ".png", "jpeg": ".jpg", "npy": ".npy", "hdf5": ".h5"}
_VIDEO_SUFFIX = {"mov": ".mp4", "avi": ".avi", "matroska": ".mkv", "asf": ".wmv"}


def default_recording_name(path: Path) -> str:
    """A name for a file that came without one (a raw upload with no ``filename``):
    ``recording`` plus the suffix of the format its first bytes show (``recording.npy`` for a
    NumPy file; ``recording.tif`` when unrecognised). A raw ``.npy`` upload used to be stored,
    and listed, as recording.tif (a new-user check)."""
    kind = _sniff(path)
    if kind == "video":
        with open(path, "rb") as fh:
            fmt = file_safety.sniff_video_format(fh.read(16))
        return "recording" + _VIDEO_SUFFIX.get(fmt or "", ".mp4")
    return "recording" + _DEFAULT_SUFFIX.get(kind or "tiff", ".tif")


def _format_from_extension(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_TIFF_EXT):
        return "tiff"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".jpg", ".jpeg")):
        return "jpeg"
    if name.endswith(_HDF5_EXT):
        return "hdf5"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(_VIDEO_EXT):
        return "video"
    if name.endswith(_BIOIO_EXT):
        return "bioio"
    return None


def _no_dirs(exc: BaseException, path: Path) -> str:
    """``str(exc)`` without the folder of ``path`` (messages go to users: no server paths)."""
    text = str(exc)
    for folder in {str(path.parent), os.path.realpath(path.parent)}:
        text = text.replace(folder + os.sep, "")
    return text


def _describe_head(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(64)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and printable == len(head):  # quoted as text, not as Python bytes (b'...')
        return f'it starts with "{head[:12].decode("ascii")}", which looks like text'
    return f"it starts with the bytes {head[:12].hex(' ')}, which looks like binary data"


def _open_source(
    path: str | Path, limits: ReadLimits | None = None, dataset: str | None = None
) -> _Source:
    """Open a recording: headers only, no pixel decoded. ``limits`` bounds what the header
    walk itself may allocate (HDF5 chunk size, video packet counting). ``dataset``: the HDF5
    dataset to read (the reading option; a ``file.h5:/name`` suffix says the same)."""
    p, named = _split_hdf5_path(path)
    dataset = dataset or named
    display = os.fspath(path)
    if not p.exists():
        raise RecordingError(f"{display}: no such file or folder; check the path.")
    if p.is_dir():
        return _open_folder(p, display)
    size = p.stat().st_size
    if size == 0:
        raise RecordingError(
            f"{p.name} is empty (0 bytes): the upload or copy probably failed; copy the file again."
        )
    try:
        sniffed = _sniff(p)
    except OSError as exc:
        raise RecordingError(f"{p.name} cannot be opened ({exc}); check its permissions.") from exc
    by_ext = _format_from_extension(p)
    fmt = sniffed or by_ext
    if sniffed is None:
        if by_ext == "video":
            raise RecordingError(
                f"{p.name} is not an AVI, MP4/MOV, MKV/WebM or WMV video: {_describe_head(p)}. "
                "Playlists (m3u8), ffconcat lists and other files that name further files are "
                f"not accepted; upload the video file itself, or {_CONVERT_HINT}."
            )
        if by_ext in ("tiff", "png", "jpeg", "hdf5", "npy"):
            raise RecordingError(
                f"{p.name} is not a valid {by_ext.upper()} file: {_describe_head(p)}. It may be "
                f"another kind of file renamed to {p.suffix!r}, or damaged; export the recording "
                "again in its original format."
            )
        if by_ext is None:
            raise RecordingError(
                f"{p.name}: unsupported file format {p.suffix or '(no extension)'!r}. CalSeg reads "
                f"{_SUPPORTED}; {_CONVERT_HINT}."
            )
    extra: list[str] = []
    if sniffed and by_ext and sniffed != by_ext and not (sniffed == "video" and by_ext == "video"):
        extra.append(
            f"file is named {p.suffix!r} but its content is {sniffed.upper()}; read it as "
            f"{sniffed.upper()}"
        )
    if fmt != "hdf5" and dataset:
        raise RecordingError(
            f"{display}: a dataset (the reading option dataset, or a ':/dataset' suffix) is only "
            f"meaningful for HDF5 files; this is {str(fmt).upper()}."
        )
    openers = {
        "tiff": _open_tiff,
        "png": _open_pillow,
        "jpeg": _open_pillow,
        "npy": _open_npy,
        "video": _open_video,
        "bioio": _open_bioio,
    }
    if fmt == "hdf5":
        src = _open_hdf5(p, display, dataset, limits.max_bytes if limits else None)
    elif fmt == "video":
        src = _open_video(
            p,
            display,
            limits.max_pixels if limits else None,
            limits.max_frame_pixels if limits else None,
        )
    else:
        src = openers[fmt](p, display)  # type: ignore[index]
    src.warnings[:0] = extra
    return src


# ---------------------------------------------------------------------------------- TIFF ----

_UNIT_UM = {
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\u00b5m": 1.0,
    "\u03bcm": 1.0,
    "\\u00b5m": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
}
_UNIT_S = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
    "microsecond": 1e-6,
    "microseconds": 1e-6,
    "ns": 1e-9,
    "nanosecond": 1e-9,
    "nanoseconds": 1e-9,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


def time_unit_s(unit: Any) -> float | None:
    """Seconds per ``unit`` (a time unit as ImageJ or OME write it: ``"s"``, ``"ms"``,
    ``"\u00b5s"`` or ImageJ's escaped ``"\\u00B5s"``, the Greek mu, ``"min"``, ``"hours"``...;
    case and surrounding spaces ignored), or None for a unit not known here. An unknown unit
    was read as seconds: ``finterval=50`` with ``tunit=milliseconds`` became 50 s, 1000x off,
    silently (a 9th attack run)."""
    text = str(unit).strip().lower()
    for mu in ("\\u00b5", "\\u03bc", "\u03bc"):  # ImageJ's escapes, the Greek mu
        text = text.replace(mu, "\u00b5")
    return _UNIT_S.get(text or "s")  # none given: seconds, ImageJ's and OME's default


FRAME_INTERVAL_RANGE_S = (1e-4, 3600.0)
"""Accepted seconds between frames: 10 kHz (beyond any calcium-imaging camera) to 1 h. The one
home of these bounds: the infer job's ``frame_interval_s``, ``calseg segment`` /
``calseg analyze --frame-interval-s``, ``calseg fit-sim`` and file metadata (a value outside
is not used)."""
PIXEL_SIZE_RANGE_UM = (1e-3, 1000.0)
"""Accepted µm per pixel: 1 nm (beyond super-resolution) to 1 mm."""


def usable_unit(value: float | None, bounds: tuple[float, float]) -> bool:
    """Whether ``value`` is given, finite and within ``bounds`` (inclusive)."""
    return value is not None and math.isfinite(float(value)) and bounds[0] <= value <= bounds[1]


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _resolution_px_per_unit(page: Any) -> float | None:
    tag = page.tags.get("XResolution") if hasattr(page, "tags") else None
    if tag is None:
        return None
    value = tag.value
    try:
        num, den = value if isinstance(value, tuple) else (value, 1)
        return _positive(num / den) if den else None
    except (TypeError, ValueError):
        return None


def _tiff_truncation(tf: Any, series: Any, size: int, log: list[str]) -> str | None:
    """Return a description of a truncation/corruption, or None when the file looks whole."""
    for msg in log:
        low = msg.lower()
        if "invalid page offset" in low or "corrupted tag list" in low or "invalid tag" in low:
            return "its chain of image directories points past the end of the file"
    if series.dataoffset is not None:
        need = int(series.dataoffset) + int(series.nbytes)
        if need > size:
            return f"its image data needs {need} bytes but the file has only {size}"
    pages = series.pages
    for idx in (0, len(pages) - 1):
        page = pages[idx]
        if page is None:
            continue
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=False):
            if off and off + cnt > size:
                return (
                    f"image page {idx + 1} of {len(pages)} ends at byte {off + cnt} but the file "
                    f"has only {size} bytes"
                )
    return None


def _ome_metadata(xml: str) -> tuple[float | None, float | None]:
    """(pixel_size_um, frame_interval_s) from OME-XML, when present."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    if pixels is None:
        return None, None
    px = _positive(pixels.get("PhysicalSizeX"))
    if px is not None:
        px *= _UNIT_UM.get((pixels.get("PhysicalSizeXUnit") or "\u00b5m").strip().lower(), math.nan)
        px = _positive(px)
    dt = _positive(pixels.get("TimeIncrement"))
    if dt is not None:
        dt *= time_unit_s(pixels.get("TimeIncrementUnit") or "s") or math.nan
        dt = _positive(dt)
    if dt is None:
        times = []
        for plane in pixels:
            if plane.tag.endswith("}Plane") and plane.get("TheZ", "0") == "0":
                if plane.get("TheC", "0") == "0" and plane.get("DeltaT") is not None:
                    try:
                        times.append((int(plane.get("TheT", "0")), float(plane.get("DeltaT"))))
                    except ValueError:
                        pass
        if len(times) >= 2:
            times.sort()
            dt = _positive(np.median(np.diff([t for _, t in times])))
            plane = next(el for el in pixels if el.tag.endswith("}Plane"))
            per_unit = time_unit_s(plane.get("DeltaTUnit") or "s") or math.nan
            dt = _positive(dt * per_unit) if dt else None
    return px, dt


def _open_tiff_file(path: Path) -> Any:
    """``tifffile.TiffFile`` over a :class:`~calseg.io.file_safety.ConfinedFile` (and with
    tifffile's multi-file OME reading off): it can read this file and no other."""
    import tifffile

    fh = file_safety.ConfinedFile(path)
    try:
        n = file_safety.count_tiff_pages(fh, path.stat().st_size)
        if n == 0:
            raise RecordingError(
                f"{path.name} is damaged or truncated: its first image directory points past "
                "the end of the file; copy or export it again."
            )
        try:
            tf = tifffile.TiffFile(fh, _multifile=False)
        except TypeError:  # a tifffile without the private flag: ConfinedFile suffices
            tf = tifffile.TiffFile(fh)
    except BaseException:
        fh.close()
        raise
    generic = tf._series_generic

    def series_generic() -> Any:
        # tifffile builds its generic series (files without usable metadata, and where a
        # format's metadata does not fit the pages: ImageJ images=0, a shaped shape of other
        # size, NDPI tags) by comparing each page with every earlier page of its kind: 32,000
        # identical 8x8 pages (3.6 MB) took 128 s (a fourth attack run, 2026-12-07). The walk
        # above refused more than MAX_MIXED_TIFF_PAGES directories of mixed kinds, so there
        # the pages are of one kind: tifffile's uniform series, one pass.
        if n > file_safety.MAX_MIXED_TIFF_PAGES:
            return tf._series_uniform()
        return generic()

    tf._series_generic = series_generic
    tf.calseg_n_directories = n  # the walk's count (pages and SubIFDs)
    # Micro-Manager stacks: tifffile sizes a list by the index map's largest indices, cubed,
    # when the other files of the set are out of reach, as they always are here (one file):
    # a 376-byte file took the API to 5.4 GB (a fifth attack run, 2026-12-07). Without this
    # builder tifffile goes on to the file's OME or ImageJ metadata, or its plain pages.
    tf._series_mmstack = lambda: None
    tf_close = tf.close

    def close() -> None:
        try:
            tf_close()
        finally:
            fh.close()

    tf.close = close
    return tf


def _same_frames(all_series: Sequence[Any]) -> bool:
    """True when every series is one image of the same shape, dtype and axes: what
    ``TiffWriter.write()`` called once per frame leaves (each call starts a series)."""
    first = all_series[0]
    return len(all_series) > 1 and all(
        len(s.pages) == 1
        and tuple(s.shape) == tuple(first.shape)
        and s.dtype == first.dtype
        and s.axes == first.axes
        and len(tuple(s.shape)) in (2, 3)
        for s in all_series
    )


def _open_tiff(path: Path, display: str) -> _Source:
    size = path.stat().st_size
    with _capture_tifffile_log() as log:
        try:
            tf = _open_tiff_file(path)
        except (RecordingError, UnsafeRecording):
            raise
        except Exception as exc:  # TiffFileError, struct errors, ...
            raise RecordingError(
                f"{path.name} is not a readable TIFF file ({exc}); it is probably damaged or "
                "truncated: copy or export it again."
            ) from exc
        try:
            if tf.is_ome:
                # before tifffile sizes it; the walk counted the pages
                file_safety.check_ome_sizes(tf.ome_metadata or "", n_pages=tf.calseg_n_directories)
                foreign = file_safety.ome_foreign_files(tf.ome_metadata or "", path.name)
                if foreign:
                    raise UnsafeRecording(
                        f"it is one part of a multi-file OME-TIFF: its OME-XML names "
                        f"{len(foreign)} other file(s) ({', '.join(repr(f) for f in foreign[:3])})"
                        ". Only single-file recordings are read, and a file may not name other "
                        "files; combine the parts into one file (Fiji: open with Bio-Formats, "
                        "then File > Save As > Tiff...) and upload that"
                    )
            n_pages = len(tf.pages)  # parses every image directory
            all_series = tf.series
        except UnsafeRecording:
            tf.close()
            raise
        except Exception as exc:
            tf.close()
            raise RecordingError(
                f"{path.name}: its TIFF structure is damaged ({exc}); export it again."
            ) from exc
    if n_pages == 0 or not all_series:
        tf.close()
        if any("offset" in m.lower() for m in log):
            raise RecordingError(
                f"{path.name} is damaged or truncated: its first image directory points past the "
                "end of the file; copy or export it again."
            )
        raise RecordingError(f"{path.name} holds no images (0 frames); export the recording again.")
    series = all_series[0]
    trunc = _tiff_truncation(tf, series, size, log)
    if trunc is None and _same_frames(all_series):
        trunc = _tiff_truncation(tf, all_series[-1], size, log)
    if trunc is not None:
        tf.close()
        raise RecordingError(
            f"{path.name} is truncated: {trunc}. The upload or copy was probably cut short; "
            "copy the complete file again."
        )
    if _same_frames(all_series) and not (tf.is_ome or tf.is_imagej):
        return _tiff_series_as_frames(tf, all_series, path, display)

    if tf.is_ome:
        fmt = "ome-tiff"
    elif tf.is_imagej:
        fmt = "imagej-tiff"
    elif tf.is_bigtiff:
        fmt = "bigtiff"
    else:
        fmt = "tiff"
    warn: list[str] = []
    if len(all_series) > 1:
        shapes = ", ".join(str(tuple(s.shape)) for s in all_series[1:4])
        warn.append(
            f"file holds {len(all_series)} image series; read the first {tuple(series.shape)} "
            f"and ignored the others ({shapes})"
        )
    keyframe = series.keyframe
    file_axes = str(series.axes)
    shape = tuple(int(n) for n in series.shape)
    photometric = int(getattr(keyframe, "photometric", 1) or 1)
    rgb = photometric in (2, 6) and "S" in file_axes  # RGB, YCbCr
    if rgb and tf.is_shaped and file_axes.index("S") < file_axes.index("Y"):
        n_s = shape[file_axes.index("S")]
        warn.append(
            f"stored as {n_s} planar colour planes (numpy-written {n_s}-image stacks often end "
            f"up so); if they are frames, read with --axes {file_axes.replace('S', 'T')} "
            "(parameter axes)"
        )
    if photometric == 3:
        warn.append("palette (indexed-colour) TIFF: read the palette indices as intensities")

    # axes from metadata: tifffile's letters, unknown ones as "?"
    axes = "".join(a if a in "TZCYX" else ("S" if a == "S" and rgb else "?") for a in file_axes)
    px_size: float | None = None
    interval: float | None = None
    header_claim: int | None = None
    calibration: tuple[float, float] | None = None
    z_slices = False
    if tf.is_imagej:
        ij = tf.imagej_metadata or {}
        z_slices = "Z" in file_axes
        unit = str(ij.get("unit", "")).strip().lower()
        res = _resolution_px_per_unit(keyframe)
        if unit in _UNIT_UM and res:
            px_size = _positive(_UNIT_UM[unit] / res)
        finterval = _positive(ij.get("finterval"))
        if finterval:
            per_unit = time_unit_s(ij.get("tunit", "s"))
            if per_unit is None:
                warn.append(
                    f"ImageJ frame interval {finterval:g} in the unknown time unit "
                    f"{str(ij.get('tunit'))[:40]!r}: not used (give frame_interval_s)"
                )
            else:
                interval = _positive(finterval * per_unit)
        claimed = ij.get("frames") or (ij.get("slices") if "frames" not in ij else None)
        if claimed is None and "channels" not in ij:
            claimed = ij.get("images")
        if claimed is not None:
            header_claim = int(claimed)
        cf = ij.get("cf", 0)
        if "c0" in ij or "c1" in ij:
            c0, c1 = float(ij.get("c0", 0.0)), float(ij.get("c1", 1.0))
            if int(cf) == 0 and (c0, c1) != (0.0, 1.0):
                calibration = (c0, c1)
                warn.append(
                    f"applied the ImageJ calibration value = {c0:g} + {c1:g} * stored value "
                    "(returned as float32)"
                )
            elif int(cf) != 0:
                warn.append(f"ImageJ calibration function {cf} is not a straight line; not applied")
    elif tf.is_ome:
        z_slices = True
        px_size, interval = _ome_metadata(tf.ome_metadata or "")
    else:
        px_size = _tiff_pixel_size(keyframe)
        if tf.is_shaped and series.kind != "shaped":
            meta = (tf.shaped_metadata or ({},))[0] or {}
            claimed_shape = meta.get("shape")
            if claimed_shape and len(claimed_shape) >= 3:
                header_claim = int(claimed_shape[0])

    reader = _tiff_reader(tf, series, path)
    closers = [tf.close] + ([reader.close] if isinstance(reader, _MappedArray) else [])
    return _Source(
        path=path,
        display=display,
        format=fmt,
        shape=shape,
        dtype=np.dtype(series.dtype),
        reader=reader,
        file_axes=file_axes,
        axes=axes,
        rgb=rgb,
        z_means_slices=z_slices,
        frame_interval_s=interval,
        pixel_size_um=px_size,
        header_claim=header_claim,
        calibration=calibration,
        lossy=int(getattr(keyframe, "compression", 1) or 1) in (7, 34892, 33007),
        warnings=warn,
        closers=closers,
    )


def _tiff_pixel_size(page: Any) -> float | None:
    """Pixel width in um from a page's XResolution and ResolutionUnit tags, or None."""
    res = _resolution_px_per_unit(page)
    unit_tag = page.tags.get("ResolutionUnit")
    unit_val = int(unit_tag.value) if unit_tag is not None else 2
    factor = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit_val)
    return _positive(factor / res) if res and factor else None


def _tiff_series_as_frames(tf: Any, all_series: Sequence[Any], path: Path, display: str) -> _Source:
    """A TIFF of ``n`` one-image series of one shape (``TiffWriter.write()`` called once per
    frame) read as ``n`` frames, page by page."""
    first = all_series[0]
    keyframe = first.keyframe
    file_axes = str(first.axes)
    photometric = int(getattr(keyframe, "photometric", 1) or 1)
    rgb = photometric in (2, 6) and "S" in file_axes
    axes = "T" + "".join(a if a in "YX" else ("S" if a == "S" and rgb else "?") for a in file_axes)
    pages = [int(s.pages[0].index) for s in all_series]
    page_shape = tuple(int(n) for n in first.shape)
    shape = (len(pages), *page_shape)

    def read(index: tuple) -> np.ndarray:
        wanted = np.arange(len(pages))[index[0]]
        flat = [pages[int(i)] for i in np.ravel(wanted)]
        if not flat:
            data = np.empty((0, *page_shape), dtype=first.dtype)
        else:
            with _capture_tifffile_log():
                data = np.asarray(tf.asarray(key=flat)).reshape((len(flat), *page_shape))
        if np.ndim(wanted) == 0:
            data = data[0]
            return data[tuple(index[1:])]
        return data[(slice(None), *index[1:])]

    return _Source(
        path=path,
        display=display,
        format="bigtiff" if tf.is_bigtiff else "tiff",
        shape=shape,
        dtype=np.dtype(first.dtype),
        reader=read,
        file_axes="I" + file_axes,
        axes=axes,
        rgb=rgb,
        pixel_size_um=_tiff_pixel_size(keyframe),
        lossy=int(getattr(keyframe, "compression", 1) or 1) in (7, 34892, 33007),
        warnings=[
            f"the file holds {len(pages)} image series of one {' x '.join(map(str, page_shape))} "
            "image each (what tifffile's TiffWriter.write() writes when called once per frame): "
            f"read them as {len(pages)} frames"
        ],
        closers=[tf.close],
    )


class _MappedArray:
    """A reader of index tuples over an uncompressed array stored at ``offset`` in a file,
    through ``mmap``: each read copies the selection, then the mapped pages are dropped
    (``MADV_DONTNEED``), so the process's resident memory holds the copies only, not the file
    pages it touched (a memory map of a 4 GB file read end to end would otherwise count 4 GB)."""

    def __init__(
        self, path: Path, dtype: np.dtype, offset: int, shape: tuple, order: str = "C"
    ) -> None:
        import mmap

        self.dtype, self.offset, self.shape, self.order = dtype, offset, shape, order
        need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < need:
                raise ValueError(f"the file holds fewer than the {need} bytes its header declares")
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.lock = threading.Lock()

    def __call__(self, index: tuple) -> np.ndarray:
        import mmap

        with self.lock:
            view = np.ndarray(
                self.shape, self.dtype, buffer=self.map, offset=self.offset, order=self.order
            )
            out = np.array(view[index])
            del view
            if hasattr(mmap, "MADV_DONTNEED"):
                self.map.madvise(mmap.MADV_DONTNEED)
        return out

    def close(self) -> None:
        with self.lock:
            self.map.close()


def _tiff_reader(tf: Any, series: Any, path: Path) -> Reader:
    """Reader of index tuples over the series: memory-mapped when contiguous, else by page."""
    shape = tuple(int(n) for n in series.shape)
    if series.dataoffset is not None:
        dtype = np.dtype(tf.byteorder + np.dtype(series.dtype).char)
        try:
            return _MappedArray(path, dtype, int(series.dataoffset), shape)
        except (ValueError, OSError):
            pass

    keyframe = series.keyframe
    page_shape = tuple(int(n) for n in keyframe.shape)
    n_lead = len(shape) - len(page_shape)
    pages = series.pages
    lead_ok = (
        n_lead >= 0
        and shape[n_lead:] == page_shape
        and int(np.prod(shape[:n_lead], dtype=np.int64)) == len(pages)
    )
    si = list(tf.series).index(series)
    stored = len(pages) * int(np.prod(page_shape, dtype=np.int64))
    declared = int(np.prod(shape, dtype=np.int64))
    if stored > declared:  # tifffile would decode every page, then fail to reshape
        raise RecordingError(
            f"{path.name}: its {series.kind or 'TIFF'} metadata describes shape {shape}, but the "
            f"series holds {len(pages):,} pages of {page_shape} "
            f"({stored:,} values for {declared:,}): the metadata does not describe the file, "
            "and reading it would decode every page. Save the stack again as a plain TIFF "
            "(Fiji: File > Save As > Tiff...)"
        )

    if not lead_ok:
        cache: dict[str, np.ndarray] = {}

        def read_all(index: tuple) -> np.ndarray:
            if "a" not in cache:
                with _capture_tifffile_log():
                    cache["a"] = np.asarray(series.asarray()).reshape(shape)
            return cache["a"][index]

        return read_all

    page_numbers = np.arange(len(pages)).reshape(shape[:n_lead])

    def read_pages(index: tuple) -> np.ndarray:
        lead_index = tuple(index[:n_lead])
        wanted = page_numbers[lead_index]
        lead_shape = wanted.shape
        flat = [int(i) for i in np.ravel(wanted)]
        if not flat:
            data = np.empty((0, *page_shape), dtype=series.dtype)
        else:
            with _capture_tifffile_log():
                data = np.asarray(tf.asarray(key=flat, series=si))
        data = data.reshape(lead_shape + page_shape)
        return data[(slice(None),) * len(lead_shape) + tuple(index[n_lead:])]

    return read_pages


# ------------------------------------------------------------------------ PNG / JPEG -------


_PILLOW_FORMATS = {"png": ["PNG"], "jpeg": ["JPEG"]}
"""Pillow plugins a sniffed PNG/JPEG may be opened with (never Pillow's own format guessing).
The JPEG plugin opens multi-picture (MPO) files too; "MPO" is no opener of Pillow's, and
naming it turned any JPEG the JPEG plugin refused into a bare ``KeyError('MPO')`` (a fourth
attack run, 2026-12-07)."""
_PILLOW_PLUGINS = {
    "png": ("PngImagePlugin", "PngImageFile"),
    "jpeg": ("JpegImagePlugin", "JpegImageFile"),
}


_UNDECODABLE_IMAGE = {
    "jpeg": "it is damaged or truncated, or a kind of JPEG the image reader does not decode "
    "(12- or 16-bit, lossless, arithmetic-coded): export the recording again, as TIFF.",
    "png": "it is probably damaged or truncated: export it again.",
}
"""What to do about a PNG/JPEG Pillow cannot open or decode (a valid 16-bit lossless JPEG was
called damaged: a fourth attack run, 2026-12-07)."""


def _pillow_reason(path: Path, fmt: str, exc: Exception) -> str:
    """Why Pillow could not open ``path``: ``Image.open`` reports only "cannot identify image
    file" when its one plugin refuses, so the sniffed plugin's own error is asked for."""
    from PIL import UnidentifiedImageError

    if not isinstance(exc, UnidentifiedImageError):
        return str(exc) or type(exc).__name__
    import importlib

    module, name = _PILLOW_PLUGINS[fmt]
    try:
        getattr(importlib.import_module(f"PIL.{module}"), name)(str(path)).close()
    except Exception as inner:  # the plugin's reason, e.g. "no marker found"
        return str(inner) or type(inner).__name__
    return str(exc)


_PILLOW_CONVERT = {"P": None, "LA": "L", "PA": "L", "CMYK": "RGB", "I;16B": "I;16"}


def _pillow_array(path: Path, fmt: str) -> np.ndarray:
    """Decode the first frame of a PNG/JPEG (after the budget check), converted as Pillow's
    modes require: palette -> RGB(A), LA/PA -> L, CMYK -> RGB, 16-bit big-endian -> native."""
    from PIL import Image

    with Image.open(path, formats=_PILLOW_FORMATS[fmt]) as im:
        im.load()
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in _PILLOW_CONVERT:
            im = im.convert(_PILLOW_CONVERT[mode])
        return np.asarray(im)


def _open_pillow(path: Path, display: str) -> _Source:
    """A PNG/JPEG: its header only (size, mode, frame count); pixels decoded on first read."""
    from PIL import Image

    fmt = "jpeg" if _sniff(path) == "jpeg" else "png"
    notes: list[str] = []
    with open(path, "rb") as fh:
        file_safety.check_image_segments(fh, fmt)
        if fmt == "jpeg":
            file_safety.check_jpeg_scans(fh)
    try:
        with Image.open(path, formats=_PILLOW_FORMATS[fmt]) as im:
            width, height = im.size
            mode = im.mode
            n = int(getattr(im, "n_frames", 1) or 1)
            has_alpha = "transparency" in im.info
    except Image.DecompressionBombError as exc:
        raise RecordingTooLarge(
            f"{path.name} declares an image of more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
            f"({exc}); CalSeg does not decode it. Crop or bin the image and upload it again.",
            pixels=0,
            nbytes=0,
            limits=ReadLimits(),
        ) from exc
    except Exception as exc:
        raise RecordingError(
            f"{path.name} cannot be decoded as an image ({_pillow_reason(path, fmt, exc)}); "
            f"{_UNDECODABLE_IMAGE[fmt]}"
        ) from exc
    if n > 1:
        notes.append(f"image holds {n} frames; read the first only")
    if mode == "P":
        mode = "RGBA" if has_alpha else "RGB"
    mode = _PILLOW_CONVERT.get(mode) or mode
    bands = {"RGB": 3, "RGBA": 4, "YCbCr": 3}.get(mode, 1)
    dtype = np.dtype(
        {"I;16": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": np.float32}.get(mode, np.uint8)
    )
    if mode == "1":
        dtype = np.dtype(np.bool_)
    shape = (height, width, bands) if bands > 1 else (height, width)
    rgb = bands in (3, 4)
    axes = "YXS" if rgb else "YX"
    if fmt == "jpeg":
        notes.append("JPEG is lossy: intensities are not the camera's raw values")
    cache: dict[str, np.ndarray] = {}

    def read(index: tuple) -> np.ndarray:
        if "a" not in cache:
            try:
                arr = _pillow_array(path, fmt)
            except Exception as exc:
                raise RecordingError(
                    f"{path.name} cannot be decoded as an image ({exc}); {_UNDECODABLE_IMAGE[fmt]}"
                ) from exc
            if arr.shape != shape:
                raise RecordingError(
                    f"{path.name}: its header says {shape} but it decodes to {arr.shape}; the "
                    "file is damaged: export it again."
                )
            cache["a"] = arr
        return cache["a"][index]

    return _Source(
        path=path,
        display=display,
        format=fmt,
        shape=shape,
        dtype=dtype,
        reader=read,
        file_axes=axes,
        axes=axes,
        rgb=rgb,
        lossy=fmt == "jpeg",
        warnings=notes,
    )


# ---------------------------------------------------------------------------- folder -------


def _open_folder(path: Path, display: str) -> _Source:
    files = sorted(
        (
            f
            for f in path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(_FOLDER_EXT)
        ),
        key=lambda f: natural_sort_key(f.name),
    )
    others = [
        f.name
        for f in path.iterdir()
        if not f.name.startswith(".") and (f.is_dir() or not f.name.lower().endswith(_FOLDER_EXT))
    ]
    if not files:
        raise RecordingError(
            f"folder {path.name} holds no TIFF/PNG/JPEG frames (0 frames); put one image file "
            "per frame in it, or give the path of a single recording file."
        )
    srcs: list[_Source] = []
    try:
        first_shape: tuple[int, ...] | None = None
        first_dtype: np.dtype | None = None
        for f in files:
            src = _open_source(f)
            srcs.append(src)
            squeezed = tuple(n for n in src.shape if n != 1)
            is_frame = len(squeezed) == 2 or (len(squeezed) == 3 and src.rgb)
            if not is_frame:
                raise RecordingError(
                    f"folder {path.name}: {f.name} holds data of shape {src.shape}, not one frame; "
                    "a folder must hold one 2-D frame per file; read that file on its own instead."
                )
            if first_shape is None:
                first_shape, first_dtype = squeezed, src.dtype
            elif squeezed != first_shape or src.dtype != first_dtype:
                raise RecordingError(
                    f"folder {path.name}: {f.name} has shape {squeezed} and dtype {src.dtype}, but "
                    f"{files[0].name} has {first_shape} and {first_dtype}; all frames of a "
                    "recording must match: remove the odd file."
                )
            src.close()
    except RecordingError:
        for s in srcs:
            s.close()
        raise
    assert first_shape is not None and first_dtype is not None
    rgb = len(first_shape) == 3
    warn = []
    if others:
        warn.append(
            f"ignored {len(others)} non-frame entries in the folder (e.g. {sorted(others)[0]!r})"
        )
    first_warn = srcs[0].warnings if srcs else []
    warn.extend(w for w in first_warn if "lossy" in w)

    def read(index: tuple) -> np.ndarray:
        t_index = index[0]
        chosen = files[t_index] if isinstance(t_index, slice) else [files[t_index]]
        out = []
        for f in chosen:
            src = _open_source(f)
            try:
                frame = src.reader(tuple(slice(None) for _ in src.shape))
            finally:
                src.close()
            out.append(frame.reshape(first_shape))
        stack = np.stack(out) if out else np.empty((0, *first_shape), dtype=first_dtype)
        if not isinstance(t_index, slice):
            stack = stack[0]
        return stack[(slice(None),) * (1 if isinstance(t_index, slice) else 0) + index[1:]]

    axes = "TYXS" if rgb else "TYX"
    return _Source(
        path=path,
        display=display,
        format="folder",
        shape=(len(files), *first_shape),
        dtype=first_dtype,
        reader=read,
        file_axes=axes,
        axes=axes,
        rgb=rgb,
        lossy=any(f.name.lower().endswith((".jpg", ".jpeg")) for f in files),
        warnings=warn,
    )


# ------------------------------------------------------------------------------ HDF5 -------


def _small_attrs(ds: Any, keys: Sequence[str], max_items: int = 64) -> dict[str, Any]:
    """The attributes ``keys`` of an HDF5 object that exist and hold at most ``max_items``
    values (a metadata attribute is a few letters or numbers; a huge one is never read)."""
    out: dict[str, Any] = {}
    for key in keys:
        try:
            if key not in ds.attrs:
                continue
            aid = ds.attrs.get_id(key)
            if int(np.prod(aid.shape or (1,))) > max_items:
                continue
            out[key] = ds.attrs[key]
        except Exception:  # noqa: BLE001 - optional metadata
            continue
    return out


def _open_hdf5(
    path: Path, display: str, dataset: str | None, max_bytes: int | None = None
) -> _Source:
    import h5py

    file_safety.no_hdf5_plugins()
    try:
        h5 = h5py.File(path, "r", driver="sec2")  # one file: no family/multi/split drivers
    except Exception as exc:
        raise RecordingError(
            f"{path.name} is not a readable HDF5 file ({exc}); it is probably damaged or "
            "truncated: copy it again."
        ) from exc
    try:
        # external/user-defined links refused before any lookup; every dataset, opened (which
        # reads no other file)
        found = file_safety.check_hdf5_file(h5)
        for n, d in found:  # before any extent: a virtual dataset's opens the files it names
            file_safety.check_hdf5_storage(d, n)
        names = [n for n, _ in found]
        listing = ", ".join(f"/{n} {tuple(d.shape)}" for n, d in found[:8]) or "none"
        warn: list[str] = []
        if dataset:
            key = dataset.lstrip("/")
            obj = h5.get(key)
            if not isinstance(obj, h5py.Dataset):
                raise RecordingError(
                    f"{path.name} has no dataset {dataset!r}; its datasets are: {listing}. "
                    "Name one with the reading option dataset (file.h5:/group/dataset)."
                )
            name, ds = key, obj
        else:
            cands = [(n, d) for n, d in found if d.ndim == 3] or [
                (n, d) for n, d in found if d.ndim >= 2
            ]
            if not cands:
                raise RecordingError(
                    f"{path.name} holds no image dataset (datasets: {listing}); write the "
                    "recording as a (T, H, W) dataset."
                )
            name, ds = cands[0]
            if len(cands) > 1:
                warn.append(
                    f"file holds {len(cands)} image datasets; read /{name} (pick another with the "
                    f"reading option dataset, or file.h5:/name; others: "
                    f"{', '.join('/' + n for n, _ in cands[1:4])})"
                )
        del names
        if ds.dtype.kind not in "uifb":
            raise RecordingError(
                f"{path.name}:/{name} has dtype {ds.dtype}, not numbers; point at an image dataset."
            )
        file_safety.check_hdf5_dataset(ds, name)
        guard = file_safety.Hdf5ChunkGuard(ds, name)
        # one frame: everything but the first (time) axis (Z, channels, colour samples too)
        frame_bytes = int(np.prod(ds.shape[1:] if ds.ndim >= 3 else ds.shape)) * ds.dtype.itemsize
        if guard.chunk_bytes > max(file_safety.MAX_HDF5_CHUNK_BYTES, frame_bytes):
            raise file_safety.UnsafeRecording(
                f"/{name} is stored in chunks of {_size_text(guard.chunk_bytes)}, more than one "
                f"frame ({_size_text(frame_bytes)}) and than "
                f"{_size_text(file_safety.MAX_HDF5_CHUNK_BYTES)}: every frame read decodes "
                "its whole chunk; re-save it with one frame per chunk (h5py: chunks=(1, "
                "height, width))"
            )
        if max_bytes is not None and guard.chunk_bytes > max_bytes:
            raise RecordingTooLarge(
                f"{path.name}:/{name} is stored in chunks of {_size_text(guard.chunk_bytes)} "
                f"({guard.chunk_bytes:,} bytes), and one chunk is decoded at a time: more than "
                f"this server's limit of {_size_text(max_bytes)} ({max_bytes:,} bytes, "
                "max_recording_bytes). Nothing was decoded. Re-save it with one frame per chunk.",
                pixels=0,
                nbytes=guard.chunk_bytes,
                limits=ReadLimits(max_bytes=max_bytes),
            )
        attrs = _small_attrs(
            ds, ("axes", "DIMENSION_LABELS", "dimension_order", "element_size_um", "pixel_size_um",
                 "frame_interval_s", "fps"),
        )  # fmt: skip
        axes = None
        for key in ("axes", "DIMENSION_LABELS", "dimension_order"):
            if key in attrs:
                raw = attrs[key]
                if isinstance(raw, bytes):
                    raw = raw.decode()
                if not isinstance(raw, str):
                    try:
                        raw = "".join(
                            (x.decode() if isinstance(x, bytes) else str(x))[:1] for x in raw
                        )
                    except TypeError:
                        raw = ""
                raw = raw.upper()
                if len(raw) == ds.ndim and set(raw) <= set(AXIS_LETTERS):
                    axes = raw
                elif raw:  # said, not used silently (an 11th attack run: "TYXQ" on 3-D data)
                    warn.append(
                        f"the dataset's {key} attribute {raw[:16]!r} does not fit its "
                        f"{ds.ndim}-D shape {tuple(ds.shape)} (one of the letters "
                        f"{AXIS_LETTERS} per dimension): not used; pass axes to say them"
                    )
        px = None
        if "element_size_um" in attrs:
            try:
                px = _positive(np.ravel(attrs["element_size_um"])[-1])
            except (TypeError, IndexError):
                px = None
        px = px or _positive(attrs.get("pixel_size_um"))
        dt = _positive(attrs.get("frame_interval_s"))
        if dt is None and _positive(attrs.get("fps")):
            dt = _positive(1.0 / float(attrs["fps"]))
    except (RecordingError, UnsafeRecording):
        h5.close()
        raise
    except Exception as exc:
        h5.close()
        raise RecordingError(f"{path.name}: cannot read its HDF5 structure ({exc}).") from exc

    def read_block(index: tuple) -> np.ndarray:
        guard.check(index)  # deflate chunks expand to at most the chunk size
        return np.asarray(ds[index])

    def read(index: tuple) -> np.ndarray:
        try:  # in blocks of a bounded chunk count (file_safety.MAX_HDF5_CHUNKS_PER_READ)
            return file_safety.hdf5_read_in_blocks(read_block, index, ds.shape, ds.chunks)
        except (RecordingError, UnsafeRecording):
            raise
        except Exception as exc:
            raise RecordingError(
                f"{path.name}:/{name}: reading the data failed ({exc}); the file is probably "
                "truncated or damaged: copy it again."
            ) from exc

    return _Source(
        path=path,
        display=display,
        format="hdf5",
        shape=tuple(int(n) for n in ds.shape),
        dtype=np.dtype(ds.dtype),
        reader=read,
        file_axes=axes or "",
        axes=axes,
        frame_interval_s=dt,
        pixel_size_um=px,
        warnings=warn,
        closers=[h5.close],
    )


# ------------------------------------------------------------------------------- npy -------


NPY_MAX_HEADER_BYTES = 10_000
"""Largest ``.npy`` header read (bytes): a header of image frames is under 200."""


def _npy_header_problem(exc: Exception) -> str:
    """What is wrong with a ``.npy`` header NumPy refused, in CalSeg's words (NumPy's message
    named Python's parser objects or told the user to load the file with ``allow_pickle``)."""
    text = str(exc)
    if "Header info length" in text:
        n = re.search(r"\((\d+)\)", text)
        size = f" ({int(n.group(1)):,} bytes)" if n else ""
        return (
            f"its header is longer{size} than the {NPY_MAX_HEADER_BYTES:,} bytes CalSeg reads; "
            "a header of image frames is under 200"
        )
    return (
        "its header is not a plain NumPy header (a dictionary of 'descr', 'fortran_order' and "
        "'shape' holding literal values)"
    )


def _open_npy(path: Path, display: str) -> _Source:
    """A NumPy ``.npy`` array: its header only; selections read through :class:`_MappedArray`
    (never pickles)."""
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as fh:
            version = npy_format.read_magic(fh)
            header = (
                npy_format.read_array_header_1_0
                if version == (1, 0)
                else npy_format.read_array_header_2_0
            )
            try:
                shape, fortran, dtype = header(fh, max_header_size=NPY_MAX_HEADER_BYTES)
            except (ValueError, SyntaxError) as exc:  # NumPy's parser's own words leaked
                raise ValueError(_npy_header_problem(exc)) from None
            offset = fh.tell()
        if any(int(n) < 0 for n in shape):
            raise ValueError(f"its header declares the shape {tuple(shape)}, with a negative size")
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        reader = _MappedArray(path, dtype, offset, tuple(shape), "F" if fortran else "C")
    except Exception as exc:
        raise RecordingError(
            f"{path.name} is not a readable .npy array ({exc}); save it again with numpy.save."
        ) from exc
    if dtype.kind not in "uifb":
        reader.close()
        raise RecordingError(f"{path.name} holds dtype {dtype}, not image numbers.")
    return _Source(
        path=path,
        display=display,
        format="npy",
        shape=tuple(int(n) for n in shape),
        dtype=np.dtype(dtype),
        reader=reader,
        closers=[reader.close],
    )


# ----------------------------------------------------------------------------- video -------


_GRAY_PIX_FMTS = {"gray": ("gray", np.uint8), "gray16le": ("gray16le", np.uint16),
                  "gray16be": ("gray16le", np.uint16)}  # fmt: skip
"""Grey pixel formats decoded as they are (lossless scientific video, e.g. FFV1); every other
pixel format is converted to RGB24 and then to grey by luma."""


class _VideoFrames:
    """Frames of a video decoded in order, one at a time, from a container opened by
    :func:`calseg.io.file_safety.open_video`. A request for an earlier frame reopens the file
    (videos are not assumed seekable to a frame); memory holds only the frames requested."""

    def __init__(self, path: Path, fmt: str, pix: str, dtype: np.dtype, frame_shape: tuple) -> None:
        self.path, self.fmt, self.pix, self.dtype = path, fmt, pix, dtype
        self.frame_shape = frame_shape
        self.container: Any = None
        self.frames: Iterator[Any] | None = None
        self.next_t = 0
        self.lock = threading.Lock()

    def _restart(self) -> None:
        self.close()
        # the header's size, padded as decoders align their buffers (to 64 px, plus a block),
        # plus 2^20 px for decoders' scratch images checked against the same limit: FFmpeg's
        # MPEG-4 Part 2 decoder needs 53,760 px whatever the frame size (16 x 16 to 100 x 100),
        # so with the padding alone every MPEG-4 video under 232 x 232 failed every frame with
        # ENOMEM ("too large to read into memory"; found 2026-12-07)
        h, w = (int(n) for n in self.frame_shape[:2])
        frame_pixels = (-(-h // 64) * 64 + 64) * (-(-w // 64) * 64 + 64) + 2**20
        self.container = file_safety.open_video(self.path, self.fmt, frame_pixels)
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 2  # frames in flight (memory) do not grow with cores
        # no frame much larger than the header's is ever allocated (a mid-stream size change;
        # open_video's stream options reach only the header probe's decoder)
        stream.codec_context.options = {"max_pixels": str(frame_pixels)}
        self.frames = iter(self.container.decode(stream))
        self.next_t = 0

    def read(self, ts: Sequence[int]) -> np.ndarray:
        """Frames ``ts`` (increasing indices) as ``(len(ts), H, W[, 3])``."""
        out = np.empty((len(ts), *self.frame_shape), dtype=self.dtype)
        if not len(ts):
            return out
        with self.lock:
            if self.frames is None or ts[0] < self.next_t:
                self._restart()
            want = {t: i for i, t in enumerate(ts)}
            last = ts[-1]
            while self.next_t <= last:
                frame = next(self.frames, None)  # type: ignore[arg-type]
                if frame is None:
                    raise RecordingError(
                        f"{self.path.name}: the video ends after {self.next_t} frames, before "
                        f"frame {last}; the file is probably truncated: copy it again."
                    )
                t = self.next_t
                self.next_t += 1
                if t not in want:
                    continue
                if (frame.height, frame.width) != self.frame_shape[:2]:
                    raise RecordingError(
                        f"{self.path.name}: frame {t} is {frame.height} x {frame.width} px but "
                        f"the video's header says {self.frame_shape[0]} x {self.frame_shape[1]};"
                        f" {_CONVERT_HINT}."
                    )
                out[want[t]] = frame.to_ndarray(format=self.pix).reshape(self.frame_shape)
        return out

    def close(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            finally:
                self.container, self.frames = None, None


def _open_video(
    path: Path, display: str, max_pixels: int | None = None, max_frame_pixels: int | None = None
) -> _Source:
    """AVI / MP4 / MOV / MKV / WMV through PyAV (FFmpeg), confined to the file: the header gives
    the frame count, size and rate; frames are decoded in order on demand. FFmpeg decodes no
    frame of more than ``max_frame_pixels`` (or ``max_pixels``) pixels."""
    with open(path, "rb") as fh:
        fmt = file_safety.sniff_video_format(fh.read(16))
        refs = file_safety.mov_data_references(fh, path.stat().st_size) if fmt == "mov" else []
        samples = file_safety.mov_sample_count(fh, path.stat().st_size) if fmt == "mov" else 0
    if fmt is None:  # pragma: no cover - _open_source only sends sniffed videos here
        raise RecordingError(f"{path.name} is not a video container CalSeg reads.")
    if refs:
        raise UnsafeRecording(
            f"its video keeps its samples in another file (MP4/QuickTime data reference: "
            f"{'; '.join(refs[:2])}); only self-contained videos are accepted: export the "
            "video again as one file"
        )
    if samples > file_safety.MAX_VIDEO_SAMPLES:
        raise UnsafeRecording(
            f"its MP4/QuickTime boxes declare {samples:,} samples in all, over the "
            f"{file_safety.MAX_VIDEO_SAMPLES:,} CalSeg opens (the decoder indexes every one "
            f"before reading any; at most {file_safety.MAX_VIDEO_FRAMES:,} video frames are "
            "read): split the video, or convert it to TIFF"
        )
    try:
        import av  # the decoder
    except ImportError as exc:
        raise RecordingError(
            f"{path.name}: no installed video decoder can read it: install PyAV (pip install "
            f"av), or {_CONVERT_HINT}."
        ) from exc
    try:
        # decoders align buffers: a frame of the whole budget needs a little more
        frame_cap = min((v for v in (max_pixels, max_frame_pixels) if v), default=None)
        container = file_safety.open_video(path, fmt, frame_cap and frame_cap + 2**20)
    except Exception as exc:
        if "stream_options were provided" in str(exc):  # PyAV: no stream in the header
            raise RecordingError(
                f"{path.name} holds no video stream in its header; there are no frames in it."
            ) from exc
        raise RecordingError(
            f"{path.name}: FFmpeg cannot open it as {file_safety.VIDEO_FORMATS[fmt]} "
            f"({type(exc).__name__}: {_no_dirs(exc, path)}); the file may be damaged: export it "
            f"again, or {_CONVERT_HINT}."
        ) from exc
    try:
        if not container.streams.video:
            raise RecordingError(f"{path.name} holds no video stream; there are no frames in it.")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            setting = (
                "max_frame_pixels" if frame_cap == max_frame_pixels else "max_recording_pixels"
            )
            limit = (
                f" (FFmpeg decodes a first frame to find it, here at most {frame_cap:,} pixels:"
                f" {setting})"
                if frame_cap
                else ""
            )
            raise RecordingError(
                f"{path.name}: the video's header does not give its frame size{limit}; "
                f"{_CONVERT_HINT}."
            )
        n = int(stream.frames or 0)
        counted = False
        if n <= 0:  # no frame count in the header (e.g. MKV): count packets, decode nothing
            n, counted = 0, True
            cap = file_safety.MAX_VIDEO_FRAMES + 1
            if max_pixels is not None:
                cap = min(cap, max_pixels // (width * height) + 1)
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
                    if n >= cap:  # over a limit already: stop counting
                        break
        if n > file_safety.MAX_VIDEO_FRAMES:
            raise UnsafeRecording(
                f"it is a video of "
                f"{f'more than {n - 1:,}' if counted else f'{n:,}'} frames; CalSeg reads "
                f"at most {file_safety.MAX_VIDEO_FRAMES:,} frames of a video (they decode in "
                "order: showing a late frame decodes every frame before it): split the video, "
                "or convert it to TIFF"
            )
        rate = stream.average_rate or stream.guessed_rate
        fps = _positive(float(rate)) if rate else None
        pix_name = str(getattr(ctx, "pix_fmt", "") or "")
        codec = str(getattr(ctx, "name", "") or "?")
        # the decoder's own bytes per pixel (all components, chroma subsampling ignored): what
        # decoding every frame costs. 64 frames of 16-bit RGBA PNG (4720^2) in a 185 kB MP4 were
        # charged as RGB24 and took 19 s per preview of the last frame (a third attack run)
        try:
            native_bpp = sum(c.bits for c in av.VideoFormat(pix_name).components) / 8
        except Exception:  # noqa: BLE001 - an unknown format: charged as the output
            native_bpp = 0.0
    except (RecordingError, UnsafeRecording):
        container.close()
        raise
    except Exception as exc:
        container.close()
        raise RecordingError(
            f"{path.name}: FFmpeg cannot read its header ({type(exc).__name__}: "
            f"{_no_dirs(exc, path)}); {_CONVERT_HINT}."
        ) from exc
    container.close()
    pix, dtype = _GRAY_PIX_FMTS.get(pix_name, ("rgb24", np.uint8))
    rgb = pix == "rgb24"
    frame_shape = (height, width, 3) if rgb else (height, width)
    decoder = _VideoFrames(path, fmt, pix, np.dtype(dtype), frame_shape)
    t_all = np.arange(n)

    def read(index: tuple) -> np.ndarray:
        ts = t_all[index[0]]
        scalar = np.ndim(ts) == 0
        data = decoder.read([int(t) for t in np.atleast_1d(ts)])
        data = data[0] if scalar else data
        return data[(slice(None),) * (0 if scalar else 1) + tuple(index[1:])]

    warn = [
        f"{file_safety.VIDEO_FORMATS[fmt]} video ({codec}, {pix_name or 'unknown pixel format'}); "
        + ("video compression is lossy: intensities are not raw camera values"
           if codec not in ("ffv1", "rawvideo", "png", "huffyuv", "utvideo") else "lossless codec")
    ]  # fmt: skip
    if counted:
        warn.append(f"the header gives no frame count: counted {n} packets")
    if fps:
        warn.append(
            f"frame interval {1 / fps:.4g} s taken from the video's playback rate ({fps:g} fps); "
            "check it matches the acquisition"
        )
    axes = "TYXS" if rgb else "TYX"
    out_bytes = int(np.prod(frame_shape)) * np.dtype(dtype).itemsize
    return _Source(
        path=path,
        display=display,
        format="video",
        shape=(n, *frame_shape),
        dtype=np.dtype(dtype),
        decoded_bytes=int(n * max(out_bytes, native_bpp * width * height)),
        reader=read,
        file_axes=axes,
        axes=axes,
        rgb=rgb,
        frame_interval_s=_positive(1.0 / fps) if fps else None,
        lossy=codec not in ("ffv1", "rawvideo", "png", "huffyuv", "utvideo"),
        warnings=warn,
        closers=[decoder.close],
        sequential=True,
    )


# ------------------------------------------------------------------- ND2 / CZI / LIF -------


_BIOIO_MAGIC = {
    "czi": (b"ZISRAWFILE",),  # Zeiss: the first segment id
    "nd2": (b"\xda\xce\xbe\x0a", b"\x00\x00\x00\x0cjP  "),  # ND2 chunk magic; JPEG2000-based ND2
    "lif": (b"\x70\x00\x00\x00",),  # Leica: test value 0x70, then the XML header length
}


def _bioio_kind(path: Path) -> str | None:
    """``"nd2"``, ``"czi"`` or ``"lif"`` when the file's extension and magic bytes agree."""
    kind = path.suffix.lower().lstrip(".")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if kind not in _BIOIO_MAGIC or not head.startswith(_BIOIO_MAGIC[kind]):
        return None
    if kind == "lif" and head[8:9] != b"\x2a":
        return None
    return kind


def _bioio_reader(kind: str) -> type:
    """The bioio plugin's ``Reader`` class for ``kind`` (ImportError when not installed)."""
    import importlib

    return importlib.import_module(f"bioio_{kind}").Reader


def _open_bioio(path: Path, display: str) -> _Source:
    """Nikon ND2, Zeiss CZI, Leica LIF through bioio and its format plugins (optional extra)."""
    try:
        from bioio import BioImage
    except ImportError as exc:
        raise RecordingError(
            f"{path.name}: {path.suffix} files are read through bioio, which is not installed: "
            f"{BIOIO_INSTALL_HINT} (installs bioio with its ND2, CZI and LIF plugins), or "
            f"{_CONVERT_HINT}."
        ) from exc
    kind = _bioio_kind(path)
    if kind is None:
        raise RecordingError(
            f"{path.name} is not a valid ND2, CZI or LIF file: {_describe_head(path)}. It may "
            f"be another kind of file renamed to {path.suffix!r}, or damaged; export the "
            "recording again in its original format."
        )
    try:
        reader_cls = _bioio_reader(kind)
    except ImportError as exc:
        raise RecordingError(
            f"{path.name}: the bioio plugin for {kind.upper()} files is not installed "
            f"({exc}): {BIOIO_INSTALL_HINT}, or {_CONVERT_HINT}."
        ) from exc
    try:
        # the plugin named explicitly: bioio never guesses a reader (some follow references)
        img = BioImage(path, reader=reader_cls)
        data = img.dask_data  # dims of the first scene, bioio's standard order "TCZYX"
        order = "".join(img.dims.order)
    except Exception as exc:  # plugin missing, or the file is damaged
        raise RecordingError(
            f"{path.name}: bioio cannot read it ({type(exc).__name__}: {exc}); install the "
            f"plugin for {path.suffix} files ({BIOIO_INSTALL_HINT}), or {_CONVERT_HINT}."
        ) from exc
    warn = []
    scenes = list(getattr(img, "scenes", []) or [])
    if len(scenes) > 1:
        warn.append(f"the file holds {len(scenes)} scenes; the first ({scenes[0]}) is read")
    pixel = None
    try:
        pixel = _positive(img.physical_pixel_sizes.X)  # bioio reports um
    except Exception:  # noqa: BLE001 - optional metadata
        pixel = None
    interval = None
    try:
        ti = getattr(img, "time_interval", None)
        if ti is None:
            ti = getattr(getattr(img, "standard_metadata", None), "timelapse_interval", None)
        if ti is not None:
            interval = _positive(ti.total_seconds() if hasattr(ti, "total_seconds") else ti)
    except Exception:  # noqa: BLE001 - optional metadata
        interval = None
    axes = "".join(a if a in AXIS_LETTERS else "?" for a in order)
    return _Source(
        path=path,
        display=display,
        format="bioio",
        shape=tuple(int(n) for n in data.shape),
        dtype=np.dtype(data.dtype),
        reader=lambda index: np.asarray(data[index].compute()),
        file_axes=order,
        axes=axes,
        rgb="S" in order,
        z_means_slices=True,
        frame_interval_s=interval,
        pixel_size_um=pixel,
        warnings=warn,
    )


# ------------------------------------------------------------------------ axis logic -------


def _guess_axes(shape: tuple[int, ...]) -> str:
    """Axes from the shape alone: ``...YX`` or ``...YXS`` for trailing colour samples."""
    if len(shape) >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) >= MIN_FRAME_SIDE:
        return "?" * (len(shape) - 3) + "YXS"
    return "?" * max(len(shape) - 2, 0) + "YX"[-min(len(shape), 2) :] if shape else ""


def _resolve_axes(src: _Source, override: str | None) -> tuple[str, list[str]]:
    """Return axes (letters of TZCYXS, one per stored dim) and notes on the interpretation."""
    name = src.path.name
    shape = src.shape
    notes: list[str] = []
    if override is not None:
        ax = override.strip().upper()
        bad = set(ax) - set(AXIS_LETTERS)
        if bad or len(set(ax)) != len(ax):
            raise RecordingError(
                f"axes={override!r} is not valid: use each of the letters T, Z, C, Y, X, S at "
                "most once (T time, Z depth, C channel, S colour samples)."
            )
        if len(ax) != len(shape):
            raise RecordingError(
                f"axes={override!r} has {len(ax)} letters but {name} stores {len(shape)}-D data of "
                f"shape {shape}; give one letter per dimension."
            )
        if "Y" not in ax or "X" not in ax:
            raise RecordingError(f"axes={override!r} must contain Y and X.")
        if "S" in ax and shape[ax.index("S")] not in (3, 4):
            raise RecordingError(
                f"axes={override!r}: S (colour samples) must have size 3 or 4, found "
                f"{shape[ax.index('S')]}; use C for other channels."
            )
        return ax, notes

    if len(shape) < 2:
        raise RecordingError(
            f"{name} holds {len(shape)}-D data of shape {shape}, not images; a recording needs at "
            "least rows and columns."
        )
    ax = src.axes if src.axes and len(src.axes) == len(shape) else _guess_axes(shape)
    named = ax.replace("?", "")
    if len(set(named)) != len(named):  # e.g. an HDF5 axes attribute "YYX" (a tenth attack run)
        notes.append(
            f"the file's axes {ax!r} name a dimension twice: not used, axes guessed from the "
            "shape; pass axes with one letter per dimension to read it otherwise"
        )
        ax = _guess_axes(shape)
    if "Y" not in ax or "X" not in ax:
        guessed = _guess_axes(shape)
        ax = "".join(a if a in "TZC" else g for a, g in zip(ax, guessed, strict=True))
    if "S" in ax and shape[ax.index("S")] not in (3, 4):
        notes.append(
            f"the file's axes {ax!r} say colour samples (S) for a dimension of "
            f"{shape[ax.index('S')]}, not 3 or 4: read as another axis (pass axes to choose)"
        )
        ax = ax.replace("S", "?")
    # size-1 unknown dimensions are harmless; name them after a free letter
    free = [letter for letter in "TZC" if letter not in ax]
    letters = list(ax)
    for i, a in enumerate(letters):
        if a == "?" and shape[i] == 1 and free:
            letters[i] = free.pop()
    ax = "".join(letters)
    unknown = [i for i, a in enumerate(ax) if a == "?"]
    if len(unknown) == 1 and "T" not in ax:
        ax = ax.replace("?", "T")
    elif unknown:
        dims = " x ".join(str(n) for n in shape)
        raise RecordingError(
            f"{name} stores {len(shape)}-D data ({dims}) whose axes are ambiguous "
            f"({'file axes ' + repr(src.file_axes) if src.file_axes else 'no axes in the file'}); "
            "give --axes (parameter axes) with one letter per dimension, e.g. --axes TZYX "
            "(time, depth, rows, columns) or TCYX (channels)."
        )
    if "C" in ax and "T" not in ax and "Z" not in ax and shape[ax.index("C")] > MAX_CHANNELS:
        nc = shape[ax.index("C")]
        ax = ax.replace("C", "T")
        notes.append(
            f"the file says {nc} channels and no time axis; no microscope records {nc} channels, "
            "but numpy/tifffile scripts write time series this way: read them as frames (T). "
            f"Pass axes={ax.replace('T', 'C')!r} to read them as channels."
        )
    if "Z" in ax and "T" not in ax:
        nz = shape[ax.index("Z")]
        ax = ax.replace("Z", "T")
        if nz > 1:
            notes.append(
                f"the file labels its {nz} images as Z slices, not time frames; read them as "
                "frames (T). Pass axes with Z and T to read them otherwise."
            )
    return ax, notes


def _output_dtype(dtype: np.dtype, calibrated: bool) -> np.dtype:
    if calibrated:
        return np.dtype(np.float32)
    if dtype == np.uint8 or dtype == np.uint16:
        return np.dtype(dtype).newbyteorder("=")
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    return np.dtype(np.float32)


def _dtype_note(dtype: np.dtype) -> str | None:
    if dtype in (np.uint8, np.uint16, np.float32):
        return None
    if dtype == np.bool_:
        return "boolean data read as uint8 0/1"
    note = f"stored dtype {dtype.name} read as float32"
    if dtype.itemsize >= 4 and dtype.kind in "iu":
        note += " (integers above 2**24 lose precision)"
    return note


@dataclass
class _Plan:
    axes: str
    notes: list[str]
    n_frames: int
    height: int
    width: int
    out_dtype: np.dtype
    interleave: int = 1


def _plan(
    src: _Source,
    axes: str | None,
    channel: int,
    interleaved: int | None = None,
    limits: ReadLimits | None = None,
    z_projection: str = "max",
) -> _Plan:
    """How the stored data becomes ``(T, H, W)`` frames: axes, channel, interleave, output
    dtype; then the decode budget (:func:`_check_budget`). Header information only."""
    if isinstance(channel, bool) or not isinstance(channel, int | np.integer) or channel < 0:
        raise RecordingError(f"channel must be a non-negative integer, got {channel!r}.")
    channel = int(channel)
    ax, notes = _resolve_axes(src, axes)
    shape = src.shape
    size = dict(zip(ax, shape, strict=True))
    k = 1
    if interleaved is not None:
        if isinstance(interleaved, bool) or not isinstance(interleaved, int) or interleaved < 1:
            raise RecordingError(
                f"interleaved_channels must be a positive integer, got {interleaved!r}."
            )
        if "C" in ax:
            raise RecordingError(
                f"{src.path.name} already has a channel axis (axes {ax!r}); pick one with "
                "--channel (parameter channel) instead of --interleaved-channels."
            )
        k = interleaved
        n_img = size.get("T", 1)
        if n_img % k:
            raise RecordingError(
                f"{src.path.name} holds {n_img} images, not a multiple of {k} interleaved "
                "channels; check the channel count."
            )
        if not 0 <= channel < k:
            raise RecordingError(
                f"channel {channel} does not exist among {k} interleaved channels "
                f"(--channel 0..{k - 1})."
            )
        if k > 1:
            notes.append(
                f"de-interleaved {k} channels: read channel {channel} (images {channel}, "
                f"{channel + k}, {channel + 2 * k}, ...)"
            )
    if "C" in ax:
        n_c = size["C"]
        if not 0 <= channel < n_c:
            raise RecordingError(
                f"channel {channel} does not exist: {src.path.name} has {n_c} channel(s) "
                f"(--channel 0..{n_c - 1})."
            )
        if n_c > 1:
            note = f"multi-channel data: read channel {channel} of {n_c}"
            if "T" not in ax and "Z" not in ax:  # one frame: say how to read them as frames
                note += (
                    f"; the file has no time axis, so this is one frame. If its {n_c} images "
                    "are time frames (tifffile's imwrite(..., imagej=True) labels a stack's "
                    "images as channels when given no axes; over "
                    f"{MAX_CHANNELS} are read as frames), read with --axes "
                    f"{ax.replace('C', 'T')} (parameter axes)"
                )
            notes.append(note)
    elif channel != 0 and k == 1:
        raise RecordingError(f"channel={channel} given but {src.path.name} has a single channel.")
    if "Z" in ax and size["Z"] > 1:
        how = "maximum-intensity" if z_projection == "max" else z_projection
        notes.append(f"{how} projection over {size['Z']} Z slices per frame")
    if "S" in ax:
        notes.append(
            f"colour ({'RGBA' if size['S'] == 4 else 'RGB'}) frames converted to grayscale "
            "(luma 0.299 R + 0.587 G + 0.114 B)"
        )
    n_frames = size.get("T", 1) // k
    h, w = size["Y"], size["X"]
    if n_frames == 0:
        raise RecordingError(
            f"{src.path.name} holds 0 frames (shape {shape}); there is nothing to segment."
        )
    if h < MIN_FRAME_SIDE or w < MIN_FRAME_SIDE:
        raise RecordingError(
            f"{src.path.name}: frames of {h} x {w} px are too small (minimum {MIN_FRAME_SIDE} x "
            f"{MIN_FRAME_SIDE}); the axes were probably mis-detected (data shape {shape}, axes "
            f"{ax!r}): give --axes (parameter axes) to say which dimensions are rows (Y) and "
            "columns (X)."
        )
    if np.dtype(src.dtype).kind == "c":
        raise RecordingError(
            f"{src.path.name} stores complex values ({np.dtype(src.dtype).name}, e.g. a Fourier "
            "transform or a phase image); CalSeg reads real-valued intensities: export the "
            "magnitude (numpy: np.abs) or the real part as float32."
        )
    note = _dtype_note(src.dtype)
    if note and src.calibration is None:
        notes.append(note)
    plan = _Plan(
        ax, notes, n_frames, h, w, _output_dtype(src.dtype, src.calibration is not None), k
    )
    _check_budget(src, plan, limits)
    return plan


def _stored_bytes(src: _Source) -> int:
    if src.decoded_bytes is not None:
        return int(src.decoded_bytes)
    return int(np.prod(src.shape, dtype=np.float64)) * int(src.dtype.itemsize)


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _check_budget(src: _Source, plan: _Plan, limits: ReadLimits | None) -> None:
    """Raise :class:`RecordingTooLarge` when the recording's header promises more pixels or
    decoded bytes than ``limits`` allow (nothing has been decoded yet)."""
    if limits is None:
        return
    pixels = plan.n_frames * plan.height * plan.width
    nbytes = max(_stored_bytes(src), pixels * plan.out_dtype.itemsize)
    over: list[tuple[str, str]] = []  # (what is over, the setting an administrator raises)
    if limits.max_pixels is not None and pixels > limits.max_pixels:
        over.append((
            f"{pixels:,} pixels ({plan.n_frames:,} frames of {plan.height} x {plan.width}), more "
            f"than the limit of {limits.max_pixels:,} pixels (max_recording_pixels)",
            "CALSEG_MAX_RECORDING_PIXELS",
        ))  # fmt: skip
    if limits.max_bytes is not None and nbytes > limits.max_bytes:
        over.append((
            f"{_size_text(nbytes)} ({nbytes:,} bytes) once decoded, more than the limit of "
            f"{_size_text(limits.max_bytes)} ({limits.max_bytes:,} bytes, max_recording_bytes)",
            "CALSEG_MAX_RECORDING_BYTES",
        ))  # fmt: skip
    frame_px = plan.height * plan.width
    # what one frame decodes: every stored value but the time axis (Z slices projected,
    # samples, channels), so an ImageJ Z-stack of 32 slices of 8192^2 whose pages share one
    # 64 kB deflate strip (73 kB) no longer took 21 s and 2.2 GB to probe (a second attack
    # run, 2026-12-07)
    kept = [n for a, n in zip(plan.axes, src.shape, strict=True) if a != "T"]
    decoded_px = int(np.prod(kept, dtype=np.float64))
    if limits.max_frame_pixels is not None and frame_px > limits.max_frame_pixels:
        over.append((
            f"frames of {plan.height} x {plan.width} ({frame_px:,} pixels each), more than the "
            f"limit of {limits.max_frame_pixels:,} pixels per frame (max_frame_pixels)",
            "CALSEG_MAX_FRAME_PIXELS",
        ))  # fmt: skip
    elif limits.max_frame_pixels is not None and decoded_px > limits.max_frame_pixels:
        over.append((
            f"frames of {plan.height} x {plan.width} each decoded from {decoded_px:,} stored "
            f"values (stored axes {plan.axes!r}, shape {tuple(src.shape)}), more than the limit "
            f"of {limits.max_frame_pixels:,} pixels per frame (max_frame_pixels)",
            "CALSEG_MAX_FRAME_PIXELS",
        ))  # fmt: skip
    if over:
        # what helps: shorter parts only where the whole recording is over; a frame over its
        # limit needs cropping or binning (a lab admin's check read "split the recording
        # into shorter parts" for a per-frame limit, and all three settings for one)
        settings = [setting for _, setting in over]
        fix = (
            "Crop or bin the frames"
            if settings == ["CALSEG_MAX_FRAME_PIXELS"]
            else "Crop, bin or split the recording into shorter parts"
        )
        raise RecordingTooLarge(
            f"{src.path.name} is too large for this server: its header declares "
            f"{' and '.join(text for text, _ in over)}. Nothing was decoded. {fix}, or ask the "
            f"administrator to raise {' / '.join(settings)}.",
            pixels=pixels,
            nbytes=nbytes,
            limits=limits,
        )


NO_FINITE_VALUE = (
    "no finite value: every value is NaN or Inf, so there is nothing to segment; check the "
    "export (the software that wrote it may mark missing data as NaN)"
)
"""The note on a recording read whole with no finite value, and the error of whatever then
refuses to segment it (one text, so a command that shows both can show it once)."""

FEWER_FRAMES = (
    "read fewer frames: calseg segment --max-frames N, or max_frames=N of read_recording; or "
    "crop, bin or split the recording"
)
"""What to do about a recording too large for memory (the readers' MemoryError messages)."""

READ_OPTIONS = ("axes", "channel", "interleaved_channels", "z_projection", "dataset")
"""Keyword arguments of the readers that say how a file is read (not which frames)."""


def merge_read_options(stored: dict[str, Any] | None, **given: Any) -> dict[str, Any]:
    """Reading options: ``stored`` (e.g. those given at upload) overridden by the ``given``
    ones that are not None; only keys of :data:`READ_OPTIONS`.

    Raises:
        RecordingError: an unknown option name.
    """
    unknown = set(given) - set(READ_OPTIONS)
    if unknown:
        raise RecordingError(
            f"unknown reading option(s) {', '.join(sorted(unknown))}; use {', '.join(READ_OPTIONS)}"
        )
    out = {k: v for k, v in (stored or {}).items() if k in READ_OPTIONS and v is not None}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


Z_PROJECTIONS = ("max", "mean", "median")
"""How a Z axis is collapsed when the data also has T (``z_projection=`` of the readers)."""


def _check_z(z_projection: str) -> None:
    if z_projection not in Z_PROJECTIONS:
        raise RecordingError(
            f"z_projection must be one of {', '.join(Z_PROJECTIONS)}, got {z_projection!r}."
        )


def _read_frames(
    src: _Source, plan: _Plan, channel: int, t0: int, t1: int, z_projection: str = "max"
) -> np.ndarray:
    """Read frames ``t0:t1`` as (T, H, W) in the plan's output dtype."""
    ax = plan.axes
    index = []
    kept = []
    for a in ax:
        if a == "C":
            index.append(channel)
            continue
        k = plan.interleave
        t_index = slice(t0 * k + channel, t1 * k, k) if k > 1 else slice(t0, t1)
        index.append(t_index if a == "T" else slice(None))
        kept.append(a)
    try:
        data = np.asarray(src.reader(tuple(index)))
    except RecordingError:
        raise
    except UnsafeRecording as exc:
        raise RecordingError(f"{src.path.name} is refused: {exc}.") from exc
    except MemoryError as exc:
        raise RecordingError(
            f"{src.path.name} is too large to read into memory; {FEWER_FRAMES}."
        ) from exc
    except Exception as exc:
        raise RecordingError(
            f"{src.path.name}: reading the image data failed ({type(exc).__name__}: "
            f"{_no_dirs(exc, src.path)}); the file is probably truncated or damaged: copy or "
            "export it again."
        ) from exc
    if "T" not in kept:
        data = data[np.newaxis]
        kept.insert(0, "T")
    order = [kept.index(a) for a in "TZYXS" if a in kept]
    data = np.transpose(data, order)
    kept = [a for a in "TZYXS" if a in kept]
    if "S" in kept:
        data = _to_gray(data)
        kept.remove("S")
    if "Z" in kept:
        zi = kept.index("Z")
        if z_projection in ("mean", "median"):
            data = project_z(
                data, zi, z_projection, round_to=None if src.calibration else plan.out_dtype
            )
        else:
            data = np.fmax.reduce(data, axis=zi) if data.dtype.kind == "f" else data.max(axis=zi)
        kept.remove("Z")
    out_dtype = plan.out_dtype
    if src.calibration is not None:
        c0, c1 = src.calibration
        data = (np.float32(c0) + np.float32(c1) * data.astype(np.float32)).astype(np.float32)
    elif data.dtype != out_dtype:
        try:
            with np.errstate(over="raise"):
                data = data.astype(out_dtype)
        except FloatingPointError:  # finite float64 beyond float32: they would become Inf
            top = float(np.nanmax(np.abs(data[np.isfinite(data)])))
            raise RecordingError(
                f"{src.path.name} holds values up to {top:.3g}, beyond float32's range "
                f"({float(np.finfo(np.float32).max):.3g}), in which CalSeg computes; they would "
                "become Inf. Rescale the data (e.g. divide by a constant) before export."
            ) from None
    return np.ascontiguousarray(data)


Z_PROJECTION_BLOCK_VALUES = 1 << 22
"""Values (all Z planes together) a mean or median Z projection works on at once
(:func:`project_z`): 32 MiB as float64, whatever the frame's size."""


def project_z(data: np.ndarray, zi: int, how: str, round_to: np.dtype | None = None) -> np.ndarray:
    """Mean or median of ``data`` along axis ``zi`` (NaN ignored), in blocks of rows.

    The whole stack was converted to float64 at once and NumPy's ``nanmedian`` (masked arrays
    for fewer than 600 planes) made several copies of it: a 176 kB upload of 64 planes of
    1024 x 1024 per frame, within ``max_frame_pixels``, took 2.3 GB and 10 s of the API per
    frame (a sixth attack run). Here each block holds at most
    :data:`Z_PROJECTION_BLOCK_VALUES` values as float64, and a block without NaN (any integer
    data) takes the plain ``mean`` / ``median``.

    Args:
        data: ``(T, Z, Y, ...)`` array with the Z axis at ``zi`` and rows at ``zi + 1``.
        zi: the Z axis.
        how: ``"mean"`` or ``"median"``.
        round_to: an integer dtype to round into (the recording's output dtype), or None: the
            result stays float (float64 for 8-byte input, else float32).

    Returns:
        ``data`` without its Z axis, dtype ``round_to`` or float.
    """
    if how not in ("mean", "median"):
        raise ValueError(f"how must be 'mean' or 'median', got {how!r}")
    shape = data.shape[:zi] + data.shape[zi + 1 :]
    if round_to is not None and np.dtype(round_to).kind in "ui":
        out_dtype = np.dtype(round_to)
    else:
        round_to = None
        out_dtype = np.dtype(np.float64 if data.dtype.itemsize >= 8 else np.float32)
    out = np.empty(shape, dtype=out_dtype)
    ri = zi + 1  # rows
    n_rows = data.shape[ri]
    step = max(1, Z_PROJECTION_BLOCK_VALUES // max(1, data.size // max(1, n_rows)))
    for y0 in range(0, n_rows, step):
        sel = [slice(None)] * data.ndim
        sel[ri] = slice(y0, y0 + step)
        block = data[tuple(sel)].astype(np.float64)
        has_nan = data.dtype.kind == "f" and bool(np.isnan(block).any())
        if how == "mean":
            r = (np.nanmean if has_nan else np.mean)(block, axis=zi)
        else:
            r = (np.nanmedian if has_nan else np.median)(block, axis=zi)
        osel = [slice(None)] * out.ndim
        osel[zi] = slice(y0, y0 + step)  # rows move to zi once Z is gone
        out[tuple(osel)] = np.rint(r) if round_to is not None else r
    return out


def _to_gray(data: np.ndarray) -> np.ndarray:
    rgb = data[..., :3]
    if (
        rgb.dtype.kind in "ui"
        and np.array_equal(rgb[..., 0], rgb[..., 1])
        and np.array_equal(rgb[..., 0], rgb[..., 2])
    ):
        return rgb[..., 0]
    gray = rgb.astype(np.float32) @ np.asarray(_LUMA, dtype=np.float32)
    if data.dtype.kind in "ui":
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(data.dtype)
    return gray


INTERLEAVE_CANDIDATES = (2, 3, 4)
"""Channel counts :func:`interleave_scores` tests for."""

INTERLEAVE_THRESHOLD = 1.55
"""Score above which images are reported as probably interleaved channels. Chosen on simulated
recordings (``python -m calseg.interleave_study``; tuning seeds) and reported on held-out
simulated seeds and real recordings with Wilson 95% intervals in README.md ("Uploading
recordings")."""

INTERLEAVE_SAMPLE = 48
"""Images decoded from the start of a recording for :func:`interleave_scores` at upload."""

INTERLEAVE_SAMPLE_BYTES = 256 * 2**20
"""At most this many stored bytes are decoded for that sample (fewer images of large frames;
at least 6)."""


def interleave_scores(
    images: np.ndarray, candidates: Sequence[int] = INTERLEAVE_CANDIDATES
) -> dict[int, float]:
    """How strongly consecutive images alternate between ``k`` different looks.

    For images that cycle through ``k`` channels (or Z planes), images ``k`` apart show the
    same channel and are alike, while images closer together show different channels. With
    ``d(l)`` the median over ``t`` of the mean absolute difference between images ``t`` and
    ``t + l``, the score of ``k`` is ``min_{l < k} d(l) / d(k)``: about 1 or below for one
    channel (differences grow with the lag, or only noise differs), well above 1 for ``k``
    interleaved channels. The median ignores calcium events in a few images.

    Args:
        images: ``(N, H, W)`` consecutive stored images, any numeric dtype; ``N >= 3 k`` for
            a candidate ``k`` to be scored. Rows and columns are strided to at most 255 a
            side (:func:`_thumbnail`; applying it twice changes nothing).
        candidates: channel counts to score.

    Returns:
        ``{k: score}`` for each candidate with enough images (NaN/Inf pixels ignored).
    """
    x = np.asarray(images)
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {x.shape}")
    x = _thumbnail(x).astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.nanmedian(np.where(finite, x, np.nan)) if finite.any() else 0)
    n = x.shape[0]
    dist: dict[int, float] = {}

    def d(lag: int) -> float:
        if lag not in dist:
            diffs = np.abs(x[lag:] - x[:-lag]).mean(axis=(1, 2))
            dist[lag] = float(np.median(diffs))
        return dist[lag]

    out = {}
    for k in candidates:
        if n < 3 * k:
            continue
        dk = d(k)
        near = min(d(lag) for lag in range(1, k))
        out[k] = near / dk if dk > 0 else (math.inf if near > 0 else 0.0)
    return out


def _thumbnail(images: np.ndarray) -> np.ndarray:
    """Every ``s``-th row and column of the last two axes, ``s = side // 128`` (so at most
    255 px a side remain); the same strides whatever the number of leading axes."""
    h, w = images.shape[-2:]
    return images[..., :: max(1, h // 128), :: max(1, w // 128)]


def suspected_interleave(
    images: np.ndarray, threshold: float = INTERLEAVE_THRESHOLD
) -> tuple[int, float] | None:
    """``(k, score)`` of the best-scoring channel count above ``threshold``
    (:func:`interleave_scores`), or None. The smallest ``k`` wins among multiples (2
    channels also score at 4)."""
    scores = interleave_scores(images)
    hits = [(k, s) for k, s in sorted(scores.items()) if s > threshold]
    return hits[0] if hits else None


def _check_interleave(info: RecordingInfo, images: np.ndarray, n_images: int) -> None:
    """Add a warning (and ``info.suspected_channels``) when ``images``, the first images of a
    recording of ``n_images`` read without a channel choice, look like interleaved channels.
    The reading it suggests is one the reader accepts: when ``n_images`` is no multiple of the
    channel count it says that instead (and sets no ``suspected_channels``)."""
    hit = suspected_interleave(images)
    if hit is None:
        return
    k, score = hit
    seen = (
        f"the first {len(images)} images look like {k} interleaved channels (or Z planes): "
        f"images {k} apart are {score:.1f} x more alike than closer ones (score above "
        f"{INTERLEAVE_THRESHOLD})"
    )
    if n_images % k:
        info.warnings.append(
            f"{seen}, but the file's {n_images} images are no multiple of {k}: if it "
            "alternates channels, images are missing (check the export); if not, the likeness "
            "is the recording's own rhythm"
        )
        return
    info.suspected_channels = k
    info.warnings.append(
        f"{seen}; if the file alternates channels, read it with --interleaved-channels {k} "
        f"--channel 0..{k - 1} (parameters interleaved_channels, channel), else dF/F mixes the "
        "channels"
    )


def _interleave_applies(reader: RecordingReader, interleaved_channels: int | None) -> bool:
    plan = reader._plan  # noqa: SLF001 - same module
    return interleaved_channels is None and "C" not in plan.axes and plan.n_frames >= 6


class _ValueStats:
    """NaN/Inf, saturation and constancy of frames, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.n_nan = self.n_inf = self.n_sat = self.n_values = 0
        self.lo: float | None = None
        self.hi: float | None = None
        self.dtype: np.dtype | None = None

    def add(self, frames: np.ndarray) -> None:
        self.dtype = frames.dtype
        if not frames.size:
            return
        self.n_values += int(frames.size)
        if frames.dtype.kind == "f":
            nan = np.isnan(frames)
            inf = np.isinf(frames)
            self.n_nan += int(np.count_nonzero(nan))
            self.n_inf += int(np.count_nonzero(inf))
            finite = frames[~(nan | inf)] if (self.n_nan or self.n_inf) else frames
        else:
            finite = frames
            if frames.dtype in (np.uint8, np.uint16):
                self.n_sat += int(np.count_nonzero(frames == np.iinfo(frames.dtype).max))
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)

    def notes(self, partial: bool) -> list[str]:
        notes = []
        where = " in the frames checked" if partial else ""
        if self.n_values and self.n_nan + self.n_inf == self.n_values:
            notes.append(
                f"no finite value{where}: every value is NaN or Inf, so there is nothing to "
                "segment unless the other frames hold data"
                if partial
                else NO_FINITE_VALUE
            )
        elif self.n_nan or self.n_inf:
            notes.append(
                f"{self.n_nan} NaN and {self.n_inf} Inf values{where} (kept as they are in the "
                "float32 frames: other software reading them must skip them)"
            )
        if self.n_sat and self.dtype is not None:
            top = np.iinfo(self.dtype).max
            notes.append(
                f"{self.n_sat} pixels at the {self.dtype.name} maximum {top}{where} (saturated?)"
            )
        if not partial and self.lo is not None and self.lo == self.hi:
            value = int(self.lo) if self.dtype is not None and self.dtype.kind in "ui" else self.lo
            notes.append(f"the recording is constant (every value is {value})")
        return notes


def _value_notes(frames: np.ndarray, partial: bool) -> list[str]:
    stats = _ValueStats()
    stats.add(frames)
    return stats.notes(partial)


def _info(src: _Source, plan: _Plan, n_frames: int, extra: Sequence[str]) -> RecordingInfo:
    header_frames = None
    notes = []
    if src.header_claim is not None and src.header_claim != plan.n_frames:
        header_frames = src.header_claim
        notes.append(
            f"the file's header claims {src.header_claim} frames but the data holds "
            f"{plan.n_frames}; read the {plan.n_frames} frame(s) present"
        )
    return RecordingInfo(
        path=src.display,
        format=src.format,
        n_frames=n_frames,
        height=plan.height,
        width=plan.width,
        dtype=plan.out_dtype.name,
        axes=plan.axes,
        header_frames=header_frames,
        frame_interval_s=src.frame_interval_s,
        pixel_size_um=src.pixel_size_um,
        warnings=[*notes, *src.warnings, *plan.notes, *extra],
        stored_shape=tuple(src.shape),
        file_axes=src.file_axes,
    )


def _check_fits_in_memory(display: str, n_frames: int, info: RecordingInfo) -> None:
    """Refuse to read ``n_frames`` frames whose decoded bytes exceed the memory this machine
    has available (:func:`calseg.machine.available_memory_bytes`; no check where unknown).

    Linux grants an ``np.empty`` larger than the free memory (overcommit) and then kills the
    process while the frames are filled in, so a MemoryError alone does not guard the read.
    Only the frames themselves are counted: what a command computes from them comes on top
    (``calseg segment`` checks its whole cost before it reads)."""
    from calseg import machine

    available = machine.available_memory_bytes()
    need = n_frames * info.height * info.width * np.dtype(info.dtype).itemsize
    if available is not None and need > available:
        gib = 1024**3
        raise RecordingError(
            f"{display} is too large to read into memory ({n_frames:,} frames of {info.height} x "
            f"{info.width} {info.dtype}: {need / gib:.1f} GiB, and this machine has "
            f"{available / gib:.1f} GiB available); {FEWER_FRAMES}."
        )


def _guard(fn: Callable[[], Any], display: str) -> Any:
    """Run ``fn``; turn any non-RecordingError failure into a RecordingError."""
    try:
        return fn()
    except RecordingError:
        raise
    except UnsafeRecording as exc:
        # the file, not an HDF5 dataset's last name ("x.h5:/g/data" is x.h5)
        raise RecordingError(f"{_split_hdf5_path(display)[0].name} is refused: {exc}.") from exc
    except MemoryError as exc:
        raise RecordingError(
            f"{display} is too large to read into memory; {FEWER_FRAMES}."
        ) from exc
    except Exception as exc:
        raise RecordingError(
            f"{display}: could not be read ({type(exc).__name__}: "
            f"{_no_dirs(exc, Path(display))}); the file is probably damaged or in an "
            "unsupported variant: export it again as TIFF."
        ) from exc


STREAM_CHUNK_BYTES = 64 * 2**20
"""Stored bytes decoded per step when a whole recording is read (:func:`read_recording`):
memory holds the frames returned plus one step."""


class RecordingReader:
    """An open recording: headers read, axes resolved and :class:`ReadLimits` checked; frames
    are decoded only when asked for, a chunk at a time.

    Opening decodes no pixel. Reads are serialised (one thread at a time); videos decode in
    order, so reading backwards restarts the decoder.

    Args:
        path: a file, a folder of frames, or ``file.h5:/dataset``.
        axes, channel, interleaved_channels, z_projection, dataset: as for
            :func:`read_recording`.
        limits: the decode budget; None = no limit.

    Attributes:
        info: :class:`RecordingInfo` from the headers (no value checks; see
            :func:`probe_recording` for those).

    Raises:
        RecordingError: unreadable, refused, or bad arguments. RecordingTooLarge: over the
            budget.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        axes: str | None = None,
        channel: int = 0,
        interleaved_channels: int | None = None,
        z_projection: str = "max",
        limits: ReadLimits | None = None,
        dataset: str | None = None,
    ) -> None:
        _check_z(z_projection)
        self.display = os.fspath(path)
        self.channel = channel
        self.z_projection = z_projection
        self._lock = threading.Lock()
        self._src: _Source = _guard(lambda: _open_source(path, limits, dataset), self.display)
        try:
            self._plan: _Plan = _guard(
                lambda: _plan(self._src, axes, channel, interleaved_channels, limits, z_projection),
                self.display,
            )
        except BaseException:
            self._src.close()
            raise
        self.info = _info(self._src, self._plan, self._plan.n_frames, [])

    @property
    def n_frames(self) -> int:
        """Frames T of the recording as read."""
        return self._plan.n_frames

    @property
    def sequential(self) -> bool:
        """True when frames decode in order only (videos): read forwards."""
        return self._src.sequential

    @property
    def frame_bytes(self) -> int:
        """Stored bytes decoded per frame (all channels, Z planes and colour samples)."""
        return max(1, _stored_bytes(self._src) // max(1, self._plan.n_frames))

    def read(self, t0: int, t1: int) -> np.ndarray:
        """Frames ``t0:t1`` (``0 <= t0 < t1 <= n_frames``) as ``(t1 - t0, H, W)`` in the
        output dtype (uint8, uint16 or float32)."""
        if not 0 <= t0 < t1 <= self.n_frames:
            raise RecordingError(
                f"frames {t0}..{t1 - 1} requested but {Path(self.display).name} has frames "
                f"0..{self.n_frames - 1}."
            )
        with self._lock:
            frames = _guard(
                lambda: _read_frames(
                    self._src, self._plan, int(self.channel), t0, t1, self.z_projection
                ),
                self.display,
            )
        if frames.shape != (t1 - t0, self._plan.height, self._plan.width):
            raise RecordingError(
                f"{self.display}: frames {t0}..{t1 - 1} could not all be read (got shape "
                f"{frames.shape}); the file is probably truncated: copy it again."
            )
        return frames

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` as ``(H, W)``; only that frame is decoded (a video decodes up to it)."""
        return self.read(t, t + 1)[0]

    def chunks(
        self, chunk_frames: int | None = None, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(t0, frames)`` of ``chunk_frames`` frames each (default: about
        :data:`STREAM_CHUNK_BYTES` of stored data) up to frame ``stop`` (default: all)."""
        stop = self.n_frames if stop is None else min(stop, self.n_frames)
        step = chunk_frames or max(1, STREAM_CHUNK_BYTES // self.frame_bytes)
        for t0 in range(0, stop, step):
            check_cancelled()  # a cancelled job stops between chunks (calseg.progress)
            yield t0, self.read(t0, min(t0 + step, stop))

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            self._src.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_recording(
    path: str | Path,
    *,
    axes: str | None = None,
    channel: int = 0,
    interleaved_channels: int | None = None,
    z_projection: str = "max",
    limits: ReadLimits | None = None,
    dataset: str | None = None,
) -> RecordingInfo:
    """Describe a recording cheaply: its headers, then its first and last frame only.

    The frame count, size and dtype come from the headers; :class:`ReadLimits` is checked
    against them before any pixel is decoded. Then the first and the last frame are decoded to
    prove the data is there (a truncated file fails here, not halfway through a job); a video
    decodes its first frame only (its last would need every frame decoded).

    Args:
        path: a file, a folder of frames, or ``file.h5:/dataset``.
        axes, channel, interleaved_channels, z_projection, dataset: as for
            :func:`read_recording`.
        limits: the decode budget; None = no limit.

    Returns:
        :class:`RecordingInfo` for ``read_recording(path)`` with the same arguments.

    Raises:
        RecordingError: the file is missing, empty, not an image, truncated, refused (it names
            other files or expands beyond its declared size), has too small frames, 0 frames,
            or axes that need an override. RecordingTooLarge: over ``limits``.
    """
    with RecordingReader(
        path,
        axes=axes,
        channel=channel,
        interleaved_channels=interleaved_channels,
        z_projection=z_projection,
        limits=limits,
        dataset=dataset,
    ) as reader:
        stats = _ValueStats()
        n = reader.n_frames
        sample = 1
        if _interleave_applies(reader, interleaved_channels):
            by_bytes = max(6, INTERLEAVE_SAMPLE_BYTES // reader.frame_bytes)
            sample = min(n, INTERLEAVE_SAMPLE, by_bytes)
        thumbs = []
        for t in range(sample):  # one frame in memory at a time, kept as a strided thumbnail
            frame = reader.read(t, t + 1)
            stats.add(frame)
            thumbs.append(np.array(_thumbnail(frame[0])))  # a copy: a view keeps the frame
        if n > sample and not reader.sequential:
            stats.add(reader.read(n - 1, n))
        info = reader.info
        info.warnings.extend(stats.notes(partial=True))
        if sample >= 6:
            _check_interleave(info, np.stack(thumbs), n)
        return info


def read_recording(
    path: str | Path,
    *,
    axes: str | None = None,
    channel: int = 0,
    max_frames: int | None = None,
    interleaved_channels: int | None = None,
    z_projection: str = "max",
    limits: ReadLimits | None = None,
    dataset: str | None = None,
) -> Recording:
    """Read a recording as a ``(T, H, W)`` frame stack.

    The stack is allocated once and filled a chunk at a time (about
    :data:`STREAM_CHUNK_BYTES` of stored data per step), so memory holds the frames returned
    plus one chunk.

    Args:
        path: a file (TIFF/OME-TIFF/BigTIFF/ImageJ, PNG, JPEG, HDF5, .npy, AVI/MP4), a folder of
            single-frame files, or ``file.h5:/group/dataset``.
        axes: override of the stored axes, one letter of ``TZCYXS`` per stored dimension (e.g.
            ``"TZCYX"``, ``"CTYX"``, ``"TYXS"``); ``None`` detects them.
        channel: channel index (0-based) to read when the data has a C axis.
        max_frames: read only the first ``max_frames`` frames (only those are decoded).
        interleaved_channels: for files without a channel axis whose images alternate between
            ``k`` channels (c0, c1, c0, c1, ...): split the time axis into ``(T, k)`` and read
            ``channel``.
        z_projection: how a Z axis is collapsed when the data also has T: ``"max"`` (default,
            brightest plane per pixel), ``"mean"`` or ``"median"`` (NaN ignored; rounded to the
            output dtype when that is an integer type).
        limits: the decode budget, checked before any pixel is decoded; None = no limit.
        dataset: the HDF5 dataset to read (e.g. ``"/raw/green"``; a ``file.h5:/raw/green``
            suffix says the same); ``None``: the first image dataset. An upload's reading
            option of the same name (an 11th attack run: a service user could only ever read
            an HDF5 file's first dataset, the suffix being for paths).

    Returns:
        :class:`Recording` with ``frames`` ``(T, H, W)`` uint8/uint16/float32 (native byte order;
        ImageJ calibration applied -> float32) and its :class:`RecordingInfo`.

    Raises:
        RecordingError: see :func:`probe_recording`; also for a bad ``axes``/``channel``.
            RecordingTooLarge: over ``limits``.
    """
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
    ):
        raise RecordingError(f"max_frames must be a positive integer, got {max_frames!r}.")
    with RecordingReader(
        path,
        axes=axes,
        channel=channel,
        interleaved_channels=interleaved_channels,
        z_projection=z_projection,
        limits=limits,
        dataset=dataset,
    ) as reader:
        n = reader.n_frames
        t1 = n if max_frames is None else min(n, max_frames)
        info = reader.info
        _check_fits_in_memory(reader.display, t1, info)
        try:
            frames = np.empty((t1, info.height, info.width), dtype=np.dtype(info.dtype))
        except MemoryError as exc:
            raise RecordingError(
                f"{reader.display} is too large to read into memory ({t1:,} frames of "
                f"{info.height} x {info.width} {info.dtype}); {FEWER_FRAMES}."
            ) from exc
        stats = _ValueStats()
        for t0, chunk in reader.chunks(stop=t1):
            frames[t0 : t0 + chunk.shape[0]] = chunk
            stats.add(chunk)
        info.n_frames = t1
        info.warnings.extend(stats.notes(partial=False))
        if _interleave_applies(reader, interleaved_channels) and t1 >= 6:
            _check_interleave(info, frames[:INTERLEAVE_SAMPLE], n)
        if t1 < n:
            info.warnings.append(f"read the first {t1} of {n} frames (--max-frames / max_frames)")
        return Recording(frames=frames, info=info)


def iter_recording(
    path: str | Path,
    *,
    axes: str | None = None,
    channel: int = 0,
    chunk_frames: int = 64,
    interleaved_channels: int | None = None,
    z_projection: str = "max",
    limits: ReadLimits | None = None,
    dataset: str | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Read a recording chunk by chunk, so memory stays bounded for long recordings.

    Args:
        path, axes, channel, interleaved_channels, z_projection, limits: as for
            :func:`read_recording`.
        chunk_frames: frames per chunk (>= 1).

    Yields:
        ``(t0, frames)``: index of the chunk's first frame and a ``(t, H, W)`` array (``t <=
        chunk_frames``) in the same dtype and calibration as :func:`read_recording` returns.
        Only the chunk is decoded (videos decode in order, one frame at a time).

    Raises:
        RecordingError: as :func:`read_recording`, raised at the first ``next()``.
    """
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise RecordingError(f"chunk_frames must be a positive integer, got {chunk_frames!r}.")
    with RecordingReader(
        path,
        axes=axes,
        channel=channel,
        interleaved_channels=interleaved_channels,
        z_projection=z_projection,
        limits=limits,
        dataset=dataset,
    ) as reader:
        yield from reader.chunks(chunk_frames)
