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
    (T, H, W) uint32, and the display range (lo, hi) in the frames' intensity units."""

    frames: np.ndarray
    labels: np.ndarray
    gt: np.ndarray | None
    lo: float
    hi: float


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
        from calseg.io.overlays import display_range

        frames = _frames(frames_path, simulated)
        lo, hi = display_range(frames)
        gt = _labels(gt_path) if gt_path else None
        return Stacks(frames, _labels(labels_path), gt, float(lo), float(hi))

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


def render_png(stacks: Stacks, t: int, *, overlay: bool, gt: bool) -> bytes:
    """PNG bytes of frame ``t``: the frame with predicted labels (``overlay``), and the same
    frame with ground truth to its right (``gt``, when the job has it)."""
    from PIL import Image

    from calseg.io.overlays import render_overlay

    frame = stacks.frames[t]
    panels = [render_overlay(frame, stacks.labels[t] if overlay else None, stacks.lo, stacks.hi)]
    if gt and stacks.gt is not None:
        panels.append(np.full((frame.shape[0], GAP_PX, 3), 255, np.uint8))
        panels.append(render_overlay(frame, stacks.gt[t], stacks.lo, stacks.hi))
    img = np.concatenate(panels, axis=1) if len(panels) > 1 else panels[0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
