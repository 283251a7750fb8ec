"""REST API (api.main) with FastAPI's TestClient on a temporary SQLite database; the broker is
replaced by a recorder and jobs are run in-process where a test needs their outputs.

The ``client`` fixture sends the token of a user ``alice`` (``client.user_id``); auth and
ownership have their own tests in test_service_auth.py."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from calseg.service import jobs
from calseg.service.auth import create_token, create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.models import Job
from calseg.service.settings import Settings, get_settings
from calseg.service.store import LocalArtifactStore

SIM = {"n_videos": 3, "n_frames": 5, "height": 128, "width": 128, "seed": 3}


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_MAX_UPLOAD_BYTES", str(200_000))
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import _limiters, app, enqueue_dep

    for limiter in _limiters.values():
        limiter.reset()
    with session_scope(url) as session:
        user = create_user(session, "alice")
        _, token = create_token(session, user, "tests")
        user_id = user.id
    queued: list[tuple[str, float | None]] = []
    app.dependency_overrides[enqueue_dep] = lambda: (
        lambda job, countdown=None: queued.append((job.id, countdown))
    )
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        c.queued = queued  # type: ignore[attr-defined]
        c.user_id = user_id  # type: ignore[attr-defined]
        c.token = token  # type: ignore[attr-defined]
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


def _tiff_bytes(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, imagej=True, metadata={"axes": "TYX"})
    return buf.getvalue()


def test_health_and_ready_without_broker(client: TestClient) -> None:
    assert client.get("/api/health").json()["status"] == "ok"
    r = client.get("/api/ready")
    assert r.status_code == 503
    assert r.json()["database"] == "ok" and "not configured" in r.json()["broker"]


def test_bad_params_are_422_naming_the_field(client: TestClient) -> None:
    r = client.post("/api/jobs", json={"kind": "simulate", "params": {"n_frames": 1}})
    assert r.status_code == 422
    body = r.json()
    assert "n_frames" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "params", "n_frames"]
    r = client.post("/api/jobs", json={"kind": "simulate", "params": {"colour": "red"}})
    assert r.status_code == 422 and "colour" in r.json()["detail"]
    r = client.post("/api/jobs", json={"kind": "segmentify", "params": {}})
    assert r.status_code == 422
    r = client.post("/api/jobs", json={"kind": "infer", "params": {"method": "baseline"}})
    assert r.status_code == 422 and "recording_id" in r.json()["detail"]
    r = client.post("/api/jobs", json={"kind": "finetune", "params": {"dataset_job_id": "x"}})
    assert r.status_code == 422 and "no job x" in r.json()["detail"]
    assert client.queued == []


def _one_422_shape(r) -> dict:  # noqa: ANN001 - an httpx response
    """The API's single 422 shape: ``detail`` one string, ``errors`` a list of
    ``{"type", "loc", "msg"}`` items (README/ARCHITECTURE "Errors")."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"detail", "errors"}, body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert isinstance(body["errors"], list), body
    for e in body["errors"]:
        assert isinstance(e["loc"], list) and isinstance(e["msg"], str) and e["type"], e
    return body


