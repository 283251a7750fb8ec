"""SAM2 video propagation (InferenceConfig(mode="video")) with a random-weight tiny model.

Random weights make the tracked mask SHAPES meaningless, so these tests check what the mode
guarantees structurally: output shape for any frame size, ids = cell ROI ids (so stable over
the recording and across windows), cells painted only where active, and the memory bound.
"""

import numpy as np
import pytest
from test_segment_synth import synth_recording

from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.segment.model import CHECKPOINT_ENV, load_sam2
from calseg.segment.prompts import compute_activity


@pytest.fixture(scope="module")
def tiny():
    import os

    old = os.environ.pop(CHECKPOINT_ENV, None)
    yield load_sam2("sam2.1_hiera_t", None, image_size=64, device="cpu")
    if old is not None:
        os.environ[CHECKPOINT_ENV] = old


def _cfg(**kw):
    base = dict(image_size=64, mode="video", max_mask_area_fraction=1.0, use_object_score=False)
    base.update(kw)
    return InferenceConfig(**base)


def test_video_mode_ids_are_cell_ids_stable_across_windows(tiny):
    rng = np.random.default_rng(3)
    img = rng.poisson(100, (12, 40, 40)).astype(np.uint16)
    img[2:7, 4:11, 4:11] += 700  # cell A, frames 2-6: windows 0 and 1
    img[5:10, 24:31, 6:13] += 700  # cell B, frames 5-9: windows 1 and 2
    img[9:12, 20:27, 26:33] += 700  # cell C, frames 9-11: window 2
    cfg = _cfg(video_window_frames=4)
    act = compute_activity(img, cfg.activity_params())
    res = segment_recording(img, cfg, model=tiny, activity=act)
    v = res.timings["video"]
    assert res.labels.shape == img.shape and res.labels.dtype == np.uint32
    assert v["n_windows"] == 3 and v["window_frames"] == 4
    # one prompt per (window, active cell), never more
    per_win = {}
    for p in res.prompts:
        per_win.setdefault(p["window"], []).append(p["seed_id"])
    assert all(len(ids) == len(set(ids)) for ids in per_win.values())
    # every painted id is a cell ROI id that is active in that frame (activity gating)
    for t in range(img.shape[0]):
        ids = set(np.unique(res.labels[t]).tolist()) - {0}
        assert ids <= set(np.flatnonzero(act.cell_active[t]).tolist()), t
    # the same cell keeps its id in every window (ids are ROI ids, not tracker slots)
    painted = set(np.unique(res.labels).tolist()) - {0}
    assert painted and painted <= set(range(1, int(act.territories.max()) + 1))
    windows_of = {}
    for p in res.prompts:
        windows_of.setdefault(p["seed_id"], set()).add(p["window"])
    assert sorted(len(w) for w in windows_of.values()) == [1, 2, 2]  # A and B span 2 windows
    assert act.territories[7, 7] in windows_of and act.territories[27, 9] in windows_of


def test_video_mode_ungated_tracks_each_cell_through_every_frame_of_its_windows(tiny):
    img, _ = synth_recording(t=6, h=40, w=40, n_cells=3, seed=5)
    cfg = _cfg(video_gate_by_activity=False, video_window_frames=6, min_mask_area_px=1)
    res = segment_recording(img, cfg, model=tiny)
    objs = {p["seed_id"] for p in res.prompts}
    assert res.timings["video"]["object_frames"] == len(objs) * 6
    # every frame is labelled from the same set of tracked objects (the prompted cell ids);
    # a tracker never invents or renumbers an id from one frame to the next
    for t in range(6):
        assert set(np.unique(res.labels[t])) - {0} <= objs
    # tracked masks persist: consecutive frames share labelled pixels (ungated, every frame)
    both = (res.labels[:-1] > 0) & (res.labels[1:] > 0)
    assert both.reshape(5, -1).any(axis=1).all()


def test_video_mode_memory_is_bounded(tiny):
    """Within a window longer than SAM2's readable memory, per-object outputs older than the
    memory the model reads are dropped: held outputs stay <= memory_frames_kept + 2 (the
    prompted frame and the current one); every frame is converted to model input lazily."""
    rng = np.random.default_rng(0)
    t = 24
    img = rng.poisson(100, (t, 24, 24)).astype(np.uint16)
    img[3:21, 8:14, 8:14] += 600  # one cell active most of the recording
    res = segment_recording(img, _cfg(video_window_frames=24), model=tiny)
    v = res.timings["video"]
    assert v["n_objects"] == 1 and v["object_frames"] == t
    assert v["memory_frames_kept"] == 17  # max(num_maskmem 7, max_obj_ptrs_in_encoder 16) + 1
    assert v["max_outputs_held"] <= v["memory_frames_kept"] + 2 < t
    assert v["frames_loaded"] <= t + 2 * len(res.prompts)


@pytest.mark.parametrize("hw", [(21, 14), (100, 173)])
def test_video_mode_shape_round_trip(tiny, hw):
    h, w = hw
    rng = np.random.default_rng(1)
    img = rng.poisson(100, (8, h, w)).astype(np.uint16)
    img[3:5, h // 3 : h // 3 + 6, w // 3 : w // 3 + 6] += 800
    res = segment_recording(img, _cfg(), model=tiny)
    assert res.labels.shape == (8, h, w)
    assert res.prompts and res.prompts[0]["mode"] == "video"
    assert res.timings["video"]["object_frames"] == 8  # tracked through all frames
    # gated by activity: nothing painted in the frames where the cell is off
    assert res.labels[:3].max() == 0 and res.labels[5:].max() == 0


def test_video_mode_without_activity_is_empty(tiny):
    img = np.random.default_rng(2).poisson(100, (6, 20, 20)).astype(np.uint16)
    res = segment_recording(img, _cfg(), model=tiny)
    assert res.labels.max() == 0 and "video" not in res.timings
