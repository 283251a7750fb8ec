"""Hostile recordings (issue 13 items 1-2) through every door: the reader
(``probe_recording``, ``read_recording``, ``iter_recording``), ``POST /api/recordings``, and,
for a file that got into the store anyway (uploaded before the fix), the preview
``GET /api/recordings/{id}/frames/{t}.png``, the viewer and an infer job in the worker's code
path. Each case asserts the status code and the message, that no victim file was opened or
read (inotify, :class:`attack_files.OpenWatch`), that the victim's marker is in no answer, and
that nothing was stored or left behind. The cases are in ``attack_files.py``.

Memory (decompression bombs, 600-frame videos): subprocesses measure their own peak RSS
(``ru_maxrss``) before and after; the issue-sized cases are ``reliability``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from attack_files import MARKER, Attack, OpenWatch, Victim, attacks, make_victim

from calseg.io.recordings import (
    ReadLimits,
    RecordingError,
    RecordingTooLarge,
    iter_recording,
    probe_recording,
    read_recording,
)

ATTACKS = attacks()
LIMITS = ReadLimits(max_pixels=50_000_000, max_bytes=200 * 2**20)
"""The budget of these tests (the bombs declare far more; every honest file here fits)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Victim, dict[str, Path]]:
    """The victim's files and every attack file, written once for the module."""
    root = tmp_path_factory.mktemp("attacks")
    victim = make_victim(root / "victim")
    up = root / "upload"
    up.mkdir()
    files = {}
    for attack in ATTACKS:
        files[attack.id] = up / attack.filename
        attack.write(files[attack.id], victim)
    return victim, files


@pytest.fixture()
def victim(corpus: tuple[Victim, dict[str, Path]]) -> Victim:
    return corpus[0]


@pytest.fixture()
def watch(victim: Victim):
    w = OpenWatch(victim.files)
    victim.secret.read_bytes()  # the watch itself works: one open seen
    assert w.events() >= 1
    yield w
    w.close()


def _status(exc: RecordingError) -> int:
    return 413 if isinstance(exc, RecordingTooLarge) else 422


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_reader_refuses(attack: Attack, corpus, watch) -> None:
    path = corpus[1][attack.id]
    watch.events()
    calls = [
        lambda: probe_recording(path, limits=LIMITS),
        lambda: read_recording(path, limits=LIMITS),
        lambda: next(iter_recording(path, limits=LIMITS)),
    ]
    for call in calls:
        with pytest.raises(RecordingError) as err:
            call()
        msg = str(err.value)
        assert _status(err.value) == attack.status, msg
        assert attack.message.lower() in msg.lower(), msg
        assert attack.filename in msg and MARKER.decode() not in msg
    assert watch.events() == 0, "a victim file was opened"


def _naive_reads(attack: Attack, path: Path) -> bytes:
    """What the bare library (h5py / tifffile with default options) reads from the file."""
    import h5py
    import tifffile

    if attack.filename.endswith((".h5", ".nwb")):
        with h5py.File(path, "r") as f:
            name = "soft" if "soft" in f else "rec"
            return np.asarray(f[name][()]).tobytes()
    if attack.filename.endswith(".mov"):  # FFmpeg with QuickTime data references followed
        import av

        opts = {"enable_drefs": "1", "use_absolute_path": "1"}
        with av.open(str(path), options=opts) as c:
            return b"".join(f.to_ndarray(format="gray").tobytes() for f in c.decode(video=0))
    return np.asarray(tifffile.imread(path, series=0)).tobytes()


NAIVE = [
    a
    for a in ATTACKS
    if a.kind == "reference"
    and any(k in a.id for k in ("hdf5-ext", "virtual", "ome", "data-reference"))
]


