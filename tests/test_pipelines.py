"""The CLI and the service share one pipeline per job (issue 16 item 1).

``calseg segment`` and the service's infer job run :func:`calseg.pipelines.segment.
segment_and_export`; on one real recording, with the same options, they write the same files,
byte for byte. The infer job runs for real: a SQLite database, the local artifact store and
:func:`calseg.service.jobs.run_job` (its own ``job.log`` is the one file the CLI does not write).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from calseg.cli import app


def _run_infer_job(tmp_path: Path, src: Path, params: dict) -> tuple[dict, Path]:
    """Upload-like recording row + an infer job run in-process; ``(result, job folder)``."""
    from calseg.service import jobs
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.models import Job, Recording
    from calseg.service.settings import Settings
    from calseg.service.store import LocalArtifactStore

    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp_path / "art",
        cache_dir=tmp_path / "cache",
        progress_interval_s=0.0,
        sam2_checkpoint=None,
    )
    store = LocalArtifactStore(settings.artifact_dir)
    obj = store.put(f"recordings/{src.name}", src)  # same file name: same titles
    with session_scope(url) as s:
        rec = Recording(
            filename=src.name,
            relpath=f"recordings/{src.name}",
            sha256=obj.sha256,
            size_bytes=obj.size_bytes,
            n_frames=1,
            height=1,
            width=1,
            dtype="uint16",
        )
        s.add(rec)
        s.flush()
        job_id = jobs.submit_job(
            s,
            "infer",
            {"recording_id": rec.id, **params},
            enqueue=lambda job, countdown=None: None,
            settings=settings,  # its recording is opened at submit, in this store
        ).id
    state = jobs.run_job(job_id, None, url=url, store=store, settings=settings, enqueue=None)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert state == "succeeded", job.error
        result = job.result
    return result, store.path(f"jobs/{job_id}")


def _segment_cells(frames, out: Path, name: str, **config):
    """``segment_to_folder`` with the classical method on the cells target (1 s frames, no
    pixel size), ``config``: further :class:`InferenceConfig` fields."""
    from calseg.pipelines.segment import segment_to_folder
    from calseg.segment.infer import InferenceConfig

    return segment_to_folder(
        frames,
        out,
        InferenceConfig(method="classical", target="cells", **config),
        name=name,
        frame_interval_s=1.0,
        pixel_size_um=None,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("cli_flags", "params"),
    [
        (["--method", "classical"], {"method": "classical"}),
        (
            ["--method", "auto", "--bleach-correction", "exp", "--threshold-k", "4"],
            {"method": "auto", "bleach_correction": "exp", "threshold_k": 4.0},
        ),
    ],
    ids=["classical", "auto+bleach"],
)
def test_cli_segment_and_infer_job_write_the_same_files(
    tmp_path, real_file, monkeypatch, cli_flags, params
):
    monkeypatch.delenv("CALSEG_SAM2_CHECKPOINT", raising=False)  # auto: the same rule in both
    src = real_file("astrocast_sample_1.tiff")
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["segment", str(src), str(out), *cli_flags])
    assert r.exit_code == 0, r.output
    result, job_dir = _run_infer_job(tmp_path / "svc", src, params)

    cli_files, job_files = _files(out), _files(job_dir)
    assert set(job_files) - set(cli_files) == {"job.log"}  # the job's own log
    assert set(cli_files) == set(job_files) - {"job.log"}
    assert {"labels.tif", "overlay.png", "traces.csv", "events.csv", "patterns.json"} <= set(
        cli_files
    )
    different = [n for n in cli_files if cli_files[n] != job_files[n]]
    assert not different, f"CLI and infer job differ in {different}"
    assert result["n_cells"] > 0
    assert f"{result['model_label']}: " in r.output
    if params.get("bleach_correction"):
        assert result["preprocess"]["options"]["bleach_correction"] == "exp"
        assert "preprocess: " in r.output
    assert "1 s assumed" in r.output  # the file has no frame interval: both say so
    assert any("1 s assumed" in w for w in result["warnings"])


def test_cells_target_on_one_frame_says_why_there_is_no_activity_map(tmp_path: Path) -> None:
    """Found by a new-user check: a single frame with ``--target cells`` warned "4096 voxels is
    more than the 200000000 an extra pass ... is allowed"; the reason is the frame count."""
    import numpy as np

    from calseg.segment.infer import MIN_FRAMES_FOR_ACTIVITY

    frames = np.random.default_rng(0).poisson(100, (1, 64, 64)).astype(np.uint16)
    out = _segment_cells(frames, tmp_path / "out", "one.tif")
    (w,) = [w for w in out.warnings if w.startswith("no activity map")]
    assert (
        w
        == f"no activity map: 1 frame(s), under the {MIN_FRAMES_FOR_ACTIVITY} an activity map needs"
    )


