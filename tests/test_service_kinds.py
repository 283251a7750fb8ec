"""The registry of job kinds (issue 16 item 2): a kind that exists only in this test works end
to end through the real API, database and job runner.

This file is the "one module" of a new kind (its parameter model, runner and cost estimate);
the fixture's ``kinds.register(ECHO)`` is the "one registry line". Nothing else is edited: the
API validates, routes, estimates, lists (``GET /api/job-kinds``, which the page's forms read)
and stores it; ``jobs.run_job`` runs it; references to other jobs are checked from its entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import Field

from calseg.service import jobs, kinds
from calseg.service.auth import create_token, create_user
from calseg.service.costs import CostEstimate
from calseg.service.db import session_scope, upgrade_database
from calseg.service.schemas import ID_LENGTH, _Params
from calseg.service.settings import get_settings
from calseg.service.store import LocalArtifactStore

# ------------------------------------------------------------------- the kind's module


class EchoParams(_Params):
    """Parameters of an echo job: a text written ``repeat`` times."""

    text: str = Field(..., max_length=100)
    repeat: int = Field(1, ge=1, le=10)
    previous_job_id: str | None = Field(None, max_length=ID_LENGTH, description="an echo job")


def run_echo(params: EchoParams, ctx: Any) -> dict[str, Any]:
    """Write ``echo.txt`` and report its length."""
    out = ctx.workdir / "echo.txt"
    out.write_text(params.text * params.repeat)
    ctx.add_artifact("echo.txt", out, kind="report")
    ctx.add_metric("length", float(len(params.text) * params.repeat))
    return {"echo": params.text * params.repeat}


def estimate_echo(params: EchoParams, _inputs: Any, time_scale: float) -> CostEstimate:
    """A few bytes and no time."""
    size = len(params.text) * params.repeat
    return CostEstimate(50e6, size, 0.01 * time_scale, {"disk:echo.txt": size})


ECHO = kinds.JobKind(
    "echo",
    params=lambda: EchoParams,
    runner=run_echo,
    queue="cpu",
    estimate=estimate_echo,
    references={"previous_job_id": "echo"},
    description="echo a text (exists only in tests/test_service_kinds.py)",
)

# ------------------------------------------------------------------- the test


@pytest.fixture()
def echo_kind():
    kinds.register(ECHO)  # the one registry line
    yield ECHO
    kinds.unregister("echo")


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import app, enqueue_dep

    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "alice"), "tests")
    queued: list[tuple[str, str]] = []
    from calseg.service.kinds import queue_of

    app.dependency_overrides[enqueue_dep] = lambda: (
        lambda job, countdown=None: queued.append((job.id, queue_of(job.kind)))
    )
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        c.queued = queued  # type: ignore[attr-defined]
        yield c
    app.dependency_overrides.clear()
    get_settings.cache_clear()


def _run(job_id: str) -> str:
    settings = get_settings()
    return jobs.run_job(
        job_id,
        settings=settings,
        store=LocalArtifactStore(settings.artifact_dir),
        enqueue=lambda job, countdown=None: None,
    )


def test_a_kind_only_in_this_test_runs_end_to_end(client: TestClient, echo_kind) -> None:
    schemas = client.get("/api/job-kinds").json()
    assert list(schemas)[:4] == ["simulate", "finetune", "infer", "evaluate"]
    assert schemas["echo"]["properties"]["repeat"]["maximum"] == 10  # the page's form
    est = client.post("/api/jobs/estimate", json={"kind": "echo", "params": {"text": "ab"}})
    assert est.status_code == 200, est.text
    assert est.json()["estimate"]["disk_bytes"] == 2 and est.json()["fits"]

    r = client.post("/api/jobs", json={"kind": "echo", "params": {"text": "ab", "repeat": 3}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert client.queued == [(job["id"], "cpu")]  # routed to the kind's queue
    assert _run(job["id"]) == "succeeded"
    done = client.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "succeeded", done.get("error")
    assert done["result"]["echo"] == "ababab"
    assert client.get(f"/api/jobs/{job['id']}/artifacts/echo.txt").content == b"ababab"
    metrics = client.get(f"/api/jobs/{job['id']}/metrics").json()
    assert [(m["name"], m["value"]) for m in metrics] == [("length", 6.0)]
    listed = client.get("/api/jobs", params={"kind": "echo"}).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]

    # validation and references come from the registry entry too
    bad = client.post("/api/jobs", json={"kind": "echo", "params": {"text": "a", "repeat": 11}})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"][-1] == "repeat"
    missing = {"text": "a", "previous_job_id": "nope"}
    r = client.post("/api/jobs", json={"kind": "echo", "params": missing})
    assert r.status_code == 422 and "there is no job nope" in r.json()["detail"]
    chained = {"text": "a", "previous_job_id": job["id"]}
    assert client.post("/api/jobs", json={"kind": "echo", "params": chained}).status_code == 201


def test_unregistered_kinds_are_refused(client: TestClient) -> None:
    assert "echo" not in client.get("/api/job-kinds").json()
    r = client.post("/api/jobs", json={"kind": "echo", "params": {"text": "ab"}})
    assert r.status_code == 422
    assert "unknown job kind 'echo'" in r.json()["detail"]
    assert "simulate" in r.json()["detail"]  # it names the kinds there are
    with pytest.raises(kinds.UnknownKind):
        kinds.get("echo")


def test_registry_entries_are_complete() -> None:
    """Every built-in kind's parts load (the strings name real objects)."""
    for spec in kinds.KINDS.values():
        assert spec.queue in ("cpu", "gpu")
        assert callable(spec.load_runner()) and callable(spec.load_estimate())
        model = spec.parameter_model()
        for field in spec.references:
            assert field in model.model_fields, (spec.name, field)
        for target in spec.references.values():
            assert target in kinds.KINDS
    with pytest.raises(ValueError, match="1-16 characters"):
        kinds.register(kinds.JobKind("x" * 17, params=lambda: None, runner=print, queue="cpu",
                                     estimate=print))  # fmt: skip
