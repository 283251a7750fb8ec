"""A job's outputs: artifact downloads and the viewer (frames with overlays, cells, traces)."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StoreDep, UserDep, _job, _recording_http_error
from api.frames import (
    TracesTooLarge,
    label_at,
    label_source,
    load_stacks,
    load_traces,
    range_headers,
    render_png,
)
from calseg.service.frame_guard import frame_slot
from calseg.service.models import Artifact, User
from calseg.service.store import ArtifactStore

router = APIRouter()


def _artifact(session: Session, job_id: str, name: str, user: User) -> Artifact:
    _job(session, job_id, user)
    art = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if art is None:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}")
    return art


@router.get("/api/jobs/{job_id}/artifacts/{name:path}", tags=["jobs"])
def download_artifact(
    job_id: str, name: str, session: SessionDep, store: StoreDep, user: UserDep
) -> FileResponse:
    """Download an artifact; its sha256 is in the ``X-Content-SHA256`` header."""
    art = _artifact(session, job_id, name, user)
    path = store.path(art.relpath)
    if not path.is_file():
        raise HTTPException(410, f"artifact {name!r} of job {job_id} is gone from the store")
    return FileResponse(
        path,
        media_type=art.content_type,
        headers={"X-Content-SHA256": art.sha256, "ETag": f'"{art.sha256}"'},
    )


@router.get(
    "/api/jobs/{job_id}/frames/{t}.png",
    tags=["viewer"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def frame_png(
    job_id: str,
    t: int,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: UserDep,
    overlay: Annotated[int, Query(ge=0, le=1, description="1: draw the labels")] = 1,
    gt: Annotated[
        int,
        Query(
            ge=0,
            le=2,
            description="1: add a ground-truth panel beside; 2: ground truth "
            "in place of the predictions (simulated data only)",
        ),
    ] = 0,
    alpha: Annotated[float, Query(ge=0, le=1, description="opacity of the cells' fill")] = 0.45,
    style: Annotated[Literal["both", "fill", "outline"], Query()] = "both",
    colors: Annotated[Literal["instance", "single"], Query()] = "instance",
    lo: Annotated[
        float | None,
        Query(description="intensity drawn black (default: 0.5th percentile of the recording)"),
    ] = None,
    hi: Annotated[
        float | None, Query(description="intensity drawn white (default: 99.8th percentile)")
    ] = None,
) -> Response:
    """Frame ``t`` of an infer job's recording as PNG, labels overlaid (server side).

    Headers ``X-Display-Lo``/``X-Display-Hi`` give the default display range and
    ``X-Data-Min``/``X-Data-Max`` the recording's range (intensity units; recorded by the job,
    or frame ``t``'s for jobs from before they were), ``X-Frames`` the frame count. Only frame
    ``t`` is decoded. 422 when ``lo >= hi`` or the recording is unreadable, 413 when it is over
    the server's decode budget; 429 (Retry-After) while 3 frame requests of the caller are in
    flight, 503 (Retry-After) while the API draws as many frames as it draws at once
    (:mod:`calseg.service.frame_guard`). A frame of more than 4 Mi pixels is drawn from every
    k-th row and column (``X-Preview-Step``: k)."""
    job = _job(session, job_id, user)
    if job.kind != "infer" or job.state != "succeeded":
        raise HTTPException(
            409, f"job {job_id} is a {job.state} {job.kind} job; frames need a succeeded infer job"
        )
    source = (job.result or {}).get("source") or {}
    if not source.get("relpath"):
        raise HTTPException(409, f"job {job_id} records no source recording")
    labels = _artifact(session, job_id, "labels.tif", user)
    gt_rel = source.get("gt_relpath")
    draw = {"overlay": bool(overlay), "gt": gt, "alpha": alpha, "style": style}
    draw.update(colors=colors, lo=lo, hi=hi)
    if gt and not gt_rel:  # it answered the prediction alone, silently (a new-user check)
        raise HTTPException(
            422, f"job {job_id} has no ground truth (gt is for simulated videos); use gt=0"
        )
    result = dict(job.result or {})
    labels_relpath, who = labels.relpath, user.name
    session.close()  # no database connection held while waiting for a frame slot
    with frame_slot(who):  # decoding and drawing: a bounded number at once (frame_guard)
        return _frame_png(job_id, t, store, settings, source, labels_relpath, gt_rel, result, draw)


def _frame_png(
    job_id: str,
    t: int,
    store: ArtifactStore,
    settings: Any,
    source: dict,
    labels_relpath: str,
    gt_rel: str | None,
    result: dict,
    draw: dict[str, Any],
) -> Response:
    """The body of :func:`frame_png` once it holds a frame slot."""
    from calseg.io.recordings import RecordingError

    try:
        stacks = load_stacks(
            store.path(source["relpath"]),
            store.path(labels_relpath),
            store.path(gt_rel) if gt_rel else None,
            simulated=source.get("type") == "dataset",
            read_options=source.get("read_options"),
            limits=settings.read_limits(),
            display_range=result.get("display_range"),
            data_range=result.get("data_range"),
            first=t,
        )
    except FileNotFoundError as exc:
        raise HTTPException(410, f"a file of job {job_id} is gone from the store") from exc
    except RecordingError as exc:
        raise _recording_http_error(exc, f"the recording of job {job_id}") from exc
    n = stacks.n_frames
    if not 0 <= t < n:
        raise HTTPException(404, f"frame {t} out of range: the recording has frames 0..{n - 1}")
    try:
        png = render_png(stacks, t, **draw)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    return Response(png, media_type="image/png", headers=range_headers(stacks))


@router.get("/api/jobs/{job_id}/cells/at", tags=["viewer"])
def cell_at(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    user: UserDep,
    t: Annotated[int, Query(description="frame index (0-based)")],
    x: Annotated[int, Query(description="pixel column (px, 0 = left)")],
    y: Annotated[int, Query(description="pixel row (px, 0 = top)")],
) -> dict[str, int | None]:
    """The cell (label id) at pixel (``x``, ``y``) of frame ``t`` of the job's label stack
    (``labels.tif``): ``{"cell_id": id}``, or ``{"cell_id": null}`` on background.

    422 when ``t``, ``x`` or ``y`` lies outside the stack; 404 for an unknown job or a job
    without ``labels.tif``.
    """
    art = _artifact(session, job_id, "labels.tif", user)
    path, who = store.path(art.relpath), user.name
    session.close()  # no database connection held while waiting for a frame slot
    try:
        labels = label_source(path)
    except FileNotFoundError as exc:
        raise HTTPException(410, f"labels.tif of job {job_id} is gone from the store") from exc
    try:
        with frame_slot(who):  # decodes one label page
            cell = label_at(labels, t, x, y)
    except IndexError as exc:
        raise HTTPException(422, f"pixel out of range: {exc}") from exc
    return {"cell_id": cell or None}


def _nulls(values: Any) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _job_traces(session: Session, store: ArtifactStore, job_id: str, user: User) -> dict:
    """The decoded ``traces.csv`` of a job (:func:`api.frames.load_traces`), parsed under a
    frame slot; 404/410/413/500 (and 429/503 from the slot)."""
    from calseg.io.tables import TableError

    art = _artifact(session, job_id, "traces.csv", user)
    path = store.path(art.relpath)
    session.close()  # its connection back before waiting for a slot
    try:
        with frame_slot(user.name):  # parsing: a bounded number at once (frame_guard)
            return load_traces(path)
    except FileNotFoundError as exc:
        raise HTTPException(410, f"traces.csv of job {job_id} is gone from the store") from exc
    except TracesTooLarge as exc:
        raise HTTPException(413, f"job {job_id}: {exc}") from exc
    except TableError as exc:
        raise HTTPException(500, f"traces.csv of job {job_id} is unreadable: {exc}") from exc


MAX_RASTER_VALUES = 1 << 20
"""Most dF/F values ``GET /api/jobs/{id}/cells?dff=true`` returns (cells x time bins): with
many cells the frames are binned more coarsely than ``max_columns``."""


@router.get("/api/jobs/{job_id}/cells", tags=["viewer"])
def list_cells(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    user: UserDep,
    dff: Annotated[
        bool, Query(description="also every cell's dF/F over time (the raster), binned")
    ] = False,
    max_columns: Annotated[
        int, Query(ge=10, le=5000, description="with dff: at most this many time bins")
    ] = 1000,
) -> dict[str, Any]:
    """The cells of the job's ``traces.csv`` (for choosing one without a mouse):
    ``{"ids": [cell id, ...], "peak_dff": [max dF/F or null, ...]}`` in file order.

    With ``dff=true`` also ``"time_s"`` (the start of each column, s), ``"frames_per_column"``
    and ``"dff"`` (cells x columns; frames binned by their maximum when the recording has more
    than ``max_columns`` frames, or than :data:`MAX_RASTER_VALUES` / cells, so brief events
    stay visible; null where not finite). 413 for a ``traces.csv`` over
    :data:`api.frames.MAX_VIEWER_TRACES_BYTES`."""
    traces = _job_traces(session, store, job_id, user)
    n = len(traces["ids"])
    if not n:  # a job that found no cell: empty lists, not a reshape error (was 500)
        out0: dict[str, Any] = {"ids": [], "peak_dff": []}
        if dff:
            out0.update(time_s=[], frames_per_column=1, dff=[])
        return out0
    matrix = np.asarray(traces["dff"], dtype=np.float64).reshape(n, -1)
    peaks = [float(np.nanmax(row)) if np.isfinite(row).any() else None for row in matrix]
    out: dict[str, Any] = {"ids": [int(i) for i in traces["ids"]], "peak_dff": peaks}
    if dff:
        # the raster's lists (up to MAX_RASTER_VALUES floats) under the user's frame slot too:
        # eight parallel requests built theirs at once outside it, 1.15 GB in the API (an 8th
        # attack run)
        with frame_slot(user.name):
            out.update(_raster(traces, matrix, max_columns))
    return out


def _raster(traces: dict, matrix: np.ndarray, max_columns: int) -> dict[str, Any]:
    """``{"time_s", "frames_per_column", "dff"}`` of :func:`list_cells` from the ``(cells,
    frames)`` float64 dF/F ``matrix``."""
    n = matrix.shape[0]
    t = matrix.shape[1]
    # at most MAX_RASTER_VALUES numbers in all (a JSON list of floats costs ~30 bytes each)
    columns = max(1, min(max_columns, MAX_RASTER_VALUES // n))
    step = max(1, int(np.ceil(t / columns)))
    cols = int(np.ceil(t / step)) if t else 0
    padded = np.full((n, cols * step), np.nan)
    padded[:, :t] = matrix
    with warnings.catch_warnings():  # all-NaN bins stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        binned = np.nanmax(padded.reshape(n, cols, step), axis=2) if cols else padded
    times = np.asarray(traces["time_s"], dtype=np.float64)[::step]
    return {
        "time_s": _nulls(times),
        "frames_per_column": step,
        "dff": [_nulls(row) for row in binned],
    }


@router.get("/api/jobs/{job_id}/cells/{cell_id}/trace", tags=["viewer"])
def cell_trace(
    job_id: str, cell_id: int, session: SessionDep, store: StoreDep, user: UserDep
) -> dict[str, Any]:
    """The trace of one cell from the job's ``traces.csv``: ``{"cell_id", "time_s": [s],
    "F": [...], "F0": [...], "dff": [...]}`` (F, F0 in recording intensity units; dF/F
    dimensionless; NaN as null). 404 for an unknown job, a job without traces.csv, or a cell
    id that is not in it."""
    traces = _job_traces(session, store, job_id, user)
    ids = traces["ids"]
    hit = np.flatnonzero(ids == cell_id)
    if not hit.size:
        raise HTTPException(
            404, f"job {job_id} has no cell {cell_id} in traces.csv ({len(ids)} cells there)"
        )
    i = int(hit[0])
    return {
        "cell_id": cell_id,
        "time_s": _nulls(traces["time_s"]),
        "F": _nulls(traces["F"][i]),
        "F0": _nulls(traces["F0"][i]),
        "dff": _nulls(traces["dff"][i]),
    }
