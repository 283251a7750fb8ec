"""The embedded supervisor keeps `make serve` alive (issue 13 item 5), with real processes:
the embedded service on SQLite with its private Redis (what `make serve` runs), real simulate
jobs of two users, and SIGKILL (what the OOM killer sends) of the worker, of Redis, of the api
and of the supervisor itself.

Fast cases (SIGTERM keeps queued jobs for the next start on the same port, children die with a
SIGKILLed supervisor, one stack per database, TIME_WAIT): tests/test_service_embedded.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rel_helpers import REPO, auth_headers, wait_for

pytestmark = pytest.mark.reliability

LONG = {"n_videos": 3, "n_frames": 600, "height": 128, "width": 128, "seed": 11}
"""A simulate job of ~10-20 s here (long enough to kill something inside it)."""
SHORT = {"n_videos": 3, "n_frames": 4, "height": 128, "width": 128}
TERMINAL = ("succeeded", "failed", "cancelled")


def _settings(root: Path, **overrides):
    from calseg.service.settings import Settings

    values = dict(
        database_url=f"sqlite:///{root / 'calseg.db'}",
        artifact_dir=root / "artifacts",
        cache_dir=root / "cache",
        log_dir=root / "logs",
        token_file=root / "token",
        api_port=0,
        retry_backoff_s=1.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator:
    """An in-process embedded service with users bob and carol (``.bob``, ``.carol``)."""
    from calseg.service.embedded import EmbeddedService

    settings = _settings(tmp_path)
    with EmbeddedService(settings, api_port=0) as svc:
        svc.bob = httpx.Client(
            base_url=svc.url, headers=auth_headers(settings.database_url, "bob"), timeout=30
        )
        svc.carol = httpx.Client(
            base_url=svc.url, headers=auth_headers(settings.database_url, "carol"), timeout=30
        )
        yield svc
        svc.bob.close()
        svc.carol.close()


def _submit(client: httpx.Client, params: dict) -> str:
    r = client.post("/api/jobs", json={"kind": "simulate", "params": params})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _get(client: httpx.Client, job_id: str) -> dict:
    """The job, retried while the api is down or restarting."""
    deadline = time.monotonic() + 60
    while True:
        try:
            r = client.get(f"/api/jobs/{job_id}")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the api did not answer for job {job_id}")
        time.sleep(0.2)


def _ended(client: httpx.Client, job_id: str, timeout_s: float = 300) -> dict:
    return wait_for(lambda: (j := _get(client, job_id))["state"] in TERMINAL and j, timeout_s,
                    f"job {job_id} to end")  # fmt: skip


def _running(client: httpx.Client, job_id: str) -> dict:
    return wait_for(
        lambda: (j := _get(client, job_id))["state"] == "running" and j["progress"] > 0 and j,
        120,
        f"job {job_id} to run",
        interval_s=0.1,
    )


def test_sigkilled_worker_is_restarted_its_job_reruns_once_and_queued_jobs_survive(
    stack,
) -> None:
    """The red-team case: SIGKILL of the worker brought `make serve` down and failed another
    user's queued job. Now: the worker is started again, bob's interrupted job runs again once
    (attempt 2) and succeeds, carol's queued job is never failed and succeeds."""
    bob_job = _submit(stack.bob, LONG)
    carol_job = _submit(stack.carol, SHORT)
    _running(stack.bob, bob_job)
    old = stack.pids["worker"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: stack.pids.get("worker") not in (None, old), 30, "a new worker")
    restart = next(r for r in stack.restarts if r.name == "worker")
    assert restart.how == "was killed by SIGKILL" and restart.requeued == [bob_job]
    carol = _ended(stack.carol, carol_job)
    bob = _ended(stack.bob, bob_job)
    assert carol["state"] == "succeeded" and carol["attempts"] == 1, carol
    assert bob["state"] == "succeeded" and bob["attempts"] == 2, bob
    assert stack.failed is None
    log = (stack.log_dir / "worker.log").read_text(errors="replace")
    assert len(re.findall(rf"job {bob_job}: simulate job \S+ started on", log)) == 2


