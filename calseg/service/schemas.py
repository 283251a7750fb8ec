"""Request and response schemas of the service (pydantic 2).

Job parameters are validated per kind with ``extra="forbid"``, so a misspelt field is a clear
422, not a silently ignored default. The simulate and finetune parameter models are built from
the science configurations (:class:`calseg.simulate.config.SimulationConfig`,
:class:`calseg.segment.finetune.FinetuneConfig`, :class:`calseg.segment.infer.InferenceConfig`)
so the API never drifts from them; they are built on first use (:func:`params_model`), so the
api process imports the science (and torch) only when a job of that kind is submitted.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_serializer,
    model_validator,
)

JobKind = Literal["simulate", "finetune", "infer", "evaluate"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Split = Literal["train", "val", "test"]


def _describe(error: dict[str, Any]) -> str:
    """``"field.sub: message"`` for one pydantic error (no location for model-level ones)."""
    msg = str(error.get("msg", ""))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = ".".join(str(x) for x in error.get("loc", ()))
    return f"{loc}: {msg}" if loc else msg


def json_safe_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic error dicts reduced to what JSON can carry: ``type``, ``loc``, ``msg`` and the
    offending ``input`` when it is a plain JSON value (NaN, Inf or objects become ``repr``)."""

    def safe(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        return repr(value)[:200]

    out = []
    for e in errors:
        item = {
            "type": str(e.get("type", "")),
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg")),
        }
        if "input" in e and not isinstance(e["input"], dict | list):
            item["input"] = safe(e["input"])
        out.append(item)
    return out


class ParamsError(ValueError):
    """Job parameters that do not validate; ``errors`` lists pydantic's error dicts."""

    def __init__(self, kind: str, errors: list[dict[str, Any]]) -> None:
        self.kind = kind
        self.errors = json_safe_errors(errors)
        lines = "; ".join(_describe(e) for e in errors)
        super().__init__(f"invalid parameters for the {kind} job: {lines}")


class _Params(BaseModel):
    """Base of every job parameter model: unknown fields are errors."""

    model_config = ConfigDict(
        extra="forbid",
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        allow_inf_nan=False,
    )

    _config_cls: typing.ClassVar[type | None] = None
    _config_fields: typing.ClassVar[tuple[str, ...]] = ()

    def to_config(self) -> Any:
        """The science configuration object built from the wrapped fields."""
        cls = type(self)._config_cls
        if cls is None:
            raise TypeError(f"{type(self).__name__} wraps no configuration class")
        values = {name: getattr(self, name) for name in type(self)._config_fields}
        return cls(**values)

    @model_validator(mode="after")
    def _config_accepts(self) -> _Params:
        # Run the configuration's own validation (cross-field checks) at submit time.
        if type(self)._config_cls is not None:
            try:
                self.to_config()
            except ValidationError as exc:
                raise ValueError("; ".join(_describe(e) for e in exc.errors())) from None
            except (TypeError, ValueError) as exc:
                raise ValueError(str(exc)) from None
        return self


def _config_fields(config_cls: type, skip: set[str]) -> dict[str, Any]:
    """``create_model`` field definitions mirroring a pydantic model or dataclass."""
    fields: dict[str, Any] = {}
    if isinstance(config_cls, type) and issubclass(config_cls, BaseModel):
        for name, info in config_cls.model_fields.items():
            if name not in skip:
                fields[name] = (info.annotation, info)
        return fields
    if dataclasses.is_dataclass(config_cls):
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            if not f.init or f.name in skip or f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = Field(default_factory=f.default_factory)
            else:
                default = ...
            fields[f.name] = (hints.get(f.name, Any), default)
        return fields
    raise TypeError(f"{config_cls!r} is neither a pydantic model nor a dataclass")


def _wrap(
    name: str, doc: str, config_cls: type, own: dict[str, Any], base: type[_Params] = _Params
) -> type[_Params]:
    """A parameter model with ``own`` fields plus every field of ``config_cls``."""
    wrapped = _config_fields(config_cls, skip=set(own))
    model = create_model(name, __base__=base, __doc__=doc, **own, **wrapped)
    model._config_cls = config_cls
    model._config_fields = tuple(wrapped) + tuple(k for k in own if k in _names(config_cls))
    return model


def _names(config_cls: type) -> set[str]:
    if isinstance(config_cls, type) and issubclass(config_cls, BaseModel):
        return set(config_cls.model_fields)
    return {f.name for f in dataclasses.fields(config_cls)}


class _InferBase(_Params):
    """Where the frames come from: exactly one of a recording or a simulated video."""

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            rec = data.get("recording_id")
            ds, vid = data.get("dataset_job_id"), data.get("video_id")
            if rec and (ds or vid):
                raise ValueError("give either recording_id or dataset_job_id + video_id, not both")
            if not rec and not (ds and vid):
                raise ValueError(
                    "give recording_id (an uploaded recording) or dataset_job_id and video_id "
                    "(a video of a simulate job)"
                )
        return data


@cache
def params_model(kind: str) -> type[_Params]:
    """The parameter model of a job kind (built once, on first use).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "simulate":
        from calseg.simulate.config import SimulationConfig

        own = {
            "recording_id": (
                str | None,
                Field(
                    None,
                    description="an uploaded recording to simulate like: the simulator is "
                    "fitted to it (calseg.simulate.fit: frame size and count, interval, camera "
                    "gain/offset/read noise, background, PSF, bleaching, cell size, bit "
                    "depth replace the fields given here; n_videos, seeds, pattern classes, "
                    "indicator, defect_severity... are kept); None = the fields only",
                ),
            ),
        }
        return _wrap(
            "SimulateParams",
            "Parameters of a simulate job: the fields of SimulationConfig, optionally fitted "
            "to an uploaded recording (recording_id).",
            SimulationConfig,
            own,
        )
    if kind == "finetune":
        from calseg.segment.finetune import FinetuneConfig

        own = {
            "dataset_job_id": (str, Field(description="id of a succeeded simulate job")),
        }
        return _wrap(
            "FinetuneParams",
            "Parameters of a finetune job: the dataset (a simulate job) + FinetuneConfig.",
            FinetuneConfig,
            own,
        )
    if kind == "infer":
        from calseg.segment.infer import InferenceConfig

        own = {
            "recording_id": (str | None, Field(None, description="an uploaded recording")),
            "dataset_job_id": (str | None, Field(None, description="a simulate job")),
            "video_id": (str | None, Field(None, description="a video of that simulate job")),
            "model_job_id": (
                str | None,
                Field(None, description="a succeeded finetune job; None = the base model"),
            ),
            "method": (Literal["sam2", "baseline"], "sam2"),
            # reading, preprocessing (calseg.preprocess; all off by default), trace analysis
            "z_projection": (
                Literal["max", "mean", "median"],
                Field("max", description="how a Z axis is collapsed when the file also has T"),
            ),
            "register_drift": (bool, Field(False, description="rigid drift registration")),
            "background": (
                Literal["opening", "rolling_ball", "gaussian"] | None,
                Field(None, description="static background subtraction method (None = off)"),
            ),
            "background_radius_px": (
                float,
                Field(50.0, gt=0, le=2000, description="background radius (px), > cell radius"),
            ),
            "bleach_correction": (
                Literal["exp", "biexp"] | None,
                Field(None, description="photobleaching correction by exponential fit"),
            ),
            "frame_interval_s": (
                float | None,
                Field(None, gt=0, le=3600, description="s per frame; None = from the file"),
            ),
            "pixel_size_um": (
                float | None,
                Field(None, gt=0, le=1000, description="um per px; None = from the file"),
            ),
            "nwb": (bool, Field(False, description="also write calseg.nwb (needs pynwb)")),
        }
        return _wrap(
            "InferParams",
            "Parameters of an infer job: the frames' source, the model and InferenceConfig.",
            InferenceConfig,
            own,
            base=_InferBase,
        )
    if kind == "evaluate":
        from calseg.segment.infer import InferenceConfig

        own = {
            "dataset_job_id": (str, Field(description="id of a succeeded simulate job")),
            "model_job_id": (
                str | None,
                Field(None, description="a succeeded finetune job, compared with base/baseline"),
            ),
            "split": (Split, "test"),
        }
        return _wrap(
            "EvaluateParams",
            "Parameters of an evaluate job: held-out videos of a simulate job, the models.",
            InferenceConfig,
            own,
        )
    raise ValueError(f"unknown job kind {kind!r}; use one of simulate, finetune, infer, evaluate")


def validate_params(kind: str, params: dict[str, Any] | None) -> _Params:
    """Validate ``params`` for a job of ``kind``.

    Raises:
        ParamsError: the parameters do not validate (``.errors`` lists each problem).
    """
    try:
        return params_model(kind).model_validate(params or {})
    except ValidationError as exc:
        raise ParamsError(kind, exc.errors(include_url=False, include_context=False)) from None


def params_json_schema(kind: str) -> dict[str, Any]:
    """JSON schema of a kind's parameters, every field's default included (also those made by
    a default factory, which pydantic leaves out), for forms generated from it.

    Raises:
        ValueError: unknown kind.
    """
    from pydantic import TypeAdapter

    model = params_model(kind)
    schema = model.model_json_schema()
    props = schema.get("properties", {})
    for name, info in model.model_fields.items():
        if name in props and "default" not in props[name] and info.default_factory is not None:
            value = info.default_factory()
            props[name]["default"] = TypeAdapter(type(value)).dump_python(value, mode="json")
    return schema


def params_to_json(params: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of validated parameters (stored in ``jobs.params``)."""
    return params.model_dump(mode="json")


# --------------------------------------------------------------------------- API bodies


class JobCreate(BaseModel):
    """Body of ``POST /api/jobs``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: JobKind
    params: dict[str, Any] = Field(default_factory=dict)


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class ArtifactOut(BaseModel):
    """An artifact of a job; ``url`` downloads it."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: str
    relpath: str
    content_type: str
    sha256: str
    size_bytes: int
    url: str = ""


class MetricOut(BaseModel):
    """A metric of a job (``value`` None when it was not finite; ``step`` the optimiser step
    of a training-curve point, None for final numbers)."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    value: float | None
    model: str | None = None
    subset: str | None = None
    step: int | None = None


class JobMetricOut(MetricOut):
    """A metric with the job that measured it and the dataset and model that job used."""

    job_id: str
    job_kind: JobKind
    dataset_job_id: str | None = None
    model_job_id: str | None = None


class UserOut(BaseModel):
    """The user of a token (``GET /api/me``)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    is_admin: bool


class JobOut(BaseModel):
    """A job: its parameters, state, progress and (in detail) results."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str | None = None
    owner_name: str | None = None
    kind: JobKind
    state: JobState
    params: dict[str, Any]
    progress: float
    stage: str | None = None
    message: str | None = None
    eta_s: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    code_version: str | None = None
    provenance: dict[str, Any] | None = None
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    log_tail: str | None = None
    metrics: list[MetricOut] = Field(default_factory=list)
    artifacts: list[ArtifactOut] = Field(default_factory=list)

    @field_serializer("created_at", "started_at", "finished_at")
    def _as_utc(self, value: datetime | None) -> str | None:
        value = _utc(value)
        return value.isoformat() if value else None


class JobList(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    total: int
    limit: int
    offset: int


class RecordingOut(BaseModel):
    """An uploaded recording."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str | None = None
    owner_name: str | None = None
    filename: str
    sha256: str
    size_bytes: int
    n_frames: int
    height: int
    width: int
    dtype: str
    created_at: datetime
    duplicate: bool = False
    message: str | None = None

    @field_serializer("created_at")
    def _as_utc(self, value: datetime) -> str:
        return _utc(value).isoformat()  # type: ignore[union-attr]


class ModelOut(BaseModel):
    """A fine-tuned model: a succeeded finetune job's checkpoint and how it was made."""

    job_id: str
    owner_id: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    base_config: str | None = Field(None, description="SAM2 configuration, e.g. sam2.1_hiera_t")
    parent_checkpoint: str | None = Field(
        None, description="the SAM2 checkpoint it started from; None: random weights"
    )
    parent_checkpoint_sha256: str | None = None
    dataset_job_id: str | None = Field(None, description="the simulate job it was trained on")
    dataset_manifest_sha256: str | None = None
    params: dict[str, Any]
    metrics: list[MetricOut] = Field(default_factory=list, description="final numbers")
    checkpoint_sha256: str | None = None
    checkpoint_url: str | None = None
    code_version: str | None = None

    @field_serializer("created_at", "finished_at")
    def _as_utc(self, value: datetime | None) -> str | None:
        value = _utc(value)
        return value.isoformat() if value else None
