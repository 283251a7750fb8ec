"""The calseg command line: simulate then segment, and a clear error for a missing file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from calseg.cli import app
from calseg.fmt import plural
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
    # the old names (--method baseline, --frame-interval) still work; plurals are right
    assert f"classical: {plural(n_cells, 'cell')} (active) labelled over 12 frames" in r.output
    traces = read_traces_csv(out / "traces.csv")
    assert len(traces["ids"]) == n_cells and traces["dff"].shape == (n_cells, 12)
    # frame times follow the frame interval given on the command line
    np.testing.assert_allclose(traces["time_s"], np.arange(12) * video.frame_interval_s)
    for name in ("overlay.png", "overlay.gif", "events.csv"):
        assert (out / name).stat().st_size > 0, name


def test_simulate_two_videos_with_split_flags(tmp_path: Path) -> None:
    """``--videos 2`` was refused with pydantic's dump (the default 1 validation + 1 test video
    leave none for training) and no flag could change the split: now the error names the
    flags, and --val-videos / --test-videos / --cell-area set the dataset."""
    common = ["--frames", "6", "--size", "96"]
    r = runner.invoke(app, ["simulate", str(tmp_path / "a"), "--videos", "2", *common])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "--val-videos (1) + --test-videos (1) must leave at least one training video" in out
    assert "pydantic" not in out and "n_val_videos" not in out
    r = runner.invoke(
        app,
        ["simulate", str(tmp_path / "b"), "--videos", "2", "--val-videos", "0",
         "--cell-area", "80", *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [v.split for v in load_dataset(tmp_path / "b").videos] == ["train", "test"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"]["mean_cell_area_px"] == 80
    r = runner.invoke(app, ["simulate", str(tmp_path / "c"), "--cell-area", "5000", *common])
    assert r.exit_code == 2
    assert "change --size or --cell-area" in " ".join(r.output.split())


def test_segment_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["segment", str(tmp_path / "nope.tif"), str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "nope.tif" in r.output and "no such file" in r.output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--cell-diameter-px", "-5"], "--cell-diameter-px -5.0: Input should be greater than 1"),
        (["--cell-diameter-px", "0"], "--cell-diameter-px 0.0: Input should be greater than 1"),
        (["--target", "foo"], "--target 'foo': Input should be 'active' or 'cells'"),
    ],
)
def test_segment_bad_option_names_its_flag_before_reading(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    """A bad option is one line naming the flag and the value, refused before the recording
    is read (the recording here does not even exist), not pydantic's report."""
    r = runner.invoke(app, ["segment", str(tmp_path / "nope.tif"), str(tmp_path / "o"), *flags])
    assert r.exit_code == 2
    assert expected in " ".join(r.output.split())
    assert "pydantic" not in r.output and "nope.tif" not in r.output


def test_segment_output_folder_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, np.zeros((5, 16, 16), np.uint16))
    (tmp_path / "taken").write_text("x")
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "taken")])
    assert r.exit_code == 2
    assert "is an existing file" in " ".join(r.output.split())
    assert (tmp_path / "taken").read_text() == "x"


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


SHARED_WITH_INFER = (
    "method", "mode", "target", "projection", "threshold_k", "min_region_px", "image_size",
    "cell_diameter_px", "frame_interval_s", "pixel_size_um", "z_projection", "register_drift",
    "background", "background_radius_px", "bleach_correction", "nwb",
)  # fmt: skip


