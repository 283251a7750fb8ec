"""Job lifecycle: submit, run (in the worker), cancel, retry.

The database is the source of truth. A job is queued by :func:`submit_job` (one row, one
Celery message whose task id is the job id), run by :func:`run_job` in a worker, and ends
succeeded, failed (with the reason) or cancelled. :func:`run_job` is idempotent: a message for a
job that already ended, or a stale message from before a retry (other ``dispatch_id``), is
skipped; a message redelivered after a worker died re-runs the job up to
``settings.max_attempts`` times, then fails it with the reason. A message is a turn on its
queue: the worker runs the fairest queued job of that queue, swapping dispatch ids with it
(:mod:`calseg.service.fairness`). Before a job is queued, its cost and its owner's quota are
checked (:func:`calseg.service.costs.check_admission`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from calseg.fmt import plural
from calseg.progress import Cancelled, cancellable
from calseg.service import kinds
from calseg.service.broker import Enqueue, QueueUnavailable, enqueue_celery
from calseg.service.context import (
    JobContext,
    JobDeferred,
    JobReferenceError,
    _LogForward,
    code_version,
    jsonable,
    public_data,
    public_text,
)
from calseg.service.models import (
    TERMINAL_STATES,
    Artifact,
    Job,
    Metric,
    Recording,
    User,
    new_id,
    utcnow,
)
from calseg.service.schemas import params_to_json, validate_params
from calseg.service.settings import Settings, get_settings
from calseg.service.store import ArtifactStore, get_store

if TYPE_CHECKING:  # pragma: no cover
    from calseg.service.costs import CostEstimate

log = logging.getLogger("calseg.service.jobs")

DEFER_S = 5.0
"""Seconds before a job whose referenced job has not finished is looked at again."""


class JobNotFound(LookupError):
    """No job (or recording) with that id."""


class JobStateError(ValueError):
    """The action does not fit the job's state (e.g. cancelling a finished job)."""


# ------------------------------------------------------------------------------ submit


def _admit(
    session: Session,
    kind: str,
    validated: Any,
    owner: User | None,
    settings: Settings,
    replacing_job_id: str | None = None,
) -> CostEstimate:
    """What a submit and a retry check before a job is queued: its references, probing its
    files (:func:`check_references` with ``settings``) before the owner's lock, then, under the
    lock (taken here, held to the caller's commit), the references again (cheap) and the
    quota and cost limits (:func:`calseg.service.costs.check_admission`; the job
    ``replacing_job_id`` left out of what is counted). Returns the cost estimate; rolls back
    and raises what a check raises."""
    from calseg.service.costs import check_admission

    check_references(session, kind, validated, owner, settings)  # probes files: before the lock
    lock_owner(session, owner)
    try:
        check_references(session, kind, validated, owner)
        return check_admission(session, kind, validated, owner, settings, replacing_job_id)
    except Exception:
        session.rollback()
        raise


def check_references(
    session: Session,
    kind: str,
    params: Any,
    owner: User | None,
    settings: Settings | None = None,
) -> None:
    """Referenced jobs and recordings exist, are ``owner``'s (or ``owner`` is an admin; None:
    an internal call, no check) and are usable; others' ids are reported as missing. With
    ``settings``, an infer job's recording is probed with its reading options and its
    simulated video looked up in a finished dataset (:func:`_check_infer_input`)."""
    from calseg.service.auth import can_see

    for field, want in kinds.references(kind).items():
        ref = getattr(params, field, None)
        if ref is None:
            continue
        other = session.get(Job, ref)
        if other is None or not can_see(owner, other.owner_id):
            raise JobReferenceError(f"{field}: there is no job {ref}")
        if other.kind != want:
            raise JobReferenceError(f"{field}: job {ref} is a {other.kind} job, not a {want} job")
        if other.state in ("failed", "cancelled"):
            raise JobReferenceError(
                f"{field}: job {ref} {other.state}; retry it or give another {want} job"
            )
    rec_id = getattr(params, "recording_id", None)
    rec = session.get(Recording, rec_id) if rec_id is not None else None
    if rec_id is not None and (rec is None or not can_see(owner, rec.owner_id)):
        raise JobReferenceError(f"recording_id: there is no recording {rec_id}")
    if kind == "infer" and settings is not None:
        _check_infer_input(session, params, rec, settings, owner)
    if kind == "evaluate" and settings is not None:
        _check_evaluate_split(session, params, settings)
    if kind in ("infer", "evaluate") and settings is not None:
        _check_video_mode(session, kind, params, settings)


