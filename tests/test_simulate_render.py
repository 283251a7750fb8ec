"""Rendering: indicator, fixed intensity scale, exact ground truth under geometric defects."""

import numpy as np
import pytest
from scipy import ndimage

from calseg.simulate.geometry import make_tissue
from calseg.simulate.model import ModelParameters, integrate, setup_tissue
from calseg.simulate.render import (
    DEFECTS,
    INDICATORS,
    NORMAL_APPROX_MIN_E,
    _convolve_nearest,
    _gauss,
    active_mask,
    hill,
    render_video,
    shot_noise,
)


@pytest.fixture(scope="module")
def wave_tissue():
    """A 128x128 pouch in the waves class, 40 frames at 5 s spanning a wave."""
    tissue = make_tissue(128, 128, 50, "pouch", np.random.default_rng(0))
    prm = ModelParameters()
    st = setup_tissue(
        tissue.n_cells, "waves", prm, np.random.default_rng(1), np.random.default_rng(2)
    )
    c = integrate(tissue.laplacian, st.vplc, st.state0, np.arange(0, 3600.01, 5.0))["c"]
    frac = (c > 0.1).mean(axis=0)
    start = int(np.argmax(frac[60:] > 0.3)) + 60 - 15  # window around a wave
    return tissue, c[:, start : start + 48]


def test_hill_half_activation_at_kd():
    for name, spec in INDICATORS.items():
        assert hill(np.array([spec.kd_uM]), name)[0] == pytest.approx(0.5), name
    # GCaMP6s is far more sensitive at resting Ca2+ (0.06 uM) than GCaMP6f.
    assert hill(np.array([0.06]), "GCaMP6s")[0] > 2 * hill(np.array([0.06]), "GCaMP6f")[0]


def test_clean_render_fixed_scale_and_exact_labels(wave_tissue):
    tissue, c = wave_tissue
    img, lab, cal, meta = render_video(
        tissue, c, np.random.default_rng(5), 5.0, 40, "GCaMP6s", defect_severity=0.0
    )
    assert img.dtype == np.uint16 and img.shape == (40, 128, 128)
    assert lab.dtype == np.uint32 and lab.shape == img.shape
    assert all(v["severity"] == 0 for k, v in meta["defects"].items() if k in DEFECTS)
    act = cal > 0.1
    assert act.any(axis=0).sum() > 5 and (~act).all(axis=0).sum() > 0  # active and quiet frames
    for t in range(40):
        ids = set(np.unique(lab[t]).tolist()) - {0}
        assert ids == set((np.flatnonzero(act[:, t]) + 1).tolist())
        # Labelled pixels are exactly those of the active cells in the label image.
        assert np.array_equal(lab[t] > 0, np.isin(tissue.labels, np.flatnonzero(act[:, t]) + 1))
    # No per-frame normalisation: the frame mean follows the active fraction.
    means = img.reshape(40, -1).mean(axis=1)
    assert np.corrcoef(means, act.mean(axis=0))[0, 1] > 0.95
    assert img.max() < 65535  # no saturation without the defect


def test_defects_move_labels_with_image(wave_tissue):
    tissue, c = wave_tissue
    img, lab, cal, meta = render_video(
        tissue, c, np.random.default_rng(7), 5.0, 40, "GCaMP6f", defect_severity=1.0
    )
    d = meta["defects"]
    assert set(DEFECTS) <= set(d)
    assert all(0 < d[k]["severity"] <= 1 for k in DEFECTS)  # severity 1: every defect present
    src = np.asarray(meta["frame_source_index"])
    assert np.all(np.diff(src) >= 0) and src[-1] <= c.shape[1] - 1
    assert np.array_equal(cal, c[:, src])  # calcium at the frames shown
    act = active_mask(cal)
    moved = np.abs(np.asarray(d["drift"]["shift_px_per_frame"])).max() > 0.5
    assert moved
    for t in range(40):
        ids = set(np.unique(lab[t]).tolist()) - {0}
        assert ids <= set((np.flatnonzero(act[:, t]) + 1).tolist())
    # The labels moved: some frame differs from the unmoved active-cell mask.
    still = np.stack([np.isin(tissue.labels, np.flatnonzero(act[:, t]) + 1) for t in range(40)])
    assert (still != (lab > 0)).any()


