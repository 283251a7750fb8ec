"""PostgreSQL down and back (issue 8 "Queue and workers"): the api answers 503 with a
try-again message meanwhile (never 500, health stays up) and recovers by itself.

Runs a private throw-away PostgreSQL cluster (initdb + pg_ctl in a temporary folder, another
port) so that stopping it never touches the machine's shared server.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rel_helpers import free_port, service_settings, wait_for

pytestmark = pytest.mark.reliability


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (trust auth, 127.0.0.1:<port>)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        if self.bin is None:
            pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="calseg-rel-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, exe: str, *args: str) -> None:
        out = subprocess.run(
            [*self.as_user, str(self.bin / exe), *args], capture_output=True, text=True,
            timeout=120, cwd=self.dir,
        )  # fmt: skip
        assert out.returncode == 0, f"{exe} failed: {out.stdout}\n{out.stderr}"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "pg.log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
             "stop"], capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


def test_api_answers_503_while_postgres_is_down_and_recovers(
    tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    from sqlalchemy import create_engine, text

    from calseg.service.embedded import EmbeddedService

    admin = create_engine(private_pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE calseg"))
    admin.dispose()
    settings = service_settings(tmp_path, private_pg.url("calseg"), None)
    with EmbeddedService(settings, api_port=0, worker=False) as svc:
        headers = {"Authorization": f"Bearer {svc.token}"}
        with httpx.Client(base_url=svc.url, headers=headers, timeout=30) as c:
            job = {"kind": "simulate", "params": {"n_videos": 3, "n_frames": 4}}
            assert c.post("/api/jobs", json=job).status_code == 201
            assert c.get("/api/jobs").json()["total"] == 1
            private_pg.stop()
            answers = [
                c.get("/api/jobs"),
                c.post("/api/jobs", json=job),
                c.get("/api/recordings"),
                c.get("/api/ready"),
            ]
            assert [r.status_code for r in answers] == [503, 503, 503, 503], [
                r.text for r in answers
            ]
            assert "database is unavailable" in answers[0].json()["detail"]
            assert "database" in answers[3].json()
            assert c.get("/api/health").status_code == 200  # the process itself is fine
            private_pg.start()
            r = wait_for(
                lambda: (x := c.get("/api/jobs")).status_code == 200 and x, 60, "the api back"
            )
            assert r.json()["total"] == 1  # nothing lost
            assert c.post("/api/jobs", json=job).status_code == 201
            assert c.get("/api/ready").status_code == 200
