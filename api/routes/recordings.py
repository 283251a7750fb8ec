"""Uploaded recordings: upload with reading options, list, detail, delete, frames."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from api.deps import (
    MAX_OFFSET,
    SessionDep,
    SettingsDep,
    StoreDep,
    UserDep,
    _recording_http_error,
    log,
)
from api.frames import (
    range_headers,
    recording_frame,
    render_png,
)
from api.uploads import UploadError, over_quota, receive_file
from calseg.fmt import plural
from calseg.service import jobs as lifecycle
from calseg.service import staging
from calseg.service.auth import can_see
from calseg.service.frame_guard import frame_slot
from calseg.service.models import Job, Recording, User
from calseg.service.schemas import (
    RecordingOut,
)
from calseg.service.settings import Settings
from calseg.service.store import ArtifactStore

router = APIRouter()


def _info(info: Any, name: str) -> Any:
    if isinstance(info, dict):
        return info[name]
    return getattr(info, name)


def _recording(session: Session, recording_id: str, user: User) -> Recording:
    """The recording, when ``user`` may see it; otherwise 404 exactly as for a missing one."""
    rec = session.get(Recording, recording_id)
    if rec is None or not can_see(user, rec.owner_id):
        raise HTTPException(404, f"there is no recording {recording_id}")
    return rec


class UploadReadOptions(BaseModel):
    """How an uploaded recording is read (query parameters or form fields of the upload)."""

    model_config = ConfigDict(extra="forbid")

    axes: str | None = Field(
        None,
        pattern=r"^[TZCYXStzcyxs]{2,6}$",
        description="the stored axes, one of T Z C Y X S per dimension (e.g. 'TZCYX')",
    )
    channel: int | None = Field(None, ge=0, le=255, description="channel to read (0-based)")
    interleaved_channels: int | None = Field(
        None, ge=1, le=16, description="images alternate between this many channels"
    )
    z_projection: Literal["max", "mean", "median"] | None = Field(
        None, description="how a Z axis is collapsed when the file also has T"
    )
    dataset: str | None = Field(
        None,
        max_length=256,
        pattern=r"^/?[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$",
        description="HDF5: the dataset to read (e.g. '/raw/green'); None = the first",
    )

    @field_validator("dataset")
    @classmethod
    def _no_relative_names(cls, value: str | None) -> str | None:
        """A name inside the file, not a path: no '.' or '..' part."""
        if value is not None and any(part in (".", "..") for part in value.split("/")):
            raise ValueError("a dataset name has no '.' or '..' part; name it from the root")
        return value


def _upload_read_options(query: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """The reading options of an upload: query parameters and form fields (the same option in
    both must agree). 422 (the API's one shape, ``loc`` ``["query"|"body", name]``) on bad
    values."""
    names = set(UploadReadOptions.model_fields)
    unknown = sorted(set(form) - names)
    if unknown:  # a typo (-F chanel=1) must not read channel 0 without a word
        raise RequestValidationError(
            [{"type": "extra_forbidden", "loc": ["body", name], "input": form[name],
              "msg": f"unknown form field {name!r}; an upload takes the file (field 'file') "
              f"and the reading options {', '.join(sorted(names))}"} for name in unknown]
        )  # fmt: skip
    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    for source, values in (("query", query), ("body", form)):
        for name, value in values.items():
            if name not in names or value is None or value == "":
                continue
            if name in merged and str(merged[name]) != str(value):
                raise RequestValidationError(
                    [{"type": "value_error", "loc": [source, name], "input": value,
                      "msg": f"{name} given twice with different values ({merged[name]!r} in "
                      f"the query, {value!r} in the form)"}]
                )  # fmt: skip
            merged[name], where[name] = value, source
    try:
        opts = UploadReadOptions.model_validate(merged)
    except ValidationError as exc:
        errors = [
            {**e, "loc": [where.get(str(e["loc"][0]), "query"), *e["loc"]]}
            for e in exc.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors) from exc
    return opts.model_dump(exclude_none=True)


def _min_free(settings: Settings) -> int | None:
    """The free disk a streamed upload must leave (None: a remote store, not checked)."""
    return None if settings.store_url else settings.min_free_disk_bytes


def _storage_left(session: Session, owner: User, settings: Settings | None) -> int | None:
    """What ``owner`` may still store (bytes; None: no quota or no settings),
    :func:`calseg.service.costs.storage_left_bytes`."""
    from calseg.service.costs import effective_limits, storage_left_bytes

    if settings is None:
        return None
    return storage_left_bytes(session, owner, effective_limits(owner, settings, session))


def _check_free_disk(request: Request, settings: Settings) -> None:
    """507 before any byte is stored when the upload (its Content-Length; a body without one is
    checked as it streams, :func:`api.uploads.receive_file`) would leave the artifact store
    less than ``settings.min_free_disk_bytes`` free: one user's uploads (up to 4 GiB each, with
    a storage quota of 100 GiB each) could together fill the server's disk (a new-user check)."""
    from calseg.service.costs import GIB, free_disk_bytes

    free = free_disk_bytes(settings)
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else 0  # else: checked as it streams
    if free is not None and free - size < settings.min_free_disk_bytes:
        raise HTTPException(
            507,
            f"the server's disk has {free / GIB:.1f} GiB free, and this upload of up to "
            f"{size / GIB:.2f} GiB would leave less than the {settings.min_free_disk_bytes / GIB:g}"
            " GiB it keeps free (min_free_disk_bytes); delete recordings you no longer need, or "
            "ask the server's administrator",
        )


