"""Simulate a whole dataset and write it in the ``calseg-dataset`` v1 format.

Format (docs/ARCHITECTURE.md)::

    <dir>/manifest.json
    <dir>/<video_id>/image.tif     (T, H, W) uint16 (uint8 when bit_depth = 8) camera ADU
    <dir>/<video_id>/labels.tif    (T, H, W) uint16/uint32 instance ids of ACTIVE cells
    <dir>/<video_id>/cells.tif     (H, W) label image of all cells (same ids)
    <dir>/<video_id>/calcium.npy   (n_cells, T) float32 cytosolic Ca2+ (uM) at the frames shown

TIFFs are zlib-compressed (lossless). Seeds: video ``i`` uses
``SeedSequence(config.seed).spawn(n_videos)[i]`` (its first 63-bit word is the manifest
``seed``); from that video seed, independent streams for geometry, model parameters, initial
state and rendering are spawned. The dataset is regenerated bit-identically from the manifest's
``config`` (tested).

Time window: the model starts from c = p = 0 and is integrated for ``search_horizon_s``
(default 3600 s, the published duration) at ``dt_s``; frames are sampled every
``frame_interval_s`` (default 5 s: a 64-frame recording then spans 320 s, about one
intercellular wave, which takes a few minutes to cross the pouch; the published model's
oscillation periods are 500-3000 s, so a longer interval mostly adds silent frames). With
``acquisition_window="activity"`` the recording starts (after ``warmup_s``) at the frame that
maximises (# frames with any active cell) + (# frames with > 5 % of cells active), like an
experimenter who starts acquiring when activity is seen; ``"fixed"`` starts at ``warmup_s``.
All videos of a dataset are integrated together in one batched run (block-diagonal Laplacian).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

import calseg
from calseg.progress import ProgressFn, null_progress, scaled
from calseg.simulate.config import SimulationConfig
from calseg.simulate.geometry import Tissue, make_tissue
from calseg.simulate.model import TissueSetup, integrate_batch, setup_tissue
from calseg.simulate.render import active_mask, render_video

FORMAT = "calseg-dataset"
VERSION = 1


def video_seeds(config: SimulationConfig) -> list[int]:
    """Per-video 63-bit seeds derived from ``config.seed`` (stable, independent streams)."""
    children = np.random.SeedSequence(config.seed).spawn(config.n_videos)
    return [int(ch.generate_state(1, np.uint64)[0] >> np.uint64(1)) for ch in children]


def _streams(video_seed: int) -> dict[str, np.random.Generator]:
    names = ("geometry", "parameters", "initial_state", "render")
    seqs = np.random.SeedSequence(video_seed).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs, strict=True)}


def _n_source_frames(n_frames: int) -> int:
    """Calcium frames simulated per recording (extra ones absorb dropped frames)."""
    return n_frames + n_frames // 8 + 2


def recorded_samples(
    n_frames: int, frame_interval_s: float, warmup_s: float, search_horizon_s: float
) -> int:
    """Calcium samples recorded per cell, one per frame interval over the simulated time: at
    least warm-up + the recording's source frames, and ``search_horizon_s`` (whatever the
    acquisition window; the window is then chosen among them). Every cell of every video is
    held at once (``(N, samples)`` float32 and two boolean masks of the same shape); the
    job's cost estimate counts it (:func:`calseg.service.costs.estimate_simulate`)."""
    first = int(np.ceil(warmup_s / frame_interval_s))
    return max(
        first + _n_source_frames(n_frames), int(np.floor(search_horizon_s / frame_interval_s)) + 1
    )


