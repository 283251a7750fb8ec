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

__all__ = [
    "MIN_FRAME_SIDE",
    "Recording",
    "RecordingError",
    "RecordingInfo",
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
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's RGB -> "L"

_SUPPORTED = (
    "TIFF / BigTIFF / ImageJ / OME-TIFF, PNG, JPEG, HDF5 (.h5, optionally file.h5:/dataset), "
    "NumPy .npy, AVI/MP4 video, ND2/CZI/LIF (with the [bioio] extra), or a folder of "
    "single-frame TIFF/PNG/JPEG files"
)
_CONVERT_HINT = "convert it to TIFF (e.g. in Fiji: File > Save As > Tiff...) and try again"


class RecordingError(ValueError):
    """A recording cannot be read; the message says what is wrong and what to do."""


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
        if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
            return "video"
        if head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3":
            return "video"
        for offset in (512, 1024, 2048):  # HDF5 with a user block
            fh.seek(offset)
            if fh.read(8) == b"\x89HDF\r\n\x1a\n":
                return "hdf5"
    return None


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


def _describe_head(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(64)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    kind = "text" if head and printable == len(head) else "binary data"
    return f"it starts with {head[:12]!r}, which looks like {kind}"


def _open_source(path: str | Path) -> _Source:
    p, dataset = _split_hdf5_path(path)
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
        raise RecordingError(f"{display}: a ':/dataset' suffix is only meaningful for HDF5 files.")
    openers = {
        "tiff": _open_tiff,
        "png": _open_pillow,
        "jpeg": _open_pillow,
        "npy": _open_npy,
        "video": _open_video,
        "bioio": _open_bioio,
    }
    if fmt == "hdf5":
        src = _open_hdf5(p, display, dataset)
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
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "millisecond": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
}


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
        dt *= _UNIT_S.get((pixels.get("TimeIncrementUnit") or "s").strip().lower(), math.nan)
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
            unit = (plane.get("DeltaTUnit") or "s").strip().lower()
            dt = _positive(dt * _UNIT_S.get(unit, math.nan)) if dt else None
    return px, dt


def _open_tiff(path: Path, display: str) -> _Source:
    import tifffile

    size = path.stat().st_size
    with _capture_tifffile_log() as log:
        try:
            tf = tifffile.TiffFile(path)
        except Exception as exc:  # TiffFileError, struct errors, ...
            raise RecordingError(
                f"{path.name} is not a readable TIFF file ({exc}); it is probably damaged or "
                "truncated: copy or export it again."
            ) from exc
        try:
            n_pages = len(tf.pages)  # parses every image directory
            all_series = tf.series
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
    if trunc is not None:
        tf.close()
        raise RecordingError(
            f"{path.name} is truncated: {trunc}. The upload or copy was probably cut short; "
            "copy the complete file again."
        )

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
            f"up so); if they are frames, pass axes={file_axes.replace('S', 'T')!r}"
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
            interval = _positive(finterval * _UNIT_S.get(str(ij.get("tunit", "s")).lower(), 1.0))
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
        res = _resolution_px_per_unit(keyframe)
        unit_tag = keyframe.tags.get("ResolutionUnit")
        unit_val = int(unit_tag.value) if unit_tag is not None else 2
        factor = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit_val)
        if res and factor:
            px_size = _positive(factor / res)
        if tf.is_shaped and series.kind != "shaped":
            meta = (tf.shaped_metadata or ({},))[0] or {}
            claimed_shape = meta.get("shape")
            if claimed_shape and len(claimed_shape) >= 3:
                header_claim = int(claimed_shape[0])

    reader = _tiff_reader(tf, series, path)
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
        closers=[tf.close],
    )


def _tiff_reader(tf: Any, series: Any, path: Path) -> Reader:
    """Reader of index tuples over the series: memory-mapped when contiguous, else by page."""
    shape = tuple(int(n) for n in series.shape)
    if series.dataoffset is not None:
        dtype = np.dtype(tf.byteorder + np.dtype(series.dtype).char)
        try:
            mm = np.memmap(path, dtype=dtype, mode="r", offset=int(series.dataoffset), shape=shape)
        except (ValueError, OSError):
            mm = None
        if mm is not None:
            return lambda index: np.asarray(mm[index])

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


