"""Each job in a process of its own, so that a cancel always ends it (issue 13).

A Celery worker runs one job at a time (solo pool). With ``settings.job_process = "child"``
(the default) :func:`run_job_in_child` forks a child process for the job, which runs
:func:`calseg.service.jobs.run_job`, while the worker process watches it:

* **Cancel.** The child stops by itself at its next cancellation point
  (:func:`calseg.progress.check_cancelled`, polled every ``settings.cancel_check_interval_s``).
  The worker polls the job's row at the same rate; when the job was cancelled (or deleted, or
  re-queued under another dispatch) and the child is still alive ``settings.cancel_grace_s``
  later, e.g. inside one long library call that cannot check (a Gaussian filter with a huge
  sigma), the worker kills the child's process group with SIGKILL and notes it in the job's log.
  The worker is free for the next job within ``cancel_check_interval_s + cancel_grace_s`` (plus
  the kill) of the cancel.
* **Memory and time limits.** Admission prices a job before it runs (:mod:`calseg.service.costs`);
  while it runs, the worker reads the resident memory of the job's process group
  (:func:`group_rss_bytes`) at every poll and kills the group past its owner's
  ``max_job_memory_bytes``, or after :data:`TIME_LIMIT_SLACK` times its run-time limit
  (:data:`ESTIMATE_TIME_FACTOR` times its own estimate, at least :data:`MIN_RUN_TIME_S`, at
  most ``max_job_time_s``); the job fails with the reason (a 1.4 kB HDF5 once took a job to
  21 GiB before the kernel killed it).
* **Crash or OOM kill of the job.** The child dying by a signal (SIGKILL is what the kernel's
  out-of-memory killer sends) fails that job with the signal, its run time and peak memory;
  the worker lives on and takes the next job.
* **Worker killed.** The child gets SIGKILL with its worker (``PR_SET_PDEATHSIG``), so no job
  runs on unwatched; the job is re-queued as for any lost worker
  (:mod:`calseg.service.reconcile`).

Why a child per job and not a watchdog that kills the whole worker: measured in
``python -m calseg.bench service-cancel`` (BENCHMARKS.md): a fork costs milliseconds, while a
replaced Celery worker needs seconds to start and re-import, loses the broker connection and
makes the supervisor re-deliver. The worker never imports torch itself (runners import it
lazily, in the child), so forking is safe (DESIGN.md section 6: Celery's prefork pool hangs
when the parent ran torch before forking); a child initialises CUDA afresh, and gives all its
memory back to the system when it ends. Before the first SAM2 job the worker imports torch
(:func:`preload_for`: the import only, no operation), so each job's process need not import
it again. The worker forks from its only thread (a Celery solo
worker runs one): a fork while another thread is inside a C library's lock (SQLite's
allocator, OpenMP) would copy the locked mutex into the child, so a warning is logged when
other threads exist.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select as sql_select
from sqlalchemy import update

from calseg.service.models import Job, utcnow
from calseg.service.settings import Settings, get_settings

if TYPE_CHECKING:  # pragma: no cover
    from calseg.segment.embeddings import PruneResult

log = logging.getLogger("calseg.service.jobproc")

last_child: dict[str, Any] = {}
"""How the last job process of :func:`run_job_in_child` ended: ``pid``, ``wall_s``,
``peak_mib`` (its ``ru_maxrss``), ``killed`` (by the watchdog), ``over_limit`` (why, when it
was killed past its owner's memory or time limit), ``signal`` (or None)."""

PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal a process gets when its parent thread ends (linux/prctl.h)."""


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (loaded once; load it before forking a child that calls
    :func:`die_with_parent`)."""
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) ends.

    Used in children of the worker and of the embedded supervisor (a ``preexec_fn``), so that
    nothing keeps running after a SIGKILL of its parent. The setting survives ``execve``.

    Returns:
        False where ``prctl`` is not available (not Linux): nothing was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    if libc().prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    return True


def _row(url: str, job_id: str) -> tuple[str, str | None, str] | None:
    """(state, dispatch id, kind) of the job, or None."""
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        row = session.execute(
            sql_select(Job.state, Job.dispatch_id, Job.kind).where(Job.id == job_id)
        ).first()
    return None if row is None else (row.state, row.dispatch_id, row.kind)


