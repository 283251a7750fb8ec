"""Suite2p and CalSeg side by side: ``python -m calseg.bench --only peers`` (issue 17 item 5).

Runs Suite2p (pinned: :data:`SUITE2P_VERSION`, the ``peers`` extra, ``pip install
'calseg[peers]'``) and CalSeg's default method on the same videos of the held-out accuracy
suite (:mod:`calseg.bench_accuracy`: seeds from 10000, never used to choose a default; the
tuning set is seeds 20000-20031), scores both with that suite's scorer
(:func:`calseg.bench_accuracy.score_video`, per cell footprint over the recording, the
convention of Suite2p users) and prints one table: precision, recall, F1 at IoU 0.5 and 0.3,
mean matched IoU, extra ROIs (unmatched predictions at 0.5), seconds per video. Not part of
``make test`` nor of the default ``python -m calseg.bench`` run; without Suite2p it prints how
to install it and exits 0.

Suite2p install: into its own virtual environment (Suite2p pulls cellpose, numba,
scikit-learn, matplotlib), e.g. ``python3.11 -m venv /tmp/peers-venv &&
/tmp/peers-venv/bin/pip install -e '.[peers]'``, then ``/tmp/peers-venv/bin/python -m
calseg.bench --only peers``.

**Suite2p settings** (:func:`suite2p_settings`; everything else is Suite2p's default):

* functional detection ``sparsery`` (Suite2p's default), no anatomical (cellpose) detection,
  so no model weights are fetched; Suite2p's built-in ROI classifier ships in the package;
* ``fs`` = 1 / frame interval (Hz); ``tau`` per indicator as Suite2p's documentation
  recommends (:data:`SUITE2P_TAU_S`: 0.7 s GCaMP6f, 1.0 s GCaMP6m, 1.25 s GCaMP6s);
* ``diameter`` = the equivalent-circle diameter 2 sqrt(A / pi) of the video's rendered mean
  cell area A (the true size, given to Suite2p; CalSeg gets nothing);
* registration on (rigid, and nonrigid where both sides exceed :data:`NONRIGID_MIN_SIDE_PX`:
  Suite2p's nonrigid step crashes at 128 px or less, "Input and output sizes should be greater
  than 0"); spike deconvolution off (neither method's segmentation uses it); CPU.
* input: Suite2p works on int16; uint16 frames are halved first, as Suite2p's own TIFF reader
  does (``suite2p.io.tiff``), uint8 kept as is.

**Pitfalls handled.**

* Suite2p's ROIs are in its *registered* frame; the simulated ground truth moves with the
  simulated drift and jitter. Suite2p is scored in its registered frame: every frame of the
  ground truth is moved there with Suite2p's own rigid offsets (:func:`shift_labels`: Suite2p
  registers by ``roll(frame, (-yoff, -xoff))``, so raw pixel (y, x) is registered
  (y - yoff, x - xoff)); nonrigid residuals (at most ``maxregshiftNR`` = 5 px per block) are not
  undone. Why not the other way round (the static ROIs moved into each raw frame): a footprint
  is the pixels a cell covers in at least half of its frames, so a moving ROI's footprint
  shrinks; on s10002 (drift up to 15 px) the ground-truth footprints in the raw frame cover
  44.7 px on average, moved into Suite2p's registered frame 59.0 px, for cells of 59.9 px.
  Suite2p's registration is accurate there (a registered frame rolled back by its offsets
  correlates 1.0 with the raw frame). CalSeg (no registration by default) is scored in the raw
  frame, as in the accuracy suite.
* "no ROIs were found" is raised as a ValueError by Suite2p: counted as 0 ROIs.
* Any other Suite2p error (e.g. frames of 21 x 14 px: "(1<=ky && ky<=5) failed for 6th
  keyword ky") makes the video "not run", reported with the reason; the table then covers the
  videos where every method ran.
* Suite2p's numba functions compile on first use: one untimed warm-up run of each method on a
  crop of the first video comes first.

**Rows.** ``CalSeg classical`` (``calseg segment``'s default: method auto = classical without
real SAM2 weights, target active; its per-frame label stack scored per footprint), ``Suite2p``
(every ROI Suite2p detected) and ``Suite2p, iscell`` (the ROIs its built-in classifier calls
cells, what a Suite2p user keeps). Ground truth: the footprints of the cells active at least
once (``fp_*`` of :func:`~calseg.bench_accuracy.score_video`; the all-cells image has no
registered-frame version, so no all-cells score here). Seconds: wall time per video of
:func:`calseg.segment.infer.segment_recording` against Suite2p's pipeline (registration,
detection, extraction, classification), one process, the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from calseg.bench_accuracy import (
    REPO_ROOT,
    load_video,
    quick_specs,
    replace_generated,
    run_suite,
    score_video,
    suite_specs,
    summarise_rows,
)

SUITE2P_VERSION = "1.1.0"
"""The Suite2p release compared (pinned by the ``peers`` extra of pyproject.toml)."""
INSTALL_HINT = (
    "Suite2p is not installed. Install it into its own virtual environment:\n"
    "  python3.11 -m venv /tmp/peers-venv\n"
    "  /tmp/peers-venv/bin/pip install -e '.[peers]'   # calseg + suite2p=="
    + SUITE2P_VERSION
    + "\n"
    "  /tmp/peers-venv/bin/python -m calseg.bench --only peers\n"
    "or, with the project's .venv built: make peers (Suite2p only, in /tmp/calseg-peers-venv)"
)
SUITE2P_TAU_S = {"GCaMP6f": 0.7, "GCaMP6m": 1.0, "GCaMP6s": 1.25}
"""Suite2p ``tau`` (s) per indicator, as Suite2p's settings documentation recommends
("0.7 for GCaMP6f, 1.0 for GCaMP6m, 1.25-1.5 for GCaMP6s")."""
NONRIGID_MIN_SIDE_PX = 129
"""Suite2p's nonrigid registration only where both sides are at least this (it crashes on
sides of 128 px or less with its default 128 px blocks)."""
CALSEG_METHOD = {"method": "classical", "target": "active"}
"""CalSeg's default (``calseg segment``: classical without real SAM2 weights, target active)."""
ROW_NAMES = ("CalSeg classical", "Suite2p", "Suite2p, iscell")
TABLE_COLUMNS = (
    ("fp_precision", "precision @0.5"),
    ("fp_recall", "recall @0.5"),
    ("fp_f1", "F1 @0.5"),
    ("fp_precision_30", "precision @0.3"),
    ("fp_recall_30", "recall @0.3"),
    ("fp_f1_30", "F1 @0.3"),
    ("fp_mean_iou", "mean IoU (matched @0.5)"),
    ("fp_extra_rois", "extra ROIs"),
    ("seconds", "seconds"),
)
TABLE_KEYS = (*(k for k, _ in TABLE_COLUMNS), "fp_n_pred", "fp_n_gt")


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] peers: {message}", file=sys.stderr, flush=True)


