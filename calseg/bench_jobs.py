"""How a worker runs a job, measured (issue 13 item 4): ``python -m calseg.bench jobs``.

Why :mod:`calseg.service.jobproc` runs each job in a forked child, in numbers. On a fresh
SQLite database, in this process (no broker), ``--jobs`` (5) jobs of each kind below are run
twice: *inline* (:func:`calseg.service.jobs.run_job` in this process, what the worker did
before) and *child* (:func:`calseg.service.jobproc.run_job_in_child`: fork, run, watch):

* ``empty``: a runner that returns at once: the fixed cost per job (claim, heartbeat thread,
  log, finish; plus the fork and the child's exit for *child*);
* ``simulate``: a real simulate job (3 videos x 8 frames of 128 x 128);
* ``torch``: an infer job (a ``gpu`` kind) whose runner imports torch and multiplies two
  256 x 256 matrices: what every SAM2 job pays for torch. Inline, only the first job imports
  it; in child mode the worker imports torch (import only: no operation, no CUDA) before the
  first such fork (:func:`calseg.service.jobproc.preload_for`), so later jobs' processes
  inherit it.

Reported per kind and mode: median wall time per job (s), and the resident set size of this
process (the worker's stand-in) before and after (MiB, ``VmRSS``); for *child* the children's
peak RSS (``ru_maxrss`` of the reaped child, which counts the pages shared with the parent).

The alternative design, a watchdog that replaces the whole worker process when a job ignores a
cancel, is costed by starting a real Celery worker (solo pool, as ``make serve`` runs it) on a
private Redis ``--worker-starts`` (3) times: seconds from exec to "ready".

Then the cancel itself, with a real worker process (child mode) on the private Redis: a job in
a loop with cancellation points (a simulate of 64 frames of 512 x 512) and a job inside one
library call that cannot check (an infer with ``smooth_sigma_px`` 1e5: one Gaussian filter
of a frame takes seconds): seconds from ``cancel_job`` until the job's process is gone and the
worker has started the next job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _empty(params: Any, ctx: Any) -> dict:
    return {}


def _torch(params: Any, ctx: Any) -> dict:
    import torch

    a = torch.randn(256, 256)
    return {"sum": float((a @ a).sum())}


SIM = {"n_videos": 3, "n_frames": 8, "height": 128, "width": 128}


def _settings(root: Path, **overrides: Any) -> Any:
    from calseg.service.settings import Settings

    root.mkdir(parents=True, exist_ok=True)
    return Settings(
        database_url=f"sqlite:///{root / 'jobs.db'}",
        artifact_dir=root / "artifacts",
        cache_dir=root / "cache",
        log_dir=root / "logs",
        token_file=root / "token",
        progress_interval_s=0.5,
        **overrides,
    )


KINDS = {"empty": _empty, "simulate": None, "torch": _torch}
"""Runner of each measured kind (None: the real simulate runner). ``torch`` runs as an infer
job (a ``gpu`` kind, for which the worker imports torch once: ``jobproc.preload_for``)."""


def _new_job(session: Any, kind: str) -> Any:
    """A queued job of ``kind`` (an infer job's references are not looked up: its runner is
    replaced)."""
    from calseg.service.context import code_version
    from calseg.service.jobs import submit_job
    from calseg.service.models import Job, new_id

    if kind == "simulate":
        return submit_job(session, "simulate", SIM, enqueue=lambda j, c=None: None)
    job = Job(
        id=new_id(), kind=kind, state="queued", progress=0.0, stage="queued",
        params={"dataset_job_id": "none", "video_id": "v000", "method": "baseline"},
        code_version=code_version(), attempts=0, dispatch_id=new_id(),
    )  # fmt: skip
    session.add(job)
    session.commit()
    return job


def run_modes(
    root: Path, n_jobs: int, kinds: tuple[str, ...] = tuple(KINDS), modes=("inline", "child")
) -> list[dict]:
    """Per-job wall time and RSS of inline vs child runs (see the module doc)."""
    from calseg.service import jobproc
    from calseg.service import kinds as registry
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.jobproc import run_job_in_child
    from calseg.service.jobs import run_job

    rows = []
    for kind in kinds:
        runner = KINDS[kind]
        for mode in modes:
            work = root / f"{kind}-{mode}"
            work.mkdir(parents=True)
            settings = _settings(work, job_process=mode)
            upgrade_database(settings.database_url)
            rss0 = _rss_mib()
            walls, peaks = [], []
            job_kind = "infer" if kind == "torch" else "simulate"
            saved = registry.KINDS[job_kind]
            if runner is not None:  # a fork inherits the patched registry
                registry.register(dataclasses.replace(saved, runner=runner))
            try:
                for _ in range(n_jobs):
                    with session_scope(settings.database_url) as s:
                        job = _new_job(s, job_kind)
                    t0 = time.perf_counter()
                    if mode == "inline":
                        state = run_job(job.id, job.dispatch_id, settings=settings)
                    else:
                        state = run_job_in_child(job.id, job.dispatch_id, settings=settings)
                        peaks.append(jobproc.last_child["peak_mib"])
                    walls.append(time.perf_counter() - t0)
                    if state != "succeeded":
                        raise RuntimeError(f"{kind}/{mode} job ended {state}")
            finally:
                registry.register(saved)
            rows.append(
                {
                    "torch_in_parent": "torch" in sys.modules,
                    "kind": kind,
                    "mode": mode,
                    "jobs": n_jobs,
                    "first_s": round(walls[0], 3),
                    "median_s": round(statistics.median(walls), 3),
                    "rss_before_mib": round(rss0, 1),
                    "rss_after_mib": round(_rss_mib(), 1),
                    "child_peak_mib": round(max(peaks), 1) if peaks else None,
                }
            )
    return rows


def _redis(root: Path) -> tuple[subprocess.Popen, str]:
    from calseg.service.embedded import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer")


def _worker(settings: Any, log: Path) -> tuple[subprocess.Popen, float]:
    """Start a Celery worker; (process, seconds until its log says ready)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALSEG_")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    t0 = time.perf_counter()
    fh = open(log, "ab")  # noqa: SIM115 - the worker's log, closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-P",
         "solo", "-c", "1", "-Q", "cpu,gpu", "--loglevel", "INFO", "-n",
         f"bench-{os.getpid()}-{time.time_ns()}@%h", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    start = log.stat().st_size
    while b" ready." not in log.read_bytes()[start:]:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)
    return proc, time.perf_counter() - t0


