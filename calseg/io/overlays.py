"""Segmentation overlays: RGB frames, PNG contact sheets and animated GIFs.

Intensity is mapped to gray with ONE display range for the whole recording
(:func:`display_range`, percentiles over all frames), never per frame, so brightness changes
between frames stay visible (DESIGN.md section 5: per-frame normalisation hid them).

Instance colours come from a hash of the label id (:func:`label_colors`), so a cell keeps its
colour across frames, files and runs. Ground-truth outlines are drawn in yellow
(:data:`GT_COLOR`, hue 54 degrees); the instance palette leaves out every hue from 30 to 90
degrees (orange-yellow to yellow-green), so no cell colour lies within 24 degrees of hue of it.

What a reader needs to read a picture at a glance is on it: the title (recording, and for
simulated data video id and pattern class), which model drew the cells (and, in red, when it
has random weights), each frame's index and time in seconds, a scale bar in micrometres when
the pixel size is known (in pixels otherwise, said so), traces with their unit and a time axis.
Contact sheets show the frames where cells are labelled (:func:`choose_frames`), not only
evenly spaced ones that can miss a cell active in two frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from calseg.fmt import plural
from calseg.progress import check_cancelled

__all__ = [
    "GT_COLOR",
    "PALETTE_GAP_DEG",
    "activity_image",
    "animation",
    "choose_frames",
    "colour_ramp",
    "contact_sheet",
    "display_range",
    "label_colors",
    "nice_length",
    "render_overlay",
    "scale_bar",
    "time_text",
]

GT_COLOR = (255, 230, 0)
"""RGB colour of ground-truth outlines (hue 54 degrees, outside the cell palette's hues)."""
PALETTE_GAP_DEG = (30.0, 90.0)
"""Hues (degrees) the instance palette never uses, around :data:`GT_COLOR`."""
WARN_COLOR = (200, 30, 30)
"""Background of the random-weights banner."""

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
    if hi <= lo:  # a flat recording: a range around its value that float64 can tell apart
        # (lo + 1 is lo itself from 2^53 on: every preview and viewer frame of a constant
        # recording at 1e16 answered 422, a 9th attack run)
        step = max(1.0, abs(lo) * 1e-6)
        hi = lo + step
        if not math.isfinite(hi):
            lo, hi = lo - step, lo
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
        ``ids.shape + (3,)`` uint8. Hue from a hash of the id, skipping
        :data:`PALETTE_GAP_DEG` (30-90 degrees: the yellows, reserved for ground truth);
        saturation 0.65-1 and value 0.8-1. Id 0 gives black.
    """
    ids = np.asarray(ids)
    h = _mix(ids)
    g0, g1 = PALETTE_GAP_DEG
    hue = (h & np.uint64(0xFFFF)).astype(np.float64) / 65536.0 * (360.0 - (g1 - g0))
    hue = np.where(hue >= g0, hue + (g1 - g0), hue) / 60.0
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
    """One ``(H, W)`` frame mapped ``lo..hi -> 0..255``, uint8. In float64: in float32 a pixel
    near the float32 maximum overflowed (a new-user check saw the RuntimeWarning)."""
    f = np.asarray(frame, dtype=np.float64)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    g = (f - lo) * scale
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


_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)


def _font_file() -> str | None:
    return next((f for f in _FONT_FILES if Path(f).is_file()), None)


def _font(size: int):  # noqa: ANN202 - PIL font types vary
    """DejaVu Sans when installed (it has µ, ·, ⁻), else Pillow's default font."""
    from PIL import ImageFont

    path = _font_file()
    if path is not None:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _u(text: str) -> str:
    """``text`` with µ and · replaced by ASCII when no font with those glyphs is installed."""
    if _font_file() is not None:
        return text
    return text.replace("µ", "u").replace("·", "-").replace("⁻", "-")


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 x 10^k that is <= ``target`` (> 0): a scale bar's length."""
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target must be a positive number, got {target}")
    mag = 10 ** math.floor(math.log10(target))
    return max(m * mag for m in (1, 2, 5) if m * mag <= target * (1 + 1e-9))


def scale_bar(width_px: int, pixel_size_um: float | None, zoom: float) -> tuple[float, str]:
    """Length (in displayed px) and label of a scale bar for a tile ``width_px`` wide.

    Args:
        width_px: displayed tile width (px); pixel_size_um: µm per recording pixel or
            ``None``; zoom: displayed px per recording pixel.

    Returns:
        ``(bar length in displayed px, label)``: about a fifth of the tile, a 1-2-5 length in
        µm (``"20 µm"``) when the pixel size is known, else in recording pixels
        (``"10 px (pixel size unknown)"``).
    """
    pixels = width_px / zoom / 5.0
    if pixel_size_um:
        um = nice_length(pixels * pixel_size_um)
        return um / pixel_size_um * zoom, _u(f"{um:g} µm")
    n = nice_length(max(pixels, 1.0))
    return n * zoom, f"{n:g} px (pixel size unknown)"


def _draw_scale_bar(draw, x1: float, y1: float, length: float, label: str, font) -> None:  # noqa: ANN001
    """A white bar with a dark edge ending at (x1, y1) (bottom right), label above it."""
    x0 = x1 - length
    draw.rectangle([x0 - 1, y1 - 5, x1 + 1, y1 + 1], fill=(0, 0, 0))
    draw.rectangle([x0, y1 - 4, x1, y1], fill=(255, 255, 255))
    bbox = draw.textbbox((0, 0), label, font=font)
    tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    tx = max(2, x1 - tw)
    draw.rectangle([tx - 2, y1 - 8 - th - 2, tx + tw + 2, y1 - 6], fill=(0, 0, 0))
    draw.text((tx, y1 - 8 - th - bbox[1]), label, fill=(255, 255, 255), font=font)


def time_text(t: int, frame_interval_s: float | None) -> str:
    """``"frame 16 · 16.0 s"`` (``"frame 16"`` without an interval): the caption of a frame."""
    if not frame_interval_s:
        return f"frame {t}"
    sec = t * frame_interval_s
    return _u(f"frame {t} · {sec:.3g} s" if sec < 1000 else f"frame {t} · {sec:.0f} s")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W) with T >= 1, got shape {arr.shape}")
    return arr


