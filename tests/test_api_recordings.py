"""Uploads with reading options, the reader's warnings in the answer, one-frame previews, and
infer jobs that read a recording the way it was uploaded (issue 13 item 8), through the REST
API in-process (TestClient, SQLite; jobs run in-process as the worker runs them)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from calseg.service import jobs
from calseg.service.auth import create_token, create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.settings import get_settings
from calseg.service.store import LocalArtifactStore


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    monkeypatch.setenv("CALSEG_DATABASE_URL", url)
    monkeypatch.setenv("CALSEG_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("CALSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALSEG_RECONCILE_INTERVAL_S", "0")
    monkeypatch.delenv("CALSEG_REDIS_URL", raising=False)
    get_settings.cache_clear()
    upgrade_database(url)
    from api.main import _limiters, app, enqueue_dep

    for limiter in _limiters.values():
        limiter.reset()
    with session_scope(url) as session:
        _, token = create_token(session, create_user(session, "alice"), "t")
    app.dependency_overrides[enqueue_dep] = lambda: lambda job, countdown=None: None
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
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


def _two_channel_tiff() -> tuple[bytes, np.ndarray, np.ndarray]:
    """80 images alternating a GCaMP-like channel and a static dim channel (the issue's file)."""
    rng = np.random.default_rng(0)
    green = rng.poisson(300, (40, 32, 32)).astype(np.uint16)
    green[10:14, 8:16, 8:16] += 900
    red = rng.poisson(60, (40, 32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.stack([green, red], 1).reshape(-1, 32, 32), photometric="minisblack")
    return buf.getvalue(), green, red


def test_interleaved_upload_warns_then_options_split_it(client: TestClient) -> None:
    data, green, red = _two_channel_tiff()
    r = client.post("/api/recordings", files={"file": ("two.tif", data)})
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["n_frames"] == 80 and rec["read_options"] is None and rec["axes"] == "TYX"
    assert any("--interleaved-channels 2" in w for w in rec["warnings"]), rec["warnings"]
    assert rec["info"]["suspected_channels"] == 2 and rec["info"]["path"] == "two.tif"
    # stored with the recording: the listing and the single view show the same warnings
    assert client.get(f"/api/recordings/{rec['id']}").json()["warnings"] == rec["warnings"]
    # the same file with options: recognised, and told that the options are the old ones
    again = client.post("/api/recordings?interleaved_channels=2", files={"file": ("t.tif", data)})
    assert again.status_code == 200 and "keeps the reading options" in again.json()["message"]
    # an infer job on it can split the channels itself
    job = client.post(
        "/api/jobs",
        json={"kind": "infer", "params": {"recording_id": rec["id"], "method": "baseline",
                                          "interleaved_channels": 2, "channel": 1}},
    ).json()  # fmt: skip
    assert _run(job["id"]) == "succeeded", client.get(f"/api/jobs/{job['id']}").json()["error"]
    result = client.get(f"/api/jobs/{job['id']}").json()["result"]
    assert result["n_frames"] == 40
    assert result["source"]["read_options"] == {"interleaved_channels": 2, "channel": 1}
    # the viewer reads frames the way the job did: frame 3 is red image 3
    png = client.get(f"/api/jobs/{job['id']}/frames/3.png", params={"overlay": 0, "lo": 0,
                                                                     "hi": 65535})  # fmt: skip
    assert png.status_code == 200 and png.headers["x-frames"] == "40"
    gray = np.asarray(Image.open(io.BytesIO(png.content)).convert("L")).astype(float)
    np.testing.assert_allclose(gray, red[3] * 255.0 / 65535, atol=1)
    # an uploaded recording has no ground truth: gt=1 is 422 (it drew the prediction alone,
    # 200, silently: a new-user check); a range reaching infinity is 422 too
    r = client.get(f"/api/jobs/{job['id']}/frames/3.png", params={"gt": 1})
    assert r.status_code == 422 and "no ground truth" in r.json()["detail"], r.text
    r = client.get(f"/api/jobs/{job['id']}/frames/3.png", params={"lo": 1e308, "hi": "inf"})
    assert r.status_code == 422 and "finite" in r.json()["detail"], r.text


def test_upload_options_as_query_or_form_fields(client: TestClient) -> None:
    data, green, red = _two_channel_tiff()
    r = client.post(
        "/api/recordings",
        files={"file": ("q.tif", data)},
        data={"interleaved_channels": "2", "channel": "1"},
    )
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["n_frames"] == 40 and rec["read_options"] == {
        "channel": 1,
        "interleaved_channels": 2,
    }
    assert not any("look like 2 interleaved" in w for w in rec["warnings"])
    assert any("de-interleaved 2 channels" in w for w in rec["warnings"])
    # previews read the stored options: frame 5 is red image 5
    png = client.get(f"/api/recordings/{rec['id']}/frames/5.png", params={"lo": 0, "hi": 65535})
    gray = np.asarray(Image.open(io.BytesIO(png.content)).convert("L")).astype(float)
    np.testing.assert_allclose(gray, red[5] * 255.0 / 65535, atol=1)
    # a job without reading parameters reads it as uploaded
    job = client.post(
        "/api/jobs", json={"kind": "infer", "params": {"recording_id": rec["id"],
                                                         "method": "baseline"}},
    ).json()  # fmt: skip
    assert _run(job["id"]) == "succeeded"
    assert client.get(f"/api/jobs/{job['id']}").json()["result"]["n_frames"] == 40
    # query string, raw body
    r = client.post(
        "/api/recordings?filename=raw.tif&interleaved_channels=2",
        content=data + b"\0",  # another sha256, same images
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201 and r.json()["n_frames"] == 40, r.text


@pytest.mark.parametrize(
    ("query", "form", "loc", "fragment"),
    [
        ("channel=-1", {}, ["query", "channel"], "greater than or equal"),
        ("", {"interleaved_channels": "zero"}, ["body", "interleaved_channels"], "integer"),
        ("axes=QQ", {}, ["query", "axes"], "pattern"),
        ("z_projection=sum", {}, ["query", "z_projection"], "max"),
        ("channel=1", {"channel": "2"}, ["body", "channel"], "given twice"),
        # typos were ignored (a new-user check: -F chanel=1 read channel 0 without a word)
        ("", {"chanel": "1"}, ["body", "chanel"], "unknown form field 'chanel'"),
        ("chanel=1", {}, ["query", "chanel"], "unknown query parameter 'chanel'"),
    ],
)
def test_bad_upload_options_are_422_naming_the_field(
    client: TestClient, query: str, form: dict, loc: list, fragment: str
) -> None:
    data, _, _ = _two_channel_tiff()
    r = client.post(f"/api/recordings?{query}", files={"file": ("b.tif", data)}, data=form)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["errors"][0]["loc"][-2:] == loc[-2:] and fragment in body["detail"], body
    assert client.get("/api/recordings").json() == []
    incoming = get_settings().artifact_dir / "recordings" / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []  # (a bad query: not read)


def test_options_that_do_not_fit_the_file_are_422(client: TestClient) -> None:
    data, _, _ = _two_channel_tiff()
    r = client.post("/api/recordings?interleaved_channels=3", files={"file": ("c.tif", data)})
    assert r.status_code == 422 and "not a multiple of 3" in r.json()["detail"], r.text
    r = client.post("/api/recordings?axes=TZYX", files={"file": ("c.tif", data)})
    assert r.status_code == 422 and "4 letters" in r.json()["detail"], r.text


def test_loop_written_tiff_uploads_every_frame(client: TestClient) -> None:
    frames = np.arange(30 * 24 * 24, dtype=np.uint16).reshape(30, 24, 24)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for f in frames:
            tw.write(f)
    r = client.post("/api/recordings", files={"file": ("loop.tif", buf.getvalue())})
    assert r.status_code == 201 and r.json()["n_frames"] == 30, r.text
    assert any("30 image series" in w for w in r.json()["warnings"])


def test_all_nan_upload_is_accepted_with_a_warning(client: TestClient) -> None:
    """An all-NaN float TIFF is a file, not an error, but the answer says nothing can be
    segmented in it (it was accepted silently and the job failed later)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((4, 24, 24), np.nan, np.float32), photometric="minisblack")
    r = client.post("/api/recordings", files={"file": ("nan.tif", buf.getvalue())})
    assert r.status_code == 201, r.text
    assert any(w.startswith("no finite value") for w in r.json()["warnings"]), r.json()


def test_preview_decodes_that_frame_only_and_ranges_are_its_own(client: TestClient) -> None:
    frames = np.zeros((6, 16, 16), np.uint16)
    for t in range(6):
        frames[t] = 100 * t + np.arange(16)[None, :]
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, photometric="minisblack", compression="zlib")
    rec = client.post("/api/recordings", files={"file": ("p.tif", buf.getvalue())}).json()
    r = client.get(f"/api/recordings/{rec['id']}/frames/4.png")
    assert r.status_code == 200
    assert float(r.headers["x-data-min"]) == 400 and float(r.headers["x-data-max"]) == 415
    assert r.headers["x-frames"] == "6"
    r = client.get(f"/api/recordings/{rec['id']}/frames/6.png")
    assert r.status_code == 404 and "0..5" in r.json()["detail"]


def test_recording_over_a_lowered_budget_is_413_at_preview(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin lowers the budget after an upload: the preview answers 413 naming the size and
    the limit, and an infer job is refused at submit with the same reason (nothing decoded;
    it was admitted and failed in the worker: a lab admin's check)."""
    data, _, _ = _two_channel_tiff()
    rec = client.post("/api/recordings", files={"file": ("l.tif", data)}).json()
    monkeypatch.setenv("CALSEG_MAX_RECORDING_PIXELS", "10000")
    get_settings.cache_clear()
    r = client.get(f"/api/recordings/{rec['id']}/frames/0.png")
    assert r.status_code == 413, r.text
    assert "81,920 pixels" in r.json()["detail"] and "10,000" in r.json()["detail"]
    assert "shorter parts" in r.json()["detail"]  # the whole recording is over: split helps
    assert "CALSEG_MAX_RECORDING_PIXELS" in r.json()["detail"]
    assert "CALSEG_MAX_FRAME_PIXELS" not in r.json()["detail"]
    r = client.post(
        "/api/jobs", json={"kind": "infer", "params": {"recording_id": rec["id"],
                                                         "method": "baseline"}},
    )  # fmt: skip
    assert r.status_code == 422 and "max_recording_pixels" in r.json()["detail"], r.text


def test_python_client_passes_reading_options(client: TestClient, tmp_path: Path) -> None:
    from calseg.client import CalSegClient

    data, _, _ = _two_channel_tiff()
    path = tmp_path / "two.tif"
    path.write_bytes(data)
    token = client.headers["Authorization"].split()[1]
    cs = CalSegClient("http://testserver", token, http=client)  # the in-process app
    rec = cs.upload(path, interleaved_channels=2, channel=1)
    assert rec["n_frames"] == 40 and rec["read_options"] == {
        "channel": 1,
        "interleaved_channels": 2,
    }


def test_cell_diameter_override_through_the_api(client: TestClient) -> None:
    """cell_diameter_px (issue 17 item 3): one name in the infer job, the library and the CLI;
    bounded (over 1 px, at most 1000 px); its old name projection_cell_diameter_px still
    accepted; the result says which diameter was used and whether it was estimated."""
    data, _, _ = _two_channel_tiff()
    rec = client.post("/api/recordings?interleaved_channels=2", files={"file": ("d.tif", data)})
    rid = rec.json()["id"]
    prop = client.get("/api/job-kinds").json()["infer"]["properties"]["cell_diameter_px"]
    bounds = [b for b in prop.get("anyOf", [prop]) if b.get("type") == "number"][0]
    assert bounds["exclusiveMinimum"] == 1 and bounds["maximum"] == 1000
    base = {"recording_id": rid, "method": "baseline", "target": "cells"}
    for bad in ({"cell_diameter_px": 1}, {"cell_diameter_px": 1001},
                {"cell_diameter_px": 9, "projection_cell_diameter_px": 12}):  # fmt: skip
        r = client.post("/api/jobs", json={"kind": "infer", "params": {**base, **bad}})
        assert r.status_code == 422, (bad, r.text)
    got = {}
    for name, extra in (
        ("given", {"cell_diameter_px": 9}),
        ("old name", {"projection_cell_diameter_px": 9}),
        ("estimated", {}),
        ("active", {"target": "active"}),
    ):
        job = client.post("/api/jobs", json={"kind": "infer", "params": {**base, **extra}})
        assert job.status_code == 201, job.text
        assert _run(job.json()["id"]) == "succeeded"
        res = client.get(f"/api/jobs/{job.json()['id']}").json()["result"]
        got[name] = (
            res["cell_diameter_px"],
            res["cell_diameter_estimated"],
            res["cell_diameter_source"],
        )
    assert got["given"] == got["old name"] == (9.0, False, "given")
    # not given: estimated from the recording (both targets). This recording's resting image
    # (20th temporal percentile) is Poisson noise with no cell texture, so the estimator finds
    # no scale and each target says it kept its 11 px prior -- never
    # "given", never "estimated" without an estimate
    assert got["estimated"] == (11.0, False, "prior")
    assert got["active"] == (11.0, False, "prior")


def test_a_multipart_upload_cut_off_inside_its_file_says_so(client: TestClient) -> None:
    """A new-user check sent a multipart body without its closing boundary and was told "no
    file in the upload: send it in a form field named 'file'", which it had done. A body that
    ends inside the file part is now said to be cut off, with the bytes received; nothing is
    stored. A body with no file part keeps its message."""
    data, _, _ = _two_channel_tiff()
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="c.tif"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    cut = head + data[:5000]  # no "\r\n--XyZ--": the body stops inside the file
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    r = client.post("/api/recordings", content=cut, headers=headers)
    assert r.status_code == 400, r.text
    assert "cut off" in r.json()["detail"] and "5,000 bytes" in r.json()["detail"], r.text
    empty = b'--XyZ\r\nContent-Disposition: form-data; name="axes"\r\n\r\nTYX\r\n--XyZ--\r\n'
    r = client.post("/api/recordings", content=empty, headers=headers)
    assert r.status_code == 400 and "no file in the upload" in r.json()["detail"], r.text
    assert client.get("/api/recordings").json() == []


def test_an_upload_that_would_fill_the_disk_is_507(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads had no storage bound (a new-user check uploaded 35 files of up to 62 MiB with
    nothing refused, and the limit is 4 GiB each): the server keeps min_free_disk_bytes free.
    Here it is set above this disk's free space, so any upload is refused before a byte is
    stored; a job estimate is over "free disk" the same way."""
    import shutil

    frames = np.zeros((6, 16, 16), np.uint16)
    data = io.BytesIO()
    tifffile.imwrite(data, frames, photometric="minisblack")
    free = shutil.disk_usage(get_settings().artifact_dir.parent).free
    monkeypatch.setenv("CALSEG_MIN_FREE_DISK_BYTES", str(free + 2**40))
    get_settings.cache_clear()
    r = client.post("/api/recordings", files={"file": ("a.tif", data.getvalue())})
    assert r.status_code == 507 and "min_free_disk_bytes" in r.json()["detail"], r.text
    streamed = client.post(  # no Content-Length (how calseg.client sends files)
        "/api/recordings?filename=b.tif", content=iter([data.getvalue()]),
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert streamed.status_code == 507, streamed.text
    assert client.get("/api/recordings").json() == []
    est = client.post("/api/jobs/estimate", json={"kind": "simulate", "params": {}}).json()
    assert not est["fits"] and "free disk" in est["over"], est
    monkeypatch.setenv("CALSEG_MIN_FREE_DISK_BYTES", "0")
    get_settings.cache_clear()
    r = client.post("/api/recordings", files={"file": ("a.tif", data.getvalue())})
    assert r.status_code == 201, r.text


def test_a_raw_upload_without_a_name_is_named_by_its_format(client: TestClient) -> None:
    """A raw .npy body sent with no ?filename= was stored and listed as recording.tif (a
    new-user check). It is named by the format its first bytes show."""
    frames = np.random.default_rng(1).integers(0, 900, (6, 16, 16), dtype=np.uint16)
    buf = io.BytesIO()
    np.save(buf, frames)
    r = client.post("/api/recordings", content=buf.getvalue(),
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "recording.npy" and r.json()["n_frames"] == 6


def _one_big_frame_tiff(side: int) -> bytes:
    """A TIFF of one ``side x side`` uint8 frame of zeros in zlib tiles: a few kB on disk
    (the attack: 0.94 MB for 30000 x 30000, which took the API to 23 GB when previewed)."""
    tile = np.zeros((256, 256), np.uint8)
    n = ((side + 255) // 256) ** 2
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, (tile for _ in range(n)), shape=(side, side), dtype=np.uint8, tile=(256, 256),
        photometric="minisblack", compression="zlib",
    )  # fmt: skip
    return buf.getvalue()


def test_a_frame_over_max_frame_pixels_is_refused_at_upload_before_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's frame limit (CALSEG_MAX_FRAME_PIXELS, 2^26 px by default) is checked
    against the header: 413 naming the setting, nothing stored. Lowered here so the file is
    small; the default refuses the attack's 30000 x 30000 frame the same way."""
    from calseg.io.recordings import ReadLimits, RecordingTooLarge, probe_recording

    monkeypatch.setenv("CALSEG_MAX_FRAME_PIXELS", str(1000 * 1000))
    get_settings.cache_clear()
    r = client.post("/api/recordings", files={"file": ("big.tif", _one_big_frame_tiff(1100))})
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "1100 x 1100" in detail and "max_frame_pixels" in detail, detail
    # what helps a frame over its limit, and only its setting (a lab admin's check read
    # "split the recording into shorter parts" and all three settings)
    assert "Crop or bin the frames" in detail and "shorter parts" not in detail, detail
    assert "CALSEG_MAX_FRAME_PIXELS" in detail and "CALSEG_MAX_RECORDING" not in detail
    assert client.get("/api/recordings").json() == []
    assert get_settings().read_limits().max_frame_pixels == 1_000_000
    monkeypatch.delenv("CALSEG_MAX_FRAME_PIXELS")
    get_settings.cache_clear()
    assert get_settings().read_limits().max_frame_pixels == 2**26
    big = io.BytesIO(_one_big_frame_tiff(8200))  # just over the default's 8192 x 8192
    assert len(big.getvalue()) < 2**20
    tmp = Path(get_settings().cache_dir) / "attack.tif"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(big.getvalue())
    with pytest.raises(RecordingTooLarge, match="8200 x 8200"):
        probe_recording(tmp, limits=get_settings().read_limits())
    assert probe_recording(tmp, limits=ReadLimits(max_frame_pixels=None)).width == 8200


def test_a_large_frame_is_previewed_decimated_with_its_step_in_the_headers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Previews draw at most PREVIEW_MAX_PIXELS (every k-th row and column); the headers give
    k and the frame's size, the range is that of the drawn pixels."""
    import api.frames

    monkeypatch.setattr(api.frames, "PREVIEW_MAX_PIXELS", 64 * 64)
    frames = np.zeros((2, 200, 200), np.uint16)
    frames[:, :, :] = np.arange(200)[None, None, :]
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, photometric="minisblack")
    rec = client.post("/api/recordings", files={"file": ("d.tif", buf.getvalue())}).json()
    r = client.get(f"/api/recordings/{rec['id']}/frames/1.png")
    assert r.status_code == 200, r.text
    assert r.headers["x-preview-step"] == "4"
    assert (r.headers["x-frame-height"], r.headers["x-frame-width"]) == ("200", "200")
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape[:2] == (50, 50)
    assert float(r.headers["x-data-max"]) == 196  # columns 0, 4, ..., 196 were drawn


def test_previews_wait_for_a_frame_slot_and_answer_503_when_none_frees(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most FRAME_SLOTS frames are decoded or drawn at once in the API (three parallel
    uploads of 1 MB files took it to 4.9 GB): a request finding every slot taken for
    FRAME_WAIT_S gets 503 with Retry-After, and is served once one frees. The upload check
    and a job's reading-options probe take a slot too (12 estimates at once took the API up
    by 4.1 GiB)."""
    from calseg.service import frame_guard

    frames = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, photometric="minisblack")
    rec = client.post("/api/recordings", files={"file": ("s.tif", buf.getvalue())}).json()
    monkeypatch.setattr(frame_guard, "FRAME_WAIT_S", 0.05)
    held = [frame_guard._slots.acquire(timeout=1) for _ in range(frame_guard.FRAME_SLOTS)]
    try:
        assert all(held)
        r = client.get(f"/api/recordings/{rec['id']}/frames/0.png")
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        other = io.BytesIO()
        tifffile.imwrite(other, frames + 1, photometric="minisblack")
        r = client.post("/api/recordings", files={"file": ("t.tif", other.getvalue())})
        assert r.status_code == 503, r.text  # the upload check decodes two frames
        r = client.post("/api/recordings", files={"file": ("s2.tif", buf.getvalue())})
        assert r.status_code == 200 and r.json()["duplicate"]  # nothing decoded
        params = {"recording_id": rec["id"], "method": "classical", "channel": 0}
        r = client.post("/api/jobs/estimate", json={"kind": "infer", "params": params})
        assert r.status_code == 503, r.text  # the reading-options probe decodes two frames
        assert client.get("/api/me").status_code == 200  # nothing else waits
    finally:
        for _ in held:
            frame_guard._slots.release()
    assert client.get(f"/api/recordings/{rec['id']}/frames/0.png").status_code == 200
    frame_guard._in_flight["alice"] = frame_guard.FRAME_REQUESTS_PER_USER  # her frames in flight
    try:
        r = client.get(f"/api/recordings/{rec['id']}/frames/0.png")
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    finally:
        frame_guard._in_flight.pop("alice", None)


def test_one_user_cannot_hold_every_frame_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user's attack: 48 previews in flight held the API's threads and its database
    connections while they waited, and another user's GET /api/jobs failed with 500 after
    30 s. Now a user has at most FRAME_REQUESTS_PER_USER frame requests in flight (one more
    is 429 at once), and the frame routes give their database connection back before waiting."""
    from calseg.service import frame_guard
    from calseg.service.frame_guard import FramesBusy, frame_slot

    monkeypatch.setattr(frame_guard, "FRAME_WAIT_S", 0.05)
    n = frame_guard.FRAME_REQUESTS_PER_USER
    held = [frame_guard._slots.acquire(timeout=1) for _ in range(frame_guard.FRAME_SLOTS)]
    try:
        import contextlib

        with contextlib.ExitStack() as stack:
            frame_guard._in_flight["bob"] = n  # bob's n requests are waiting
            with pytest.raises(FramesBusy) as err:
                stack.enter_context(frame_slot("bob"))
            assert err.value.status == 429
            with pytest.raises(FramesBusy) as err:  # alice waits, then 503
                stack.enter_context(frame_slot("alice"))
            assert err.value.status == 503
    finally:
        frame_guard._in_flight.pop("bob", None)
        for _ in held:
            frame_guard._slots.release()
    assert frame_guard._in_flight == {}
    with frame_slot("bob"), frame_slot("alice"):
        assert frame_guard._in_flight == {"bob": 1, "alice": 1}
    assert frame_guard._in_flight == {} and frame_guard._user_slots == {}


def test_one_user_holds_one_frame_slot_so_another_always_finds_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sixth attack run: two slow decodes of one user (30 s each) held both FRAME_SLOTS, and
    6 of another user's 9 uploads were refused (503) after they had been received. Now a user
    holds FRAME_SLOTS_PER_USER (1) at once: their next request waits its turn (503 after
    FRAME_WAIT_S), and another user is served meanwhile."""
    import threading

    from calseg.service import frame_guard
    from calseg.service.frame_guard import FramesBusy, frame_slot

    assert frame_guard.FRAME_SLOTS_PER_USER < frame_guard.FRAME_SLOTS
    monkeypatch.setattr(frame_guard, "FRAME_WAIT_S", 0.2)
    holding, release = threading.Event(), threading.Event()

    def slow_decode() -> None:
        with frame_slot("mallory"):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=slow_decode)
    t.start()
    try:
        assert holding.wait(5)
        with pytest.raises(FramesBusy) as err:  # mallory's second waits for her first
            with frame_slot("mallory"):
                pass
        assert err.value.status == 503 and "your other frame" in str(err.value)
        with frame_slot("bob"):  # a slot is free for bob at once
            pass
    finally:
        release.set()
        t.join(10)
    with frame_slot("mallory"):  # her turn, once the first has finished
        pass
    assert frame_guard._in_flight == {} and frame_guard._user_slots == {}


def test_an_hdf5_upload_reads_the_dataset_its_option_names(client: TestClient, tmp_path) -> None:
    """An 11th attack run: an HDF5 file of several datasets could only ever be read at its
    first one in the service (the advice, a 'file.h5:/name' suffix, works for paths, and an
    upload named so lost its extension). The upload now takes the reading option dataset,
    and jobs read the recording that way."""
    import h5py

    def two_datasets(seed: int) -> bytes:
        path = tmp_path / f"two{seed}.h5"
        rng = np.random.default_rng(seed)
        with h5py.File(path, "w") as h5:
            h5.create_dataset("a", data=rng.poisson(100, (6, 16, 16)).astype(np.uint16))
            h5.create_dataset("raw/b", data=rng.poisson(100, (9, 20, 20)).astype(np.uint16))
        return path.read_bytes()

    first = client.post("/api/recordings", files={"file": ("two.h5", two_datasets(1))}).json()
    assert first["n_frames"] == 6 and any("reading option dataset" in w for w in first["warnings"])
    data = two_datasets(2)
    r = client.post("/api/recordings?dataset=/raw/b", files={"file": ("b.h5", data)})
    assert r.status_code in (200, 201), r.text
    rec = client.get(f"/api/recordings/{r.json()['id']}").json()
    assert (rec["n_frames"], rec["height"]) == (9, 20) and rec["read_options"] == {
        "dataset": "/raw/b"
    }
    job = client.post("/api/jobs", json={"kind": "infer", "params": {
        "recording_id": rec["id"], "method": "classical"}}).json()  # fmt: skip
    assert _run(job["id"]) == "succeeded", client.get(f"/api/jobs/{job['id']}").json()["error"]
    assert client.get(f"/api/jobs/{job['id']}").json()["result"]["n_frames"] == 9
    for seed, query, words in (
        (3, "dataset=/nope", "has no dataset '/nope'"),
        (4, "dataset=../x", "no '.' or '..' part"),
    ):
        r = client.post(f"/api/recordings?{query}", files={"file": ("c.h5", two_datasets(seed))})
        assert r.status_code == 422 and words in r.text, (query, r.text)
    tif = io.BytesIO()
    tifffile.imwrite(tif, np.zeros((4, 16, 16), np.uint16), photometric="minisblack")
    r = client.post("/api/recordings?dataset=/a", files={"file": ("t.tif", tif.getvalue())})
    assert r.status_code == 422 and "only meaningful for HDF5" in r.text, r.text


def test_a_job_on_a_recording_over_todays_limits_is_refused_at_submit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab admin's check: a recording uploaded before the frame limit was lowered was
    admitted for an infer job (201), which then failed in the worker with RecordingTooLarge.
    Its headers are checked against the limits in force at submit (no pixel decoded): 422."""
    r = client.post("/api/recordings", files={"file": ("big.tif", _one_big_frame_tiff(300))})
    assert r.status_code == 201, r.text
    rec = r.json()["id"]
    monkeypatch.setenv("CALSEG_MAX_FRAME_PIXELS", str(200 * 200))
    get_settings.cache_clear()
    r = client.post("/api/jobs", json={"kind": "infer", "params": {"recording_id": rec}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "cannot be read on this server now" in detail and "300 x 300" in detail, detail
    monkeypatch.delenv("CALSEG_MAX_FRAME_PIXELS")
    get_settings.cache_clear()
    r = client.post("/api/jobs", json={"kind": "infer", "params": {"recording_id": rec}})
    assert r.status_code == 201, r.text
