"""The broker: the Celery app of the service and how a job's message is put on it.

Queues: ``cpu`` (simulate) and ``gpu`` (finetune, infer, evaluate); each job goes to its kind's
queue (:func:`calseg.service.kinds.queue_of`). GPU workers run the solo pool (one process
per GPU, ``CUDA_VISIBLE_DEVICES`` choosing the device): Celery's prefork pool hangs when torch
was used in the parent before forking (DESIGN.md section 6).

Delivery guarantees (issue 5): tasks are acknowledged when they end (``acks_late``), one message
at a time per worker (prefetch 1). A message not acknowledged within the visibility timeout is
redelivered; :func:`calseg.service.jobs.run_job` then finds the job running with a fresh
heartbeat and drops the message, so a job longer than the timeout still runs once. A worker
that vanished stops beating; the reconciler (:mod:`calseg.service.reconcile`) re-queues its job
with a new dispatch id (exponential back-off, at most ``max_attempts`` starts) or fails it.

The worker process (:mod:`worker.celery_app`) builds its app with :func:`make_celery`; the
library never imports ``worker`` (docs/ARCHITECTURE.md, layers).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

from calseg.service.kinds import queue_of
from calseg.service.models import Job
from calseg.service.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "calseg.run_job"


class QueueUnavailable(RuntimeError):
    """The job could not be put on the broker (not configured or unreachable)."""


Enqueue = Callable[[Job, float | None], None]
"""``enqueue(job, countdown_s)`` puts a job's message on the broker."""


def enqueue_celery(job: Job, countdown: float | None = None, *, app: Any = None) -> None:
    """Send ``calseg.run_job(job.id, dispatch_id)`` to the job kind's queue (task id = job id).

    ``app``: the Celery app to send with (default :func:`default_app`, configured from the
    settings; tests pass :func:`make_celery` of their settings).

    Raises:
        QueueUnavailable: no broker configured, or it cannot be reached.
    """
    if app is None and not get_settings().redis_url:
        raise QueueUnavailable(
            "no broker configured: set CALSEG_REDIS_URL, or start the service with "
            "`make serve` (which starts its own Redis)"
        )
    if app is None:
        app = default_app()

    try:
        app.send_task(
            TASK_NAME,
            args=[job.id],
            kwargs={"dispatch_id": job.dispatch_id},
            task_id=job.id,
            queue=queue_of(job.kind),
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises OperationalError and friends
        raise QueueUnavailable(f"cannot reach the broker: {exc}") from exc


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker ``settings.redis_url``).

    The Redis transport sweeps unacknowledged messages older than the visibility timeout back
    into their queue every ``unacked_restore_interval`` seconds: a quarter of the timeout,
    between 1 s and 60 s.
    """
    from celery import Celery
    from kombu import Queue

    vt = int(settings.visibility_timeout_s)
    app = Celery("calseg", include=["worker.tasks"])
    app.conf.update(
        # No broker configured: a placeholder that fails loudly when used (the embedded
        # launcher always sets CALSEG_REDIS_URL for its children).
        broker_url=settings.redis_url or "redis://127.0.0.1:6379/0",
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted Redis is waited for, not fatal
        broker_transport_options={
            # A message not acknowledged within this time is redelivered: it should exceed
            # the longest job, since tasks are acknowledged only when they end (acks_late).
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(60, vt // 4)),
            "unacked_restore_throttle": 1,
        },
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=None,
        task_queues=(Queue("cpu"), Queue("gpu")),
        task_default_queue="cpu",
        task_routes={"calseg.run_job": {"queue": "cpu"}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


@cache
def default_app() -> Celery:
    """The Celery app of this process's settings (built once; what :func:`enqueue_celery` sends
    with when given no app)."""
    return make_celery(get_settings())
