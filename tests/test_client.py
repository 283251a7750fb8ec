"""The Python client (calseg.client) and the service commands of the CLI (users, tokens,
submit, watch, download) against a real HTTP server: uvicorn serving api.main in a thread on
a temporary SQLite database; jobs run in-process in a thread instead of a Celery worker (the
Celery path is covered by tests/integration)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from calseg.cli import app as cli
from calseg.client import CalSegClient, CalSegError
from calseg.service import jobs
from calseg.service.auth import TOKEN_RE, authenticate, create_token, create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.settings import get_settings
from calseg.service.store import LocalArtifactStore

SIM = {"n_videos": 3, "n_frames": 5, "height": 128, "width": 128, "seed": 3}
runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """URL and alice's token of the api served by uvicorn on a free port."""
    import uvicorn

    url = f"sqlite:///{tmp_path / 'client.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_TOKEN_FILE", str(tmp_path / "no-token"))
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    monkeypatch.delenv("CALSEG_TOKEN", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "alice"), "tests")
    from api.main import app, enqueue_dep

    threads: list[threading.Thread] = []

    def run_soon(job, countdown=None) -> None:  # noqa: ANN001 - the worker, in a thread
        settings = get_settings()
        t = threading.Thread(
            target=jobs.run_job,
            args=(job.id,),
            kwargs={
                "settings": settings,
                "store": LocalArtifactStore(settings.artifact_dir),
                "enqueue": lambda *a, **k: None,
            },
        )
        t.start()
        threads.append(t)

    app.dependency_overrides[enqueue_dep] = lambda: run_soon
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "token": token}
    finally:
        for t in threads:
            t.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=10)
        app.dependency_overrides.clear()
        get_settings.cache_clear()


def test_client_round_trip_submit_watch_download(live: dict, tmp_path: Path) -> None:
    seen: list[dict] = []
    with CalSegClient(live["url"], live["token"]) as cs:
        assert cs.me()["name"] == "alice"
        assert "n_videos" in cs.job_kinds()["simulate"]["properties"]
        job = cs.submit("simulate", SIM)
        assert job["params"]["seed"] == 3 and job["state"] in ("queued", "running", "succeeded")
        done = cs.wait(job["id"], poll_s=0.2, timeout_s=120, on_progress=seen.append)
        assert done["state"] == "succeeded" and seen[-1]["state"] == "succeeded"
        progress = [float(j["progress"]) for j in seen]
        assert progress == sorted(progress) and progress[-1] == 1.0
        paths = cs.download(job["id"], tmp_path / "out")
        arts = {a["name"]: a for a in done["artifacts"]}
        assert {p.name for p in paths} == set(arts)
        for p in paths:  # what arrived is what the service stored
            assert _sha256(p) == arts[p.name]["sha256"]
            stored = get_settings().artifact_dir / arts[p.name]["relpath"]
            assert p.read_bytes() == stored.read_bytes()
        assert [j["id"] for j in cs.list(kind="simulate")["items"]] == [job["id"]]

        # a recording streamed from its file, recognised the second time
        frames = np.random.default_rng(4).integers(0, 3000, (6, 32, 40), dtype=np.uint16)
        tif = tmp_path / "rec.tif"
        tifffile.imwrite(tif, frames, imagej=True, metadata={"axes": "TYX"})
        rec = cs.upload(tif)
        assert (rec["n_frames"], rec["height"], rec["width"]) == (6, 32, 40)
        assert rec["sha256"] == _sha256(tif) and not rec["duplicate"]
        again = cs.upload(tif, filename="other.tif")
        assert again["id"] == rec["id"] and again["duplicate"] and again["message"]
        inf = cs.submit("infer", {"recording_id": rec["id"], "method": "baseline"})
        inf = cs.wait(inf["id"], poll_s=0.2, timeout_s=120)
        (labels_path,) = cs.download(inf["id"], tmp_path / "inf", names=["labels.tif"])
        assert tifffile.imread(labels_path).shape == frames.shape
        assert cs.metrics(inf["id"])[0]["name"] == "foreground_fraction"

        # errors carry the service's status and reason
        with pytest.raises(CalSegError) as err:
            cs.submit("simulate", {"n_frames": 1})
        assert err.value.status == 422 and "n_frames" in str(err.value)
        with pytest.raises(CalSegError, match="no artifact nope.tif"):
            cs.download(inf["id"], tmp_path, names=["nope.tif"])
        with pytest.raises(CalSegError) as err:
            cs.delete_recording("nope")
        assert err.value.status == 404
        with pytest.raises(CalSegError) as err:  # an unknown device: refused at submit
            cs.submit("finetune", {"dataset_job_id": job["id"], "steps": 1, "device": "tpu"})
        assert err.value.status == 422 and "device" in str(err.value)
        with pytest.raises(CalSegError) as err:  # a video the dataset lacks: refused at submit
            cs.submit(
                "infer", {"dataset_job_id": job["id"], "video_id": "v999", "method": "baseline"}
            )
        assert err.value.status == 422 and "v999" in str(err.value)
        for stored in (get_settings().artifact_dir / "recordings").rglob("rec.tif"):
            stored.unlink()  # the recording's file gone: its headers are read at submit (a
            # file gone after the submit fails the job: test_service_api)
        with pytest.raises(CalSegError) as err:
            cs.submit("infer", {"recording_id": rec["id"], "method": "baseline"})
        assert err.value.status == 422 and "no such file" in str(err.value)
    with CalSegClient(live["url"], "cs_" + "x" * 43) as cs, pytest.raises(CalSegError) as err:
        cs.me()
    assert err.value.status == 401 and "token" in str(err.value)


