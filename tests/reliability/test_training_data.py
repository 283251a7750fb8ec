"""Training data edge cases (issue 8 "Training data") on the real fine-tuning loop (tiny
random-weight SAM2): a dataset where most frames have no active cell, a dataset of one video
(no validation video), and a batch larger than the data. Each trains to the end with finite
losses and writes a checkpoint (~40 s: ``reliability`` marker). All-empty frames:
tests/test_segment_finetune.py::test_empty_frames_give_finite_loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sam2")

from test_segment_synth import synth_recording, write_dataset  # noqa: E402

from calseg.segment.finetune import FinetuneConfig, finetune  # noqa: E402
from calseg.segment.model import CHECKPOINT_ENV  # noqa: E402


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)


def _train(ds: Path, out: Path, **cfg) -> list[dict]:
    config = FinetuneConfig(image_size=64, steps=3, val_every=3, seed=0, **cfg)
    res = finetune(ds, out, config)
    train = [h for h in res.history if h["kind"] == "train"]
    assert len(train) == config.steps
    assert all(math.isfinite(h["loss"]) for h in train), train
    assert res.checkpoint.exists()
    return res.history


@pytest.mark.reliability
@pytest.mark.parametrize("case", ["mostly-empty-frames", "one-video", "batch-larger-than-data"])
def test_training_edge_cases(case: str, tmp_path: Path) -> None:
    img, lab = synth_recording(t=6, h=32, w=32, n_cells=3, seed=7)
    if case == "mostly-empty-frames":
        keep = int(np.argmax((lab > 0).reshape(len(lab), -1).sum(1)))
        sparse = np.zeros_like(lab)
        sparse[keep] = lab[keep]  # 5 of 6 frames: no active cell
        assert (sparse[keep] > 0).any()
        videos = [
            {"id": "m0", "split": "train", "image": img, "labels": sparse},
            {"id": "m1", "split": "val", "image": img, "labels": sparse},
        ]
        _train(write_dataset(tmp_path / "ds", videos), tmp_path / "out", batch_size=2,
               frames_per_video=6)  # fmt: skip
    elif case == "one-video":
        videos = [{"id": "only", "split": "train", "image": img, "labels": lab}]
        _train(write_dataset(tmp_path / "ds", videos), tmp_path / "out", batch_size=2,
               frames_per_video=2)  # fmt: skip
    else:
        videos = [
            {"id": "b0", "split": "train", "image": img[:2], "labels": lab[:2]},
            {"id": "b1", "split": "val", "image": img[:2], "labels": lab[:2]},
        ]
        assert np.count_nonzero(lab[:2].reshape(2, -1).max(1)) <= 2
        _train(write_dataset(tmp_path / "ds", videos), tmp_path / "out", batch_size=16,
               frames_per_video=8)  # fmt: skip
