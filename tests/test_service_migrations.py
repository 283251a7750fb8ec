"""Alembic migrations from an empty database, up and down, on SQLite and PostgreSQL; 0002
(users, tokens, owners) on a database holding 0001 data: the rows keep their values and are
given to the admin ``local``, dedup becomes per owner, and the downgrade keeps the jobs; 0004
(per-user limits) on a database holding 0003 users: they keep the server's limits (NULL),
limits must be positive, and the downgrade keeps the users; 0005 (kinds from the registry)
accepts a kind 0001's CHECK did not.

PostgreSQL: the machine's server (DESIGN.md section 7; URL from CALSEG_TEST_POSTGRES_URL,
default postgresql+psycopg://postgres@127.0.0.1:5432/test). The test works in a fresh schema
that it drops afterwards, so it never touches other tables of the ``test`` database.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from calseg.service.db import downgrade_database, upgrade_database
from calseg.service.models import Base

TABLES = {"jobs", "artifacts", "metrics", "recordings", "users", "api_tokens"}
TABLES_0001 = {"jobs", "artifacts", "metrics", "recordings"}


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
            # 0005: any kind of the registry (calseg.service.kinds), none fixed in the schema
            conn.execute(
                text(
                    "INSERT INTO jobs (id, kind, state, params, progress, attempts, created_at, "
                    "updated_at) VALUES ('j3', 'echo', 'queued', '{}', 0, 0, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(text("DELETE FROM jobs WHERE id = 'j3'"))  # the downgrade's CHECK
        downgrade_database(url)
        assert not TABLES & set(inspect(engine).get_table_names(schema=schema))
        upgrade_database(url)  # and up again from empty
        assert TABLES <= set(inspect(engine).get_table_names(schema=schema))
        downgrade_database(url)
    finally:
        engine.dispose()


def _insert(conn, sql: str, **values) -> None:  # noqa: ANN001 - a Connection
    conn.execute(text(sql), values)


REC = (
    "INSERT INTO recordings (id, {owner}filename, relpath, sha256, size_bytes, n_frames, "
    "height, width, dtype, created_at) VALUES (:id, {owner_value}'a.tif', 'r/a.tif', :sha, 10, "
    "3, 8, 8, 'uint16', CURRENT_TIMESTAMP)"
)


def _check_0002_on_existing_data(url: str, schema: str | None = None) -> None:
    engine = create_engine(url)
    try:
        upgrade_database(url, "0001")
        assert set(inspect(engine).get_table_names(schema=schema)) >= TABLES_0001
        assert "users" not in inspect(engine).get_table_names(schema=schema)
        with engine.begin() as conn:
            _insert(
                conn,
                "INSERT INTO jobs (id, kind, state, params, progress, attempts, created_at, "
                "updated_at) VALUES ('j1', 'simulate', 'succeeded', '{\"seed\": 5}', 1, 1, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            )
            _insert(
                conn,
                "INSERT INTO metrics (job_id, name, value) VALUES ('j1', 'iou', 0.5)",
            )
            _insert(conn, REC.format(owner="", owner_value=""), id="r1", sha="s" * 64)
        upgrade_database(url)
        with engine.begin() as conn:
            local = conn.execute(text("SELECT id, name, is_admin FROM users")).one()
            assert local.name == "local" and local.is_admin
            job = conn.execute(text("SELECT owner_id, params, provenance FROM jobs")).one()
            assert job.owner_id == local.id and job.provenance is None
            params = job.params if isinstance(job.params, dict) else json.loads(job.params)
            assert params == {"seed": 5}
            assert conn.execute(text("SELECT owner_id FROM recordings")).scalar() == local.id
            assert conn.execute(text("SELECT step, value FROM metrics")).one() == (None, 0.5)
            # dedup is per owner: the same file for another user is allowed ...
            _insert(
                conn,
                "INSERT INTO users (id, name, is_admin, created_at) "
                "VALUES ('u2', 'bob', false, CURRENT_TIMESTAMP)",
            )
            rec = REC.format(owner="owner_id, ", owner_value=":owner, ")
            _insert(conn, rec, id="r2", sha="s" * 64, owner="u2")
            # ... twice for the same user it is not
            with pytest.raises(Exception, match="(?i)unique|duplicate"):
                with conn.begin_nested():
                    _insert(conn, rec, id="r3", sha="s" * 64, owner="u2")
            # token hashes are unique
            tok = (
                "INSERT INTO api_tokens (id, user_id, name, token_sha256, created_at) "
                "VALUES (:id, 'u2', 't', :sha, CURRENT_TIMESTAMP)"
            )
            _insert(conn, tok, id="t1", sha="h" * 64)
            with pytest.raises(Exception, match="(?i)unique|duplicate"):
                with conn.begin_nested():
                    _insert(conn, tok, id="t2", sha="h" * 64)
            conn.execute(text("DELETE FROM recordings WHERE id = 'r2'"))
        downgrade_database(url, "0001")
        insp = inspect(engine)
        assert not {"users", "api_tokens"} & set(insp.get_table_names(schema=schema))
        assert "owner_id" not in {c["name"] for c in insp.get_columns("jobs", schema=schema)}
        with engine.begin() as conn:  # 0001 data survives the round trip
            assert conn.execute(text("SELECT id, state FROM jobs")).one() == ("j1", "succeeded")
            assert conn.execute(text("SELECT id FROM recordings")).scalar() == "r1"
            with pytest.raises(Exception, match="(?i)unique|duplicate"):
                with conn.begin_nested():  # the global UNIQUE(sha256) is back
                    _insert(conn, REC.format(owner="", owner_value=""), id="r4", sha="s" * 64)
        downgrade_database(url)
        assert not TABLES & set(inspect(engine).get_table_names(schema=schema))
    finally:
        engine.dispose()


LIMIT_COLUMNS = {
    "max_job_memory_bytes",
    "max_job_disk_bytes",
    "max_job_time_s",
    "max_queued_jobs",
    "max_running_jobs",
}


def _check_0004_on_existing_data(url: str, schema: str | None = None) -> None:
    engine = create_engine(url)
    try:
        upgrade_database(url, "0003")
        cols = {c["name"] for c in inspect(engine).get_columns("users", schema=schema)}
        assert not LIMIT_COLUMNS & cols
        with engine.begin() as conn:
            _insert(
                conn,
                "INSERT INTO users (id, name, is_admin, created_at) "
                "VALUES ('u1', 'bob', false, CURRENT_TIMESTAMP)",
            )
        upgrade_database(url, "0004")
        cols = {c["name"] for c in inspect(engine).get_columns("users", schema=schema)}
        assert LIMIT_COLUMNS <= cols
        with engine.begin() as conn:
            row = conn.execute(text("SELECT name, max_queued_jobs, max_job_time_s FROM users"))
            assert row.one() == ("bob", None, None)  # the server's limits apply
            conn.execute(
                text(
                    "UPDATE users SET max_queued_jobs = 3, max_job_memory_bytes = :m, "
                    "max_job_time_s = 3600.5 WHERE id = 'u1'"
                ),
                {"m": 64 * 1024**3},  # > 2^31: needs BIGINT
            )
            got = conn.execute(
                text("SELECT max_queued_jobs, max_job_memory_bytes, max_job_time_s FROM users")
            ).one()
            assert got == (3, 64 * 1024**3, 3600.5)
            for column in sorted(LIMIT_COLUMNS):
                with pytest.raises(Exception, match="(?i)check|constraint"):
                    with conn.begin_nested():
                        conn.execute(text(f"UPDATE users SET {column} = 0 WHERE id = 'u1'"))
        downgrade_database(url, "0003")
        cols = {c["name"] for c in inspect(engine).get_columns("users", schema=schema)}
        assert not LIMIT_COLUMNS & cols
        with engine.begin() as conn:  # the users survive the round trip
            assert conn.execute(text("SELECT id, name FROM users")).one() == ("u1", "bob")
        upgrade_database(url)
        downgrade_database(url)
        assert not TABLES & set(inspect(engine).get_table_names(schema=schema))
    finally:
        engine.dispose()


def test_sqlite_0004_on_existing_data(tmp_path: Path) -> None:
    _check_0004_on_existing_data(f"sqlite:///{tmp_path / 'm4.db'}")


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_sqlite_0002_on_existing_data(tmp_path: Path) -> None:
    _check_0002_on_existing_data(f"sqlite:///{tmp_path / 'm2.db'}")


@pytest.mark.parametrize(
    "check", [_check_round_trip, _check_0002_on_existing_data, _check_0004_on_existing_data]
)
def test_postgresql_upgrade_downgrade(pg_admin, check) -> None:  # noqa: ANN001
    schema = f"calseg_mig_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    base = pg_admin.url.render_as_string(hide_password=False)
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}options=-csearch_path%3D{schema}"
    try:
        check(url, schema=schema)
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