def choose_window(active: np.ndarray, first: int, length: int, mode: str) -> int:
    """Start index of the recording window.

    Args:
        active: (N, T_all) bool activity of every cell at every sampled time.
        first: earliest allowed start index (end of warm-up).
        length: frames in the scored window (the recording).
        mode: ``"activity"`` or ``"fixed"`` (see module docstring).
    """
    if mode == "fixed":
        return first
    frac = active.mean(axis=0)
    good = (frac > 0).astype(np.int64) + (frac > 0.05).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(good)])
    last = active.shape[1] - length
    starts = np.arange(first, last + 1)
    scores = csum[starts + length] - csum[starts]
    return int(starts[np.argmax(scores)])


def simulate_videos(config: SimulationConfig, progress: ProgressFn | None = None) -> list[dict]:
    """Simulate and render every video of ``config``, all held in memory (small configs only;
    :func:`simulate_dataset` streams them to disk one at a time via :func:`iter_videos`).

    Returns:
        one dict per video, as yielded by :func:`iter_videos`.
    """
    return list(iter_videos(config, progress))


def iter_videos(config: SimulationConfig, progress: ProgressFn | None = None) -> Iterator[dict]:
    """Simulate every tissue of ``config`` (one batched integration), then render and yield the
    videos one at a time, so only one rendered video is in memory at once.

    Yields:
        one dict per video with keys ``id, split, pattern_class, seed, tissue (Tissue),
        image (T,H,W), labels (T,H,W) uint32, calcium (N,T) float32, meta (dict)``.
    """
    progress = progress or null_progress
    params = config.model_parameters()
    seeds = video_seeds(config)
    fi = config.frame_interval_s
    n_src = _n_source_frames(config.n_frames)
    first = int(np.ceil(config.warmup_s / fi))
    n_all = recorded_samples(config.n_frames, fi, config.warmup_s, config.search_horizon_s)
    times = np.arange(n_all) * fi
    tissues: list[Tissue] = []
    setups: list[TissueSetup] = []
    rngs = []
    for i, seed in enumerate(seeds):
        r = _streams(seed)
        rngs.append(r)
        tissue = make_tissue(
            config.height,
            config.width,
            config.mean_cell_area_px,
            config.tissue_shape,
            r["geometry"],
            irregularity=config.outline_irregularity,
        )
        tissues.append(tissue)
        setups.append(
            setup_tissue(
                tissue.n_cells,
                config.pattern_class_of(i),
                params,
                r["parameters"],
                r["initial_state"],
            )
        )
        progress(0.05 * (i + 1) / len(seeds), "geometry", f"tissue {i + 1}: {tissue.n_cells} cells")
    calcium = integrate_batch(
        [t.laplacian for t in tissues],
        setups,
        times,
        params,
        dt=config.dt_s,
        method=config.integrator,
        progress=scaled(progress, 0.05, 0.6),
    )
    for i, (tissue, setup, c_all) in enumerate(zip(tissues, setups, calcium, strict=True)):
        act = active_mask(c_all, config.activity_threshold_uM, config.hysteresis_low_uM)
        start = choose_window(act, first, config.n_frames, config.acquisition_window)
        start = min(start, n_all - n_src)
        c_win = c_all[:, start : start + n_src]
        start_p, stop_p = 0.6 + 0.3 * i / len(seeds), 0.6 + 0.3 * (i + 1) / len(seeds)
        image, labels, cal, meta = render_video(
            tissue,
            c_win,
            rngs[i]["render"],
            fi,
            config.n_frames,
            config.indicator,
            config.defect_severity,
            config.bit_depth,
            config.activity_threshold_uM,
            config.hysteresis_low_uM,
            imaging=config.imaging.model_dump(exclude_none=True) if config.imaging else None,
            defects={k: v.model_dump() for k, v in config.defects.items()},
            progress=scaled(progress, start_p, stop_p),
        )
        meta["window"] = {"start_s": float(times[start]), "start_frame": start}
        meta["tissue"] = {**tissue.info, **tissue.stats()}
        meta["model"] = {
            "pattern_class": setup.pattern_class,
            **setup.info,
            "initiator_ids": (np.flatnonzero(setup.initiators) + 1).tolist(),
        }
        progress(stop_p, "render", f"video {i + 1}/{len(seeds)}")
        yield {
            "id": f"v{i:03d}",
            "split": config.split_of(i),
            "pattern_class": config.pattern_class_of(i),
            "seed": seeds[i],
            "tissue": tissue,
            "image": image,
            "labels": labels,
            "calcium": cal,
            "meta": meta,
        }


