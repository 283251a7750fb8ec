"""CSV exports of traces and events (calseg.io.tables), read back with the csv module/numpy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from calseg.analysis.events import detect_events
from calseg.analysis.traces import baseline_f0, cell_traces, dff, footprint_image
from calseg.io.rois import read_imagej_rois
from calseg.io.tables import (
    EVENT_COLUMNS,
    TRACE_COLUMNS,
    TableError,
    read_events_csv,
    read_traces_csv,
    write_events_csv,
    write_traces_csv,
)
from calseg.pipelines.traces import write_trace_exports


def _recording():
    """A (40, 24, 30) recording with 3 square cells; cell 5 has a transient in frames 20-25."""
    rng = np.random.default_rng(2)
    frames = (200 + 5 * rng.standard_normal((40, 24, 30))).astype(np.float32)
    labels = np.zeros((40, 24, 30), np.uint16)
    labels[:, 2:8, 2:8] = 3
    labels[20:26, 10:16, 10:16] = 5  # labelled only while active
    labels[:, 16:22, 20:28] = 11
    frames[20:26, 10:16, 10:16] += 300.0
    frames[:, 16:22, 20:28] = 0.01  # a background-level "cell": tiny F0, flagged
    return frames, labels


def test_traces_csv_round_trip(tmp_path):
    frames, labels = _recording()
    ids, f = cell_traces(frames, labels)
    f0 = baseline_f0(f, 2.0, window_s=40.0)
    d, flags = dff(f, f0)
    assert flags.tolist() == [False, False, True]
    p = write_traces_csv(tmp_path / "traces.csv", ids, f, f0, d, 2.0)
    with p.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == TRACE_COLUMNS
    assert len(rows) == 1 + 3 * 40
    assert rows[1][:3] == ["3", "0", "0"] and rows[-1][:3] == ["11", "39", "78"]
    assert rows[-1][5] == ""  # NaN dF/F of the flagged cell is an empty field
    back = read_traces_csv(p)
    np.testing.assert_array_equal(back["ids"], ids)
    np.testing.assert_allclose(back["time_s"], np.arange(40) * 2.0)
    np.testing.assert_allclose(back["F"], f, rtol=1e-6)
    np.testing.assert_allclose(back["F0"], f0, rtol=1e-6)
    np.testing.assert_allclose(back["dff"], d, rtol=1e-6, atol=1e-7)  # NaN == NaN here
    # numpy reads it too
    arr = np.genfromtxt(p, delimiter=",", names=True)
    assert arr.shape == (120,) and arr.dtype.names == TRACE_COLUMNS
    with pytest.raises(TableError, match="need"):
        write_traces_csv(tmp_path / "x.csv", ids[:2], f, f0, d, 2.0)


def test_events_csv_round_trip(tmp_path):
    frames, labels = _recording()
    ids, f = cell_traces(frames, labels)
    d, _ = dff(f, baseline_f0(f, 2.0, window_s=40.0))
    events = detect_events(d, 2.0, cell_ids=ids)
    assert [(e.cell_id, e.onset_frame, e.offset_frame) for e in events] == [(5, 20, 26)]
    p = write_events_csv(tmp_path / "events.csv", events)
    back = read_events_csv(p)
    assert len(back) == 1 and tuple(back[0]) == EVENT_COLUMNS
    e = events[0]
    assert back[0]["cell_id"] == 5 and back[0]["truncated"] is False
    assert back[0]["onset_s"] == 40.0 and back[0]["duration_s"] == 12.0
    assert back[0]["amplitude"] == pytest.approx(e.amplitude, rel=1e-6)
    assert back[0]["auc"] == pytest.approx(e.auc, rel=1e-6)
    assert e.amplitude == pytest.approx(1.5, rel=0.05)  # 300 over a 200 baseline


def test_write_trace_exports_and_rois(tmp_path):
    frames, labels = _recording()
    res = write_trace_exports(tmp_path, frames, labels, 2.0, window_s=40.0)
    assert (res["n_cells"], res["n_events"], res["n_flagged"]) == (3, 1, 1)
    assert set(res["paths"]) == {
        "traces.csv",
        "events.csv",
        "rois.zip",
        "traces.parquet",
        "events.parquet",
        "patterns.json",
        "waves.json",
    }
    back = read_imagej_rois(res["paths"]["rois.zip"], labels.shape[1:])
    fp = footprint_image(labels)
    # ids are renumbered by the reader; the footprints must be the same pixel sets
    assert len(np.unique(back[back > 0])) == 3
    np.testing.assert_array_equal(back > 0, fp > 0)


def test_exports_open_in_pyarrow_pynwb_and_json(tmp_path):
    """Parquet read back with pyarrow, NWB with pynwb, patterns/waves JSON with json."""
    import json

    import pyarrow.parquet as pq

    pynwb = pytest.importorskip("pynwb")
    frames, labels = _recording()
    res = write_trace_exports(tmp_path, frames, labels, 2.0, window_s=40.0, nwb=True)
    csv_tr = read_traces_csv(res["paths"]["traces.csv"])
    tr = pq.read_table(res["paths"]["traces.parquet"]).to_pydict()
    assert list(tr) == list(TRACE_COLUMNS)
    assert len(tr["F"]) == 3 * 40
    f = np.array(tr["F"]).reshape(3, 40)
    np.testing.assert_allclose(f, csv_tr["F"], rtol=1e-6)
    assert sorted(set(tr["cell_id"])) == [3, 5, 11]
    dff_pq = np.array(tr["dff"], dtype=float).reshape(3, 40)
    assert np.isnan(dff_pq[2]).all() and np.isfinite(dff_pq[:2]).all()  # cell 11 flagged
    ev = pq.read_table(res["paths"]["events.parquet"]).to_pylist()
    assert len(ev) == 1 and ev[0]["cell_id"] == 5 and ev[0]["onset_frame"] == 20
    from_csv = read_events_csv(res["paths"]["events.csv"])[0]
    assert set(ev[0]) == set(from_csv)
    for key, value in from_csv.items():
        assert ev[0][key] == pytest.approx(value, rel=1e-6), key
    with pynwb.NWBHDF5IO(str(res["paths"]["calseg.nwb"]), "r") as io:
        nwb = io.read()
        ophys = nwb.processing["ophys"]
        ps = ophys["ImageSegmentation"]["PlaneSegmentation"]
        assert list(ps["cell_id"][:]) == [3, 5, 11]
        # sparse pixel masks (x, y, weight): a dense (H, W) mask per cell made 272 MB files
        cell5 = np.zeros(labels.shape[-2:], bool)
        for x, y, w in ps["pixel_mask"][1]:
            assert w == 1.0
            cell5[int(y), int(x)] = True
        np.testing.assert_array_equal(cell5, footprint_image(labels) == 5)
        assert "image_mask" not in ps.colnames
        f_nwb = np.asarray(ophys["Fluorescence"]["F"].data[:])  # (T, N)
        np.testing.assert_allclose(f_nwb.T, f, rtol=1e-6)
        assert ophys["Fluorescence"]["F"].rate == pytest.approx(0.5)
    pat = json.loads(res["paths"]["patterns.json"].read_text())
    assert pat["pattern_class"] == res["pattern_class"] == "spikes"  # one isolated cell fired
    assert pat["features"]["n_events"] == 1
    waves = json.loads(res["paths"]["waves.json"].read_text())
    assert waves["waves"] == [] and waves["speed_unit"] == "px/s"


def test_nwb_without_pynwb_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from calseg.io.tables import write_nwb

    real_import = builtins.__import__

    def no_pynwb(name, *a, **k):
        if name.startswith("pynwb"):
            raise ImportError("No module named 'pynwb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynwb)
    with pytest.raises(TableError, match=r"pip install 'calseg\[nwb\]'"):
        write_nwb(
            tmp_path / "x.nwb",
            np.array([1]),
            np.ones((1, 3)),
            np.ones((1, 3)),
            np.ones((4, 4), np.uint8),
            1.0,
        )


class _StubContext:
    """The parts of calseg.service.jobs.JobContext that run_infer uses, without a database."""

    def __init__(self, workdir, recording):
        from calseg.service.settings import Settings

        self.workdir = workdir
        self.settings = Settings(cache_dir=workdir / "cache", sam2_checkpoint=None)
        self.embedding_cache_dir = self.settings.embedding_cache_dir / "user-none"
        self.recording = recording
        self.artifacts: dict[str, object] = {}
        self.warnings: list[str] = []
        self.logs: list[str] = []

    def recording_path(self, _rid):
        return self.recording

    def recording_read_options(self, _rid):
        return {}  # uploaded with the reader's defaults

    def relpath(self, p):
        return str(p)

    def progress(self, *_a):
        pass

    def log(self, m):
        self.logs.append(m)

    def warn(self, m):
        self.warnings.append(m)

    def add_artifact(self, name, path, content_type=None, kind="file"):
        self.artifacts[name] = path

    def add_metric(self, *_a, **_k):
        pass

    def jsonable(self, x):
        return x

    def estimate(self):  # no database: an estimate of nothing
        from calseg.service.costs import CostEstimate

        return CostEstimate(0.0, 0.0, 0.0)

    def readmit(self, est, why):  # no limits to check; the re-estimate is recorded
        self.readmitted = (est, why)


def test_infer_runner_registers_traces_events_rois(tmp_path, real_file):

    from calseg.service.runners import run_infer
    from calseg.service.schemas import validate_params

    real = real_file("astrocast_sample_1.tiff")
    ctx = _StubContext(tmp_path, real)
    params = {"recording_id": "r", "method": "baseline", "nwb": True}
    res = run_infer(validate_params("infer", params), ctx)
    assert {
        "labels.tif",
        "traces.csv",
        "events.csv",
        "rois.zip",
        "traces.parquet",
        "events.parquet",
        "patterns.json",
        "waves.json",
        "calseg.nwb",
    } <= set(ctx.artifacts)
    _exports_open_in_their_readers(ctx.artifacts, res)
    tr = read_traces_csv(ctx.artifacts["traces.csv"])
    assert tr["F"].shape == (res["n_cells"], res["n_frames"])
    # admitted again with its cells before their traces were written (a 9th attack run)
    est, why = ctx.readmitted
    assert est.inputs["n_cells"] == res["n_cells"] and "traces, events and ROIs of" in why
    assert np.isfinite(tr["F"]).all()
    # the file has no frame interval: 1 s assumed, and the job says so
    np.testing.assert_allclose(tr["time_s"], np.arange(res["n_frames"]))
    assert any("frame interval" in w for w in ctx.warnings)
    ev = read_events_csv(ctx.artifacts["events.csv"])
    assert all(e["cell_id"] in set(tr["ids"].tolist()) for e in ev)
    rois = read_imagej_rois(ctx.artifacts["rois.zip"], (res["height"], res["width"]))
    assert len(np.unique(rois[rois > 0])) == res["n_cells"]


def _exports_open_in_their_readers(artifacts, res):
    """Each export of an infer job read back by its format's own Python reader."""
    import json

    import pyarrow.parquet as pq
    import roifile
    import tifffile

    with tifffile.TiffFile(artifacts["labels.tif"]) as tf:  # Fiji reads ImageJ hyperstacks
        assert tf.is_imagej and tf.imagej_metadata["images"] == res["n_frames"]
        assert tf.series[0].axes == "TYX"
        lab = tf.asarray()
    assert lab.shape == (res["n_frames"], res["height"], res["width"])
    rois = roifile.roiread(artifacts["rois.zip"])
    assert len(rois) == res["n_cells"]
    tr = pq.read_table(artifacts["traces.parquet"])
    assert tr.num_rows == res["n_cells"] * res["n_frames"]
    assert pq.read_table(artifacts["events.parquet"]).num_rows == res["n_events"]
    pat = json.loads(Path(artifacts["patterns.json"]).read_text())
    assert pat["pattern_class"] == res["pattern_class"]
    assert pat["pattern_class"] in ("spikes", "transients", "waves", "fluttering", "none")
    assert "waves" in json.loads(Path(artifacts["waves.json"]).read_text())
    pynwb = pytest.importorskip("pynwb")
    with pynwb.NWBHDF5IO(str(artifacts["calseg.nwb"]), "r") as io:
        nwb = io.read()
        f = nwb.processing["ophys"]["Fluorescence"]["F"].data[:]
        assert f.shape == (res["n_frames"], res["n_cells"])


