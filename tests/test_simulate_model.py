"""Validation of the calcium model against the reference behaviour of DESIGN.md section 2."""

import numpy as np
import pytest
import scipy.sparse as sp

from calseg.simulate.geometry import make_tissue
from calseg.simulate.model import (
    ModelParameters,
    TissueState,
    integrate,
    integrate_batch,
    oscillation_period,
    setup_tissue,
)

VPLC = np.array([0.77, 0.78, 0.80, 1.2, 1.6])
PERIODS = {0.78: 2955.0, 0.80: 2320.0, 1.2: 778.0, 1.6: 525.0}


def _single_cells(method: str, dt: float) -> np.ndarray:
    """Uncoupled cells, ktau = 1, taumax = 1000, c0 = 0.05, p0 = 1, r0 = 0.5, 20,000 s."""
    prm = ModelParameters(ktau=1.0, taumax=1000.0)
    n = VPLC.size
    s0 = TissueState(np.full(n, 0.05), np.full(n, 1.0), np.full(n, 0.5))
    t = np.arange(0, 20000.01, 1.0)
    return integrate(None, VPLC, s0, t, prm, dt=dt, method=method)["c"]


@pytest.fixture(scope="module")
def euler_cells():
    return _single_cells("euler", 0.2)


def test_single_cell_onset_between_077_and_078(euler_cells):
    half = euler_cells[:, 10000:]
    amp = half.max(axis=1) - half.min(axis=1)
    assert amp[0] < 1e-3  # Vplc 0.77: steady state
    assert amp[1] > 1.0  # Vplc 0.78: full oscillation


def test_single_cell_periods_and_peaks(euler_cells):
    half = euler_cells[:, 10000:]
    for i, v in enumerate(VPLC[1:], start=1):
        period = oscillation_period(half[i], 1.0)
        assert abs(period - PERIODS[v]) / PERIODS[v] < 0.05, (v, period)
        assert 1.0 <= half[i].max() <= 1.4
        assert 0.04 <= half[i].min() <= 0.08


def test_imex_scheme_error_vs_euler():
    """The semi-implicit scheme at dt = 0.5 s keeps the oscillation onset and stays within
    6 % of the published periods (its documented error bound; first order in dt)."""
    c = _single_cells("imex", 0.5)[:, 10000:]
    assert np.ptp(c[0]) < 1e-3 and np.ptp(c[1]) > 1.0
    errs = [
        abs(oscillation_period(c[i], 1.0) - PERIODS[v]) / PERIODS[v]
        for i, v in enumerate(VPLC[1:], start=1)
    ]
    assert max(errs) < 0.06, errs


def test_setup_streams_are_independent():
    prm = ModelParameters()
    a = setup_tissue(500, "waves", prm, np.random.default_rng(1), np.random.default_rng(2))
    b = setup_tissue(500, "waves", prm, np.random.default_rng(1), np.random.default_rng(3))
    assert np.array_equal(a.vplc, b.vplc)  # same parameter stream
    assert not np.array_equal(a.state0.r, b.state0.r)  # different initial-state stream
    assert a.initiators.sum() == 4  # round(0.00768 * 500)
    assert np.all((a.vplc[a.initiators] >= 1.3) & (a.vplc[a.initiators] <= 1.5))
    std = a.vplc[~a.initiators]
    assert std.min() >= 0.4 and std.max() <= 0.8
    assert np.all((a.state0.r >= 0.5) & (a.state0.r <= 0.7))
    one = setup_tissue(60, "spikes", prm, np.random.default_rng(0), np.random.default_rng(0))
    assert one.initiators.sum() == 1  # at least one initiator


