"""Job cost limits, per-user limits and quotas, and the smaller holes of issue 13 (items 3 and
7) through the REST API (TestClient on SQLite, the ``client`` fixture of test_service_api:
alice) and the CLI. Every attack asserts its status code and message, and that nothing was
stored, queued or left behind.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_service_api import SIM, _run, _tiff_bytes, client  # noqa: F401 - fixture
from typer.testing import CliRunner

from calseg.service.auth import create_token, create_user
from calseg.service.db import session_scope
from calseg.service.models import Job, Recording, User
from calseg.service.schemas import SERVICE_BOUNDS, params_json_schema
from calseg.service.settings import Settings, get_settings

KINDS = ("simulate", "finetune", "infer", "evaluate")


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def admin(client: TestClient) -> dict[str, str]:  # noqa: F811
    """An admin ``root`` and another user ``bob`` (tokens)."""
    with session_scope() as session:
        _, root = create_token(session, create_user(session, "root", is_admin=True), "t")
        _, bob = create_token(session, create_user(session, "bob"), "t")
    return {"root": root, "bob": bob}


def _jobs_in_db() -> int:
    with session_scope() as session:
        return session.query(Job).count()


def _numeric_leaves(schema: dict, defs: dict, path: tuple = ()):  # noqa: ANN202
    if "$ref" in schema:
        yield from _numeric_leaves(defs[schema["$ref"].split("/")[-1]], defs, path)
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            yield from _numeric_leaves(sub, defs, path)
    if schema.get("type") in ("integer", "number"):
        yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _numeric_leaves(sub, defs, (*path, name))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _numeric_leaves(schema["additionalProperties"], defs, (*path, "*"))
    if isinstance(schema.get("items"), dict):
        yield from _numeric_leaves(schema["items"], defs, (*path, "[]"))
    for i, sub in enumerate(schema.get("prefixItems", [])):
        yield from _numeric_leaves(sub, defs, (*path, i))


@pytest.mark.parametrize("kind", KINDS)
def test_every_numeric_parameter_has_a_lower_and_an_upper_bound(kind: str) -> None:
    schema = params_json_schema(kind)
    leaves = list(_numeric_leaves(schema, schema.get("$defs", {})))
    assert len(leaves) > 10  # the walk reaches the fields (nested ones included)
    unbounded = [
        ".".join(map(str, path))
        for path, leaf in leaves
        if "enum" not in leaf
        and not (
            ("minimum" in leaf or "exclusiveMinimum" in leaf)
            and ("maximum" in leaf or "exclusiveMaximum" in leaf)
        )
    ]
    assert unbounded == [], f"{kind}: bound these in schemas.SERVICE_BOUNDS: {unbounded}"
    assert all(why for _limits, why in SERVICE_BOUNDS.values())  # every bound has its reason


ATTACKS: list[tuple[str, dict[str, Any], list[str]]] = [
    # (kind, params, fragments of the 422 detail)
    (
        "finetune",
        {"steps": 1e9, "batch_size": 1e8, "encoder_batch_size": 1e6},
        [
            "steps: Input should be less than or equal to 1000000",
            "batch_size: Input should be less than or equal to 512",
            "encoder_batch_size: Input should be less than or equal to 64",
        ],
    ),
    ("infer", {"smooth_sigma_px": 1e5}, ["smooth_sigma_px: Input should be less than or equal"]),
    ("infer", {"background_radius_px": 1e6}, ["background_radius_px: Input should be less"]),
    ("infer", {"max_prompts_per_frame": 10**9}, ["max_prompts_per_frame"]),
    ("infer", {"mask_threshold": -1e300}, ["mask_threshold: Input should be greater"]),
    ("finetune", {"seed": 2**60}, ["seed: Input should be less than or equal"]),
    ("finetune", {"prompt_mix": {"point": 1e30}}, ["prompt_mix.point"]),
    ("finetune", {"augment": {"gain_range": [0.5, 1e300]}}, ["augment.gain_range.1"]),
    ("finetune", {"augment": {"crop_scale": [0.9, 0.5]}}, ["low end 0.9 is above the high end"]),
    ("simulate", {"model_overrides": {"K5": 1e300}}, ["model_overrides.K5"]),
    ("simulate", {"pattern_classes": ["waves"] * 1000}, ["pattern_classes"]),
    ("finetune", {"model": "sam3_hiera_huge"}, ["model: Input should be 'sam2.1_hiera_t'"]),
    ("infer", {"model": "../../etc/passwd"}, ["model: Input should be"]),
    ("infer", {"device": "tpu"}, ["device: String should match pattern"]),
    ("infer", {"recording_id": "x" * 10_000}, ["recording_id: String should have at most 64"]),
]


@pytest.mark.parametrize(("kind", "params", "expected"), ATTACKS)
def test_out_of_bound_parameters_are_422_naming_the_field(
    client: TestClient,  # noqa: F811
    kind: str,
    params: dict[str, Any],
    expected: list[str],
) -> None:
    refs = {
        "finetune": {"dataset_job_id": "nope"},
        "infer": {"recording_id": "nope", "method": "baseline"},
        "evaluate": {"dataset_job_id": "nope"},
        "simulate": {},
    }[kind]
    r = client.post("/api/jobs", json={"kind": kind, "params": {**refs, **params}})
    assert r.status_code == 422, r.text
    body = r.json()
    for fragment in expected:
        assert fragment in body["detail"], (fragment, body["detail"])
    assert body["errors"] and all(e["loc"][:2] == ["body", "params"] for e in body["errors"])
    assert _jobs_in_db() == 0 and client.queued == []


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_non_finite_numbers_are_422(client: TestClient, raw: bytes) -> None:  # noqa: F811
    body = b'{"kind": "simulate", "params": {"frame_interval_s": ' + raw + b"}}"
    r = client.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "frame_interval_s" in r.json()["detail"] and "finite" in r.json()["detail"]
    assert _jobs_in_db() == 0 and client.queued == []


def test_the_issues_jobs_are_refused_with_the_estimate_and_the_limit(
    client: TestClient,  # noqa: F811
) -> None:
    # 1000 videos x 5000 frames x 4096^2 (about 167 TB): every field within its own bound
    huge = {"n_videos": 1000, "n_frames": 5000, "height": 4096, "width": 4096,
            "frame_interval_s": 1.0, "mean_cell_area_px": 10000}  # fmt: skip
    r = client.post("/api/jobs", json={"kind": "simulate", "params": huge})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "this simulate job is estimated to need more than you may use" in detail
    assert "memory" in detail and "disk" in detail and "time" in detail and "limit" in detail
    errors = {e["msg"].split()[1]: e for e in r.json()["errors"]}
    # (and "free disk" where the machine has less free disk than the job would write; the
    # 100 GiB storage quota of every user by default)
    assert {"memory", "disk", "time", "storage"} <= set(errors)
    assert set(errors) <= {"memory", "disk", "time", "free", "storage"}
    assert errors["disk"]["type"] == "cost_limit" and errors["disk"]["input"] > 1e14  # > 100 TB
    assert "calseg users limits" in detail  # says who can raise it
    # a finetune at the largest bounds: every field valid, the whole job far too long
    with session_scope() as s:
        ds = Job(kind="simulate", state="succeeded", owner_id=client.user_id, params=SIM)
        s.add(ds)
        s.flush()
        ds_id = ds.id
    big = {"dataset_job_id": ds_id, "steps": 1_000_000, "batch_size": 512, "grad_accum": 256}
    r = client.post("/api/jobs", json={"kind": "finetune", "params": big})
    assert r.status_code == 422 and "time" in r.json()["detail"], r.text
    assert "train" in r.json()["detail"]  # the largest part is named
    assert _jobs_in_db() == 1 and client.queued == []  # only the dataset row made here


def test_queued_jobs_reserve_their_estimated_disk(
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new user's check: three simulate jobs of 36.3 GiB each were admitted with 59 GiB free,
    each compared with the free disk alone. A queued or running job's estimated disk is now
    kept (jobs.estimated_disk_bytes, migration 0006) and subtracted from the free disk at
    admission and in /api/jobs/estimate; a job that ends gives its reserve back."""
    from calseg.service import costs
    from calseg.service.settings import get_settings

    r = client.post("/api/jobs/estimate", json={"kind": "simulate", "params": SIM})
    need = r.json()["estimate"]["disk_bytes"]
    free = int(2.5 * need) + get_settings().min_free_disk_bytes  # room for two such jobs
    monkeypatch.setattr(costs, "free_disk_bytes", lambda settings: free)
    first = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    second = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert first.status_code == 201 and second.status_code == 201, second.text
    third = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert third.status_code == 422 and "free disk" in third.json()["detail"], third.text
    r = client.post("/api/jobs/estimate", json={"kind": "simulate", "params": SIM})
    assert r.json()["fits"] is False and r.json()["over"] == ["free disk"]
    assert client.post(f"/api/jobs/{first.json()['id']}/cancel").status_code == 200
    third = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert third.status_code == 201, third.text


