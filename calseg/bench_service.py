"""Service benchmarks (issue 5 item 11): ``python -m calseg.bench_service`` (also
``python -m calseg.bench service``).

* ``latency``: ``--clients`` (50) concurrent clients (one thread and one keep-alive
  ``httpx.Client`` each) against the embedded service's api (uvicorn, one process, as
  ``make serve`` runs it; no worker, so jobs stay queued). Each client loops: submit a
  simulate job (``POST /api/jobs``), then read its status ``--polls-per-job`` (5) times
  (``GET /api/jobs/{id}``). Two client models (:func:`run_latency`): ``poll``, one request
  per client every ``--poll-s`` (1) s on a fixed clock for ``--seconds`` (30), what a client
  or page watching its job does (offered load 50 requests/s); ``closed``, back to back for
  ``--closed-seconds`` (15): the saturation throughput. Reported: p50/p99 latency (ms) of
  submit and of status, requests per second, errors (any non-2xx or transport error), the
  api process's CPU time per request. Target: p99 < 50 ms.
* ``upload``: a ``--upload-gb`` (2) GB BigTIFF written as a sparse file (2048 x 2048 uint16
  frames; header plus a marked first and last frame, the rest holes) streamed in 1 MiB chunks
  over loopback to ``POST /api/recordings`` (raw body). Reported: throughput (MB/s, wall time
  from first byte to the 201), the api process's resident set size before and at its peak
  (``VmRSS`` from ``/proc/<pid>/status`` sampled every 20 ms) and the growth. Target: growth
  < 100 MB.

The database is a fresh PostgreSQL database on the machine's server when it answers
(``CALSEG_TEST_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``;
dropped afterwards), else SQLite (``--sqlite`` forces it). Redis is the embedded service's own.
Client and server share the machine: on a loaded machine the latencies are pessimistic (the
1-minute load average is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

FRAME_SIDE = 2048
"""Frame side (px) of the generated upload: one uint16 frame is 8 MiB."""
CHUNK = 1024 * 1024


def sparse_bigtiff(path: Path, nbytes: float) -> Path:
    """Write a BigTIFF of about ``nbytes`` bytes as a sparse file: ``T`` frames of
    2048 x 2048 uint16 (T = ceil(nbytes / 8 MiB)), only the first and last frame written
    (value 1000 + frame index in their top-left 16 x 16 px), the rest holes (zeros).

    Returns:
        ``path`` (its size is the header plus T x 8 MiB; disk use is a few MiB).
    """
    import tifffile

    frame = FRAME_SIDE * FRAME_SIDE * 2
    n = max(int(np.ceil(nbytes / frame)), 2)
    path = Path(path)
    mm = tifffile.memmap(
        path, shape=(n, FRAME_SIDE, FRAME_SIDE), dtype=np.uint16, bigtiff=True,
        photometric="minisblack",
    )  # fmt: skip
    mm[0, :16, :16] = 1000
    mm[-1, :16, :16] = 1000 + n - 1
    mm.flush()
    del mm
    return path


def expected_frames(path: Path) -> int:
    """Frames of a file written by :func:`sparse_bigtiff` (from its size)."""
    return int(Path(path).stat().st_size // (FRAME_SIDE * FRAME_SIDE * 2))


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


class RssSampler:
    """Samples a process's ``VmRSS`` every ``interval_s`` in a thread; ``.peak_kib``."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.start_kib = _rss_kib(pid)
        self.peak_kib = self.start_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_kib = max(self.peak_kib, _rss_kib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, RuntimeError):
            self.peak_kib = max(self.peak_kib, _rss_kib(self.pid))