def _pillow_array(path: Path) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    notes: list[str] = []
    with Image.open(path) as im:
        im.load()
        n = getattr(im, "n_frames", 1)
        if n > 1:
            notes.append(f"image holds {n} frames; read the first only")
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("LA", "PA"):
            im = im.convert("L")
        elif mode == "CMYK":
            im = im.convert("RGB")
        elif mode == "I;16B":
            im = im.convert("I;16")
        arr = np.asarray(im)
    return arr, notes


def _open_pillow(path: Path, display: str) -> _Source:
    try:
        arr, notes = _pillow_array(path)
    except Exception as exc:
        raise RecordingError(
            f"{path.name} cannot be decoded as an image ({exc}); it is probably damaged or "
            "truncated: export it again."
        ) from exc
    fmt = "jpeg" if _sniff(path) == "jpeg" else "png"
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    axes = "YXS" if rgb else "YX"
    if fmt == "jpeg":
        notes.append("JPEG is lossy: intensities are not the camera's raw values")
    return _Source(
        path=path,
        display=display,
        format=fmt,
        shape=tuple(arr.shape),
        dtype=arr.dtype,
        reader=lambda index: arr[index],
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


def _open_hdf5(path: Path, display: str, dataset: str | None) -> _Source:
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except Exception as exc:
        raise RecordingError(
            f"{path.name} is not a readable HDF5 file ({exc}); it is probably damaged or "
            "truncated: copy it again."
        ) from exc
    try:
        found: list[tuple[str, Any]] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found.append((name, obj))

        h5.visititems(visit)
        names = [n for n, _ in found]
        listing = ", ".join(f"/{n} {tuple(d.shape)}" for n, d in found[:8]) or "none"
        warn: list[str] = []
        if dataset:
            key = dataset.lstrip("/")
            obj = h5.get(key)
            if not isinstance(obj, h5py.Dataset):
                raise RecordingError(
                    f"{path.name} has no dataset {dataset!r}; its datasets are: {listing}. "
                    "Name one as file.h5:/group/dataset."
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
                    f"file holds {len(cands)} image datasets; read /{name} (pick another with "
                    f"file.h5:/name; others: {', '.join('/' + n for n, _ in cands[1:4])})"
                )
        del names
        if ds.dtype.kind not in "uifb":
            raise RecordingError(
                f"{path.name}:/{name} has dtype {ds.dtype}, not numbers; point at an image dataset."
            )
        attrs = dict(ds.attrs)
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
        px = None
        if "element_size_um" in attrs:
            try:
                px = _positive(np.ravel(attrs["element_size_um"])[-1])
            except (TypeError, IndexError):
                px = None
        px = px or _positive(attrs.get("pixel_size_um"))
        dt = _positive(attrs.get("frame_interval_s"))
        if dt is None and _positive(attrs.get("fps")):
            dt = 1.0 / float(attrs["fps"])
    except RecordingError:
        h5.close()
        raise
    except Exception as exc:
        h5.close()
        raise RecordingError(f"{path.name}: cannot read its HDF5 structure ({exc}).") from exc

    def read(index: tuple) -> np.ndarray:
        try:
            return np.asarray(ds[index])
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


def _open_npy(path: Path, display: str) -> _Source:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise RecordingError(
            f"{path.name} is not a readable .npy array ({exc}); save it again with numpy.save."
        ) from exc
    if arr.dtype.kind not in "uifb":
        raise RecordingError(f"{path.name} holds dtype {arr.dtype}, not image numbers.")
    return _Source(
        path=path,
        display=display,
        format="npy",
        shape=tuple(int(n) for n in arr.shape),
        dtype=np.dtype(arr.dtype),
        reader=lambda index: np.asarray(arr[index]),
    )


# ----------------------------------------------------------------------------- video -------


def _decode_video(path: Path) -> tuple[np.ndarray, float | None, str]:
    """Decode all frames as (T, H, W, 3) uint8 RGB; return (frames, fps, backend)."""
    errors = []
    try:
        import imageio.v3 as iio

        for plugin in ("pyav", "FFMPEG"):
            try:
                frames = np.asarray(iio.imread(path, plugin=plugin, index=None))
                meta = iio.immeta(path, plugin=plugin)
                return frames, _positive(meta.get("fps")), f"imageio/{plugin}"
            except Exception as exc:  # plugin missing or cannot decode
                errors.append(f"imageio {plugin}: {type(exc).__name__}")
    except ImportError:
        errors.append("imageio missing")
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = cv2.VideoCapture(os.fspath(path))
        try:
            if cap.isOpened():
                fps = _positive(cap.get(cv2.CAP_PROP_FPS))
                out = []
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    out.append(bgr[..., ::-1] if bgr.ndim == 3 else bgr)
                if out:
                    return np.stack(out), fps, "opencv"
                errors.append("opencv: no frame decoded")
            else:
                errors.append("opencv: cannot open")
        finally:
            cap.release()
    raise RecordingError(
        f"{path.name}: no installed video decoder can read it ({'; '.join(errors)}). The file "
        "may be damaged, or need a decoder that is not installed: install imageio's pyav "
        f"plugin (pip install av) or {_CONVERT_HINT}."
    )


def _open_video(path: Path, display: str) -> _Source:
    frames, fps, backend = _decode_video(path)
    warn = [
        f"decoded with {backend}; video compression is lossy: intensities are not raw camera values"
    ]
    if fps:
        warn.append(
            f"frame interval {1 / fps:.4g} s taken from the video's playback rate ({fps:g} fps); "
            "check it matches the acquisition"
        )
    rgb = frames.ndim == 4 and frames.shape[-1] in (3, 4)
    axes = "TYXS" if rgb else "TYX"
    return _Source(
        path=path,
        display=display,
        format="video",
        shape=tuple(frames.shape),
        dtype=frames.dtype,
        reader=lambda index: frames[index],
        file_axes=axes,
        axes=axes,
        rgb=rgb,
        frame_interval_s=1.0 / fps if fps else None,
        lossy=True,
        warnings=warn,
    )


# ------------------------------------------------------------------- ND2 / CZI / LIF -------


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
    try:
        img = BioImage(path)
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
    if "Y" not in ax or "X" not in ax:
        guessed = _guess_axes(shape)
        ax = "".join(a if a in "TZC" else g for a, g in zip(ax, guessed, strict=True))
    if "S" in ax and shape[ax.index("S")] not in (3, 4):
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
            "pass axes= with one letter per "
            "dimension, e.g. axes='TZYX' (time, depth, rows, columns) or 'TCYX' (channels)."
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


def _plan(src: _Source, axes: str | None, channel: int, interleaved: int | None = None) -> _Plan:
    ax, notes = _resolve_axes(src, axes)
    shape = src.shape
    size = dict(zip(ax, shape, strict=True))
    k = 1
    if interleaved is not None:
        if not isinstance(interleaved, int) or interleaved < 1:
            raise RecordingError(
                f"interleaved_channels must be a positive integer, got {interleaved!r}."
            )
        if "C" in ax:
            raise RecordingError(
                f"{src.path.name} already has a channel axis (axes {ax!r}); pick one with "
                "channel= instead of interleaved_channels."
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
                f"channel={channel} does not exist among {k} interleaved channels (0..{k - 1})."
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
                f"channel={channel} does not exist: {src.path.name} has {n_c} channel(s) "
                f"(0..{n_c - 1})."
            )
        if n_c > 1:
            notes.append(f"multi-channel data: read channel {channel} of {n_c}")
    elif channel != 0 and k == 1:
        raise RecordingError(f"channel={channel} given but {src.path.name} has a single channel.")
    if "Z" in ax and size["Z"] > 1:
        notes.append(f"maximum-intensity projection over {size['Z']} Z slices per frame")
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
            f"{ax!r}): pass axes= to say which dimensions are rows (Y) and columns (X)."
        )
    note = _dtype_note(src.dtype)
    if note and src.calibration is None:
        notes.append(note)
    return _Plan(
        ax, notes, n_frames, h, w, _output_dtype(src.dtype, src.calibration is not None), k
    )


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
    except MemoryError as exc:
        raise RecordingError(
            f"{src.path.name} is too large to read into memory; read fewer frames (max_frames)."
        ) from exc
    except Exception as exc:
        raise RecordingError(
            f"{src.path.name}: reading the image data failed ({type(exc).__name__}: {exc}); the "
            "file is probably truncated or damaged: copy or export it again."
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
            fn = np.nanmean if z_projection == "mean" else np.nanmedian
            data = fn(data.astype(np.float64), axis=zi)
            if plan.out_dtype.kind in "ui" and src.calibration is None:
                data = np.rint(data)
        else:
            data = np.fmax.reduce(data, axis=zi) if data.dtype.kind == "f" else data.max(axis=zi)
        kept.remove("Z")
    out_dtype = plan.out_dtype
    if src.calibration is not None:
        c0, c1 = src.calibration
        data = (np.float32(c0) + np.float32(c1) * data.astype(np.float32)).astype(np.float32)
    elif data.dtype != out_dtype:
        data = data.astype(out_dtype)
    return np.ascontiguousarray(data)


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


def _value_notes(frames: np.ndarray, partial: bool) -> list[str]:
    notes = []
    where = " in the frames checked" if partial else ""
    if frames.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(frames)))
        n_inf = int(np.count_nonzero(np.isinf(frames)))
        if n_nan or n_inf:
            notes.append(
                f"{n_nan} NaN and {n_inf} Inf values{where} (kept as float32; use NaN-safe "
                "statistics)"
            )
    elif frames.dtype in (np.uint8, np.uint16) and frames.size:
        top = np.iinfo(frames.dtype).max
        n_sat = int(np.count_nonzero(frames == top))
        if n_sat:
            notes.append(
                f"{n_sat} pixels at the {frames.dtype.name} maximum {top}{where} (saturated?)"
            )
    if not partial and frames.size:
        finite = frames[np.isfinite(frames)] if frames.dtype.kind == "f" else frames
        if finite.size and finite.min() == finite.max():
            notes.append(f"the recording is constant (every value is {finite.flat[0]})")
    return notes


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


