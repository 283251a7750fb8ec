"""The pattern rules on 80 simulated recordings of known class (``make reliability``).

It lived in tests/test_patterns.py until 2026-12-07, where ``make test`` deselected it (it is
marked reliability) and ``make reliability`` (tests/reliability only) never collected it: no
run checked it. The same numbers: ``calseg validate-patterns --seeds 200-219`` (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from calseg.pipelines.validate_patterns import validate_patterns


@pytest.mark.reliability
def test_pattern_rules_on_20_held_out_seeds():
    """80 simulated recordings (seeds 200-219, never used for tuning): the confusion matrix of
    BENCHMARKS.md (accuracy 0.925; fluttering 20/20, waves 20/20; 0.938 and 19/20 before the
    published coupling of 44529d7)."""
    rep = validate_patterns(list(range(200, 220)))
    m = np.asarray(rep["matrix"])
    assert m[3, 3] == 20, rep["matrix"]  # fluttering
    assert m[2, 2] >= 19, rep["matrix"]  # waves
    assert m[0, 3] == m[1, 3] == m[2, 3] == 0  # nothing else is called fluttering
    assert rep["accuracy"] >= 0.9, rep["matrix"]
