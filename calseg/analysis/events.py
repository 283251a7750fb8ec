"""Per-cell calcium events from dF/F traces: onset, peak, duration, amplitude, area.

Detection (per cell, plain numpy):

1. Noise: ``sigma = 1.4826 * MAD(diff(dF/F)) / sqrt(2)``, the median absolute deviation of the
   frame-to-frame differences scaled to a Gaussian standard deviation (Donoho & Johnstone 1994
   use the MAD for robust noise; taking it on the differences makes it blind to slow transients
   and waves, which in epithelia can cover a large part of a recording and would inflate the MAD
   of the trace itself).
2. Rest level: ``rest = P10(dF/F) + 1.2816 * sigma``, the mean of the noise estimated from the
   low tail of the trace, which events (always positive) do not reach while a cell is active in
   less than ~80 % of the frames. It is not 0: F0 is a low running percentile (the 10th by
   default), so resting dF/F sits about 1.28 sigma above 0; thresholds from 0 would turn noise
   into events (measured: 2.3 % of pure-noise frames vs < 0.1 % with this rest level).
3. Threshold ``high = rest + max(k * sigma, min_amplitude)``; hysteresis: an event is a run of
   frames with dF/F > ``rest + (high - rest) / 2`` that contains at least one frame with
   dF/F > ``high``, lasting at least ``min_duration_s``.
4. Per event: onset = first frame of the run, offset = last frame + 1, ``duration_s =
   (offset - onset) * frame_interval_s``, peak = frame of the maximum, ``amplitude`` = the
   maximum dF/F, ``auc`` = sum of dF/F over the run times ``frame_interval_s`` (dF/F * s,
   rectangle rule). Events touching the first or last frame are marked ``truncated``.

Limitation: a slow decay that lingers near ``high / 2`` in noise can end an event a few frames
early or leave a short tail fragment as a separate small event (no merging of nearby runs).

Times are ``frame_index * frame_interval_s`` (s, frame 0 at 0 s), i.e. exact to one frame.
Flagged (all-NaN) traces yield no events.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from calseg.analysis.metrics import MAD_TO_SIGMA
from calseg.progress import check_cancelled

__all__ = ["Event", "EventError", "detect_events", "events_as_rows", "trace_noise"]

Z_P10 = (
    1.2816  # -Phi^-1(0.10): the 10th percentile of Gaussian noise lies 1.2816 sigma below its mean
)


class EventError(ValueError):
    """Bad input to event detection."""


@dataclass(frozen=True)
class Event:
    """One calcium event of one cell (times in s, dF/F dimensionless)."""

    cell_id: int
    onset_frame: int
    peak_frame: int
    offset_frame: int  # exclusive: first frame after the event
    onset_s: float
    peak_s: float
    duration_s: float
    amplitude: float  # peak dF/F
    auc: float  # dF/F * s
    threshold: float  # dF/F level that started the event (rest + k * noise)
    rest: float  # resting dF/F level of the trace (noise mean)
    truncated: bool  # touches the first or last frame of the recording


def trace_noise(dff: np.ndarray) -> np.ndarray:
    """Robust noise of each trace, ``1.4826 * MAD(diff(x)) / sqrt(2)``.

    Args:
        dff: ``(N, T)`` dF/F traces.

    Returns:
        ``(N,)`` float64 noise standard deviation (dF/F units); NaN for all-NaN traces or T < 2.
    """
    x = np.asarray(dff, dtype=np.float64)
    if x.shape[1] < 2:
        return np.full(x.shape[0], np.nan)
    d = np.diff(x, axis=1)
    with warnings.catch_warnings():  # all-NaN rows: "All-NaN slice" is expected, result NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(d, axis=1, keepdims=True)
        mad = np.nanmedian(np.abs(d - med), axis=1)
    return MAD_TO_SIGMA * mad / np.sqrt(2.0)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and stop (exclusive) indices of the True runs of a 1-D bool array."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def detect_events(
    dff: np.ndarray,
    frame_interval_s: float,
    k: float = 3.0,
    min_duration_s: float | None = None,
    min_amplitude: float = 0.0,
    cell_ids: np.ndarray | None = None,
) -> list[Event]:
    """Detect calcium events in each dF/F trace (method in the module docstring).

    Args:
        dff: ``(N, T)`` dF/F traces (e.g. :func:`calseg.analysis.traces.dff`); NaN rows skipped.
        frame_interval_s: time between frames (s).
        k: threshold in units of each trace's robust noise (default 3).
        min_duration_s: shortest event kept (s); default ``None`` = 2 frames, so a single noisy
            frame is never an event.
        min_amplitude: lowest threshold allowed (dF/F); guards noise-free traces (sigma = 0).
        cell_ids: ``(N,)`` ids reported in the events; default ``0..N-1``.

    Returns:
        Events sorted by cell then onset.

    Raises:
        EventError: bad shape, interval, ``k`` or ``cell_ids``.
    """
    x = np.asarray(dff, dtype=np.float64)
    if x.ndim != 2:
        raise EventError(f"dF/F must be (N cells, T frames), got shape {x.shape}")
    if not (np.isfinite(frame_interval_s) and frame_interval_s > 0):
        raise EventError(f"frame_interval_s must be a positive number of s, got {frame_interval_s}")
    if not (np.isfinite(k) and k > 0):
        raise EventError(f"k must be > 0, got {k}")
    n, t = x.shape
    ids = np.arange(n) if cell_ids is None else np.asarray(cell_ids)
    if ids.shape != (n,):
        raise EventError(f"cell_ids must have shape ({n},), got {ids.shape}")
    dt = float(frame_interval_s)
    min_frames = 2 if min_duration_s is None else max(1, int(np.ceil(min_duration_s / dt - 1e-9)))
    sigma = trace_noise(x) if t >= 2 else np.full(n, np.nan)
    events: list[Event] = []
    for i in range(n):  # per cell: runs are 1-D; the work per cell is vectorised
        check_cancelled()
        row = x[i]
        if not np.isfinite(row).any():
            continue
        s = sigma[i] if np.isfinite(sigma[i]) else 0.0
        step = max(k * s, float(min_amplitude))
        if step <= 0:
            continue  # a noise-free trace with no amplitude floor: no threshold to speak of
        rest = float(np.nanpercentile(row, 10.0)) + Z_P10 * s
        high = rest + step
        low = rest + step / 2.0
        above_low = np.nan_to_num(row, nan=-np.inf) > low
        starts, stops = _runs(above_low)
        for a, b in zip(starts, stops, strict=True):
            seg = row[a:b]
            if b - a < min_frames or not np.nanmax(seg) > high:
                continue
            p = a + int(np.nanargmax(seg))
            events.append(
                Event(
                    cell_id=int(ids[i]),
                    onset_frame=int(a),
                    peak_frame=int(p),
                    offset_frame=int(b),
                    onset_s=float(a * dt),
                    peak_s=float(p * dt),
                    duration_s=float((b - a) * dt),
                    amplitude=float(row[p]),
                    auc=float(np.nansum(seg) * dt),  # area above F0 (dF/F = 0)
                    threshold=float(high),
                    rest=rest,
                    truncated=bool(a == 0 or b == t),
                )
            )
    return events


def events_as_rows(events: list[Event]) -> list[dict]:
    """Events as plain dicts (one per event, keys = :class:`Event` fields), e.g. for CSV."""
    return [asdict(e) for e in events]
