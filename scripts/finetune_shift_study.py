"""Does the demo's fine-tune learn when its videos differ from the SAM2 base's training data?
(issue 14 item 5).

``python scripts/finetune_shift_study.py OUT SIM_JSON FT_JSON`` simulates a dataset like
``make demo``'s (8 videos of 48 frames at 128 px, waves and transients, seed 0, 1 validation
and 3 test videos) with the simulation settings ``SIM_JSON`` changed (e.g.
``'{"imaging": {"psf_sigma_px": 2.0}}'`` for a blurrier microscope, ``'{"mean_cell_area_px":
150}'`` for larger cells; kept in ``OUT/dataset`` and reused), fine-tunes the bundled small
SAM2 with the demo's fine-tune job parameters (150 steps, validation every 50, disc prior as a
residual) changed by ``FT_JSON`` (e.g. ``'{"train_mode": "full", "steps": 300}'``), prints the
validation F1 and prompted IoU of every validation, then evaluates the base, the selected and
the last checkpoint and the classical method on the test videos (instance F1 and foreground
IoU with bootstrap CIs, :func:`calseg.segment.evaluate.evaluate_dataset`).

The fine-tune's parameters go through the finetune job's own validation
(:func:`calseg.service.schemas.validate_params`), so the configuration is the one ``make demo``
would run; the dataset job id it needs is a placeholder.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from calseg.segment.evaluate import evaluate_dataset
from calseg.segment.finetune import finetune
from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT
from calseg.service.schemas import validate_params
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset

DEMO_SIMULATION = {
    "n_videos": 8,
    "n_frames": 48,
    "height": 128,
    "width": 128,
    "pattern_classes": ["waves", "transients"],
    "seed": 0,
    "mean_cell_area_px": 100.0,
    "n_val_videos": 1,
    "n_test_videos": 3,
}
"""``make demo``'s simulate job (calseg.demo.simulate_params with its defaults)."""
DEMO_FINETUNE = {"steps": 150, "val_every": 50, "mask_prior": "residual"}
"""``make demo``'s fine-tune job parameters (calseg.demo.run_demo)."""


def main(argv: list[str]) -> None:
    out, sim_over, ft_over = Path(argv[0]), json.loads(argv[1]), json.loads(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    dataset = out / "dataset"
    if not (dataset / "manifest.json").exists():
        simulate_dataset(SimulationConfig(**{**DEMO_SIMULATION, **sim_over}), dataset)
    params = {"dataset_job_id": str(uuid.uuid4()), **DEMO_FINETUNE, **ft_over}
    config = validate_params("finetune", params).to_config()
    tag = "ft_" + "_".join(f"{k}{v}" for k, v in ft_over.items()) if ft_over else "ft"
    cache = out / "embeddings"
    t0 = time.perf_counter()
    res = finetune(
        dataset, out / tag, config, base_checkpoint=BUNDLED_SMALL_CHECKPOINT, cache_dir=cache
    )
    print(
        f"fine-tune {time.perf_counter() - t0:.0f} s, best step {res.best_step}, "
        f"improved {res.improved}"
    )
    for h in res.history:
        if h.get("kind") == "val":
            f1, iou = h["val_f1"], h["val_mean_iou"]
            print(f"  step {h['step']}: val F1 {f1:.4f}, prompted IoU {iou:.4f}")
    models = {
        "base": ("sam2", BUNDLED_SMALL_CHECKPOINT),
        "selected": ("sam2", Path(res.checkpoint)),
        "last": ("sam2", out / tag / "last.pt"),
        "classical": ("classical", None),
    }
    report = evaluate_dataset(dataset, models, cache_dir=cache)
    for row in report.summary:
        print(
            f"{row['model']:10s} F1 {row['f1_mean']:.3f} {_ci(row, 'f1')}  "
            f"foreground IoU {row['iou_mean']:.3f} {_ci(row, 'iou')}"
        )


def _ci(row: dict, key: str) -> str:
    lo_hi = row.get(f"{key}_ci95")
    return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else ""


if __name__ == "__main__":
    main(sys.argv[1:])
