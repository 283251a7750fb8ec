"""make demo helpers: the frame the page screenshot opens at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from calseg.demo import busiest_frame, busiest_frame_of_job


def _stack() -> np.ndarray:
    """(6, 8, 8) stack: frame 4 has 12 labelled pixels (two cells), frame 1 has 4, rest 0."""
    labels = np.zeros((6, 8, 8), np.uint16)
    labels[1, 0:2, 0:2] = 1
    labels[4, 0:2, 0:3] = 1
    labels[4, 5:7, 5:8] = 7
    return labels


def test_busiest_frame_known_answer() -> None:
    assert busiest_frame(_stack()) == 4
    assert busiest_frame(np.zeros((5, 4, 4), np.uint16)) == 0  # no cells: the first frame
    assert busiest_frame(np.ones((4, 4), np.uint16)) == 0  # one label image
    with pytest.raises(ValueError, match="shape"):
        busiest_frame(np.zeros(4))


def test_busiest_frame_of_job_reads_labels_artifact(tmp_path: Path) -> None:
    (tmp_path / "jobs" / "j1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "jobs" / "j1" / "labels.tif", _stack())
    job = {"artifacts": [{"name": "labels.tif", "relpath": "jobs/j1/labels.tif"}]}
    assert busiest_frame_of_job(job, tmp_path) == 4
    assert busiest_frame_of_job({"artifacts": []}, tmp_path) is None


def test_help_shows_every_default_and_reads_plainly(capsys) -> None:
    from calseg.demo import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 8)", "(default: 48)", "(default: 128)", "(default: 150)"):
        assert default in out, default
    assert "--fresh" in out and "reused" in out  # what a second make demo does
    assert "``" not in out and "**" not in out and ":func:" not in out


def test_heldout_table_shows_cis_and_says_when_finetuned_loses() -> None:
    from calseg.demo import heldout_table

    def row(name: str, f1: float) -> dict:
        return {
            "model": name,
            "n_videos": 3,
            "f1_mean": f1,
            "f1_ci95": [f1 - 0.1, f1 + 0.1],
            "iou_mean": 0.5,
            "iou_ci95": None,
            "ap50_mean": 0.2,
            "ap50_ci95": [0.1, 0.3],
        }

    report = {
        "summary": [row("SAM2 fine-tuned", 0.4), row("SAM2 untuned", 0.32), row("classical", 0.6)]
    }
    lines = heldout_table(report)
    text = "\n".join(lines)
    assert "3, split by video" in text and "0.400 [0.30, 0.50]" in text
    # above on the mean, but its CI [0.30, 0.50] reaches the untuned mean: not "beats"
    assert (
        "SAM2 fine-tuned is above SAM2 untuned on mean F1, but not clearly (F1 0.400 [0.30, "
        "0.50] vs 0.320: its CI reaches it)." in text
    )
    assert "beats" not in text
    assert sum("not better than the classical method" in ln for ln in lines) == 1
    report["summary"][0]["f1_mean"] = 0.7  # above, but its CI [0.30, 0.50] is not
    text = "\n".join(heldout_table(report))
    assert "not better than the classical" not in text
    assert "is not clearly better than the classical method here (F1 0.700 [0.30, 0.50] vs " in (
        text
    )
    report["summary"][0]["f1_ci95"] = [0.65, 0.75]  # clearly better: no such line
    assert "better than the classical" not in "\n".join(heldout_table(report))
    assert "SAM2 fine-tuned beats SAM2 untuned (F1 0.700 vs 0.320)." in "\n".join(
        heldout_table(report)
    )
    report["summary"][0]["f1_mean"] = 0.2
    assert "does NOT beat SAM2 untuned" in "\n".join(heldout_table(report))


def test_heldout_table_says_why_rois_went_unmatched() -> None:
    """Under the table, each model's unmatched ROIs and cells by kind, as shares."""
    from calseg.demo import heldout_table

    errors = {"fp_false": 1, "fp_merge": 1, "fp_partial": 2, "fn_missed": 0, "fn_split": 3}
    report = {"summary": [{"model": "classical", "n_videos": 3, "f1_mean": 0.5, "errors": errors}]}
    lines = heldout_table(report)
    assert lines[-1] == (
        "  classical: 4 unmatched ROIs: 25 % on no cell, 25 % span cells, 50 % partial; "
        "3 unmatched cells: 0 % missed, 100 % split, 0 % partial"
    )
    assert lines[-2].startswith("Why ROIs and cells went unmatched (touching = IoU >= 0.1")
    del report["summary"][0]["errors"]  # a report from before the counts: no such lines
    assert not any("unmatched" in ln for ln in heldout_table(report))