def _register_recording(
    session: Session,
    store: ArtifactStore,
    tmp: Path,
    filename: str,
    sha256: str,
    size: int,
    owner: User,
    read_options: dict[str, Any] | None = None,
    limits: Any = None,
    settings: Settings | None = None,
) -> tuple[Recording, bool]:
    """Probe and store an uploaded file for ``owner``; returns (recording, is_duplicate).

    The probe reads the file's headers with ``read_options`` within the decode budget
    ``limits`` (413 when over it, 422 when unreadable or refused) and decodes its first and
    last frame. It runs on the file alone in a folder of its own, under the user's file name.
    Duplicates are recognised per owner (by sha256): the owner's earlier recording is returned.
    A new file over what is left of the owner's storage quota (``settings``) is 507.
    """
    from calseg.io.recordings import RecordingError, probe_recording

    same = (Recording.sha256 == sha256, Recording.owner_id == owner.id)
    existing = session.scalar(select(Recording).where(*same))
    if existing is not None:
        tmp.unlink(missing_ok=True)
        return existing, True
    # probe under the user's file name (suffix included), so what it says is about their file,
    # alone in a folder: nothing else is there for a reader to find
    alone = tmp.parent / tmp.stem
    alone.mkdir()
    named = alone / filename
    tmp.rename(named)
    try:
        try:
            with frame_slot(owner.name):  # it decodes the first and last frame in the API
                info = probe_recording(named, **(read_options or {}), limits=limits)
        except RecordingError as exc:
            exc.args = (str(exc).replace(str(named), filename),)
            raise _recording_http_error(exc, filename, "is not a usable recording") from exc
        rec_id = str(uuid.uuid4())
        obj = store.put(f"recordings/{rec_id}/{filename}", named, move=True)
    finally:
        named.unlink(missing_ok=True)
        alone.rmdir()
    stored_info = {**info.to_dict(), "path": filename}
    rec = Recording(
        id=rec_id,
        owner_id=owner.id,
        filename=filename,
        relpath=obj.relpath,
        sha256=sha256,
        size_bytes=size,
        n_frames=int(info.n_frames),
        height=int(info.height),
        width=int(info.width),
        dtype=str(info.dtype),
        read_options=read_options or None,
        info=stored_info,
    )
    # the quota again, now the size is known, under the owner's lock (as a job submit takes
    # it) held only to the commit: two uploads streamed side by side each fitted in what was
    # left before either was stored. Whatever fails from here on (over quota, the same file
    # uploaded concurrently, the database gone) removes the stored file: no folder is left
    # that no recording names (one a killed process leaves is swept later,
    # calseg.service.staging.sweep_unregistered_recordings)
    try:
        lifecycle.lock_owner(session, owner)
        left = _storage_left(session, owner, settings)
        if left is not None and size > left:
            raise HTTPException(507, str(over_quota(size, left)))
        session.add(rec)
        session.commit()
    except IntegrityError as exc:  # the same file uploaded concurrently
        session.rollback()
        store.delete(f"recordings/{rec_id}")
        existing = session.scalar(select(Recording).where(*same))
        if existing is None:  # another constraint: e.g. the owner deleted meanwhile
            raise HTTPException(
                409, f"the recording could not be registered ({exc.orig}); nothing was stored"
            ) from exc
        return existing, True
    except BaseException:
        store.delete(f"recordings/{rec_id}")
        with contextlib.suppress(Exception):  # a lost connection may refuse the rollback too
            session.rollback()
        raise
    return rec, False


