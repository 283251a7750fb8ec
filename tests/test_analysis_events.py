"""Event detection on dF/F traces (calseg.analysis.events) with known transients."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.analysis.events import EventError, detect_events, trace_noise

DT = 0.5  # s per frame


def _transient(t: np.ndarray, onset: float, amp: float, rise: float, tau: float) -> np.ndarray:
    """Linear rise over ``rise`` s from ``onset``, then exponential decay (time constant tau)."""
    x = np.zeros_like(t)
    up = (t >= onset) & (t < onset + rise)
    x[up] = amp * (t[up] - onset) / rise
    down = t >= onset + rise
    x[down] = amp * np.exp(-(t[down] - onset - rise) / tau)
    return x


def test_trace_noise_recovers_sigma_despite_slow_transients():
    rng = np.random.default_rng(0)
    t = np.arange(4000) * DT
    slow = _transient(t, 100.0, 3.0, 20.0, 200.0)  # a long wave covering most of the trace
    x = slow + 0.05 * rng.standard_normal(t.size)
    assert trace_noise(x[None])[0] == pytest.approx(0.05, rel=0.06)


def _trapezoid(t: np.ndarray, onset: float, amp: float, rise: float, hold: float, fall: float):
    """Rise over ``rise`` s from ``onset``, plateau ``hold`` s, fall over ``fall`` s (linear)."""
    x = np.interp(
        t,
        [onset, onset + rise, onset + rise + hold, onset + rise + hold + fall],
        [0.0, amp, amp, 0.0],
    )
    return x


def test_event_times_durations_amplitudes_within_one_frame():
    rng = np.random.default_rng(3)
    sigma = 0.02
    t = np.arange(400) * DT
    # onset s, amplitude dF/F, rise s, plateau s, fall s: edges steep against the noise, so the
    # threshold crossings are defined to well within a frame
    specs = [(30.0, 1.0, 2.0, 5.0, 6.0), (120.0, 0.5, 1.0, 0.0, 4.0)]
    clean = sum(_trapezoid(t, *s) for s in specs)
    x = clean + sigma * rng.standard_normal(t.size)
    high = 3.0 * trace_noise(x[None])[0]
    assert high == pytest.approx(3 * sigma, rel=0.15)
    events = detect_events(x[None], DT, k=3.0, cell_ids=np.array([7]))
    assert len(events) == 2
    for ev, (onset, amp, rise, hold, fall) in zip(events, specs, strict=True):
        assert ev.cell_id == 7 and not ev.truncated
        assert abs(ev.rest) < sigma  # noise mean 0
        low = (ev.threshold + ev.rest) / 2
        t_on = onset + rise * low / amp  # the rise crosses high/2 here
        t_off = onset + rise + hold + fall * (1 - low / amp)  # the fall crosses high/2 here
        assert abs(ev.onset_s - t_on) <= DT
        assert onset + rise - DT <= ev.peak_s <= onset + rise + hold + DT
        assert abs(ev.duration_s - (t_off - t_on)) <= DT
        assert ev.amplitude == pytest.approx(amp, abs=3 * sigma)
        # area under the clean trapezoid: amp * (rise / 2 + hold + fall / 2) (dF/F * s)
        assert ev.auc == pytest.approx(amp * (rise / 2 + hold + fall / 2), rel=0.1)
        assert ev.onset_s == ev.onset_frame * DT and ev.peak_s == ev.peak_frame * DT


def test_exponential_decay_onset_and_peak():
    t = np.arange(200) * DT
    x = _transient(t, 20.0, 1.0, 1.0, 5.0) + 0.01 * np.random.default_rng(4).standard_normal(200)
    ev = detect_events(x[None], DT)
    assert len(ev) >= 1
    assert abs(ev[0].onset_s - 20.0) <= 2 * DT and abs(ev[0].peak_s - 21.0) <= DT
    # end of the clean decay at high/2: within the noise-limited precision of a shallow tail
    t_off = 21.0 + 5.0 * np.log(1.0 / ((ev[0].threshold + ev[0].rest) / 2))
    assert abs(ev[0].onset_s + ev[0].duration_s - t_off) <= 4.0


def test_pure_noise_gives_no_events_and_nan_rows_are_skipped():
    rng = np.random.default_rng(5)
    x = 0.03 * rng.standard_normal((4, 500))
    x[2] = np.nan  # a trace flagged by the tiny-F0 guard
    events = detect_events(x, DT)
    # false-positive rate of k=3 with hysteresis and >= 2 frames: ~2e-4 per frame
    assert len(events) <= 1
    assert all(e.cell_id != 2 for e in events)


def test_noise_through_percentile_f0_gives_few_events():
    from calseg.analysis.traces import baseline_f0, dff

    rng = np.random.default_rng(6)
    f = 1000.0 + 20.0 * rng.standard_normal((200, 300))  # 60 000 frames of resting cells
    d, _ = dff(f, baseline_f0(f, 1.0, window_s=60.0))
    # resting dF/F sits ~1.28 sigma above 0 (F0 is the 10th percentile); the rest level absorbs it
    assert np.median(d) == pytest.approx(1.2816 * 0.02, rel=0.15)
    events = detect_events(d, 1.0)
    assert len(events) / d.size < 1e-3


def test_min_duration_truncation_and_amplitude_floor():
    x = np.zeros((1, 50))
    x[0, 10:12] = 1.0  # a 2-frame, noise-free event
    x[0, 47:] = 1.0  # an event running into the end of the recording
    assert detect_events(x, DT) == []  # sigma = 0 and no floor: no threshold
    ev = detect_events(x, DT, min_amplitude=0.1)
    assert [(e.onset_frame, e.offset_frame, e.truncated) for e in ev] == [
        (10, 12, False),
        (47, 50, True),
    ]
    assert ev[0].duration_s == pytest.approx(1.0) and ev[0].auc == pytest.approx(1.0)
    ev = detect_events(x, DT, min_amplitude=0.1, min_duration_s=1.5)
    assert [e.onset_frame for e in ev] == [47]


def test_errors():
    with pytest.raises(EventError, match="frame_interval_s"):
        detect_events(np.zeros((1, 5)), 0.0)
    with pytest.raises(EventError, match=r"\(N cells, T frames\)"):
        detect_events(np.zeros(5), 1.0)
    with pytest.raises(EventError, match="cell_ids"):
        detect_events(np.zeros((2, 5)), 1.0, cell_ids=np.array([1]))
