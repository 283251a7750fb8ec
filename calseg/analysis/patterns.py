"""Tissue-level Ca2+ pattern class of a recording: spikes, transients, waves or fluttering.

The four classes are those of the tissue model (Soundararajan et al. 2021, PLoS Comput Biol
17:e1009543; DESIGN.md section 2): *single-cell spikes* (isolated cells fire alone),
*intercellular transients* (a local group of neighbouring cells fires together), *intercellular
waves* (activity spreads from cell to cell across a large part of the tissue) and *fluttering*
(the whole tissue is active, every cell oscillating often).

Method (plain numpy/scipy, no training):

1. **Cell geometry** (:func:`cell_geometry`): centroids and a neighbour graph from the label
   image; two cells are neighbours when their footprints come within ``touch_px`` px (2 by
   default, so segmented cells separated by a 1 px unlabelled membrane still touch).
2. **Event clusters** (:func:`event_clusters`): two events are linked when their cells are
   neighbours and their active intervals ``[onset, offset)`` overlap (after extending each by
   ``max_lag_s``); a cluster is a connected component of linked events. A cluster is one
   spreading episode: a spike is a cluster of one cell, a transient a cluster of a few
   neighbours, a wave a cluster over much of the tissue.
3. **Features** (:func:`pattern_features`): the largest cluster's size in cells and its area
   as a fraction of the field of view, and the event rate of active cells (events per cell
   per 1000 s, cells with at least one event). Area relative to the field of view rather than
   to the tissue, because a CalSeg label stack holds only the cells that were ever active: the
   number of silent cells is unknown.
4. **Significant events** (:func:`significant_events`, applied before steps 2-3): events
   with a peak dF/F of at least 0.2 and at least half the recording's 95th-percentile event
   amplitude. On the rendered
   simulator videos (GCaMP6s), events of cells whose true Ca2+ stays below 0.1 uM (sub-threshold
   rises, light blurred over from a bright neighbour, noise) mostly have a peak dF/F of
   0.03-0.2 (median 0.06, 95th percentile 0.12-0.18; a few next to a bright cell up to ~3),
   true events mostly 1-7 (5th percentile 0.2; measured on seed 1, one video per class):
   without this filter a single-cell spike lights up its neighbours and looks like a transient.
5. **Decision rules** (:func:`classify_pattern`, thresholds in :class:`PatternThresholds`)::

       no significant event                        -> "none"
       largest cluster area >= 0.15 of the field:  rate >= 1.8 / 1000 s -> "fluttering"
                                                   else                 -> "waves"
       else  largest cluster >= 9 cells            -> "transients"
       else                                        -> "spikes"

Justification of the thresholds (tuning seeds 0-3 for all four classes, 0-9 for spikes and
transients; 192 x 192 px pouch of ~285 cells of ~60 px, 240 frames of 5 s, defect severity
0.3, traces from the rendered video over the true cell label image; printed by
``calseg validate-patterns --seeds 0-3 --features``): the largest cluster of waves and
fluttering videos covers 0.45-0.47 of the field (the whole pouch), of transients at most 0.04;
waves fire 0.84-1.61 events per active cell per 1000 s (each cell once per passing wave),
fluttering 2.46-2.50 (every cell oscillates with a period of ~400 s at Vplc 1.4-1.5). The
largest cluster of spikes videos spans 2-11 cells, of transients 4-40 (median 18): the two
classes overlap, as their Vplc ranges do (0.10-0.50 vs 0.25-0.60, DESIGN.md section 2), and 9
cells is the threshold with the fewest errors on the tuning seeds (3 of 20). The thresholds
belong to the model's time scale, cell size and field of view; they are parameters, not
constants of nature: set them for your tissue. Validation on other seeds:
``calseg validate-patterns`` (:mod:`calseg.pipelines.validate_patterns`, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from calseg.analysis.events import Event
from calseg.fmt import fmt_num, plural
from calseg.progress import check_cancelled

__all__ = [
    "PATTERN_CLASSES",
    "CellGeometry",
    "PatternError",
    "PatternResult",
    "PatternThresholds",
    "analyse_patterns",
    "cell_geometry",
    "classify_pattern",
    "event_clusters",
    "events_from_calcium",
    "pattern_features",
]

PATTERN_CLASSES = ("spikes", "transients", "waves", "fluttering")
"""The four classes, in the order of DESIGN.md section 2; ``"none"`` is returned without events."""


class PatternError(ValueError):
    """Bad input to pattern analysis (shapes, interval, thresholds)."""


@dataclass(frozen=True)
class PatternThresholds:
    """Decision thresholds of :func:`classify_pattern` (justified in the module docstring).

    Attributes:
        wide_area_fraction: a cluster covering at least this fraction of the field of view is
            tissue-wide (waves or fluttering).
        flutter_rate_per_1000s: events per active cell per 1000 s from which tissue-wide
            activity is fluttering rather than waves.
        transient_min_cells: a largest cluster of at least this many cells makes transients
            rather than single-cell spikes.
        min_event_amplitude: events with a peak dF/F below this are ignored (noise; see the
            module docstring).
        relative_event_amplitude: events below this fraction of the recording's 95th
            percentile event amplitude are ignored (sub-threshold rises and light from a bright
            neighbour; module docstring).
    """

    wide_area_fraction: float = 0.15
    flutter_rate_per_1000s: float = 1.8
    transient_min_cells: int = 9
    min_event_amplitude: float = 0.2
    relative_event_amplitude: float = 0.5


@dataclass
class CellGeometry:
    """Where the cells are and which touch.

    Attributes:
        ids: ``(N,)`` int64 cell ids (sorted).
        centroids_um: ``(N, 2)`` float64 centroids ``(x, y)`` in um (x = column, y = row,
            image orientation: y grows downwards).
        areas_px: ``(N,)`` int64 footprint areas (px).
        adjacency: ``(N, N)`` CSR bool, symmetric, no diagonal; True for neighbours.
        field_px: frame area ``H * W`` (px).
        pixel_size_um: um per px used for the centroids.
    """

    ids: np.ndarray
    centroids_um: np.ndarray
    areas_px: np.ndarray
    adjacency: sparse.csr_matrix
    field_px: int
    pixel_size_um: float


@dataclass
class PatternResult:
    """Pattern class of one recording with the features and the rule that decided it.

    ``clusters``: the event clusters of 2 or more cells, largest first, at most 50 (each with
    its cells, event count and first onset); ``features["n_clusters"]`` counts all clusters,
    single-cell ones included, so it can exceed ``len(clusters)``.
    """

    pattern_class: str
    reason: str
    features: dict
    thresholds: dict = field(default_factory=dict)
    clusters: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (``patterns.json``)."""
        return asdict(self)


