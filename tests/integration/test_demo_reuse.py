"""make demo reuses what an identical earlier run made (calseg.demo.reusable_job), matched by
the validated parameters and the code version, against the real service (PostgreSQL, Redis,
worker)."""

from __future__ import annotations

import pytest

from calseg.demo import reusable_job, run_or_reuse
from calseg.service.schemas import params_to_json, validate_params

pytestmark = pytest.mark.integration

SIM = {"n_videos": 3, "n_frames": 6, "height": 96, "width": 128, "seed": 11}
VERSION = "0.9.0+g0123456789"


def _stored(service, user: str, kind: str, params: dict, version: str, state: str) -> str:
    """A finished job as the worker leaves it: validated params, code version, state."""
    from sqlalchemy import select

    from calseg.service.db import session_scope
    from calseg.service.models import Job, User

    with session_scope(service.settings.database_url) as s:
        owner = s.scalar(select(User).where(User.name == user))
        job = Job(
            kind=kind,
            state=state,
            params=params_to_json(validate_params(kind, params)),
            progress=1.0,
            result={},
            code_version=version,
            owner_id=owner.id,
        )
        s.add(job)
        s.flush()
        return job.id


def test_an_identical_earlier_job_is_reused_and_nothing_else(
    service, client, bob_client, admin_client
) -> None:
    done = _stored(service, "alice", "simulate", SIM, VERSION, "succeeded")
    # the same parameters (defaults filled in either way) on the same code: reused
    job, why = reusable_job(client, "simulate", SIM, version=VERSION)
    assert job is not None and job["id"] == done and "reusing simulate job" in why
    # a default given explicitly is the same job
    job, _ = reusable_job(client, "simulate", {**SIM, "indicator": "GCaMP6s"}, version=VERSION)
    assert job is not None and job["id"] == done
    # another parameter, another code version, a dirty tree, another user: not reused
    assert reusable_job(client, "simulate", {**SIM, "seed": 12}, version=VERSION)[0] is None
    assert reusable_job(client, "simulate", SIM, version="0.9.0+gfffffffff")[0] is None
    job, why = reusable_job(client, "simulate", SIM, version=VERSION + "+dirty")
    assert job is None and "uncommitted changes" in why
    assert reusable_job(bob_client, "simulate", SIM, version=VERSION)[0] is None
    # nor by an admin, who lists everyone's jobs (an 8th attack run: it reused alice's)
    assert reusable_job(admin_client, "simulate", SIM, version=VERSION)[0] is None
    # a failed job is never reused; a finetune of the reused dataset is matched through it
    _stored(service, "alice", "simulate", {**SIM, "seed": 13}, VERSION, "failed")
    assert reusable_job(client, "simulate", {**SIM, "seed": 13}, version=VERSION)[0] is None
    ft = _stored(
        service, "alice", "finetune", {"dataset_job_id": done, "steps": 3}, VERSION, "succeeded"
    )  # noqa: E501
    job, _ = reusable_job(client, "finetune", {"dataset_job_id": done, "steps": 3}, version=VERSION)
    assert job is not None and job["id"] == ft


def test_run_or_reuse_runs_once_then_reuses(client) -> None:
    params = {**SIM, "seed": 21}
    first = run_or_reuse(client, "simulate", params, version=VERSION)  # nothing yet: runs
    assert first["state"] == "succeeded" and not first.get("_reused")
    version = first["code_version"]
    if version.endswith("+dirty"):  # the worker's code: an edited tree never reuses
        assert reusable_job(client, "simulate", params, version=version)[0] is None
        version = VERSION
        pytest.skip("working tree has uncommitted changes: reuse is off by design (checked)")
    again = run_or_reuse(client, "simulate", params, version=version)
    assert again["id"] == first["id"] and again["_reused"] and again["_wall_s"] == 0
    fresh = run_or_reuse(client, "simulate", params, fresh=True, version=version)
    assert fresh["id"] != first["id"]