def test_a_worker_killed_at_the_attempt_limit_fails_that_job_only(tmp_path: Path) -> None:
    from calseg.service.embedded import EmbeddedService

    settings = _settings(tmp_path, max_attempts=1)
    with EmbeddedService(settings, api_port=0) as svc:
        client = httpx.Client(
            base_url=svc.url, headers=auth_headers(settings.database_url, "bob"), timeout=30
        )
        long_id, short_id = _submit(client, LONG), _submit(client, SHORT)
        _running(client, long_id)
        os.kill(svc.pids["worker"], signal.SIGKILL)
        failed = _ended(client, long_id)
        assert failed["state"] == "failed"
        assert (
            failed["error"].startswith("worker lost: ")
            and "was killed by SIGKILL" in failed["error"]
        )
        assert "attempt 1 of 1" in failed["error"]
        assert _ended(client, short_id)["state"] == "succeeded"
        client.close()


def test_sigkilled_redis_is_restarted_on_its_port_and_queued_jobs_run(stack) -> None:
    """The private Redis held the queued messages: it is started again on the same port and
    every queued job is dispatched again; the running job finishes; nothing fails."""
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    running = _submit(stack.bob, LONG)
    queued = [_submit(stack.carol, SHORT) for _ in range(2)]
    _running(stack.bob, running)
    old = stack.pids["redis"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: stack.pids.get("redis") not in (None, old), 30, "a new Redis")
    import redis

    wait_for(lambda: redis.Redis(port=port).ping(), 30, "Redis on the same port")
    for job_id in queued:
        assert _ended(stack.carol, job_id)["state"] == "succeeded"
    assert _ended(stack.bob, running)["state"] == "succeeded"
    assert stack.failed is None


def test_sigkilled_api_is_restarted_on_its_port(stack) -> None:
    old = stack.pids["api"]
    job_id = _submit(stack.bob, SHORT)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: stack.pids.get("api") not in (None, old), 30, "a new api")
    t0 = time.monotonic()
    job = _ended(stack.bob, job_id)  # through the same URL: the same port
    assert job["state"] == "succeeded"
    print(f"api answered again {time.monotonic() - t0:.1f} s after its restart")
    assert stack.failed is None


def test_a_child_that_keeps_dying_makes_the_supervisor_give_up_without_failing_jobs(
    stack,
) -> None:
    """A crash loop (here: the api killed as soon as it is back) ends supervision with the
    reason; queued jobs stay queued, never failed."""
    from calseg.service.embedded import CRASH_LOOP

    job_id = _submit(stack.bob, LONG)
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while stack.failed is None and time.monotonic() < deadline:
        pid = stack.pids.get("api")
        if pid and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    assert stack.failed and f"api died {CRASH_LOOP} times" in stack.failed, stack.failed
    assert "giving up" in stack.failed
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    with session_scope(stack.settings.database_url) as s:
        assert s.get(Job, job_id).state in ("queued", "running", "succeeded")


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "calseg.service.embedded"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("".join(lines))
        lines.append(line)
        if m := re.search(r"CalSeg is up: (http://\S+?)/ ", line):
            return proc, m.group(1)
    pytest.fail("".join(lines))


def test_a_sigkilled_supervisor_takes_its_children_and_the_next_start_recovers_its_jobs(
    tmp_path: Path,
) -> None:
    """`make serve` SIGKILLed while a job runs and another waits: api, worker and Redis die
    with it; `make serve` again (same port) re-queues the job left running (as lost: attempt
    2) and dispatches the queued one again; both succeed."""
    from calseg.service.embedded import free_port

    settings = _settings(tmp_path, api_port=free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(REPO)
    proc, url = _serve(env)
    try:
        client = httpx.Client(
            base_url=url, headers=auth_headers(settings.database_url, "bob"), timeout=30
        )
        running, queued = _submit(client, LONG), _submit(client, SHORT)
        _running(client, running)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/api/health", timeout=1)
            except httpx.TransportError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the api outlived its supervisor")
        proc2, url2 = _serve(env)
        try:
            assert url2 == url
            for job_id, attempts in ((running, 2), (queued, 1)):
                job = _ended(client, job_id)
                assert job["state"] == "succeeded" and job["attempts"] == attempts, job
        finally:
            os.killpg(proc2.pid, signal.SIGTERM)
            proc2.wait(timeout=60)
        client.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
