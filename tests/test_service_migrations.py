"""Alembic migration 0001 from an empty database, up and down, on SQLite and PostgreSQL.

PostgreSQL: the machine's server (DESIGN.md section 7; URL from CALSEG_TEST_POSTGRES_URL,
default postgresql+psycopg://postgres@127.0.0.1:5432/test). The test works in a fresh schema
that it drops afterwards, so it never touches other tables of the ``test`` database.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from calseg.service.db import downgrade_database, upgrade_database
from calseg.service.models import Base

TABLES = {"jobs", "artifacts", "metrics", "recordings"}


def _check_round_trip(url: str, schema: str | None = None) -> None:
    engine = create_engine(url)
    try:
        upgrade_database(url)
        insp = inspect(engine)
        assert TABLES <= set(insp.get_table_names(schema=schema))
        # the migration matches the models, column for column
        for table in Base.metadata.sorted_tables:
            got = {c["name"] for c in insp.get_columns(table.name, schema=schema)}
            assert got == {c.name for c in table.columns}, table.name
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, kind, state, params, progress, attempts, created_at, "
                    "updated_at) VALUES ('j1', 'simulate', 'queued', '{}', 0, 0, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            with pytest.raises(Exception, match="(?i)check|constraint"):
                with conn.begin_nested():
                    conn.execute(
                        text(
                            "INSERT INTO jobs (id, kind, state, params, progress, attempts, "
                            "created_at, updated_at) VALUES ('j2', 'simulate', 'lost', '{}', 0, "
                            "0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                        )
                    )
        downgrade_database(url)
        assert not TABLES & set(inspect(engine).get_table_names(schema=schema))
        upgrade_database(url)  # and up again from empty
        assert TABLES <= set(inspect(engine).get_table_names(schema=schema))
        downgrade_database(url)
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgresql_upgrade_downgrade(pg_admin) -> None:
    schema = f"calseg_mig_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    base = pg_admin.url.render_as_string(hide_password=False)
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}options=-csearch_path%3D{schema}"
    try:
        _check_round_trip(url, schema=schema)
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
