"""Smoke tests of the benchmark functions (calseg.bench) at tiny sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from calseg import bench


def _values(result: dict) -> list[float]:
    return [r["value"] for r in result["rows"]]


def _all_positive_finite(result: dict) -> None:
    vals = _values(result)
    assert vals, "a section must report at least one number"
    for r in result["rows"]:
        assert math.isfinite(r["value"]), r
        # counts (prompts per frame) may be 0 on a tiny recording; rates and times may not
        assert r["value"] > 0 or (r["unit"] == "prompts" and r["value"] == 0), r


def test_sim_rates_and_no_target_at_tiny_size():
    res = bench.run_section("sim", n_cells=60, size=96, n_batch=2, t_end_s=20.0)
    _all_positive_finite(res)
    d = res["details"]
    assert d["euler"]["steps"] == 100 and d["imex"]["steps"] == 40
    # simulated calcium is physical (uM), not just finite
    assert 0 < d["euler"]["peak_c_uM"] < 2.0
    # the 60 s target is only judged for 16 pouches of ~3,255 cells
    assert all(r["met"] is None for r in res["rows"])
    # 20 s of model time extrapolated to 3,600 s is marked as such
    assert any(r["extrapolated"] for r in res["rows"])
    assert res["peak_rss_mib"] > 0 and res["wall_s"] > 0


def test_render_and_dataset_tiny(tmp_path):
    ren = bench.run_section("render", sizes=(96,), n_frames=3, mean_cell_area_512=60)
    _all_positive_finite(ren)
    assert ren["details"]["96"]["defects_present"] == len(bench_defects())
    assert ren["details"]["96_intensity"]["defects_present"] == len(bench_defects()) + 3
    stages = ren["details"]["96"]["stage_thread_ms_per_frame"]
    assert {"scene", "psf", "camera", "adc"} <= set(stages) and min(stages.values()) > 0
    ds = bench.run_section(
        "dataset",
        n_videos=3,
        measured_videos=2,
        n_frames=5,
        size=96,
        n_cells=60,
        work_dir=tmp_path,
    )
    _all_positive_finite(ds)
    assert ds["details"]["videos_built"] == 2 and ds["details"]["bytes_written"] > 0
    extrap = [r for r in ds["rows"] if r["extrapolated"]]
    assert len(extrap) == 1 and "extrapolated from 2 videos" in extrap[0]["name"]
    assert list(tmp_path.iterdir()) == []  # the temporary dataset is removed
    with pytest.raises(bench.BenchError):
        bench.bench_dataset(n_videos=3, measured_videos=1, n_frames=3, size=96, n_cells=60)


def test_render_versus_a_git_revision():
    """The old-vs-new render comparison runs both trees in child processes; HEAD against this
    working tree (the same code in a clean checkout, or HEAD plus the uncommitted change)."""
    root = Path(bench.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    res = bench.render_versus("HEAD", size=64, n_frames=2, repeats=1)
    _all_positive_finite(res)
    assert set(res["details"]["ms_per_frame"]) == {"HEAD", "this tree"}
    with pytest.raises(bench.BenchError, match="git archive"):
        bench.render_versus("no-such-revision-xyz", size=64, n_frames=2, repeats=1)


def bench_defects() -> tuple[str, ...]:
    from calseg.simulate.render import DEFAULT_DEFECTS

    return DEFAULT_DEFECTS


def test_sam2_tiny_and_report():
    res = bench.run_section(
        "sam2",
        image_size=64,
        recording_size=96,
        n_infer_frames=2,
        batch_size=2,
        cached_steps=1,
        encoder_steps=1,
        warmup_steps=1,
        torch_threads=1,
    )
    _all_positive_finite(res)
    tr = res["details"]["training"]
    assert tr["encoder_s_per_step"] > tr["cached_s_per_step"] > 0
    report = {
        "command": "python -m calseg.bench --only sam2",
        "quick": False,
        "machine": bench.machine_info(os.environ),
        "sections": {"sam2": res},
    }
    text = bench.format_report(report)
    assert "speed-up of cached embeddings" in text and "peak RSS" in text
    assert report["machine"]["cores_usable"] >= 1 and report["machine"]["ram_gib"] > 0


def test_unknown_section_is_rejected():
    with pytest.raises(bench.BenchError, match="unknown section"):
        bench.run_section("nope")
