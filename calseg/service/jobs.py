"""Job lifecycle: submit, run (in the worker), cancel, retry.

The database is the source of truth. A job is queued by :func:`submit_job` (one row, one
Celery message whose task id is the job id), run by :func:`run_job` in a worker, and ends
succeeded, failed (with the reason) or cancelled. :func:`run_job` is idempotent: a message for a
job that already ended, or a stale message from before a retry (other ``dispatch_id``), is
skipped; a message redelivered after a worker died re-runs the job up to
``settings.max_attempts`` times, then fails it with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

import calseg
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
from calseg.service.settings import REPO_ROOT, Settings, get_settings
from calseg.service.store import ArtifactStore, get_store

log = logging.getLogger("calseg.service.jobs")

QUEUE_BY_KIND = {"simulate": "cpu", "finetune": "gpu", "infer": "gpu", "evaluate": "gpu"}
"""Celery queue of each job kind: simulation on CPU workers, everything with SAM2 on GPU."""

TASK_NAME = "calseg.run_job"
LOG_LINES = 200
"""Lines of log kept in ``jobs.log_tail``."""
LOG_CHARS = 20_000
DEFER_S = 5.0
"""Seconds before a job whose referenced job has not finished is looked at again."""

REFERENCES = {
    "finetune": {"dataset_job_id": "simulate"},
    "infer": {"dataset_job_id": "simulate", "model_job_id": "finetune"},
    "evaluate": {"dataset_job_id": "simulate", "model_job_id": "finetune"},
}
"""Parameters that name other jobs, and the kind each must be."""


class JobNotFound(LookupError):
    """No job (or recording) with that id."""


class JobStateError(ValueError):
    """The action does not fit the job's state (e.g. cancelling a finished job)."""


class JobReferenceError(ValueError):
    """A parameter names a job or recording that is missing, of the wrong kind, or failed."""


class QueueUnavailable(RuntimeError):
    """The job could not be put on the broker (not configured or unreachable)."""


class JobCancelled(Exception):
    """Raised inside a running job when it was cancelled; stops the runner."""


class JobDeferred(Exception):
    """Raised inside a job whose referenced job has not finished yet; re-queued later."""


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results (those imported by this process)."""
    import importlib.metadata as md

    out = {}
    for name in ("numpy", "scipy", "scikit-image", "torch", "sam2", "tifffile"):
        module = {"scikit-image": "skimage"}.get(name, name)
        if module in sys.modules:
            try:
                out[name] = md.version(name)
            except md.PackageNotFoundError:
                out[name] = str(getattr(sys.modules[module], "__version__", "?"))
    return out


@cache
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, modification time) in this process."""
    st = path.stat()
    return _file_sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@cache
def code_version() -> str:
    """``calseg.__version__`` plus the git commit (``+dirty`` with local changes), if any."""
    version = calseg.__version__
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return f"{version}+g{out.stdout.strip()}"[:64]
    except (OSError, subprocess.SubprocessError):
        return version


def jsonable(value: Any) -> Any:
    """``value`` as JSON-compatible data: numpy scalars/arrays to lists, Path to str, and
    non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump())
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return jsonable(dataclasses.asdict(value))
    return str(value)


# ------------------------------------------------------------------------------ submit

Enqueue = Callable[[Job, float | None], None]
"""``enqueue(job, countdown_s)`` puts a job's message on the broker."""


