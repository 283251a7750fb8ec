"""Shared dependencies of the API's routes (as in FastAPI's full-stack template): the database
session, settings, artifact store, broker, the caller (token auth with the bad-token limiter),
the one 422 shape, and the lookups several routers use (a job, a user's limits)."""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from calseg.service import broker
from calseg.service import jobs as lifecycle
from calseg.service.auth import HOW_TO_GET_A_TOKEN, BadTokenLimiter, authenticate, can_see
from calseg.service.costs import JobLimits
from calseg.service.db import get_session
from calseg.service.models import Artifact, Job, Metric, User
from calseg.service.schemas import (
    MAX_DESCRIBED_ERRORS,
    ArtifactOut,
    JobOut,
    LimitsOut,
    MetricOut,
)
from calseg.service.settings import Settings, get_settings
from calseg.service.store import ArtifactStore, get_store

log = logging.getLogger("calseg.api")

SessionDep = Annotated[Session, Depends(get_session)]

MAX_OFFSET = 2**31 - 1
"""Largest listing offset: beyond it a database integer overflows (schemathesis found 500s
with offset=2**63; now 422)."""


# Trivial dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in the
# threadpool: one thread hop per dependency per request, for work that cannot block.
async def settings_dep() -> Settings:
    """The service settings (a dependency, so tests can override it)."""
    return get_settings()


def store_dep() -> ArtifactStore:
    """The artifact store (a dependency, so tests can override it)."""
    return get_store()


async def enqueue_dep() -> broker.Enqueue:
    """How jobs are put on the broker (Celery; tests override it)."""
    return broker.enqueue_celery


