"""All cells on a temporal projection (``target="cells"``): synthetic cells of known size and
position, and the two real recordings with hand-drawn ROIs (measured values, see
BENCHMARKS.md "Sim-to-real")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from calseg.analysis.metrics import instance_iou_matrix
from calseg.pipelines.real_eval import grid_control, score_projection
from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.segment.projection import (
    ProjectionError,
    projection_cell_diameter,
    projection_image,
    segment_projection,
)


def _real(real_file, rec: str, rois: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(T, H, W)`` of a real recording and its ImageJ ROIs as a label image ``(H, W)``
    (``real_file``: the conftest fixture, which skips when a file is absent)."""
    from calseg.io.recordings import read_recording
    from calseg.io.rois import read_imagej_rois

    p, z = real_file(rec), real_file(rois)
    frames = read_recording(p).frames
    return frames, read_imagej_rois(z, frames.shape[1:])


def _tissue(spacing: float = 16.0, size: int = 128, t: int = 12, seed: int = 0):
    """Packed cells (Voronoi cells of a jittered hexagonal lattice): bright cytoplasm, a dark
    nucleus of radius 0.3 x spacing at each centre, dark 1-px membranes, Poisson noise on an
    offset. Returns ``(frames (T, H, W) float32, cells (H, W) int, centres (N, 2))``."""
    rng = np.random.default_rng(seed)
    pts = []
    for i, y in enumerate(np.arange(-spacing, size + spacing, spacing * np.sqrt(3) / 2)):
        for x in np.arange(-spacing, size + spacing, spacing):
            pts.append((y, x + (spacing / 2 if i % 2 else 0)))
    pts = np.array(pts) + rng.normal(0, 1.0, (len(pts), 2))
    yy, xx = np.mgrid[:size, :size]
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    near = np.argmin(d2, axis=-1)
    cells = near + 1
    membrane = ndi.morphological_gradient(cells, size=2) > 0
    nucleus = np.min(d2, axis=-1) < (0.3 * spacing) ** 2
    img = np.where(membrane, 30.0, 120.0)
    img = np.where(nucleus, 35.0, img)
    img = ndi.gaussian_filter(img, 1.0) + 20.0
    frames = rng.poisson(np.broadcast_to(img, (t, size, size)) * 1.0).astype(np.float32)
    return frames, cells, pts


def test_synthetic_cells_recovered_with_their_size():
    frames, cells, _ = _tissue()
    # lattice spacing 16 px -> cell area sqrt(3)/2 * 16^2 = 222 px, equivalent diameter 16.8 px.
    # These cells are all equally bright: no cell-scale brightness mosaic, only nuclei and
    # membranes, finer than a cell, so calseg.analysis.cellsize gives no estimate and the
    # cells target keeps its 11 px prior (measured; the nucleus-scale cue it replaced found
    # 16.8 px here but +180 % on the simulator's tuning videos)
    est = segment_projection(frames)
    assert est.cell_diameter_px == pytest.approx(11.0)
    assert not est.estimated and est.stats["cell_diameter_source"] == "prior"  # said as such
    pc = segment_projection(frames, cell_diameter_px=16.8)
    assert not pc.estimated
    interior = [i for i in np.unique(cells[10:-10, 10:-10])]
    gt = np.where(np.isin(cells, interior), cells, 0)
    iou, _, gid = instance_iou_matrix(pc.labels, gt)
    best = iou.max(axis=0)
    # measured: 0.91 of the 67 interior cells at IoU >= 0.5, median IoU 0.87
    assert np.mean(best >= 0.5) >= 0.85
    assert np.median(best) >= 0.8


def test_projection_kinds_and_errors():
    f = np.zeros((3, 4, 5), np.float32)
    f[1] = 2.0
    f[2, 0, 0] = np.nan
    assert projection_image(f, "max")[0, 0] == 2.0
    assert projection_image(f, "mean")[1, 1] == pytest.approx(2 / 3)
    assert projection_image(f, "mean")[0, 0] == pytest.approx(1.0)  # NaN ignored
    assert projection_image(f[0], "std").shape == (4, 5)
    g = np.random.default_rng(1).normal(900, 300, (7, 5, 6)).astype(np.uint16)
    for kind, fn in (("mean", np.mean), ("max", np.max), ("std", np.std)):
        np.testing.assert_allclose(projection_image(g, kind), fn(g.astype(float), 0), rtol=1e-5)
    with pytest.raises(ProjectionError, match="unknown projection"):
        projection_image(f, "median")  # type: ignore[arg-type]
    with pytest.raises(ProjectionError, match="expected"):
        projection_image(np.zeros((2, 3, 4, 5)))
    # a field smaller than two cells: the diameter is clipped to half the field
    assert projection_cell_diameter(np.random.default_rng(0).normal(size=(14, 21))) <= 7.0


