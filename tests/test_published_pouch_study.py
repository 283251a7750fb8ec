"""scripts/published_pouch_study.py: reading the published pouch's polygons and weighting its
edges as the source does (issue 17 item 4). The published file itself is not shipped; these
tests write small files of the same kind (a NumPy object array of (K, 2) vertex arrays)."""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "published_pouch_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("published_pouch_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save_polygons(path: Path, polys: list[np.ndarray]) -> None:
    arr = np.empty(len(polys), dtype=object)
    for i, p in enumerate(polys):
        arr[i] = np.asarray(p, np.float64)
    np.save(path, arr, allow_pickle=True)


def test_shared_sides_weight_the_edges_and_corners_do_not(study, tmp_path):
    """Two unit squares share a side of length 1 (one edge, weight 1); a third square that
    touches the second only at a corner is no neighbour (the source keeps intersections that
    are lines). A 2 x 1 rectangle beside the first square along its left side: weight 1."""
    a = [[0, 0], [1, 0], [1, 1], [0, 1]]
    b = [[1, 0], [2, 0], [2, 1], [1, 1]]
    c = [[2, 1], [3, 1], [3, 2], [2, 2]]  # corner (2, 1) shared with b only
    d = [[-2, 0], [0, 0], [0, 1], [-2, 1]]
    path = tmp_path / "new_vertices.npy"
    _save_polygons(path, [np.array(p, float) for p in (a, b, c, d)])
    polys = study.read_polygons(path)
    assert len(polys) == 4 and polys[3].shape == (4, 2)
    lap, areas, perim = study.polygon_laplacian(polys)
    w = lap.toarray()
    assert w[0, 1] == pytest.approx(1.0) and w[1, 0] == pytest.approx(1.0)
    assert w[0, 3] == pytest.approx(1.0)
    assert w[1, 2] == 0 and w[0, 2] == 0
    assert np.allclose(w.sum(axis=1), 0)
    assert areas == pytest.approx([1, 1, 1, 2])
    assert perim == pytest.approx([4, 4, 4, 6])


class _RunsACommand:
    def __reduce__(self):
        import os

        return (os.system, ("touch should-not-exist",))


def test_a_file_that_names_another_callable_is_refused(study, tmp_path, monkeypatch):
    """The file is a pickle, so it is read with an unpickler that builds NumPy arrays and
    nothing else: one that names os.system is refused before anything runs."""
    monkeypatch.chdir(tmp_path)
    header = io.BytesIO()  # magic string and header of a 1-element object array
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    path = tmp_path / "hostile.npy"
    path.write_bytes(header.getvalue() + pickle.dumps(_RunsACommand(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="only NumPy arrays"):
        study.read_polygons(path)
    assert not (tmp_path / "should-not-exist").exists()


class _ObjectDtypeWithoutRefcountFlags:
    def __reduce__(self):
        return (np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))


class _ObjectArrayOfRawPointer:
    """An object array whose data is 8 raw bytes: with NumPy's own unpickling and the crafted
    dtype above, those bytes become a pointer that is dereferenced (a helper's review found
    the first arrays-only unpickler crashed with a segfault on it)."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        state = (1, (1,), _ObjectDtypeWithoutRefcountFlags(), False, b"AAAAAAAA")
        return (_reconstruct, (np.ndarray, (0,), b"b"), state)


def _npy_with_pickle(path: Path, obj: object) -> Path:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    path.write_bytes(header.getvalue() + pickle.dumps(obj, protocol=4))
    return path


def test_a_crafted_dtype_state_is_refused_before_any_array_is_built(study, tmp_path):
    """Only NumPy's names, but an object dtype whose pickled flags say it holds no references:
    refused by the dtype check, so no raw bytes are ever read as a pointer."""
    path = _npy_with_pickle(tmp_path / "crafted.npy", _ObjectArrayOfRawPointer())
    with pytest.raises(pickle.UnpicklingError, match="refused dtype 'O8'"):
        study.read_polygons(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (np.arange(6.0), "1-D object array"),  # a float array, not polygons
        (np.array([np.zeros((2, 2))] + [np.zeros((3, 2))], dtype=object), "K >= 3"),
        (np.arange(4, dtype=np.int32), "refused dtype"),
        ({"polygons": 1}, "does not hold an array"),
    ],
)
def test_anything_but_polygons_is_refused(study, tmp_path, payload, message):
    path = _npy_with_pickle(tmp_path / "other.npy", payload)
    with pytest.raises(pickle.UnpicklingError, match=message):
        study.read_polygons(path)


def test_one_array_referred_to_many_times_counts_each_time(study, tmp_path, monkeypatch):
    """A pickle can refer to one array again and again (its memo): 1000 references to one
    polygon of 1000 vertices are 2,000,000 values built, over a budget of 1,000,000."""
    monkeypatch.setattr(study, "MAX_VALUES", 1_000_000)
    poly = np.zeros((1000, 2))
    arr = np.empty(1000, dtype=object)
    for i in range(1000):
        arr[i] = poly  # the same object: pickled once, then referred to
    path = _npy_with_pickle(tmp_path / "memo.npy", arr)
    assert path.stat().st_size < 100_000
    with pytest.raises(pickle.UnpicklingError, match="more than 1000000 values"):
        study.read_polygons(path)


def test_too_many_polygons_nan_vertices_and_cut_files_are_refused_clearly(
    study, tmp_path, monkeypatch
):
    """From a new user's attack run: 1.43 M references to one triangle were accepted (and would
    have been simulated as 1.43 M cells), NaN vertices passed, and a cut file or a bad header
    raised NumPy's or pickle's own errors; each is now a refusal that says what is wrong."""
    monkeypatch.setattr(study, "MAX_POLYGONS", 10)
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    many = np.empty(11, dtype=object)
    for i in range(11):
        many[i] = tri
    with pytest.raises(pickle.UnpicklingError, match="more than 10 polygons"):
        study.read_polygons(_npy_with_pickle(tmp_path / "many.npy", many))
    nan = np.empty(1, dtype=object)
    nan[0] = np.array([[0.0, 0.0], [np.nan, 0.0], [0.0, 1.0]])
    with pytest.raises(pickle.UnpicklingError, match="NaN or infinite"):
        study.read_polygons(_npy_with_pickle(tmp_path / "nan.npy", nan))
    good = _npy_with_pickle(tmp_path / "good.npy", many[:3])
    assert len(study.read_polygons(good)) == 3
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(pickle.UnpicklingError, match="not a NumPy .npy of polygons"):
        study.read_polygons(cut)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((4, 2)))
    with pytest.raises(pickle.UnpicklingError, match="not an object array"):
        study.read_polygons(floats)


def test_state_is_set_only_on_array_stand_ins(study, tmp_path):
    """pickle's BUILD on the stand-in classes would change them for later reads in the same
    process; it is refused, and a later read still works."""
    path = tmp_path / "build.npy"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    # GLOBAL numpy.dtype, then BUILD with a dict on it (no instance made), then STOP
    path.write_bytes(header.getvalue() + b"cnumpy\ndtype\n}X\x07\x00\x00\x00resolveK\x01sb.")
    with pytest.raises(pickle.UnpicklingError, match="state set on something else"):
        study.read_polygons(path)
    tri = np.empty(1, dtype=object)
    tri[0] = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert len(study.read_polygons(_npy_with_pickle(tmp_path / "after.npy", tri))) == 1