def test_infer_runner_on_a_simulated_video_with_preprocessing(tmp_path):
    """Infer on a simulated waves video with drift registration, background subtraction and
    bleach correction on: the job reports them, uses the dataset's frame interval and pixel
    size, and its patterns.json names a class."""
    import json

    from calseg.service.runners import run_infer
    from calseg.service.schemas import validate_params
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    cfg = SimulationConfig(
        n_videos=2,
        n_frames=40,
        height=96,
        width=96,
        pattern_classes=["waves"],
        n_val_videos=0,
        n_test_videos=1,
        mean_cell_area_px=60,
        seed=4,
    )
    simulate_dataset(cfg, tmp_path / "ds")
    ctx = _StubContext(tmp_path / "job", None)
    ctx.workdir.mkdir()
    ctx.dataset_dir = lambda _jid: tmp_path / "ds"
    params = {
        "dataset_job_id": "d",
        "video_id": "v001",
        "method": "baseline",
        "register_drift": True,
        "background": "opening",
        "background_radius_px": 15,
        "bleach_correction": "exp",
    }
    res = run_infer(validate_params("infer", params), ctx)
    assert res["frame_interval_s"] == cfg.frame_interval_s
    assert res["pixel_size_um"] == cfg.pixel_size_um
    steps = res["preprocess"]["steps"]
    assert [s.split()[0].rstrip(":") for s in steps] == [
        "registered",
        "background",
        "photobleaching",
    ]
    pat = json.loads(Path(ctx.artifacts["patterns.json"]).read_text())
    assert pat["pattern_class"] == res["pattern_class"]
    assert json.loads(Path(ctx.artifacts["waves.json"]).read_text())["speed_unit"] == "um/s"
    with pytest.raises(Exception, match="background"):
        validate_params("infer", {**params, "background": "tophat"})


def test_the_documented_event_columns_are_the_written_ones():
    """The module docstring's events header lacked ``rest`` (a new-user check); it is read
    here so that it cannot drift from the CSV again."""
    import calseg.io.tables as tables

    assert ",".join(EVENT_COLUMNS) in "".join(tables.__doc__.split())  # whitespace dropped