SettingsDep = Annotated[Settings, Depends(settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(store_dep)]
EnqueueDep = Annotated[broker.Enqueue, Depends(enqueue_dep)]

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


def client_address(request: Request, settings: Settings) -> str:
    """The address the bad-token limiter counts a request against.

    Without ``settings.trusted_proxies`` (the default) a request carrying ``X-Forwarded-For``
    or ``Forwarded`` came from a client that may write anything there, so all such requests
    share one bucket (``"untrusted-forwarded"``): rotating the header gains nothing, even when
    uvicorn was started with its default ``--forwarded-allow-ips 127.0.0.1`` and rewrote the
    client address from it (:func:`api.serve.uvicorn_options` starts it with proxy headers
    off unless proxies are configured). With trusted proxies, uvicorn resolved the address
    from the header of those proxies only, and that address counts.
    """
    if not settings.trusted_proxies and (
        "x-forwarded-for" in request.headers or "forwarded" in request.headers
    ):
        return "untrusted-forwarded"
    return request.client.host if request.client else "unknown"


def current_user(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> User:
    """The user of the request's ``Authorization: Bearer <token>`` (a dependency).

    The token is checked first: a valid token is never refused for its address's earlier
    failures. Only bad tokens count, and once ``settings.auth_max_failures`` of them came from
    one address (:func:`client_address`) within ``settings.auth_window_s``, further bad tokens
    from it get 429 instead of 401.

    Raises:
        HTTPException: 401 (with ``WWW-Authenticate: Bearer``) for a missing, malformed,
            unknown or revoked token; 429 (with ``Retry-After``) for a bad token from an
            address over the limit.
    """
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing API token")
    scheme, _, token = header.partition(" ")
    well_formed = scheme.lower() == "bearer" and bool(token.strip())
    user = authenticate(session, token.strip()) if well_formed else None
    if user is not None:
        return user
    address = client_address(request, settings)
    limiter = bad_token_limiter(settings)
    wait = limiter.retry_after(address)  # over the limit before this failure?
    limiter.failure(address)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise HTTPException(
            429,
            f"too many invalid API tokens from {address}; try again in {seconds} s (a valid "
            "token is always accepted)",
            headers={"Retry-After": str(seconds)},
        )
    if not well_formed:
        raise _unauthorized("malformed Authorization header")
    raise _unauthorized("invalid or revoked API token")


UserDep = Annotated[User, Depends(current_user)]


MAX_DETAIL_CHARS = 2000
"""Longest ``detail`` (and error item ``msg``) an error answer carries; longer ones are cut,
saying their full length. Messages quote the request (unknown names, bad values): an 889 KB
request of 60,000 unknown ``model_overrides`` keys got a 3.7 MB 422 (a new user's attack run,
2026-12-07)."""


def _short_text(message: str) -> str:
    """``message`` cut to :data:`MAX_DETAIL_CHARS` characters, saying how long it was."""
    if len(message) <= MAX_DETAIL_CHARS:
        return message
    return f"{message[:MAX_DETAIL_CHARS]}... (cut: {len(message):,} characters in all)"


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped (``\\uXXXX``), the app's default response.
    Starlette's encodes UTF-8, which a lone surrogate (JSON ``"\\ud800"`` in a request, echoed
    by an error message) cannot be: the error handler itself raised, and the answer was a 500
    (a 9th attack run)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("ascii")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    content = {"detail": _short_text(str(message)), **extra}
    return AsciiJSONResponse(status_code=status, content=jsonable_encoder(content))


MAX_ERRORS = MAX_DESCRIBED_ERRORS
"""Most error items (and parts of ``detail``) one 422 lists: a 974 KiB body of 60,000 unknown
parameters got a 9.1 MB answer in about 2 s of the API's time (a new-user check)."""

MAX_INPUT_CHARS = 200
"""Longest ``input`` echoed back in an error item (longer ones are cut, with their length)."""


def _short_input(value: Any) -> Any:
    """``value`` as echoed in an error item: strings and containers over
    :data:`MAX_INPUT_CHARS` characters of JSON cut to a prefix that says its full length."""
    text = value if isinstance(value, str) else None
    if text is None and isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
    if text is None or len(text) <= MAX_INPUT_CHARS:
        return value
    return f"{text[:MAX_INPUT_CHARS]}... ({len(text):,} characters)"


def _unprocessable(message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    """Every 422 of the API has one shape: ``{"detail": str, "errors": [...]}`` - ``detail``
    one human sentence, ``errors`` pydantic-style ``{"type", "loc", "msg", "input"?}`` items
    (``loc`` such as ``["body", "params", field]``; empty when no single field is at fault).
    At most :data:`MAX_ERRORS` items, the last saying how many more there were; long inputs
    cut (:func:`_short_input`)."""
    errors = list(errors or [])
    kept = [
        {**e, "input": _short_input(e["input"])} if "input" in e else e for e in errors[:MAX_ERRORS]
    ]
    kept = [{**e, "msg": _short_text(str(e["msg"]))} if "msg" in e else e for e in kept]
    if len(errors) > MAX_ERRORS:
        more = f"and {len(errors) - MAX_ERRORS:,} more errors, not listed"
        kept.append({"type": "too_many_errors", "loc": [], "msg": more})
    return _error(422, message, errors=kept)


def _describe_errors(errors: list[dict[str, Any]]) -> str:
    """``"kind: Input should be ...; params: ..."`` (the leading ``body`` of each location
    dropped) for the ``detail`` of a request-validation 422; the first :data:`MAX_ERRORS`."""
    parts = []
    for e in errors[:MAX_ERRORS]:
        loc = [str(x) for x in e.get("loc", ())]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS:,} more")
    return "invalid request: " + "; ".join(parts)


def _limits_out(
    session: Session, user: User, settings: Settings, limits: JobLimits | None = None
) -> LimitsOut:
    """``user``'s limits in force (``limits`` when the caller has them already) with their
    count of queued or running jobs and the storage they use."""
    from calseg.service.costs import effective_limits, storage_used_bytes

    limits = limits or effective_limits(user, settings, session)
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == user.id, Job.state.in_(("queued", "running")))
    )
    return LimitsOut(
        user=user.name,
        queued_or_running=active or 0,
        storage_used_bytes=storage_used_bytes(session, user.id),
        **limits.to_dict(),
    )


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


def _recording_http_error(
    exc: Exception, what: str, unusable: str = "is unreadable"
) -> HTTPException:
    """413 for a recording over the decode budget (``"{what}: {reason}"``), 422 for any other
    reading failure (``"{what} {unusable}: {reason}"``)."""
    from calseg.io.recordings import RecordingTooLarge

    if isinstance(exc, RecordingTooLarge):
        return HTTPException(413, f"{what}: {exc}")
    return HTTPException(422, f"{what} {unusable}: {exc}")
