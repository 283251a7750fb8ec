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


def _time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is ``port`` (from /proc/net/tcp)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        n += int(local.split(":")[1], 16) == port and state == "06"
    return n


def test_port_is_free_despite_time_wait() -> None:
    """A server that just stopped leaves its closed connections in TIME_WAIT on its port for a
    minute; that must not move a restart to another port (issue 13 item 5), while a port with
    a listening server is still reported busy."""
    import socket

    from calseg.service.embedded import port_is_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_is_free("127.0.0.1", port)  # listening
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: TIME_WAIT on its port
    client.recv(1)
    client.close()
    server.close()
    deadline = time.monotonic() + 5
    while not _time_wait_on(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _time_wait_on(port) >= 1
    plain = socket.socket()  # what port_is_free did before: a bind without SO_REUSEADDR
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    plain.close()
    assert port_is_free("127.0.0.1", port)


def test_a_second_stack_on_one_database_is_refused(tmp_path: Path) -> None:
    """The lock of the embedded service (in-process: flock is per open file)."""
    from calseg.service.embedded import EmbeddedServiceError, ServiceLock
    from calseg.service.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'calseg.db'}")
    first = ServiceLock(settings)
    first.write("http://127.0.0.1:8123")
    with pytest.raises(EmbeddedServiceError) as err:
        ServiceLock(settings)
    msg = str(err.value)
    assert f"another CalSeg service (pid {os.getpid()}, serving http://127.0.0.1:8123)" in msg
    assert f"{tmp_path / 'calseg.db'}" in msg and "stop it first" in msg
    first.release()
    ServiceLock(settings).release()  # free again


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of `make serve` on a database, folders and a port of the test's own."""
    from calseg.service.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
    env.update(
        CALSEG_DATABASE_URL=f"sqlite:///{tmp_path / 'calseg.db'}",
        CALSEG_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        CALSEG_CACHE_DIR=str(tmp_path / "cache"),
        CALSEG_LOG_DIR=str(tmp_path / "logs"),
        CALSEG_TOKEN_FILE=str(tmp_path / "token"),
        CALSEG_API_PORT=str(free_port()),  # fixed: a restart must keep it
        **extra,
    )
    return env


