"""Users, tokens and ownership through the REST API (TestClient, temporary SQLite database).

``alice`` owns the data, ``bob`` is another user, ``root`` an admin. Every route of the app is
enumerated: a route that is not public must refuse a request without a token (401), answer bob
404 for alice's ids, and serve the admin; a new route breaks
:func:`test_every_route_needs_a_token_and_hides_other_users_data` until it is listed in
:data:`ROUTES` with its owner check.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from test_service_api import (  # noqa: F401 - client: a fixture
    SIM,
    _run,
    _tiff_bytes,
    client,
    register_finetune,
)

from calseg.service.auth import (
    TOKEN_RE,
    authenticate,
    create_token,
    create_user,
    ensure_local_token,
    hash_token,
    read_token_file,
    revoke_token,
)
from calseg.service.db import session_scope
from calseg.service.models import ApiToken, Artifact, Job, Recording
from calseg.service.settings import get_settings
from calseg.service.store import LocalArtifactStore

PUBLIC = {("GET", "/api/health"), ("GET", "/api/ready"), ("GET", "/")}
"""Routes that answer without a token (besides /openapi.json, /docs and /static)."""

ROUTES: dict[tuple[str, str], dict[str, Any] | str | None] = {
    # routes without an id: only the token is checked here (listings: test_listings_...)
    ("GET", "/api/me"): None,
    ("GET", "/api/job-kinds"): None,
    ("POST", "/api/jobs"): None,
    ("POST", "/api/recordings"): None,
    ("GET", "/api/jobs"): "listing",
    ("GET", "/api/recordings"): "listing",
    ("GET", "/api/models"): "listing",
    ("POST", "/api/jobs/estimate"): None,  # the caller's own estimate (test_service_limits)
    ("GET", "/api/users"): "admin only (403 otherwise: test_service_limits)",
    ("PUT", "/api/users/{name}/limits"): "admin only (403 otherwise: test_service_limits)",
    ("PATCH", "/api/users/{name}/limits"): "admin only (403 otherwise: test_service_limits)",
    ("GET", "/api/users/{name}/limits"): {"user": "alice", "admin": 200},
    # routes on alice's ids: bob 404, the admin as given
    ("GET", "/api/metrics"): {"query": {"model_job_id": "@failed"}, "admin": 200},
    ("GET", "/api/jobs/{job_id}"): {"job": "infer", "admin": 200},
    ("GET", "/api/jobs/{job_id}/metrics"): {"job": "infer", "admin": 200},
    ("GET", "/api/jobs/{job_id}/artifacts/{name:path}"): {
        "job": "infer",
        "name": "labels.tif",
        "admin": 200,
    },
    ("GET", "/api/jobs/{job_id}/frames/{t}.png"): {"job": "infer", "t": 2, "admin": 200},
    ("GET", "/api/jobs/{job_id}/cells/at"): {
        "job": "infer",
        "query": {"t": 1, "x": 5, "y": 2},
        "admin": 200,
    },
    ("GET", "/api/jobs/{job_id}/cells"): {"job": "infer", "admin": 200},
    ("GET", "/api/jobs/{job_id}/cells/{cell_id}/trace"): {
        "job": "infer",
        "cell_id": 7,
        "admin": 200,
    },
    ("GET", "/api/recordings/{recording_id}"): {"rec": "rec", "admin": 200},
    ("GET", "/api/recordings/{recording_id}/frames/{t}.png"): {"rec": "rec", "t": 0, "admin": 200},
    # state-changing routes last (in this order): cancel a queued job, retry a failed one,
    # rerun it, delete a recording no job uses, delete the job cancelled first
    ("POST", "/api/jobs/{job_id}/cancel"): {"job": "queued", "admin": 200},
    ("POST", "/api/jobs/{job_id}/retry"): {"job": "failed", "admin": 200},
    ("POST", "/api/jobs/{job_id}/rerun"): {"job": "failed", "admin": 201},
    ("DELETE", "/api/recordings/{recording_id}"): {"rec": "spare", "admin": 204},
    ("DELETE", "/api/jobs/{job_id}"): {"job": "queued", "admin": 204},
}


def _app_routes() -> set[tuple[str, str]]:
    from api.main import app

    def walk(routes):  # noqa: ANN001, ANN202
        for route in routes:
            # an included router (api.routes.*): FastAPI keeps it as one entry of app.routes
            # (no prefixes here, so its routes' paths are the app's)
            inner = getattr(route, "original_router", None)
            yield from walk(inner.routes) if inner is not None else [route]

    out = set()
    for route in walk(app.routes):
        if isinstance(route, APIRoute):
            for method in route.methods:
                out.add((method, route.path))
    return out


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def users(client: TestClient) -> dict[str, str]:  # noqa: F811 - the imported fixture
    """Tokens of alice (the ``client`` fixture's user), bob and the admin root."""
    with session_scope() as session:
        _, bob = create_token(session, create_user(session, "bob"), "tests")
        _, root = create_token(session, create_user(session, "root", is_admin=True), "tests")
    return {"alice": client.token, "bob": bob, "root": root}


def _upload(client: TestClient, name: str, frames: np.ndarray, token: str | None = None) -> dict:  # noqa: F811
    kwargs = {"headers": _headers(token)} if token else {}
    r = client.post(
        "/api/recordings", files={"file": (name, _tiff_bytes(frames), "image/tiff")}, **kwargs
    )
    assert r.status_code in (200, 201), r.text
    return r.json()


def _alice_world(client: TestClient, tmp_path: Path) -> dict[str, str]:  # noqa: F811
    """Alice's data: two recordings, a succeeded infer job on the first (labels.tif,
    traces.csv, a metric), a queued and a failed simulate job. Returns their ids."""
    from calseg.io.labels import write_label_stack
    from calseg.io.tables import write_traces_csv
    from calseg.service.models import Metric

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4000, (3, 12, 16), dtype=np.uint16)
    rec = _upload(client, "a.tif", frames)
    spare = _upload(client, "b.tif", frames + 1)
    labels = np.zeros((3, 12, 16), np.uint32)
    labels[1, 2:4, 5:7] = 7
    f = rng.uniform(100, 200, (1, 3))
    settings = get_settings()
    store = LocalArtifactStore(settings.artifact_dir)
    with session_scope() as session:
        rec_row = session.get(Recording, rec["id"])
        infer = Job(
            kind="infer",
            state="succeeded",
            owner_id=client.user_id,
            params={"recording_id": rec["id"], "method": "baseline"},
            result={"source": {"type": "recording", "relpath": rec_row.relpath}},
        )
        queued = Job(kind="simulate", state="queued", owner_id=client.user_id, params=SIM)
        failed = Job(kind="simulate", state="failed", owner_id=client.user_id, params=SIM)
        session.add_all([infer, queued, failed])
        session.flush()
        files = {
            "labels.tif": write_label_stack(tmp_path / "labels.tif", labels),
            "traces.csv": write_traces_csv(
                tmp_path / "traces.csv",
                ids=np.array([7]),
                f=f,
                f0=np.full((1, 3), 120.0),
                dff=(f - 120.0) / 120.0,
                frame_interval_s=0.5,
            ),
        }
        for name, path in files.items():
            obj = store.put(f"jobs/{infer.id}/{name}", path)
            session.add(Artifact.of_stored(infer.id, name, "file", obj))
        session.add(Metric(job_id=infer.id, name="foreground_fraction", value=0.1))
        return {
            "infer": infer.id,
            "queued": queued.id,
            "failed": failed.id,
            "rec": rec["id"],
            "spare": spare["id"],
        }


