"""Server-side rendering of recording frames with predicted labels, for the viewer.

Nothing is decoded whole: a frame request decodes that frame of the recording (through
:class:`calseg.io.recordings.RecordingReader`, with the recording's reading options and the
server's decode budget) and that page of the label stacks. Open files (their parsed headers)
are kept in a small LRU (:data:`CACHE_SIZE`), so scrubbing through frames does not re-parse
them; memory holds a few frames, whatever the recording's length.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

CACHE_SIZE = 8
"""Open recordings / label stacks kept (headers parsed, no pixels)."""
GAP_PX = 4
PREVIEW_MAX_PIXELS = 4 * 2**20
"""Most pixels of a drawn frame panel (4 Mi, e.g. 2048 x 2048): a larger frame is drawn from
every k-th row and column (:func:`preview_step`; the ``X-Preview-Step`` header gives k).
Drawing costs about 33 bytes per pixel (float frame, RGB, outlines): a 30000 x 30000 frame
drawn whole took the API to 23 GB (an attacker's 1 MB TIFF, killed by the OOM killer)."""


def preview_step(height: int, width: int) -> int:
    """The decimation ``k`` (>= 1) that draws a ``height x width`` frame in at most
    :data:`PREVIEW_MAX_PIXELS` pixels: every k-th row and column."""
    return max(1, math.ceil(math.sqrt(height * width / PREVIEW_MAX_PIXELS)))


def _decimated(frame: np.ndarray) -> np.ndarray:
    """``frame[::k, ::k]`` with ``k`` = :func:`preview_step` of its shape (a view, no copy)."""
    k = preview_step(*frame.shape[-2:])
    return frame if k == 1 else frame[..., ::k, ::k]


class FrameSource(Protocol):
    """``(T, H, W)`` frames decoded one at a time."""

    shape: tuple[int, int, int]

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` as ``(H, W)``."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


class ArrayFrames:
    """A :class:`FrameSource` over an array already in memory (tests, small stacks)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array)
        self.shape = tuple(self.array.shape)

    def frame(self, t: int) -> np.ndarray:
        return self.array[t]

    def close(self) -> None:
        pass


class TiffPages:
    """A :class:`FrameSource` over a ``(T, H, W)`` TIFF written by CalSeg itself (a label
    stack, a calseg-dataset image): page ``t`` is frame ``t``, decoded on demand.

    Args:
        path: the TIFF.
        dtype: convert frames to this dtype (label stacks: uint32); None keeps the stored one.
    """

    def __init__(self, path: Path, dtype: Any = None) -> None:
        self.path, self.dtype = path, dtype
        self.lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        import tifffile

        self.tf = tifffile.TiffFile(self.path)
        series = self.tf.series[0]
        shape = tuple(int(n) for n in series.shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            self.tf.close()
            raise ValueError(f"{self.path.name} holds shape {shape}, not (T, H, W) frames")
        self.shape = shape
        self.series = series
        self.closed = False

    def frame(self, t: int) -> np.ndarray:
        if not 0 <= t < self.shape[0]:
            raise IndexError(f"frame {t} not in 0..{self.shape[0] - 1}")
        with self.lock:
            if self.closed:  # evicted from the cache while a request still held it
                self._open()
            data = np.asarray(self.series.asarray(key=t)).reshape(self.shape[1:])
        return data if self.dtype is None else data.astype(self.dtype)

    def close(self) -> None:
        with self.lock:
            self.tf.close()
            self.closed = True


class RecordingFrames:
    """A :class:`FrameSource` over an uploaded recording, read with its reading options and
    checked against the decode budget (:class:`calseg.io.recordings.RecordingReader`)."""

    def __init__(self, path: Path, read_options: dict[str, Any] | None, limits: Any) -> None:
        self.args = (path, dict(read_options or {}), limits)
        self.lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        from calseg.io.recordings import RecordingReader

        path, options, limits = self.args
        self.reader = RecordingReader(path, **options, limits=limits)
        info = self.reader.info
        self.shape = (info.n_frames, info.height, info.width)
        self.closed = False

    def frame(self, t: int) -> np.ndarray:
        with self.lock:  # reads are serialised by the reader anyway
            if self.closed:  # evicted from the cache while a request still held it
                self._open()
            return self.reader.frame(t)

    def close(self) -> None:
        with self.lock:
            self.reader.close()
            self.closed = True


@dataclass
class Stacks:
    """What a viewer frame is drawn from: frames (T, H, W) and optional labels and ground truth
    (T, H, W) label ids, as :class:`FrameSource` (an array is wrapped), the default display
    range (lo, hi) and the finite data range (vmin, vmax), all in the frames' intensity units
    (e.g. counts of a uint16 recording)."""

    frames: Any
    labels: Any
    gt: Any
    lo: float
    hi: float
    vmin: float = 0.0
    vmax: float = 1.0

    def __post_init__(self) -> None:
        for name in ("frames", "labels", "gt"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                setattr(self, name, ArrayFrames(value))

    @property
    def n_frames(self) -> int:
        """Frames T."""
        return int(self.frames.shape[0])


_sources: OrderedDict[tuple, Any] = OrderedDict()
_traces_cache: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
_lock = threading.Lock()


def _key(path: Path, *extra: Any) -> tuple:
    return (str(path), path.stat().st_mtime_ns, *extra)


def _source(key: tuple, open_: Callable[[], Any]) -> Any:
    """The open :class:`FrameSource` of ``key``, or ``open_()`` kept there; the least recently
    used beyond :data:`CACHE_SIZE` are closed (after their last reader, under their own
    lock)."""
    with _lock:
        if key in _sources:
            _sources.move_to_end(key)
            return _sources[key]
    value = open_()  # header parsing runs outside the lock
    evicted = []
    with _lock:
        if key in _sources:  # opened meanwhile by another request
            evicted.append(value)
            value = _sources[key]
        else:
            _sources[key] = value
        while len(_sources) > CACHE_SIZE:
            evicted.append(_sources.popitem(last=False)[1])
    for old in evicted:
        old.close()
    return value


def _cached(
    cache: OrderedDict,
    key: tuple,
    load: Callable[[], Any],
    too_full: Callable[[OrderedDict], bool] = lambda c: len(c) > CACHE_SIZE,
) -> Any:
    """``cache[key]``, or ``load()`` stored there; least recently used entries are dropped
    while ``too_full(cache)`` (default: more than ``CACHE_SIZE`` entries), the newest never.
    ``load`` runs outside the lock."""
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = load()
    with _lock:
        cache[key] = value
        while len(cache) > 1 and too_full(cache):
            cache.popitem(last=False)
    return value


def recording_source(path: Path, read_options: dict[str, Any] | None, limits: Any) -> Any:
    """The open :class:`RecordingFrames` of an uploaded recording (cached by path,
    modification time, options and limits).

    Raises:
        FileNotFoundError: the file is gone. calseg.io.recordings.RecordingError: unreadable,
            refused or over the budget (RecordingTooLarge).
    """
    opts = tuple(sorted((read_options or {}).items()))
    return _source(
        _key(path, "recording", opts, limits),
        lambda: RecordingFrames(path, read_options, limits),
    )


def label_source(path: Path) -> Any:
    """The open label stack ``labels.tif`` (uint32 ids, 0 = background), frame by frame."""
    return _source(_key(path, "labels"), lambda: TiffPages(path, np.uint32))


def frame_ranges(frame: np.ndarray) -> tuple[float, float, float, float]:
    """``(lo, hi, vmin, vmax)`` of one frame: its display range (percentiles 0.5 and 99.8 of
    :func:`calseg.io.overlays.display_range`) and its finite minimum and maximum."""
    from calseg.io.overlays import display_range

    lo, hi = display_range(frame)
    finite = frame if frame.dtype.kind in "iub" else frame[np.isfinite(frame)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    return (float(lo), float(hi), *widened(vmin, vmax))


def widened(vmin: float, vmax: float) -> tuple[float, float]:
    """A data range ``(vmin, vmax)`` with ``vmax > vmin``: a flat one (a constant recording)
    widened as :func:`calseg.io.overlays.display_range` widens a flat recording, ``vmin`` to
    ``vmin + max(1, |vmin| 1e-6)``. (It was ``max(vmax, vmin + 1e-6)``: data of about 1e-28
    reported a maximum of 1e-06, an 11th attack run; an infer job's recorded range was not
    widened at all, so a constant recording's headers said 7..7 where its preview said 7..8,
    a 12th.)"""
    if not vmax > vmin:
        vmax = vmin + max(1.0, abs(vmin) * 1e-6)
    return vmin, vmax


def load_stacks(
    frames_path: Path,
    labels_path: Path,
    gt_path: Path | None,
    *,
    simulated: bool = False,
    read_options: dict[str, Any] | None = None,
    limits: Any = None,
    display_range: tuple[float, float] | None = None,
    data_range: tuple[float, float] | None = None,
    first: int = 0,
) -> Stacks:
    """The stacks of an infer job, opened (not decoded). ``simulated``: the frames are a
    calseg-dataset video (TYX TIFF); otherwise an uploaded recording read with
    ``read_options`` within ``limits``. ``display_range``/``data_range``: the whole
    recording's ranges when the job recorded them; otherwise those of frame ``first``.

    Raises:
        FileNotFoundError: a file is gone. calseg.io.recordings.RecordingError: unreadable.
    """
    if simulated:
        frames = _source(_key(frames_path, "dataset"), lambda: TiffPages(frames_path))
    else:
        frames = recording_source(frames_path, read_options, limits)
    labels = label_source(labels_path)
    gt = label_source(gt_path) if gt_path else None
    lo = hi = vmin = vmax = None
    if display_range is None or data_range is None:
        t = min(max(first, 0), frames.shape[0] - 1)
        lo, hi, vmin, vmax = frame_ranges(_decimated(frames.frame(t)))
    if display_range is not None:
        lo, hi = (float(v) for v in display_range)
    if data_range is not None:
        vmin, vmax = widened(*(float(v) for v in data_range))
    return Stacks(frames, labels, gt, lo, hi, vmin, vmax)  # type: ignore[arg-type]


def recording_frame(
    path: Path, t: int, read_options: dict[str, Any] | None, limits: Any
) -> tuple[Stacks, np.ndarray]:
    """Frame ``t`` of an uploaded recording (the only frame decoded) and :class:`Stacks`
    without labels whose ranges are that frame's (of its :func:`preview_step` decimation), for
    previews.

    Raises:
        FileNotFoundError: the file is gone. IndexError: ``t`` out of range (the message gives
            the range). calseg.io.recordings.RecordingError: unreadable, refused, too large.
    """
    source = recording_source(path, read_options, limits)
    n = source.shape[0]
    if not 0 <= t < n:
        raise IndexError(f"frame {t} out of range: the recording has frames 0..{n - 1}")
    frame = source.frame(t)
    return Stacks(source, None, None, *frame_ranges(_decimated(frame))), frame


MAX_VIEWER_TRACES_BYTES = 128 * 2**20
"""Largest ``traces.csv`` the viewer reads (bytes; about 3 M cell-frames): parsing takes about
2.3 bytes of memory per byte of file (:func:`calseg.io.tables.read_traces_csv`). A larger one
is :class:`TracesTooLarge` (the file itself downloads as any artifact). A sixth attack run
made a 70 MB table from a 24 MB upload (10,404 three-pixel cells x 200 frames), and three
viewer requests for it took the API up by 5.1 GB."""
TRACES_CACHE_BYTES = 256 * 2**20
"""Most bytes of parsed traces kept in memory, all jobs together (least recently used
dropped first)."""


class TracesTooLarge(ValueError):
    """A ``traces.csv`` over :data:`MAX_VIEWER_TRACES_BYTES`."""


def load_traces(traces_path: Path) -> dict[str, np.ndarray]:
    """The traces of a ``traces.csv`` artifact as :func:`calseg.io.tables.read_traces_csv`
    returns them (``ids`` (N,) int64, ``time_s`` (T,) s, ``F``/``F0``/``dF/F`` (N, T) float64,
    NaN where empty), cached by path and modification time within :data:`TRACES_CACHE_BYTES`.

    Raises:
        FileNotFoundError: the file is gone. calseg.io.tables.TableError: not a traces table.
        TracesTooLarge: the file is over :data:`MAX_VIEWER_TRACES_BYTES`.
    """
    from calseg.io.tables import read_traces_csv

    st = traces_path.stat()
    if st.st_size > MAX_VIEWER_TRACES_BYTES:
        raise TracesTooLarge(
            f"traces.csv is {st.st_size / 2**20:.0f} MiB, more than the viewer reads "
            f"({MAX_VIEWER_TRACES_BYTES / 2**20:.0f} MiB); download traces.csv or "
            "traces.parquet from the job's files instead"
        )

    def too_full(cache: OrderedDict) -> bool:
        return sum(a.nbytes for v in cache.values() for a in v.values()) > TRACES_CACHE_BYTES

    key = (str(traces_path), st.st_mtime_ns)
    return _cached(_traces_cache, key, lambda: read_traces_csv(traces_path), too_full)


def label_at(labels: Any, t: int, x: int, y: int) -> int:
    """The label id at pixel column ``x``, row ``y`` (px) of frame ``t`` of a ``(T, H, W)``
    label stack (an array or a :class:`FrameSource`; only frame ``t`` is decoded; 0 =
    background).

    Raises:
        IndexError: ``t``, ``x`` or ``y`` is outside the stack (negative indices are never
            wrapped); the message names the valid ranges.
    """
    n, h, w = labels.shape
    bad = [
        f"{name}={v} not in 0..{size - 1}"
        for name, v, size in (("t", t, n), ("x", x, w), ("y", y, h))
        if not 0 <= v < size
    ]
    if bad:
        raise IndexError(
            f"{'; '.join(bad)}: the label stack has {n} frames of {h} x {w} px (rows x columns)"
        )
    if isinstance(labels, np.ndarray):
        return int(labels[t, y, x])
    return int(labels.frame(t)[y, x])


def range_headers(stacks: Stacks) -> dict[str, str]:
    """HTTP headers of a rendered frame: the default display range (``X-Display-Lo``,
    ``X-Display-Hi``), the finite data range (``X-Data-Min``, ``X-Data-Max``) in intensity
    units, ``X-Frames`` (T), ``X-Frame-Height`` / ``X-Frame-Width`` (the recording's frame, px),
    ``X-Preview-Step`` (k: the image shows every k-th row and column, :func:`preview_step`; a
    pixel at image column x is frame column k x) and a one-hour ``Cache-Control``."""
    _, h, w = stacks.frames.shape
    return {
        "Cache-Control": "max-age=3600",
        "X-Frame-Height": str(h),
        "X-Frame-Width": str(w),
        "X-Preview-Step": str(preview_step(h, w)),
        "X-Display-Lo": f"{stacks.lo:.6g}",
        "X-Display-Hi": f"{stacks.hi:.6g}",
        "X-Data-Min": f"{stacks.vmin:.6g}",
        "X-Data-Max": f"{stacks.vmax:.6g}",
        "X-Frames": str(stacks.n_frames),
    }


STYLES = ("both", "fill", "outline")
COLORS = ("instance", "single")
SINGLE_ID = 5
"""Label id whose colour (:func:`calseg.io.overlays.label_colors`) draws every cell in the
``colors="single"`` mode."""


def render_png(
    stacks: Stacks,
    t: int,
    *,
    overlay: bool = True,
    gt: int = 0,
    alpha: float = 0.45,
    style: str = "both",
    colors: str = "instance",
    lo: float | None = None,
    hi: float | None = None,
    frame: np.ndarray | None = None,
) -> bytes:
    """PNG bytes (RGB) of frame ``t`` with labels drawn over it; a frame of more than
    :data:`PREVIEW_MAX_PIXELS` is drawn from every k-th row and column (:func:`preview_step`).

    Args:
        stacks: the decoded stacks; ``labels``/``gt`` may be None (then nothing is drawn).
        t: frame index (0-based, must be valid).
        overlay: draw the labels (predicted, or ground truth when ``gt == 2``).
        gt: 0 = predictions only; 1 = a second panel with the ground truth to the right
            (``GAP_PX`` white columns between, same width); 2 = the ground truth drawn in place
            of the predictions. Ignored when the job has no ground truth.
        alpha: opacity of the cells' fill in [0, 1].
        style: ``"both"`` (fill and outline), ``"fill"`` or ``"outline"``.
        colors: ``"instance"`` (a stable colour per cell id) or ``"single"`` (every cell in the
            colour of id :data:`SINGLE_ID`; touching cells then share an outline).
        lo, hi: intensities drawn black and white (intensity units of the recording);
            None = the recording's display range (``stacks.lo``, ``stacks.hi``).
        frame: frame ``t`` when already decoded (else it is decoded from ``stacks``).

    Raises:
        ValueError: ``alpha``, ``style``, ``colors`` or ``lo >= hi`` out of range.
    """
    from PIL import Image

    from calseg.io.overlays import render_overlay

    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if colors not in COLORS:
        raise ValueError(f"colors must be one of {', '.join(COLORS)}, got {colors!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    lo = stacks.lo if lo is None else float(lo)
    hi = stacks.hi if hi is None else float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # lo=1e308&hi=inf drew all black
        raise ValueError(f"the display range needs finite lo and hi, got lo={lo}, hi={hi}")
    if not hi > lo:
        raise ValueError(f"the display range needs lo < hi, got lo={lo}, hi={hi}")
    if not math.isfinite(hi - lo):  # lo=-1e308&hi=1e308: the width overflowed, all black
        raise ValueError(
            f"the display range is wider than a float holds (hi - lo overflows), got "
            f"lo={lo:g}, hi={hi:g}"
        )
    fill_alpha = 0.0 if style == "outline" else alpha
    outline = style != "fill"

    def draw(labels: Any) -> np.ndarray:
        lab = _decimated(labels.frame(t)) if labels is not None and overlay else None
        if lab is not None and colors == "single":
            lab = (lab > 0).astype(np.uint32) * SINGLE_ID
        return render_overlay(frame, lab, lo, hi, alpha=fill_alpha, outline=outline)

    frame = _decimated(stacks.frames.frame(t) if frame is None else frame)
    has_gt = stacks.gt is not None
    panels = [draw(stacks.gt if gt == 2 and has_gt else stacks.labels)]
    if gt == 1 and has_gt:
        panels.append(np.full((frame.shape[0], GAP_PX, 3), 255, np.uint8))
        panels.append(draw(stacks.gt))
    img = np.concatenate(panels, axis=1) if len(panels) > 1 else panels[0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