def _finished_dataset(session: Session, ds_id: str | None, settings: Settings) -> Any:
    """The :class:`calseg.io.dataset.Dataset` of simulate job ``ds_id``, or None while it is
    still being made (no manifest yet: the worker checks it) or when none is given."""
    from calseg.io.dataset import load_dataset

    if ds_id is None:
        return None
    manifest = session.scalar(
        select(Artifact).where(Artifact.job_id == ds_id, Artifact.name == "manifest.json")
    )
    if manifest is None:
        return None
    return load_dataset(get_store(settings.artifact_dir).path(manifest.relpath).parent)


def _check_evaluate_split(session: Session, params: Any, settings: Settings) -> None:
    """An evaluate job's split must hold videos once its dataset is made (a tenth attack run:
    split "val" of a dataset without validation videos was admitted, then failed in the
    worker).

    Raises:
        JobReferenceError: the split is empty (API: 422), naming the splits that are not.
    """
    from calseg.io.dataset import SPLITS, DatasetError

    split = getattr(params, "split", None)
    try:
        ds = _finished_dataset(session, getattr(params, "dataset_job_id", None), settings)
    except DatasetError as exc:
        raise JobReferenceError(f"dataset_job_id: {public_text(str(exc), settings)}") from None
    if ds is None or split is None or ds.split(split):
        return
    held = ", ".join(f"{name} {len(ds.split(name))}" for name in SPLITS if ds.split(name))
    raise JobReferenceError(
        f"split: dataset job {params.dataset_job_id} has no {split!r} videos (videos per "
        f"split: {held or 'none'})"
    )


def _check_video_mode(session: Session, kind: str, params: Any, settings: Settings) -> None:
    """Mode ``"video"`` only with SAM2 models it can run: a model whose masks correct a disc
    prior (CalSeg's small SAM2, the server's default base, and fine-tunes of it) cannot be
    propagated (:func:`calseg.segment.infer.video_mode_refusal`). An infer job that will run
    SAM2 checks its model (``model_job_id``'s checkpoint, else the server's base); an evaluate
    job checks every SAM2 row (the fine-tuned model and the base). Both were admitted and then
    failed in the worker (a new-user check). Unchanged for target ``"cells"`` (one image: no
    propagation), a classical infer job, and a model job whose checkpoint is not written yet
    (the worker checks it).

    Raises:
        JobReferenceError: the parameter and the reason (API: 422).
    """
    if getattr(params, "mode", None) != "video" or getattr(params, "target", None) != "active":
        return
    from calseg.segment.choice import PRIOR_MODES, SAM2, resolve_method, summarise_checkpoint
    from calseg.segment.infer import video_mode_refusal

    model_job = getattr(params, "model_job_id", None)
    if kind == "infer":
        method, _ = resolve_method(
            params.method, model_job_id=model_job, checkpoint=settings.sam2_checkpoint
        )
        if method != SAM2:
            return
    checks: list[tuple[str, Any, str]] = []  # (parameter, checkpoint file, how users name it)
    if model_job:
        shown = f"checkpoint.pt of finetune job {model_job}"  # stored as the run's best.pt
        job = session.get(Job, model_job)
        info = ((job.result or {}).get("model_info") or {}) if job is not None else {}
        if info.get("prior_mode") in PRIOR_MODES:  # the job's record: no file read
            reason = video_mode_refusal(None, shown, info["prior_mode"])  # in the API process
            raise JobReferenceError(f"model_job_id: {public_text(reason, settings)}")
        row = None
        if "prior_mode" not in info:  # a job recorded before model_info said it
            row = session.scalar(
                select(Artifact).where(
                    Artifact.job_id == model_job, Artifact.name == "checkpoint.pt"
                )
            )
        if row is not None:
            path = get_store(settings.artifact_dir).path(row.relpath)
            checks.append(("model_job_id", path, shown))
    if kind == "evaluate" or not model_job:  # evaluate always has the untuned row
        base = settings.sam2_checkpoint
        checks.append(("mode", base, Path(base).name if base is not None else ""))
    for name, checkpoint, shown in checks:
        if checkpoint is None:
            continue
        try:
            summary = summarise_checkpoint(checkpoint)
        except Exception:  # noqa: BLE001 - a missing or unreadable file is the worker's error
            continue
        if summary.prior:
            reason = video_mode_refusal(None, shown, None)
            raise JobReferenceError(f"{name}: {public_text(reason, settings)}")