def test_the_estimate_counts_smoothing_and_background(client: TestClient) -> None:  # noqa: F811
    frames = np.random.default_rng(0).integers(0, 1000, (40, 48, 48), dtype=np.uint16)
    up = client.post("/api/recordings", files={"file": ("r.tif", _tiff_bytes(frames))}).json()
    base = {"recording_id": up["id"], "method": "baseline"}

    def est(**extra: Any) -> dict:
        r = client.post("/api/jobs/estimate", json={"kind": "infer", "params": {**base, **extra}})
        assert r.status_code == 200, r.text
        return r.json()

    plain, light, heavy = est(), est(smooth_sigma_px=5), est(smooth_sigma_px=50)
    assert plain["estimate"]["parts"]["time:smoothing"] == 0
    ratio = (
        heavy["estimate"]["parts"]["time:smoothing"] / light["estimate"]["parts"]["time:smoothing"]
    )
    assert 9 < ratio < 11  # the Gaussian's taps grow with sigma
    assert heavy["estimate"]["time_s"] > plain["estimate"]["time_s"]
    bg = est(background="opening", background_radius_px=1000)
    assert bg["estimate"]["parts"]["time:background"] > 100  # 48^2 px x pi 1000^2 footprint
    assert plain["fits"] and plain["limits"]["user"] == "alice"
    # method auto (the default) is estimated as it will run: classical without SAM2 weights here
    auto = est(method="auto")
    assert auto["estimate"]["parts"] == plain["estimate"]["parts"], auto
    assert "time:encode" in est(method="sam2")["estimate"]["parts"]
    assert plain["estimate"]["inputs"] == {"n_frames": 40, "height": 48, "width": 48}
    assert _jobs_in_db() == 0  # estimating stores nothing
    # another user cannot size alice's recording through the estimate: like a missing id
    with session_scope() as session:
        _, bob = create_token(session, create_user(session, "bob"), "t")
    r = client.post(
        "/api/jobs/estimate", json={"kind": "infer", "params": base}, headers=_headers(bob)
    )
    assert (
        r.status_code == 422
        and r.json()["detail"] == f"recording_id: there is no recording {up['id']}"
    )


