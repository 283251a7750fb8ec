"""Staging folders: where API requests keep files before they become stored objects, and the
sweep that removes what a request left there when its process died.

An upload streams to ``recordings/.incoming/<uuid>.part`` and is probed alone in
``recordings/.incoming/<uuid>/<name>`` before it moves to ``recordings/<id>/``
(:func:`api.routes.recordings.upload_recording`). A request removes its files when it ends,
whatever its outcome, but not when its process is killed (SIGKILL, the OOM killer): an 84 MB
``.part`` of a 300 MB upload stayed after the API was restarted, in no user's storage quota
(a security test of a clean clone). Nothing else stages files in the store: previews and
viewer frames are drawn in memory, job outputs are written by workers into their job's folder
(which goes with the job), the embedding cache removes its own stale temporary files
(:meth:`calseg.segment.embeddings.EmbeddingCache.prune`).

:func:`sweep_staging` removes each entry (file or folder) directly in a staging folder whose
newest modification time, its own or, for a folder, that of anything in it, is older than
``settings.staging_grace_s`` (1 h). It runs when the API starts and at every reconciler pass
(:func:`calseg.service.reconcile.reconciler_lifespan`, every ``reconcile_interval_s``): the
service's one periodic task. Several API processes may share the folders, so an entry in use
must look fresh to every one of them: a request marks what it stages with :func:`hold`, and
each sweep first touches (``os.utime``) the entries its own process holds. An upload in flight
is therefore never older than a sweep interval, however slowly or rarely its client sends:
its writes alone would not do, since a client may pause for longer than the grace (nothing
times out a request body), and a body sent at a byte a second reaches the file only when its
write buffer (the file system's block, 4 KiB here) is full: every 68 minutes.

The same passes remove recording folders that no recording row names
(:func:`sweep_unregistered_recordings`): an upload stores its file in ``recordings/<id>/``
and then commits its row; a failed commit removes the file, but a process killed between the
two cannot.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from calseg.service.settings import Settings

log = logging.getLogger("calseg.service.staging")

STAGING_PREFIXES = ("recordings/.incoming",)
"""Store folders (keys) where API requests stage files: uploads and their probes."""

_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def _key(path: Path) -> Path:
    """``path`` with its folder resolved (the entry itself not followed), so that the same
    entry reached through a symbolic link or a relative folder is the same key."""
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


@contextmanager
def hold(*paths: Path) -> Iterator[None]:
    """Mark staging entries (they need not exist yet) as in use by this process while the
    block runs: this process's sweeps skip them and touch them, so that no other process's
    sweep finds them old."""
    keys = [_key(p) for p in paths]
    with _held_lock:
        for k in keys:
            _held[k] = _held.get(k, 0) + 1
    try:
        yield
    finally:
        with _held_lock:
            for k in keys:
                left = _held.get(k, 1) - 1
                if left > 0:
                    _held[k] = left
                else:
                    _held.pop(k, None)


def held() -> set[Path]:
    """The staging entries this process holds now (:func:`hold`)."""
    with _held_lock:
        return set(_held)


def touch_held(now: float | None = None) -> int:
    """Set the modification time of every entry this process holds (that exists) to ``now``
    (default: the current time); returns how many were touched."""
    n = 0
    for path in held():
        try:
            os.utime(path, None if now is None else (now, now), follow_symlinks=False)
            n += 1
        except OSError:  # not created yet, or already gone
            continue
    return n


def staging_folders(settings: Settings) -> list[Path]:
    """The local staging folders of the configured store (:data:`STAGING_PREFIXES` under
    :func:`calseg.service.store.local_root`)."""
    from calseg.service.store import local_root

    root = local_root(settings)
    return [root / prefix for prefix in STAGING_PREFIXES]


def _newest(entry: Path) -> tuple[float, int]:
    """(newest modification time, bytes) of ``entry`` and, for a real folder, everything in
    it; symbolic links are not followed.

    Raises:
        FileNotFoundError: ``entry`` vanished.
    """
    st = entry.lstat()
    newest, size = st.st_mtime, st.st_size if stat.S_ISREG(st.st_mode) else 0
    if stat.S_ISDIR(st.st_mode):
        for folder, dirs, files in os.walk(entry, followlinks=False):
            for name in (*dirs, *files):
                try:
                    s = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                newest = max(newest, s.st_mtime)
                size += s.st_size if stat.S_ISREG(s.st_mode) else 0
    return newest, size


def _remove(entry: Path) -> None:
    if stat.S_ISDIR(entry.lstat().st_mode):
        shutil.rmtree(entry)
    else:
        entry.unlink()


def entry_bytes(entry: Path) -> int:
    """Bytes of the regular files of ``entry`` (a file, or a real folder and everything in
    it; symbolic links are not followed); 0 when it vanished meanwhile or cannot be read."""
    try:
        return _newest(entry)[1]
    except OSError:
        return 0


def _try_remove(entry: Path, remove: Callable[[], None], what: str) -> bool:
    """``remove()`` (the removal of ``entry``): True when done; False when ``entry`` vanished
    meanwhile, or could not be removed (logged, naming it as ``what``)."""
    try:
        remove()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not remove the %s %s: %s", what, entry, exc)
        return False
    return True


@dataclass(frozen=True)
class Removed:
    """An entry :func:`sweep_staging` removed."""

    path: Path
    size_bytes: int
    """Bytes of its regular files."""
    idle_s: float
    """Seconds since its newest modification."""


def sweep_staging(
    folders: Iterable[Path], grace_s: float, now: float | None = None
) -> list[Removed]:
    """Remove the entries of ``folders`` that no request uses any more: those whose newest
    modification time (:func:`_newest`) is more than ``grace_s`` seconds before ``now``
    (default: the current time), except the ones this process holds (:func:`hold`), which are
    touched first (:func:`touch_held`). Each removal is logged (warning). An entry that
    vanishes meanwhile (its request ended, another process swept it) is skipped, one that
    cannot be removed is logged and left; a missing folder is no error."""
    touch_held()
    now = time.time() if now is None else now
    mine = held()
    removed: list[Removed] = []
    for folder in folders:
        try:
            entries = sorted(Path(folder).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if _key(entry) in mine:
                continue
            try:
                newest, size = _newest(entry)
            except FileNotFoundError:
                continue
            idle = now - newest
            if idle <= grace_s:
                continue
            if not _try_remove(entry, lambda e=entry: _remove(e), "stale staging entry"):
                continue
            removed.append(Removed(entry, size, idle))
            log.warning(
                "removed %s from the staging folder %s: %s bytes untouched for %.0f s (more "
                "than staging_grace_s = %g s), left by a request whose process ended",
                entry.name,
                folder,
                f"{size:,}",
                idle,
                grace_s,
            )
    return removed


def _is_uuid(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def sweep_unregistered_recordings(
    settings: Settings, grace_s: float | None = None, now: float | None = None
) -> list[Removed]:
    """Remove recording folders that no recording row names: ``recordings/<id>/`` (``id`` a
    UUID, as an upload names it) of the configured store's local folder whose newest
    modification is more than ``grace_s`` (default ``settings.staging_grace_s``) before ``now``
    and whose ``id`` is not in the ``recordings`` table.

    An upload stores its file in ``recordings/<id>/`` and then commits the row
    (:func:`api.routes.recordings._register_recording`); an api process killed between the
    two left the folder for good, in no user's storage quota, and no request could reach it.
    A folder of a registered recording is never removed however old it is, nor anything else
    in ``recordings/`` (dot-folders such as the staging folder, names that are not UUIDs). On a
    remote store (``settings.store_url``) the removal goes through the store (both copies);
    only folders present in its local mirror are seen. Each removal is logged (warning).
    Raises what the database raises (the caller logs it)."""
    from sqlalchemy import select

    from calseg.service.db import session_scope
    from calseg.service.models import Recording
    from calseg.service.store import get_store, local_root

    grace_s = settings.staging_grace_s if grace_s is None else grace_s
    now = time.time() if now is None else now
    folder = local_root(settings) / "recordings"
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    idle: dict[str, tuple[Path, float, int]] = {}
    for entry in entries:
        if not _is_uuid(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            newest, size = _newest(entry)
        except FileNotFoundError:
            continue
        if now - newest > grace_s:
            idle[entry.name] = (entry, now - newest, size)
    if not idle:
        return []
    names, known = list(idle), set()
    with session_scope(settings.database_url) as session:
        for i in range(0, len(names), 500):  # within any database's bound on parameters
            batch = names[i : i + 500]
            known.update(session.scalars(select(Recording.id).where(Recording.id.in_(batch))))
    store = get_store() if settings.store_url else None
    removed: list[Removed] = []
    for rec_id, (entry, idle_s, size) in idle.items():
        if rec_id in known:
            continue
        remove = (
            (lambda r=rec_id: store.delete(f"recordings/{r}"))
            if store is not None
            else (lambda e=entry: _remove(e))
        )
        if not _try_remove(entry, remove, "unregistered recording folder"):
            continue
        removed.append(Removed(entry, size, idle_s))
        log.warning(
            "removed the recording folder %s: %s bytes untouched for %.0f s that no recording "
            "names (an upload whose process ended between storing its file and registering it)",
            entry,
            f"{size:,}",
            idle_s,
        )
    return removed


def sweep(settings: Settings) -> list[Removed]:
    """:func:`sweep_staging` on the configured store's :func:`staging_folders` with
    ``settings.staging_grace_s``, then :func:`sweep_unregistered_recordings` (a database
    failure there is logged: the staging sweep is done either way)."""
    removed = sweep_staging(staging_folders(settings), settings.staging_grace_s)
    try:
        removed += sweep_unregistered_recordings(settings)
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down: next pass
        log.warning(
            "sweep of unregistered recording folders failed: %s: %s", type(exc).__name__, exc
        )
    return removed
