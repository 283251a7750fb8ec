"""Service settings, read from the environment (prefix ``CALSEG_``) by pydantic-settings.

Every process of the service (api, worker, the embedded launcher) builds its configuration
here, so one set of ``CALSEG_*`` variables configures all of them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from calseg.io.recordings import ReadLimits

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the folder holding ``pyproject.toml``)."""


class Settings(BaseSettings):
    """Configuration of the CalSeg service.

    Relative paths are resolved against the repository root, so every process sees the same
    folders whatever its working directory.
    """

    model_config = SettingsConfigDict(env_prefix="CALSEG_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{REPO_ROOT / 'var' / 'calseg.db'}",
        description="SQLAlchemy URL; PostgreSQL as postgresql+psycopg://user@host:5432/db.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Celery broker (redis://host:port/db). None: the embedded launcher starts "
        "its own redis-server on a free loopback port.",
    )
    artifact_dir: Path = Field(default=Path("var/artifacts"), description="Artifact store root.")
    cache_dir: Path = Field(default=Path("var/cache"), description="Embedding cache root.")
    max_cache_bytes: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Size the SAM2 embedding cache (cache_dir/embeddings) is kept under: after "
        "each job the worker removes the least recently used entries down to 80 % of it "
        "(calseg.segment.embeddings.EmbeddingCache.prune; bytes; 0: no limit). A 512 px frame "
        "of SAM2 tiny is ~2 MB, so 20 GiB holds ~10,000 frames.",
    )
    log_dir: Path = Field(default=Path("var/logs"), description="Logs of embedded processes.")
    sam2_checkpoint: Path | None = Field(
        default=None,
        description="Local SAM2.1 checkpoint (.pt). None: random weights, with a loud warning.",
    )
    real_data_dir: Path = Field(
        default=Path("../shared/data/real"), description="Real recordings for tests and demos."
    )
    max_upload_bytes: int = Field(default=4 * 1024**3, gt=0, description="Upload limit (bytes).")
    min_free_disk_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Free disk the artifact store keeps: an upload (507) or a job (422) that "
        "would leave less is refused before it writes (bytes; local store only).",
    )
    max_recording_pixels: int = Field(
        default=2**31,
        gt=0,
        description="Decode budget of one recording: most frames x rows x columns (2^31, e.g. "
        "8192 frames of 512 x 512). Checked against the file's header before any pixel is "
        "decoded, at upload (413) and in every job and preview.",
    )
    max_recording_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Decode budget of one recording in bytes: every stored sample (all "
        "channels, Z planes, colours) and the frames returned; also the largest HDF5 chunk. "
        "4 GiB: an uncompressed file as large as the default upload limit fits.",
    )
    max_frame_pixels: int = Field(
        default=2**26,
        gt=0,
        description="Most values decoded for one frame (2^26, e.g. 8192 x 8192, or 8 Z slices "
        "of 2896 x 2896: rows x columns x every Z slice, channel and colour sample a frame is "
        "read from), checked against "
        "the header before any pixel is decoded, at upload (413) and in every job and preview: "
        "the API decodes single frames itself (the upload check, previews), and one frame of "
        "the recording budget alone could take gigabytes.",
    )
    max_json_bytes: int = Field(
        default=1024**2, gt=0, description="Limit of JSON request bodies (bytes); larger: 413."
    )
    token_file: Path = Field(
        default=Path("var/token"),
        description="Where the embedded service writes the token of its admin user 'local' "
        "(mode 0600) on first start.",
    )
    auth_max_failures: int = Field(
        default=20, ge=1, description="Bad tokens from one address per window before 429."
    )
    auth_window_s: float = Field(
        default=60.0, gt=0, description="Sliding window of the bad-token limit (s)."
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535, description="0: pick a free port.")
    visibility_timeout_s: int = Field(
        default=12 * 3600,
        gt=0,
        description="Redis visibility timeout (s); must exceed the longest job, else a "
        "running job's message is redelivered.",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Runs of one job before a lost worker fails it."
    )
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="Minimum time between progress writes to the database."
    )
    # -- cancellation and the job's own process (calseg.service.jobproc)
    cancel_check_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="A running job asks the database whether it was cancelled at most this "
        "often (s), from the cancellation points of its loops.",
    )
    cancel_grace_s: float = Field(
        default=3.0,
        ge=0,
        description="A job that has not stopped this long (s) after its cancel is killed with "
        "its process (job_process=child).",
    )
    job_process: Literal["child", "inline"] = Field(
        default="child",
        description="child: the worker runs each job in a forked child process it can kill "
        "(hard cancel, a crash or OOM kill fails only that job); inline: in the worker itself.",
    )
    # -- workers, heartbeats and the reconciler (calseg.service.reconcile)
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="A running job touches jobs.updated_at this often (s)."
    )
    heartbeat_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job without a heartbeat for this long lost its worker (s); "
        "it is re-queued (up to max_attempts starts) or failed.",
    )
    reconcile_interval_s: float = Field(
        default=30.0, description="Seconds between reconciler passes in the api; <= 0: off."
    )
    staging_grace_s: float = Field(
        default=3600.0,
        gt=0,
        description="Files and folders of the api's staging folders (recordings/.incoming: "
        "uploads streaming in, their probes) untouched for this long (s) were left by a "
        "request whose process died and are removed when the api starts and at every "
        "reconciler pass (calseg.service.staging); the api touches its requests' own entries "
        "at each pass, so keep it well above reconcile_interval_s. Recording folders that no "
        "recording names (a process killed while registering an upload) go after as long.",
    )
    requeue_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="A queued job whose message is not on the broker for this long (s) is "
        "dispatched again (Redis restarted or flushed).",
    )
    retry_backoff_s: float = Field(
        default=10.0, ge=0, description="Back-off before re-running a lost job: this * 2**(n-1)."
    )
    retry_backoff_max_s: float = Field(default=600.0, ge=0, description="Largest back-off (s).")
    store_url: str | None = Field(
        default=None,
        description="fsspec URL of the artifact store (memory://, file:///srv/calseg, "
        "s3://bucket/prefix with s3fs installed); None: the local folder artifact_dir.",
    )
    # -- job cost limits and quotas (calseg.service.costs; per user: users.max_* columns)
    job_max_memory_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Largest estimated peak memory of one job (bytes); None: 80 % of this "
        "machine's physical memory. Per user: users.max_job_memory_bytes. Also enforced while "
        "the job runs: the worker kills a job process group whose resident memory passes it.",
    )
    job_max_disk_bytes: int = Field(
        default=200 * 1024**3,
        gt=0,
        description="Largest estimated bytes one job writes (artifacts + embedding cache).",
    )
    job_max_time_s: float = Field(
        default=48 * 3600.0,
        gt=0,
        description="Largest estimated worker time of one job (s, scaled by cost_time_scale). "
        "While it runs, a job is killed after twice the smaller of this and 10 x its own "
        "estimate (at least 600 s; estimates run long on a busy machine: "
        "calseg.service.jobproc.TIME_LIMIT_SLACK, ESTIMATE_TIME_FACTOR).",
    )
    cost_time_scale: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description="Worker speed relative to the machine the cost constants were measured on "
        "(2-core CPU): a GPU worker sets e.g. 0.05, so estimated times shrink 20x.",
    )
    max_queued_jobs: int = Field(
        default=100,
        ge=1,
        description="Jobs one user may have queued or running at once (quota; more: 429).",
    )
    max_user_storage_bytes: int | None = Field(
        default=100 * 1024**3,
        ge=1,
        description="Storage quota of one user (bytes): their uploaded recordings, the files "
        "their jobs left and the estimated writes of their queued and running jobs "
        "(calseg.service.costs.storage_used_bytes). An upload over it is 507, a job 422; "
        "DELETE of recordings or jobs frees it. Per user: users.max_storage_bytes. None: no "
        "quota (the server's free disk still is: min_free_disk_bytes).",
    )
    max_running_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Jobs of one user that run at once; None: no limit (workers still take "
        "users in turn, calseg.service.fairness).",
    )
    allowed_devices: list[str] | None = Field(
        default=None,
        description='Devices jobs may ask for (JSON list, e.g. ["auto","cpu","cuda"]); None: '
        "auto and cpu, plus cuda when this machine has a GPU.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses of reverse proxies whose X-Forwarded-For is believed (JSON "
        'list, e.g. ["10.0.0.5"]); empty (default): none, the socket peer is the client.',
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines of api and workers: text, or one JSON object each."
    )

    @field_validator("artifact_dir", "cache_dir", "log_dir", "real_data_dir", "token_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        value = Path(value).expanduser()
        return value if value.is_absolute() else (REPO_ROOT / value).resolve()

    @field_validator("sam2_checkpoint")
    @classmethod
    def _absolute_optional(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        value = Path(value).expanduser()
        return value if value.is_absolute() else (REPO_ROOT / value).resolve()

    @field_validator(
        "max_user_storage_bytes", "max_running_jobs", "job_max_memory_bytes", mode="before"
    )
    @classmethod
    def _none_words(cls, value: object) -> object:
        """``none``, ``null`` or an empty value (e.g. ``CALSEG_MAX_USER_STORAGE_BYTES=none``)
        mean None for the settings whose None is documented: the environment has no None."""
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @field_validator("redis_url", "store_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def embedding_cache_dir(self) -> Path:
        """The SAM2 embedding cache of the jobs (``cache_dir/embeddings``, a ``user-<id>``
        folder per job owner: :attr:`calseg.service.context.JobContext.embedding_cache_dir`);
        kept under ``max_cache_bytes`` by :func:`calseg.service.jobproc.prune_embedding_cache`."""
        return self.cache_dir / "embeddings"

    def read_limits(self) -> ReadLimits:
        """The decode budget of one recording (:class:`calseg.io.recordings.ReadLimits`)."""
        from calseg.io.recordings import ReadLimits

        return ReadLimits(
            self.max_recording_pixels, self.max_recording_bytes, self.max_frame_pixels
        )

    def to_env(self) -> dict[str, str]:
        """The ``CALSEG_*`` environment variables that reproduce these settings in a child."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:  # "none" where None is not the default (no storage quota)
                if type(self).model_fields[name].default is None:
                    continue
                env[f"CALSEG_{name.upper()}"] = "none"
                continue
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            env[f"CALSEG_{name.upper()}"] = text
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; ``get_settings.cache_clear()`` re-reads)."""
    return Settings()
