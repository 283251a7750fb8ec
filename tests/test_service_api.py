"""REST API (api.main) with FastAPI's TestClient on a temporary SQLite database; the broker is
replaced by a recorder and jobs are run in-process where a test needs their outputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from calseg.service import jobs
from calseg.service.db import upgrade_database
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
    from api.main import app, enqueue_dep

    queued: list[tuple[str, float | None]] = []
    app.dependency_overrides[enqueue_dep] = lambda: (
        lambda job, countdown=None: queued.append((job.id, countdown))
    )
    with TestClient(app) as c:
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
