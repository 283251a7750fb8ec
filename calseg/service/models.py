"""Database models (SQLAlchemy 2, typed ``Mapped[]``): users and their API tokens, jobs, their
artifacts and metrics, and uploaded recordings. The schema is created by the Alembic migrations
``0001_initial``, ``0002_users_tokens`` (owners, tokens, metric steps, provenance) and
``0003_recording_reading`` (how an uploaded recording is read: options and reader info) and
``0004_user_limits`` (per-user job cost limits and quotas), ``0005_kinds_registry`` (kinds
from the registry), ``0006_job_disk_estimate`` (each job's estimated disk, reserved while it
is queued or running) and ``0007_storage_quota`` (per-user storage quotas and the bytes each
job left).

Ownership: jobs and recordings carry ``owner_id``; datasets and models are outputs of simulate
and finetune jobs and artifacts and metrics belong to a job, so they inherit the job's owner.
``owner_id`` is NULL only for rows made before 0002 on a database without users (admins see them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new random identifier (uuid4, 36 characters)."""
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names (stable migrations)."""

    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """A person (or lab tool) using the service; ``is_admin`` users see every owner's data."""

    __tablename__ = "users"
    __table_args__ = tuple(
        CheckConstraint(f"{name} IS NULL OR {name} > 0", name=f"{name}_positive")
        for name in (
            "max_job_memory_bytes",
            "max_job_disk_bytes",
            "max_job_time_s",
            "max_queued_jobs",
            "max_running_jobs",
            "max_storage_bytes",
        )
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # per-user limits set by an admin (migration 0003); NULL: the server's setting of the
    # same name applies (calseg.service.costs.effective_limits)
    max_job_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_job_disk_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_job_time_s: Mapped[float | None] = mapped_column(Float)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """The user's storage quota (migration 0007; NULL: ``max_user_storage_bytes``)."""

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="ApiToken.created_at"
    )


class ApiToken(Base):
    """An API token of a user. Only the sha256 of the token is stored (hex, 64 characters);
    the token itself (``cs_`` + 43 URL-safe characters) is shown once, when it is created."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="tokens")


class Job(Base):
    """One unit of work (simulate, finetune, infer or evaluate) and its lifecycle.

    ``dispatch_id`` changes each time the job is put on the queue; a queue message whose
    dispatch id is not the job's current one is stale and is skipped by the worker.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN {JOB_STATES!r}", name="state"),
        Index("ix_jobs_kind_state", "kind", "state"),
        Index("ix_jobs_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    """A kind of :mod:`calseg.service.kinds` (no CHECK since migration 0005: the registry is the
    one list, checked by :func:`calseg.service.jobs.submit_job`)."""
    state: Mapped[str] = mapped_column(String(16), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    eta_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    code_version: Mapped[str | None] = mapped_column(String(64))
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    estimated_disk_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Bytes the job was estimated to write when it was admitted (migration 0006; NULL for
    jobs admitted before): reserved on the free disk while it is queued or running."""
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Bytes of the job's folder in the artifact store when it ended (migration 0007; NULL
    while it runs and for jobs that ended before): what it counts against its owner's storage
    quota (:func:`calseg.service.costs.storage_used_bytes`)."""
    dispatch_id: Mapped[str | None] = mapped_column(String(36))
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Artifact.name"
    )
    metrics: Mapped[list[Metric]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Metric.id"
    )
    owner: Mapped[User | None] = relationship()

    @property
    def owner_name(self) -> str | None:
        """The owner's user name (None for a job made before users existed)."""
        return self.owner.name if self.owner is not None else None


class Artifact(Base):
    """A file a job produced, stored in the artifact store at ``relpath``."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(1024))
    content_type: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")

    @classmethod
    def of_stored(
        cls, job_id: str, name: str, kind: str, obj: Any, content_type: str | None = None
    ) -> Artifact:
        """The row of job ``job_id``'s file ``name`` stored as ``obj``
        (:class:`calseg.service.store.StoredObject`: its relpath, sha256, size and content type,
        unless ``content_type`` is given)."""
        return cls(
            job_id=job_id,
            name=name,
            kind=kind,
            relpath=obj.relpath,
            content_type=content_type or obj.content_type,
            sha256=obj.sha256,
            size_bytes=obj.size_bytes,
        )


class Metric(Base):
    """One number a job measured, e.g. ``iou`` of model ``fine-tuned`` on subset ``test``.

    ``value`` is NULL when the measurement was not finite (e.g. no cell to match); ``step`` is
    the optimiser step of a training-curve point (fine-tune jobs), NULL for final numbers.
    """

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(128))
    subset: Mapped[str | None] = mapped_column(String(128))
    step: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="metrics")


class Recording(Base):
    """An uploaded recording (T frames of H x W pixels), stored once per owner and sha256."""

    __tablename__ = "recordings"
    __table_args__ = (UniqueConstraint("owner_id", "sha256", name="uq_recordings_owner_id_sha256"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    filename: Mapped[str] = mapped_column(String(255))
    relpath: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_frames: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    read_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Reading options given at upload (axes, channel, interleaved_channels, z_projection)."""
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the reader made of the file: RecordingInfo.to_dict() (format, axes, warnings...)."""

    owner: Mapped[User | None] = relationship()

    @property
    def warnings(self) -> list[str]:
        """The reader's warnings about the file (empty for rows from before revision 0003)."""
        return list((self.info or {}).get("warnings") or [])

    @property
    def axes(self) -> str | None:
        """The stored data's axes as read (e.g. ``"TYX"``), when known."""
        return (self.info or {}).get("axes")

    @property
    def owner_name(self) -> str | None:
        """The owner's user name (None for a recording made before users existed)."""
        return self.owner.name if self.owner is not None else None