def _guard(fn: Callable[[], Any], display: str) -> Any:
    """Run ``fn``; turn any non-RecordingError failure into a RecordingError."""
    try:
        return fn()
    except RecordingError:
        raise
    except MemoryError as exc:
        raise RecordingError(
            f"{display} is too large to read into memory; read fewer frames (max_frames)."
        ) from exc
    except Exception as exc:
        raise RecordingError(
            f"{display}: could not be read ({type(exc).__name__}: {exc}); the file is probably "
            "damaged or in an unsupported variant: export it again as TIFF."
        ) from exc


def probe_recording(path: str | Path) -> RecordingInfo:
    """Describe a recording cheaply: headers plus its first and last frame.

    Reads the metadata, resolves the axes, and decodes the first and the last frame to prove the
    data is really there (a truncated file fails here, not halfway through a job).

    Args:
        path: a file, a folder of frames, or ``file.h5:/dataset``.

    Returns:
        :class:`RecordingInfo` for ``read_recording(path)`` with default arguments.

    Raises:
        RecordingError: the file is missing, empty, not an image, truncated, has too small
            frames, 0 frames, or axes that need an override.
    """
    display = os.fspath(path)

    def run() -> RecordingInfo:
        src = _open_source(path)
        try:
            plan = _plan(src, None, 0)
            first = _read_frames(src, plan, 0, 0, 1)
            last = _read_frames(src, plan, 0, plan.n_frames - 1, plan.n_frames)
            if first.shape[0] != 1 or last.shape[0] != 1:
                raise RecordingError(
                    f"{display}: the header promises {plan.n_frames} frames but they cannot all "
                    "be read; the file is probably truncated: copy it again."
                )
            checked = np.concatenate([first, last])
            return _info(src, plan, plan.n_frames, _value_notes(checked, partial=True))
        finally:
            src.close()

    return _guard(run, display)