def test_every_422_has_the_same_shape(client: TestClient) -> None:
    """Parameter errors, schema errors (bad kind, params not an object, invalid JSON, a
    missing query parameter) and a route's own 422 all answer ``{"detail": str, "errors":
    [...]}``; field errors carry their location."""

    def post(body: object):  # noqa: ANN202 - an httpx response
        return client.post("/api/jobs", json=body)

    body = _one_422_shape(post({"kind": "simulate", "params": {"n_frames": 1}}))
    assert (
        body["errors"][0]["loc"] == ["body", "params", "n_frames"] and "n_frames" in body["detail"]
    )
    body = _one_422_shape(post({"kind": "segmentify", "params": {}}))
    assert body["errors"][0]["loc"] == ["body", "kind"]
    detail = body["detail"]  # the registry's message names the kinds there are
    assert detail.startswith("invalid request: kind: unknown job kind 'segmentify'"), detail
    assert "use one of simulate, finetune, infer, evaluate" in detail
    body = _one_422_shape(post({"kind": "simulate", "params": [1, 2]}))
    assert body["errors"][0]["loc"] == ["body", "params"] and "params: " in body["detail"]
    body = _one_422_shape(
        client.post("/api/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    )
    assert body["errors"][0]["type"] == "json_invalid" and "JSON" in body["detail"]
    body = _one_422_shape(client.get("/api/jobs", params={"state": "bogus"}))  # HTTPException
    assert body["errors"] == [] and "unknown state 'bogus'" in body["detail"]
    body = _one_422_shape(post({"kind": "finetune", "params": {"dataset_job_id": "x"}}))
    assert body["errors"] == [] and "no job x" in body["detail"]  # JobReferenceError
    body = _one_422_shape(client.get("/api/jobs", params={"limit": "many"}))
    assert body["errors"][0]["loc"] == ["query", "limit"] and "query.limit" in body["detail"]
    # ... and the OpenAPI document says so
    schema = client.get("/openapi.json").json()["components"]["schemas"]["HTTPValidationError"]
    assert schema["properties"]["detail"]["type"] == "string"
    assert schema["properties"]["errors"]["type"] == "array"
    assert client.queued == []


def test_a_422_lists_at_most_20_errors_and_short_inputs(client: TestClient) -> None:
    """A new-user check sent 60,000 unknown parameters (974 KiB) and got a 9.1 MB 422 after
    about 2 s of the API's time; six at once slowed /api/health to 3.5 s. A 422 now lists
    the first 20 errors and how many more; long inputs are cut and say their length."""
    params = {f"p{i:05d}": i for i in range(5000)}
    r = client.post("/api/jobs", json={"kind": "simulate", "params": params})
    body = _one_422_shape(r)
    assert len(body["errors"]) == 21 and "more errors, not listed" in body["errors"][-1]["msg"]
    assert len(r.content) < 20_000, len(r.content)
    r = client.post("/api/jobs", json={"kind": "simulate", "params": {"seed": "x" * 10_000}})
    body = _one_422_shape(r)
    assert body["errors"][0]["input"].endswith("(10,000 characters)"), body
    assert len(r.content) < 5_000


@pytest.mark.parametrize(
    "params",
    [
        {"model_overrides": {f"k{i}": 1.0 for i in range(20000)}},
        {"defects": {f"d{i}": {} for i in range(20000)}},
        {"defects": {"drift": {f"s{i}": 1 for i in range(20000)}}},
        {"defects": {"x" * 300_000: {}}},
    ],
    ids=["model-overrides-keys", "defect-names", "defect-settings", "one-long-name"],
)
def test_a_422_quoting_the_request_stays_short(client: TestClient, params: dict) -> None:
    """Found by a new user's attack run (2026-12-07): 60,000 unknown ``model_overrides`` keys
    (889 KB) got a 3.7 MB 422 listing every key, unknown defect names 1.2 MB: the messages
    listed them all, outside the cap on error items. They list the first 5 and how many more,
    and no ``detail`` or ``msg`` is longer than 2,000 characters (saying its length)."""
    for path in ("/api/jobs/estimate", "/api/jobs"):
        r = client.post(path, json={"kind": "simulate", "params": {"n_videos": 3, **params}})
        body = _one_422_shape(r)
        assert len(r.content) < 10_000, (path, len(r.content))
        assert "more" in body["detail"] or "characters in all" in body["detail"], body["detail"]


def test_a_job_that_would_fill_the_disk_is_refused(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new-user check got ``fits: true`` for a simulate job estimated to write 134 GB with
    66 GB free (under the 200 GiB per-job limit). The free disk of the artifact store is now
    a limit too, at submit and in the estimate. Here with the limits raised out of the way:
    200 videos of 5000 frames of 1024^2 px (estimated 1.8 TB of writes)."""
    import shutil

    for name, value in [("CALSEG_JOB_MAX_DISK_BYTES", 2**53),
                        ("CALSEG_JOB_MAX_MEMORY_BYTES", 2**50),
                        ("CALSEG_JOB_MAX_TIME_S", 365 * 86400),
                        ("CALSEG_MAX_USER_STORAGE_BYTES", 2**53)]:  # fmt: skip
        monkeypatch.setenv(name, str(value))
    get_settings.cache_clear()
    big = {"n_videos": 200, "n_frames": 5000, "height": 1024, "width": 1024}
    est = client.post("/api/jobs/estimate", json={"kind": "simulate", "params": big}).json()
    if est["estimate"]["disk_bytes"] < shutil.disk_usage(tmp_path).free:
        pytest.skip("this machine has more free disk than the job would write")
    assert not est["fits"] and est["over"] == ["free disk"], est
    r = client.post("/api/jobs", json={"kind": "simulate", "params": big})
    assert r.status_code == 422 and "free disk" in r.json()["detail"], r.text
    small = {"n_videos": 3, "n_frames": 8}
    assert client.post("/api/jobs/estimate", json={"kind": "simulate", "params": small}).json()[
        "fits"
    ]


def test_unknown_ids_are_404(client: TestClient) -> None:
    for method, path in [
        ("get", "/api/jobs/nope"),
        ("post", "/api/jobs/nope/cancel"),
        ("post", "/api/jobs/nope/retry"),
        ("get", "/api/jobs/nope/artifacts/labels.tif"),
        ("get", "/api/jobs/nope/frames/0.png"),
        ("get", "/api/recordings/nope"),
    ]:
        r = getattr(client, method)(path)
        assert r.status_code == 404, path
        assert "nope" in r.json()["detail"]


def test_an_error_quoting_a_huge_path_stays_short(client: TestClient) -> None:
    """Found by a security test of a clean clone: ``GET /api/jobs/<own job>/artifacts/<60,000
    x 'a'>`` and ``GET /api/recordings/<60 KB id>`` answered 404 with the whole name repeated
    (60 KB bodies): the cap on ``detail`` covered 422s only. Every HTTPException's ``detail``
    (any status) is now cut as a 422's is, saying its full length."""
    job = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    long = "a" * 60_000
    for path in (f"/api/jobs/{job['id']}/artifacts/{long}", f"/api/recordings/{long}"):
        r = client.get(path)
        assert r.status_code == 404, (path[:40], r.status_code)
        assert len(r.content) < 10_000, (path[:40], len(r.content))
        assert r.json()["detail"].endswith("characters in all)"), r.json()["detail"][-80:]
    r = client.delete(f"/api/recordings/{long}")  # another route, same rule
    assert r.status_code == 404 and len(r.content) < 10_000


def test_submit_list_cancel_retry(client: TestClient) -> None:
    r = client.post("/api/jobs", json={"kind": "simulate", "params": SIM})
    assert r.status_code == 201
    job = r.json()
    assert job["state"] == "queued" and job["params"]["n_frames"] == 5
    assert client.queued == [(job["id"], None)]
    r2 = client.post("/api/jobs", json={"kind": "simulate", "params": {**SIM, "seed": 4}})
    listing = client.get("/api/jobs", params={"kind": "simulate", "limit": 1}).json()
    assert listing["total"] == 2 and len(listing["items"]) == 1
    assert listing["items"][0]["id"] == r2.json()["id"]  # newest first
    assert client.get("/api/jobs", params={"state": "running"}).json()["total"] == 0
    assert client.get("/api/jobs", params={"state": "bogus"}).status_code == 422

    assert client.post(f"/api/jobs/{job['id']}/retry").status_code == 409
    r = client.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    r = client.post(f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"
    assert client.queued[-1] == (job["id"], None)


def test_upload_limit_probe_and_duplicates(client: TestClient) -> None:
    r = client.post("/api/recordings", files={"file": ("big.tif", b"\0" * 300_000, "image/tiff")})
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]
    # no Content-Length (chunked): the limit is enforced while streaming
    r = client.post(
        "/api/recordings?filename=big.tif",
        content=(b"\0" * 65536 for _ in range(8)),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post(
        "/api/recordings", files={"file": ("notes.tif", b"this is not a TIFF" * 10, "image/tiff")}
    )
    detail = r.json()["detail"]
    assert r.status_code == 422 and "notes.tif" in detail
    # the reason speaks of the user's file, not of the server's temporary one
    assert ".part" not in detail and "unsupported file format" not in detail, detail
    r = client.post("/api/recordings", files={"file": ("empty.tif", b"", "image/tiff")})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "empty.tif" in detail and "0 bytes" in detail, detail
    assert ".part" not in detail, detail
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4000, (6, 40, 52), dtype=np.uint16)
    data = _tiff_bytes(frames)
    r = client.post("/api/recordings", files={"file": ("../../évil name.tif", data, "image/tiff")})
    assert r.status_code == 201, r.text
    rec = r.json()
    assert (rec["n_frames"], rec["height"], rec["width"]) == (6, 40, 52)
    assert rec["dtype"] == "uint16" and rec["size_bytes"] == len(data) and not rec["duplicate"]
    assert rec["filename"] == "evil_name.tif"
    stored = get_settings().artifact_dir / "recordings" / rec["id"] / "evil_name.tif"
    assert stored.read_bytes() == data
    r = client.post("/api/recordings", files={"file": ("again.tif", data, "image/tiff")})
    assert r.status_code == 200 and r.json()["id"] == rec["id"] and r.json()["duplicate"]
    # raw body upload
    r = client.post(
        "/api/recordings?filename=raw.tif",
        content=_tiff_bytes(frames[:3]),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201 and r.json()["n_frames"] == 3
    assert client.get(f"/api/recordings/{rec['id']}").json()["sha256"] == rec["sha256"]
    incoming = get_settings().artifact_dir / "recordings" / ".incoming"
    assert list(incoming.iterdir()) == []  # no partial files left behind


def test_simulate_then_infer_then_frames_and_artifacts(client: TestClient) -> None:
    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    assert _run(sim["id"]) == "succeeded"
    sim = client.get(f"/api/jobs/{sim['id']}").json()
    test_video = next(v for v in sim["result"]["videos"] if v["split"] == "test")
    r = client.post(
        "/api/jobs",
        json={
            "kind": "infer",
            "params": {
                "dataset_job_id": sim["id"],
                "video_id": test_video["id"],
                "method": "baseline",
            },
        },
    )
    assert r.status_code == 201, r.text
    inf = r.json()
    assert client.get(f"/api/jobs/{inf['id']}/frames/0.png").status_code == 409  # not run yet
    assert _run(inf["id"]) == "succeeded", client.get(f"/api/jobs/{inf['id']}").json()["error"]
    inf = client.get(f"/api/jobs/{inf['id']}").json()
    names = {a["name"] for a in inf["artifacts"]}
    assert {"labels.tif", "overlay.png", "overlay.gif", "job.log"} <= names
    fg = [m for m in inf["metrics"] if m["name"] == "foreground_fraction"]
    assert len(fg) == 1 and 0.0 <= fg[0]["value"] <= 1.0

    r = client.get(f"/api/jobs/{inf['id']}/artifacts/labels.tif")
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    art = next(a for a in inf["artifacts"] if a["name"] == "labels.tif")
    assert r.headers["x-content-sha256"] == art["sha256"]
    labels = tifffile.imread(io.BytesIO(r.content))
    assert labels.shape == (SIM["n_frames"], SIM["height"], SIM["width"])

    png = client.get(f"/api/jobs/{inf['id']}/frames/2.png", params={"overlay": 1})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(png.content)))
    assert img.shape == (128, 128, 3)
    plain = np.asarray(Image.open(io.BytesIO(
        client.get(f"/api/jobs/{inf['id']}/frames/2.png", params={"overlay": 0}).content
    )))  # fmt: skip
    assert plain.shape == img.shape
    if labels[2].any():
        assert not np.array_equal(plain, img)  # the overlay drew something
    both = client.get(f"/api/jobs/{inf['id']}/frames/2.png", params={"gt": 1}).content
    assert np.asarray(Image.open(io.BytesIO(both))).shape == (128, 256 + 4, 3)
    r = client.get(f"/api/jobs/{inf['id']}/frames/{SIM['n_frames']}.png")
    assert r.status_code == 404 and "out of range" in r.json()["detail"]


def test_page_and_static_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "jobs-table" in r.text
    assert "http" not in r.text.replace("http-equiv", "")  # no CDN
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_settings_to_env_round_trip(tmp_path: Path) -> None:
    s = Settings(database_url="sqlite:///x.db", artifact_dir=tmp_path, redis_url="redis://h:1/2")
    env = s.to_env()
    assert env["CALSEG_REDIS_URL"] == "redis://h:1/2"
    assert Path(env["CALSEG_ARTIFACT_DIR"]) == tmp_path
    assert "CALSEG_SAM2_CHECKPOINT" not in env


def _viewer_job(
    tmp_path: Path, labels: np.ndarray | None, traces: dict | None, owner_id: str
) -> str:
    """A succeeded infer job of ``owner_id`` whose labels.tif / traces.csv artifacts hold the
    given data, registered directly in the database and the temporary store (no run needed)."""
    from calseg.io.labels import write_label_stack
    from calseg.io.tables import write_traces_csv
    from calseg.service.db import session_scope
    from calseg.service.models import Artifact, Job

    settings = get_settings()
    store = LocalArtifactStore(settings.artifact_dir)
    with session_scope() as session:
        job = Job(kind="infer", state="succeeded", params={}, result={}, owner_id=owner_id)
        session.add(job)
        session.flush()
        files = []
        if labels is not None:
            files.append(("labels.tif", write_label_stack(tmp_path / "labels.tif", labels)))
        if traces is not None:
            p = write_traces_csv(tmp_path / "traces.csv", **traces)
            files.append(("traces.csv", p))
        for name, path in files:
            obj = store.put(f"jobs/{job.id}/{name}", path)
            session.add(Artifact.of_stored(job.id, name, "labels", obj))
        return job.id


def test_cell_at_pixel(client: TestClient, tmp_path: Path) -> None:
    labels = np.zeros((3, 6, 8), np.uint32)
    labels[1, 2:4, 5:7] = 7  # rows 2-3, columns 5-6 of frame 1
    labels[2, 0, 0] = 3
    job_id = _viewer_job(tmp_path, labels, None, client.user_id)
    at = f"/api/jobs/{job_id}/cells/at"
    assert client.get(at, params={"t": 1, "x": 5, "y": 2}).json() == {"cell_id": 7}
    assert client.get(at, params={"t": 1, "x": 6, "y": 3}).json() == {"cell_id": 7}
    # x and y are column and row: the transposed pixel is background
    assert client.get(at, params={"t": 1, "x": 2, "y": 5}).json() == {"cell_id": None}
    assert client.get(at, params={"t": 0, "x": 5, "y": 2}).json() == {"cell_id": None}
    assert client.get(at, params={"t": 2, "x": 0, "y": 0}).json() == {"cell_id": 3}
    for bad, name in [
        ({"t": 1, "x": -1, "y": 2}, "x=-1"),  # never wrapped to the last column
        ({"t": 1, "x": 8, "y": 2}, "x=8"),
        ({"t": 1, "x": 5, "y": 6}, "y=6"),
        ({"t": -1, "x": 5, "y": 2}, "t=-1"),
        ({"t": 3, "x": 5, "y": 2}, "t=3"),
    ]:
        r = client.get(at, params=bad)
        assert r.status_code == 422, bad
        assert name in r.json()["detail"] and "out of range" in r.json()["detail"]
    assert client.get(at, params={"t": 1, "x": 5}).status_code == 422  # y missing
    r = client.get("/api/jobs/nope/cells/at", params={"t": 0, "x": 0, "y": 0})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    no_labels = _viewer_job(tmp_path / "b", None, None, client.user_id)
    r = client.get(f"/api/jobs/{no_labels}/cells/at", params={"t": 0, "x": 0, "y": 0})
    assert r.status_code == 404 and "labels.tif" in r.json()["detail"]


def test_cell_trace(client: TestClient, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    f = rng.uniform(100.0, 200.0, (2, 4))
    f0 = np.full((2, 4), 120.0)
    dff = (f - f0) / f0
    dff[1, 2] = np.nan  # flagged sample: written empty, served as null
    traces = {"ids": np.array([4, 9]), "f": f, "f0": f0, "dff": dff, "frame_interval_s": 0.5}
    job_id = _viewer_job(tmp_path, None, traces, client.user_id)
    r = client.get(f"/api/jobs/{job_id}/cells/9/trace")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cell_id"] == 9 and body["time_s"] == [0.0, 0.5, 1.0, 1.5]
    np.testing.assert_allclose(body["F"], f[1], rtol=1e-6)  # 7 significant digits in the CSV
    np.testing.assert_allclose(body["F0"], f0[1], rtol=1e-6)
    assert body["dff"][2] is None
    got = [v for i, v in enumerate(body["dff"]) if i != 2]
    np.testing.assert_allclose(got, np.delete(dff[1], 2), rtol=1e-6)
    cell4 = client.get(f"/api/jobs/{job_id}/cells/4/trace").json()
    np.testing.assert_allclose(cell4["dff"], dff[0], rtol=1e-6)
    r = client.get(f"/api/jobs/{job_id}/cells/5/trace")
    assert r.status_code == 404 and "no cell 5" in r.json()["detail"]
    assert client.get("/api/jobs/nope/cells/4/trace").status_code == 404


def test_rerun_reproduces_a_simulate_job_bit_for_bit(client: TestClient) -> None:
    first = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    assert _run(first["id"]) == "succeeded"
    r = client.post(f"/api/jobs/{first['id']}/rerun")
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["id"] != first["id"] and second["params"] == first["params"]
    assert second["state"] == "queued" and client.queued[-1] == (second["id"], None)
    assert _run(second["id"]) == "succeeded"
    root = get_settings().artifact_dir

    def videos(job_id: str) -> dict[str, str]:
        art = next(
            a
            for a in client.get(f"/api/jobs/{job_id}").json()["artifacts"]
            if a["name"] == "manifest.json"
        )
        folder = (root / art["relpath"]).parent
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("v*/*"))
        }

    a, b = videos(first["id"]), videos(second["id"])
    assert len(a) == 3 * 4 and a == b  # image, labels, cells, calcium of 3 videos, identical
    assert client.post("/api/jobs/nope/rerun").status_code == 404


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # non-finite numbers (JSON extensions Python's parser accepts) in job parameters
        ('{"kind":"infer","params":{"recording_id":"r","smooth_sigma_px":NaN}}', "smooth_sigma_px"),
        ('{"kind":"infer","params":{"recording_id":"r","smooth_sigma_px":Infinity}}', "finite"),
        ('{"kind":"simulate","params":{"n_videos":3,"defect_severity":-Infinity}}', "finite"),
        ('{"kind":"finetune","params":{"dataset_job_id":"d","lr":NaN}}', "lr"),
        # units outside any recording (the fresh-user test's 1e-300 s was accepted)
        ('{"kind":"infer","params":{"recording_id":"r","frame_interval_s":1e-300}}', "0.0001"),
        ('{"kind":"infer","params":{"recording_id":"r","pixel_size_um":1e-9}}', "pixel_size_um"),
        # ... and outside them, where FastAPI's own handler could not serialise the input
        ('{"kind":"simulate","params":{},"extra":NaN}', "Extra inputs"),
        ('{"kind":NaN}', "kind"),
        # true/false for a number (read as 1.0 / 0: a new-user check)
        ('{"kind":"infer","params":{"recording_id":"r","threshold_k":true}}', "not true"),
        ('{"kind":"simulate","params":{"n_videos":false}}', "a number is needed, not false"),
        # an unknown model parameter, in one line (it was pydantic's dump with its help URL)
        (
            '{"kind":"simulate","params":{"model_overrides":{"bogus":1}}}',
            "invalid model_overrides (bogus: not a model parameter); allowed keys: Dc_ratio, Dp",
        ),
        # fields valid one by one, not together
        (
            '{"kind":"infer","params":{"recording_id":"r","low_percentile":90,'
            '"high_percentile":10}}',
            "low_percentile < high_percentile",
        ),
    ],
)
def test_bad_numbers_are_422_never_500(client: TestClient, body: str, expected: str) -> None:
    r = client.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
    body = _one_422_shape(r)
    assert expected in body["detail"] or expected in str(body["errors"]), body
    assert client.queued == []  # nothing reached the queue


