"""How well :func:`calseg.io.recordings.suspected_interleave` tells interleaved channels from
one channel: ``python -m calseg.interleave_study [--json out.json]``.

Single-channel recordings are the negatives; the same recordings with ``k - 1`` other
channels interleaved (c0, c1, c0, c1, ... for ``k = 2``; three for ``k = 3``) are the
positives. The other channels are what a second channel of a real experiment looks like
(:data:`SECOND_CHANNELS`): a static structural marker (the recording's mean image at another
gain, with noise), a bleed-through copy (0.2-0.8 x the recording plus an offset), another
recording of the same size (a second functional indicator), another focal plane (the
recording blurred), and a near-copy (0.9 x the recording with noise; the hard case).

Sets:

* ``tune``: simulated recordings (:func:`calseg.simulate.dataset.simulate_dataset`, seeds
  1000+): the threshold is chosen here (:func:`choose_threshold`).
* ``held-out simulated``: other simulated recordings (seeds 2000+), never used for choosing.
* ``real``: the real recordings of ``settings.real_data_dir`` (negatives) and their interleaved
  versions (positives); never used for choosing.

Each set reports detection rates (positives flagged with the right ``k``; negatives flagged)
with Wilson 95% intervals. Detection looks at the first :data:`INTERLEAVE_SAMPLE` images, as
the upload does.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calseg.io.recordings import (
    INTERLEAVE_SAMPLE,
    INTERLEAVE_THRESHOLD,
    interleave_scores,
    read_recording,
)

REAL_FILES = (
    "sima_example.tif",
    "fissa_b_AVG_A01.tif",
    "fissa_b_AVG_A02.tif",
    "fissa_b_AVG_A03.tif",
    "astrocast_sample_1.tiff",
    "astrocast_sample_1_dff.h5",
)
"""Real single-channel recordings with at least 14 frames (``settings.real_data_dir``)."""


def _structural(x: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    gain = rng.uniform(0.3, 2.0)
    base = x.mean(axis=0, keepdims=True) * gain
    return base + rng.normal(0, 0.05 * float(base.std()) + 1e-6, x.shape)


def _bleed(x: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    return rng.uniform(0.2, 0.8) * x + rng.uniform(0, 0.2) * float(x.mean())


def _other(x: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    return other


def _plane(x: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return 0.8 * gaussian_filter(x, sigma=(0, 2.0, 2.0))


def _near_copy(x: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    return 0.9 * x + rng.normal(0, 0.02 * float(x.std()) + 1e-6, x.shape)


SECOND_CHANNELS: dict[str, Callable[..., np.ndarray]] = {
    "structural": _structural,
    "bleed-through": _bleed,
    "other-recording": _other,
    "other-plane": _plane,
    "near-copy": _near_copy,
}


def interleave(channels: list[np.ndarray]) -> np.ndarray:
    """``(T, H, W)`` stacks -> ``(k T, H, W)`` images c0[0], c1[0], ..., c0[1], c1[1], ..."""
    stack = np.stack(channels, axis=1)
    return stack.reshape(-1, *stack.shape[2:])


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``hits / n`` (Wilson 1927)."""
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def cases(recordings: list[np.ndarray], seed: int) -> list[dict]:
    """Negatives (each recording) and positives (each recording x second channel x k in 2, 3);
    each with its scores on the first :data:`INTERLEAVE_SAMPLE` images."""
    rng = np.random.default_rng(seed)
    out = []
    for i, x in enumerate(recordings):
        x = x.astype(np.float64)
        out.append({"label": 1, "kind": "single channel", "scores": _scores(x)})
        others = [r for j, r in enumerate(recordings) if j != i and r.shape == x.shape]
        for name, make in SECOND_CHANNELS.items():
            if name == "other-recording" and not others:
                continue
            for k in (2, 3):
                chans = [x]
                for _ in range(k - 1):
                    other = others[int(rng.integers(len(others)))] if others else x
                    chans.append(make(x, rng, other.astype(np.float64)))
                out.append({"label": k, "kind": name, "scores": _scores(interleave(chans))})
    return out


def _scores(images: np.ndarray) -> dict[int, float]:
    return interleave_scores(images[:INTERLEAVE_SAMPLE])


def predict(scores: dict[int, float], threshold: float) -> int:
    """The ``k`` reported (1 = not interleaved), as :func:`suspected_interleave` decides."""
    hits = [k for k, s in sorted(scores.items()) if s > threshold]
    return hits[0] if hits else 1


