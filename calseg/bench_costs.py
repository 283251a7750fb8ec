"""``python -m calseg.bench costs [--quick] [--json out.json]``: real jobs vs their cost estimates.

Runs jobs of every kind through :func:`calseg.service.jobs.run_job` on a temporary SQLite
database and artifact store, each job in a fresh interpreter (its peak RSS, ``VmHWM``:
:func:`peak_rss_bytes`, is its own), and prints per job the measured
peak RSS, the bytes it added to the artifact store and embedding cache, and its wall time, next
to :func:`calseg.service.costs.estimate` for the same job (ratio = estimate / measured; the
estimates are meant to be at or above the measurement: >= 1). The constants of
:data:`calseg.service.costs.CONSTANTS` were set from these runs (BENCHMARKS.md "Job cost
estimates"). ``--quick`` runs the smaller size of each kind only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SMALL_SIM = {"n_videos": 3, "n_frames": 16, "height": 128, "width": 128, "seed": 1}
LARGE_SIM = {"n_videos": 3, "n_frames": 40, "height": 256, "width": 256, "seed": 2}


def cases(quick: bool) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """``(name, kind, params, dataset case)``: the dataset case names the simulate case whose
    job the parameters reference (``dataset_job_id``)."""
    out = [
        ("simulate 3x16x128^2", "simulate", SMALL_SIM, None),
        ("infer baseline 16x128^2", "infer", {"method": "baseline", "video_id": "v000"}, "S"),
        (
            "infer sam2 S=256 16x128^2",
            "infer",
            {"method": "sam2", "image_size": 256, "video_id": "v000"},
            "S",
        ),
        (
            "finetune decoder S=256 10 steps",
            "finetune",
            {"image_size": 256, "steps": 10, "frames_per_video": 4, "val_every": 5},
            "S",
        ),
        ("evaluate S=256", "evaluate", {"image_size": 256, "split": "test"}, "S"),
    ]
    if quick:
        return out
    return out + [
        ("simulate 3x40x256^2", "simulate", LARGE_SIM, None),
        ("infer baseline 40x256^2", "infer", {"method": "baseline", "video_id": "v000"}, "L"),
        (
            "infer baseline sigma 8 40x256^2",
            "infer",
            {"method": "baseline", "video_id": "v000", "smooth_sigma_px": 8.0},
            "L",
        ),
        (
            "infer baseline opening r 40 40x256^2",
            "infer",
            {
                "method": "baseline",
                "video_id": "v000",
                "background": "opening",
                "background_radius_px": 40.0,
            },
            "L",
        ),
        (
            "infer sam2 S=512 40x256^2",
            "infer",
            {"method": "sam2", "image_size": 512, "video_id": "v000"},
            "L",
        ),
        (
            "finetune decoder S=512 30 steps",
            "finetune",
            {"image_size": 512, "steps": 30, "frames_per_video": 8, "val_every": 15},
            "L",
        ),
    ]


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of THIS process image (bytes): ``VmHWM`` of /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that high-water mark across
    ``fork`` + ``execve``, so a child started by a large parent reports at least the parent's
    RSS (a tiny simulate job "peaked" at the 685 MiB of the bench process that started it).
    ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(job_id: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one job in a fresh interpreter; returns its wall time, peak RSS and state."""
    code = (
        "import json, sys, time\n"
        "from calseg.bench_costs import peak_rss_bytes\n"
        "from calseg.service.jobs import run_job\n"
        "t = time.perf_counter()\n"
        f"state = run_job({job_id!r})\n"
        "print(json.dumps({'state': state, 'wall_s': time.perf_counter() - t,\n"
        "  'peak_rss_b': peak_rss_bytes()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"job {job_id} crashed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_costs(quick: bool = False) -> list[dict[str, Any]]:
    """Run :func:`cases` and compare each job with its estimate (module docstring)."""
    from calseg.service import costs
    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.jobs import submit_job
    from calseg.service.models import Job
    from calseg.service.schemas import validate_params
    from calseg.service.settings import Settings

    rows = []
    with tempfile.TemporaryDirectory(prefix="calseg-costs-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'costs.db'}"
        upgrade_database(url)
        env = {
            "CALSEG_DATABASE_URL": url,
            "CALSEG_ARTIFACT_DIR": str(root / "art"),
            "CALSEG_CACHE_DIR": str(root / "cache"),
            "CALSEG_PROGRESS_INTERVAL_S": "1",
        }
        settings = Settings(
            database_url=url,
            artifact_dir=root / "art",
            cache_dir=root / "cache",
            job_max_memory_bytes=10**15,
            job_max_disk_bytes=10**15,
            job_max_time_s=10**9,
        )
        datasets: dict[str, str] = {}
        for name, kind, params, ds in cases(quick):
            p = dict(params)
            if ds is not None:
                p["dataset_job_id"] = datasets[ds]
            with session_scope(url) as s:
                job = submit_job(s, kind, p, enqueue=lambda *a, **k: None, settings=settings)
                job_id = job.id
                est = costs.estimate(s, kind, validate_params(kind, job.params), settings)
            before = _dir_bytes(root / "art") + _dir_bytes(root / "cache")
            print(f"[costs] {name} ...", file=sys.stderr, flush=True)
            got = run_child(job_id, env)
            disk = _dir_bytes(root / "art") + _dir_bytes(root / "cache") - before
            if kind == "simulate" and got["state"] == "succeeded":
                datasets["S" if "128" in name else "L"] = job_id
            with session_scope(url) as s:
                error = s.get(Job, job_id).error
            rows.append(
                {
                    "case": name,
                    "kind": kind,
                    "state": got["state"],
                    "error": error,
                    "measured": {
                        "memory_bytes": got["peak_rss_b"],
                        "disk_bytes": disk,
                        "time_s": got["wall_s"],
                    },
                    "estimate": est.to_dict(),
                }
            )
            print(_format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _format_row(row: dict[str, Any]) -> str:
    m, e = row["measured"], row["estimate"]
    mib = 1024**2

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    return (
        f"{row['case']:<38} {row['state']:<9} "
        f"mem {m['memory_bytes'] / mib:7.0f} MiB est {e['memory_bytes'] / mib:7.0f} "
        f"(x{ratio(e['memory_bytes'], m['memory_bytes'])})  "
        f"disk {m['disk_bytes'] / mib:7.1f} MiB est {e['disk_bytes'] / mib:7.1f} "
        f"(x{ratio(e['disk_bytes'], m['disk_bytes'])})  "
        f"time {m['time_s']:6.1f} s est {e['time_s']:7.1f} (x{ratio(e['time_s'], m['time_s'])})"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m calseg.bench costs``."""
    ap = argparse.ArgumentParser(prog="python -m calseg.bench costs", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the small size of each kind only")
    ap.add_argument("--json", type=Path, help="also write every row as JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    rows = bench_costs(args.quick)
    print(f"command: python -m calseg.bench costs{' --quick' if args.quick else ''}")
    print(f"load 1 min before/after: {load:.2f}/{os.getloadavg()[0]:.2f}")
    for row in rows:
        print(_format_row(row))
    print(
        f"total wall time: {time.perf_counter() - t0:.0f} s; bench process peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["state"] == "succeeded" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