@contextlib.contextmanager
def _database(sqlite_dir: Path, force_sqlite: bool) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards) or a SQLite file in ``sqlite_dir``."""
    if not force_sqlite:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        pg = os.environ.get(
            "CALSEG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        )
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - no PostgreSQL here: SQLite
            admin.dispose()
        else:
            name = f"calseg_bench_{uuid.uuid4().hex[:10]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                yield make_url(pg).set(database=name).render_as_string(hide_password=False)
            finally:
                from calseg.service.db import get_engine

                get_engine.cache_clear()
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
            return
    yield f"sqlite:///{sqlite_dir / 'bench.db'}"


@contextlib.contextmanager
def embedded(workdir: Path, *, force_sqlite: bool = False, **overrides: Any) -> Iterator[Any]:
    """The embedded service (api only, its own Redis) on a fresh database; ``.api_pid`` and
    ``.headers`` (the admin token) added."""
    from calseg.service.embedded import EmbeddedService
    from calseg.service.settings import Settings

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with _database(workdir, force_sqlite) as url:
        settings = Settings(
            database_url=url,
            redis_url=None,
            artifact_dir=workdir / "artifacts",
            cache_dir=workdir / "cache",
            log_dir=workdir / "logs",
            token_file=workdir / "token",
            api_port=0,
            reconcile_interval_s=0,
            **overrides,
        )
        with EmbeddedService(settings, api_port=0, worker=False) as svc:
            svc.api_pid = svc.pids["api"]
            svc.headers = {"Authorization": f"Bearer {svc.token}"}
            svc.database = "postgresql" if url.startswith("postgresql") else "sqlite"
            yield svc


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def _cpu_s(pid: int) -> float:
    """User + system CPU time (s) a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_latency(
    url: str,
    headers: dict[str, str],
    clients: int = 50,
    seconds: float = 30.0,
    mode: str = "poll",
    poll_s: float = 1.0,
    polls_per_job: int = 5,
    api_pid: int | None = None,
) -> dict[str, Any]:
    """``clients`` threads (one keep-alive ``httpx.Client`` each) each submit a simulate job
    (``POST /api/jobs``) and then read its status (``GET /api/jobs/{id}``) ``polls_per_job``
    times, in a loop, for ``seconds``. A warm-up of three submit + status rounds runs first,
    unmeasured.

    Client models (``mode``):

    * ``poll`` (how a watching client or the page behaves): one request every ``poll_s``
      seconds per client, on a fixed clock (client ``i`` starts at ``i / clients * poll_s``,
      then every ``poll_s``), so the offered load is ``clients / poll_s`` requests/s whatever
      the latencies; a request that overruns its slot delays only that client's next one.
    * ``closed``: back to back (each client sends its next request as soon as the last one
      answered): the server at saturation; its requests/s is the throughput, and its
      latencies are mostly queueing (about ``clients / throughput``).

    ``api_pid``: the api process, whose CPU time over the run divided by the requests gives
    ``api_cpu_ms_per_request`` (the server's own cost; the database's is not included);
    ``client_cpu_ms_per_request``: the same for this process (the 50 client threads), which
    shares the machine's cores with the server.

    Returns:
        dict with latencies in ms (``submit_p50_ms`` ... ``status_p99_ms``), ``requests_per_s``,
        ``errors`` (non-2xx or transport errors; ``error_examples``: the first five),
        ``job_ids`` (every job submitted), ``load_before`` (1-minute load average).
    """
    if mode not in ("poll", "closed"):
        raise ValueError(f"mode must be 'poll' or 'closed', not {mode!r}")
    submit: list[float] = []
    status: list[float] = []
    errors: list[str] = []
    ids: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    body = {"kind": "simulate", "params": {"n_videos": 3, "n_frames": 4}}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        for _ in range(3):  # first requests import and cache (schemas, git describe)
            job_id = c.post("/api/jobs", json=body).json()["id"]
            c.get(f"/api/jobs/{job_id}")
    period = poll_s if mode == "poll" else 0.0
    t_start: list[float] = []

    def client(index: int) -> None:
        s_lat: list[float] = []
        g_lat: list[float] = []
        mine: list[str] = []
        errs: list[str] = []
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            start.wait()
            t0 = t_start[0]
            deadline = t0 + seconds
            slot = t0 + index / clients * period

            def wait_slot() -> bool:
                nonlocal slot
                now = time.perf_counter()
                if max(slot, now) >= deadline:
                    return False
                if slot > now:
                    time.sleep(slot - now)
                slot = max(slot, now) + period
                return True

            while wait_slot():
                try:
                    t = time.perf_counter()
                    r = c.post("/api/jobs", json=body)
                    s_lat.append((time.perf_counter() - t) * 1e3)
                    if r.status_code != 201:
                        errs.append(f"submit {r.status_code}: {r.text[:200]}")
                        continue
                    job_id = r.json()["id"]
                    mine.append(job_id)
                    for _ in range(polls_per_job):
                        if not wait_slot():
                            break
                        t = time.perf_counter()
                        r = c.get(f"/api/jobs/{job_id}")
                        g_lat.append((time.perf_counter() - t) * 1e3)
                        if r.status_code != 200 or r.json()["id"] != job_id:
                            errs.append(f"status {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errs.append(f"{type(exc).__name__}: {exc}")
        with lock:
            submit.extend(s_lat)
            status.extend(g_lat)
            ids.extend(mine)
            errors.extend(errs)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    load_before = os.getloadavg()[0]
    cpu0 = _cpu_s(api_pid) if api_pid else None
    client_cpu0 = time.process_time()
    t_start.append(time.perf_counter())
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start[0]
    client_cpu = time.process_time() - client_cpu0
    n = len(submit) + len(status)
    cpu = (_cpu_s(api_pid) - cpu0) if api_pid and cpu0 is not None else None
    return {
        "mode": mode,
        "clients": clients,
        "poll_s": period,
        "polls_per_job": polls_per_job,
        "seconds": round(wall, 2),
        "load_before": round(load_before, 2),
        "requests": n,
        "requests_per_s": round(n / wall, 1),
        "submit_n": len(submit),
        "submit_p50_ms": round(_pct(submit, 50), 1),
        "submit_p99_ms": round(_pct(submit, 99), 1),
        "status_n": len(status),
        "status_p50_ms": round(_pct(status, 50), 1),
        "status_p99_ms": round(_pct(status, 99), 1),
        "status_mean_ms": round(statistics.fmean(status), 1) if status else None,
        "api_cpu_s": round(cpu, 2) if cpu is not None else None,
        "api_cpu_ms_per_request": round(cpu / n * 1e3, 2) if cpu is not None and n else None,
        "client_cpu_ms_per_request": round(client_cpu / n * 1e3, 2) if n else None,
        "errors": len(errors),
        "error_examples": errors[:5],
        "job_ids": ids,
    }


def run_idle_probe(
    url: str, headers: dict[str, str], pauses: tuple[float, ...] = (0.0, 0.5), n: int = 10
) -> dict[str, dict[str, float]]:
    """One client, one keep-alive connection: median latency (ms) of ``GET /api/health`` (no
    database) and of a job's status, sent back to back (pause 0) or each after ``pause``
    seconds of silence. Separates what an idle pause costs on this machine from load."""
    out: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        job_id = c.post("/api/jobs", json={"kind": "simulate", "params": {"n_frames": 4}}).json()
        for pause in pauses:
            lat: dict[str, list[float]] = {"health": [], "status": []}
            for _ in range(n):
                for what, path in (
                    ("health", "/api/health"),
                    ("status", f"/api/jobs/{job_id['id']}"),
                ):
                    time.sleep(pause)
                    t = time.perf_counter()
                    c.get(path).raise_for_status()
                    lat[what].append((time.perf_counter() - t) * 1e3)
            out[f"{pause:g}"] = {k: round(float(np.median(v)), 1) for k, v in lat.items()}
    return out


def run_upload(url: str, headers: dict[str, str], api_pid: int, path: Path) -> dict[str, Any]:
    """Stream ``path`` to ``POST /api/recordings`` (raw body, 1 MiB chunks, Content-Length
    set) while sampling the api's RSS; the result with throughput and RSS growth (MB)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                yield chunk

    with RssSampler(api_pid) as rss, httpx.Client(base_url=url, headers=headers) as c:
        t0 = time.perf_counter()
        r = c.post(
            "/api/recordings",
            params={"filename": Path(path).name},
            content=body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=httpx.Timeout(600, connect=10),
        )
        wall = time.perf_counter() - t0
    out = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return {
        "status": r.status_code,
        "detail": out.get("detail"),
        "size_bytes": size,
        "seconds": round(wall, 2),
        "throughput_mb_s": round(size / 1e6 / wall, 1),
        "n_frames": out.get("n_frames"),
        "expected_frames": expected_frames(path),
        "sha256_ok": out.get("sha256") == digest.hexdigest(),
        "rss_before_mb": round(rss.start_kib / 1024, 1),
        "rss_peak_mb": round(rss.peak_kib / 1024, 1),
        "rss_growth_mb": round((rss.peak_kib - rss.start_kib) / 1024, 1),
    }


def upload_with_rss(
    path: Path,
    workdir: Path,
    *,
    max_upload_bytes: int | None = None,
    force_sqlite: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Start an embedded service in ``workdir`` and upload ``path`` to it (:func:`run_upload`);
    ``settings``: further Settings fields (e.g. the decode budget ``max_recording_bytes``)."""
    overrides = {"max_upload_bytes": max_upload_bytes} if max_upload_bytes else {}
    overrides.update(settings)
    with embedded(workdir, force_sqlite=force_sqlite, **overrides) as svc:
        return run_upload(svc.url, svc.headers, svc.api_pid, path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from calseg.machine import machine_info

    ap = argparse.ArgumentParser(prog="python -m calseg.bench_service", description=__doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the poll run")
    ap.add_argument("--closed-seconds", type=float, default=15.0, help="length of the closed run")
    ap.add_argument(
        "--mode", choices=["poll", "closed"], action="append",
        help="client model; repeatable; default: poll, then closed (see run_latency)",
    )  # fmt: skip
    ap.add_argument("--poll-s", type=float, default=1.0, help="poll period per client (s)")
    ap.add_argument("--polls-per-job", type=int, default=5)
    ap.add_argument("--upload-gb", type=float, default=2.0)
    ap.add_argument("--only", choices=["latency", "upload"])
    ap.add_argument("--sqlite", action="store_true", help="SQLite even when PostgreSQL answers")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    machine = machine_info(os.environ)
    report: dict[str, Any] = {"machine": machine}
    print(
        f"machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores, "
        f"{machine['ram_gib']} GiB RAM, {machine['os']}, Python {machine['python']}, "
        f"commit {machine['git_commit']}; load(1 min) {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="calseg-bench-svc-") as tmp:
        root = Path(tmp)
        big = {"max_upload_bytes": 8 * 1024**3, "max_recording_bytes": 8 * 1024**3,
               "max_recording_pixels": 2**33,
               # no worker runs: submitted jobs stay queued, past the per-user quota of 100
               "max_queued_jobs": 10**9}  # fmt: skip
        with embedded(root / "svc", force_sqlite=args.sqlite, **big) as svc:
            print(f"api {svc.url} (pid {svc.api_pid}), database {svc.database}", flush=True)
            if args.only in (None, "latency"):
                probe = run_idle_probe(svc.url, svc.headers)
                report["idle_probe"] = probe
                print(
                    "one client, median of 10: "
                    + "; ".join(
                        f"pause {pause} s before each request: health {v['health']} ms, "
                        f"status {v['status']} ms"
                        for pause, v in probe.items()
                    ),
                    flush=True,
                )
                report["latency"] = []
                for mode in args.mode or ["poll", "closed"]:
                    lat = run_latency(
                        svc.url, svc.headers, args.clients,
                        args.seconds if mode == "poll" else args.closed_seconds, mode,
                        args.poll_s, args.polls_per_job, svc.api_pid,
                    )  # fmt: skip
                    lat.pop("job_ids")
                    report["latency"].append(lat)
                    model = (
                        f"each submits, then polls status every {args.poll_s:g} s "
                        f"({args.polls_per_job} polls per job)"
                        if mode == "poll"
                        else f"back to back (closed loop, saturation), {args.polls_per_job} "
                        "status reads per submit"
                    )
                    print(
                        f"latency [{mode}], {lat['clients']} clients {model}; "
                        f"{lat['seconds']} s, load(1 min) {lat['load_before']:.2f} before: "
                        f"{lat['requests']} requests ({lat['requests_per_s']}/s), "
                        f"errors {lat['errors']}; api CPU {lat['api_cpu_s']} s = "
                        f"{lat['api_cpu_ms_per_request']} ms per request, clients' CPU "
                        f"{lat['client_cpu_ms_per_request']} ms per request\n"
                        f"  submit  POST /api/jobs       n={lat['submit_n']:6d}  "
                        f"p50 {lat['submit_p50_ms']:7.1f} ms  p99 {lat['submit_p99_ms']:7.1f} ms"
                        f"  (target p99 < 50 ms)\n"
                        f"  status  GET  /api/jobs/{{id}}  n={lat['status_n']:6d}  "
                        f"p50 {lat['status_p50_ms']:7.1f} ms  p99 {lat['status_p99_ms']:7.1f} ms"
                        f"  (target p99 < 50 ms)",
                        flush=True,
                    )
            if args.only in (None, "upload"):
                path = sparse_bigtiff(root / "upload.tif", args.upload_gb * 1e9)
                up = run_upload(svc.url, svc.headers, svc.api_pid, path)
                report["upload"] = up
                print(
                    f"upload {up['size_bytes'] / 1e9:.2f} GB BigTIFF (sparse file) over "
                    f"loopback: HTTP {up['status']}, {up['seconds']} s, "
                    f"{up['throughput_mb_s']} MB/s, frames {up['n_frames']}/"
                    f"{up['expected_frames']}, sha256 {'ok' if up['sha256_ok'] else 'MISMATCH'}\n"
                    f"  api RSS {up['rss_before_mb']} MB before, {up['rss_peak_mb']} MB peak: "
                    f"growth {up['rss_growth_mb']} MB (target < 100 MB)",
                    flush=True,
                )
    print(f"load(1 min) after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    ok = all(lat["errors"] == 0 for lat in report.get("latency", []))
    ok &= report.get("upload", {}).get("status", 201) == 201
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
