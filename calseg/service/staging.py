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
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Iterator
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
            try:
                _remove(entry)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove the stale staging entry %s: %s", entry, exc)
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


def sweep(settings: Settings) -> list[Removed]:
    """:func:`sweep_staging` on the configured store's :func:`staging_folders` with
    ``settings.staging_grace_s``."""
    return sweep_staging(staging_folders(settings), settings.staging_grace_s)
