"""Fitting the simulator to a recording: parameter recovery on simulations with known imaging.

Tolerances come from the estimators' own statistics on this 40-frame 128 x 128 recording
(measured over seeds 0-4, see each assertion): gain = slope of a weighted line fit over 24
bins of ~16k pixel pairs (standard error ~0.03-0.07 ADU/e-, so 6 %); offset and background
from the third cumulant of ~1,600 dark pixels x 40 frames (z ~ 12, i.e. ~8 % relative
error, 3 SE ~ 25 %); read noise = what remains of the dark variance (+5 % bias from the
renderer's fixed-pattern offset noise); PSF from the spectral roll-off (+-10 % over seeds);
bleaching from a Theil-Sen slope (95 % CI +-2 %, bias +5 % from the few active cells).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from calseg.simulate.config import ImagingOverrides, SimulationConfig
from calseg.simulate.dataset import simulate_videos
from calseg.simulate.fit import (
    FitError,
    fit_noise_curve,
    fit_recording,
    fmin_from_peak_ratio,
    split_dark_level,
)
from calseg.simulate.geometry import MIN_CELLS, estimate_n_cells

TRUE = {
    "gain_adu_per_e": 2.0,
    "offset_adu": 200.0,
    "read_noise_e": 3.0,
    "background": 0.01,
    "photon_scale_e": 2000.0,
    "psf_sigma_px": 1.5,
    "bleach_tau_s": 400.0,
    "vignetting": 0.0,
    "autofluorescence": 0.0,
}


def _simulate(imaging: dict, seed: int = 0, **kw) -> dict:
    fields = {
        "n_videos": 1,
        "n_val_videos": 0,
        "n_test_videos": 0,
        "n_frames": 40,
        "height": 128,
        "width": 128,
        "defect_severity": 0.0,
        "seed": seed,
        "mean_cell_area_px": 80,
        "search_horizon_s": 1200,
        "warmup_s": 200,
        "pattern_classes": ["spikes"],
    }
    fields.update(kw)
    cfg = SimulationConfig(imaging=ImagingOverrides(**imaging), **fields)
    return simulate_videos(cfg)[0]


@pytest.fixture(scope="module")
def known() -> dict:
    return _simulate(TRUE, seed=0)


def test_imaging_overrides_reach_the_renderer(known):
    cam = known["meta"]["defects"]["camera"]
    assert cam["gain_adu_per_e"] == 2.0
    assert cam["offset_adu"] == 200.0
    assert cam["read_noise_e"] == 3.0
    assert known["meta"]["defects"]["photobleaching"]["tau_s"] == 400.0
    assert known["meta"]["defects"]["defocus"]["psf_sigma_px"] == 1.5


def test_parameter_recovery(known):
    fit = fit_recording(known["image"], frame_interval_s=5.0)
    se = fit.noise_curve["gain_se"]
    assert 0 < se < 0.1
    assert fit.gain_adu_per_e == pytest.approx(2.0, rel=0.06)
    assert abs(fit.gain_adu_per_e - 2.0) < 4 * se
    assert fit.details["dark_level"]["method"] == "third-cumulant"
    # 3 SE: the background (0.01 x 2000 e- x 2 ADU/e- = 40 ADU) has ~8 % SE, which the offset
    # inherits (dark level = offset + background): 3 x 3.2 ADU. Seeds 0-15 of the renderer with
    # per-stage streams: largest error 7.6 ADU (5.6 with the single stream before).
    assert fit.offset_adu == pytest.approx(200.0, abs=10.0)
    assert fit.read_noise_e == pytest.approx(3.0, rel=0.2)
    assert fit.background_e == pytest.approx(0.01 * 2000.0, rel=0.3)
    assert fit.psf_sigma_px == pytest.approx(1.5, rel=0.15)
    assert fit.bleach_tau_s() == pytest.approx(400.0, rel=0.1)
    # cell size is a factor-of-2 estimate (fit_cell_size docstring)
    true_r = math.sqrt(known["meta"]["tissue"]["mean_area_px"] / math.pi)
    assert 0.5 * true_r < fit.cell_radius_px < 2.0 * true_r
    assert fit.bit_depth == 16
    assert 2**fit.adc_bits - 1 >= known["image"].max()  # the smallest ADC range that holds it
    assert fit.adc_bits == (12 if known["image"].max() <= 4095 else 16)


def test_fitted_config_renders_with_the_fitted_camera(known):
    fit = fit_recording(known["image"], frame_interval_s=5.0)
    cfg = fit.to_config(SimulationConfig(n_videos=2, n_val_videos=0, n_test_videos=0))
    # the frame keeps its size unless the fitted cells (a factor-of-2 estimate) are too big for
    # the simulator's minimum cell count; then it is enlarged (to_config docstring)
    fits = estimate_n_cells(128, 128, cfg.tissue_shape, fit.mean_cell_area_px) >= MIN_CELLS
    assert (cfg.height, cfg.width) == (128, 128) if fits else cfg.height == cfg.width > 128
    assert cfg.n_frames == 40
    assert cfg.frame_interval_s == 5.0
    assert cfg.imaging.gain_adu_per_e == pytest.approx(fit.gain_adu_per_e)
    assert cfg.imaging.bleach_tau_s == pytest.approx(fit.bleach_tau_s(5.0))
    # round trip through JSON (manifest) keeps the overrides
    again = SimulationConfig.model_validate_json(cfg.model_dump_json())
    assert again.imaging == cfg.imaging


def test_no_bleaching_is_reported_as_none():
    v = _simulate({**TRUE, "bleach_tau_s": 1e12}, seed=1)
    fit = fit_recording(v["image"], frame_interval_s=5.0)
    assert math.isinf(fit.bleach_tau_frames) or fit.bleach_tau_s() > 20 * 40 * 5.0
    assert fit.to_dict()["bleach_tau_frames"] is None or fit.bleach_tau_s() > 4000


def test_tiny_recording_is_enlarged_to_hold_enough_cells():
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, (29, 21, 14)).astype(np.uint16) + 40
    fit = fit_recording(frames)
    cfg = fit.to_config()
    assert cfg.height >= 32 and cfg.width >= 32
    assert cfg.frame_interval_s == SimulationConfig().frame_interval_s  # no metadata
    assert any("frame interval" in n for n in fit.notes)


def test_any_recording_the_reader_accepts_fits_or_is_refused_clearly(tmp_path):
    """A tenth attack run: four recordings that segment fine made simulate jobs fitted to
    them fail with raw errors (a pydantic ValidationError, OverflowError, LinAlgError). Each
    now gives a simulation the simulator can run, or a FitError that says why."""
    import tifffile

    from calseg.io.recordings import read_recording
    from calseg.simulate.config import MAX_MODEL_TIME_S

    rng = np.random.default_rng(1)
    slow = tmp_path / "slow.tif"  # 420 frames of 10 min: 252,000 s of model time
    tifffile.imwrite(slow, rng.poisson(100, (420, 32, 32)).astype(np.uint16), imagej=True,
                     metadata={"axes": "TYX", "finterval": 10, "tunit": "min"})  # fmt: skip
    small = (rng.random((6, 16, 16)) * 100).astype(np.uint16)
    tiny_dt = tmp_path / "fint.tif"  # an interval of 1e-320 s: OverflowError
    tifffile.imwrite(tiny_dt, small, metadata=None,
                     description="ImageJ=1.53t\nimages=6\nfinterval=1e-320\n")  # fmt: skip
    huge = tmp_path / "c1.tif"  # calibrated to 1e30 per count: a singular noise fit
    tifffile.imwrite(huge, small, metadata=None,
                     description="ImageJ=1.53t\nimages=6\nc0=0\nc1=1e30\n")  # fmt: skip
    thin = tmp_path / "thin.npy"  # 8 x 5000 px: a 32 x 4096 field held 10 cells
    np.save(thin, (rng.random((6, 8, 5000)) * 100).astype(np.uint16))

    for path in (slow, tiny_dt, thin):
        rec = read_recording(path)
        fit = fit_recording(rec.frames, rec.info.frame_interval_s, rec.info.pixel_size_um)
        cfg = fit.to_config()
        assert cfg.n_frames * cfg.frame_interval_s <= MAX_MODEL_TIME_S
        assert estimate_n_cells(cfg.height, cfg.width, cfg.tissue_shape,
                                cfg.mean_cell_area_px) >= MIN_CELLS  # fmt: skip
    assert cfg.width == 4096 and cfg.height > 32  # the thin field grew across too
    rec = read_recording(slow)
    cfg = fit_recording(rec.frames, rec.info.frame_interval_s).to_config()
    assert cfg.frame_interval_s == 600.0 and cfg.n_frames == int(MAX_MODEL_TIME_S // 600)
    rec = read_recording(tiny_dt)
    fit = fit_recording(rec.frames, rec.info.frame_interval_s)
    assert any(n.endswith("outside 0.0001-3600: not used") for n in fit.notes), fit.notes
    rec = read_recording(huge)
    with pytest.raises(FitError, match="no noise curve can be fitted"):
        fit_recording(rec.frames, rec.info.frame_interval_s)


def test_background_nonuniformity_is_unknown_where_the_background_is_all_offset():
    """An 11th attack run: fits of uniform Poisson data reported a background non-uniformity
    of 1.3e8-4e11 (a standard deviation over a background above the offset of ~1e-9 ADU)."""
    for lam in (10, 100, 1000):  # 1.3e8 at 100 counts before
        frames = np.random.default_rng(1).poisson(lam, (30, 64, 64)).astype(np.uint16)
        value = fit_recording(frames).to_dict()["background_nonuniformity"]
        assert value is None or value < 10, (lam, value)


def test_noise_curve_of_pure_poisson_gaussian_noise():
    rng = np.random.default_rng(1)
    level = np.linspace(5, 400, 64 * 64).reshape(64, 64)  # e-
    g, off, read = 1.5, 100.0, 2.0
    e = rng.poisson(level, (30, 64, 64)) + rng.normal(0, read, (30, 64, 64))
    frames = np.rint(off + g * e).astype(np.uint16)
    nc = fit_noise_curve(frames)
    assert nc.gain_adu_per_e == pytest.approx(g, rel=0.05)
    # intercept b = g^2 read^2 - g offset
    assert nc.intercept_adu2 == pytest.approx(g * g * read * read - g * off, abs=25)
    dark = split_dark_level(frames, nc.gain_adu_per_e)
    assert dark.offset_adu == pytest.approx(off, abs=8)


def test_fmin_mapping_inverts_the_hill_model():
    m = fmin_from_peak_ratio(3.0)
    assert m is not None and 0 < m < 1
    from calseg.simulate.fit import PEAK_CA_UM, RESTING_CA_UM
    from calseg.simulate.render import hill

    h0, h1 = (
        float(hill(np.array(RESTING_CA_UM), "GCaMP6s")),
        float(hill(np.array(PEAK_CA_UM), "GCaMP6s")),
    )
    assert (m + (1 - m) * h1) / (m + (1 - m) * h0) == pytest.approx(3.0)
    assert fmin_from_peak_ratio(0.9) is None


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((2, 16, 16)), "at least 3"),
        (np.ones((5, 16, 16)), "constant"),
        (np.full((5, 16, 16), np.nan), "NaN"),
        (np.zeros((16, 16)), "(T, H, W)"),
    ],
)
def test_bad_recordings_are_refused(frames, message):
    with pytest.raises(FitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_recording(frames)


def test_cli_fit_sim_and_simulate_like_a_real_recording(tmp_path, real_file):
    import json

    from typer.testing import CliRunner

    from calseg.cli import app
    from calseg.io.dataset import load_dataset

    rec = real_file("fissa_b_AVG_A01.tif")
    runner = CliRunner()
    r = runner.invoke(app, ["fit-sim", str(rec), "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 0, r.output
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["fit"]["height"] == 21 and fit["fit"]["width"] == 14
    assert fit["config"]["imaging"]["gain_adu_per_e"] == pytest.approx(fit["fit"]["gain_adu_per_e"])
    r = runner.invoke(app, ["simulate", str(tmp_path / "ds"), "--videos", "3", "--like", str(rec)])
    assert r.exit_code == 0, r.output
    ds = load_dataset(tmp_path / "ds")
    v = ds.videos[0]
    assert v.n_frames == 29  # the recording's frame count
    cam = v.defects["camera"]
    assert cam["gain_adu_per_e"] == pytest.approx(fit["fit"]["gain_adu_per_e"])
    assert cam["read_noise_e"] == pytest.approx(fit["fit"]["read_noise_e"])
    r = runner.invoke(app, ["fit-sim", str(tmp_path / "missing.tif")])
    assert r.exit_code == 2 and "error" in r.output


def _service_with_fissa(tmp_path, real_file):
    """An in-process service (SQLite, a local artifact store) holding fissa's 29 x 21 x 14 px
    recording as an upload would: ``(settings, store, source path, stored object)``."""
    from calseg.service.db import upgrade_database
    from calseg.service.settings import Settings
    from calseg.service.store import LocalArtifactStore

    src = real_file("fissa_b_AVG_A01.tif")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp_path / "art",
        cache_dir=tmp_path / "cache",
        progress_interval_s=0.0,
    )
    store = LocalArtifactStore(settings.artifact_dir)
    return settings, store, src, store.put("recordings/fissa.tif", src)


def _fissa_row(src, obj, owner_id=None):
    """The ``recordings`` row of :func:`_service_with_fissa`'s upload."""
    from calseg.service.models import Recording

    return Recording(filename=src.name, relpath="recordings/fissa.tif", sha256=obj.sha256,
                     size_bytes=obj.size_bytes, n_frames=29, height=21, width=14,
                     dtype="uint16", owner_id=owner_id)  # fmt: skip


