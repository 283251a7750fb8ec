"""ImageJ ROI sets (``RoiSet.zip`` / ``.roi``) to and from label images, via :mod:`roifile`.

Coordinates follow ImageJ: pixel ``(row r, column c)`` covers the square ``[c, c+1] x [r, r+1]``
and a polygon ROI contains the pixels whose CENTRES ``(c + 0.5, r + 0.5)`` lie inside it (ImageJ's
``PolygonFiller``). :func:`write_imagej_rois` traces each label along pixel edges, so a polygon
has integer corner vertices and reading it back gives the same pixels exactly (for labels
without holes that form one 4-connected piece; otherwise the largest piece's outer outline is
written and the loss is logged).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

__all__ = ["RoiError", "read_imagej_rois", "write_imagej_rois"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^label-(\d+)$")


class RoiError(ValueError):
    """An ROI file cannot be read or written; the message says why and what to do."""


def _fill_polygon(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside the polygon ``xy`` (n, 2) of (x, y) ImageJ coordinates."""
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    if len(xy) < 3:
        return mask
    rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=shape)
    mask[rr, cc] = True
    return mask


def _roi_mask(roi, shape: tuple[int, int]) -> np.ndarray | None:  # noqa: ANN001
    """Mask of an area ROI, or None for line/point ROIs (which enclose no area)."""
    import roifile

    t = roifile.ROI_TYPE
    h, w = shape
    if roi.roitype == t.RECT and roi.multi_coordinates is None:
        mask = np.zeros(shape, dtype=bool)
        mask[max(roi.top, 0) : min(roi.bottom, h), max(roi.left, 0) : min(roi.right, w)] = True
        return mask
    if roi.roitype == t.OVAL:
        cx, cy = (roi.left + roi.right) / 2.0, (roi.top + roi.bottom) / 2.0
        rx, ry = (roi.right - roi.left) / 2.0, (roi.bottom - roi.top) / 2.0
        if rx <= 0 or ry <= 0:
            return np.zeros(shape, dtype=bool)
        yy, xx = np.mgrid[0:h, 0:w]
        return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    if roi.roitype in (t.POLYGON, t.FREEHAND, t.TRACED) or (
        roi.roitype == t.RECT and roi.multi_coordinates is not None
    ):
        parts = roi.coordinates(multi=True)
        if isinstance(parts, np.ndarray):
            parts = [parts]
        mask = np.zeros(shape, dtype=bool)
        for xy in parts:  # composite shapes: even-odd rule (inner paths are holes)
            mask ^= _fill_polygon(np.asarray(xy, dtype=np.float64), shape)
        return mask
    return None


