"""CalSeg REST API (FastAPI): jobs, artifacts, recordings, and the browser page.

Routes are thin: validation and lifecycle live in :mod:`calseg.service`. Run with
``uvicorn api.main:app`` (or ``make serve``); the OpenAPI description is at ``/docs``.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.frames import label_at, load_labels, load_stacks, load_traces, render_png
from api.uploads import UploadError, receive_file
from calseg import __version__
from calseg.service import jobs as lifecycle
from calseg.service.db import get_session, ping
from calseg.service.models import JOB_KINDS, JOB_STATES, Artifact, Job, Recording
from calseg.service.schemas import (
    ArtifactOut,
    JobCreate,
    JobList,
    JobOut,
    MetricOut,
    ParamsError,
    RecordingOut,
    json_safe_errors,
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
)

SessionDep = Annotated[Session, Depends(get_session)]


def settings_dep() -> Settings:
    """The service settings (a dependency, so tests can override it)."""
    return get_settings()


def store_dep() -> ArtifactStore:
    """The artifact store (a dependency, so tests can override it)."""
    return get_store()


def enqueue_dep() -> lifecycle.Enqueue:
    """How jobs are put on the broker (Celery; tests override it)."""
    return lifecycle.enqueue_celery


SettingsDep = Annotated[Settings, Depends(settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(store_dep)]
EnqueueDep = Annotated[lifecycle.Enqueue, Depends(enqueue_dep)]


# ------------------------------------------------------------------------------ errors


def _error(status: int, message: str | list[dict[str, Any]], **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content=jsonable_encoder({"detail": message, **extra}))


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
    return _error(422, json_safe_errors(list(exc.errors())))


@app.exception_handler(ParamsError)
async def _bad_params(_: Request, exc: ParamsError) -> JSONResponse:
    errors = [{**e, "loc": ["body", "params", *e.get("loc", ())]} for e in exc.errors]
    return _error(422, str(exc), errors=errors)


@app.exception_handler(lifecycle.JobReferenceError)
async def _bad_reference(_: Request, exc: lifecycle.JobReferenceError) -> JSONResponse:
    return _error(422, str(exc))


@app.exception_handler(lifecycle.QueueUnavailable)
async def _no_queue(_: Request, exc: lifecycle.QueueUnavailable) -> JSONResponse:
    return _error(503, str(exc))


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


# ------------------------------------------------------------------------------ jobs


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
def create_job(body: JobCreate, session: SessionDep, enqueue: EnqueueDep) -> JobOut:
    """Submit a job: ``{"kind": "simulate"|"finetune"|"infer"|"evaluate", "params": {...}}``.

    422 names each invalid parameter; 503 when the broker cannot take the job.
    """
    job = lifecycle.submit_job(session, body.kind, body.params, enqueue=enqueue)
    return _job_out(job, detail=True)


@app.get("/api/jobs", response_model=JobList, tags=["jobs"])
def list_jobs(
    session: SessionDep,
    kind: Annotated[str | None, Query(description=f"one of {', '.join(JOB_KINDS)}")] = None,
    state: Annotated[str | None, Query(description=f"one of {', '.join(JOB_STATES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """Jobs, newest first, filtered by kind and state."""
    if kind is not None and kind not in JOB_KINDS:
        raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(JOB_KINDS)}")
    if state is not None and state not in JOB_STATES:
        raise HTTPException(422, f"unknown state {state!r}; use one of {', '.join(JOB_STATES)}")
    query = select(Job)
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
def get_job(job_id: str, session: SessionDep) -> JobOut:
    """One job: state, progress, stage, ETA, message, error, log tail, result, metrics and
    artifacts (each with its download URL)."""
    return _job_out(lifecycle.get_job(session, job_id), detail=True)


@app.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """Cancel a queued or running job (409 when it already ended)."""
    return _job_out(lifecycle.cancel_job(session, job_id), detail=True)


@app.post("/api/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"])
def retry_job(job_id: str, session: SessionDep, enqueue: EnqueueDep, store: StoreDep) -> JobOut:
    """Queue a failed or cancelled job again, same id (409 otherwise)."""
    return _job_out(lifecycle.retry_job(session, job_id, enqueue=enqueue, store=store), detail=True)


@app.post("/api/jobs/{job_id}/rerun", status_code=201, response_model=JobOut, tags=["jobs"])
def rerun_job(job_id: str, session: SessionDep, enqueue: EnqueueDep) -> JobOut:
    """Submit a new job with this job's kind and parameters (seeds included): it reproduces it."""
    return _job_out(lifecycle.rerun_job(session, job_id, enqueue=enqueue), detail=True)


def _artifact(session: Session, job_id: str, name: str) -> Artifact:
    lifecycle.get_job(session, job_id)
    art = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if art is None:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}")
    return art


