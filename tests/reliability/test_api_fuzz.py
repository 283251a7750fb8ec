"""Schemathesis against the api's OpenAPI schema (issue 8 "API"): generated requests to every
operation (valid and invalid parameters, bodies, path ids) never get a 5xx.

The default run tries a bounded number of examples per operation (``FAST_EXAMPLES``, part of
``make test``); ``make reliability`` tries ``MANY_EXAMPLES``. The app runs in-process (ASGI)
on a fresh SQLite database with an authenticated user; jobs are recorded instead of sent to a
broker; the machine's Redis answers /api/ready's ping (without it, 503 would be right).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

REDIS_URL = os.environ.get("CALSEG_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/") + "/0"
FAST_EXAMPLES = 8
MANY_EXAMPLES = 150


@pytest.fixture()
def fuzz_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings for the in-process app and the Authorization header of a user."""
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.settings import get_settings

    url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_MAX_UPLOAD_BYTES", str(2_000_000))
    monkeypatch.setenv("CALSEG_RECONCILE_INTERVAL_S", "0")
    # the machine's Redis, only for /api/ready's ping (jobs are recorded, never sent)
    monkeypatch.setenv("CALSEG_REDIS_URL", REDIS_URL)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import _limiters, app, enqueue_dep

    for limiter in _limiters.values():
        limiter.reset()
    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "fuzzer"), "fuzz")
    app.dependency_overrides[enqueue_dep] = lambda: lambda job, countdown=None: None
    yield {"Authorization": f"Bearer {token}"}
    app.dependency_overrides.clear()
    get_settings.cache_clear()


def _operations() -> list:
    from api.main import app

    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


OPERATIONS = _operations()


def _fuzz(operation, headers: dict[str, str], max_examples: int) -> None:
    """Send ``max_examples`` generated requests to ``operation``; fail on any 5xx."""

    @given(case=operation.as_strategy())
    @settings(max_examples=max_examples, **_COMMON)
    def run(case) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    run()


_COMMON = dict(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_no_server_error(operation, fuzz_env) -> None:
    _fuzz(operation, fuzz_env, FAST_EXAMPLES)


@pytest.mark.reliability
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_no_server_error_many_examples(operation, fuzz_env) -> None:
    _fuzz(operation, fuzz_env, MANY_EXAMPLES)