def _check_infer_input(
    session: Session,
    params: Any,
    rec: Recording | None,
    settings: Settings,
    owner: User | None = None,
) -> None:
    """What an infer job reads, checked at submit instead of failing in the worker (a
    new-user check got 201 and then a failed job for ``axes`` "TTYX", ``channel`` 5 of 2 and
    video "v999"): the recording is probed (headers, first and last frame) with the upload's
    reading options overridden by the job's, when the job gives any; a simulated video must
    be in its dataset's manifest once the dataset job has succeeded.

    Raises:
        JobReferenceError: the reader's or the dataset's message (API: 422).
    """
    from calseg.io.dataset import DatasetError
    from calseg.io.recordings import RecordingError, RecordingReader, probe_recording
    from calseg.service.costs import job_read_options
    from calseg.service.frame_guard import frame_slot

    store = get_store(settings.artifact_dir)
    if rec is not None:
        options = None
        try:
            options = job_read_options(params, rec)
            if options is not None:
                # it decodes the first and last frame in the API: one of the API's frame slots
                with frame_slot(owner.name if owner is not None else None):
                    probe_recording(
                        store.path(rec.relpath), **options, limits=settings.read_limits()
                    )
            else:  # as uploaded: its headers against today's decode limits, no pixel decoded
                # (a recording uploaded before a limit was lowered was admitted, then failed
                # in the worker with RecordingTooLarge: a lab admin's check)
                with RecordingReader(
                    store.path(rec.relpath),
                    **dict(rec.read_options or {}),
                    limits=settings.read_limits(),
                ):
                    pass
        except RecordingError as exc:
            how = "with these options" if options is not None else "on this server now"
            raise JobReferenceError(
                f"recording_id {rec.id} ({rec.filename}) cannot be read {how}: "
                f"{public_text(str(exc), settings)}"
            ) from None
    ds_id, video_id = getattr(params, "dataset_job_id", None), getattr(params, "video_id", None)
    if ds_id is None or video_id is None:
        return
    try:
        ds = _finished_dataset(session, ds_id, settings)
        if ds is not None:
            ds.video(video_id)
    except DatasetError as exc:
        raise JobReferenceError(f"video_id: {public_text(str(exc), settings)}") from None


def lock_owner(session: Session, owner: User | None) -> None:
    """Serialise the admission of ``owner``'s jobs until this transaction commits: a no-op
    UPDATE of their ``users`` row takes its row lock (PostgreSQL) or the database's write lock
    (SQLite, whose driver starts the transaction at the first write). Without it, 12 parallel
    submissions against a quota of 3 all counted 2 queued jobs and 9 got in (a new-user
    check): the quota check and the insert must be one step per user."""
    if owner is not None:
        session.execute(update(User).where(User.id == owner.id).values(name=User.name))


def submit_job(
    session: Session,
    kind: str,
    params: dict[str, Any] | None,
    *,
    enqueue: Enqueue | None = None,
    owner: User | None = None,
    settings: Settings | None = None,
) -> Job:
    """Validate, check its cost and the owner's quota, insert a queued job and put it on its
    queue.

    Args:
        session: database session (committed here).
        kind: ``simulate`` | ``finetune`` | ``infer`` | ``evaluate``.
        params: the kind's parameters (see :mod:`calseg.service.schemas`).
        enqueue: how to queue it (default :func:`enqueue_celery`; tests pass a fake).
        owner: the user submitting it (owns the job; may reference only their own jobs and
            recordings unless admin). None: no owner, no ownership check, no quota.
        settings: limits and allowed devices (default :func:`get_settings`).

    Raises:
        calseg.service.schemas.ParamsError: invalid parameters, or a device this server does
            not run (API: 422).
        JobReferenceError: a referenced job/recording is missing, not the owner's, or
            unusable (API: 422).
        calseg.service.costs.JobTooCostly: the estimated memory, disk or time is over the
            owner's limit (API: 422 with the estimate and the limit).
        calseg.service.costs.QuotaExceeded: the owner has ``max_queued_jobs`` queued or
            running jobs already (API: 429).
        QueueUnavailable: the broker refused; the job is stored as failed (API: 503).
    """
    validated = validate_params(kind, params)
    settings = settings or get_settings()
    # the owner's lock is held until the commit below: the quota counts every insert, and a
    # recording deleted at the same moment (its delete takes the same lock) is either still
    # there or keeps this job
    est = _admit(session, kind, validated, owner, settings)
    job = Job(
        id=new_id(),
        owner_id=owner.id if owner is not None else None,
        kind=kind,
        state="queued",
        params=params_to_json(validated),
        estimated_disk_bytes=int(est.disk_bytes),
        progress=0.0,
        stage="queued",
        code_version=code_version(),
        attempts=0,
        dispatch_id=new_id(),
    )
    session.add(job)
    session.commit()
    _dispatch(session, job, enqueue)
    return job


