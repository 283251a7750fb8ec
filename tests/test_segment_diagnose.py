"""Why a segmentation is empty, with measured next steps (calseg.segment.diagnose)."""

from __future__ import annotations

import numpy as np
import pytest

from calseg.segment.diagnose import (
    activity_map,
    cli_flags,
    explain_empty,
    explain_masks_rejected,
    noise_pass_fraction,
    regions_above,
)


def test_regions_above_counts_like_the_classical_method() -> None:
    z = np.zeros((3, 20, 20), np.float32)
    z[0, 2:6, 2:6] = 9.0  # 16 px region
    z[1, 10:12, 10:12] = 9.0  # 4 px: too small at min_region_px 15
    z[2, 0, 0] = 4.0  # below threshold 5
    assert regions_above(z, 5.0, 15) == (1, 1, 20, 16)
    assert regions_above(z, 3.0, 4) == (2, 2, 21, 16)
    assert activity_map(z)[2, 2] == 9.0 and activity_map(z).shape == (20, 20)


def test_explain_empty_says_why_and_counts_what_would_change() -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(100, 1, size=(12, 32, 32)).astype(np.float32)
    z = rng.normal(0, 1, size=frames.shape).astype(np.float32)
    z[4, 10:14, 10:14] = 4.5  # a 16 px region that a threshold of 4 would keep
    d = explain_empty(frames, z, z / 100, threshold_k=5.0, min_region_px=15)
    assert "no pixel rose above the activity threshold" in d.reason
    assert "{" not in d.reason and all("{" not in s.expected for s in d.suggestions)
    assert "12 frames" in d.reason  # short recording said
    # a noise field has no cell on its mean projection: --target cells, measured to find
    # nothing, is not offered (it was, predicting "0 regions", on fissa A01); the reason says so
    assert "the cells target finds no region on the mean projection either" in d.reason
    assert all(s.params != {"target": "cells"} for s in d.suggestions)
    lower = [s for s in d.suggestions if "threshold_k" in s.params]
    assert lower[0].params == {"threshold_k": 4.0} and "1 region of >= 15 px" in lower[0].expected
    assert lower[0].command("rec.tif", "out") == "calseg segment rec.tif out --threshold-k 4"
    assert d.to_dict("rec.tif")["suggestions"][0]["command"].endswith("--threshold-k 4")
    # paths are quoted so that the printed command runs when pasted
    assert (
        lower[0]
        .command("my data/rec 1.tif", "out dir")
        .startswith("calseg segment 'my data/rec 1.tif' 'out dir' ")
    )


def test_sam2_keeping_no_mask_points_to_the_classical_method() -> None:
    recs = [{"kept": False, "reason": "no-object"}] * 3 + [{"kept": False, "reason": "too-large"}]
    d = explain_masks_rejected(recs, 5, "SAM2 untuned (random weights)")
    assert "kept none of its 4 masks" in d.reason and "no-object 3" in d.reason
    assert "random weights" in d.reason and d.max_z is None
    assert d.suggestions[0].params == {"method": "classical"}
    assert "5 cells" in d.suggestions[0].expected


def test_flags_and_noise_rate() -> None:
    assert cli_flags({"target": "cells", "threshold_k": 3.0, "nwb": True}) == (
        "--target cells --threshold-k 3 --nwb"
    )
    assert noise_pass_fraction(3.0) == pytest.approx(0.00135, rel=1e-2)


def test_a_lower_threshold_that_changes_nothing_is_not_suggested() -> None:
    z = np.zeros((4, 16, 16), np.float32)
    z[1, 0:2, 0:3] = 6.0  # 6 px above 5: too small for min_region_px 15 at any threshold
    d = explain_empty(np.zeros_like(z), z, z, threshold_k=5.0, min_region_px=15)
    assert "regions of at most 6 pixels" in d.reason and "{" not in d.reason
    assert "a threshold of 3 noise SDs would not pass a region of 15 px either" in d.reason
    assert [s.params for s in d.suggestions] == [{"min_region_px": 6}]  # no cells on zeros
