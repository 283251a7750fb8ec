"""What requests leave in the api's staging folder (``recordings/.incoming``: uploads streaming
in, their probes) when their process dies is removed later, and nothing in use is
(:mod:`calseg.service.staging`). Found by a security test of a clean clone: a 300 MB upload at
20 MB/s, the api SIGKILLed (as the OOM killer would), left an 84 MB ``.part`` for good, in no
user's storage quota; nothing cleaned the folder. Real files, real processes, no mocks."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_service_api import _tiff_bytes, client  # noqa: F401 - fixture

from calseg.service import staging
from calseg.service.auth import create_token, create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.reconcile import Reconciler
from calseg.service.settings import REPO_ROOT, get_settings

HOURS_2 = 2 * 3600.0


def _age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` and everything in it ``seconds`` into the past."""
    when = time.time() - seconds
    for p in [*(path.rglob("*") if path.is_dir() else []), path]:
        os.utime(p, (when, when), follow_symlinks=False)


def _probe_folder(incoming: Path, name: str = "cells.tif") -> Path:
    """A probe's folder as an upload leaves it when killed mid-probe: ``<uuid>/<name>``."""
    folder = incoming / str(uuid.uuid4())
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"II*\0" + b"\0" * 4096)
    return folder


def _part(incoming: Path, size: int = 8192) -> Path:
    incoming.mkdir(parents=True, exist_ok=True)
    part = incoming / f"{uuid.uuid4()}.part"
    part.write_bytes(b"\0" * size)
    return part


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_stale_part_and_probe_folder_are_swept_fresh_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = tmp_path / "art" / "recordings" / ".incoming"
    stale_part, fresh_part = _part(incoming, 50_000), _part(incoming)
    stale_probe, fresh_probe = _probe_folder(incoming), _probe_folder(incoming)
    # a folder whose own time is old but whose file is being written is in use: the newest
    # time inside counts
    busy = _probe_folder(incoming)
    _age(busy, HOURS_2)
    os.utime(busy / "cells.tif")
    # a link in a stale folder to a file elsewhere: the link goes, never what it points at
    outside = tmp_path / "keep.txt"
    outside.write_text("not staging")
    (stale_probe / "link").symlink_to(outside)
    _age(stale_part, HOURS_2)
    _age(stale_probe, HOURS_2)
    with caplog.at_level(logging.WARNING, logger="calseg.service.staging"):
        removed = staging.sweep_staging([incoming, tmp_path / "missing"], grace_s=3600)
    assert sorted(r.path.name for r in removed) == sorted([stale_part.name, stale_probe.name])
    assert not stale_part.exists() and not stale_probe.exists()
    assert fresh_part.exists() and fresh_probe.exists() and busy.exists()
    assert outside.read_text() == "not staging"
    assert all(r.idle_s > 7000 for r in removed)
    assert {r.path.name: r.size_bytes for r in removed}[stale_part.name] == 50_000
    # each removal is logged with what, how big and how long untouched
    assert f"removed {stale_part.name}" in caplog.text and "50,000 bytes" in caplog.text
    assert f"removed {stale_probe.name}" in caplog.text and "staging_grace_s" in caplog.text
    # nothing stale is left: a second pass removes nothing
    assert staging.sweep_staging([incoming], grace_s=3600) == []


def _start_api(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-proxy-headers", "--log-level", "warning"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    _wait(up, 60, "the api to listen")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_what_a_killed_api_left_is_removed_when_the_next_one_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The recipe: an upload streaming in, the api SIGKILLed. Its ``.part`` stays (nothing of
    the request runs again); the next api start removes it and a probe folder left the same way
    once they are older than ``staging_grace_s``, and keeps another api worker's upload that
    is streaming in (fresh)."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    env = {
        "CALSEG_DATABASE_URL": url,
        "CALSEG_ARTIFACT_DIR": str(tmp_path / "art"),
        "CALSEG_CACHE_DIR": str(tmp_path / "cache"),
        "CALSEG_RECONCILE_INTERVAL_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "alice"), "t")
    incoming = tmp_path / "art" / "recordings" / ".incoming"
    port = _free_port()
    proc = _start_api({**os.environ, **env}, port)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _start_upload(sock, token, "x.tif", 300_000_000, b"\0" * 300_000)
            _wait_streamed(incoming, 300_000, timeout_s=30)
            proc.kill()  # SIGKILL, as the OOM killer would
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (left,) = incoming.glob("*.part")  # the defect's state: nothing of the request ran again
    probe = _probe_folder(incoming)  # the same, killed while probing
    _age(left, HOURS_2)
    _age(probe, HOURS_2)
    in_flight = _part(incoming)  # another api worker's upload, streaming in
    from api.main import app

    with caplog.at_level(logging.WARNING, logger="calseg.service.staging"), TestClient(app):
        pass  # the lifespan's start
    get_settings.cache_clear()
    assert not left.exists() and not probe.exists()
    assert in_flight.exists()
    assert f"removed {left.name}" in caplog.text and f"removed {probe.name}" in caplog.text


