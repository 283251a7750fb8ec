"""docker-compose.yml validated by Debian's ``docker-compose config`` (no engine needed);
skipped when the binary is absent (``apt-get install docker-compose``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALSEG_", "POSTGRES_"))}
    out = subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_services_and_volumes(compose: dict) -> None:
    assert set(compose["services"]) == {"api", "worker-gpu", "worker-cpu", "redis", "postgres"}
    assert {"artifacts", "redis", "postgres"} <= set(compose["volumes"])


def test_gpu_worker_is_solo_with_a_device_reservation(compose: dict) -> None:
    gpu = compose["services"]["worker-gpu"]
    cmd = gpu["command"]
    assert cmd[cmd.index("-P") + 1] == "solo" and cmd[cmd.index("-Q") + 1] == "gpu"
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["device_ids"] == ["0"]
    cpu = compose["services"]["worker-cpu"]["command"]
    assert cpu[cpu.index("-Q") + 1] == "cpu"


def test_all_calseg_services_share_database_broker_and_artifacts(compose: dict) -> None:
    envs = [compose["services"][s]["environment"] for s in ("api", "worker-gpu", "worker-cpu")]
    for key in ("CALSEG_DATABASE_URL", "CALSEG_REDIS_URL", "CALSEG_ARTIFACT_DIR"):
        assert len({e[key] for e in envs}) == 1, key
    assert envs[0]["CALSEG_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert int(envs[0]["CALSEG_VISIBILITY_TIMEOUT_S"]) >= 3600
    for s in ("api", "worker-gpu", "worker-cpu"):
        vols = compose["services"][s]["volumes"]
        sources = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in vols]
        assert "artifacts" in sources, s