def evaluate(rows: list[dict], threshold: float) -> dict:
    """Detection rates with Wilson 95% intervals, per second-channel kind too."""
    pos = [r for r in rows if r["label"] > 1]
    neg = [r for r in rows if r["label"] == 1]
    tp = sum(predict(r["scores"], threshold) == r["label"] for r in pos)
    fp = sum(predict(r["scores"], threshold) > 1 for r in neg)
    per_kind = {}
    for kind in SECOND_CHANNELS:
        rs = [r for r in pos if r["kind"] == kind]
        if rs:
            hit = sum(predict(r["scores"], threshold) == r["label"] for r in rs)
            per_kind[kind] = {"detected": hit, "n": len(rs), "ci95": wilson(hit, len(rs))}
    neg_max = max((max(r["scores"].values(), default=0.0) for r in neg), default=math.nan)
    return {
        "positives": len(pos),
        "detected": tp,
        "detection_rate": tp / len(pos) if pos else math.nan,
        "detection_ci95": wilson(tp, len(pos)),
        "negatives": len(neg),
        "false_alarms": fp,
        "false_alarm_rate": fp / len(neg) if neg else math.nan,
        "false_alarm_ci95": wilson(fp, len(neg)),
        "largest_negative_score": neg_max,
        "per_kind": per_kind,
    }


def choose_threshold(rows: list[dict]) -> float:
    """The threshold halfway (geometrically) between the largest single-channel score and 2x
    it, but at least 1.5: no false alarm on the tuning set, with a margin for unseen data."""
    neg = [max(r["scores"].values(), default=0.0) for r in rows if r["label"] == 1]
    top = max(neg, default=1.0)
    return round(max(1.5, top * math.sqrt(2.0)), 2)


def simulated(seed: int, n_videos: int, workdir: Path) -> list[np.ndarray]:
    """``n_videos`` simulated recordings (48 frames of 128 x 128, all pattern classes, defect
    severity 0-1)."""
    from calseg.io.dataset import load_dataset
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    out = []
    for i, severity in enumerate(np.linspace(0.0, 1.0, n_videos // 4 or 1)):
        cfg = SimulationConfig(
            n_videos=4,
            n_frames=48,
            height=128,
            width=128,
            pattern_classes=["waves", "transients", "spikes", "fluttering"],
            n_val_videos=0,
            n_test_videos=0,
            seed=seed + i,
            defect_severity=float(severity),
        )
        folder = workdir / f"s{seed + i}"
        simulate_dataset(cfg, folder)
        out.extend(v.load_image() for v in load_dataset(folder / "manifest.json").videos)
    return out


def real(folder: Path) -> list[np.ndarray]:
    """The real recordings of :data:`REAL_FILES` found in ``folder``."""
    return [read_recording(folder / n).frames for n in REAL_FILES if (folder / n).exists()]


def run(n_videos: int = 16, real_dir: Path | None = None) -> dict:
    """The whole study (about a minute on 2 cores); see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="calseg-interleave-") as tmp:
        tune_rows = cases(simulated(1000, n_videos, Path(tmp)), seed=1)
        held_rows = cases(simulated(2000, n_videos, Path(tmp)), seed=2)
    threshold = choose_threshold(tune_rows)
    report = {
        "threshold_chosen": threshold,
        "threshold_in_use": INTERLEAVE_THRESHOLD,
        "tune (simulated)": evaluate(tune_rows, INTERLEAVE_THRESHOLD),
        "held-out simulated": evaluate(held_rows, INTERLEAVE_THRESHOLD),
    }
    if real_dir is None:
        from calseg.service.settings import Settings

        real_dir = Settings().real_data_dir
    recs = real(Path(real_dir))
    if recs:
        report["real"] = evaluate(cases(recs, seed=3), INTERLEAVE_THRESHOLD)
    return report


def _fmt(name: str, ev: dict) -> str:
    lo, hi = ev["detection_ci95"]
    flo, fhi = ev["false_alarm_ci95"]
    kinds = ", ".join(f"{k} {v['detected']}/{v['n']}" for k, v in ev["per_kind"].items())
    return (
        f"{name}: detected {ev['detected']}/{ev['positives']} ({lo:.2f}-{hi:.2f}); false alarms "
        f"{ev['false_alarms']}/{ev['negatives']} ({flo:.2f}-{fhi:.2f}); largest single-channel "
        f"score {ev['largest_negative_score']:.2f}; by kind: {kinds}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m calseg.interleave_study", description=__doc__)
    ap.add_argument("--videos", type=int, default=16, help="simulated recordings per set")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    report = run(args.videos)
    print(f"threshold chosen on the tuning set: {report['threshold_chosen']}; "
          f"in use: {report['threshold_in_use']}")  # fmt: skip
    for name in ("tune (simulated)", "held-out simulated", "real"):
        if name in report:
            print(_fmt(name, report[name]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