def rerun_job(
    session: Session, job_id: str, *, enqueue: Enqueue | None = None, owner: User | None = None
) -> Job:
    """Submit a new job with the kind and stored parameters (seeds included) of ``job_id``.

    The stored parameters hold every default explicitly, so the new job reproduces the old
    one (a simulate job regenerates its dataset bit-identically); the old job is untouched.
    ``owner`` owns the new job (see :func:`submit_job`).

    Raises:
        JobNotFound: no job ``job_id`` (API: 404).
        calseg.service.schemas.ParamsError: the stored parameters no longer validate, e.g.
            after an upgrade that changed the job's schema (API: 422).
        JobReferenceError, QueueUnavailable: as :func:`submit_job`.
    """
    old = get_job(session, job_id)
    return submit_job(session, old.kind, dict(old.params or {}), enqueue=enqueue, owner=owner)


def _dispatch(session: Session, job: Job, enqueue: Enqueue | None) -> None:
    try:
        (enqueue or enqueue_celery)(job, None)
    except QueueUnavailable as exc:
        job.state, job.error, job.finished_at = "failed", str(exc), utcnow()
        session.commit()
        raise


def get_job(session: Session, job_id: str) -> Job:
    """The job with ``job_id``. Raises :class:`JobNotFound`."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"there is no job {job_id}")
    return job


def reload_job(session: Session, job_id: str) -> Job:
    """The job as the database holds it now (after a conditional update that may have lost a
    race). Raises :class:`JobNotFound` when it was deleted meanwhile: a retry racing a delete
    refreshed the deleted row and answered 500 (an 11th attack run)."""
    session.expire_all()
    return get_job(session, job_id)


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued or running job (a running one stops at its next progress report).

    Raises:
        JobNotFound, JobStateError: the job already ended.
    """
    job = get_job(session, job_id)
    was = job.state
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("queued", "running")))
        .values(
            state="cancelled",
            finished_at=utcnow(),
            eta_s=None,
            message=f"cancelled while {was}",
            updated_at=utcnow(),
        )
    )
    session.commit()
    job = reload_job(session, job_id)
    if res.rowcount == 0:
        raise JobStateError(f"job {job_id} already {job.state}; nothing to cancel")
    return job


def stopping(job: Job, settings: Settings) -> bool:
    """Whether ``job`` was cancelled while it ran and its process may still be writing: it
    started, its run has not measured its folder yet (``stored_bytes``, written as every run
    ends) and its cancel is under ``cancel_check_interval_s + cancel_grace_s`` plus a minute
    old (by then the worker has killed it, or it is gone with its worker)."""
    if job.state != "cancelled" or job.started_at is None or job.stored_bytes is not None:
        return False
    if job.finished_at is None:
        return True
    ended = job.finished_at
    if ended.tzinfo is None:  # SQLite gives naive UTC datetimes
        ended = ended.replace(tzinfo=UTC)
    limit = settings.cancel_check_interval_s + settings.cancel_grace_s + 60.0
    return (utcnow() - ended).total_seconds() < limit


