"""Celery application of the CalSeg workers, configured from :mod:`calseg.service.settings`.

Queues: ``cpu`` (simulate) and ``gpu`` (finetune, infer, evaluate); the api routes each job to
its queue when it submits it (:data:`calseg.service.jobs.QUEUE_BY_KIND`). GPU workers run the
solo pool (one process per GPU, ``CUDA_VISIBLE_DEVICES`` choosing the device): Celery's prefork
pool hangs when torch was used in the parent before forking (DESIGN.md section 6).

Start a worker: ``celery -A worker.celery_app:celery_app worker -P solo -Q cpu,gpu -c 1``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from calseg.service.settings import get_settings

_settings = get_settings()

celery_app = Celery("calseg", include=["worker.tasks"])
celery_app.conf.update(
    # No broker configured: a placeholder that fails loudly when used (the embedded launcher
    # always sets CALSEG_REDIS_URL for its children).
    broker_url=_settings.redis_url or "redis://127.0.0.1:6379/0",
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # A message not acknowledged within this time is redelivered: it must exceed the
        # longest job, since tasks are acknowledged only when they end (acks_late).
        "visibility_timeout": _settings.visibility_timeout_s,
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
