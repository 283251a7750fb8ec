"""Job lifecycle (calseg.service.jobs) in-process on SQLite: submit, run, fail, cancel,
idempotency, lost workers, deferral. No broker: enqueue is a recorder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from calseg.service import jobs
from calseg.service.context import JobReferenceError, jsonable
from calseg.service.db import session_scope, upgrade_database
from calseg.service.kinds import queue_of
from calseg.service.models import Artifact, Job, Metric
from calseg.service.schemas import ParamsError
from calseg.service.settings import Settings
from calseg.service.store import LocalArtifactStore, StoreError

SIM = {"n_videos": 3, "n_frames": 4, "height": 128, "width": 128}


class Recorder:
    """A fake enqueue: remembers (job id, queue kind, countdown)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float | None]] = []

    def __call__(self, job: Job, countdown: float | None = None) -> None:
        self.calls.append((job.id, queue_of(job.kind), countdown))


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp_path / "art",
        cache_dir=tmp_path / "cache",
        progress_interval_s=0.0,
        max_attempts=2,
    )
    store = LocalArtifactStore(settings.artifact_dir)
    return url, settings, store, Recorder()


def _run(env, job_id, runners=None, dispatch=None):
    url, settings, store, rec = env
    return jobs.run_job(
        job_id, dispatch, url=url, store=store, settings=settings, enqueue=rec, runners=runners
    )


