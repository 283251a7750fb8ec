"""Artifact store: where job outputs and uploaded recordings live.

One interface (:class:`ArtifactStore`) with two implementations: a local folder
(:class:`LocalArtifactStore`, the default) and any fsspec filesystem
(:class:`FsspecArtifactStore`, ``CALSEG_STORE_URL`` such as ``s3://bucket/calseg`` with s3fs
installed, ``memory://calseg`` or ``file:///srv/calseg``) for several nodes that share no disk.
Keys (``relpath``) are POSIX relative paths such as ``jobs/<id>/labels.tif``.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from calseg.service.settings import Settings

CHUNK = 1024 * 1024
"""Bytes read at a time when hashing or copying (1 MiB)."""

_EXTRA_TYPES = {
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".json": "application/json",
    ".npy": "application/octet-stream",
    ".pt": "application/octet-stream",
    ".gif": "image/gif",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
}


PRIVATE_UMASK = 0o077
"""File mode creation mask of the service's processes: recordings, artifacts, caches and logs
are readable and writable by the service's user only (files 0600, folders 0700)."""


def keep_files_private() -> int:
    """Set this process's umask to :data:`PRIVATE_UMASK` (children inherit it); returns the
    previous mask. Called where a service process starts (``python -m api.serve``, the Celery
    worker's app module, ``make serve``'s supervisor and each child it starts): with the usual
    umask 022 every upload and result was readable by every shell account of a shared server,
    though the API shows each user only their own (a lab admin's check)."""
    return os.umask(PRIVATE_UMASK)


class StoreError(ValueError):
    """A bad artifact key (absolute, or leaving the store with ``..``) or a missing object."""


def guess_content_type(name: str) -> str:
    """The MIME type for a file name (``application/octet-stream`` when unknown)."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[suffix]
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size in bytes of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class StoredObject:
    """What the store knows about one object."""

    relpath: str
    sha256: str
    size_bytes: int
    content_type: str


def check_key(relpath: str) -> str:
    """Validate an artifact key: relative, POSIX, no ``..``; returns it normalised."""
    key = PurePosixPath(relpath.replace("\\", "/"))
    if key.is_absolute() or not key.parts or ".." in key.parts:
        raise StoreError(f"invalid artifact key {relpath!r}: must be relative, without '..'")
    return str(key)


class ArtifactStore(ABC):
    """Storage of job artifacts and recordings, addressed by relative keys."""

    @abstractmethod
    def put(self, relpath: str, source: Path, *, move: bool = False) -> StoredObject:
        """Store the file ``source`` under ``relpath`` (copy, or move when ``move``)."""

    @abstractmethod
    def register(self, relpath: str) -> StoredObject:
        """Describe an object already written at ``relpath`` (hash, size, content type)."""

    @abstractmethod
    def open(self, relpath: str, mode: str = "rb") -> BinaryIO:
        """Open an object for reading (``rb``) or writing (``wb``)."""

    @abstractmethod
    def path(self, relpath: str) -> Path:
        """A local filesystem path of the object (remote stores download to a cache)."""

    @abstractmethod
    def exists(self, relpath: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def delete(self, relpath: str) -> None:
        """Delete an object or a folder of objects (no error when absent)."""

    @abstractmethod
    def workdir(self, prefix: str) -> Path:
        """A local folder for writing objects under ``prefix`` (created)."""

    @abstractmethod
    def relpath_of(self, path: Path) -> str | None:
        """The key of a local path inside the store, or None when it lies outside."""

    def sync(self, prefix: str) -> int:
        """Publish every file written under ``workdir(prefix)`` (remote stores upload them;
        a local folder has nothing to do). Returns the number of files uploaded."""
        return 0


class LocalArtifactStore(ArtifactStore):
    """Artifact store over a local folder ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, relpath: str) -> Path:
        return self.root / check_key(relpath)

    def relpath_of(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    def register(self, relpath: str) -> StoredObject:
        target = self.path(relpath)
        if not target.is_file():
            raise StoreError(f"artifact {relpath!r} does not exist in {self.root}")
        digest, size = sha256_file(target)
        return StoredObject(check_key(relpath), digest, size, guess_content_type(target.name))

    def put(self, relpath: str, source: Path, *, move: bool = False) -> StoredObject:
        target = self.path(relpath)
        source = Path(source)
        if source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial")
            if move:
                shutil.move(os.fspath(source), tmp)
            else:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return self.register(relpath)

    def open(self, relpath: str, mode: str = "rb") -> BinaryIO:
        if mode not in ("rb", "wb"):
            raise StoreError(f"unsupported mode {mode!r}; use 'rb' or 'wb'")
        target = self.path(relpath)
        if mode == "wb":
            target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, mode)  # noqa: SIM115 - caller closes

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).exists()

    def delete(self, relpath: str) -> None:
        target = self.path(relpath)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()

    def workdir(self, prefix: str) -> Path:
        target = self.path(prefix)
        target.mkdir(parents=True, exist_ok=True)
        return target