def read_recording(
    path: str | Path,
    *,
    axes: str | None = None,
    channel: int = 0,
    max_frames: int | None = None,
    interleaved_channels: int | None = None,
    z_projection: str = "max",
) -> Recording:
    """Read a recording as a ``(T, H, W)`` frame stack.

    Args:
        path: a file (TIFF/OME-TIFF/BigTIFF/ImageJ, PNG, JPEG, HDF5, .npy, AVI/MP4), a folder of
            single-frame files, or ``file.h5:/group/dataset``.
        axes: override of the stored axes, one letter of ``TZCYXS`` per stored dimension (e.g.
            ``"TZCYX"``, ``"CTYX"``, ``"TYXS"``); ``None`` detects them.
        channel: channel index (0-based) to read when the data has a C axis.
        max_frames: read only the first ``max_frames`` frames (only those are decoded for
            memory-mapped TIFF, page-wise TIFF, HDF5, .npy and folders).
        interleaved_channels: for files without a channel axis whose images alternate between
            ``k`` channels (c0, c1, c0, c1, ...): split the time axis into ``(T, k)`` and read
            ``channel``.
        z_projection: how a Z axis is collapsed when the data also has T: ``"max"`` (default,
            brightest plane per pixel), ``"mean"`` or ``"median"`` (NaN ignored; rounded to the
            output dtype when that is an integer type).

    Returns:
        :class:`Recording` with ``frames`` ``(T, H, W)`` uint8/uint16/float32 (native byte order;
        ImageJ calibration applied -> float32) and its :class:`RecordingInfo`.

    Raises:
        RecordingError: see :func:`probe_recording`; also for a bad ``axes``/``channel``.
    """
    display = os.fspath(path)
    _check_z(z_projection)
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise RecordingError(f"max_frames must be a positive integer, got {max_frames!r}.")

    def run() -> Recording:
        src = _open_source(path)
        try:
            plan = _plan(src, axes, channel, interleaved_channels)
            t1 = plan.n_frames if max_frames is None else min(plan.n_frames, max_frames)
            frames = _read_frames(src, plan, channel, 0, t1, z_projection)
            if frames.shape[0] != t1:
                raise RecordingError(
                    f"{display}: expected {t1} frames but read {frames.shape[0]}; the file is "
                    "probably truncated: copy it again."
                )
            extra = _value_notes(frames, partial=False)
            if t1 < plan.n_frames:
                extra.append(f"read the first {t1} of {plan.n_frames} frames (max_frames)")
            info = _info(src, plan, t1, extra)
            if z_projection != "max":
                info.warnings = [
                    w.replace("maximum-intensity projection", f"{z_projection} projection")
                    for w in info.warnings
                ]
            return Recording(frames=frames, info=info)
        finally:
            src.close()

    return _guard(run, display)