def test_heldout_table_compares_the_finetune_with_its_disc_prior() -> None:
    """With a disc prior the fine-tuned row is also compared with the disc alone (no image),
    the reference its training must beat (issue 14)."""
    from calseg.demo import heldout_table
    from calseg.segment.choice import LABEL_DISC

    def row(name: str, f1: float) -> dict:
        return {"model": name, "n_videos": 3, "f1_mean": f1, "iou_mean": 0.5, "ap50_mean": 0.2}

    tuned = "SAM2 fine-tuned + disc prior"
    report = {"summary": [row(tuned, 0.44), row(LABEL_DISC, 0.47), row("SAM2 untuned", 0.01)]}
    text = "\n".join(heldout_table(report))
    assert f"{tuned} beats SAM2 untuned (F1 0.440 vs 0.010)" in text
    assert f"{tuned} does NOT beat the {LABEL_DISC} (F1 0.440 vs 0.470)" in text
    assert "not from what training learned" in text
    report["summary"][1]["f1_mean"] = 0.30
    text = "\n".join(heldout_table(report))
    assert f"{tuned} beats the {LABEL_DISC} (F1 0.440 vs 0.300)" in text  # no CI: the means
    report["summary"][0]["f1_ci95"] = [0.25, 0.6]  # overlapping: no claim
    text = "\n".join(heldout_table(report))
    assert f"{tuned} is above the {LABEL_DISC} on mean F1, but not clearly" in text
    assert "no evidence of more than the disc" in text and "beats the" not in text
    del report["summary"][0]["f1_ci95"]
    report["summary"].pop(1)  # no prior: no such line
    assert LABEL_DISC not in "\n".join(heldout_table(report))


def test_heldout_table_says_when_the_finetune_kept_its_initial_model() -> None:
    """A fine-tune whose validation never beat step 0 keeps the initial model (the base, its
    disc re-fitted); the demo must not present that row as a model trained here (a demo on
    200-px cells showed 'fine-tuned beats untuned' with step 0 kept)."""
    from calseg.demo import heldout_table

    def row(name: str, f1: float) -> dict:
        return {"model": name, "n_videos": 3, "f1_mean": f1, "iou_mean": 0.5, "ap50_mean": 0.2}

    report = {"summary": [row("SAM2 fine-tuned + disc prior", 0.8), row("SAM2 untuned", 0.7)]}
    kept = {"improved": False, "select_by": "f1", "best_score": 0.1443}
    lines = heldout_table(report, kept)
    text = "\n".join(lines)
    assert "No fine-tuning step improved on the initial model (validation f1 0.1443" in text
    assert "not a model fine-tuned by this demo" in text
    # the row says what it is (a new-user check read "SAM2 fine-tuned" in the table, the stage
    # heading and the overlay caption, and the explanation only after the table)
    assert "SAM2 fine-tuned" not in text
    assert any(line.startswith("SAM2 base, kept + disc prior") for line in lines)
    assert (
        "SAM2 base, kept + disc prior and SAM2 untuned have the same weights (F1 0.800 vs " in text
    )
    assert "beats SAM2 untuned" not in text and "does NOT beat SAM2 untuned" not in text
    explained = next(i for i, line in enumerate(lines) if "No fine-tuning step" in line)
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert explained < header
    for finetune in (None, {"improved": True, "select_by": "f1", "best_score": 0.2}):
        text = "\n".join(heldout_table(report, finetune))
        assert "No fine-tuning step" not in text and "SAM2 base, kept" not in text
        assert "SAM2 fine-tuned + disc prior" in text


def test_shown_label_renames_only_a_kept_finetune() -> None:
    from calseg.demo import shown_label

    kept = {"improved": False}
    assert shown_label("SAM2 fine-tuned + disc prior", kept) == "SAM2 base, kept + disc prior"
    assert shown_label("SAM2 fine-tuned", {"improved": True}) == "SAM2 fine-tuned"
    assert shown_label("SAM2 fine-tuned", None) == "SAM2 fine-tuned"
    assert shown_label("SAM2 untuned", kept) == "SAM2 untuned"
    assert shown_label("classical", kept) == "classical"


def test_a_bad_simulation_option_fails_before_the_service_starts(capsys) -> None:
    """Found by a new-user check: `--cell-area 5` ended in a ParamsError traceback after the
    service had started (the job-reuse check validates the parameters)."""
    from calseg.demo import main

    for argv in (["--cell-area", "5"], ["--cell-area", "200"]):
        assert main(argv) == 2
        out = capsys.readouterr().out
        assert "demo failed:" in out and "mean_cell_area_px" in out
        assert "service up" not in out


def test_progress_lines_have_one_eta_and_whole_words():
    """Found by a new-user check: 'train: step 1/150 loss 0.4354 ETA 17 s (ETA 21 s)' (two
    ETAs) and 'embedded 4/48 fram (ETA 21 s)' (cut at 70 characters mid-word)."""
    from calseg.demo import stage_text

    job = {"state": "running", "stage": "train", "eta_s": 21.0}
    line = stage_text({**job, "message": "step 1/150 loss 0.4354 ETA 17 s"})
    assert line == "train: step 1/150 loss 0.4354 ETA 17 s"
    assert stage_text({**job, "message": "step 2/150"}) == "train: step 2/150 (ETA 21 s)"
    long = stage_text({**job, "message": "embedded frames of v006 " * 8}, width=60)
    assert long.endswith("v006 … (ETA 21 s)") and len(long) <= 60 + len(" … (ETA 21 s)")
    assert stage_text({"state": "queued"}) == "queued"
