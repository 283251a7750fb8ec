"""Augmentation keeps image and labels aligned, keeps shapes/dtypes, is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.segment.augment import AugmentConfig, AugmentError, augment_recording

GEOMETRY_ONLY = AugmentConfig(
    p_flip=0.5,
    p_rot90=0.5,
    p_crop=1.0,
    p_elastic=1.0,
    elastic_alpha_px=4.0,
    p_blur=0.0,
    gain_range=(1.0, 1.0),
    offset_range=(0.0, 0.0),
    log_gamma=0.0,
    contrast_range=(1.0, 1.0),
    p_noise=0.0,
)


def _label_image(h: int = 64, w: int = 64) -> np.ndarray:
    """A stack of 3 frames with 9 square cells; ids 1..9 (some switched off per frame)."""
    lab = np.zeros((3, h, w), np.uint32)
    k = 1
    for r in range(3):
        for c in range(3):
            lab[:, 4 + r * 20 : 18 + r * 20, 4 + c * 20 : 18 + c * 20] = k
            k += 1
    lab[1][lab[1] == 5] = 0
    return lab


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])
def test_geometric_transforms_keep_image_and_labels_aligned(seed, shape):
    # An image whose intensity IS its label id: after any geometric transform, each pixel's
    # (interpolated) intensity must still equal its label wherever the pixel is not on a
    # cell boundary or the frame's edge (bilinear interpolation mixes neighbours only there).
    lab = _label_image(*shape)
    img = (lab * 1000).astype(np.uint16)
    out_img, out_lab, params = augment_recording(img, lab, seed, GEOMETRY_ONLY)
    assert out_img.shape == img.shape and out_lab.shape == lab.shape
    assert out_img.dtype == np.uint16 and out_lab.dtype == np.uint32
    assert "crop" in params and "elastic" in params
    # labels stay label values (nearest neighbour, never blended)
    assert set(np.unique(out_lab)) <= set(np.unique(lab))
    from scipy import ndimage as ndi

    for t in range(3):
        # bilinear support spans 1 source px = 1 / crop scale (<= 1.7) output px each side
        edge = ndi.grey_dilation(out_lab[t], size=5) != ndi.grey_erosion(out_lab[t], size=5)
        edge[[0, 1, -2, -1], :] = edge[:, [0, 1, -2, -1]] = True  # fill value mixed in there
        interior = ~edge
        assert interior.mean() > 0.3
        assert np.array_equal(out_img[t][interior], (out_lab[t][interior] * 1000).astype(np.uint16))
    # a cell switched off in frame 1 stays off in frame 1 only
    assert 5 not in np.unique(out_lab[1])
    assert 5 in np.unique(out_lab[0]) or 5 not in np.unique(out_lab[2])


def test_flip_and_rot90_are_exact():
    lab = _label_image()
    img = (lab * 7).astype(np.uint16)
    cfg = GEOMETRY_ONLY.model_copy(update={"p_crop": 0.0, "p_elastic": 0.0})
    seen = set()
    for seed in range(20):
        oi, ol, p = augment_recording(img, lab, seed, cfg)
        assert np.array_equal(oi, (ol * 7).astype(np.uint16))  # exact: no interpolation
        seen.add((p.get("flip_rows", False), p.get("flip_cols", False), p.get("rot90", 0)))
    assert len(seen) >= 4


def test_intensity_and_noise_change_the_image_not_the_labels():
    rng = np.random.default_rng(0)
    lab = _label_image()
    img = (200 + 800 * (lab > 0) + rng.normal(0, 5, lab.shape)).astype(np.uint16)
    cfg = AugmentConfig(p_flip=0, p_rot90=0, p_crop=0, p_elastic=0, p_noise=1.0, p_blur=1.0)
    oi, ol, p = augment_recording(img, lab, 3, cfg)
    assert np.array_equal(ol, lab)
    assert not np.array_equal(oi, img)
    assert {"gain", "offset", "gamma", "contrast", "noise", "blur_sigma_px"} <= set(p)
    # cells stay brighter than background (contrast kept positive)
    assert oi[lab > 0].mean() > oi[lab == 0].mean() + 50


def test_reproducible_and_seed_dependent():
    lab = _label_image()
    img = (100 + lab * 50).astype(np.uint16)
    a = augment_recording(img, lab, 11)
    b = augment_recording(img, lab, 11)
    c = augment_recording(img, lab, 12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_uint16_range_is_respected():
    lab = _label_image()
    img = np.where(lab > 0, 65000, 100).astype(np.uint16)
    cfg = AugmentConfig(gain_range=(2.0, 2.0), p_noise=1.0)
    oi, _, _ = augment_recording(img, lab, 0, cfg)
    assert oi.dtype == np.uint16 and oi.max() <= 65535


def test_mismatched_inputs_are_refused():
    with pytest.raises(AugmentError, match="same"):
        augment_recording(np.zeros((2, 8, 8)), np.zeros((2, 8, 9), np.uint32), 0)
    with pytest.raises(AugmentError, match="integer"):
        augment_recording(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), 0)


def test_finetune_embeds_k_augmented_variants_once_and_caches_them(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    import torch

    from calseg.segment.finetune import FinetuneConfig, finetune, variant_seed
    from calseg.segment.model import CHECKPOINT_ENV

    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_segment_synth import small_dataset

    ds = small_dataset(tmp_path / "ds", t=4, size=32)

    def run(k: int, cache: Path) -> tuple[dict, int]:
        cfg = FinetuneConfig(
            image_size=64,
            steps=2,
            batch_size=2,
            frames_per_video=2,
            val_frames_per_video=2,
            val_every=2,
            augment_variants=k,
        )
        res = finetune(ds, tmp_path / f"out{k}", cfg, cache_dir=cache)
        meta = torch.load(res.checkpoint, map_location="cpu", weights_only=True)["metadata"]
        return meta, len(list(cache.rglob("*.pt")))

    meta2, n2 = run(2, tmp_path / "c2")
    assert meta2["train_videos"] == [
        "v000",
        "v000~aug1",
        "v000~aug2",
        "v001",
        "v001~aug1",
        "v001~aug2",
    ]
    # 1 val video x 2 frames + 2 train videos x 2 frames x (K + 1) variants, embedded once each
    assert n2 == 2 + 2 * 2 * 3
    # a rerun embeds nothing: the variant is rebuilt bit for bit and found in the cache
    from calseg.io.dataset import load_dataset
    from calseg.progress import null_progress
    from calseg.segment.finetune import _prepare_video
    from calseg.segment.model import load_sam2

    cfg = FinetuneConfig(**meta2["finetune_config"])
    loaded = load_sam2(cfg.model, None, image_size=cfg.image_size, device="cpu")
    video = load_dataset(ds).split("train")[0]
    again = _prepare_video(loaded, video, 2, cfg, tmp_path / "c2", null_progress, variant=1)
    assert again.id == "v000~aug1"
    assert again.emb.n_computed == 0 and again.emb.n_cached == 2
    assert len(list((tmp_path / "c2").rglob("*.pt"))) == n2
    assert variant_seed(0, "v000", 1) != variant_seed(0, "v000", 2)
    json.dumps(meta2["finetune_config"])  # the augmentation settings are recorded