def _label_dtype(n_cells: int) -> type:
    return np.uint16 if n_cells < 2**16 else np.uint32


def simulate_dataset(
    config: SimulationConfig, out_dir: Path, progress: ProgressFn | None = None
) -> Path:
    """Simulate ``config`` and write a ``calseg-dataset`` v1 directory.

    Args:
        config: the dataset definition.
        out_dir: target directory (created; an existing dataset there is replaced).
        progress: optional :data:`calseg.progress.ProgressFn`.

    Returns:
        Path of the written ``manifest.json``.
    """
    progress = progress or null_progress
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    # each video is written as soon as it is rendered (progress: render + write up to 0.9)
    for v in iter_videos(config, progress):
        vid_dir = out_dir / v["id"]
        if vid_dir.exists():
            shutil.rmtree(vid_dir)
        vid_dir.mkdir()
        n_cells = v["tissue"].n_cells
        ldt = _label_dtype(n_cells)
        # minisblack: tifffile would store a 3- or 4-frame stack as one RGB(A) image.
        # zlib level 1 on 2 threads: 1.8 s for a 180-frame 1024^2 video (level 6: 24.5 s)
        # for 3 % more bytes (168 vs 163 MB); still lossless (measured, BENCHMARKS.md)
        kw = {
            "compression": "zlib",
            "compressionargs": {"level": 1},
            "maxworkers": min(4, os.cpu_count() or 1),
            "metadata": None,
            "photometric": "minisblack",
        }
        tifffile.imwrite(vid_dir / "image.tif", v["image"], **kw)
        tifffile.imwrite(vid_dir / "labels.tif", v["labels"].astype(ldt), **kw)
        tifffile.imwrite(vid_dir / "cells.tif", v["tissue"].labels.astype(ldt), **kw)
        np.save(vid_dir / "calcium.npy", v["calcium"])
        meta = v["meta"]
        entries.append(
            {
                "id": v["id"],
                "split": v["split"],
                "pattern_class": v["pattern_class"],
                "seed": v["seed"],
                "image": f"{v['id']}/image.tif",
                "labels": f"{v['id']}/labels.tif",
                "cells": f"{v['id']}/cells.tif",
                "calcium": f"{v['id']}/calcium.npy",
                "n_frames": int(v["image"].shape[0]),
                "height": int(v["image"].shape[1]),
                "width": int(v["image"].shape[2]),
                "n_cells": int(n_cells),
                "frame_interval_s": float(config.frame_interval_s),
                "pixel_size_um": float(config.pixel_size_um),
                "indicator": config.indicator,
                "defects": meta["defects"],
                "window": meta["window"],
                "tissue": meta["tissue"],
                "model": meta["model"],
                "texture": meta["texture"],
                "frame_source_index": meta["frame_source_index"],
                "n_active_per_frame": meta["n_active_per_frame"],
            }
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "calseg_version": calseg.__version__,
        "config": config.model_dump(mode="json"),
        "videos": entries,
    }
    path = out_dir / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    progress(1.0, "done", f"{len(entries)} videos in {out_dir}")
    return path


def regenerate_dataset(
    manifest_path: Path, out_dir: Path, progress: ProgressFn | None = None
) -> Path:
    """Re-simulate a dataset from the ``config`` stored in its manifest (bit-identical)."""
    manifest = json.loads(Path(manifest_path).read_text())
    config = SimulationConfig.model_validate(manifest["config"])
    return simulate_dataset(config, out_dir, progress)
