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
