"""CalSeg REST API (FastAPI): jobs, artifacts, recordings, models, and the browser page.

Routes are thin: validation and lifecycle live in :mod:`calseg.service`. Run with
``uvicorn api.main:app`` (or ``make serve``); the OpenAPI description is at ``/docs``.

Every route except health, readiness, the page, its static files and the OpenAPI description
needs ``Authorization: Bearer <token>`` (:mod:`calseg.service.auth`); each takes the
:data:`UserDep` dependency and answers 404 for another user's ids (admins see everything).
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.frames import (
    label_at,
    load_labels,
    load_recording_frames,
    load_stacks,
    load_traces,
    range_headers,
    render_png,
)
from api.uploads import UploadError, receive_file
from calseg import __version__
from calseg.service import jobs as lifecycle
from calseg.service.auth import HOW_TO_GET_A_TOKEN, BadTokenLimiter, authenticate, can_see
from calseg.service.db import get_session, ping
from calseg.service.models import JOB_KINDS, JOB_STATES, Artifact, Job, Metric, Recording, User
from calseg.service.reconcile import reconciler_lifespan
from calseg.service.schemas import (
    ArtifactOut,
    JobCreate,
    JobList,
    JobMetricOut,
    JobOut,
    MetricOut,
    ModelOut,
    ParamsError,
    RecordingOut,
    UserOut,
    json_safe_errors,
    params_json_schema,
)
from calseg.service.settings import REPO_ROOT, Settings, get_settings
from calseg.service.store import ArtifactStore, get_store

log = logging.getLogger("calseg.api")
FRONTEND = REPO_ROOT / "frontend"

app = FastAPI(
    title="CalSeg",
    version=__version__,
    description="Segment calcium-active cells in GECI recordings of epithelial tissue: "
    "simulate, fine-tune SAM2, infer, evaluate.",
    # the reconciler re-queues jobs of lost workers and messages Redis lost (issue 5)
    lifespan=reconciler_lifespan,
)

SessionDep = Annotated[Session, Depends(get_session)]

MAX_OFFSET = 2**31 - 1
"""Largest listing offset: beyond it a database integer overflows (schemathesis found 500s
with offset=2**63; now 422)."""


class JsonBodyLimit:
    """ASGI middleware: request bodies other than recording uploads are limited to
    ``settings.max_json_bytes`` (413 with a JSON ``detail``): by ``Content-Length`` when given,
    else while reading (chunked bodies). The body (at most the limit) is read here and handed
    on, so a huge JSON body is refused before it fills memory or reaches the parser."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")
            or scope["path"].rstrip("/") == "/api/recordings"
        ):
            await self.app(scope, receive, send)
            return
        limit = get_settings().max_json_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await self._reject(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Any, limit: int) -> None:
        await JSONResponse(
            status_code=413,
            content={
                "detail": f"request body larger than {limit} bytes; job parameters are small "
                "JSON objects (upload recordings to /api/recordings instead), or raise "
                "CALSEG_MAX_JSON_BYTES on the server"
            },
        )({"type": "http"}, None, send)


app.add_middleware(JsonBodyLimit)


# Trivial dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in the
# threadpool: one thread hop per dependency per request, for work that cannot block.
async def settings_dep() -> Settings:
    """The service settings (a dependency, so tests can override it)."""
    return get_settings()


def store_dep() -> ArtifactStore:
    """The artifact store (a dependency, so tests can override it)."""
    return get_store()


async def enqueue_dep() -> lifecycle.Enqueue:
    """How jobs are put on the broker (Celery; tests override it)."""
    return lifecycle.enqueue_celery


SettingsDep = Annotated[Settings, Depends(settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(store_dep)]
EnqueueDep = Annotated[lifecycle.Enqueue, Depends(enqueue_dep)]

# ------------------------------------------------------------------------------ auth

_limiters: dict[tuple[int, float], BadTokenLimiter] = {}


def bad_token_limiter(settings: Settings) -> BadTokenLimiter:
    """The process's bad-token limiter for these settings (one per limit and window)."""
    key = (settings.auth_max_failures, settings.auth_window_s)
    if key not in _limiters:
        _limiters[key] = BadTokenLimiter(*key)
    return _limiters[key]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        401, f"{message}: {HOW_TO_GET_A_TOKEN}", headers={"WWW-Authenticate": "Bearer"}
    )


_bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="cs_ + 43 URL-safe characters",
    description="API token. On the embedded service (make serve) it is in var/token; on a "
    "server an admin creates one with `calseg tokens create <user>`.",
)


