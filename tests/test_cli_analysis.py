"""calseg analyze (real recording + ImageJ ROIs as labels) and calseg validate-patterns."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from typer.testing import CliRunner

from calseg.cli import app
from calseg.io.labels import write_label_stack
from calseg.io.rois import read_imagej_rois
from calseg.io.tables import read_traces_csv

runner = CliRunner()


def test_analyze_real_recording_with_its_imagej_rois(tmp_path, real_file):
    """The hand-drawn ImageJ ROIs of sima_example.tif, imported as a label image, then analysed
    with drift registration and bleach correction on."""
    rec = real_file("sima_example.tif")
    lab = read_imagej_rois(real_file("sima_example_imageJ_ROIs.zip"), (128, 256))
    assert len(np.unique(lab[lab > 0])) == 2
    labels = write_label_stack(tmp_path / "rois.tif", lab)
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            "analyze",
            str(rec),
            str(labels),
            str(out),
            "--frame-interval",
            "0.5",
            "--register",
            "--background",
            "opening",
            "--background-radius",
            "20",
            "--pixel-size",
            "1.2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "registered" in r.output and "pattern:" in r.output
    tr = read_traces_csv(out / "traces.csv")
    assert tr["F"].shape == (2, 20)
    np.testing.assert_allclose(tr["time_s"], np.arange(20) * 0.5)
    pat = json.loads((out / "patterns.json").read_text())
    assert pat["features"]["n_cells"] == 2
    assert json.loads((out / "waves.json").read_text())["speed_unit"] == "um/s"
    # the ROI zip written back holds the same two cells
    back = read_imagej_rois(out / "rois.zip", (128, 256))
    np.testing.assert_array_equal(back > 0, lab > 0)


def test_analyze_refuses_labels_of_another_size(tmp_path, real_file):
    rec = real_file("sima_example.tif")
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, np.ones((10, 10), np.uint16))
    r = runner.invoke(app, ["analyze", str(rec), str(bad), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "do not fit the recording" in r.output
    r = runner.invoke(
        app, ["analyze", str(rec), str(bad), str(tmp_path / "o"), "--bleach", "linear"]
    )
    assert r.exit_code == 2
    r = runner.invoke(
        app, ["analyze", str(rec), str(bad), str(tmp_path / "o"), "--z-projection", "sum"]
    )
    assert r.exit_code == 2 and "z_projection must be one of" in r.output


def test_validate_patterns_prints_a_confusion_matrix(tmp_path):
    out = tmp_path / "rep.json"
    r = runner.invoke(
        app, ["validate-patterns", "--seeds", "3", "--frames", "160", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "| true \\ predicted | spikes | transients | waves | fluttering | none |" in r.output
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and np.asarray(rep["matrix"]).sum() == 4
    m = np.asarray(rep["matrix"])
    assert m[2, 2] == 1 and m[3, 3] == 1  # waves and fluttering of seed 3 recognised
    r = runner.invoke(app, ["validate-patterns", "--seeds", "x-y"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_analyze_without_preprocessing_reads_in_chunks_same_traces(tmp_path, real_file):
    """No preprocessing: traces come from chunks (iter_recording), equal to the in-memory ones."""
    from calseg.analysis.traces import cell_traces
    from calseg.io.recordings import read_recording

    rec = real_file("sima_example.tif")
    lab = read_imagej_rois(real_file("sima_example_imageJ_ROIs.zip"), (128, 256))
    labels = write_label_stack(tmp_path / "rois.tif", lab)
    r = runner.invoke(app, ["analyze", str(rec), str(labels), str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "1 s assumed" in r.output  # sima_example.tif has no frame interval
    got = read_traces_csv(tmp_path / "o" / "traces.csv")
    ids, f = cell_traces(read_recording(rec).frames, lab)
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_allclose(got["F"], f, rtol=1e-6)


def test_analyze_checks_its_preprocessing_options_before_reading(tmp_path):
    """Found by a new-user check: ``--bleach-correction exponential`` was refused only after the
    whole recording had been read (and its notes printed), which on a long recording costs
    minutes. The options are checked first: here the recording does not even exist."""
    missing = tmp_path / "not-there.tif"
    for flag, value, name in [
        ("--bleach-correction", "exponential", "--bleach-correction must be exp or biexp"),
        ("--background", "rolling", "--background must be opening, rolling_ball or gaussian"),
    ]:
        r = runner.invoke(app, ["analyze", str(missing), str(missing), str(tmp_path / "o"),
                                flag, value])  # fmt: skip
        assert r.exit_code == 2 and name in r.output and "not-there" not in r.output, r.output
