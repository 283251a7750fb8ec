"""Helpers of the reliability tests (issue 8): real processes that the tests kill and restart.

* :class:`PrivateRedis`: a ``redis-server`` of the test's own on a free loopback port (no
  persistence), so restarting it never touches the machine's shared Redis.
* :func:`pg_url`: a fresh database on the machine's PostgreSQL (DESIGN.md section 7), migrated,
  dropped afterwards.
* :class:`Worker`: a Celery worker process (solo pool) with the test's settings; its log file
  tells how often it started a job.
* :func:`auth_headers`: a user and API token in the test's database.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    from calseg.service.embedded import free_port as fp

    return fp()


class PrivateRedis:
    """A private ``redis-server`` (no persistence: a restart loses every message)."""

    def __init__(self, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.exe = exe
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="calseg-rel-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: every queued message is gone."""
        self.stop()
        self.start()

    def client(self):  # noqa: ANN201 - redis.Redis
        import redis

        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def auth_headers(url: str, name: str | None = None, *, admin: bool = False) -> dict[str, str]:
    """Create a user (and an API token) in database ``url``; the Authorization header."""
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        user = create_user(session, name or f"u{uuid.uuid4().hex[:8]}", is_admin=admin)
        _, token = create_token(session, user, "tests")
    return {"Authorization": f"Bearer {token}"}


STARTED = re.compile(r"job (\S+): \w+ job \S+ started on")


class Worker:
    """A Celery worker process (solo pool, queues cpu+gpu) configured by ``settings``."""

    def __init__(self, settings, name: str, log_dir: Path, queues: str = "cpu,gpu") -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"worker-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
        env.update(settings.to_env())
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
             "-P", "solo", "-c", "1", "-Q", queues, "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=REPO, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90) -> Worker:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready:\n{self.log()[-3000:]}")

    def starts(self, job_id: str | None = None) -> int:
        """How many times this worker started a job (``job_id``: that one)."""
        return sum(1 for m in STARTED.finditer(self.log()) if job_id in (None, m.group(1)))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._fh.close()


def service_settings(tmp_path: Path, db_url: str, redis_url: str | None, **overrides):
    """Settings of a test service: its own folders, PostgreSQL ``db_url``, ``redis_url``."""
    from calseg.service.settings import Settings, get_settings

    base = get_settings()
    values = dict(
        database_url=db_url,
        redis_url=redis_url,
        artifact_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
        token_file=tmp_path / "token",
        real_data_dir=base.real_data_dir,
        api_port=0,
        progress_interval_s=0.5,
        reconcile_interval_s=0,
    )
    values.update(overrides)
    return Settings(**values)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``predicate()`` until it returns a truthy value (returned); fail after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def kill_process(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
