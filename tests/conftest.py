"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PG_URL = os.environ.get(
    "CALSEG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
"""The machine's PostgreSQL (DESIGN.md section 7); tests make their own database or schema."""

REAL_DATA_SKIP = "real data missing"
"""Prefix of the skip reason of every test whose real recording is absent (counted by
:func:`pytest_terminal_summary`)."""


def real_data_dir() -> Path:
    """The folder of the real recordings: the service setting ``real_data_dir``
    (``$CALSEG_REAL_DATA_DIR``, default ``<repo>/../shared/data/real``), read afresh each call
    so a test's environment is honoured."""
    from calseg.service.settings import Settings

    return Path(Settings().real_data_dir)


def _real_file(name: str) -> Path:
    folder = real_data_dir()
    path = folder / name
    if not path.exists():
        pytest.skip(
            f"{REAL_DATA_SKIP}: {name} not found in {folder} "
            "(set CALSEG_REAL_DATA_DIR=/path/to/shared/data/real)"
        )
    return path


@pytest.fixture
def real_file() -> Callable[[str], Path]:
    """``real_file(name) -> Path`` of one real recording/ROI file in :func:`real_data_dir`;
    skips the test (reason naming the folder and ``CALSEG_REAL_DATA_DIR``) when it is absent."""
    return _real_file


@pytest.fixture
def real_dir() -> Path:
    """The real-recordings folder (:func:`real_data_dir`); skips the test (same reason format
    as ``real_file``) when the folder is absent or empty."""
    folder = real_data_dir()
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.skip(
            f"{REAL_DATA_SKIP}: no files in {folder} "
            "(set CALSEG_REAL_DATA_DIR=/path/to/shared/data/real)"
        )
    return folder


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001, ARG001
    """One line when tests were skipped for missing real recordings: how many, where looked."""
    n = 0
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        n += REAL_DATA_SKIP in text
    if n:
        terminalreporter.write_line(
            f"{n} test(s) skipped: real recordings not found in {real_data_dir()}; "
            "set CALSEG_REAL_DATA_DIR=/path/to/shared/data/real",
            yellow=True,
            bold=True,
        )


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
