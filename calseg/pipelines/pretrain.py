"""Train the small SAM2 (``sam2_small_calseg``) from random weights on simulated data.

``calseg pretrain OUT`` runs :func:`pretrain_small`, the one recipe that made the checkpoint
shipped as :data:`calseg.segment.model.BUNDLED_SMALL_CHECKPOINT` (issue 14 item 4):

1. simulate a ``calseg-dataset`` (:func:`calseg.simulate.dataset.simulate_dataset`, seed
   ``data_seed``): ``n_train`` training, ``n_val`` validation and ``n_test`` held-out test
   videos of ``size`` x ``size`` px (cells ~11 px across, the simulator's default 100 px area);
2. train every weight image segmentation uses -- Hiera trunk, FPN neck, ``conv_s0``/
   ``conv_s1``, ``no_mem_embed``, prompt encoder, mask decoder -- from random init
   (:func:`calseg.segment.finetune.finetune` with ``train_mode="full"`` and the ``"scratch"``
   recipe of :func:`calseg.segment.finetune.training_recipe`); the step with the best
   validation score is kept;
3. score it through the real inference path (:func:`calseg.segment.evaluate.evaluate_dataset`:
   automatic prompts from the recording's activity, the same post-processing as ``infer``)
   on the held-out test videos, next to the untrained (random-weight) small SAM2 and the
   classical method;
4. write the checkpoint with the recipe, code commit, data seed and those held-out scores in
   its metadata (``metadata["pretrain"]``), weights stored as float16 (halves the file; the
   scores are measured with the stored weights).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from calseg.progress import ProgressFn, null_progress, scaled
from calseg.segment.choice import summarise_checkpoint
from calseg.segment.decode import InferenceConfig
from calseg.segment.evaluate import evaluate_dataset
from calseg.segment.finetune import FinetuneConfig, finetune
from calseg.segment.model import (
    FINETUNE_FORMAT,
    SMALL_CONFIG,
    SMALL_IMAGE_SIZE,
    _torch_load,
    file_sha256,
)
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset

log = logging.getLogger(__name__)

KEYS = ("f1", "iou", "ap50", "precision", "recall")
"""Held-out metrics kept in the checkpoint's metadata (means over videos and 95 % CIs)."""

SMALL_NAMES = {
    "classical": "classical",
    "untuned": "SAM2 small untuned (random weights)",
    "trained": "SAM2 small (trained here)",
    "disc": "disc prior of SAM2 small (no image)",
}
"""Display names of the rows of the held-out evaluation (the disc row only for a checkpoint
trained with a disc prior)."""


