"""Classical baseline: per-cell ROIs from the recording's structure + per-frame activity.

No weights needed. Uses the same activity analysis as the SAM2 prompts
(:func:`calseg.segment.prompts.compute_activity`): per-pixel F0 percentile, noise-normalised
dF (z), a robust threshold, then static cell ROIs separated by the cells' texture where they
are active with a cell-size prior (:func:`calseg.segment.cells.cell_territories`). A cell ROI
is painted in frame t, whole, when more than ``active_fraction`` of its pixels are
supra-threshold there (a cell is active or not as a whole; DESIGN.md section 4).
"""

from __future__ import annotations

import numpy as np

from calseg.progress import check_cancelled
from calseg.segment.cells import territory_activity
from calseg.segment.prompts import Activity, ActivityParams, compute_activity


def baseline_labels(activity: Activity, min_region_px: int = 15) -> np.ndarray:
    """Label stack from an :class:`Activity`.

    Args:
        activity: output of :func:`compute_activity` (its cell ROIs and per-frame activity).
        min_region_px: cell ROIs smaller than this (px) are never painted.

    Returns:
        ``(T, H, W)`` uint32 label stack, ids = cell ROI ids (stable across frames),
        0 = background.
    """
    terr = activity.territories
    on = activity.cell_active
    if on is None:
        on = territory_activity(terr, activity.active)
    on = on.copy()
    if min_region_px > 1 and terr.any():
        sizes = np.bincount(terr.ravel(), minlength=on.shape[1])
        on[:, sizes[: on.shape[1]] < min_region_px] = False
    on[:, 0] = False
    out = np.empty(activity.active.shape, dtype=np.uint32)
    for t in range(out.shape[0]):
        check_cancelled()
        out[t] = np.where(on[t][terr], terr, 0)
    return out


def segment_baseline(
    frames: np.ndarray, params: ActivityParams | None = None, min_region_px: int = 15
) -> tuple[np.ndarray, Activity]:
    """Segment a ``(T, H, W)`` recording classically.

    Returns:
        ``(labels (T, H, W) uint32, activity)``.
    """
    activity = compute_activity(frames, params)
    return baseline_labels(activity, min_region_px), activity