def test_segment_and_analyze_flags_are_the_infer_job_parameter_names() -> None:
    import typer

    from calseg.cli import OPTION_ALIASES
    from calseg.service.schemas import params_json_schema

    schema = params_json_schema("infer")["properties"]
    commands = typer.main.get_command(app).commands
    # options with no infer parameter: a local file instead of model_job_id; how to read (a
    # server refuses an upload over its decode budget instead of reading part of it)
    cli_only = {"segment": {"--checkpoint", "--max-frames"}, "analyze": {"--axes", "--channel"}}
    for command, names in (
        ("segment", SHARED_WITH_INFER),
        ("analyze", SHARED_WITH_INFER[8:]),
    ):
        params = [p for p in commands[command].params if p.param_type_name == "option"]
        shown = {o for p in params if not p.hidden for o in p.opts if o.startswith("--")}
        hidden = {o for p in params if p.hidden for o in p.opts}
        for name in names:
            assert name in schema, name
            assert "--" + name.replace("_", "-") in shown, (command, name)
        # every other option is a parameter too, under the same name (e.g. a cell diameter
        # flag must be --cell-diameter-px, as cell_diameter_px)
        for flag in shown - {"--help"} - cli_only[command]:
            assert flag[2:].replace("-", "_") in schema, (command, flag)
        assert set(OPTION_ALIASES) == hidden  # the old names: accepted, not advertised
        assert set(OPTION_ALIASES.values()) <= shown


def test_old_flag_names_do_the_same_as_the_new_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.poisson(200, size=(12, 48, 48)).astype(np.uint16)
    frames[5:8, 10:20, 10:20] += 400
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, frames)
    outs = []
    for flags in (
        ["--register", "--bleach", "exp", "--frame-interval", "0.5", "--background-radius", "20"],
        ["--register-drift", "--bleach-correction", "exp", "--frame-interval-s", "0.5",
         "--background-radius-px", "20"],
    ):  # fmt: skip
        out = tmp_path / flags[0].strip("-")
        r = runner.invoke(app, ["segment", str(rec), str(out), "--background", "opening", *flags])
        assert r.exit_code == 0, r.output
        outs.append((out, [ln for ln in r.output.splitlines() if ln.startswith("preprocess")]))
    assert outs[0][1] == outs[1][1] and len(outs[0][1]) == 3
    assert (outs[0][0] / "traces.csv").read_text() == (outs[1][0] / "traces.csv").read_text()
    both = runner.invoke(
        app,
        ["segment", str(rec), str(tmp_path / "x"), "--bleach", "exp", "--bleach-correction",
         "biexp"],
    )  # fmt: skip
    assert both.exit_code == 2 and "--bleach is the old name of --bleach-correction" in both.output


def test_top_level_help_reads_as_prose() -> None:
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0
    assert "``" not in r.output
    # the docstring's line breaks are joined: a sentence stays on one line when it fits
    assert any(
        "call the same library functions as the service's jobs" in ln
        for ln in r.output.splitlines()
    ), r.output
    seg = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    text = " ".join(seg.output.split())
    assert "calseg[nwb]" in text  # rich markup used to swallow [nwb]
    assert "auto" in text and "classical" in text


def test_python_dash_m_calseg_is_the_calseg_command() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "calseg", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "Usage: calseg" in out.stdout