def cell_geometry(
    labels: np.ndarray, pixel_size_um: float = 1.0, touch_px: int = 2
) -> CellGeometry:
    """Centroids, areas and neighbour graph of the cells of a label image or stack.

    Args:
        labels: ``(H, W)`` label image or ``(T, H, W)`` label stack (footprint = max over
            time, as :func:`calseg.analysis.traces.footprint_image`), integer, 0 = background.
        pixel_size_um: um per px (1.0 when unknown: centroids then in px).
        touch_px: cells with pixels at most this many px apart in rows and in columns are
            neighbours (1: touching, incl. corners; 2: also across a 1 px unlabelled line).

    Returns:
        :class:`CellGeometry`.

    Raises:
        PatternError: labels not 2-/3-D integer, bad pixel size or ``touch_px``.
    """
    lab = np.asarray(labels)
    if lab.dtype.kind not in "ui" or lab.ndim not in (2, 3):
        raise PatternError(
            f"labels must be an integer (H, W) or (T, H, W) array, got {lab.dtype} {lab.shape}"
        )
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise PatternError(f"pixel_size_um must be a positive number of um, got {pixel_size_um}")
    if touch_px < 1:
        raise PatternError(f"touch_px must be >= 1, got {touch_px}")
    img = lab.max(axis=0) if lab.ndim == 3 else lab
    img = img.astype(np.int64)
    ids = np.unique(img[img > 0])
    n = len(ids)
    if n == 0:
        return CellGeometry(
            ids,
            np.zeros((0, 2)),
            np.zeros(0, np.int64),
            sparse.csr_matrix((0, 0), dtype=bool),
            img.size,
            float(pixel_size_um),
        )
    comp = np.where(img > 0, np.searchsorted(ids, img), -1)  # index 0..N-1 of each pixel's cell
    rows, cols = np.nonzero(img > 0)
    k = comp[rows, cols]
    areas = np.bincount(k, minlength=n)
    cy = np.bincount(k, weights=rows, minlength=n) / areas
    cx = np.bincount(k, weights=cols, minlength=n) / areas
    # every pixel pair closer than touch_px (Chebyshev) in both rows and columns: compare the
    # image with shifted copies of itself (half of the offsets; pairs are symmetrised below)
    h, w = comp.shape
    pairs = []
    for dy in range(0, touch_px + 1):
        for dx in range(-touch_px, touch_px + 1):
            if dy == 0 and dx <= 0:
                continue
            r1, c0, c1 = h - dy, max(0, -dx), w - max(0, dx)
            a = comp[0:r1, c0:c1]
            b = comp[dy : r1 + dy, c0 + dx : c1 + dx]
            ok = (a >= 0) & (b >= 0) & (a != b)
            pairs.append(np.unique(np.stack([a[ok], b[ok]], axis=1), axis=0))
    pp = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    adj = sparse.coo_matrix((np.ones(len(pp), bool), (pp[:, 0], pp[:, 1])), shape=(n, n)).tocsr()
    adj = (adj + adj.T).astype(bool)
    adj.setdiag(False)
    adj.eliminate_zeros()
    cent = np.stack([cx, cy], axis=1) * float(pixel_size_um)
    return CellGeometry(
        ids.astype(np.int64),
        cent,
        areas.astype(np.int64),
        adj.tocsr(),
        int(img.size),
        float(pixel_size_um),
    )


