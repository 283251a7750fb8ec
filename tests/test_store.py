"""The artifact store interface (issue 5 item 6): the local folder and the fsspec store behave
the same; two nodes sharing one fsspec store see each other's artifacts; a real simulate job
runs on an fsspec store. fsspec's real ``memory://`` and ``file://`` filesystems, no mocks."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest

from calseg.service.store import (
    ArtifactStore,
    FsspecArtifactStore,
    LocalArtifactStore,
    StoreError,
    get_store,
)


def _memory_url() -> str:
    return f"memory://calseg-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "memory", "file"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "local")
    if request.param == "memory":
        return FsspecArtifactStore(_memory_url(), tmp_path / "mirror")
    (tmp_path / "remote").mkdir()
    return FsspecArtifactStore(f"file://{tmp_path / 'remote'}", tmp_path / "mirror")


def test_every_store_honours_the_interface(store: ArtifactStore, tmp_path: Path) -> None:
    payload = np.random.default_rng(0).integers(0, 255, 3 * 1024 * 1024 + 7, np.uint8).tobytes()
    src = tmp_path / "src.tif"
    src.write_bytes(payload)
    obj = store.put("recordings/r1/x.tif", src)
    assert obj.sha256 == hashlib.sha256(payload).hexdigest() and obj.size_bytes == len(payload)
    assert obj.content_type == "image/tiff" and obj.relpath == "recordings/r1/x.tif"
    assert store.exists("recordings/r1/x.tif") and not store.exists("recordings/r1/y.tif")
    assert store.path("recordings/r1/x.tif").read_bytes() == payload
    with store.open("recordings/r1/x.tif") as fh:
        assert fh.read(10) == payload[:10]
    with store.open("jobs/j/notes.txt", "wb") as fh:
        fh.write(b"hello")
    assert store.register("jobs/j/notes.txt").sha256 == hashlib.sha256(b"hello").hexdigest()
    # a runner writes into workdir(); the file is then registered under its key
    work = store.workdir("jobs/j2")
    (work / "labels.tif").write_bytes(b"L" * 100)
    rel = store.relpath_of(work / "labels.tif")
    assert rel == "jobs/j2/labels.tif" and store.register(rel).size_bytes == 100
    assert store.relpath_of(tmp_path / "elsewhere.tif") is None
    store.delete("jobs/j2")
    assert not store.exists("jobs/j2/labels.tif")
    store.delete("jobs/never-was")  # no error when absent
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(StoreError):
            store.path(bad)
    with pytest.raises(StoreError, match="does not exist"):
        store.register("jobs/j/missing.tif")
    with pytest.raises(StoreError, match="unsupported mode"):
        store.open("jobs/j/notes.txt", "ab")


def test_two_nodes_share_an_fsspec_store(tmp_path: Path) -> None:
    """Node A writes a dataset folder and publishes it (sync); node B, with its own empty
    mirror, opens the manifest and finds the files beside it."""
    url = _memory_url()
    a = FsspecArtifactStore(url, tmp_path / "node-a")
    b = FsspecArtifactStore(url, tmp_path / "node-b")
    work = a.workdir("jobs/sim/dataset")
    (work / "v000").mkdir()
    (work / "manifest.json").write_text('{"videos": ["v000"]}')
    (work / "v000" / "image.tif").write_bytes(b"\x01\x02" * 5000)
    assert a.sync("jobs/sim") == 2
    assert not b.exists("jobs/sim/nothing") and b.exists("jobs/sim/dataset/manifest.json")
    manifest = b.path("jobs/sim/dataset/manifest.json")
    assert manifest.is_relative_to(tmp_path / "node-b")
    assert manifest.read_text() == '{"videos": ["v000"]}'
    assert (manifest.parent / "v000" / "image.tif").read_bytes() == b"\x01\x02" * 5000
    # deleting on one node removes the object for all
    a.delete("jobs/sim")
    assert not b.fs.exists(f"{b.root}/jobs/sim/dataset/manifest.json")


def test_a_simulate_job_runs_on_an_fsspec_store(tmp_path: Path) -> None:
    from calseg.io.dataset import load_dataset
    from calseg.service import jobs
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.models import Artifact
    from calseg.service.settings import Settings

    url = f"sqlite:///{tmp_path / 'j.db'}"
    upgrade_database(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path / "unused", progress_interval_s=0)
    remote = _memory_url()
    worker_store = FsspecArtifactStore(remote, tmp_path / "worker-mirror")
    with session_scope(url) as s:
        job_id = jobs.submit_job(
            s, "simulate", {"n_videos": 3, "n_frames": 4, "height": 128, "width": 128},
            enqueue=lambda job, countdown=None: None,
        ).id  # fmt: skip
    state = jobs.run_job(job_id, url=url, store=worker_store, settings=settings)
    assert state == "succeeded"
    with session_scope(url) as s:
        arts = {a.name: (a.relpath, a.sha256) for a in s.query(Artifact).filter_by(job_id=job_id)}
    assert {"manifest.json", "preview.png", "job.log"} <= set(arts)
    api_store = FsspecArtifactStore(remote, tmp_path / "api-mirror")  # another node
    for relpath, sha in arts.values():
        data = api_store.path(relpath).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
    dataset = load_dataset(api_store.path(arts["manifest.json"][0]))
    assert len(dataset.videos) == 3
    assert dataset.videos[0].load_image().shape == (4, 128, 128)


def test_store_url_setting_selects_the_fsspec_store(tmp_path: Path, monkeypatch) -> None:
    from calseg.service.settings import get_settings

    monkeypatch.setenv("CALSEG_STORE_URL", _memory_url())
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        store = get_store()
        assert isinstance(store, FsspecArtifactStore)
        assert store.mirror == (tmp_path / "cache" / "store").resolve()
        monkeypatch.setenv("CALSEG_STORE_URL", "nosuchprotocol://x")
        get_settings.cache_clear()
        with pytest.raises(ValueError, match="nosuchprotocol"):
            get_store()
        monkeypatch.delenv("CALSEG_STORE_URL")
        get_settings.cache_clear()
        assert isinstance(get_store(tmp_path / "a"), LocalArtifactStore)
    finally:
        get_settings.cache_clear()
