"""Fair turns between users (issue 13 item 6) on the real embedded service: api + one Celery
worker (solo pool) on PostgreSQL and Redis. Bob queues 15 jobs, then carol one: carol's job must
start as soon as the job of bob's that was running when she submitted ends (within one of bob's
job lengths), not after all 15 (first in, first out, as before). The per-user quota answers 429.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import httpx
import pytest

pytestmark = pytest.mark.integration

JOB = {"n_videos": 3, "n_frames": 24, "height": 160, "width": 160, "seed": 11}
"""A simulate job of about 2-4 s on the worker."""


def _t(value: str | None) -> float:
    assert value is not None
    return datetime.fromisoformat(value).timestamp()


def _wait(client: httpx.Client, job_id: str, cond, timeout_s: float = 180) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        if cond(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job['state']} {job['stage']}"
        time.sleep(0.2)


def test_carol_starts_within_one_of_bobs_job_lengths(service, bob_client) -> None:
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope

    with session_scope(service.settings.database_url) as session:
        carol_name = f"carol-{uuid.uuid4().hex[:6]}"
        _, carol_token = create_token(session, create_user(session, carol_name), "tests")
    carol = httpx.Client(
        base_url=service.url, timeout=60, headers={"Authorization": f"Bearer {carol_token}"}
    )
    bob_ids: list[str] = []
    try:
        for i in range(15):
            r = bob_client.post(
                "/api/jobs", json={"kind": "simulate", "params": {**JOB, "seed": i}}
            )
            assert r.status_code == 201, r.text
            bob_ids.append(r.json()["id"])
        _wait(bob_client, bob_ids[0], lambda j: j["state"] != "queued")
        r = carol.post("/api/jobs", json={"kind": "simulate", "params": JOB})
        assert r.status_code == 201, r.text
        carol_job = _wait(carol, r.json()["id"], lambda j: j["started_at"] is not None)
        carol_job = _wait(carol, carol_job["id"], lambda j: j["state"] == "succeeded")
        submitted, started = _t(carol_job["created_at"]), _t(carol_job["started_at"])
        bob_jobs = [bob_client.get(f"/api/jobs/{i}").json() for i in bob_ids]
        done = [j for j in bob_jobs if j["finished_at"] and j["started_at"]]
        lengths = [_t(j["finished_at"]) - _t(j["started_at"]) for j in done]
        assert lengths, "no job of bob's finished"
        # jobs of bob that started between carol's submit and her start: at most the one that
        # was about to start at that instant (FIFO would start all 14 others first)
        ahead = [
            j for j in bob_jobs if j["started_at"] and submitted < _t(j["started_at"]) < started
        ]
        assert len(ahead) <= 1, [(j["id"], j["started_at"]) for j in ahead]
        waited = started - submitted
        assert waited <= max(lengths) + 2.0, (waited, lengths)
        print(
            f"\ncarol waited {waited:.1f} s; bob's jobs took {min(lengths):.1f}-"
            f"{max(lengths):.1f} s; {sum(1 for j in bob_jobs if j['state'] == 'queued')} of "
            "bob's 15 were still queued when carol's ended"
        )
        assert sum(1 for j in bob_jobs if j["state"] == "queued") >= 10
    finally:
        for job_id in bob_ids:  # leave nothing running for the other integration tests
            bob_client.post(f"/api/jobs/{job_id}/cancel")
        carol.close()


def test_per_user_queue_quota_is_429_and_set_by_an_admin(service, bob_client, admin_client) -> None:
    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope

    with session_scope(service.settings.database_url) as session:
        name = f"dave-{uuid.uuid4().hex[:6]}"
        _, token = create_token(session, create_user(session, name), "tests")
    dave = httpx.Client(
        base_url=service.url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        # only an admin sets limits
        r = dave.put(f"/api/users/{name}/limits", json={"max_queued_jobs": 100})
        assert r.status_code == 403, r.text
        r = admin_client.put(f"/api/users/{name}/limits", json={"max_queued_jobs": 2})
        assert r.status_code == 200 and r.json()["max_queued_jobs"] == 2, r.text
        ids = []
        for i in range(2):
            r = dave.post("/api/jobs", json={"kind": "simulate", "params": {**JOB, "seed": i}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = dave.post("/api/jobs", json={"kind": "simulate", "params": JOB})
        assert r.status_code == 429, r.text
        assert f"user {name} has 2 queued or running jobs and may have 2" in r.json()["detail"]
        listed = dave.get("/api/jobs").json()
        assert listed["total"] == 2  # the refused job was not stored
    finally:
        for job_id in ids:
            dave.post(f"/api/jobs/{job_id}/cancel")
        dave.close()
