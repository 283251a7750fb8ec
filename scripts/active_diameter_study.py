"""The active target with the 11 px cell-size prior against the diameter estimated from the
recording (issue 17 item 3).

``python scripts/active_diameter_study.py [--set tuning|held-out] [--block K] [--cache DIR]``
runs the classical ``active`` target on each video of the accuracy suite's tuning set (default)
or held-out set (``--block``: which 32 seeds of it, :func:`calseg.bench_accuracy.suite_specs`),
once with ``cell_diameter_px=11`` (the prior) and once with the estimate
(:func:`calseg.analysis.cellsize.cell_diameter_or_prior`), and prints the per-frame instance F1
and the per-footprint F1 at IoU 0.5 (:func:`calseg.bench_accuracy.score_video`) of both, one
line per video and the means.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from calseg.analysis.cellsize import cell_diameter_or_prior
from calseg.bench_accuracy import load_video, score_video, suite_specs
from calseg.segment.decode import ACTIVE_CELL_DIAMETER_PX
from calseg.segment.infer import InferenceConfig, segment_recording


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="tuning", choices=["tuning", "held-out"])
    ap.add_argument("--block", type=int, default=0, help="block of 32 seeds of the set")
    ap.add_argument("--cache", type=Path, default=None, help="simulated-video cache folder")
    a = ap.parse_args()
    rows = []
    for spec in suite_specs(a.set, block=a.block):
        v, _ = load_video(spec, a.cache)
        d, _found = cell_diameter_or_prior(
            v.image, ACTIVE_CELL_DIAMETER_PX, frame_interval_s=spec.frame_interval_s
        )
        r = []
        for given in (ACTIVE_CELL_DIAMETER_PX, d):
            cfg = InferenceConfig(method="classical", target="active", cell_diameter_px=given)
            sc = score_video(segment_recording(v.image, cfg).labels, v.labels, v.cells, "active")
            r += [sc["frame_f1"] or 0.0, sc["fp_f1"] or 0.0]
        rows.append(r)
        print(
            f"{spec.id} area {spec.mean_cell_area_px:3.0f} estimated {d:5.1f} px: frame F1 "
            f"{r[0]:.3f} -> {r[2]:.3f}, footprint F1 {r[1]:.3f} -> {r[3]:.3f}",
            flush=True,
        )
    m = np.array(rows).mean(axis=0)
    print(
        f"{a.set}: mean frame F1 {m[0]:.3f} with the 11 px prior, {m[2]:.3f} estimated; "
        f"footprint F1 {m[1]:.3f} prior, {m[3]:.3f} estimated"
    )


if __name__ == "__main__":
    main()
