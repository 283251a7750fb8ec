"""The bad-file corpus (issue 8 "Files") through both doors: ``read_recording`` and
``POST /api/recordings`` (in-process app, SQLite, a real user token). Each case asserts the
outcome: shape/dtype/values or the refusal's message; the upload answers 201 with the same
shape, or 422 with the same reason (never 5xx). Cases are in ``file_corpus.py``.

The 4+ GB sparse BigTIFF upload and the 5,000-frame recording are ``reliability`` cases.
"""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from file_corpus import BADMETA, Case, cases

from calseg.io.recordings import RecordingError, iter_recording, probe_recording, read_recording

CASES = cases()


def _write(case: Case, tmp_path: Path, real_file) -> Path:
    if case.needs_real:
        real_file(BADMETA)  # skips when the real recording is absent
    path = tmp_path / case.filename
    case.write(path)
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reader(case: Case, tmp_path: Path, real_file) -> None:
    path = _write(case, tmp_path, real_file)
    if case.error:
        with pytest.raises(RecordingError) as err:
            read_recording(path, **case.read_kwargs)
        assert case.error.lower() in str(err.value).lower()
        with pytest.raises(RecordingError):
            probe_recording(path)
        return
    rec = read_recording(path, **case.read_kwargs)
    assert rec.frames.shape == case.shape and rec.frames.ndim == 3
    if case.dtype:
        assert rec.frames.dtype == np.dtype(case.dtype)
    assert rec.frames.dtype in (np.uint8, np.uint16, np.float32)
    if case.check:
        case.check(rec.frames)
    if case.warns:
        assert any(case.warns in w for w in rec.info.warnings), rec.info.warnings
    if not case.read_kwargs:  # the probe tells what the read gives
        info = probe_recording(path)
        assert (info.n_frames, info.height, info.width) == case.shape
        assert info.dtype == str(rec.frames.dtype)


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The app in-process on SQLite with a user's token (as tests/test_service_api.py)."""
    from fastapi.testclient import TestClient

    from calseg.service.auth import create_token, create_user
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.settings import get_settings

    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_RECONCILE_INTERVAL_S", "0")
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import app

    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "uploader"), "t")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client
    get_settings.cache_clear()


def _upload(api, path: Path, filename: str | None = None):
    with open(path, "rb") as fh:
        return api.post("/api/recordings", files={"file": (filename or path.name, fh)})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_upload(case: Case, tmp_path: Path, api, real_file) -> None:
    path = _write(case, tmp_path, real_file)
    r = _upload(api, path)
    if case.error:
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert case.error.lower() in detail.lower() and case.filename in detail
        assert str(tmp_path) not in detail  # no server paths in messages
        return
    assert r.status_code == 201, r.text
    body = r.json()
    shape = case.shape
    if case.read_kwargs.get("interleaved_channels"):  # no override at upload: all images
        shape = (shape[0] * case.read_kwargs["interleaved_channels"], *shape[1:])
    assert (body["n_frames"], body["height"], body["width"]) == shape
    if case.dtype:
        assert body["dtype"] == case.dtype
    assert body["size_bytes"] == path.stat().st_size and not body["duplicate"]
    # the same file again: recognised, nothing stored twice
    again = _upload(api, path, "another-name.tif")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["id"] == body["id"]


def test_upload_names_wrong_content_type_and_garbage(tmp_path: Path, api) -> None:
    """File names with ``../`` and non-ASCII characters are stored safely; a wrong content type
    is 415; a body that is no form is 4xx."""
    import tifffile

    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.arange(5 * 32 * 32, dtype=np.uint16).reshape(5, 32, 32))
    r = _upload(api, path, "../../etc/Ca²⁺ réponse ü.tif")
    assert r.status_code == 201, r.text
    name = r.json()["filename"]
    assert "/" not in name and ".." not in name and name.endswith(".tif") and name.isascii()
    r = api.post("/api/recordings", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415, r.text
    r = api.post(
        "/api/recordings",
        content=b"--xx\r\nnot a part\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=xx"},
    )
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.reliability
def test_long_recording_5000_frames_memory_bounded(tmp_path: Path) -> None:
    """A 5,000-frame recording (5000 x 128 x 128 uint16, 164 MB) read chunk by chunk: peak
    Python allocations stay within a few chunks, not the whole stack."""
    import tifffile

    path = tmp_path / "long.tif"
    mm = tifffile.memmap(
        path, shape=(5000, 128, 128), dtype=np.uint16, bigtiff=True, photometric="minisblack"
    )
    for i in range(50):
        mm[i * 100 : (i + 1) * 100] = i
    mm.flush()
    del mm
    info = probe_recording(path)
    assert (info.n_frames, info.height, info.width) == (5000, 128, 128)
    total = 5000 * 128 * 128 * 2
    tracemalloc.start()
    try:
        n, last = 0, None
        for t0, chunk in iter_recording(path, chunk_frames=64):
            assert t0 == n and chunk.shape[1:] == (128, 128)
            assert chunk[0, 0, 0] == (t0 // 100)  # values from the right frames
            n += chunk.shape[0]
            last = chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 5000 and last[-1, 0, 0] == 49
    assert peak < total / 10, f"peak {peak / 1e6:.0f} MB for a {total / 1e6:.0f} MB recording"


@pytest.mark.reliability
def test_4gb_sparse_bigtiff_upload(tmp_path: Path) -> None:
    """A 4.3 GB BigTIFF (sparse file) streamed to the real api over loopback (upload limit and
    decode budget raised to 6 GiB): accepted with the right shape, sha256 matching, and the
    api's resident memory grows < 100 MB."""
    from calseg.bench_service import sparse_bigtiff, upload_with_rss

    path = sparse_bigtiff(tmp_path / "huge.tif", 4.3e9)
    assert path.stat().st_size > 4 * 1024**3
    try:
        result = upload_with_rss(
            path, tmp_path / "svc", max_upload_bytes=6 * 1024**3,
            max_recording_bytes=6 * 1024**3, max_recording_pixels=2**32,
            min_free_disk_bytes=0,  # memory is measured here, not the disk reserve
        )  # fmt: skip
    finally:  # the stored copy is a real 4.3 GB file: do not leave it in pytest's tmp
        shutil.rmtree(tmp_path / "svc", ignore_errors=True)
    assert result["status"] == 201, result
    assert result["n_frames"] == result["expected_frames"]
    assert result["sha256_ok"]
    assert result["rss_growth_mb"] < 100, result