def read_imagej_rois(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise an ImageJ ROI set into a label image.

    Args:
        path: ``RoiSet.zip`` (ImageJ ROI Manager) or a single ``.roi`` file.
        shape: ``(H, W)`` of the image the ROIs were drawn on, in px.

    Returns:
        ``(H, W)`` uint32 label image: the i-th ROI of the file (1-based, ROI Manager order)
        gets id i, unless every ROI is named ``label-<id>`` (as :func:`write_imagej_rois`
        writes), then those ids. Polygon, freehand, traced, rectangle, oval and composite ROIs
        are filled; line and point ROIs are skipped (logged). Where ROIs overlap, the later one
        wins (logged). Parts outside the image are clipped.

    Raises:
        RoiError: file missing, empty, not an ROI file/zip, no area ROI, or no ROI inside the
            image.
    """
    import roifile

    p = Path(path)
    if len(shape) != 2 or min(shape) < 1:
        raise RoiError(f"shape must be (H, W) with positive sizes, got {shape}")
    h, w = int(shape[0]), int(shape[1])
    if not p.is_file():
        raise RoiError(f"{p}: no such ROI file.")
    if p.stat().st_size == 0:
        raise RoiError(f"{p.name} is empty (0 bytes); export the ROIs again from the ROI Manager.")
    try:
        rois = roifile.ImagejRoi.fromfile(p)
    except Exception as exc:
        raise RoiError(
            f"{p.name} is not an ImageJ ROI file or RoiSet zip ({type(exc).__name__}: {exc}); "
            "in Fiji use ROI Manager > More > Save... to write one."
        ) from exc
    if not isinstance(rois, list):
        rois = [rois]
    if not rois:
        raise RoiError(f"{p.name} holds no ROI; export the ROIs again from the ROI Manager.")
    named = [_NAME_RE.match(r.name or "") for r in rois]
    if all(named) and len({int(m.group(1)) for m in named}) == len(rois):
        ids = [int(m.group(1)) for m in named]
    else:
        ids = list(range(1, len(rois) + 1))
    labels = np.zeros((h, w), dtype=np.uint32)
    n_area = n_overlap = n_outside = 0
    for roi, rid in zip(rois, ids, strict=True):
        try:
            mask = _roi_mask(roi, (h, w))
        except Exception as exc:
            raise RoiError(f"{p.name}: ROI {roi.name!r} cannot be decoded ({exc}).") from exc
        if mask is None:
            log.warning(
                "%s: ROI %r (type %s) encloses no area; skipped", p.name, roi.name, roi.roitype
            )
            continue
        n_area += 1
        if not mask.any():
            n_outside += 1
            continue
        n_overlap += int(np.count_nonzero(labels[mask]))
        labels[mask] = rid
    if n_area == 0:
        raise RoiError(
            f"{p.name} holds {len(rois)} ROI(s) but none encloses an area (only lines/points); "
            "draw polygon, freehand or oval ROIs around the cells."
        )
    if n_outside == n_area:
        raise RoiError(
            f"none of the {n_area} ROIs in {p.name} covers a pixel of a {h} x {w} image; they were "
            "probably drawn on a different (larger or cropped) image."
        )
    if n_overlap:
        log.warning("%s: ROIs overlap on %d px; later ROIs win", p.name, n_overlap)
    if n_outside:
        log.warning("%s: %d ROI(s) lie entirely outside the %dx%d image", p.name, n_outside, h, w)
    return labels


def _trace_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a binary mask along pixel edges, as (n, 2) integer (x, y) corners.

    Each foreground pixel side facing background is a directed edge with the foreground on the
    same side; edges chain into loops, turning towards the foreground at corners shared by
    diagonal-only neighbours (so 4-connected pieces get separate loops). Outer outlines have
    negative shoelace area in (x, y) with y down; holes positive. Collinear vertices are removed.
    """
    m = np.pad(mask.astype(bool), 1)
    core = m[1:-1, 1:-1]
    rr, cc = np.nonzero(core)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(sel: np.ndarray, x0, y0, x1, y1) -> None:  # noqa: ANN001
        for a, b, c, d in zip(x0[sel], y0[sel], x1[sel], y1[sel], strict=True):
            edges.setdefault((int(a), int(b)), []).append((int(c), int(d)))

    up = ~m[rr, cc + 1]  # m is padded: pixel (r, c) sits at m[r + 1, c + 1]
    down = ~m[rr + 2, cc + 1]
    left = ~m[rr + 1, cc]
    right = ~m[rr + 1, cc + 2]
    add(up, cc + 1, rr, cc, rr)
    add(down, cc, rr + 1, cc + 1, rr + 1)
    add(left, cc, rr, cc, rr + 1)
    add(right, cc + 1, rr + 1, cc + 1, rr)

    loops: list[np.ndarray] = []
    while edges:
        start = next(iter(edges))
        pts = [start]
        cur = start
        d_in: tuple[int, int] | None = None
        while True:
            outs = edges[cur]
            if len(outs) == 1 or d_in is None:
                nxt = outs[0]
            else:
                want = (d_in[1], -d_in[0])  # turn towards the foreground side
                nxt = next(
                    (o for o in outs if (o[0] - cur[0], o[1] - cur[1]) == want),
                    outs[0],
                )
            outs.remove(nxt)
            if not outs:
                del edges[cur]
            d_in = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
            pts.append(cur)
        loop = np.asarray(pts, dtype=np.int64)
        # drop collinear vertices
        prev = np.roll(loop, 1, axis=0)
        nxt_pts = np.roll(loop, -1, axis=0)
        d1 = loop - prev
        d2 = nxt_pts - loop
        keep = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) != 0
        loops.append(loop[keep])
    return loops


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0].astype(float), xy[:, 1].astype(float)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


