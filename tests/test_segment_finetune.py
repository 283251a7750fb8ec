"""Fine-tuning on cached embeddings (random-weight tiny SAM2, tiny synthetic dataset)."""

import math
import re

import numpy as np
import pytest
import torch
from test_segment_synth import small_dataset, synth_recording, write_dataset

from calseg.segment._data import split_videos
from calseg.segment.evaluate import evaluate_dataset, score_labels
from calseg.segment.finetune import (
    FinetuneConfig,
    _losses,
    _lr_factor,
    _select_frames,
    finetune,
    heldout_prompted_iou,
    inference_config,
    initial_model,
)
from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.segment.model import CHECKPOINT_ENV, load_sam2


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    os.environ.pop(CHECKPOINT_ENV, None)
    root = tmp_path_factory.mktemp("ft")
    ds = small_dataset(root / "ds", t=6, size=48)
    cfg = FinetuneConfig(
        image_size=128,
        steps=40,
        batch_size=4,
        lr=1e-3,
        warmup_steps=4,
        val_every=20,
        frames_per_video=4,
        val_frames_per_video=3,
        background_prompt_fraction=0.0,
        seed=0,
    )
    live: list[dict] = []
    res = finetune(ds, root / "out", cfg, cache_dir=root / "cache", on_history=live.append)
    res.live_history = live
    return ds, root, cfg, res


def test_training_loss_goes_down(trained):
    _, _, cfg, res = trained
    losses = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert len(losses) == cfg.steps
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(v) for v in losses)
    vals = [h for h in res.history if h["kind"] == "val"]
    assert [h["step"] for h in vals] == [0, 20, 40]
    assert res.best_val_iou == max(h["val_mean_iou"] for h in vals)
    assert any("RANDOM" in w for w in res.warnings)


def test_on_history_sees_every_entry_as_it_is_appended(trained):
    _, _, cfg, res = trained
    assert res.live_history == res.history  # same entries, same order
    kinds = [h["kind"] for h in res.live_history]
    assert kinds.count("train") == cfg.steps and kinds.count("val") == 3
    assert kinds[:3] == ["prior", "val", "train"]
    diagnostics = {"mask_area", "target_area", "logit_max", "object_score", "iou_pred"}
    train = res.live_history[2]
    assert {"step", "loss", "focal", "dice", "iou_mse", "lr"} | diagnostics <= set(train)
    assert train["target_area"] > 0 and 0 <= train["object_score"] <= 1
    val = res.live_history[1]
    assert {"val_mean_iou", "disc_prior_iou"} | {f"val_{k}" for k in diagnostics} <= set(val)
    # the reference row: a disc of the training cells' mean radius, scored like the model
    prior = res.live_history[0]
    assert prior["name"] == "disc prior" and prior["radius_px"] > 1
    assert prior["n_prompts"] == val["n_prompts"] and 0 < prior["val_mean_iou"] <= 1
    assert val["disc_prior_iou"] == prior["val_mean_iou"]
    # frame px: the disc's area is close to the mean cell area it was drawn from
    assert math.pi * prior["radius_px"] ** 2 == pytest.approx(val["val_target_area"], rel=0.5)


def test_on_history_failure_does_not_stop_training(tmp_path):
    ds = small_dataset(tmp_path / "ds", t=4, size=32)
    cfg = FinetuneConfig(image_size=64, steps=2, batch_size=2, frames_per_video=2, val_every=2)

    def broken(entry: dict) -> None:
        raise ValueError("sink down")

    msgs: list[str] = []
    res = finetune(
        ds,
        tmp_path / "out",
        cfg,
        on_history=broken,
        progress=lambda f, stage, m=None: msgs.append(f"{stage}: {m}"),
    )
    assert len([h for h in res.history if h["kind"] == "train"]) == 2
    # the job sees step, loss and an ETA; validation scores at 3 significant digits (they
    # showed 16: "val F1 0.7832512315270936", a new-user check)
    assert any(m.startswith("train: step 1/2 loss ") and " ETA " in m for m in msgs), msgs
    shown = [m for m in msgs if m.startswith("validate: step 2: ")]
    num = r"(0\.0*)?[0-9]{1,3}(\.[0-9]{1,3})?"  # 3 significant digits at most
    pattern = rf"validate: step 2: (val F1 {num}, )?prompted val IoU {num}"
    assert shown and re.fullmatch(pattern, shown[0]), shown


