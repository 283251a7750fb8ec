"""CalSeg REST API (FastAPI): jobs, artifacts, recordings, models, and the browser page.

The app, its middleware and the page; routes by resource in :mod:`api.routes` (health, users,
jobs, models, artifacts, recordings), shared dependencies in :mod:`api.deps`, exception
handlers in :mod:`api.errors`. Routes are thin: validation and lifecycle live in
:mod:`calseg.service`. Run with
``python -m api.serve`` (uvicorn with the proxy settings, :mod:`api.serve`) or ``make serve``;
the OpenAPI description is at ``/docs``.

Every route except health, readiness, the page, its static files and the OpenAPI description
needs ``Authorization: Bearer <token>`` (:mod:`calseg.service.auth`); each takes the
:data:`UserDep` dependency and answers 404 for another user's ids (admins see everything).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api.deps import AsciiJSONResponse, _limiters, client_address, current_user, enqueue_dep
from api.errors import install as install_error_handlers
from api.routes import artifacts, health, jobs, models, recordings, users
from calseg import __version__
from calseg.service.reconcile import reconciler_lifespan
from calseg.service.settings import REPO_ROOT, get_settings

log = logging.getLogger("calseg.api")

__all__ = ["_limiters", "app", "client_address", "current_user", "enqueue_dep"]
"""What other modules and tests take from here (the rest lives in :mod:`api.deps`, the routes
in :mod:`api.routes`)."""
FRONTEND = REPO_ROOT / "frontend"

app = FastAPI(
    title="CalSeg",
    version=__version__,
    description="Segment calcium-active cells in GECI recordings of epithelial tissue: "
    "simulate, fine-tune SAM2, infer, evaluate.",
    # the reconciler re-queues jobs of lost workers and messages Redis lost (issue 5)
    lifespan=reconciler_lifespan,
    default_response_class=AsciiJSONResponse,
)


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


class NoNulInUrl:
    """ASGI middleware: a path or query string holding a NUL character (``%00``) is refused
    with 400 before any route reads it. No id, name or option of CalSeg holds one, and
    PostgreSQL text cannot: the routes' lookups answered 500 (a 9th attack run)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            for part in (unquote_to_bytes(raw), unquote_to_bytes(scope.get("query_string", b""))):
                if b"\x00" in part:
                    await AsciiJSONResponse(
                        status_code=400,
                        content={
                            "detail": "the request's path or query holds a NUL character "
                            "(%00); ids, names and options never do"
                        },
                    )(scope, receive, send)
                    return
        await self.app(scope, receive, send)


SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
"""Sent with every answer. The page signs in from the token in the browser's storage, so
another site that framed it could make a user click its buttons (cancel, retry, submit;
clickjacking, a new user's check): it may not be framed, types are not sniffed, and no URL
(job and recording ids) leaves in a Referer."""


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP answer that has none of
    its own of the same name."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in SECURITY_HEADERS if n not in have]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


app.add_middleware(JsonBodyLimit)
app.add_middleware(NoNulInUrl)
app.add_middleware(SecurityHeaders)


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

install_error_handlers(app)
for _router in (health.router, users.router, jobs.router, models.router, artifacts.router):
    app.include_router(_router)
app.include_router(recordings.router)


# ------------------------------------------------------------------------------ page


@app.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The browser page."""
    return FileResponse(FRONTEND / "index.html", media_type="text/html")


if FRONTEND.is_dir():
    app.mount("/static", StaticFiles(directory=FRONTEND), name="static")
