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


def test_reliability_settings_reach_every_process(compose: dict) -> None:
    """Heartbeats, the reconciler (in the api), the retry cap and JSON logs are configured the
    same for api and workers, and each value is one the settings accept."""
    from calseg.service.settings import Settings

    envs = {s: compose["services"][s]["environment"] for s in ("api", "worker-gpu", "worker-cpu")}
    keys = (
        "CALSEG_HEARTBEAT_INTERVAL_S", "CALSEG_HEARTBEAT_TIMEOUT_S", "CALSEG_RECONCILE_INTERVAL_S",
        "CALSEG_MAX_ATTEMPTS", "CALSEG_LOG_FORMAT", "CALSEG_VISIBILITY_TIMEOUT_S",
    )  # fmt: skip
    for key in keys:
        assert len({e[key] for e in envs.values()}) == 1, key
    api = envs["api"]
    settings = Settings(**{k.removeprefix("CALSEG_").lower(): api[k] for k in keys})
    assert settings.log_format == "json" and settings.reconcile_interval_s > 0
    # a job is declared lost only after several missed beats, and long before Redis redelivers
    assert settings.heartbeat_timeout_s >= 5 * settings.heartbeat_interval_s
    assert settings.visibility_timeout_s > 10 * settings.heartbeat_timeout_s
    assert settings.max_attempts >= 1
    # the api image runs migrations first; workers get a grace period for a warm shutdown
    assert "alembic upgrade head" in " ".join(compose["services"]["api"]["command"])
    for w in ("worker-gpu", "worker-cpu"):
        assert compose["services"][w]["stop_grace_period"]


def test_dockerfile_ships_every_part_of_the_service() -> None:
    text = (REPO / "Dockerfile").read_text()
    for part in ("calseg", "api", "worker", "frontend", "migrations", "alembic.ini"):
        assert f"COPY {part} " in text, part
    assert "USER calseg" in text and "tini" in text  # not root; signals reach Celery/uvicorn


def test_json_log_lines() -> None:
    """CALSEG_LOG_FORMAT=json: one JSON object per record, with extras and the exception."""
    import json
    import logging

    from calseg.service.logs import JsonFormatter

    try:
        raise ValueError("bad frame 7")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("calseg.worker", logging.WARNING, __file__, 1, "job %s lost",
                               ("j1",), exc_info)  # fmt: skip
    record.job_id = "j1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "warning" and out["logger"] == "calseg.worker"
    assert out["message"] == "job j1 lost" and out["job_id"] == "j1"
    assert "ValueError: bad frame 7" in out["exc"] and out["ts"].endswith("+00:00")
