"""Is the active-cell foreground in the random frozen SAM2 encoder's features? (issue 14)

``python scripts/feature_probe.py DATASET [--image-size 256] [--frames 8]`` takes a dataset
written by ``calseg simulate`` (or ``scripts/decoder_vs_disc.py OUT``'s ``OUT/dataset``),
embeds the ``--frames`` most active frames of each train and test video with the
random-weight ``sam2.1_hiera_t`` (CalSeg's normalisation, frame geometry and
:func:`calseg.segment.embeddings.encode_frames`, float16 features as fine-tuning caches them),
and fits per-pixel logistic regressions (L-BFGS, positives weighted by the class ratio) on the
TRAIN videos that predict "inside an active cell" on the S/4 grid (the ground-truth label
image on the model grid, area-averaged, > 0.5). It prints the foreground IoU on the TEST
videos of three probes: the decoder's high-resolution features ``feat_s0`` alone (C/8
channels), ``feat_s0`` + ``feat_s1`` + the image embedding (bilinearly upsampled to S/4), and
the model input's intensity averaged to S/4 (a threshold). A probe far above the intensity
one says the information is in the features; the decoder then has to learn to use it. Needs
no checkpoint; CPU is enough (about 1 min at 256 px).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from calseg.segment.embeddings import (
    FrameGeometry,
    compute_normalisation,
    encode_frames,
    frames_to_model,
    labels_to_model,
    normalise_frames,
)
from calseg.segment.model import load_sam2


def _pixels(loaded, folder: Path, n_frames: int) -> tuple:
    """``(features (P, C), intensity (P, 1), foreground (P,))`` of one video's most active
    frames on the S/4 grid."""
    img = tifffile.imread(folder / "image.tif")
    lab = tifffile.imread(folder / "labels.tif")
    idx = np.argsort((lab > 0).reshape(len(lab), -1).mean(1))[::-1][:n_frames]
    s = loaded.info.image_size
    geo = FrameGeometry(img.shape[1], img.shape[2], s)
    x = frames_to_model(normalise_frames(img[idx], compute_normalisation(img)), geo)
    emb = encode_frames(loaded, x)
    q = s // 4
    up = {"size": (q, q), "mode": "bilinear", "align_corners": False}
    feats = torch.cat(
        [
            emb.feat_s0.float(),
            F.interpolate(emb.feat_s1.float(), **up),
            F.interpolate(emb.image_embed.float(), **up),
        ],
        1,
    )
    y = torch.from_numpy((labels_to_model(lab[idx], geo) > 0).astype(np.float32))[:, None]
    y = F.avg_pool2d(y, 4) > 0.5  # area-averaged target on the S/4 grid, as fine-tuning's
    return (
        feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]),
        F.avg_pool2d(x, 4).reshape(-1, 1),
        y.reshape(-1).float(),
    )


def _probe_iou(xa: torch.Tensor, ya: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> float:
    """Fit a logistic regression on (xa, ya); foreground IoU of its prediction on (xb, yb)."""
    mu, sd = xa.mean(0), xa.std(0) + 1e-6
    a, b = (xa - mu) / sd, (xb - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=300)
    pos_weight = (1 - ya.mean()) / ya.mean().clamp(min=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + c, ya, pos_weight=pos_weight)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred, truth = (b @ w + c) > 0, yb > 0
        return float((pred & truth).sum()) / max(float((pred | truth).sum()), 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=8)
    a = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_sam2("sam2.1_hiera_t", None, image_size=a.image_size, device="cpu")
    videos = json.loads((a.dataset / "manifest.json").read_text())["videos"]
    split = {"train": [], "test": []}
    for v in videos:
        if v["split"] in split:
            split[v["split"]].append(_pixels(loaded, a.dataset / v["id"], a.frames))
    tr, te = ([torch.cat(p) for p in zip(*split[k], strict=True)] for k in ("train", "test"))
    n0 = int(loaded.model.hidden_dim) // 8
    print(f"{len(split['train'])} train / {len(split['test'])} test videos, S = {a.image_size}")
    s0_iou = _probe_iou(tr[0][:, :n0], tr[2], te[0][:, :n0], te[2])
    print(f"feat_s0 ({n0} ch)           {s0_iou:.3f}")
    print(f"feat_s0 + feat_s1 + embed   {_probe_iou(tr[0], tr[2], te[0], te[2]):.3f}")
    print(f"intensity                   {_probe_iou(tr[1], tr[2], te[1], te[2]):.3f}")


if __name__ == "__main__":
    main()
