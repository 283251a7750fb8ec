"""Synthetic recordings with exact labels for the segmentation tests (helpers + self-checks).

A recording is a dark background (100 counts) with disk-shaped cells; each cell is active
(fluorescence x (1 + amplitude)) for a random run of frames; Poisson noise; uint16. The label
stack marks a cell's disk in the frames where it is active (id = cell index + 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile


def synth_recording(
    t: int = 12,
    h: int = 64,
    w: int = 64,
    n_cells: int = 6,
    radius: float = 5.0,
    seed: int = 0,
    background: float = 100.0,
    cell_brightness: float = 60.0,
    amplitude: float = 2.0,
    always_active: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image (T,H,W) uint16, labels (T,H,W) uint32)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cells = np.zeros((h, w), dtype=np.uint32)
    centres: list[tuple[float, float]] = []
    tries = 0
    while len(centres) < n_cells and tries < 2000:
        tries += 1
        cy = rng.uniform(radius + 1, h - radius - 1)
        cx = rng.uniform(radius + 1, w - radius - 1)
        if all((cy - a) ** 2 + (cx - b) ** 2 > (2 * radius + 3) ** 2 for a, b in centres):
            centres.append((cy, cx))
            cells[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = len(centres)
    activity = np.zeros((len(centres), t), dtype=bool)
    for i in range(len(centres)):
        if always_active:
            activity[i] = True
        else:
            start = rng.integers(0, max(1, t - 2))
            length = rng.integers(2, max(3, t // 2))
            activity[i, start : start + length] = True
    img = np.full((t, h, w), background, dtype=np.float64)
    labels = np.zeros((t, h, w), dtype=np.uint32)
    inside = cells > 0
    for k in range(t):
        gain = np.ones(len(centres) + 1)
        gain[1:] += amplitude * activity[:, k]
        img[k][inside] += cell_brightness * gain[cells[inside]]
        act_ids = np.flatnonzero(activity[:, k]) + 1
        labels[k] = np.where(np.isin(cells, act_ids), cells, 0)
    img = rng.poisson(img).astype(np.uint16)
    return img, labels


def write_dataset(root: Path, videos: list[dict]) -> Path:
    """Write a minimal ``calseg-dataset`` v1 directory.

    ``videos``: dicts with ``id``, ``split``, ``image``, ``labels`` (arrays) and optionally
    ``pattern_class``.
    """
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for v in videos:
        d = root / v["id"]
        d.mkdir(exist_ok=True)
        tifffile.imwrite(d / "image.tif", v["image"], photometric="minisblack")
        tifffile.imwrite(d / "labels.tif", v["labels"].astype(np.uint16), photometric="minisblack")
        cells = v["labels"].max(axis=0).astype(np.uint16)
        tifffile.imwrite(d / "cells.tif", cells)
        np.save(d / "calcium.npy", np.zeros((int(cells.max()), len(v["image"])), np.float32))
        t, h, w = v["image"].shape
        entries.append(
            {
                "id": v["id"],
                "split": v["split"],
                "pattern_class": v.get("pattern_class", "synthetic"),
                "seed": 0,
                "image": f"{v['id']}/image.tif",
                "labels": f"{v['id']}/labels.tif",
                "cells": f"{v['id']}/cells.tif",
                "calcium": f"{v['id']}/calcium.npy",
                "n_frames": t,
                "height": h,
                "width": w,
                "n_cells": int(cells.max()),
                "frame_interval_s": 1.0,
                "pixel_size_um": 1.0,
                "indicator": "GCaMP6s",
                "defects": {},
            }
        )
    manifest = {
        "format": "calseg-dataset",
        "version": 1,
        "calseg_version": "test",
        "config": {},
        "videos": entries,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def small_dataset(root: Path, t: int = 6, size: int = 48) -> Path:
    """Two train, one val and one test video of synthetic blobs."""
    vids = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        img, lab = synth_recording(t=t, h=size, w=size, n_cells=5, seed=10 + i)
        vids.append({"id": f"v{i:03d}", "split": split, "image": img, "labels": lab})
    return write_dataset(root, vids)


def test_synth_recording_labels_match_bright_cells():
    img, lab = synth_recording(t=8, seed=3)
    assert img.dtype == np.uint16 and lab.dtype == np.uint32
    assert img.shape == lab.shape == (8, 64, 64)
    active = lab > 0
    assert active.any() and (~active).any()
    # active pixels are brighter on average than background + inactive cells
    assert img[active].mean() > 1.5 * img[~active].mean()


def test_written_dataset_is_readable(tmp_path):
    from calseg.segment._data import split_videos

    root = small_dataset(tmp_path / "ds", t=4, size=32)
    train = split_videos(root, "train")
    assert [v.id for v in train] == ["v000", "v001"]
    lab = train[0].load_labels()
    assert lab.shape == (4, 32, 32) and lab.dtype == np.uint32
    assert train[0].load_image().dtype == np.uint16
