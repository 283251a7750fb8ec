"""Streamed uploads: the request body goes to disk in chunks, hashed on the way, with a size
limit checked while reading (memory stays bounded whatever the file size).

Two forms are accepted: ``multipart/form-data`` with a file field named ``file`` (what browsers
and ``curl -F file=@x.tif`` send), or a raw body (``application/octet-stream``) with the file
name in the ``filename`` query parameter. Other small form fields (e.g. the reading options
``axes``, ``channel``) are collected as text (:data:`FIELD_LIMIT` bytes each, at most
:data:`MAX_FIELDS`).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from calseg.io.recordings import default_recording_name

MULTIPART_SLACK = 64 * 1024
"""Bytes of multipart framing allowed above the file size limit (headers, boundaries)."""
FIELD_LIMIT = 64 * 1024
"""Largest non-file form field accepted (bytes)."""
MAX_FIELDS = 16
"""Most non-file form fields accepted."""


class UploadError(ValueError):
    """The upload is malformed (400), too large (413, ``too_large``) or of an unsupported
    content type (415); ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, too_large: bool = False, status: int = 400) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.status = 413 if too_large else status


@dataclass
class ReceivedFile:
    """A file received to ``path``."""

    path: Path
    filename: str
    sha256: str
    size_bytes: int
    fields: dict[str, str] = field(default_factory=dict)
    """Non-file form fields (name -> text), multipart uploads only."""


def safe_filename(name: str | None, default: str = "recording.tif") -> str:
    """A file name safe on disk: last path component only, ASCII letters, digits, ``._-``.

    Both ``/`` and ``\\`` separators are stripped, so ``../../x.tif`` becomes ``x.tif``.
    """
    if not name:
        return default
    base = PureWindowsPath(PurePosixPath(name).name).name
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or default
    return base[-120:]


def _too_large(limit: int) -> UploadError:
    return UploadError(
        f"upload larger than the limit of {limit} bytes ({limit / 1024**2:.0f} MiB); "
        "raise CALSEG_MAX_UPLOAD_BYTES on the server or upload a smaller file",
        too_large=True,
    )


def over_quota(size: int, left: int, *, streaming: bool = False, others: int = 0) -> UploadError:
    """The 507 of an upload that does not fit in what is left of its owner's storage quota
    (``max_storage_bytes``, :func:`calseg.service.costs.storage_left_bytes`), beside the
    ``others`` bytes of the owner's other uploads still in flight."""
    what = f"after {size:,} bytes, this upload" if streaming else f"this upload of {size:,} bytes"
    if others:
        what += f" and your other uploads in flight ({others:,} bytes so far)"
    return UploadError(
        f"{what} does not fit in your storage quota: {left:,} bytes of it are left (your "
        "recordings, the files your jobs left and the estimated writes of your queued jobs "
        "count, GET /api/users/<you>/limits); delete recordings or jobs you no longer need "
        "(DELETE /api/recordings/ID, /api/jobs/ID) or ask an admin to raise max_storage_bytes; "
        "nothing was stored",
        status=507,
    )


class _Sink:
    """Writes the file part to ``dest`` while hashing and counting."""

    def __init__(
        self,
        dest: Path,
        limit: int,
        min_free: int | None = None,
        quota_left: int | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.dest, self.limit, self.min_free = dest, limit, min_free
        self.quota_left = quota_left
        self.in_flight = in_flight
        self.quota_checked_at = 0  # bytes written when the other uploads were last counted
        self.digest = hashlib.sha256()
        self.size = 0
        self.checked_at = 0  # bytes written when the free disk was last looked at
        self.fh: Any = None
        self.filename: str | None = None
        self.done = False

    def open(self, filename: str | None) -> None:
        if self.fh is not None or self.done:
            raise UploadError("more than one file in the upload; send one recording per request")
        self.filename = filename
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.dest, "wb")  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise _too_large(self.limit)
        if self.quota_left is not None and self.size > self.quota_left:
            raise over_quota(self.size, self.quota_left, streaming=True)
        if self.size - self.quota_checked_at >= QUOTA_CHECK_BYTES:
            self.check_in_flight()
        if self.min_free is not None and self.size - self.checked_at >= DISK_CHECK_BYTES:
            self.checked_at = self.size  # a body without Content-Length: look as it grows
            free = shutil.disk_usage(self.dest.parent).free
            if free < self.min_free:
                raise UploadError(
                    f"the server's disk is down to {free / 2**30:.1f} GiB free, below the "
                    f"{self.min_free / 2**30:g} GiB it keeps free (min_free_disk_bytes), after "
                    f"{self.size:,} bytes of this upload; nothing was stored",
                    status=507,
                )
        self.digest.update(data)
        self.fh.write(data)

    def check_in_flight(self) -> None:
        """507 when this upload and its owner's other uploads in flight (``in_flight``) no
        longer fit in ``quota_left``: the quota left is taken when each upload starts, so ten
        uploads stalled side by side held 1.29 GB against 143 MB of quota (a fifth attack run,
        2026-12-07)."""
        self.quota_checked_at = self.size
        if self.quota_left is None or self.in_flight is None:
            return
        others = self.in_flight()
        if others and self.size + others > self.quota_left:
            raise over_quota(self.size, self.quota_left, streaming=True, others=others)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            self.done = True