def _two_size_dataset(root, size: int = 48, t: int = 4):
    """Synthetic discs of radius 3 or 7 px (one radius per video, alternating): one mean
    radius fits neither, so the disc prior is poor and the image has to tell the size.
    2 train, 2 val and 2 test videos, different seeds (held out)."""
    vids = []
    for k, split in enumerate(["train", "train", "val", "val", "test", "test"]):
        r = (3.0, 7.0)[k % 2]
        img, lab = synth_recording(
            t=t, h=size, w=size, n_cells=9 if r < 5 else 5, radius=r, seed=100 + k
        )
        vids.append({"id": f"{split}{k}", "split": split, "image": img, "labels": lab})
    return write_dataset(root, vids)


def test_decoder_beats_the_disc_prior_on_held_out_videos(tmp_path):
    """Issue 14 items 1 and 6 (replaces test_overfits_a_single_video, whose train and val
    videos were the same recording): decoder-only training on the RANDOM frozen encoder, with
    the disc prior as a residual and deep training points, must beat the disc prior (a disc of
    the training cells' mean radius at each prompt, no image) on held-out videos, scored with
    the same code and prompts. Measured on this machine (these settings, seed 0), prompted
    IoU on the 2 test videos (24 prompts): disc prior 0.429, decoder 0.637 (val: 0.423 at
    step 0, 0.661 at step 20); the same run without the residual prior (mask_prior='none'):
    0.22, below the prior. The margin asserted, 0.1, is half the measured gap (0.21)."""
    ds = _two_size_dataset(tmp_path / "ds")
    cfg = FinetuneConfig(
        image_size=64,
        steps=20,
        batch_size=8,
        lr=1e-3,
        warmup_steps=4,
        val_every=20,
        frames_per_video=4,
        val_frames_per_video=4,
        background_prompt_fraction=0.0,
        mask_prior="residual",
        prompt_point="deep",
        select_by="prompted_iou",
        seed=0,
    )
    res = finetune(ds, tmp_path / "out", cfg, cache_dir=tmp_path / "cache")
    assert res.best_step == 20 and res.improved  # selection picks the later, better step
    table = heldout_prompted_iou(
        res.checkpoint, ds, frames_per_video=4, cache_dir=tmp_path / "cache"
    )
    assert table["videos"] == ["test4", "test5"]
    assert table["decoder"] > table["disc prior"] + 0.1, table
    assert table["gain"] == pytest.approx(table["decoder"] - table["disc prior"])
    assert table["videos_improved"] == 2
    assert table["gain_ci95"][0] > 0, table  # paired per-prompt bootstrap excludes no gain
    # the gain is learned, not the residual's random start: the decoder as initialised (same
    # seed, prior and data; one step at lr 1e-12) scores far lower on the same prompts
    init = initial_model(ds, tmp_path / "init", cfg, cache_dir=tmp_path / "cache")
    assert init.best_step in (0, 1)
    vals = [h["val_mean_iou"] for h in init.history if h["kind"] == "val"]
    assert vals[0] == pytest.approx(vals[-1], abs=1e-6)  # lr 1e-12 moved nothing
    t_init = heldout_prompted_iou(
        init.checkpoint, ds, frames_per_video=4, cache_dir=tmp_path / "cache"
    )
    assert t_init["disc prior"] == pytest.approx(table["disc prior"])
    assert table["decoder"] > t_init["decoder"] + 0.1, (table, t_init)


