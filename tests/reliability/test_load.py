"""Load (issue 8 "Load"): 50 concurrent clients submit jobs and poll their status for a
bounded time against the embedded service (uvicorn + PostgreSQL + its own Redis): no errors,
every submitted job stored once and still queued (no worker runs here), latency recorded.
The latency targets are measured by ``python -m calseg.bench service`` (BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability


def test_50_clients_submit_and_poll_without_errors(tmp_path: Path, pg_admin) -> None:
    from sqlalchemy import func, select

    from calseg.bench_service import embedded, run_latency
    from calseg.service.db import session_scope
    from calseg.service.models import Job

    # no worker runs here, so every submitted job stays queued: lift the per-user quota
    # (default 100 queued jobs, answered 429; tested in tests/test_limits*.py) to load the api
    with embedded(tmp_path / "svc", max_queued_jobs=1_000_000) as svc:
        assert svc.database == "postgresql"
        result = run_latency(
            svc.url, svc.headers, clients=50, seconds=20, poll_s=0.2, polls_per_job=3
        )
        with session_scope(svc.settings.database_url) as s:
            stored = s.scalars(select(Job.id).where(Job.id.in_(result["job_ids"]))).all()
            states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    print({k: v for k, v in result.items() if k != "job_ids"})
    assert result["errors"] == 0, result["error_examples"]
    # three polls per job; the deadline may cut each client's last job short (up to 3 polls)
    assert result["submit_n"] >= 50 and result["status_n"] >= 3 * len(result["job_ids"]) - 3 * 50
    assert len(set(result["job_ids"])) == len(result["job_ids"]) == len(stored)
    assert states == {"queued": len(stored) + 3}  # + the warm-up's three
