"""Is there a cell here? Plausibility of dF/F and cell evidence of labelled regions.

:func:`baseline_notes` flags dF/F divided by a near-dark F0; :func:`region_evidence` counts the
regions with a significant calcium event against a noise reference (negative-going
transients); :func:`evidence_summary` and :func:`clearly_above_noise` say it for people and for
the pattern rule of :func:`calseg.pipelines.traces.write_trace_exports`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from calseg.analysis.events import Event, detect_events
from calseg.analysis.metrics import diff_noise_sd
from calseg.analysis.patterns import PatternThresholds, significant_events
from calseg.fmt import plural

DARK_PERCENTILE = 0.1
"""Percentile of all pixels (or trace values) taken as the recording's dark level."""
LOW_F0_FRACTION = 0.05
"""An F0 within this fraction of the intensity range above the dark level is 'near dark'."""
HIGH_DFF = 5.0
"""Peak dF/F above this, on a near-dark F0, is reported as inflated (GCaMP6 ΔF/F after a
burst of action potentials is of order 1-10 in neurons, Chen et al. 2013, Nature 499:295;
here the point is the baseline, not the indicator's ceiling)."""


PIXEL_SAMPLES = 1_000_000
"""Pixels of a recording (evenly strided) that its dark level and top percentile are read on."""


def pixel_sample(frames: np.ndarray) -> np.ndarray:
    """About :data:`PIXEL_SAMPLES` evenly strided finite values of a recording, float64."""
    flat = np.asarray(frames).reshape(-1)
    if flat.size > PIXEL_SAMPLES:
        flat = flat[:: int(np.ceil(flat.size / PIXEL_SAMPLES))]
    return flat[np.isfinite(flat)].astype(np.float64)


def dark_level(frames: np.ndarray | None, f: np.ndarray) -> float:
    """The recording's dark (offset + background) level estimate: the
    :data:`DARK_PERCENTILE`-th percentile of all pixels (:func:`pixel_sample`) or,
    without frames, of the traces ``f`` ``(N, T)``. Same units as F."""
    if frames is not None:
        flat = pixel_sample(frames)
    else:
        flat = np.asarray(f).reshape(-1)
        flat = flat[np.isfinite(flat)].astype(np.float64)
    return float(np.percentile(flat, DARK_PERCENTILE)) if flat.size else 0.0


OFFSET_RANGE_FACTOR = 1.5
"""A recording whose 99.9th percentile rises less than this many times its floor (its
:func:`dark_level`) above that floor is flagged: dF/F there is diluted by the floor. Measured
(``frames`` as read): simulated recordings 11.5 (flagged after adding 1000 counts: 1.17),
fissa 2.1-3.1, sima 300, sima_example-tiffs_0_badmeta 1.1 and astrocast's dF/F export stored
on +32768 0.001."""


NOISE_RANGE_SDS = 10.0
"""A recording whose floor-to-top range (0.1- to 99.9-percentile) spans fewer than this many
temporal noise SDs has nothing but noise in that range (white noise spans 6.2 SDs between those
percentiles): its floor is the low tail of the noise, not an offset, and no offset note is
given. Measured (:func:`temporal_noise_sd`): Poisson noise of mean 0.3-1000 and Gaussian noise
5.8-7.3; fissa 27-57, astrocast 96, simulated recordings 199-310."""


def temporal_noise_sd(frames: np.ndarray, max_frames: int = 64) -> float | None:
    """Typical temporal noise SD of a recording, in its units, from consecutive-frame differences
    of its first ``max_frames`` frames (about :data:`PIXEL_SAMPLES` differences), pooled over
    pixels by :func:`calseg.analysis.metrics.diff_noise_sd` (the estimator of
    :func:`calseg.segment.prompts.noise_model`, per pixel there).

    Args:
        frames: ``(T, H, W)`` recording (any numeric dtype).

    Returns:
        The SD, or ``None`` with fewer than 2 frames or no finite difference.
    """
    a = np.asarray(frames)
    if a.ndim != 3 or a.shape[0] < 2:
        return None
    d = np.abs(np.diff(a[:max_frames].astype(np.float64), axis=0)).reshape(-1)
    if d.size > PIXEL_SAMPLES:
        d = d[:: int(np.ceil(d.size / PIXEL_SAMPLES))]
    d = d[np.isfinite(d)]
    if not d.size:
        return None
    return diff_noise_sd(d)