def test_a_cell_diameter_larger_than_half_the_field_is_flagged(tmp_path: Path) -> None:
    """Found by a new-user check: ``--cell-diameter-px 1000`` on a 128 px field ran without a
    word (1 cell)."""
    import numpy as np

    frames = np.random.default_rng(0).poisson(100, (12, 64, 64)).astype(np.uint16)
    for given, flagged in ((1000.0, True), (40.0, True), (11.0, False)):
        out = _segment_cells(frames, tmp_path / f"out{given:g}", "noise.tif",
                             cell_diameter_px=given)  # fmt: skip
        hits = [w for w in out.warnings if "more than half the field" in w]
        assert bool(hits) == flagged, (given, out.warnings)


def test_cells_target_estimates_the_cell_size_once(tmp_path: Path, monkeypatch) -> None:
    """``--target cells`` made the activity map and the projection cells each estimate the
    recording's cell diameter (about 1 s apiece at 512 px); the projection now takes the
    activity map's estimate: one estimate, the same diameter and source as estimating anew."""
    import numpy as np
    from test_analysis_cellsize import _tessellation_recording

    from calseg.analysis import cellsize

    movie, _ = _tessellation_recording(12.0, side=96, n_frames=40, seed=3)
    expected, found = cellsize.cell_diameter_or_prior(movie, 11.0)
    assert found
    real = cellsize.estimate_cell_diameter
    calls: list[tuple] = []

    def counted(frames, *a, **k):  # the real estimator, counted
        calls.append(np.shape(frames))
        return real(frames, *a, **k)

    monkeypatch.setattr(cellsize, "estimate_cell_diameter", counted)
    out = _segment_cells(movie, tmp_path / "out", "tissue.tif")
    assert len(calls) == 1, calls
    stats = out.segmentation.activity
    assert stats["cell_diameter_px"] == pytest.approx(expected)
    assert stats["cell_diameter_source"] == "estimated"
    assert out.n_cells > 0


def test_a_recording_of_one_image_repeated_is_not_called_few_photons() -> None:
    """A new-user check: a recording whose frames are all the same image got the note for
    few-photon data ("bin pixels (a larger smooth_sigma_px)", an option the CLI does not have).
    It now says the frames are identical; real few-photon data keeps its note."""
    import numpy as np

    from calseg.pipelines.segment import noise_notes

    rng = np.random.default_rng(0)
    still = np.repeat(rng.poisson(3, (1, 32, 32)), 20, axis=0).astype(np.float32)
    (note,) = noise_notes(still, {"noise_sigma_median": 0.0})
    assert "every one of the 20 frames is the same image" in note and "photons" not in note
    counts = rng.poisson(0.2, (20, 32, 32)).astype(np.float32)  # mostly 0: repeats
    (note,) = noise_notes(counts, {"noise_sigma_median": 0.0})
    assert "few photons per pixel" in note and "smooth_sigma_px" not in note
    assert noise_notes(counts, {"noise_sigma_median": 5.0}) == []  # plausible noise: no note


def test_cells_target_with_no_cell_says_why_and_what_to_try(tmp_path: Path) -> None:
    """A new-user check: ``--target cells`` with nothing found printed only "no cell found on
    the mean projection". It now gives the reason (here: every candidate centre is as strong
    on noise alone); the other projections are measured and offered only when they find
    cells, as the active target's steps are, in the lines and in diagnosis.json."""
    import json

    import numpy as np

    frames = np.random.default_rng(1).poisson(50, (40, 64, 64)).astype(np.uint16)
    out = _segment_cells(frames, tmp_path / "out", "noise.tif")
    assert out.n_cells == 0
    lines = [text for _, text in out.lines("noise.tif", "OUT")]
    (why,) = [t for t in lines if t.startswith("why no cell:")]
    assert "candidate cell centre" in why and "noise alone" in why
    assert not any(t.startswith("no cell found on the") for t in lines)  # said once, with why
    # the other projections were measured and find nothing: said, not offered as next steps
    assert why.endswith("the std and max projections find none either")
    assert not [t for t in lines if t.startswith("try: ")]
    diag = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert diag["reason"] == why.removeprefix("why no cell: ") and diag["suggestions"] == []


def test_a_default_model_setting_that_did_not_run_is_said():
    """Found by a new-user check of the page: SAM2 with the default model setting
    (sam2.1_hiera_t) ran the small SAM2 trained here, and only the log said so; the job's
    parameters showed sam2.1_hiera_t."""
    from calseg.pipelines.segment import _model_default_notes
    from calseg.segment.infer import InferenceConfig

    info = {"config": "sam2_small_calseg", "image_size": 512, "checkpoint": "/x/small.pt"}
    (note,) = _model_default_notes(InferenceConfig(method="sam2"), info)
    assert note.startswith("SAM2 ran sam2_small_calseg at 512 px from small.pt")
    assert "sam2.1_hiera_t, the default" in note
    assert _model_default_notes(InferenceConfig(method="classical"), info) == []
    same = {**info, "config": InferenceConfig().model}
    assert _model_default_notes(InferenceConfig(method="sam2"), same) == []
