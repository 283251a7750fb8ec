"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get(
    "CALSEG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
"""The machine's PostgreSQL (DESIGN.md section 7); tests make their own database or schema."""


@pytest.fixture(scope="session")
def pg_admin() -> Iterator:
    """An AUTOCOMMIT SQLAlchemy engine on :data:`PG_URL`; skips (with the reason) when the
    server does not answer."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "not here"
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    yield admin
    admin.dispose()
