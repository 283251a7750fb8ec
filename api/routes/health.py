"""Liveness and readiness (public: no token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep
from calseg import __version__
from calseg.service.db import ping

router = APIRouter()


@router.get("/api/health", tags=["health"])
def health() -> dict[str, str]:
    """Liveness: the api process answers."""
    return {"status": "ok", "version": __version__}


@router.get("/api/ready", tags=["health"])
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
