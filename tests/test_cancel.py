"""Cancellation (issue 13 item 4), the fast cases: cancellation points in every long loop of
the science code, the job's token, and the worker's child process that is killed when a job
ignores its cancel. The long cases through the real service:
tests/reliability/test_cancel_service.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from calseg.progress import (
    Cancelled,
    CancelToken,
    cancellable,
    check_cancelled,
    null_progress,
    scaled,
)

REPO = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cancel_after(n_checks: int) -> CancelToken:
    """A token whose poll reports a cancel at the ``n_checks``-th cancellation point."""
    seen = [0]

    def poll() -> str | None:
        seen[0] += 1
        return "test cancel" if seen[0] >= n_checks else None

    return CancelToken(poll, interval_s=0.0)


# ------------------------------------------------------------------------------ the token


def test_check_is_a_noop_without_a_token_and_raises_once_cancelled() -> None:
    check_cancelled()  # nothing installed: nothing happens
    null_progress(0.5, "x")
    token = CancelToken()
    with cancellable(token):
        check_cancelled()
        token.cancel("stop now")
        with pytest.raises(Cancelled, match="stop now"):
            check_cancelled()
        with pytest.raises(Cancelled):  # every progress report is a cancellation point
            scaled(None, 0.0, 1.0)(0.5, "x")
    check_cancelled()  # uninstalled again


def test_poll_is_throttled() -> None:
    token = CancelToken(lambda: None, interval_s=0.2)
    t0 = time.monotonic()
    with cancellable(token):
        while time.monotonic() - t0 < 0.5:
            check_cancelled()
    assert token.checks > 1000  # cheap enough for a per-step loop
    assert 2 <= token.polls <= 4  # 0.5 s / 0.2 s (+ the first)


def test_cancelled_is_not_swallowed_by_except_exception() -> None:
    """A runner's optional step (``except Exception: warn``) must not eat the cancel."""
    token = CancelToken()
    token.cancel()
    with cancellable(token), pytest.raises(Cancelled):
        try:
            check_cancelled()
        except Exception:  # noqa: BLE001 - what an optional export does
            pytest.fail("Cancelled was caught by `except Exception`")


def test_process_wide_token_reaches_pool_threads() -> None:
    token = CancelToken()
    token.cancel()
    with ThreadPoolExecutor(2) as pool:
        with cancellable(token):  # per context: a pool thread does not see it
            pool.submit(check_cancelled).result()
        with cancellable(token, process_wide=True), pytest.raises(Cancelled):
            pool.submit(check_cancelled).result()


# ------------------------------------------------------------------------------ the loops