def test_infer_inputs_are_checked_at_submit_and_failures_leak_no_server_path(
    client: TestClient, tmp_path: Path
) -> None:
    """A new-user REST check got 201 for an infer job with axes "TTYX", channel 5 of a
    1-channel recording and video "v999", then a failed job whose log held a traceback with
    the server's absolute paths. These are 422 at submit now (and at /api/jobs/estimate,
    which also refuses a device the submit refuses); a job that does fail on its input says
    so without a traceback, and no failure text holds the server's folders."""
    frames = np.random.default_rng(0).poisson(100, (6, 32, 32)).astype(np.uint16)
    up = client.post("/api/recordings", files={"file": ("r.tif", _tiff_bytes(frames))}).json()
    for extra, words in [
        ({"axes": "TTYX"}, "cannot be read with these options"),
        ({"channel": 5}, "cannot be read with these options"),
    ]:
        params = {"recording_id": up["id"], **extra}
        for path in ("/api/jobs", "/api/jobs/estimate"):
            r = client.post(path, json={"kind": "infer", "params": params})
            assert r.status_code == 422 and words in r.json()["detail"], (path, r.text)
            assert str(tmp_path) not in r.text
    r = client.post("/api/jobs/estimate", json={"kind": "infer",
                    "params": {"recording_id": up["id"], "device": "cuda:99"}})  # fmt: skip
    assert r.status_code == 422 and "'cuda:99' is not one of them" in r.text, r.text

    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    assert _run(sim["id"]) == "succeeded"
    # a tenth attack run: the log said "simulating into /srv/.../artifacts/jobs/ID/dataset"
    tail = client.get(f"/api/jobs/{sim['id']}").json()["log_tail"]
    full = client.get(f"/api/jobs/{sim['id']}/artifacts/job.log").text
    assert f"jobs/{sim['id']}/dataset" in tail, tail
    for text in (tail, full):
        assert str(tmp_path) not in text and "/dataset" in text, text
    bad = {"dataset_job_id": sim["id"], "video_id": "v999", "method": "baseline"}
    r = client.post("/api/jobs", json={"kind": "infer", "params": bad})
    assert r.status_code == 422 and "v999" in r.json()["detail"], r.text
    assert str(tmp_path) not in r.text

    # a job whose recording vanished after the submit fails on its input: no traceback, and
    # no absolute server path in its error or log
    ok = client.post("/api/jobs", json={"kind": "infer", "params": {"recording_id": up["id"]}})
    assert ok.status_code == 201, ok.text
    for f in (tmp_path / "art").rglob("r.tif"):
        f.unlink()
    assert _run(ok.json()["id"]) == "failed"
    job = client.get(f"/api/jobs/{ok.json()['id']}").json()
    assert "Traceback" not in job["log_tail"], job["log_tail"]
    for text in (job["error"], job["log_tail"], json.dumps(job.get("provenance") or {})):
        assert str(tmp_path) not in text, text


