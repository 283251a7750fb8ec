"""The machine a measurement ran on (:func:`machine_info`), for every benchmark's report
(:mod:`calseg.bench`, :mod:`calseg.bench_service`, :mod:`calseg.bench_jobs`), and the memory it
has left (:func:`available_memory_bytes`, for ``calseg segment``'s memory check and the
readers' refusal of recordings larger than memory)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that set the numeric libraries' thread counts."""


def machine_info(env: Mapping[str, str]) -> dict:
    """Describe this machine and software: CPU model (/proc/cpuinfo), cores, RAM, versions,
    thread settings (:data:`THREAD_VARIABLES` of ``env``, the process environment the caller
    read: the library never reads it itself), load average and the git commit of the working
    tree."""
    import scipy
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:  # pragma: no cover
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    commit = None
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    import calseg

    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "cores_usable": affinity,
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: env[k] for k in THREAD_VARIABLES if env.get(k) is not None},
        "calseg": calseg.__version__,
        "git_commit": commit,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def available_memory_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Memory this process can still take without swapping, in bytes: the kernel's
    ``MemAvailable`` (free memory plus reclaimable page cache, /proc/meminfo), or less when the
    process runs under a cgroup v2 memory limit (``memory.max - memory.current``, e.g. a
    container). ``None`` where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
