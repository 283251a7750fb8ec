"""Server-side rendering of recording frames with predicted labels, for the viewer.

The frames of an infer job's recording and its label stack are decoded once and kept in a small
LRU cache (two recordings), so scrubbing through frames does not re-read the files.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE_SIZE = 2
GAP_PX = 4


@dataclass
class Stacks:
    """Decoded stacks of one infer job: frames (T, H, W), labels and optional ground truth
    (T, H, W) uint32, the default display range (lo, hi) and the finite data range
    (vmin, vmax), all in the frames' intensity units (e.g. counts of a uint16 recording)."""

    frames: np.ndarray
    labels: np.ndarray | None
    gt: np.ndarray | None
    lo: float
    hi: float
    vmin: float = 0.0
    vmax: float = 1.0


_cache: OrderedDict[tuple, Stacks] = OrderedDict()
_labels_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
_traces_cache: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
_lock = threading.Lock()


def _labels(path: Path) -> np.ndarray:
    from calseg.io.labels import read_label_stack

    return read_label_stack(path)


def _frames(path: Path, simulated: bool) -> np.ndarray:
    """(T, H, W) frames: a calseg-dataset image is a plain TYX TIFF; anything else goes
    through the recording reader (axis detection, calibration)."""
    if simulated:
        import tifffile

        arr = tifffile.imread(path)
        return arr[None] if arr.ndim == 2 else arr
    from calseg.io.recordings import read_recording

    return np.asarray(read_recording(path).frames)


def _cached(cache: OrderedDict, key: tuple, load: Callable[[], Any]) -> Any:
    """``cache[key]``, or ``load()`` stored there; least recently used entries beyond
    ``CACHE_SIZE`` are dropped. ``load`` runs outside the lock (decoding is slow)."""
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = load()
    with _lock:
        cache[key] = value
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return value


def load_stacks(
    frames_path: Path, labels_path: Path, gt_path: Path | None, *, simulated: bool = False
) -> Stacks:
    """The decoded stacks (cached by paths and modification times). ``simulated``: the frames
    are a calseg-dataset video (TYX TIFF)."""
    key = tuple((str(p), p.stat().st_mtime_ns) for p in (frames_path, labels_path, gt_path) if p)

    def load() -> Stacks:
        frames = _frames(frames_path, simulated)
        gt = _labels(gt_path) if gt_path else None
        return Stacks(frames, _labels(labels_path), gt, *_ranges(frames))

    return _cached(_cache, key, load)


def _ranges(frames: np.ndarray) -> tuple[float, float, float, float]:
    """``(lo, hi, vmin, vmax)``: the recording's display range (percentiles 0.5 and 99.8 of
    :func:`calseg.io.overlays.display_range`) and its finite minimum and maximum."""
    from calseg.io.overlays import display_range

    lo, hi = display_range(frames)
    finite = frames if frames.dtype.kind in "iub" else frames[np.isfinite(frames)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    return float(lo), float(hi), vmin, max(vmax, vmin + 1e-6)


def load_recording_frames(path: Path) -> Stacks:
    """An uploaded recording's frames (through the recording reader) as :class:`Stacks`
    without labels, for previews; cached like :func:`load_stacks`.

    Raises:
        FileNotFoundError: the file is gone. calseg.io.recordings.RecordingError: unreadable.
    """
    key = ((str(path), path.stat().st_mtime_ns), "recording")

    def load() -> Stacks:
        frames = _frames(path, simulated=False)
        return Stacks(frames, None, None, *_ranges(frames))

    return _cached(_cache, key, load)


def load_labels(labels_path: Path) -> np.ndarray:
    """The decoded label stack ``(T, H, W)`` (uint32 label ids, 0 = background) of a
    ``labels.tif`` artifact, cached by path and modification time like :func:`load_stacks`
    (the stacks cache is consulted first, so a viewer that rendered frames reuses its labels).

    Raises:
        FileNotFoundError: the file is gone.
    """
    mtime = labels_path.stat().st_mtime_ns
    key = (str(labels_path), mtime)
    with _lock:
        for skey, stacks in reversed(_cache.items()):
            if len(skey) > 1 and skey[1] == key:
                return stacks.labels
    return _cached(_labels_cache, key, lambda: _labels(labels_path))


def load_traces(traces_path: Path) -> dict[str, np.ndarray]:
    """The traces of a ``traces.csv`` artifact as :func:`calseg.io.tables.read_traces_csv`
    returns them (``ids`` (N,) int64, ``time_s`` (T,) s, ``F``/``F0``/``dF/F`` (N, T) float64,
    NaN where empty), cached by path and modification time.

    Raises:
        FileNotFoundError: the file is gone. calseg.io.tables.TableError: not a traces table.
    """
    from calseg.io.tables import read_traces_csv

    key = (str(traces_path), traces_path.stat().st_mtime_ns)
    return _cached(_traces_cache, key, lambda: read_traces_csv(traces_path))


def label_at(labels: np.ndarray, t: int, x: int, y: int) -> int:
    """The label id at pixel column ``x``, row ``y`` (px) of frame ``t`` of a ``(T, H, W)``
    label stack (0 = background).

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
    return int(labels[t, y, x])


def range_headers(stacks: Stacks) -> dict[str, str]:
    """HTTP headers of a rendered frame: the default display range (``X-Display-Lo``,
    ``X-Display-Hi``), the finite data range (``X-Data-Min``, ``X-Data-Max``) in intensity
    units, ``X-Frames`` (T) and a one-hour ``Cache-Control``."""
    return {
        "Cache-Control": "max-age=3600",
        "X-Display-Lo": f"{stacks.lo:.6g}",
        "X-Display-Hi": f"{stacks.hi:.6g}",
        "X-Data-Min": f"{stacks.vmin:.6g}",
        "X-Data-Max": f"{stacks.vmax:.6g}",
        "X-Frames": str(stacks.frames.shape[0]),
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
) -> bytes:
    """PNG bytes (RGB) of frame ``t`` with labels drawn over it.

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
    if not hi > lo:
        raise ValueError(f"the display range needs lo < hi, got lo={lo}, hi={hi}")
    fill_alpha = 0.0 if style == "outline" else alpha
    outline = style != "fill"

    def draw(labels: np.ndarray | None) -> np.ndarray:
        lab = labels[t] if labels is not None and overlay else None
        if lab is not None and colors == "single":
            lab = (lab > 0).astype(np.uint32) * SINGLE_ID
        return render_overlay(frame, lab, lo, hi, alpha=fill_alpha, outline=outline)

    frame = stacks.frames[t]
    has_gt = stacks.gt is not None
    panels = [draw(stacks.gt if gt == 2 and has_gt else stacks.labels)]
    if gt == 1 and has_gt:
        panels.append(np.full((frame.shape[0], GAP_PX, 3), 255, np.uint8))
        panels.append(draw(stacks.gt))
    img = np.concatenate(panels, axis=1) if len(panels) > 1 else panels[0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