def test_segment_cell_diameter_override(tmp_path: Path) -> None:
    """--cell-diameter-px (issue 17 item 3) overrides the estimate of either target; out of
    bounds is a user error."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(200, size=(12, 48, 48)).astype(np.uint16)
    frames[5:8, 10:20, 10:20] += 400
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, frames)
    lines = {}
    for name, flags in (
        ("given", ["--target", "cells", "--cell-diameter-px", "9"]),
        ("estimated", ["--target", "cells"]),
        ("active", ["--cell-diameter-px", "15"]),
    ):
        r = runner.invoke(app, ["segment", str(rec), str(tmp_path / name), *flags])
        assert r.exit_code == 0, r.output
        lines[name] = [ln for ln in r.output.splitlines() if ln.startswith("cell diameter")]
    assert lines["given"] == ["cell diameter 9.0 px"]
    assert "estimated from the recording" in lines["estimated"][0]
    assert lines["active"] == ["cell diameter 15.0 px"]
    bad = runner.invoke(app, ["segment", str(rec), str(tmp_path / "x"), "--cell-diameter-px", "1"])
    assert bad.exit_code == 2 and "--cell-diameter-px" in bad.output


def test_cli_sam2_base_is_the_one_demo_and_serve_use(monkeypatch, tmp_path: Path) -> None:
    """Without $CALSEG_SAM2_CHECKPOINT the CLI's SAM2 base is the small SAM2 trained here (as
    for make demo / make serve), not a random-weight sam2.1_hiera_t; with it, the named file."""
    from calseg.cli import _configured_checkpoint
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT

    monkeypatch.delenv("CALSEG_SAM2_CHECKPOINT", raising=False)
    assert BUNDLED_SMALL_CHECKPOINT.is_file()
    assert _configured_checkpoint() == BUNDLED_SMALL_CHECKPOINT
    monkeypatch.setenv("CALSEG_SAM2_CHECKPOINT", str(tmp_path / "sam2.1_hiera_tiny.pt"))
    assert _configured_checkpoint() == str(tmp_path / "sam2.1_hiera_tiny.pt")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--frame-interval-s", "nan"], "--frame-interval-s nan"),
        (["--frame-interval-s", "0"], "--frame-interval-s 0"),
        (["--frame-interval-s", "1e-300"], "from 0.0001 to 3600 s"),
        (["--frame-interval-s", "1e300"], "--frame-interval-s"),
        (["--pixel-size-um", "-3"], "--pixel-size-um -3"),
    ],
)
def test_segment_refuses_impossible_units(tmp_path: Path, flags: list[str], named: str) -> None:
    """Found by a fresh-user test: NaN gave exit 0 with no traces, 1e-300 a 300-digit rate,
    0 a silent 1 s, -3 a traceback from the scale bar. Each is a usage error (exit 2) naming
    the flag, before the recording is read; analyze too."""
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, np.zeros((4, 16, 16), np.uint16), photometric="minisblack")
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "out"), *flags])
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()
    lab = tmp_path / "labels.tif"
    tifffile.imwrite(lab, np.zeros((16, 16), np.uint16))
    r = runner.invoke(app, ["analyze", str(rec), str(lab), str(tmp_path / "an"), *flags])
    assert r.exit_code == 2 and named.split()[0] in r.output, r.output


def test_paths_with_brackets_are_printed_as_they_are(tmp_path: Path) -> None:
    """rich markup in a path (x[/y]) raised MarkupError (exit 1, traceback) and [red] vanished
    from the message; the CLI prints text as it is."""
    missing = tmp_path / "x[/y]" / "missing[red].tif"
    r = runner.invoke(app, ["segment", str(missing), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "missing[red].tif" in r.output and "Traceback" not in r.output


def test_segment_reads_one_channel_of_an_interleaved_file(tmp_path: Path) -> None:
    """The reader's hint names interleaved_channels and channel; calseg segment has them (as
    the infer job and calseg analyze do), plus --axes."""
    rng = np.random.default_rng(0)
    green = rng.poisson(300, (20, 32, 32)).astype(np.uint16)
    green[8:12, 8:16, 8:16] += 900
    red = rng.poisson(60, (20, 32, 32)).astype(np.uint16)
    rec = tmp_path / "two.tif"
    tifffile.imwrite(rec, np.stack([green, red], 1).reshape(-1, 32, 32), photometric="minisblack")
    for ch, expect in ((0, green), (1, red)):
        out = tmp_path / f"c{ch}"
        r = runner.invoke(
            app,
            ["segment", str(rec), str(out), "--interleaved-channels", "2", "--channel", str(ch)],
        )
        assert r.exit_code == 0, r.output
        assert tifffile.imread(out / "labels.tif").shape[0] == expect.shape[0]
    stacked = tmp_path / "czyx.tif"
    tifffile.imwrite(stacked, np.stack([green, red], 1), photometric="minisblack")  # (T, C, Y, X)
    r = runner.invoke(
        app, ["segment", str(stacked), str(tmp_path / "ax"), "--axes", "TCYX", "--channel", "1"]
    )
    assert r.exit_code == 0, r.output
    assert tifffile.imread(tmp_path / "ax" / "labels.tif").shape[0] == 20


def test_a_checkpoint_that_fixes_the_model_says_so(tmp_path: Path) -> None:
    """Found by a fresh-user test: an infer job asking for another model or input size ran
    the checkpoint's own (the small SAM2 at its trained input size) and said nothing; now a
    warning names what was asked for and what ran (not for the defaults, which every run
    has)."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(200, size=(6, 48, 48)).astype(np.uint16)
    frames[2:4, 10:20, 10:20] += 600
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, frames)
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "a"), "--method", "sam2",
                            "--image-size", "128"])  # fmt: skip
    assert r.exit_code == 0, r.output
    from calseg.segment.model import SMALL_IMAGE_SIZE

    assert "image_size 128 was asked for" in r.output
    assert f"image_size {SMALL_IMAGE_SIZE} was used" in r.output
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "b"), "--method", "sam2"])
    assert r.exit_code == 0 and "was asked for" not in r.output, r.output


