"""Fine-tuned models (succeeded finetune jobs) with their provenance."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.deps import MAX_OFFSET, SessionDep, UserDep
from calseg.segment.choice import label_of_finetune
from calseg.service.models import Job
from calseg.service.schemas import (
    MetricOut,
    ModelOut,
)

router = APIRouter()


@router.get("/api/models", response_model=list[ModelOut], tags=["models"])
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
                label=label_of_finetune(job.params or {}, job.result),
                best_step=(job.result or {}).get("best_step"),
                # the configuration that was trained (the bundled small SAM2 replaces the
                # requested default when no checkpoint is configured), else the request's
                base_config=((job.result or {}).get("model_info") or {}).get("config")
                or (job.params or {}).get("model"),
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