class FsspecArtifactStore(ArtifactStore):
    """Artifact store on an fsspec filesystem (object stores: s3, gcs, azure; memory; file).

    Objects live under ``url``; a local mirror folder ``cache_dir`` holds what this node wrote
    (``workdir``) or read (``path`` downloads on first use). An object's folder travels with it:
    ``path("jobs/<id>/dataset/manifest.json")`` also fetches the rest of ``dataset/``, because
    readers open the files beside a manifest. ``register``/``put``/``sync`` upload.

    Args:
        url: fsspec URL of the store's root, e.g. ``s3://lab-bucket/calseg``.
        cache_dir: local mirror folder (created).
        **storage_options: passed to the filesystem (credentials, endpoint_url, ...).

    Raises:
        ValueError: the URL's protocol is unknown or its package (e.g. s3fs) is missing.
    """

    def __init__(self, url: str, cache_dir: Path, **storage_options: object) -> None:
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"artifact store {url!r}: {exc}") from exc
        self.url = url
        self.root = root.rstrip("/")
        self.mirror = Path(cache_dir).resolve()
        self.mirror.mkdir(parents=True, exist_ok=True)

    def _remote(self, relpath: str) -> str:
        return f"{self.root}/{check_key(relpath)}"

    def _local(self, relpath: str) -> Path:
        return self.mirror / check_key(relpath)

    def relpath_of(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.mirror).as_posix()
        except ValueError:
            return None

    def workdir(self, prefix: str) -> Path:
        target = self._local(prefix)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def _upload(self, local: Path, relpath: str) -> StoredObject:
        digest, size = hashlib.sha256(), 0
        remote = self._remote(relpath)
        parent = remote.rsplit("/", 1)[0]
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        with open(local, "rb") as src, self.fs.open(remote, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return StoredObject(
            check_key(relpath), digest.hexdigest(), size, guess_content_type(local.name)
        )

    def register(self, relpath: str) -> StoredObject:
        local = self._local(relpath)
        if local.is_file():
            return self._upload(local, relpath)
        remote = self._remote(relpath)
        if not self.fs.isfile(remote):
            raise StoreError(f"artifact {relpath!r} does not exist in {self.url}")
        digest, size = hashlib.sha256(), 0
        with self.fs.open(remote, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return StoredObject(
            check_key(relpath), digest.hexdigest(), size, guess_content_type(remote)
        )

    def put(self, relpath: str, source: Path, *, move: bool = False) -> StoredObject:
        source = Path(source)
        local = self._local(relpath)
        if source.resolve() != local.resolve():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.partial")
            if move:
                shutil.move(os.fspath(source), tmp)
            else:
                shutil.copyfile(source, tmp)
            os.replace(tmp, local)
        return self._upload(local, relpath)

    def open(self, relpath: str, mode: str = "rb") -> BinaryIO:
        if mode not in ("rb", "wb"):
            raise StoreError(f"unsupported mode {mode!r}; use 'rb' or 'wb'")
        remote = self._remote(relpath)
        if mode == "wb":
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(remote, mode)

    def path(self, relpath: str) -> Path:
        local = self._local(relpath)
        if local.exists():
            return local
        remote = self._remote(relpath)
        if self.fs.isfile(remote):
            folder = remote.rsplit("/", 1)[0]  # the object's whole folder comes along
            for rpath in self.fs.find(folder):
                rel = rpath[len(self.root) + 1 :] if self.root else rpath
                dest = self._local(rel)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.partial")
                    self.fs.get_file(rpath, os.fspath(tmp))
                    os.replace(tmp, dest)
        return local  # may not exist: callers check, as with a local folder

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self._remote(relpath)) or self._local(relpath).exists()

    def delete(self, relpath: str) -> None:
        remote = self._remote(relpath)
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)
        local = self._local(relpath)
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        elif local.exists():
            local.unlink()

    def sync(self, prefix: str) -> int:
        folder = self._local(prefix)
        n = 0
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file() and not path.name.endswith(".partial"):
                self._upload(path, path.relative_to(self.mirror).as_posix())
                n += 1
        return n


def local_root(settings: Settings) -> Path:
    """The local folder of the configured store, where ``workdir`` folders lie: the mirror
    ``settings.cache_dir/store`` of a remote store (``settings.store_url``), else
    ``settings.artifact_dir``."""
    return settings.cache_dir / "store" if settings.store_url else settings.artifact_dir


def get_store(root: Path | None = None) -> ArtifactStore:
    """The configured artifact store: :class:`FsspecArtifactStore` on ``settings.store_url``
    (mirror in :func:`local_root`) when set, else a local folder (``root``, default
    :func:`local_root`: ``settings.artifact_dir``)."""
    from calseg.service.settings import get_settings

    settings = get_settings()
    if settings.store_url:
        return FsspecArtifactStore(settings.store_url, local_root(settings))
    return LocalArtifactStore(root or local_root(settings))