def delete_job(session: Session, job_id: str, store: Any, settings: Settings | None = None) -> None:
    """Delete a job that has ended: its record, metrics, artifact records and files
    (``jobs/{id}`` in the ``store``). Jobs that referenced it keep their own outputs; their
    viewer frames of its files then answer 410, and a rerun of them is refused (422).

    Before this, nothing a user made could be removed but recordings, so a user's finished
    jobs filled the server's disk for everyone (a new user's check).

    Raises:
        JobNotFound. JobStateError: the job is still queued or running (cancel it first), was
            cancelled while running and is still stopping (:func:`stopping`), or a queued or
            running job uses it (``dataset_job_id``, ``model_job_id``).
    """
    job = get_job(session, job_id)
    if job.state not in TERMINAL_STATES:
        raise JobStateError(f"job {job_id} is {job.state}; cancel it or wait until it ends")
    if stopping(job, settings or get_settings()):
        raise JobStateError(
            f"job {job_id} was cancelled while running and its process is still stopping "
            "(a few seconds); delete it once it has (its files would be written after the "
            "delete, counted nowhere)"
        )
    # the owner's lock, as a submit takes it: a job submitted on this one at the same moment
    # is either counted below or finds it gone
    lock_owner(session, session.get(User, job.owner_id) if job.owner_id else None)
    users = [
        j.id
        for j in session.scalars(select(Job).where(Job.state.not_in(tuple(TERMINAL_STATES))))
        if any(k.endswith("_job_id") and v == job_id for k, v in (j.params or {}).items())
    ]
    if users:
        raise JobStateError(
            f"job {job_id} is used by {plural(len(users), 'queued or running job')}; cancel "
            "them or wait until they end"
        )
    session.delete(job)
    session.commit()
    store.delete(f"jobs/{job_id}")


def retry_job(
    session: Session,
    job_id: str,
    *,
    enqueue: Enqueue | None = None,
    store: ArtifactStore | None = None,
    settings: Settings | None = None,
) -> Job:
    """Queue a failed or cancelled job again (same id; its old outputs are removed).

    The job's references (its recording, the jobs it reads: :func:`check_references`, with
    the reading-options probe), the owner's quota and the cost limits apply as for a new job
    (:func:`calseg.service.costs.check_admission`): a retry of a job whose recording had been
    deleted was queued and then failed in the worker (a seventh attack run).

    Raises:
        JobNotFound, JobStateError: the job is queued, running or succeeded, or was cancelled
            while running and is still stopping (:func:`stopping`).
        JobReferenceError: what it reads is gone or unusable.
        calseg.service.costs.JobTooCostly, QuotaExceeded: as :func:`submit_job`.
    """
    settings = settings or get_settings()
    job = get_job(session, job_id)
    if job.state not in ("failed", "cancelled"):
        raise JobStateError(
            f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried"
        )
    if stopping(job, settings):
        raise JobStateError(
            f"job {job_id} was cancelled while running and its process is still stopping "
            "(a few seconds); retry it once it has (it could still write into the retried "
            "job's folder)"
        )
    validated = validate_params(job.kind, job.params)
    est = _admit(session, job.kind, validated, job.owner, settings, job.id)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("failed", "cancelled")))
        .values(
            state="queued",
            estimated_disk_bytes=int(est.disk_bytes),
            progress=0.0,
            stage="queued",
            message="retry",
            error=None,
            result=None,
            eta_s=None,
            started_at=None,
            finished_at=None,
            attempts=0,
            dispatch_id=new_id(),  # messages of earlier dispatches become stale
            code_version=code_version(),
            updated_at=utcnow(),
        )
    )
    if res.rowcount == 0:
        session.rollback()
        job = reload_job(session, job_id)
        raise JobStateError(f"job {job_id} is {job.state}; it changed meanwhile, not retried")
    _clear_outputs(session, job.id, store or get_store())
    session.commit()
    job = reload_job(session, job_id)
    _dispatch(session, job, enqueue)
    return job


def _clear_outputs(session: Session, job_id: str, store: ArtifactStore) -> None:
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    store.delete(f"jobs/{job_id}")


# ------------------------------------------------------------------------------ run


def _finish(url: str, job_id: str, dispatch_id: str | None, **values: Any) -> bool:
    from calseg.service.db import session_scope

    values.setdefault("finished_at", utcnow())
    values["updated_at"] = utcnow()
    with session_scope(url) as session:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "running", Job.dispatch_id == dispatch_id)
            .values(**values)
        )
        return res.rowcount > 0


