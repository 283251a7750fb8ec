"""Dataset format calseg-dataset v1: writing, reading, split by video, bit-identical rebuild."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from calseg.io.dataset import DatasetError, load_dataset
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import regenerate_dataset, simulate_dataset, simulate_videos
from calseg.simulate.render import INTENSITY_DEFECTS

TINY = dict(
    n_videos=4,
    n_frames=8,
    height=96,
    width=96,
    mean_cell_area_px=40,
    search_horizon_s=900,
    warmup_s=100,
    n_val_videos=1,
    n_test_videos=1,
    seed=11,
)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    calls = []
    manifest = simulate_dataset(SimulationConfig(**TINY), out, lambda f, s, m=None: calls.append(f))
    return out, manifest, calls


def test_round_trip(tiny_dataset):
    out, manifest, calls = tiny_dataset
    assert calls and calls[-1] == 1.0 and bool(np.all(np.diff(calls) >= 0))
    ds = load_dataset(out)
    assert load_dataset(manifest).videos[0].id == ds.videos[0].id
    assert ds.manifest["format"] == "calseg-dataset" and ds.manifest["version"] == 1
    assert [v.pattern_class for v in ds.videos] == ["waves", "transients"] * 2
    for v in ds.videos:
        img, lab, cells, cal = v.load_image(), v.load_labels(), v.load_cells(), v.load_calcium()
        assert img.dtype == np.uint16 and img.shape == (8, 96, 96)
        assert lab.dtype == np.uint32 and cells.shape == (96, 96)
        assert cal.dtype == np.float32 and cal.shape == (v.n_cells, 8)
        assert cells.max() == v.n_cells
        for t in range(8):
            ids = set(np.unique(lab[t]).tolist()) - {0}
            assert ids <= set((np.flatnonzero(cal[:, t] > 0.1) + 1).tolist())
        assert "severity" in v.defects["drift"]


def test_split_by_video(tiny_dataset):
    ds = load_dataset(tiny_dataset[0])
    splits = {name: {v.id for v in ds.split(name)} for name in ("train", "val", "test")}
    assert len(splits["val"]) == 1 and len(splits["test"]) == 1 and len(splits["train"]) == 2
    assert not (
        splits["train"] & splits["val"]
        or splits["train"] & splits["test"]
        or splits["val"] & splits["test"]
    )
    assert set().union(*splits.values()) == {v.id for v in ds.videos}
    assert len({v.seed for v in ds.videos}) == 4


def test_bit_identical_regeneration(tiny_dataset, tmp_path):
    out, manifest, _ = tiny_dataset
    again = regenerate_dataset(manifest, tmp_path / "again")
    assert json.loads(again.read_text()) == json.loads(manifest.read_text())
    for v in load_dataset(out).videos:
        for name in ("image.tif", "labels.tif", "cells.tif", "calcium.npy"):
            a = (out / v.id / name).read_bytes()
            assert a == (tmp_path / "again" / v.id / name).read_bytes(), (v.id, name)


def test_other_seed_differs():
    a = simulate_videos(SimulationConfig(**{**TINY, "n_videos": 3}))
    b = simulate_videos(SimulationConfig(**{**TINY, "n_videos": 3, "seed": 12}))
    assert not np.array_equal(a[0]["image"], b[0]["image"])
    # Video i's content does not depend on how many videos follow it.
    assert np.array_equal(
        a[0]["tissue"].labels, simulate_videos(SimulationConfig(**TINY))[0]["tissue"].labels
    )


def test_intensity_defects_through_the_dataset(tiny_dataset, tmp_path):
    """Switched on in the config, the global intensity defects reach every video's manifest
    entry and image; the ground truth is the dataset's without them."""
    out, _, _ = tiny_dataset
    on = {k: {"severity": 0.6} for k in INTENSITY_DEFECTS}
    manifest = simulate_dataset(SimulationConfig(**TINY, defects=on), tmp_path / "on")
    ds, base = load_dataset(manifest), load_dataset(out)
    assert ds.manifest["config"]["defects"]["auto_gain"] == {"enabled": None, "severity": 0.6}
    for v, b in zip(ds.videos, base.videos, strict=True):
        assert all(v.defects[k]["severity"] == 0.6 for k in INTENSITY_DEFECTS)
        assert all(b.defects[k]["severity"] == 0.0 for k in INTENSITY_DEFECTS)
        assert np.array_equal(v.load_labels(), b.load_labels())
        assert np.array_equal(v.load_calcium(), b.load_calcium())
        assert not np.array_equal(v.load_image(), b.load_image())
        assert v.load_image().max() == 65535  # contrast normalisation stretches every frame


def test_config_validation_messages():
    with pytest.raises(ValidationError, match="training video"):
        SimulationConfig(n_videos=2, n_val_videos=1, n_test_videos=1)
    with pytest.raises(ValidationError, match="model_overrides"):
        SimulationConfig(model_overrides={"Vplc_typo": 1.0})
    with pytest.raises(ValidationError, match="cells"):
        SimulationConfig(height=64, width=64)
    with pytest.raises(ValidationError):
        SimulationConfig(pattern_classes=["storms"])
    with pytest.raises(ValidationError):
        SimulationConfig(colour="red")
    assert SimulationConfig(model_overrides={"Dp": 0.01}).model_parameters().Dc == 0.001


def test_reader_errors(tmp_path, tiny_dataset):
    with pytest.raises(DatasetError, match="no dataset manifest"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DatasetError, match="not a calseg-dataset"):
        load_dataset(tmp_path)
    m = json.loads(tiny_dataset[1].read_text())
    m["videos"][0]["image"] = "missing.tif"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(tmp_path).videos[0].load_image()
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset(tiny_dataset[0]).split("holdout")


def test_default_dataset_shows_activity():
    """Demo requirement: in the default 64-frame videos, waves have > 5 % of cells active in most
    frames and transients have active cells in a good fraction of frames."""
    for v in simulate_videos(SimulationConfig(defect_severity=0.0)):
        frac = (v["calcium"] > 0.1).mean(axis=0)
        if v["pattern_class"] == "waves":
            assert (frac > 0.05).mean() >= 0.6, (v["id"], frac)
        else:
            assert (frac > 0).mean() >= 0.5, (v["id"], frac)


def test_three_frame_videos_stay_grayscale_stacks(tmp_path):
    """tifffile stores a (3, H, W) stack as one RGB image unless told otherwise: the dataset
    must still hold 3 frames (a bug found by the benchmark)."""
    cfg = SimulationConfig(**{**TINY, "n_frames": 3})
    ds = load_dataset(simulate_dataset(cfg, tmp_path / "ds"))
    for v in ds.videos:
        assert v.load_image().shape == (3, cfg.height, cfg.width)
        assert v.load_labels().shape == (3, cfg.height, cfg.width)
