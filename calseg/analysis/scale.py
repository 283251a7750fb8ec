"""Units of float recordings: the exact power-of-two scaling that lets code written for camera
counts (floors such as 1e-6, float32 squares) treat float data of any magnitude the same
(:func:`unit_exponent`; used by :mod:`calseg.segment.prompts`,
:mod:`calseg.segment.projection` and :mod:`calseg.preprocess`)."""

from __future__ import annotations

import numpy as np

UNIT_MAGNITUDE_RANGE = (2.0**-7, 2.0**30)
"""Typical magnitudes (input units) that segmentation uses as they are (:func:`unit_exponent`):
camera counts, and float data down to about 0.01 and up to about 1e9."""


def unit_exponent(values: np.ndarray) -> int:
    """The power of two ``k`` that brings the typical magnitude of ``values`` (median
    ``|value|`` of the finite ones, else the largest) into :data:`UNIT_MAGNITUDE_RANGE` (to
    about 2**10), or 0 where it already lies there (camera counts; all zero). Apply it with
    ``np.ldexp(values, k)``: exact, the dtype kept, whatever ``2**k`` is (``2**130`` is no
    float32; multiplying by it overflowed, an 11th attack run).

    dF/F and z scores do not depend on the units, but a few guards do (floors such as 1e-6 in
    the recording's units, float32 squares of 1e-30 or 1e20): the same float recording times
    1e-8 gave 2 cells instead of 18, times 1e-10 none (a tenth attack run). Scaling by a power
    of two is exact in floating point, so no value changes but its exponent.

    Args:
        values: any real array (e.g. a ``(T, H, W)`` recording or an ``(H, W)`` projection).

    Returns:
        ``k`` (int; 0: use as it is).
    """
    v = np.asarray(values)
    a = np.abs(v.reshape(-1)[:: max(1, v.size // 1_000_000)].astype(np.float64))  # <= 2e6 values
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0
    typical = float(np.median(a))
    if not typical > 0:
        typical = float(a.max())
    lo, hi = UNIT_MAGNITUDE_RANGE
    if not typical > 0 or lo <= typical <= hi:
        return 0
    return 10 - int(np.round(np.log2(typical)))