def run_job(
    job_id: str,
    dispatch_id: str | None = None,
    *,
    url: str | None = None,
    store: ArtifactStore | None = None,
    settings: Settings | None = None,
    enqueue: Enqueue | None = None,
    runners: dict[str, Callable[[Any, JobContext], dict[str, Any]]] | None = None,
    worker_id: str | None = None,
    process_wide_cancel: bool = False,
    turn_taken: bool = False,
) -> str:
    """Run a queued job to its end; never raises for the job's own errors.

    Args:
        job_id: the job.
        dispatch_id: the dispatch this message belongs to (None: the current one).
        url, store, settings: overrides (defaults: the configured ones).
        enqueue: how to re-queue a deferred job (default :func:`enqueue_celery`).
        runners: runner per kind (default: each kind's runner in the registry,
            :mod:`calseg.service.kinds`).
        worker_id: recorded in ``jobs.worker`` (default ``host:pid`` of this process; a job's
            own child process passes its worker's, see :mod:`calseg.service.jobproc`).
        process_wide_cancel: let threads of the science code see the cancel token too
            (:func:`calseg.progress.cancellable`); only in a process that runs one job.
        turn_taken: the caller took the turn of ``dispatch_id`` already
            (:func:`calseg.service.fairness.take_turn`; ``job_id`` is the job it chose): run
            ``job_id`` as it is (a second turn would pass the token on again).

    Returns:
        The job's state afterwards (``"missing"`` when no such job exists, ``"skipped"`` for a
        stale message).
    """
    from calseg.service.db import session_scope

    settings = settings or get_settings()
    url = url or settings.database_url
    store = store or get_store(settings.artifact_dir)
    if dispatch_id is not None and not turn_taken:  # a turn: run the fairest job (fairness.py)
        from calseg.service.fairness import WAIT, take_turn

        turn = take_turn(url, job_id, dispatch_id, settings)
        if turn == WAIT:
            return wait_turn(url, dispatch_id, enqueue)
        job_id = turn

    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("run_job: no job %s (deleted?); message dropped", job_id)
            return "missing"
        if dispatch_id is not None and job.dispatch_id != dispatch_id:
            log.info("run_job: stale message for job %s; skipped", job_id)
            return "skipped"
        if job.state in TERMINAL_STATES:
            log.info("run_job: job %s already %s; skipped", job_id, job.state)
            return job.state
        observed, attempts = job.state, job.attempts
        lost = observed == "running"
        if lost:
            from calseg.service.reconcile import heartbeat_age_s, is_alive

            if is_alive(job, settings):
                # redelivered (e.g. after the visibility timeout) while a worker still runs
                # it: that worker's heartbeat is fresh, so this message is dropped
                log.info(
                    "run_job: job %s is running on %s (heartbeat %.0f s ago); message dropped",
                    job_id,
                    job.worker,
                    heartbeat_age_s(job),
                )
                return "skipped"
        # Every transition is a conditional UPDATE on the state we observed, so a cancel (or
        # another delivery) committed meanwhile is never overwritten (no lost update).
        guard = (
            Job.id == job_id,
            Job.state == observed,
            Job.attempts == attempts,
            Job.dispatch_id == job.dispatch_id,
        )
        if lost and attempts >= settings.max_attempts:
            session.execute(
                update(Job)
                .where(*guard)
                .values(
                    state="failed",
                    finished_at=utcnow(),
                    error=f"worker lost: the job was interrupted {attempts} time(s) "
                    f"(limit {settings.max_attempts}); not running it again",
                )
            )
            return "failed"
        res = session.execute(
            update(Job)
            .where(*guard)
            .values(
                state="running",
                attempts=attempts + 1,
                started_at=utcnow(),
                finished_at=None,
                stored_bytes=None,  # measured again as this run ends (jobs.stopping reads it)
                progress=0.0,
                stage="starting",
                eta_s=None,
                error=None,
                worker=worker_id or worker_name(),
                updated_at=utcnow(),
            )
        )
        if res.rowcount == 0:
            log.info("run_job: job %s changed state meanwhile; skipped", job_id)
            return "skipped"
        if lost or attempts > 0:
            _clear_outputs(session, job_id, store)
        session.commit()
        session.refresh(job)
        try:
            params = validate_params(job.kind, job.params)
        except ValueError as exc:
            _finish(url, job.id, job.dispatch_id, state="failed", error=str(exc))
            return "failed"
        session.expunge(job)

    ctx = JobContext(job, params, url=url, store=store, settings=settings)
    if lost:
        ctx.log(f"previous attempt was interrupted (worker lost); attempt {job.attempts}")
    where = job.worker if job.worker == worker_name() else f"{job.worker} (process {os.getpid()})"
    ctx.log(f"{job.kind} job {job.id} started on {where} (code {job.code_version})")
    forward = _LogForward(ctx)
    calseg_logger = logging.getLogger("calseg")
    calseg_logger.addHandler(forward)
    if calseg_logger.level == logging.NOTSET or calseg_logger.level > logging.INFO:
        calseg_logger.setLevel(logging.INFO)
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, *a, **k: ctx.warn(f"{c.__name__}: {m}")
            with cancellable(ctx.cancel_token, process_wide=process_wide_cancel):
                run = runners[job.kind] if runners else kinds.get(job.kind).load_runner()
                _readmit_at_start(ctx)
                result = run(params, ctx)
        result = public_data(jsonable(result or {}), ctx.settings)
        result.setdefault("warnings", list(ctx.warnings))
        result["wall_s"] = round(time.monotonic() - t0, 3)
        store.sync(ctx.prefix)  # a remote store gets every file before the job counts as done
        ctx.log(f"succeeded in {result['wall_s']:.1f} s")
        # A client that sees "succeeded" must see every artifact, the log included: register it
        # before the state changes (the finally block registers it again with any later lines).
        _register_log(url, store, job.id, f"{ctx.prefix}/job.log")
        done = _finish(
            url,
            job.id,
            job.dispatch_id,
            state="succeeded",
            progress=1.0,
            stage="done",
            eta_s=0.0,
            message=None,
            result=result,
            log_tail=ctx.log_tail(),
            provenance=ctx.provenance(),
        )
        state = "succeeded" if done else _state(url, job.id)
    except Cancelled as exc:  # JobCancelled from a cancellation point or progress write
        ctx.log(f"stopped: {exc} (after {time.monotonic() - t0:.1f} s)")
        _finish(url, job.id, job.dispatch_id, state="cancelled", log_tail=ctx.log_tail())
        with session_scope(url) as session:  # keep the log of a job cancelled while running
            session.execute(
                update(Job)
                .where(
                    Job.id == job.id, Job.dispatch_id == job.dispatch_id, Job.state == "cancelled"
                )
                .values(log_tail=ctx.log_tail(), eta_s=None)
            )
        state = _state(url, job.id)
    except JobDeferred as exc:
        ctx.log(f"deferred: {exc}; looking again in {DEFER_S:.0f} s")
        with session_scope(url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == "running")
                .values(
                    state="queued",
                    stage="waiting",
                    message=str(exc),
                    attempts=Job.attempts - 1,
                    log_tail=ctx.log_tail(),
                )
            )
            queued = session.get(Job, job.id)
            session.expunge(queued)
        try:
            (enqueue or enqueue_celery)(queued, DEFER_S)
            state = "queued"
        except QueueUnavailable as qexc:
            _fail_queued(url, job.id, f"could not re-queue: {qexc}")
            state = "failed"
    except Exception as exc:  # noqa: BLE001 - a job's failure must not crash the worker
        reason = public_text(f"{type(exc).__name__}: {exc}", settings)
        ctx.log("failed: " + reason)
        if not isinstance(exc, _input_errors()):  # a defect: where it happened, paths dropped
            ctx.log(public_text(traceback.format_exc(limit=8), settings))
        _finish(
            url,
            job.id,
            job.dispatch_id,
            state="failed",
            error=reason[:4000],
            eta_s=None,
            log_tail=ctx.log_tail(),
            provenance=ctx.provenance(),
        )
        state = _state(url, job.id)
    finally:
        calseg_logger.removeHandler(forward)
        ctx.close()
        _register_log(url, store, job.id, f"{ctx.prefix}/job.log")
        record_stored_bytes(url, store, job.id, ctx.prefix)
    return state


