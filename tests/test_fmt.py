"""Floats printed for people are rounded (calseg.fmt); JSON keeps full precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from calseg.fmt import fmt_mapping, fmt_num


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0010901965070773344, "0.00109"),
        (351.218226965458, "351.2"),
        (123456.7, "123457"),
        (9.0e14, "900000000000000"),
        (3.6065164101432017e37, "3.607e+37"),
        (-2.5e20, "-2.5e+20"),
        (1.5e-7, "1.5e-07"),
        (0.0, "0"),
        (np.float32(0.123456789), "0.1235"),
        (float("nan"), "nan"),
        (None, "n/a"),
        (7, "7"),
        (True, "True"),
        ("none", "none"),
    ],
)
def test_fmt_num(value, text) -> None:
    assert fmt_num(value) == text


def test_fmt_mapping_rounds_nested_floats() -> None:
    got = fmt_mapping({"gain": 2.0412345678, "psf": {"sigma": 1.4999999}, "n": 3, "v": [0.33333]})
    assert got == "gain=2.041, psf={sigma=1.5}, n=3, v=[0.3333]"


def test_cli_fit_sim_prints_rounded_bleaching_tau(tmp_path: Path) -> None:
    """fit-sim on a simulated bleaching recording: the human line shows 4 significant digits
    of the bleaching time constant, the --out JSON the full float."""
    from calseg.cli import app
    from calseg.simulate.config import ImagingOverrides, SimulationConfig
    from calseg.simulate.dataset import simulate_videos

    cfg = SimulationConfig(
        imaging=ImagingOverrides(gain_adu_per_e=2.0, offset_adu=200.0, bleach_tau_s=400.0),
        n_videos=1,
        n_val_videos=0,
        n_test_videos=0,
        n_frames=40,
        height=96,
        width=96,
        defect_severity=0.0,
        seed=0,
        pattern_classes=["spikes"],
        mean_cell_area_px=80,
    )
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, simulate_videos(cfg)[0]["image"])
    r = CliRunner().invoke(app, ["fit-sim", str(rec), "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 0, r.output
    tau = json.loads((tmp_path / "fit.json").read_text())["fit"]["bleach_tau_frames"]
    assert tau is not None and math.isfinite(tau) and tau != round(tau, 1)  # full precision
    line = " ".join(r.output.split())  # the console may wrap the line
    assert f"bleaching tau {fmt_num(tau)} frames" in line
    assert repr(tau) not in r.output
