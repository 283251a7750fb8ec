"""Does the fine-tuned decoder beat the disc prior on held-out videos? (issue 14 item 1)

``python scripts/decoder_vs_disc.py OUT [--videos 12 --frames 32 --size 128 --seed 7]
[--set key=value ...] [--also-split train] [--untrained]`` simulates a dataset (``calseg
simulate``'s defaults otherwise; 6 train, 2 val and 4 test videos at the defaults),
fine-tunes SAM2's decoder on its train split (:func:`calseg.segment.finetune.finetune` with the
``--set`` overrides on :data:`calseg.segment.finetune.DECODER_VS_DISC_RECIPE`, e.g. ``--set
prompt_point=eroded``) and prints the prompted IoU of the selected checkpoint and of the disc
prior (a disc of the training cells' mean radius at each prompt, no image) on the TEST split,
with the same code, frames and prompts (:func:`calseg.segment.finetune.heldout_prompted_iou`),
and their difference with a paired per-prompt bootstrap 95 % CI. ``--also-split`` scores the
train or val split the same way; ``--untrained`` also scores the decoder as initialised.
Writes ``OUT/table.json``. Without an official checkpoint (``--checkpoint``) the encoder is
SAM2's random initialisation, frozen. A rerun on the same OUT reuses its dataset, embeddings
and finished training (resume).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pydantic import ValidationError

from calseg.segment.finetune import (
    decoder_vs_disc_config,
    finetune,
    heldout_prompted_iou,
    initial_model,
)
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--val", type=int, default=2)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--also-split",
        action="append",
        default=[],
        choices=["train", "val"],
        help="also score this split (diagnostic: does the decoder beat the disc on the videos "
        "it was trained on? then the gap on test is generalisation, else it is the fit)",
    )
    ap.add_argument(
        "--untrained",
        action="store_true",
        help="also score the decoder as initialised (one step at lr 1e-12, same seed and "
        "settings): with mask_prior=residual its random correction alone moves the disc a "
        "little, and only what training adds beyond it is learning",
    )
    args = ap.parse_args()
    # settings are checked before anything is simulated or written
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        ap.error(f"--set takes KEY=VALUE (a FinetuneConfig field), got {bad[0]!r}")
    over = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    try:
        cfg = decoder_vs_disc_config(**over)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        ap.error(f"invalid --set: {problems}")
    ds = args.out / "dataset"
    if not (ds / "manifest.json").exists():
        sim = SimulationConfig(
            n_videos=args.videos,
            n_frames=args.frames,
            height=args.size,
            width=args.size,
            seed=args.seed,
            n_val_videos=args.val,
            n_test_videos=args.test,
        )
        simulate_dataset(sim, ds)
    t0 = time.perf_counter()
    res = finetune(
        ds, args.out / "model", cfg, base_checkpoint=args.checkpoint, cache_dir=args.out / "cache"
    )
    train_s = time.perf_counter() - t0
    table = heldout_prompted_iou(res.checkpoint, ds, cache_dir=args.out / "cache")
    table.update(
        config=over, best_step=res.best_step, improved=res.improved, train_s=round(train_s, 1)
    )
    extra: list[str] = []  # printed after the held-out table
    for split in args.also_split:
        other = heldout_prompted_iou(res.checkpoint, ds, split=split, cache_dir=args.out / "cache")
        table[split] = other
        extra.append(
            f"{split} split ({len(other['videos'])} videos, {other['n_prompts']} prompts): "
            f"disc prior {other['disc prior']:.4f}, decoder {other['decoder']:.4f}, "
            f"gain {other['gain']:+.4f}"
        )
    if args.untrained:
        init = initial_model(
            ds,
            args.out / "untrained",
            cfg,
            base_checkpoint=args.checkpoint,
            cache_dir=args.out / "cache",
        )
        t_init = heldout_prompted_iou(init.checkpoint, ds, cache_dir=args.out / "cache")
        table["untrained decoder"] = t_init["decoder"]
        table["untrained per_video"] = {k: v["decoder"] for k, v in t_init["per_video"].items()}
        extra.append(
            f"untrained decoder (as initialised): {t_init['decoder']:.4f} "
            f"({t_init['gain']:+.4f} vs the disc prior; training adds "
            f"{table['decoder'] - t_init['decoder']:+.4f})"
        )
    (args.out / "table.json").write_text(json.dumps(table, indent=1))
    print(
        f"held-out prompted IoU ({len(table['videos'])} test videos, {table['n_prompts']} "
        f"prompts, disc radius {table['radius_px']:.2f} px; best step {res.best_step}, "
        f"{train_s:.0f} s)"
    )
    print(f"{'video':<10} {'disc prior':>10} {'decoder':>10}")
    for vid, row in table["per_video"].items():
        print(f"{vid:<10} {row['disc prior']:>10.4f} {row['decoder']:>10.4f}")
    print(f"{'mean':<10} {table['disc prior']:>10.4f} {table['decoder']:>10.4f}")
    ci = table["gain_ci95"]
    ci_text = f" [95 % CI over prompts {ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    print(
        f"decoder - disc prior: {table['gain']:+.4f}{ci_text}; decoder higher on "
        f"{table['videos_improved']} of {len(table['videos'])} videos"
    )
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