def test_simulate_job_like_an_uploaded_recording(tmp_path, real_file):
    """The service's simulate job with recording_id: fit, then simulate (in-process, SQLite)."""
    import hashlib

    from calseg.service import jobs
    from calseg.service.context import JobReferenceError
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    settings, store, src, obj = _service_with_fissa(tmp_path, real_file)
    url = settings.database_url
    queued: list = []
    with session_scope(url) as s:
        rec = _fissa_row(src, obj)
        s.add(rec)
        s.flush()
        rec_id = rec.id
        job_id = jobs.submit_job(
            s,
            "simulate",
            {"recording_id": rec_id, "n_videos": 3, "seed": 4},
            enqueue=lambda job, countdown=None: queued.append(job.id),
        ).id
        with pytest.raises(JobReferenceError, match="no recording"):
            jobs.submit_job(s, "simulate", {"recording_id": "nope"}, enqueue=lambda *a, **k: None)
    state = jobs.run_job(job_id, None, url=url, store=store, settings=settings, enqueue=None)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert state == "succeeded", job.error
        result = job.result
    assert result["fitted_to_recording"] == rec_id
    assert result["videos"][0]["n_frames"] == 29  # the recording's frame count, not the default
    assert result["fit"]["gain_adu_per_e"] > 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() == obj.sha256


