"""Peak memory and time behind four constants of :data:`calseg.service.costs.CONSTANTS`.

``python scripts/estimate_calibration.py [--quick]`` runs each case in a fresh interpreter (its
peak RSS is its own ``ru_maxrss``) and prints one line per case:

* ``finetune``: one decoder training step of the small SAM2 trained here (bundled) and of a
  random-weight hiera tiny, batch 8 and 64 (tiny: 8 and 40), loss at low and full resolution,
  one mask or ``multimask_output``, on a simulated 3-video 128 x 128 dataset. The difference in
  peak RSS over the difference in batch size is the memory of one prompt
  (``sam2_train_prompt_b_512``, ``sam2_loss_b_per_px``, ``sam2_multimask_masks``,
  :data:`calseg.service.costs.PROMPT_MEMORY_FACTOR`).
* ``simulate``: a 96 x 96 pouch of 60 px cells (71 cells), 3600 s simulated at dt 0.01 s with
  frames every 0.01 s and every 1 s, and at dt 0.2 s: the memory of the recorded samples
  (``sim_record_b_per_sample``) and the cost of an integrator step (``sim_step_s``) and of a
  recorded sample (``sim_sample_s``).

``--quick`` runs the small SAM2 at low resolution and the two simulations at dt 0.01 s only.
Figures depend on the machine and its load; BENCHMARKS.md gives those the constants came from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

FINETUNE = r"""
import resource, sys, tempfile, time
from calseg.segment.finetune import FinetuneConfig, finetune
from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT
ds, model, bs, res, mm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
small = model == "small"
cfg = FinetuneConfig(steps=1, batch_size=bs, loss_resolution=res, multimask_output=mm,
                     val_every=1000, frames_per_video=2, val_frames_per_video=1, device="cpu",
                     image_size=512, **({} if small else {"mask_prior": "none"}))
t = time.perf_counter()
finetune(ds, tempfile.mkdtemp(), cfg, base_checkpoint=BUNDLED_SMALL_CHECKPOINT if small else None,
         cache_dir=tempfile.mkdtemp())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(f"finetune {model:5} batch {bs:3} loss {res:4} multimask {int(mm)}: "
      f"{time.perf_counter() - t:5.1f} s, peak {peak} MiB")
"""

SIMULATE = r"""
import resource, sys, tempfile, time
from calseg.simulate.config import SimulationConfig
from calseg.simulate.dataset import simulate_dataset
horizon, fi, dt = (float(a) for a in sys.argv[1:4])
cfg = SimulationConfig(n_videos=1, n_frames=12, height=96, width=96, mean_cell_area_px=60,
                       n_val_videos=0, n_test_videos=0, dt_s=dt, frame_interval_s=fi,
                       search_horizon_s=horizon)
t = time.perf_counter()
simulate_dataset(cfg, tempfile.mkdtemp())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(f"simulate horizon {horizon:g} s frames every {fi:g} s dt {dt:g} s: "
      f"{time.perf_counter() - t:5.1f} s, peak {peak} MiB")
"""


def _run(code: str, *args: str) -> None:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    print(lines[-1] if out.returncode == 0 and lines else f"failed: {out.stderr[-400:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smallest set of cases")
    quick = ap.parse_args().quick
    from pathlib import Path

    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    ds = Path(tempfile.mkdtemp()) / "ds"
    simulate_dataset(
        SimulationConfig(
            n_videos=3, n_frames=8, height=128, width=128, seed=3, n_val_videos=1, n_test_videos=1
        ),
        ds,
    )
    cases = [("small", "low", "0")]
    if not quick:
        cases += [("small", "full", "0"), ("small", "low", "1"), ("small", "full", "1")]
        cases += [("tiny", "low", "0"), ("tiny", "full", "1")]
    for model, res, mm in cases:
        for bs in ("8", "64" if model == "small" else "40"):
            _run(FINETUNE, str(ds), model, bs, res, mm)
    sims = [("3600", "0.01", "0.01"), ("3600", "1.0", "0.01")]
    if not quick:
        sims.append(("3600", "1.0", "0.2"))
    for horizon, fi, dt in sims:
        _run(SIMULATE, horizon, fi, dt)


if __name__ == "__main__":
    main()
