"""The reconciler: the database is the source of truth for jobs; the broker only carries them.

Two ways a job can be lost, and what :func:`reconcile` does about each:

* **The worker running it vanished** (SIGKILL, OOM killer, node lost). A running job proves it
  is alive by its heartbeat: the worker touches ``jobs.updated_at`` every
  ``settings.heartbeat_interval_s`` (:class:`Heartbeat`, besides every progress write). A
  running job whose heartbeat is older than ``settings.heartbeat_timeout_s`` is *lost*: it is
  re-queued with a new ``dispatch_id`` after an exponential back-off
  (``retry_backoff_s * 2**(attempts-1)`` s), until it has been started ``max_attempts`` times;
  then it fails with the reason ``"worker lost: ..."``. The old message (still unacknowledged
  in Redis, redelivered after the visibility timeout) carries the old dispatch id and is
  skipped by :func:`calseg.service.jobs.run_job`, so the job never runs twice at once.
* **Its message vanished** (Redis restarted without persistence, flushed, or a send that was
  lost). A job queued for longer than ``settings.requeue_grace_s`` whose current
  ``(job id, dispatch id)`` is in no queue list and not among the unacknowledged messages of the
  Redis broker is dispatched again (again with a new dispatch id, so a message that turns up
  later is stale).

Every change is a conditional UPDATE on the state the reconciler read, so it never overwrites
a worker's or a user's change made meanwhile; running it in several processes at once (e.g.
each api worker) is safe. It runs every ``settings.reconcile_interval_s`` in the api process
(:func:`reconciler_lifespan`) and once with ``calseg reconcile``.

The api's passes also sweep its staging folders (:func:`calseg.service.staging.sweep`: what
uploads left in ``recordings/.incoming`` when their process died), once when it starts and then
at every pass; ``calseg reconcile`` does not (it holds no upload of its own).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from calseg.service.models import Job, new_id, utcnow
from calseg.service.settings import Settings, get_settings

log = logging.getLogger("calseg.service.reconcile")

UNACKED_KEY = "unacked"
"""Hash of kombu's Redis transport holding delivered, not yet acknowledged messages."""
PRIORITY_SEP = "\x06\x16"
"""Separator of kombu's per-priority queue lists (``cpu``, ``cpu\\x06\\x163``, ...)."""


# ------------------------------------------------------------------------------ heartbeat


class Heartbeat:
    """A daemon thread that touches ``jobs.updated_at`` of a running job every ``interval_s``.

    The UPDATE is conditional on the job still running under ``dispatch_id``; once it is not
    (cancelled, superseded by the reconciler) the thread stops by itself. Database errors are
    logged and retried at the next beat (a short outage must not kill the job).

    Args:
        url: SQLAlchemy database URL.
        job_id: the job.
        dispatch_id: the dispatch this worker runs.
        interval_s: seconds between beats (> 0).
    """

    def __init__(self, url: str, job_id: str, dispatch_id: str | None, interval_s: float) -> None:
        self.url, self.job_id, self.dispatch_id = url, job_id, dispatch_id
        self.interval_s = max(float(interval_s), 0.05)
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True
        )

    def start(self) -> Heartbeat:
        """Start beating; returns self."""
        self._thread.start()
        return self

    def beat(self) -> bool:
        """Touch the job once; False when it no longer runs under this dispatch."""
        from calseg.service.db import session_scope

        with session_scope(self.url) as session:
            res = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.state == "running",
                    Job.dispatch_id == self.dispatch_id,
                )
                .values(updated_at=utcnow())
            )
        self.beats += 1
        return res.rowcount > 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.beat():
                    return
            except Exception as exc:  # noqa: BLE001 - keep beating through DB hiccups
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)

    def stop(self) -> None:
        """Stop the thread (waits for a beat in progress)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def heartbeat_age_s(job: Job, now: datetime | None = None) -> float:
    """Seconds since the job's last heartbeat (``updated_at``; ``started_at`` if unset)."""
    now = now or utcnow()
    last = job.updated_at or job.started_at or job.created_at
    if last is None:
        return float("inf")
    if last.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        last = last.replace(tzinfo=now.tzinfo)
    return (now - last).total_seconds()


