"""segment_recording (SAM2 with random weights, and the classical baseline) and prompts."""

import numpy as np
import pytest
from test_segment_synth import synth_recording

from calseg.analysis.metrics import foreground_scores, match_instances_stack
from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.segment.model import CHECKPOINT_ENV, load_sam2
from calseg.segment.prompts import compute_activity, frame_prompts


@pytest.fixture(scope="module")
def tiny():
    import os

    old = os.environ.pop(CHECKPOINT_ENV, None)
    yield load_sam2("sam2.1_hiera_t", None, image_size=64, device="cpu")
    if old is not None:
        os.environ[CHECKPOINT_ENV] = old


@pytest.mark.parametrize("hw", [(21, 14), (173, 173), (100, 100), (128, 256)])
def test_sam2_output_shape_round_trip(tiny, hw, tmp_path):
    h, w = hw
    t = 3
    rng = np.random.default_rng(0)
    frames = rng.poisson(100, size=(t, h, w)).astype(np.uint16)
    frames[1, h // 3 : h // 3 + 5, w // 3 : w // 3 + 5] += 800  # one transient
    cfg = InferenceConfig(image_size=64, max_mask_area_fraction=1.0, use_object_score=False)
    res = segment_recording(frames, cfg, model=tiny, cache_dir=tmp_path)
    assert res.labels.shape == (t, h, w) and res.labels.dtype == np.uint32
    assert res.model_info["random_weights"] is True
    assert any("RANDOM" in wmsg for wmsg in res.warnings)
    assert res.normalisation["method"] == "percentile-per-recording"
    # the transient produced a prompt, in frame 1, inside the bright square
    assert res.prompts and {p["frame"] for p in res.prompts} == {1}
    p = res.prompts[0]
    assert h // 3 - 1 <= p["y"] <= h // 3 + 5 and w // 3 - 1 <= p["x"] <= w // 3 + 5
    # only labels where prompts were kept, ids from the seed map
    kept = {q["seed_id"] for q in res.prompts if q["kept"]}
    assert set(np.unique(res.labels)) - {0} == kept


def test_uint16_near_65535_recording(tiny):
    rng = np.random.default_rng(2)
    frames = rng.integers(65400, 65430, size=(4, 32, 32)).astype(np.uint16)
    frames[2, 10:16, 10:16] = 65535
    res = segment_recording(frames, InferenceConfig(image_size=64), model=tiny)
    n = res.normalisation
    assert 65400 <= n["low"] < n["high"] <= 65535
    assert res.labels.shape == frames.shape
    base = segment_recording(frames, InferenceConfig(method="baseline"))
    # the saturated square is found by the baseline despite values at the uint16 limit
    assert base.labels[2, 12, 12] > 0 and base.labels[0].max() == 0


def test_nan_frames_are_handled(tiny):
    img, _ = synth_recording(t=6, h=40, w=40, n_cells=3, seed=4)
    f = img.astype(np.float32)
    f[0, :5, :5] = np.nan
    f[3, 7, 7] = np.inf
    res = segment_recording(f, InferenceConfig(image_size=64), model=tiny)
    assert res.labels.shape == f.shape
    assert res.normalisation["n_nonfinite"] == 26
    assert any("NaN/Inf" in w for w in res.warnings)


def test_baseline_finds_bright_blobs():
    img, lab = synth_recording(t=16, h=96, w=96, n_cells=10, seed=1)
    res = segment_recording(img, InferenceConfig(method="baseline"))
    assert res.model_info is None and res.labels.shape == img.shape
    fg = foreground_scores(res.labels, lab)
    inst = match_instances_stack(res.labels, lab)
    assert fg["iou"] > 0.5, fg
    assert inst["recall"] > 0.6, inst
    # ids are stable over time: a cell keeps one id in all frames where it is found
    for cid in np.unique(lab)[1:]:
        ids = np.unique(res.labels[lab == cid])
        assert len(ids[ids > 0]) <= 2


def test_prompts_come_from_activity_not_labels():
    img, lab = synth_recording(t=10, h=64, w=64, n_cells=5, seed=7, always_active=False)
    act = compute_activity(img)
    assert act.stats["n_seeds"] >= 3
    hits = 0
    total = 0
    for t in range(img.shape[0]):
        for p in frame_prompts(act, t, n_negative=1):
            total += 1
            hits += lab[t, p.y, p.x] > 0
            assert all((x, y) != (p.x, p.y) for x, y in p.negatives)
    assert total > 0 and hits / total > 0.8
    quiet = compute_activity(np.random.default_rng(0).poisson(100, (8, 32, 32)).astype(np.uint16))
    assert quiet.stats["n_seeds"] <= 1


@pytest.mark.parametrize("n_frames", [1, 2])
def test_too_short_recording_says_why_it_finds_nothing(n_frames):
    rng = np.random.default_rng(0)
    frames = rng.integers(100, 4000, (n_frames, 40, 52)).astype(np.uint16)
    res = segment_recording(frames, InferenceConfig(method="baseline"))
    assert res.labels.shape == (n_frames, 40, 52)
    assert any(f"only {n_frames} frame(s)" in w for w in res.warnings), res.warnings


def test_the_same_recording_in_any_float_units_gives_the_same_cells() -> None:
    """A tenth attack run: a float recording times 1e-8 gave 2 cells instead of 18 (active
    target), times 1e-10 none; the floors of dF/F and of the noise were 1e-6 in the
    recording's units. Both targets now scale float data of any magnitude by a power of two
    (exact) first: the same cells at every scale (an 11th: down to x1e-38 and up to x1e34,
    where the power of two itself is no float32)."""
    from calseg.analysis.scale import unit_exponent
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_videos

    cfg = SimulationConfig(n_videos=1, n_val_videos=0, n_test_videos=0, n_frames=40,
                           height=128, width=128, seed=3)  # fmt: skip
    frames = np.asarray(simulate_videos(cfg)[0]["image"], np.float32)
    assert unit_exponent(frames) == 0  # camera counts are used as they are
    for target in ("active", "cells"):
        icfg = InferenceConfig(method="classical", target=target)
        reference = segment_recording(frames, icfg).labels
        assert reference.max() > 20, target
        # powers of two (1e-8, 1e-10, 1e-30, 1e20 within a factor 2), so the scaled
        # recording holds exactly the same numbers and only the exponents differ
        for scale in (2.0**-27, 2.0**-33, 2.0**-100, 2.0**-132, 2.0**66, 2.0**112):
            labels = segment_recording((frames * scale).astype(np.float32), icfg).labels
            np.testing.assert_array_equal(labels, reference, err_msg=f"{target} x {scale:g}")
        n = int(reference.max())
        for scale in (1e-10, 1e20):  # rounded products: the same cells, within one
            labels = segment_recording((frames * scale).astype(np.float32), icfg).labels
            assert abs(int(labels.max()) - n) <= 1, (target, scale, labels.max(), n)