def test_segment_refuses_a_recording_larger_than_memory_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a new-user check: the CLI read any recording whole (no decode budget), so a
    long recording ran the machine out of memory, and the only message (from a MemoryError)
    named ``max_frames``, which is no flag. The CLI now prices the run with the infer job's
    cost estimate against the memory this machine has available, refuses before decoding, and
    names ``--max-frames`` with the number of frames that fit.

    The machine's available memory is read once and held for the CLI call: MemAvailable moves
    between two reads (CI failed when the test's read and the CLI's read gave 594 and 595
    frames)."""
    import h5py

    import calseg.machine
    from calseg.cli import MEMORY_HEADROOM
    from calseg.service.costs import VideoShape, frames_within_memory
    from calseg.service.schemas import infer_params

    available = calseg.machine.available_memory_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo: the available memory is unknown")
    monkeypatch.setattr(calseg.machine, "available_memory_bytes", lambda: available)
    shape = (400_000, 1024, 1024)  # 800 GiB of uint16 declared; chunks never written: ~10 KB
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=shape, dtype="uint16", chunks=(1, 256, 256))
    assert path.stat().st_size < 10_000_000
    r = runner.invoke(app, ["segment", f"{path}:/data", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    params = infer_params().model_construct(method="auto", target="active")
    fit = frames_within_memory(params, VideoShape(*shape), MEMORY_HEADROOM * available)
    assert 0 < fit < shape[0]
    assert "400,000 frames of 1024 x 1024 px" in text and "Nothing was decoded" in text
    assert f"--max-frames {fit}" in text and "max_frames)" not in text
    assert not (tmp_path / "out").exists()


def test_available_memory_reads_meminfo_and_a_cgroup_limit(tmp_path: Path) -> None:
    """MemAvailable (kB) alone; the smaller of it and a cgroup v2 limit's headroom; ``None``
    where neither file can be read; a cgroup without a limit ("max") changes nothing."""
    from calseg.machine import available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemFree: 100 kB\nMemAvailable: 4000000 kB\n")
    cgroup = tmp_path / "cg"
    assert available_memory_bytes(meminfo, cgroup) == 4_000_000 * 1024
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert available_memory_bytes(meminfo, cgroup) == 4_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{2 * 1024**3}\n")
    (cgroup / "memory.current").write_text(f"{512 * 1024**2}\n")
    assert available_memory_bytes(meminfo, cgroup) == 2 * 1024**3 - 512 * 1024**2
    assert available_memory_bytes(tmp_path / "none", cgroup) == 2 * 1024**3 - 512 * 1024**2
    assert available_memory_bytes(tmp_path / "none", tmp_path / "nocg") is None


def test_segment_max_frames_reads_the_first_frames(tmp_path: Path) -> None:
    """``--max-frames N`` segments the first N frames and says so."""
    rec = tmp_path / "rec.tif"
    frames = np.random.default_rng(0).poisson(50, (30, 48, 48)).astype(np.uint16)
    tifffile.imwrite(rec, frames)
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "o"), "--max-frames", "12"])
    assert r.exit_code == 0, r.output
    assert "read the first 12 of 30 frames (--max-frames" in " ".join(r.output.split())
    bad = runner.invoke(app, ["segment", str(rec), str(tmp_path / "p"), "--max-frames", "0"])
    assert bad.exit_code == 2 and "--max-frames" in bad.output


def test_segment_of_an_all_nan_recording_says_it_once(tmp_path: Path) -> None:
    """Found by a new-user check: the reader's note and then the segmentation's error said
    the same thing in two wordings. The CLI now stops with the one text."""
    rec = tmp_path / "nan.tif"
    tifffile.imwrite(rec, np.full((6, 16, 16), np.nan, np.float32))
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert text.count("every value is NaN or Inf") == 1 and "note:" not in text
    assert not (tmp_path / "out").exists()


def test_no_flag_name_is_cut_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a new-user check: on an 80-column terminal ``--help`` showed
    ``--cell-diameter-…``: the boolean flags' ``--no-...`` column took the width. Flags that
    are off by default now have their positive form only."""
    import click
    import typer
    import typer.rich_utils

    # typer reads TERMINAL_WIDTH once, when it first draws a help (another test: 200)
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 80)

    root = typer.main.get_command(app)
    paths: list[list[str]] = []
    for name, cmd in root.commands.items():
        if isinstance(cmd, click.Group):
            paths += [[name, sub] for sub in cmd.commands]
        else:
            paths.append([name])
    assert len(paths) > 15
    for path in paths:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert r.exit_code == 0, (path, r.output)
        assert "…" not in r.output, (path, r.output)
        assert max(len(line) for line in r.output.splitlines()) <= 80, path


