"""The held-out accuracy suite (calseg.bench_accuracy): its design, its scorer, its cache."""

import dataclasses

import numpy as np
import pytest

from calseg.bench_accuracy import (
    HELD_OUT_SEEDS,
    N_VIDEOS,
    TUNING_SEEDS,
    SuiteError,
    conditions_of,
    load_video,
    markdown_tables,
    quick_specs,
    run_suite,
    score_video,
    suite_specs,
    summarise_rows,
    temporal_scores,
)


def test_design_spans_every_condition_the_issue_names():
    specs = suite_specs()
    assert len(specs) == N_VIDEOS >= 24
    assert [s.seed for s in specs] == list(range(10000, 10000 + N_VIDEOS))
    assert all(s.seed in HELD_OUT_SEEDS for s in specs)
    assert {s.pattern_class for s in specs} == {"spikes", "transients", "waves", "fluttering"}
    assert (
        min(s.mean_cell_area_px for s in specs) == 60
        and max(s.mean_cell_area_px for s in specs) == 300
    )
    assert {s.indicator for s in specs} == {"GCaMP6s", "GCaMP6f", "GCaMP6m"}
    assert min(s.frame_interval_s for s in specs) == 0.5
    assert max(s.frame_interval_s for s in specs) == 5.0
    assert {s.defect_severity for s in specs} >= {0.0, 0.8}
    sides = [side for s in specs for side in (s.height, s.width)]
    assert min(sides) == 128 and max(sides) == 512
    assert all(60 <= s.n_frames <= 200 for s in specs)
    on = [s for s in specs if s.intensity != "none"]
    assert len(on) == N_VIDEOS // 2
    assert {s.intensity for s in on} == {
        "auto_gain",
        "contrast_normalisation",
        "illumination_flicker",
        "all",
    }
    # every config is valid and the intensity defects are on where the spec says
    cfg = next(s for s in on if s.intensity == "all").config()
    assert set(cfg.defects) == {"auto_gain", "contrast_normalisation", "illumination_flicker"}
    assert all(s.config().n_frames == s.n_frames for s in specs)


