"""A small Python client of the CalSeg REST API (over httpx).

Example::

    from calseg.client import CalSegClient

    with CalSegClient("http://gpu-server:8000", token="cs_...") as cs:
        sim = cs.submit("simulate", {"n_videos": 4, "seed": 1})
        sim = cs.wait(sim["id"], on_progress=lambda job: print(job["progress"], job["stage"]))
        paths = cs.download(sim["id"], "out/")          # sha256 of each file checked
        rec = cs.upload("recording.tif")                # streamed from the file
        inf = cs.wait(cs.submit("infer", {"recording_id": rec["id"], "method": "baseline"})["id"])

Without arguments the URL and token come from ``CALSEG_URL`` and ``CALSEG_TOKEN``; with no
``CALSEG_TOKEN`` and a service on this machine (a loopback URL), the embedded default's token
file (``var/token``) is used when it exists, so a client next to ``make serve`` needs no setup
(the local token is never sent to another host).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"


class CalSegError(RuntimeError):
    """The service answered with an error (``status``: HTTP status; ``detail``: its reason),
    or could not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class JobFailed(CalSegError):
    """A waited-for job ended failed or cancelled; ``job`` is its final record."""

    def __init__(self, job: dict[str, Any]) -> None:
        reason = job.get("error") or job.get("message") or "no reason given"
        super().__init__(f"{job.get('kind')} job {job.get('id')} {job.get('state')}: {reason}")
        self.job = job


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_token(base_url: str = DEFAULT_URL) -> str | None:
    """``CALSEG_TOKEN``; else, for a service on this machine (``base_url`` on a loopback
    host), the token in the embedded default's token file (``CALSEG_TOKEN_FILE``, default
    ``var/token``); else None."""
    token = os.environ.get("CALSEG_TOKEN")
    if token:
        return token.strip()
    if httpx.URL(base_url).host not in LOOPBACK_HOSTS:
        return None
    from calseg.service.auth import read_token_file
    from calseg.service.settings import get_settings

    return read_token_file(get_settings().token_file)