ESTIMATE_TIME_FACTOR = 10.0
"""A job may run this many times its own time estimate (then :data:`TIME_LIMIT_SLACK`), at
least :data:`MIN_RUN_TIME_S` and at most its owner's ``max_job_time_s``. Admission checks the
estimate against ``max_job_time_s``, but a job whose parameters the estimate under-counts ran
far longer (a new user's attack: an infer job estimated at 40 s ran 549 s; a fine-tune of
3000 steps estimated at 15 s ran 752 s, and 10^6 such steps, estimated at 483 s, would have
held the one worker for 35-70 h, killed only at 2 x 48 h)."""
MIN_RUN_TIME_S = 600.0
"""The shortest run-time limit from an estimate (s): small jobs' estimates are the least exact."""


@dataclass
class RunLimits:
    """What a job's process may use (:func:`_run_limits`): ``memory_bytes`` (resident, of its
    process group), ``seconds`` (its run-time limit, :data:`TIME_LIMIT_SLACK` applies) and
    ``what`` (where the seconds come from), ``disk_bytes`` (its folder in the artifact store,
    ``folder``; None: not watched)."""

    memory_bytes: int
    seconds: float
    what: str
    disk_bytes: int | None = None
    folder: Path | None = None
    next_disk_check: float = 0.0


DISK_CHECK_S = 5.0
"""Seconds between two measurements of a running job's folder (:func:`folder_bytes`)."""


