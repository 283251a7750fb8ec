"""Evaluation report: per-video rows aggregated per model, pattern class and defect family."""

import numpy as np
import pytest
from test_segment_synth import small_dataset

from calseg.segment.evaluate import (
    EvaluationReport,
    defect_families,
    evaluate_dataset,
    summarise,
    summarise_groups,
)


def _row(model, video, pattern, defects, iou):
    return {
        "model": model,
        "video": video,
        "pattern_class": pattern,
        "defects": defects,
        "iou": iou,
        "dice": iou,
        "pixel_accuracy": 0.99,
        "precision": iou,
        "recall": iou,
        "f1": iou,
        "ap50": iou,
        "mean_matched_iou": None,
        "seconds": 1.0,
    }


def test_defect_families_from_manifest_severities():
    d = {"defocus": {"severity": 0.2, "psf": 1.0}, "vignetting": {"severity": 0.0}}
    assert defect_families(d) == ["defocus"]
    assert defect_families({"defocus": {"severity": 0.0}}) == ["none"]
    assert defect_families({}) == ["none"]


def test_groups_by_pattern_class_and_defect_family_with_bootstrap_cis():
    videos = [
        ("v1", "waves", ["defocus"], 0.2),
        ("v2", "waves", ["defocus", "drift"], 0.4),
        ("v3", "waves", ["none"], 0.6),
        ("v4", "transients", ["drift"], 0.9),
    ]
    rows = [_row("tuned", v, p, d, x) for v, p, d, x in videos]
    rows += [_row("baseline", v, p, d, x / 2) for v, p, d, x in videos]
    groups = summarise_groups(rows, ["tuned", "baseline"])
    by = {(g["group_by"], g["group"], g["model"]): g for g in groups}
    waves = by[("pattern_class", "waves", "tuned")]
    assert waves["n_videos"] == 3 and waves["iou_mean"] == pytest.approx(0.4)
    lo, hi = waves["iou_ci95"]  # 3 videos: bootstrap CI of the mean, inside the data range
    assert 0.2 <= lo < 0.4 < hi <= 0.6
    assert by[("pattern_class", "transients", "tuned")]["iou_ci95"] is None  # 1 video
    # a video with two defect families counts in both
    assert by[("defect", "drift", "tuned")]["n_videos"] == 2
    assert by[("defect", "drift", "tuned")]["iou_mean"] == pytest.approx(0.65)
    assert by[("defect", "defocus", "baseline")]["iou_mean"] == pytest.approx(0.15)
    assert by[("defect", "none", "tuned")]["n_videos"] == 1
    assert len(groups) == 2 * (2 + 3)  # models x (2 pattern classes + 3 defect groups)
    rep = EvaluationReport(rows=rows, summary=summarise(rows, ["tuned", "baseline"]), groups=groups)
    table = rep.to_table()
    assert "pattern_class=waves" in table and "defect=drift" in table
    assert "0.400±" in table  # waves, tuned: mean with its CI half-width
    assert rep.to_dict()["groups"] == groups


def test_evaluate_dataset_reports_groups_for_the_baseline(tmp_path):
    ds = small_dataset(tmp_path / "ds", t=8, size=48)
    rep = evaluate_dataset(ds, {"baseline": ("baseline", None)}, split="test")
    assert [r["video"] for r in rep.rows] == ["v003"]
    assert rep.rows[0]["defects"] == ["none"] and rep.rows[0]["pattern_class"] == "synthetic"
    g = {(x["group_by"], x["group"]) for x in rep.groups}
    assert g == {("pattern_class", "synthetic"), ("defect", "none")}
    assert np.isfinite(rep.groups[0]["iou_mean"])
    # every unmatched ROI and cell has one kind; the summary sums them over the videos
    row, errors = rep.rows[0], rep.summary[0]["errors"]
    assert row["fp"] == row["fp_false"] + row["fp_merge"] + row["fp_partial"]
    assert row["fn"] == row["fn_missed"] + row["fn_split"] + row["fn_partial"]
    assert errors == {k: row[k] for k in errors} and len(errors) == 6
    assert "why ROIs and cells went unmatched" in rep.to_table()


def test_cli_evaluate_prints_the_comparison_table_with_groups(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from calseg.cli import app
    from calseg.segment.model import CHECKPOINT_ENV

    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    ds = small_dataset(tmp_path / "ds", t=6, size=32)
    out = tmp_path / "report.json"
    r = CliRunner().invoke(
        app, ["evaluate", str(ds), "--image-size", "64", "--out", str(out)], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    # one name per model (calseg.segment.choice): never "base" next to "baseline"; the
    # untuned base is the small SAM2 trained here (calseg.segment.model.default_base_checkpoint),
    # so its row is not marked as random weights
    assert "SAM2 untuned" in r.output and "classical" in r.output
    assert "random weights" not in r.output
    assert "base" not in r.output.replace("database", "") and "bootstrap 95 % CI" in r.output
    assert "pattern_class=synthetic" in r.output and "defect=none" in r.output
    # not a terminal: the 119-column table is not wrapped at rich's default 80 columns
    head = [ln for ln in r.output.splitlines() if ln.startswith("model ")]
    assert head and head[0].rstrip().endswith("mean_matched_i"), r.output
    import json

    rep = json.loads(out.read_text())
    # the shipped base adds a disc prior at each prompt, and its row says so
    assert {s["model"] for s in rep["summary"]} == {"SAM2 untuned + disc prior", "classical"}
    assert rep["config"]["image_size"] == 64
    bad = CliRunner().invoke(app, ["evaluate", str(ds), "--mode", "movie"])
    assert bad.exit_code == 2 and "bad evaluation option" in bad.output


def test_evaluate_in_video_mode_refuses_a_disc_prior_model_before_any_video(tmp_path, monkeypatch):
    """``calseg evaluate --mode video`` with the shipped small SAM2 (its masks correct a disc
    prior) failed only when that model reached its first video, after the rows before it had
    segmented it. It now stops before any video is segmented, with the reason and what to
    use (the service refuses such a job at submit: test_service_api)."""
    from typer.testing import CliRunner

    from calseg.cli import app
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT, CHECKPOINT_ENV

    if not BUNDLED_SMALL_CHECKPOINT.is_file():
        pytest.skip("no bundled checkpoint")
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    ds = small_dataset(tmp_path / "ds", t=6, size=32)
    calls = []
    monkeypatch.setattr(
        "calseg.segment.evaluate.segment_recording", lambda *a, **k: calls.append(a)
    )
    r = CliRunner().invoke(app, ["evaluate", str(ds), "--mode", "video"])
    assert r.exit_code != 0 and calls == [], r.output
    text = " ".join(r.output.split())
    assert "mode 'video' cannot run sam2_small_calseg" in text, r.output
    assert "use mode 'image'" in text and "Traceback" not in r.output
