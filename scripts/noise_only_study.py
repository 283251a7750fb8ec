"""How many cells CalSeg reports on recordings with no calcium signal (issue 17 item 2).

``python scripts/noise_only_study.py [--n 40] [--seed 0] [--max-pixels 2000000]
[--no-noise-evidence]`` draws ``n`` noise-only recordings (:mod:`calseg.simulate.noise`: Poisson
and Gaussian, offsets, bleaching, drift, uneven illumination, 8 and 16 bit, 20-2000 frames,
sides 64-1024 px under the pixel budget), segments each with the classical method on both
targets (``active`` and ``cells``) and prints one line per recording and the share giving 0
cells per target. ``--no-noise-evidence`` turns off the evidence test of the cells target
(:func:`calseg.segment.projection.segment_projection`), for the numbers before it. The test
``tests/test_noise_only.py`` runs a small sample of the same draws.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from calseg.segment.infer import InferenceConfig, segment_recording
from calseg.segment.projection import segment_projection
from calseg.simulate.noise import noise_conditions, noise_only_recording


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=2_000_000)
    ap.add_argument("--no-noise-evidence", action="store_true")
    a = ap.parse_args()
    zero = {"active": 0, "cells": 0}
    t0 = time.perf_counter()
    conds = noise_conditions(a.n, seed=a.seed, max_pixels=a.max_pixels)
    for c in conds:
        rec = noise_only_recording(c)
        res = segment_recording(rec, InferenceConfig(method="classical", target="active"))
        n_active = len(np.unique(res.labels[res.labels > 0]))
        pc = segment_projection(rec, noise_evidence=not a.no_noise_evidence)
        n_cells = int(pc.labels.max())
        zero["active"] += n_active == 0
        zero["cells"] += n_cells == 0
        print(
            f"{c.kind:8s} {c.bits:2d}-bit {rec.shape} level {c.level_e:.3g} e- gain "
            f"{c.gain_adu_per_e:.2g} offset {c.offset_adu:.0f} bleach {c.bleach_fraction:.2f} "
            f"drift {c.drift_fraction:.2f} uneven {c.uneven:.2f}: active {n_active}, "
            f"cells {n_cells}",
            flush=True,
        )
    for k, v in zero.items():
        print(
            f"target {k}: {v} of {len(conds)} recordings give 0 cells "
            f"({100 * v / len(conds):.0f} %)"
        )
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
