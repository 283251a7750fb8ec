"""Held-out accuracy suite: ``calseg bench accuracy`` / ``python -m calseg.bench --only accuracy``.

CalSeg's accuracy figures (README headline, BENCHMARKS.md, the demo's pointer) come from this
suite, never from one video (issue 17 item 1).

**Seeds: which videos are which.**

* :data:`HELD_OUT_SEEDS` (10000-19999) are the *held-out suite*. No default of CalSeg may be
  chosen by looking at them; they are only reported.
* :data:`TUNING_SEEDS` (20000-29999) are the *tuning set*: the same design
  (:func:`suite_specs` with ``which="tuning"``, seeds 20000-20031), for choosing defaults and
  thresholds.
* Further *blocks* of either set (``suite_specs(which, block=k)``: 32 more seeds from
  ``start + 32 k``, the same design drawn anew) give more videos where 32 are too few to tell
  rules apart; block 1 of the held-out set (seeds 10032-10063) was first run on 2026-12-07 to
  report the cell-size estimate (:mod:`calseg.analysis.cellsize`).
* Seeds below 10000 (0, 1, 2... of the demo, the tests and the development history) were used
  in development and are in neither set.

**Design.** :data:`N_VIDEOS` (32) simulated videos, one :class:`~calseg.simulate.config.
SimulationConfig` each (seed = ``HELD_OUT_SEEDS.start + i``). The pattern class cycles over
the four classes (8 videos each); every other factor takes each of its levels equally often
(:data:`LEVELS`), in an order shuffled once per factor from ``SeedSequence([first seed,
factor])`` (a balanced random design, fixed in code):

* mean cell area 60, 100, 150, 220, 300 px (about 8.7-19.5 px across);
* indicator GCaMP6s, 6f, 6m (Chen et al. 2013);
* frame interval 0.5, 1, 2, 3, 5 s (integrator step 0.1 s at 0.5 s, the published 0.2 s
  otherwise, so the interval is a whole number of steps);
* defect severity 0, 0.2, 0.4, 0.6, 0.8 (the renderer's default defect families);
* frame size 128x128 (200 frames), 128x256 (160), 256x256 (120), 384x384 (80),
  512x512 (60 frames): small enough that the suite runs in minutes on 2 cores;
* global intensity changes from frame to frame, off in half of the videos, otherwise
  ``auto_gain``, ``contrast_normalisation``, ``illumination_flicker`` or all three at a fixed
  severity of 0.8 (:data:`calseg.simulate.render.INTENSITY_DEFECTS`): they change the image,
  never the ground truth, so they must not become whole-field "activity".

Tissue: a pouch, or the whole rectangular field where a pouch would hold under 60 cells.
Activity is measured, not set: a video is *sparse* when in most frames (the median frame)
under 1 % of the field is active in the ground truth (mostly *spikes*), *dense* otherwise.

**Scoring** (every helper from :mod:`calseg.analysis.metrics` and
:mod:`calseg.pipelines.real_eval`):

* *per frame* (CalSeg's convention, as ``calseg evaluate``): foreground IoU of the active-cell
  pixels pooled over frames (:func:`~calseg.analysis.metrics.foreground_scores`), and instance
  precision / recall / F1 / AP50 (= TP / (TP + FP + FN) at IoU >= 0.5, the cellpose/StarDist
  convention, not COCO AP) matched frame by frame
  (:func:`~calseg.analysis.metrics.match_instances_stack`), at IoU 0.5 and 0.3;
* *per cell footprint over the recording* (the convention of Suite2p/CaImAn users): each
  predicted id and each ground-truth cell active at least once becomes one footprint, the
  pixels it covers in at least half of the frames where it appears
  (:func:`~calseg.pipelines.real_eval.prediction_footprints`); footprints are matched one to one
  (:func:`~calseg.analysis.metrics.match_instances`) at IoU 0.5 and 0.3; ``extra ROIs`` are the
  unmatched predictions at 0.5;
* *temporal precision / recall of matched cells*: for footprint pairs matched at IoU >= 0.5,
  the frames where the prediction paints the cell against the frames where the cell is active
  in the ground truth, pooled over pairs: precision = sum |P & G| / sum |P|, recall =
  sum |P & G| / sum |G|;
* *whole-field false activity*: ``peak_false_coverage``, the largest fraction of the field
  predicted active but inactive in the ground truth in any one frame (a global intensity
  change taken for activity shows as a value near the tissue's share of the field);
* the ``cells`` target (all cells on a temporal projection, constant in time) is scored per
  footprint against *all* cells of the tissue (``cells.tif``), and against the active ones.

Each video is the resampling unit: per condition (a factor's level, or a measured activity
class), the mean over its videos with a percentile bootstrap 95 % CI (2000 resamples, seed 0;
:func:`calseg.analysis.metrics.bootstrap_ci`, Efron & Tibshirani 1993; none under 3 videos).

**Cache.** Simulated videos are kept under ``--cache`` (default ``$CALSEG_BENCH_CACHE`` or
``~/.cache/calseg/accuracy-suite``), keyed by the video's ``SimulationConfig`` and a hash of
the simulator's source (``calseg/simulate/*.py``), so a re-run only segments and scores, and a
changed simulator re-simulates. ``--quick`` runs 8 videos, two per pattern class
(:func:`quick_specs`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calseg.analysis.metrics import ERROR_KINDS


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


HELD_OUT_SEEDS = range(10000, 20000)
"""Seeds of the held-out suite: reported only, never used to choose a default."""
TUNING_SEEDS = range(20000, 30000)
"""Seeds of the tuning set (same design, block 0: 20000-20031): where defaults may be
chosen."""
N_VIDEOS = 32
"""Videos in the full suite (issue 17 asks for at least 24)."""
QUICK_VIDEOS = 8
"""``--quick`` keeps this many videos, two per pattern class (:func:`quick_specs`)."""
SPARSE_FIELD_FRACTION = 0.01
"""A video is sparse when its median frame has under this fraction of the field active."""
INTENSITY_SEVERITY = 0.8
"""Fixed severity of the global intensity defects where a video has them."""
MIN_POUCH_CELLS = 60
"""Below this many cells in a pouch, the tissue fills the whole rectangular field."""

PATTERN_CLASSES = ("spikes", "transients", "waves", "fluttering")
SIZES = {  # (height, width) -> frames: fewer frames on larger fields
    (128, 128): 200,
    (128, 256): 160,
    (256, 256): 120,
    (384, 384): 80,
    (512, 512): 60,
}
LEVELS: dict[str, tuple] = {
    "mean_cell_area_px": (60.0, 100.0, 150.0, 220.0, 300.0),
    "indicator": ("GCaMP6s", "GCaMP6f", "GCaMP6m"),
    "frame_interval_s": (0.5, 1.0, 2.0, 3.0, 5.0),
    "defect_severity": (0.0, 0.2, 0.4, 0.6, 0.8),
    "size": tuple(SIZES),
    "intensity": (
        "none",
        "auto_gain",
        "none",
        "contrast_normalisation",
        "none",
        "illumination_flicker",
        "none",
        "all",
    ),
}
"""Levels of each factor; each level is used equally often (as far as 32 divides)."""
INTENSITY_FAMILIES = ("auto_gain", "contrast_normalisation", "illumination_flicker")

METHODS: dict[str, dict] = {
    "classical, active": {"method": "classical", "target": "active"},
    "classical, cells": {"method": "classical", "target": "cells"},
}
"""Methods run on every video: CalSeg's default (``calseg segment``: method auto = classical
without real SAM2 weights, target active) and the ``cells`` target (InferenceConfig fields)."""


class SuiteError(ValueError):
    """Raised for an impossible suite request (unknown set, empty selection)."""


@dataclass(frozen=True)
class VideoSpec:
    """One video of the suite: its seed and the levels of every factor."""

    index: int
    seed: int
    pattern_class: str
    mean_cell_area_px: float
    indicator: str
    frame_interval_s: float
    defect_severity: float
    height: int
    width: int
    n_frames: int
    intensity: str

    @property
    def id(self) -> str:
        """Stable name, e.g. ``s10003``."""
        return f"s{self.seed}"

    def config(self):  # noqa: ANN201 - SimulationConfig, imported lazily
        """The :class:`~calseg.simulate.config.SimulationConfig` of this one video."""
        from calseg.simulate.config import SimulationConfig
        from calseg.simulate.geometry import estimate_n_cells

        defects = {}
        if self.intensity != "none":
            fams = INTENSITY_FAMILIES if self.intensity == "all" else (self.intensity,)
            defects = {f: {"severity": INTENSITY_SEVERITY} for f in fams}
        shape = "pouch"
        if estimate_n_cells(self.height, self.width, "pouch", self.mean_cell_area_px) < (
            MIN_POUCH_CELLS
        ):
            shape = "rectangle"
        return SimulationConfig(
            n_videos=1,
            n_val_videos=0,
            n_test_videos=0,
            n_frames=self.n_frames,
            height=self.height,
            width=self.width,
            pattern_classes=[self.pattern_class],
            indicator=self.indicator,
            frame_interval_s=self.frame_interval_s,
            dt_s=0.1 if self.frame_interval_s < 1.0 else 0.2,
            defect_severity=self.defect_severity,
            mean_cell_area_px=self.mean_cell_area_px,
            tissue_shape=shape,
            seed=self.seed,
            defects=defects,
        )


def _balanced(levels: tuple, n: int, rng: np.random.Generator) -> list:
    reps = -(-n // len(levels))
    order = rng.permutation(len(levels) * reps)[:n]
    return [levels[k % len(levels)] for k in order]


def suite_specs(
    which: str = "held-out", n_videos: int = N_VIDEOS, block: int = 0
) -> list[VideoSpec]:
    """The suite's videos (module docstring: design and seed rule).

    Args:
        which: ``"held-out"`` (seeds from 10000) or ``"tuning"`` (seeds from 20000).
        n_videos: videos (at most :data:`N_VIDEOS`, 32, per block).
        block: which block of :data:`N_VIDEOS` seeds of the set (0: the suite itself; ``k``:
            seeds from ``start + 32 k``, the same design with its own balanced draw).

    Returns:
        ``n_videos`` :class:`VideoSpec`, the same for the same arguments.
    """
    seeds = {"held-out": HELD_OUT_SEEDS, "tuning": TUNING_SEEDS}.get(which)
    if seeds is None:
        raise SuiteError(f"unknown set {which!r}; use 'held-out' or 'tuning'")
    if not 1 <= n_videos <= N_VIDEOS:
        raise SuiteError(f"n_videos must be 1-{N_VIDEOS} for the {which} set")
    if not 0 <= block < len(seeds) // N_VIDEOS:
        raise SuiteError(f"block must be 0-{len(seeds) // N_VIDEOS - 1} for the {which} set")
    seeds = range(seeds.start + N_VIDEOS * block, seeds.start + N_VIDEOS * (block + 1))
    draws = {}
    for k, (name, levels) in enumerate(LEVELS.items()):
        rng = np.random.default_rng(np.random.SeedSequence([seeds.start, k]))
        draws[name] = _balanced(levels, n_videos, rng)
    out = []
    for i in range(n_videos):
        h, w = draws["size"][i]
        out.append(
            VideoSpec(
                index=i,
                seed=seeds.start + i,
                pattern_class=PATTERN_CLASSES[i % len(PATTERN_CLASSES)],
                mean_cell_area_px=float(draws["mean_cell_area_px"][i]),
                indicator=str(draws["indicator"][i]),
                frame_interval_s=float(draws["frame_interval_s"][i]),
                defect_severity=float(draws["defect_severity"][i]),
                height=int(h),
                width=int(w),
                n_frames=SIZES[(h, w)],
                intensity=str(draws["intensity"][i]),
            )
        )
    return out


def quick_specs(specs: list[VideoSpec]) -> list[VideoSpec]:
    """The ``--quick`` subset: in each block of four consecutive videos (one per pattern class,
    which cycles with the index), the video whose class index equals the block number modulo 4:
    indices 0, 5, 10, 15, 16, 21, 26, 31 of the full suite, two per pattern class.
    (Every fourth video would keep only one class.)"""
    n = len(PATTERN_CLASSES)
    return [s for s in specs if (s.index // n) % n == s.index % n][:QUICK_VIDEOS]


# --------------------------------------------------------------------------------------------
# simulated videos, cached


def simulator_hash() -> str:
    """sha256 (first 16 hex digits) of the simulator's source files, ``calseg/simulate/*.py``."""
    h = hashlib.sha256()
    for p in sorted((Path(__file__).parent / "simulate").glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$CALSEG_BENCH_CACHE`` or ``~/.cache/calseg/accuracy-suite``."""
    env = os.environ.get("CALSEG_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "calseg" / "accuracy-suite"


@dataclass
class SuiteVideo:
    """A simulated video of the suite: ``image`` ``(T, H, W)`` uint16/uint8 camera ADU,
    ``labels`` ``(T, H, W)`` uint32 ids of the active cells per frame, ``cells`` ``(H, W)``
    uint32 all cells, ``meta`` (spec, n_cells, measured activity, defects drawn)."""

    spec: VideoSpec
    image: np.ndarray
    labels: np.ndarray
    cells: np.ndarray
    meta: dict = field(default_factory=dict)


def load_video(spec: VideoSpec, cache_dir: Path | None = None) -> tuple[SuiteVideo, bool]:
    """Simulate ``spec`` or read it from the cache.

    Returns:
        ``(video, from_cache)``.
    """
    import tifffile

    from calseg.simulate.dataset import simulate_videos

    cfg = spec.config()
    key_src = json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + simulator_hash()
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    d = (cache_dir or default_cache_dir()) / f"{spec.id}-{key}"
    if (d / "meta.json").is_file():
        try:
            meta = json.loads((d / "meta.json").read_text())
            video = SuiteVideo(
                spec,
                tifffile.imread(d / "image.tif"),
                tifffile.imread(d / "labels.tif").astype(np.uint32),
                tifffile.imread(d / "cells.tif").astype(np.uint32),
                meta,
            )
            return video, True
        except (OSError, ValueError, KeyError):  # a broken cache entry is simulated again
            pass
    v = simulate_videos(cfg)[0]
    labels = np.asarray(v["labels"], dtype=np.uint32)
    active = (labels != 0).reshape(labels.shape[0], -1).mean(axis=1)
    meta = {
        "id": spec.id,
        "spec": asdict(spec),
        "config": cfg.model_dump(mode="json"),
        "n_cells": int(v["tissue"].n_cells),
        "mean_cell_area_px_rendered": float(v["tissue"].stats()["mean_area_px"]),
        "median_active_field_fraction": float(np.median(active)),
        "max_active_field_fraction": float(active.max()),
        "n_cells_active": int(len(np.unique(labels[labels != 0]))),
        "defects_present": sorted(
            k for k, s in v["meta"]["defects"].items() if float(s.get("severity", 0) or 0) > 0
        ),
        "simulator_hash": simulator_hash(),
    }
    video = SuiteVideo(spec, v["image"], labels, v["tissue"].labels.astype(np.uint32), meta)
    d.mkdir(parents=True, exist_ok=True)
    kw = {"compression": "zlib", "compressionargs": {"level": 1}, "photometric": "minisblack"}
    tifffile.imwrite(d / "image.tif", video.image, **kw)
    tifffile.imwrite(d / "labels.tif", labels, **kw)
    tifffile.imwrite(d / "cells.tif", video.cells, **kw)
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(d / "meta.json")
    return video, False


# --------------------------------------------------------------------------------------------
# scoring


def matched_pairs(
    pred_labels: np.ndarray, gt_labels: np.ndarray, iou_threshold: float
) -> list[tuple[int, int, float]]:
    """One-to-one matched ``(pred id, gt id, IoU)`` pairs with IoU >= ``iou_threshold`` of two
    ``(H, W)`` label images (the matching of :func:`calseg.analysis.metrics.match_instances`)."""
    from scipy.optimize import linear_sum_assignment

    from calseg.analysis.metrics import instance_iou_matrix

    iou, p_ids, g_ids = instance_iou_matrix(pred_labels, gt_labels)
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [
        (int(p_ids[r]), int(g_ids[c]), float(iou[r, c]))
        for r, c in zip(rows, cols, strict=True)
        if iou[r, c] >= iou_threshold
    ]


def _presence(labels: np.ndarray) -> dict[int, np.ndarray]:
    """id -> ``(T,)`` bool: the frames where the id paints at least one pixel."""
    t = labels.shape[0]
    tt, pp = np.nonzero(labels.reshape(t, -1))
    codes = np.unique(labels.reshape(t, -1)[tt, pp].astype(np.int64) * t + tt)
    ids, frames = np.divmod(codes, t)
    out: dict[int, np.ndarray] = {}
    for i in np.unique(ids):
        out[int(i)] = np.zeros(t, bool)
    for i, f in zip(ids.tolist(), frames.tolist(), strict=True):
        out[i][f] = True
    return out


def temporal_scores(
    pred: np.ndarray, gt: np.ndarray, pairs: list[tuple[int, int, float]]
) -> dict[str, float | None]:
    """Temporal precision and recall of matched cells (module docstring).

    Args:
        pred, gt: ``(T, H, W)`` integer label stacks, ids stable over frames.
        pairs: ``(pred id, gt id, IoU)`` footprint matches.

    Returns:
        ``{"temporal_precision", "temporal_recall"}`` pooled over pairs; ``None`` without pairs.
    """
    if not pairs:
        return {"temporal_precision": None, "temporal_recall": None}
    pp, gp = _presence(pred), _presence(gt)
    inter = npred = ngt = 0
    for p, g, _ in pairs:
        a = pp.get(p, np.zeros(pred.shape[0], bool))
        b = gp.get(g, np.zeros(gt.shape[0], bool))
        inter += int(np.count_nonzero(a & b))
        npred += int(a.sum())
        ngt += int(b.sum())
    return {
        "temporal_precision": inter / npred if npred else None,
        "temporal_recall": inter / ngt if ngt else None,
    }


def score_video(pred: np.ndarray, gt: np.ndarray, cells: np.ndarray, target: str) -> dict:
    """Every suite metric of one prediction (module docstring).

    Args:
        pred: ``(T, H, W)`` integer label stack of the prediction (ids stable over frames).
        gt: ``(T, H, W)`` integer ground truth of the active cells.
        cells: ``(H, W)`` integer label image of all cells.
        target: ``"active"`` (scored per frame, per footprint and in time) or ``"cells"``
            (constant in time: per footprint only, against all cells and the active ones).

    Returns:
        Flat dict of floats (``None`` where undefined): ``frame_*`` (foreground ``iou``,
        ``precision``, ``recall``, ``f1``, ``ap50`` at 0.5, ``f1_30`` at 0.3), ``fp_*``
        (footprints vs active cells: ``precision``/``recall``/``f1`` at 0.5, ``f1_30``,
        ``precision_30``, ``recall_30``, ``mean_iou``, ``extra_rois``, ``n_pred``, ``n_gt``),
        ``all_*`` (footprints vs all cells: ``f1``, ``f1_30``, ``precision``, ``recall``),
        ``temporal_precision``/``temporal_recall``, ``peak_false_coverage``.
    """
    from calseg.analysis.metrics import foreground_scores, match_instances, match_instances_stack
    from calseg.pipelines.real_eval import prediction_footprints

    pred = np.asarray(pred)
    gt = np.asarray(gt)
    out: dict = {}
    fg_pred = pred != 0
    false = (fg_pred & (gt == 0)).reshape(pred.shape[0], -1).mean(axis=1)
    out["peak_false_coverage"] = float(false.max()) if len(false) else 0.0
    pfp = prediction_footprints(pred)
    gfp = prediction_footprints(gt)
    m50 = match_instances(pfp, gfp, 0.5)
    m30 = match_instances(pfp, gfp, 0.3)
    out.update(
        fp_precision=m50["precision"],
        fp_recall=m50["recall"],
        fp_f1=m50["f1"],
        fp_precision_30=m30["precision"],
        fp_recall_30=m30["recall"],
        fp_f1_30=m30["f1"],
        fp_mean_iou=m50["mean_matched_iou"],
        fp_extra_rois=m50["fp"],
        fp_n_pred=m50["tp"] + m50["fp"],
        fp_n_gt=m50["tp"] + m50["fn"],
    )
    a50 = match_instances(pfp, np.asarray(cells), 0.5)
    a30 = match_instances(pfp, np.asarray(cells), 0.3)
    out.update(
        all_precision=a50["precision"],
        all_recall=a50["recall"],
        all_f1=a50["f1"],
        all_f1_30=a30["f1"],
    )
    if target == "active":
        fg = foreground_scores(pred, gt)
        i50 = match_instances_stack(pred, gt, 0.5)
        i30 = match_instances_stack(pred, gt, 0.3)
        out.update(
            frame_iou=fg["iou"],
            frame_precision=i50["precision"],
            frame_recall=i50["recall"],
            frame_f1=i50["f1"],
            frame_ap50=i50["ap"],
            frame_f1_30=i30["f1"],
            frame_errors={k: i50[k] for k in ERROR_KINDS},
        )
        out.update(temporal_scores(pred, gt, matched_pairs(pfp, gfp, 0.5)))
    else:
        out.update(
            frame_iou=None,
            frame_precision=None,
            frame_recall=None,
            frame_f1=None,
            frame_ap50=None,
            frame_f1_30=None,
            frame_errors=None,
            temporal_precision=None,
            temporal_recall=None,
        )
    return out


# --------------------------------------------------------------------------------------------
# conditions and summaries


def _bin(value: float, edges: tuple[float, ...], names: tuple[str, ...]) -> str:
    for e, n in zip(edges, names, strict=False):
        if value <= e:
            return n
    return names[-1]


def conditions_of(spec: VideoSpec, meta: dict) -> dict[str, str]:
    """The condition groups a video belongs to: one level per factor (binned) and its measured
    activity class."""
    return {
        "pattern class": spec.pattern_class,
        "mean cell area (px)": _bin(
            spec.mean_cell_area_px, (100.0, 150.0), ("60-100", "150", "220-300")
        ),
        "indicator": spec.indicator,
        "frame interval (s)": _bin(spec.frame_interval_s, (1.0, 2.0), ("0.5-1", "2", "3-5")),
        "defect severity": _bin(spec.defect_severity, (0.0, 0.4), ("0", "0.2-0.4", "0.6-0.8")),
        "size (px)": f"{spec.height}x{spec.width}",
        "activity": (
            "sparse (<1 % of field)"
            if meta["median_active_field_fraction"] < SPARSE_FIELD_FRACTION
            else "dense"
        ),
        "global intensity changes": "none" if spec.intensity == "none" else "on",
    }


SUMMARY_KEYS = (
    "frame_iou",
    "frame_precision",
    "frame_recall",
    "frame_f1",
    "frame_ap50",
    "frame_f1_30",
    "fp_precision",
    "fp_recall",
    "fp_f1",
    "fp_f1_30",
    "fp_mean_iou",
    "fp_extra_rois",
    "all_precision",
    "all_recall",
    "all_f1",
    "all_f1_30",
    "temporal_precision",
    "temporal_recall",
    "peak_false_coverage",
    "seconds",
)


def summarise_rows(rows: list[dict], keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """Mean and bootstrap 95 % CI over videos of each key (``None`` values are left out).

    Returns:
        ``{"n_videos", "<key>": {"mean", "ci95": [lo, hi] | None, "n"}}``.
    """
    from calseg.analysis.metrics import bootstrap_ci

    out: dict = {"n_videos": len(rows)}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        out[k] = {
            "mean": float(vals.mean()) if len(vals) else None,
            "ci95": bootstrap_ci(vals) if len(vals) else None,
            "n": int(len(vals)),
        }
    return out


def summarise_suite(rows: list[dict]) -> dict:
    """Per method: ``overall`` and per condition (``conditions[factor][level]``) summaries, and
    (active target) ``frame_errors``: the :data:`calseg.analysis.metrics.ERROR_KINDS` counts
    per frame at IoU 0.5, summed over the videos."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mr = [r for r in rows if r["method"] == method]
        cond: dict = {}
        for factor in mr[0]["conditions"]:
            levels = sorted({r["conditions"][factor] for r in mr})
            cond[factor] = {
                lv: summarise_rows([r for r in mr if r["conditions"][factor] == lv])
                for lv in levels
            }
        out[method] = {"overall": summarise_rows(mr), "conditions": cond}
        if any(r.get("frame_errors") for r in mr):  # per frame at IoU 0.5, summed over videos
            out[method]["frame_errors"] = {
                k: int(sum((r.get("frame_errors") or {}).get(k, 0) for r in mr))
                for k in ERROR_KINDS
            }
    return out


# --------------------------------------------------------------------------------------------
# running


def run_suite(
    specs: list[VideoSpec],
    cache_dir: Path | None = None,
    methods: dict[str, dict] | None = None,
    log=None,  # noqa: ANN001 - callable(str) or None
) -> dict:
    """Simulate (or load) every video, segment it with every method, score it.

    Args:
        specs: the videos (:func:`suite_specs`).
        cache_dir: simulated-video cache (:func:`default_cache_dir` when ``None``).
        methods: display name -> :class:`~calseg.segment.infer.InferenceConfig` fields
            (default :data:`METHODS`).
        log: called with one progress line per video (``None``: silent).

    Returns:
        ``{"rows": [...], "videos": [...], "summary": {...}, "simulate_s", "segment_s"}``:
        one row per (video, method) with the :func:`score_video` keys, ``seconds`` (segmentation
        wall time), ``video``, ``method`` and ``conditions``.
    """
    from calseg.segment.infer import InferenceConfig, segment_recording

    if not specs:
        raise SuiteError("no video selected")
    methods = methods or METHODS
    rows, videos = [], []
    sim_s = seg_s = 0.0
    for spec in specs:
        t0 = time.perf_counter()
        video, cached = load_video(spec, cache_dir)
        sim_s += time.perf_counter() - t0
        conds = conditions_of(spec, video.meta)
        videos.append({**video.meta, "from_cache": cached, "conditions": conds})
        for name, fields in methods.items():
            t0 = time.perf_counter()
            # the frame interval is known, as a file's metadata or the job's parameter gives it
            res = segment_recording(
                video.image, InferenceConfig(**fields), frame_interval_s=spec.frame_interval_s
            )
            dt = time.perf_counter() - t0
            seg_s += dt
            scores = score_video(res.labels, video.labels, video.cells, fields.get("target"))
            rows.append(
                {"video": spec.id, "method": name, **scores, "seconds": dt, "conditions": conds}
            )
        if log:
            fr = [r for r in rows if r["video"] == spec.id]
            log(
                f"{spec.id} {spec.pattern_class} {spec.height}x{spec.width}x{spec.n_frames} "
                f"area {spec.mean_cell_area_px:g} {spec.indicator} {spec.frame_interval_s:g} s "
                f"sev {spec.defect_severity:g} intensity {spec.intensity}"
                + (" (cached)" if cached else "")
                + ": "
                + "; ".join(
                    f"{r['method']}: frame F1 {_f(r['frame_f1'])} footprint F1 {_f(r['fp_f1'])}"
                    f" all-cells F1 {_f(r['all_f1'])}"
                    for r in fr
                )
            )
    return {
        "rows": rows,
        "videos": videos,
        "summary": summarise_suite(rows),
        "simulate_s": sim_s,
        "segment_s": seg_s,
    }


def _f(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _cell(s: dict, nd: int = 2) -> str:
    m, ci = s["mean"], s["ci95"]
    if m is None:
        return "n/a"
    if ci is None:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


ACTIVE_COLUMNS = (
    ("frame_f1", "F1 per frame"),
    ("frame_ap50", "AP50 per frame"),
    ("frame_iou", "fg IoU per frame"),
    ("fp_f1", "F1 footprint @0.5"),
    ("fp_f1_30", "F1 footprint @0.3"),
    ("temporal_precision", "temporal P"),
    ("temporal_recall", "temporal R"),
    ("peak_false_coverage", "peak false coverage"),
)
CELLS_COLUMNS = (
    ("all_f1", "F1 all cells @0.5"),
    ("all_f1_30", "F1 all cells @0.3"),
    ("all_precision", "P all cells @0.5"),
    ("all_recall", "R all cells @0.5"),
    ("fp_f1", "F1 active cells @0.5"),
)


def markdown_tables(summary: dict) -> str:
    """Markdown tables, one per method: overall, then one line per condition level; each cell
    ``mean [95 % CI]``; under an active-target table, why its unmatched ROIs and cells are
    unmatched (:func:`calseg.segment.evaluate.error_breakdown`)."""
    lines = []
    for method, s in summary.items():
        cols = CELLS_COLUMNS if "cells" in method else ACTIVE_COLUMNS
        lines.append(f"**{method}** (mean [bootstrap 95 % CI] over videos)")
        lines.append("")
        lines.append("| condition | videos | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        ov = s["overall"]
        lines.append(
            f"| **all** | {ov['n_videos']} | " + " | ".join(_cell(ov[k]) for k, _ in cols) + " |"
        )
        for factor, levels in s["conditions"].items():
            for lv, g in levels.items():
                lines.append(
                    f"| {factor}: {lv} | {g['n_videos']} | "
                    + " | ".join(_cell(g[k]) for k, _ in cols)
                    + " |"
                )
        lines.append("")
        if s.get("frame_errors"):
            from calseg.segment.evaluate import ERRORS_NOTE, error_breakdown

            lines.append(
                f"Why ROIs and cells went unmatched (per frame at IoU 0.5, summed over the "
                f"{ov['n_videos']} videos; {ERRORS_NOTE}): {error_breakdown(s['frame_errors'])}"
            )
            lines.append("")
    return "\n".join(lines)


def headline(summary: dict) -> str:
    """One line for the README/demo: the default method's overall F1 per frame and per
    footprint with their CIs."""
    s = summary.get("classical, active")
    if s is None:
        return ""
    ov = s["overall"]
    return (
        f"classical (default), {ov['n_videos']} held-out videos: F1 per frame "
        f"{_cell(ov['frame_f1'])}, AP50 per frame {_cell(ov['frame_ap50'])}, F1 per cell "
        f"footprint {_cell(ov['fp_f1'])} (IoU >= 0.5)"
    )


REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding README.md and BENCHMARKS.md (``--write-docs``)."""
SUITE_RESULT_FILE = Path("docs") / "accuracy-suite.json"
"""Overall numbers and headline of the last full held-out run written with ``--write-docs``
(read by ``make demo``, :func:`suite_result`)."""


def replace_generated(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME
    -->`` replaced by ``body`` (markers kept).

    Raises:
        SuiteError: a marker is missing or out of order.
    """
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SuiteError(f"markers {begin} ... {end} not found (in order)")
    return text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]


def provenance(report: dict) -> str:
    """One line: command, commit, videos, set, machine, date, wall time, load."""
    m = report["machine"]
    return (
        f"`{report['command']}`, commit {m['git_commit']}, {report['n_videos']} videos "
        f"({report['set']} set, seeds {report['seeds']}), {m['cpu_model']}, "
        f"{m['cores_usable']} cores, {report['date']}, wall {report['wall_s']:.0f} s "
        f"(load 1 min {report['load_1min_before_after']})"
    )


def write_docs(report: dict, root: Path = REPO_ROOT) -> list[Path]:
    """Write a full held-out run into the docs: BENCHMARKS.md (``accuracy-suite``: every
    method's per-condition table), README.md (``accuracy-headline``: the headline and the default
    method's per-condition table) and :data:`SUITE_RESULT_FILE` (headline and overall summary,
    for ``make demo``).

    Raises:
        SuiteError: for a ``--quick`` or tuning-set run (the docs quote the full held-out suite).
    """
    if report["quick"] or report["set"] != "held-out":
        raise SuiteError("--write-docs needs the full held-out suite (no --quick, no --set)")
    summary = report["summary"]
    prov = provenance(report)
    head = headline(summary)
    bench_md = f"{prov}\n\n{head}\n\n{markdown_tables(summary)}"
    default = {k: v for k, v in summary.items() if k == "classical, active"}
    cells = summary.get("classical, cells")
    cells_line = ""
    if cells:
        ov = cells["overall"]
        cells_line = (
            f"\n\n`--target cells` (all cells on a projection), same videos: F1 against all "
            f"cells {_cell(ov['all_f1'])} at IoU >= 0.5, {_cell(ov['all_f1_30'])} at 0.3."
        )
    readme_md = f"**{head}.**\n\n{prov}.\n\n{markdown_tables(default).rstrip()}{cells_line}"
    written = []
    for name, key, body in (
        ("BENCHMARKS.md", "accuracy-suite", bench_md),
        ("README.md", "accuracy-headline", readme_md),
    ):
        path = root / name
        path.write_text(replace_generated(path.read_text(), key, body))
        written.append(path)
    result = {
        "headline": head,
        "provenance": prov,
        "command": report["command"],
        "commit": report["machine"]["git_commit"],
        "date": report["date"],
        "n_videos": report["n_videos"],
        "seeds": report["seeds"],
        "overall": {k: v["overall"] for k, v in summary.items()},
        "frame_errors": {k: v["frame_errors"] for k, v in summary.items() if "frame_errors" in v},
    }
    path = root / SUITE_RESULT_FILE
    path.write_text(json.dumps(result, indent=1) + "\n")
    written.append(path)
    return written


def report_from_json(path: Path) -> dict:
    """An earlier run's ``--json`` report, with ``n_videos``, ``seeds`` and ``date`` filled in
    where that run predates them (date: the file's modification day, UTC)."""
    report = json.loads(Path(path).read_text())
    seeds = [v["spec"]["seed"] for v in report["videos"]]
    report.setdefault("n_videos", len(seeds))
    report.setdefault("seeds", f"{min(seeds)}-{max(seeds)}")
    report.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime(Path(path).stat().st_mtime)))
    return report


