"""The embedded service: everything on one machine with no system service.

:class:`EmbeddedService` starts, as child processes, a ``redis-server`` on a free loopback port
(only when ``settings.redis_url`` is None), one Celery worker (solo pool, queues ``cpu`` and
``gpu``) and uvicorn serving :mod:`api.main`; it upgrades the database first. Used by
``make demo``, ``make serve`` (``python -m calseg.service.embedded``) and the integration tests.
Child logs go to ``settings.log_dir`` (``var/logs/``).

On start it makes sure there is an API token to use
(:func:`calseg.service.auth.ensure_local_token`): on a fresh database it creates the admin
user ``local`` and writes its token to ``settings.token_file`` (``var/token``, mode 0600);
``.token`` holds it and ``.page_url`` is the page with the token in its fragment
(``http://127.0.0.1:<port>/#token=<token>``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from calseg.service.db import upgrade_database
from calseg.service.jobs import abandon_unfinished
from calseg.service.settings import REPO_ROOT, Settings, get_settings


class EmbeddedServiceError(RuntimeError):
    """A child process did not start; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a TCP port on ``host`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class EmbeddedService:
    """Context manager running redis (if needed) + Celery worker + api; ``.url`` is the api.

    Args:
        settings: the configuration (default :func:`get_settings`); children receive it as
            explicit ``CALSEG_*`` environment variables.
        api_port: port of the api (default ``settings.api_port``; 0 picks a free one).
        worker: start a Celery worker (False: api only, e.g. for tests of the api alone).
        ready_timeout_s: how long to wait for ``/api/ready`` and the worker.
        log_dir: where ``api.log``, ``worker.log`` and ``redis.log`` go.
        bootstrap_token: make sure ``settings.token_file`` holds a working token (creating
            the admin user ``local`` on a database without users); False: leave users alone.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        api_port: int | None = None,
        worker: bool = True,
        ready_timeout_s: float = 90.0,
        log_dir: Path | None = None,
        bootstrap_token: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        self.api_port = self.settings.api_port if api_port is None else api_port
        self.start_worker = worker
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = Path(log_dir or self.settings.log_dir)
        self.url = ""
        self.bootstrap_token = bootstrap_token
        self.token: str | None = None
        self.token_message = ""
        self.redis_url = self.settings.redis_url
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._redis_dir: str | None = None
        self._logs: list = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> EmbeddedService:
        self._trap_signals()
        try:
            self.start()
        except BaseException:
            self.stop()
            self._restore_signals()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self._restore_signals()

    def _trap_signals(self) -> None:
        """Turn SIGTERM and SIGHUP into SystemExit, so `kill`, a supervisor or a closed
        terminal stop the children too (they run in their own sessions and would survive)."""
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def _exit(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _exit)

    def _restore_signals(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def start(self) -> None:
        """Start everything and wait until the api is ready and the worker answers."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings.artifact_dir.mkdir(parents=True, exist_ok=True)
        if self.redis_url is None:
            self.redis_url = self._start_redis()
        upgrade_database(self.settings.database_url)
        if self.bootstrap_token:
            from calseg.service.auth import ensure_local_token
            from calseg.service.db import session_scope

            with session_scope(self.settings.database_url) as session:
                self.token, self.token_message = ensure_local_token(
                    session, self.settings.token_file
                )
        port = self.api_port or free_port(self.settings.api_host)
        if not port_is_free(self.settings.api_host, port):
            fallback = free_port(self.settings.api_host)
            print(
                f"calseg: port {port} is in use; serving on {fallback} instead "
                "(set CALSEG_API_PORT to choose)",
                file=sys.stderr,
                flush=True,
            )
            port = fallback
        env = self.child_env(port)
        if self.start_worker:
            self._spawn(
                "worker",
                [
                    sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app",
                    "worker", "-P", "solo", "-c", "1", "-Q", "cpu,gpu", "--loglevel", "INFO",
                    "-n", f"calseg-embedded-{os.getpid()}@%h", "--without-gossip",
                    "--without-mingle", "--without-heartbeat",
                ],
                env,
            )  # fmt: skip
        self._spawn(
            "api",
            [
                sys.executable, "-m", "uvicorn", "api.main:app", "--host",
                self.settings.api_host, "--port", str(port), "--log-level", "info",
            ],
            env,
        )  # fmt: skip
        self.url = f"http://{self.settings.api_host}:{port}"
        self._wait_ready()
        if self.start_worker:
            self._wait_worker()

    @property
    def page_url(self) -> str:
        """The page's URL, with the token in its fragment when there is one (the page reads
        it from there and keeps it; a fragment is never sent to the server or its logs)."""
        return f"{self.url}/#token={self.token}" if self.token else f"{self.url}/"

    def child_env(self, port: int) -> dict[str, str]:
        """The environment of the children: ours, plus every setting as ``CALSEG_*``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
        env.update(self.settings.to_env())
        env["CALSEG_REDIS_URL"] = self.redis_url or ""
        env["CALSEG_API_PORT"] = str(port)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        self._logs.append(fh)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append((name, proc))
        return proc

    def _start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise EmbeddedServiceError(
                "no broker: CALSEG_REDIS_URL is not set and redis-server is not installed "
                "(apt-get install redis-server, or point CALSEG_REDIS_URL at a Redis)"
            )
        port = free_port()
        self._redis_dir = tempfile.mkdtemp(prefix="calseg-redis-")
        self._spawn(
            "redis",
            [
                exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._redis_dir, "--protected-mode", "yes",
            ],
            None,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
                return url
            except redis.RedisError:
                time.sleep(0.1)
        raise EmbeddedServiceError(
            f"redis-server did not answer:\n{_tail(self.log_dir / 'redis.log')}"
        )

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise EmbeddedServiceError(
                    f"{name} exited with code {proc.returncode}; its log "
                    f"({self.log_dir / f'{name}.log'}) ends:\n{_tail(self.log_dir / f'{name}.log')}"
                )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = httpx.get(self.url + "/api/ready", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise EmbeddedServiceError(f"api not ready after {self.ready_timeout_s:.0f} s: {last}")

    def _wait_worker(self) -> None:
        """Wait until the worker log says it is consuming (cheaper than a broadcast ping)."""
        log_path = self.log_dir / "worker.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            with open(log_path, "rb") as fh:
                fh.seek(max(start - 4096, 0))
                text = fh.read().decode(errors="replace")
            if " ready." in text:
                return
            time.sleep(0.2)
        raise EmbeddedServiceError(f"worker not ready:\n{_tail(log_path)}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the children: api, then worker (warm shutdown), then redis; kill on timeout."""
        order = {"api": 0, "worker": 1, "redis": 2}
        for _name, proc in sorted(self._procs, key=lambda p: order.get(p[0], 9)):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=5)
        self._procs.clear()
        for fh in self._logs:
            fh.close()
        self._logs.clear()
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None
            # the private broker took the messages of unfinished jobs with it
            try:
                n = abandon_unfinished(
                    self.settings.database_url,
                    "the embedded service stopped (with its private Redis) before this job "
                    "finished; retry it",
                )
            except Exception as exc:  # noqa: BLE001 - stopping must not fail on the database
                print(f"calseg: could not mark unfinished jobs failed: {exc}", file=sys.stderr)
            else:
                if n:
                    print(f"calseg: {n} unfinished job(s) marked failed", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``make serve``: run api + worker (+ Redis when none is configured) until Ctrl-C."""
    p = argparse.ArgumentParser(prog="python -m calseg.service.embedded", description=main.__doc__)
    p.add_argument("--port", type=int, default=None, help="api port (default CALSEG_API_PORT)")
    args = p.parse_args(argv)
    settings = get_settings()
    with EmbeddedService(settings, api_port=args.port) as service:
        print(f"CalSeg is up: {service.url}/  (API docs {service.url}/docs)", flush=True)
        print(f"token: {service.token_message}", flush=True)
        if service.token:
            print(f"open the page with its token: {service.page_url}", flush=True)
        print(f"database {settings.database_url}; broker {service.redis_url}", flush=True)
        print(f"artifacts {settings.artifact_dir}; logs {service.log_dir}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(1)
                service._check_alive()
        except KeyboardInterrupt:
            print("stopping…", flush=True)
        except EmbeddedServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