def test_eight_bit_output(wave_tissue):
    tissue, c = wave_tissue
    img, _, _, meta = render_video(
        tissue, c, np.random.default_rng(1), 5.0, 10, "GCaMP6m", defect_severity=0.0, bit_depth=8
    )
    assert img.dtype == np.uint8
    assert meta["defects"]["camera"]["adc_bits"] == 8
    assert 0 < img.mean() < 200


def test_hysteresis_extends_activity():
    c = np.array([[0.05, 0.2, 0.09, 0.07, 0.2]])
    assert active_mask(c).tolist() == [[False, True, False, False, True]]
    assert active_mask(c, 0.1, 0.08).tolist() == [[False, True, True, False, True]]


def test_shot_noise_normal_approximation_matches_poisson():
    """Above NORMAL_APPROX_MIN_E the normal approximation keeps the Poisson mean (within 4
    standard errors) and variance (within 2 %); below it the draw is exact Poisson."""
    rng = np.random.default_rng(3)
    n = 200_000
    for lam in (60.0, 500.0, 3000.0):
        assert lam > NORMAL_APPROX_MIN_E
        e = shot_noise(np.full(n, lam, np.float32), rng)
        assert e.dtype == np.float32 and np.array_equal(e, np.rint(e))  # whole electrons
        assert abs(e.mean() - lam) < 4 * np.sqrt(lam / n), lam
        assert e.var() == pytest.approx(lam, rel=0.02), lam
        # Same moments as true Poisson draws at this size (two-sample check).
        p = rng.poisson(lam, n)
        assert abs(e.mean() - p.mean()) < 6 * np.sqrt(lam / n), lam
        assert e.var() == pytest.approx(p.var(), rel=0.03), lam
    # Dim pixels (5 e-) are exact Poisson: P(0) = exp(-5), which a normal draw would not give.
    e = shot_noise(np.full(n, 5.0, np.float32), rng)
    assert (e == 0).mean() == pytest.approx(np.exp(-5.0), abs=4 * np.sqrt(np.exp(-5.0) / n))
    assert e.mean() == pytest.approx(5.0, abs=0.05) and e.var() == pytest.approx(5.0, rel=0.03)


def test_opencv_filters_match_scipy():
    rng = np.random.default_rng(4)
    img = rng.random((67, 90)).astype(np.float32)
    for sigma, truncate in ((4.0, 4.0), (1.3, 3.0), (2.6, 3.0)):
        ref = ndimage.gaussian_filter(img, sigma, truncate=truncate)
        assert np.abs(_gauss(img, sigma, truncate) - ref).max() < 1e-5
    for length in (3, 6, 11):  # odd and even kernels: same origin as scipy
        k = np.zeros((length, length), np.float32)
        k[length // 2, :] = 1.0
        k = ndimage.rotate(k, 37.0, reshape=False, order=1)
        k /= k.sum()
        ref = ndimage.convolve(img, k, mode="nearest")
        assert np.abs(_convolve_nearest(img, k) - ref).max() < 1e-5


def test_seed_reproduces_and_threads_do_not_change_output(wave_tissue):
    tissue, c = wave_tissue
    runs = [
        render_video(tissue, c, np.random.default_rng(9), 5.0, 12, defect_severity=1.0, n_threads=k)
        for k in (1, 2, 2)
    ]
    for img, lab, _cal, meta in runs[1:]:
        assert np.array_equal(img, runs[0][0]) and np.array_equal(lab, runs[0][1])
        assert meta == runs[0][3]
    other = render_video(tissue, c, np.random.default_rng(10), 5.0, 12, defect_severity=1.0)
    with pytest.raises(ValueError, match="n_threads"):
        render_video(tissue, c, np.random.default_rng(9), 5.0, 12, n_threads=0)
    assert not np.array_equal(other[0], runs[0][0])
