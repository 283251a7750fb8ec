"""The API's exception handlers: CalSeg's own errors as JSON answers (404, 409, 422 in one
shape, 429, 503); :func:`install` registers them on the app."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import (
    AsciiJSONResponse,
    _describe_errors,
    _error,
    _short_text,
    _unprocessable,
    log,
)
from calseg.service import broker
from calseg.service import jobs as lifecycle
from calseg.service.context import JobReferenceError
from calseg.service.costs import JobTooCostly, QuotaExceeded
from calseg.service.frame_guard import FramesBusy
from calseg.service.schemas import (
    ParamsError,
    json_safe_errors,
)

QUOTA_RETRY_AFTER_S = 30
"""Seconds a client over its job quota is told to wait before it submits again."""


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""

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

    @app.exception_handler(JobTooCostly)
    async def _too_costly(_: Request, exc: JobTooCostly) -> JSONResponse:
        return _unprocessable(str(exc), exc.errors())

    @app.exception_handler(QuotaExceeded)
    async def _over_quota(_: Request, exc: QuotaExceeded) -> JSONResponse:
        """429 with ``Retry-After`` (RFC 9110 10.2.3): when a slot frees is unknown, so a
        client looks again after :data:`QUOTA_RETRY_AFTER_S` (its jobs' progress rate)."""
        response = _error(429, str(exc))
        response.headers["Retry-After"] = str(QUOTA_RETRY_AFTER_S)
        return response

    @app.exception_handler(JobReferenceError)
    async def _bad_reference(_: Request, exc: JobReferenceError) -> JSONResponse:
        return _unprocessable(str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """A route's ``HTTPException(422, "...")`` in the one 422 shape; other codes as FastAPI
        answers them (``{"detail": str}``, headers such as WWW-Authenticate kept). Every
        ``detail`` is cut as a 422's is (:func:`api.deps._short_text`): messages quote the
        request, and a 404 for a 60,000-character artifact name or recording id repeated it
        whole (60 KB answers; a security test of a clean clone)."""
        if exc.status_code == 422:
            return _unprocessable(str(exc.detail))
        if isinstance(exc.detail, str):
            exc.detail = _short_text(exc.detail)
        if exc.status_code in (204, 304) or exc.detail is None:  # no body (FastAPI's rule)
            return await http_exception_handler(request, exc)
        response = AsciiJSONResponse(
            {"detail": jsonable_encoder(exc.detail)}, status_code=exc.status_code
        )
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(DataError)
    async def _bad_value(_: Request, exc: DataError) -> JSONResponse:
        """A value the database refuses (PostgreSQL: a NUL character in a text column): 422,
        never 500 (a 9th attack run: ids with ``%00`` in a path or ``\\u0000`` in JSON)."""
        log.info("database refused a value: %s", str(exc.orig).strip()[:300])
        return _unprocessable(
            "a value in the request cannot be stored or looked up (the database refused it: "
            f"{_short_text(str(exc.orig).strip().splitlines()[0] if str(exc.orig) else 'invalid')})"
        )

    @app.exception_handler(UnicodeEncodeError)
    async def _bad_text(_: Request, exc: UnicodeEncodeError) -> JSONResponse:
        """Text that is not valid Unicode (a lone surrogate such as JSON ``"\\ud800"``)
        reaching the database driver: 422, never 500."""
        return _unprocessable(
            "the request holds text that is not valid Unicode (a lone surrogate, such as "
            "JSON \\ud800); send UTF-8 text"
        )

    @app.exception_handler(FramesBusy)
    async def _frames_busy(_: Request, exc: FramesBusy) -> JSONResponse:
        """429 (this user's frame requests in flight) or 503 (every frame slot of the API
        stayed taken; :mod:`calseg.service.frame_guard`) with ``Retry-After``."""
        response = _error(exc.status, str(exc))
        # the user's own frames finish in about a second; a busy server takes longer
        response.headers["Retry-After"] = "1" if exc.status == 429 else "5"
        return response

    @app.exception_handler(broker.QueueUnavailable)
    async def _no_queue(_: Request, exc: broker.QueueUnavailable) -> JSONResponse:
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
