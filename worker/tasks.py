"""Celery tasks: thin wrappers over :mod:`calseg.service.jobs`."""

from __future__ import annotations

import logging

from calseg.service.jobproc import prune_embedding_cache, run_job_in_child
from worker.celery_app import celery_app

log = logging.getLogger("calseg.worker")


@celery_app.task(name="calseg.run_job", acks_late=True, ignore_result=True)
def run_job_task(job_id: str, dispatch_id: str | None = None) -> str:
    """Run job ``job_id`` (idempotent: see :func:`calseg.service.jobs.run_job`) in a child
    process the worker can kill on cancel (:func:`calseg.service.jobproc.run_job_in_child`).

    Returns the job's state afterwards; the job's own errors are recorded on the job, never
    raised, so a failing job does not crash or retry-loop the worker. Then the embedding cache
    is pruned to its size limit (:func:`calseg.service.jobproc.prune_embedding_cache`).
    """
    state = run_job_in_child(job_id, dispatch_id)
    log.info("job %s -> %s", job_id, state)
    prune_embedding_cache()
    return state