def suite2p_available() -> str | None:
    """Suite2p's version when it can be imported, else ``None``."""
    try:
        import suite2p
    except ImportError:
        return None
    return str(getattr(suite2p, "version", "unknown"))


# --------------------------------------------------------------------------------------------
# Suite2p's ROIs as CalSeg label stacks (no Suite2p needed)


def rois_to_labels(stat: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Suite2p ROIs as one label image.

    Args:
        stat: Suite2p's ``stat`` entries, each with ``ypix``, ``xpix`` (int pixel coordinates
            in Suite2p's registered frame) and ``lam`` (float pixel weights).
        shape: ``(H, W)`` of the frame.

    Returns:
        ``(H, W)`` uint32 label image, ROI ``k`` of ``stat`` labelled ``k + 1``; a pixel claimed
        by several ROIs goes to the one with the largest ``lam / max(lam of that ROI)`` (its
        relative weight), ties to the later ROI; pixels outside the frame are dropped.
    """
    h, w = shape
    labels = np.zeros((h, w), np.uint32)
    if not len(stat):
        return labels
    ys, xs, ws, ids = [], [], [], []
    for k, s in enumerate(stat):
        y = np.asarray(s["ypix"], np.int64)
        x = np.asarray(s["xpix"], np.int64)
        lam = np.asarray(s.get("lam", np.ones(len(y))), np.float64)
        top = lam.max() if len(lam) and lam.max() > 0 else 1.0
        ys.append(y)
        xs.append(x)
        ws.append(lam / top)
        ids.append(np.full(len(y), k + 1, np.uint32))
    y, x, wt, lab = (np.concatenate(a) for a in (ys, xs, ws, ids))
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    y, x, wt, lab = y[inside], x[inside], wt[inside], lab[inside]
    order = np.lexsort((lab, wt))  # ascending weight, then id: the last write wins
    labels[y[order], x[order]] = lab[order]
    return labels


def shift_labels(labels: np.ndarray, yoff: np.ndarray, xoff: np.ndarray) -> np.ndarray:
    """Move frame t of a label stack by ``(yoff[t], xoff[t])`` whole pixels, without wrapping
    (what leaves the frame is dropped, what enters is 0).

    Suite2p registers frame t by ``roll(frame, (-yoff[t], -xoff[t]))`` (``suite2p.registration.
    register``): ``shift_labels(raw_labels, -yoff, -xoff)`` puts a raw-frame ground truth in
    Suite2p's registered frame, ``shift_labels(roi_labels, yoff, xoff)`` Suite2p's ROIs in the
    raw frames.

    Args:
        labels: ``(T, H, W)`` integer label stack, or one ``(H, W)`` label image (used for
            every frame).
        yoff, xoff: ``(T,)`` shifts (px, rows down and columns right; rounded to whole px).

    Returns:
        ``(T, H, W)`` label stack, dtype of ``labels``.
    """
    yoff = np.rint(np.asarray(yoff)).astype(np.int64)
    xoff = np.rint(np.asarray(xoff)).astype(np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = np.broadcast_to(labels, (len(yoff), *labels.shape))
    if len(labels) != len(yoff) or len(yoff) != len(xoff):
        raise ValueError(f"{len(labels)} frames, {len(yoff)} / {len(xoff)} offsets")
    _, h, w = labels.shape
    out = np.zeros(labels.shape, labels.dtype)
    for t, (dy, dx) in enumerate(zip(yoff.tolist(), xoff.tolist(), strict=True)):
        if abs(dy) >= h or abs(dx) >= w:
            continue
        src = labels[t, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        out[t, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def to_int16(image: np.ndarray) -> np.ndarray:
    """``(T, H, W)`` frames as Suite2p's int16: uint16 halved (as ``suite2p.io.tiff`` does),
    other integer types cast, floats clipped to the int16 range."""
    a = np.asarray(image)
    if a.dtype == np.uint16:
        return (a // 2).astype(np.int16)
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(np.rint(a), -32768, 32767).astype(np.int16)
    return a.astype(np.int16)


# --------------------------------------------------------------------------------------------
# running Suite2p


def suite2p_settings(
    frame_interval_s: float, indicator: str, diameter_px: float, shape: tuple[int, int]
) -> dict:
    """Suite2p settings for one recording (module docstring).

    Args:
        frame_interval_s: s between frames (``fs`` = 1 / interval, Hz).
        indicator: ``GCaMP6s``/``6f``/``6m`` (``tau``, :data:`SUITE2P_TAU_S`; 1.0 s otherwise,
            Suite2p's default).
        diameter_px: expected cell diameter (px).
        shape: ``(H, W)`` of the frames (nonrigid registration only above 128 px).

    Returns:
        Suite2p's ``default_settings()`` with those changes.
    """
    import suite2p

    s = suite2p.default_settings()
    s["torch_device"] = "cpu"
    s["fs"] = 1.0 / float(frame_interval_s)
    s["tau"] = SUITE2P_TAU_S.get(indicator, 1.0)
    s["diameter"] = [float(diameter_px), float(diameter_px)]
    s["run"]["do_deconvolution"] = False
    s["registration"]["nonrigid"] = bool(min(shape) >= NONRIGID_MIN_SIDE_PX)
    s["detection"]["algorithm"] = "sparsery"
    s["classification"]["use_builtin_classifier"] = True
    return s


def run_suite2p(image: np.ndarray, settings: dict, workdir: Path) -> dict:
    """Suite2p's pipeline on one recording, ROIs back in the raw frames.

    Args:
        image: ``(T, H, W)`` camera frames (any integer dtype; :func:`to_int16`).
        settings: :func:`suite2p_settings`.
        workdir: a folder Suite2p may write its ``.npy`` outputs to (emptied first).

    Returns:
        ``{"status": "ok" | "no ROIs" | "not run", "reason", "seconds", "n_rois", "n_iscell",
        "max_shift_px", "yoff", "xoff", "labels", "labels_iscell"}``: the ROIs (all, and those
        the classifier calls cells) as ``(H, W)`` uint32 label images of the registered frame,
        ``yoff``/``xoff`` ``(T,)`` Suite2p's rigid offsets (``None`` when not run).
    """
    import suite2p
    import torch

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    frames = to_int16(image)
    t, h, w = frames.shape
    t0 = time.perf_counter()
    try:
        out = suite2p.pipeline(
            str(workdir),
            frames,
            run_registration=True,
            settings=settings,
            device=torch.device("cpu"),
        )
    except ValueError as e:
        if "no ROIs were found" not in str(e):
            return _not_run(e, time.perf_counter() - t0)
        reg = np.load(workdir / "reg_outputs.npy", allow_pickle=True).item()
        stat, iscell = [], np.zeros((0, 2))
    except Exception as e:  # noqa: BLE001 - any Suite2p failure is reported, not raised
        return _not_run(e, time.perf_counter() - t0)
    else:
        reg, stat, iscell = out[0], out[2], out[8]
        stat = [] if stat is None else list(stat)
        iscell = np.zeros((len(stat), 2)) if iscell is None else np.asarray(iscell)
    dt = time.perf_counter() - t0
    yoff = np.asarray(reg.get("yoff", np.zeros(t)))
    xoff = np.asarray(reg.get("xoff", np.zeros(t)))
    keep = [s for s, c in zip(stat, iscell[:, 0] > 0.5, strict=True) if c]
    return {
        "status": "ok" if stat else "no ROIs",
        "reason": None if stat else "Suite2p: no ROIs were found (counted as 0 ROIs)",
        "seconds": dt,
        "n_rois": len(stat),
        "n_iscell": len(keep),
        "max_shift_px": float(np.hypot(yoff, xoff).max()) if len(yoff) else 0.0,
        "yoff": yoff,
        "xoff": xoff,
        "labels": rois_to_labels(stat, (h, w)),
        "labels_iscell": rois_to_labels(keep, (h, w)),
    }


def _not_run(e: BaseException, dt: float) -> dict:
    return {
        "status": "not run",
        "reason": f"Suite2p {type(e).__name__}: {str(e)[:200]}",
        "seconds": dt,
        "n_rois": None,
        "n_iscell": None,
        "max_shift_px": None,
        "yoff": None,
        "xoff": None,
        "labels": None,
        "labels_iscell": None,
    }


def equivalent_diameter_px(mean_area_px: float) -> float:
    """Diameter (px) of the circle of area ``mean_area_px`` (px^2): 2 sqrt(A / pi)."""
    return float(2.0 * np.sqrt(mean_area_px / np.pi))


def _warm_up(video, workdir: Path) -> None:  # noqa: ANN001 - SuiteVideo
    """Untimed first run of both methods on a 128 x 128 crop (numba compilation, imports)."""
    from calseg.segment.infer import InferenceConfig, segment_recording

    crop = video.image[:, :128, :128]
    segment_recording(crop, InferenceConfig(**CALSEG_METHOD))
    s = video.spec
    run_suite2p(
        crop,
        suite2p_settings(s.frame_interval_s, s.indicator, 10.0, crop.shape[1:]),
        workdir / "warmup",
    )


def run_peers(specs: list, cache_dir: Path | None, workdir: Path) -> dict:
    """Both methods on every video, scored alike (module docstring).

    Args:
        specs: suite videos (:func:`calseg.bench_accuracy.suite_specs`).
        cache_dir: simulated-video cache of the accuracy suite (``None``: its default).
        workdir: scratch folder for Suite2p's outputs.

    Returns:
        ``{"rows": [...], "videos": [...], "summary": {row name: summarise_rows(...)},
        "not_run": [...]}``; a row per (video, method) with the
        :func:`~calseg.bench_accuracy.score_video` keys, ``seconds``, ``status``, ``n_rois``.
    """
    first, _ = load_video(specs[0], cache_dir)
    _log("warm-up (untimed) on a 128 x 128 crop of the first video")
    _warm_up(first, workdir)
    calseg = run_suite(specs, cache_dir, methods={ROW_NAMES[0]: CALSEG_METHOD})
    rows = [{**r, "status": "ok", "n_rois": r["fp_n_pred"]} for r in calseg["rows"]]
    videos, not_run = [], []
    for spec in specs:
        video, _ = load_video(spec, cache_dir)
        d = equivalent_diameter_px(video.meta["mean_cell_area_px_rendered"])
        settings = suite2p_settings(
            spec.frame_interval_s, spec.indicator, d, (spec.height, spec.width)
        )
        res = run_suite2p(video.image, settings, workdir / spec.id)
        videos.append(
            {
                "video": spec.id,
                "shape": [spec.n_frames, spec.height, spec.width],
                "suite2p_diameter_px": d,
                "suite2p_tau_s": settings["tau"],
                "suite2p_fs_hz": settings["fs"],
                "suite2p_nonrigid": settings["registration"]["nonrigid"],
                "suite2p_status": res["status"],
                "suite2p_reason": res["reason"],
                "suite2p_max_shift_px": res["max_shift_px"],
                "defects_present": video.meta.get("defects_present"),
            }
        )
        if res["status"] == "not run":
            not_run.append({"video": spec.id, "reason": res["reason"]})
        gt_registered = None
        if res["labels"] is not None:  # the ground truth in Suite2p's registered frame
            gt_registered = shift_labels(video.labels, -res["yoff"], -res["xoff"])
        for name, key in ((ROW_NAMES[1], "labels"), (ROW_NAMES[2], "labels_iscell")):
            row = {"video": spec.id, "method": name, "status": res["status"]}
            row["seconds"] = res["seconds"]
            if gt_registered is not None:
                pred = np.broadcast_to(res[key], gt_registered.shape)
                scores = score_video(pred, gt_registered, video.cells, "cells")
                row.update({k: v for k, v in scores.items() if not k.startswith("all_")})
                row["n_rois"] = res["n_rois"] if key == "labels" else res["n_iscell"]
            rows.append(row)
        cal = next(r for r in rows if r["video"] == spec.id and r["method"] == ROW_NAMES[0])
        _log(
            f"{spec.id} {spec.height}x{spec.width}x{spec.n_frames}: CalSeg F1@0.5 "
            f"{_f(cal['fp_f1'])} ({cal['seconds']:.1f} s); Suite2p {res['status']}, "
            f"{res['n_rois']} ROIs ({res['n_iscell']} iscell), F1@0.5 "
            f"{_f(rows[-2].get('fp_f1'))} / iscell {_f(rows[-1].get('fp_f1'))} "
            f"({res['seconds']:.1f} s, largest shift {_f(res['max_shift_px'], 1)} px)"
            + (f": {res['reason']}" if res["status"] == "not run" else "")
        )
    skip = {n["video"] for n in not_run}
    summary = {
        name: summarise_rows(
            [r for r in rows if r["method"] == name and r["video"] not in skip], TABLE_KEYS
        )
        for name in ROW_NAMES
    }
    return {"rows": rows, "videos": videos, "summary": summary, "not_run": not_run}


def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _cell(s: dict, nd: int = 2) -> str:
    m, ci = s["mean"], s["ci95"]
    if m is None:
        return "n/a"
    return f"{m:.{nd}f}" if ci is None else f"{m:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def markdown_table(summary: dict) -> str:
    """One markdown table: a row per method, each cell ``mean [bootstrap 95 % CI]`` over
    videos (:func:`calseg.bench_accuracy.summarise_rows`)."""
    cols = TABLE_COLUMNS
    lines = [
        "| method | videos | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['n_videos']} | "
            + " | ".join(
                _cell(s[k], 1 if k in ("fp_extra_rois", "seconds") else 2) for k, _ in cols
            )
            + " |"
        )
    return "\n".join(lines)


def report_text(report: dict) -> tuple[str, str]:
    """``(head, table)`` of a run's report (as written by ``--json``): the command, Suite2p
    version, commit, videos, wall time, machine and date, then :func:`markdown_table` and the
    videos not run with their reasons. A report without ``date`` (older runs) is dated by
    ``report["file_date"]``."""
    m = report["machine"]
    ids = [v["video"] for v in report["videos"]]
    date = report.get("date") or report.get("file_date") or "unknown date"
    head = (
        f"{report['command']}\nSuite2p {report['suite2p']}, commit {m['git_commit']}, {len(ids)} "
        f"held-out videos ({', '.join(ids)}), wall {report['wall_s']:.0f} s, {m['cpu_model']}, "
        f"{m['cores_usable']} cores, {date}"
    )
    notes = "".join(f"\n\nnot run: {n['video']}: {n['reason']}" for n in report["not_run"])
    return head, markdown_table(report["summary"]) + notes


def write_docs(report: dict, root: Path = REPO_ROOT) -> Path:
    """Write a run's table into ``root/BENCHMARKS.md`` between its ``generated:peers``
    markers (:func:`calseg.bench_accuracy.replace_generated`)."""
    head, table = report_text(report)
    body = "\n".join(f"    {line}" for line in head.splitlines()) + "\n\n" + table
    path = root / "BENCHMARKS.md"
    path.write_text(replace_generated(path.read_text(), "peers", body))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m calseg.bench --only peers [--quick] [--videos N] [--cache DIR] [--workdir DIR]
    [--json F] [--markdown F] [--write-docs] [--docs-from F]``; prints :data:`INSTALL_HINT` and
    returns 0 without Suite2p."""
    from calseg.machine import machine_info

    ap = argparse.ArgumentParser(
        prog="python -m calseg.bench --only peers",
        description="Suite2p and CalSeg on the held-out accuracy suite (calseg/bench_peers.py).",
    )
    ap.add_argument("--quick", action="store_true", help="8 videos, two per pattern class")
    ap.add_argument("--videos", type=int, default=None, help="only the first N suite videos")
    ap.add_argument("--cache", type=Path, default=None, help="simulated-video cache folder")
    ap.add_argument("--workdir", type=Path, default=None, help="Suite2p scratch folder")
    ap.add_argument("--json", type=Path, help="write rows, videos and summary as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the markdown table here")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="write the table into BENCHMARKS.md (between its generated:peers markers)",
    )
    ap.add_argument(
        "--docs-from",
        type=Path,
        metavar="JSON",
        help="run nothing: write BENCHMARKS.md (as --write-docs) from an earlier run's --json",
    )
    args = ap.parse_args(argv)
    if args.docs_from is not None:
        report = json.loads(args.docs_from.read_text())
        mtime = time.gmtime(args.docs_from.stat().st_mtime)
        report.setdefault("file_date", time.strftime("%Y-%m-%d", mtime))
        _log(f"wrote {write_docs(report)}")
        return 0
    version = suite2p_available()
    if version is None:
        print(INSTALL_HINT)
        return 0
    if version != SUITE2P_VERSION:
        _log(f"Suite2p {version} installed; the table in BENCHMARKS.md is for {SUITE2P_VERSION}")
    specs = suite_specs()
    if args.quick:
        specs = quick_specs(specs)
    if args.videos:
        specs = specs[: args.videos]
    command = "python -m calseg.bench --only peers" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    machine = machine_info(os.environ)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calseg-peers-") as tmp:
        res = run_peers(specs, args.cache, args.workdir or Path(tmp))
    report = {
        "command": command,
        "suite2p": version,
        "machine": machine,
        "wall_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **res,
    }
    head, table = report_text(report)
    print(head + "\n")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(head + "\n\n" + table + "\n")
    if args.write_docs:
        _log(f"wrote {write_docs(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
