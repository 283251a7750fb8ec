"""CalSeg benchmarks: ``python -m calseg.bench [--quick] [--only SECTION] [--json out.json]``.

Sections (issue 3 item 9, issue 4 item 7), each timed with :func:`time.perf_counter`:

* ``sim``: the calcium model integrator (:func:`calseg.simulate.model.integrate` /
  :func:`~calseg.simulate.model.integrate_batch`) on one large pouch (about 3,255 cells,
  DESIGN.md section 2) and on a batch of 16 such pouches, 3,600 s of model time, published
  forward Euler at dt = 0.2 s and the semi-implicit ``"imex"`` scheme at dt = 0.5 s.
  Unit: cell-steps per second (cells x integrator steps / wall s). Target: batch of 16 with
  forward Euler in under 60 s.
* ``render``: :func:`calseg.simulate.render.render_video` with ``defect_severity = 1.0``
  (every default defect family present, checked) at 512 x 512 and 1024 x 1024, integration
  excluded, then with the global intensity defects on too; the most expensive stages of the
  chain (thread ms per frame). Unit: frames per second. Target: >= 60 frames/s at 512 x 512.
  ``--compare-to REV`` adds this tree against git revision REV: ms per frame and peak RSS of
  the same 512 x 512 recording, fresh child processes alternating (:func:`render_versus`).
* ``dataset``: :func:`calseg.simulate.dataset.simulate_dataset` (TIFF images, label stacks,
  cell label images and calcium traces written) for the prototype's dataset size, 50 videos x
  180 frames at 1024 x 1024. ``simulate_dataset`` keeps every video of one call in memory
  (about 1.1 GB per such video), so the full size is built as consecutive datasets of
  :data:`DATASET_CHUNK` videos; ``--quick`` builds 2 videos and extrapolates linearly (marked
  "extrapolated"). Target: under 10 minutes.
* ``sam2``: SAM2 ``sam2.1_hiera_t`` with random weights on the CPU at image size 512: decoder
  training steps per second on cached image embeddings vs re-running the frozen image encoder
  every step (same batch of 8 point prompts on 8 frames, same process; expected >= 10x), and
  inference frames per second of :func:`calseg.segment.infer.segment_recording` on a
  simulated 512 x 512 recording: image mode on 180 frames (24 with ``--quick``), video mode
  (SAM2 propagation, :mod:`calseg.segment.video`) on the first 24 frames (8 with ``--quick``;
  it tracks every cell through every frame, so it is far slower on a CPU), with the peak RSS
  after each.
* ``metrics``: the scorer (:func:`bench_metrics`): IoU matrix of ~400 ROIs and instance
  matching per frame at 512 x 512 (what ``tests/test_metrics.py`` used to time, untimed).
* ``learning`` (issue 14 item 7, :func:`bench_learning`): does SAM2 learn, on held-out
  simulated videos of a seed no model was trained or tuned on: prompted IoU of the disc prior
  and of a decoder trained on the random frozen small encoder, held-out instance F1 of the
  small SAM2 shipped in ``calseg/segment/weights`` and of the classical method through the
  inference path, and training steps/s in decoder and full mode (small SAM2, 128 px).

When several sections run, each runs in its own child process (``sys.executable -m
calseg.bench --only SECTION``) so that its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Ratios are always measured side by
side inside one process. The 1-minute load average before and after each section is recorded:
on a shared machine, other processes make the numbers pessimistic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calseg.machine import machine_info

SECTIONS = ("sim", "render", "dataset", "sam2", "metrics", "learning")
LARGE_POUCH_CELLS = 3255  # DESIGN.md section 2: largest pouch of the source
DATASET_CHUNK = 5  # videos per simulate_dataset call in the full dataset build
FRAME_INTERVAL_S = 5.0  # SimulationConfig default
WARMUP_S = 300.0  # SimulationConfig default

TARGETS = {
    "sim_batch_euler_s": 60.0,  # issue 3 item 9: batch of 16 in under 60 s
    "render_fps_512": 60.0,  # issue 3 item 9: >= 60 frames/s at 512^2, all defects
    "dataset_s": 600.0,  # issue 3 item 9: 50 x 180 x 1024^2 in under 10 minutes
    "sam2_speedup": 10.0,  # issue 4 item 7: cached embeddings >= 10x faster (CPU)
}


class BenchError(ValueError):
    """Raised for impossible benchmark settings (e.g. an unknown section)."""


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def log_progress(prefix: str, every: float = 0.1):
    """A :data:`calseg.progress.ProgressFn` that logs to stderr when the stage changes or the
    fraction advanced by ``every`` (so long sections show where the time goes)."""
    last = {"stage": None, "fraction": -1.0}

    def report(fraction: float, stage: str, message: str | None = None) -> None:
        if stage != last["stage"] or fraction - last["fraction"] >= every or fraction >= 1.0:
            last.update(stage=stage, fraction=fraction)
            _log(f"{prefix}: {fraction:.0%} {stage}" + (f": {message}" if message else ""))

    return report


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux
        return None


def _row(
    section: str,
    name: str,
    value: float,
    unit: str,
    *,
    target: str | None = None,
    met: bool | None = None,
    why: str | None = None,
    extrapolated: bool = False,
) -> dict:
    """One line of the result table (JSON-able)."""
    return {
        "section": section,
        "name": name,
        "value": float(value),
        "unit": unit,
        "target": target,
        "met": met,
        "why": why,
        "extrapolated": extrapolated,
    }


def pouch_tissue(size: int, n_cells: int, seed: int = 0, irregularity: float = 0.3):
    """A square ``size`` x ``size`` image holding an oval pouch of about ``n_cells`` cells.

    The mean cell area is the pouch area divided by ``n_cells`` (:func:`make_tissue` then
    lands within a few cells of ``n_cells``; the actual count is ``tissue.n_cells``).
    """
    from calseg.simulate.geometry import make_tissue, tissue_mask

    area = float(tissue_mask(size, size, "pouch").sum())
    return make_tissue(
        size, size, area / n_cells, "pouch", np.random.default_rng(seed), irregularity=irregularity
    )


def _model_setups(n_cells: int, n: int, seed: int, pattern_class: str = "waves") -> list:
    from calseg.simulate.model import ModelParameters, setup_tissue

    params = ModelParameters()
    out = []
    for k in range(n):
        ss = np.random.SeedSequence([seed, k]).spawn(2)
        out.append(
            setup_tissue(
                n_cells,
                pattern_class,
                params,
                np.random.default_rng(ss[0]),
                np.random.default_rng(ss[1]),
            )
        )
    return out


def frame_calcium(tissue, n_src_frames: int, seed: int = 0) -> np.ndarray:
    """Cytosolic Ca2+ ``(N, n_src_frames)`` float32 (uM) of a "waves" tissue, sampled every
    :data:`FRAME_INTERVAL_S` s after a :data:`WARMUP_S` s warm-up (semi-implicit integrator,
    dt 0.5 s): realistic input for the renderer."""
    from calseg.simulate.model import integrate

    setup = _model_setups(tissue.n_cells, 1, seed)[0]
    times = WARMUP_S + np.arange(n_src_frames) * FRAME_INTERVAL_S
    return integrate(tissue.laplacian, setup.vplc, setup.state0, times, dt=0.5, method="imex")["c"]


# --------------------------------------------------------------------------------------------
# sections


def bench_sim(
    n_cells: int = LARGE_POUCH_CELLS,
    size: int = 1024,
    n_batch: int = 16,
    t_end_s: float = 3600.0,
    t_target_s: float = 3600.0,
    seed: int = 0,
) -> dict:
    """Integrator speed: one pouch and a batch of ``n_batch`` pouches, Euler and IMEX.

    Args:
        n_cells: cells per pouch (default 3,255, the source's large pouch).
        size: image side (px) the pouch is rasterised on (geometry only; no rendering).
        n_batch: tissues integrated together (block-diagonal Laplacian).
        t_end_s: model time integrated (s); frames sampled every 5 s.
        t_target_s: model time the targets refer to (3,600 s); when ``t_end_s`` is shorter the
            wall time for ``t_target_s`` is extrapolated linearly and marked so.
        seed: random seed (geometry, Vplc, initial state).

    Returns:
        ``{"rows": [...], "details": {...}}``; rates in cell-steps per second.
    """
    from calseg.simulate.model import integrate, integrate_batch

    t0 = time.perf_counter()
    tissue = pouch_tissue(size, n_cells, seed)
    n = tissue.n_cells
    setups = _model_setups(n, n_batch, seed)
    times = np.arange(0.0, t_end_s + 1e-9, FRAME_INTERVAL_S)
    geometry_s = time.perf_counter() - t0
    scale = t_target_s / t_end_s
    rows, details = [], {"n_cells": n, "n_batch": n_batch, "t_end_s": t_end_s}
    details["geometry_s"] = round(geometry_s, 3)
    for method, dt in (("euler", 0.2), ("imex", 0.5)):
        n_steps = int(round(times[-1] / dt))
        _log(f"sim: one pouch ({n} cells), {method} dt {dt} s, {t_end_s:g} s")
        t = time.perf_counter()
        c1 = integrate(
            tissue.laplacian, setups[0].vplc, setups[0].state0, times, dt=dt, method=method
        )["c"]
        one_s = time.perf_counter() - t
        _log(f"sim: batch of {n_batch} pouches, {method}")
        t = time.perf_counter()
        cb = integrate_batch([tissue.laplacian] * n_batch, setups, times, dt=dt, method=method)
        batch_s = time.perf_counter() - t
        peak = float(max(float(c.max()) for c in cb))
        if not (np.isfinite(c1).all() and all(np.isfinite(c).all() for c in cb)):
            raise BenchError(f"{method} integration produced non-finite calcium")
        details[method] = {
            "dt_s": dt,
            "steps": n_steps,
            "one_wall_s": one_s,
            "batch_wall_s": batch_s,
            "peak_c_uM": peak,
        }
        label = "forward Euler dt 0.2 s" if method == "euler" else "IMEX dt 0.5 s"
        rows.append(
            _row("sim", f"1 pouch, {label}", n * n_steps / one_s, "cell-steps/s"),
        )
        rows.append(
            _row(
                "sim",
                f"{n_batch} pouches, {label}",
                n_batch * n * n_steps / batch_s,
                "cell-steps/s",
            )
        )
        if method == "euler":
            rows.append(
                _row(
                    "sim",
                    f"1 pouch, {label}, {t_target_s:g} s",
                    one_s * scale,
                    "s",
                    extrapolated=scale != 1.0,
                )
            )
        wall = batch_s * scale
        # the target is defined for 16 large pouches, 3,600 s, published Euler
        is_target = (
            method == "euler"
            and n_batch == 16
            and abs(n - LARGE_POUCH_CELLS) <= 0.02 * LARGE_POUCH_CELLS
            and t_target_s == 3600.0
        )
        target = TARGETS["sim_batch_euler_s"]
        rows.append(
            _row(
                "sim",
                f"{n_batch} pouches, {label}, {t_target_s:g} s",
                wall,
                "s",
                target=f"< {target:g} s" if is_target else None,
                met=(wall < target) if is_target else None,
                why=None if (not is_target or wall < target) else f"{wall / target:.1f}x too slow",
                extrapolated=scale != 1.0,
            )
        )
    ratio = details["euler"]["batch_wall_s"] / details["imex"]["batch_wall_s"]
    rows.append(
        _row("sim", f"IMEX speed-up over Euler ({n_batch} pouches, same model time)", ratio, "x")
    )
    return {"rows": rows, "details": details}


def bench_render(
    sizes: tuple[int, ...] = (512, 1024),
    n_frames: int = 180,
    mean_cell_area_512: float = 100.0,
    seed: int = 0,
    top_stages: int = 3,
    compare_to: str | None = None,
    compare_size: int = 512,
    compare_frames: int = 60,
    compare_repeats: int = 3,
) -> dict:
    """Rendering speed with every default defect family present (``defect_severity = 1.0``),
    then again with the global intensity defects (:data:`~calseg.simulate.render.
    INTENSITY_DEFECTS`, off by default) switched on too; optionally against another revision.

    Args:
        sizes: frame sides (px). Side 1024 uses the large pouch (3,255 cells); smaller sides a
            pouch with ``mean_cell_area_512`` px per cell (SimulationConfig default 100 px).
        n_frames: frames rendered per size and run.
        mean_cell_area_512: mean cell area (px) below side 1024.
        seed: random seed.
        top_stages: per size, rows for this many most expensive per-frame stages (ms of thread
            time per frame, summed over the rendering threads, so with 2 threads the stages
            add up to about twice the wall time per frame); all stages are in ``details``.
        compare_to: a git revision (e.g. the commit before a renderer change): its ``calseg``
            package and this working tree's render the same recording (``compare_size``,
            ``compare_frames``, all default defects) in fresh child processes, alternating
            ``compare_repeats`` times (:func:`render_versus`).

    Returns:
        ``{"rows": [...], "details": {...}}``; rates in frames per second (integration and
        geometry not included).
    """
    from calseg.simulate.geometry import tissue_mask
    from calseg.simulate.render import DEFAULT_DEFECTS, INTENSITY_DEFECTS, render_video

    rows, details = [], {}
    for size in sizes:
        if size >= 1024:
            n_cells = LARGE_POUCH_CELLS
        else:
            n_cells = max(
                50, int(round(tissue_mask(size, size, "pouch").sum() / mean_cell_area_512))
            )
        tissue = pouch_tissue(size, n_cells, seed)
        n_src = n_frames + n_frames // 8 + 2  # as the dataset: room for dropped frames
        cal = frame_calcium(tissue, n_src, seed)
        runs = {"default": None, "intensity": {k: {"enabled": True} for k in INTENSITY_DEFECTS}}
        for run, defects in runs.items():
            expected = DEFAULT_DEFECTS + (INTENSITY_DEFECTS if defects else ())
            _log(
                f"render: {n_frames} frames at {size}x{size} ({tissue.n_cells} cells), "
                f"{len(expected)} defects"
            )
            stage_s: dict[str, float] = {}
            t = time.perf_counter()
            image, labels, _, meta = render_video(
                tissue,
                cal,
                np.random.default_rng(seed + 1),
                FRAME_INTERVAL_S,
                n_frames,
                defect_severity=1.0,
                defects=defects,
                stage_seconds=stage_s,
            )
            wall = time.perf_counter() - t
            absent = [k for k in expected if meta["defects"][k]["severity"] <= 0]
            if absent:
                raise BenchError(f"defects absent at defect_severity 1.0: {absent}")
            if image.shape != (n_frames, size, size) or labels.shape != image.shape:
                raise BenchError(f"render returned {image.shape} / {labels.shape}")
            fps = n_frames / wall
            stage_ms = {k: 1000 * v / n_frames for k, v in stage_s.items()}
            details[f"{size}" if run == "default" else f"{size}_intensity"] = {
                "n_cells": tissue.n_cells,
                "n_frames": n_frames,
                "wall_s": wall,
                "ms_per_frame": 1000 * wall / n_frames,
                "defects_present": len(expected),
                "active_label_fraction": float((labels > 0).mean()),
                "stage_thread_ms_per_frame": stage_ms,
            }
            is_target = size == 512 and run == "default"
            tgt = TARGETS["render_fps_512"]
            what = (
                f"all {len(expected)} default defects"
                if run == "default"
                else f"+ the {len(INTENSITY_DEFECTS)} intensity defects"
            )
            rows.append(
                _row(
                    "render",
                    f"{size}x{size}, {what} ({n_frames} frames)",
                    fps,
                    "frames/s",
                    target=f">= {tgt:g} frames/s" if is_target else None,
                    met=(fps >= tgt) if is_target else None,
                    why=None if (not is_target or fps >= tgt) else f"{tgt / fps:.1f}x too slow",
                )
            )
            if run == "default":
                for name, ms in sorted(stage_ms.items(), key=lambda kv: -kv[1])[:top_stages]:
                    rows.append(
                        _row("render", f"{size}x{size} stage {name} (thread time)", ms, "ms/frame")
                    )
            del image, labels
    if compare_to:
        versus = render_versus(compare_to, compare_size, compare_frames, compare_repeats, seed=seed)
        rows += versus["rows"]
        details["versus"] = versus["details"]
    return {"rows": rows, "details": details}


_RENDER_CHILD = """
import json, resource, sys, time
import numpy as np
from calseg.bench import LARGE_POUCH_CELLS, frame_calcium, pouch_tissue
from calseg.simulate.geometry import tissue_mask
from calseg.simulate.render import render_video
size, n_frames, seed = (int(a) for a in sys.argv[1:4])
area = tissue_mask(size, size, "pouch").sum()
n_cells = LARGE_POUCH_CELLS if size >= 1024 else max(50, int(round(area / 100)))
tissue = pouch_tissue(size, n_cells, seed)
cal = frame_calcium(tissue, n_frames + n_frames // 8 + 2, seed)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def peak_rss_mib():
    # VmHWM: this process's own peak (ru_maxrss is carried over from the parent across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rss0 = peak_rss_mib()
t, c = time.perf_counter(), cpu()
render_video(tissue, cal, np.random.default_rng(seed + 1), 5.0, n_frames, defect_severity=1.0)
wall, cpu_s = time.perf_counter() - t, cpu() - c
rss = peak_rss_mib()
print(json.dumps({"ms_per_frame": 1000 * wall / n_frames,
                  "cpu_ms_per_frame": 1000 * cpu_s / n_frames,
                  "peak_rss_mib": rss, "rss_before_render_mib": rss0}))
"""


def _render_in_tree(tree: Path, size: int, n_frames: int, seed: int) -> dict:
    """Render once with the ``calseg`` package under ``tree`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", _RENDER_CHILD, str(size), str(n_frames), str(seed)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"rendering with {tree} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_versus(
    rev: str, size: int = 512, n_frames: int = 60, repeats: int = 3, seed: int = 0
) -> dict:
    """Render time per frame and peak memory of this working tree against git revision ``rev``.

    ``git archive rev calseg`` is unpacked into a temporary folder; each round renders the same
    recording (a ``size`` x ``size`` pouch, ``n_frames`` frames, ``defect_severity = 1.0``)
    once with that package and once with this tree's, each in a fresh interpreter (so each has
    its own peak RSS), alternating for ``repeats`` rounds so that both see the same machine load.
    Reported: the best ms per frame of each, wall and CPU (user + system of all threads: less
    sensitive to other processes on a shared machine), their ratios (best of ``rev`` / best of
    this tree; > 1 means this tree is faster), and the larger peak RSS of each; every run and
    the medians are in ``details``.
    """
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="calseg-versus-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", rev, "calseg"],
            capture_output=True,
        )
        if archive.returncode != 0:
            raise BenchError(f"git archive {rev} failed: {archive.stderr.decode().strip()}")
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        trees = {rev: Path(tmp), "this tree": root}
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for i in range(repeats):
            for name, tree in trees.items():
                _log(f"render versus {rev}: round {i + 1}/{repeats}, {name}")
                runs[name].append(_render_in_tree(tree, size, n_frames, seed))
    ms = {k: [r["ms_per_frame"] for r in v] for k, v in runs.items()}
    cpu_ms = {k: [r["cpu_ms_per_frame"] for r in v] for k, v in runs.items()}
    rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    best = {k: min(v) for k, v in ms.items()}
    best_cpu = {k: min(v) for k, v in cpu_ms.items()}
    rows = []
    for name in trees:
        what = f"{size}x{size} vs {rev}: {name}, best of {repeats}"
        rows.append(_row("render", f"{what} (wall)", best[name], "ms/frame"))
        rows.append(_row("render", f"{what} (CPU, all threads)", best_cpu[name], "ms/frame"))
    for label, b in (("wall", best), ("CPU", best_cpu)):
        rows.append(
            _row(
                "render",
                f"{size}x{size}: {rev} / this tree, {label} time",
                b[rev] / b["this tree"],
                "x",
            )
        )
    rows.append(
        _row(
            "render", f"{size}x{size} peak RSS: this tree / {rev}", rss["this tree"] / rss[rev], "x"
        )
    )
    details = {
        "rev": rev,
        "size": size,
        "n_frames": n_frames,
        "ms_per_frame": ms,
        "cpu_ms_per_frame": cpu_ms,
        "median_ms_per_frame": {k: float(np.median(v)) for k, v in ms.items()},
        "peak_rss_mib": rss,
    }
    return {"rows": rows, "details": details}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_dataset(
    n_videos: int = 50,
    n_frames: int = 180,
    size: int = 1024,
    n_cells: int = LARGE_POUCH_CELLS,
    measured_videos: int | None = None,
    chunk: int = DATASET_CHUNK,
    work_dir: Path | None = None,
    seed: int = 0,
) -> dict:
    """Wall time to build ``n_videos`` x ``n_frames`` videos at ``size`` x ``size`` on disk.

    Args:
        n_videos: videos of the dataset the target refers to (prototype: 50).
        n_frames: frames per video (prototype: 180).
        size: frame side (px) (prototype: 1024).
        n_cells: cells per pouch (mean cell area = pouch area / n_cells).
        measured_videos: videos actually built (``None`` = all ``n_videos``); fewer gives a
            linear extrapolation to ``n_videos``, marked "extrapolated".
        chunk: videos per :func:`simulate_dataset` call (it keeps a call's videos in memory).
        work_dir: where to write (a temporary folder inside it, deleted afterwards).
        seed: master seed of the first chunk (chunk k uses seed + k).

    Returns:
        ``{"rows": [...], "details": {...}}``. Other settings are SimulationConfig defaults
        (defect_severity 0.3, 3,600 s model time with forward Euler at dt 0.2 s, 5 s frames).
    """
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset
    from calseg.simulate.geometry import tissue_mask

    measured = n_videos if measured_videos is None else int(measured_videos)
    if not 2 <= measured <= n_videos:
        raise BenchError(f"measured_videos must be in 2..{n_videos}, got {measured}")
    chunk = max(2, int(chunk))
    area = float(tissue_mask(size, size, "pouch").sum()) / n_cells
    root = Path(tempfile.mkdtemp(prefix="calseg-bench-dataset-", dir=work_dir))
    sizes: list[int] = []
    remaining = measured
    k = 0
    total_bytes = 0
    try:
        t0 = time.perf_counter()
        while remaining > 0:
            nv = chunk if remaining - chunk >= 2 or remaining == chunk else remaining
            nv = min(nv, remaining)
            cfg = SimulationConfig(
                n_videos=nv,
                n_frames=n_frames,
                height=size,
                width=size,
                pattern_classes=["spikes", "transients", "waves", "fluttering"],
                mean_cell_area_px=area,
                n_val_videos=0,
                n_test_videos=1,
                seed=seed + k,
            )
            _log(f"dataset: part {k}: {nv} videos x {n_frames} frames at {size}x{size}")
            simulate_dataset(cfg, root / f"part{k:02d}")
            total_bytes = _dir_bytes(root)
            sizes.append(nv)
            remaining -= nv
            k += 1
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_video = wall / measured
    projected = per_video * n_videos
    extrap = measured < n_videos
    tgt = TARGETS["dataset_s"]
    is_target = (n_videos, n_frames, size) == (50, 180, 1024)  # the prototype's dataset
    name = f"{n_videos} videos x {n_frames} frames at {size}x{size}, written"
    if extrap:
        name += f" (extrapolated from {measured} videos)"
    rows = [
        _row("dataset", f"build time per video ({n_frames} frames, {size}x{size})", per_video, "s"),
        _row(
            "dataset", "frames built and written per second", measured * n_frames / wall, "frames/s"
        ),
        _row(
            "dataset",
            name,
            projected,
            "s",
            target=f"< {tgt:g} s" if is_target else None,
            met=(projected < tgt) if is_target else None,
            why=None if (not is_target or projected < tgt) else f"{projected / tgt:.1f}x too slow",
            extrapolated=extrap,
        ),
    ]
    details = {
        "videos_built": measured,
        "videos_target": n_videos,
        "calls": sizes,
        "wall_s": wall,
        "bytes_written": total_bytes,
        "mean_cell_area_px": area,
    }
    return {"rows": rows, "details": details}


def _training_batch(labels: np.ndarray, n: int, rng: np.random.Generator):
    """Pick ``n`` frames with the most active cells and one positive point per frame at the
    deepest pixel of a random active cell: ``(frame idx (n,), points [(x, y)], cell ids)``."""
    from scipy import ndimage as ndi

    counts = np.array([len(np.unique(f)) - 1 for f in labels])
    idx = np.sort(np.argsort(-counts, kind="stable")[:n])
    pts, ids = [], []
    for f in idx:
        lab = labels[f]
        cells = np.unique(lab)
        cells = cells[cells > 0]
        if cells.size == 0:  # background prompt, empty target
            pts.append((lab.shape[1] / 2, lab.shape[0] / 2))
            ids.append(0)
            continue
        cid = int(rng.choice(cells))
        dist = ndi.distance_transform_edt(lab == cid)
        r, c = np.unravel_index(int(np.argmax(dist)), lab.shape)
        pts.append((float(c), float(r)))
        ids.append(cid)
    return idx, pts, ids


def bench_sam2(
    image_size: int = 512,
    recording_size: int = 512,
    n_infer_frames: int = 180,
    n_video_frames: int = 24,
    video_window_frames: int = 64,
    batch_size: int = 8,
    cached_steps: int = 10,
    encoder_steps: int = 3,
    warmup_steps: int = 1,
    torch_threads: int | None = None,
    seed: int = 0,
) -> dict:
    """SAM2 tiny (random weights, CPU): training steps/s with cached vs per-step embeddings,
    and image-mode inference frames/s on a simulated recording.

    Args:
        image_size: SAM2 input side (px, multiple of 32).
        recording_size: side (px) of the simulated recording (mean cell area 100 px).
        n_infer_frames: frames of the recording (image-mode inference is timed on all of them).
        n_video_frames: first frames segmented in video mode (SAM2 propagation).
        video_window_frames: video mode's window (frames per predictor state).
        batch_size: point prompts per training step, one per frame (so the per-step mode
            re-encodes ``batch_size`` frames, as the fine-tuning sampler draws prompts across
            frames).
        cached_steps, encoder_steps: timed steps of each mode.
        warmup_steps: untimed steps of each mode before timing (first-call overheads).
        torch_threads: torch intra-op threads for this section (``None``: what
            :func:`calseg.segment.model.load_sam2` sets, all usable cores); restored afterwards.
        seed: random seed.

    Returns:
        ``{"rows": [...], "details": {...}}``.
    """
    import torch

    from calseg.segment.model import load_sam2
    from calseg.simulate.geometry import tissue_mask
    from calseg.simulate.render import render_video

    rng = np.random.default_rng(seed)
    n_cells = max(50, int(round(tissue_mask(recording_size, recording_size, "pouch").sum() / 100)))
    tissue = pouch_tissue(recording_size, n_cells, seed)
    n_frames = max(n_infer_frames, batch_size)
    cal = frame_calcium(tissue, n_frames + n_frames // 8 + 2, seed)
    image, labels, _, _ = render_video(
        tissue, cal, np.random.default_rng(seed + 1), FRAME_INTERVAL_S, n_frames
    )
    _log(f"sam2: loading sam2.1_hiera_t at {image_size} (random weights, CPU)")
    t = time.perf_counter()
    loaded = load_sam2("sam2.1_hiera_t", None, image_size=image_size, device="cpu")
    load_s = time.perf_counter() - t
    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    try:
        return _sam2_timings(
            loaded,
            load_s,
            image,
            labels,
            image_size,
            recording_size,
            n_infer_frames,
            n_video_frames,
            video_window_frames,
            batch_size,
            cached_steps,
            encoder_steps,
            warmup_steps,
            rng,
        )
    finally:
        torch.set_num_threads(threads_before)


def _sam2_timings(
    loaded,
    load_s: float,
    image: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    recording_size: int,
    n_infer_frames: int,
    n_video_frames: int,
    video_window_frames: int,
    batch_size: int,
    cached_steps: int,
    encoder_steps: int,
    warmup_steps: int,
    rng: np.random.Generator,
) -> dict:
    """The timed part of :func:`bench_sam2` (model loaded, recording simulated)."""
    import torch
    import torch.nn.functional as F

    from calseg.segment.embeddings import (
        FrameGeometry,
        compute_normalisation,
        encode_frames,
        frames_to_model,
        labels_to_model,
        normalise_frames,
    )
    from calseg.segment.infer import InferenceConfig, segment_recording
    from calseg.segment.model import run_decoder, trainable_parameter_names
    from calseg.segment.prompts import pack_points

    model = loaded.model
    rows, details = (
        [],
        {
            "model": loaded.info.to_dict(),
            "load_s": load_s,
            "recording": [int(x) for x in image.shape],
            "torch_threads": torch.get_num_threads(),
        },
    )

    # --- inference first (before the decoder is touched by training) -------------------------
    _log(f"sam2: inference on {n_infer_frames} frames of {recording_size}x{recording_size}")
    t = time.perf_counter()
    res = segment_recording(
        image[:n_infer_frames],
        InferenceConfig(image_size=image_size, device="cpu"),
        model=loaded,
        progress=log_progress("sam2 inference"),
    )
    infer_s = time.perf_counter() - t
    if res.labels.shape != image[:n_infer_frames].shape:
        raise BenchError(f"segment_recording returned {res.labels.shape}")
    details["inference"] = {
        "wall_s": infer_s,
        "timings": res.timings,
        "n_prompts": len(res.prompts),
    }
    rows.append(
        _row(
            "sam2",
            f"inference, image mode, {n_infer_frames} frames {recording_size}x{recording_size}",
            n_infer_frames / infer_s,
            "frames/s",
        )
    )
    n_emb = res.timings.get("frames_embedded", 0)
    n_prompts = len(res.prompts)
    rows.append(
        _row("sam2", "  automatic prompts per frame (mean)", n_prompts / n_infer_frames, "prompts")
    )
    if n_prompts and res.timings.get("decode_s"):
        rows.append(
            _row(
                "sam2", "  of which decoder alone", n_prompts / res.timings["decode_s"], "prompts/s"
            )
        )
    if n_emb and res.timings.get("embed_s"):
        rows.append(
            _row(
                "sam2", "  of which image encoder alone", n_emb / res.timings["embed_s"], "frames/s"
            )
        )

    rows.append(_row("sam2", "  peak RSS after image-mode inference", _peak_rss_mib(), "MiB"))

    # --- video mode (SAM2 propagation) on the first frames -----------------------------------
    nv = min(n_video_frames, image.shape[0])
    _log(f"sam2: video-mode inference on {nv} frames of {recording_size}x{recording_size}")
    t = time.perf_counter()
    resv = segment_recording(
        image[:nv],
        InferenceConfig(
            image_size=image_size,
            device="cpu",
            mode="video",
            video_window_frames=video_window_frames,
        ),
        model=loaded,
        progress=log_progress("sam2 video"),
    )
    video_s = time.perf_counter() - t
    if resv.labels.shape != image[:nv].shape:
        raise BenchError(f"video mode returned {resv.labels.shape}")
    vstats = resv.timings.get("video", {})
    details["video_inference"] = {"wall_s": video_s, "frames": nv, "stats": vstats}
    rows.append(
        _row(
            "sam2",
            f"inference, video mode, {nv} frames {recording_size}x{recording_size}",
            nv / video_s,
            "frames/s",
        )
    )
    if vstats.get("object_frames"):
        rows.append(
            _row(
                "sam2",
                f"  tracked cells x frames ({vstats['n_objects']} cells)",
                vstats["object_frames"] / video_s,
                "cell-frames/s",
            )
        )
    rows.append(_row("sam2", "  peak RSS after video-mode inference", _peak_rss_mib(), "MiB"))

    # --- training: cached embeddings vs encoder every step ------------------------------------
    frame_idx, pts, ids = _training_batch(labels, batch_size, rng)
    norm = compute_normalisation(image)
    geom = FrameGeometry(image.shape[1], image.shape[2], image_size)
    x = frames_to_model(normalise_frames(image[frame_idx], norm), geom)  # (B, 1, S, S)
    coords, plabels = pack_points(pts, [[] for _ in pts])
    coords_t = torch.from_numpy(geom.to_model_points(coords))
    plabels_t = torch.from_numpy(plabels)
    lab_m = labels_to_model(labels[frame_idx], geom)
    target = np.stack([(lab_m[k] == cid) & (cid > 0) for k, cid in enumerate(ids)])
    target_t = torch.from_numpy(target[:, None].astype(np.float32))
    names = set(trainable_parameter_names(model))
    params = [p for n, p in model.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.sam_prompt_encoder.train()
    model.sam_mask_decoder.train()

    def step(emb, s0, s1) -> float:
        low, iou, _obj = run_decoder(model, emb, [s0, s1], coords_t, plabels_t)
        logits = low.float()
        tt = F.adaptive_avg_pool2d(target_t, low.shape[-2:]).expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, tt, reduction="none").flatten(2).mean(-1)
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * tt).flatten(2).sum(-1) + 1) / (
            prob.flatten(2).sum(-1) + tt.flatten(2).sum(-1) + 1
        )
        per = 20 * bce + dice
        best = per.argmin(1)
        ar = torch.arange(len(best))
        with torch.no_grad():
            hard, tb = logits > 0, tt >= 0.5
            inter = (hard & tb).flatten(2).sum(-1).float()
            union = (hard | tb).flatten(2).sum(-1).float()
            true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        loss = per[ar, best].mean() + F.mse_loss(iou.float(), true_iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    def timed(n: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
        for _ in range(warmup_steps):  # untimed
            fn()
        losses = []
        t = time.perf_counter()
        for _ in range(n):
            losses.append(fn())
        return (time.perf_counter() - t) / n, losses

    try:
        _log(f"sam2: embedding the {len(frame_idx)} training frames once")
        t = time.perf_counter()
        fe = encode_frames(loaded, x, batch_size=4)
        embed_once_s = time.perf_counter() - t
        emb, (s0, s1) = fe.get(list(range(len(frame_idx))))

        def cached_step() -> float:
            return step(emb, s0, s1)

        def encoder_step() -> float:
            fe2 = encode_frames(loaded, x, batch_size=4)
            e2, (a0, a1) = fe2.get(list(range(len(frame_idx))))
            return step(e2, a0, a1)

        _log(f"sam2: {cached_steps} training steps on cached embeddings")
        cached_s, cached_losses = timed(cached_steps, cached_step)
        _log(f"sam2: {encoder_steps} training steps re-running the image encoder each step")
        enc_s, enc_losses = timed(encoder_steps, encoder_step)
    finally:
        for p in params:
            p.requires_grad_(False)
        model.eval()
    losses = cached_losses + enc_losses
    if not all(math.isfinite(v) for v in losses):
        raise BenchError(f"non-finite training loss in the benchmark: {losses}")
    speedup = enc_s / cached_s
    tgt = TARGETS["sam2_speedup"]
    is_target = image_size == 512 and batch_size == 8  # issue 4 item 7 / DESIGN.md section 6
    details["training"] = {
        "batch_prompts": len(frame_idx),
        "frames_per_step": len(frame_idx),
        "embed_once_s": embed_once_s,
        "cached_s_per_step": cached_s,
        "encoder_s_per_step": enc_s,
        "cached_steps": cached_steps,
        "encoder_steps": encoder_steps,
        "losses": losses,
    }
    b = len(frame_idx)
    rows += [
        _row("sam2", f"train step, cached embeddings ({b} prompts)", 1 / cached_s, "steps/s"),
        _row(
            "sam2",
            f"train step, encoder every step ({b} prompts on {b} frames)",
            1 / enc_s,
            "steps/s",
        ),
        _row(
            "sam2",
            "speed-up of cached embeddings",
            speedup,
            "x",
            target=f">= {tgt:g}x" if is_target else None,
            met=(speedup >= tgt) if is_target else None,
            why=None if (not is_target or speedup >= tgt) else f"only {speedup:.1f}x",
        ),
        _row("sam2", f"embedding once ({b} frames)", embed_once_s, "s"),
    ]
    return {"rows": rows, "details": details}


# --------------------------------------------------------------------------------------------
# metrics


def bench_metrics(size: int = 512, n_cells: int = 400, n_frames: int = 180) -> dict:
    """Scoring cost (:mod:`calseg.analysis.metrics`): the IoU matrix of ``n_cells`` x
    ``n_cells`` ROIs on a ``size`` x ``size`` label image, and instance matching of a
    ``(n_frames, size, size)`` label stack against a shifted copy of itself (every ROI
    overlaps a few others). Unit: ms per frame (no target: it is a share of ``evaluate``)."""
    from calseg.analysis.metrics import instance_iou_matrix, match_instances_stack

    rng = np.random.default_rng(0)
    gt = rng.integers(0, n_cells + 1, size=(size, size)).astype(np.uint32)
    gt = np.repeat(np.repeat(gt[: size // 8, : size // 8], 8, 0), 8, 1)  # 8 px blocks
    t = time.perf_counter()
    iou, _, _ = instance_iou_matrix(np.roll(gt, 3, axis=1), gt)
    iou_ms = 1000 * (time.perf_counter() - t)
    stack = np.broadcast_to(gt, (n_frames, size, size))
    t = time.perf_counter()
    m = match_instances_stack(np.roll(stack, 3, axis=2), stack, 0.5)
    per_frame_ms = 1000 * (time.perf_counter() - t) / n_frames
    rows = [
        _row("metrics", f"IoU matrix {iou.shape[0]}x{iou.shape[1]} ROIs, {size}^2", iou_ms, "ms"),
        _row(
            "metrics",
            f"instance matching, {n_frames} frames of {size}^2",
            per_frame_ms,
            "ms/frame",
        ),
    ]
    return {"rows": rows, "details": {"tp": m["tp"], "n_rois": int(iou.shape[1])}}


# --------------------------------------------------------------------------------------------
# learning (issue 14 item 7)


def _train_rate(history: list[dict]) -> float:
    """Optimiser steps per second of a training history: 1 / the median time between
    consecutive train entries (so the validations in between and set-up do not count)."""
    t = np.array([h["time_s"] for h in history if h.get("kind") == "train"], dtype=float)
    if len(t) < 2:
        return float("nan")
    dt = float(np.median(np.diff(t)))
    return 1.0 / dt if dt > 0 else float("nan")


def bench_learning(
    size: int = 128,
    n_train: int = 6,
    n_val: int = 2,
    n_test: int = 5,
    n_frames: int = 48,
    decoder_steps: int = 1500,
    full_steps: int = 20,
    data_seed: int = 1500,
    checkpoint: Path | None = None,
) -> dict:
    """Held-out learning numbers (issue 14 item 7), on a simulated dataset of ``data_seed``
    (the shipped small SAM2 was trained on seed 1400; nothing is tuned on 1500).

    Rows (JSON ``name``): ``disc prior prompted IoU`` (disc of the training cells' mean
    radius at validate's prompt point, no image) and ``decoder prompted IoU`` (prompt encoder
    + mask decoder trained ``decoder_steps`` steps on the RANDOM frozen small encoder with
    :func:`calseg.segment.finetune.decoder_vs_disc_config`, the recipe shown to beat the disc
    on held-out videos), both from :func:`calseg.segment.finetune.heldout_prompted_iou` on the
    test videos (same prompts; the target is met when the paired bootstrap CI of the gain
    excludes 0 and the decoder also beats itself as initialised,
    :func:`calseg.segment.finetune.initial_model`); ``small SAM2 held-out F1`` and
    ``baseline held-out F1`` (instance F1 through
    :func:`calseg.segment.evaluate.evaluate_dataset`, the inference path, means over the test
    videos with 95 % CIs in ``why``), ``decoder steps/s`` and ``full steps/s`` (the small
    SAM2 on CPU; decoder mode at the recipe's 512 px, full mode with the shipped checkpoint's
    recipe, also 512 px, :func:`calseg.pipelines.pretrain.small_finetune_config`). The small
    SAM2 row's ``why`` also gives the F1 of its disc prior alone (no image, the same prompts),
    the part of its F1 that needs no learned weight.
    """
    from calseg.pipelines.pretrain import SMALL_NAMES, heldout_scores, small_finetune_config
    from calseg.segment.finetune import (
        decoder_vs_disc_config,
        finetune,
        heldout_prompted_iou,
        initial_model,
    )
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT, SMALL_CONFIG
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    sec = "learning"
    checkpoint = Path(checkpoint) if checkpoint else BUNDLED_SMALL_CHECKPOINT
    rows: list[dict] = []
    details: dict = {"data_seed": data_seed, "checkpoint": str(checkpoint)}
    with tempfile.TemporaryDirectory(prefix="calseg-bench-learning-") as tmp:
        root = Path(tmp)
        ds = root / "ds"
        simulate_dataset(
            SimulationConfig(
                n_videos=n_train + n_val + n_test,
                n_val_videos=n_val,
                n_test_videos=n_test,
                n_frames=n_frames,
                height=size,
                width=size,
                seed=data_seed,
            ),
            ds,
        )
        _log("learning: decoder on the random frozen small encoder")
        cfg = decoder_vs_disc_config(
            model=SMALL_CONFIG,
            steps=decoder_steps,
            val_every=max(1, decoder_steps // 4),
            frames_per_video=16,
            val_frames_per_video=8,
            resume=False,
        )
        res = finetune(ds, root / "decoder", cfg, cache_dir=root / "emb")
        details["decoder_val_history"] = [
            (h["step"], h["val_mean_iou"]) for h in res.history if h["kind"] == "val"
        ]
        table = heldout_prompted_iou(res.checkpoint, ds, cache_dir=root / "emb")
        details["decoder_vs_disc"] = table
        init = initial_model(ds, root / "decoder-init", cfg, cache_dir=root / "emb")
        init_iou = heldout_prompted_iou(init.checkpoint, ds, cache_dir=root / "emb")["decoder"]
        details["untrained_decoder_prompted_iou"] = init_iou
        dec_iou, disc_iou, gain_ci = table["decoder"], table["disc prior"], table["gain_ci95"]
        n_v = len(table["videos"])
        rows.append(
            _row(
                sec,
                "disc prior prompted IoU",
                disc_iou,
                "IoU",
                why=f"{n_v} held-out videos, {table['n_prompts']} prompts, radius "
                f"{table['radius_px']:.2f} px",
            )
        )
        ci_text = f"gain 95% CI [{gain_ci[0]:+.4f}, {gain_ci[1]:+.4f}], " if gain_ci else ""
        rows.append(
            _row(
                sec,
                "decoder prompted IoU",
                dec_iou,
                "IoU",
                target="> disc prior and > untrained",
                met=bool(gain_ci is not None and gain_ci[0] > 0 and dec_iou > init_iou),
                why=f"{ci_text}higher on {table['videos_improved']} of {n_v} videos; "
                f"untrained decoder {init_iou:.4f}; "
                f"{decoder_steps} steps (best {res.best_step}), random frozen small encoder "
                f"at {cfg.image_size} px, residual disc prior",
            )
        )
        rows.append(_row(sec, "decoder steps/s", _train_rate(res.history), "steps/s"))

        _log("learning: held-out F1 of the small SAM2 and the classical method")
        if checkpoint.is_file():
            scores = heldout_scores(ds, checkpoint, cache_dir=root / "emb", include_untuned=True)
            pm = scores["per_model"]
            details["heldout"] = pm
            small, base = pm[SMALL_NAMES["trained"]], pm[SMALL_NAMES["classical"]]
            untuned = pm[SMALL_NAMES["untuned"]]
            disc = pm.get(SMALL_NAMES["disc"])
            disc_text = f"; its disc prior alone {disc['f1']:.3f}" if disc else ""

            def ci(d: dict) -> str:
                c = d.get("f1_ci95")
                return f"95% CI [{c[0]:.2f}, {c[1]:.2f}], " if c else ""

            rows.append(
                _row(
                    sec,
                    "small SAM2 held-out F1",
                    small["f1"],
                    "F1",
                    target="> 0.3 and > untuned",
                    met=bool(small["f1"] > 0.3 and small["f1"] > untuned["f1"]),
                    why=f"{ci(small)}{small['n_videos']} videos; untuned (random) "
                    f"{untuned['f1']:.3f}{disc_text}; IoU {small['iou']:.3f}",
                )
            )
            rows.append(
                _row(
                    sec,
                    "baseline held-out F1",
                    base["f1"],
                    "F1",
                    why=f"classical; {ci(base)}{base['n_videos']} videos; IoU {base['iou']:.3f}",
                )
            )
        else:
            details["heldout"] = f"no checkpoint at {checkpoint}"

        _log("learning: full-mode steps/s")
        full_cfg = small_finetune_config(steps=full_steps).model_copy(
            update={"val_every": 10**6, "resume": False}
        )
        res_full = finetune(ds, root / "full", full_cfg)
        rows.append(
            _row(sec, "full steps/s", _train_rate(res_full.history), "steps/s", why="small SAM2")
        )
    return {"rows": rows, "details": details}


# --------------------------------------------------------------------------------------------
# orchestration


def section_kwargs(section: str, quick: bool) -> dict:
    """Benchmark sizes of each section for a full or a ``--quick`` run."""
    if section == "sim":
        return {"t_end_s": 360.0} if quick else {}
    if section == "render":
        return {"n_frames": 60, "compare_frames": 30} if quick else {}
    if section == "dataset":
        return {"measured_videos": 2} if quick else {}
    if section == "sam2":
        if quick:
            return {
                "n_infer_frames": 24,
                "n_video_frames": 8,
                "cached_steps": 5,
                "encoder_steps": 2,
            }
        return {}
    if section == "metrics":
        return {"n_frames": 24} if quick else {}
    if section == "learning":
        if quick:
            return {
                # the split, frames and steps of scripts/decoder_vs_disc.py, where the
                # decoder recipe was chosen (at 4 train / 1 val videos and 600 steps the run
                # kept step 0: validation on one video picked nothing)
                "n_train": 6,
                "n_val": 2,
                "n_test": 4,
                "n_frames": 32,
                "decoder_steps": 1500,
                "full_steps": 6,
            }
        return {}
    raise BenchError(f"unknown section {section!r}; choose one of {SECTIONS}")


_FUNCS: dict[str, Callable[..., dict]] = {
    "sim": bench_sim,
    "render": bench_render,
    "dataset": bench_dataset,
    "sam2": bench_sam2,
    "metrics": bench_metrics,
    "learning": bench_learning,
}


def run_section(section: str, quick: bool = False, **overrides) -> dict:
    """Run one section in this process; adds wall time, peak RSS and load averages."""
    if section not in _FUNCS:
        raise BenchError(f"unknown section {section!r}; choose one of {SECTIONS}")
    kwargs = {**section_kwargs(section, quick), **overrides}
    load_before = _load1()
    t = time.perf_counter()
    out = _FUNCS[section](**kwargs)
    out["wall_s"] = time.perf_counter() - t
    out["peak_rss_mib"] = _peak_rss_mib()
    out["load_1min_before"] = load_before
    out["load_1min_after"] = _load1()
    out["kwargs"] = kwargs
    return out


def _run_child(section: str, quick: bool, compare_to: str | None = None) -> dict:
    """Run one section in a fresh interpreter (its own peak RSS) and return its JSON."""
    with tempfile.TemporaryDirectory(prefix="calseg-bench-") as tmp:
        out = Path(tmp) / f"{section}.json"
        cmd = [sys.executable, "-m", "calseg.bench", "--only", section, "--json", str(out)]
        cmd += ["--quick"] if quick else []
        cmd += ["--compare-to", compare_to] if compare_to else []
        cmd += ["--no-table"]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"section {section} failed (exit code {proc.returncode})"}
        return json.loads(out.read_text())["sections"][section]


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e6:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if a < 1 else f"{v:.2f}"


def format_report(report: dict) -> str:
    """The machine description and a plain-text table of every row, with the status column
    ``met (why)`` / ``missed (why)`` / ``-`` (no target), rows marked ``*`` are extrapolated."""
    m = report["machine"]
    lines = [
        "CalSeg benchmark" + (" (--quick)" if report.get("quick") else ""),
        f"command: {report['command']}",
        f"machine: {m['cpu_model']}, {m['cores_usable']} usable of {m['logical_cores']} logical "
        f"cores, {m['ram_gib']} GiB RAM, {m['os']}",
        f"software: Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}, torch "
        f"{m['torch']} ({m['torch_threads']} threads), calseg {m['calseg']} "
        f"(git {m['git_commit']}); thread env {m['thread_env'] or 'unset'}",
        f"load average at start (1/5/15 min): {m['load_average_1_5_15']}",
        "",
    ]
    header = ("section", "measurement", "value", "unit", "target", "status")
    table = []
    for name, sec in report["sections"].items():
        if "error" in sec:
            table.append((name, sec["error"], "", "", "", "failed"))
            continue
        for r in sec["rows"]:
            status = "-"
            if r["met"] is True:  # its evidence too (CIs, references), as for a miss
                status = f"met ({r['why']})" if r.get("why") else "met"
            elif r["met"] is False:
                status = f"missed ({r['why']})"
            label = r["name"] + (" *" if r["extrapolated"] else "")
            table.append((name, label, _fmt(r["value"]), r["unit"], r["target"] or "", status))
        table.append(
            (
                name,
                "section wall time; peak RSS; load 1 min before/after",
                f"{sec['wall_s']:.1f} s",
                f"{sec['peak_rss_mib']:.0f} MiB",
                "",
                f"load {sec['load_1min_before']}/{sec['load_1min_after']}",
            )
        )
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i == 2 else '<'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt.format(*row) for row in table]
    if any(r.get("extrapolated") for s in report["sections"].values() for r in s.get("rows", [])):
        lines.append("* extrapolated linearly from the smaller measured run named in the row")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m calseg.bench``, ``calseg bench``);
    ``python -m calseg.bench service ...`` runs the service benchmarks
    (:mod:`calseg.bench_service`), ``python -m calseg.bench jobs ...`` how a worker runs a
    job (:mod:`calseg.bench_jobs`), ``python -m calseg.bench costs`` the job cost estimates
    against real jobs (:mod:`calseg.bench_costs`), ``accuracy`` (or ``--only accuracy``) the
    held-out accuracy suite (:mod:`calseg.bench_accuracy`), ``peers`` (or ``--only peers``)
    Suite2p and CalSeg side by side on it (:mod:`calseg.bench_peers`)."""
    args_in = argv if argv is not None else sys.argv[1:]
    if args_in[:1] == ["service"]:
        from calseg.bench_service import main as service_main

        return service_main(list(args_in[1:]))
    if args_in[:1] == ["jobs"]:
        from calseg.bench_jobs import main as jobs_main

        return jobs_main(list(args_in[1:]))
    if args_in[:1] == ["costs"]:
        from calseg.bench_costs import main as costs_main

        return costs_main(list(args_in[1:]))
    # held-out accuracy suite and Suite2p side by side (issue 17): `accuracy ...`, `peers ...`
    # or `--only accuracy|peers ...` (not in the default all-sections run)
    suite = args_in[:1] if args_in[:1] in (["accuracy"], ["peers"]) else None
    if suite is None and "--only" in args_in[:-1]:
        k = args_in.index("--only")
        if args_in[k + 1] in ("accuracy", "peers"):
            suite, args_in = [args_in[k + 1]], [args_in[k + 1], *args_in[:k], *args_in[k + 2 :]]
    if suite == ["accuracy"]:
        from calseg.bench_accuracy import main as accuracy_main

        return accuracy_main(list(args_in[1:]))
    if suite == ["peers"]:
        from calseg.bench_peers import main as peers_main

        return peers_main(list(args_in[1:]))
    ap = argparse.ArgumentParser(
        prog="python -m calseg.bench",
        description="Benchmark the CalSeg simulator, renderer, dataset build and SAM2 engine.",
        epilog="Also: `python -m calseg.bench accuracy ...` (or --only accuracy), the held-out "
        "accuracy suite; `python -m calseg.bench peers ...` (or --only peers), Suite2p side by "
        "side. Each has its own --help.",
    )
    ap.add_argument("--quick", action="store_true", help="smaller runs (dataset extrapolated)")
    ap.add_argument("--only", choices=SECTIONS, help="run one section (in this process)")
    ap.add_argument("--json", type=Path, help="also write the full results as JSON here")
    ap.add_argument(
        "--compare-to",
        metavar="REV",
        help="render section: also time this tree against git revision REV (render_versus)",
    )
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compare_to and args.only not in (None, "render"):
        ap.error("--compare-to applies to the render section")
    command = "python -m calseg.bench" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    machine = machine_info(os.environ)
    report = {"command": command, "quick": args.quick, "machine": machine, "sections": {}}
    t0 = time.perf_counter()
    extra = {"compare_to": args.compare_to} if args.compare_to else {}
    if args.only:
        kw = extra if args.only == "render" else {}
        report["sections"][args.only] = run_section(args.only, args.quick, **kw)
    else:
        for s in SECTIONS:
            _log(f"section {s} (child process)")
            report["sections"][s] = _run_child(
                s, args.quick, args.compare_to if s == "render" else None
            )
    report["total_wall_s"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if not args.no_table:
        print(format_report(report))
        print(f"total wall time: {report['total_wall_s']:.1f} s")
    failed = [s for s, v in report["sections"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