def test_an_evaluate_split_without_videos_is_refused_at_submit(client: TestClient) -> None:
    """A tenth attack run: an evaluate job of split "val" on a dataset without validation
    videos was admitted (201) and failed in the worker with a DatasetError. Once the dataset
    is made, an empty split is a 422 naming the splits that hold videos."""
    params = {**SIM, "n_videos": 2, "n_val_videos": 0, "n_test_videos": 1}
    sim = client.post("/api/jobs", json={"kind": "simulate", "params": params}).json()
    early = client.post("/api/jobs", json={"kind": "evaluate",
                        "params": {"dataset_job_id": sim["id"], "split": "val"}})  # fmt: skip
    assert early.status_code == 201, early.text  # not made yet: the worker checks it
    assert _run(sim["id"]) == "succeeded"
    r = client.post("/api/jobs", json={"kind": "evaluate",
                    "params": {"dataset_job_id": sim["id"], "split": "val"}})  # fmt: skip
    assert r.status_code == 422, r.text
    assert "has no 'val' videos (videos per split: train 1, test 1)" in r.json()["detail"]
    ok = client.post("/api/jobs", json={"kind": "evaluate",
                     "params": {"dataset_job_id": sim["id"], "split": "test"}})  # fmt: skip
    assert ok.status_code == 201, ok.text