def test_infer_target_cells_constant_stack_even_for_one_frame():
    frames, _, _ = _tissue(t=1)
    res = segment_recording(frames, InferenceConfig(method="baseline", target="cells"))
    assert res.labels.shape == frames.shape and res.labels.dtype == np.uint32
    assert res.activity["n_cells"] == int(res.labels.max()) > 20
    assert not any("frame(s)" in w for w in res.warnings)  # no activity needed
    frames3 = np.repeat(frames, 3, axis=0)
    res3 = segment_recording(frames3, InferenceConfig(method="baseline", target="cells"))
    assert (res3.labels == res3.labels[0]).all()


def test_sima_projection_recovers_labelled_cells(real_file):
    """The two hand-drawn ROIs (equivalent diameters 21.5 and 16.0 px) of sima_example.

    The recording's estimated diameter misses them: 8.0 px (calseg.analysis.cellsize: the
    resting-image cue of issue 17 item 3; its activity cue finds no one-cell term in these 20
    frames; the two cues are within 20 % on 26 of the 32 tuning videos;
    the nucleus cue it replaced estimated 20.2 px here but +180 % on the simulator), and the
    8 px territories match neither ROI (best IoU 0.17 and 0.06). Given the diameter
    (``cell_diameter_px``, ``--cell-diameter-px``) the result is as before issue 17's
    estimator: 20 px -> best IoU 0.39 and 0.27, one ROI at IoU >= 0.3 (chance level)."""
    frames, rois = _real(real_file, "sima_example.tif", "sima_example_imageJ_ROIs.zip")
    est = segment_recording(frames, InferenceConfig(method="baseline", target="cells"))
    assert 6.0 <= est.activity["cell_diameter_px"] <= 10.0
    assert est.activity["cell_diameter_estimated"]
    assert max(score_projection(est.labels, rois).best_iou) < 0.3
    cfg = InferenceConfig(method="baseline", target="cells", cell_diameter_px=20.2)
    res = segment_recording(frames, cfg)
    sc = score_projection(res.labels, rois)
    # measured: 72 cells covering 0.78 of the field (94 and 0.90 before the evidence test of
    # issue 17), best IoU 0.39 and 0.27 -> one of the two ROIs at IoU >= 0.3, none at 0.5;
    # threshold a little below the measurement
    assert sc.n_labelled == 2
    assert max(sc.best_iou) >= 0.35
    assert sc.recall_30 >= 0.5
    assert sc.plausible
    # the chance level this is to be compared with (BENCHMARKS.md): cell-sized grid tiles
    ctl = grid_control(rois, res.activity["cell_diameter_px"])
    assert 0.5 <= ctl["recall_30"] <= 0.9 and ctl["recall_50"] < 0.5


def test_fissa_projection_and_whole_field(real_file):
    frames, rois = _real(real_file, "fissa_b_AVG_A01.tif", "fissa_b_rois.zip")
    res = segment_recording(frames, InferenceConfig(method="baseline", target="cells"))
    sc = score_projection(res.labels, rois)
    # the 21 x 14 px field (diameter clipped to 7 px) shows no nucleus above the noise of
    # its 29 frames (issue 17 item 2: a region is labelled only with evidence of a cell);
    # before the evidence test it was tiled into 6 "cells", one matching a ROI by chance
    # (IoU 0.34)
    assert res.activity["cell_diameter_px"] == pytest.approx(7.0)
    assert res.labels.max() == 0 and sc.recall_30 == 0.0
    assert any("no cell found" in w for w in res.warnings)
    whole = score_projection(np.ones(rois.shape, np.uint32), rois)
    assert whole.recall_30 == 0.0 and not whole.plausible


