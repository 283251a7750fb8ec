"""The embedded service: everything on one machine with no system service, kept alive.

:class:`EmbeddedService` starts, as child processes, a ``redis-server`` on a free loopback port
(only when ``settings.redis_url`` is None), one Celery worker (solo pool, queues ``cpu`` and
``gpu``) and uvicorn serving :mod:`api.main`; it upgrades the database first. Used by
``make demo``, ``make serve`` (``python -m calseg.service.embedded``) and the integration tests.
Child logs go to ``settings.log_dir`` (``var/logs/``).

A supervisor thread keeps the children alive (issue 13):

* **A child that dies is started again** (the api on the same port, Redis on the same port):
  at once, then after 1, 2, 4 ... s while it keeps dying; after :data:`CRASH_LOOP` deaths of
  one child within :data:`CRASH_WINDOW_S` seconds the service gives up (``.failed`` says why;
  ``make serve`` exits 1). Queued jobs are never failed for it.
* **A dead worker's job is re-queued** at once, as the reconciler does for a worker that stopped
  beating (:func:`calseg.service.reconcile.requeue_lost`: a new dispatch id, the back-off, at
  most ``settings.max_attempts`` starts, then failed with the reason).
* **A restarted private Redis lost every message**: the queued jobs are dispatched again.
* **Children die with the supervisor**: each child asks Linux for SIGKILL when its parent ends
  (``PR_SET_PDEATHSIG``, :func:`calseg.service.jobproc.die_with_parent`), so a SIGKILLed
  supervisor leaves no api, worker or Redis behind (and the worker's job process dies with the
  worker).
* **One stack per database**: an exclusive lock (``<database>.embedded.lock`` for SQLite,
  ``<artifact_dir>/.embedded.lock`` otherwise) is held while the service runs; a second start
  refuses with the pid and URL of the running one. The kernel drops the lock when the holder
  dies, however it dies.
* **Restarts keep their state**: when it owns both the database (SQLite, locked) and the broker
  (its private Redis), a stop leaves queued jobs queued (a job it interrupts is queued again
  without counting the attempt) and the next start dispatches them again; a job left
  ``running`` by a supervisor that was killed is re-queued as lost.

On start it makes sure there is an API token to use
(:func:`calseg.service.auth.ensure_local_token`): on a fresh database it creates the admin
user ``local`` and writes its token to ``settings.token_file`` (``var/token``, mode 0600);
``.token`` holds it and ``.page_url`` is the page with the token in its fragment
(``http://127.0.0.1:<port>/#token=<token>``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from calseg.service.db import upgrade_database
from calseg.service.jobproc import die_with_parent, libc
from calseg.service.settings import REPO_ROOT, Settings, get_settings
from calseg.service.store import PRIVATE_UMASK

CRASH_LOOP = 5
"""Deaths of one child within :data:`CRASH_WINDOW_S` after which the supervisor gives up."""
CRASH_WINDOW_S = 60.0
SUPERVISE_INTERVAL_S = 0.25
"""How often the supervisor looks at its children (s)."""


class EmbeddedServiceError(RuntimeError):
    """A child process did not start, or another stack holds the database; the message says
    why (with the child's log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server can listen on TCP ``port`` of ``host`` now.

    Binds with ``SO_REUSEADDR``, as uvicorn and redis-server do: connections of a server that
    just stopped linger in TIME_WAIT for about a minute, and they do not keep a new server
    from listening (a plain bind would fail, and a restart would move to another port).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
        return True


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def lock_path(settings: Settings) -> Path:
    """The lock file of the embedded service on ``settings``' database: next to a SQLite file,
    else in the artifact folder."""
    url = settings.database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            return Path(path + ".embedded.lock")
    return Path(settings.artifact_dir) / ".embedded.lock"


class ServiceLock:
    """An exclusive ``flock`` on :func:`lock_path`, holding the holder's pid and URL.

    Raises:
        EmbeddedServiceError: another process holds it (the message names it).
    """

    def __init__(self, settings: Settings) -> None:
        self.path = lock_path(settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            try:
                other = json.loads(self._fh.read() or "{}")
            except ValueError:
                other = {}
            self._fh.close()
            self._fh = None
            who = f"pid {other.get('pid', '?')}"
            if other.get("url"):
                who += f", serving {other['url']}"
            raise EmbeddedServiceError(
                f"another CalSeg service ({who}) is running on the database "
                f"{settings.database_url} (lock {self.path}); stop it first"
                + (f" (kill {other['pid']})" if other.get("pid") else "")
                + ", or give this one another database (CALSEG_DATABASE_URL)"
            ) from None
        self.write(url=None)

    def write(self, url: str | None) -> None:
        """Record the holder (this process) and the api's URL in the lock file."""
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps({"pid": os.getpid(), "url": url, "since": time.time()}))
        self._fh.flush()

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


@dataclass
class Child:
    """A supervised child process."""

    name: str
    cmd: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen | None = None
    deaths: list[float] = field(default_factory=list)
    """Times (monotonic) at which it died."""
    restart_at: float | None = None
    """When to start it again (None: it runs, or is not to be restarted)."""


@dataclass
class Restart:
    """One restart done by the supervisor (``EmbeddedService.restarts``)."""

    name: str
    old_pid: int
    how: str
    """How the old process ended, e.g. ``"was killed by SIGKILL"``."""
    new_pid: int | None = None
    requeued: list[str] = field(default_factory=list)
    """Jobs re-queued (or failed at the attempt limit) because of it."""


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
        supervise: restart children that die (see the module doc); False: a dead child only
            shows in :attr:`failed`.
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
        supervise: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        self.api_port = self.settings.api_port if api_port is None else api_port
        self.start_worker = worker
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = Path(log_dir or self.settings.log_dir)
        self.url = ""
        self.bootstrap_token = bootstrap_token
        self.supervise = supervise
        self.token: str | None = None
        self.token_message = ""
        self.redis_url = self.settings.redis_url
        self.private_redis = self.redis_url is None
        self.restarts: list[Restart] = []
        """Every restart of a child, in order (tests and ``make serve``'s messages)."""
        self.failed: str | None = None
        """Why the supervisor gave up (a child kept dying), or None."""
        self.recovered: dict[str, list[str]] = {}
        """Jobs found unfinished at start and dispatched again (``queued``/``requeued``)."""
        self._children: dict[str, Child] = {}
        self._logs: list[IO[bytes]] = []
        self._lock: ServiceLock | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._mutex = threading.RLock()

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
        terminal stop the children in order (a SIGKILL kills them through PDEATHSIG)."""
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

    @property
    def exclusive(self) -> bool:
        """Whether this service alone runs jobs of its database: SQLite under its lock, with
        its private Redis (then it may dispatch queued jobs again and re-queue orphans)."""
        return self.private_redis and self.settings.database_url.startswith("sqlite")

    def start(self) -> None:
        """Start everything and wait until the api is ready and the worker answers.

        Raises:
            EmbeddedServiceError: another stack runs on this database, or a child did not
                start (its log tail in the message).
        """
        self._lock = ServiceLock(self.settings)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings.artifact_dir.mkdir(parents=True, exist_ok=True)
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
        self._port = port
        self.url = f"http://{self.settings.api_host}:{port}"
        # every child is started by this one thread: PR_SET_PDEATHSIG fires when the thread
        # that forked a child ends, so it lives until the children are stopped
        self._thread = threading.Thread(target=self._run, name="calseg-supervisor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self._lock.write(self.url)

    @property
    def page_url(self) -> str:
        """The page's URL, with the token in its fragment when there is one (the page reads
        it from there and keeps it; a fragment is never sent to the server or its logs)."""
        return f"{self.url}/#token={self.token}" if self.token else f"{self.url}/"

    @property
    def pids(self) -> dict[str, int]:
        """Pid of each running child (``api``, ``worker``, ``redis``)."""
        with self._mutex:
            return {
                n: c.proc.pid
                for n, c in self._children.items()
                if c.proc is not None and c.proc.poll() is None
            }

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

    # ------------------------------------------------------------------ the supervisor
    def _run(self) -> None:
        """The supervisor thread: start the children, keep them alive, stop them."""
        try:
            if self.private_redis:
                self.redis_url = self._start_redis()
            if self.exclusive:
                self._recover_jobs()
            env = self.child_env(self._port)
            if self.start_worker:
                self._add("worker", self._worker_cmd(), env)
            self._add("api", self._api_cmd(), env)
            self._wait_ready()
            if self.start_worker:
                self._wait_worker()
        except BaseException as exc:  # noqa: BLE001 - handed to start() in the caller's thread
            self._error = exc
            self._ready.set()
            self._stop_children()
            self._done.set()
            return
        self._ready.set()
        try:
            while not self._stopping.wait(SUPERVISE_INTERVAL_S):
                try:
                    self._supervise_once()
                except Exception as exc:  # noqa: BLE001 - keep supervising
                    print(f"calseg: supervisor: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self._stop_children()
            self._done.set()

    def _worker_cmd(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app",
            "worker", "-P", "solo", "-c", "1", "-Q", "cpu,gpu", "--loglevel", "INFO",
            "-n", f"calseg-embedded-{os.getpid()}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip

    def _api_cmd(self) -> list[str]:
        from api.serve import uvicorn_cli_args

        return [
            sys.executable, "-m", "uvicorn", "api.main:app", "--host",
            self.settings.api_host, "--port", str(self._port), "--log-level", "info",
            *uvicorn_cli_args(self.settings),  # proxy headers only from trusted proxies
        ]  # fmt: skip

    def _add(self, name: str, cmd: list[str], env: dict[str, str] | None) -> Child:
        child = Child(name, cmd, env)
        with self._mutex:
            self._children[name] = child
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> subprocess.Popen:
        log_path = self.log_dir / f"{child.name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in _stop_children()
        fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(child.cmd)}\n".encode())
        fh.flush()
        self._logs.append(fh)
        parent = os.getpid()

        def _preexec() -> None:  # in the child, before exec: die with the supervisor
            os.umask(PRIVATE_UMASK)  # its files: the service's user only (keep_files_private)
            die_with_parent(signal.SIGKILL)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)

        libc()  # loaded here: the forked child only calls prctl
        child.proc = subprocess.Popen(
            child.cmd,
            cwd=REPO_ROOT,
            env=child.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_preexec,  # noqa: PLW1509 - only prctl, after libc was loaded
        )
        child.restart_at = None
        return child.proc

    def _start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise EmbeddedServiceError(
                "no broker: CALSEG_REDIS_URL is not set and redis-server is not installed "
                "(apt-get install redis-server, or point CALSEG_REDIS_URL at a Redis)"
            )
        port = free_port()
        data_dir = self.log_dir / "redis-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._add(
            "redis",
            [
                exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "yes",
            ],
            None,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        self._wait_redis(url)
        return url

    def _wait_redis(self, url: str, timeout_s: float = 20.0) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive("redis")
            try:
                redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise EmbeddedServiceError(
            f"redis-server did not answer:\n{_tail(self.log_dir / 'redis.log')}"
        )

    def _check_alive(self, *names: str) -> None:
        for name, child in list(self._children.items()):
            if names and name not in names:
                continue
            if child.proc is not None and child.proc.poll() is not None:
                log_path = self.log_dir / f"{name}.log"
                raise EmbeddedServiceError(
                    f"{name} {_exit_text(child.proc.returncode)}; its log ({log_path}) "
                    f"ends:\n{_tail(log_path)}"
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

    def _supervise_once(self) -> None:
        """Start again every child that died (with back-off); give up on a crash loop."""
        now = time.monotonic()
        for child in list(self._children.values()):
            if self._stopping.is_set():
                return
            proc = child.proc
            if proc is not None and proc.poll() is None:
                continue
            if child.restart_at is None:  # it just died
                how = _exit_text(proc.returncode if proc is not None else None)
                child.deaths = [t for t in child.deaths if now - t < CRASH_WINDOW_S] + [now]
                old_pid = proc.pid if proc is not None else 0
                print(f"calseg: {child.name} (pid {old_pid}) {how}", file=sys.stderr, flush=True)
                if not self.supervise:
                    self.failed = self.failed or f"{child.name} {how}"
                    child.restart_at = float("inf")
                    continue
                if len(child.deaths) >= CRASH_LOOP:
                    self.failed = (
                        f"{child.name} died {len(child.deaths)} times within "
                        f"{CRASH_WINDOW_S:.0f} s (last: {how}); giving up. Its log: "
                        f"{self.log_dir / (child.name + '.log')}"
                    )
                    print(f"calseg: {self.failed}", file=sys.stderr, flush=True)
                    child.restart_at = float("inf")
                    continue
                delay = 0.0 if len(child.deaths) == 1 else 2.0 ** (len(child.deaths) - 2)
                child.restart_at = now + delay
                event = Restart(child.name, old_pid, how)
                self.restarts.append(event)
                if child.name == "worker":
                    event.requeued = self._requeue_worker_jobs(old_pid, how)
            if now < child.restart_at:
                continue
            event = next(e for e in reversed(self.restarts) if e.name == child.name)
            new = self._spawn(child)
            event.new_pid = new.pid
            print(
                f"calseg: {child.name} started again (pid {new.pid})"
                + (f"; re-queued job(s) {', '.join(event.requeued)}" if event.requeued else ""),
                file=sys.stderr,
                flush=True,
            )
            if child.name == "redis":
                self._wait_redis(self.redis_url or "")
                if self.exclusive:  # the private broker lost every queued message
                    self._recover_jobs(running=False)

    # ------------------------------------------------------------------ jobs
    def _enqueue(self) -> Callable[[Any, float | None], None]:
        """An enqueue on this service's broker (a fresh Celery app: the broker may have been
        restarted since the last one)."""
        from calseg.service.broker import enqueue_celery, make_celery

        app = make_celery(self.settings.model_copy(update={"redis_url": self.redis_url}))

        def enqueue(job: Any, countdown: float | None = None) -> None:
            enqueue_celery(job, countdown, app=app)

        return enqueue

    def _requeue_worker_jobs(self, pid: int, how: str) -> list[str]:
        """Re-queue (or fail at the attempt limit) the jobs the dead worker ``pid`` ran."""
        from sqlalchemy import select

        from calseg.service.db import session_scope
        from calseg.service.jobs import worker_name
        from calseg.service.models import Job, utcnow
        from calseg.service.reconcile import requeue_lost

        enqueue = self._enqueue()
        done = []
        with session_scope(self.settings.database_url) as session:
            running = session.scalars(
                select(Job).where(Job.state == "running", Job.worker == worker_name(pid))
            ).all()
            for job in running:
                what = f"{how} (seen by the embedded supervisor)"
                if requeue_lost(
                    session, job, self.settings, enqueue=enqueue, now=utcnow(), what=what
                ):
                    done.append(job.id)
        return done

    def _recover_jobs(self, running: bool = True) -> None:
        """Dispatch again the queued jobs (their messages died with a private Redis) and, with
        ``running``, re-queue jobs left running by a stack that was killed (none of its
        processes is left: they died with it, and this service holds the lock)."""
        from sqlalchemy import select, update

        from calseg.service.broker import QueueUnavailable
        from calseg.service.db import session_scope
        from calseg.service.models import Job, new_id, utcnow
        from calseg.service.reconcile import requeue_lost

        enqueue = self._enqueue()
        requeued, queued = [], []
        with session_scope(self.settings.database_url) as session:
            if running:
                for job in session.scalars(select(Job).where(Job.state == "running")).all():
                    what = "was gone when the embedded service started (it had been killed)"
                    if requeue_lost(
                        session, job, self.settings, enqueue=enqueue, now=utcnow(), what=what
                    ):
                        requeued.append(job.id)
            for job in session.scalars(
                select(Job).where(Job.state == "queued", Job.id.not_in(requeued))
            ).all():
                res = session.execute(
                    update(Job)
                    .where(
                        Job.id == job.id, Job.state == "queued", Job.dispatch_id == job.dispatch_id
                    )
                    .values(dispatch_id=new_id(), updated_at=utcnow())
                )
                session.commit()
                if not res.rowcount:
                    continue
                session.refresh(job)
                try:
                    enqueue(job, None)
                except QueueUnavailable as exc:  # stays queued: the reconciler sends it later
                    print(f"calseg: job {job.id} not dispatched: {exc}", file=sys.stderr)
                    continue
                queued.append(job.id)
        self.recovered = {"queued": queued, "requeued": requeued}
        if queued or requeued:
            print(
                f"calseg: dispatched {len(queued)} queued job(s) again; re-queued "
                f"{len(requeued)} job(s) left running",
                file=sys.stderr,
                flush=True,
            )

    def _park_interrupted(self, worker_pid: int) -> int:
        """After a stop: jobs the stopped worker left running go back to ``queued`` without
        counting the attempt; the next start dispatches them again."""
        from sqlalchemy import update

        from calseg.service.db import session_scope
        from calseg.service.jobs import worker_name
        from calseg.service.models import Job, new_id, utcnow

        with session_scope(self.settings.database_url) as session:
            res = session.execute(
                update(Job)
                .where(Job.state == "running", Job.worker == worker_name(worker_pid))
                .values(
                    state="queued",
                    stage="queued",
                    attempts=Job.attempts - 1,
                    dispatch_id=new_id(),
                    eta_s=None,
                    updated_at=utcnow(),
                    message="interrupted: the embedded service stopped while it ran; it runs "
                    "again when the service starts again",
                )
            )
            return res.rowcount

    # ------------------------------------------------------------------ stop
    def _stop_children(self, timeout_s: float = 15.0) -> None:
        """Stop the children: api, then worker (warm shutdown), then redis; kill on timeout."""
        order = {"api": 0, "worker": 1, "redis": 2}
        with self._mutex:
            children = sorted(self._children.values(), key=lambda c: order.get(c.name, 9))
        worker_pid = None
        for child in children:
            proc = child.proc
            if proc is None:
                continue
            if child.name == "worker":
                worker_pid = proc.pid
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
        for fh in self._logs:
            fh.close()
        self._logs.clear()
        if worker_pid is not None and self.exclusive:
            try:
                n = self._park_interrupted(worker_pid)
            except Exception as exc:  # noqa: BLE001 - stopping must not fail on the database
                print(f"calseg: could not re-queue the interrupted job: {exc}", file=sys.stderr)
            else:
                if n:
                    print(f"calseg: {n} interrupted job(s) queued again", file=sys.stderr)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop supervising and stop the children (see :meth:`_stop_children`); queued jobs
        stay queued. Releases the database lock."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout=3 * timeout_s + 30)
        elif thread is None:
            self._stop_children(timeout_s)
        self._thread = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def main(argv: list[str] | None = None) -> int:
    """``make serve``: run api + worker (+ Redis when none is configured) until Ctrl-C."""
    p = argparse.ArgumentParser(prog="python -m calseg.service.embedded", description=main.__doc__)
    p.add_argument("--port", type=int, default=None, help="api port (default CALSEG_API_PORT)")
    args = p.parse_args(argv)
    from calseg.segment.model import default_base_checkpoint
    from calseg.service.store import keep_files_private

    keep_files_private()  # the database, logs and token it writes; its children set it too
    settings = get_settings()
    # the SAM2 base: CALSEG_SAM2_CHECKPOINT, else the small SAM2 trained here (when shipped)
    base = default_base_checkpoint(settings.sam2_checkpoint)
    settings = settings.model_copy(update={"sam2_checkpoint": base})
    try:
        service = EmbeddedService(settings, api_port=args.port)
        with service:
            print(f"CalSeg is up: {service.url}/  (API docs {service.url}/docs)", flush=True)
            print(f"token: {service.token_message}", flush=True)
            if service.token:
                print(f"open the page with its token: {service.page_url}", flush=True)
            print(f"database {settings.database_url}; broker {service.redis_url}", flush=True)
            print(f"artifacts {settings.artifact_dir}; logs {service.log_dir}", flush=True)
            print("Ctrl-C stops it.", flush=True)
            try:
                while service.failed is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                print("stopping…", flush=True)
                return 0
            print(f"error: {service.failed}", file=sys.stderr, flush=True)
            return 1
    except EmbeddedServiceError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
