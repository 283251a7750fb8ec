"""Classical baseline: dF/F thresholding + watershed seeded on the temporal projection.

No weights needed. Uses the same activity analysis as the SAM2 prompts
(:func:`calseg.segment.prompts.compute_activity`): per-pixel F0 percentile, dF/F, a robust
threshold, seeds = local maxima of the peak (max-over-time) dF/F map, seed territories =
watershed of the negated peak map. A pixel of frame t gets the id of its territory when its
dF/F exceeds the threshold; per frame and id, connected fragments smaller than
``min_region_px`` are removed and holes are filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from calseg.segment.prompts import Activity, ActivityParams, compute_activity


def baseline_labels(activity: Activity, min_region_px: int = 15) -> np.ndarray:
    """Label stack from an :class:`Activity`.

    Returns:
        ``(T, H, W)`` uint32 label stack, ids = seed ids (stable across frames), 0 = background.
    """
    t_n = activity.dff.shape[0]
    out = np.zeros(activity.dff.shape, dtype=np.uint32)
    terr = activity.territories
    for t in range(t_n):
        lab = np.where(activity.active[t], terr, 0).astype(np.uint32)
        if not lab.any():
            continue
        for sl_id, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            m = lab[sl] == sl_id
            m = ndi.binary_fill_holes(m)
            if min_region_px > 1:
                cc, n = ndi.label(m)
                if n > 1 or m.sum() < min_region_px:
                    sizes = np.bincount(cc.ravel(), minlength=n + 1)
                    keep = sizes >= min_region_px
                    keep[0] = False
                    m = keep[cc]
            view = out[t][sl]
            view[m & (view == 0)] = sl_id
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