def offset_notes(frames: np.ndarray) -> list[str]:
    """A note when the recording sits on a high floor (camera offset or a constant added on
    export): dF/F = (F - F0) / F0 divides by an F0 that includes the floor, so dF/F and every
    threshold on it (significant events, so the pattern class) see changes diluted by
    ``top / (top - floor)``. The segmentation itself (z-scores, the cell-size estimate) does
    not depend on the floor.

    No note for fewer than 2 frames (one image cannot tell an offset from light), nor when the
    floor-to-top range lies within :data:`NOISE_RANGE_SDS` temporal noise SDs: there the floor
    is the low tail of the noise (pure Poisson noise of mean 100 was told to "subtract 70").

    Args:
        frames: ``(T, H, W)`` recording (any numeric dtype).

    Returns:
        Zero or one note (text for people, with the numbers).
    """
    if np.ndim(frames) != 3 or np.shape(frames)[0] < 2:
        return []  # one image: nothing tells an offset from light, and dF/F needs time
    flat = pixel_sample(frames)
    if not flat.size:
        return []
    floor = float(np.percentile(flat, DARK_PERCENTILE))  # dark_level of the same sample
    if floor <= 0:
        return []
    top = float(np.percentile(flat, 99.9))
    rise = top - floor
    if rise >= OFFSET_RANGE_FACTOR * floor or rise <= 0:  # 0: a constant recording, said elsewhere
        return []
    noise = temporal_noise_sd(frames)
    if noise is None or rise < NOISE_RANGE_SDS * noise:
        return []  # the range is the noise's own: the floor is its low tail, not an offset
    shown = f"{floor:.6g}"
    return [
        f"the recording sits on a floor of {shown} (its {DARK_PERCENTILE:g}-percentile) and "
        f"rises only {rise:.4g} above it (99.9th percentile {top:.6g}): if that floor is a "
        "camera offset or a constant added on export, dF/F = (F - F0) / F0 divides by it too, "
        f"so dF/F values and the events counted significant are up to {top / max(rise, 1e-12):.3g}"
        f"x smaller than the cells' own; subtract the offset (e.g. ImageJ: Process > Math > "
        f"Subtract {shown}) before reading dF/F, events and the pattern class"
    ]


def baseline_notes(
    frames: np.ndarray | None, f: np.ndarray, f0: np.ndarray, d: np.ndarray
) -> list[str]:
    """Plausibility of dF/F: cells whose F0 sits near the recording's dark level.

    dF/F = (F - F0) / F0 divides by F0; when F0 is close to the dark level (offset and
    background already subtracted, e.g. an ImageJ calibration that removed 32768, or a
    background-subtracted export), small changes give large ratios. A note is returned when
    some cell's peak dF/F exceeds :data:`HIGH_DFF` while its median F0 lies within
    :data:`LOW_F0_FRACTION` of the intensity range above :func:`dark_level`.

    Args:
        frames: ``(T, H, W)`` recording or ``None``; f, f0, d: ``(N, T)`` F, F0, dF/F.

    Returns:
        Zero or one note (text for people, with the numbers).
    """
    f = np.asarray(f, dtype=np.float64)
    if f.size == 0:
        return []
    dark = dark_level(frames, f)
    if frames is not None:
        flat = pixel_sample(frames)
        top = float(np.percentile(flat, 99.9)) if flat.size else dark
    else:
        top = float(np.nanpercentile(f, 99.9))
    span = max(top - dark, 1e-12)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        med_f0 = np.nanmedian(np.asarray(f0, dtype=np.float64), axis=1)
        peak = np.nanmax(np.where(np.isfinite(d), d, -np.inf), axis=1)
    near = (med_f0 - dark) < LOW_F0_FRACTION * span
    bad = near & (peak > HIGH_DFF)
    if not bad.any():
        return []
    return [
        f"dF/F looks inflated: {int(bad.sum())} of {len(bad)} cells peak at dF/F up to "
        f"{float(peak[bad].max()):.1f} while their F0 ({float(med_f0[bad].min()):.3g} to "
        f"{float(med_f0[bad].max()):.3g}) lies within {100 * LOW_F0_FRACTION:.0f} % of the "
        f"intensity range above the recording's dark level ({dark:.3g}, its "
        f"{DARK_PERCENTILE:g}-percentile; range up to {top:.3g}): F0 there is mostly offset "
        "or background error, not resting fluorescence. The values look offset- or "
        "background-subtracted already (e.g. by an ImageJ calibration, which CalSeg applies "
        "on reading when the file has one: see the reading notes); "
        "compare the cells' F, or measure the background in a cell-free area and keep it in "
        "F0, before reading these dF/F as signal"
    ]