DISK_CHECK_BYTES = 64 * 2**20
"""How often (bytes written) a streamed upload looks at the free disk again."""
QUOTA_CHECK_BYTES = 8 * 2**20
"""How often (bytes written) a streamed upload counts its owner's other uploads in flight
against the quota (:meth:`_Sink.check_in_flight`; also at its start and its end)."""


async def receive_file(
    request: Request,
    dest: Path,
    limit: int,
    min_free: int | None = None,
    quota_left: int | None = None,
    in_flight: Callable[[], int] | None = None,
) -> ReceivedFile:
    """Stream the request's file to ``dest`` (bounded memory), checking ``limit`` bytes, the
    free disk (``min_free``) and what is left of the owner's storage quota (``quota_left``;
    None: no quota).

    Raises:
        UploadError: too large (``too_large``), over the quota or the free disk (507), not
            multipart/octet-stream, no ``file`` field.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    if (
        quota_left is not None
        and declared
        and declared.isdigit()
        and int(declared) > quota_left + MULTIPART_SLACK
    ):
        raise over_quota(int(declared), quota_left)
    ctype, options = parse_options_header(request.headers.get("content-type"))
    sink = _Sink(dest, limit, min_free, quota_left, in_flight)
    if quota_left is not None and in_flight is not None and declared and declared.isdigit():
        others = in_flight()  # a declared length that cannot fit beside them: refused now
        if others and int(declared) + others > quota_left + MULTIPART_SLACK:
            raise over_quota(int(declared), quota_left, others=others)
    fields: dict[str, str] = {}
    try:
        if ctype == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise UploadError("multipart upload without a boundary in its Content-Type")
            await _multipart(request, boundary, sink, fields)
        elif ctype in (b"application/octet-stream", b"image/tiff", b""):
            sink.open(request.query_params.get("filename"))
            async for chunk in request.stream():
                sink.write(chunk)
            sink.close()
        else:
            raise UploadError(
                f"unsupported Content-Type {ctype.decode(errors='replace')!r}: send "
                "multipart/form-data with a 'file' field, or application/octet-stream",
                status=415,
            )
        if not sink.done and sink.fh is not None:  # the file part began and never ended
            raise UploadError(
                f"the upload ended inside its file after {sink.size:,} bytes, before the "
                "multipart body's closing boundary: it was cut off; send it again"
            )
        if not sink.done:
            raise UploadError("no file in the upload: send it in a form field named 'file'")
        sink.check_in_flight()
    except BaseException:
        sink.close()
        dest.unlink(missing_ok=True)
        raise
    return ReceivedFile(
        dest,
        safe_filename(sink.filename, default=default_recording_name(dest)),
        sink.digest.hexdigest(),
        sink.size,
        fields,
    )


async def _multipart(
    request: Request, boundary: bytes, sink: _Sink, fields: dict[str, str] | None = None
) -> None:
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[str, bytes] = {}
    in_file = False
    field_bytes = 0
    field_name: str | None = None
    field_data = bytearray()
    fields = {} if fields is None else fields

    def on_part_begin() -> None:
        nonlocal in_file, field_bytes, field_name
        headers.clear()
        in_file, field_bytes, field_name = False, 0, None
        field_data.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[header_field.decode("latin-1").lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal in_file, field_name
        _, disp = parse_options_header(headers.get("content-disposition"))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name == "file" or (b"filename" in disp and name in ("", "file")):
            raw = disp.get(b"filename")
            sink.open(raw.decode("utf-8", "replace") if raw else None)
            in_file = True
        elif b"filename" not in disp and name:
            field_name = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal field_bytes
        if in_file:
            sink.write(data[start:end])
        else:
            field_bytes += end - start
            if field_bytes > FIELD_LIMIT:
                raise UploadError(f"form field larger than {FIELD_LIMIT} bytes")
            if field_name is not None:
                field_data.extend(data[start:end])

    def on_part_end() -> None:
        nonlocal in_file
        if in_file:
            sink.close()
            in_file = False
        elif field_name is not None:
            if field_name in fields or len(fields) >= MAX_FIELDS:
                raise UploadError(
                    f"form field {field_name!r} given twice, or more than {MAX_FIELDS} fields"
                )
            fields[field_name] = field_data.decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    async for chunk in request.stream():
        try:
            parser.write(chunk)
        except UploadError:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise UploadError(f"malformed multipart upload: {exc}") from exc
    parser.finalize()
