"""``make demo`` end to end, small: ``python -m calseg.demo`` in a child process on its own
SQLite file, Redis and folders, with the server's default SAM2 base (the bundled small SAM2,
as on a fresh clone). A new-user check found ``make demo`` failing on a fresh clone at its
first infer job while ``make test`` passed: no test ran the README's first command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_embedded import _serve_env  # tests/ is on the path (its conftest)

from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server installed")
def test_the_demo_runs_on_a_fresh_folder(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)  # what `make serve` gets, on folders of the test's own
    args = ["--videos", "5", "--test-videos", "3", "--frames", "12", "--steps", "4", "--fresh"]
    run = subprocess.run(
        [sys.executable, "-m", "calseg.demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "demo finished" in out and "demo failed" not in out, out[-6000:]
    if BUNDLED_SMALL_CHECKPOINT.is_file():  # a fresh clone's base: the small SAM2 trained here
        assert "small SAM2 trained here" in out, out[:2000]
    for row in ("disc prior (no image)", "SAM2 untuned", "classical"):
        assert row in out, out[-6000:]
    assert "instance F1 [95% CI]" in out
    assert list((tmp_path / "artifacts").rglob("overlay.png")), "no overlay written"