def test_lr_schedule_stepped_per_optimiser_step(trained):
    _, _, cfg, res = trained
    lrs = [h["lr"] for h in res.history if h["kind"] == "train"]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] < 0.1 * cfg.lr  # cosine decay reached its end
    assert _lr_factor(cfg.steps, cfg) == pytest.approx(cfg.min_lr_ratio)


def test_checkpoint_is_small_and_reloads(trained):
    _, _, _, res = trained
    assert res.checkpoint.stat().st_size < 30e6  # decoder + prompt encoder only
    obj = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    assert obj["format"] == "calseg-sam2-finetune"
    assert not any(k.startswith("image_encoder") for k in obj["sam_mask_decoder"])
    m = load_sam2("sam2.1_hiera_t", res.checkpoint, image_size=512, device="cpu")
    assert m.info.image_size == 128  # the checkpoint's own size wins
    assert m.info.finetuned_from.startswith("random-init")
    torch.testing.assert_close(
        m.model.sam_mask_decoder.iou_token.weight, obj["sam_mask_decoder"]["iou_token.weight"]
    )


def test_resume_from_last(trained):
    ds, root, cfg, res = trained
    again = finetune(ds, root / "out", cfg, cache_dir=root / "cache")
    assert any("resumed" in w for w in again.warnings)
    assert len([h for h in again.history if h["kind"] == "train"]) == cfg.steps


