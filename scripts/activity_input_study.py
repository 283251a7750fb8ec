"""Does SAM2 segment active cells better when its input carries the recording's activity?
(issue 14 item 5).

Today SAM2 sees one frame: its grey value replicated to 3 channels. Which cells are active,
and where a dim cell ends, is a change over time, so a single frame shows neither; the
trained small SAM2's prompted IoU stays at a disc's (0.80 vs 0.79, closing notes of issue 14).
This study trains the small SAM2 from random weights twice with the same recipe
(:func:`calseg.pipelines.pretrain.small_finetune_config`, ``--steps`` steps), once on the grey
input and once on an **activity input** of 3 channels:

- channel 0: the frame F, normalised as now (0.5 / 99.8 % percentiles of the recording);
- channel 1: the frame's activity z = (F - F0) / sigma (:func:`calseg.segment.prompts.
  compute_activity`, the map ``infer`` prompts from), clipped to [0, ``Z_SCALE``] / ``Z_SCALE``;
- channel 2: the resting image F0 (the 20th percentile over time), normalised as channel 0.

Both are scored the same way on the held-out test videos: the activity prompts of ``infer``
(:func:`calseg.segment.prompts.frame_prompts`), :func:`calseg.segment.decode.
decode_frame_prompts`, :func:`calseg.segment.decode.assemble_frame` and
:func:`calseg.segment.evaluate.score_labels` (instance F1 at IoU 0.5 per frame, foreground
IoU), beside the classical method on the same activity. A study: nothing here is used by
CalSeg.

``python scripts/activity_input_study.py OUT [--steps 600] [--seed 1401] [--mask-prior
residual|none]`` (about 5 min per model on 2 cores at 600 steps; ``OUT/results_*.json``).

Measured (2026-12-07, commit after 1ea5676, AMD EPYC, 2 cores; seed 1401: 24 training, 2
validation, 4 test videos of 48 frames at 128 px; 600 steps each; test F1 and foreground IoU
means over the 4 test videos, classical 0.321 / 0.822 on them):

| input | mask prior | validation (step: F1, prompted IoU) | test F1 | test fg IoU |
|---|---|---|---|---|
| grey | disc residual | 0: 0.569, 0.785; 300: 0.611, 0.786; 600: 0.592, 0.789 | 0.389 | 0.704 |
| activity | disc residual | 0: 0.568, 0.784; 300: 0.612, 0.781; 600: 0.614, 0.788 | 0.388 | 0.705 |
| grey | none | 0: 0, 0.003; 300: 0.036, 0.071; 600: 0.028, 0.066 | 0.015 | 0.344 |
| activity | none | 0: 0, 0.002; 300: 0.019, 0.050; 600: 0.020, 0.059 | 0.013 | 0.347 |

and :func:`z_oracle` on the 4 test videos (691 prompts): a disc at the cell's centre 0.785, the
``z > 5`` region there 0.471. Reading: the activity input changes nothing the training can
use in 600 steps. Without the disc, neither input gets past a prompted IoU of 0.07, where a
threshold of channel 1 alone reaches 0.47: from random weights the small SAM2 learns to place
a mask at a point too slowly for a CPU run to show what its input holds. And one frame's
activity does not outline its cells: neighbours coupled by gap junctions rise together, so
their regions merge, and the disc at the centre stays the stronger mask. Not adopted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from calseg.pipelines.pretrain import small_finetune_config
from calseg.segment import finetune as ft
from calseg.segment.baseline import baseline_labels
from calseg.segment.decode import assemble_frame, decode_frame_prompts
from calseg.segment.embeddings import (
    FrameGeometry,
    compute_normalisation,
    encode_frames,
    frames_to_model,
    labels_to_model,
    normalise_frames,
)
from calseg.segment.evaluate import score_labels
from calseg.segment.model import load_sam2
from calseg.segment.prompts import compute_activity, frame_prompts
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset

Z_SCALE = 20.0
"""z (noise SDs) mapped to 1 in channel 1: 4x the detection threshold (k = 5)."""

MODE = {"input": "grey"}


def model_input(image: np.ndarray, idx: np.ndarray, norm: dict, geom: FrameGeometry, act):
    """``(len(idx), C, S, S)`` float32 model input of frames ``idx`` of ``image`` (T, H, W)."""
    x0 = frames_to_model(normalise_frames(image[idx], norm), geom)
    if MODE["input"] == "grey":
        return x0
    z = np.clip(act.z[idx] / Z_SCALE, 0.0, 1.0).astype(np.float32)
    f0 = np.percentile(np.asarray(image, np.float32), 20.0, axis=0)
    x1 = frames_to_model(z, geom)
    x2 = frames_to_model(normalise_frames(f0[None], norm), geom).expand(len(idx), -1, -1, -1)
    return torch.cat([x0, x1, x2], dim=1)


def _prepare_video(loaded, video, n_frames, cfg, cache_dir, progress, variant=0):
    """``finetune._prepare_video`` (full mode, no augmentation) with :func:`model_input`."""
    image = np.asarray(video.load_image())
    labels = np.asarray(video.load_labels()).astype(np.uint32)
    idx = ft._select_frames(labels, n_frames)
    lab = labels[idx]
    norm = compute_normalisation(image, cfg.low_percentile, cfg.high_percentile)
    geom = FrameGeometry(image.shape[1], image.shape[2], loaded.info.image_size)
    act = compute_activity(image, ft.inference_config(cfg).activity_params(image))
    x = model_input(image, idx, norm, geom, act).half()
    return ft._Video(
        id=str(video.id),
        frames_idx=idx,
        emb=None,
        geometry=geom,
        labels=lab,
        labels_model=labels_to_model(lab, geom),
        eroded_points=[
            ft._eroded_points(lab[f], cfg.erosion_px, ft._deep_fraction(cfg))
            for f in range(len(idx))
        ],
        boxes=[ft._cell_boxes(lab[f]) for f in range(len(idx))],
        x=x,
    )


def evaluate(checkpoint: Path, dataset: Path, cfg) -> dict:
    """Per test video: instance F1 and foreground IoU of SAM2 (``checkpoint``) and classical."""
    loaded = load_sam2(cfg.model, checkpoint, image_size=cfg.image_size, device="cpu")
    loaded.model.eval()
    icfg = ft.inference_config(cfg)
    out: dict = {"sam2": {}, "classical": {}}
    for video in ft.split_videos(dataset, "test"):
        image = np.asarray(video.load_image())
        labels = np.asarray(video.load_labels()).astype(np.uint32)
        act = compute_activity(image, icfg.activity_params(image))
        out["classical"][str(video.id)] = score_labels(
            baseline_labels(act, icfg.min_region_px), labels
        )
        norm = compute_normalisation(image, icfg.low_percentile, icfg.high_percentile)
        geom = FrameGeometry(image.shape[1], image.shape[2], loaded.info.image_size)
        prompts = [
            frame_prompts(
                act, t, n_negative=icfg.n_negative_points, max_prompts=icfg.max_prompts_per_frame
            )
            for t in range(image.shape[0])
        ]
        need = np.array([t for t, p in enumerate(prompts) if p], dtype=int)
        pred = np.zeros(image.shape, np.uint32)
        if len(need):
            emb = encode_frames(loaded, model_input(image, need, norm, geom, act), batch_size=4)
            for j, t in enumerate(need):
                logits, scores, objs = decode_frame_prompts(
                    loaded, emb, j, geom, prompts[t], icfg, as_crops=True
                )
                pred[t], _ = assemble_frame(
                    logits, scores, objs, prompts[t], icfg, shape=pred.shape[1:]
                )
        out["sam2"][str(video.id)] = score_labels(pred, labels)
    return {
        m: {
            k: float(np.mean([s[k] for s in per.values()]))
            for k in ("f1", "iou", "precision", "recall")
        }
        | {"per_video_f1": {v: round(float(s["f1"]), 3) for v, s in per.items()}}
        for m, per in out.items()
    }


def z_oracle(dataset: Path, z_threshold: float = 5.0, every: int = 4) -> dict:
    """Does one frame's activity outline its active cells? Per test video, every ``every``-th
    frame, every ground-truth cell of the frame, prompted at its deepest pixel (the maximum of
    its distance transform): the IoU of (a) a disc of the frame's mean cell radius there and
    (b) the 8-connected region of ``z > z_threshold`` holding that pixel, cut to a disc of 1.5
    radii (a threshold of channel 1 of the activity input). Means over all prompts."""
    from calseg.segment.decode import InferenceConfig

    icfg = InferenceConfig()
    disc_iou, z_iou = [], []
    for video in ft.split_videos(dataset, "test"):
        image = np.asarray(video.load_image())
        labels = np.asarray(video.load_labels())
        act = compute_activity(image, icfg.activity_params(image))
        yy, xx = np.mgrid[: image.shape[1], : image.shape[2]]
        for t in range(0, image.shape[0], every):
            areas = np.bincount(labels[t].ravel())[1:]
            if not (areas > 0).any():
                continue
            r = float(np.sqrt(areas[areas > 0].mean() / np.pi))
            regions, _ = ndi.label(act.z[t] > z_threshold, structure=np.ones((3, 3), bool))
            for c in np.unique(labels[t])[1:]:
                cell = labels[t] == c
                y, x = np.unravel_index(np.argmax(ndi.distance_transform_edt(cell)), cell.shape)
                d2 = (yy - y) ** 2 + (xx - x) ** 2
                z_mask = (regions == regions[y, x]) & (regions[y, x] > 0) & (d2 <= (1.5 * r) ** 2)
                for mask, out in ((d2 <= r * r, disc_iou), (z_mask, z_iou)):
                    out.append((mask & cell).sum() / (mask | cell).sum())
    return {
        "prompts": len(disc_iou),
        "disc IoU": round(float(np.mean(disc_iou)), 3),
        "z-threshold IoU": round(float(np.mean(z_iou)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1401)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--inputs", default="grey,activity")
    ap.add_argument("--mask-prior", default="residual", choices=["residual", "none", "prompt"])
    args = ap.parse_args()
    ds = args.out / "dataset"
    if not (ds / "manifest.json").exists():
        simulate_dataset(
            SimulationConfig(
                n_videos=args.n_train + 6,
                n_frames=48,
                height=128,
                width=128,
                seed=args.seed,
                n_val_videos=2,
                n_test_videos=4,
            ),
            ds,
        )
    print("one frame's activity as a mask:", z_oracle(ds), flush=True)
    ft._prepare_video = _prepare_video
    results = {}
    for mode in args.inputs.split(","):
        MODE["input"] = mode
        cfg = small_finetune_config(steps=args.steps)
        cfg = cfg.model_copy(
            update={"val_every": max(1, args.steps // 4), "mask_prior": args.mask_prior}
        )
        t0 = time.perf_counter()
        res = ft.finetune(ds, args.out / f"train_{mode}_{args.mask_prior}", cfg)
        t_train = time.perf_counter() - t0
        vals = [
            (h["step"], round(h.get("val_f1") or 0, 3), round(h["val_mean_iou"], 3))
            for h in res.history
            if h["kind"] == "val"
        ]
        scores = evaluate(Path(res.checkpoint), ds, cfg)
        results[f"{mode}, mask_prior {args.mask_prior}"] = {
            "train_s": round(t_train),
            "val (step, F1, prompted IoU)": vals,
            **scores,
        }
        print(mode, json.dumps(results, indent=1), flush=True)
    (args.out / f"results_{args.mask_prior}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