def test_a_fitted_simulation_larger_than_admitted_is_refused_before_it_renders(tmp_path, real_file):
    """An 8th attack run: a simulate job fitted to a recording is admitted at the recording's
    size, but renders the fitted configuration (the field enlarged to hold 50 cells, the
    fitted cell size and frame interval): a 640 kB upload of 5000 frames of 8 x 8 px rendered
    videos of 104 x 104 px and wrote 119 x its estimate, past its owner's quota. The runner
    now estimates the fitted simulation and checks it against the owner's limits before it
    renders: here a disk limit of twice the admitted estimate (fissa's 21 x 14 px frames)."""
    from calseg.service import jobs
    from calseg.service.auth import create_user
    from calseg.service.costs import estimate
    from calseg.service.db import session_scope
    from calseg.service.models import Job
    from calseg.service.schemas import validate_params

    settings, store, src, obj = _service_with_fissa(tmp_path, real_file)
    url = settings.database_url
    with session_scope(url) as s:
        owner = create_user(s, "mallory")
        rec = _fissa_row(src, obj, owner.id)
        s.add(rec)
        s.flush()
        params = {"recording_id": rec.id, "n_videos": 3, "seed": 4}
        admitted = estimate(s, "simulate", validate_params("simulate", params), settings)
        owner.max_job_disk_bytes = int(2 * admitted.disk_bytes)
        s.commit()
        job_id = jobs.submit_job(
            s, "simulate", params, enqueue=lambda *a, **k: None, owner=owner, settings=settings
        ).id
    state = jobs.run_job(job_id, None, url=url, store=store, settings=settings, enqueue=None)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        error, log_tail = job.error, job.log_tail
    assert state == "failed"
    assert error.startswith("JobTooCostly: the simulation fitted to recording"), error
    assert "disk" in error and "> limit" in error
    assert "at its start, with its inputs as they are now: estimated" in log_tail
    folder = settings.artifact_dir / "jobs" / job_id
    assert (folder / "fit.json").is_file()  # the fit ran and is kept for the user to see
    assert not (folder / "dataset").exists()  # nothing rendered