def _run_limits(url: str, settings: Settings, job_id: str) -> RunLimits | None:
    """What the job's process may use (:class:`RunLimits`): its owner's memory limit
    (:func:`calseg.service.costs.effective_limits`, ``max_job_memory_bytes``),
    :data:`ESTIMATE_TIME_FACTOR` times the job's own time estimate
    (:func:`calseg.service.costs.estimate`), at least :data:`MIN_RUN_TIME_S`, at most the
    owner's ``max_job_time_s`` (that alone when the estimate cannot be made), and the bytes its
    folder may hold (:meth:`calseg.service.costs.RunningLimits.disk_bytes`: the least of
    ``max_job_disk_bytes``, the owner's storage quota left and the free disk, other jobs'
    reserve counted). None when the job or the database cannot be read (no limit then)."""
    from calseg.service.costs import estimate, running_job_limits
    from calseg.service.db import session_scope
    from calseg.service.schemas import validate_params
    from calseg.service.store import get_store

    try:
        with session_scope(url) as session:
            job = session.get(Job, job_id)
            if job is None:
                return None
            running = running_job_limits(session, job, settings)
            limits = running.limits
            cap = float(limits.max_job_time_s)
            seconds, what = cap, f"its time limit of {cap:g} s (max_job_time_s)"
            try:
                est = estimate(session, job.kind, validate_params(job.kind, job.params), settings)
                own = max(ESTIMATE_TIME_FACTOR * float(est.time_s), MIN_RUN_TIME_S)
                if own < cap:
                    seconds = own
                    what = (
                        f"its run-time limit of {own:g} s ({ESTIMATE_TIME_FACTOR:g} x its "
                        f"estimate of {float(est.time_s):.4g} s, at least {MIN_RUN_TIME_S:g} s)"
                    )
            except Exception as exc:  # noqa: BLE001 - no estimate: the owner's limit alone
                log.warning("job %s: no time estimate for its run-time limit: %s", job_id, exc)
            disk = running.disk_bytes(settings)
        try:
            folder = get_store(settings.artifact_dir).workdir(f"jobs/{job_id}")
        except Exception as exc:  # noqa: BLE001 - its folder unknown: the disk is not watched
            log.warning("job %s: its folder is not watched: %s", job_id, exc)
            folder = None
    except Exception as exc:  # noqa: BLE001 - the job still runs, without the run-time limits
        log.warning("job %s: cannot read its limits: %s", job_id, exc)
        return None
    return RunLimits(int(limits.max_job_memory_bytes), seconds, what, disk, folder)


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symbolic links not followed; 0 where it
    cannot be read)."""
    total, stack = 0, [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of the processes in process group ``pgid`` (the job's process and what
    it started), in bytes: field 24 (rss, pages) of ``/proc/PID/stat`` summed over the
    processes whose field 5 (pgrp) is ``pgid`` (proc(5)). Shared pages count in each process
    that maps them, as in ``ru_maxrss``. 0 where /proc cannot be read."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 21 and int(fields[2]) == pgid:  # fields[0] is field 3 (state)
            total += int(fields[21]) * page
    return total


def preload_for(kind: str) -> None:
    """Import torch in the worker before forking the first job that uses SAM2 (the ``gpu``
    queue's kinds), so that each such job's process inherits it instead of importing it anew
    (seconds per job, ``python -m calseg.bench jobs``). Only the import: no tensor operation,
    no CUDA, so forking stays safe (DESIGN.md section 6)."""
    from calseg.service.kinds import KINDS

    spec = KINDS.get(kind)
    if spec is not None and spec.queue == "gpu" and "torch" not in sys.modules:
        t0 = time.monotonic()
        import torch  # noqa: F401

        log.info("worker: torch imported for the jobs' processes in %.1f s", time.monotonic() - t0)


def _stop_reason(url: str, job_id: str, dispatch_id: str | None) -> str | None:
    """Why the child must stop, or None (database errors: None, the next poll tries again)."""
    try:
        row = _row(url, job_id)
    except Exception as exc:  # noqa: BLE001 - e.g. the database restarts: keep watching
        log.warning("job %s: watchdog cannot read the job: %s", job_id, exc)
        return None
    if row is None:
        return "the job was deleted"
    state, current, _kind = row
    if state == "cancelled":
        return "the job was cancelled"
    if dispatch_id is not None and current != dispatch_id:
        return f"the job was dispatched again (now {state})"
    return None


def _note(url: str, settings: Settings, job_id: str, line: str, **values: Any) -> None:
    """Append ``line`` to the job's log (file, artifact and ``log_tail``); with ``values``,
    also set them on the job while it is still running (a conditional UPDATE)."""
    from calseg.service.context import LOG_CHARS
    from calseg.service.db import session_scope
    from calseg.service.jobs import _register_log
    from calseg.service.store import get_store

    stamp = time.strftime("%H:%M:%S", time.gmtime())
    store = get_store(settings.artifact_dir)
    relpath = f"jobs/{job_id}/job.log"
    with session_scope(url) as session:
        if session.get(Job, job_id) is None:  # deleted: no folder made again for its log
            return
    try:
        path = store.workdir(f"jobs/{job_id}") / "job.log"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {line}\n")
    except OSError as exc:
        log.warning("job %s: cannot append to its log: %s", job_id, exc)
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        tail = ((job.log_tail or "") + f"\n{stamp} {line}").lstrip("\n")[-LOG_CHARS:]
        guard = [Job.id == job_id]
        if values:
            guard += [Job.state == "running", Job.dispatch_id == job.dispatch_id]
        session.execute(
            update(Job).where(*guard).values(log_tail=tail, updated_at=utcnow(), **values)
        )
    _register_log(url, store, job_id, relpath)


def _child(
    job_id: str, dispatch_id: str | None, settings: Settings, worker_id: str, parent: int, w: int
) -> None:
    """The job's process: run the job, write its end state to ``w``, exit (never returns)."""
    code = 70
    try:
        os.setpgid(0, 0)  # its own group: a kill takes whatever the job started with it
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before prctl took effect
            os._exit(75)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)  # Celery's handlers belong to the worker
        from calseg.service.db import get_engine

        # SQLAlchemy's recipe after a fork: a new pool, the parent's connections untouched
        get_engine(settings.database_url).dispose(close=False)
        from calseg.service.broker import enqueue_celery
        from calseg.service.jobs import run_job

        app = None

        def enqueue(job: Job, countdown: float | None = None) -> None:
            nonlocal app  # a Celery app of its own: no broker connection of the worker's
            if app is None:
                from calseg.service.broker import make_celery

                app = make_celery(settings)
            enqueue_celery(job, countdown, app=app)

        state = run_job(
            job_id,
            dispatch_id,
            settings=settings,
            enqueue=enqueue,
            worker_id=worker_id,
            process_wide_cancel=True,
            turn_taken=True,
        )
        os.write(w, state.encode()[:64])
        code = 0
    except BaseException:  # noqa: BLE001 - report, then leave with a code the worker reads
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - nothing left to report to
                pass
        os._exit(code)


TIME_LIMIT_SLACK = 2.0
"""A running job is killed after this many times its owner's ``max_job_time_s``: admission
compares estimates made on an idle reference machine, and the same jobs ran 2-10x longer at
load 7-10 (:data:`calseg.service.costs.CONSTANTS`), so the limit itself would kill admitted
jobs on a busy server. Memory has no slack: it is what runs out."""


