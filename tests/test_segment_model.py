"""SAM2 loading: configs, random weights, checkpoints, checksums, embedding cache."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from calseg.segment.embeddings import EmbeddingCache, FrameGeometry, encode_frames, frames_to_model
from calseg.segment.model import (
    CHECKPOINT_ENV,
    ChecksumMismatchError,
    ModelLoadError,
    compute_encoder_hash,
    file_sha256,
    load_sam2,
    resolve_config,
    save_finetuned_checkpoint,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    old = os.environ.pop(CHECKPOINT_ENV, None)
    yield load_sam2("sam2.1_hiera_t", None, image_size=64, device="cpu")
    if old is not None:
        os.environ[CHECKPOINT_ENV] = old


def test_resolve_config_names():
    assert resolve_config("sam2.1_hiera_t")[1] == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert resolve_config("configs/sam2.1/sam2.1_hiera_s.yaml")[0] == "sam2.1_hiera_s"
    with pytest.raises(ModelLoadError, match="unknown SAM2 config"):
        resolve_config("sam3_huge")


def test_random_weights_flag_warning_and_determinism(tiny, caplog, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    assert tiny.info.random_weights is True
    assert tiny.info.image_size == 64 and tiny.info.n_parameters > 30_000_000
    with caplog.at_level(logging.WARNING):
        other = load_sam2("sam2.1_hiera_t", image_size=64, device="cpu")
    assert "RANDOM WEIGHTS" in caplog.text
    # seeded init: two random models share the encoder (and so the embedding cache)
    assert compute_encoder_hash(other.model) == compute_encoder_hash(tiny.model)
    d = tiny.info.to_dict()
    assert d["config"] == "sam2.1_hiera_t" and d["checkpoint"] is None


def test_full_checkpoint_checksum_and_bad_files(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["sam_mask_decoder.iou_token.weight"] += 1.0  # distinguishable from the random init
    ck = tmp_path / "sam2_tiny.pt"
    torch.save({"model": sd}, ck)
    sha = file_sha256(ck)
    m = load_sam2("sam2.1_hiera_t", ck, image_size=64, device="cpu", expected_sha256=sha)
    assert m.info.random_weights is False and m.info.checkpoint_sha256 == sha
    torch.testing.assert_close(
        m.model.sam_mask_decoder.iou_token.weight, sd["sam_mask_decoder.iou_token.weight"]
    )
    with pytest.raises(ChecksumMismatchError):
        load_sam2("sam2.1_hiera_t", ck, image_size=64, device="cpu", expected_sha256="0" * 64)
    # the library never reads the environment (issue 16 item 6): the CLI and the service
    # read $CALSEG_SAM2_CHECKPOINT and pass it as the checkpoint
    monkeypatch.setenv(CHECKPOINT_ENV, str(ck))
    env = load_sam2("sam2.1_hiera_t", image_size=64, device="cpu")
    assert env.info.checkpoint is None and env.info.random_weights
    monkeypatch.delenv(CHECKPOINT_ENV)
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"not_a_key": torch.zeros(1)}}, bad)
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_sam2("sam2.1_hiera_t", bad, image_size=64, device="cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        load_sam2("sam2.1_hiera_t", tmp_path / "missing.pt", image_size=64, device="cpu")


def test_a_moved_finetuned_base_is_found_only_where_its_sha256_matches(tiny, tmp_path, monkeypatch):
    """A fine-tuned checkpoint whose recorded base moved: the caller's ``base_checkpoint``
    (the configured one, read by the CLI/service) is looked in, never ``$CALSEG_SAM2_CHECKPOINT``
    read by the library (:func:`calseg.segment.model.base_candidates`), and a file is taken
    only when its SHA-256 is the recorded one: another model there is said, not used."""
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["image_encoder.neck.convs.0.conv.bias"] += 0.5  # an encoder unlike the random one
    base = tmp_path / "base.pt"
    torch.save({"model": sd}, base)
    ft = save_finetuned_checkpoint(
        load_sam2("sam2.1_hiera_t", base, image_size=64, device="cpu"), tmp_path / "ft.pt", {}
    )
    moved = tmp_path / "elsewhere.pt"
    base.rename(moved)
    other = tmp_path / "other.pt"
    torch.save({"model": tiny.model.state_dict()}, other)
    with pytest.raises(ModelLoadError, match="found other.pt with another SHA-256"):
        load_sam2("sam2.1_hiera_t", ft, image_size=64, device="cpu", base_checkpoint=other)
    monkeypatch.setenv(CHECKPOINT_ENV, str(moved))
    with pytest.raises(ModelLoadError, match="not on this machine"):
        load_sam2("sam2.1_hiera_t", ft, image_size=64, device="cpu")
    m = load_sam2("sam2.1_hiera_t", ft, image_size=64, device="cpu", base_checkpoint=moved)
    assert not m.info.random_weights
    torch.testing.assert_close(
        m.model.state_dict()["image_encoder.neck.convs.0.conv.bias"],
        sd["image_encoder.neck.convs.0.conv.bias"],
    )


def test_embedding_cache_hits_and_shapes(tiny, tmp_path):
    geom = FrameGeometry(40, 30, 64)
    frames = np.random.default_rng(0).random((3, 40, 30)).astype(np.float32)
    x = frames_to_model(frames, geom)
    first = encode_frames(tiny, x, cache_dir=tmp_path)
    assert first.n_computed == 3 and first.n_cached == 0
    assert tuple(first.image_embed.shape) == (3, 256, 4, 4)
    assert tuple(first.feat_s0.shape) == (3, 32, 16, 16)
    assert tuple(first.feat_s1.shape) == (3, 64, 8, 8)
    again = encode_frames(tiny, x, cache_dir=tmp_path)
    assert again.n_cached == 3 and again.n_computed == 0
    torch.testing.assert_close(again.image_embed, first.image_embed)
    # a different frame is a cache miss
    x2 = x.clone()
    x2[0] = 1.0 - x2[0]
    assert encode_frames(tiny, x2, cache_dir=tmp_path).n_computed == 1
    key = EmbeddingCache.model_key("sam2.1_hiera_t", 64, tiny.info.encoder_sha256)
    assert len(list((tmp_path / key).glob("*.pt"))) == 4


def test_embedding_cache_prunes_the_least_recently_used_entries(tmp_path) -> None:
    """Over its limit the cache drops its oldest entries (by write or last hit) down to 80 %
    of it; a hit makes an old entry recent; files being written and a cache within its limit
    (or with no limit) are left alone."""
    import os

    from calseg.segment.embeddings import PRUNE_TO_FRACTION

    cache = EmbeddingCache(tmp_path)
    key = "m__s64__0123"
    for i in range(10):
        cache.save(key, f"f{i}", {"x": torch.zeros(256)})
        os.utime(tmp_path / key / f"f{i}.pt", (1000.0 + i, 1000.0 + i))
    (tmp_path / key / "half-written.tmp").write_bytes(b"x" * 10_000)
    size = (tmp_path / key / "f0.pt").stat().st_size
    assert cache.prune(0).n_removed == 0 and cache.prune(10 * size).n_removed == 0
    assert cache.load(key, "f1") is not None  # a hit: f1 is now the most recent
    res = cache.prune(5 * size)  # 10 entries over a limit of 5: down to 4 (80 %)
    assert PRUNE_TO_FRACTION == 0.8
    assert (res.n_removed, res.bytes_removed, res.bytes_left) == (6, 6 * size, 4 * size)
    left = sorted(p.stem for p in (tmp_path / key).glob("*.pt"))
    assert left == ["f1", "f7", "f8", "f9"]
    assert (tmp_path / key / "half-written.tmp").exists()
    assert cache.load(key, "f0") is None  # pruned: a miss, recomputed by its caller
    assert EmbeddingCache(tmp_path / "absent").prune(1).bytes_left == 0


def test_embedding_cache_pruning_touches_nothing_outside_the_cache(tmp_path) -> None:
    """An attack check: pruning followed a symbolic link to a folder and deleted a checkpoint
    outside the cache, counted what links point at, and emptied the cache when an entry could
    not be removed (a folder named like one). Only regular files in real folders count; stale
    temporary files of killed writes go."""
    import os

    root, outside = tmp_path / "embeddings", tmp_path / "outside"
    outside.mkdir()
    (outside / "sam2.1_hiera_tiny.pt").write_bytes(b"w" * 50_000)
    cache = EmbeddingCache(root)
    for i in range(5):
        cache.save("k", f"f{i}", {"x": torch.zeros(256)})
        os.utime(root / "k" / f"f{i}.pt", (1000.0 + i, 1000.0 + i))
    size = (root / "k" / "f0.pt").stat().st_size
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "k" / "big.pt").symlink_to(outside / "sam2.1_hiera_tiny.pt")
    (root / "k" / "d.pt").mkdir()
    for name, age in (("old.tmp", 7200.0), ("new.tmp", 10.0)):
        (root / "k" / name).write_bytes(b"t" * 100)
        os.utime(root / "k" / name, (5e6 - age, 5e6 - age))
    res = cache.prune(4 * size, now=5e6)  # 5 entries over a limit of 4: down to 3
    assert (outside / "sam2.1_hiera_tiny.pt").stat().st_size == 50_000
    assert (root / "k" / "big.pt").is_symlink() and (root / "k" / "d.pt").is_dir()
    left = sorted(p.name for p in (root / "k").iterdir())
    assert left == ["big.pt", "d.pt", "f2.pt", "f3.pt", "f4.pt", "new.tmp"]
    assert (res.n_removed, res.bytes_left) == (3, 3 * size)  # f0, f1 and old.tmp


def test_single_mask_output_is_identical_in_train_and_eval_mode(tiny):
    """With multimask_output=False the decoder gives its single-mask token in both modes; the
    eval-only stability swap of SAM2's post-processing is off unless asked for."""
    from calseg.segment.model import run_decoder

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, 4, 4, generator=g)
    high = [torch.randn(1, 32, 16, 16, generator=g), torch.randn(1, 64, 8, 8, generator=g)]
    coords = torch.tensor([[[20.0, 30.0]], [[40.0, 10.0]]])
    labels = torch.ones(2, 1, dtype=torch.int32)
    dec = tiny.model.sam_mask_decoder
    assert dec.dynamic_multimask_via_stability is True  # SAM2 post-processing config
    with torch.no_grad():
        dec.train()
        lo_train, iou_train, _ = run_decoder(
            tiny.model, emb, high, coords, labels, multimask_output=False
        )
        dec.eval()
        lo_eval, iou_eval, _ = run_decoder(
            tiny.model, emb, high, coords, labels, multimask_output=False
        )
        lo_multi, _, _ = run_decoder(tiny.model, emb, high, coords, labels, multimask_output=True)
    assert lo_eval.shape == (2, 1, 16, 16) and lo_multi.shape == (2, 3, 16, 16)
    assert torch.equal(lo_train, lo_eval) and torch.equal(iou_train, iou_eval)
    assert dec.dynamic_multimask_via_stability is True  # restored after the call