def _query(spec: dict[str, Any] | str | None, ids: dict[str, str]) -> dict[str, Any] | None:
    """The spec's query parameters, ``"@name"`` values replaced by alice's id ``name``."""
    if not isinstance(spec, dict) or "query" not in spec:
        return None
    return {
        k: ids[v[1:]] if isinstance(v, str) and v.startswith("@") else v
        for k, v in spec["query"].items()
    }


def _url(path: str, spec: dict[str, Any], ids: dict[str, str]) -> str:
    values = {
        "job_id": ids.get(spec.get("job", "")),
        "recording_id": ids.get(spec.get("rec", "")),
        "name:path": spec.get("name"),
        "t": spec.get("t"),
        "cell_id": spec.get("cell_id"),
        "name": spec.get("user"),
    }
    for key, value in values.items():
        if "{" + key + "}" in path:
            path = path.replace("{" + key + "}", str(value))
    assert "{" not in path, f"no value for a parameter of {path}: add it to ROUTES"
    return path


def test_every_route_needs_a_token_and_hides_other_users_data(
    client: TestClient,  # noqa: F811
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    routes = _app_routes()
    unlisted = routes - PUBLIC - set(ROUTES)
    assert not unlisted, f"routes without an ownership test (add them to ROUTES): {unlisted}"
    assert not set(ROUTES) - routes, f"ROUTES lists routes the app lacks: {set(ROUTES) - routes}"
    ids = _alice_world(client, tmp_path)
    anonymous = TestClient(client.app)

    for (method, path), spec in ROUTES.items():
        url = _url(path, spec, ids) if isinstance(spec, dict) else path
        query = _query(spec, ids)
        r = anonymous.request(method, url, params=query)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "var/token" in r.json()["detail"] and "calseg tokens create" in r.json()["detail"]
        guesser = TestClient(client.app, client=(f"10.0.0.{len(path)}", 1))  # own rate limit
        r = guesser.request(method, url, params=query, headers=_headers("cs_" + "x" * 43))
        assert r.status_code == 401, (method, path)
        if not isinstance(spec, dict):
            continue
        # bob: alice's ids do not exist for him, exactly like ids that exist for nobody
        r = client.request(method, url, params=query, headers=_headers(users["bob"]))
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "there is no" in r.json()["detail"], r.text
        if method == "GET":  # alice herself
            r = client.request(method, url, params=query)
            assert r.status_code == 200, (method, path, r.status_code, r.text)

    # nothing of alice's was changed by bob's attempts
    assert client.get(f"/api/jobs/{ids['queued']}").json()["state"] == "queued"
    assert client.get(f"/api/jobs/{ids['failed']}").json()["state"] == "failed"
    assert client.get(f"/api/recordings/{ids['spare']}").status_code == 200
    assert client.queued == []

    for (method, path), spec in ROUTES.items():  # the admin sees and touches everything
        if not isinstance(spec, dict):
            continue
        url = _url(path, spec, ids)
        r = client.request(method, url, params=_query(spec, ids), headers=_headers(users["root"]))
        assert r.status_code == spec["admin"], (method, path, r.status_code, r.text)
    assert client.get(f"/api/jobs/{ids['queued']}").status_code == 404  # cancelled, deleted
    assert client.get(f"/api/recordings/{ids['spare']}").status_code == 404
    rerun = [j for j in client.get("/api/jobs", headers=_headers(users["root"])).json()["items"]]
    assert any(j["owner_id"] != client.user_id for j in rerun)  # the admin owns the rerun


def test_listings_show_only_the_callers_data(
    client: TestClient,  # noqa: F811
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    ids = _alice_world(client, tmp_path)
    bob, root = _headers(users["bob"]), _headers(users["root"])
    alice_jobs = {ids["infer"], ids["queued"], ids["failed"]}
    assert {j["id"] for j in client.get("/api/jobs").json()["items"]} == alice_jobs
    listing = client.get("/api/jobs", headers=bob).json()
    assert listing["total"] == 0 and listing["items"] == []
    admin_view = client.get("/api/jobs", headers=root).json()["items"]
    assert {j["id"] for j in admin_view} == alice_jobs
    assert {(j["owner_id"], j["owner_name"]) for j in admin_view} == {(client.user_id, "alice")}
    assert len(client.get("/api/recordings").json()) == 2
    assert client.get("/api/recordings", headers=bob).json() == []
    assert len(client.get("/api/recordings", headers=root).json()) == 2
    # bob's own upload is his: alice does not see it, the admin does
    mine = _upload(client, "bob.tif", np.ones((3, 10, 10), np.uint16), users["bob"])
    assert [r["id"] for r in client.get("/api/recordings", headers=bob).json()] == [mine["id"]]
    assert mine["id"] not in {r["id"] for r in client.get("/api/recordings").json()}
    everyone = client.get("/api/recordings", headers=root).json()
    assert sorted(r["owner_name"] for r in everyone) == ["alice", "alice", "bob"]
    assert client.get(f"/api/jobs/{ids['infer']}", headers=root).json()["owner_name"] == "alice"


def test_references_to_other_users_ids_are_refused_like_missing_ones(
    client: TestClient,  # noqa: F811
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    ids = _alice_world(client, tmp_path)
    bob = _headers(users["bob"])
    cases = [
        ("infer", {"recording_id": ids["rec"], "method": "baseline"}, "no recording"),
        ("finetune", {"dataset_job_id": ids["failed"]}, "there is no job"),
        ("evaluate", {"dataset_job_id": ids["failed"]}, "there is no job"),
        ("infer", {"dataset_job_id": ids["queued"], "video_id": "v000"}, "there is no job"),
    ]
    for kind, params, expected in cases:
        r = client.post("/api/jobs", json={"kind": kind, "params": params}, headers=bob)
        assert r.status_code == 422 and expected in r.json()["detail"], (kind, r.text)
        # ... the same answer as for an id that exists for nobody
        missing = {k: ("nope" if k.endswith("_id") else v) for k, v in params.items()}
        r2 = client.post("/api/jobs", json={"kind": kind, "params": missing}, headers=bob)
        assert r2.status_code == 422
        assert r2.json()["detail"] == r.json()["detail"].replace(
            ids["rec"] if kind == "infer" and "recording_id" in params else "\0", "nope"
        ).replace(params.get("dataset_job_id", "\0"), "nope")
    # alice may use her own recording; the job is hers
    r = client.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": ids["rec"], "method": "baseline"}},
    )
    assert r.status_code == 201 and r.json()["owner_id"] == client.user_id
    assert client.get("/api/me").json()["id"] == client.user_id


def test_me_and_token_errors(client: TestClient, users: dict[str, str]) -> None:  # noqa: F811
    me = client.get("/api/me").json()
    assert me == {"id": client.user_id, "name": "alice", "is_admin": False}
    root = client.get("/api/me", headers=_headers(users["root"])).json()
    assert root["name"] == "root" and root["is_admin"] is True
    anonymous = TestClient(client.app)
    for headers, expected in [
        ({}, "missing API token"),
        ({"Authorization": "Basic YWxpY2U6eA=="}, "malformed Authorization header"),
        ({"Authorization": "Bearer"}, "malformed Authorization header"),
        (_headers("cs_short"), "invalid or revoked"),
        (_headers(users["bob"] + "x"), "invalid or revoked"),
    ]:
        r = anonymous.get("/api/me", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert expected in r.json()["detail"], r.text
    # public routes need no token
    assert anonymous.get("/api/health").status_code == 200
    assert anonymous.get("/").status_code == 200
    schema = anonymous.get("/openapi.json").json()  # the token is documented for clients
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/api/me"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/api/health"]["get"]
    assert anonymous.get("/docs").status_code == 200
    assert anonymous.get("/static/app.js").status_code == 200
    # a revoked token stops working at once
    with session_scope() as session:
        bob_row = session.query(ApiToken).filter_by(token_sha256=hash_token(users["bob"])).one()
        revoke_token(session, bob_row.id[:8])
    r = anonymous.get("/api/me", headers=_headers(users["bob"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_repeated_bad_tokens_are_rate_limited(
    client: TestClient,  # noqa: F811
    users: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALSEG_AUTH_MAX_FAILURES", "3")
    monkeypatch.setenv("CALSEG_AUTH_WINDOW_S", "1.5")
    get_settings.cache_clear()
    bad = _headers("cs_" + "A" * 43)
    for _ in range(3):
        assert client.get("/api/jobs", headers=bad).status_code == 401
    r = client.get("/api/jobs", headers=bad)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= 2
    assert "too many invalid API tokens" in r.json()["detail"]
    # bad tokens from the address are held off until the window has passed; a VALID token
    # from the same address is never locked out (issue 13 item 7: it was 429)
    assert client.get("/api/jobs", headers=bad).status_code == 429
    assert client.get("/api/jobs").status_code == 200
    assert client.get("/api/me").json()["name"] == "alice"
    malformed = client.get("/api/jobs", headers={"Authorization": "Basic eA=="})
    assert malformed.status_code == 429  # malformed headers count as bad tokens too
    assert TestClient(client.app).get("/api/health").status_code == 200  # public still answers
    time.sleep(1.6)
    assert client.get("/api/jobs", headers=bad).status_code == 401
    assert client.get("/api/jobs").status_code == 200
    # requests without a token (a page opened without it) never count
    anonymous = TestClient(client.app)
    for _ in range(6):
        assert anonymous.get("/api/jobs").status_code == 401
    assert client.get("/api/jobs").status_code == 200


def test_job_kinds_are_json_schemas_with_defaults(client: TestClient) -> None:  # noqa: F811
    from calseg.segment.finetune import FinetuneConfig
    from calseg.simulate.config import SimulationConfig

    kinds = client.get("/api/job-kinds").json()
    assert set(kinds) == {"simulate", "finetune", "infer", "evaluate"}
    for kind, schema in kinds.items():
        props = schema["properties"]
        required = set(schema.get("required", []))
        without = {n for n, p in props.items() if "default" not in p}
        assert without == required, (kind, without, required)
    sim, ft = kinds["simulate"]["properties"], kinds["finetune"]["properties"]
    assert sim["n_videos"]["default"] == SimulationConfig().n_videos
    assert sim["pattern_classes"]["default"] == list(SimulationConfig().pattern_classes)
    assert ft["steps"]["default"] == FinetuneConfig().steps
    assert ft["lr"]["exclusiveMinimum"] == 0
    assert kinds["finetune"]["required"] == ["dataset_job_id"]
    method = kinds["infer"]["properties"]["method"]
    assert method["default"] == "auto" and method["enum"] == ["auto", "classical", "sam2"]
    # what auto means here, and why (no SAM2 weights configured -> classical)
    from calseg.service.settings import get_settings

    auto = method["x-auto"]
    assert auto["method"] in ("classical", "sam2") and auto["reason"].startswith(auto["label"])
    if get_settings().sam2_checkpoint is None:
        assert auto["method"] == "classical" and "CALSEG_SAM2_CHECKPOINT" in auto["reason"]


def test_json_bodies_are_size_limited(
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALSEG_MAX_JSON_BYTES", "2000")
    get_settings.cache_clear()
    big = {"kind": "simulate", "params": {"pattern_classes": ["waves"] * 400}}
    r = client.post("/api/jobs", json=big)
    assert r.status_code == 413 and "2000 bytes" in r.json()["detail"], r.text
    # without a Content-Length (chunked) the limit holds while reading
    chunks = (b'{"kind": "simulate", "params": {"x": "' + b"y" * 1000, b"y" * 1500, b'"}}')
    r = client.post("/api/jobs", content=iter(chunks), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.queued == []
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 201  # a normal body passes


def test_uploads_per_owner_names_and_content_type(
    client: TestClient,  # noqa: F811
    users: dict[str, str],
) -> None:
    frames = np.arange(4 * 9 * 11, dtype=np.uint16).reshape(4, 9, 11)
    data = _tiff_bytes(frames)
    r = client.post(
        "/api/recordings", files={"file": ("../../../etc/Zürich 東京 ü.tif", data, "image/tiff")}
    )
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["filename"] == "Zurich_u.tif" and not first["duplicate"]
    assert first["message"] is None
    stored = get_settings().artifact_dir / "recordings" / first["id"] / "Zurich_u.tif"
    assert stored.read_bytes() == data
    r = client.post("/api/recordings", files={"file": ("copy.tif", data, "image/tiff")})
    assert r.status_code == 200 and r.json()["id"] == first["id"] and r.json()["duplicate"]
    assert "uploaded this file" in r.json()["message"] and first["id"] in r.json()["message"]
    # bob's copy of the same file is his own recording
    r = client.post(
        "/api/recordings",
        files={"file": ("copy.tif", data, "image/tiff")},
        headers=_headers(users["bob"]),
    )
    assert r.status_code == 201 and r.json()["id"] != first["id"] and not r.json()["duplicate"]
    r = client.post(
        "/api/recordings?filename=x.tif", content=data, headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], r.text


def test_delete_recording(client: TestClient, tmp_path: Path) -> None:  # noqa: F811
    rec = _upload(client, "d.tif", np.ones((3, 10, 12), np.uint16))
    folder = get_settings().artifact_dir / "recordings" / rec["id"]
    assert folder.is_dir()
    job = client.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": rec["id"], "method": "baseline"}},
    ).json()
    r = client.delete(f"/api/recordings/{rec['id']}")
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    # a simulate job fitted to the recording uses it too
    sim = client.post(
        "/api/jobs", json={"kind": "simulate", "params": {**SIM, "recording_id": rec["id"]}}
    )
    assert sim.status_code == 201, sim.text
    r = client.delete(f"/api/recordings/{rec['id']}")
    assert r.status_code == 409 and sim.json()["id"] in r.json()["detail"]
    assert client.post(f"/api/jobs/{sim.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/api/recordings/{rec['id']}").status_code == 204
    assert client.get(f"/api/recordings/{rec['id']}").status_code == 404
    assert not folder.exists()
    assert client.delete(f"/api/recordings/{rec['id']}").status_code == 404
    # uploading it again makes a new recording (the old one is gone)
    again = _upload(client, "d.tif", np.ones((3, 10, 12), np.uint16))
    assert again["id"] != rec["id"] and not again["duplicate"]


def test_delete_job(client: TestClient, users) -> None:  # noqa: F811
    """A new user's check: DELETE /api/jobs/{id} answered 405, so nothing but recordings could
    be removed and one user's finished jobs filled the disk for everyone. A job that has ended
    is deleted with its metrics and files (204); 409 while it, or a job using it, is queued or
    running; another user's job is 404, as for every other route."""
    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    r = client.delete(f"/api/jobs/{sim['id']}")
    assert r.status_code == 409 and "cancel it or wait" in r.json()["detail"], r.text
    assert _run(sim["id"]) == "succeeded"
    folder = get_settings().artifact_dir / "jobs" / sim["id"]
    assert folder.is_dir() and any(folder.iterdir())
    uses = client.post(
        "/api/jobs", json={"kind": "finetune", "params": {"dataset_job_id": sim["id"]}}
    ).json()
    r = client.delete(f"/api/jobs/{sim['id']}")
    assert r.status_code == 409 and "used by 1 queued or running job" in r.json()["detail"]
    assert (
        client.delete(f"/api/jobs/{sim['id']}", headers=_headers(users["bob"])).status_code == 404
    )
    assert client.post(f"/api/jobs/{uses['id']}/cancel").status_code == 200
    assert client.delete(f"/api/jobs/{sim['id']}").status_code == 204
    assert client.get(f"/api/jobs/{sim['id']}").status_code == 404
    assert client.get(f"/api/jobs/{sim['id']}/metrics").status_code == 404
    assert not folder.exists()
    assert client.delete(f"/api/jobs/{sim['id']}").status_code == 404
    r = client.post(f"/api/jobs/{uses['id']}/rerun")  # its dataset is gone: refused, clearly
    assert r.status_code == 422 and f"there is no job {sim['id']}" in r.json()["detail"], r.text
    assert client.delete(f"/api/jobs/{uses['id']}").status_code == 204  # a cancelled job


def _simulate_job_context(client: TestClient):  # noqa: F811, ANN202 - (job, JobContext)
    """A simulate job (its JSON record) marked running, as :func:`run_job` leaves it, and the
    JobContext a runner would get for it."""
    from sqlalchemy import update

    from calseg.service.context import JobContext
    from calseg.service.schemas import validate_params

    job = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    settings = get_settings()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(state="running"))
        row = session.get(Job, job["id"])
        session.expunge(row)
    ctx = JobContext(
        row,
        validate_params("simulate", SIM),
        url=settings.database_url,
        store=LocalArtifactStore(settings.artifact_dir),
        settings=settings,
    )
    return job, ctx


def test_training_curve_metrics_have_steps(client: TestClient) -> None:  # noqa: F811
    """The fine-tune runner's on_history callback stores loss/IoU points with their steps,
    buffered (no write before the interval or flush), and the metrics endpoint serves them."""
    from calseg.service.runners import TrainingCurve

    job, ctx = _simulate_job_context(client)
    try:
        curve = TrainingCurve(ctx, interval_s=3600)
        for step in (1, 2, 3):
            curve({"kind": "train", "step": step, "loss": 1.0 / step, "train_iou": 0.1 * step})
        curve({"kind": "val", "step": 2, "val_mean_iou": 0.25, "per_video": {}})
        curve({"kind": "skipped", "step": 4, "reason": "non-finite loss"})
        assert client.get(f"/api/jobs/{job['id']}/metrics").json() == []  # buffered
        curve.flush()
        curve({"kind": "train", "step": 5, "loss": float("nan"), "train_iou": 0.5})
        curve.flush()
    finally:
        ctx.close()
    rows = client.get(f"/api/jobs/{job['id']}/metrics").json()
    loss = [(m["step"], m["value"]) for m in rows if m["name"] == "loss"]
    assert loss == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (5, None)]
    val = [m for m in rows if m["name"] == "val_iou"]
    assert val == [{"name": "val_iou", "value": 0.25, "model": None, "subset": "val", "step": 2}]
    only = client.get(f"/api/jobs/{job['id']}/metrics", params={"name": "train_iou"}).json()
    assert [m["step"] for m in only] == [1, 2, 3, 5] and {m["subset"] for m in only} == {"train"}


def test_training_curve_keeps_at_most_max_curve_points_steps(client: TestClient) -> None:  # noqa: F811
    """A new user's check: every step stored about 6.5 metric rows (19,466 for 3000 steps, a
    1.5 MB job record the page polls every 2 s; an admitted 10^6-step run would have stored
    6.5 M). Of a 3000-step run the curve keeps every 6th step and the last (500 steps), and
    every validation."""
    from calseg.service.runners import MAX_CURVE_POINTS, TrainingCurve

    job, ctx = _simulate_job_context(client)
    try:
        curve = TrainingCurve(ctx, interval_s=3600, steps=3000)
        for step in range(1, 3001):
            curve({"kind": "train", "step": step, "loss": 1.0 / step})
            if step % 1000 == 0:
                curve({"kind": "val", "step": step, "val_mean_iou": 0.5})
        curve.flush()
    finally:
        ctx.close()
    rows = client.get(f"/api/jobs/{job['id']}/metrics").json()
    steps = [m["step"] for m in rows if m["name"] == "loss"]
    assert len(steps) == MAX_CURVE_POINTS and steps[0] == 6 and steps[-1] == 3000
    assert [m["step"] for m in rows if m["name"] == "val_iou"] == [1000, 2000, 3000]


def test_provenance_of_jobs(client: TestClient) -> None:  # noqa: F811
    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    assert _run(sim["id"]) == "succeeded"
    sim = client.get(f"/api/jobs/{sim['id']}").json()
    prov = sim["provenance"]
    assert prov["code_version"] == sim["code_version"] and prov["code_version"].startswith("0.")
    assert prov["seeds"] == {"seed": 3} and prov["params"] == sim["params"]
    assert prov["inputs"] == [] and "numpy" in prov["libraries"]
    manifest = next(a for a in sim["artifacts"] if a["name"] == "manifest.json")
    video = next(v for v in sim["result"]["videos"] if v["split"] == "test")["id"]
    params = {"dataset_job_id": sim["id"], "video_id": video, "method": "baseline"}
    inf = client.post("/api/jobs", json={"kind": "infer", "params": params}).json()
    assert _run(inf["id"]) == "succeeded"
    prov = client.get(f"/api/jobs/{inf['id']}").json()["provenance"]
    assert prov["inputs"] == [
        {
            "job_id": sim["id"],
            "name": "manifest.json",
            "kind": "dataset-manifest",
            "sha256": manifest["sha256"],
        }
    ]
    assert "base_checkpoint" in prov  # None here: no CALSEG_SAM2_CHECKPOINT is set
    # an uploaded recording is an input with its sha256
    rec = _upload(
        client, "p.tif", np.random.default_rng(2).integers(0, 900, (4, 24, 24), np.uint16)
    )
    inf = client.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": rec["id"], "method": "baseline"}},
    ).json()
    assert _run(inf["id"]) == "succeeded", client.get(f"/api/jobs/{inf['id']}").json()["error"]
    done = client.get(f"/api/jobs/{inf['id']}").json()
    prov = done["provenance"]
    assert [(i["kind"], i["sha256"]) for i in prov["inputs"]] == [("recording", rec["sha256"])]
    # rerun: same stored parameters, same inputs, the same label stack bit for bit
    again = client.post(f"/api/jobs/{inf['id']}/rerun").json()
    assert again["params"] == done["params"] and _run(again["id"]) == "succeeded"
    again = client.get(f"/api/jobs/{again['id']}").json()
    assert again["provenance"]["inputs"] == prov["inputs"]

    def labels_sha(job: dict) -> str:
        return next(a["sha256"] for a in job["artifacts"] if a["name"] == "labels.tif")

    assert labels_sha(again) == labels_sha(done)


def test_models_listing(client: TestClient, users: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A succeeded finetune job (registered directly: fine-tuning runs in the integration
    test) is listed with its base configuration, dataset, metrics and checkpoint sha256."""
    from calseg.service.models import Metric

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    job_id, obj = register_finetune(
        client,
        ckpt,
        params={"dataset_job_id": "d1", "model": "sam2.1_hiera_t", "steps": 4},
        # a fine-tune that kept its (pretrained) initial model: no step improved on it
        result={
            "base_checkpoint": None,
            "best_step": 0,
            "model_info": {"random_weights": False, "config": "sam2_small_calseg"},
        },
        provenance={"inputs": [{"job_id": "d1", "name": "manifest.json", "sha256": "ab"}]},
    )
    with session_scope() as session:
        session.add(Job(kind="finetune", state="running", owner_id=client.user_id, params={}))
        session.add(Metric(job_id=job_id, name="loss", value=0.5, subset="train", step=1))
        session.add(Metric(job_id=job_id, name="final_loss", value=0.4, subset="train"))
    models = client.get("/api/models").json()
    assert [m["job_id"] for m in models] == [job_id]  # the running one is not a model yet
    m = models[0]
    # what was trained, not the request's default (params say sam2.1_hiera_t)
    assert m["base_config"] == "sam2_small_calseg" and m["parent_checkpoint"] is None
    assert m["dataset_job_id"] == "d1" and m["dataset_manifest_sha256"] == "ab"
    assert m["checkpoint_sha256"] == obj.sha256 and m["params"]["steps"] == 4
    assert [x["name"] for x in m["metrics"]] == ["final_loss"]  # final numbers, not the curve
    assert m["label"] == "SAM2 base, kept" and m["best_step"] == 0  # not "fine-tuned"
    assert client.get(m["checkpoint_url"]).content == b"weights"
    assert client.get("/api/models", headers=_headers(users["bob"])).json() == []
    assert len(client.get("/api/models", headers=_headers(users["root"])).json()) == 1


def test_local_token_bootstrap(tmp_path: Path) -> None:
    """The embedded default's first start: admin ``local`` + a token in a 0600 file; later
    starts reuse it; a deleted file gets a new token; a server database is left alone."""
    from calseg.service.db import upgrade_database

    url = f"sqlite:///{tmp_path / 'boot.db'}"
    upgrade_database(url)
    token_file = tmp_path / "var" / "token"
    with session_scope(url) as session:
        token, what = ensure_local_token(session, token_file)
        assert token and TOKEN_RE.match(token) and "created admin user 'local'" in what
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert read_token_file(token_file) == token
        user = authenticate(session, token)
        assert user.name == "local" and user.is_admin
        # only the sha256 is stored
        row = session.query(ApiToken).one()
        assert row.token_sha256 == hash_token(token) and token not in repr(vars(row))
        again, what = ensure_local_token(session, token_file)
        assert again == token and "using the token" in what
        token_file.unlink()
        fresh, what = ensure_local_token(session, token_file)
        assert fresh != token and "new token" in what and read_token_file(token_file) == fresh
        assert authenticate(session, token) is not None  # the old one still works
    url2 = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade_database(url2)
    with session_scope(url2) as session:
        create_user(session, "someone")
        token, what = ensure_local_token(session, tmp_path / "t2")
        assert token is None and "calseg tokens create" in what
        assert not (tmp_path / "t2").exists()


def test_metrics_per_dataset_and_model(client: TestClient, users: dict[str, str]) -> None:  # noqa: F811
    """``GET /api/metrics``: a dataset's and a model's numbers across the jobs that used them."""
    from calseg.service.models import Metric

    def job(kind: str, **params: str) -> Job:
        return Job(kind=kind, state="succeeded", owner_id=client.user_id, params=params)

    with session_scope() as session:
        d1, d2 = job("simulate"), job("simulate")
        session.add_all([d1, d2])
        session.flush()
        ft = job("finetune", dataset_job_id=d1.id)
        session.add(ft)
        session.flush()
        ev1 = job("evaluate", dataset_job_id=d1.id, model_job_id=ft.id)
        ev2 = job("evaluate", dataset_job_id=d2.id, model_job_id=ft.id)
        base = job("evaluate", dataset_job_id=d2.id)
        session.add_all([ev1, ev2, base])
        session.flush()
        session.add_all(
            [
                Metric(job_id=ft.id, name="final_loss", value=0.3, subset="train"),
                Metric(job_id=ft.id, name="loss", value=0.9, subset="train", step=1),
                Metric(job_id=ev1.id, name="iou", value=0.6, model="fine-tuned", subset="test"),
                Metric(job_id=ev1.id, name="iou", value=0.4, model="baseline", subset="test"),
                Metric(job_id=ev2.id, name="iou", value=0.5, model="fine-tuned", subset="test"),
                Metric(job_id=base.id, name="iou", value=0.2, model="base", subset="test"),
            ]
        )
        ids = {k: v.id for k, v in dict(d1=d1, d2=d2, ft=ft, ev1=ev1, ev2=ev2, base=base).items()}

    def q(**params: Any) -> list[tuple]:
        r = client.get("/api/metrics", params=params)
        assert r.status_code == 200, r.text
        return sorted((m["job_id"], m["name"], m["model"], m["value"], m["step"]) for m in r.json())

    assert q(dataset_job_id=ids["d2"], name="iou") == sorted(
        [(ids["ev2"], "iou", "fine-tuned", 0.5, None), (ids["base"], "iou", "base", 0.2, None)]
    )
    assert q(model_job_id=ids["ft"]) == sorted(
        [
            (ids["ft"], "final_loss", None, 0.3, None),
            (ids["ev1"], "iou", "fine-tuned", 0.6, None),
            (ids["ev1"], "iou", "baseline", 0.4, None),
            (ids["ev2"], "iou", "fine-tuned", 0.5, None),
        ]
    )
    assert (ids["ft"], "loss", None, 0.9, 1) in q(model_job_id=ids["ft"], curves=True)
    assert q(dataset_job_id=ids["d1"], model="baseline") == [
        (ids["ev1"], "iou", "baseline", 0.4, None)
    ]
    row = client.get("/api/metrics", params={"dataset_job_id": ids["d1"], "kind": "evaluate"})
    assert {(m["dataset_job_id"], m["model_job_id"], m["job_kind"]) for m in row.json()} == {
        (ids["d1"], ids["ft"], "evaluate")
    }
    assert client.get("/api/metrics", params={"kind": "bogus"}).status_code == 422
    bob = _headers(users["bob"])
    assert client.get("/api/metrics", headers=bob).json() == []
    r = client.get("/api/metrics", params={"model_job_id": ids["ft"]}, headers=bob)
    assert r.status_code == 404 and "there is no job" in r.json()["detail"]
    r = client.get(
        "/api/metrics", params={"model_job_id": ids["ft"]}, headers=_headers(users["root"])
    )
    assert len(r.json()) == 4


def test_token_cache_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verified token is answered from the process's cache for ``TOKEN_CACHE_S``: revoked
    by another process (a direct UPDATE here), it still works until the entry expires, then
    not; revoked with ``revoke_token`` in this process it stops at once. Unknown tokens are
    never cached, and the cache is per database."""
    from calseg.service import auth
    from calseg.service.db import upgrade_database

    monkeypatch.setattr(auth, "TOKEN_CACHE_S", 0.5)
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    upgrade_database(url)
    with session_scope(url) as session:
        user = create_user(session, "carol")
        row, token = create_token(session, user, "t")
        row2, token2 = create_token(session, user, "t2")
        assert authenticate(session, token).name == "carol"  # now cached
    with session_scope(url) as session:  # "another process" revokes: a plain UPDATE
        session.get(ApiToken, row.id).revoked_at = datetime.now(UTC)
    with session_scope(url) as session:
        cached = authenticate(session, token)
        assert cached is not None and cached.name == "carol" and cached in session
        assert authenticate(session, "cs_" + "A" * 43) is None
    time.sleep(0.6)
    with session_scope(url) as session:
        assert authenticate(session, token) is None  # expired: the database says revoked
        assert authenticate(session, token2) is not None
        revoke_token(session, row2.id)  # in this process: at once
        assert authenticate(session, token2) is None
    other = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade_database(other)
    with session_scope(url) as session:
        _, token3 = create_token(session, create_user(session, "dave"), "t")
        assert authenticate(session, token3) is not None
    with session_scope(other) as session:
        assert authenticate(session, token3) is None  # not valid on another database
