"""The trainer object (issue 16 item 3): setup / resume / step / validate / checkpoint as
methods, hooks for the loss and prompt sampling, the config read by concern."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from test_segment_synth import small_dataset

from calseg.segment.finetune import (
    CONFIG_GROUPS,
    FinetuneConfig,
    Trainer,
    _batch_losses,
    _sample_batch,
    finetune,
)
from calseg.segment.model import CHECKPOINT_ENV


def _cfg(**kw) -> FinetuneConfig:
    base = dict(
        image_size=64,
        steps=6,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        val_every=3,
        frames_per_video=3,
        val_frames_per_video=2,
        background_prompt_fraction=0.1,
        select_by="prompted_iou",
        seed=0,
    )
    return FinetuneConfig(**{**base, **kw})


def _weights(path) -> dict[str, str]:
    """sha256 of every tensor of a checkpoint (the metadata holds wall times, so not the file)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {
        f"{k}.{kk}": hashlib.sha256(vv.numpy().tobytes()).hexdigest()
        for k, v in sd.items()
        if isinstance(v, dict)
        for kk, vv in v.items()
        if torch.is_tensor(vv)
    }


def _no_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    import os

    os.environ.pop(CHECKPOINT_ENV, None)
    return small_dataset(tmp_path_factory.mktemp("trainer") / "ds", t=6, size=48)


def test_every_config_field_has_exactly_one_group():
    placed = [n for names in CONFIG_GROUPS.values() for n in names]
    assert sorted(placed) == sorted(FinetuneConfig.model_fields), "place new fields in a group"
    assert len(placed) == len(set(placed))
    g = _cfg().group("optimiser")
    assert g["lr"] == 1e-3 and "batch_size" not in g
    with pytest.raises(TypeError):
        g["lr"] = 1.0  # read-only
    with pytest.raises(KeyError, match="no config group"):
        _cfg().group("optimizer")


def test_step_by_step_equals_fit_for_one_seed(ds, tmp_path):
    """The methods, driven by hand, draw the same random numbers as fit(): same weights, same
    history (wall times aside)."""
    cfg = _cfg()
    ref = finetune(ds, tmp_path / "fit", cfg, cache_dir=tmp_path / "cache")

    tr = Trainer(ds, tmp_path / "manual", cfg, cache_dir=tmp_path / "cache")
    tr.setup()
    assert tr.resume() is False and tr.global_step == 0
    tr.disc_prior()
    first = tr.validate()
    assert first["kind"] == "val" and first["step"] == 0
    tr.train_mode()
    while tr.global_step < cfg.steps:
        entry = tr.step()
        assert entry["kind"] == "train" and entry["step"] == tr.global_step
        if tr.global_step % cfg.val_every == 0:
            tr.validate()
            tr.train_mode()
    res = tr.finish()
    assert res.best_step == ref.best_step and res.best_score == ref.best_score
    assert _no_times(res.history) == _no_times(ref.history)
    assert _weights(res.checkpoint) == _weights(ref.checkpoint)
    assert _weights(tmp_path / "manual" / "last.pt") == _weights(tmp_path / "fit" / "last.pt")


def test_loss_and_prompt_hooks_are_called_and_logged(ds, tmp_path):
    calls = {"loss": 0, "prompts": 0}

    def only_cells(videos, pool, cfg, rng):
        """The default sampler without background prompts (cell id 0), whatever the config."""
        calls["prompts"] += 1
        return _sample_batch(
            videos, pool, cfg.model_copy(update={"background_prompt_fraction": 0.0}), rng
        )

    def with_area_penalty(model, videos, chosen, coords, labels, cfg, *rest):
        calls["loss"] += 1
        assert all(c[2] != 0 for c in chosen)  # the sampler hook's prompts reach the loss
        out = _batch_losses(model, videos, chosen, coords, labels, cfg, *rest)
        out["area_penalty"] = 0.0 * out["loss"] + 0.5
        out["loss"] = out["loss"] + out["area_penalty"]
        return out

    cfg = _cfg(steps=4, grad_accum=2, background_prompt_fraction=0.5)
    tr = Trainer(
        ds,
        tmp_path / "hooks",
        cfg,
        cache_dir=tmp_path / "cache",
        loss_fn=with_area_penalty,
        prompt_sampler=only_cells,
    )
    res = tr.fit()
    train = [h for h in res.history if h["kind"] == "train"]
    assert len(train) == 4 and calls["prompts"] == 8 and calls["loss"] == 8
    assert all(h["area_penalty"] == pytest.approx(0.5) for h in train)
    assert all(h["loss"] >= 0.5 for h in train)