def _in_flight_bytes(incoming: Path, owner_id: str, own: Path) -> int:
    """Bytes of ``owner_id``'s other uploads in flight in ``incoming``, in any api process:
    their ``<owner>.<uuid>.part`` files and the files of their probe folders
    (``<owner>.<uuid>/``); ``own`` is not counted."""
    return sum(
        staging.entry_bytes(entry) for entry in incoming.glob(f"{owner_id}.*") if entry != own
    )


def _swept(settings: Settings) -> HTTPException:
    """408 for an upload whose partial file another api process's staging sweep removed: it
    was idle past ``staging_grace_s`` while its own process swept nothing to keep it fresh
    (``reconcile_interval_s`` <= 0; :mod:`calseg.service.staging`)."""
    return HTTPException(
        408,
        f"the upload was idle for more than {settings.staging_grace_s:g} s (staging_grace_s) "
        "and its partial file was removed; nothing was stored, send it again",
    )


@router.post(
    "/api/recordings",
    status_code=201,
    response_model=RecordingOut,
    tags=["recordings"],
    responses={
        200: {
            "description": "you uploaded the same file (sha256) before: that recording is "
            "returned with duplicate=true and a message saying so"
        },
        400: {"description": "malformed upload (no file, several files, bad multipart)"},
        408: {
            "description": "the upload was idle for longer than CALSEG_STAGING_GRACE_S and its "
            "partial file was removed by the staging sweep (nothing stored; send it again)"
        },
        413: {
            "description": "larger than CALSEG_MAX_UPLOAD_BYTES, or its header declares more "
            "pixels/bytes than CALSEG_MAX_RECORDING_PIXELS/_BYTES (nothing decoded)"
        },
        415: {"description": "neither multipart/form-data nor application/octet-stream"},
        422: {
            "description": "not a readable recording, or refused because it names other files "
            "or expands beyond its declared size (the reason is given)"
        },
        507: {
            "description": "the upload would leave the server's disk with less than "
            "CALSEG_MIN_FREE_DISK_BYTES free, or does not fit in what is left of your storage "
            "quota (max_storage_bytes; nothing stored)"
        },
    },
)
async def upload_recording(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: UserDep,
    axes: Annotated[
        str | None, Query(description="stored axes, one of T Z C Y X S per dimension")
    ] = None,
    channel: Annotated[int | None, Query(description="channel to read (0-based)")] = None,
    interleaved_channels: Annotated[
        int | None, Query(description="images alternate between this many channels")
    ] = None,
    z_projection: Annotated[
        str | None, Query(description="max | mean | median: how Z is collapsed")
    ] = None,
    dataset: Annotated[
        str | None, Query(description="HDF5: the dataset to read (e.g. /raw/green)")
    ] = None,
) -> RecordingOut:
    """Upload a recording (multipart field ``file``, or a raw body with ``?filename=``).

    Streamed to disk in chunks with its sha256 computed on the way; probed before acceptance
    (headers, the decode budget, the first and last frame). How it is read can be given as
    query parameters or form fields: ``axes``, ``channel``, ``interleaved_channels``,
    ``z_projection``, ``dataset`` (HDF5); jobs on the recording read it the same way unless
    their own parameters say otherwise. The reader's warnings are in the answer
    (``warnings``). The file name is reduced to its last component in ASCII letters, digits
    and ``._-``.
    """
    query = {
        "axes": axes,
        "channel": channel,
        "interleaved_channels": interleaved_channels,
        "z_projection": z_projection,
        "dataset": dataset,
    }
    unknown = sorted(set(request.query_params) - set(query) - {"filename"})
    if unknown:  # ?chanel=1 must not read channel 0 without a word
        raise RequestValidationError(
            [{"type": "extra_forbidden", "loc": ["query", name],
              "input": request.query_params[name],
              "msg": f"unknown query parameter {name!r}; an upload takes filename and the "
              f"reading options {', '.join(sorted(query))}"} for name in unknown]
        )  # fmt: skip
    _check_free_disk(request, settings)
    quota_left = _storage_left(session, user, settings)
    session.commit()  # no transaction held open while the body streams in
    incoming = store.workdir("recordings/.incoming")
    # named by owner: every api process can count the owner's uploads in flight (quota)
    tmp = incoming / f"{user.id}.{uuid.uuid4()}.part"
    # the .part and its probe folder (_register_recording) are this request's while it runs:
    # the staging sweep of a killed process's leftovers keeps them fresh (calseg.service.staging)
    with staging.hold(tmp, tmp.parent / tmp.stem):
        try:
            received = await receive_file(
                request,
                tmp,
                settings.max_upload_bytes,
                min_free=_min_free(settings),
                quota_left=quota_left,
                in_flight=lambda: _in_flight_bytes(incoming, user.id, tmp),
            )
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        except ClientDisconnect:  # the client went away mid-upload: nothing stored, nobody to
            # tell (it was logged as "Exception in ASGI application" with a traceback: a
            # new-user check)
            log.info("upload by %s ended by the client before its end; nothing stored", user.name)
            return Response(status_code=400)
        except FileNotFoundError as exc:
            if tmp.exists():
                raise
            raise _swept(settings) from exc
        if not received.path.exists():
            raise _swept(settings)
        try:
            options = _upload_read_options(query, received.fields)
        except RequestValidationError:
            received.path.unlink(missing_ok=True)
            raise
        rec, duplicate = await run_in_threadpool(
            _register_recording,
            session,
            store,
            received.path,
            received.filename,
            received.sha256,
            received.size_bytes,
            user,
            options,
            settings.read_limits(),
            settings,
        )
    response.status_code = 200 if duplicate else 201
    out = RecordingOut.model_validate(rec).model_copy(update={"duplicate": duplicate})
    if duplicate:
        out.message = (
            f"you uploaded this file (sha256 {rec.sha256[:12]}...) before as "
            f"{rec.filename!r}: recording {rec.id} is returned, nothing new was stored"
        )
        if options != (rec.read_options or {}):
            out.message += (
                f"; it keeps the reading options it was uploaded with ({rec.read_options or {}})"
                ": give yours as parameters of the job, or delete the recording and upload again"
            )
    return out