def test_unknown_devices_are_refused_at_submit(
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = np.ones((3, 16, 16), np.uint16)
    up = client.post("/api/recordings", files={"file": ("r.tif", _tiff_bytes(frames))}).json()
    params = {"recording_id": up["id"], "device": "cuda:7"}
    monkeypatch.setenv("CALSEG_ALLOWED_DEVICES", '["auto", "cpu"]')
    get_settings.cache_clear()
    r = client.post("/api/jobs", json={"kind": "infer", "params": params})
    assert r.status_code == 422, r.text
    assert "this server runs jobs on auto, cpu; 'cuda:7' is not one of them" in r.json()["detail"]
    assert r.json()["errors"][0]["loc"] == ["body", "params", "device"]
    assert _jobs_in_db() == 0 and client.queued == []
    monkeypatch.setenv("CALSEG_ALLOWED_DEVICES", '["auto", "cpu", "cuda:7"]')
    get_settings.cache_clear()
    r = client.post("/api/jobs", json={"kind": "infer", "params": params})
    assert r.status_code == 201, r.text


def test_the_storage_quota_holds_uploads_and_jobs_and_deleting_frees_it(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    """One user's uploads and jobs could fill the disk down to min_free_disk_bytes, after which
    every other user was refused. Each user now has a storage quota (max_storage_bytes):
    recordings, the files their jobs left and their queued jobs' estimated writes count."""
    root = _headers(admin["root"])
    rng = np.random.default_rng(0)
    one = _tiff_bytes(rng.integers(0, 4000, (4, 32, 32), dtype=np.uint16))
    two = _tiff_bytes(rng.integers(0, 4000, (8, 32, 32), dtype=np.uint16))
    quota = len(one) + len(two) // 2  # room for the first file, not for both
    r = client.patch("/api/users/alice/limits", json={"max_storage_bytes": quota}, headers=root)
    assert r.status_code == 200 and r.json()["sources"]["max_storage_bytes"] == "user", r.text
    first = client.post("/api/recordings", files={"file": ("one.tif", one, "image/tiff")})
    assert first.status_code == 201, first.text
    limits = client.get("/api/users/alice/limits").json()
    assert limits["storage_used_bytes"] == len(one) and limits["max_storage_bytes"] == quota

    def incoming() -> list[str]:
        folder = get_settings().artifact_dir / "recordings" / ".incoming"
        return [p.name for p in folder.rglob("*")] if folder.exists() else []

    # declared (Content-Length), streamed without a length (chunked) and a raw body: 507
    def chunks():
        yield two[: len(two) // 2]
        yield two[len(two) // 2 :]

    raw = {"Content-Type": "application/octet-stream"}
    for kwargs, how in (
        ({"files": {"file": ("two.tif", two, "image/tiff")}}, "after "),  # within the slack
        ({"content": chunks(), "params": {"filename": "two.tif"}, "headers": raw}, "after "),
        ({"content": b"\0" * 150_000, "params": {"filename": "z.tif"}, "headers": raw}, "this"),
    ):
        r = client.post("/api/recordings", **kwargs)
        assert r.status_code == 507, r.text
        assert "does not fit in your storage quota" in r.json()["detail"]
        assert f"{quota - len(one):,} bytes of it are left" in r.json()["detail"]
        # refused from its Content-Length before a byte is read, or as it streams in
        assert r.json()["detail"].startswith(how)
    with session_scope() as s:
        assert s.query(Recording).count() == 1
    assert incoming() == []
    # a job whose estimated writes do not fit: 422 naming the quota, and the estimate says so
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 422 and "storage quota" in r.json()["detail"], r.text
    assert "DELETE /api/recordings/ID" in r.json()["detail"]
    # what is left, said as left (it read "storage quota 1.79 MiB > limit 0 MiB" of a 2 MiB
    # quota: a lab admin's check)
    assert re.search(r"storage quota: [\d.]+ MiB needed, [\d.]+ MiB left", r.json()["detail"])
    r = client.post("/api/jobs/estimate", json={"kind": "simulate", "params": SIM})
    assert r.json()["fits"] is False and "storage quota" in r.json()["over"]
    assert r.json()["limits"]["storage_used_bytes"] == len(one)
    # deleting the recording frees its bytes: the second file fits now
    assert client.delete(f"/api/recordings/{first.json()['id']}").status_code in (200, 204)
    r = client.post("/api/recordings", files={"file": ("two.tif", two, "image/tiff")})
    assert r.status_code == 201, r.text
    # another user's quota is their own; a job counts its estimate while queued, then the
    # bytes its folder holds when it has ended
    bob = _headers(admin["bob"])
    r = client.post("/api/recordings", files={"file": ("one.tif", one, "image/tiff")}, headers=bob)
    assert r.status_code == 201, r.text
    job = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}, headers=bob).json()
    used = client.get("/api/users/bob/limits", headers=bob).json()["storage_used_bytes"]
    with session_scope() as s:
        assert used == len(one) + s.get(Job, job["id"]).estimated_disk_bytes
    assert _run(job["id"]) == "succeeded"
    folder = get_settings().artifact_dir / "jobs" / job["id"]
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    with session_scope() as s:
        assert s.get(Job, job["id"]).stored_bytes == written > 0
    used = client.get("/api/users/bob/limits", headers=bob).json()["storage_used_bytes"]
    assert used == len(one) + written


def test_uploads_in_flight_side_by_side_count_against_the_quota(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    """Found by a fifth attack run (2026-12-07): the quota left was taken once, when each
    upload started, so ten uploads stalled side by side held 1.29 GB in .incoming against
    143 MB of quota. An upload now counts its owner's other uploads in flight (any api
    process: their files are named by owner): here one stalled upload of 6 kB, and a file
    that fits alone but not beside it gets 507, declared or streamed; another user's
    uploads in flight do not count; without the stalled one it fits."""
    root = _headers(admin["root"])
    rng = np.random.default_rng(1)
    one = _tiff_bytes(rng.integers(0, 4000, (4, 32, 32), dtype=np.uint16))
    quota = len(one) + 4000
    r = client.patch("/api/users/alice/limits", json={"max_storage_bytes": quota}, headers=root)
    assert r.status_code == 200, r.text
    with session_scope() as s:
        alice = s.query(User).filter_by(name="alice").one().id
        bob = s.query(User).filter_by(name="bob").one().id
    folder = get_settings().artifact_dir / "recordings" / ".incoming"
    folder.mkdir(parents=True, exist_ok=True)
    theirs = folder / f"{bob}.{'b' * 8}.part"
    theirs.write_bytes(b"\0" * 50_000)  # another user's: not alice's quota
    stalled = folder / f"{alice}.{'a' * 8}.part"
    stalled.write_bytes(b"\0" * 6000)

    def chunks():
        yield one[: len(one) // 2]
        yield one[len(one) // 2 :]

    raw = {"Content-Type": "application/octet-stream"}
    for kwargs in (
        {"files": {"file": ("one.tif", one, "image/tiff")}},
        {"content": chunks(), "params": {"filename": "one.tif"}, "headers": raw},
    ):
        r = client.post("/api/recordings", **kwargs)
        assert r.status_code == 507, r.text
        assert "your other uploads in flight (6,000 bytes so far)" in r.json()["detail"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([stalled.name, theirs.name])
    stalled.unlink()
    r = client.post("/api/recordings", files={"file": ("one.tif", one, "image/tiff")})
    assert r.status_code == 201, r.text
    theirs.unlink()


def test_the_storage_quota_counts_only_what_jobs_can_have_written(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    """An attack check: a job cancelled while queued, or refused because the broker was down
    (503), kept its whole estimate in its owner's storage until deleted; a retry counted the
    job's old files and its new estimate together. Jobs that never started now count 0, and a
    retry is checked without its own earlier bytes."""
    from api.main import app, enqueue_dep
    from calseg.service.broker import QueueUnavailable

    def used() -> int:
        return client.get("/api/users/alice/limits").json()["storage_used_bytes"]

    job = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    with session_scope() as s:
        estimate = s.get(Job, job["id"]).estimated_disk_bytes
    assert used() == estimate > 0
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    assert used() == 0  # cancelled before it started: nothing written
    # a quota with room for one estimate and a half: the retry fits, as its old self goes
    r = client.patch(
        "/api/users/alice/limits",
        json={"max_storage_bytes": estimate * 3 // 2},
        headers=_headers(admin["root"]),
    )
    assert r.status_code == 200
    assert client.post(f"/api/jobs/{job['id']}/retry").status_code == 200
    assert used() == estimate
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200

    def broker_down(job, countdown=None):  # noqa: ANN001, ANN202
        raise QueueUnavailable("broker down (test)")

    app.dependency_overrides[enqueue_dep] = lambda: broker_down
    for _ in range(3):
        r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
        assert r.status_code == 503, r.text
    assert used() == 0


def test_admins_set_per_user_limits_users_see_their_own(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    root, bob = _headers(admin["root"]), _headers(admin["bob"])
    mine = client.get("/api/users/alice/limits").json()
    assert mine["sources"]["max_queued_jobs"] == "server" and mine["max_queued_jobs"] == 100
    # other users' limits do not exist for a non-admin (no probing of names)
    for name in ("bob", "root", "nobody"):
        r = client.get(f"/api/users/{name}/limits")
        assert r.status_code == 404 and r.json()["detail"] == f"there is no user {name!r}"
    assert client.get("/api/users").status_code == 403
    r = client.put("/api/users/alice/limits", json={"max_queued_jobs": 10_000})
    assert r.status_code == 403 and "only an admin" in r.json()["detail"]
    r = client.put("/api/users/bob/limits", json={"max_queued_jobs": 1}, headers=bob)
    assert r.status_code == 403
    # bad values: 422 with the field
    for body, field in [
        ({"max_queued_jobs": 0}, "max_queued_jobs"),
        ({"max_job_time_s": -1}, "max_job_time_s"),
        (b'{"max_job_memory_bytes": 1e400}', "max_job_memory_bytes"),
        ({"max_jobs": 3}, "max_jobs"),
        ({"max_storage_bytes": True}, "max_storage_bytes"),  # was a 1-byte quota
        ({"max_storage_bytes": "100"}, "max_storage_bytes"),
        ({"max_storage_bytes": 0}, "max_storage_bytes"),
    ]:
        raw = body if isinstance(body, bytes) else None
        kwargs = {"content": raw, "headers": {**root, "Content-Type": "application/json"}}
        kwargs = kwargs if raw else {"json": body, "headers": root}
        r = client.put("/api/users/alice/limits", **kwargs)
        assert r.status_code == 422 and field in r.json()["detail"], r.text
    r = client.put(
        "/api/users/alice/limits", json={"max_job_time_s": 1, "max_queued_jobs": 1}, headers=root
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["max_job_time_s"] == 1 and got["sources"]["max_job_time_s"] == "user"
    assert got["sources"]["max_job_memory_bytes"] == "server"
    listed = {u["user"]: u for u in client.get("/api/users", headers=root).json()}
    assert set(listed) == {"alice", "root", "bob"} and listed["alice"]["max_queued_jobs"] == 1
    # alice's next job is held to her own limits: over 1 s of estimated time -> 422
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 422 and "> limit 1 s" in r.json()["detail"], r.text
    r = client.put("/api/users/alice/limits", json={"max_queued_jobs": 1}, headers=root)
    assert r.json()["sources"]["max_job_time_s"] == "server"  # left out: the server's again
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 201, r.text
    # quota: one queued job already -> 429, nothing stored, nothing queued
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 429, r.text
    assert r.json()["detail"].startswith(
        "user alice has 1 queued or running jobs and may have 1 (quota)"
    )
    assert r.headers["retry-after"] == "30"  # (it had none: a new-user check)
    assert _jobs_in_db() == 1 and len(client.queued) == 1
    # retrying a cancelled job counts against the quota too
    first = client.get("/api/jobs").json()["items"][0]["id"]
    assert client.post(f"/api/jobs/{first}/cancel").status_code == 200
    second = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert second.status_code == 201
    r = client.post(f"/api/jobs/{first}/retry")
    assert r.status_code == 429 and client.get(f"/api/jobs/{first}").json()["state"] == "cancelled"


def test_patch_changes_only_the_limits_given(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    """A new-user check set max_queued_jobs 3 with PUT, then max_running_jobs 2 with PUT, and
    the quota of 3 was gone (PUT replaces every limit, as documented). PATCH changes only the
    limits in its body; null returns one to the server's setting; non-admins get 403."""
    root, bob = _headers(admin["root"]), _headers(admin["bob"])
    url = "/api/users/alice/limits"
    assert client.put(url, json={"max_queued_jobs": 3}, headers=root).status_code == 200
    r = client.patch(url, json={"max_running_jobs": 2}, headers=root)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["max_queued_jobs"], got["max_running_jobs"]) == (3, 2)
    assert got["sources"]["max_queued_jobs"] == got["sources"]["max_running_jobs"] == "user"
    got = client.patch(url, json={"max_queued_jobs": None}, headers=root).json()
    assert got["sources"]["max_queued_jobs"] == "server" and got["max_running_jobs"] == 2
    assert client.patch(url, json={}, headers=root).json() == got  # nothing given: no change
    assert client.patch(url, json={"max_queued_jobs": 0}, headers=root).status_code == 422
    assert client.patch(url, json={"max_queued_jobs": 5}, headers=bob).status_code == 403
    assert client.get(url).json()["max_running_jobs"] == 2


def test_zero_cell_job_lists_no_cells(client: TestClient) -> None:  # noqa: F811
    frames = np.full((12, 32, 32), 500, np.uint16)  # nothing active: no cell anywhere
    up = client.post("/api/recordings", files={"file": ("flat.tif", _tiff_bytes(frames))})
    job = client.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": up.json()["id"], "method": "baseline"}},
    ).json()
    assert _run(job["id"]) == "succeeded"
    assert client.get(f"/api/jobs/{job['id']}").json()["result"]["n_cells"] == 0
    r = client.get(f"/api/jobs/{job['id']}/cells")
    assert r.status_code == 200, r.text  # was 500: "cannot reshape array of size 0"
    assert r.json() == {"ids": [], "peak_dff": []}
    r = client.get(f"/api/jobs/{job['id']}/cells/1/trace")
    assert r.status_code == 404 and "0 cells there" in r.json()["detail"]


def test_recording_in_use_409_names_no_other_users_job(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    frames = np.random.default_rng(3).integers(0, 900, (4, 16, 16), dtype=np.uint16)
    rec = client.post("/api/recordings", files={"file": ("a.tif", _tiff_bytes(frames))}).json()
    params = {"recording_id": rec["id"], "method": "baseline"}
    theirs = client.post(
        "/api/jobs", json={"kind": "infer", "params": params}, headers=_headers(admin["root"])
    ).json()["id"]  # an admin's job on alice's recording
    r = client.delete(f"/api/recordings/{rec['id']}")
    assert r.status_code == 409, r.text
    assert theirs not in r.text and theirs[:8] not in r.text
    assert r.json()["detail"] == (
        f"recording {rec['id']} is used by queued or running jobs: 1 job of other users; "
        "cancel them or wait until they end"
    )
    own = client.post("/api/jobs", json={"kind": "infer", "params": params}).json()["id"]
    r = client.delete(f"/api/recordings/{rec['id']}")
    assert r.status_code == 409 and own in r.json()["detail"] and theirs not in r.text
    assert "1 job of yours" in r.json()["detail"]
    # an admin deleting it is told whose jobs they are (it said "of your jobs": a new-user
    # check), with their ids, which an admin may see
    r = client.delete(f"/api/recordings/{rec['id']}", headers=_headers(admin["root"]))
    assert r.status_code == 409 and "of yours" in r.text and "1 job of other users" in r.text
    assert own in r.text and theirs in r.text
    assert client.get(f"/api/recordings/{rec['id']}").status_code == 200  # nothing lost
    with session_scope() as s:
        assert s.get(Recording, rec["id"]) is not None


# ------------------------------------------------------------------------------ proxies


def _serve(app: Any, **options: Any) -> tuple[Any, int]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    )
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return server, port


def test_forwarded_for_cannot_dodge_the_bad_token_limit(
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through real uvicorn on loopback: rotating X-Forwarded-For used to give every request a
    fresh address (uvicorn trusts 127.0.0.1 by default), so the limiter never fired."""
    import httpx

    from api.serve import uvicorn_cli_args, uvicorn_options

    monkeypatch.setenv("CALSEG_AUTH_MAX_FAILURES", "5")
    get_settings.cache_clear()
    bad = "cs_" + "Q" * 43
    assert uvicorn_options(get_settings()) == {"proxy_headers": False}
    assert uvicorn_cli_args(get_settings()) == ["--no-proxy-headers"]
    # uvicorn's own defaults (as `uvicorn api.main:app` runs it) and api.serve's options
    for options in ({}, uvicorn_options(get_settings())):
        from api.main import _limiters

        for limiter in _limiters.values():
            limiter.reset()
        server, port = _serve(client.app, **options)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
                codes = [
                    http.get(
                        "/api/jobs",
                        headers={**_headers(bad), "X-Forwarded-For": f"203.0.113.{i}"},
                    ).status_code
                    for i in range(8)
                ]
                assert codes == [401] * 5 + [429] * 3, (options, codes)
                r = http.get("/api/jobs", headers={**_headers(bad), "X-Forwarded-For": "1.2.3.4"})
                assert r.status_code == 429 and "untrusted-forwarded" in r.json()["detail"]
                # the valid token, with or without the header, is never locked out
                for extra in ({}, {"X-Forwarded-For": "203.0.113.99"}):
                    r = http.get("/api/me", headers={**_headers(client.token), **extra})
                    assert r.status_code == 200 and r.json()["name"] == "alice"
        finally:
            server.should_exit = True
    # behind a configured proxy its header counts, per forwarded address
    monkeypatch.setenv("CALSEG_TRUSTED_PROXIES", '["127.0.0.1"]')
    get_settings.cache_clear()
    assert uvicorn_cli_args(get_settings()) == [
        "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"
    ]  # fmt: skip
    from api.main import _limiters

    for limiter in _limiters.values():
        limiter.reset()
    server, port = _serve(client.app, **uvicorn_options(get_settings()))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            one = {**_headers(bad), "X-Forwarded-For": "198.51.100.1"}
            codes = [http.get("/api/jobs", headers=one).status_code for _ in range(6)]
            assert codes == [401] * 5 + [429]
            r = http.get("/api/jobs", headers={**_headers(bad), "X-Forwarded-For": "198.51.100.2"})
            assert r.status_code == 401  # another client behind the proxy is not punished
            assert "198.51.100.1" in http.get("/api/jobs", headers=one).json()["detail"]
    finally:
        server.should_exit = True


def test_a_client_gone_mid_upload_is_no_server_error(
    client: TestClient,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through real uvicorn: a client that sends half a declared body and closes its socket was
    logged as "Exception in ASGI application" with a traceback (a new-user check). It is an
    info line now, nothing is stored, and the api answers the next request."""
    import httpx

    server, port = _serve(client.app)
    for name in ("calseg.api", "uvicorn.error"):  # uvicorn's loggers do not propagate
        logging.getLogger(name).addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="calseg.api"):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    b"POST /api/recordings?filename=x.tif HTTP/1.1\r\nHost: t\r\n"
                    + f"Authorization: Bearer {client.token}\r\n".encode()
                    + b"Content-Type: application/octet-stream\r\n"
                    b"Content-Length: 150000\r\n\r\n" + b"\0" * 50_000  # (the limit: 200 kB)
                )
                time.sleep(0.5)
            deadline = time.monotonic() + 10
            while "ended by the client" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
        assert "ended by the client" in caplog.text, caplog.text
        assert "Exception in ASGI application" not in caplog.text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            r = http.get("/api/recordings", headers={"Authorization": f"Bearer {client.token}"})
            assert r.status_code == 200 and r.json() == []
        incoming = get_settings().artifact_dir / "recordings" / ".incoming"
        assert not incoming.exists() or list(incoming.iterdir()) == []
    finally:
        server.should_exit = True
        for name in ("calseg.api", "uvicorn.error"):
            logging.getLogger(name).removeHandler(caplog.handler)


# ------------------------------------------------------------------------------ CLI


runner = CliRunner()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1e400", "1e400 is not a finite number"),
        ("-1e999", "-1e999 is not a finite number"),
        ("NaN", "NaN is not a number JSON can carry"),
        ("Infinity", "Infinity is not a number JSON can carry"),
        ("[1, 2e308]", "2e308 is not a finite number"),
        ("9" * 5000, "Exceeds the limit (4300 digits)"),
        ("[" * 50_000 + "]" * 50_000, "maximum recursion depth"),
    ],
)
def test_cli_bad_param_values_are_one_error_line(value: str, expected: str) -> None:
    from calseg.cli import app

    env = {"CALSEG_TOKEN": "cs_" + "x" * 43, "CALSEG_URL": "http://127.0.0.1:9"}
    r = runner.invoke(app, ["submit", "simulate", "-p", f"n_videos={value}"], env=env)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --param n_videos: "), r.output
    assert expected in r.output and "Traceback" not in r.output


def test_cli_bad_params_file_is_one_error_line(tmp_path: Path) -> None:
    from calseg.cli import app

    env = {"CALSEG_TOKEN": "cs_" + "x" * 43, "CALSEG_URL": "http://127.0.0.1:9"}
    for text, expected in [
        ('{"n_videos": 1e400}', "1e400 is not a finite number"),
        ("[1, 2]", "must be a JSON object"),
    ]:
        path = tmp_path / "p.json"
        path.write_text(text)
        r = runner.invoke(app, ["submit", "simulate", "--params", str(path)], env=env)
        assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output


def test_cli_users_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from calseg.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    get_settings.cache_clear()
    assert runner.invoke(app, ["users", "create", "bob"]).exit_code == 0
    r = runner.invoke(
        app, ["users", "limits", "bob", "--max-queued-jobs", "3", "--max-job-hours", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "max_queued_jobs" in r.output and "(user)" in r.output and "2 h" in r.output
    with session_scope(url) as s:
        bob = s.query(User).filter_by(name="bob").one()
        assert (bob.max_queued_jobs, bob.max_job_time_s, bob.max_job_memory_bytes) == (
            3,
            7200,
            None,
        )
    for args, expected in [
        (["--max-queued-jobs", "0"], "max_queued_jobs: Input should be greater than or equal"),
        (["--max-job-memory-gib", "1e400"], "1e400 is not a finite number"),
        (["--max-running-jobs", "lots"], "give a number or 'default'"),
    ]:
        r = runner.invoke(app, ["users", "limits", "bob", *args])
        assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["users", "limits", "bob", "--max-queued-jobs", "default"])
    assert r.exit_code == 0
    with session_scope(url) as s:
        assert s.query(User).filter_by(name="bob").one().max_queued_jobs is None
    r = runner.invoke(app, ["users", "limits", "bob", "--max-storage-gib", "0.5"])
    assert r.exit_code == 0 and "max_storage_bytes" in r.output and "0.5 GiB" in r.output
    with session_scope(url) as s:
        assert s.query(User).filter_by(name="bob").one().max_storage_bytes == 2**29
    r = runner.invoke(app, ["users", "limits", "carol"])
    assert r.exit_code == 2 and "there is no user 'carol'" in r.output
    get_settings.cache_clear()


def test_no_limit_settings_read_none_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings whose None means "no limit" are set so from the environment too (``none``,
    ``null`` or empty; ``CALSEG_MAX_USER_STORAGE_BYTES=none`` was an int parsing error)."""
    for word in ("none", "NULL", ""):
        monkeypatch.setenv("CALSEG_MAX_USER_STORAGE_BYTES", word)
        monkeypatch.setenv("CALSEG_MAX_RUNNING_JOBS", word)
        s = Settings()
        assert s.max_user_storage_bytes is None and s.max_running_jobs is None
    monkeypatch.setenv("CALSEG_MAX_USER_STORAGE_BYTES", "1000")
    assert Settings().max_user_storage_bytes == 1000
    # a child process (embedded service, worker) gets "no quota" too, not the 100 GiB default
    env = Settings(max_user_storage_bytes=None).to_env()
    assert env["CALSEG_MAX_USER_STORAGE_BYTES"] == "none" and "CALSEG_STORE_URL" not in env
    monkeypatch.setenv("CALSEG_MAX_USER_STORAGE_BYTES", env["CALSEG_MAX_USER_STORAGE_BYTES"])
    assert Settings().max_user_storage_bytes is None


def test_settings_lists_reach_child_processes_as_json() -> None:
    s = Settings(trusted_proxies=["10.0.0.5"], allowed_devices=["cpu"])
    env = s.to_env()
    assert env["CALSEG_TRUSTED_PROXIES"] == '["10.0.0.5"]'
    assert env["CALSEG_ALLOWED_DEVICES"] == '["cpu"]'


# ------------------------------------------------------------------------------ estimates


def test_estimates_follow_what_the_job_does() -> None:
    """Pure checks of the estimate functions: each term grows with what drives it."""
    from calseg.service.costs import (
        JobInputs,
        VideoShape,
        embedding_bytes,
        estimate_evaluate,
        estimate_finetune,
        estimate_infer,
        estimate_simulate,
    )
    from calseg.service.schemas import validate_params

    assert embedding_bytes(512) == 8 * 512**2  # 256 (S/16)^2 + 32 (S/4)^2 + 64 (S/8)^2, fp16
    videos = [("train", VideoShape(64, 256, 256))] * 4 + [("val", VideoShape(64, 256, 256))]
    videos += [("test", VideoShape(64, 256, 256))] * 2
    inputs = JobInputs(videos=videos)

    def ft(**p: Any):  # noqa: ANN202
        return estimate_finetune(validate_params("finetune", {"dataset_job_id": "d", **p}), inputs)

    base, longer = ft(steps=200), ft(steps=2000)
    assert longer.parts["time:train"] == pytest.approx(10 * base.parts["time:train"])
    assert ft(steps=2000, time_limit_s=60).parts["time:train"] == pytest.approx(60)
    lora = ft(train_mode="lora")
    assert lora.parts["time:train"] > 10 * base.parts["time:train"]  # re-encodes every step
    assert lora.parts["disk:embedding cache"] == 0  # lora/full cache no embeddings
    # a micro-batch re-encodes the distinct frames of its prompts: up to batch_size of the
    # 64 training frames (16 x 4) without frames_per_step (it was charged at most 8)
    act = "memory:encoder activations"
    wide, two = ft(train_mode="full", batch_size=48), ft(train_mode="full", batch_size=48,
                                                        frames_per_step=2)  # fmt: skip
    assert wide.parts[act] == pytest.approx(24 * two.parts[act])
    assert ft(train_mode="full", batch_size=512).parts[act] == pytest.approx(
        64 / 48 * wide.parts[act]
    )
    aug = ft(augment_variants=3)
    assert aug.inputs["frames_embedded"] == 4 * 4 * 16 + 8  # (K+1) x 16 frames x 4 + 8 val
    # a micro-batch's prompts (a 12th attack run: 2.18 GiB at batch 8, 128 and 512 alike,
    # where the small SAM2 at batch 128 with a full-resolution multimask loss peaked at 6.7
    # GB, at batch 8 at 1.39 GB): each prompt's activations and loss terms
    small = {"model": "sam2_small_calseg", "image_size": 512}
    heavy = {**small, "loss_resolution": "full", "multimask_output": True}
    at = {b: ft(batch_size=b, **heavy).memory_bytes for b in (8, 128, 512)}
    assert at[8] >= 1.39e9 and at[128] >= 6.7e9 and at[512] > 2.5 * at[128], at
    prompts = "memory:prompt batch"
    one = ft(batch_size=64, **small).parts[prompts]
    assert ft(batch_size=64, **small, loss_resolution="full").parts[prompts] > 2 * one
    assert ft(batch_size=64, **small, multimask_output=True).parts[prompts] > one
    assert ft(image_size=1024).memory_bytes > base.memory_bytes
    assert ft(model="sam2.1_hiera_l").parts["time:embed"] > 5 * base.parts["time:embed"]
    # evaluate: the split's videos; a fine-tuned model adds its decoding
    ev = validate_params("evaluate", {"dataset_job_id": "d"})
    ev_ft = validate_params("evaluate", {"dataset_job_id": "d", "model_job_id": "m"})
    assert estimate_evaluate(ev, inputs).inputs["videos"] == 2
    assert estimate_evaluate(ev_ft, inputs).time_s > estimate_evaluate(ev, inputs).time_s
    # infer: frames, prompts, video mode
    rec = JobInputs(recording=VideoShape(100, 512, 512))
    sam2 = {"recording_id": "r", "method": "sam2"}
    inf = estimate_infer(validate_params("infer", sam2), rec)
    video = estimate_infer(validate_params("infer", {**sam2, "mode": "video"}), rec)
    assert video.parts["time:decode"] == pytest.approx(20 * inf.parts["time:decode"])
    few = estimate_infer(validate_params("infer", {**sam2, "max_prompts_per_frame": 2}), rec)
    assert few.parts["time:decode"] < inf.parts["time:decode"]
    baseline = estimate_infer(
        validate_params("infer", {"recording_id": "r", "method": "baseline"}), rec
    )
    assert "time:encode" not in baseline.parts and baseline.memory_bytes < inf.memory_bytes
    # simulate: a fit to a recording takes its frame size and count
    sim = validate_params(
        "simulate", {"recording_id": "r", "n_frames": 10, "height": 128, "width": 1024}
    )
    fitted = estimate_simulate(sim, JobInputs(recording=VideoShape(300, 128, 128)))
    assert fitted.inputs["n_frames"] == 300 and fitted.inputs["height"] == 128
    assert fitted.parts["time:fit"] > 0
    # a faster worker scales the time, never memory or disk
    fast = estimate_simulate(sim, JobInputs(recording=VideoShape(300, 128, 128)), 0.1)
    assert fast.time_s == pytest.approx(0.1 * fitted.time_s)
    assert (fast.memory_bytes, fast.disk_bytes) == (fitted.memory_bytes, fitted.disk_bytes)
    # every cell's calcium is recorded once per frame interval over the search horizon, and
    # the batched integrator pays per step (a 12th attack run: 36000 s at 0.01 s frames was
    # estimated at 0.35 GiB and 14 s and took 1.47 GB and 110 s), in both window modes
    long = {"n_videos": 1, "n_frames": 12, "height": 96, "width": 96, "mean_cell_area_px": 60,
            "n_val_videos": 0, "n_test_videos": 0, "dt_s": 0.01, "frame_interval_s": 0.01,
            "search_horizon_s": 36000}  # fmt: skip
    for window in ("activity", "fixed"):
        est = estimate_simulate(
            validate_params("simulate", {**long, "acquisition_window": window}), JobInputs()
        )
        assert est.memory_bytes >= 1.47e9 and est.time_s >= 80, (window, est)
    coarse = estimate_simulate(validate_params("simulate", {**long, "frame_interval_s": 1.0}),
                               JobInputs())  # fmt: skip
    assert coarse.parts["memory:recorded calcium"] < est.parts["memory:recorded calcium"] / 50


def test_costs_bench_runs_a_real_job_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m calseg.bench costs`` (BENCHMARKS.md): one tiny real job, measured."""
    import calseg.bench_costs as bench

    monkeypatch.setattr(
        bench, "cases", lambda quick: [("simulate tiny", "simulate", {**SIM, "n_frames": 3}, None)]
    )
    (row,) = bench.bench_costs(quick=True)
    assert row["state"] == "succeeded", row["error"]
    assert row["measured"]["memory_bytes"] > 50 * 1024**2 and row["measured"]["disk_bytes"] > 0
    assert row["estimate"]["memory_bytes"] >= row["measured"]["memory_bytes"]
    assert "simulate tiny" in bench._format_row(row)


def _fresh_database(backend: str, tmp_path: Path, request: Any, name: str) -> str:
    """The URL of an empty database of ``backend``: a SQLite file, or a schema of its own on
    the machine's PostgreSQL (``pg_admin``), dropped when the test ends."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    import uuid

    from sqlalchemy import text

    admin = request.getfixturevalue("pg_admin")
    schema = f"calseg_{name}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    request.addfinalizer(drop)
    base = admin.url.render_as_string(hide_password=False)
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_parallel_submissions_never_pass_the_quota(backend, tmp_path, request) -> None:
    """A new-user check sent 12 submissions at once against a quota of 3 and got 9 jobs in:
    each request counted the queued jobs before any other had inserted. Admission and insert
    are now one step per user (jobs._lock_owner). 12 threads, each with its own session, on
    the embedded SQLite file and on the machine's PostgreSQL: exactly 3 get in."""
    import threading

    from calseg.service.auth import create_user
    from calseg.service.costs import QuotaExceeded
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.jobs import submit_job
    from calseg.service.models import Job, User

    url = _fresh_database(backend, tmp_path, request, "quota")
    upgrade_database(url)
    with session_scope(url) as s:
        user = create_user(s, "bob")
        user.max_queued_jobs = 3
        s.commit()
        user_id = user.id
    settings = Settings(database_url=url, artifact_dir=tmp_path / "art")
    start = threading.Barrier(12)
    outcomes: list[str] = []

    def submit() -> None:
        with session_scope(url) as s:
            owner = s.get(User, user_id)
            start.wait()
            try:
                params = {"n_videos": 3, "n_frames": 4}
                submit_job(s, "simulate", params, enqueue=lambda j, c=None: None,
                           owner=owner, settings=settings)  # fmt: skip
                outcomes.append("queued")
            except QuotaExceeded:
                outcomes.append("quota")

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["queued"] * 3 + ["quota"] * 9, outcomes
    with session_scope(url) as s:
        assert s.query(Job).filter(Job.owner_id == user_id).count() == 3


def test_each_user_has_an_embedding_cache_of_their_own(
    client: TestClient,  # noqa: F811
    admin: dict[str, str],
) -> None:
    """A sixth attack run: the embedding cache, keyed by frames and model only, told bob ("all
    2 frames from the embedding cache", and its speed) that alice had run the same frames. Now
    a job's cache is its owner's folder (``user-<id>``); bob's run of the same file embeds
    its frames anew, alice's second run finds hers."""
    rng = np.random.default_rng(9)
    frames = rng.normal(300, 5, (8, 32, 32))
    yy, xx = np.mgrid[0:32, 0:32]
    frames[4:6][:, (yy - 16) ** 2 + (xx - 16) ** 2 < 16] += 400  # a cell lights up: prompts
    data = _tiff_bytes(frames.astype(np.uint16))
    bob = {"Authorization": f"Bearer {admin['bob']}"}
    cache = get_settings().embedding_cache_dir

    def run_sam2(headers: dict | None = None) -> str:
        """The job's detail as its owner reads it (log included)."""
        rec = client.post("/api/recordings", files={"file": ("same.tif", data)}, headers=headers)
        params = {"recording_id": rec.json()["id"], "method": "sam2", "image_size": 64}
        job = client.post("/api/jobs", json={"kind": "infer", "params": params}, headers=headers)
        assert job.status_code == 201, job.text
        assert _run(job.json()["id"]) == "succeeded"
        return client.get(f"/api/jobs/{job.json()['id']}", headers=headers).text

    def entries() -> dict[str, int]:
        return {d.name: len(list(d.rglob("*.pt"))) for d in cache.iterdir()}

    assert "from the embedding cache" not in run_sam2()
    with session_scope() as session:
        ids = {u.name: u.id for u in session.query(User).all()}
    alice, bobs = f"user-{ids['alice']}", f"user-{ids['bob']}"
    assert entries() == {alice: 2}  # the two frames with prompts
    seen = run_sam2(bob)
    assert "from the embedding cache" not in seen and "uncached frames" in seen
    assert entries() == {alice: 2, bobs: 2}  # bob's frames were embedded, not read from alice's
    assert "all 2 frames from the embedding cache" in run_sam2()  # alice's own, again
    assert entries() == {alice: 2, bobs: 2}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_nul_characters_and_lone_surrogates_are_clear_errors_not_500(
    backend, tmp_path, request, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 9th attack run: ids are free strings down to the database driver and the JSON
    encoder. On PostgreSQL a NUL character (``%00`` in a path, ``\\u0000`` in JSON) made the
    routes' lookups raise DataError (500, a plain-text body); on both databases a lone
    surrogate (``"\\ud800"``) echoed by a 422's message made the error handler raise while
    encoding it (500). Every answer here must be a 4xx with a JSON ``detail``."""

    from fastapi.testclient import TestClient

    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.settings import get_settings

    url = _fresh_database(backend, tmp_path, request, "nul")
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    from api.main import _limiters, app, enqueue_dep

    for limiter in _limiters.values():
        limiter.reset()
    try:
        upgrade_database(url)
        with session_scope(url) as s:
            _, token = create_token(s, create_user(s, "alice", is_admin=True), "tests")
        app.dependency_overrides[enqueue_dep] = lambda: lambda job, countdown=None: None
        json_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        with TestClient(app, headers={"Authorization": f"Bearer {token}"},
                        raise_server_exceptions=False) as c:  # fmt: skip
            answers = {
                "GET job %00": c.get("/api/jobs/abc%00"),
                "DELETE job %00": c.delete("/api/jobs/abc%00"),
                "cancel %00": c.post("/api/jobs/abc%00/cancel"),
                "retry %00": c.post("/api/jobs/abc%00/retry"),
                "GET recording %00": c.get("/api/recordings/abc%00"),
                "frame %00": c.get("/api/recordings/abc%00/frames/0.png"),
                "metrics %00": c.get("/api/metrics", params={"dataset_job_id": "a\x00"}),
                "limits %00": c.get("/api/users/a%00/limits"),
            }
            for name, raw in {
                "infer NUL": b'{"kind":"infer","params":{"recording_id":"a\\u0000"}}',
                "infer surrogate": b'{"kind":"infer","params":{"recording_id":"\\ud800"}}',
                "finetune surrogate": b'{"kind":"finetune","params":{"dataset_job_id":"\\udfff"}}',
                "kind surrogate": b'{"kind":"\\ud800","params":{}}',
                "key surrogate": b'{"kind":"simulate","params":{"\\ud800":1}}',
            }.items():
                answers[name] = c.post("/api/jobs", content=raw, headers=json_headers)
                answers[name + " (estimate)"] = c.post(
                    "/api/jobs/estimate", content=raw, headers=json_headers
                )
        for name, r in answers.items():
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str), (name, r.text)
        assert answers["GET job %00"].status_code == 400
        assert "NUL" in answers["GET job %00"].json()["detail"]
        assert answers["infer NUL"].status_code == 422
        assert "params.recording_id" in answers["infer NUL"].json()["detail"]
        assert "lone surrogate" in answers["infer surrogate"].json()["detail"]
    finally:
        app.dependency_overrides.clear()
        get_settings.cache_clear()
