"""CalSeg's calcium model on the published pouch itself (issue 17 item 4).

``python scripts/published_pouch_study.py --vertices new_vertices.npy [--seeds 100:124]
[--uniform-weights]``

``new_vertices.npy`` is the published large pouch: 3255 Voronoi polygons (source pixels) after
6 Lloyd iterations on segmented wing-disc centroids, saved by the Figure S1 notebook of
github.com/MulticellularSystemsLab/MSELab_Calcium_Cartography_2021 (folder "epitools (Figure S1
Creation)"); it is not shipped with CalSeg. That notebook weights the edge between two cells by
the length of the intersection of their polygons when it is a line. Here an edge is a polygon
side that exactly two cells share (vertices matched to 1e-6 px), its weight the side's length;
on this file that gives the same 9558 pairs as the notebook's rule, lengths within 1e-6 px
(checked with shapely, which CalSeg does not need).

The script prints the pouch's statistics beside those of a CalSeg pouch of the same cell count
(``make_tissue``, 100 px cells, weights as ``tissue_from_labels`` gives them), then integrates
spikes and transients on the published Laplacian for each seed with the published Euler (dt
0.2 s, 3600 s) and prints the percentage of cells with c > 0.1 uM at any sampled time (every
5 s), as ``scripts/tissue_activity_study.py`` does for CalSeg's pouches (same random streams per
class). ``--uniform-weights`` gives every edge the mean length, keeping only the neighbour
graph.

Measured (2026-12-07): mean cell area 223.8 px, mean degree 5.87, summed edge weight per
interior cell 57.2 source px (CalSeg's seed-0 pouch: 56.6); transients 21.1 % (SD 5.4, 24
seeds, 100-123), spikes 3.0 % (SD 0.2). With ``--uniform-weights`` (12 seeds, 100-111):
transients 21.2 % (SD 4.5).

The file is a NumPy object array (pickle). It is read by an unpickler that knows four names
(``numpy.dtype``, ``numpy.ndarray``, ``_reconstruct`` and its old module path) and maps them to
stand-ins: no NumPy constructor or ``__setstate__`` ever sees the file's data. Only the exact
pickled states of the object and float64 dtypes are accepted, the sizes are checked, and the
arrays are built with ``np.frombuffer`` from checked bytes. A file that names any other
callable, or crafts a dtype state (e.g. an object dtype without its reference-counting flags,
which would make raw bytes pointers), is refused before any array is built; so are files over
64 MiB, more than 100,000 polygons or 10^7 values (counted at every reference), NaN vertices
and state set on anything but an array stand-in.
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from calseg.simulate.geometry import make_tissue
from calseg.simulate.model import ModelParameters, integrate_batch, setup_tissue

MAX_VALUES = 10_000_000
"""At most this many values (80 MB of float64) in all the file's arrays together, counting an
array each time the pickle refers to it, and an empty one as 1; the published file holds about
50,000."""

MAX_POLYGONS = 100_000
"""At most this many polygons (cells); the published pouch has 3255, CalSeg tissues <= 5000."""

MAX_FILE_BYTES = 64 * 2**20
"""At most this many bytes in the file; the published one has 491,732."""

_CANONICAL_DTYPES = {
    args[0]: state
    for _, args, state in (np.dtype(object).__reduce__(), np.dtype("<f8").__reduce__())
}
"""The pickled state of the two dtypes the file may use: object (the outer array) and float64."""


class _Dtype:
    """Stand-in for ``numpy.dtype`` while unpickling: resolved only to ``object`` or float64,
    and only when its pickled state is exactly theirs (a crafted state, e.g. an object dtype
    without its reference-counting flags, would let raw bytes be read as pointers)."""

    def __init__(self, name: object, align: object = False, copy: object = True) -> None:
        self.name, self.state = name, None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def resolve(self) -> np.dtype:
        if not (
            isinstance(self.name, str)
            and self.name in _CANONICAL_DTYPES
            and self.state == _CANONICAL_DTYPES[self.name]
        ):
            name = self.name if isinstance(self.name, str) else type(self.name).__name__
            raise pickle.UnpicklingError(
                f"refused dtype {name[:20]!r} or its state: only object arrays of float64 arrays "
                "are read"
            )
        return np.dtype(object) if self.name == "O8" else np.dtype("<f8")


class _NdarrayClass:
    """Stand-in for ``numpy.ndarray`` (the class argument of ``_reconstruct``)."""


class _Array:
    """Stand-in for an array while unpickling; :meth:`resolve` builds the real one from
    checked parts, so NumPy's own ``__setstate__`` never sees the file's bytes."""

    def __init__(self) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def resolve(self, budget: list[int], depth: int = 0) -> np.ndarray:
        """The array; ``budget[0]`` (values still allowed) is reduced by its size."""
        st = self.state
        if not (isinstance(st, tuple) and len(st) == 5 and isinstance(st[2], _Dtype)):
            raise pickle.UnpicklingError("refused: not a NumPy array's pickled state")
        _, shape, dtype, fortran, data = st
        if not (
            isinstance(shape, tuple)
            and len(shape) <= 2
            and all(type(n) is int and 0 <= n <= MAX_VALUES for n in shape)
            and type(fortran) is bool
        ):
            raise pickle.UnpicklingError("refused: not the shape of a polygon or of a polygon list")
        n = math.prod(shape)  # Python ints: no overflow
        budget[0] -= max(n, 1)
        if budget[0] < 0:
            raise pickle.UnpicklingError(f"refused: more than {MAX_VALUES} values in all")
        order = "F" if fortran else "C"
        dt = dtype.resolve()
        if dt == np.dtype("<f8"):
            if isinstance(data, str):  # a Python 2 pickle read with encoding="latin1"
                data = data.encode("latin1")
            if not isinstance(data, bytes) or len(data) != 8 * n:
                raise pickle.UnpicklingError("refused: float64 data of the wrong size")
            return np.frombuffer(data, "<f8").reshape(shape, order=order).copy()
        if n > MAX_POLYGONS:
            raise pickle.UnpicklingError(f"refused: more than {MAX_POLYGONS} polygons")
        if depth > 0 or not isinstance(data, list) or len(data) != n:
            raise pickle.UnpicklingError("refused: an object array must hold float64 arrays")
        out = np.empty(n, dtype=object)
        for i, item in enumerate(data):
            if not isinstance(item, _Array):
                raise pickle.UnpicklingError("refused: an object array must hold float64 arrays")
            out[i] = item.resolve(budget, depth + 1)
        return out.reshape(shape, order=order)


def _reconstruct(cls: object, shape: object, typecode: object) -> _Array:
    if cls is not _NdarrayClass:
        raise pickle.UnpicklingError("refused: _reconstruct of something else than ndarray")
    return _Array()


_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _Dtype,
}


class _ArraysOnly(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked
    """Maps the four names to the stand-ins, and sets state only on stand-in instances (BUILD
    on the stand-in classes or on ``_reconstruct`` would change them for later reads)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) not in _STAND_INS:
            raise pickle.UnpicklingError(
                f"refused {str(module)[:60]}.{str(name)[:60]}: only NumPy arrays are read"
            )
        return _STAND_INS[(module, name)]

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], (_Array, _Dtype)):
            raise pickle.UnpicklingError("refused: state set on something else than an array")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def read_polygons(path: Path) -> list[np.ndarray]:
    """Polygons of the published pouch: a list of (K_i, 2) float64 vertex arrays (source px).

    Raises:
        pickle.UnpicklingError: the file holds anything but an object array of float64 arrays
            in NumPy's own pickled form (checked before any array is built).
    """
    if path.stat().st_size > MAX_FILE_BYTES:
        raise pickle.UnpicklingError(f"refused: larger than {MAX_FILE_BYTES} bytes")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            else:
                header = np.lib.format.read_array_header_2_0(f)
            if header[2] != np.dtype(object):
                raise pickle.UnpicklingError("refused: not an object array (dtype in the header)")
            obj = _ArraysOnly(f, encoding="latin1").load()
        if not isinstance(obj, _Array):
            raise pickle.UnpicklingError("refused: the file does not hold an array")
        arr = obj.resolve([MAX_VALUES])
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused"):
            raise
        raise pickle.UnpicklingError(
            f"refused: not a NumPy .npy of polygons (pickle: {str(e)[:80]})"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, EOFError, RecursionError, MemoryError,
            AttributeError, OverflowError) as e:  # fmt: skip
        raise pickle.UnpicklingError(
            f"refused: not a NumPy .npy of polygons ({type(e).__name__})"
        ) from None
    if arr.dtype != object or arr.ndim != 1:
        raise pickle.UnpicklingError("refused: expected a 1-D object array of polygons")
    polys = list(arr)
    if not all(p.ndim == 2 and p.shape[1] == 2 and p.shape[0] >= 3 for p in polys):
        raise pickle.UnpicklingError("refused: every polygon must be (K >= 3, 2) vertices")
    if not all(np.isfinite(p).all() for p in polys):
        raise pickle.UnpicklingError("refused: a vertex is NaN or infinite")
    return polys