class PretrainConfig(BaseModel):
    """What :func:`pretrain_small` simulates and how it trains (validated)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data_seed: int = Field(1400, ge=0, description="simulation seed of the whole dataset")
    n_train: int = Field(24, ge=1, le=1000)
    n_val: int = Field(2, ge=1, le=100)
    n_test: int = Field(4, ge=3, le=100, description="held-out videos (>= 3 for a CI)")
    size: int = Field(128, ge=64, le=1024, description="frame height and width (px)")
    n_frames: int = Field(48, ge=8, le=2000)
    finetune: FinetuneConfig = Field(default_factory=lambda: small_finetune_config())


def small_finetune_config(
    steps: int = 2000, time_limit_s: float | None = None, seed: int = 0
) -> FinetuneConfig:
    """The training recipe of the small SAM2 (full mode from random init, on a CPU).

    :data:`calseg.segment.finetune.DECODER_VS_DISC_RECIPE`'s input and prompts, with every
    weight trained: 128 px frames upsampled 4x to 512 px (a cell of ~11 px spans ~3 encoder
    tokens of 16 px and ~11 cells of the S/4 mask grid), the disc of the training cells' mean
    radius as a residual of the decoder's logits (``mask_prior="residual"``), training points
    near the cell centre (``prompt_point="deep"``, as validation and inference prompt); 12
    prompts from 2 frames per step (each frame is re-encoded with gradients: the cost of a
    step); the scratch recipe (all weights lr 1e-3, 5 % warm-up, cosine); mask loss focal
    (weight 1, alpha 0.75) + Dice (smoothing 1e-3) on the S/4 logits (``loss_resolution=
    "low"``); the best step by validation instance F1 through the inference path
    (``select_by="f1"``).

    Measured before it was chosen (``scripts/decoder_vs_disc.py`` seed 7, 600 steps): held-out
    prompted IoU 0.775 vs the disc's 0.759 (the same model as initialised: 0.760).
    """
    return FinetuneConfig(
        model=SMALL_CONFIG,
        image_size=SMALL_IMAGE_SIZE,
        train_mode="full",
        recipe="scratch",
        scratch_lr=1e-3,
        steps=steps,
        batch_size=12,
        frames_per_step=2,
        frames_per_video=24,
        val_frames_per_video=8,
        val_every=250,
        loss_resolution="low",
        mask_prior="residual",
        prompt_point="deep",
        select_by="f1",
        time_limit_s=time_limit_s,
        seed=seed,
        focal_weight=1.0,
        focal_alpha=0.75,
    )


def _steps_per_s(trains: list[dict]) -> float | None:
    """1 / the median time between consecutive train entries (validations excluded; right
    across a resumed run, whose history carries the earlier steps' times)."""
    import numpy as np

    t = np.array([h["time_s"] for h in trains], dtype=float)
    dt = np.diff(t)
    dt = dt[dt > 0]
    return float(1.0 / np.median(dt)) if dt.size else None


def git_commit(repo: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the source tree (None outside a git checkout), with
    ``+dirty`` when it has uncommitted changes to tracked files."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def heldout_scores(
    dataset: Path,
    checkpoint: Path | None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    include_untuned: bool = True,
    include_disc: bool = True,
) -> dict:
    """Held-out (``test`` split) scores of the small SAM2 at ``checkpoint``, the untrained
    small SAM2 (random weights; the caller unsets ``$CALSEG_SAM2_CHECKPOINT``, which
    :func:`calseg.segment.model.load_sam2` would use instead) and the classical method,
    through the inference path; with ``include_disc`` also the checkpoint's disc prior (the
    same automatic prompts, each mask a disc of the training cells' mean radius, no image:
    what the trained weights must add to), when it was trained with one.

    Returns:
        ``{"summary": evaluate_dataset's summary, "rows": per-video rows, "per_model":
        {name: {"n_videos", "f1", "f1_ci95", "iou", "iou_ci95", ...}}}`` (:data:`KEYS`).
    """
    models: dict[str, tuple[str, Path | None]] = {SMALL_NAMES["classical"]: ("classical", None)}
    if include_untuned:
        models[SMALL_NAMES["untuned"]] = ("sam2", None)
    if checkpoint is not None:
        models[SMALL_NAMES["trained"]] = ("sam2", checkpoint)
        if include_disc and summarise_checkpoint(checkpoint).prior:
            models[SMALL_NAMES["disc"]] = ("disc", checkpoint)
    cfg = InferenceConfig(model=SMALL_CONFIG, image_size=SMALL_IMAGE_SIZE)
    rep = evaluate_dataset(
        dataset, models, split="test", config=cfg, cache_dir=cache_dir, progress=progress
    )
    per_model = {
        s["model"]: {
            "n_videos": s["n_videos"],
            **{
                f"{k}{x}": s.get(f"{k}_mean" if x == "" else f"{k}_ci95")
                for k in KEYS
                for x in ("", "_ci95")
            },
        }
        for s in rep.summary
    }
    return {"summary": rep.summary, "rows": rep.rows, "per_model": per_model}


def pretrain_small(
    out_dir: Path,
    config: PretrainConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> dict:
    """Simulate, train the small SAM2 from scratch, score it held-out, write the checkpoint.

    Args:
        out_dir: working folder: ``dataset/``, ``train/`` (finetune outputs) and the final
            ``sam2_small_calseg.pt`` (+ ``.sha256``) and ``pretrain.json``.
        config: :class:`PretrainConfig` (default: the recipe of the shipped checkpoint).
        progress: :data:`calseg.progress.ProgressFn`.
        command: the command line that ran this (stored in the metadata).

    Returns:
        The ``pretrain`` metadata dict (also in the checkpoint and ``pretrain.json``).
    """
    import torch

    config = config or PretrainConfig()
    progress = progress or null_progress
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = SimulationConfig(
        n_videos=config.n_train + config.n_val + config.n_test,
        n_val_videos=config.n_val,
        n_test_videos=config.n_test,
        n_frames=config.n_frames,
        height=config.size,
        width=config.size,
        seed=config.data_seed,
    )
    ds = out_dir / "dataset"
    manifest = ds / "manifest.json"
    same = manifest.is_file() and json.loads(manifest.read_text()).get("config") == (
        sim.model_dump(mode="json")
    )
    if not same:
        simulate_dataset(sim, ds, scaled(progress, 0.0, 0.05))
    t_sim = time.perf_counter() - t0
    res = finetune(ds, out_dir / "train", config.finetune, progress=scaled(progress, 0.05, 0.85))
    t_train = time.perf_counter() - t0 - t_sim
    obj = _torch_load(Path(res.checkpoint))  # tensors and plain data only
    if obj.get("format") != FINETUNE_FORMAT:  # pragma: no cover - finetune writes this format
        raise ValueError(f"{res.checkpoint} is not a CalSeg fine-tuned checkpoint")

    def half(sd: dict) -> dict:
        return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}

    obj["sam_prompt_encoder"] = half(obj["sam_prompt_encoder"])
    obj["sam_mask_decoder"] = half(obj["sam_mask_decoder"])
    enc = obj["encoder"]
    enc["state"] = half(enc["state"])
    enc["no_mem_embed"] = enc["no_mem_embed"].half()
    final = out_dir / f"{SMALL_CONFIG}.pt"
    torch.save(obj, final)
    scores = heldout_scores(
        ds, final, cache_dir=out_dir / "eval-embeddings", progress=scaled(progress, 0.85, 1.0)
    )
    trains = [h for h in res.history if h.get("kind") == "train"]
    meta = {
        "what": "a small SAM2 trained here from random weights on simulated calcium-imaging "
        "videos; not Meta's weights",
        "command": command,
        "code_commit": git_commit(),
        "data_seed": config.data_seed,
        "pretrain_config": config.model_dump(mode="json"),
        "recipe": obj["metadata"].get("finetune_config"),
        "best_step": obj["metadata"].get("step"),
        "steps_run": trains[-1]["step"] if trains else 0,
        "best_val_iou": res.best_val_iou,
        "train_steps_per_s": _steps_per_s(trains),
        "timings_s": {"simulate": t_sim, "train": t_train},
        "heldout": {
            "split": "test",
            "videos": sorted({r["video"] for r in scores["rows"]}),
            "per_model": scores["per_model"],
        },
        "weights_dtype": "float16",
    }
    obj["metadata"]["pretrain"] = meta
    tmp = final.with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, final)
    final.with_name(final.name + ".sha256").write_text(f"{file_sha256(final)}  {final.name}\n")
    (out_dir / "pretrain.json").write_text(json.dumps(meta, indent=1, default=str))
    progress(1.0, "done", f"wrote {final}")
    return meta