class CalSegClient:
    """Client of one CalSeg service.

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000`` (default ``CALSEG_URL``).
        token: API token (default :func:`default_token` of ``base_url``).
        timeout_s: timeout of one HTTP request (s); waiting for a job polls repeatedly.
        http: an ``httpx.Client`` to use instead of a new one (tests pass FastAPI's
            ``TestClient``); its base URL is used, the token is added to each request.

    Every method raises :class:`CalSegError` for an error answer (its ``detail`` says why).
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("CALSEG_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else default_token(self.base_url)
        self._own = http is None
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout_s)

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> CalSegClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool (not a client passed in as ``http``)."""
        if self._own:
            self._http.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        try:
            r = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise CalSegError(f"cannot reach {self.base_url}: {exc}") from exc
        _check(r, method, path)
        return r

    # ------------------------------------------------------------------ account, kinds
    def me(self) -> dict[str, Any]:
        """The token's user: ``{"id", "name", "is_admin"}``."""
        return self._request("GET", "/api/me").json()

    def job_kinds(self) -> dict[str, Any]:
        """``{kind: JSON schema of its parameters}`` (with defaults)."""
        return self._request("GET", "/api/job-kinds").json()

    # ------------------------------------------------------------------ jobs
    def submit(self, kind: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Submit a job (``simulate``, ``finetune``, ``infer``, ``evaluate``); returns its
        record (``id``, ``state`` "queued", the validated ``params`` with every default)."""
        return self._request(
            "POST", "/api/jobs", json={"kind": kind, "params": params or {}}
        ).json()

    def get(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, progress (0-1), stage, ETA (s), error, log tail, result,
        provenance, metrics and artifacts."""
        return self._request("GET", f"/api/jobs/{job_id}").json()

    def list(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """A page of the caller's jobs, newest first: ``{"items", "total", "limit", "offset"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if kind:
            params["kind"] = kind
        if state:
            params["state"] = state
        return self._request("GET", "/api/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job."""
        return self._request("POST", f"/api/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict[str, Any]:
        """Queue a failed or cancelled job again (same id)."""
        return self._request("POST", f"/api/jobs/{job_id}/retry").json()

    def rerun(self, job_id: str) -> dict[str, Any]:
        """A new job with the same kind and parameters (seeds included)."""
        return self._request("POST", f"/api/jobs/{job_id}/rerun").json()

    def metrics(self, job_id: str, name: str | None = None) -> list[dict[str, Any]]:
        """A job's metrics ``{"name", "value", "model", "subset", "step"}``, in order."""
        params = {"name": name} if name else None
        return self._request("GET", f"/api/jobs/{job_id}/metrics", params=params).json()

    def models(self) -> list[dict[str, Any]]:
        """The caller's fine-tuned models (succeeded finetune jobs) with their provenance."""
        return self._request("GET", "/api/models").json()

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Poll a job until it ends; returns its final record.

        Args:
            job_id: the job.
            poll_s: seconds between polls.
            timeout_s: give up after this long (None: wait as long as it takes).
            on_progress: called with the job's record after each poll (e.g. to draw a bar
                from ``progress``, ``stage`` and ``eta_s``).
            raise_on_failure: raise :class:`JobFailed` when it ends failed or cancelled.

        Raises:
            JobFailed: the job failed or was cancelled (``raise_on_failure``).
            CalSegError: ``timeout_s`` passed (status 0), or an error answer.
        """
        t0 = time.monotonic()
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] in TERMINAL_STATES:
                break
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise CalSegError(
                    f"job {job_id} still {job['state']} after {timeout_s:.0f} s (progress "
                    f"{100 * float(job.get('progress') or 0):.0f} %)"
                )
            time.sleep(poll_s)
        if raise_on_failure and job["state"] != "succeeded":
            raise JobFailed(job)
        return job

    watch = wait

    def download(
        self, job_id: str, out_dir: str | Path = ".", names: list[str] | None = None
    ) -> list[Path]:
        """Download a job's artifacts (all, or ``names``) into ``out_dir``, streamed to disk;
        each file's sha256 is checked against the service's (``X-Content-SHA256``).

        Returns:
            The written paths (``out_dir / artifact name``; names with folders keep them).

        Raises:
            CalSegError: an unknown name, an error answer, or a checksum mismatch (the
                partial file is removed).
        """
        job = self.get(job_id)
        arts = {a["name"]: a for a in job.get("artifacts", [])}
        wanted = names if names is not None else list(arts)
        missing = [n for n in wanted if n not in arts]
        if missing:
            raise CalSegError(
                f"job {job_id} has no artifact {', '.join(missing)}; it has {', '.join(arts)}"
            )
        out = Path(out_dir)
        paths = []
        for name in wanted:
            dest = out / name
            if not dest.resolve().is_relative_to(out.resolve()):
                raise CalSegError(f"artifact name {name!r} points outside {out}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            url = arts[name].get("url") or f"/api/jobs/{job_id}/artifacts/{name}"
            try:
                with self._http.stream("GET", url, headers=self._headers()) as r:
                    if r.status_code >= 400:
                        r.read()
                        _check(r, "GET", url)
                    expected = r.headers.get("x-content-sha256") or arts[name]["sha256"]
                    with open(dest, "wb") as fh:
                        for chunk in r.iter_bytes(1 << 20):
                            digest.update(chunk)
                            fh.write(chunk)
            except httpx.HTTPError as exc:
                dest.unlink(missing_ok=True)
                raise CalSegError(f"download of {name} failed: {exc}") from exc
            if digest.hexdigest() != expected:
                dest.unlink(missing_ok=True)
                raise CalSegError(
                    f"{name}: sha256 {digest.hexdigest()} differs from the service's {expected}"
                )
            paths.append(dest)
        return paths

    # ------------------------------------------------------------------ recordings
    def upload(
        self, path: str | Path, filename: str | None = None, **read_options: Any
    ) -> dict[str, Any]:
        """Upload a recording, streamed from the file (memory stays bounded whatever its
        size). ``read_options``: how it is read (``axes``, ``channel``,
        ``interleaved_channels``, ``z_projection``, ``dataset`` of an HDF5 file), kept for
        its jobs. Returns its record
        (``warnings``: what the reader noticed); ``duplicate`` is true (with a ``message``)
        when you had uploaded the same file before, and that recording is returned."""
        path = Path(path)
        if not path.is_file():
            raise CalSegError(f"{path} is not a file")
        options = {k: v for k, v in read_options.items() if v is not None}
        with open(path, "rb") as fh:
            return self._request(
                "POST",
                "/api/recordings",
                params={"filename": filename or path.name, **options},
                content=_chunks(fh),
                headers={"Content-Type": "application/octet-stream"},
            ).json()

    def recordings(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """The caller's recordings, newest first."""
        return self._request(
            "GET", "/api/recordings", params={"limit": limit, "offset": offset}
        ).json()

    def recording(self, recording_id: str) -> dict[str, Any]:
        """A recording's metadata (file name, sha256, size, frames, height, width, dtype)."""
        return self._request("GET", f"/api/recordings/{recording_id}").json()

    def delete_recording(self, recording_id: str) -> None:
        """Delete a recording (refused with 409 while a queued or running job uses it)."""
        self._request("DELETE", f"/api/recordings/{recording_id}")

    def delete_job(self, job_id: str) -> None:
        """Delete a job that has ended, with its artifacts (refused with 409 while it or a job
        using it is queued or running)."""
        self._request("DELETE", f"/api/jobs/{job_id}")


def _chunks(fh: Any, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


def _check(r: httpx.Response, method: str, path: str) -> None:
    if r.status_code < 400:
        return
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text[:500]
    text = detail if isinstance(detail, str) else str(detail)
    raise CalSegError(
        f"{method} {path}: {r.status_code} {text}", status=r.status_code, detail=detail
    )
