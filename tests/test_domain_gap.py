"""Domain-gap score: zero for identical sets, blind to gain/offset, and lower for a simulation
fitted to a (simulated) "real" recording than for a default simulation."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.pipelines.domain_gap import (
    REFERENCE_SCALES,
    GapError,
    domain_gap,
    frechet_distance,
)
from calseg.simulate.config import ImagingOverrides, SimulationConfig
from calseg.simulate.dataset import simulate_videos
from calseg.simulate.fit import fit_recording

SMALL = {
    "n_videos": 2,
    "n_val_videos": 0,
    "n_test_videos": 0,
    "n_frames": 40,
    "height": 128,
    "width": 128,
    "search_horizon_s": 1200,
    "warmup_s": 200,
    "seed": 2,
}
# a "real" recording imaged very differently from the simulator's defaults: few photons, high
# read noise, strong blur, bright background, 12-bit camera at low gain
REAL_IMAGING = {
    "gain_adu_per_e": 0.5,
    "offset_adu": 100.0,
    "read_noise_e": 8.0,
    "background": 0.05,
    "photon_scale_e": 600.0,
    "psf_sigma_px": 2.0,
    "bleach_tau_s": 300.0,
    "vignetting": 0.0,
}


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    cfg = SimulationConfig(
        **{**SMALL, "n_videos": 1, "seed": 5},
        mean_cell_area_px=60,
        pattern_classes=["spikes"],
        defect_severity=0.0,
        imaging=ImagingOverrides(**REAL_IMAGING),
    )
    return simulate_videos(cfg)[0]["image"]


def test_identical_sets_score_zero(real):
    g = domain_gap([real], [real])
    assert g.score == pytest.approx(0.0, abs=1e-9)
    assert set(g.components) == set(REFERENCE_SCALES)


def test_gain_and_offset_do_not_count(real):
    g = domain_gap([real], [real.astype(np.float32) * 3.0 + 250.0])
    assert g.score < 0.05


def test_fitted_simulation_is_closer_than_default(real):
    default = [v["image"] for v in simulate_videos(SimulationConfig(**SMALL))]
    fit = fit_recording(real, frame_interval_s=5.0)
    fitted_cfg = fit.to_config(SimulationConfig(**SMALL))
    fitted = [v["image"] for v in simulate_videos(fitted_cfg)]
    g_default = domain_gap([real], default)
    g_fitted = domain_gap([real], fitted)
    assert g_fitted.score < 0.8 * g_default.score, (g_fitted, g_default)
    # the noise and spectrum terms are what the fit targets most directly
    assert g_fitted.components["noise"] < g_default.components["noise"]
    assert g_fitted.components["spectrum"] < g_default.components["spectrum"]


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (200, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.zeros(8)
    shift[0] = 3.0
    # same covariance, mean moved by 3: d^2 = 9
    assert frechet_distance(a, a + shift) == pytest.approx(9.0, rel=1e-6)
    b = rng.normal(0, 2, (200, 8))  # variance 4: trace term 8 * (1 + 4 - 2*2) = 8
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.3)
    with pytest.raises(GapError):
        frechet_distance(a[:1], b)


def test_bad_sets_are_refused():
    with pytest.raises(GapError, match="empty"):
        domain_gap([], [np.zeros((4, 16, 16))])
    with pytest.raises(GapError, match="T >= 3"):
        domain_gap([np.zeros((2, 16, 16))], [np.zeros((4, 16, 16))])


def test_report_table_marks_implausible_rows():
    from calseg.report import markdown

    score = {
        "n_labelled": 2,
        "recall_50": 0.5,
        "recall_30": 1.0,
        "detections_per_frame": 3.0,
        "plausible": True,
    }
    gap = {
        "score": 1.5,
        "components": {"histogram": 0.1, "noise": 0.2, "spectrum": 0.3, "cell_size": 0.4},
        "frechet_sam2": 7.0,
    }
    rows = [
        {
            "model": "m",
            "training data": "default",
            "sima": score,
            "fissa": {**score, "plausible": False, "recall_30": 0.0},
            "gap_sima": gap,
            "gap_fissa": gap,
            "oracle_sima": 0.25,
            "sim_test": {"iou": 0.1, "dice": 0.2},
        }
    ]
    res = {
        "rows": rows,
        "gap": {"sima": {"default": gap}},
        "embed_s": {"default": 1.0, "augmented": 3.0},
        "settings": {"augment_variants": 2},
        "timings": {"total_s": 10.0},
        "best_steps": {"default": 0},
    }
    md = markdown(res)
    assert "| m | default | 1.50 | 1.50 | 7.0 | 7.0 | 0.50 / 1.00 | 0.50 / 0.00 (implausible)" in md
    assert "0.25 / n/a" in md  # oracle-point IoU, missing for fissa
    assert "default 0" in md


def test_cli_gap(real, tmp_path):
    import tifffile
    from typer.testing import CliRunner

    from calseg.cli import app

    tifffile.imwrite(tmp_path / "real.tif", real, photometric="minisblack")
    tifffile.imwrite(tmp_path / "same.tif", real, photometric="minisblack")
    r = CliRunner().invoke(
        app, ["gap", str(tmp_path / "real.tif"), "--sim", str(tmp_path / "same.tif")]
    )
    assert r.exit_code == 0, r.output
    assert "domain-gap score 0.000" in r.output
    r = CliRunner().invoke(
        app, ["gap", str(tmp_path / "real.tif"), "--sim", str(tmp_path / "nope")]
    )
    assert r.exit_code == 2 and "error" in r.output