def is_alive(job: Job, settings: Settings, now: datetime | None = None) -> bool:
    """Whether a running job's heartbeat is younger than ``settings.heartbeat_timeout_s``."""
    return heartbeat_age_s(job, now) < settings.heartbeat_timeout_s


def backoff_s(attempts: int, settings: Settings) -> float:
    """Delay before re-running a job lost after ``attempts`` starts:
    ``retry_backoff_s * 2**(attempts - 1)``, at most ``retry_backoff_max_s`` (seconds)."""
    if settings.retry_backoff_s <= 0:
        return 0.0
    return min(settings.retry_backoff_s * 2 ** max(attempts - 1, 0), settings.retry_backoff_max_s)


# ------------------------------------------------------------------------------ broker


def _decode_dispatch(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """(task id, dispatch id) of a Celery protocol-2 message as kombu stores it in Redis."""
    headers = message.get("headers") or {}
    task_id = headers.get("id")
    dispatch = None
    try:
        body = message.get("body")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        dispatch = (kwargs or {}).get("dispatch_id")
    except (ValueError, TypeError, KeyError):
        pass
    return task_id, dispatch


def broker_dispatches(redis_url: str, queues: Iterable[str] = ("cpu", "gpu")) -> set[tuple]:
    """Every ``(job id, dispatch id)`` the Redis broker holds: waiting in a queue list (all
    priority levels) or delivered to a worker and not yet acknowledged.

    Raises:
        redis.RedisError: the broker cannot be reached.
    """
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    found: set[tuple] = set()
    try:
        keys: list[bytes | str] = []
        for queue in queues:
            keys.append(queue)
            keys.extend(client.scan_iter(match=f"{queue}{PRIORITY_SEP}*", count=100))
        raw: list[bytes] = []
        for key in keys:
            raw.extend(client.lrange(key, 0, -1))
        for value in client.hvals(UNACKED_KEY):
            try:
                raw.append(json.dumps(json.loads(value)[0]).encode())
            except (ValueError, IndexError, TypeError):
                continue
        for item in raw:
            try:
                found.add(_decode_dispatch(json.loads(item)))
            except (ValueError, TypeError):
                continue
    finally:
        client.close()
    return found


# ------------------------------------------------------------------------------ reconcile


@dataclass
class ReconcileReport:
    """What one :func:`reconcile` pass did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    """Running jobs whose worker was lost, queued again."""
    failed: list[str] = field(default_factory=list)
    """Running jobs whose worker was lost at the attempt limit, failed with the reason."""
    redispatched: list[str] = field(default_factory=list)
    """Queued jobs whose message the broker no longer had, dispatched again."""
    broker_error: str | None = None
    """Why the broker could not be inspected (queued jobs were then left alone)."""

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.redispatched)


def requeue_lost(
    session: Any,
    job: Job,
    settings: Settings,
    *,
    enqueue: Callable[[Job, float | None], None],
    now: datetime,
    what: str,
    short: str | None = None,
    guard: tuple = (),
) -> str | None:
    """Re-queue a running job whose worker is gone, or fail it at the attempt limit.

    Re-queued: state ``queued``, a new ``dispatch_id`` (the old message becomes stale), put
    on the broker after :func:`backoff_s`; failed when it was already started
    ``settings.max_attempts`` times. Used by :func:`reconcile` (stale heartbeat) and by the
    embedded supervisor (its worker process exited: :mod:`calseg.service.embedded`).

    Args:
        session: an open session (committed here).
        job: the running job (as read; the UPDATE is conditional on its state, dispatch id and
            the extra ``guard`` clauses, so a change made meanwhile wins).
        settings: ``max_attempts`` and the back-off.
        enqueue: how to put it on the broker (:class:`QueueUnavailable` is logged: the job
            stays queued and the reconciler's broker check dispatches it later).
        now: the current time.
        what: how the worker was lost, for the error (``"<worker> <what> during attempt ..."``).
        short: the same for the queued message (default ``what``).
        guard: extra WHERE clauses.

    Returns:
        ``"requeued"``, ``"failed"``, or None when the job changed meanwhile.
    """
    from calseg.service.broker import QueueUnavailable

    who = job.worker or "unknown worker"
    where = (Job.id == job.id, Job.state == "running", Job.dispatch_id == job.dispatch_id, *guard)
    if job.attempts >= settings.max_attempts:
        res = session.execute(
            update(Job)
            .where(*where)
            .values(
                state="failed",
                finished_at=now,
                updated_at=now,
                eta_s=None,
                error=f"worker lost: {who} {what} during attempt {job.attempts} of "
                f"{settings.max_attempts}; not running it again (POST /api/jobs/{{id}}/retry "
                "to try anew)",
            )
        )
        session.commit()
        if res.rowcount:
            log.warning("job %s failed: worker %s lost at the attempt limit", job.id, who)
            return "failed"
        return None
    delay = backoff_s(job.attempts, settings)
    res = session.execute(
        update(Job)
        .where(*where)
        .values(
            state="queued",
            stage="queued",
            dispatch_id=new_id(),
            eta_s=None,
            updated_at=now,
            message=f"worker lost ({who}, {short or what}) during attempt {job.attempts} of "
            f"{settings.max_attempts}; re-queued, starts in {delay:.0f} s",
        )
    )
    session.commit()
    if not res.rowcount:
        return None
    session.refresh(job)
    try:
        enqueue(job, delay or None)
    except QueueUnavailable as exc:  # stays queued; the broker check of a later pass sends it
        log.warning("job %s re-queued in the database only: %s", job.id, exc)
    log.warning("job %s re-queued: worker %s lost", job.id, who)
    return "requeued"


def reconcile(
    url: str | None = None,
    *,
    settings: Settings | None = None,
    enqueue: Callable[[Job, float | None], None] | None = None,
    dispatches: Callable[[], set[tuple]] | None = None,
    now: datetime | None = None,
) -> ReconcileReport:
    """One pass: re-queue or fail running jobs with a stale heartbeat, re-dispatch queued jobs
    whose message is not on the broker.

    Args:
        url: database URL (default ``settings.database_url``).
        settings: limits and timeouts (default :func:`get_settings`).
        enqueue: how to put a job on the broker (default
            :func:`calseg.service.broker.enqueue_celery`).
        dispatches: returns the ``(job id, dispatch id)`` pairs on the broker (default
            :func:`broker_dispatches` on ``settings.redis_url``; None there: queued jobs are
            not checked).
        now: the current time (tests).

    Returns:
        A :class:`ReconcileReport`. Never raises for a single job's failure to re-queue: such
        a job stays queued and the next pass dispatches it again.
    """
    from calseg.service.broker import QueueUnavailable, enqueue_celery
    from calseg.service.db import session_scope

    settings = settings or get_settings()
    url = url or settings.database_url
    enqueue = enqueue or enqueue_celery
    now = now or utcnow()
    report = ReconcileReport()

    # 1. running jobs whose worker stopped beating
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    with session_scope(url) as session:
        running = session.scalars(
            select(Job).where(Job.state == "running", Job.updated_at < stale_before)
        ).all()
        for job in running:
            age = heartbeat_age_s(job, now)
            outcome = requeue_lost(
                session,
                job,
                settings,
                enqueue=enqueue,
                now=now,
                what=f"stopped sending heartbeats {age:.0f} s ago",
                short=f"no heartbeat for {age:.0f} s",
                guard=(Job.updated_at == job.updated_at,),
            )
            if outcome == "failed":
                report.failed.append(job.id)
            elif outcome == "requeued":
                report.requeued.append(job.id)
        session.commit()

    # 2. queued jobs whose message the broker lost
    if dispatches is None and settings.redis_url:
        redis_url = settings.redis_url

        def dispatches() -> set[tuple]:
            return broker_dispatches(redis_url)

    if dispatches is None:
        return report
    grace_before = now - timedelta(seconds=settings.requeue_grace_s)
    with session_scope(url) as session:
        queued = session.scalars(
            select(Job).where(Job.state == "queued", Job.updated_at < grace_before)
        ).all()
        if not queued:
            return report
        try:
            held = dispatches()
        except Exception as exc:  # noqa: BLE001 - any broker error: leave the queue alone
            report.broker_error = f"{type(exc).__name__}: {exc}"
            log.warning("reconcile: cannot inspect the broker: %s", report.broker_error)
            return report
        # matched by token alone: a worker may have run another job on a job's message and
        # handed it that job's token (calseg.service.fairness), so the message's task id can
        # name another job than the one holding its token
        tokens = {dispatch for _task, dispatch in held}
        for job in queued:
            if job.dispatch_id in tokens:
                continue
            res = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == "queued", Job.dispatch_id == job.dispatch_id)
                .values(
                    dispatch_id=new_id(),
                    updated_at=now,
                    message="the broker had lost this job's message; dispatched again",
                )
            )
            if not res.rowcount:
                continue
            session.commit()
            session.refresh(job)
            try:
                enqueue(job, None)
            except QueueUnavailable as exc:
                log.warning("job %s could not be dispatched again: %s", job.id, exc)
                continue
            report.redispatched.append(job.id)
            log.warning("job %s was not on the broker; dispatched again", job.id)
    return report


class Reconciler:
    """Runs :func:`reconcile` every ``interval_s`` seconds in a daemon thread.

    Args:
        settings: the configuration (default :func:`get_settings`).
        interval_s: seconds between passes (default ``settings.reconcile_interval_s``).
        **kwargs: passed to :func:`reconcile` (``enqueue``, ``dispatches``).
    """

    def __init__(
        self, settings: Settings | None = None, interval_s: float | None = None, **kwargs: Any
    ) -> None:
        self.settings = settings or get_settings()
        self.interval_s = float(
            self.settings.reconcile_interval_s if interval_s is None else interval_s
        )
        self.kwargs = kwargs
        self.passes = 0
        self.last: ReconcileReport | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="calseg-reconciler", daemon=True)

    def start(self) -> Reconciler:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            sweep_staging_safely(self.settings)
            try:
                self.last = reconcile(settings=self.settings, **self.kwargs)
                self.passes += 1
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: next pass
                log.warning("reconcile pass failed: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def sweep_staging_safely(settings: Settings) -> int:
    """:func:`calseg.service.staging.sweep` (each removal logged there); any failure is logged,
    never raised (a pass, or the api's start, goes on). Returns the number of entries removed."""
    from calseg.service.staging import sweep

    try:
        return len(sweep(settings))
    except Exception as exc:  # noqa: BLE001 - e.g. the folder's disk unmounted: next pass
        log.warning("staging sweep failed: %s: %s", type(exc).__name__, exc)
        return 0


@contextlib.asynccontextmanager
async def reconciler_lifespan(_app: Any) -> AsyncIterator[None]:
    """FastAPI lifespan: sweeps the staging folders once (what requests of a killed api
    process left, :mod:`calseg.service.staging`), then a :class:`Reconciler` runs while the
    api serves, sweeping them again at each pass (``settings.reconcile_interval_s`` <= 0 turns
    it off: then only the sweep at start); logs as JSON lines when ``settings.log_format`` is
    ``json``."""
    settings = get_settings()
    if settings.log_format == "json":
        from calseg.service.logs import configure_logging

        configure_logging(settings)
    sweep_staging_safely(settings)
    rec = Reconciler(settings).start() if settings.reconcile_interval_s > 0 else None
    try:
        yield
    finally:
        if rec is not None:
            rec.stop()


def main_once(settings: Settings | None = None) -> ReconcileReport:
    """``calseg reconcile``: one pass with the configured database and broker."""
    t0 = time.monotonic()
    report = reconcile(settings=settings)
    log.info("reconcile pass in %.2f s: %s", time.monotonic() - t0, report)
    return report