def test_output_paths_are_printed_whole_into_a_pipe(tmp_path: Path) -> None:
    """Found by a new-user check: ``calseg segment ... | cat`` broke a 100-character output
    path across two lines (rich wrapped at 80 columns), so scripts got broken paths; the
    activity map's TIFF was written but not listed."""
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, np.random.default_rng(0).poisson(50, (20, 40, 40)).astype(np.uint16))
    out = tmp_path / ("d" * 100)
    r = runner.invoke(app, ["segment", str(rec), str(out)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for name in ("labels.tif", "overlay.png", "activity.tif"):
        assert f"{name}: {out / name}" in lines, r.output


def test_an_early_error_prints_alone(tmp_path: Path) -> None:
    """Found by a new-user check: '--method bogus' printed a blank line (the progress bar,
    started and cleared) before its one error line."""
    rec = tmp_path / "rec.tif"
    tifffile.imwrite(rec, np.random.default_rng(0).poisson(50, (8, 32, 32)).astype(np.uint16))
    r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "o"), "--method", "bogus"])
    assert r.exit_code == 2 and r.output.startswith("error: bad segmentation option"), r.output


def test_segment_of_a_recording_with_a_float32_maximum_pixel(tmp_path: Path) -> None:
    """Found by a new-user check: one pixel at the float32 maximum gave "strongest z =
    36065164101432017307883001880822939648.00" (38 digits, most of them noise) and a leaked
    overflow warning from the overlay. Now the z is written in exponent form and no warning
    leaks."""
    import re
    import warnings

    rec = tmp_path / "fmax.tif"
    frames = np.random.default_rng(0).poisson(100, (20, 64, 64)).astype(np.float32)
    frames[5, 10, 10] = np.finfo(np.float32).max
    tifffile.imwrite(rec, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = runner.invoke(app, ["segment", str(rec), str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "strongest z = 3.61e+37" in text, text
    assert re.search(r"\d{16}", text) is None and "RuntimeWarning" not in text
