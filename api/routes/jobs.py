"""Jobs: kinds (the registry's schemas for the forms), submit, estimate, list, detail, metrics,
cancel, retry, rerun, delete; metrics across jobs."""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.attributes import set_committed_value

from api.deps import (
    MAX_OFFSET,
    EnqueueDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    UserDep,
    _job,
    _job_out,
    _job_with_results,
    _limits_out,
)
from calseg.service import jobs as lifecycle
from calseg.service import kinds
from calseg.service.models import JOB_STATES, Job, Metric
from calseg.service.schemas import (
    EstimateOut,
    JobCreate,
    JobList,
    JobMetricOut,
    JobOut,
    MetricOut,
    params_json_schema,
)

router = APIRouter()


@router.get("/api/job-kinds", tags=["jobs"])
def job_kinds(user: UserDep, settings: SettingsDep) -> dict[str, Any]:
    """``{kind: JSON schema of the kind's parameters}`` (defaults included), for forms: every
    kind of the registry (:mod:`calseg.service.kinds`), in its order.

    The infer schema's ``method`` property also carries ``x-auto``: what ``"auto"`` means on
    this server now (:meth:`calseg.segment.choice.MethodChoice.to_dict`: method, label,
    reason)."""
    for kind in kinds.names():  # each built once per process (about 1 s: the configurations)
        if kind not in _job_kind_schemas:
            _job_kind_schemas[kind] = params_json_schema(kind)
    from calseg.segment.choice import best_method

    out = {kind: _job_kind_schemas[kind] for kind in kinds.names()}
    infer = copy.deepcopy(out["infer"])  # a copy: the choice may change
    infer["properties"]["method"]["x-auto"] = best_method(settings.sam2_checkpoint).to_dict()
    out["infer"] = infer
    return out


_job_kind_schemas: dict[str, Any] = {}


@router.post("/api/jobs", status_code=201, response_model=JobOut, tags=["jobs"])
def create_job(body: JobCreate, session: SessionDep, enqueue: EnqueueDep, user: UserDep) -> JobOut:
    """Submit a job: ``{"kind": "simulate"|"finetune"|"infer"|"evaluate", "params": {...}}``.

    422 names each invalid parameter (and a referenced job or recording that is missing or
    not the caller's); 503 when the broker cannot take the job. The caller owns the job.
    """
    job = lifecycle.submit_job(session, body.kind, body.params, enqueue=enqueue, owner=user)
    for empty in ("metrics", "artifacts"):  # a new job has none: no lazy-load queries
        set_committed_value(job, empty, [])
    return _job_out(job, detail=True)


@router.post("/api/jobs/estimate", response_model=EstimateOut, tags=["jobs"])
def estimate_job(
    body: JobCreate, session: SessionDep, settings: SettingsDep, user: UserDep
) -> EstimateOut:
    """What a job would cost (memory, disk, time; ``calseg.service.costs``) and whether it fits
    the caller's limits, without submitting it. Parameters and references are checked as by
    ``POST /api/jobs`` (422)."""
    from calseg.service.costs import (
        check_device,
        effective_limits,
        estimate,
        over_limits,
        reserved_disk_bytes,
        storage_left_bytes,
    )
    from calseg.service.schemas import validate_params

    validated = validate_params(body.kind, body.params)
    check_device(body.kind, validated, settings)
    lifecycle.check_references(session, body.kind, validated, user, settings)
    est = estimate(session, body.kind, validated, settings)
    own = effective_limits(user, settings, session)
    limits = _limits_out(session, user, settings, own)
    left = storage_left_bytes(session, user, own)
    over = [
        what for what, _, _ in over_limits(est, own, settings, reserved_disk_bytes(session), left)
    ]
    return EstimateOut(
        kind=body.kind, estimate=est.to_dict(), limits=limits, fits=not over, over=over
    )


@router.get("/api/jobs", response_model=JobList, tags=["jobs"])
def list_jobs(
    session: SessionDep,
    user: UserDep,
    kind: Annotated[str | None, Query(description="a job kind (GET /api/job-kinds)")] = None,
    state: Annotated[str | None, Query(description=f"one of {', '.join(JOB_STATES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """The caller's jobs (an admin: everyone's), newest first, filtered by kind and state."""
    if kind is not None and kind not in kinds.KINDS:
        raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(kinds.names())}")
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


@router.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def get_job(job_id: str, session: SessionDep, user: UserDep) -> JobOut:
    """One job: state, progress, stage, ETA, message, error, log tail, result, provenance,
    metrics and artifacts (each with its download URL)."""
    return _job_out(_job_with_results(session, job_id, user), detail=True)


@router.get("/api/jobs/{job_id}/metrics", response_model=list[MetricOut], tags=["jobs"])
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


@router.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
def cancel_job(job_id: str, session: SessionDep, user: UserDep) -> JobOut:
    """Cancel a queued or running job (409 when it already ended)."""
    _job(session, job_id, user)
    return _job_out(lifecycle.cancel_job(session, job_id), detail=True)


@router.delete("/api/jobs/{job_id}", status_code=204, tags=["jobs"])
def delete_job(
    job_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep, user: UserDep
) -> Response:
    """Delete a job that has ended, with its metrics and artifact files (204). 409 while it is
    queued or running, while its process is still stopping after a cancel, or while a queued or
    running job uses it; jobs made from it keep their own outputs
    (:func:`calseg.service.jobs.delete_job`)."""
    _job(session, job_id, user)
    lifecycle.delete_job(session, job_id, store, settings)
    return Response(status_code=204)


@router.post("/api/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"])
def retry_job(
    job_id: str, session: SessionDep, enqueue: EnqueueDep, store: StoreDep, user: UserDep
) -> JobOut:
    """Queue a failed or cancelled job again, same id (409 otherwise)."""
    _job(session, job_id, user)
    return _job_out(lifecycle.retry_job(session, job_id, enqueue=enqueue, store=store), detail=True)


@router.post("/api/jobs/{job_id}/rerun", status_code=201, response_model=JobOut, tags=["jobs"])
def rerun_job(job_id: str, session: SessionDep, enqueue: EnqueueDep, user: UserDep) -> JobOut:
    """Submit a new job with this job's kind and parameters (seeds included): it reproduces it.
    The caller owns the new job."""
    _job(session, job_id, user)
    return _job_out(lifecycle.rerun_job(session, job_id, enqueue=enqueue, owner=user), detail=True)


@router.get("/api/metrics", response_model=list[JobMetricOut], tags=["jobs"])
def query_metrics(
    session: SessionDep,
    user: UserDep,
    dataset_job_id: Annotated[
        str | None, Query(description="a simulate job: its metrics and those of jobs using it")
    ] = None,
    model_job_id: Annotated[
        str | None, Query(description="a finetune job: its metrics and those of jobs using it")
    ] = None,
    kind: Annotated[str | None, Query(description="a job kind (GET /api/job-kinds)")] = None,
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
    if kind is not None and kind not in kinds.KINDS:
        raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(kinds.names())}")
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
