"""How well CalSeg estimates the cell diameter of a recording, and what the cells target gets
from it (issue 17 item 3).

``python scripts/cell_size_study.py [--set tuning|held-out] [--block K] [--f1] [--cache DIR]``
loads (or simulates) the 32 videos of the accuracy suite's tuning set (seeds 20000-20031,
where defaults may be chosen; ``--block 1``: seeds 20032-20063) or, once, its held-out set
(seeds 10000-10031, only reported; ``--block 1``: 10032-10063), estimates each
video's cell diameter (:func:`calseg.analysis.cellsize.estimate_cell_diameter`) and compares it
with the true one, ``2 sqrt(mean cell area / pi)`` of the rendered tissue. It prints one line
per video and the share within 20 %. ``--f1`` also runs the classical ``cells`` target with the
estimated diameter and with the true one and scores both per footprint against *all* cells of
the tissue at IoU 0.5 (:func:`calseg.bench_accuracy.score_video`, ``all_f1``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from calseg.analysis.cellsize import estimate_cell_diameter
from calseg.bench_accuracy import load_video, score_video, suite_specs
from calseg.segment.infer import InferenceConfig, segment_recording


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="tuning", choices=["tuning", "held-out"])
    ap.add_argument("--block", type=int, default=0, help="block of 32 seeds of the set")
    ap.add_argument("--f1", action="store_true", help="also score the cells target")
    ap.add_argument("--cache", type=Path, default=None, help="simulated-video cache folder")
    a = ap.parse_args()
    errs, f1_est, f1_true = [], [], []
    cue_errs: dict[str, list[float]] = {"resting": [], "activity": []}
    for spec in suite_specs(a.set, block=a.block):
        video, _ = load_video(spec, a.cache)
        t0 = time.perf_counter()
        est = estimate_cell_diameter(video.image, spec.frame_interval_s)
        secs = time.perf_counter() - t0
        true_d = 2.0 * np.sqrt(video.meta["mean_cell_area_px_rendered"] / np.pi)
        d = est.diameter_px
        err = d / true_d - 1.0 if est.found else float("nan")
        errs.append(err)
        cue_errs["resting"].append(est.resting_px / true_d - 1.0)
        cue_errs["activity"].append(est.activity_px / true_d - 1.0)
        line = (
            f"{spec.id} {spec.pattern_class:10s} area {spec.mean_cell_area_px:3.0f} "
            f"{spec.height}x{spec.width}x{spec.n_frames} severity {spec.defect_severity:.1f} "
            f"{spec.intensity:22s} true {true_d:5.1f} px, estimated {d:5.1f} px "
            f"({100 * err:+4.0f} %, {secs:.1f} s; resting image {est.resting_px:5.1f}, "
            f"activity {est.activity_px:5.1f})"
        )
        if a.f1:
            scores = []
            for given in (None, true_d):
                cfg = InferenceConfig(method="classical", target="cells", cell_diameter_px=given)
                res = segment_recording(video.image, cfg, frame_interval_s=spec.frame_interval_s)
                scores.append(score_video(res.labels, video.labels, video.cells, "cells"))
            f1_est.append(scores[0]["all_f1"])
            f1_true.append(scores[1]["all_f1"])
            line += f"; all-cells F1 {f1_est[-1]:.3f} (true diameter: {f1_true[-1]:.3f})"
        print(line, flush=True)
    e = np.asarray(errs)
    hits = int(np.sum(np.abs(e) <= 0.2))
    areas = np.asarray([spec.mean_cell_area_px for spec in suite_specs(a.set, block=a.block)])
    for area in np.unique(areas):
        sel = np.abs(e[areas == area])
        print(
            f"mean cell area {area:3.0f} px: within 20 % on {int(np.sum(sel <= 0.2))} of "
            f"{sel.size}, median |error| {100 * np.nanmedian(sel):.0f} %"
        )
    for name, values in (
        ("resting image", cue_errs["resting"]),
        ("activity", cue_errs["activity"]),
    ):
        c = np.asarray(values)
        print(
            f"{name} cue alone: within 20 % on {int(np.sum(np.abs(c) <= 0.2))} of {c.size}, "
            f"no estimate on {int(np.isnan(c).sum())}"
        )
    print(
        f"{a.set} block {a.block}: within 20 % on {hits} of {e.size} videos; median |error| "
        f"{100 * np.nanmedian(np.abs(e)):.0f} %, mean error {100 * np.nanmean(e):+.0f} %, "
        f"no estimate on {int(np.isnan(e).sum())}"
    )
    if a.f1:
        print(
            f"cells target, all-cells F1 at IoU 0.5: mean {np.mean(f1_est):.3f} with the "
            f"estimated diameter, {np.mean(f1_true):.3f} with the true one"
        )


if __name__ == "__main__":
    main()