def _over_limit(pid: int, limits: RunLimits | None, ran_s: float) -> str | None:
    """Why the job's process group must stop now (its owner's memory limit, the bytes its
    folder may hold, measured every :data:`DISK_CHECK_S`, or :data:`TIME_LIMIT_SLACK` times its
    run-time limit, passed; :func:`_run_limits`), or None."""
    if limits is None:
        return None
    mib = 2**20
    if ran_s > TIME_LIMIT_SLACK * limits.seconds:
        return f"the job ran {ran_s:.0f} s, more than {TIME_LIMIT_SLACK:g} x {limits.what}"
    rss = group_rss_bytes(pid)
    if rss > limits.memory_bytes:
        return (
            f"the job used {rss / mib:.0f} MiB of memory, more than its limit of "
            f"{limits.memory_bytes / mib:.0f} MiB (max_job_memory_bytes; its estimate was "
            "within it): the recording or the parameters cost more than CalSeg's estimate"
        )
    if limits.disk_bytes is not None and limits.folder is not None:
        if ran_s >= limits.next_disk_check:
            limits.next_disk_check = ran_s + DISK_CHECK_S
            written = folder_bytes(limits.folder)
            if written > limits.disk_bytes:
                return (
                    f"the job wrote {written / mib:.1f} MiB, more than the "
                    f"{limits.disk_bytes / mib:.1f} MiB it may (the least of its owner's "
                    "max_job_disk_bytes, what is left of their storage quota and the free "
                    "disk; its estimate was within it): the recording or the parameters cost "
                    "more than CalSeg's estimate"
                )
    return None


def prune_embedding_cache(settings: Settings | None = None) -> PruneResult | None:
    """Keep the jobs' embedding cache (``settings.embedding_cache_dir``) under
    ``settings.max_cache_bytes`` (:meth:`calseg.segment.embeddings.EmbeddingCache.prune`); the
    worker calls it after each job. Never raises: a failure is logged and gives None (the
    worker must live on; the next job prunes again)."""
    from calseg.segment.embeddings import EmbeddingCache

    settings = settings or get_settings()
    try:
        return EmbeddingCache(settings.embedding_cache_dir).prune(settings.max_cache_bytes)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not prune the embedding cache %s: %s", settings.cache_dir, exc)
        return None


