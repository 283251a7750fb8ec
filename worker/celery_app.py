"""Celery application of the CalSeg workers, configured from :mod:`calseg.service.settings`.

Queues: ``cpu`` (simulate) and ``gpu`` (finetune, infer, evaluate); the api routes each job to
its queue when it submits it (:data:`calseg.service.jobs.QUEUE_BY_KIND`). GPU workers run the
solo pool (one process per GPU, ``CUDA_VISIBLE_DEVICES`` choosing the device): Celery's prefork
pool hangs when torch was used in the parent before forking (DESIGN.md section 6).

Delivery guarantees (issue 5): tasks are acknowledged when they end (``acks_late``), one message
at a time per worker (prefetch 1). A message not acknowledged within the visibility timeout is
redelivered; :func:`calseg.service.jobs.run_job` then finds the job running with a fresh
heartbeat and drops the message, so a job longer than the timeout still runs once. A worker
that vanished stops beating; the reconciler (:mod:`calseg.service.reconcile`) re-queues its job
with a new dispatch id (exponential back-off, at most ``max_attempts`` starts) or fails it.

Start a worker: ``celery -A worker.celery_app:celery_app worker -P solo -Q cpu,gpu -c 1``.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import after_setup_logger
from kombu import Queue

from calseg.service.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker ``settings.redis_url``).

    The Redis transport sweeps unacknowledged messages older than the visibility timeout back
    into their queue every ``unacked_restore_interval`` seconds: a quarter of the timeout,
    between 1 s and 60 s.
    """
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


_settings = get_settings()
celery_app = make_celery(_settings)


@after_setup_logger.connect
def _log_format(logger: object = None, **_kwargs: object) -> None:
    """Worker logs as JSON lines when ``CALSEG_LOG_FORMAT=json`` (Celery's text otherwise)."""
    if _settings.log_format != "json":
        return
    import logging

    from calseg.service.logs import JsonFormatter

    for handler in getattr(logger, "handlers", None) or logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