def iter_recording(
    path: str | Path,
    *,
    axes: str | None = None,
    channel: int = 0,
    chunk_frames: int = 64,
    interleaved_channels: int | None = None,
    z_projection: str = "max",
) -> Iterator[tuple[int, np.ndarray]]:
    """Read a recording chunk by chunk, so memory stays bounded for long recordings.

    Args:
        path, axes, channel, interleaved_channels, z_projection: as for :func:`read_recording`.
        chunk_frames: frames per chunk (>= 1).

    Yields:
        ``(t0, frames)``: index of the chunk's first frame and a ``(t, H, W)`` array (``t <=
        chunk_frames``) in the same dtype and calibration as :func:`read_recording` returns.
        Memory-mapped and page-wise TIFF, HDF5, .npy and folders read only the chunk; videos
        are decoded whole first (no seekable decoder is assumed).

    Raises:
        RecordingError: as :func:`read_recording`, raised at the first ``next()``.
    """
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise RecordingError(f"chunk_frames must be a positive integer, got {chunk_frames!r}.")
    _check_z(z_projection)
    display = os.fspath(path)
    src = _guard(lambda: _open_source(path), display)
    try:
        plan = _guard(lambda: _plan(src, axes, channel, interleaved_channels), display)
        for t0 in range(0, plan.n_frames, chunk_frames):
            t1 = min(t0 + chunk_frames, plan.n_frames)
            chunk = _guard(
                lambda a=t0, b=t1: _read_frames(src, plan, channel, a, b, z_projection), display
            )
            if chunk.shape[0] != t1 - t0:
                raise RecordingError(
                    f"{display}: frames {t0}..{t1 - 1} could not all be read; the file is probably "
                    "truncated: copy it again."
                )
            yield t0, chunk
    finally:
        src.close()