def event_clusters(
    events: list[Event],
    geometry: CellGeometry,
    n_frames: int,
    frame_interval_s: float,
    max_lag_s: float = 0.0,
) -> np.ndarray:
    """Group events into spreading episodes (connected components of linked events).

    Two events are linked when their cells are neighbours (``geometry.adjacency``) and their
    intervals ``[onset_frame, offset_frame + lag)`` overlap, ``lag = round(max_lag_s /
    frame_interval_s)``. Events of cells missing from ``geometry`` form clusters of their own.

    Args:
        events: from :func:`calseg.analysis.events.detect_events` (``cell_id`` = label ids).
        geometry: :func:`cell_geometry` of the same labels.
        n_frames: frames T of the recording.
        frame_interval_s: s per frame.
        max_lag_s: extra time (s) an event stays "open" for linking (0 = strict overlap).

    Returns:
        ``(len(events),)`` int64 cluster index per event (0..K-1).
    """
    e = len(events)
    if e == 0:
        return np.zeros(0, np.int64)
    lag = max(0, int(round(max_lag_s / frame_interval_s)))
    n = len(geometry.ids)
    pos = np.searchsorted(geometry.ids, [ev.cell_id for ev in events])
    known = (
        (pos < n) & (geometry.ids[np.minimum(pos, max(n - 1, 0))] == [ev.cell_id for ev in events])
        if n
        else np.zeros(e, bool)
    )
    # (cell, frame) -> event index (events of one cell do not overlap; with a lag the later
    # event wins the shared frames, which still links it to the earlier one via neighbours)
    grid = np.full((max(n, 1), n_frames + lag), -1, np.int64)
    for k, ev in enumerate(events):
        if known[k]:
            grid[pos[k], ev.onset_frame : ev.offset_frame + lag] = k
    src, dst = [], []
    if n:
        a, b = sparse.triu(geometry.adjacency, k=1).nonzero()
        step = max(1, 2**21 // grid.shape[1])  # (edges, frames) blocks of ~16 MiB each
        for s0 in range(0, len(a), step):
            check_cancelled()
            x = grid[a[s0 : s0 + step]]
            y = grid[b[s0 : s0 + step]]
            m = (x >= 0) & (y >= 0)
            src.append(x[m])
            dst.append(y[m])
    s = np.concatenate(src) if src else np.zeros(0, np.int64)
    d = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    g = sparse.coo_matrix((np.ones(len(s)), (s, d)), shape=(e, e))
    _, lab = connected_components(g, directed=False)
    return lab.astype(np.int64)


def pattern_features(
    events: list[Event],
    geometry: CellGeometry,
    n_frames: int,
    frame_interval_s: float,
    clusters: np.ndarray | None = None,
) -> dict:
    """Spatial-spread and frequency features of a recording's events (module docstring).

    Returns:
        dict with ``n_cells`` (cells in the labels), ``n_active_cells`` (cells with >= 1 event),
        ``n_events``, ``n_clusters``, ``duration_s`` (T * interval), ``event_rate_per_1000s``
        (events per active cell per 1000 s), ``duty_cycle`` (mean fraction of the recording
        active cells spend in events), ``largest_cluster_cells``, ``largest_cluster_area_fraction``
        (its cells' area / field of view), ``mean_cluster_cells``, ``single_cell_cluster_fraction``
        (clusters of one cell / all clusters).
    """
    if not (np.isfinite(frame_interval_s) and frame_interval_s > 0):
        raise PatternError(
            f"frame_interval_s must be a positive number of s, got {frame_interval_s}"
        )
    if n_frames < 1:
        raise PatternError(f"n_frames must be >= 1, got {n_frames}")
    dur = n_frames * float(frame_interval_s)
    feats = {
        "n_cells": int(len(geometry.ids)),
        "n_active_cells": 0,
        "n_events": len(events),
        "n_clusters": 0,
        "duration_s": dur,
        "event_rate_per_1000s": 0.0,
        "duty_cycle": 0.0,
        "largest_cluster_cells": 0,
        "largest_cluster_area_fraction": 0.0,
        "mean_cluster_cells": 0.0,
        "single_cell_cluster_fraction": 0.0,
    }
    if not events:
        return feats
    if clusters is None:
        clusters = event_clusters(events, geometry, n_frames, frame_interval_s)
    cells = np.array([ev.cell_id for ev in events])
    active = np.unique(cells)
    frames_in = sum(ev.offset_frame - ev.onset_frame for ev in events)
    area_of = dict(zip(geometry.ids.tolist(), geometry.areas_px.tolist(), strict=True))
    sizes, areas = [], []
    for k in np.unique(clusters):
        cc = np.unique(cells[clusters == k])
        sizes.append(len(cc))
        areas.append(sum(area_of.get(int(c), 0) for c in cc))
    sizes_a = np.array(sizes)
    feats.update(
        n_active_cells=int(len(active)),
        n_clusters=int(len(sizes)),
        event_rate_per_1000s=float(len(events) / len(active) / dur * 1000.0),
        duty_cycle=float(frames_in / (len(active) * n_frames)),
        largest_cluster_cells=int(sizes_a.max()),
        largest_cluster_area_fraction=float(max(areas) / geometry.field_px)
        if geometry.field_px
        else 0.0,
        mean_cluster_cells=float(sizes_a.mean()),
        single_cell_cluster_fraction=float(np.mean(sizes_a == 1)),
    )
    return feats


def classify_pattern(
    features: dict, thresholds: PatternThresholds | None = None
) -> tuple[str, str]:
    """Apply the decision rules of the module docstring to :func:`pattern_features` output.

    Returns:
        ``(pattern_class, reason)``: one of :data:`PATTERN_CLASSES` or ``"none"``, and the rule
        that fired, with the numbers compared.
    """
    th = thresholds or PatternThresholds()
    if features["n_events"] == 0:
        return "none", "no significant calcium event in any cell"
    area = features["largest_cluster_area_fraction"]
    rate = features["event_rate_per_1000s"]
    cells = features["largest_cluster_cells"]
    # "cluster" in words: events of touching cells that overlap in time (event_clusters)
    group = "the largest group of neighbouring cells active together"
    pct = f"{fmt_num(100 * area, 2)} %"
    wide = f"{100 * th.wide_area_fraction:g} %"
    if area >= th.wide_area_fraction:
        if rate >= th.flutter_rate_per_1000s:
            return "fluttering", (
                f"tissue-wide activity, often repeated: {group} covers {pct} of the field "
                f"(>= {wide}), and cells fire {rate:.2f} events per 1000 s (>= "
                f"{th.flutter_rate_per_1000s:g})"
            )
        return "waves", (
            f"activity spreads across the tissue: {group} covers {pct} of the field "
            f"(>= {wide}), and cells fire {rate:.2f} events per 1000 s (< "
            f"{th.flutter_rate_per_1000s:g}: not fluttering)"
        )
    if cells >= th.transient_min_cells:
        return "transients", (
            f"local groups: {group} has {cells} cells (transients need >= "
            f"{th.transient_min_cells}) and covers {pct} of the field (< {wide}: not "
            "tissue-wide)"
        )
    return "spikes", (
        f"isolated cells: {group} has {plural(cells, 'cell')}, fewer than the "
        f"{th.transient_min_cells} that make transients"
    )


def significant_amplitude(
    events: list[Event], thresholds: PatternThresholds | None = None
) -> float | None:
    """The peak dF/F from which an event counts for the pattern (:func:`significant_events`):
    the larger of ``min_event_amplitude`` and ``relative_event_amplitude`` x the 95th
    percentile of the amplitudes of the events above ``min_event_amplitude`` (NaN ignored).
    ``None`` when no event reaches ``min_event_amplitude``."""
    th = thresholds or PatternThresholds()
    amp = np.array([ev.amplitude for ev in events], dtype=np.float64)
    ok = np.isfinite(amp) & (amp >= th.min_event_amplitude)
    if not ok.any():
        return None
    return float(
        max(th.min_event_amplitude, th.relative_event_amplitude * np.percentile(amp[ok], 95))
    )


def significant_events(
    events: list[Event], thresholds: PatternThresholds | None = None
) -> list[Event]:
    """The events that count for the pattern: peak dF/F at or above
    :func:`significant_amplitude`."""
    floor = significant_amplitude(events, thresholds)
    if floor is None:
        return []
    return [ev for ev in events if np.isfinite(ev.amplitude) and ev.amplitude >= floor]


def analyse_patterns(
    events: list[Event],
    labels: np.ndarray,
    n_frames: int,
    frame_interval_s: float,
    pixel_size_um: float | None = None,
    thresholds: PatternThresholds | None = None,
    max_lag_s: float = 0.0,
) -> PatternResult:
    """Pattern class of a recording from its events and label image (the whole pipeline).

    Args:
        events: per-cell events (``cell_id`` = ids in ``labels``); those with an amplitude
            too small for :func:`significant_events` are dropped first.
        labels: ``(H, W)`` label image or ``(T, H, W)`` label stack.
        n_frames: frames T; frame_interval_s: s per frame; pixel_size_um: um per px (None = 1,
            centroids in px).
        thresholds: decision thresholds (default :class:`PatternThresholds`).
        max_lag_s: see :func:`event_clusters`.

    Returns:
        :class:`PatternResult` with ``clusters``: one dict per cluster of at least 2 cells
        (``cluster``, ``n_cells``, ``n_events``, ``onset_s``, ``cell_ids``; the 50 largest).
    """
    th = thresholds or PatternThresholds()
    events = significant_events(events, th)
    geo = cell_geometry(labels, pixel_size_um or 1.0)
    cl = event_clusters(events, geo, n_frames, frame_interval_s, max_lag_s)
    feats = pattern_features(events, geo, n_frames, frame_interval_s, cl)
    cls, reason = classify_pattern(feats, th)
    out = []
    if events:
        cells = np.array([ev.cell_id for ev in events])
        onsets = np.array([ev.onset_s for ev in events])
        for k in np.unique(cl):
            m = cl == k
            cc = np.unique(cells[m])
            if len(cc) >= 2:
                out.append(
                    {
                        "cluster": int(k),
                        "n_cells": int(len(cc)),
                        "n_events": int(m.sum()),
                        "onset_s": float(onsets[m].min()),
                        "cell_ids": cc.tolist(),
                    }
                )
        out.sort(key=lambda d: -d["n_cells"])
    return PatternResult(cls, reason, feats, asdict(th), out[:50])


def events_from_calcium(
    calcium: np.ndarray, threshold_uM: float, frame_interval_s: float, cell_ids: np.ndarray
) -> list[Event]:
    """Ground-truth events of simulated cells: runs of frames with Ca2+ above ``threshold_uM``.

    Args:
        calcium: ``(N, T)`` cytosolic Ca2+ (uM) at the frame times; cell_ids: ``(N,)``.
        threshold_uM: activity threshold (DESIGN.md section 4: 0.1 uM); frame_interval_s: s.

    Returns:
        Events with ``amplitude`` = the run's peak Ca2+ (uM, not dF/F) and ``auc`` in uM s.
    """
    c = np.asarray(calcium, dtype=np.float64)
    dt = float(frame_interval_s)
    out = []
    for i in range(c.shape[0]):
        check_cancelled()
        edges = np.diff(np.concatenate(([0], (c[i] > threshold_uM).astype(np.int8), [0])))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            p = a + int(np.argmax(c[i, a:b]))
            out.append(
                Event(
                    int(cell_ids[i]),
                    int(a),
                    int(p),
                    int(b),
                    a * dt,
                    p * dt,
                    (b - a) * dt,
                    float(c[i, p]),
                    float(c[i, a:b].sum() * dt),
                    float(threshold_uM),
                    0.0,
                    bool(a == 0 or b == c.shape[1]),
                )
            )
    return out
