"""Geometry: Voronoi tissue statistics and the edge-weighted Laplacian (DESIGN.md section 2)."""

import numpy as np
import pytest

from calseg.simulate.geometry import GeometryError, make_tissue, tissue_from_labels


@pytest.mark.parametrize("shape,irregularity", [("pouch", 0.0), ("rectangle", 0.5)])
def test_voronoi_tissue_statistics(shape, irregularity):
    t = make_tissue(200, 240, 80, shape, np.random.default_rng(3), irregularity=irregularity)
    st = t.stats()
    # N = tissue area / mean area, within 10 %.
    expected = (t.labels > 0).sum() / 80
    assert abs(t.n_cells - expected) / expected < 0.1
    deg = t.degree[~t.boundary]
    assert deg.min() >= 4 and deg.max() <= 9
    assert 5.3 <= st["mean_degree_interior"] <= 6.2
    # Ids are 1..N and every cell is non-empty.
    ids = np.unique(t.labels)
    assert np.array_equal(ids[ids > 0], np.arange(1, t.n_cells + 1))
    assert t.areas.min() > 0


def test_laplacian_symmetric_rows_sum_to_zero():
    t = make_tissue(128, 128, 60, "pouch", np.random.default_rng(0))
    lap = t.laplacian
    assert abs(lap - lap.T).max() < 1e-12
    assert np.abs(np.asarray(lap.sum(axis=1))).max() < 1e-9
    off = lap - np.diag(lap.diagonal())
    assert off.min() >= 0
    # Weights are shared edge lengths: a few px per edge, about a hexagon side.
    w = lap.data[lap.data > 0]
    side = np.sqrt(2 * t.areas.mean() / (3 * np.sqrt(3)))
    scale = t.info["edge_scale"]
    assert 0.5 * side < (w / scale).mean() * np.pi / 4 < 1.5 * side


def test_user_label_image_edges():
    # Two 3x3 cells side by side share 3 boundary pixel pairs; a third touches only cell 2.
    lab = np.zeros((5, 10), np.int32)
    lab[1:4, 1:4] = 7
    lab[1:4, 4:7] = 9
    lab[1:3, 7:9] = 11
    t = tissue_from_labels(lab, reference_area_px=9.0)
    assert t.n_cells == 3
    assert t.edge_px[0, 1] == 3 and t.edge_px[1, 2] == 2 and t.edge_px[0, 2] == 0
    assert np.array_equal(t.degree, [1, 2, 1])


def test_bad_requests_raise_clear_errors():
    with pytest.raises(GeometryError, match="cells"):
        make_tissue(64, 64, 100, "pouch", np.random.default_rng(0))
    with pytest.raises(GeometryError, match="2-D integer"):
        tissue_from_labels(np.zeros((4, 4), float))


def test_coupling_is_a_property_of_the_tissue_not_of_the_render_scale():
    """Edge lengths are expressed in the source's pixels (mean cell area 204 px): the same
    tissue rendered with 100 px or 204 px cells couples each cell to its neighbours equally
    (mean summed edge weight per interior cell within 3 %, about 3.7 x sqrt(204) = 52.8 for
    hexagon-like cells, whose perimeter is 3.72 sqrt(area)); without the scaling the 100 px
    rendering would couple sqrt(100 / 204) = 0.70 times as strongly."""
    coupling = []
    for area, side in ((100.0, 300), (204.0, 428)):
        t = make_tissue(side, side, area, "rectangle", np.random.default_rng(5))
        coupling.append(float(-t.laplacian.diagonal()[~t.boundary].mean()))
    assert abs(coupling[0] / coupling[1] - 1) < 0.03, coupling
    assert 3.5 * np.sqrt(204) < coupling[1] < 4.0 * np.sqrt(204), coupling