def test_embedding_cache_prunes_all_users_folders_together(tmp_path) -> None:
    """The service keeps one cache folder per user (``user-<id>/<model_key>/``): the pruning
    counts them all against one limit and drops the least recently used wherever it is; a
    user folder that is a symbolic link is not followed."""
    import os

    root, outside = tmp_path / "embeddings", tmp_path / "outside"
    (outside / "k").mkdir(parents=True)
    (outside / "k" / "keep.pt").write_bytes(b"w" * 5000)
    for n, user in enumerate(("user-a", "user-b")):
        cache = EmbeddingCache(root / user)
        for i in range(3):
            cache.save("k", f"f{i}", {"x": torch.zeros(256)})
            t = 1000.0 + 2 * i + n  # a and b interleaved in time
            os.utime(root / user / "k" / f"f{i}.pt", (t, t))
    (root / "user-link").symlink_to(outside, target_is_directory=True)
    size = (root / "user-a" / "k" / "f0.pt").stat().st_size
    res = EmbeddingCache(root).prune(5 * size)  # 6 entries over 5: down to 4 (80 %)
    assert (res.n_removed, res.bytes_left) == (2, 4 * size)
    left = sorted(p.relative_to(root).as_posix() for p in root.glob("user-[ab]/k/*.pt"))
    assert left == ["user-a/k/f1.pt", "user-a/k/f2.pt", "user-b/k/f1.pt", "user-b/k/f2.pt"]
    assert (outside / "k" / "keep.pt").exists()


class _Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_holds_code_is_refused_and_never_run(tmp_path) -> None:
    """Three readers of CalSeg checkpoints (held-out prompted IoU, a run's resume, the
    pretrain pipeline) loaded them with ``weights_only=False``, which runs whatever code a
    pickle holds: a checkpoint passed to ``heldout_prompted_iou`` could run anything. Every
    reader loads tensors and plain data only; the error names the file and what it holds,
    without torch's advice to load it again unsafely."""
    from calseg.segment.finetune import heldout_prompted_iou

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"metadata": {"finetune_config": {}}, "x": _Payload(marker)}, evil)
    for read in (
        lambda: heldout_prompted_iou(evil, tmp_path),
        lambda: load_sam2("sam2.1_hiera_t", evil, image_size=64, device="cpu"),
    ):
        with pytest.raises(ModelLoadError, match="evil.pt") as err:
            read()
        assert "never code" in str(err.value) and "weights_only` set to `False`" not in str(
            err.value
        )
    assert not marker.exists()
