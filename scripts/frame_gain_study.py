"""Would a per-frame gain correction help the active target? (issue 17; tried and not adopted).

``python scripts/frame_gain_study.py [--set tuning] [--quiet-fraction Q ...] [--videos 0,3]``
segments the accuracy suite's videos (:func:`calseg.bench_accuracy.suite_specs`; the tuning
set by default, never the held-out one for a choice) with the classical method, ``active``
target, as :mod:`calseg.bench_accuracy` does, once as CalSeg does (additive per-frame offsets,
:func:`calseg.segment.prompts.frame_offsets`) and once per ``Q`` with each frame first mapped
to the reference image's units by a robust affine fit, ``F'_t = (F_t - a_t) / g_t``
(:func:`frame_affine`). Prints per video the per-frame F1 at IoU 0.5 and the peak false
coverage, then the means (:func:`calseg.bench_accuracy.summarise_rows`).

Why it might help: auto-gain, per-frame contrast normalisation, illumination flicker and
photobleaching scale every pixel, which an additive offset cannot remove; the bright pixels of
a brighter frame then read as active (peak false coverage 0.49-0.53 on two tuning videos).
Why it may not: a calcium wave over most of the tissue also brightens most pixels in a frame,
and a gain fitted on them takes the wave away. ``Q`` fits the gain only on the fraction ``Q``
of pixels with the smallest relative temporal range ``(p90 - p10) / median`` (the least
active; ``Q`` = 1: every pixel).

Measured (2026-12-07, 32 tuning videos, seeds 20000-20031; mean per-frame F1 / per-footprint
F1 / peak false coverage): CalSeg's offsets 0.273 / 0.286 / 0.093; affine on all pixels
0.244 / 0.265 / 0.094; on the quietest 30 % 0.278 / 0.298 / 0.085; on the quietest 10 %
0.269 / 0.294 / 0.096. The 30 % variant's +0.005 is within the per-video swings (0.70 -> 0.39
on one waves video with every intensity change, 0.27 -> 0.60 on a contrast-normalised one), so
it was not adopted and the held-out set was not run.

The correction is applied by wrapping :func:`calseg.segment.prompts.compute_activity` for the
run (this script only); nothing in ``calseg`` changes.
"""

from __future__ import annotations

import argparse

import numpy as np

REFERENCE_FRAMES = 64
"""Frames (evenly spaced) whose per-pixel median is the reference image (as
:data:`calseg.segment.prompts.DETREND_REFERENCE_FRAMES`)."""
FIT_PIXELS = 20000
"""Pixels (evenly strided) each frame's fit uses at most."""
TRIM_SD = 2.5
"""Pixels farther than this many robust SDs (1.4826 MAD) from the fit are left out of the next
of its 4 least-squares passes."""


def frame_affine(f: np.ndarray, quiet_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame offset and gain of a recording against its reference image.

    Args:
        f: ``(T, H, W)`` float32 recording (finite).
        quiet_fraction: fit on this fraction of the varying pixels, those of smallest relative
            temporal range (1.0: all of them).

    Returns:
        ``(a, g)``, each ``(T,)`` float64: frame ``t`` is about ``a[t] + g[t] * reference``.
    """
    t_len = f.shape[0]
    ref_idx = np.unique(np.linspace(0, t_len - 1, min(t_len, REFERENCE_FRAMES)).round())
    sample = f[ref_idx.astype(int)]
    ref = np.median(sample, axis=0)
    use = np.ptp(sample, axis=0) > 0  # not padding that never changes
    if not use.any():
        use[:] = True
    if quiet_fraction < 1.0:
        lo, hi = np.percentile(sample, [10, 90], axis=0)
        rel = (hi - lo) / np.maximum(np.abs(ref), 1e-6)
        use &= rel <= np.quantile(rel[use], quiet_fraction)
    idx = np.flatnonzero(use.ravel())
    idx = idx[:: max(1, len(idx) // FIT_PIXELS)]
    x = ref.ravel()[idx].astype(np.float64)
    a, g = np.zeros(t_len), np.ones(t_len)
    for t in range(t_len):
        y = f[t].ravel()[idx].astype(np.float64)
        keep = np.ones(len(x), bool)
        coef = np.array([0.0, 1.0])
        for _ in range(4):
            design = np.stack([np.ones(int(keep.sum())), x[keep]], axis=1)
            coef = np.linalg.lstsq(design, y[keep], rcond=None)[0]
            r = y - (coef[0] + coef[1] * x)
            s = 1.4826 * float(np.median(np.abs(r[keep] - np.median(r[keep])))) + 1e-9
            keep = np.abs(r) < TRIM_SD * s
            if keep.sum() < 100:
                break
        a[t], g[t] = coef
    return a, g


def main() -> None:
    """Command line (module docstring)."""
    import calseg.segment.baseline as baseline
    import calseg.segment.infer as infer
    import calseg.segment.prompts as prompts
    from calseg.bench_accuracy import load_video, score_video, suite_specs, summarise_rows
    from calseg.segment.infer import InferenceConfig, segment_recording

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="tuning", choices=("tuning", "held-out"))
    ap.add_argument("--quiet-fraction", type=float, nargs="*", default=[1.0, 0.3, 0.1])
    ap.add_argument("--videos", default=None, help="comma-separated suite indices")
    args = ap.parse_args()
    specs = suite_specs(args.set)
    if args.videos:
        specs = [specs[int(i)] for i in args.videos.split(",")]
    original = prompts.compute_activity
    state: dict = {"q": None}

    def corrected(frames: np.ndarray, params=None):  # noqa: ANN001, ANN202
        if state["q"] is None:
            return original(frames, params)
        f = np.asarray(frames, dtype=np.float32)
        f = np.where(np.isfinite(f), f, np.float32(np.nanmedian(f)))
        a, g = frame_affine(f, state["q"])
        g = np.where(g > 1e-6, g, 1.0)
        return original(((f - a[:, None, None]) / g[:, None, None]).astype(np.float32), params)

    for module in (prompts, infer, baseline):
        module.compute_activity = corrected
    variants = {"offsets (CalSeg)": None} | {f"affine q={q:g}": q for q in args.quiet_fraction}
    rows: dict[str, list[dict]] = {k: [] for k in variants}
    for spec in specs:
        video, _ = load_video(spec)
        line = [spec.id, spec.pattern_class, spec.intensity, f"severity {spec.defect_severity}"]
        for name, q in variants.items():
            state["q"] = q
            cfg = InferenceConfig(method="classical", target="active")
            out = segment_recording(video.image, cfg)
            s = score_video(out.labels, video.labels, video.cells, "active")
            rows[name].append(s)
            cover = s["peak_false_coverage"]
            line.append(f"{name}: F1 {s['frame_f1']:.3f} false cover {cover:.2f}")
        print(" | ".join(line), flush=True)
    for name, rs in rows.items():
        sm = summarise_rows(rs)
        print(
            f"{name}: {len(rs)} videos, mean per-frame F1 {sm['frame_f1']['mean']:.3f}, "
            f"per-footprint F1 {sm['fp_f1']['mean']:.3f}, "
            f"peak false coverage {sm['peak_false_coverage']['mean']:.3f}"
        )


if __name__ == "__main__":
    main()