def test_tissue_activity_per_class():
    """Fraction of cells ever active (c > 0.1 uM) in 3600 s on pouches of the published size
    (~3255 cells) rendered at CalSeg's default scale (100 px cells), published Euler.

    Published (DESIGN.md section 2): spikes ~3 %, transients ~23 %, waves and fluttering
    100 %. Measured over 24 other pouches (seeds 100-123, ``python
    scripts/tissue_activity_study.py --seeds 100:124``): spikes 3.1 % (SD 0.2, 2.8-3.5),
    transients 20.2 % (SD 5.1, 11.8-32.6), waves and fluttering 100 %; CalSeg's model on the
    published pouch itself gives transients 21.1 % (SD 5.4, 24 draws; ``python
    scripts/published_pouch_study.py``). Bands: spikes 2-4 %; transients, the mean of 8 runs
    (two pouches, four initiator draws each; SD of such a mean about 1.8 points; measured 19.9
    %), 21 +- 5 points: centred on this model on the published pouch, with the published 23 %
    inside. It catches the errors issue 17 names: the pi/4-weighted pixel count on the 204 px
    reference gives 13.7 % on these 8 runs (13.9 % over 12 pouches), dropping pi/4 62 %.
    Waves and fluttering >= 95 %.
    Resting c and peak ranges from DESIGN.md section 2."""
    prm = ModelParameters()
    tissues = [make_tissue(845, 586, 100.0, "pouch", np.random.default_rng(s)) for s in (0, 1)]
    assert all(3200 <= t.n_cells <= 3300 for t in tissues)
    runs = [(0, "spikes"), (0, "waves"), (0, "fluttering")]
    runs += [(t, "transients") for t in (0, 1) for _ in range(4)]
    setups = [
        setup_tissue(
            tissues[t].n_cells,
            cl,
            prm,
            np.random.default_rng([0, k]),
            np.random.default_rng([1, k]),
        )
        for k, (t, cl) in enumerate(runs)
    ]
    laplacians = [tissues[t].laplacian for t, _ in runs]
    cs = integrate_batch(laplacians, setups, np.arange(0, 3600.01, 5.0), prm)
    ever = [float((c > 0.1).any(axis=1).mean()) for c in cs]
    spikes, waves, fluttering = ever[:3]
    transients = float(np.mean(ever[3:]))
    assert 0.02 <= spikes <= 0.04, ever
    assert 0.16 <= transients <= 0.26, ever
    assert waves >= 0.95 and fluttering >= 0.95, ever
    assert spikes < min(ever[3:]) and max(ever[3:]) < waves
    for cl, c in (("spikes", cs[0]), ("transients", cs[3]), ("waves", cs[1])):
        rest = np.median(c[:, -1])
        assert 0.05 <= rest <= 0.07, (cl, rest)
        assert 1.1 <= c.max() <= 1.4, (cl, c.max())


def test_integrate_validates_inputs():
    s0 = TissueState(np.zeros(3), np.zeros(3), np.full(3, 0.6))
    with pytest.raises(ValueError, match="non-decreasing"):
        integrate(None, np.ones(3), s0, [5.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        integrate(None, np.ones(4), s0, [1.0])


@pytest.mark.parametrize("method", ["euler", "imex"])
def test_torch_backend_matches_numpy(method):
    """The optional torch backend runs the same arithmetic as numpy (CPU here, GPU if present)."""
    pytest.importorskip("torch")
    tissue = make_tissue(96, 96, 150.0, "rectangle", np.random.default_rng(3))
    n = tissue.laplacian.shape[0]
    setup = setup_tissue(
        n, "waves", ModelParameters(), np.random.default_rng(4), np.random.default_rng(5)
    )
    times = np.arange(0, 600.01, 20.0)
    args = (tissue.laplacian, setup.vplc, setup.state0, times, ModelParameters())
    ref = integrate(*args, method=method, record=("c", "r"))
    got = integrate(*args, method=method, record=("c", "r"), backend="torch", device="cpu")
    assert got["c"].shape == ref["c"].shape == (n, times.size)
    assert got["c"].dtype == np.float32
    assert ref["c"].max() > 0.1  # the initiators fired: a real comparison, not of zeros
    np.testing.assert_allclose(got["c"], ref["c"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["r"], ref["r"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        integrate(*args, backend="jax")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_diverging_model_is_an_error_not_nan_videos(tmp_path) -> None:
    """An 8th attack run: model_overrides Dp = k1 = 1e6 with dt_s = 2 made the explicit step
    overflow, and the simulate job rendered NaN calcium into its videos and succeeded. The
    integrator now checks the state about 100 times a run and at its end."""
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.jobs import run_job, submit_job
    from calseg.service.models import Job
    from calseg.service.settings import Settings
    from calseg.simulate.model import ModelDiverged

    ring = sp.diags([1.0, 1.0], [1, -1], shape=(6, 6)).tocsr()
    lap = ring - sp.diags(np.asarray(ring.sum(axis=1)).ravel())
    params = ModelParameters().model_copy(update={"Dp": 1e6})
    state = TissueState(c=np.full(6, 0.1), p=np.full(6, 0.5), r=np.full(6, 0.8))
    with pytest.raises(ModelDiverged, match="diverged by t = .* dt = 2 s"):
        integrate(lap, np.full(6, 0.3), state, [0.0, 100.0], params, dt=2.0)

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path / "a", cache_dir=tmp_path / "c")
    with session_scope(url) as s:
        job_id = submit_job(
            s,
            "simulate",
            {"n_videos": 3, "n_frames": 8, "dt_s": 2.0, "frame_interval_s": 2.0,
             "model_overrides": {"Dp": 1e6, "k1": 1e6}},
            enqueue=lambda *a, **k: None,
        ).id  # fmt: skip
    assert run_job(job_id, settings=settings) == "failed"
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.error.startswith("ModelDiverged: the calcium model diverged"), job.error
        assert "Traceback" not in (job.log_tail or "")  # an input error: its message says it