def enqueue_celery(job: Job, countdown: float | None = None, *, app: Any = None) -> None:
    """Send ``calseg.run_job(job.id, dispatch_id)`` to the job kind's queue (task id = job id).

    ``app``: the Celery app to send with (default ``worker.celery_app.celery_app``, configured
    from the settings; tests pass ``worker.celery_app.make_celery(their_settings)``).

    Raises:
        QueueUnavailable: no broker configured, or it cannot be reached.
    """
    if app is None and not get_settings().redis_url:
        raise QueueUnavailable(
            "no broker configured: set CALSEG_REDIS_URL, or start the service with "
            "`make serve` (which starts its own Redis)"
        )
    if app is None:
        from worker.celery_app import celery_app as app

    try:
        app.send_task(
            TASK_NAME,
            args=[job.id],
            kwargs={"dispatch_id": job.dispatch_id},
            task_id=job.id,
            queue=QUEUE_BY_KIND[job.kind],
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises OperationalError and friends
        raise QueueUnavailable(f"cannot reach the broker: {exc}") from exc


def _check_references(session: Session, kind: str, params: Any, owner: User | None) -> None:
    """Referenced jobs and recordings exist, are ``owner``'s (or ``owner`` is an admin; None:
    an internal call, no check) and are usable; others' ids are reported as missing."""
    from calseg.service.auth import can_see

    for field, want in REFERENCES.get(kind, {}).items():
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


def submit_job(
    session: Session,
    kind: str,
    params: dict[str, Any] | None,
    *,
    enqueue: Enqueue | None = None,
    owner: User | None = None,
) -> Job:
    """Validate, insert a queued job and put it on its queue.

    Args:
        session: database session (committed here).
        kind: ``simulate`` | ``finetune`` | ``infer`` | ``evaluate``.
        params: the kind's parameters (see :mod:`calseg.service.schemas`).
        enqueue: how to queue it (default :func:`enqueue_celery`; tests pass a fake).
        owner: the user submitting it (owns the job; may reference only their own jobs and
            recordings unless admin). None: no owner, no ownership check.

    Raises:
        calseg.service.schemas.ParamsError: invalid parameters (API: 422).
        JobReferenceError: a referenced job/recording is missing, not the owner's, or
            unusable (API: 422).
        QueueUnavailable: the broker refused; the job is stored as failed (API: 503).
    """
    validated = validate_params(kind, params)
    _check_references(session, kind, validated, owner)
    job = Job(
        id=new_id(),
        owner_id=owner.id if owner is not None else None,
        kind=kind,
        state="queued",
        params=params_to_json(validated),
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
    session.refresh(job)
    if res.rowcount == 0:
        raise JobStateError(f"job {job_id} already {job.state}; nothing to cancel")
    return job


def retry_job(
    session: Session,
    job_id: str,
    *,
    enqueue: Enqueue | None = None,
    store: ArtifactStore | None = None,
) -> Job:
    """Queue a failed or cancelled job again (same id; its old outputs are removed).

    Raises:
        JobNotFound, JobStateError: the job is queued, running or succeeded.
    """
    job = get_job(session, job_id)
    if job.state not in ("failed", "cancelled"):
        raise JobStateError(
            f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried"
        )
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("failed", "cancelled")))
        .values(
            state="queued",
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
        session.refresh(job)
        raise JobStateError(f"job {job_id} is {job.state}; it changed meanwhile, not retried")
    _clear_outputs(session, job.id, store or get_store())
    session.commit()
    session.refresh(job)
    _dispatch(session, job, enqueue)
    return job


def _clear_outputs(session: Session, job_id: str, store: ArtifactStore) -> None:
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    store.delete(f"jobs/{job_id}")


# ------------------------------------------------------------------------------ run


class _LogForward(logging.Handler):
    """Forwards ``calseg.*`` log records of the running job into its log tail."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(logging.INFO)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("calseg.service"):
            return
        try:
            self.ctx.log(f"{record.levelname.lower()} [{record.name}] {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never break the job
            pass


class JobContext:
    """What a runner may use: progress, a working folder, artifacts, metrics, log, lookups.

    Progress is written to the database at most every ``settings.progress_interval_s``
    (and at every stage change); each write checks whether the job was cancelled.
    """

    def __init__(
        self, job: Job, params: Any, *, url: str, store: ArtifactStore, settings: Settings
    ) -> None:
        self.job_id = job.id
        self.kind = job.kind
        self.dispatch_id = job.dispatch_id
        self.params = params
        self.url = url
        self.store = store
        self.settings = settings
        self.prefix = f"jobs/{job.id}"
        self.workdir = store.workdir(self.prefix)
        self.warnings: list[str] = []
        self._lines: deque[str] = deque(maxlen=LOG_LINES)
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self._last_write = 0.0
        self._last_stage: str | None = None
        self._logfile = open(self.workdir / "job.log", "a", encoding="utf-8")  # noqa: SIM115
        self.jsonable = jsonable
        self.inputs: dict[str, dict[str, Any]] = {}
        """Files the job read, with their sha256 (recordings, dataset manifests, checkpoints):
        recorded by :meth:`artifact_path` and :meth:`recording_path` for the provenance."""
        self._params_json = dict(job.params or {})
        self._code_version = job.code_version
        from calseg.service.reconcile import Heartbeat

        # proves to the reconciler that this worker is alive (touches jobs.updated_at)
        self._heartbeat = Heartbeat(url, job.id, job.dispatch_id, settings.heartbeat_interval_s)
        self._heartbeat.start()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        from calseg.service.db import session_scope

        with session_scope(self.url) as session:
            yield session

    # -- reporting
    def log(self, message: str) -> None:
        """Append a line to the job's log (its tail is in ``jobs.log_tail``)."""
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        with self._lock:
            for line in str(message).splitlines() or [""]:
                self._lines.append(f"{stamp} {line}")
                self._logfile.write(f"{stamp} {line}\n")
            self._logfile.flush()
        log.info("job %s: %s", self.job_id, message)

    def warn(self, message: str) -> None:
        """Record a warning: in the log (prefixed WARNING) and in the result's ``warnings``."""
        with self._lock:
            if message not in self.warnings:
                self.warnings.append(message)
        self.log(f"WARNING: {message}")

    def log_tail(self) -> str:
        """The last lines of the log (at most ``LOG_CHARS`` characters)."""
        with self._lock:
            return "\n".join(self._lines)[-LOG_CHARS:]

    def progress(self, fraction: float, stage: str, message: str | None = None) -> None:
        """Report progress (a :data:`calseg.progress.ProgressFn`).

        Raises:
            JobCancelled: the job was cancelled (or superseded by a retry) meanwhile.
        """
        now = time.monotonic()
        with self._lock:
            if (
                stage == self._last_stage
                and fraction < 1.0
                and now - self._last_write < self.settings.progress_interval_s
            ):
                return
            if stage != self._last_stage:
                self.log(f"[{stage}] {message or ''}".rstrip())
            self._last_write, self._last_stage = now, stage
        f = min(max(float(fraction), 0.0), 1.0)
        elapsed = now - self._t0
        eta = elapsed * (1.0 - f) / f if f >= 0.02 else None
        self._write(progress=f, stage=stage[:64], message=message, eta_s=eta)

    def _write(self, **values: Any) -> None:
        values["log_tail"] = self.log_tail()
        values["updated_at"] = utcnow()
        with self._session() as session:
            res = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.state == "running",
                    Job.dispatch_id == self.dispatch_id,
                )
                .values(**values)
            )
            if res.rowcount == 0:
                state = session.scalar(select(Job.state).where(Job.id == self.job_id))
                raise JobCancelled(f"job is {state} (cancelled or superseded); stopping")

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when the job is no longer running."""
        self._write()

    # -- outputs
    def relpath(self, path: Path) -> str:
        """The artifact-store key of a path inside the store."""
        rel = self.store.relpath_of(Path(path))
        if rel is None:
            raise ValueError(f"{path} is outside the artifact store {self.settings.artifact_dir}")
        return rel

    def add_artifact(
        self, name: str, path: Path, content_type: str | None = None, kind: str = "file"
    ) -> Artifact:
        """Register a file as the job's artifact ``name`` (copied into the job folder when it
        lies outside it); its sha256, size and content type are recorded."""
        path = Path(path)
        rel = self.store.relpath_of(path)
        if rel is None or not rel.startswith(self.prefix + "/"):
            rel = f"{self.prefix}/{name}"
            obj = self.store.put(rel, path)
        else:
            obj = self.store.register(rel)
        art = Artifact(
            job_id=self.job_id,
            name=name,
            kind=kind,
            relpath=obj.relpath,
            content_type=content_type or obj.content_type,
            sha256=obj.sha256,
            size_bytes=obj.size_bytes,
        )
        with self._session() as session:
            session.execute(
                delete(Artifact).where(Artifact.job_id == self.job_id, Artifact.name == name)
            )
            session.add(art)
        self.log(f"artifact {name}: {obj.size_bytes} bytes, sha256 {obj.sha256[:12]}")
        return art

    def add_metric(
        self,
        name: str,
        value: float,
        model: str | None = None,
        subset: str | None = None,
        step: int | None = None,
    ) -> None:
        """Store a metric row; a non-finite value is stored as NULL with a log line.
        ``step``: the optimiser step of a training-curve point (None: a final number)."""
        self.add_metrics([(name, value, model, subset, step)])

    def add_metrics(
        self, rows: list[tuple[str, float, str | None, str | None, int | None]]
    ) -> None:
        """Store several ``(name, value, model, subset, step)`` rows in one transaction
        (non-finite values as NULL, as :meth:`add_metric`)."""
        metrics = []
        for name, value, model, subset, step in rows:
            v: float | None = float(value)
            if not math.isfinite(v):
                self.log(f"metric {name} ({model}, {subset}, step {step}) is {v}; stored as null")
                v = None
            metrics.append(
                Metric(
                    job_id=self.job_id, name=name, value=v, model=model, subset=subset, step=step
                )
            )
        if metrics:
            with self._session() as session:
                session.add_all(metrics)

    # -- lookups
    def upstream(self, job_id: str, kind: str) -> Job:
        """A referenced job of ``kind`` that succeeded.

        Raises:
            JobDeferred: it is still queued or running (this job is re-queued).
            JobReferenceError: it is missing, of another kind, failed or cancelled.
        """
        with self._session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobReferenceError(f"there is no job {job_id}")
            if job.kind != kind:
                raise JobReferenceError(f"job {job_id} is a {job.kind} job, not a {kind} job")
            if job.state in ("queued", "running"):
                raise JobDeferred(f"waiting for {kind} job {job_id} ({job.state})")
            if job.state != "succeeded":
                raise JobReferenceError(f"{kind} job {job_id} {job.state}; cannot use its output")
            session.expunge(job)
            return job

    def artifact_path(self, job_id: str, name: str, kind: str | None = None) -> Path:
        """Local path of artifact ``name`` of a (succeeded) job, of ``kind`` when given."""
        if kind is not None:
            self.upstream(job_id, kind)
        with self._session() as session:
            art = session.scalar(
                select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
            )
            if art is None:
                raise JobReferenceError(f"job {job_id} has no artifact {name!r}")
            path = self.store.path(art.relpath)
            self.inputs[f"{job_id}/{name}"] = {
                "job_id": job_id,
                "name": name,
                "kind": art.kind,
                "sha256": art.sha256,
            }
        if not path.exists():
            raise JobReferenceError(f"artifact {name!r} of job {job_id} is missing at {path}")
        return path

    def dataset_dir(self, simulate_job_id: str) -> Path:
        """The dataset folder written by a succeeded simulate job."""
        return self.artifact_path(simulate_job_id, "manifest.json", kind="simulate").parent

    def recording_path(self, recording_id: str) -> Path:
        """Local path of an uploaded recording."""
        with self._session() as session:
            rec = session.get(Recording, recording_id)
            if rec is None:
                raise JobReferenceError(f"there is no recording {recording_id}")
            path = self.store.path(rec.relpath)
            self.inputs[f"recording/{recording_id}"] = {
                "recording_id": recording_id,
                "name": rec.filename,
                "kind": "recording",
                "sha256": rec.sha256,
            }
        if not path.exists():
            raise JobReferenceError(f"recording {recording_id} is missing at {path}")
        return path

    def provenance(self) -> dict[str, Any]:
        """What made this job's outputs: code version, parameters, seeds, the files it read
        (with sha256) and the base SAM2 checkpoint (path and sha256) of jobs that use SAM2.

        Never raises (it is written when a job ends, failed ones included): what cannot be
        found out is recorded as an ``error`` entry instead.
        """
        seeds = {k: v for k, v in self._params_json.items() if "seed" in k}
        out: dict[str, Any] = {
            "code_version": self._code_version,
            "params": self._params_json,
            "seeds": seeds,
            "inputs": list(self.inputs.values()),
            "python": sys.version.split()[0],
        }
        try:
            out["libraries"] = _library_versions()
            base = self.settings.sam2_checkpoint
            if self.kind != "simulate":
                out["base_checkpoint"] = (
                    {"path": str(base), "sha256": _file_sha256(Path(base))}
                    if base is not None and Path(base).is_file()
                    else None
                )
        except Exception as exc:  # noqa: BLE001 - provenance must not fail the job's ending
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def close(self) -> None:
        self._heartbeat.stop()
        with self._lock:
            self._logfile.close()


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
) -> str:
    """Run a queued job to its end; never raises for the job's own errors.

    Args:
        job_id: the job.
        dispatch_id: the dispatch this message belongs to (None: the current one).
        url, store, settings: overrides (defaults: the configured ones).
        enqueue: how to re-queue a deferred job (default :func:`enqueue_celery`).
        runners: runner per kind (default :data:`calseg.service.runners.RUNNERS`).

    Returns:
        The job's state afterwards (``"missing"`` when no such job exists, ``"skipped"`` for a
        stale message).
    """
    from calseg.service.db import session_scope

    settings = settings or get_settings()
    url = url or settings.database_url
    store = store or get_store(settings.artifact_dir)
    if runners is None:
        from calseg.service.runners import RUNNERS as runners

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
        guard = (Job.id == job_id, Job.state == observed, Job.attempts == attempts)
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
                progress=0.0,
                stage="starting",
                eta_s=None,
                error=None,
                worker=f"{socket.gethostname()}:{os.getpid()}",
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
    ctx.log(f"{job.kind} job {job.id} started on {job.worker} (code {job.code_version})")
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
            result = runners[job.kind](params, ctx)
        result = jsonable(result or {})
        result.setdefault("warnings", list(ctx.warnings))
        result["wall_s"] = round(time.monotonic() - t0, 3)
        store.sync(ctx.prefix)  # a remote store gets every file before the job counts as done
        ctx.log(f"succeeded in {result['wall_s']:.1f} s")
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
    except JobCancelled as exc:
        ctx.log(f"stopped: {exc}")
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
        reason = f"{type(exc).__name__}: {exc}"
        ctx.log("failed: " + reason)
        ctx.log(traceback.format_exc(limit=8))
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
    return state


def _register_log(url: str, store: ArtifactStore, job_id: str, relpath: str) -> None:
    """Record the job's full log file as its artifact ``job.log``."""
    from calseg.service.db import session_scope

    try:
        obj = store.register(relpath)
        with session_scope(url) as session:
            session.execute(
                delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == "job.log")
            )
            session.add(
                Artifact(
                    job_id=job_id,
                    name="job.log",
                    kind="log",
                    relpath=obj.relpath,
                    content_type=obj.content_type,
                    sha256=obj.sha256,
                    size_bytes=obj.size_bytes,
                )
            )
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


def abandon_unfinished(url: str, reason: str) -> int:
    """Fail every queued or running job, with ``reason`` (the broker that held them is gone).

    Used when the embedded service stops with its own private Redis: the messages of queued
    and running jobs die with that Redis, so without this they would stay "queued" or
    "running" forever. ``POST /api/jobs/{id}/retry`` runs them again.

    Args:
        url: SQLAlchemy database URL.
        reason: the error text stored on each job.

    Returns:
        Number of jobs marked failed.
    """
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        res = session.execute(
            update(Job)
            .where(Job.state.in_(("queued", "running")))
            .values(state="failed", error=reason, finished_at=utcnow(), updated_at=utcnow())
        )
        return res.rowcount
