"""Sim-to-real report: domain gap and real-data recall of models trained on different data.

One command from a clean checkout (``python -m calseg.report gap OUT_DIR`` or
``calseg report-gap OUT_DIR``) writes ``OUT_DIR/report.md`` (tables), ``OUT_DIR/report.png``
(figure) and ``OUT_DIR/report.json`` (every number). Steps:

1. Read the real recordings with hand-drawn ImageJ ROIs (sima_example.tif with 2 ROIs,
   fissa_b_AVG_A01.tif with 2 ROIs) from the real-data folder (``--real-dir``, else
   ``$CALSEG_REAL_DATA_DIR``, else the service setting ``real_data_dir``).
2. Simulate (a) a small default dataset; (c) one dataset per real recording with the
   simulator fitted to it (:mod:`calseg.simulate.fit`). (b) is (a) plus ``K`` augmented
   variants per training video (:mod:`calseg.segment.augment`).
3. Fine-tune SAM2's decoder (tiny model, random encoder weights here, few steps) on (a), (b)
   and each (c); SAM2 untuned and the classical method need no training.
4. Score every model: domain-gap score of its training data against each real recording
   (:mod:`calseg.pipelines.domain_gap`, plus the Fréchet distance on the SAM2 encoder's
   embeddings), recall of the labelled real cells at IoU >= 0.5 / 0.3 and detections per
   frame (:mod:`calseg.pipelines.real_eval`), and IoU / Dice on the held-out (test) videos of
   the default simulation (:func:`calseg.segment.evaluate.evaluate_dataset`). Recall twice:
   for the active cells of each frame (the default target; in these short, noisy recordings
   the activity threshold finds nothing) and for all cells on the mean projection
   (``target="cells"``, :mod:`calseg.segment.projection`), next to its chance level (cell-sized
   grid tiles, :func:`calseg.pipelines.real_eval.grid_control`).
   ``--rescore-real`` recomputes only these real-data columns from an existing OUT_DIR.

The defaults are sized for a 2-core CPU (about 10 min). With random encoder weights the
SAM2 numbers are not a statement about SAM2: they test the pipeline and the measurements.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from calseg.fmt import fmt_num

REAL_SETS = {
    "sima": ("sima_example.tif", "sima_example_imageJ_ROIs.zip"),
    "fissa": ("fissa_b_AVG_A01.tif", "fissa_b_rois.zip"),
}


def _real_dir(arg: str | None) -> Path:
    """``--real-dir`` when given, else the setting ``real_data_dir`` (``$CALSEG_REAL_DATA_DIR``),
    read afresh so the current environment counts."""
    from calseg.service.settings import Settings

    return Path(arg) if arg else Path(Settings().real_data_dir)


def _fmt(v, digits: int = 2) -> str:  # noqa: ANN001
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def run_gap_report(
    out_dir: Path,
    *,
    real_dir: Path,
    n_frames: int = 24,
    size: int = 128,
    steps: int = 30,
    image_size: int = 128,
    augment_variants: int = 2,
    seed: int = 0,
    log=print,  # noqa: ANN001
) -> dict:
    """Run the whole report (module docstring) and write its files into ``out_dir``.

    Returns:
        the JSON-able result dict (also written to ``report.json``).

    Raises:
        FileNotFoundError: a real recording or its ROI file is missing.
    """
    from calseg.io.dataset import load_dataset
    from calseg.pipelines.domain_gap import (
        domain_gap,
        frechet_distance,
        sam2_features,
    )
    from calseg.segment.augment import augment_recording
    from calseg.segment.evaluate import evaluate_dataset
    from calseg.segment.finetune import FinetuneConfig, finetune, variant_seed
    from calseg.segment.infer import InferenceConfig
    from calseg.segment.model import load_sam2
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset
    from calseg.simulate.fit import fit_recording

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "embeddings"
    timings: dict[str, float] = {}

    # 1. real recordings ----------------------------------------------------------------
    real = _read_real(real_dir, log)

    # 2. simulations ----------------------------------------------------------------------
    base = SimulationConfig(
        n_videos=4,
        n_val_videos=1,
        n_test_videos=1,
        n_frames=n_frames,
        height=size,
        width=size,
        search_horizon_s=1200,
        warmup_s=200,
        seed=seed,
    )
    t = time.perf_counter()
    default_ds = out_dir / "sim_default"
    simulate_dataset(base, default_ds)
    fits, fitted_ds = {}, {}
    for name, r in real.items():
        fit = fit_recording(r["frames"], r["frame_interval_s"])
        fits[name] = fit
        cfg = fit.to_config(base)
        (out_dir / f"fit_{name}.json").write_text(
            json.dumps({"fit": fit.to_dict(), "config": cfg.model_dump(mode="json")}, indent=1)
        )
        fitted_ds[name] = out_dir / f"sim_fitted_{name}"
        simulate_dataset(cfg, fitted_ds[name])
        log(f"fitted {name}: {cfg.height}x{cfg.width}, notes: {fit.notes}")
    timings["simulate_s"] = time.perf_counter() - t

    def frames_of(ds: Path, split: str = "train") -> list[np.ndarray]:
        return [np.asarray(v.load_image()) for v in load_dataset(ds).split(split)]

    sim_default = frames_of(default_ds)
    sim_aug = list(sim_default)
    for v in load_dataset(default_ds).split("train"):
        img, lab = np.asarray(v.load_image()), np.asarray(v.load_labels())
        for k in range(1, augment_variants + 1):
            sim_aug.append(augment_recording(img, lab, variant_seed(seed, v.id, k))[0])

    # 3. domain gap ---------------------------------------------------------------------------
    t = time.perf_counter()
    loaded = load_sam2("sam2.1_hiera_t", None, image_size=image_size, device="cpu")
    nf = 8  # frames per recording for the Fréchet distance
    feats_default = sam2_features(sim_default, loaded, max_frames=nf, cache_dir=cache)
    feats_aug = sam2_features(sim_aug, loaded, max_frames=nf, cache_dir=cache)
    gap: dict[str, dict] = {}
    for name, r in real.items():
        fr = r["frames"]
        sim_fit = frames_of(fitted_ds[name])
        f_real = sam2_features([fr], loaded, max_frames=nf, cache_dir=cache)
        f_fit = sam2_features(sim_fit, loaded, max_frames=nf, cache_dir=cache)
        gap[name] = {}
        for label, sims, feats in (
            ("default", sim_default, feats_default),
            ("augmented", sim_aug, feats_aug),
            ("fitted", sim_fit, f_fit),
        ):
            g = domain_gap([fr], sims)
            gap[name][label] = {
                **g.to_dict(),
                "frechet_sam2": frechet_distance(f_real, feats),
            }
        log(f"gap {name}: " + ", ".join(f"{k} {v['score']:.2f}" for k, v in gap[name].items()))
    timings["gap_s"] = time.perf_counter() - t

    # 4. fine-tuning ---------------------------------------------------------------------------
    t = time.perf_counter()
    ft_kw = {
        "image_size": image_size,
        "steps": steps,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 3,
        "val_every": steps,
        "frames_per_video": 8,
        "val_frames_per_video": 4,
        "seed": seed,
        "device": "cpu",
    }
    ckpt: dict[str, Path] = {}
    embed_s: dict[str, float] = {}
    for label, ds, k in (
        ("default", default_ds, 0),
        ("augmented", default_ds, augment_variants),
        *((f"fitted_{n}", fitted_ds[n], 0) for n in real),
    ):
        res = finetune(
            ds,
            out_dir / f"model_{label}",
            FinetuneConfig(**ft_kw, augment_variants=k),
            cache_dir=out_dir / f"embeddings_{label}",  # own cache: embedding time measured
        )
        ckpt[label] = res.checkpoint
        embed_s[label] = float(res.timings.get("embed_s", float("nan")))
        iou = fmt_num(res.best_val_iou)
        log(f"fine-tuned {label}: embed {embed_s[label]:.1f} s, best val IoU {iou}")
    timings["finetune_s"] = time.perf_counter() - t

    # 5. models x evaluations -------------------------------------------------------------
    models = {
        "SAM2 untuned": ("sam2", None, None),  # one name per model (calseg.segment.choice)
        "classical": ("classical", None, None),
        "(a) default sims": ("sam2", ckpt["default"], "default"),
        f"(b) sims + augmentation (K={augment_variants})": ("sam2", ckpt["augmented"], "augmented"),
        "(c) sims fitted to the recording": ("sam2", "fitted", "fitted"),
    }
    t = time.perf_counter()
    icfg = InferenceConfig(image_size=image_size, device="cpu")
    rows = []
    sim_models = {
        n: (m, c) for n, (m, c, _) in models.items() if not (isinstance(c, str) and c == "fitted")
    }
    sim_eval = evaluate_dataset(
        default_ds,
        {n: (m, c) for n, (m, c) in sim_models.items()},
        split="test",
        config=icfg,
        cache_dir=cache,
    )
    sim_sum = {s["model"]: s for s in sim_eval.summary}
    for name, (method, ck, data) in models.items():
        row: dict = {"model": name, "training data": data or "-"}
        for rname, r in real.items():
            c = ckpt[f"fitted_{rname}"] if ck == "fitted" else ck
            row.update(score_real(rname, r, method, c, icfg, cache))
            row[f"gap_{rname}"] = gap[rname][data] if data else None
        if ck == "fitted":  # per-recording models: held-out test video of their own sims
            ev = {}
            for rname in real:
                e = evaluate_dataset(
                    fitted_ds[rname],
                    {"m": ("sam2", ckpt[f"fitted_{rname}"])},
                    split="test",
                    config=icfg,
                    cache_dir=cache,
                ).summary[0]
                ev[rname] = {"iou": e["iou_mean"], "dice": e["dice_mean"]}
            row["sim_test"] = {
                "iou": float(np.mean([v["iou"] for v in ev.values()])),
                "dice": float(np.mean([v["dice"] for v in ev.values()])),
                "note": "mean over the fitted datasets' own test videos",
                "per_recording": ev,
            }
        else:
            s = sim_sum[name]
            row["sim_test"] = {"iou": s["iou_mean"], "dice": s["dice_mean"]}
        rows.append(row)
        log(f"scored {name}")
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    result = {
        "settings": {
            "n_frames": n_frames,
            "size": size,
            "steps": steps,
            "image_size": image_size,
            "augment_variants": augment_variants,
            "seed": seed,
            "sam2": "sam2.1_hiera_t with RANDOM weights (no checkpoint available here)",
        },
        "gap": gap,
        "fits": {n: f.to_dict() for n, f in fits.items()},
        "rows": rows,
        "embed_s": embed_s,
        "timings": timings,
    }
    result["controls"] = grid_controls(result["rows"], real)
    result["roi_activity"] = roi_activities(real)
    result["best_steps"] = _best_steps(out_dir)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1, default=_json_default))
    (out_dir / "report.md").write_text(markdown(result))
    figure(
        result,
        real,
        {n: frames_of(fitted_ds[n], "test")[0] for n in real},
        frames_of(default_ds, "test")[0],
        out_dir / "report.png",
    )
    log(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.png'} in {timings['total_s']:.0f} s")
    return result


def score_real(
    rname: str,
    r: dict,
    method: str,
    checkpoint,  # noqa: ANN001 - Path | None
    icfg,  # noqa: ANN001 - InferenceConfig
    cache: Path | None,
) -> dict:
    """Real-data scores of one model on one labelled recording.

    ``{rname}``: the activity target (:func:`calseg.pipelines.real_eval.score_partial_labels`
    on the per-frame label stack); ``cells_{rname}``: ``target="cells"`` (all cells on the
    mean projection, :mod:`calseg.segment.projection`) scored by
    :func:`calseg.pipelines.real_eval.score_projection`, with ``cell_diameter_px`` and
    ``n_cells_projection``; ``oracle_{rname}`` (SAM2 only):
    :func:`calseg.pipelines.real_eval.oracle_point_iou`.

    Args:
        rname: recording name; r: ``{"frames": (T, H, W), "rois": (H, W)}``;
        method: "sam2" or "classical" ("baseline" accepted); checkpoint: SAM2 checkpoint
            or None (random weights);
        icfg: base :class:`calseg.segment.infer.InferenceConfig`; cache: embedding cache.
    """
    from calseg.pipelines.real_eval import (
        oracle_point_iou,
        score_partial_labels,
        score_projection,
    )
    from calseg.segment.infer import segment_recording
    from calseg.segment.model import load_sam2

    out: dict = {}
    cfg = icfg.model_copy(update={"method": method})
    seg = segment_recording(r["frames"], cfg, checkpoint=checkpoint, cache_dir=cache)
    out[rname] = score_partial_labels(seg.labels, r["rois"]).to_dict()
    cfg = icfg.model_copy(update={"method": method, "target": "cells"})
    seg = segment_recording(r["frames"], cfg, checkpoint=checkpoint, cache_dir=cache)
    out[f"cells_{rname}"] = {
        **score_projection(seg.labels, r["rois"]).to_dict(),
        "cell_diameter_px": seg.activity.get("cell_diameter_px"),
        "n_cells_projection": seg.activity.get("n_cells"),
    }
    if method == "sam2":
        lm = load_sam2("sam2.1_hiera_t", checkpoint, image_size=icfg.image_size, device="cpu")
        out[f"oracle_{rname}"] = float(
            np.mean(oracle_point_iou(lm, r["frames"], r["rois"], cache_dir=cache))
        )
    return out


def grid_controls(rows: list[dict], real: dict) -> dict:
    """Chance level of the projection recall per recording
    (:func:`calseg.pipelines.real_eval.grid_control` with the diameter the baseline used)."""
    from calseg.pipelines.real_eval import grid_control

    out = {}
    for rname, r in real.items():
        ds = [row.get(f"cells_{rname}", {}).get("cell_diameter_px") for row in rows]
        ds = [d for d in ds if d]
        if ds:
            out[rname] = {**grid_control(r["rois"], ds[0]), "cell_diameter_px": ds[0]}
    return out


def roi_activities(real: dict) -> dict:
    """Per recording, :func:`calseg.pipelines.real_eval.roi_activity` of its labelled ROIs."""
    from calseg.pipelines.real_eval import roi_activity

    return {n: roi_activity(r["frames"], r["rois"]) for n, r in real.items()}


def rescore_real(out_dir: Path, real_dir: Path, log=print) -> dict:  # noqa: ANN001
    """Recompute only the real-data columns of an existing report (``--rescore-real``).

    The real recordings are read again; each fine-tuned model is the ``best.pt`` the run saved
    in ``OUT_DIR/model_<label>/``; SAM2 untuned and the classical method need none. Gap scores,
    fits and simulated IoU are kept from ``report.json``. Rewrites report.json and report.md,
    and report.png when the run's simulated datasets are still in ``OUT_DIR``.

    Raises:
        FileNotFoundError: no report.json, a checkpoint or a real recording missing.
    """
    from calseg.segment.infer import InferenceConfig

    out_dir = Path(out_dir)
    res = json.loads((out_dir / "report.json").read_text())
    real = _read_real(real_dir, log)
    icfg = InferenceConfig(image_size=res["settings"]["image_size"], device="cpu")
    t = time.perf_counter()
    for row in res["rows"]:
        data = row["training data"]
        # "classical baseline" in reports written before the names were unified
        method = "classical" if row["model"] in ("classical", "classical baseline") else "sam2"
        for rname, r in real.items():
            label = f"fitted_{rname}" if data == "fitted" else data
            ck = None if data == "-" else out_dir / f"model_{label}" / "best.pt"
            if ck is not None and not ck.exists():
                raise FileNotFoundError(f"{ck} not found: run the full report first")
            row.update(score_real(rname, r, method, ck, icfg, out_dir / "embeddings"))
        log(f"rescored {row['model']}")
    res["controls"] = grid_controls(res["rows"], real)
    res["roi_activity"] = roi_activities(real)
    res.setdefault("timings", {})["rescore_real_s"] = time.perf_counter() - t
    res["best_steps"] = _best_steps(out_dir)
    (out_dir / "report.json").write_text(json.dumps(res, indent=1, default=_json_default))
    (out_dir / "report.md").write_text(markdown(res))
    ds = {n: out_dir / f"sim_fitted_{n}" for n in real}
    if (out_dir / "sim_default").exists() and all(p.exists() for p in ds.values()):
        from calseg.io.dataset import load_dataset

        def first_test(p: Path) -> np.ndarray:
            return np.asarray(load_dataset(p).split("test")[0].load_image())

        figure(
            res,
            real,
            {n: first_test(p) for n, p in ds.items()},
            first_test(out_dir / "sim_default"),
            out_dir / "report.png",
        )
    return res


def _read_real(real_dir: Path, log=print) -> dict[str, dict]:  # noqa: ANN001
    """The labelled real recordings of :data:`REAL_SETS`: per name ``{"frames" (T, H, W),
    "rois" (H, W) label image, "frame_interval_s"}``.

    Raises:
        FileNotFoundError: a recording or its ROI file is missing.
    """
    from calseg.io.recordings import read_recording
    from calseg.io.rois import read_imagej_rois

    real: dict[str, dict] = {}
    for name, (rec_file, roi_file) in REAL_SETS.items():
        rp, zp = real_dir / rec_file, real_dir / roi_file
        if not rp.exists() or not zp.exists():
            raise FileNotFoundError(
                f"{rp} or {zp} not found: give --real-dir (or set CALSEG_REAL_DATA_DIR) to the "
                "folder with the real recordings (see ../shared/data/real/SOURCES.md)"
            )
        rec = read_recording(rp)
        frames = rec.frames
        real[name] = {
            "frames": frames,
            "rois": read_imagej_rois(zp, frames.shape[1:]),
            "frame_interval_s": rec.info.frame_interval_s,
        }
        log(f"real {name}: {frames.shape} {frames.dtype}")
    return real


def _best_steps(out_dir: Path) -> dict[str, int | None]:
    """Step of each fine-tuned model's best checkpoint (its validation history)."""
    out = {}
    for h in sorted(Path(out_dir).glob("model_*/history.json")):
        hist = json.loads(h.read_text())["history"]
        vals = [e for e in hist if e.get("kind") == "val" and e.get("val_mean_iou") is not None]
        best = max(vals, key=lambda e: e["val_mean_iou"], default=None)
        out[h.parent.name.removeprefix("model_")] = best["step"] if best else None
    return out


