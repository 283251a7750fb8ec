"""The embedded service (`make serve`) stops all its children on SIGTERM, and the jobs its
private broker held are failed with a reason instead of staying queued/running forever."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [p for p in out.stdout.split() if p and int(p) != os.getpid()]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_sigterm_stops_every_child_and_fails_unfinished_jobs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
    env.update(
        CALSEG_DATABASE_URL=f"sqlite:///{tmp_path / 'calseg.db'}",
        CALSEG_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        CALSEG_CACHE_DIR=str(tmp_path / "cache"),
        CALSEG_LOG_DIR=str(tmp_path / "logs"),
        CALSEG_TOKEN_FILE=str(tmp_path / "token"),
        CALSEG_API_PORT="0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "calseg.service.embedded"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"embedded service exited early:\n{''.join(lines)}")
            lines.append(line)
            m = re.search(r"CalSeg is up: (http://\S+?)/ ", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if line.startswith("database"):
                broker = line
                break
        redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)/", broker).group(1)
        assert httpx.get(url + "/api/ready", timeout=5).status_code == 200
        # no manual step: a fresh database gets the admin "local" and its token, mode 0600,
        # and the start-up lines give the page URL with it
        token_file = tmp_path / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert f"{url}/#token={token}" in "".join(lines)
        auth = {"Authorization": f"Bearer {token}"}
        me = httpx.get(url + "/api/me", headers=auth, timeout=5).json()
        assert me["name"] == "local" and me["is_admin"] is True

        # job A keeps the solo worker busy; job B waits behind it in the private Redis
        ids = []
        for n_frames in (32, 4):
            r = httpx.post(
                url + "/api/jobs",
                json={"kind": "simulate", "params": {"n_videos": 3, "n_frames": n_frames}},
                headers=auth,
                timeout=10,
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        os.kill(proc.pid, signal.SIGTERM)  # what `kill`, systemd or a closed terminal send
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0  # SystemExit(128 + SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/api/health", timeout=2)
    assert _pgrep(f"calseg-embedded-{proc.pid}@") == []  # the Celery worker
    assert _pgrep(f"redis-server.*--port {redis_port} ") == []  # the private Redis

    from calseg.service.db import session_scope
    from calseg.service.models import Job

    with session_scope(env["CALSEG_DATABASE_URL"]) as session:
        first, queued = (session.get(Job, i) for i in ids)
        # A may finish during the worker's warm shutdown; B never started and its message
        # died with the private Redis: it must not stay "queued" forever
        assert first.state in ("failed", "succeeded"), first.state
        assert queued.state == "failed", queued.state
        assert "embedded service stopped" in queued.error
        assert "retry" in queued.error


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_the_api_process_runs_the_reconciler(tmp_path: Path) -> None:
    """A running job whose worker vanished (no heartbeat) is re-queued by the reconciler that
    runs inside the api process (lifespan), with a message saying why; then, at the attempt
    limit, failed with the reason."""
    from datetime import timedelta

    from sqlalchemy import update

    from calseg.service.db import session_scope
    from calseg.service.embedded import EmbeddedService
    from calseg.service.models import Job, utcnow
    from calseg.service.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'calseg.db'}",
        artifact_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
        token_file=tmp_path / "token",
        api_port=0,
        reconcile_interval_s=0.3,
        heartbeat_timeout_s=2.0,
        retry_backoff_s=60.0,
        max_attempts=2,
    )
    with EmbeddedService(settings, api_port=0, worker=False) as svc:
        headers = {"Authorization": f"Bearer {svc.token}"}
        r = httpx.post(
            svc.url + "/api/jobs",
            json={"kind": "simulate", "params": {"n_videos": 3, "n_frames": 4}},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def vanish(attempts: int) -> None:  # a worker took the job, then died
            with session_scope(settings.database_url) as s:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(state="running", attempts=attempts, worker="gone:1",
                            updated_at=utcnow() - timedelta(seconds=10))
                )  # fmt: skip

        def poll(state: str) -> dict:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                job = httpx.get(f"{svc.url}/api/jobs/{job_id}", headers=headers).json()
                if job["state"] == state:
                    return job
                time.sleep(0.2)
            pytest.fail(f"job not {state} after 30 s: {job}")

        vanish(1)
        job = poll("queued")
        assert "worker lost (gone:1" in job["message"] and "starts in 60 s" in job["message"]
        vanish(2)
        job = poll("failed")
        assert job["error"].startswith("worker lost: gone:1") and "attempt 2 of 2" in job["error"]