def test_report_renders_projection_table_and_chance_level():
    from calseg.report import markdown

    score = {"recall_50": 0.0, "recall_30": 0.5, "detections_per_frame": 0.0, "plausible": True}
    cells = {**score, "best_iou": [0.39, 0.2], "detections_per_frame": 94.0, "coverage": 0.9}
    gap = {
        "score": 1.0,
        "components": {"histogram": 0.1, "noise": 0.2, "spectrum": 0.3, "cell_size": 0.4},
        "frechet_sam2": 2.0,
    }
    row = {"model": "classical baseline", "training data": "-", "sim_test": {"iou": 0, "dice": 0}}
    row.update(sima=score, fissa=score, cells_sima=cells)  # fissa: no projection score
    res = {
        "rows": [row],
        "gap": {"sima": {"default": gap}},
        "embed_s": {},
        "settings": {"augment_variants": 2},
        "timings": {"total_s": 1.0},
        "controls": {"sima": {"cell_diameter_px": 20.2, "recall_50": 0.19, "recall_30": 0.69}},
    }
    md = markdown(res)
    assert "| classical baseline | 0.00 / 0.50 | n/a | 0.39, 0.20 | n/a | 94 / n/a |" in md
    assert "sima: d = 20.2 px, recall@0.5 0.19, @0.3 0.69" in md


def test_cli_segment_target_cells(tmp_path, real_file):
    from typer.testing import CliRunner

    from calseg.cli import app
    from calseg.io.labels import read_label_stack

    rec = real_file("fissa_b_AVG_A01.tif")
    out = tmp_path / "seg"
    r = CliRunner().invoke(
        app, ["segment", str(rec), str(out), "--method", "baseline", "--target", "cells"]
    )
    assert r.exit_code == 0, r.output
    lab = read_label_stack(out / "labels.tif")
    assert lab.shape == (29, 21, 14) and lab.max() == 0  # no evidence of a cell (see above)
    bad = CliRunner().invoke(app, ["segment", str(rec), str(out), "--target", "all"])
    assert bad.exit_code != 0 and "'active' or 'cells'" in bad.output


def test_roi_activity_explains_empty_activity_target_on_sima(real_file):
    from calseg.pipelines.real_eval import roi_activity

    frames, rois = _real(real_file, "sima_example.tif", "sima_example_imageJ_ROIs.zip")
    q = roi_activity(frames, rois)
    # measured: the ROI-mean traces rise (peak dF/F 0.28 and 0.68, z 5.5 and 7.2), but the
    # per-pixel noise SD (949) is as large as the median signal (898): at most 1 % of the ROI
    # pixels ever pass z > 5 (0.3 % and 1.0 %; 0.5 % for ROI 2 before the detrend of 4a11ccd)
    # and none survive the 15 px region rule
    assert [r["area_px"] for r in q] == [362, 200]
    assert q[0]["peak_dff"] == pytest.approx(0.28, abs=0.01)
    assert q[1]["peak_dff"] == pytest.approx(0.68, abs=0.01)
    assert min(r["trace_z"] for r in q) > 5.0
    assert all(r["frac_px_above"] <= 0.01 and r["frac_px_active"] == 0.0 for r in q)
    assert q[0]["noise_sigma_median"] > q[0]["median_f"]


def test_one_noise_image_gives_no_cells():
    """Found by a new-user check: a single image (one frame, or ``(H, W)``) had no noise null,
    so every part of its foreground became cells: 106 on a 100 x 100 Poisson image, 11 on 64 x
    64, 284 (87 % of the field) on sima's single-frame file. Its noise SD is now estimated from
    the image itself; a tissue frame keeps its cells (the test above)."""
    from calseg.segment.projection import projection_noise

    for side, seed in ((100, 0), (64, 7), (256, 1)):
        img = np.random.default_rng(seed).poisson(300, (side, side)).astype(np.uint16)
        res = segment_recording(img[None], InferenceConfig(method="baseline", target="cells"))
        assert res.activity["n_cells"] == 0, side
        sd = float(projection_noise(img, smooth_sigma_px=0).std())
        assert sd == pytest.approx(np.sqrt(300), rel=0.1)  # Poisson: SD = sqrt(mean)