def test_resume_continues_from_last_checkpoint(ds, tmp_path):
    cfg = _cfg(steps=6)
    first = Trainer(ds, tmp_path / "run", cfg, cache_dir=tmp_path / "cache")
    first.setup()
    first.disc_prior()
    first.validate()
    first.train_mode()
    for _ in range(3):
        first.step()
    first.validate()  # writes last.pt at step 3: the run "is interrupted" here
    assert first.checkpoint("last").name == "last.pt"

    again = Trainer(ds, tmp_path / "run", cfg, cache_dir=tmp_path / "cache")
    again.setup()
    assert again.resume() is True and again.global_step == 3
    assert any("resumed from" in w for w in again.warnings)
    assert _no_times(again.history) == _no_times(first.history)
    res = again.fit()
    steps = [h["step"] for h in res.history if h["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert np.isfinite([h["loss"] for h in res.history if h["kind"] == "train"]).all()

    other = Trainer(ds, tmp_path / "run", _cfg(steps=6, lr=5e-4), cache_dir=tmp_path / "cache")
    other.setup()
    assert other.resume() is False
    assert any("belongs to a different run" in w for w in other.warnings)


def test_methods_need_setup(tmp_path, ds):
    tr = Trainer(ds, tmp_path / "x", _cfg())
    for method in (tr.step, tr.validate, tr.resume, tr.finish):
        with pytest.raises(RuntimeError, match="setup"):
            method()


def test_disc_prior_row_of_an_evaluation(ds, tmp_path):
    """The "disc prior (no image)" row (issue 14's reference, at inference): the same
    automatic prompts, each mask a disc of the training cells' radius; the decoder is never
    called; a checkpoint fine-tuned without a prior has no such row and is refused as one."""
    from calseg.segment.evaluate import ModelSpecError, evaluate_dataset
    from calseg.segment.model import disc_prior_logits, load_sam2, run_decoder

    res = finetune(
        ds, tmp_path / "ft", _cfg(steps=2, val_every=2, mask_prior="residual"),
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    loaded = load_sam2("sam2.1_hiera_t", res.checkpoint, image_size=64)
    assert loaded.info.prior_mode == "residual" and loaded.info.prior_radius > 0

    def no_call(*a, **k):
        raise AssertionError("the disc row must not run the decoder")

    loaded.model.sam_mask_decoder.forward = no_call
    coords = torch.tensor([[[20.0, 30.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0]])
    low, iou, obj = run_decoder(
        loaded.model, None, None, coords, labels, multimask_output=False,
        prior_radius=loaded.info.prior_radius, prior_mode="disc",
    )  # fmt: skip
    expect = disc_prior_logits(coords, labels, 16, loaded.info.prior_radius)
    assert torch.equal(low, expect) and iou.tolist() == [[1.0]] and obj.item() > 0

    rep = evaluate_dataset(
        ds, {"tuned": ("sam2", res.checkpoint), "disc": ("disc", res.checkpoint)},
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    rows = {r["model"]: r for r in rep.rows}
    assert set(rows) == {"tuned", "disc"} and rows["disc"]["method"] == "disc"
    assert rep.models["disc"]["prior_mode"] == "disc"
    assert 0.0 <= rows["disc"]["f1"] <= 1.0

    plain = finetune(ds, tmp_path / "plain", _cfg(steps=1, val_every=1), cache_dir=tmp_path / "c")
    with pytest.raises(ModelSpecError, match="not fine-tuned with a disc prior"):
        evaluate_dataset(ds, {"disc": ("disc", plain.checkpoint)}, cache_dir=tmp_path / "c")
    with pytest.raises(ModelSpecError):
        evaluate_dataset(ds, {"disc": ("disc", None)})
