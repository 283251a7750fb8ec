"""Where do the automatic prompts land in their cells, and what does that do to the masks?
(issue 14 item 5: why fine-tuning the demo's decoder does not raise held-out F1)

``python scripts/prompt_depth_study.py OUT [--seed 0] [--checkpoint CKPT]`` simulates the
demo's dataset (:func:`calseg.demo.simulate_params` with the demo's defaults: 8 videos of 48
frames at 128 px, waves and transients, 1 val and 3 test videos), segments each TEST video as
``infer`` does (:func:`calseg.segment.infer.segment_recording`, SAM2, prompts from the activity
with the recording's own cell-size estimate) with the SAM2 base (default: the bundled small
SAM2, :func:`calseg.segment.model.default_base_checkpoint`) and prints, per video, for the
kept prompts that lie on an active ground-truth cell: the share whose point lies within 3 px of
the cell's edge (Euclidean distance transform of the cell, px), and the share of masks reaching
IoU >= 0.5 with that cell for prompts near the edge and deeper inside; then the instance
precision, recall and F1 (:func:`calseg.segment.evaluate.score_labels`). A rerun on the same
OUT reuses its dataset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

EDGE_PX = 3.0
"""A prompt within this distance (px) of its cell's edge counts as "near the edge"."""


def _share(ious: np.ndarray, sel: np.ndarray) -> str:
    """Share of ``ious[sel]`` at or above 0.5 ("n/a" for none)."""
    return f"{(ious[sel] >= 0.5).mean():.3f}" if sel.any() else "n/a"


def main() -> None:
    from calseg.demo import simulate_params
    from calseg.segment._data import split_videos
    from calseg.segment.evaluate import score_labels
    from calseg.segment.infer import InferenceConfig, segment_recording
    from calseg.segment.model import default_base_checkpoint, load_sam2
    from calseg.service.schemas import validate_params
    from calseg.simulate.dataset import simulate_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="simulation seed (the demo's: 0)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="SAM2 checkpoint to segment")
    a = ap.parse_args()
    demo_args = argparse.Namespace(
        videos=8, frames=48, size=128, seed=a.seed, cell_area=100.0, test_videos=3
    )
    ds = a.out / "dataset"
    if not (ds / "manifest.json").exists():
        simulate_dataset(validate_params("simulate", simulate_params(demo_args)).to_config(), ds)
    ckpt = a.checkpoint or default_base_checkpoint(None)
    config = InferenceConfig(method="sam2")
    loaded = load_sam2(config.model, ckpt, image_size=config.image_size, device="cpu")
    print(f"checkpoint {ckpt}; dataset {ds}")
    for vid in split_videos(ds, "test"):
        image = np.asarray(vid.load_image())
        gt = np.asarray(vid.load_labels()).astype(np.uint32)
        res = segment_recording(image, config, model=loaded, cache_dir=a.out / "embeddings")
        ious, depths = [], []
        for p in res.prompts:
            if p.get("reason"):  # dropped (empty, duplicate, no object...)
                continue
            f, y, x = p["frame"], int(p["y"]), int(p["x"])
            g, pr = gt[f, y, x], res.labels[f, y, x]
            if g == 0 or pr == 0:
                continue
            cell, mask = gt[f] == g, res.labels[f] == pr
            ious.append((cell & mask).sum() / (cell | mask).sum())
            depths.append(ndi.distance_transform_edt(cell)[y, x])
        ious_a, depth_a = np.array(ious), np.array(depths)
        near = depth_a < EDGE_PX

        sc = score_labels(res.labels, gt)
        print(
            f"{vid.id} ({vid.pattern_class}, cell diameter "
            f"{res.activity.get('cell_diameter_px', float('nan')):.1f} px "
            f"{res.activity.get('cell_diameter_source', '?')}): {len(ious_a)} prompts on cells, "
            f"{near.mean():.0%} within {EDGE_PX:g} px of the edge; masks with IoU >= 0.5: "
            f"near the edge {_share(ious_a, near)}, deeper {_share(ious_a, ~near)}; "
            f"precision {sc['precision']:.3f} recall {sc['recall']:.3f} F1 {sc['f1']:.3f}"
        )


if __name__ == "__main__":
    main()