def _job(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def test_store_hashes_and_rejects_escaping_keys(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "s")
    src = tmp_path / "x.tif"
    payload = b"\x00\x01" * 5000
    src.write_bytes(payload)
    obj = store.put("jobs/a/x.tif", src)
    assert obj.sha256 == hashlib.sha256(payload).hexdigest()
    assert obj.size_bytes == len(payload) and obj.content_type == "image/tiff"
    assert store.path("jobs/a/x.tif").read_bytes() == payload
    assert store.relpath_of(store.path("jobs/a/x.tif")) == "jobs/a/x.tif"
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(StoreError):
            store.path(bad)


def test_submit_validates_and_routes(env) -> None:
    url, _, _, rec = env
    with session_scope(url) as s:
        job = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        assert job.state == "queued" and job.params["n_frames"] == 4
        assert job.params["indicator"] == "GCaMP6s"  # defaults are stored explicitly
        with pytest.raises(ParamsError, match="n_framez"):
            jobs.submit_job(s, "simulate", {**SIM, "n_framez": 3}, enqueue=rec)
        with pytest.raises(JobReferenceError, match="no job"):
            jobs.submit_job(s, "finetune", {"dataset_job_id": "nope"}, enqueue=rec)
        with pytest.raises(JobReferenceError, match="simulate job, not a finetune"):
            jobs.submit_job(
                s, "infer", {"recording_id": None, "dataset_job_id": job.id, "video_id": "v0",
                             "model_job_id": job.id}, enqueue=rec,
            )  # fmt: skip
        ft = jobs.submit_job(s, "finetune", {"dataset_job_id": job.id, "steps": 2}, enqueue=rec)
    assert rec.calls == [(job.id, "cpu", None), (ft.id, "gpu", None)]


def test_simulate_runs_and_records_artifacts(env) -> None:
    url, _, store, rec = env
    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    assert _run(env, job_id) == "succeeded"
    job = _job(url, job_id)
    assert job.state == "succeeded" and job.progress == 1.0 and job.attempts == 1
    assert job.result["n_videos"] == 3 and len(job.result["videos"]) == 3
    assert job.finished_at is not None and "succeeded" in job.log_tail
    with session_scope(url) as s:
        arts = {a.name: a for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    assert {"manifest.json", "preview.png", "job.log"} <= set(arts)
    for art in arts.values():
        path = store.path(art.relpath)
        assert path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == art.sha256
    assert arts["preview.png"].content_type == "image/png"
    # a redelivered message for a finished job does nothing
    assert _run(env, job_id) == "succeeded"
    assert _job(url, job_id).attempts == 1


def test_failure_is_recorded_with_reason(env) -> None:
    url, _, _, rec = env

    def boom(params, ctx):
        ctx.progress(0.5, "work", "half way")
        raise RuntimeError("detector exploded at frame 7")

    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    assert _run(env, job_id, runners={"simulate": boom}) == "failed"
    job = _job(url, job_id)
    assert job.error == "RuntimeError: detector exploded at frame 7"
    assert job.progress == pytest.approx(0.5) and job.stage == "work"
    assert "Traceback" in job.log_tail


def test_cancel_stops_a_running_job(env) -> None:
    url, _, _, rec = env
    seen: list[float] = []

    def slow(params, ctx):
        for i in range(10):
            ctx.progress(i / 10, "loop")
            seen.append(i)
            if i == 2:
                with session_scope(url) as s:
                    jobs.cancel_job(s, ctx.job_id)
        return {"never": True}

    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    assert _run(env, job_id, runners={"simulate": slow}) == "cancelled"
    assert seen == [0, 1, 2]  # stopped at the first progress report after the cancel
    job = _job(url, job_id)
    assert job.result is None and job.finished_at is not None
    assert "stopped" in job.log_tail  # the log of a cancelled run is kept
    with session_scope(url) as s, pytest.raises(jobs.JobStateError, match="already cancelled"):
        jobs.cancel_job(s, job_id)


def test_retry_requeues_with_a_new_dispatch_and_stale_messages_are_skipped(env) -> None:
    url, _, store, rec = env

    def fail(params, ctx):
        ctx.add_metric("x", 0.5)
        raise ValueError("first time")

    def ok(params, ctx):
        ctx.add_metric("x", 0.25)
        return {"ok": 1}

    with session_scope(url) as s:
        job = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        job_id, first_dispatch = job.id, job.dispatch_id
    assert _run(env, job_id, runners={"simulate": fail}, dispatch=first_dispatch) == "failed"
    with session_scope(url) as s:
        retried = jobs.retry_job(s, job_id, enqueue=rec, store=store)
        assert retried.state == "queued" and retried.error is None
        second = retried.dispatch_id
    assert second != first_dispatch
    # the old message (first dispatch) is stale now
    assert _run(env, job_id, runners={"simulate": ok}, dispatch=first_dispatch) == "skipped"
    assert _run(env, job_id, runners={"simulate": ok}, dispatch=second) == "succeeded"
    with session_scope(url) as s:
        values = s.scalars(select(Metric.value).where(Metric.job_id == job_id)).all()
        with pytest.raises(jobs.JobStateError, match="only failed or cancelled"):
            jobs.retry_job(s, job_id, enqueue=rec, store=store)
    assert values == [0.25]  # the failed attempt's metric was removed


def _set(url: str, job_id: str, **values) -> None:
    from sqlalchemy import update

    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def _ago(seconds: float):
    from datetime import timedelta

    from calseg.service.models import utcnow

    return utcnow() - timedelta(seconds=seconds)


def test_lost_worker_reruns_then_fails(env) -> None:
    url, settings, _, rec = env
    calls = []

    def ok(params, ctx):
        calls.append(1)
        return {}

    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    stale = _ago(settings.heartbeat_timeout_s + 5)
    # a worker still beating: a redelivered message is dropped, the job is not run again
    _set(url, job_id, state="running", attempts=1, updated_at=_ago(1))
    assert _run(env, job_id, runners={"simulate": ok}) == "skipped" and calls == []
    # the worker died during attempt 1 (no heartbeat): the redelivered message re-runs it
    _set(url, job_id, state="running", attempts=1, updated_at=stale)
    assert _run(env, job_id, runners={"simulate": ok}) == "succeeded"
    assert _job(url, job_id).attempts == 2 and calls == [1]
    _set(url, job_id, state="running", attempts=2, updated_at=stale)  # died again, at the limit
    assert _run(env, job_id, runners={"simulate": ok}) == "failed"
    assert "worker lost" in _job(url, job_id).error and calls == [1]


def test_heartbeat_keeps_a_long_job_alive(env) -> None:
    """A job longer than the heartbeat timeout is never taken for lost while it runs."""
    import time

    from calseg.service.reconcile import reconcile

    url, settings, store, rec = env
    fast = settings.model_copy(update={"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 0.6})
    seen = []

    def slow(params, ctx):
        for i in range(12):  # 1.8 s, three times the heartbeat timeout, no progress calls
            time.sleep(0.15)
            if i in (4, 8):
                seen.append(reconcile(url, settings=fast, enqueue=rec, dispatches=set))
        return {"done": True}

    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    rec.calls.clear()
    state = jobs.run_job(
        job_id, url=url, store=store, settings=fast, enqueue=rec, runners={"simulate": slow}
    )
    assert state == "succeeded"
    assert [bool(r) for r in seen] == [False, False] and rec.calls == []
    assert _job(url, job_id).attempts == 1


def test_reconciler_requeues_lost_jobs_with_backoff_then_fails_them(env) -> None:
    from calseg.service.reconcile import backoff_s, reconcile

    url, settings, _, rec = env
    settings = settings.model_copy(update={"max_attempts": 3, "retry_backoff_s": 10.0})
    with session_scope(url) as s:
        job = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        job_id, first = job.id, job.dispatch_id
    rec.calls.clear()
    stale = _ago(settings.heartbeat_timeout_s + 5)
    dispatches = []
    for attempt in (1, 2):
        _set(url, job_id, state="running", attempts=attempt, updated_at=stale, worker="w:1")
        report = reconcile(url, settings=settings, enqueue=rec, dispatches=set)
        assert report.requeued == [job_id] and not report.failed
        job = _job(url, job_id)
        assert job.state == "queued" and "worker lost (w:1" in job.message
        assert job.dispatch_id not in (first, *dispatches)  # old messages are stale now
        dispatches.append(job.dispatch_id)
    assert [c[2] for c in rec.calls] == [10.0, 20.0] == [backoff_s(1, settings), 20.0]
    # a stale message of the first dispatch does nothing
    assert _run(env, job_id, dispatch=first) == "skipped"
    _set(url, job_id, state="running", attempts=3, updated_at=stale)
    report = reconcile(url, settings=settings, enqueue=rec, dispatches=set)
    assert report.failed == [job_id] and len(rec.calls) == 2
    job = _job(url, job_id)
    assert job.state == "failed" and job.error.startswith("worker lost: w:1")
    assert "attempt 3 of 3" in job.error
    # a fresh running job and a finished job are left alone
    with session_scope(url) as s:
        other = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
    _set(url, other, state="running", attempts=1, updated_at=_ago(1))
    assert not reconcile(url, settings=settings, enqueue=rec, dispatches=set)
    assert _job(url, other).state == "running"


def test_reconciler_redispatches_queued_jobs_the_broker_lost(env) -> None:
    from calseg.service.reconcile import reconcile

    url, settings, _, rec = env
    settings = settings.model_copy(update={"requeue_grace_s": 30.0})
    with session_scope(url) as s:
        held = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        lost = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        young = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
    for j in (held, lost):
        _set(url, j.id, updated_at=_ago(60))
    rec.calls.clear()
    on_broker = {(held.id, held.dispatch_id), (lost.id, "an-older-dispatch")}
    report = reconcile(url, settings=settings, enqueue=rec, dispatches=lambda: on_broker)
    assert report.redispatched == [lost.id] and not report.requeued
    assert [c[0] for c in rec.calls] == [lost.id]
    assert _job(url, lost.id).dispatch_id != lost.dispatch_id
    assert _job(url, young.id).dispatch_id == young.dispatch_id  # within the grace period

    def broken():
        raise ConnectionError("redis down")

    _set(url, lost.id, updated_at=_ago(60))
    report = reconcile(url, settings=settings, enqueue=rec, dispatches=broken)
    assert not report and "redis down" in report.broker_error


def test_job_waiting_for_its_dataset_is_deferred(env) -> None:
    url, _, _, rec = env
    with session_scope(url) as s:
        sim = jobs.submit_job(s, "simulate", SIM, enqueue=rec)
        ft = jobs.submit_job(s, "finetune", {"dataset_job_id": sim.id, "steps": 1}, enqueue=rec)
    rec.calls.clear()
    assert _run(env, ft.id) == "queued"
    job = _job(url, ft.id)
    assert job.state == "queued" and job.attempts == 0 and "waiting for simulate" in job.message
    assert rec.calls == [(ft.id, "gpu", jobs.DEFER_S)]


def test_jsonable_handles_numpy_and_nan() -> None:
    out = jsonable({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": Path("/x")})
    assert out == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": "/x"}


@pytest.mark.parametrize("base", ["bundled", "configured"])
def test_a_finetune_of_the_servers_base_serves_infer_and_evaluate_jobs(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    """What ``make demo`` and ``make serve`` do: the server's base is the bundled small SAM2
    (or a checkpoint configured elsewhere, as Meta's would be); a finetune job of it, then an
    infer job and an evaluate job with that model. A new-user check on a fresh clone: the
    infer job failed with "the base SAM2 checkpoint sam2_small_calseg.pt of this fine-tuned
    model is not on this machine", because the fine-tune's checkpoint names its base without
    the server's folders (an 11th attack run) and the loader looked only where it was
    recorded and in the repository root. The tests ran the service with random weights only,
    so none saw it. A configured base is found because the runners pass it to the loader."""
    import shutil

    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT, CHECKPOINT_ENV, load_sam2

    if not BUNDLED_SMALL_CHECKPOINT.is_file():
        pytest.skip("no bundled checkpoint")
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    url, settings, store, rec = env
    server_base = BUNDLED_SMALL_CHECKPOINT
    if base == "configured":  # a name the bundled folder does not hold
        server_base = tmp_path / "models" / "lab_base.pt"
        server_base.parent.mkdir()
        shutil.copy(BUNDLED_SMALL_CHECKPOINT, server_base)
    settings = settings.model_copy(update={"sam2_checkpoint": server_base})
    env = (url, settings, store, rec)
    ft_params = {
        "steps": 2, "val_every": 1, "batch_size": 4, "frames_per_video": 2,
        "val_frames_per_video": 1, "encoder_batch_size": 2,
    }  # fmt: skip
    with session_scope(url) as s:
        sim = jobs.submit_job(s, "simulate", {**SIM, "seed": 5}, enqueue=rec).id
    assert _run(env, sim) == "succeeded"
    with session_scope(url) as s:
        ft = jobs.submit_job(s, "finetune", {"dataset_job_id": sim, **ft_params}, enqueue=rec).id
    assert _run(env, ft) == "succeeded", _job(url, ft).error
    assert _job(url, ft).result["steps"] == 2  # optimiser steps, not history rows (it said 6)
    with session_scope(url) as s:
        ckpt = s.scalar(
            select(Artifact).where(Artifact.job_id == ft, Artifact.name == "checkpoint.pt")
        )
        ckpt_path = store.path(ckpt.relpath)
    from calseg.segment.model import _torch_load

    recorded = _torch_load(ckpt_path)["metadata"]["base_checkpoint"]
    assert recorded == server_base.name, recorded  # no server folder in what users get
    loaded = load_sam2("sam2.1_hiera_t", ckpt_path, device="cpu", base_checkpoint=server_base)
    assert loaded.info.prior_mode == "residual"
    video = next(v for v in _job(url, sim).result["videos"] if v["split"] == "test")
    params = {"dataset_job_id": sim, "video_id": video["id"], "model_job_id": ft}
    with session_scope(url) as s:
        inf = jobs.submit_job(s, "infer", params, enqueue=rec, settings=settings).id
    assert _run(env, inf) == "succeeded", _job(url, inf).error
    assert _job(url, inf).result["method"] == "sam2"
    with session_scope(url) as s:
        ev = jobs.submit_job(
            s,
            "evaluate",
            {"dataset_job_id": sim, "model_job_id": ft},
            enqueue=rec,
            settings=settings,
        ).id
    assert _run(env, ev) == "succeeded", _job(url, ev).error


def test_a_model_that_cannot_load_fails_the_job_with_its_reason_and_no_traceback(
    env, tmp_path: Path
) -> None:
    """A new-user check: an infer job whose SAM2 could not load logged a full traceback under
    a message that said everything (file, what is wrong, what to do). A model file that is
    missing, has another SHA-256 or is not a checkpoint is what the job was given: its
    message alone, as for a bad recording."""
    url, settings, store, rec = env
    bad = tmp_path / "not_a_checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    settings = settings.model_copy(update={"sam2_checkpoint": bad})
    env = (url, settings, store, rec)
    with session_scope(url) as s:
        sim = jobs.submit_job(s, "simulate", {**SIM, "seed": 6}, enqueue=rec).id
    assert _run(env, sim) == "succeeded"
    video = next(v for v in _job(url, sim).result["videos"] if v["split"] == "test")
    params = {"dataset_job_id": sim, "video_id": video["id"], "method": "sam2"}
    with session_scope(url) as s:
        inf = jobs.submit_job(s, "infer", params, enqueue=rec, settings=settings).id
    assert _run(env, inf) == "failed"
    job = _job(url, inf)
    assert "not_a_checkpoint.pt" in job.error and "Traceback" not in job.log_tail, job.log_tail
    # torch's advice to load it with weights_only=False would run a hostile file's code
    assert "weights_only` set to `False`" not in job.error and "never code" in job.error