def _readmit_at_start(ctx: JobContext) -> None:
    """Estimate the job again as it starts, its references now ended (a dataset still being
    simulated at admission was estimated from its parameters; now from its videos), and check
    the estimate against its owner's limits as they are now (:meth:`JobContext.readmit`).

    Raises:
        calseg.service.costs.JobTooCostly: over a limit (the job fails with its message).
    """
    try:
        est = ctx.estimate()
    except Exception as exc:  # noqa: BLE001 - no estimate: the runner meets the cause itself
        ctx.log(f"no estimate at the start ({type(exc).__name__}: {exc})")
        return
    ctx.readmit(est, "at its start, with its inputs as they are now")


def record_stored_bytes(url: str, store: ArtifactStore, job_id: str, prefix: str) -> None:
    """Keep the bytes of the job's folder (``jobs.stored_bytes``): what its owner's storage
    quota counts for it once it has ended (:func:`calseg.service.costs.storage_used_bytes`).
    A remote store is measured on its local mirror, which holds what the job wrote. Called
    when :func:`run_job` ends and, for a job process the worker killed, by the worker
    (:func:`calseg.service.jobproc.run_job_in_child`)."""
    from calseg.service.db import session_scope

    try:
        with session_scope(url) as session:
            if session.get(Job, job_id) is None:  # deleted while its run ended: no folder
                return  # again (store.workdir would make one, left behind empty)
        folder = store.workdir(prefix)
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        with session_scope(url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(stored_bytes=total))
    except Exception as exc:  # noqa: BLE001 - the job has ended; its quota falls back on its estimate
        log.warning("job %s: could not measure its files: %s", job_id, exc)


