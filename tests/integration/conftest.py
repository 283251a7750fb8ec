"""Fixtures of the integration tests: the embedded service (uvicorn + one Celery worker as
subprocesses) against the machine's real PostgreSQL and Redis (DESIGN.md section 7).

* PostgreSQL: a dedicated database ``calseg_it_<random>`` created on the server of
  ``CALSEG_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
  and dropped afterwards.
* Redis: ``CALSEG_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379``) on a database number
  that is empty when the session starts; flushed afterwards.

Both are skipped (with the reason) when the server does not answer.

Users: the embedded service creates the admin ``local`` on the fresh database
(``service.token``); the fixture adds ``alice`` and ``bob`` (``service.tokens[name]``).
``client`` sends alice's token, ``bob_client`` bob's, ``admin_client`` local's.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

REDIS_URL = os.environ.get("CALSEG_TEST_REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture(scope="session")
def pg_database(pg_admin) -> Iterator[str]:
    """URL of a fresh PostgreSQL database, dropped at the end of the session."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from calseg.service.db import get_engine

    name = f"calseg_it_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_admin.url).set(database=name).render_as_string(hide_password=False)
    finally:
        get_engine.cache_clear()  # the test's engines hold connections to the database
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_db_url() -> Iterator[str]:
    """URL of an empty database number on the machine's Redis, flushed at the end."""
    import redis

    base = REDIS_URL.rstrip("/")
    try:
        redis.Redis.from_url(f"{base}/0", socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base}/{db}")
        if client.dbsize() == 0:
            client.set("calseg:integration:claimed", str(os.getpid()), ex=3600)
            break
    else:
        pytest.skip(f"no empty database number on {REDIS_URL}")
    try:
        yield f"{base}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def service(pg_database: str, redis_db_url: str, tmp_path_factory: pytest.TempPathFactory):
    """The embedded service (api + worker subprocesses) on PostgreSQL + Redis."""
    from calseg.service.embedded import EmbeddedService
    from calseg.service.settings import Settings, get_settings

    root = tmp_path_factory.mktemp("calseg-it")
    base = get_settings()
    settings = Settings(
        database_url=pg_database,
        redis_url=redis_db_url,
        artifact_dir=root / "artifacts",
        cache_dir=root / "cache",
        log_dir=root / "logs",
        token_file=root / "token",
        api_port=0,
        real_data_dir=base.real_data_dir,
        sam2_checkpoint=base.sam2_checkpoint,
        progress_interval_s=0.5,
    )
    t0 = time.monotonic()
    with EmbeddedService(settings, api_port=0) as svc:
        svc.startup_s = time.monotonic() - t0
        svc.settings = settings
        assert svc.token, svc.token_message  # a fresh database: admin "local" was created
        svc.tokens = {"local": svc.token}
        from calseg.service.auth import create_token, create_user
        from calseg.service.db import session_scope

        with session_scope(pg_database) as session:
            for name in ("alice", "bob"):
                _, svc.tokens[name] = create_token(session, create_user(session, name), "tests")
        yield svc


def _client(service, user: str) -> httpx.Client:
    return httpx.Client(
        base_url=service.url,
        timeout=60,
        headers={"Authorization": f"Bearer {service.tokens[user]}"},
    )


@pytest.fixture(scope="session")
def client(service) -> Iterator[httpx.Client]:
    """Alice's client (a user without admin rights)."""
    with _client(service, "alice") as c:
        yield c


@pytest.fixture(scope="session")
def bob_client(service) -> Iterator[httpx.Client]:
    """Bob's client: another user, who must not see alice's data."""
    with _client(service, "bob") as c:
        yield c


@pytest.fixture(scope="session")
def admin_client(service) -> Iterator[httpx.Client]:
    """The admin ``local``'s client: sees everyone's data."""
    with _client(service, "local") as c:
        yield c