def polygon_laplacian(polys: list[np.ndarray]) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Laplacian of shared side lengths (source px), (N,) areas (px) and (N,) perimeters (px)."""
    owners: dict[tuple, list[int]] = {}
    for c, p in enumerate(polys):
        for a, b in zip(p, np.roll(p, -1, axis=0), strict=True):
            ka, kb = tuple(np.round(a, 6)), tuple(np.round(b, 6))
            owners.setdefault((ka, kb) if ka < kb else (kb, ka), []).append(c)
    rows, cols, vals = [], [], []
    for (a, b), cells in owners.items():
        if len(cells) == 2:
            rows.append(cells[0])
            cols.append(cells[1])
            vals.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
    n = len(polys)
    w = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    w = (w + w.T).tocsr()
    lap = (w - sp.diags(np.asarray(w.sum(axis=1)).ravel())).tocsr()
    x = [p[:, 0] for p in polys]
    y = [p[:, 1] for p in polys]
    areas = np.array(
        [
            0.5 * abs(np.dot(a, np.roll(b, 1)) - np.dot(b, np.roll(a, 1)))
            for a, b in zip(x, y, strict=True)
        ]
    )
    perim = np.array([np.hypot(*np.diff(np.vstack([p, p[:1]]), axis=0).T).sum() for p in polys])
    return lap, areas, perim


def describe(name: str, lap: sp.csr_matrix, areas: np.ndarray, interior: np.ndarray) -> None:
    w = lap.copy()
    w.setdiag(0)
    w.eliminate_zeros()
    deg = np.diff(w.indptr)
    coupling = -lap.diagonal()
    share = {k: float((deg[interior] == k).mean()) for k in (4, 5, 6, 7, 8)}
    print(
        f"{name}: {areas.size} cells, mean area {areas.mean():.1f} px (CV interior "
        f"{areas[interior].std() / areas[interior].mean():.2f}), mean degree {deg.mean():.2f}, "
        f"interior sides " + " ".join(f"{k}:{v:.2f}" for k, v in share.items()) + ", "
        f"summed edge weight per interior cell {coupling[interior].mean():.1f} source px"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=Path, required=True, help="the published new_vertices.npy")
    ap.add_argument("--seeds", default="100:124", help="first:last (exclusive)")
    ap.add_argument("--uniform-weights", action="store_true")
    a = ap.parse_args()
    polys = read_polygons(a.vertices)
    lap, areas, perim = polygon_laplacian(polys)
    interior = -lap.diagonal() > 0.98 * perim  # every side shared
    describe("published pouch", lap, areas, interior)
    ours = make_tissue(845, 586, 100.0, "pouch", np.random.default_rng(0))
    describe("CalSeg pouch (seed 0)", ours.laplacian, ours.areas.astype(float), ~ours.boundary)
    if a.uniform_weights:
        w = lap.copy()  # off-diagonal entries are the (positive) edge weights
        w.setdiag(0)
        w.eliminate_zeros()
        w.data[:] = w.data.mean()
        lap = (w - sp.diags(np.asarray(w.sum(axis=1)).ravel())).tocsr()
    prm = ModelParameters()
    n = len(polys)
    first, last = (int(x) for x in a.seeds.split(":"))
    rows = []
    print(f"per class: % of cells with c > 0.1 uM at any time in 3600 s (sampled every {5.0:g} s)")
    for seed in range(first, last):
        t0 = time.perf_counter()
        setups = [
            setup_tissue(
                n, cl, prm, np.random.default_rng([0, seed, i]), np.random.default_rng([1, seed, i])
            )
            for i, cl in enumerate(("spikes", "transients"))
        ]
        cs = integrate_batch([lap, lap], setups, np.arange(0, 3600.01, 5.0), prm)
        ever = [100.0 * float((c > 0.1).any(axis=1).mean()) for c in cs]
        rows.append(ever)
        print(
            f"seed {seed}: spikes {ever[0]:.1f} %, transients {ever[1]:.1f} % "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    arr = np.array(rows)
    for i, cl in enumerate(("spikes", "transients")):
        col = arr[:, i]
        sd = f"SD {col.std(ddof=1):.1f}" if col.size > 1 else "one seed, no SD"
        print(f"{cl}: mean {col.mean():.1f} %, {sd}, {col.min():.1f}-{col.max():.1f} %")


if __name__ == "__main__":
    main()
