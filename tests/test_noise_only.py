"""No cells from pure noise (issue 17 item 2): recordings with no calcium signal
(:mod:`calseg.simulate.noise`) must give 0 cells. A small sample runs here; the larger study is
``python scripts/noise_only_study.py``."""

import numpy as np
import pytest

from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.simulate.noise import NoiseCondition, noise_conditions, noise_only_recording


def test_noise_recordings_follow_their_condition():
    c = NoiseCondition(kind="poisson", n_frames=30, height=64, width=80, level_e=50,
                       gain_adu_per_e=2.0, offset_adu=100, read_noise_e=1.0, bits=16,
                       bleach_fraction=0.5)  # fmt: skip
    rec = noise_only_recording(c)
    assert rec.dtype == np.uint16 and rec.shape == (30, 64, 80)
    m = rec.reshape(30, -1).mean(axis=1)
    assert m[0] == pytest.approx(100 + 2 * 50, rel=0.02)
    assert m[-1] == pytest.approx(100 + 2 * 25, rel=0.03)  # half the light bleached
    # shot noise: variance of a frame difference = 2 gain^2 (level + read^2) in ADU
    v = np.var(rec[1].astype(float) - rec[0]) / 2
    assert v == pytest.approx(4 * (50 * (1 - 0.5 * (1 - np.exp(-3 / 29)) / 0.95) + 1), rel=0.15)
    eight = noise_only_recording(NoiseCondition(bits=8, level_e=1000, gain_adu_per_e=1.0))
    assert eight.dtype == np.uint8 and eight.max() == 255  # clipped at the ADC's range
    conds = noise_conditions(12, seed=0, max_pixels=1_000_000)
    assert {c.kind for c in conds} == {"poisson", "gaussian"} and {c.bits for c in conds} == {8, 16}
    assert all(20 <= c.n_frames <= 2000 and c.n_frames * c.height * c.width <= 1_000_000
               for c in conds)  # fmt: skip


@pytest.mark.parametrize("target", ["active", "cells"])
def test_no_cell_on_noise_only_recordings(target):
    """At least 95 % of noise-only recordings give 0 cells, on both targets. The draws (seed
    101) were not used while developing the evidence test (seeds 0, 1 and 7 were)."""
    conds = noise_conditions(40, seed=101, max_pixels=600_000)
    found = []
    for c in conds:
        res = segment_recording(
            noise_only_recording(c), InferenceConfig(method="classical", target=target)
        )
        found.append(len(np.unique(res.labels[res.labels > 0])))
    assert sum(n == 0 for n in found) >= 0.95 * len(conds), found


@pytest.mark.parametrize("offset", [0, 1000])
def test_few_photon_noise_gives_no_cell_whatever_its_offset(offset):
    """Poisson counts of mean 0.3 per pixel repeat between frames (median |difference| 0).
    The noise model fell to 0.1 % of F0 there: 19 cells at offset 0, none at offset 1000.
    It now estimates the noise from the mean |difference| (offset-free): none at either."""
    from calseg.segment.prompts import compute_activity

    counts = np.random.default_rng(0).poisson(0.3, (100, 128, 128))
    rec = (counts + offset).astype(np.uint16)
    res = segment_recording(rec, InferenceConfig(method="classical"))
    assert not res.labels.any()
    sigma = compute_activity(rec).stats["noise_sigma_median"]
    assert sigma == pytest.approx(np.sqrt(0.3), rel=0.35)  # Poisson: SD = sqrt(mean)
