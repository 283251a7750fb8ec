"""Suite2p side by side (calseg.bench_peers): the ROI conversion and the shift back into the raw
frames, without Suite2p; the section without Suite2p prints how to install it."""

import numpy as np
import pytest

from calseg import bench_peers
from calseg.bench_peers import (
    equivalent_diameter_px,
    rois_to_labels,
    shift_labels,
    to_int16,
)


def _roi(ys, xs, lam=None) -> dict:
    ys, xs = np.asarray(ys), np.asarray(xs)
    return {"ypix": ys, "xpix": xs, "lam": np.ones(len(ys)) if lam is None else np.asarray(lam)}


def test_rois_become_labels_and_overlaps_go_to_the_relatively_heavier_roi():
    a = _roi([1, 1, 2], [1, 2, 2], [10.0, 10.0, 2.0])  # pixel (2, 2): 0.2 of a's peak
    b = _roi([2, 3], [2, 3], [1.0, 1.0])  # (2, 2): 1.0 of b's peak
    c = _roi([0, 9], [0, 9])  # (9, 9) is outside a 5 x 5 frame
    labels = rois_to_labels([a, b, c], (5, 5))
    assert labels.dtype == np.uint32 and labels.shape == (5, 5)
    assert labels[1, 1] == labels[1, 2] == 1
    assert labels[2, 2] == 2 and labels[3, 3] == 2
    assert labels[0, 0] == 3
    assert np.count_nonzero(labels) == 5
    assert not rois_to_labels([], (4, 3)).any()


def test_shift_moves_the_ground_truth_into_suite2p_registered_frame_and_back():
    # a raw recording whose cell drifts; Suite2p registers with roll(frame, (-yoff, -xoff))
    rng = np.random.default_rng(0)
    yoff = np.array([0, 2, -3, 1])
    xoff = np.array([0, -1, 4, 5])
    cell = np.zeros((20, 24), np.uint32)
    cell[8:12, 9:14] = 7
    raw = np.stack(
        [np.roll(cell, (int(dy), int(dx)), axis=(0, 1)) for dy, dx in zip(yoff, xoff, strict=True)]
    )
    registered = np.stack(
        [
            np.roll(f, (-int(dy), -int(dx)), axis=(0, 1))
            for f, dy, dx in zip(raw, yoff, xoff, strict=True)
        ]
    )
    assert (registered == cell).all()  # the ROI Suite2p finds is `cell`, in its frame
    noisy = yoff + rng.uniform(-0.3, 0.3, 4)  # rounded to whole pixels
    gt_registered = shift_labels(raw, -noisy, -xoff)
    assert gt_registered.shape == (4, 20, 24) and gt_registered.dtype == np.uint32
    assert (gt_registered == cell).all()  # static: the footprint keeps the whole cell
    assert (shift_labels(cell, noisy, xoff) == raw).all()  # one image into every raw frame
    # shifted without wrapping: what leaves the frame is dropped
    edge = np.zeros((6, 6), np.uint32)
    edge[:, 5] = 1
    out = shift_labels(edge, np.array([0, 0]), np.array([1, -2]))
    assert not out[0].any()
    assert (out[1][:, 3] == 1).all() and out[1].sum() == 6
    with pytest.raises(ValueError):
        shift_labels(raw, yoff[:3], xoff[:3])


def test_int16_input_follows_suite2p_reader():
    u16 = np.array([[[0, 65535, 4001]]], np.uint16)
    assert to_int16(u16).tolist() == [[[0, 32767, 2000]]]
    assert to_int16(np.array([[[255]]], np.uint8)).dtype == np.int16
    assert to_int16(np.array([[[-4e4, 3.6]]])).tolist() == [[[-32768, 4]]]


def test_equivalent_diameter():
    assert equivalent_diameter_px(np.pi * 25) == pytest.approx(10.0)


def test_without_suite2p_the_section_says_how_to_install_and_passes(monkeypatch, capsys):
    monkeypatch.setattr(bench_peers, "suite2p_available", lambda: None)
    from calseg.bench import main as bench_main

    assert bench_main(["--only", "peers", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "pip install -e '.[peers]'" in out and "suite2p==1.1.0" in out


def test_docs_table_is_written_between_the_peers_markers(tmp_path):
    from calseg.bench_accuracy import summarise_rows
    from calseg.bench_peers import ROW_NAMES, TABLE_KEYS, write_docs

    rows = [{k: 0.5 * i for k in TABLE_KEYS} for i in range(3)]
    report = {
        "command": "python -m calseg.bench --only peers",
        "suite2p": "1.1.0",
        "machine": {"git_commit": "abc1234", "cpu_model": "some CPU", "cores_usable": 2},
        "wall_s": 60.0,
        "date": "2026-12-05",
        "videos": [{"video": f"s{10000 + i}"} for i in range(3)],
        "not_run": [{"video": "s10003", "reason": "Suite2p error: (1<=ky && ky<=5) failed"}],
        "summary": {name: summarise_rows(rows, TABLE_KEYS) for name in ROW_NAMES},
    }
    (tmp_path / "BENCHMARKS.md").write_text(
        "a\n<!-- generated:peers -->\nold\n<!-- /generated:peers -->\nb\n"
    )
    text = write_docs(report, tmp_path).read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "old" not in text
    assert "Suite2p 1.1.0, commit abc1234, 3 held-out videos (s10000, s10001, s10002)" in text
    assert "| Suite2p, iscell | 3 | 0.50 [" in text
    assert "not run: s10003: Suite2p error" in text
