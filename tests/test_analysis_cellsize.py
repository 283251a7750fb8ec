"""The cell-diameter estimate (calseg.analysis.cellsize) on simulated recordings of known cell
size, including make demo's test videos where the old selection rule took clusters of cells."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.analysis.cellsize import cell_diameter_or_prior, estimate_cell_diameter
from calseg.segment._data import split_videos
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset


def _active_diameter(labels: np.ndarray) -> float:
    """Equivalent diameter (px) of the median active cell area over all frames."""
    areas = []
    for frame in labels:
        counts = np.bincount(frame.ravel())[1:]
        areas.extend(counts[counts > 0])
    return float(2 * np.sqrt(np.median(areas) / np.pi))


@pytest.fixture(scope="module")
def demo_test_videos(tmp_path_factory):
    ds = tmp_path_factory.mktemp("cellsize") / "ds"
    cfg = SimulationConfig(n_videos=8, n_frames=48, height=128, width=128,
                           pattern_classes=["waves", "transients"], seed=0,
                           n_val_videos=1, n_test_videos=3)  # fmt: skip
    simulate_dataset(cfg, ds)  # make demo's dataset (calseg.demo defaults)
    return split_videos(ds, "test")


def test_estimate_does_not_take_cell_clusters(demo_test_videos):
    """With 'the largest scale holding 30 % of the strongest maximum' the estimate was 23.1 px
    for 11.3 px cells on v006 (+104 %) and the classical method found no cell there; the
    strongest maximum gives 8.6-11.1 px on the three videos (-26 % to -1 %)."""
    errors = {}
    for v in demo_test_videos:
        est = estimate_cell_diameter(np.asarray(v.load_image()))
        true_d = _active_diameter(np.asarray(v.load_labels()))
        assert est.found, (v.id, est.note)
        errors[v.id] = est.diameter_px / true_d - 1
    assert all(-0.3 <= e <= 0.3 for e in errors.values()), errors


def test_no_cell_texture_keeps_the_prior():
    rng = np.random.default_rng(0)
    noise = rng.poisson(300, (30, 64, 64)).astype(np.uint16)
    d, estimated = cell_diameter_or_prior(noise, 11.0)
    assert (d, estimated) == (11.0, False)


def test_estimate_and_segmentation_ignore_a_camera_offset(demo_test_videos):
    """Found by a fresh-user test: +20000 counts moved the estimate from 8.6 to 25 px (scipy's
    truncated LoG kernels do not sum to 0) and the classical method from 44 cells to 6; the
    estimate is now the same with any offset or gain, and the recording's floor gets a note."""
    from calseg.analysis.evidence import offset_notes

    image = np.asarray(demo_test_videos[0].load_image()).astype(np.float32)
    ref = estimate_cell_diameter(image).diameter_px
    for changed in (image + 1000, image + 20000, image * 4, image + 60000):
        assert estimate_cell_diameter(changed).diameter_px == pytest.approx(ref, rel=1e-6)
    assert offset_notes(image) == []
    (note,) = offset_notes(image + 20000)
    assert "floor of 20113" in note and "Subtract 20113" in note
