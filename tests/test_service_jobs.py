"""Job lifecycle (calseg.service.jobs) in-process on SQLite: submit, run, fail, cancel,
idempotency, lost workers, deferral. No broker: enqueue is a recorder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from calseg.service import jobs
from calseg.service.db import session_scope, upgrade_database
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
        self.calls.append((job.id, jobs.QUEUE_BY_KIND[job.kind], countdown))


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
        with pytest.raises(jobs.JobReferenceError, match="no job"):
            jobs.submit_job(s, "finetune", {"dataset_job_id": "nope"}, enqueue=rec)
        with pytest.raises(jobs.JobReferenceError, match="simulate job, not a finetune"):
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


def test_lost_worker_reruns_then_fails(env) -> None:
    url, _, _, rec = env
    calls = []

    def ok(params, ctx):
        calls.append(1)
        return {}

    with session_scope(url) as s:
        job_id = jobs.submit_job(s, "simulate", SIM, enqueue=rec).id
        job = s.get(Job, job_id)
        job.state, job.attempts = "running", 1  # a worker died during attempt 1
    assert _run(env, job_id, runners={"simulate": ok}) == "succeeded"
    assert _job(url, job_id).attempts == 2 and calls == [1]
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        job.state, job.attempts = "running", 2  # died again at the limit
    assert _run(env, job_id, runners={"simulate": ok}) == "failed"
    assert "worker lost" in _job(url, job_id).error and calls == [1]


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
    out = jobs.jsonable(
        {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": Path("/x")}
    )
    assert out == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": "/x"}
