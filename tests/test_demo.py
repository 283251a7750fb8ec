"""make demo helpers: the frame the page screenshot opens at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from calseg.demo import busiest_frame, busiest_frame_of_job


def _stack() -> np.ndarray:
    """(6, 8, 8) stack: frame 4 has 12 labelled pixels (two cells), frame 1 has 4, rest 0."""
    labels = np.zeros((6, 8, 8), np.uint16)
    labels[1, 0:2, 0:2] = 1
    labels[4, 0:2, 0:3] = 1
    labels[4, 5:7, 5:8] = 7
    return labels


def test_busiest_frame_known_answer() -> None:
    assert busiest_frame(_stack()) == 4
    assert busiest_frame(np.zeros((5, 4, 4), np.uint16)) == 0  # no cells: the first frame
    assert busiest_frame(np.ones((4, 4), np.uint16)) == 0  # one label image
    with pytest.raises(ValueError, match="shape"):
        busiest_frame(np.zeros(4))


def test_busiest_frame_of_job_reads_labels_artifact(tmp_path: Path) -> None:
    (tmp_path / "jobs" / "j1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "jobs" / "j1" / "labels.tif", _stack())
    job = {"artifacts": [{"name": "labels.tif", "relpath": "jobs/j1/labels.tif"}]}
    assert busiest_frame_of_job(job, tmp_path) == 4
    assert busiest_frame_of_job({"artifacts": []}, tmp_path) is None