def _small_recording(t: int = 24, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = rng.normal(100, 5, (t, side, side)).astype(np.float32)
    frames[t // 2 :, 20:30, 20:30] += 60  # one active blob
    return frames


def _simulate(tmp_path: Path) -> None:
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    cfg = SimulationConfig(n_videos=3, n_frames=8, height=128, width=128)
    simulate_dataset(cfg, tmp_path / "ds")


def _render(tmp_path: Path) -> None:
    from calseg.simulate.geometry import make_tissue
    from calseg.simulate.render import render_video

    tissue = make_tissue(128, 128, 150.0, rng=np.random.default_rng(1))
    calcium = np.full((tissue.n_cells, 40), 0.05)
    render_video(tissue, calcium, np.random.default_rng(2), 5.0, 40, n_threads=2)


def _geometry(tmp_path: Path) -> None:
    from calseg.simulate.geometry import make_tissue

    make_tissue(256, 256, 150.0, rng=np.random.default_rng(1))


def _activity(tmp_path: Path) -> None:
    from calseg.segment.prompts import ActivityParams, compute_activity

    compute_activity(_small_recording(), ActivityParams(smooth_sigma_px=1.5))


def _baseline(tmp_path: Path) -> None:
    from calseg.segment.baseline import segment_baseline

    segment_baseline(_small_recording())


def _events(tmp_path: Path) -> None:
    from calseg.analysis.events import detect_events

    rng = np.random.default_rng(0)
    detect_events(rng.normal(0, 0.1, (40, 200)), 1.0)


def _traces(tmp_path: Path) -> None:
    from calseg.analysis.traces import cell_traces

    labels = np.zeros((64, 64), np.uint32)
    labels[10:20, 10:20], labels[30:40, 30:40] = 1, 2
    cell_traces(_small_recording(), labels, chunk_frames=4)


def _overlay(tmp_path: Path) -> None:
    from calseg.io.overlays import animation

    frames = _small_recording()
    animation(frames, (frames > 130).astype(np.uint32), tmp_path / "a.gif")


def _register(tmp_path: Path) -> None:
    from calseg.preprocess import register_drift

    register_drift(_small_recording())


def _read(tmp_path: Path) -> None:
    import tifffile

    from calseg.io.recordings import RecordingReader

    path = tmp_path / "rec.tif"
    tifffile.imwrite(path, _small_recording().astype(np.uint16))
    with RecordingReader(path) as reader:
        for _ in reader.chunks(chunk_frames=2):
            pass


LOOPS = {
    "simulate (integrate, render, write)": _simulate,
    "render (frames on pool threads)": _render,
    "tissue geometry (Lloyd iterations)": _geometry,
    "activity (smoothing per frame)": _activity,
    "classical baseline": _baseline,
    "event detection (per cell)": _events,
    "traces (per chunk)": _traces,
    "overlay animation (per frame)": _overlay,
    "drift registration (per frame)": _register,
    "recording reader (per chunk)": _read,
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_every_long_loop_has_cancellation_points(name: str, tmp_path: Path) -> None:
    """The work raises Cancelled at its 3rd cancellation point: it had at least 3 (a loop
    without any would run to its end and fail this test)."""
    token = cancel_after(3)
    with cancellable(token, process_wide=True), pytest.raises(Cancelled, match="test cancel"):
        LOOPS[name](tmp_path)
    assert token.checks >= 3


# ------------------------------------------------------------------------------ run_job


@pytest.fixture()
def env(tmp_path: Path):
    from calseg.service.db import upgrade_database
    from calseg.service.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        artifact_dir=tmp_path / "art",
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
        progress_interval_s=0.5,
        cancel_check_interval_s=0.2,
        cancel_grace_s=1.0,
    )
    upgrade_database(settings.database_url)
    return settings


def _submit(settings, params=None) -> str:
    from calseg.service.db import session_scope
    from calseg.service.jobs import submit_job

    params = params or {"n_videos": 3, "n_frames": 4}
    with session_scope(settings.database_url) as s:
        return submit_job(s, "simulate", params, enqueue=lambda j, c=None: None).id


def _job(settings, job_id):
    from calseg.service.db import session_scope
    from calseg.service.models import Artifact, Job

    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        names = {a.name for a in s.query(Artifact).filter(Artifact.job_id == job_id)}
    return job, names


def _cancel_when(settings, job_id, ready, after_s: float) -> threading.Thread:
    """Cancel ``job_id`` ``after_s`` seconds after ``ready()`` turns true, from a thread.

    With a forked job process, ``ready`` must not use the database: a fork while another
    thread is inside SQLite copies its locked mutex into the child (the worker forks from its
    only thread; see calseg.service.jobproc)."""
    from calseg.service.db import session_scope
    from calseg.service.jobs import cancel_job

    def go() -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(after_s)
        with session_scope(settings.database_url) as s:
            cancel_job(s, job_id)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_a_real_simulate_job_stops_at_a_cancellation_point(env) -> None:
    """A real simulate job (no progress report between the integrator's 1 % reports) stops
    soon after its cancel, in this process (job_process=inline), without a manifest."""
    from calseg.service.jobs import run_job

    job_id = _submit(env, {"n_videos": 3, "n_frames": 400, "height": 256, "width": 256})
    _cancel_when(env, job_id, lambda: _job(env, job_id)[0].state == "running", after_s=1.0)
    t0 = time.monotonic()
    assert run_job(job_id, settings=env) == "cancelled"
    job, artifacts = _job(env, job_id)
    assert job.state == "cancelled" and job.result is None
    assert "stopped: job is cancelled" in job.log_tail
    assert "manifest.json" not in artifacts
    assert time.monotonic() - t0 < 60


@pytest.fixture()
def patched_runner(monkeypatch):
    """Replace the simulate runner (a fork of this process inherits the replacement)."""
    import dataclasses

    from calseg.service import kinds

    def use(fn):
        spec = dataclasses.replace(kinds.get("simulate"), runner=fn)
        monkeypatch.setitem(kinds.KINDS, "simulate", spec)

    return use


def test_the_worker_task_keeps_the_embedding_cache_under_its_limit(
    env, patched_runner, monkeypatch
) -> None:
    """After each job the worker prunes the shared embedding cache to max_cache_bytes: here a
    job leaves 8 entries of 1 kB under a 4 kB limit; 3 remain (80 % of the limit), the newest."""
    from calseg.service import jobproc
    from worker.tasks import run_job_task

    cache = env.embedding_cache_dir / "model"
    monkeypatch.setattr(
        jobproc, "get_settings", lambda: env.model_copy(update={"max_cache_bytes": 4000})
    )

    def writes_cache(params, ctx):
        cache.mkdir(parents=True)
        for i in range(8):
            (cache / f"{i}.pt").write_bytes(b"x" * 1000)
            os.utime(cache / f"{i}.pt", (1000.0 + i, 1000.0 + i))
        return {"frames": 8}

    patched_runner(writes_cache)
    assert run_job_task.run(_submit(env)) == "succeeded"
    assert sorted(p.name for p in cache.iterdir()) == ["5.pt", "6.pt", "7.pt"]


def test_a_job_inside_one_long_call_is_killed_and_the_worker_is_free(env, patched_runner) -> None:
    """The job's process sits in one call that cannot check (here a 600 s sleep): the worker
    kills it cancel_grace_s after the cancel and is free; the job stays cancelled, its log says
    so, nothing of it succeeded."""
    from calseg.service import jobproc

    marker = env.artifact_dir / "started"

    def stuck(params, ctx):
        ctx.progress(0.1, "stuck", "one call that never checks")
        marker.touch()
        time.sleep(600)
        return {"never": True}

    patched_runner(stuck)
    job_id = _submit(env)
    _cancel_when(env, job_id, marker.exists, after_s=0.3)
    t0 = time.monotonic()
    state = jobproc.run_job_in_child(job_id, settings=env)
    took = time.monotonic() - t0
    assert state == "cancelled"
    assert jobproc.last_child["killed"] and jobproc.last_child["signal"] == signal.SIGKILL
    assert took < 0.3 + env.cancel_check_interval_s + env.cancel_grace_s + 5
    job, artifacts = _job(env, job_id)
    assert job.state == "cancelled" and job.result is None
    assert "the job was cancelled but did not stop within 1 s" in job.log_tail
    assert "killed its process" in job.log_tail
    # its run_job never ended: the worker measured the files it left for its owner's quota
    folder = env.artifact_dir / "jobs" / job_id
    assert job.stored_bytes == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert job.stored_bytes > 0
    assert "job.log" in artifacts
    assert not alive(jobproc.last_child["pid"])


def test_a_cooperative_job_stops_by_itself_in_its_process(env, patched_runner) -> None:
    from calseg.service import jobproc

    marker = env.artifact_dir / "started"

    def loop(params, ctx):
        marker.touch()
        for i in range(100000):
            ctx.progress(i / 100000, "loop")
            time.sleep(0.01)
        return {}

    patched_runner(loop)
    job_id = _submit(env)
    _cancel_when(env, job_id, marker.exists, after_s=0.3)
    assert jobproc.run_job_in_child(job_id, settings=env) == "cancelled"
    assert not jobproc.last_child["killed"]
    job, _ = _job(env, job_id)
    assert "stopped: job is cancelled" in job.log_tail


def test_a_job_process_killed_by_sigkill_fails_that_job_only(env, patched_runner) -> None:
    """What the OOM killer does to a job's process: the job fails with the signal, its time
    and peak memory; the worker (here: this test process) runs the next job."""
    from calseg.service import jobproc

    def oom(params, ctx):
        ctx.progress(0.2, "allocate")
        os.kill(os.getpid(), signal.SIGKILL)

    patched_runner(oom)
    job_id = _submit(env)
    assert jobproc.run_job_in_child(job_id, settings=env) == "failed"
    job, _ = _job(env, job_id)
    assert job.error.startswith(
        f"the job's process {jobproc.last_child['pid']} was killed by SIGKILL"
    )
    assert "peak memory" in job.error and "out-of-memory killer" in job.error

    patched_runner(lambda params, ctx: {"ok": 1})
    nxt = _submit(env)
    assert jobproc.run_job_in_child(nxt, settings=env) == "succeeded"


def test_a_job_over_its_memory_limit_is_killed_and_fails_with_the_reason(
    env, patched_runner
) -> None:
    """Admission prices a job before it runs; a new-user check's 1.4 kB HDF5 then took a job
    to 21 GiB (the estimate could not know). The worker now watches the job's process group
    and kills it past its owner's max_job_memory_bytes, failing the job with the reason."""
    from calseg.service import jobproc

    # the child starts with at most this process's resident pages (file-backed ones only once
    # touched): a limit of those plus 150 MiB, and an allocation of them plus 300 MiB
    own = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    limit = own + 150 * 2**20

    def hungry(params, ctx):
        ctx.progress(0.1, "allocate")
        block = np.ones(own + 300 * 2**20, np.uint8)  # touched: all resident
        time.sleep(30)  # (a failure ends here: the job succeeds and the test fails)
        return {"n": int(block[0])}

    patched_runner(hungry)
    job_id = _submit(env)
    tight = env.model_copy(update={"job_max_memory_bytes": limit})
    t0 = time.monotonic()
    assert jobproc.run_job_in_child(job_id, settings=tight) == "failed"
    assert time.monotonic() - t0 < 60
    job, _ = _job(env, job_id)
    assert "more than its limit of" in job.error and "max_job_memory_bytes" in job.error
    assert jobproc.last_child["over_limit"] and not alive(jobproc.last_child["pid"])


def test_a_job_over_its_time_limit_is_killed_and_fails_with_the_reason(env, patched_runner) -> None:
    from calseg.service import jobproc

    def slow(params, ctx):
        ctx.progress(0.1, "wait")
        time.sleep(30)
        return {}

    from calseg.service.costs import estimate
    from calseg.service.db import session_scope
    from calseg.service.schemas import validate_params

    patched_runner(slow)
    job_id = _submit(env)
    with session_scope(env.database_url) as s:  # a limit the job's estimate still fits in
        est = estimate(s, "simulate", validate_params("simulate", _job(env, job_id)[0].params), env)
    limit = round(est.time_s + 0.5, 1)
    assert limit < 10
    t0 = time.monotonic()
    state = jobproc.run_job_in_child(
        job_id, settings=env.model_copy(update={"job_max_time_s": limit})
    )
    assert state == "failed" and time.monotonic() - t0 < 30
    job, _ = _job(env, job_id)
    assert f"more than 2 x its time limit of {limit:g} s (max_job_time_s" in job.error, job.error


def test_a_job_far_over_its_own_estimate_is_killed_long_before_the_owners_limit(
    env, patched_runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's attack: jobs whose parameters the estimate under-counts (an infer job
    estimated at 40 s ran 549 s; 10^6 fine-tune steps estimated at 483 s would have run
    35-70 h) held the one worker until 2 x max_job_time_s (96 h). A job now runs at most
    ESTIMATE_TIME_FACTOR x its own estimate (at least MIN_RUN_TIME_S), then the slack:
    here the floor is lowered to 1 s, under the owner's 48 h."""
    from calseg.service import jobproc

    def slow(params, ctx):
        ctx.progress(0.1, "wait")
        time.sleep(30)
        return {}

    patched_runner(slow)
    monkeypatch.setattr(jobproc, "ESTIMATE_TIME_FACTOR", 1e-9)
    monkeypatch.setattr(jobproc, "MIN_RUN_TIME_S", 1.0)
    job_id = _submit(env)
    t0 = time.monotonic()
    assert jobproc.run_job_in_child(job_id, settings=env) == "failed"
    assert time.monotonic() - t0 < 30
    job, _ = _job(env, job_id)
    assert "more than 2 x its run-time limit of 1 s (1e-09 x its estimate of" in job.error, (
        job.error
    )


def test_group_rss_counts_the_processes_of_a_group() -> None:
    """group_rss_bytes sums /proc's rss over a process group: a child in a group of its own
    holding 200 MiB reads at least that, and a group with no process reads 0."""
    from calseg.service import jobproc

    code = (
        "import os, time, numpy as np; os.setpgid(0, 0); a = np.ones(200 * 2**20, np.uint8); "
        "print(1, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"1"
        assert jobproc.group_rss_bytes(proc.pid) >= 200 * 2**20
    finally:
        proc.kill()
        proc.wait()
    assert jobproc.group_rss_bytes(proc.pid) == 0


def test_the_job_process_dies_with_its_worker(env, tmp_path: Path) -> None:
    """SIGKILL of the worker: its job's process gets SIGKILL too (PR_SET_PDEATHSIG), so no
    job runs on unwatched (the reconciler or the supervisor re-queues it)."""
    job_id = _submit(env)
    code = f"""
import time
import dataclasses
from calseg.service import jobproc, kinds
from calseg.service.settings import Settings
def stuck(params, ctx):
    ctx.log("STUCK")
    time.sleep(600)
kinds.register(dataclasses.replace(kinds.get("simulate"), runner=stuck))
jobproc.run_job_in_child({job_id!r}, settings=Settings(**{env.model_dump(mode="json")!r}))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        log = ""
        while "STUCK" not in log and time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                log = (env.artifact_dir / "jobs" / job_id / "job.log").read_text()
        assert "STUCK" in log, log
        import re

        child = int(re.search(r"\(process (\d+)\)", log).group(1))
        assert child != proc.pid
        assert alive(child)  # the job's process runs
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), f"the job's process {child} outlived its worker"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_scaled_prefix_names_the_sub_task():
    """Two new-user checks read "decode: frame 1/48" repeated during evaluate as progress going
    back; each model-and-video sub-task now names itself."""
    from calseg.progress import scaled

    seen = []
    sub = scaled(lambda f, stage, msg=None: seen.append((round(f, 3), stage, msg)), 0.5, 1.0,
                 "SAM2 untuned on v005 (2/4)")  # fmt: skip
    sub(0.5, "decode", "frame 1/48")
    sub(1.0, "done")
    assert seen == [
        (0.75, "decode", "SAM2 untuned on v005 (2/4): frame 1/48"),
        (1.0, "done", "SAM2 untuned on v005 (2/4)"),
    ]


def test_a_job_that_took_the_turn_of_another_is_watched_as_itself(env, patched_runner) -> None:
    """Fair turns: a message sent for bob's job runs carol's (the two swap dispatch tokens,
    calseg.service.fairness). The worker's watchdog must follow the job its child runs: it
    watched the message's job, which now held another token, took that for "dispatched
    again" and killed carol's job cancel_grace_s (1 s) after it started."""
    from sqlalchemy import update

    from calseg.service import jobproc
    from calseg.service.auth import create_user
    from calseg.service.db import session_scope
    from calseg.service.jobs import submit_job
    from calseg.service.models import Job, utcnow

    with session_scope(env.database_url) as s:
        bob, carol = create_user(s, "bob"), create_user(s, "carol")
        params = {"n_videos": 3, "n_frames": 4}
        ran = submit_job(s, "simulate", params, enqueue=lambda j, c=None: None, owner=bob)
        bobs = submit_job(s, "simulate", params, enqueue=lambda j, c=None: None, owner=bob)
        carols = submit_job(s, "simulate", params, enqueue=lambda j, c=None: None, owner=carol)
        # bob's first job ran a moment ago: carol, who never ran one, has the next turn
        s.execute(
            update(Job)
            .where(Job.id == ran.id)
            .values(state="succeeded", started_at=utcnow(), finished_at=utcnow())
        )
        s.commit()
        bob_id, bob_token, carol_id = bobs.id, bobs.dispatch_id, carols.id

    def slow(params, ctx):
        for i in range(30):  # 3 s, cooperative: only a kill stops it early
            ctx.progress(i / 30, "work")
            time.sleep(0.1)
        return {"job": ctx.job_id}

    patched_runner(slow)
    assert jobproc.run_job_in_child(bob_id, bob_token, settings=env) == "succeeded"
    carol_job, _ = _job(env, carol_id)
    assert carol_job.state == "succeeded" and carol_job.result["job"] == carol_id
    assert not jobproc.last_child["killed"]
    bob_job, _ = _job(env, bob_id)
    assert bob_job.state == "queued"  # with carol's token, whose message is on the broker


def _estimate(settings, job_id):
    from calseg.service.costs import estimate
    from calseg.service.db import session_scope
    from calseg.service.schemas import validate_params

    job, _ = _job(settings, job_id)
    with session_scope(settings.database_url) as s:
        return estimate(s, job.kind, validate_params(job.kind, job.params), settings)


def test_a_job_writing_more_than_it_may_is_killed_and_fails_with_the_reason(
    env, patched_runner
) -> None:
    """The watchdog measures the job's folder (every DISK_CHECK_S) against the most it may
    write (max_job_disk_bytes, the quota left, the free disk): here a job estimated within a
    limit that writes 3 MiB past it, the way a fitted simulation outgrew its estimate (an 8th
    attack run)."""
    from calseg.service import jobproc

    job_id = _submit(env)
    limit = int(_estimate(env, job_id).disk_bytes) + 2**20

    def writes(params, ctx):
        (ctx.workdir / "big.bin").write_bytes(b"\0" * (limit + 3 * 2**20))
        time.sleep(30)  # (a failure ends here: the job succeeds and the test fails)
        return {}

    patched_runner(writes)
    t0 = time.monotonic()
    tight = env.model_copy(update={"job_max_disk_bytes": limit})
    assert jobproc.run_job_in_child(job_id, settings=tight) == "failed"
    assert time.monotonic() - t0 < jobproc.DISK_CHECK_S + 10
    job, _ = _job(env, job_id)
    assert job.error.startswith("the job wrote "), job.error
    assert "max_job_disk_bytes" in job.error
    assert jobproc.last_child["over_limit"] and not alive(jobproc.last_child["pid"])
    assert job.stored_bytes > limit  # what it left counts for its owner's quota


def test_a_job_is_estimated_again_as_it_starts_with_its_references_ended(
    env, patched_runner
) -> None:
    """A fine-tune of a dataset still being simulated is admitted on an estimate from the
    dataset job's parameters (or, fitted to a recording, the recording's size). By its start
    the dataset has ended and its videos are known: the job is estimated again and checked
    against the limits before its runner runs (here the dataset came out 50x larger than its
    parameters said, as a fitted simulation can: more frames to embed, each larger)."""
    from sqlalchemy import update

    from calseg.service.db import session_scope
    from calseg.service.jobs import run_job, submit_job
    from calseg.service.models import Job

    dataset_id = _submit(env, {"n_videos": 4, "n_frames": 8, "height": 128, "width": 128})
    with session_scope(env.database_url) as s:
        tune = submit_job(
            s,
            "finetune",
            {"dataset_job_id": dataset_id, "steps": 10, "device": "cpu"},
            enqueue=lambda j, c=None: None,
        )
        tune_id = tune.id
    admitted = _estimate(env, tune_id)
    videos = [
        {"id": f"v{i}", "split": s, "n_frames": 400, "height": 512, "width": 512}
        for i, s in enumerate(("train", "train", "val", "test"))
    ]
    with session_scope(env.database_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == dataset_id)
            .values(state="succeeded", result={"videos": videos})
        )
    now = _estimate(env, tune_id)
    assert now.time_s > 1.2 * admitted.time_s  # more frames to embed, larger videos
    called: list[str] = []
    patched_runner(lambda params, ctx: called.append(ctx.job_id) or {})
    tight = env.model_copy(update={"job_max_time_s": (admitted.time_s + now.time_s) / 2})
    assert run_job(tune_id, settings=tight) == "failed"
    job, _ = _job(env, tune_id)
    assert job.error.startswith(
        "JobTooCostly: at its start, with its inputs as they are now: this finetune job"
    ), job.error
    assert "time" in job.error and not called


def test_an_infer_job_is_admitted_again_once_its_cells_are_known(env, tmp_path) -> None:
    """A 9th attack run: parameters that make every pixel of a flickering recording a cell
    (cell_diameter_px 1.01, min_region_px 1, threshold_k 0.01) gave 16,199 cells in 128 x 128
    px, and the infer job, estimated per recorded pixel, ran 4-8x and wrote 17-18x its
    estimate (traces, events and ROIs cost per cell and frame). The job is now estimated again
    with its cells before their traces are written: here over a disk limit of twice what it
    was admitted at, so it fails before writing them."""
    import tifffile

    from calseg.service.auth import create_user
    from calseg.service.costs import estimate
    from calseg.service.db import session_scope
    from calseg.service.jobs import run_job, submit_job
    from calseg.service.models import Recording
    from calseg.service.schemas import validate_params
    from calseg.service.store import LocalArtifactStore

    rng = np.random.default_rng(0)
    shape = (24, 48, 48)
    frames = rng.poisson(200, shape) + (rng.random(shape) < 0.1) * 800
    src = tmp_path / "flicker.tif"
    tifffile.imwrite(src, frames.astype(np.uint16))
    obj = LocalArtifactStore(env.artifact_dir).put("recordings/flicker.tif", src)
    with session_scope(env.database_url) as s:
        owner = create_user(s, "mallory")
        rec = Recording(filename=src.name, relpath="recordings/flicker.tif", sha256=obj.sha256,
                        size_bytes=obj.size_bytes, n_frames=24, height=48, width=48,
                        dtype="uint16", owner_id=owner.id)  # fmt: skip
        s.add(rec)
        s.flush()
        params = {"recording_id": rec.id, "method": "classical", "cell_diameter_px": 1.01,
                  "min_region_px": 1, "threshold_k": 0.01}  # fmt: skip
        admitted = estimate(s, "infer", validate_params("infer", params), env)
        owner.max_job_disk_bytes = int(2 * admitted.disk_bytes)
        s.commit()
        job_id = submit_job(
            s, "infer", params, enqueue=lambda j, c=None: None, owner=owner, settings=env
        ).id
    assert run_job(job_id, settings=env) == "failed"
    job, artifacts = _job(env, job_id)
    assert job.error.startswith("JobTooCostly: the traces, events and ROIs of "), job.error
    assert "disk" in job.error
    assert "traces.csv" not in artifacts
    assert not (env.artifact_dir / "jobs" / job_id / "traces.csv").exists()


def test_a_job_cancelled_while_running_is_deleted_once_its_process_has_stopped(env) -> None:
    """A 9th attack run: cancel a running job and delete it at once (both allowed), and its
    run, ending at its next check, made jobs/<id>/ again (its end-of-run bookkeeping) and could
    write files after the delete that counted nowhere. The delete now waits (409) until the
    run has measured its folder, or the cancel is older than the grace plus a minute, and the
    bookkeeping of a deleted job touches no folder."""
    from datetime import timedelta

    from sqlalchemy import update

    from calseg.service.db import session_scope
    from calseg.service.jobs import JobStateError, delete_job, record_stored_bytes
    from calseg.service.models import Job, utcnow
    from calseg.service.store import LocalArtifactStore

    store = LocalArtifactStore(env.artifact_dir)
    job_id = _submit(env)
    with session_scope(env.database_url) as s:  # as cancel_job leaves a running job
        s.execute(update(Job).where(Job.id == job_id).values(
            state="cancelled", started_at=utcnow(), finished_at=utcnow()))  # fmt: skip
    with session_scope(env.database_url) as s, pytest.raises(JobStateError, match="stopping"):
        delete_job(s, job_id, store, env)
    with session_scope(env.database_url) as s:  # a minute past the grace: gone or killed
        s.execute(update(Job).where(Job.id == job_id).values(
            finished_at=utcnow() - timedelta(seconds=env.cancel_grace_s + 61)))  # fmt: skip
    with session_scope(env.database_url) as s:
        delete_job(s, job_id, store, env)
    # its run ends now: nothing made again for the deleted job
    record_stored_bytes(env.database_url, store, job_id, f"jobs/{job_id}")
    assert not (env.artifact_dir / "jobs" / job_id).exists()

    other = _submit(env)  # the run measured its folder as it ended: deletable at once
    with session_scope(env.database_url) as s:
        ended = {"started_at": utcnow(), "finished_at": utcnow(), "stored_bytes": 0}
        s.execute(update(Job).where(Job.id == other).values(state="cancelled", **ended))
    with session_scope(env.database_url) as s:
        delete_job(s, other, store, env)


def test_a_run_that_no_longer_owns_its_job_writes_no_metric_or_artifact(env, tmp_path) -> None:
    """A job cancelled while running could be retried at once (the retry cleared its outputs
    and queued it under a new dispatch) while its old run, still stopping, went on adding
    metrics and artifacts: they landed in the retried job. A retry now waits (409) as a delete
    does, and a run adds metric and artifact rows only while the job runs under its own
    dispatch (cancelled, retried, dispatched again: JobCancelled, nothing written)."""
    from datetime import timedelta

    from sqlalchemy import func, select, update

    from calseg.service.context import JobCancelled, JobContext
    from calseg.service.db import session_scope
    from calseg.service.jobs import JobStateError, cancel_job, retry_job
    from calseg.service.models import Artifact, Job, Metric, utcnow
    from calseg.service.schemas import validate_params
    from calseg.service.store import LocalArtifactStore

    store = LocalArtifactStore(env.artifact_dir)
    job_id = _submit(env)
    with session_scope(env.database_url) as s:  # as run_job starts it
        s.execute(update(Job).where(Job.id == job_id).values(state="running", started_at=utcnow()))
        row = s.get(Job, job_id)
        s.expunge(row)
    ctx = JobContext(row, validate_params("simulate", row.params), url=env.database_url,
                     store=store, settings=env)  # fmt: skip
    outside = tmp_path / "fit.json"
    outside.write_text("{}")

    def counts() -> tuple[int, int]:
        with session_scope(env.database_url) as s:
            n_metrics = s.scalar(select(func.count()).where(Metric.job_id == job_id))
            n_artifacts = s.scalar(select(func.count()).where(Artifact.job_id == job_id))
        return n_metrics, n_artifacts

    try:
        ctx.add_metric("while_running", 1.0)  # its own dispatch: written
        ctx.add_artifact("first.json", outside)
        assert counts() == (1, 1)
        with session_scope(env.database_url) as s:
            cancel_job(s, job_id)
        with session_scope(env.database_url) as s, pytest.raises(JobStateError, match="stopping"):
            retry_job(s, job_id, enqueue=lambda j, c=None: None, store=store, settings=env)
        for write in (
            lambda: ctx.add_metric("after_cancel", 2.0),
            lambda: ctx.add_artifact("fit.json", outside),
        ):
            with pytest.raises(JobCancelled, match="cancelled"):
                write()
        assert counts() == (1, 1)
        assert not (env.artifact_dir / "jobs" / job_id / "fit.json").exists()

        with session_scope(env.database_url) as s:  # a minute past the grace: retried
            s.execute(update(Job).where(Job.id == job_id).values(
                finished_at=utcnow() - timedelta(seconds=env.cancel_grace_s + 61)))  # fmt: skip
        with session_scope(env.database_url) as s:
            retry_job(s, job_id, enqueue=lambda j, c=None: None, store=store, settings=env)
        with session_scope(env.database_url) as s:  # the retry runs under its new dispatch
            s.execute(update(Job).where(Job.id == job_id).values(state="running"))
        assert counts() == (0, 0)
        with pytest.raises(JobCancelled, match="superseded"):
            ctx.add_metrics([("stale", 3.0, None, None, None)])
        with pytest.raises(JobCancelled):
            ctx.add_artifact("fit.json", outside)
        assert counts() == (0, 0)
        assert not (env.artifact_dir / "jobs" / job_id / "fit.json").exists()
    finally:
        ctx.close()


def test_a_retry_that_loses_a_race_with_a_delete_is_a_404(env, monkeypatch) -> None:
    """An 11th attack run: a retry racing a delete refreshed the deleted row and answered 500
    (3 of 12 tries). The job is looked up again after the conditional update: gone, 404."""
    from sqlalchemy import delete, update

    from calseg.service import jobs
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    job_id = _submit(env)
    with session_scope(env.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(state="failed"))
    admit = jobs._admit

    def admit_then_lose_the_race(session, *args, **kwargs):  # noqa: ANN001, ANN202
        out = admit(session, *args, **kwargs)
        session.execute(delete(Job).where(Job.id == job_id))  # as a delete that won the race
        session.commit()
        return out

    monkeypatch.setattr(jobs, "_admit", admit_then_lose_the_race)
    with session_scope(env.database_url) as s, pytest.raises(jobs.JobNotFound):
        jobs.retry_job(s, job_id, enqueue=lambda j, c=None: None, settings=env)