def test_tuning_set_is_disjoint_and_the_design_is_fixed():
    held, tune = suite_specs(), suite_specs("tuning")
    assert {s.seed for s in tune} == set(range(20000, 20032))
    assert all(s.seed in TUNING_SEEDS for s in tune)
    assert not {s.seed for s in held} & {s.seed for s in tune}
    assert suite_specs() == held  # same design every time
    with pytest.raises(SuiteError):
        suite_specs("test")
    with pytest.raises(SuiteError):
        suite_specs("tuning", n_videos=33)
    with pytest.raises(SuiteError):
        suite_specs("tuning", block=-1)
    with pytest.raises(SuiteError):
        suite_specs("held-out", block=10000 // 32)  # past seed 19999
    # a further block: its own seeds, the same design (every level), drawn anew
    more = suite_specs("held-out", block=1)
    assert {s.seed for s in more} == set(range(10032, 10064))
    assert all(s.seed in HELD_OUT_SEEDS for s in more)
    for field in ("mean_cell_area_px", "frame_interval_s", "indicator", "pattern_class"):
        assert {getattr(s, field) for s in more} == {getattr(s, field) for s in held}
    assert [s.mean_cell_area_px for s in more] != [s.mean_cell_area_px for s in held]


def test_quick_keeps_two_videos_per_pattern_class():
    quick = quick_specs(suite_specs())
    assert len(quick) == 8
    classes = [s.pattern_class for s in quick]
    assert {c: classes.count(c) for c in set(classes)} == {
        "spikes": 2,
        "transients": 2,
        "waves": 2,
        "fluttering": 2,
    }
    assert len({s.seed for s in quick}) == 8


def _two_cells(t: int = 6) -> tuple[np.ndarray, np.ndarray]:
    cells = np.zeros((20, 20), np.uint32)
    cells[2:8, 2:8] = 1
    cells[10:18, 10:18] = 2
    gt = np.zeros((t, 20, 20), np.uint32)
    gt[1:4][:, cells == 1] = 1
    gt[2:6][:, cells == 2] = 2
    return gt, cells


def test_perfect_prediction_scores_one_everywhere():
    gt, cells = _two_cells()
    s = score_video(gt.copy(), gt, cells, "active")
    for k in ("frame_f1", "frame_ap50", "frame_iou", "fp_f1", "fp_f1_30", "all_f1"):
        assert s[k] == 1.0, k
    assert s["temporal_precision"] == s["temporal_recall"] == 1.0
    assert s["peak_false_coverage"] == 0.0 and s["fp_extra_rois"] == 0


def test_a_cell_painted_one_frame_early_and_whole_field_activity():
    gt, cells = _two_cells()
    pred = gt.copy()
    pred[0][cells == 1] = 1  # cell 1 painted one frame early (frames 0-3 vs 1-3)
    pred[5][pred[5] == 0] = 9  # frame 5: everything else labelled one "cell"
    s = score_video(pred, gt, cells, "active")
    # cell 1: 4 painted frames, 3 true; cell 2: 4 and 4 -> precision 7/8, recall 7/7
    assert s["temporal_precision"] == pytest.approx(7 / 8)
    assert s["temporal_recall"] == 1.0
    assert s["peak_false_coverage"] == pytest.approx((400 - 64) / 400)
    # the whole-field "cell" is one extra footprint: precision 2/3, recall 1
    assert s["fp_extra_rois"] == 1 and s["fp_f1"] == pytest.approx(0.8)
    # per frame, both extra ROIs lie where no cell is active: frame 0's early cell 1, frame 5's
    # whole field
    assert s["frame_errors"] == {
        "fp_false": 2, "fp_merge": 0, "fp_partial": 0,
        "fn_missed": 0, "fn_split": 0, "fn_partial": 0,
    }  # fmt: skip


def test_cells_target_is_scored_against_all_cells():
    gt, cells = _two_cells()
    gt[:, cells == 2] = 0  # only cell 1 is ever active
    pred = np.broadcast_to(cells, gt.shape).copy()
    s = score_video(pred, gt, cells, "cells")
    assert s["all_f1"] == 1.0
    assert s["fp_precision"] == 0.5 and s["fp_recall"] == 1.0
    assert s["frame_f1"] is None and s["temporal_precision"] is None


def test_temporal_scores_without_pairs():
    gt, _ = _two_cells()
    assert temporal_scores(gt, gt, []) == {"temporal_precision": None, "temporal_recall": None}


def test_summary_means_and_cis():
    rows = [{"fp_f1": v, "seconds": 1.0} for v in (0.2, 0.4, 0.6, None)]
    s = summarise_rows(rows, ("fp_f1", "seconds"))
    assert s["n_videos"] == 4 and s["fp_f1"]["n"] == 3
    assert s["fp_f1"]["mean"] == pytest.approx(0.4)
    lo, hi = s["fp_f1"]["ci95"]
    assert 0.2 <= lo < 0.4 < hi <= 0.6
    assert summarise_rows(rows[:2], ("fp_f1",))["fp_f1"]["ci95"] is None  # < 3 videos


def test_small_suite_runs_caches_and_tables(tmp_path):
    spec = dataclasses.replace(
        suite_specs()[0],
        height=64,
        width=96,
        n_frames=12,
        mean_cell_area_px=60.0,
        pattern_class="waves",
        frame_interval_s=2.0,
    )
    a = run_suite([spec], tmp_path)
    assert not a["videos"][0]["from_cache"]
    b = run_suite([spec], tmp_path)
    assert b["videos"][0]["from_cache"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a["rows"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b["rows"]]
    assert {r["method"] for r in a["rows"]} == {"classical, active", "classical, cells"}
    v, cached = load_video(spec, tmp_path)
    assert cached and v.image.shape == (12, 64, 96) and v.labels.shape == v.image.shape
    conds = conditions_of(spec, v.meta)
    assert conds["size (px)"] == "64x96" and conds["global intensity changes"] == "on"
    md = markdown_tables(a["summary"])
    assert "| **all** | 1 |" in md and "pattern class: waves" in md
    # the active target's unmatched ROIs and cells by kind, summed over the videos
    errors = a["summary"]["classical, active"]["frame_errors"]
    assert (
        errors == a["rows"][0]["frame_errors"]
        and "frame_errors" not in a["summary"]["classical, cells"]
    )
    assert md.count("Why ROIs and cells went unmatched (per frame at IoU 0.5") == 1
    with pytest.raises(SuiteError):
        run_suite([], tmp_path)


def test_bench_and_cli_route_to_the_suite(monkeypatch):
    import calseg.bench_accuracy as ba
    from calseg.bench import main as bench_main

    seen = []
    monkeypatch.setattr(ba, "main", lambda argv: seen.append(argv) or 0)
    assert bench_main(["--only", "accuracy", "--quick"]) == 0
    assert bench_main(["--quick", "--only", "accuracy", "--set", "tuning"]) == 0
    assert bench_main(["accuracy", "--markdown", "x.md"]) == 0
    assert seen == [["--quick"], ["--quick", "--set", "tuning"], ["--markdown", "x.md"]]

    from typer.testing import CliRunner

    from calseg.cli import app

    res = CliRunner().invoke(app, ["bench", "accuracy", "--quick", "--set", "tuning"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == ["--quick", "--set", "tuning"]


def test_docs_are_written_between_markers_from_a_full_held_out_run(tmp_path):
    from calseg.bench_accuracy import (
        SUMMARY_KEYS,
        replace_generated,
        suite_result,
        summarise_suite,
        write_docs,
    )

    rows = [
        {
            "video": f"s{10000 + i}",
            "method": m,
            **{k: 0.25 * i for k in SUMMARY_KEYS},
            "conditions": {"pattern class": "waves"},
        }
        for i in range(4)
        for m in ("classical, active", "classical, cells")
    ]
    report = {
        "command": "python -m calseg.bench accuracy",
        "set": "held-out",
        "quick": False,
        "n_videos": 4,
        "seeds": "10000-10003",
        "date": "2026-12-05",
        "wall_s": 12.0,
        "load_1min_before_after": [1.0, 1.5],
        "machine": {"git_commit": "abc1234", "cpu_model": "some CPU", "cores_usable": 2},
        "summary": summarise_suite(rows),
    }
    for name, key in (("README.md", "accuracy-headline"), ("BENCHMARKS.md", "accuracy-suite")):
        (tmp_path / name).write_text(
            f"before\n<!-- generated:{key} -->\nold\n<!-- /generated:{key} -->\nafter\n"
        )
    (tmp_path / "docs").mkdir()
    write_docs(report, tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("before\n") and readme.endswith("after\n") and "old" not in readme
    assert "4 held-out videos: F1 per frame 0.38" in readme  # mean of 0, .25, .5, .75
    assert "classical, cells" not in readme and "F1 against all cells 0.38" in readme
    bench = (tmp_path / "BENCHMARKS.md").read_text()
    assert "**classical, cells**" in bench and "commit abc1234" in bench
    res = suite_result(tmp_path)
    assert res["overall"]["classical, active"]["fp_f1"]["mean"] == 0.375
    assert res["headline"] in readme
    with pytest.raises(SuiteError):
        write_docs({**report, "quick": True}, tmp_path)
    with pytest.raises(SuiteError):
        replace_generated("no markers", "accuracy-suite", "x")
