"""Rendering: indicator, fixed intensity scale, exact ground truth under geometric defects,
the chain of named stages with their own random streams, global intensity defects."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from calseg.simulate.config import SimulationConfig
from calseg.simulate.geometry import make_tissue
from calseg.simulate.model import ModelParameters, integrate, setup_tissue
from calseg.simulate.render import (
    DEFAULT_DEFECTS,
    DEFECTS,
    INDICATORS,
    INTENSITY_DEFECTS,
    NORMAL_APPROX_MIN_E,
    Defect,
    RenderError,
    active_mask,
    default_stages,
    hill,
    render_video,
    shot_noise,
    stage_key,
    stage_seed,
)
from calseg.simulate.stages import _convolve_nearest, _gauss


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
    assert all(0 < d[k]["severity"] <= 1 for k in DEFAULT_DEFECTS)  # severity 1: all present
    src = np.asarray(meta["frame_source_index"])
    assert np.all(np.diff(src) >= 0) and src[-1] <= c.shape[1] - 1
    assert np.array_equal(cal, c[:, src])  # calcium at the frames shown
    act = active_mask(cal)
    moved = np.abs(np.asarray(d["drift"]["shift_px_per_frame"])).max() > 0.5
    assert moved
    for t in range(40):
        ids = set(np.unique(lab[t]).tolist()) - {0}
        assert ids <= set((np.flatnonzero(act[:, t]) + 1).tolist())
    # The labels sit on the cells of the image: in frames whose active cells have been active
    # for 4 frames (indicator settled, no moving wave front to bias it) and drifted >= 2 px,
    # the integer shift that puts the labelled pixels on the brightest image pixels is ~0,
    # while the unmoved active-cell mask needs a shift of >= 2 px along the recorded drift.
    shift = np.asarray(d["drift"]["shift_px_per_frame"])

    def best_shift(frame: np.ndarray, mask: np.ndarray, r: int = 6) -> np.ndarray:
        f = frame.astype(np.float64) - frame.mean()
        score = {
            (dy, dx): f[np.roll(mask, (dy, dx), (0, 1))].mean()
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        }
        return np.array(max(score, key=score.get))

    checked = 0
    for t in range(4, 40):
        ids = np.flatnonzero(act[:, t])
        if not len(ids) or act[ids, t - 4 : t].all(axis=1).mean() < 0.9:
            continue
        if np.hypot(*shift[t]) < 2:
            continue
        assert np.abs(best_shift(img[t], lab[t] > 0)).max() <= 1, t
        still = best_shift(img[t], np.isin(tissue.labels, ids + 1))
        assert np.hypot(*still) >= 2 and still @ shift[t] > 0, (t, still, shift[t])
        checked += 1
    assert checked >= 4, checked


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


def test_labels_and_image_move_with_the_recorded_drift(wave_tissue):
    """Only drift on: every labelled pixel shows the cell at its recorded sample position, and
    the image is bright where the moved labels are, not where the cells were before moving."""
    tissue, c = wave_tissue
    img, lab, cal, meta = render_video(
        tissue, c, np.random.default_rng(7), 5.0, 40, defect_severity=0.0,
        defects={"drift": {"severity": 1.0}},
    )  # fmt: skip
    shift = np.asarray(meta["defects"]["drift"]["shift_px_per_frame"])
    assert np.abs(shift).max() > 3
    act = active_mask(cal)
    h, w = tissue.labels.shape
    yy, xx = np.indices((h, w))
    checked = 0
    for t in range(40):
        sy = np.rint(yy - np.float32(shift[t, 0])).astype(int)
        sx = np.rint(xx - np.float32(shift[t, 1])).astype(int)
        inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        seen = np.where(inside, tissue.labels[sy.clip(0, h - 1), sx.clip(0, w - 1)], 0)
        active_ids = np.flatnonzero(act[:, t]) + 1
        assert np.array_equal(lab[t], np.where(np.isin(seen, active_ids), seen, 0))
        still = np.isin(tissue.labels, active_ids) & (lab[t] == 0)
        if np.hypot(*shift[t]) >= 2 and (lab[t] > 0).sum() > 50 and still.sum() > 50:
            assert img[t][lab[t] > 0].mean() > 1.2 * img[t][still].mean(), t
            checked += 1
    assert checked >= 3


# --- the chain of stages -------------------------------------------------------------------


@dataclass
class _DummyDefect(Defect):
    """A defect known only to this test: draws from its own streams, records, changes nothing
    (``adu_added = 0``) or adds a constant number of ADU at the end of the chain."""

    name: ClassVar[str] = "dummy_test_defect"
    adu_added: float = 0.0

    def plan(self, video, rng):
        draws = rng.uniform(size=1000)
        video.record(self.name, first_draw=float(draws[0]))
        return self.severity > 0

    def apply(self, video, frame):
        video.frame_stream(self.name, frame.t).standard_normal(video.shape)
        if frame.pixels is not None:  # stages before "scene" see no image yet
            frame.pixels += np.float32(self.adu_added)


def _chain_with(dummy: Defect, after: str) -> list:
    chain = default_stages()
    at = [s.name for s in chain].index(after) + 1
    return chain[:at] + [dummy] + chain[at:]


@pytest.mark.parametrize("after", ["dropped_frames", "drift", "psf", "camera", "adc"])
def test_adding_a_defect_changes_no_other_stage(wave_tissue, after):
    """Issue 16 item 4: a new defect (registered only here), present at severity 1 and drawing
    from its own streams, leaves every other stage's output byte for byte as it was."""
    tissue, c = wave_tissue
    kw = dict(frame_interval_s=5.0, n_frames=16, defect_severity=0.8, n_threads=2)
    base = render_video(tissue, c, np.random.default_rng(3), **kw)
    dummy = _DummyDefect()
    with_dummy = render_video(
        tissue,
        c,
        np.random.default_rng(3),
        **kw,
        stages=_chain_with(dummy, after),
        defects={"dummy_test_defect": {"severity": 1.0}},
    )
    for a, b in zip(base[:3], with_dummy[:3], strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    extra = with_dummy[3]["defects"].pop("dummy_test_defect")
    assert extra["severity"] == 1.0
    assert with_dummy[3] == base[3]
    assert dummy.severity == 0.0  # render_video works on a copy of the stage


def test_a_defect_that_changes_the_image_changes_only_its_part(wave_tissue):
    """The dummy adds 7 ADU after the ADC: the output is the old one plus 7, exactly."""
    tissue, c = wave_tissue
    kw = dict(frame_interval_s=5.0, n_frames=12, defect_severity=0.5)
    base = render_video(tissue, c, np.random.default_rng(4), **kw)
    img, lab, cal, _ = render_video(
        tissue,
        c,
        np.random.default_rng(4),
        **kw,
        stages=_chain_with(_DummyDefect(adu_added=7.0), "adc"),
        defects={"dummy_test_defect": {"severity": 0.5}},
    )
    assert np.array_equal(img, base[0].astype(np.int64) + 7)
    assert np.array_equal(lab, base[1]) and np.array_equal(cal, base[2])


def test_stream_keys_are_stable():
    """The streams depend on the stage name only, through SHA-256 (not the salted hash()):
    changing these values would change every dataset, so they are pinned."""
    assert stage_key("drift") == 0xE568BBEF1F467A0B
    assert stage_key("camera") == 0x9427928D51B9E889
    # PCG64 and SeedSequence give the same numbers on every platform
    assert np.random.default_rng(stage_seed(12345, "drift", 0)).uniform() == 0.6731597645051243
    assert np.random.default_rng(stage_seed(12345, "drift", 1, 3)).uniform() == 0.3944618168529228
    assert len(set(DEFECTS)) == len(DEFECTS) and set(INTENSITY_DEFECTS) <= set(DEFECTS)
    assert not set(INTENSITY_DEFECTS) & set(DEFAULT_DEFECTS)


# --- global intensity changes (issue 17) ---------------------------------------------------


def _with(tissue, c, defects, seed=11, n_frames=40, defect_severity=0.0, **kw):
    return render_video(
        tissue, c, np.random.default_rng(seed), 5.0, n_frames, defect_severity=defect_severity,
        defects=defects, **kw,
    )  # fmt: skip


def test_intensity_defects_are_off_by_default(wave_tissue):
    tissue, c = wave_tissue
    base = _with(tissue, c, None, defect_severity=1.0)
    off = _with(tissue, c, {k: {"enabled": False} for k in INTENSITY_DEFECTS}, defect_severity=1.0)
    assert all(base[3]["defects"][k]["severity"] == 0 for k in INTENSITY_DEFECTS)
    assert np.array_equal(base[0], off[0]) and base[3] == off[3]
    # enabled: drawn like the source's families (present at defect_severity 1)
    on = _with(tissue, c, {k: {"enabled": True} for k in INTENSITY_DEFECTS}, defect_severity=1.0)
    assert all(0.5 <= on[3]["defects"][k]["severity"] <= 1 for k in INTENSITY_DEFECTS)
    assert np.array_equal(on[1], base[1]) and np.array_equal(on[2], base[2])


def _signal_per_frame(img: np.ndarray, meta: dict) -> np.ndarray:
    """Mean ADU above the camera offset per frame."""
    return img.reshape(len(img), -1).mean(axis=1) - meta["defects"]["camera"]["offset_adu"]


def test_illumination_flicker_scales_whole_frames(wave_tissue):
    tissue, c = wave_tissue
    base = _with(tissue, c, None)
    img, lab, cal, meta = _with(tissue, c, {"illumination_flicker": {"severity": 0.8}})
    rec = meta["defects"]["illumination_flicker"]
    factor = np.asarray(rec["factor_per_frame"])
    assert rec["rms_fraction"] == pytest.approx(0.08)
    assert 0.02 < factor.std() < 0.2 and factor.min() > 0.05
    assert np.array_equal(lab, base[1]) and np.array_equal(cal, base[2])  # image only
    ratio = _signal_per_frame(img, meta) / _signal_per_frame(base[0], base[3])
    assert np.abs(ratio / factor - 1).max() < 0.01


def test_auto_gain_follows_the_frame_brightness(wave_tissue):
    """With the camera's gain control on, the gain drops one frame after the field brightens,
    so the frame means vary less than without it, and the ground truth is unchanged."""
    tissue, c = wave_tissue
    base = _with(tissue, c, None)
    img, lab, cal, meta = _with(tissue, c, {"auto_gain": {"severity": 1.0}})
    rec = meta["defects"]["auto_gain"]
    gain = np.asarray(rec["gain_per_frame"])
    assert gain[0] == 1.0 and rec["damping"] == pytest.approx(0.78)
    assert np.array_equal(lab, base[1]) and np.array_equal(cal, base[2])
    signal_base = _signal_per_frame(base[0], base[3])
    ratio = _signal_per_frame(img, meta) / signal_base
    assert np.abs(ratio / gain - 1).max() < 0.01
    # the wave brightens the field: the gain falls after the brightest frame
    peak = int(np.argmax(signal_base[:-1]))
    assert gain[peak + 1] < 0.9 * gain[max(peak - 5, 0)]
    cv = [s.std() / s.mean() for s in (signal_base, _signal_per_frame(img, meta))]
    assert cv[1] < 0.7 * cv[0]


def test_contrast_normalisation_stretches_each_frame(wave_tissue):
    tissue, c = wave_tissue
    base = _with(tissue, c, None, n_frames=12)
    img, lab, cal, meta = _with(
        tissue, c, {"contrast_normalisation": {"severity": 0.5}}, n_frames=12
    )
    rec = meta["defects"]["contrast_normalisation"]
    assert rec["saturated_percent"] == pytest.approx(1.05)
    assert np.array_equal(lab, base[1]) and np.array_equal(cal, base[2])
    for t in range(12):
        low, high = rec["low_adu_per_frame"][t], rec["high_adu_per_frame"][t]
        assert low < high
        expect = np.clip(
            np.rint((base[0][t] - np.float32(low)) * np.float32(65535 / (high - low))), 0, 65535
        )
        assert np.array_equal(img[t], expect)
        clipped = (img[t] == 0).mean() + (img[t] == 65535).mean()
        assert 0.005 < clipped < 0.03  # about 1.05 % of the pixels (ties at the ends add some)


def test_defect_settings_are_checked(wave_tissue):
    tissue, c = wave_tissue
    _, _, _, meta = _with(tissue, c, {"drift": {"severity": 0.4}, "debris": {"enabled": False}},
                          n_frames=4, defect_severity=1.0)  # fmt: skip
    assert (
        meta["defects"]["drift"]["severity"] == 0.4 and meta["defects"]["debris"]["severity"] == 0
    )
    for bad, match in (
        ({"no_such_defect": {"enabled": True}}, "unknown defect"),
        ({"drift": {"severity": 1.5}}, "severity"),
        ({"drift": {"severity": "high"}}, "severity must be a number"),
        ({"drift": {"enabled": "yes"}}, "enabled must be"),
        ({"drift": {"enabled": False, "severity": 0.3}}, "disabled"),
        ({"drift": {"level": 0.3}}, "unknown setting"),
        ({"scene": {"enabled": True}}, "unknown defect"),  # a stage, not a defect
    ):
        with pytest.raises(RenderError, match=match):
            _with(tissue, c, bad, n_frames=2)
    with pytest.raises(RenderError, match="defect_severity"):
        _with(tissue, c, None, n_frames=2, defect_severity=1.5)
    cfg = SimulationConfig(defects={"auto_gain": {"enabled": True}})
    assert cfg.defects["auto_gain"].enabled is True
    for bad, match in (
        ({"autogain": {"enabled": True}}, "unknown defect"),
        ({"auto_gain": {"enabled": False, "severity": 0.2}}, "disabled"),
        ({"auto_gain": {"severity": 2}}, "less than or equal to 1"),
        ({"auto_gain": {"on": True}}, "Extra inputs"),
    ):
        with pytest.raises(ValidationError, match=match):
            SimulationConfig(defects=bad)


def test_progress_is_reported_and_can_stop_the_rendering(wave_tissue):
    tissue, c = wave_tissue
    calls = []
    _with(tissue, c, None, n_frames=8, progress=lambda f, s, m=None: calls.append((f, s)))
    assert calls[-1] == (1.0, "render") and all(s == "render" for _, s in calls)

    class Cancelled(Exception):
        pass

    def cancel(fraction, stage, message=None):
        raise Cancelled

    for threads in (1, 2):
        with pytest.raises(Cancelled):
            _with(tissue, c, None, n_frames=8, progress=cancel, n_threads=threads)