class Serve:
    """`python -m calseg.service.embedded` (what `make serve` runs; ``cmd``: another command
    that starts it) as a real process; ``.url``, ``.redis_port`` and ``.lines`` (its output)
    once it is up."""

    def __init__(self, env: dict[str, str], cmd: list[str] | None = None) -> None:
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd or [sys.executable, "-m", "calseg.service.embedded"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + 120
        self.url = None
        while self.url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"embedded service exited early:\n{''.join(self.lines)}")
            self.lines.append(line)
            m = re.search(r"CalSeg is up: (http://\S+?)/ ", line)
            self.url = m.group(1) if m else None
        assert self.url, "".join(self.lines)
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)
            if line.startswith("database"):
                self.redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/", line).group(1))
                break
        self.port = int(self.url.rsplit(":", 1)[1])

    def worker_pids(self) -> list[str]:
        return _pgrep(f"calseg-embedded-{self.pid}@")

    def redis_pids(self) -> list[str]:
        # redis-server sets its process title to "redis-server <host>:<port>"
        return _pgrep(f"redis-server 127\\.0\\.0\\.1:{self.redis_port}( |$)")

    def api_answers(self) -> bool:
        try:
            return httpx.get(self.url + "/api/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _submit(url: str, token: str, n_frames: int) -> str:
    r = httpx.post(
        url + "/api/jobs",
        json={"kind": "simulate", "params": {"n_videos": 3, "n_frames": n_frames}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _jobs(env: dict[str, str], ids: list[str]) -> list:
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    with session_scope(env["CALSEG_DATABASE_URL"]) as session:
        out = [session.get(Job, i) for i in ids]
        for job in out:
            session.expunge(job)
        return out


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_sigterm_stops_every_child_keeps_queued_jobs_and_the_next_start_runs_them(
    tmp_path: Path,
) -> None:
    """SIGTERM (kill, systemd, a closed terminal) stops api, worker and the private Redis.
    A queued job is never failed for it (issue 13 item 5): it stays queued, and the next start
    (on the same port, within a minute: TIME_WAIT does not move it) dispatches it again."""
    env = _serve_env(tmp_path)
    first = Serve(env)
    try:
        url = first.url
        assert httpx.get(url + "/api/ready", timeout=5).status_code == 200
        # no manual step: a fresh database gets the admin "local" and its token, mode 0600,
        # and the start-up lines give the page URL with it
        token_file = tmp_path / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert f"{url}/#token={token}" in "".join(first.lines)
        auth = {"Authorization": f"Bearer {token}"}
        me = httpx.get(url + "/api/me", headers=auth, timeout=5).json()
        assert me["name"] == "local" and me["is_admin"] is True

        # job A keeps the solo worker busy; job B waits behind it in the private Redis
        ids = [_submit(url, token, 32), _submit(url, token, 4)]
        # open keep-alive connections: the stopping server closes them first, so they linger
        # in TIME_WAIT on its port for a minute
        kept = [httpx.Client(base_url=url, timeout=5) for _ in range(3)]
        for client in kept:
            assert client.get("/api/health").status_code == 200
        os.kill(first.pid, signal.SIGTERM)
        rest, _ = first.proc.communicate(timeout=60)
        for client in kept:
            client.close()
        assert first.proc.returncode != 0  # SystemExit(128 + SIGTERM)
    finally:
        first.close()
    assert not first.api_answers()
    assert first.worker_pids() == []  # the Celery worker
    assert first.redis_pids() == []  # the private Redis (found while it ran: the next test)

    a, b = _jobs(env, ids)
    assert a.state in ("queued", "succeeded"), (a.state, a.error)  # interrupted: queued again
    if a.state == "queued":
        assert "embedded service stopped" in a.message
    assert b.state == "queued" and b.error is None

    second = Serve(env)  # `make serve` again, within the minute
    try:
        assert second.port == first.port, "".join(second.lines)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            a, b = _jobs(env, ids)
            if a.state == b.state == "succeeded":
                break
            assert a.state not in ("failed", "cancelled") and b.state not in ("failed", "cancelled")
            time.sleep(0.5)
        assert (a.state, b.state) == ("succeeded", "succeeded")
        assert b.attempts == 1 and a.attempts == 1  # the interruption did not count
    finally:
        second.close()
    # what the service wrote is its user's only: with umask 022 every upload and result was
    # readable by every shell account of a shared server (a lab admin's check)
    written = [p for p in (tmp_path / "artifacts").rglob("*")] + [tmp_path / "calseg.db"]
    written += list((tmp_path / "logs").rglob("*"))
    assert any(p.is_file() for p in written) and any(p.is_dir() for p in written)
    shared = [f"{p} {p.stat().st_mode & 0o777:o}" for p in written if p.stat().st_mode & 0o077]
    assert not shared, shared


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_children_die_with_a_sigkilled_supervisor_and_one_stack_per_database(
    tmp_path: Path,
) -> None:
    """SIGKILL of the supervisor alone (issue 13 item 5): api, worker and Redis die with it
    (PR_SET_PDEATHSIG). While a stack runs, a second `make serve` on the same database refuses
    with a message naming the running one."""
    env = _serve_env(tmp_path)
    first = Serve(env)
    try:
        workers, redis = first.worker_pids(), first.redis_pids()
        assert workers and redis and first.api_answers()
        second = subprocess.run(
            [sys.executable, "-m", "calseg.service.embedded"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"another CalSeg service (pid {first.pid}, serving {first.url})" in second.stderr
        assert "calseg.db" in second.stderr and "stop it first" in second.stderr
        assert first.api_answers()  # the refused start touched nothing

        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            first.api_answers() or any(_alive(int(p)) for p in workers + redis)
        ):
            time.sleep(0.1)
        assert not first.api_answers()
        assert not [p for p in workers + redis if _alive(int(p))]
    finally:
        first.close()
    again = Serve(env)  # the lock died with the supervisor
    try:
        assert again.port == first.port and again.api_answers()
    finally:
        again.close()


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


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's children lists)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_serve_stops_the_service_when_make_is_signalled(tmp_path: Path) -> None:
    """A lab admin's check: SIGTERM to `make serve` (what an init script or `timeout` sends)
    killed make and its recipe shell, and the service went on under init, still answering on
    its port. The recipe's shell passes the signal on and waits for the clean stop."""
    make = Serve(_serve_env(tmp_path), ["make", "-s", "-o", ".venv/.installed", "serve"])
    try:
        service = [p for p in _descendants(make.pid) if "calseg.service.embedded" in
                   Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]  # fmt: skip
        assert service, _descendants(make.pid)
        make.proc.send_signal(signal.SIGTERM)  # make alone, not its process group
        out, _ = make.proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in service) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in service), "".join(make.lines) + out
        assert "stopped by signal 15" in out, out
    finally:
        make.close()