def test_cli_submit_watch_download(live: dict, tmp_path: Path) -> None:
    env = {"CALSEG_URL": live["url"], "CALSEG_TOKEN": live["token"]}
    args = ["submit", "simulate", "--watch"]
    for key, value in SIM.items():
        args += ["-p", f"{key}={value}"]
    args += ["-p", 'pattern_classes=["waves"]']
    r = runner.invoke(cli, args, env=env)
    assert r.exit_code == 0, r.output
    job_id = r.output.splitlines()[0].strip()
    assert "succeeded" in r.output
    with CalSegClient(live["url"], live["token"]) as cs:
        job = cs.get(job_id)
    assert job["params"]["pattern_classes"] == ["waves"] and job["params"]["n_videos"] == 3
    r = runner.invoke(cli, ["watch", job_id], env=env)
    assert r.exit_code == 0 and "succeeded" in r.output, r.output
    out = tmp_path / "dl"
    r = runner.invoke(
        cli, ["download", job_id, "--out", str(out), "--name", "preview.png"], env=env
    )
    assert r.exit_code == 0, r.output
    art = next(a for a in job["artifacts"] if a["name"] == "preview.png")
    assert _sha256(out / "preview.png") == art["sha256"]
    # an infer job that finds nothing: the cell count, why, and what to try (a lab admin's
    # check: watch printed only "foreground_fraction (classical, -): 0")
    noise = np.random.default_rng(5).poisson(200, (12, 48, 48)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "noise.tif", noise, imagej=True, metadata={"axes": "TYX"})
    with CalSegClient(live["url"], live["token"]) as cs:
        rec = cs.upload(tmp_path / "noise.tif")
        inf = cs.submit("infer", {"recording_id": rec["id"], "method": "classical"})
    r = runner.invoke(cli, ["watch", inf["id"]], env=env)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "classical: 0 cells" in text and "why no cell:" in text, r.output
    # clear errors: bad parameter syntax, a refused job, no token
    r = runner.invoke(cli, ["submit", "simulate", "-p", "n_videos"], env=env)
    assert r.exit_code == 2 and "name=value" in r.output
    r = runner.invoke(cli, ["submit", "simulate", "-p", "n_frames=1"], env=env)
    assert r.exit_code == 2 and "422" in r.output and "n_frames" in r.output
    r = runner.invoke(cli, ["watch", job_id], env={"CALSEG_URL": live["url"], "CALSEG_TOKEN": ""})
    assert r.exit_code == 2 and "CALSEG_TOKEN" in r.output
    # an unknown id: the 404 first and alone, no progress bar after it
    r = runner.invoke(cli, ["watch", "no-such-job"], env=env)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "404" in lines[0], r.output
    assert "%" not in r.output


