"""Artifact store: where job outputs and uploaded recordings live.

One interface (:class:`ArtifactStore`) with a local-folder implementation
(:class:`LocalArtifactStore`); an fsspec-backed store for several nodes can implement the same
methods later. Keys (``relpath``) are POSIX relative paths such as ``jobs/<id>/labels.tif``.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

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


def get_store(root: Path | None = None) -> ArtifactStore:
    """The configured artifact store (a local folder, ``settings.artifact_dir``)."""
    from calseg.service.settings import get_settings

    return LocalArtifactStore(root or get_settings().artifact_dir)
