"""Segmentation overlays: RGB frames, PNG contact sheets and animated GIFs.

Intensity is mapped to gray with ONE display range for the whole recording
(:func:`display_range`, percentiles over all frames), never per frame, so brightness changes
between frames stay visible (DESIGN.md section 5: per-frame normalisation hid them).

Instance colours come from a hash of the label id (:func:`label_colors`), so a cell keeps its
colour across frames, files and runs. Ground-truth outlines are drawn in yellow
(:data:`GT_COLOR`); the instance palette leaves out the yellow hues so the two never look alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = [
    "GT_COLOR",
    "animation",
    "contact_sheet",
    "display_range",
    "label_colors",
    "render_overlay",
]

GT_COLOR = (255, 221, 0)
"""RGB colour of ground-truth outlines."""

_TILE_TARGET = 256  # px: frames are scaled so their long side is at least this in sheets/GIFs
_TILE_MAX = 512  # px: ... and at most this
_MAX_SAMPLES = 1_000_000


def display_range(frames: np.ndarray, low: float = 0.5, high: float = 99.8) -> tuple[float, float]:
    """Display range of a whole recording: the ``low`` and ``high`` percentiles of all pixels.

    Args:
        frames: ``(T, H, W)`` (or any shape) intensities, any numeric dtype; NaN/Inf ignored.
        low: lower percentile in [0, 100].
        high: upper percentile in [0, 100], > ``low``.

    Returns:
        ``(lo, hi)`` floats with ``hi > lo`` (``(0, 1)`` when no finite value exists). At most
        about 1e6 pixels, evenly strided over the whole stack, are used (deterministic).
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    flat = np.asarray(frames).reshape(-1)
    if flat.size > _MAX_SAMPLES:
        flat = flat[:: int(math.ceil(flat.size / _MAX_SAMPLES))]
    flat = flat.astype(np.float64)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat, [low, high])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014): well-spread 64-bit hashes of the ids."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def label_colors(ids: np.ndarray) -> np.ndarray:
    """Stable RGB colour per label id.

    Args:
        ids: integer label ids, any shape.

    Returns:
        ``ids.shape + (3,)`` uint8. Hue from a hash of the id, skipping 40-80 degrees (yellow,
        reserved for ground truth); saturation 0.65-1 and value 0.8-1. Id 0 gives black.
    """
    ids = np.asarray(ids)
    h = _mix(ids)
    hue = (h & np.uint64(0xFFFF)).astype(np.float64) / 65536.0 * 320.0
    hue = np.where(hue >= 40.0, hue + 40.0, hue) / 60.0
    sat = 0.65 + 0.35 * ((h >> np.uint64(16)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    val = 0.80 + 0.20 * ((h >> np.uint64(24)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    i = np.floor(hue).astype(int) % 6
    f = hue - np.floor(hue)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    r = np.choose(i, [val, q, p, p, t, val])
    g = np.choose(i, [t, val, val, q, p, p])
    b = np.choose(i, [p, p, t, val, val, q])
    rgb = np.stack([r, g, b], axis=-1)
    rgb = np.where((ids == 0)[..., None], 0.0, rgb)
    return np.round(rgb * 255).astype(np.uint8)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label whose 4-neighbour has another value (inner boundary), (H, W) bool."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & (lab != 0)


def _gray(frame: np.ndarray, lo: float, hi: float) -> np.ndarray:
    f = np.asarray(frame, dtype=np.float32)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    g = (f - np.float32(lo)) * np.float32(scale)
    g = np.nan_to_num(g, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def render_overlay(
    frame: np.ndarray,
    labels: np.ndarray | None,
    lo: float,
    hi: float,
    *,
    alpha: float = 0.45,
    outline: bool = True,
    gt: np.ndarray | None = None,
) -> np.ndarray:
    """Draw a label image over one frame.

    Args:
        frame: ``(H, W)`` intensities (any numeric dtype; NaN drawn black).
        labels: ``(H, W)`` integer label image (0 = background) or ``None``.
        lo: intensity drawn black (use :func:`display_range` of the whole recording).
        hi: intensity drawn white.
        alpha: opacity of the instance fill in [0, 1].
        outline: draw each instance's boundary in its colour at full opacity.
        gt: optional ``(H, W)`` ground-truth label image, drawn as outlines in
            :data:`GT_COLOR`.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"frame must be (H, W), got shape {frame.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    g = _gray(frame, lo, hi)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != frame.shape:
            raise ValueError(f"labels shape {lab.shape} differs from frame shape {frame.shape}")
        fg = lab != 0
        if fg.any():
            ids, inv = np.unique(lab[fg], return_inverse=True)
            colors = label_colors(ids)[inv].astype(np.float32)
            base = rgb[fg].astype(np.float32)
            rgb[fg] = np.rint((1.0 - alpha) * base + alpha * colors).astype(np.uint8)
            if outline:
                edge = _boundaries(lab)
                rgb[edge] = label_colors(lab[edge])
    if gt is not None:
        gt = np.asarray(gt)
        if gt.shape != frame.shape:
            raise ValueError(f"gt shape {gt.shape} differs from frame shape {frame.shape}")
        rgb[_boundaries(gt)] = GT_COLOR
    return rgb


def _scale_for(h: int, w: int) -> float:
    long_side = max(h, w)
    if long_side < _TILE_TARGET:
        return float(math.ceil(_TILE_TARGET / long_side))
    if long_side > _TILE_MAX:
        return _TILE_MAX / long_side
    return 1.0


def _resize_nearest(img: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _frame_labels(labels: np.ndarray | None, t: int, n_frames: int, name: str) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.ndim == 2:
        return lab
    if lab.ndim == 3 and lab.shape[0] == n_frames:
        return lab[t]
    raise ValueError(f"{name} must be (H, W) or (T, H, W) with T = {n_frames}, got {lab.shape}")


def _tile(
    frame: np.ndarray,
    labels: np.ndarray | None,
    gt: np.ndarray | None,
    lo: float,
    hi: float,
) -> np.ndarray:
    """Overlay of one frame, upscaled (nearest, before drawing) or downscaled for display."""
    h, w = frame.shape
    s = _scale_for(h, w)
    if s > 1:
        k = int(s)
        up = [None if a is None else _resize_nearest(np.asarray(a), k) for a in (labels, gt)]
        return render_overlay(_resize_nearest(frame, k), up[0], lo, hi, gt=up[1])
    rgb = render_overlay(frame, labels, lo, hi, gt=gt)
    if s < 1:
        from PIL import Image

        size = (max(1, round(w * s)), max(1, round(h * s)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    return rgb


def _font(size: int):  # noqa: ANN202 - PIL font types vary
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W) with T >= 1, got shape {arr.shape}")
    return arr


def contact_sheet(
    frames: np.ndarray,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    n: int = 12,
    gt: np.ndarray | None = None,
    title: str | None = None,
    traces: np.ndarray | None = None,
) -> Path:
    """Write a PNG grid of ``n`` evenly spaced frames with their overlays.

    Args:
        frames: ``(T, H, W)`` recording (one display range for all, see :func:`display_range`).
        labels: ``(T, H, W)`` label stack, ``(H, W)`` label image for all frames, or ``None``.
        path: output ``.png`` path (parent folders are created).
        n: number of frames shown (fewer when T < n); frame indices ``linspace(0, T-1, n)``.
        gt: optional ground truth, same shapes as ``labels``, drawn as yellow outlines.
        title: optional text above the grid.
        traces: optional ``(n_cells, T)`` traces (e.g. dF/F) plotted under the grid on one
            common scale; row ``i`` is drawn in the colour of label id ``i + 1`` (the
            ``calseg-dataset`` convention id = cell index + 1); grey lines mark shown frames.

    Returns:
        The path written. Frames with a long side under 256 px are upscaled by an integer
        factor (nearest neighbour), over 512 px downscaled.
    """
    from PIL import Image, ImageDraw

    arr = _check_frames(frames)
    t_total, h, w = arr.shape
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    idx = np.unique(np.round(np.linspace(0, t_total - 1, min(n, t_total))).astype(int))
    lo, hi = display_range(arr)
    tiles = [
        _tile(
            arr[t],
            _frame_labels(labels, t, t_total, "labels"),
            _frame_labels(gt, t, t_total, "gt"),
            lo,
            hi,
        )
        for t in idx
    ]
    th, tw = tiles[0].shape[:2]
    k_tiles = len(tiles)
    cols = max(1, min(k_tiles, math.ceil(math.sqrt(k_tiles * th / tw))))
    rows = math.ceil(k_tiles / cols)
    cols = math.ceil(k_tiles / rows)  # balance: 12 tiles -> 4 x 3, not 5 + 5 + 2
    cap, pad = 18, 4
    top = 28 if title else 0
    plot_h = 170 if traces is not None else 0
    sheet_w = cols * (tw + pad) + pad
    sheet_h = top + rows * (th + cap + pad) + pad + plot_h
    sheet = Image.new("RGB", (sheet_w, sheet_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    if title:
        draw.text((pad, 6), title, fill=(235, 235, 235), font=_font(16))
    for k, (t, tile) in enumerate(zip(idx, tiles, strict=True)):
        r, c = divmod(k, cols)
        x0 = pad + c * (tw + pad)
        y0 = top + pad + r * (th + cap + pad)
        draw.text((x0 + 2, y0 + 1), f"frame {t} / {t_total}", fill=(220, 220, 220), font=font)
        sheet.paste(Image.fromarray(tile), (x0, y0 + cap))
    if traces is not None:
        _draw_traces(draw, np.asarray(traces), idx, t_total, sheet_w, sheet_h - plot_h, plot_h)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _draw_traces(draw, traces, idx, t_total, width, y0, height) -> None:  # noqa: ANN001
    if traces.ndim == 1:
        traces = traces[np.newaxis]
    if traces.ndim != 2 or traces.shape[1] != t_total:
        raise ValueError(f"traces must be (n_cells, T) with T = {t_total}, got {traces.shape}")
    left, right, top, bottom = 8, width - 8, y0 + 16, y0 + height - 8
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    finite = traces[np.isfinite(traces)]
    if finite.size == 0:
        return
    vmin, vmax = float(finite.min()), float(finite.max())
    span = vmax - vmin if vmax > vmin else 1.0
    draw.text((left, y0), f"traces {vmin:.3g} .. {vmax:.3g}", fill=(200, 200, 200), font=_font(12))

    def xpos(t: float) -> float:
        return left + (right - left) * (t / max(t_total - 1, 1))

    for t in idx:
        draw.line([(xpos(t), top), (xpos(t), bottom)], fill=(70, 70, 70))
    colors = label_colors(np.arange(1, traces.shape[0] + 1))
    for i, row in enumerate(traces):
        pts = [
            (xpos(t), bottom - (bottom - top) * (v - vmin) / span)
            for t, v in enumerate(row)
            if np.isfinite(v)
        ]
        if len(pts) >= 2:
            draw.line(pts, fill=tuple(int(c) for c in colors[i]), width=1)


def animation(
    frames: np.ndarray,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    fps: float = 8,
    max_frames: int = 200,
    gt: np.ndarray | None = None,
) -> Path:
    """Write an animated GIF of the recording with overlays (imageio, Pillow plugin).

    Args:
        frames: ``(T, H, W)`` recording (one display range for all frames).
        labels: ``(T, H, W)`` label stack, ``(H, W)`` label image, or ``None``.
        path: output ``.gif`` path (parent folders are created).
        fps: playback rate in frames per second (GIF delays are whole 10 ms steps).
        max_frames: at most this many frames, evenly spaced over the recording.
        gt: optional ground truth, same shapes as ``labels``, drawn as yellow outlines.

    Returns:
        The path written; every GIF frame carries its frame index (so consecutive frames
        are never merged by the encoder), looping forever.
    """
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    arr = _check_frames(frames)
    t_total = arr.shape[0]
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"need fps > 0 and max_frames >= 1, got fps={fps}, max={max_frames}")
    idx = np.unique(np.round(np.linspace(0, t_total - 1, min(max_frames, t_total))).astype(int))
    lo, hi = display_range(arr)
    font = _font(12)
    out_frames = []
    for t in idx:
        tile = _tile(
            arr[t],
            _frame_labels(labels, t, t_total, "labels"),
            _frame_labels(gt, t, t_total, "gt"),
            lo,
            hi,
        )
        im = Image.fromarray(tile)
        draw = ImageDraw.Draw(im)
        text = f"{t} / {t_total}"
        draw.rectangle([0, 0, 8 + 7 * len(text), 15], fill=(0, 0, 0))
        draw.text((3, 1), text, fill=(255, 255, 255), font=font)
        out_frames.append(np.asarray(im))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(
        out,
        np.stack(out_frames),
        extension=".gif",
        duration=1000.0 / fps,
        loop=0,
    )
    return out