INT16_MAX = 32767
"""Largest coordinate the ImageJ ROI format's 16-bit fields hold; ROIs reaching past it are
written with sub-pixel (float32, absolute) coordinates (:func:`write_imagej_rois`)."""


def write_imagej_rois(labels2d: np.ndarray, path: str | Path) -> Path:
    """Write one polygon ROI per label id as an ImageJ ROI set (zip).

    Args:
        labels2d: ``(H, W)`` integer label image, 0 = background.
        path: output ``.zip`` (a ``.zip`` suffix is added when missing); parent folders are
            created, an existing file is replaced.

    Returns:
        The path written. ROIs are named ``label-<id>`` in increasing id order; each is the
        pixel-edge outline of the label's largest 4-connected piece (holes and other pieces are
        not representable in one polygon and are logged), so ImageJ (and
        :func:`read_imagej_rois`) fill exactly the label's pixels for simple shapes.

    Raises:
        RoiError: not a 2-D integer image, or no label to write.
    """
    import roifile
    from scipy import ndimage

    lab = np.asarray(labels2d)
    if lab.ndim != 2 or lab.dtype.kind not in "uib":
        raise RoiError(f"labels2d must be a 2-D integer label image, got {lab.dtype} {lab.shape}")
    if lab.size and lab.min() < 0:
        raise RoiError("labels2d holds negative ids; ids must be >= 0 (0 = background).")
    ids = np.unique(lab[lab != 0])
    if ids.size == 0:
        raise RoiError("labels2d holds no label (all 0): there is no ROI to write.")
    out = Path(path)
    if out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    objects = ndimage.find_objects(lab.astype(np.int64, copy=False))
    rois = []
    approximated: list[int] = []  # labels with several pieces or holes (one line, not one each)
    for rid in ids:
        sl = objects[int(rid) - 1]
        sub = lab[sl] == rid
        loops = _trace_outlines(sub)
        outer = [lp for lp in loops if _signed_area(lp) < 0]
        best = min(outer, key=_signed_area)
        if len(outer) > 1 or len(loops) > len(outer):
            approximated.append(int(rid))
        xy = best + np.array([sl[1].start, sl[0].start])
        if xy.max() > INT16_MAX:
            # the ROI format's bounds and integer coordinates are 16-bit: beyond 32767 px they
            # wrapped (x = 66000 read back as 464, a 12th attack run); sub-pixel coordinates
            # are absolute float32, exact for whole pixels up to 2^24
            roi = roifile.ImagejRoi.frompoints(xy.astype(np.float32), name=f"label-{int(rid)}")
            roi.options = roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
        else:
            roi = roifile.ImagejRoi.frompoints(xy.astype(np.int32), name=f"label-{int(rid)}")
            roi.options = roifile.ROI_OPTIONS(0)
        roi.roitype = roifile.ROI_TYPE.POLYGON
        rois.append(roi)
    if approximated:
        shown = ", ".join(map(str, approximated[:10])) + (", ..." if len(approximated) > 10 else "")
        log.info(
            "%s: %d of %d labels have several pieces or holes (labels %s); each ROI is the "
            "outline of the label's largest piece",
            out.name,
            len(approximated),
            len(ids),
            shown,
        )
    if out.exists():
        out.unlink()
    roifile.roiwrite(out, rois, mode="w")
    return out
