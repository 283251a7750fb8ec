"""Over how long the cell-size estimate's activity cue should measure changes (issue 17 item 3):
the study behind :data:`calseg.analysis.cellsize.ACTIVITY_LAG_S`.

``python scripts/activity_lag_study.py [--cache DIR]`` estimates each video's cell diameter
(:func:`calseg.analysis.cellsize.estimate_cell_diameter`'s two cues and its cue choice) with
the change images 2 frames apart (the frame interval unknown) and ``T`` s apart for ``T`` of
1, 2, 3, 4 and 6 s (``round(T / frame interval)`` frames, at least 1), on the accuracy suite's
*tuning set* (seeds 20000-20031, where defaults may be chosen; the same cache as
``scripts/cell_size_study.py``) and on 24 development videos of ``make demo``'s design (8 videos
of 48 frames at 128 px, seeds 0 and 1400, and at 160 px with 200 px cells, seed 0; frames of
5 s). It prints, per set and lag, how many estimates are within 20 % of the true diameter
``2 sqrt(mean cell area / pi)``, with both cues and with the activity cue alone. The held-out
set is not read here (``scripts/cell_size_study.py --set held-out`` reports the chosen rule).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from calseg.analysis.cellsize import (
    ACTIVITY_LAG_S,
    activity_diameter,
    combine_cues,
    resting_image_diameter,
)
from calseg.bench_accuracy import load_video, suite_specs

LAGS_S = (None, 1.0, 2.0, 3.0, 4.0, 6.0)
"""Lags tried: ``None`` is 2 frames (the frame interval unknown), else seconds."""


def videos(cache: Path | None):  # noqa: ANN201 - iterator of (set, id, frames, s/frame, true px)
    """``(set name, id, (T, H, W) frames, frame interval s, true diameter px)`` per video."""
    for spec in suite_specs("tuning"):
        v, _ = load_video(spec, cache)
        true_d = 2.0 * np.sqrt(v.meta["mean_cell_area_px_rendered"] / np.pi)
        yield "tuning", spec.id, v.image, spec.frame_interval_s, true_d
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import iter_videos

    for seed, area, size in ((0, 100.0, 128), (1400, 100.0, 128), (0, 200.0, 160)):
        cfg = SimulationConfig(
            n_videos=8, n_frames=48, height=size, width=size, seed=seed,
            pattern_classes=["waves", "transients"], mean_cell_area_px=area,
            n_val_videos=1, n_test_videos=3,
        )  # fmt: skip
        for v in iter_videos(cfg):
            true_d = 2.0 * np.sqrt(float(v["tissue"].stats()["mean_area_px"]) / np.pi)
            name = f"{seed}/{area:g}/{v['id']}"
            yield "development", name, v["image"], cfg.frame_interval_s, true_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="simulated-video cache folder")
    a = ap.parse_args()
    hits: dict[tuple[str, str, object], int] = {}
    counts: dict[str, int] = {}
    for which, vid, frames, dt, true_d in videos(a.cache):
        counts[which] = counts.get(which, 0) + 1
        resting = resting_image_diameter(frames).diameter_px
        line = []
        for lag in LAGS_S:
            # activity_lag_frames takes round(ACTIVITY_LAG_S / interval) frames: an interval of
            # dt * ACTIVITY_LAG_S / lag gives round(lag / dt), the lag of ``lag`` seconds
            act = activity_diameter(frames, None if lag is None else dt * ACTIVITY_LAG_S / lag)
            both, _ = combine_cues(resting, act)
            for cue, d in (("both", both), ("activity", act.diameter_px)):
                ok = bool(abs(d / true_d - 1.0) <= 0.2)
                hits[(which, cue, lag)] = hits.get((which, cue, lag), 0) + ok
            line.append(f"{'2 fr' if lag is None else f'{lag:g} s'} {both:5.1f}")
        print(f"{which} {vid} {dt:g} s/frame true {true_d:5.1f} px: " + ", ".join(line), flush=True)
    for which, n in counts.items():
        for cue in ("both", "activity"):
            row = ", ".join(
                f"{'2 frames' if lag is None else f'{lag:g} s'} {hits[(which, cue, lag)]}"
                for lag in LAGS_S
            )
            print(f"{which} ({n} videos), {cue} cue(s) within 20 %: {row}")


if __name__ == "__main__":
    main()