@pytest.mark.parametrize("attack", NAIVE, ids=lambda a: a.id)
def test_the_attack_works_on_the_bare_library(
    attack: Attack, corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference files are real attacks: h5py and tifffile left to their defaults read the
    victim's bytes through them (so the refusals above are what protects the victim). HDF5
    resolves a relative external file against the process's working folder (the api's is the
    repository, where ``var/token`` lies); here that is the upload folder."""
    path = corpus[1][attack.id]
    monkeypatch.chdir(path.parent)
    got = _naive_reads(attack, path)
    if attack.filename.endswith(".mov"):  # the token's bytes through FFmpeg's pixel format:
        m = len(MARKER)  # its own frames are zeros; these repeat with the marker's period
        assert any(got) and got[:m] == got[m : 2 * m] == got[2 * m : 3 * m]
    else:
        assert MARKER[:8] in got, attack.id


def test_tifffile_cannot_reach_other_files_through_the_confined_handle(tmp_path: Path) -> None:
    """The mechanism behind TIFF confinement: tifffile opens OME multi-file parts,
    Micro-Manager ``_MMStack`` siblings and ``NDTiff.index`` only when its handle "is a file"
    with a folder; through :class:`ConfinedFile` it is neither."""
    import tifffile

    from calseg.io.file_safety import ConfinedFile

    p = tmp_path / "x_MMStack_Pos0.ome.tif"
    tifffile.imwrite(p, np.zeros((2, 16, 16), np.uint8))
    (tmp_path / "NDTiff.index").write_bytes(b"\0" * 64)
    with tifffile.TiffFile(ConfinedFile(p)) as tf:
        assert tf.filehandle.is_file is False and tf.filehandle.dirname == ""
        assert tf.is_ndtiff is False
        assert tf.series[0].shape == (2, 16, 16)


# ---------------------------------------------------------------------------- through HTTP


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The app in-process on SQLite with two users' tokens (``bob`` attacks, ``carol`` owns
    the victim recording) and this module's decode budget."""
    from fastapi.testclient import TestClient

    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.settings import get_settings

    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_RECONCILE_INTERVAL_S", "0")
    monkeypatch.setenv("CALSEG_MAX_RECORDING_PIXELS", str(LIMITS.max_pixels))
    monkeypatch.setenv("CALSEG_MAX_RECORDING_BYTES", str(LIMITS.max_bytes))
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import _limiters, app, enqueue_dep

    for limiter in _limiters.values():
        limiter.reset()
    with session_scope(url) as session:
        bob = create_user(session, "bob")
        _, token = create_token(session, bob, "t")
        bob_id = bob.id
    app.dependency_overrides[enqueue_dep] = lambda: lambda job, countdown=None: None
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        client.url = url  # type: ignore[attr-defined]
        client.user_id = bob_id  # type: ignore[attr-defined]
        yield client
    app.dependency_overrides.clear()
    get_settings.cache_clear()


def _no_marker(*texts: str | bytes) -> None:
    for t in texts:
        raw = t if isinstance(t, bytes) else t.encode()
        assert MARKER not in raw


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_upload_refuses(attack: Attack, tmp_path: Path, corpus, watch, api) -> None:
    from calseg.service.settings import get_settings

    src = corpus[1][attack.id]
    watch.events()
    with open(src, "rb") as fh:
        r = api.post("/api/recordings", files={"file": (attack.filename, fh)})
    assert r.status_code == attack.status, r.text
    detail = r.json()["detail"]
    assert attack.message.lower() in detail.lower() and attack.filename in detail, detail
    assert str(tmp_path / "art") not in detail  # no server paths of the store
    _no_marker(r.content)
    assert watch.events() == 0, "a victim file was opened during the upload"
    assert api.get("/api/recordings").json() == []  # nothing stored
    incoming = get_settings().artifact_dir / "recordings" / ".incoming"
    assert list(incoming.iterdir()) == []  # nothing left behind


def _store_directly(api, path: Path, filename: str) -> str:
    """Put a file into the store and the database as an upload before the fix would have."""
    from calseg.service.db import session_scope
    from calseg.service.models import Recording
    from calseg.service.settings import get_settings

    rec_id = str(uuid.uuid4())
    dest = get_settings().artifact_dir / "recordings" / rec_id / filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(path.read_bytes())
    with session_scope(api.url) as session:
        session.add(
            Recording(
                id=rec_id, owner_id=api.user_id, filename=filename,
                relpath=f"recordings/{rec_id}/{filename}",
                sha256=hashlib.sha256(dest.read_bytes()).hexdigest(),
                size_bytes=dest.stat().st_size, n_frames=4, height=64, width=64, dtype="uint8",
            )
        )  # fmt: skip
    return rec_id


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_stored_file_preview_and_infer_refused(attack: Attack, corpus, watch, api) -> None:
    """A hostile file already in the store (uploaded before the fix): its preview answers the
    same status and reason; an infer job on it fails with the reason in the worker's code path
    (``jobs.run_job``); no victim file is opened, no answer or job record holds the marker."""
    from calseg.service import jobs
    from calseg.service.settings import get_settings
    from calseg.service.store import LocalArtifactStore

    src = corpus[1][attack.id]
    rec_id = _store_directly(api, src, attack.filename)
    watch.events()
    r = api.get(f"/api/recordings/{rec_id}/frames/0.png")  # every hostile part is in frame 0
    assert r.status_code == attack.status, r.text
    assert attack.message.lower() in r.json()["detail"].lower(), r.text
    _no_marker(r.content)
    r = api.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": rec_id, "method": "baseline"}},
    )
    # its headers are opened at submit (the decode limits of today): a file refused there is
    # a 422 with the reason; one refused only when its pixels are decoded fails in the worker
    assert r.status_code in (201, 422), r.text
    _no_marker(r.content)
    if r.status_code == 422:
        assert attack.message.lower() in r.json()["detail"].lower(), r.text
        assert watch.events() == 0, "a victim file was opened by the preview or the submit"
        return
    job_id = r.json()["id"]
    settings = get_settings()
    state = jobs.run_job(
        job_id, settings=settings, store=LocalArtifactStore(settings.artifact_dir),
        enqueue=lambda job, countdown=None: None,
    )  # fmt: skip
    job = api.get(f"/api/jobs/{job_id}")
    assert state == "failed", job.text
    assert attack.message.lower() in job.json()["error"].lower(), job.json()["error"]
    _no_marker(job.content, api.get(f"/api/jobs/{job_id}/log").content)
    assert watch.events() == 0, "a victim file was opened by the preview or the job"