def test_cli_users_and_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'admin.db'}"  # a fresh file: the command creates the tables
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        r = runner.invoke(cli, ["users", "create", "alice"])
        assert r.exit_code == 0 and "user alice created" in r.output, r.output
        # which database it wrote, on stderr (a lab admin's check: a shell without the
        # server's CALSEG_DATABASE_URL wrote the embedded SQLite file and said only "created")
        assert f"database: {url} (CALSEG_DATABASE_URL)" in r.stderr, r.stderr
        r = runner.invoke(cli, ["users", "create", "boss", "--admin"])
        assert r.exit_code == 0 and "admin" in r.output
        r = runner.invoke(cli, ["users", "create", "alice"])
        assert r.exit_code == 2 and "exists already" in r.output
        r = runner.invoke(cli, ["users", "create", "../x"])
        assert r.exit_code == 2 and "invalid user name" in r.output
        r = runner.invoke(cli, ["users", "list"])
        assert "alice" in r.output and "boss  (admin)" in r.output

        r = runner.invoke(cli, ["tokens", "create", "alice", "--name", "laptop"])
        assert r.exit_code == 0, r.output
        token = r.stdout.splitlines()[0]
        assert TOKEN_RE.match(token), r.stdout
        with session_scope(url) as session:
            assert authenticate(session, token).name == "alice"
        r = runner.invoke(cli, ["tokens", "create", "carol"])
        assert r.exit_code == 2 and "no user 'carol'" in r.output
        r = runner.invoke(cli, ["tokens", "list", "alice"])
        assert "laptop" in r.output and "active" in r.output and token not in r.output
        token_id = r.stdout.split()[0]
        r = runner.invoke(cli, ["tokens", "revoke", token_id[:8]])
        assert r.exit_code == 0 and "revoked" in r.output
        with session_scope(url) as session:
            assert authenticate(session, token) is None
        assert "revoked" in runner.invoke(cli, ["tokens", "list"]).output
        r = runner.invoke(cli, ["tokens", "revoke", "zzzzzzzz"])
        assert r.exit_code == 2 and "no token" in r.output
        # a database that cannot be reached: one line, its URL without the password
        monkeypatch.setenv("CALSEG_DATABASE_URL", "postgresql+psycopg://u:secret@127.0.0.1:1/x")
        get_settings.cache_clear()
        r = runner.invoke(cli, ["users", "list"])
        assert r.exit_code == 2 and "cannot open the database" in r.output, r.output
        assert "secret" not in r.output and "Traceback" not in r.output
    finally:
        get_settings.cache_clear()


def test_default_token_is_local_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CALSEG_TOKEN a client of a service on this machine uses var/token (the
    embedded default's), and never sends it to another host."""
    from calseg.client import default_token
    from calseg.service.auth import new_token, write_token_file

    token = new_token()
    write_token_file(tmp_path / "token", token)
    monkeypatch.setenv("CALSEG_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.delenv("CALSEG_TOKEN", raising=False)
    get_settings.cache_clear()
    try:
        assert default_token("http://127.0.0.1:8000") == token
        assert default_token("http://localhost:9") == token
        assert default_token("http://gpu-server:8000") is None
        assert CalSegClient("http://gpu-server:8000").token is None
        monkeypatch.setenv("CALSEG_TOKEN", "cs_" + "e" * 43)
        assert default_token("http://gpu-server:8000") == "cs_" + "e" * 43
    finally:
        get_settings.cache_clear()