@app.get("/api/jobs/{job_id}/artifacts/{name:path}", tags=["jobs"])
def download_artifact(job_id: str, name: str, session: SessionDep, store: StoreDep) -> FileResponse:
    """Download an artifact; its sha256 is in the ``X-Content-SHA256`` header."""
    art = _artifact(session, job_id, name)
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
    overlay: Annotated[int, Query(ge=0, le=1, description="1: draw predicted labels")] = 1,
    gt: Annotated[int, Query(ge=0, le=1, description="1: add a ground-truth panel")] = 0,
) -> Response:
    """Frame ``t`` of an infer job's recording as PNG, predicted labels overlaid (server side)."""
    job = lifecycle.get_job(session, job_id)
    if job.kind != "infer" or job.state != "succeeded":
        raise HTTPException(
            409, f"job {job_id} is a {job.state} {job.kind} job; frames need a succeeded infer job"
        )
    source = (job.result or {}).get("source") or {}
    if not source.get("relpath"):
        raise HTTPException(409, f"job {job_id} records no source recording")
    labels = _artifact(session, job_id, "labels.tif")
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
    png = render_png(stacks, t, overlay=bool(overlay), gt=bool(gt))
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@app.get("/api/jobs/{job_id}/cells/at", tags=["viewer"])
def cell_at(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    t: Annotated[int, Query(description="frame index (0-based)")],
    x: Annotated[int, Query(description="pixel column (px, 0 = left)")],
    y: Annotated[int, Query(description="pixel row (px, 0 = top)")],
) -> dict[str, int | None]:
    """The cell (label id) at pixel (``x``, ``y``) of frame ``t`` of the job's label stack
    (``labels.tif``): ``{"cell_id": id}``, or ``{"cell_id": null}`` on background.

    422 when ``t``, ``x`` or ``y`` lies outside the stack; 404 for an unknown job or a job
    without ``labels.tif``.
    """
    art = _artifact(session, job_id, "labels.tif")
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


@app.get("/api/jobs/{job_id}/cells/{cell_id}/trace", tags=["viewer"])
def cell_trace(job_id: str, cell_id: int, session: SessionDep, store: StoreDep) -> dict[str, Any]:
    """The trace of one cell from the job's ``traces.csv``: ``{"cell_id", "time_s": [s],
    "F": [...], "F0": [...], "dff": [...]}`` (F, F0 in recording intensity units; dF/F
    dimensionless; NaN as null). 404 for an unknown job, a job without traces.csv, or a cell
    id that is not in it."""
    from calseg.io.tables import TableError

    art = _artifact(session, job_id, "traces.csv")
    try:
        traces = load_traces(store.path(art.relpath))
    except FileNotFoundError as exc:
        raise HTTPException(410, f"traces.csv of job {job_id} is gone from the store") from exc
    except TableError as exc:
        raise HTTPException(500, f"traces.csv of job {job_id} is unreadable: {exc}") from exc
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


def _register_recording(
    session: Session, store: ArtifactStore, tmp: Path, filename: str, sha256: str, size: int
) -> tuple[Recording, bool]:
    """Probe and store an uploaded file; returns (recording, is_duplicate)."""
    from calseg.io.recordings import RecordingError, probe_recording

    existing = session.scalar(select(Recording).where(Recording.sha256 == sha256))
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
        return session.scalar(select(Recording).where(Recording.sha256 == sha256)), True
    return rec, False


@app.post(
    "/api/recordings",
    status_code=201,
    response_model=RecordingOut,
    tags=["recordings"],
    responses={
        200: {"description": "the same file was uploaded before; that recording is returned"},
        413: {"description": "larger than CALSEG_MAX_UPLOAD_BYTES"},
        422: {"description": "not a readable recording (the reason is given)"},
    },
)
async def upload_recording(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> RecordingOut:
    """Upload a recording (multipart field ``file``, or a raw body with ``?filename=``).

    Streamed to disk in chunks with its sha256 computed on the way; probed before acceptance.
    """
    tmp = store.workdir("recordings/.incoming") / f"{uuid.uuid4()}.part"
    try:
        received = await receive_file(request, tmp, settings.max_upload_bytes)
    except UploadError as exc:
        raise HTTPException(413 if exc.too_large else 400, str(exc)) from exc
    rec, duplicate = await run_in_threadpool(
        _register_recording,
        session,
        store,
        received.path,
        received.filename,
        received.sha256,
        received.size_bytes,
    )
    response.status_code = 200 if duplicate else 201
    return RecordingOut.model_validate(rec).model_copy(update={"duplicate": duplicate})


@app.get("/api/recordings", response_model=list[RecordingOut], tags=["recordings"])
def list_recordings(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[RecordingOut]:
    """Uploaded recordings, newest first."""
    rows = session.scalars(
        select(Recording).order_by(Recording.created_at.desc()).limit(limit).offset(offset)
    ).all()
    return [RecordingOut.model_validate(r) for r in rows]


@app.get("/api/recordings/{recording_id}", response_model=RecordingOut, tags=["recordings"])
def get_recording(recording_id: str, session: SessionDep) -> RecordingOut:
    """Metadata of an uploaded recording."""
    rec = session.get(Recording, recording_id)
    if rec is None:
        raise HTTPException(404, f"there is no recording {recording_id}")
    return RecordingOut.model_validate(rec)


# ------------------------------------------------------------------------------ page


@app.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The browser page."""
    return FileResponse(FRONTEND / "index.html", media_type="text/html")


if FRONTEND.is_dir():
    app.mount("/static", StaticFiles(directory=FRONTEND), name="static")