def run_worker_starts(root: Path, n: int) -> dict:
    """Seconds for a Celery worker to be ready (the cost of replacing a worker)."""
    proc_r, url = _redis(root)
    try:
        (root / "starts").mkdir()
        settings = _settings(root / "starts", redis_url=url)
        times = []
        for _ in range(n):
            w, s = _worker(settings, root / "starts.log")
            times.append(s)
            w.terminate()
            w.wait(timeout=30)
        return {"starts": n, "median_s": round(statistics.median(times), 2),
                "max_s": round(max(times), 2)}  # fmt: skip
    finally:
        proc_r.terminate()
        proc_r.wait(timeout=10)


def run_cancels(root: Path) -> list[dict]:
    """Cancel-to-next-job latency through a real worker (child mode)."""
    from calseg.service.broker import enqueue_celery, make_celery
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.jobs import cancel_job, submit_job
    from calseg.service.models import Job

    proc_r, url = _redis(root)
    (root / "cancel").mkdir()
    settings = _settings(root / "cancel", redis_url=url)
    upgrade_database(settings.database_url)
    app = make_celery(settings)

    def enqueue(job: Any, countdown: float | None = None) -> None:
        enqueue_celery(job, countdown, app=app)

    def state(job_id: str) -> Job:
        with session_scope(settings.database_url) as s:
            job = s.get(Job, job_id)
            s.expunge(job)
            return job

    def wait(job_id: str, pred: Any, timeout: float = 300) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = state(job_id)
            if pred(job):
                return job
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id} timed out: {state(job_id).state}")

    w, _ = _worker(settings, root / "cancel-worker.log")
    rows = []
    try:
        with session_scope(settings.database_url) as s:
            sim = submit_job(s, "simulate", SIM, enqueue=enqueue).id
        wait(sim, lambda j: j.state == "succeeded")
        cases = {
            "loop with checks (simulate 64 x 512^2)": (
                "simulate", {"n_videos": 3, "n_frames": 64, "height": 512, "width": 512}),
            "one long call (infer, smooth_sigma_px 1e5)": (
                "infer", {"dataset_job_id": sim, "video_id": "v000", "method": "baseline",
                          "smooth_sigma_px": 1e5}),
        }  # fmt: skip
        for name, (kind, params) in cases.items():
            with session_scope(settings.database_url) as s:
                long_id = submit_job(s, kind, params, enqueue=enqueue).id
            wait(long_id, lambda j: j.state == "running" and (j.progress or 0) > 0.0)
            time.sleep(2.0)
            t0 = time.monotonic()
            with session_scope(settings.database_url) as s:
                cancel_job(s, long_id)
                nxt = submit_job(s, "simulate", SIM, enqueue=enqueue).id
            wait(nxt, lambda j: j.state != "queued")
            started = time.monotonic() - t0
            log = state(long_id).log_tail or ""
            rows.append(
                {
                    "case": name,
                    "next_job_started_s": round(started, 2),
                    "how": "killed by the worker" if "killed its process" in log else "stopped",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            wait(nxt, lambda j: j.state == "succeeded")
    finally:
        w.terminate()
        w.wait(timeout=60)
        proc_r.terminate()
        proc_r.wait(timeout=10)
    return rows


def _modes_in_worker_like_processes(root: Path, n_jobs: int) -> list[dict]:
    """:func:`run_modes` for each (kind, mode) in a fresh interpreter that has imported what a
    Celery worker has (``worker.tasks``) and nothing else, like the worker it stands in for."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for kind in KINDS:
        for mode in ("inline", "child"):
            code = (
                "import json, worker.tasks\n"
                "from pathlib import Path\n"
                "from calseg.bench_jobs import run_modes\n"
                f"rows = run_modes(Path({str(root)!r}), {int(n_jobs)}, ({kind!r},), ({mode!r},))\n"
                "print('ROWS ' + json.dumps(rows))\n"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
            )
            found = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
            if not found:
                sys.stderr.write(out.stderr[-3000:])
                raise RuntimeError(f"the {kind}/{mode} run failed (code {out.returncode})")
            rows += json.loads(found[0][5:])
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from calseg.machine import machine_info

    ap = argparse.ArgumentParser(prog="python -m calseg.bench jobs", description=__doc__)
    ap.add_argument("--jobs", type=int, default=5, help="jobs per kind and mode")
    ap.add_argument("--worker-starts", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    machine = machine_info(os.environ)
    print(
        f"machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores, commit "
        f"{machine['git_commit']}; load(1 min) {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    report: dict[str, Any] = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="calseg-bench-jobs-") as tmp:
        root = Path(tmp)
        report["modes"] = _modes_in_worker_like_processes(root / "modes", args.jobs)
        report["worker_start"] = run_worker_starts(root, args.worker_starts)
        print(json.dumps({"worker_start": report["worker_start"]}), flush=True)
        report["cancel"] = run_cancels(root)
    report["load_after"] = os.getloadavg()[0]
    print(f"load(1 min) after: {report['load_after']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
