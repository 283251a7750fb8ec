"""Celery application of the CalSeg workers: :func:`calseg.service.broker.make_celery` of the
settings (:mod:`calseg.service.settings`, read once here), plus the worker's log format.

Queues, routing and delivery guarantees: :mod:`calseg.service.broker`.

Start a worker: ``celery -A worker.celery_app:celery_app worker -P solo -Q cpu,gpu -c 1``.
"""

from __future__ import annotations

from celery.signals import after_setup_logger

from calseg.service.broker import make_celery
from calseg.service.settings import get_settings
from calseg.service.store import keep_files_private

keep_files_private()  # a worker process starts by importing this module
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