def test_empty_frames_give_finite_loss(tmp_path):
    logits = torch.randn(3, 3, 32, 32)
    target = torch.zeros(3, 1, 32, 32)
    ls = _losses(
        logits, torch.rand(3, 3), torch.randn(3, 1), target, torch.zeros(3), FinetuneConfig()
    )
    assert all(torch.isfinite(v) for v in ls.values())
    img, lab = synth_recording(t=4, h=32, w=32, n_cells=2, seed=5)
    empty = np.zeros_like(lab)
    ds = write_dataset(
        tmp_path / "ds",
        [
            {"id": "e0", "split": "train", "image": img, "labels": empty},
            {"id": "e1", "split": "val", "image": img, "labels": empty},
        ],
    )
    cfg = FinetuneConfig(image_size=64, steps=3, batch_size=2, frames_per_video=2, val_every=3)
    res = finetune(ds, tmp_path / "out", cfg)
    train = [h for h in res.history if h["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(h["loss"]) for h in train)
    assert res.checkpoint.exists()


def test_evaluate_base_tuned_baseline(trained):
    ds, root, _, res = trained
    rep = evaluate_dataset(
        ds,
        {
            "sam2-base": ("sam2", None),
            "sam2-tuned": ("sam2", res.checkpoint),
            "baseline": ("baseline", None),
        },
        config=InferenceConfig(image_size=128),
        cache_dir=root / "cache",
    )
    assert len(rep.rows) == 3 and {r["video"] for r in rep.rows} == {"v003"}
    by = {r["model"]: r for r in rep.rows}
    # the encoder is shared: the tuned model reads every frame from the base's cache
    assert by["sam2-tuned"]["frames_embedded"] == 0
    assert (
        by["sam2-tuned"]["frames_from_cache"]
        == by["sam2-base"]["frames_from_cache"] + (by["sam2-base"]["frames_embedded"])
    )
    assert by["baseline"]["iou"] > 0.4
    # every row is scored against the same ground truth: TP + FN = the true cell-frames
    (video,) = split_videos(ds, "test")
    gt = np.asarray(video.load_labels())
    n_true = sum(len(np.unique(f[f > 0])) for f in gt)
    assert n_true > 0
    assert {r["tp"] + r["fn"] for r in rep.rows} == {n_true}
    # the SAM2 rows are SAM2's: base and tuned models are the ones asked for, the encoder ran,
    # and each row's numbers are those of segmenting v003 with that model, scored anew
    d = rep.to_dict()
    assert d["models"]["sam2-base"]["checkpoint"] is None
    assert d["models"]["sam2-base"]["random_weights"]
    assert d["models"]["sam2-tuned"]["checkpoint"] == str(res.checkpoint)
    assert d["models"]["sam2-tuned"]["checkpoint_sha256"]
    base_frames = by["sam2-base"]["frames_embedded"] + by["sam2-base"]["frames_from_cache"]
    assert 0 < base_frames <= by["sam2-base"]["n_frames"]  # frames with a prompt
    image = np.asarray(video.load_image())
    for name, ckpt in (("sam2-base", None), ("sam2-tuned", res.checkpoint)):
        assert by[name]["method"] == "sam2"
        again = segment_recording(
            image, InferenceConfig(image_size=128, method="sam2"), checkpoint=ckpt
        )
        want = score_labels(again.labels, gt.astype(np.uint32))
        for k in ("iou", "dice", "f1", "ap50", "tp", "fp", "fn"):
            assert by[name][k] == pytest.approx(want[k]), (name, k)
        for k in ("iou", "dice", "pixel_accuracy", "precision", "recall", "f1", "ap50"):
            assert 0.0 <= by[name][k] <= 1.0, (name, k)
    table = rep.to_table()
    assert "sam2-tuned" in table and "sam2-base" in table and "baseline" in table
    assert d["summary"][0]["n_videos"] == 1 and d["models"]["baseline"] is None
    assert [s["model"] for s in d["summary"]] == ["sam2-base", "sam2-tuned", "baseline"]
    for s in d["summary"]:
        assert s["f1_mean"] == pytest.approx(by[s["model"]]["f1"]), s["model"]


_CHILD = """
import sys
from pathlib import Path

from calseg.segment.finetune import FinetuneConfig, finetune

def on_history(entry):
    if entry["kind"] == "train":
        print("STEP", entry["step"], flush=True)

cfg = FinetuneConfig.model_validate_json(sys.argv[3])
finetune(Path(sys.argv[1]), Path(sys.argv[2]), cfg, cache_dir=Path(sys.argv[4]),
         on_history=on_history)
print("DONE", flush=True)
"""


def test_run_killed_with_sigkill_resumes_to_the_same_final_step_count(tmp_path):
    """A fine-tune in a child process is SIGKILLed mid-way (no clean-up can run); the same
    call then resumes from the last.pt of the last validation and ends at the configured step
    count with one continuous history."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ds = small_dataset(tmp_path / "ds", t=6, size=48)
    cfg = FinetuneConfig(
        image_size=64,
        steps=12,
        batch_size=2,
        warmup_steps=2,
        val_every=4,
        frames_per_video=2,
        val_frames_per_video=2,
        background_prompt_fraction=0.0,
        seed=0,
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != CHECKPOINT_ENV}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ds), str(out), cfg.model_dump_json(), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 600
    try:
        for line in child.stdout:
            if line.startswith("STEP 5") or time.monotonic() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)  # mid-way: after the step-4 save, before the end
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    killed_at = saved["metadata"]["step"]
    assert killed_at in (4, 8), killed_at  # the last validation's save before the kill

    again = finetune(ds, out, cfg, cache_dir=cache)
    assert any("resumed" in w and f"step {killed_at}" in w for w in again.warnings)
    train_steps = [h["step"] for h in again.history if h["kind"] == "train"]
    assert train_steps == list(range(1, 13))  # up to the kill's save from the child, rest here
    assert all(math.isfinite(h["loss"]) for h in again.history if h["kind"] == "train")
    final = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert final["metadata"]["step"] == 12


def test_validation_scores_what_inference_does(trained):
    """select_by='f1' (the default): the validation's F1 and foreground IoU of the selected
    step are what segment_recording (activity prompts, decoding, post-processing) and
    score_labels give with best.pt on the val video's validated frames."""
    ds, _root, cfg, res = trained
    assert cfg.select_by == "f1"
    vals = {h["step"]: h for h in res.history if h["kind"] == "val"}
    assert res.best_step in vals and res.improved == (res.best_step > 0)
    entry = vals[res.best_step]
    assert res.best_score == entry["val_f1"]
    assert max(h["val_f1"] for h in vals.values()) == entry["val_f1"]
    (video,) = split_videos(ds, "val")
    image, gt = np.asarray(video.load_image()), np.asarray(video.load_labels())
    loaded = load_sam2(checkpoint=res.checkpoint, device="cpu")
    seg = segment_recording(image, inference_config(cfg), model=loaded)
    idx = _select_frames(gt.astype(np.uint32), cfg.val_frames_per_video)
    sc = score_labels(seg.labels[idx], gt[idx])
    assert sc["f1"] == pytest.approx(entry["val_f1"], abs=1e-9)
    assert sc["iou"] == pytest.approx(entry["val_fg_iou"], abs=1e-9)


def test_no_improvement_is_said(tmp_path, caplog):
    """A run whose steps change nothing (lr ~ 0) keeps the step-0 model and says so."""
    ds = small_dataset(tmp_path / "ds", t=4, size=32)
    cfg = FinetuneConfig(
        image_size=64, steps=2, batch_size=2, frames_per_video=2, val_every=1, lr=1e-12
    )
    with caplog.at_level("WARNING"):
        res = finetune(ds, tmp_path / "out", cfg)
    assert res.best_step == 0 and res.improved is False
    assert any(w.startswith("no step improved on the initial model") for w in res.warnings)
    assert "no step improved on the initial model" in caplog.text


def test_validation_uses_the_recordings_own_cell_size(tmp_path):
    """Validation prompts from the activity as ``infer`` makes it, with the val recording's
    own cell-size estimate (it used the 11 px prior, so on a recording of ~18 px cells the
    val F1 that selects checkpoints scored other prompts than inference): the selected step's
    val F1 and foreground IoU are segment_recording's on the validated frames."""
    from test_analysis_cellsize import _tessellation_recording

    from calseg.analysis.cellsize import estimate_cell_diameter

    movie, _ = _tessellation_recording(18.0, side=96, n_frames=24, seed=3)
    est = estimate_cell_diameter(movie)
    assert est.found and abs(est.diameter_px - 11.0) > 4  # the prior would prompt otherwise
    z = (movie - np.median(movie, axis=0)) / (movie.std(axis=0) + 1.0)
    val_labels = np.where(z > 1.0, 1, 0).astype(np.uint32)  # any labels: scored both ways
    vids = []
    for i in range(2):
        img, lab = synth_recording(t=6, h=48, w=48, n_cells=5, seed=20 + i)
        vids.append({"id": f"t{i}", "split": "train", "image": img, "labels": lab})
    vids.append({"id": "val", "split": "val", "image": movie, "labels": val_labels})
    ds = write_dataset(tmp_path / "ds", vids)
    cfg = FinetuneConfig(
        image_size=64, steps=2, batch_size=2, frames_per_video=2, val_frames_per_video=3
    )
    res = finetune(ds, tmp_path / "out", cfg, cache_dir=tmp_path / "cache")
    entry = next(h for h in res.history if h["kind"] == "val" and h["step"] == res.best_step)
    loaded = load_sam2(checkpoint=res.checkpoint, device="cpu")
    seg = segment_recording(movie, inference_config(cfg), model=loaded)
    assert seg.activity["cell_diameter_source"] == "estimated"
    idx = _select_frames(val_labels, cfg.val_frames_per_video)
    sc = score_labels(seg.labels[idx], val_labels[idx])
    assert sc["f1"] == pytest.approx(entry["val_f1"], abs=1e-9)
    assert sc["iou"] == pytest.approx(entry["val_fg_iou"], abs=1e-9)
