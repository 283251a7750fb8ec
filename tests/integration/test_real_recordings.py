"""Each real TIFF of the real-data folder (CALSEG_REAL_DATA_DIR, default ../shared/data/real)
is uploaded and segmented through HTTP: the classical baseline on every file, SAM2 on the
smallest; the label stack must have the recording's frame count and frame size."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import tifffile
from service_it_helpers import submit, wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KNOWN = {  # (frames, height, width) as the data holds them, checked by eye in ImageJ terms
    "sima_example.tif": (20, 128, 256),
    "sima_example-tiffs_0_badmeta.tif": (1, 173, 173),  # its header claims 3500 frames
    "fissa_b_AVG_A01.tif": (29, 21, 14),
    "fissa_b_AVG_A02.tif": (29, 21, 14),
    "fissa_b_AVG_A03.tif": (29, 21, 14),
    "astrocast_sample_1.tiff": (75, 100, 100),  # ImageJ "slices" read as frames
}


def _real_tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff"))


def _upload(client, path: Path) -> dict:
    with path.open("rb") as fh:
        r = client.post("/api/recordings", files={"file": (path.name, fh, "image/tiff")})
    assert r.status_code in (200, 201), f"{path.name}: {r.status_code} {r.text}"
    return r.json()


def _segment(client, rec: dict, method: str, **extra) -> tuple[dict, object]:
    job = wait(
        client,
        submit(client, "infer", {"recording_id": rec["id"], "method": method, **extra}),
        600,
    )
    r = client.get(f"/api/jobs/{job['id']}/artifacts/labels.tif")
    assert r.status_code == 200
    return job, tifffile.imread(io.BytesIO(r.content))


def _shape(labels) -> tuple[int, int, int]:
    return labels.shape if labels.ndim == 3 else (1, *labels.shape)


def test_every_real_tiff_segments_with_the_baseline(client, real_dir: Path) -> None:
    files = _real_tiffs(real_dir)
    assert files, f"no TIFFs in {real_dir}"
    for path in files:
        rec = _upload(client, path)
        assert rec["n_frames"] >= 1, path.name
        if path.name in KNOWN:
            assert (rec["n_frames"], rec["height"], rec["width"]) == KNOWN[path.name], path.name
        job, labels = _segment(client, rec, "baseline")
        assert _shape(labels) == (rec["n_frames"], rec["height"], rec["width"]), path.name
        assert job["result"]["n_frames"] == rec["n_frames"]
        if path.name == "sima_example-tiffs_0_badmeta.tif":  # the job says the header lied
            assert any("claims 3500 frames" in w for w in job["result"]["warnings"])
        png = client.get(f"/api/jobs/{job['id']}/frames/0.png")
        assert png.status_code == 200, path.name


def test_smallest_real_tiff_segments_with_sam2(client, real_dir: Path) -> None:
    files = _real_tiffs(real_dir)
    assert files, f"no TIFFs in {real_dir}"
    smallest = min(files, key=lambda p: p.stat().st_size)
    rec = _upload(client, smallest)
    job, labels = _segment(client, rec, "sam2", image_size=256, max_prompts_per_frame=16)
    assert _shape(labels) == (rec["n_frames"], rec["height"], rec["width"])
    assert job["result"]["model_info"] is not None
