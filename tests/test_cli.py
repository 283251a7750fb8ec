"""The calseg command line: simulate then segment, and a clear error for a missing file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


MISSING_PATH_COMMANDS = {
    "segment": ["segment", "{d}/nope.tif", "{d}/out"],
    "analyze": ["analyze", "{d}/nope.tif", "{d}/nope_labels.tif", "{d}/out"],
    "evaluate": ["evaluate", "{d}/nope"],
    "finetune": ["finetune", "{d}/nope", "{d}/out", "--steps", "1"],
    "gap": ["gap", "{d}/nope.tif", "--sim", "{d}/nope"],
    "fit-sim": ["fit-sim", "{d}/nope.tif"],
    "simulate --like": ["simulate", "{d}/out", "--like", "{d}/nope.tif"],
    "simulate --config": ["simulate", "{d}/out", "--config", "{d}/nope.json"],
    "submit --params": ["submit", "simulate", "--params", "{d}/nope.json"],
    "report-gap --real-dir": ["report-gap", "{d}/out", "--real-dir", "{d}/nope"],
}


@pytest.mark.parametrize("name", list(MISSING_PATH_COMMANDS))
def test_every_command_with_a_missing_path_prints_one_error_line(name: str, tmp_path: Path) -> None:
    """The kind of fault, not one command: a missing path is ``error: <message>`` naming the
    path, exit code 2, and no traceback or leftover progress bar."""
    args = [a.format(d=tmp_path) for a in MISSING_PATH_COMMANDS[name]]
    r = runner.invoke(app, args, env={"CALSEG_TOKEN": "x", "CALSEG_URL": "http://127.0.0.1:9"})
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error:") and "nope" in lines[0], r.output
    assert "Traceback" not in r.output


def test_user_errors_become_exit_2_but_bugs_stay_tracebacks() -> None:
    """``_user_errors`` (the one wrapper of every command) turns CalSeg's error types into
    exit code 2 and lets builtin exceptions (bugs) through."""
    import typer
    from pydantic import BaseModel

    from calseg.cli import _is_user_error, _user_errors
    from calseg.io.dataset import DatasetError
    from calseg.service.schemas import ParamsError

    class P(BaseModel):
        n: int

    try:
        P(n="x")
    except Exception as exc:  # noqa: BLE001 - the ValidationError instance
        validation = exc
    assert _is_user_error(DatasetError("d")) and _is_user_error(ParamsError("infer", []))
    assert _is_user_error(validation) and _is_user_error(FileNotFoundError(2, "x", "f"))
    assert not _is_user_error(ValueError("bug")) and not _is_user_error(KeyError("k"))

    def bad_dataset() -> None:
        raise DatasetError("no dataset manifest at /x")

    def bug() -> None:
        raise KeyError("k")

    with pytest.raises(typer.Exit) as ex:
        _user_errors(bad_dataset)()
    assert ex.value.exit_code == 2
    with pytest.raises(KeyError):
        _user_errors(bug)()