def test_the_reconciler_sweeps_while_the_api_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leftovers appear while the api serves too (another api worker killed): its periodic
    task, the reconciler, sweeps at every pass."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    upgrade_database(url)
    settings = get_settings()
    incoming = tmp_path / "art" / "recordings" / ".incoming"
    rec = Reconciler(settings, interval_s=0.1, dispatches=set).start()
    try:
        stale_part, fresh_part = _part(incoming), _part(incoming)
        stale_probe = _probe_folder(incoming)
        _age(stale_part, HOURS_2)
        _age(stale_probe, HOURS_2)
        _wait(lambda: not stale_part.exists() and not stale_probe.exists(), 20, "the sweep")
        assert fresh_part.exists()
    finally:
        rec.stop()
        get_settings.cache_clear()


def _serve(app: Any) -> tuple[Any, int]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    _wait(lambda: server.started, 20, "uvicorn")
    return server, port


def _start_upload(sock: socket.socket, token: str, name: str, length: int, first: bytes) -> None:
    """Send a raw upload's request head (``Content-Length`` ``length``) and its ``first``
    bytes, the rest left to the caller: an upload in flight."""
    sock.sendall(
        f"POST /api/recordings?filename={name} HTTP/1.1\r\nHost: t\r\n".encode()
        + f"Authorization: Bearer {token}\r\n".encode()
        + b"Content-Type: application/octet-stream\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + first
    )


