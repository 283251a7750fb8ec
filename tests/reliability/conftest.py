"""Fixtures of the reliability tests (issue 8); the helpers they use are in rel_helpers.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from rel_helpers import PrivateRedis, Worker


@pytest.fixture()
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis().start()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture()
def pg_url(pg_admin) -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database, dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from calseg.service.db import get_engine, upgrade_database

    name = f"calseg_rel_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_admin.url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_database(url)
        yield url
    finally:
        get_engine(url).dispose()
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture()
def workers() -> Iterator[list[Worker]]:
    """A list the test appends its :class:`Worker` objects to; all killed afterwards."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()