def _json_default(o):  # noqa: ANN001, ANN202
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def markdown(result: dict) -> str:
    """The report's tables as markdown."""
    real = list(REAL_SETS)
    lines = [
        "| model | trained on | gap sima | gap fissa | FD sima | FD fissa | recall@0.5 / @0.3 "
        "sima | recall@0.5 / @0.3 fissa | detections/frame sima / fissa | oracle-point IoU "
        "sima / fissa | sim test IoU / Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [r["model"], r["training data"]]
        for n in real:
            g = r.get(f"gap_{n}")
            cells.append(_fmt(g["score"]) if g else "-")
        for n in real:
            g = r.get(f"gap_{n}")
            cells.append(_fmt(g["frechet_sam2"], 1) if g else "-")
        for n in real:
            s = r[n]
            flag = "" if s["plausible"] else " (implausible)"
            cells.append(f"{_fmt(s['recall_50'])} / {_fmt(s['recall_30'])}{flag}")
        cells.append(" / ".join(_fmt(r[n]["detections_per_frame"], 1) for n in real))
        cells.append(" / ".join(_fmt(r.get(f"oracle_{n}")) for n in real))
        st = r["sim_test"]
        cells.append(f"{_fmt(st['iou'])} / {_fmt(st['dice'])}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(f"cells_{n}" in r for r in result["rows"] for n in real):
        lines += [
            "",
            "All cells on the mean projection (`InferenceConfig(target='cells')`, "
            "calseg.segment.projection; labelled cells matched one-to-one at IoU >= 0.5 / 0.3):",
            "",
            "| model | recall@0.5 / @0.3 sima | recall@0.5 / @0.3 fissa | best IoU per ROI sima "
            "| best IoU per ROI fissa | cells found sima / fissa | covered fraction sima / "
            "fissa |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            cells = [r["model"]]
            for n in real:
                c = r.get(f"cells_{n}")
                if c is None:
                    cells.append("n/a")
                    continue
                flag = "" if c["plausible"] else " (implausible)"
                cells.append(f"{_fmt(c['recall_50'])} / {_fmt(c['recall_30'])}{flag}")
            for n in real:
                c = r.get(f"cells_{n}")
                cells.append(", ".join(_fmt(v) for v in c["best_iou"]) if c else "n/a")
            cells.append(
                " / ".join(
                    _fmt(r.get(f"cells_{n}", {}).get("detections_per_frame"), 0) for n in real
                )
            )
            cells.append(" / ".join(_fmt(r.get(f"cells_{n}", {}).get("coverage")) for n in real))
            lines.append("| " + " | ".join(cells) + " |")
        ctl = result.get("controls") or {}
        if ctl:
            lines += [
                "",
                "Chance level (real_eval.grid_control): square tiles of one cell's area (the "
                "baseline's projection cell diameter), which use nothing of the image, mean over "
                "16 grid offsets: "
                + "; ".join(
                    f"{n}: d = {c['cell_diameter_px']:.1f} px, recall@0.5 {c['recall_50']:.2f}, "
                    f"@0.3 {c['recall_30']:.2f}"
                    for n, c in ctl.items()
                )
                + ". With two ROIs per recording, a projection recall is informative only where it "
                "beats this.",
            ]
    if result.get("roi_activity"):
        lines += [
            "",
            "Why the activity target finds nothing here (real_eval.roi_activity: ROI-mean trace "
            "vs the per-pixel rule z > threshold, then regions >= 15 px):",
            "",
            "| recording | ROI | px | F0 | peak dF/F of ROI mean | peak z of ROI mean | "
            "per-pixel max z (max / median over ROI) | ROI px ever z > thr | ROI px active "
            "after region rule | noise SD / median F |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, per in result["roi_activity"].items():
            for q in per:
                lines.append(
                    f"| {n} | {q['roi']} | {q['area_px']} | {_fmt(q['f0'], 0)} | "
                    f"{_fmt(q['peak_dff'])} | {_fmt(q['trace_z'], 1)} | "
                    f"{_fmt(q['pixel_z_max'], 1)} / {_fmt(q['pixel_z_median_of_max'], 1)} | "
                    f"{_fmt(q['frac_px_above'], 3)} | {_fmt(q['frac_px_active'], 3)} | "
                    f"{_fmt(q['noise_sigma_median'], 1)} / {_fmt(q['median_f'], 0)} |"
                )
    lines += [
        "",
        "gap: domain-gap score of the model's training simulations against the recording "
        "(lower = closer); FD: Fréchet distance of SAM2 encoder embeddings (random-weight "
        "encoder: a weak feature space); recall: labelled cells matched at IoU >= 0.5 / 0.3 "
        "by the model's own detections (prompts from the recording's activity); oracle-point "
        "IoU: diagnostic only, the mask for a point placed at each labelled cell's centre "
        "(the prompt comes from the label), on the mean projection.",
        "",
        "Domain-gap components per recording (raw distances; score = mean of component / "
        "reference; references: histogram 0.05, noise 0.5, spectrum 0.5, cell size 0.5):",
        "",
        "| recording | simulation | score | histogram | noise | spectrum | cell size | "
        "FD (SAM2, random weights) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, per in result["gap"].items():
        for label, g in per.items():
            c = g["components"]
            lines.append(
                f"| {n} | {label} | {_fmt(g['score'])} | {_fmt(c['histogram'], 3)} | "
                f"{_fmt(c['noise'])} | {_fmt(c['spectrum'])} | {_fmt(c['cell_size'])} | "
                f"{_fmt(g['frechet_sam2'], 1)} |"
            )
    e = result["embed_s"]
    s = result["settings"]
    if result.get("best_steps"):
        bs = result["best_steps"]
        lines += [
            "",
            "Step of each fine-tuned model's best checkpoint (highest validation IoU; step 0 = "
            "the untrained decoder, i.e. training did not beat it on the held-out simulated "
            "video): " + ", ".join(f"{k} {v}" for k, v in bs.items()) + ".",
        ]
    lines += [
        "",
        f"Embedding cost of augmentation: fine-tuning on (a) embedded its frames in "
        f"{_fmt(e.get('default'), 1)} s, (b) with K = {s['augment_variants']} variants in "
        f"{_fmt(e.get('augmented'), 1)} s (expected (K + 1) x for the training frames; the "
        "validation frames are not augmented).",
        f"Settings: {s}. Total {result['timings']['total_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['timings'].items())}).",
    ]
    return "\n".join(lines) + "\n"


def figure(result: dict, real: dict, fitted_frames: dict, default_frames, path: Path) -> Path:  # noqa: ANN001
    """PNG: a frame of each real recording next to a default and a fitted simulation, and bar
    charts of the gap score and the recall at IoU >= 0.3 (Pillow only)."""
    from PIL import Image, ImageDraw

    from calseg.io.overlays import _font, display_range

    def thumb(a: np.ndarray, side: int = 160) -> Image.Image:
        f = np.asarray(a, np.float64)
        f = f[len(f) // 2] if f.ndim == 3 else f
        lo, hi = display_range(f)
        g = np.clip((f - lo) / max(hi - lo, 1e-9), 0, 1)
        im = Image.fromarray((g * 255).astype(np.uint8))
        s = side / max(im.size)
        return im.resize(
            (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.NEAREST
        )

    names = list(real)
    w, h = 1100, 200 * len(names) + 330
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    for i, n in enumerate(names):
        y = 10 + 200 * i
        for j, (title, a) in enumerate(
            (
                (f"real: {n}", real[n]["frames"]),
                ("default simulation", default_frames),
                (f"simulation fitted to {n}", fitted_frames[n]),
            )
        ):
            x = 10 + 180 * j
            d.text((x, y), title, fill="black", font=small)
            img.paste(thumb(a), (x, y + 16))
        # gap bars
        x0 = 570
        d.text((x0, y), f"domain-gap score vs {n} (lower = closer)", fill="black", font=small)
        per = result["gap"][n]
        vmax = max(g["score"] for g in per.values()) or 1
        for k, (label, g) in enumerate(per.items()):
            yy = y + 24 + 30 * k
            bw = int(300 * g["score"] / vmax)
            d.rectangle([x0 + 90, yy, x0 + 90 + bw, yy + 20], fill=(70, 110, 200))
            d.text((x0, yy + 4), label, fill="black", font=small)
            d.text((x0 + 95 + bw, yy + 4), f"{g['score']:.2f}", fill="black", font=small)
    y = 20 + 200 * len(names)
    d.text(
        (10, y),
        "recall of the labelled real cells at IoU >= 0.3 (bars: sima, fissa; outlined: all "
        "cells on the mean projection)",
        fill="black",
        font=font,
    )
    colours = [(200, 90, 60), (60, 160, 90)]
    for k, r in enumerate(result["rows"]):
        yy = y + 26 + 28 * k
        d.text((10, yy + 4), r["model"][:40], fill="black", font=small)
        for m, n in enumerate(names):
            v = r[n]["recall_30"]
            x = 330 + 380 * m
            d.rectangle([x, yy, x + int(300 * v), yy + 20], outline=colours[m], fill=colours[m])
            label = f"{n} {v:.2f}"
            c = r.get(f"cells_{n}")
            if c is not None:  # projection recall: outlined bar
                vc = c["recall_30"]
                d.rectangle([x, yy + 14, x + int(300 * vc), yy + 20], outline="black")
                label += f" (projection {vc:.2f})"
            d.text((x + 5 + int(300 * v), yy + 4), label, fill="black", font=small)
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m calseg.report gap OUT_DIR [options]``."""
    p = argparse.ArgumentParser(prog="python -m calseg.report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gap", help="the sim-to-real report (table + figure)")
    g.add_argument("out_dir", type=Path)
    g.add_argument("--real-dir", default=None)
    g.add_argument("--frames", type=int, default=24)
    g.add_argument("--size", type=int, default=128)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--image-size", type=int, default=128)
    g.add_argument("--augment-variants", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite report.md from an existing OUT_DIR/report.json (no recomputation)",
    )
    g.add_argument(
        "--rescore-real",
        action="store_true",
        help="recompute only the real-data recall (activity and projection targets) of an "
        "existing OUT_DIR with its saved checkpoints; keeps gap and simulated scores",
    )
    a = p.parse_args(argv)
    if a.rescore_real:
        res = rescore_real(a.out_dir, _real_dir(a.real_dir))
        print(markdown(res))
        return 0
    if a.render_only:
        res = json.loads((a.out_dir / "report.json").read_text())
        res["best_steps"] = _best_steps(a.out_dir)
        (a.out_dir / "report.md").write_text(markdown(res))
        print(markdown(res))
        return 0
    res = run_gap_report(
        a.out_dir,
        real_dir=_real_dir(a.real_dir),
        n_frames=a.frames,
        size=a.size,
        steps=a.steps,
        image_size=a.image_size,
        augment_variants=a.augment_variants,
        seed=a.seed,
    )
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
