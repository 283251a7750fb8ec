"""scripts/system-deps.sh says what it installs, and why, before it runs apt-get as root.

apt-get and id are replaced by two small scripts on PATH that record their calls (the test
must not install packages on the machine); bash, printf and sleep are the real ones.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "system-deps.sh"


def _tool(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def _run(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    stdout = tmp_path / "stdout.txt"  # the script's output; the fake apt-get appends to it too
    _tool(bin_dir, "id", "echo 0")  # as root
    _tool(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}; echo "APT-GET RAN: $*" >> {stdout}')
    (bin_dir / "sleep").symlink_to(shutil.which("sleep"))
    with stdout.open("a") as fh:
        subprocess.run(
            ["/bin/bash", str(SCRIPT)],
            env={"PATH": str(bin_dir), "CALSEG_SYSTEM_DEPS_WAIT_S": "0", **env},
            stdout=fh,
            timeout=30,
            check=True,
        )
    out = stdout.read_text()
    calls = log.read_text().splitlines() if log.exists() else []
    return out, calls


def test_it_says_what_and_why_before_installing(tmp_path: Path) -> None:
    out, calls = _run(tmp_path)
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends chromium docker-compose",
    ]
    first_apt = out.index("APT-GET RAN")
    notice = out[:first_apt]
    assert "as root" in notice and "chromium" in notice and "docker-compose" in notice
    assert "test_frontend.py" in notice  # why: the tests that need it
    assert "CALSEG_NO_SYSTEM_DEPS=1" in notice  # how not to
    assert "installed chromium docker-compose" in out


def test_opt_out_installs_nothing(tmp_path: Path) -> None:
    out, calls = _run(tmp_path, CALSEG_NO_SYSTEM_DEPS="1")
    assert calls == [] and "not installing chromium docker-compose" in out


def test_nothing_missing_nothing_said(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("chromium", "docker-compose"):
        _tool(bin_dir, name, "true")
    out, calls = _run(tmp_path)
    assert out == "" and calls == []