@router.get("/api/recordings", response_model=list[RecordingOut], tags=["recordings"])
def list_recordings(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[RecordingOut]:
    """The caller's uploaded recordings (an admin: everyone's), newest first."""
    query = select(Recording)
    if not user.is_admin:
        query = query.where(Recording.owner_id == user.id)
    rows = session.scalars(
        query.order_by(Recording.created_at.desc()).limit(limit).offset(offset)
    ).all()
    return [RecordingOut.model_validate(r) for r in rows]


@router.get("/api/recordings/{recording_id}", response_model=RecordingOut, tags=["recordings"])
def get_recording(recording_id: str, session: SessionDep, user: UserDep) -> RecordingOut:
    """Metadata of an uploaded recording: file name, sha256, size, frames, frame size, dtype."""
    return RecordingOut.model_validate(_recording(session, recording_id, user))


@router.delete("/api/recordings/{recording_id}", status_code=204, tags=["recordings"])
def delete_recording(
    recording_id: str, session: SessionDep, store: StoreDep, user: UserDep
) -> Response:
    """Delete an uploaded recording and its file (204).

    409 while a queued or running job uses it (cancel the job or wait for it); finished jobs
    keep their outputs (their viewer frames then answer 410: the recording is gone).
    """
    rec = _recording(session, recording_id, user)
    # the owner's lock, as a submit takes it: a job submitted on this recording at the same
    # moment either is counted below or finds the recording gone (a new-user check got 201
    # and 204 for the two at once, then a job failing on a missing recording)
    lifecycle.lock_owner(session, session.get(User, rec.owner_id))
    busy = [
        j
        for j in session.scalars(
            select(Job).where(Job.state.in_(("queued", "running")))  # infer, simulate (fit)
        )
        if (j.params or {}).get("recording_id") == recording_id
    ]
    if busy:
        # name only the caller's own jobs: another user's job id (an admin's job on this
        # recording) must not leak through this message (issue 13 item 7)
        mine = [j.id for j in busy if j.owner_id == user.id]
        seen = [j.id for j in busy if j.owner_id != user.id and can_see(user, j.owner_id)]
        others = len(busy) - len(mine) - len(seen)
        parts = [
            f"{plural(len(mine), 'job')} of yours ({', '.join(mine[:5])})" if mine else "",
            f"{plural(len(seen), 'job')} of other users ({', '.join(seen[:5])})" if seen else "",
            f"{plural(others, 'job')} of other users" if others else "",
        ]
        raise HTTPException(
            409,
            f"recording {recording_id} is used by queued or running jobs: "
            f"{' and '.join(p for p in parts if p)}; cancel them or wait until they end",
        )
    session.delete(rec)
    session.commit()
    store.delete(f"recordings/{recording_id}")
    return Response(status_code=204)


@router.get(
    "/api/recordings/{recording_id}/frames/{t}.png",
    tags=["recordings"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def recording_frame_png(
    recording_id: str,
    t: int,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: UserDep,
    lo: Annotated[float | None, Query(description="intensity drawn black")] = None,
    hi: Annotated[float | None, Query(description="intensity drawn white")] = None,
) -> Response:
    """Frame ``t`` of an uploaded recording as a gray PNG (a preview): only that frame is
    decoded, read with the recording's reading options; the range headers are that frame's.
    404 for an unknown recording or frame, 422 when lo >= hi or the file is unreadable or
    refused, 413 when it is over the server's decode budget; 429 (Retry-After) while 3 frame
    requests of the caller are in flight, 503 (Retry-After) while the API decodes as many frames
    as it does at once (:mod:`calseg.service.frame_guard`). A frame of more than 4 Mi pixels is
    drawn from every k-th row and column (``X-Preview-Step``: k)."""
    from calseg.io.recordings import RecordingError

    rec = _recording(session, recording_id, user)
    path, options, who = store.path(rec.relpath), rec.read_options, user.name
    session.close()  # no database connection held while waiting for a frame slot
    with frame_slot(who):  # decoding and drawing: a bounded number at once (frame_guard)
        try:
            stacks, frame = recording_frame(path, t, options, settings.read_limits())
        except FileNotFoundError as exc:
            raise HTTPException(410, f"recording {recording_id} is gone from the store") from exc
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except RecordingError as exc:
            raise _recording_http_error(exc, f"recording {recording_id}") from exc
        try:
            png = render_png(stacks, t, overlay=False, lo=lo, hi=hi, frame=frame)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        del frame
    return Response(png, media_type="image/png", headers=range_headers(stacks))
