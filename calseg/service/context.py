"""What a running job sees: :class:`JobContext` (progress, working folder, artifacts, metrics,
log, lookups, cancellation) and the provenance helpers (:func:`code_version`, :func:`jsonable`).

Runners (:mod:`calseg.service.runners`) take a :class:`JobContext`; the lifecycle
(:mod:`calseg.service.jobs`) creates it in :func:`calseg.service.jobs.run_job`.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

import calseg
from calseg.progress import Cancelled, CancelToken
from calseg.service.models import (
    Artifact,
    Job,
    Metric,
    Recording,
    utcnow,
)
from calseg.service.settings import REPO_ROOT, Settings
from calseg.service.store import ArtifactStore

log = logging.getLogger("calseg.service.jobs")

LOG_LINES = 200
"""Lines of log kept in ``jobs.log_tail``."""
LOG_CHARS = 20_000


class JobReferenceError(ValueError):
    """A parameter names a job or recording that is missing, of the wrong kind, or failed."""


class JobCancelled(Cancelled):
    """Raised inside a running job when it was cancelled (or superseded by a retry or a
    re-queue); stops the runner. A :class:`calseg.progress.Cancelled`, so every cancellation
    point of the science code (:func:`calseg.progress.check_cancelled`) raises it."""


class JobDeferred(Exception):
    """Raised inside a job whose referenced job has not finished yet; re-queued later."""


def public_text(text: str, settings: Settings) -> str:
    """``text`` without this server's folders, for what job owners read (errors, logs,
    results): the artifact store, cache and repository prefixes are dropped, so
    ``/srv/calseg/var/artifacts/jobs/ID/dataset`` reads ``jobs/ID/dataset`` and a traceback's
    ``/srv/calseg/calseg/io/recordings.py`` reads ``calseg/io/recordings.py``. A new-user
    check found absolute server paths in job errors, tracebacks and provenance; a tenth
    attack run, in job logs (:meth:`JobContext.log` now filters every line). Every folder of
    the settings (artifacts, caches, logs, token, checkpoint, real data) and the temporary
    folder count, not only the artifact store."""
    roots = [REPO_ROOT, Path(tempfile.gettempdir())]
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, Path):
            roots.append(value if value.suffix == "" else value.parent)
    for prefix in _path_prefixes(tuple(str(r) for r in roots)):
        text = text.replace(prefix, "")
    return text


@cache
def _path_prefixes(roots: tuple[str, ...]) -> tuple[str, ...]:
    """``root/`` of each root as given and resolved, the longest (innermost) first."""
    prefixes = set()
    for root in roots:
        for form in (Path(root), Path(root).resolve()):
            if str(form) not in ("/", "."):
                prefixes.add(str(form).rstrip("/") + "/")
    return tuple(sorted(prefixes, key=len, reverse=True))


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


def public_data(value: Any, settings: Settings) -> Any:
    """``value`` (JSON-compatible data) with :func:`public_text` applied to every string: a
    job's result as its owner reads it. An infer job's result named the server's absolute
    checkpoint path (``/srv/.../calseg/segment/weights/...``; a new-user check)."""
    if isinstance(value, dict):
        return {k: public_data(v, settings) for k, v in value.items()}
    if isinstance(value, list):
        return [public_data(v, settings) for v in value]
    if isinstance(value, str):
        return public_text(value, settings)
    return value


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

    Cancellation: :attr:`cancel_token` (a :class:`calseg.progress.CancelToken`) asks the
    database at most every ``settings.cancel_check_interval_s`` whether the job still runs
    under this dispatch; :func:`run_job` installs it around the runner, so every
    :func:`calseg.progress.check_cancelled` in the science code (and every progress report)
    raises :class:`JobCancelled` within about that interval of a cancel.
    """

    def __init__(
        self, job: Job, params: Any, *, url: str, store: ArtifactStore, settings: Settings
    ) -> None:
        self.job_id = job.id
        self.owner_id = getattr(job, "owner_id", None)
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
        self.cancel_token = CancelToken(
            self._cancel_reason, settings.cancel_check_interval_s, error=JobCancelled
        )

    @contextmanager
    def _session(self) -> Iterator[Session]:
        from calseg.service.db import session_scope

        with session_scope(self.url) as session:
            yield session

    # -- reporting
    def log(self, message: str) -> None:
        """Append a line to the job's log (its tail is in ``jobs.log_tail``), without this
        server's folders (:func:`public_text`: the owner reads the log)."""
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        with self._lock:
            for line in public_text(str(message), self.settings).splitlines() or [""]:
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

    def estimate(self) -> Any:
        """The job's :class:`calseg.service.costs.CostEstimate` from its parameters and its
        inputs as they are now (:func:`calseg.service.costs.estimate`)."""
        from calseg.service.costs import estimate

        with self._session() as session:
            return estimate(session, self.kind, self.params, self.settings)

    def readmit(self, est: Any, why: str) -> None:
        """Check the job's new estimate ``est`` (a :class:`calseg.service.costs.CostEstimate`
        of ``why``, what the runner now knows it will do) against its owner's limits
        (:func:`calseg.service.costs.readmit`), and log it.

        Raises:
            calseg.service.costs.JobTooCostly: over a limit; the job fails with its message.
        """
        from calseg.service.costs import readmit

        with self._session() as session:
            readmit(session, self.job_id, est, self.settings, why)
        self.log(f"{why}: estimated {est.describe()}; within the limits")

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
                throttled = True
            else:
                throttled = False
                if stage != self._last_stage:
                    self.log(f"[{stage}] {message or ''}".rstrip())
                self._last_write, self._last_stage = now, stage
        if throttled:
            self.cancel_token.check()  # a cancellation point even when nothing is written
            return
        f = min(max(float(fraction), 0.0), 1.0)
        elapsed = now - self._t0
        eta = elapsed * (1.0 - f) / f if f >= 0.02 else None
        self._write(progress=f, stage=stage[:64], message=message, eta_s=eta)

    def _write(self, **values: Any) -> None:
        values["log_tail"] = self.log_tail()
        with self._fenced_session(**values):
            pass

    @contextmanager
    def _fenced_session(self, **values: Any) -> Iterator[Session]:
        """A session whose writes land only while the job runs under this dispatch.

        The job's row is updated first (``updated_at`` and ``values``) where it is
        ``running`` under :attr:`dispatch_id`; that update holds the row (PostgreSQL) or the
        database (SQLite) until the session commits, so a cancel, retry or re-dispatch
        commits either before it (this run writes nothing) or after its rows.

        Raises:
            JobCancelled: the job is no longer running under this dispatch (its cancel
                token is cancelled too).
        """
        with self._session() as session:
            res = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.state == "running",
                    Job.dispatch_id == self.dispatch_id,
                )
                .values(updated_at=utcnow(), **values)
            )
            if res.rowcount == 0:
                state = session.scalar(select(Job.state).where(Job.id == self.job_id))
                reason = f"job is {state or 'deleted'} (cancelled or superseded); stopping"
                session.rollback()
                self.cancel_token.cancel(reason)
                raise JobCancelled(reason)
            yield session

    def _cancel_reason(self) -> str | None:
        """Why this run must stop (the job is no longer running under this dispatch), or
        None. A database error is logged and answered None: an outage must not end the job
        (the heartbeat keeps trying too)."""
        try:
            with self._session() as session:
                row = session.execute(
                    select(Job.state, Job.dispatch_id).where(Job.id == self.job_id)
                ).first()
        except Exception as exc:  # noqa: BLE001 - e.g. the database restarts
            log.warning("job %s: cancellation check failed: %s", self.job_id, exc)
            return None
        if row is None:
            return "job was deleted; stopping"
        if row.state != "running" or row.dispatch_id != self.dispatch_id:
            what = row.state if row.dispatch_id == self.dispatch_id else f"{row.state} again"
            return f"job is {what} (cancelled or superseded); stopping"
        return None

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when the job is no longer running under this dispatch
        (asks the database at most every ``settings.cancel_check_interval_s``)."""
        self.cancel_token.check()

    # -- outputs
    @property
    def embedding_cache_dir(self) -> Path:
        """This job's SAM2 embedding cache: its owner's folder ``user-<owner id>`` of
        ``settings.embedding_cache_dir``. One cache for all users told a user, by the job log's
        "from the embedding cache" and its speed, that another user had already run the same
        frames (a sixth attack run); the pruning keeps all users' folders together under
        ``max_cache_bytes`` (:meth:`calseg.segment.embeddings.EmbeddingCache.prune`)."""
        from calseg.segment.embeddings import USER_PREFIX

        return self.settings.embedding_cache_dir / f"{USER_PREFIX}{self.owner_id or 'none'}"

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
        lies outside it); its sha256, size and content type are recorded.

        Only while the job runs under this dispatch (:meth:`_fenced_session`): a run that was
        cancelled, retried or dispatched again raises :class:`JobCancelled` and registers
        nothing (a copy it made is removed), so its files and rows cannot mix with the next
        run's.
        """
        path = Path(path)
        self.cancel_token.check()  # a run already told to stop copies nothing
        rel = self.store.relpath_of(path)
        copied = rel is None or not rel.startswith(self.prefix + "/")
        if copied:
            rel = f"{self.prefix}/{name}"
            obj = self.store.put(rel, path)
        else:
            obj = self.store.register(rel)
        art = Artifact.of_stored(self.job_id, name, kind, obj, content_type)
        try:
            with self._fenced_session() as session:
                session.execute(
                    delete(Artifact).where(Artifact.job_id == self.job_id, Artifact.name == name)
                )
                session.add(art)
        except JobCancelled:
            if copied:
                self.store.delete(obj.relpath)
            raise
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
        (non-finite values as NULL, as :meth:`add_metric`), only while the job runs under
        this dispatch (:meth:`_fenced_session`; else :class:`JobCancelled` and no row)."""
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
            with self._fenced_session() as session:
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

    def recording_read_options(self, recording_id: str) -> dict[str, Any]:
        """The reading options an uploaded recording was accepted with (axes, channel,
        interleaved_channels, z_projection; only those given at upload)."""
        with self._session() as session:
            rec = session.get(Recording, recording_id)
            if rec is None:
                raise JobReferenceError(f"there is no recording {recording_id}")
            return dict(rec.read_options or {})

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
                    {
                        "path": public_text(str(base), self.settings),
                        "sha256": _file_sha256(Path(base)),
                    }
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