def run_job_in_child(
    job_id: str, dispatch_id: str | None = None, *, settings: Settings | None = None
) -> str:
    """Run a job in a forked child process, watching for its cancel (see the module doc).

    Args:
        job_id: the job.
        dispatch_id: the dispatch of the message (None: the job's current one).
        settings: the configuration (default :func:`get_settings`); ``job_process="inline"``
            runs :func:`calseg.service.jobs.run_job` in this process instead.

    Returns:
        The job's state afterwards, as :func:`calseg.service.jobs.run_job`.
    """
    from calseg.service.db import get_engine
    from calseg.service.jobs import _state, run_job, worker_name

    settings = settings or get_settings()
    if settings.job_process == "inline" or not hasattr(os, "fork"):
        return run_job(job_id, dispatch_id, settings=settings)
    url = settings.database_url
    row = _row(url, job_id)
    if row is not None:
        dispatch_id = dispatch_id or row[1]
    if dispatch_id is not None:
        # the message is a turn (calseg.service.fairness): take it here, so that what is
        # watched (cancel, limits) is the job the child runs. Taken in the child, it ran
        # another user's job while this process watched the message's job, which now held
        # another token: "dispatched again", and the job was killed cancel_grace_s after it
        # started.
        from calseg.service.fairness import WAIT, take_turn
        from calseg.service.jobs import wait_turn

        turn = take_turn(url, job_id, dispatch_id, settings)
        if turn == WAIT:
            return wait_turn(url, dispatch_id, None)
        if turn != job_id:
            job_id, row = turn, _row(url, turn)
    if row is not None:
        preload_for(row[2])
    limits = _run_limits(url, settings, job_id)
    # no pooled database connection may be shared by two processes
    get_engine(url).dispose()
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:  # a thread inside a C library (SQLite, OpenMP) at the fork deadlocks the child
        log.warning("job %s: forking while other threads run (%s)", job_id, ", ".join(others))
    parent, worker_id = os.getpid(), worker_name()
    r, w = os.pipe()
    t0 = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(r)
        _child(job_id, dispatch_id, settings, worker_id, parent, w)
    os.close(w)
    poll_s = settings.cancel_check_interval_s
    out = b""
    stop_since: float | None = None
    killed_after: float | None = None
    over_limit: str | None = None
    reason: str | None = None
    status = 0
    rusage = None
    try:
        while True:
            ready, _, _ = select.select([r], [], [], poll_s)
            if ready:
                out += os.read(r, 64)
            done, status, rusage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if killed_after is not None or over_limit is not None:
                continue
            now = time.monotonic()
            over_limit = _over_limit(pid, limits, now - t0)
            if over_limit is not None:  # admission priced the job; this is what it does
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                log.warning("job %s: %s; killed", job_id, over_limit)
                continue
            reason = _stop_reason(url, job_id, dispatch_id)
            if reason is None:
                stop_since = None
                continue
            if stop_since is None:
                stop_since = now
                log.info("job %s: %s; its process %d has %.0f s to stop", job_id, reason,
                         pid, settings.cancel_grace_s)  # fmt: skip
            if now - stop_since >= settings.cancel_grace_s:
                killed_after = now - stop_since
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                log.warning("job %s: %s but its process %d ran on %.1f s; killed", job_id,
                            reason, pid, killed_after)  # fmt: skip
    finally:
        os.set_blocking(r, False)  # a grandchild may still hold the write end open
        try:
            while chunk := os.read(r, 64):
                out += chunk
        except OSError:
            pass
        os.close(r)
    try:  # whatever the job left behind in its group (e.g. a grandchild) goes too
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    wall = time.monotonic() - t0
    peak_mib = (rusage.ru_maxrss / 1024) if rusage is not None else float("nan")
    try:
        if over_limit is not None:
            why = f"{over_limit}: the worker killed its process {pid} after {wall:.0f} s"
            _note(url, settings, job_id, why, state="failed", error=why, finished_at=utcnow(),
                  eta_s=None)  # fmt: skip
        elif killed_after is not None:
            _note(url, settings, job_id,
                  f"{reason} but did not stop within {settings.cancel_grace_s:g} s: "
                  f"the worker killed its process {pid} (ran {wall:.1f} s)")  # fmt: skip
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status))
            why = (
                f"the job's process {pid} was killed by {sig.name} after {wall:.0f} s "
                f"(peak memory {peak_mib:.0f} MiB)"
            )
            if sig == signal.SIGKILL:
                why += (
                    "; SIGKILL is what the kernel's out-of-memory killer sends: retry with a "
                    "smaller job or on a machine with more memory"
                )
            _note(url, settings, job_id, why, state="failed", error=why, finished_at=utcnow(),
                  eta_s=None)  # fmt: skip
        elif os.WEXITSTATUS(status) != 0:
            why = f"the job's process {pid} exited with code {os.WEXITSTATUS(status)}"
            _note(url, settings, job_id, why, state="failed", error=why, finished_at=utcnow(),
                  eta_s=None)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the worker must live on; the reconciler follows
        log.warning("job %s: could not record how its process ended: %s", job_id, exc)
    if killed_after is not None or over_limit is not None or status != 0:
        # its run_job never reached its end: the files it left count for its owner's quota
        from calseg.service.jobs import record_stored_bytes
        from calseg.service.store import get_store

        try:
            store = get_store(settings.artifact_dir)
            record_stored_bytes(url, store, job_id, f"jobs/{job_id}")
        except Exception as exc:  # noqa: BLE001 - the worker must live on
            log.warning("job %s: could not measure the files it left: %s", job_id, exc)
    last_child.clear()
    last_child.update(
        pid=pid,
        wall_s=wall,
        peak_mib=peak_mib,
        killed=killed_after is not None or over_limit is not None,
        over_limit=over_limit,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
    )
    state = out.decode(errors="replace").strip()
    if not state or killed_after is not None or over_limit or os.WIFSIGNALED(status):
        try:
            state = _state(url, job_id)
        except Exception:  # noqa: BLE001
            state = state or "unknown"
    log.info("job %s: process %d ended (%s) after %.1f s, peak %.0f MiB", job_id, pid, state,
             wall, peak_mib)  # fmt: skip
    return state