def _wait_streamed(incoming: Path, nbytes: int, timeout_s: float = 20.0) -> Path:
    """Wait until the one ``.part`` in ``incoming`` holds ``nbytes``; return it."""

    def streamed() -> bool:
        parts = list(incoming.glob("*.part")) if incoming.is_dir() else []
        return bool(parts) and parts[0].stat().st_size >= nbytes

    _wait(streamed, timeout_s, "the first bytes on disk")
    (part,) = incoming.glob("*.part")
    return part


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status code and body of the HTTP/1.1 answer on ``sock`` (the server closes or sends a
    Content-Length; read until the body is complete)."""
    data = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def test_an_upload_idle_for_longer_than_the_grace_is_not_swept(
    client: TestClient,  # noqa: F811
) -> None:
    """An upload in flight whose file was not written for longer than the grace (its client
    paused, or sends so slowly that its bytes sit in the file's write buffer) is kept by its
    own api process's sweep, which touches it, so that another process sharing the folder
    finds it fresh too; the upload then completes."""
    data = _tiff_bytes(np.arange(20 * 32 * 32, dtype=np.uint16).reshape(20, 32, 32))
    incoming = get_settings().artifact_dir / "recordings" / ".incoming"
    server, port = _serve(client.app)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _start_upload(sock, client.token, "slow.tif", len(data), data[:20_000])
            part = _wait_streamed(incoming, 20_000)
            _age(part, HOURS_2)  # as if its client had paused for two hours
            assert staging.sweep(get_settings()) == []  # this api process's pass
            assert part.exists() and time.time() - part.stat().st_mtime < 60
            # ... so another api process sharing the folder keeps it too
            other = subprocess.run(
                [sys.executable, "-c",
                 "import sys; from pathlib import Path; from calseg.service import staging; "
                 "print(len(staging.sweep_staging([Path(sys.argv[1])], 3600)))", str(incoming)],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            assert other.stdout.strip() == "0" and part.exists(), other
            sock.sendall(data[20_000:])
            status, body = _answer(sock)
        assert status == 201, body[:500]
        assert list(incoming.iterdir()) == []  # nothing left once it is stored
    finally:
        server.should_exit = True


def test_an_upload_whose_file_was_swept_answers_408(
    client: TestClient,  # noqa: F811
) -> None:
    """Should another process remove an upload's ``.part`` anyway (its own process sweeps
    nothing while ``reconcile_interval_s`` <= 0), the upload answers 408 saying so, stores
    nothing and leaves nothing; it was a 500 (the probe's rename of a missing file)."""
    data = _tiff_bytes(np.arange(20 * 32 * 32, dtype=np.uint16).reshape(20, 32, 32))
    incoming = get_settings().artifact_dir / "recordings" / ".incoming"
    server, port = _serve(client.app)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _start_upload(sock, client.token, "slow.tif", len(data), data[:20_000])
            _wait(lambda: incoming.is_dir() and any(incoming.glob("*.part")), 20, "the .part")
            (part,) = incoming.glob("*.part")
            part.unlink()  # what another process's sweep does to an upload idle past the grace
            sock.sendall(data[20_000:])
            status, body = _answer(sock)
        assert status == 408 and b"staging_grace_s" in body, body[:500]
        assert client.get("/api/recordings").json() == []
        assert list(incoming.iterdir()) == []
    finally:
        server.should_exit = True


def _recording_folders(art: Path) -> list[str]:
    return sorted(p.name for p in (art / "recordings").iterdir() if not p.name.startswith("."))


def test_an_upload_whose_row_cannot_be_committed_leaves_no_file(
    client: TestClient,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    """The database refuses the recording's row after its file was stored (here a trigger
    that fails as a lost database would, at the INSERT): the upload fails and takes its
    stored file with it. Before, ``recordings/<id>/`` stayed, named by no row, in no quota."""
    from sqlalchemy import text

    from calseg.service.db import get_engine

    with get_engine(get_settings().database_url).begin() as conn:
        conn.execute(text("CREATE TABLE gone (x INTEGER)"))
        conn.execute(text(
            "CREATE TRIGGER fail_insert BEFORE INSERT ON recordings "
            "BEGIN INSERT INTO gone VALUES (1); END"
        ))  # fmt: skip
        conn.execute(text("DROP TABLE gone"))
    data = _tiff_bytes(np.zeros((3, 16, 16), np.uint16))
    r = client.post("/api/recordings", files={"file": ("cells.tif", data, "image/tiff")})
    assert r.status_code == 503, r.text
    assert "database" in r.json()["detail"]
    art = tmp_path / "art"
    assert _recording_folders(art) == []
    assert list((art / "recordings" / ".incoming").iterdir()) == []


def test_recording_folders_no_row_names_are_swept_registered_ones_kept(
    client: TestClient,  # noqa: F811 - fixture
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What an api process killed between storing an upload's file and committing its row
    leaves (``recordings/<uuid>/<file>``, no row) is removed by the sweep once older than
    ``staging_grace_s``; a registered recording's folder stays however old, and so do a fresh
    folder (an upload registering now) and anything not named by a UUID."""
    data = _tiff_bytes(np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16))
    r = client.post("/api/recordings", files={"file": ("cells.tif", data, "image/tiff")})
    assert r.status_code == 201, r.text
    rec_id = r.json()["id"]
    recordings = tmp_path / "art" / "recordings"
    orphan, fresh = recordings / str(uuid.uuid4()), recordings / str(uuid.uuid4())
    other = recordings / "notes"
    for folder in (orphan, fresh, other):
        folder.mkdir()
        (folder / "cells.tif").write_bytes(data)
    for folder in (orphan, other, recordings / rec_id):
        _age(folder, HOURS_2)
    with caplog.at_level(logging.WARNING, logger="calseg.service.staging"):
        removed = staging.sweep(get_settings())
    assert [x.path.name for x in removed] == [orphan.name]
    assert removed[0].size_bytes == len(data)
    assert _recording_folders(tmp_path / "art") == sorted([rec_id, fresh.name, "notes"])
    assert "no recording names" in caplog.text
    assert client.get(f"/api/recordings/{rec_id}/frames/0.png").status_code == 200
    assert staging.sweep(get_settings()) == []


def test_an_upload_refused_by_another_constraint_is_409_and_leaves_no_file(
    client: TestClient,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    """A constraint other than the same-file one fails the row (here a trigger raising as a
    foreign key to an owner deleted meanwhile would): 409 naming it, no file left. Before, the
    duplicate branch looked for the earlier recording, found none and answered 500."""
    from sqlalchemy import text

    from calseg.service.db import get_engine

    with get_engine(get_settings().database_url).begin() as conn:
        conn.execute(text(
            "CREATE TRIGGER refuse_insert BEFORE INSERT ON recordings "
            "BEGIN SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed'); END"
        ))  # fmt: skip
    data = _tiff_bytes(np.zeros((3, 16, 16), np.uint16))
    r = client.post("/api/recordings", files={"file": ("cells.tif", data, "image/tiff")})
    assert r.status_code == 409, r.text
    assert "FOREIGN KEY" in r.json()["detail"] and "nothing was stored" in r.json()["detail"]
    assert _recording_folders(tmp_path / "art") == []