def current_user(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> User:
    """The user of the request's ``Authorization: Bearer <token>`` (a dependency).

    Raises:
        HTTPException: 401 (with ``WWW-Authenticate: Bearer``) for a missing, malformed,
            unknown or revoked token; 429 (with ``Retry-After``) when this client address sent
            ``settings.auth_max_failures`` bad tokens within ``settings.auth_window_s``.
    """
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing API token")
    address = request.client.host if request.client else "unknown"
    limiter = bad_token_limiter(settings)
    wait = limiter.retry_after(address)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise HTTPException(
            429,
            f"too many invalid API tokens from {address}; try again in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        limiter.failure(address)
        raise _unauthorized("malformed Authorization header")
    user = authenticate(session, token.strip())
    if user is None:
        limiter.failure(address)
        raise _unauthorized("invalid or revoked API token")
    return user


UserDep = Annotated[User, Depends(current_user)]


# ------------------------------------------------------------------------------ errors


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content=jsonable_encoder({"detail": message, **extra}))


def _unprocessable(message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    """Every 422 of the API has one shape: ``{"detail": str, "errors": [...]}`` - ``detail``
    one human sentence, ``errors`` pydantic-style ``{"type", "loc", "msg", "input"?}`` items
    (``loc`` such as ``["body", "params", field]``; empty when no single field is at fault)."""
    return _error(422, message, errors=errors or [])


def _describe_errors(errors: list[dict[str, Any]]) -> str:
    """``"kind: Input should be ...; params: ..."`` (the leading ``body`` of each location
    dropped) for the ``detail`` of a request-validation 422."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        parts.append(f"{'.'.join(loc)}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


_default_openapi = app.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's OpenAPI document with its 422 schema (``HTTPValidationError``) replaced by
    the shape :func:`_unprocessable` answers: ``detail`` a string, ``errors`` a list."""
    if app.openapi_schema is None:
        schemas = _default_openapi().get("components", {}).get("schemas", {})
        if "HTTPValidationError" in schemas:
            schemas["HTTPValidationError"] = {
                "title": "HTTPValidationError",
                "type": "object",
                "required": ["detail", "errors"],
                "properties": {
                    "detail": {"type": "string", "title": "Detail"},
                    "errors": {
                        "type": "array",
                        "title": "Errors",
                        "items": {"$ref": "#/components/schemas/ValidationError"},
                    },
                },
            }
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@app.exception_handler(lifecycle.JobNotFound)
async def _not_found(_: Request, exc: lifecycle.JobNotFound) -> JSONResponse:
    return _error(404, str(exc))


@app.exception_handler(lifecycle.JobStateError)
async def _conflict(_: Request, exc: lifecycle.JobStateError) -> JSONResponse:
    return _error(409, str(exc))


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with pydantic's errors made JSON-safe (a bad input may be NaN, Inf or any object,
    which FastAPI's default handler cannot serialise: it answered 500)."""
    errors = json_safe_errors(list(exc.errors()))
    return _unprocessable(_describe_errors(errors), errors)


@app.exception_handler(ParamsError)
async def _bad_params(_: Request, exc: ParamsError) -> JSONResponse:
    errors = [{**e, "loc": ["body", "params", *e.get("loc", ())]} for e in exc.errors]
    return _unprocessable(str(exc), errors)


@app.exception_handler(lifecycle.JobReferenceError)
async def _bad_reference(_: Request, exc: lifecycle.JobReferenceError) -> JSONResponse:
    return _unprocessable(str(exc))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """A route's ``HTTPException(422, "...")`` in the one 422 shape; other codes as FastAPI
    answers them (``{"detail": str}``, headers such as WWW-Authenticate kept)."""
    if exc.status_code == 422:
        return _unprocessable(str(exc.detail))
    return await http_exception_handler(request, exc)


@app.exception_handler(lifecycle.QueueUnavailable)
async def _no_queue(_: Request, exc: lifecycle.QueueUnavailable) -> JSONResponse:
    return _error(503, str(exc))


@app.exception_handler(OperationalError)
async def _no_database(_: Request, exc: OperationalError) -> JSONResponse:
    """The database is down or restarting: 503 (try again), never 500; the engine's
    pre-ping reconnects once it is back."""
    log.warning("database unavailable: %s", str(exc.orig).strip()[:300])
    return _error(
        503,
        "the database is unavailable right now (restarting or unreachable); try again in a "
        "few seconds",
    )


# ------------------------------------------------------------------------------ health


@app.get("/api/health", tags=["health"])
def health() -> dict[str, str]:
    """Liveness: the api process answers."""
    return {"status": "ok", "version": __version__}


@app.get("/api/ready", tags=["health"])
def ready(settings: SettingsDep) -> JSONResponse:
    """Readiness: the database and the broker answer (503 with the reason otherwise)."""
    checks: dict[str, str] = {}
    try:
        ping(settings.database_url)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report any driver error
        checks["database"] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
    if not settings.redis_url:
        checks["broker"] = "not configured (set CALSEG_REDIS_URL or use `make serve`)"
    else:
        try:
            import redis

            client = redis.Redis.from_url(
                settings.redis_url, socket_connect_timeout=1, socket_timeout=1
            )
            client.ping()
            client.close()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        status_code=200 if ok else 503, content={"status": "ready" if ok else "not ready", **checks}
    )


# ------------------------------------------------------------------------------ me, kinds


@app.get("/api/me", response_model=UserOut, tags=["auth"])
def me(user: UserDep) -> UserOut:
    """The user of the token: ``{id, name, is_admin}``."""
    return UserOut.model_validate(user)


@app.get("/api/job-kinds", tags=["jobs"])
def job_kinds(user: UserDep) -> dict[str, Any]:
    """``{kind: JSON schema of the kind's parameters}`` (defaults included), for forms."""
    if not _job_kind_schemas:  # built once per process (about 1 s: imports the configurations)
        _job_kind_schemas.update({kind: params_json_schema(kind) for kind in JOB_KINDS})
    return _job_kind_schemas


_job_kind_schemas: dict[str, Any] = {}


# ------------------------------------------------------------------------------ jobs


def _job(session: Session, job_id: str, user: User) -> Job:
    """The job, when ``user`` may see it; otherwise 404 exactly as for a missing job."""
    job = session.get(Job, job_id)
    if job is None or not can_see(user, job.owner_id):
        raise lifecycle.JobNotFound(f"there is no job {job_id}")
    return job


def _job_with_results(session: Session, job_id: str, user: User) -> Job:
    """:func:`_job` for a detailed answer in one query while the job has no metrics and no
    artifacts (a queued or running job, what clients poll): the job row and whether any
    metric or artifact exists come back together, and the collections are queried only when
    they are not empty (before: the job plus two lazy loads, three round trips)."""
    has_metrics = select(Metric.id).where(Metric.job_id == Job.id).exists()
    has_artifacts = select(Artifact.id).where(Artifact.job_id == Job.id).exists()
    row = session.execute(select(Job, has_metrics, has_artifacts).where(Job.id == job_id)).first()
    if row is None or not can_see(user, row[0].owner_id):
        raise lifecycle.JobNotFound(f"there is no job {job_id}")
    job, any_metrics, any_artifacts = row
    if not any_metrics:
        set_committed_value(job, "metrics", [])
    if not any_artifacts:
        set_committed_value(job, "artifacts", [])
    return job


def _job_out(job: Job, *, detail: bool) -> JobOut:
    out = JobOut.model_validate(job, from_attributes=True)
    if detail:
        out.metrics = [MetricOut.model_validate(m) for m in job.metrics]
        out.artifacts = [
            ArtifactOut.model_validate(a).model_copy(
                update={"url": f"/api/jobs/{job.id}/artifacts/{a.name}"}
            )
            for a in job.artifacts
        ]
    else:
        out.metrics, out.artifacts, out.log_tail = [], [], None
    return out


@app.post("/api/jobs", status_code=201, response_model=JobOut, tags=["jobs"])
def create_job(body: JobCreate, session: SessionDep, enqueue: EnqueueDep, user: UserDep) -> JobOut:
    """Submit a job: ``{"kind": "simulate"|"finetune"|"infer"|"evaluate", "params": {...}}``.

    422 names each invalid parameter (and a referenced job or recording that is missing or
    not the caller's); 503 when the broker cannot take the job. The caller owns the job.
    """
    job = lifecycle.submit_job(session, body.kind, body.params, enqueue=enqueue, owner=user)
    for empty in ("metrics", "artifacts"):  # a new job has none: no lazy-load queries
        set_committed_value(job, empty, [])
    return _job_out(job, detail=True)


@app.get("/api/jobs", response_model=JobList, tags=["jobs"])
def list_jobs(
    session: SessionDep,
    user: UserDep,
    kind: Annotated[str | None, Query(description=f"one of {', '.join(JOB_KINDS)}")] = None,
    state: Annotated[str | None, Query(description=f"one of {', '.join(JOB_STATES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """The caller's jobs (an admin: everyone's), newest first, filtered by kind and state."""
    if kind is not None and kind not in JOB_KINDS:
        raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(JOB_KINDS)}")
    if state is not None and state not in JOB_STATES:
        raise HTTPException(422, f"unknown state {state!r}; use one of {', '.join(JOB_STATES)}")
    query = select(Job)
    if not user.is_admin:
        query = query.where(Job.owner_id == user.id)
    if kind:
        query = query.where(Job.kind == kind)
    if state:
        query = query.where(Job.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    return JobList(
        items=[_job_out(j, detail=False) for j in rows], total=total, limit=limit, offset=offset
    )


@app.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def get_job(job_id: str, session: SessionDep, user: UserDep) -> JobOut:
    """One job: state, progress, stage, ETA, message, error, log tail, result, provenance,
    metrics and artifacts (each with its download URL)."""
    return _job_out(_job_with_results(session, job_id, user), detail=True)


@app.get("/api/jobs/{job_id}/metrics", response_model=list[MetricOut], tags=["jobs"])
def job_metrics(
    job_id: str,
    session: SessionDep,
    user: UserDep,
    name: Annotated[str | None, Query(description="only this metric, e.g. loss")] = None,
) -> list[MetricOut]:
    """The job's metrics in the order they were recorded: final numbers (``step`` null) and,
    for a fine-tune job, its training curve (``loss``, ``train_iou`` with subset ``train``,
    ``val_iou`` with subset ``val``, each with its optimiser ``step``), live while it runs."""
    _job(session, job_id, user)
    query = select(Metric).where(Metric.job_id == job_id)
    if name is not None:
        query = query.where(Metric.name == name)
    return [MetricOut.model_validate(m) for m in session.scalars(query.order_by(Metric.id))]


@app.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
def cancel_job(job_id: str, session: SessionDep, user: UserDep) -> JobOut:
    """Cancel a queued or running job (409 when it already ended)."""
    _job(session, job_id, user)
    return _job_out(lifecycle.cancel_job(session, job_id), detail=True)


@app.post("/api/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"])
def retry_job(
    job_id: str, session: SessionDep, enqueue: EnqueueDep, store: StoreDep, user: UserDep
) -> JobOut:
    """Queue a failed or cancelled job again, same id (409 otherwise)."""
    _job(session, job_id, user)
    return _job_out(lifecycle.retry_job(session, job_id, enqueue=enqueue, store=store), detail=True)


@app.post("/api/jobs/{job_id}/rerun", status_code=201, response_model=JobOut, tags=["jobs"])
def rerun_job(job_id: str, session: SessionDep, enqueue: EnqueueDep, user: UserDep) -> JobOut:
    """Submit a new job with this job's kind and parameters (seeds included): it reproduces it.
    The caller owns the new job."""
    _job(session, job_id, user)
    return _job_out(lifecycle.rerun_job(session, job_id, enqueue=enqueue, owner=user), detail=True)


@app.get("/api/metrics", response_model=list[JobMetricOut], tags=["jobs"])
def query_metrics(
    session: SessionDep,
    user: UserDep,
    dataset_job_id: Annotated[
        str | None, Query(description="a simulate job: its metrics and those of jobs using it")
    ] = None,
    model_job_id: Annotated[
        str | None, Query(description="a finetune job: its metrics and those of jobs using it")
    ] = None,
    kind: Annotated[str | None, Query(description=f"one of {', '.join(JOB_KINDS)}")] = None,
    name: Annotated[str | None, Query(description="e.g. iou")] = None,
    model: Annotated[str | None, Query(description="e.g. fine-tuned, base, baseline")] = None,
    subset: Annotated[str | None, Query(description="e.g. test")] = None,
    curves: Annotated[bool, Query(description="include training-curve points")] = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[JobMetricOut]:
    """Metrics across the caller's jobs (an admin: everyone's), per dataset and per model:
    e.g. ``?dataset_job_id=D&name=iou`` compares every model evaluated on dataset ``D``, and
    ``?model_job_id=M`` gives a fine-tuned model's training numbers and every evaluation and
    inference that used it. Newest jobs first; final numbers only unless ``curves=true``.
    404 when a given job id is not one of the caller's."""
    if kind is not None and kind not in JOB_KINDS:
        raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(JOB_KINDS)}")
    for ref in (dataset_job_id, model_job_id):
        if ref is not None:
            _job(session, ref, user)
    query = select(Job).options(selectinload(Job.metrics))
    if not user.is_admin:
        query = query.where(Job.owner_id == user.id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    rows: list[JobMetricOut] = []
    for job in session.scalars(query.order_by(Job.created_at.desc(), Job.id)):
        params = job.params or {}
        ds = job.id if job.kind == "simulate" else params.get("dataset_job_id")
        mdl = job.id if job.kind == "finetune" else params.get("model_job_id")
        if dataset_job_id is not None and ds != dataset_job_id:
            continue
        if model_job_id is not None and mdl != model_job_id:
            continue
        for m in job.metrics:
            if (m.step is not None and not curves) or (name is not None and m.name != name):
                continue
            if (model is not None and m.model != model) or (
                subset is not None and m.subset != subset
            ):
                continue
            rows.append(
                JobMetricOut(
                    name=m.name,
                    value=m.value,
                    model=m.model,
                    subset=m.subset,
                    step=m.step,
                    job_id=job.id,
                    job_kind=job.kind,
                    dataset_job_id=ds,
                    model_job_id=mdl,
                )
            )
            if len(rows) >= limit:
                return rows
    return rows


@app.get("/api/models", response_model=list[ModelOut], tags=["models"])
def list_models(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[ModelOut]:
    """The caller's fine-tuned models (an admin: everyone's), newest first: every succeeded
    finetune job with its SAM2 configuration, the checkpoint it started from, its training
    dataset (simulate job and manifest sha256), parameters, final metrics and checkpoint
    sha256 (download at ``checkpoint_url``)."""
    query = (
        select(Job)
        .where(Job.kind == "finetune", Job.state == "succeeded")
        .options(selectinload(Job.artifacts), selectinload(Job.metrics))
    )
    if not user.is_admin:
        query = query.where(Job.owner_id == user.id)
    rows = session.scalars(
        query.order_by(Job.finished_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    out = []
    for job in rows:
        ckpt = next((a for a in job.artifacts if a.name == "checkpoint.pt"), None)
        prov = job.provenance or {}
        manifest = next(
            (i for i in prov.get("inputs", []) if i.get("name") == "manifest.json"), None
        )
        base = prov.get("base_checkpoint") or {}
        out.append(
            ModelOut(
                job_id=job.id,
                owner_id=job.owner_id,
                created_at=job.created_at,
                finished_at=job.finished_at,
                base_config=(job.params or {}).get("model"),
                parent_checkpoint=(job.result or {}).get("base_checkpoint"),
                parent_checkpoint_sha256=base.get("sha256"),
                dataset_job_id=(job.params or {}).get("dataset_job_id"),
                dataset_manifest_sha256=manifest.get("sha256") if manifest else None,
                params=job.params or {},
                metrics=[MetricOut.model_validate(m) for m in job.metrics if m.step is None],
                checkpoint_sha256=ckpt.sha256 if ckpt else None,
                checkpoint_url=f"/api/jobs/{job.id}/artifacts/checkpoint.pt" if ckpt else None,
                code_version=job.code_version,
            )
        )
    return out


def _artifact(session: Session, job_id: str, name: str, user: User) -> Artifact:
    _job(session, job_id, user)
    art = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if art is None:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}")
    return art


@app.get("/api/jobs/{job_id}/artifacts/{name:path}", tags=["jobs"])
def download_artifact(
    job_id: str, name: str, session: SessionDep, store: StoreDep, user: UserDep
) -> FileResponse:
    """Download an artifact; its sha256 is in the ``X-Content-SHA256`` header."""
    art = _artifact(session, job_id, name, user)
    path = store.path(art.relpath)
    if not path.is_file():
        raise HTTPException(410, f"artifact {name!r} of job {job_id} is gone from the store")
    return FileResponse(
        path,
        media_type=art.content_type,
        headers={"X-Content-SHA256": art.sha256, "ETag": f'"{art.sha256}"'},
    )


@app.get(
    "/api/jobs/{job_id}/frames/{t}.png",
    tags=["viewer"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def frame_png(
    job_id: str,
    t: int,
    session: SessionDep,
    store: StoreDep,
    user: UserDep,
    overlay: Annotated[int, Query(ge=0, le=1, description="1: draw the labels")] = 1,
    gt: Annotated[
        int,
        Query(
            ge=0,
            le=2,
            description="1: add a ground-truth panel beside; 2: ground truth "
            "in place of the predictions (simulated data only)",
        ),
    ] = 0,
    alpha: Annotated[float, Query(ge=0, le=1, description="opacity of the cells' fill")] = 0.45,
    style: Annotated[Literal["both", "fill", "outline"], Query()] = "both",
    colors: Annotated[Literal["instance", "single"], Query()] = "instance",
    lo: Annotated[
        float | None,
        Query(description="intensity drawn black (default: 0.5th percentile of the recording)"),
    ] = None,
    hi: Annotated[
        float | None, Query(description="intensity drawn white (default: 99.8th percentile)")
    ] = None,
) -> Response:
    """Frame ``t`` of an infer job's recording as PNG, labels overlaid (server side).

    Headers ``X-Display-Lo``/``X-Display-Hi`` give the default display range and
    ``X-Data-Min``/``X-Data-Max`` the recording's range (intensity units), ``X-Frames`` the
    frame count. 422 when ``lo >= hi``."""
    job = _job(session, job_id, user)
    if job.kind != "infer" or job.state != "succeeded":
        raise HTTPException(
            409, f"job {job_id} is a {job.state} {job.kind} job; frames need a succeeded infer job"
        )
    source = (job.result or {}).get("source") or {}
    if not source.get("relpath"):
        raise HTTPException(409, f"job {job_id} records no source recording")
    labels = _artifact(session, job_id, "labels.tif", user)
    gt_rel = source.get("gt_relpath")
    try:
        stacks = load_stacks(
            store.path(source["relpath"]),
            store.path(labels.relpath),
            store.path(gt_rel) if gt_rel else None,
            simulated=source.get("type") == "dataset",
        )
    except FileNotFoundError as exc:
        raise HTTPException(410, f"a file of job {job_id} is gone from the store: {exc}") from exc
    n = stacks.frames.shape[0]
    if not 0 <= t < n:
        raise HTTPException(404, f"frame {t} out of range: the recording has frames 0..{n - 1}")
    try:
        png = render_png(
            stacks,
            t,
            overlay=bool(overlay),
            gt=gt,
            alpha=alpha,
            style=style,
            colors=colors,
            lo=lo,
            hi=hi,
        )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    return Response(png, media_type="image/png", headers=range_headers(stacks))


@app.get("/api/jobs/{job_id}/cells/at", tags=["viewer"])
def cell_at(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    user: UserDep,
    t: Annotated[int, Query(description="frame index (0-based)")],
    x: Annotated[int, Query(description="pixel column (px, 0 = left)")],
    y: Annotated[int, Query(description="pixel row (px, 0 = top)")],
) -> dict[str, int | None]:
    """The cell (label id) at pixel (``x``, ``y``) of frame ``t`` of the job's label stack
    (``labels.tif``): ``{"cell_id": id}``, or ``{"cell_id": null}`` on background.

    422 when ``t``, ``x`` or ``y`` lies outside the stack; 404 for an unknown job or a job
    without ``labels.tif``.
    """
    art = _artifact(session, job_id, "labels.tif", user)
    try:
        labels = load_labels(store.path(art.relpath))
    except FileNotFoundError as exc:
        raise HTTPException(410, f"labels.tif of job {job_id} is gone from the store") from exc
    try:
        cell = label_at(labels, t, x, y)
    except IndexError as exc:
        raise HTTPException(422, f"pixel out of range: {exc}") from exc
    return {"cell_id": cell or None}


def _nulls(values: Any) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _job_traces(session: Session, store: ArtifactStore, job_id: str, user: User) -> dict:
    """The decoded ``traces.csv`` of a job (:func:`api.frames.load_traces`); 404/410/500."""
    from calseg.io.tables import TableError

    art = _artifact(session, job_id, "traces.csv", user)
    try:
        return load_traces(store.path(art.relpath))
    except FileNotFoundError as exc:
        raise HTTPException(410, f"traces.csv of job {job_id} is gone from the store") from exc
    except TableError as exc:
        raise HTTPException(500, f"traces.csv of job {job_id} is unreadable: {exc}") from exc


@app.get("/api/jobs/{job_id}/cells", tags=["viewer"])
def list_cells(job_id: str, session: SessionDep, store: StoreDep, user: UserDep) -> dict[str, Any]:
    """The cells of the job's ``traces.csv`` (for choosing one without a mouse):
    ``{"ids": [cell id, ...], "peak_dff": [max dF/F or null, ...]}`` in file order."""
    traces = _job_traces(session, store, job_id, user)
    dff = np.asarray(traces["dff"], dtype=np.float64)
    peaks = [
        float(np.nanmax(row)) if np.isfinite(row).any() else None
        for row in dff.reshape(len(traces["ids"]), -1)
    ]
    return {"ids": [int(i) for i in traces["ids"]], "peak_dff": peaks}


@app.get("/api/jobs/{job_id}/cells/{cell_id}/trace", tags=["viewer"])
def cell_trace(
    job_id: str, cell_id: int, session: SessionDep, store: StoreDep, user: UserDep
) -> dict[str, Any]:
    """The trace of one cell from the job's ``traces.csv``: ``{"cell_id", "time_s": [s],
    "F": [...], "F0": [...], "dff": [...]}`` (F, F0 in recording intensity units; dF/F
    dimensionless; NaN as null). 404 for an unknown job, a job without traces.csv, or a cell
    id that is not in it."""
    traces = _job_traces(session, store, job_id, user)
    ids = traces["ids"]
    hit = np.flatnonzero(ids == cell_id)
    if not hit.size:
        raise HTTPException(
            404, f"job {job_id} has no cell {cell_id} in traces.csv ({len(ids)} cells there)"
        )
    i = int(hit[0])
    return {
        "cell_id": cell_id,
        "time_s": _nulls(traces["time_s"]),
        "F": _nulls(traces["F"][i]),
        "F0": _nulls(traces["F0"][i]),
        "dff": _nulls(traces["dff"][i]),
    }


# ------------------------------------------------------------------------------ recordings


def _info(info: Any, name: str) -> Any:
    if isinstance(info, dict):
        return info[name]
    return getattr(info, name)


def _recording(session: Session, recording_id: str, user: User) -> Recording:
    """The recording, when ``user`` may see it; otherwise 404 exactly as for a missing one."""
    rec = session.get(Recording, recording_id)
    if rec is None or not can_see(user, rec.owner_id):
        raise HTTPException(404, f"there is no recording {recording_id}")
    return rec


def _register_recording(
    session: Session,
    store: ArtifactStore,
    tmp: Path,
    filename: str,
    sha256: str,
    size: int,
    owner: User,
) -> tuple[Recording, bool]:
    """Probe and store an uploaded file for ``owner``; returns (recording, is_duplicate).

    Duplicates are recognised per owner (by sha256): the owner's earlier recording is returned.
    """
    from calseg.io.recordings import RecordingError, probe_recording

    same = (Recording.sha256 == sha256, Recording.owner_id == owner.id)
    existing = session.scalar(select(Recording).where(*same))
    if existing is not None:
        tmp.unlink(missing_ok=True)
        return existing, True
    # probe under the user's file name (suffix included), so what it says is about their file
    named = tmp.with_name(f"{tmp.stem}-{filename}")
    tmp.rename(named)
    tmp = named
    try:
        info = probe_recording(tmp)
    except RecordingError as exc:
        tmp.unlink(missing_ok=True)
        reason = str(exc).replace(str(tmp), filename).replace(tmp.name, filename)
        raise HTTPException(422, f"{filename}: not a usable recording: {reason}") from exc
    rec_id = str(uuid.uuid4())
    obj = store.put(f"recordings/{rec_id}/{filename}", tmp, move=True)
    rec = Recording(
        id=rec_id,
        owner_id=owner.id,
        filename=filename,
        relpath=obj.relpath,
        sha256=sha256,
        size_bytes=size,
        n_frames=int(_info(info, "n_frames")),
        height=int(_info(info, "height")),
        width=int(_info(info, "width")),
        dtype=str(_info(info, "dtype")),
    )
    session.add(rec)
    try:
        session.commit()
    except IntegrityError:  # the same file uploaded concurrently
        session.rollback()
        store.delete(f"recordings/{rec_id}")
        return session.scalar(select(Recording).where(*same)), True
    return rec, False


@app.post(
    "/api/recordings",
    status_code=201,
    response_model=RecordingOut,
    tags=["recordings"],
    responses={
        200: {
            "description": "you uploaded the same file (sha256) before: that recording is "
            "returned with duplicate=true and a message saying so"
        },
        400: {"description": "malformed upload (no file, several files, bad multipart)"},
        413: {"description": "larger than CALSEG_MAX_UPLOAD_BYTES"},
        415: {"description": "neither multipart/form-data nor application/octet-stream"},
        422: {"description": "not a readable recording (the reason is given)"},
    },
)
async def upload_recording(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: UserDep,
) -> RecordingOut:
    """Upload a recording (multipart field ``file``, or a raw body with ``?filename=``).

    Streamed to disk in chunks with its sha256 computed on the way; probed before acceptance.
    The file name is reduced to its last component in ASCII letters, digits and ``._-``.
    """
    tmp = store.workdir("recordings/.incoming") / f"{uuid.uuid4()}.part"
    try:
        received = await receive_file(request, tmp, settings.max_upload_bytes)
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    rec, duplicate = await run_in_threadpool(
        _register_recording,
        session,
        store,
        received.path,
        received.filename,
        received.sha256,
        received.size_bytes,
        user,
    )
    response.status_code = 200 if duplicate else 201
    out = RecordingOut.model_validate(rec).model_copy(update={"duplicate": duplicate})
    if duplicate:
        out.message = (
            f"you uploaded this file (sha256 {rec.sha256[:12]}...) before as "
            f"{rec.filename!r}: recording {rec.id} is returned, nothing new was stored"
        )
    return out


@app.get("/api/recordings", response_model=list[RecordingOut], tags=["recordings"])
def list_recordings(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[RecordingOut]:
    """The caller's uploaded recordings (an admin: everyone's), newest first."""
    query = select(Recording)
    if not user.is_admin:
        query = query.where(Recording.owner_id == user.id)
    rows = session.scalars(
        query.order_by(Recording.created_at.desc()).limit(limit).offset(offset)
    ).all()
    return [RecordingOut.model_validate(r) for r in rows]


@app.get("/api/recordings/{recording_id}", response_model=RecordingOut, tags=["recordings"])
def get_recording(recording_id: str, session: SessionDep, user: UserDep) -> RecordingOut:
    """Metadata of an uploaded recording: file name, sha256, size, frames, frame size, dtype."""
    return RecordingOut.model_validate(_recording(session, recording_id, user))


@app.delete("/api/recordings/{recording_id}", status_code=204, tags=["recordings"])
def delete_recording(
    recording_id: str, session: SessionDep, store: StoreDep, user: UserDep
) -> Response:
    """Delete an uploaded recording and its file (204).

    409 while a queued or running job uses it (cancel the job or wait for it); finished jobs
    keep their outputs (their viewer frames then answer 410: the recording is gone).
    """
    rec = _recording(session, recording_id, user)
    busy = [
        j.id
        for j in session.scalars(
            select(Job).where(Job.state.in_(("queued", "running")))  # infer, simulate (fit)
        )
        if (j.params or {}).get("recording_id") == recording_id
    ]
    if busy:
        raise HTTPException(
            409,
            f"recording {recording_id} is used by {len(busy)} queued or running job(s) "
            f"({', '.join(busy[:5])}); cancel them or wait until they end",
        )
    session.delete(rec)
    session.commit()
    store.delete(f"recordings/{recording_id}")
    return Response(status_code=204)


@app.get(
    "/api/recordings/{recording_id}/frames/{t}.png",
    tags=["recordings"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def recording_frame_png(
    recording_id: str,
    t: int,
    session: SessionDep,
    store: StoreDep,
    user: UserDep,
    lo: Annotated[float | None, Query(description="intensity drawn black")] = None,
    hi: Annotated[float | None, Query(description="intensity drawn white")] = None,
) -> Response:
    """Frame ``t`` of an uploaded recording as a gray PNG (a preview), with the same range
    headers as the job frames. 404 for an unknown recording or frame, 422 when lo >= hi."""
    from calseg.io.recordings import RecordingError

    rec = _recording(session, recording_id, user)
    try:
        stacks = load_recording_frames(store.path(rec.relpath))
    except FileNotFoundError as exc:
        raise HTTPException(410, f"recording {recording_id} is gone from the store") from exc
    except RecordingError as exc:
        raise HTTPException(422, f"recording {recording_id} is unreadable: {exc}") from exc
    n = stacks.frames.shape[0]
    if not 0 <= t < n:
        raise HTTPException(404, f"frame {t} out of range: the recording has frames 0..{n - 1}")
    try:
        png = render_png(stacks, t, overlay=False, lo=lo, hi=hi)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    return Response(png, media_type="image/png", headers=range_headers(stacks))


# ------------------------------------------------------------------------------ page


@app.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The browser page."""
    return FileResponse(FRONTEND / "index.html", media_type="text/html")


if FRONTEND.is_dir():
    app.mount("/static", StaticFiles(directory=FRONTEND), name="static")