def _input_errors() -> tuple[type[Exception], ...]:
    """Failures that come from what the job was given (a recording, a reference, a
    parameter, a model file: missing, another SHA-256, not a checkpoint), said fully by their
    message: their traceback is not logged."""
    from calseg.io.dataset import DatasetError
    from calseg.io.recordings import RecordingError
    from calseg.preprocess import PreprocessError
    from calseg.segment.infer import SegmentOptionError
    from calseg.segment.model import ModelLoadError
    from calseg.service.costs import JobTooCostly
    from calseg.service.runners import RunnerError
    from calseg.simulate.model import ModelDiverged

    return (
        RecordingError,
        DatasetError,
        PreprocessError,
        RunnerError,
        SegmentOptionError,
        ModelLoadError,
        JobReferenceError,
        JobTooCostly,
        ModelDiverged,
    )


def worker_name(pid: int | None = None) -> str:
    """How ``jobs.worker`` names a worker process: ``host:pid`` (default: this process)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def wait_turn(url: str, dispatch_id: str, enqueue: Enqueue | None) -> str:
    """Put token ``dispatch_id`` back on the broker after :data:`DEFER_S`: its job's owner is at
    their running limit and no other job may start (:func:`calseg.service.fairness.take_turn`).
    """
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        job = session.scalar(select(Job).where(Job.dispatch_id == dispatch_id))
        if job is None or job.state != "queued":
            return job.state if job is not None else "skipped"
        job.message = "waiting: its owner has as many jobs running as allowed (max_running_jobs)"
        session.commit()
        session.refresh(job)
        session.expunge(job)
    try:
        (enqueue or enqueue_celery)(job, DEFER_S)
    except QueueUnavailable as exc:
        log.warning("job %s stays queued without a message: %s", job.id, exc)
    return "queued"


def _register_log(url: str, store: ArtifactStore, job_id: str, relpath: str) -> None:
    """Record the job's full log file as its artifact ``job.log``."""
    from calseg.service.db import session_scope

    try:
        with session_scope(url) as session:
            if session.get(Job, job_id) is None:  # deleted: its files went with it
                return
        obj = store.register(relpath)
        with session_scope(url) as session:
            session.execute(
                delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == "job.log")
            )
            session.add(Artifact.of_stored(job_id, "job.log", "log", obj))
    except Exception:  # noqa: BLE001 - the log is a convenience; never fail the job for it
        log.exception("could not register job.log of job %s", job_id)


def _state(url: str, job_id: str) -> str:
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        return session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"


def _fail_queued(url: str, job_id: str, reason: str) -> None:
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "queued")
            .values(state="failed", error=reason, finished_at=utcnow())
        )
