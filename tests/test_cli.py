"""The calseg command line: simulate then segment, and a clear error for a missing file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from typer.testing import CliRunner

from calseg.cli import app
from calseg.io.dataset import load_dataset
from calseg.io.tables import read_traces_csv

runner = CliRunner()


def test_simulate_then_segment_with_the_baseline(tmp_path: Path) -> None:
    ds_dir = tmp_path / "ds"
    r = runner.invoke(
        app, ["simulate", str(ds_dir), "--videos", "3", "--frames", "12", "--size", "128"]
    )
    assert r.exit_code == 0, r.output
    ds = load_dataset(ds_dir)
    assert [v.split for v in ds.videos] == ["train", "val", "test"]
    video = ds.split("test")[0]

    out = tmp_path / "seg"
    r = runner.invoke(
        app,
        ["segment", str(ds_dir / video.image), str(out), "--method", "baseline",
         "--frame-interval", str(video.frame_interval_s)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    labels = tifffile.imread(out / "labels.tif")
    assert labels.shape == (12, 128, 128)
    n_cells = len(np.unique(labels[labels > 0]))
    assert f"{n_cells} cells labelled over 12 frames" in r.output
    traces = read_traces_csv(out / "traces.csv")
    assert len(traces["ids"]) == n_cells and traces["dff"].shape == (n_cells, 12)
    # frame times follow the frame interval given on the command line
    np.testing.assert_allclose(traces["time_s"], np.arange(12) * video.frame_interval_s)
    for name in ("overlay.png", "overlay.gif", "events.csv"):
        assert (out / name).stat().st_size > 0, name


def test_segment_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["segment", str(tmp_path / "nope.tif"), str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "nope.tif" in r.output and "no such file" in r.output