def region_evidence(
    ids: np.ndarray,
    d: np.ndarray,
    events: list[Event],
    frame_interval_s: float,
    k: float,
) -> dict[str, Any]:
    """How many labelled regions show a calcium event, against how many noise alone would.

    A region has *cell evidence* when it has a significant event
    (:func:`calseg.analysis.patterns.significant_events`: peak dF/F >= 0.2 and >= half the
    recording's 95th-percentile amplitude). The noise reference (``null``) counts regions with
    an equally large *negative-going* transient: the same detector on the sign-flipped dF/F,
    re-centred on each trace's median (calcium events only rise; noise is symmetric; Dombeck
    et al. 2007, Neuron 56:43, estimated false-positive rates from negative transients).

    Returns:
        ``{"n_regions", "with_events": [ids], "n_with_events", "null_with_events",
        "rule"}``.
    """
    th = PatternThresholds()
    sig = significant_events(events, th)
    with_ev = sorted({int(e.cell_id) for e in sig})
    amps = np.array([e.amplitude for e in events], dtype=np.float64)
    ok = amps[np.isfinite(amps) & (amps >= th.min_event_amplitude)]
    floor = th.min_event_amplitude
    if ok.size:
        floor = max(floor, th.relative_event_amplitude * float(np.percentile(ok, 95)))
    null = 0
    d = np.asarray(d, dtype=np.float64)
    if d.size and d.shape[1] >= 2:
        with warnings.catch_warnings():  # all-NaN rows (flagged traces) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            flipped = -(d - np.nanmedian(d, axis=1, keepdims=True))
        neg = detect_events(flipped, frame_interval_s, k=k, cell_ids=ids)
        null = len(
            {int(e.cell_id) for e in neg if np.isfinite(e.amplitude) and e.amplitude >= floor}
        )
    return {
        "n_regions": int(len(ids)),
        "with_events": with_ev,
        "n_with_events": len(with_ev),
        "null_with_events": int(null),
        "rule": "a region has cell evidence when its dF/F trace has a significant event "
        f"(peak dF/F >= {floor:.3g}); null = regions with an equally large negative-going "
        "transient (noise reference)",
    }


def evidence_summary(evidence: dict[str, Any], coverage: float) -> str:
    """One sentence for people: regions, how many with events, the noise reference, coverage."""
    return (
        f"{plural(evidence['n_regions'], 'region')} labelled ({100 * coverage:.0f} % of the "
        f"field); {evidence['n_with_events']} "
        f"{'shows' if evidence['n_with_events'] == 1 else 'show'} a calcium event (cell "
        "evidence), noise alone "
        f"gives about {evidence['null_with_events']} (regions with an equally large "
        "negative-going transient)"
    )


def clearly_above_noise(evidence: dict[str, Any]) -> bool:
    """Whether the regions with events clearly outnumber the noise reference: at least 2 and
    at least twice the null count."""
    n, null = evidence["n_with_events"], evidence["null_with_events"]
    return n >= 2 and n >= 2 * null
