"""Log format of the service processes: plain text, or one JSON object per line
(``CALSEG_LOG_FORMAT=json``) for log collectors (Loki, Elasticsearch, journald)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from calseg.service.settings import Settings, get_settings

_STD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``message``,
    ``process``, the exception text as ``exc`` and any ``extra={...}`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STD and key not in out and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def configure_logging(settings: Settings | None = None, level: int = logging.INFO) -> None:
    """Give the root logger (and uvicorn's and Celery's, which do not propagate) one stderr
    handler in ``settings.log_format``; idempotent."""
    settings = settings or get_settings()
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_calseg", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._calseg = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(formatter)
    root.setLevel(min(root.level or level, level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        for h in logging.getLogger(name).handlers:
            h.setFormatter(formatter)
