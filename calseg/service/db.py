"""Database engine and sessions (SQLAlchemy 2), shared by the api and the worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from calseg.service.settings import get_settings


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API connection
    cursor = dbapi_connection.cursor()
    # WAL lets the worker write progress while the api reads; busy_timeout waits for locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: ``settings.database_url``), created once per URL.

    SQLite files get their folder created, WAL mode and a 30 s busy timeout; PostgreSQL
    connections are checked before use (``pool_pre_ping``) so a restarted server recovers.
    """
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


@lru_cache(maxsize=8)
def _sessionmaker(url: str | None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


def new_session(url: str | None = None) -> Session:
    """A new session on ``url`` (default: the configured database)."""
    return _sessionmaker(url or get_settings().database_url)()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success, rolls back on error and always closes."""
    session = new_session(url)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request, closed afterwards."""
    session = new_session()
    try:
        yield session
    finally:
        session.close()


def ping(url: str | None = None) -> None:
    """Run ``SELECT 1``; raises the driver's error when the database is unreachable."""
    with get_engine(url or get_settings().database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def alembic_config(url: str | None = None):  # noqa: ANN201 - alembic.config.Config
    """An Alembic ``Config`` for this repository's migrations, bound to ``url``."""
    from alembic.config import Config

    from calseg.service.settings import REPO_ROOT

    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.attributes["database_url"] = url or get_settings().database_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade_database(url: str | None = None, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` on ``url`` (default: the configured database)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str | None = None, revision: str = "base") -> None:
    """Run ``alembic downgrade <revision>`` on ``url`` (default: the configured database)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
