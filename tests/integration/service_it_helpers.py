"""Helpers of the integration tests: submit a job, wait for it, find its artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


def submit(client: httpx.Client, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """POST a job; asserts 201."""
    r = client.post("/api/jobs", json={"kind": kind, "params": params})
    assert r.status_code == 201, f"{kind} refused: {r.status_code} {r.text}"
    return r.json()


def wait(client: httpx.Client, job: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    """Poll a job until it ends; asserts it succeeded (shows error and log tail otherwise)."""
    deadline = time.monotonic() + timeout_s
    seen_running = False
    while True:
        job = client.get(f"/api/jobs/{job['id']}").json()
        seen_running |= job["state"] == "running"
        if job["state"] in TERMINAL:
            break
        assert time.monotonic() < deadline, f"{job['kind']} job still {job['state']}: {job}"
        time.sleep(0.5)
    assert job["state"] == "succeeded", (
        f"{job['kind']} job {job['state']}: {job['error']}\n{job.get('log_tail')}"
    )
    return job


def artifact_path(service, job: dict[str, Any], name: str) -> Path:
    """Local path of a job's artifact (the store is a local folder here)."""
    art = next((a for a in job["artifacts"] if a["name"] == name), None)
    assert art is not None, f"{job['kind']} job has no artifact {name}: {job['artifacts']}"
    return Path(service.settings.artifact_dir) / art["relpath"]