def suite_result(root: Path = REPO_ROOT) -> dict | None:
    """The last ``--write-docs`` result (:data:`SUITE_RESULT_FILE`), ``None`` when absent."""
    try:
        return json.loads((root / SUITE_RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m calseg.bench accuracy [--quick] [--set held-out|tuning] [--json F]
    [--markdown F] [--cache DIR]``."""
    from calseg.machine import machine_info

    ap = argparse.ArgumentParser(
        prog="python -m calseg.bench accuracy",
        description="Held-out accuracy suite of simulated videos (calseg/bench_accuracy.py).",
    )
    ap.add_argument("--quick", action="store_true", help="8 videos, two per pattern class")
    ap.add_argument(
        "--set",
        dest="which",
        choices=("held-out", "tuning"),
        default="held-out",
        help="held-out suite (seeds 10000-19999, report only) or tuning set (20000-20031)",
    )
    ap.add_argument("--cache", type=Path, default=None, help="simulated-video cache folder")
    ap.add_argument("--json", type=Path, help="write rows, videos and summary as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the markdown tables here")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="write the tables into BENCHMARKS.md and README.md and the headline into "
        f"{SUITE_RESULT_FILE} (full held-out suite only)",
    )
    ap.add_argument(
        "--docs-from",
        type=Path,
        metavar="JSON",
        help="run nothing: write the docs (as --write-docs) from an earlier run's --json file",
    )
    args = ap.parse_args(argv)
    if args.docs_from is not None:
        for p in write_docs(report_from_json(args.docs_from)):
            _log(f"accuracy: wrote {p}")
        return 0
    if args.write_docs and (args.quick or args.which != "held-out"):
        ap.error("--write-docs needs the full held-out suite (no --quick, no --set tuning)")
    specs = suite_specs(args.which)
    if args.quick:
        specs = quick_specs(specs)
    command = "python -m calseg.bench accuracy" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    machine = machine_info(os.environ)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = run_suite(specs, args.cache, log=lambda m: _log(f"accuracy: {m}"))
    wall = time.perf_counter() - t0
    report = {
        "command": command,
        "set": args.which,
        "quick": args.quick,
        "n_videos": len(specs),
        "seeds": f"{specs[0].seed}-{specs[-1].seed}" if len(specs) > 1 else str(specs[0].seed),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine,
        "wall_s": wall,
        "load_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        **res,
    }
    md = markdown_tables(res["summary"])
    head = (
        f"{command}\ncommit {machine['git_commit']}, {len(specs)} videos ({args.which}), "
        f"wall {wall:.0f} s (simulate/load {res['simulate_s']:.0f} s, segment "
        f"{res['segment_s']:.0f} s), load 1 min {report['load_1min_before_after']}, "
        f"{machine['cores_usable']} cores\n"
    )
    print(head)
    print(headline(res["summary"]))
    print()
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(head + "\n" + headline(res["summary"]) + "\n\n" + md)
    if args.write_docs:
        for p in write_docs(report):
            _log(f"accuracy: wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