def choose_frames(
    n_frames: int, n: int, labels: np.ndarray | None = None, gt: np.ndarray | None = None
) -> np.ndarray:
    """The frames a contact sheet shows: every labelled cell at least once, then spread in time.

    Args:
        n_frames: T; n: how many frames to show (fewer when T < n).
        labels, gt: ``(T, H, W)`` label stacks (``(H, W)`` images, constant in time, carry
            no timing) or ``None``.

    Returns:
        Sorted unique frame indices. First, greedily, the frame that shows the most cells not
        shown yet (ties: more labelled pixels, then earlier), until every cell of ``labels``
        and ``gt`` is on some tile or ``n`` frames are chosen (a cell labelled only in frames
        16 and 19 is shown); then, for the remaining tiles, the recording is cut into ``n``
        equal time bins and each bin without a chosen frame gets its frame with the most
        labelled pixels (its middle frame when none), so the whole recording is seen.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k = min(n, n_frames)
    stacks = [np.asarray(a) for a in (labels, gt) if a is not None and np.ndim(a) == 3]
    stacks = [a for a in stacks if a.shape[0] == n_frames]
    cells_in: list[set] = [set() for _ in range(n_frames)]
    area = np.zeros(n_frames, dtype=np.int64)
    for j, a in enumerate(stacks):
        for t in range(n_frames):
            fr = a[t]
            if fr.any():
                ids = np.unique(fr[fr != 0])
                cells_in[t].update((j, int(i)) for i in ids)
                area[t] += int(np.count_nonzero(fr))
    chosen: list[int] = []
    shown: set = set()
    while len(chosen) < k:
        gain = [len(c - shown) for c in cells_in]
        best = max(range(n_frames), key=lambda t: (gain[t], area[t], -t))
        if gain[best] == 0:
            break
        chosen.append(best)
        shown |= cells_in[best]
    edges = np.floor(np.linspace(0, n_frames, k + 1)).astype(int)
    bins = [range(lo, max(hi, lo + 1)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for b in sorted(bins, key=lambda r: any(t in r for t in chosen)):
        if len(chosen) >= k:
            break
        free = [t for t in b if t < n_frames and t not in chosen]
        if not free or any(t in b for t in chosen):
            continue
        mid = free[len(free) // 2]
        chosen.append(max(free, key=lambda t: (area[t], -abs(t - mid))))
    if len(chosen) < k:  # bins all taken: evenly spaced among the frames left
        rest = [t for t in range(n_frames) if t not in chosen]
        pick = np.round(np.linspace(0, len(rest) - 1, k - len(chosen))).astype(int)
        chosen.extend(rest[i] for i in pick)
    return np.array(sorted(set(chosen)), dtype=int)


def _wrap_to_width(text: str, font, width: int) -> list[str]:  # noqa: ANN001
    """``text`` broken at spaces into lines no wider than ``width`` px in ``font`` (a word
    longer than the width stays on its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _banner_height(n_lines: int) -> int:
    return 6 + 17 * n_lines


def _banner(draw, width: int, y: int, lines: list[str], font) -> int:  # noqa: ANN001
    """A red strip with white text (``lines`` from :func:`_wrap_to_width`) across the sheet;
    returns its height in px."""
    h = _banner_height(len(lines))
    draw.rectangle([0, y, width, y + h], fill=WARN_COLOR)
    for i, line in enumerate(lines):
        draw.text((6, y + 3 + 17 * i), line, fill=(255, 255, 255), font=font)
    return h


def contact_sheet(
    frames: np.ndarray,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    n: int = 12,
    gt: np.ndarray | None = None,
    title: str | None = None,
    traces: np.ndarray | None = None,
    frame_interval_s: float | None = None,
    pixel_size_um: float | None = None,
    subtitle: str | None = None,
    warning: str | None = None,
    trace_ids: np.ndarray | None = None,
    trace_unit: str = "dF/F",
    traces_chosen_from: int | None = None,
) -> Path:
    """Write a PNG grid of frames with their overlays, captions, scale bar and traces.

    Args:
        frames: ``(T, H, W)`` recording (one display range for all, see :func:`display_range`).
        labels: ``(T, H, W)`` label stack, ``(H, W)`` label image for all frames, or ``None``.
        path: output ``.png`` path (parent folders are created).
        n: number of frames shown (fewer when T < n), chosen by :func:`choose_frames`.
        gt: optional ground truth, same shapes as ``labels``, drawn as yellow outlines.
        title: first line (the recording; for simulated data its video id and pattern class).
        traces: optional ``(n_cells, T)`` traces plotted under the grid on one common scale,
            with a time axis (s when ``frame_interval_s`` is given, else frames) and
            ``trace_unit`` on the y axis; row ``i`` is drawn in the colour of label id
            ``trace_ids[i]`` (default ``i + 1``, the ``calseg-dataset`` convention); grey
            lines mark the shown frames.
        frame_interval_s: s per frame: captions and the trace axis in seconds.
        pixel_size_um: µm per pixel: the scale bar in µm (in px, said so, when ``None``).
        subtitle: second line, e.g. which model drew the cells and the legend.
        warning: drawn in a red banner (e.g. random SAM2 weights).
        trace_ids: label id of each trace row; trace_unit: y-axis label.
        traces_chosen_from: when the rows are a selection (the largest peaks) of this many
            cells, the caption says so ("dF/F of the 40 cells with the largest peaks, of 44").

    Returns:
        The path written. Frames with a long side under 256 px are upscaled by an integer
        factor (nearest neighbour), over 512 px downscaled.
    """
    from PIL import Image, ImageDraw

    arr = _check_frames(frames)
    t_total, h, w = arr.shape
    idx = choose_frames(t_total, n, labels, gt)
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
    zoom = tw / w
    k_tiles = len(tiles)
    cols = max(1, min(k_tiles, math.ceil(math.sqrt(k_tiles * th / tw))))
    rows = math.ceil(k_tiles / cols)
    cols = math.ceil(k_tiles / rows)  # balance: 12 tiles -> 4 x 3, not 5 + 5 + 2
    cap, pad = 18, 4
    sheet_w = max(cols * (tw + pad) + pad, 480)
    font, small = _font(13), _font(12)
    lines = [x for x in (title, subtitle) if x]
    banner = _wrap_to_width(_u(warning), font, sheet_w - 12) if warning else []
    top = 6 + 20 * len(lines) + (_banner_height(len(banner)) + 4 if warning else 0)
    plot_h = 190 if traces is not None else 0
    sheet_h = top + rows * (th + cap + pad) + pad + plot_h
    sheet = Image.new("RGB", (sheet_w, sheet_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y = 6
    for i, line in enumerate(lines):
        draw.text((pad, y), _u(line), fill=(235, 235, 235), font=_font(16 if i == 0 else 13))
        y += 20
    if warning:
        _banner(draw, sheet_w, y, banner, font)
    for k, (t, tile) in enumerate(zip(idx, tiles, strict=True)):
        check_cancelled()
        r, c = divmod(k, cols)
        x0 = pad + c * (tw + pad)
        y0 = top + pad + r * (th + cap + pad)
        draw.text((x0 + 2, y0 + 1), time_text(int(t), frame_interval_s), fill=(220, 220, 220),
                  font=font)  # fmt: skip
        sheet.paste(Image.fromarray(tile), (x0, y0 + cap))
        if k == 0:
            length, label = scale_bar(tw, pixel_size_um, zoom)
            _draw_scale_bar(draw, x0 + tw - 6, y0 + cap + th - 6, length, label, small)
    if traces is not None:
        _draw_traces(
            draw,
            np.asarray(traces),
            idx,
            t_total,
            sheet_w,
            sheet_h - plot_h,
            plot_h,
            frame_interval_s=frame_interval_s,
            ids=trace_ids,
            unit=trace_unit,
            chosen_from=traces_chosen_from,
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    step = nice_length(span / n) if span / n > 0 else 1.0
    if step * n < span * 0.6:
        step *= 2
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def trace_caption(unit: str, n_rows: int, chosen_from: int | None = None) -> str:
    """Caption of the trace panel: ``"dF/F of 12 cells"``, or, when the rows are the largest
    peaks of more cells than are drawn, ``"dF/F of the 40 cells with the largest peaks, of
    44"``."""
    if chosen_from is not None and chosen_from > n_rows:
        return f"{unit} of the {n_rows} cells with the largest peaks, of {chosen_from}"
    return f"{unit} of {plural(n_rows, 'cell')}"


def _draw_traces(  # noqa: ANN202
    draw,  # noqa: ANN001
    traces: np.ndarray,
    idx: np.ndarray,
    t_total: int,
    width: int,
    y0: int,
    height: int,
    *,
    frame_interval_s: float | None = None,
    ids: np.ndarray | None = None,
    unit: str = "dF/F",
    chosen_from: int | None = None,
):
    if traces.ndim == 1:
        traces = traces[np.newaxis]
    if traces.ndim != 2 or traces.shape[1] != t_total:
        raise ValueError(f"traces must be (n_cells, T) with T = {t_total}, got {traces.shape}")
    font = _font(11)
    left, right, top, bottom = 52, width - 10, y0 + 18, y0 + height - 30
    draw.rectangle([left, top, right, bottom], outline=(110, 110, 110))
    dt = frame_interval_s or 1.0
    tmax = max(t_total - 1, 1) * dt
    xlabel = "time (s)" if frame_interval_s else "frame"
    n_rows = traces.shape[0]
    caption = trace_caption(unit, n_rows, chosen_from)
    draw.text((left, y0 + 2), _u(caption), fill=(220, 220, 220), font=_font(12))
    draw.text(((left + right) // 2 - 20, bottom + 15), xlabel, fill=(200, 200, 200), font=font)

    def xpos(t: float) -> float:
        return left + (right - left) * (t * dt / tmax)

    for tv in _ticks(0.0, tmax):
        x = left + (right - left) * tv / tmax
        draw.line([(x, bottom), (x, bottom + 4)], fill=(200, 200, 200))
        draw.text((x - 8, bottom + 4), f"{tv:g}", fill=(200, 200, 200), font=font)
    for t in idx:
        draw.line([(xpos(t), top), (xpos(t), bottom)], fill=(70, 70, 70))
    finite = traces[np.isfinite(traces)]
    if finite.size == 0:
        draw.text((left + 6, top + 6), "no finite values", fill=(200, 200, 200), font=font)
        return
    vmin, vmax = float(finite.min()), float(finite.max())
    span = vmax - vmin if vmax > vmin else 1.0

    def ypos(v: float) -> float:
        return bottom - (bottom - top) * (v - vmin) / span

    for v in _ticks(vmin, vmax, 4):
        draw.line([(left - 4, ypos(v)), (left, ypos(v))], fill=(200, 200, 200))
        draw.text((4, ypos(v) - 6), f"{v:.3g}", fill=(200, 200, 200), font=font)
    row_ids = np.arange(1, traces.shape[0] + 1) if ids is None else np.asarray(ids)
    colors = label_colors(row_ids)
    for i, row in enumerate(traces):
        pts = [(xpos(t), ypos(v)) for t, v in enumerate(row) if np.isfinite(v)]
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
    frame_interval_s: float | None = None,
    pixel_size_um: float | None = None,
    warning: str | None = None,
) -> Path:
    """Write an animated GIF of the recording with overlays (imageio, Pillow plugin).

    Args:
        frames: ``(T, H, W)`` recording (one display range for all frames).
        labels: ``(T, H, W)`` label stack, ``(H, W)`` label image, or ``None``.
        path: output ``.gif`` path (parent folders are created).
        fps: playback rate in frames per second (GIF delays are whole 10 ms steps).
        max_frames: at most this many frames, evenly spaced over the recording.
        gt: optional ground truth, same shapes as ``labels``, drawn as yellow outlines.
        frame_interval_s: s per frame (the time of each frame is written on it);
        pixel_size_um: µm per pixel for the scale bar; warning: a red line under the frame
            (e.g. random SAM2 weights).

    Returns:
        The path written; every GIF frame carries its frame index and time (so consecutive
        frames are never merged by the encoder), looping forever.
    """
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    arr = _check_frames(frames)
    t_total, _, w = arr.shape
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"need fps > 0 and max_frames >= 1, got fps={fps}, max={max_frames}")
    idx = np.unique(np.round(np.linspace(0, t_total - 1, min(max_frames, t_total))).astype(int))
    lo, hi = display_range(arr)
    font = _font(12)
    out_frames = []
    for t in idx:
        check_cancelled()
        tile = _tile(
            arr[t],
            _frame_labels(labels, t, t_total, "labels"),
            _frame_labels(gt, t, t_total, "gt"),
            lo,
            hi,
        )
        extra = 18 if warning else 0
        im = Image.new("RGB", (tile.shape[1], tile.shape[0] + extra), WARN_COLOR)
        im.paste(Image.fromarray(tile), (0, 0))
        draw = ImageDraw.Draw(im)
        text = f"{time_text(int(t), frame_interval_s)} / {t_total}"
        bbox = draw.textbbox((3, 1), text, font=font)
        draw.rectangle([0, 0, bbox[2] + 4, bbox[3] + 3], fill=(0, 0, 0))
        draw.text((3, 1), text, fill=(255, 255, 255), font=font)
        length, label = scale_bar(tile.shape[1], pixel_size_um, tile.shape[1] / w)
        _draw_scale_bar(draw, tile.shape[1] - 6, tile.shape[0] - 6, length, label, font)
        if warning:
            draw.text((3, tile.shape[0] + 2), _u(warning), fill=(255, 255, 255), font=font)
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


# 8-bit "inferno"-like ramp (black -> purple -> orange -> pale yellow), by linear interpolation
# between these anchor colours: dark low values, bright high ones, readable in grey print.
_RAMP = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


ACTIVITY_MIN_SIDE = 400
"""Activity maps are upscaled (integer factor) until their long side reaches this (px)."""


def colour_ramp(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) -> ``x.shape + (3,)`` uint8 colours of
    :data:`_RAMP` (dark to bright)."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0), 0.0, 1.0)
    pos = x * (len(_RAMP) - 1)
    i = np.minimum(np.floor(pos).astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    return np.rint(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def activity_image(
    amap: np.ndarray,
    path: str | Path,
    *,
    threshold: float | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    unit: str = "max z-score",
    labels: np.ndarray | None = None,
    pixel_size_um: float | None = None,
) -> Path:
    """Write an activity map (e.g. max z-score over time) as a PNG with a colour bar.

    Args:
        amap: ``(H, W)`` float map (:func:`calseg.segment.diagnose.activity_map`).
        path: output ``.png``.
        threshold: drawn on the colour bar, and pixels above it outlined in white.
        title, subtitle: lines above the map; unit: the colour bar's label.
        labels: optional ``(H, W)`` label image (e.g. the cells' footprints), outlined in
            their colours.
        pixel_size_um: µm per pixel for the scale bar.

    Returns:
        The path written. Colours span 0 to the map's 99.9th percentile (and at least the
        threshold), so the threshold's place on the bar is visible.
    """
    from PIL import Image, ImageDraw

    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"amap must be (H, W), got shape {a.shape}")
    finite = a[np.isfinite(a)]
    vmax = float(np.percentile(finite, 99.9)) if finite.size else 1.0
    if threshold is not None:
        vmax = max(vmax, threshold * 1.25)
    vmax = vmax if vmax > 0 else 1.0
    rgb = colour_ramp(a / vmax)
    h, w = a.shape
    s = _scale_for(h, w)
    if s == 1.0 and max(h, w) < ACTIVITY_MIN_SIDE:  # readable at a glance: at least 400 px
        s = float(math.ceil(ACTIVITY_MIN_SIDE / max(h, w)))
    if s > 1:
        rgb = _resize_nearest(rgb, int(s))
    img = Image.fromarray(rgb)
    if s < 1:
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    zoom = img.width / w
    tile = np.asarray(img).copy()
    if threshold is not None or labels is not None:
        up = int(s) if s > 1 else 1
        if threshold is not None and s >= 1:
            above = _resize_nearest((a > threshold).astype(np.uint8), up)
            tile[_boundaries(above)] = (255, 255, 255)
        if labels is not None and s >= 1:
            lab = _resize_nearest(np.asarray(labels), up)
            edge = _boundaries(lab)
            tile[edge] = label_colors(lab[edge])
    pad, bar_w = 8, 96
    lines = [x for x in (title, subtitle) if x]
    top = 6 + 20 * len(lines)
    sheet = Image.new(
        "RGB", (max(tile.shape[1] + bar_w + 3 * pad, 460), top + tile.shape[0] + 3 * pad + 16),
        (24, 24, 24),
    )  # fmt: skip
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(lines):
        draw.text(
            (pad, 6 + 20 * i), _u(line), fill=(235, 235, 235), font=_font(15 if i == 0 else 12)
        )
    sheet.paste(Image.fromarray(tile), (pad, top + pad))
    length, label = scale_bar(tile.shape[1], pixel_size_um, zoom)
    _draw_scale_bar(draw, pad + tile.shape[1] - 6, top + pad + tile.shape[0] - 6, length, label,
                    _font(11))  # fmt: skip
    # colour bar
    bx, by, bh = pad * 2 + tile.shape[1], top + pad, tile.shape[0]
    ramp = colour_ramp(np.linspace(1, 0, bh))[:, None, :].repeat(14, axis=1)
    sheet.paste(Image.fromarray(ramp), (bx, by))
    font = _font(11)
    ty = by + bh * (1 - threshold / vmax) if threshold is not None else None
    for v in _ticks(0.0, vmax, 4):
        yy = by + bh * (1 - v / vmax)
        if ty is not None and abs(yy - ty) < 12:
            continue  # the threshold's label takes that place
        draw.line([(bx + 14, yy), (bx + 18, yy)], fill=(220, 220, 220))
        draw.text((bx + 20, yy - 6), f"{v:g}", fill=(220, 220, 220), font=font)
    if ty is not None:
        draw.line([(bx - 2, ty), (bx + 16, ty)], fill=(255, 255, 255), width=2)
        draw.text((bx + 20, ty - 6), f"{threshold:g} threshold", fill=(255, 255, 255), font=font)
    draw.text((pad, by + bh + pad), _u(unit), fill=(220, 220, 220), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
