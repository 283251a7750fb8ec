"""Fine-tuning options: unscale-then-clip, gradient accumulation, LoRA, full fine-tuning, box
prompt mixtures, checkpoint provenance, hub ids offline (random-weight tiny SAM2, CPU)."""

import math

import numpy as np
import pytest
import torch
from test_segment_synth import small_dataset

from calseg.segment.finetune import (
    FinetuneConfig,
    _batch_losses,
    _prepare_video,
    _sample_batch,
    _unscale_and_clip,
    finetune,
)
from calseg.segment.lora import apply_lora, lora_parameters, merge_lora
from calseg.segment.model import (
    CHECKPOINT_ENV,
    ModelLoadError,
    compute_encoder_hash,
    file_sha256,
    load_sam2,
    trainable_parameter_names,
)
from calseg.segment.prompts import pack_prompts


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny():
    import os

    os.environ.pop(CHECKPOINT_ENV, None)
    return load_sam2("sam2.1_hiera_t", None, image_size=64, device="cpu")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("opt") / "ds", t=4, size=32)


def test_unscale_happens_before_clipping():
    """With a real GradScaler (scale 1024) the clip must act on the TRUE gradient: the returned
    norm is the unscaled one, and the applied gradient has norm max_grad_norm. Clipping before
    unscaling would report a 1024x norm and leave a gradient 1024x too small."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    loss = (w * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4), norm 5
    scaler.scale(loss).backward()
    assert torch.allclose(w.grad, torch.tensor([3.0, 4.0]) * 1024)
    norm = _unscale_and_clip([w], opt, scaler, max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(w.detach(), torch.tensor([2.4, 3.2]), atol=1e-6)


def test_grad_accumulation_equals_one_big_batch(tiny, ds, tmp_path):
    """k micro-batches with loss / k accumulate to the gradient of one batch of all prompts."""
    from calseg.segment._data import split_videos

    cfg = FinetuneConfig(
        image_size=64, batch_size=8, background_prompt_fraction=0.0, frames_per_video=3
    )
    vid = _prepare_video(tiny, split_videos(ds, "train")[0], 3, cfg, tmp_path, lambda *a: None)
    items = [(0, f, c) for f in range(len(vid.frames_idx)) for c in vid.eroded_points[f]]
    chosen, coords, plabels = _sample_batch([vid], items, cfg, np.random.default_rng(0))
    assert len(chosen) == 8
    names = set(trainable_parameter_names(tiny.model))
    params = [p for n, p in tiny.model.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    try:
        dev = torch.device("cpu")
        tiny.model.zero_grad(set_to_none=True)
        ls = _batch_losses(tiny.model, [vid], chosen, coords, plabels, cfg, dev, False)
        ls["loss"].backward()
        used = [p for p in params if p.grad is not None]  # (e.g. not the unused mask tokens)
        assert len(used) > 0.5 * len(params)
        full = [p.grad.clone() for p in used]
        tiny.model.zero_grad(set_to_none=True)
        for half in (slice(0, 4), slice(4, 8)):
            ls = _batch_losses(
                tiny.model, [vid], chosen[half], coords[half], plabels[half], cfg, dev, False
            )
            (ls["loss"] / 2).backward()
        for a, b in zip(full, [p.grad for p in used], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert sum(float(g.abs().sum()) for g in full) > 0
    finally:
        tiny.model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    m = load_sam2("sam2.1_hiera_t", None, image_size=64, device="cpu").model
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = m.forward_image(x)["vision_features"].clone()
    names = apply_lora(m, rank=2, alpha=4.0)
    assert len(names) == 12 and all(n.endswith("attn.qkv") for n in names)
    lp = lora_parameters(m)
    assert len(lp) == 24 and sum(p.numel() for p in lp.values()) < 0.01 * 27e6
    with torch.no_grad():
        torch.testing.assert_close(m.forward_image(x)["vision_features"], before)  # B = 0
        for n, p in lp.items():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        adapted = m.forward_image(x)["vision_features"].clone()
        assert not torch.allclose(adapted, before)
        assert merge_lora(m) == 12
        assert not lora_parameters(m)
        torch.testing.assert_close(
            m.forward_image(x)["vision_features"], adapted, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_encoder_training_modes_save_and_reload(mode, ds, tmp_path, tiny):
    cfg = FinetuneConfig(
        image_size=64,
        steps=2,
        batch_size=2,
        warmup_steps=0,
        val_every=2,
        frames_per_video=2,
        val_frames_per_video=1,
        train_mode=mode,
        lr=1e-2,
    )
    res = finetune(ds, tmp_path / "out", cfg)
    train = [h for h in res.history if h["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(h["loss"]) for h in train)
    assert any("recomputed every step" in w for w in res.warnings)
    assert any("meant for a GPU" in w for w in res.warnings) == (mode == "full")
    assert not (tmp_path / "out" / "embeddings").exists()  # nothing cached
    # last.pt: the weights after step 2 (best.pt may be the untrained step-0 validation)
    last = res.checkpoint.parent / "last.pt"
    obj = torch.load(last, map_location="cpu", weights_only=True)
    assert obj["encoder"]["kind"] == mode and obj["metadata"]["train_mode"] == mode
    base_hash = compute_encoder_hash(tiny.model)
    assert obj["metadata"]["encoder_sha256"] == base_hash
    m = load_sam2("sam2.1_hiera_t", last, image_size=64, device="cpu")
    assert m.info.train_mode == mode
    assert compute_encoder_hash(m.model) != base_hash  # the encoder really changed
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    w = m.model.state_dict()[key]
    w0 = tiny.model.state_dict()[key]
    if mode == "lora":
        st = obj["encoder"]["state"]
        a = st["image_encoder.trunk.blocks.0.attn.qkv.lora_A"]
        b = st["image_encoder.trunk.blocks.0.attn.qkv.lora_B"]
        torch.testing.assert_close(w, w0 + b @ a * (cfg.lora_alpha / cfg.lora_rank))
    else:
        torch.testing.assert_close(w, obj["encoder"]["state"]["trunk.blocks.0.attn.qkv.weight"])
        assert not torch.equal(w, w0)


def test_box_prompts_pack_and_train(ds, tmp_path):
    coords, labels = pack_prompts(
        [(5.0, 6.0), None], [[(1.0, 1.0)], []], [None, (2.0, 3.0, 9.0, 10.0)]
    )
    assert labels.tolist() == [[1, 0], [2, 3]]
    assert coords[1].tolist() == [[2.0, 3.0], [9.0, 10.0]]
    with pytest.raises(ValueError, match="positive point or a box"):
        pack_prompts([None], [[]], [None])
    cfg = FinetuneConfig(
        image_size=64,
        steps=3,
        batch_size=4,
        val_every=3,
        frames_per_video=2,
        val_frames_per_video=1,
        background_prompt_fraction=0.0,
        prompt_mix={"box": 1.0, "box+point": 1.0, "point": 1.0},
    )
    res = finetune(ds, tmp_path / "out", cfg, cache_dir=tmp_path / "cache")
    assert all(math.isfinite(h["loss"]) for h in res.history if h["kind"] == "train")
    with pytest.raises(ValueError, match="prompt_mix"):
        FinetuneConfig(prompt_mix={"point": 0.0})


def test_checkpoint_records_its_provenance(ds, tmp_path):
    cfg = FinetuneConfig(
        image_size=64, steps=2, batch_size=2, val_every=2, frames_per_video=2, seed=3
    )
    res = finetune(ds, tmp_path / "out", cfg, cache_dir=tmp_path / "cache")
    meta = torch.load(res.checkpoint, map_location="cpu", weights_only=True)["metadata"]
    assert meta["config"] == "sam2.1_hiera_t" and meta["image_size"] == 64
    assert meta["dataset_manifest_sha256"] == file_sha256(ds / "manifest.json")
    assert meta["finetune_config"]["seed"] == 3 and meta["train_mode"] == "decoder"
    assert meta["parent_checkpoint"] is None and meta["base_random_weights"] is True
    # best.pt is the step selected by config.select_by (here val F1), and says so
    assert meta["selection"] == {
        "select_by": "f1",
        "step": res.best_step,
        "score": [
            res.best_score,
            next(
                h["val_fg_iou"]
                for h in res.history
                if h.get("step") == res.best_step and h["kind"] == "val"
            ),
        ],
    }
    vals = {h["step"]: h for h in res.history if h["kind"] == "val"}
    assert meta["metrics"]["val_mean_iou"] == vals[res.best_step]["val_mean_iou"]
    loss = meta["metrics"]["train_loss_last10_mean"]  # none yet when step 0 is selected
    assert (loss is None) if res.best_step == 0 else loss > 0
    assert meta["train_videos"] == ["v000", "v001"] and meta["val_videos"] == ["v002"]
    # its own checksum: in the result and in the sha256sum-format sidecar
    assert res.checkpoint_sha256 == file_sha256(res.checkpoint)
    side = (tmp_path / "out" / "best.pt.sha256").read_text().split()
    assert side == [res.checkpoint_sha256, "best.pt"]


def test_hub_id_on_an_offline_machine_says_what_to_do():
    with pytest.raises(ModelLoadError) as exc:
        load_sam2("sam2.1_hiera_t", "hf:facebook/sam2.1-hiera-tiny", image_size=64, device="cpu")
    msg = str(exc.value)
    assert "sam2.1_hiera_tiny.pt" in msg and "pass its path" in msg
    with pytest.raises(ModelLoadError, match="unknown SAM2 hub id"):
        load_sam2("sam2.1_hiera_t", "hf:nobody/nothing", image_size=64, device="cpu")