# ---------------------------------------------------------------------------------- memory

_MEASURE = r"""
import json, os, resource, sys
from pathlib import Path

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

os.environ.update(json.loads(sys.argv[1]))
from fastapi.testclient import TestClient
from calseg.service.auth import create_token, create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.settings import get_settings
url = os.environ["CALSEG_DATABASE_URL"]
upgrade_database(url)
with session_scope(url) as s:
    _, token = create_token(s, create_user(s, "bob"), "t")
from api.main import app
path, frames = Path(sys.argv[2]), [int(t) for t in sys.argv[3].split(",") if t]
out = {}
with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
    c.get("/api/me")
    base = peak_mb()
    with open(path, "rb") as fh:
        r = c.post("/api/recordings", files={"file": (path.name, fh)})
    out["upload_status"], out["upload_growth_mb"] = r.status_code, peak_mb() - base
    out["upload"] = r.json()
    if r.status_code == 201:
        rid = r.json()["id"]
        statuses = [c.get(f"/api/recordings/{rid}/frames/{t}.png").status_code for t in frames]
        out["preview_status"], out["preview_growth_mb"] = statuses, peak_mb() - base
print(json.dumps(out))
"""


def measure_upload_and_preview(tmp_path: Path, path: Path, frames: list[int], **env: str) -> dict:
    """Upload ``path`` to the app in a fresh Python process and fetch previews of ``frames``;
    the process's peak RSS growth (MB) after the upload and after the previews."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = {
        "CALSEG_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "CALSEG_ARTIFACT_DIR": str(tmp_path / "m-art"),
        "CALSEG_CACHE_DIR": str(tmp_path / "m-cache"),
        "CALSEG_RECONCILE_INTERVAL_S": "0",
        **env,
    }
    run_env = {k: v for k, v in os.environ.items() if k != "CALSEG_REDIS_URL"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(settings), str(path),
         ",".join(map(str, frames))],
        capture_output=True, text=True, timeout=600, env=run_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(path.name, {k: v for k, v in out.items() if k != "upload"})  # numbers for the report
    return out


def _bomb_tiff(path: Path, n_pages: int, side: int) -> Path:
    from attack_files import raw_tiff, zlib_zeros

    raw_tiff(path, width=side, height=side, n_pages=n_pages, strip=zlib_zeros(side * side * 2))
    return path


def test_small_zlib_tiff_declaring_much_previews_one_frame(tmp_path: Path) -> None:
    """A 60 kB zlib TIFF declaring 500 frames of 1024^2 uint16 (1 GiB): accepted under the
    default budget (it is within it) without decoding it, and previews of 3 frames decode 3
    frames: peak RSS grows by tens of MB, not the 1 GiB the old reader took."""
    path = _bomb_tiff(tmp_path / "compressed.tif", 500, 1024)
    assert path.stat().st_size < 200_000
    out = measure_upload_and_preview(tmp_path, path, [0, 250, 499])
    assert out["upload_status"] == 201, out
    assert out["upload"]["n_frames"] == 500 and out["preview_status"] == [200, 200, 200], out
    assert out["upload_growth_mb"] < 60 and out["preview_growth_mb"] < 80, out


def test_over_budget_tiff_is_413_before_any_decode(tmp_path: Path) -> None:
    path = _bomb_tiff(tmp_path / "bomb.tif", 500, 1024)
    out = measure_upload_and_preview(
        tmp_path, path, [], CALSEG_MAX_RECORDING_BYTES=str(256 * 2**20)
    )
    assert out["upload_status"] == 413, out
    detail = out["upload"]["detail"]
    assert "1,048,576,000 bytes" in detail and "268,435,456 bytes" in detail, detail
    assert "max_recording_bytes" in detail and out["upload_growth_mb"] < 40, out


def _black_mp4(path: Path, n: int, side: int) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width = s.height = side
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "30"}
        f = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        for _ in range(n):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_tiny_mp4_of_many_black_frames_uploads_without_decoding_them(tmp_path: Path) -> None:
    """150 black 1024^2 frames in a ~10 kB MP4: the upload reads the header and decodes one
    frame (the old reader decoded all: 0.5 GB); a preview of the last frame decodes in order
    but holds one frame at a time."""
    path = _black_mp4(tmp_path / "black.mp4", 150, 1024)
    out = measure_upload_and_preview(tmp_path, path, [149])
    assert out["upload_status"] == 201 and out["upload"]["n_frames"] == 150, out
    assert out["upload_growth_mb"] < 60 and out["preview_growth_mb"] < 80, out
    # under a budget of 100 Mpx (150 x 1024^2 = 157 Mpx): 413 from the header, nothing stored
    out = measure_upload_and_preview(
        tmp_path / "small", path, [], CALSEG_MAX_RECORDING_PIXELS=str(100_000_000)
    )
    assert out["upload_status"] == 413, out
    assert "157,286,400 pixels (150 frames of 1024 x 1024)" in out["upload"]["detail"], out


@pytest.mark.reliability
def test_issue_sized_bombs_bounded_rss(tmp_path: Path) -> None:
    """The issue's two cases at full size: a zlib TIFF declaring 1000 frames of 1024^2 (2.1 GB)
    and a 28 kB MP4 of 600 black 1024^2 frames. Upload and previews of the first, middle and
    last frame: peak RSS growth under 100 MB (was 2.5 GB and 1.9 GB)."""
    tif = _bomb_tiff(tmp_path / "bomb.tif", 1000, 1024)
    out = measure_upload_and_preview(tmp_path / "t", tif, [0, 500, 999])
    assert out["upload_status"] == 201 and out["preview_status"] == [200, 200, 200], out
    assert out["upload_growth_mb"] < 100 and out["preview_growth_mb"] < 100, out
    mp4 = _black_mp4(tmp_path / "black.mp4", 600, 1024)
    assert mp4.stat().st_size < 100_000
    out = measure_upload_and_preview(tmp_path / "m", mp4, [0, 300, 599])
    assert out["upload_status"] == 201 and out["upload"]["n_frames"] == 600, out
    assert out["upload_growth_mb"] < 100 and out["preview_growth_mb"] < 100, out


@pytest.mark.reliability
def test_one_huge_frame_is_refused_and_a_frame_at_the_limit_previews_decimated(
    tmp_path: Path,
) -> None:
    """A new user's attack (2026-12-07): a ~1 MB TIFF of one 30000 x 30000 frame was accepted
    (900 Mpx is within the 2^31-pixel recording budget) and its preview took the API to 23 GB
    and the kernel's OOM killer (about 33 bytes per frame pixel drawn). Now the frame limit
    (max_frame_pixels, 2^26 px) refuses it from the header, and a frame at the limit (8192^2
    uint16, 128 MiB decoded) is checked and previewed with the decoded frame plus a drawing of
    at most 4 Mi px (every 4th row and column)."""
    huge = _bomb_tiff(tmp_path / "huge.tif", 1, 30000)
    assert huge.stat().st_size < 4 * 2**20
    out = measure_upload_and_preview(tmp_path / "h", huge, [])
    assert out["upload_status"] == 413, out
    assert (
        "30000 x 30000" in out["upload"]["detail"] and "max_frame_pixels" in out["upload"]["detail"]
    )
    assert out["upload_growth_mb"] < 40, out
    at_limit = _bomb_tiff(tmp_path / "limit.tif", 1, 8192)
    out = measure_upload_and_preview(tmp_path / "l", at_limit, [0, 0])
    assert out["upload_status"] == 201 and out["preview_status"] == [200, 200], out
    assert out["upload_growth_mb"] < 400 and out["preview_growth_mb"] < 500, out


_WORKER = r"""
import json, resource, sys
from calseg.io.recordings import read_recording
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rec = read_recording(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"shape": list(rec.frames.shape), "frames_mb": rec.frames.nbytes / 2**20,
                  "growth_mb": peak - base}))
"""


@pytest.mark.reliability
def test_worker_read_holds_the_frames_plus_one_chunk(tmp_path: Path) -> None:
    """The worker's whole-recording read (infer, simulate-like fit): a zlib TIFF of 300 frames
    of 1024^2 uint16 (600 MiB decoded) read in a fresh process: peak RSS growth is the frames
    returned plus about one 64 MiB chunk, not several copies."""
    path = _bomb_tiff(tmp_path / "w.tif", 300, 1024)
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [300, 1024, 1024]
    assert out["growth_mb"] < out["frames_mb"] + 150, out