def test_a_sam2_job_result_names_no_server_folder(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's check: an infer job's result held the server's absolute checkpoint path
    (.../calseg/segment/weights/sam2_small_calseg.pt). Every string of a result now goes
    through public_text: folders of the repository, artifact store and cache are dropped."""
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT
    from calseg.service.context import REPO_ROOT
    from calseg.service.settings import get_settings

    monkeypatch.setenv("CALSEG_SAM2_CHECKPOINT", str(BUNDLED_SMALL_CHECKPOINT))
    get_settings.cache_clear()

    frames = np.random.default_rng(1).poisson(100, (6, 32, 32)).astype(np.uint16)
    up = client.post("/api/recordings", files={"file": ("s.tif", _tiff_bytes(frames))}).json()
    r = client.post(
        "/api/jobs", json={"kind": "infer", "params": {"recording_id": up["id"], "method": "sam2"}}
    )
    assert r.status_code == 201, r.text
    assert _run(r.json()["id"]) == "succeeded"
    result = json.dumps(client.get(f"/api/jobs/{r.json()['id']}").json()["result"])
    assert "sam2_small_calseg" in result  # the checkpoint is still named
    for folder in (str(REPO_ROOT), str(Path(REPO_ROOT).resolve()), str(tmp_path)):
        assert folder not in result, folder


def test_every_answer_forbids_framing_and_sniffing(client: TestClient) -> None:
    """A new user's check: the page (which signs in from the token in localStorage) could be
    framed by another site and clicked through (cancel, retry, submit): no X-Frame-Options,
    CSP or nosniff header on / or /static/*."""
    for path in ("/", "/static/app.js", "/api/me", "/api/jobs/nope"):
        r = client.get(path)
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer", path


def test_the_viewer_bounds_what_a_traces_table_costs(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sixth attack run: an upload of 10,404 three-pixel cells made a 70 MB traces.csv, and
    three viewer requests for it took the API up by 5.1 GB (every field a Python string and
    float). The table now parses in NumPy within ~2.3 bytes per byte of file (below), one that
    is over MAX_VIEWER_TRACES_BYTES is 413 naming the downloads, and the raster returns at
    most MAX_RASTER_VALUES numbers (frames binned more coarsely)."""
    from api import frames as api_frames
    from api.routes import artifacts

    rng = np.random.default_rng(6)
    n, t = 40, 30
    f = rng.uniform(100.0, 200.0, (n, t))
    traces = {"ids": np.arange(1, n + 1), "f": f, "f0": f * 0.9, "dff": f / (f * 0.9) - 1,
              "frame_interval_s": 1.0}  # fmt: skip
    job_id = _viewer_job(tmp_path, None, traces, client.user_id)
    r = client.get(f"/api/jobs/{job_id}/cells", params={"dff": "true"})
    assert r.status_code == 200 and r.json()["frames_per_column"] == 1
    monkeypatch.setattr(artifacts, "MAX_RASTER_VALUES", n * 10)
    body = client.get(f"/api/jobs/{job_id}/cells", params={"dff": "true"}).json()
    assert body["frames_per_column"] == 3 and len(body["dff"][0]) == 10
    assert sum(len(row) for row in body["dff"]) <= n * 10
    np.testing.assert_allclose(body["dff"][0][0], np.max(traces["dff"][0, :3]), rtol=1e-6)
    monkeypatch.setattr(api_frames, "MAX_VIEWER_TRACES_BYTES", 1000)
    for url in (f"/api/jobs/{job_id}/cells", f"/api/jobs/{job_id}/cells/1/trace"):
        api_frames._traces_cache.clear()
        r = client.get(url)
        assert r.status_code == 413, r.text
        assert "traces.parquet" in r.json()["detail"] and "MiB" in r.json()["detail"]


def test_a_traces_table_parses_in_memory_proportional_to_its_size(tmp_path: Path) -> None:
    """``read_traces_csv`` of a 12 MB table: under 3 bytes of memory per byte of file (it was
    about 24: ``csv.reader`` rows as Python lists), and the values as written."""
    import tracemalloc

    from calseg.io.tables import read_traces_csv, write_traces_csv

    rng = np.random.default_rng(7)
    n, t = 1500, 200
    f = rng.uniform(100.0, 200.0, (n, t))
    dff = f / (f * 0.9) - 1
    dff[3, 5] = np.nan  # written empty
    path = write_traces_csv(tmp_path / "traces.csv", np.arange(n), f, f * 0.9, dff, 0.5)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        got = read_traces_csv(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * size, (peak, size)
    np.testing.assert_allclose(got["F"], f, rtol=1e-6)
    assert (
        np.isnan(got["dff"][3, 5]) and np.isfinite(np.delete(got["dff"].ravel(), 3 * t + 5)).all()
    )
    assert got["time_s"][:3].tolist() == [0.0, 0.5, 1.0]


def test_an_estimate_counts_the_frames_the_jobs_reading_options_make(client: TestClient) -> None:
    """A seventh attack run: a stack uploaded as 1 frame of 600 Z planes (``axes=ZYX``) and
    read by its job as 600 frames (``axes="TYX"``) was estimated with the stored 1 frame (4 s,
    360 MiB) and ran 16 s at 1.6 GB, up to 2^26 pixels a stored frame. The estimate (and so
    the admission) now takes the shape the job's options read, from the headers."""
    stack = np.random.default_rng(10).integers(0, 900, (40, 32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, stack, photometric="minisblack")
    r = client.post(
        "/api/recordings", params={"axes": "ZYX"}, files={"file": ("z.tif", buf.getvalue())}
    )
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["n_frames"] == 1
    base = {"recording_id": rec["id"], "method": "classical"}

    def estimate(**options) -> dict:
        r = client.post("/api/jobs/estimate", json={"kind": "infer", "params": {**base, **options}})
        assert r.status_code == 200, r.text
        return r.json()["estimate"]

    as_stored, as_frames = estimate(), estimate(axes="TYX")
    assert as_frames["disk_bytes"] == pytest.approx(40 * as_stored["disk_bytes"], rel=0.05)
    assert as_frames["time_s"] > as_stored["time_s"]
    job = client.post("/api/jobs", json={"kind": "infer", "params": {**base, "axes": "TYX"}})
    assert job.status_code == 201, job.text
    with session_scope() as session:  # what the admission counted against the quota
        assert session.get(Job, job.json()["id"]).estimated_disk_bytes == pytest.approx(
            as_frames["disk_bytes"], rel=0.01
        )


def test_a_retry_checks_what_the_job_reads_as_a_new_job_does(client: TestClient) -> None:
    """A seventh attack run: cancel an infer job, delete its recording (allowed: the job is
    no longer queued), retry the job: it was queued again (200) and failed in the worker
    ("there is no recording"). A retry now checks the job's references as a submit does:
    422, nothing queued."""
    frames = np.random.default_rng(11).integers(0, 900, (6, 16, 16)).astype(np.uint16)
    rec = client.post("/api/recordings", files={"file": ("r.tif", _tiff_bytes(frames))}).json()
    params = {"recording_id": rec["id"], "method": "classical"}
    job = client.post("/api/jobs", json={"kind": "infer", "params": params}).json()
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    assert client.delete(f"/api/recordings/{rec['id']}").status_code == 204
    queued = len(client.queued)
    r = client.post(f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 422, r.text
    assert f"there is no recording {rec['id']}" in r.json()["detail"]
    assert len(client.queued) == queued
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "cancelled"


def test_a_sam2_estimate_is_at_the_size_the_checkpoint_runs(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A seventh attack run: with the small SAM2 trained here as the base, an infer job asking
    for ``image_size`` 64 ran at 512 (a CalSeg checkpoint runs as it was trained) but was
    estimated at 64: 1/64 of its encoder time and embedding memory. The estimate now takes
    the model and size the checkpoint runs at."""
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT, SMALL_CONFIG, checkpoint_run_shape

    assert checkpoint_run_shape(BUNDLED_SMALL_CHECKPOINT) == (SMALL_CONFIG, 512)
    assert checkpoint_run_shape(None) is None
    import torch

    from calseg.segment.model import FINETUNE_FORMAT

    # Meta's format, and a CalSeg one without its metadata: they run at the size asked
    for i, obj in enumerate(
        ({"model": {"w": torch.zeros(2)}}, {"format": FINETUNE_FORMAT, "metadata": {}})
    ):
        torch.save(obj, tmp_path / f"odd{i}.pt")
        assert checkpoint_run_shape(tmp_path / f"odd{i}.pt") is None
    monkeypatch.setenv("CALSEG_SAM2_CHECKPOINT", str(BUNDLED_SMALL_CHECKPOINT))
    get_settings.cache_clear()
    frames = np.random.default_rng(12).integers(0, 900, (20, 32, 32)).astype(np.uint16)
    rec = client.post("/api/recordings", files={"file": ("s.tif", _tiff_bytes(frames))}).json()

    def estimate(size: int) -> dict:
        params = {"recording_id": rec["id"], "method": "sam2", "image_size": size}
        r = client.post("/api/jobs/estimate", json={"kind": "infer", "params": params})
        assert r.status_code == 200, r.text
        return r.json()["estimate"]

    small, asked = estimate(64), estimate(512)
    assert small["time_s"] == asked["time_s"] and small["memory_bytes"] == asked["memory_bytes"]
    assert small["disk_bytes"] == asked["disk_bytes"]


def register_finetune(client: TestClient, checkpoint: Path, **job: Any) -> tuple[str, Any]:
    """A succeeded finetune job of ``client``'s user with ``checkpoint`` as its checkpoint.pt
    (registered directly: fine-tuning runs in the integration test); ``job``: more of its
    columns (params, result, provenance). Returns its id and the stored file."""
    from calseg.service.models import Artifact

    store = LocalArtifactStore(get_settings().artifact_dir)
    with session_scope() as session:
        row = Job(
            kind="finetune", state="succeeded", owner_id=client.user_id, **{"params": {}, **job}
        )
        session.add(row)
        session.flush()
        obj = store.put(f"jobs/{row.id}/checkpoint.pt", checkpoint)
        session.add(Artifact.of_stored(row.id, "checkpoint.pt", "checkpoint", obj))
        return row.id, obj


def test_video_mode_with_a_disc_prior_model_is_refused_at_submit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new-user check: video-mode infer and evaluate jobs with CalSeg's small SAM2 (the
    server's default base; its masks correct a disc prior, which SAM2's video propagation
    cannot add) were admitted (201) and failed in the worker. Now a 422 naming the model,
    for the base and for a model job's checkpoint; a classical infer job, target "cells" and
    image mode are still admitted."""
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT

    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    video = {"dataset_job_id": sim["id"], "video_id": "v000"}

    def submit(kind: str, **params: object) -> object:
        src = video if kind == "infer" else {"dataset_job_id": sim["id"]}
        return client.post("/api/jobs", json={"kind": kind, "params": {**src, **params}})

    model_job, _ = register_finetune(client, BUNDLED_SMALL_CHECKPOINT)
    r = submit("infer", model_job_id=model_job, mode="video")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(
        f"model_job_id: mode 'video' cannot run checkpoint.pt of finetune job {model_job}"
    ), detail
    assert "disc prior" in detail and "mode 'image'" in detail
    assert submit("evaluate", model_job_id=model_job, mode="video").status_code == 422
    assert submit("infer", model_job_id=model_job).status_code == 201  # image mode
    # a job whose record says its prior is refused from the record: no checkpoint read in the
    # API process (a 12th attack run: a full fine-tune's file is torch-loaded there)
    with session_scope() as session:
        recorded = Job(
            kind="finetune", state="succeeded", owner_id=client.user_id, params={},
            result={"model_info": {"prior_mode": "residual"}},
        )  # fmt: skip
        session.add(recorded)
        session.flush()
        recorded_id = recorded.id
    r = submit("infer", model_job_id=recorded_id, mode="video")
    assert r.status_code == 422 and "mask_prior 'residual'" in r.json()["detail"], r.text

    monkeypatch.setenv("CALSEG_SAM2_CHECKPOINT", str(BUNDLED_SMALL_CHECKPOINT))
    get_settings.cache_clear()
    for kind, method in (("infer", "sam2"), ("infer", "auto"), ("evaluate", None)):
        extra = {"method": method} if method else {}
        r = submit(kind, mode="video", **extra)
        if kind == "infer" and method == "auto":  # auto: classical on this server
            assert r.status_code == 201, r.text
            continue
        assert r.status_code == 422, (kind, method, r.text)
        assert r.json()["detail"].startswith("mode: mode 'video' cannot run"), r.text
        assert BUNDLED_SMALL_CHECKPOINT.name in r.json()["detail"]
    assert submit("infer", method="classical", mode="video").status_code == 201
    assert submit("infer", method="sam2", mode="video", target="cells").status_code == 201
    assert submit("evaluate", mode="image").status_code == 201


def test_an_evaluate_job_takes_no_method(client: TestClient) -> None:
    """A new-user check: an evaluate job's ``method`` (from the inference settings it wraps)
    was accepted and ignored: "classical" still scored every model. It is a 422 with the
    reason; "sam2", which every evaluate job stored before, is dropped so those jobs still
    retry; the page's form does not offer it."""
    sim = client.post("/api/jobs", json={"kind": "simulate", "params": SIM}).json()
    r = client.post(
        "/api/jobs",
        json={"kind": "evaluate", "params": {"dataset_job_id": sim["id"], "method": "classical"}},
    )
    assert r.status_code == 422, r.text
    assert "scores every model side by side" in r.text, r.text
    old = {"dataset_job_id": sim["id"], "method": "sam2"}
    ok = client.post("/api/jobs", json={"kind": "evaluate", "params": old})
    assert ok.status_code == 201, ok.text
    assert "method" not in ok.json()["params"]
    evaluate = client.get("/api/job-kinds").json()["evaluate"]["properties"]
    assert "method" not in evaluate and "mode" in evaluate and "split" in evaluate
