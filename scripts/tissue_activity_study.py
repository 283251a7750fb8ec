"""Fraction of cells ever active per pattern class on pouches of the published size (issue 17
item 4).

``python scripts/tissue_activity_study.py [--seeds 100:112] [--cell-area-px 100]
[--coupling-scale 1.0] [--classes spikes,transients,waves,fluttering] [--initial-state zero]``
builds one pouch of ~3255 cells (the published large pouch, DESIGN.md section 2) per seed at the
given rendered mean cell area, integrates each class for 3600 s with the published forward Euler
(dt 0.2 s) and prints the percentage of cells with c > 0.1 uM at any sampled time (every 5 s by
default), then the mean, SD, min and max over seeds. ``--coupling-scale`` multiplies the
Laplacian (edge weights), to measure how steep the fractions are in the coupling.
``--initial-state rest`` starts every cell at c ~ U(0.055, 0.059) uM and p ~ U(0.07, 0.09) uM
(the initial state of one version of the published ``Pouch.simulate``; DESIGN.md section 2 and
CalSeg start at c = p = 0), r ~ U(0.5, 0.7) in both. ``--ktau`` / ``--taumax`` replace the IP3R
recovery constants, ``--sample-s`` the sampling interval of c and ``--jitter`` the centroid
jitter of ``make_tissue`` (1 gives about 50 % six-sided interior cells, the published pouch
51 %, the default 0.5 about 76 %). The draws of a class depend on its place in
``--classes``: compare runs with the same list. Published: spikes ~3 %, transients ~23 %,
waves and fluttering 100 %.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from calseg.simulate.geometry import make_tissue
from calseg.simulate.model import ModelParameters, TissueState, integrate_batch, setup_tissue

POUCH_AT_204_PX = (620, 430, 860)
"""A pouch of 620 x 430 px with 204 px cells holds ~860 cells (a published size)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seeds", default="100:112", help="first:last (exclusive)")
    ap.add_argument("--cell-area-px", type=float, default=100.0)
    ap.add_argument("--n-cells", type=int, default=3255)
    ap.add_argument("--coupling-scale", type=float, default=1.0)
    ap.add_argument("--classes", default="spikes,transients,waves,fluttering")
    ap.add_argument("--initial-state", default="zero", choices=["zero", "rest"])
    ap.add_argument("--sample-s", type=float, default=5.0, help="sampling interval (s)")
    ap.add_argument("--ktau", type=float, default=None, help="IP3R recovery Ca2+ (uM)")
    ap.add_argument("--taumax", type=float, default=None, help="IP3R recovery time (s)")
    ap.add_argument(
        "--jitter", type=float, default=0.5, help="centroid jitter of make_tissue (lattice units)"
    )
    a = ap.parse_args()
    first, last = (int(x) for x in a.seeds.split(":"))
    classes = a.classes.split(",")
    h0, w0, n0 = POUCH_AT_204_PX
    k = np.sqrt(a.n_cells * a.cell_area_px / (n0 * 204.0))
    height, width = int(h0 * k), int(w0 * k)
    given = {k: v for k, v in (("ktau", a.ktau), ("taumax", a.taumax)) if v is not None}
    prm = ModelParameters(**given)
    rows = []
    print(
        "per class: % of cells with c > 0.1 uM at any time in 3600 s "
        f"(sampled every {a.sample_s:g} s)"
    )
    for seed in range(first, last):
        t0 = time.perf_counter()
        tissue = make_tissue(
            height, width, a.cell_area_px, "pouch", np.random.default_rng(seed), jitter=a.jitter
        )
        six = 100.0 * float((tissue.degree[~tissue.boundary] == 6).mean())
        setups = [
            setup_tissue(
                tissue.n_cells,
                cl,
                prm,
                np.random.default_rng([0, seed, i]),
                np.random.default_rng([1, seed, i]),
            )
            for i, cl in enumerate(classes)
        ]
        if a.initial_state == "rest":  # c, p near rest; r as drawn (same stream as "zero")
            for i, st in enumerate(setups):
                rng = np.random.default_rng([2, seed, i])
                n = tissue.n_cells
                st.state0 = TissueState(
                    rng.uniform(0.055, 0.059, n), rng.uniform(0.07, 0.09, n), st.state0.r
                )
        lap = tissue.laplacian * a.coupling_scale
        cs = integrate_batch([lap] * len(classes), setups, np.arange(0, 3600.01, a.sample_s), prm)
        ever = [100.0 * float((c > 0.1).any(axis=1).mean()) for c in cs]
        rows.append(ever)
        parts = " ".join(f"{cl} {e:.1f} %" for cl, e in zip(classes, ever, strict=True))
        print(
            f"seed {seed}: {tissue.n_cells} cells ({six:.0f} % of interior cells six-sided), "
            f"{parts} ({time.perf_counter() - t0:.0f} s)"
        )
    arr = np.array(rows)
    for i, cl in enumerate(classes):
        col = arr[:, i]
        sd = col.std(ddof=1) if col.size > 1 else 0.0
        print(
            f"{cl}: mean {col.mean():.1f} %, SD {sd:.1f}, {col.min():.1f}-{col.max():.1f} % "
            f"over {col.size} pouches"
        )


if __name__ == "__main__":
    main()
