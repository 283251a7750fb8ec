"""Request and response schemas of the service (pydantic 2).

Job parameters are validated per kind with ``extra="forbid"``, so a misspelt field is a clear
422, not a silently ignored default. The simulate and finetune parameter models are built from
the science configurations (:class:`calseg.simulate.config.SimulationConfig`,
:class:`calseg.segment.finetune.FinetuneConfig`, :class:`calseg.segment.infer.InferenceConfig`)
so the API never drifts from them; they are built on first use (:func:`params_model`), so the
api process imports the science (and torch) only when a job of that kind is submitted.

Bounds: the science configurations bound what is physically meaningful; :data:`SERVICE_BOUNDS`
adds, for the service, a lower and an upper bound to every numeric parameter that a real use
can reach but a typo (``steps`` 1e9, ``smooth_sigma_px`` 1e5) cannot pass, each with its
reason. Nested values (``model_overrides``, ``prompt_mix``, ``augment``) get bounded types
(:func:`_nested_annotations`). ``tests/test_service_limits.py`` walks every kind's JSON
schema and fails on a numeric field without both bounds, so a new field must be bounded here.
What a whole job costs (memory, disk, time) is estimated and limited separately, before it is
queued (:mod:`calseg.service.costs`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo


def _registered_kind(value: str) -> str:
    from calseg.service.kinds import get

    return get(value).name  # UnknownKind is a ValueError: a 422 naming the kinds


JobKind = Annotated[str, AfterValidator(_registered_kind)]
"""A registered job kind (:mod:`calseg.service.kinds`): checked against the registry when
validated, so a kind registered later is accepted."""
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


MAX_DESCRIBED_ERRORS = 20
"""Most errors a :class:`ParamsError` message spells out (the API lists as many items)."""


class ParamsError(ValueError):
    """Job parameters that do not validate; ``errors`` lists pydantic's error dicts."""

    def __init__(self, kind: str, errors: list[dict[str, Any]]) -> None:
        self.kind = kind
        self.errors = json_safe_errors(errors)
        shown = [_describe(e) for e in errors[:MAX_DESCRIBED_ERRORS]]
        if len(errors) > MAX_DESCRIBED_ERRORS:  # 60,000 unknown names made a 9 MB message
            shown.append(f"and {len(errors) - MAX_DESCRIBED_ERRORS:,} more")
        super().__init__(f"invalid parameters for the {kind} job: {'; '.join(shown)}")


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is a number (int or float, optionally None, not bool)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Annotated:
        return _is_number(args[0])
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(_is_number(a) for a in args)
    return annotation in (int, float)


def _unstorable_text(data: Any, where: str = "params", depth: int = 0) -> str | None:
    """Where in ``data`` (dicts, lists, strings; keys too) a string holds a NUL character or a
    lone UTF-16 surrogate, or None. Looked into at most 32 levels deep (job parameters nest a
    few; the request body's size limit bounds the rest)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")  # a lone surrogate cannot be
        except UnicodeEncodeError:
            return where
        return where if "\x00" in data else None
    if depth > 32:
        return None
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{where}.{key}" if isinstance(key, str) else where
            bad = _unstorable_text(key, where, depth + 1) or _unstorable_text(
                value, name, depth + 1
            )
            if bad is not None:
                return bad
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            bad = _unstorable_text(value, f"{where}[{i}]", depth + 1)
            if bad is not None:
                return bad
    return None


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

    def config_values(self) -> dict[str, Any]:
        """The wrapped configuration's fields and their values (``method`` may be ``"auto"``
        for infer jobs: :func:`calseg.pipelines.segment.segment_and_export` resolves it)."""
        return {name: getattr(self, name) for name in type(self)._config_fields}

    def to_config(self) -> Any:
        """The science configuration object built from the wrapped fields."""
        cls = type(self)._config_cls
        if cls is None:
            raise TypeError(f"{type(self).__name__} wraps no configuration class")
        values = {name: getattr(self, name) for name in type(self)._config_fields}
        return cls(**values)

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        """Text the database can store and UTF-8 can encode: a NUL character (PostgreSQL text
        cannot hold one) or a lone surrogate (JSON ``"\\ud800"``) in any string of the
        parameters is refused here, by name, not by the database driver (a 9th attack run:
        500s on PostgreSQL)."""
        bad = _unstorable_text(data)
        if bad is not None:
            raise ValueError(
                f"{bad}: text with a NUL character or a lone surrogate (\\ud800-\\udfff); "
                "send plain UTF-8 text"
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, data: Any) -> Any:
        """``true``/``false`` given for a number is refused: pydantic's lax mode read
        ``"threshold_k": true`` as 1.0 (a new-user check)."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _is_number(field.annotation):
                    raise ValueError(f"{name}: a number is needed, not {str(value).lower()}")
        return data

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


ID_LENGTH = 64
"""Longest id a parameter may carry (job and recording ids are 36-character uuids, video ids
like ``v000``)."""

JSON_SAFE_INT = 2**53 - 1
"""Largest integer a JSON number holds exactly in a browser (IEEE double): seeds above it
would be rounded by the page's forms."""

SERVICE_BOUNDS: dict[str, tuple[dict[str, float], str]] = {
    # name: ({ge/gt/le/lt: value}, why). Applied to that field in every kind that has it,
    # on top of the science configuration's own bounds (the tighter one wins).
    "seed": (
        {"ge": 0, "le": JSON_SAFE_INT},
        "any seed works; above 2^53 a browser rounds the number, so the job the page shows "
        "is not the job that ran",
    ),
    # finetune (calseg.segment.finetune.FinetuneConfig)
    "steps": (
        {"ge": 1, "le": 1_000_000},
        "CalSeg's fine-tunes run 150-2000 steps (README, BENCHMARKS); 1e6 leaves far more "
        "room than a CPU or one GPU gets through, 1e9 is a typo (the time estimate limits "
        "what is in between)",
    ),
    "batch_size": (
        {"ge": 1, "le": 512},
        "prompts per micro-batch (default 8): a frame holds tens of active cells; memory and "
        "time grow with it",
    ),
    "grad_accum": ({"ge": 1, "le": 256}, "effective batch = batch_size x grad_accum"),
    "lr": ({"gt": 0, "le": 1.0}, "AdamW learning rates for fine-tuning are 1e-6-1e-3"),
    "weight_decay": ({"ge": 0, "le": 1.0}, "AdamW decoupled weight decay, 0-0.1 in practice"),
    "warmup_steps": ({"ge": 0, "le": 1_000_000}, "at most the steps bound"),
    "val_every": ({"ge": 1, "le": 1_000_000}, "at most the steps bound"),
    "frames_per_video": (
        {"ge": 1, "le": 5000},
        "frames embedded per training video; a simulated video has at most 5000 frames",
    ),
    "val_frames_per_video": ({"ge": 1, "le": 5000}, "as frames_per_video"),
    "val_max_prompts_per_frame": (
        {"ge": 1, "le": 5000},
        "a simulated frame holds at most 5000 cells (calseg.simulate.geometry.MAX_CELLS)",
    ),
    "focal_weight": ({"ge": 0, "le": 1000}, "loss weights are relative (default 1:1:1:1)"),
    "dice_smooth": (
        {"gt": 0, "le": 100},
        "Dice smoothing is a fraction of a pixel to a few pixels (default 1e-3)",
    ),
    "dice_weight": ({"ge": 0, "le": 1000}, "loss weights are relative"),
    "iou_weight": ({"ge": 0, "le": 1000}, "loss weights are relative"),
    "object_weight": ({"ge": 0, "le": 1000}, "loss weights are relative"),
    "focal_gamma": ({"ge": 0, "le": 10}, "focal loss uses gamma 0-5 (Lin et al. 2017: 2)"),
    "erosion_px": (
        {"ge": 1, "le": 100},
        "erosion of a cell mask for prompt points: below the largest cell radius",
    ),
    "max_grad_norm": ({"gt": 0, "le": 1000}, "gradient clipping norm; 0.1-10 in practice"),
    "encoder_batch_size": (
        {"ge": 1, "le": 64},
        "frames per image-encoder batch (InferenceConfig's own bound); memory grows with it",
    ),
    "max_nonfinite_steps": ({"ge": 1, "le": 10_000}, "non-finite losses tolerated"),
    "time_limit_s": ({"gt": 0, "le": 30 * 86400}, "30 days; the cost limit is usually lower"),
    "lora_alpha": ({"gt": 0, "le": 1024}, "LoRA scale alpha / rank: 1-32 x rank in practice"),
    "encoder_lr": ({"gt": 0, "le": 1.0}, "as lr"),
    "scratch_lr": ({"gt": 0, "le": 1.0}, "as lr (training from random weights: ~1e-3)"),
    "frames_per_step": (
        {"ge": 1, "le": 512},
        "frames re-encoded with gradients per micro-batch: at most batch_size's bound",
    ),
    # infer / evaluate (calseg.segment.infer.InferenceConfig and the infer job's own fields)
    "smooth_sigma_px": (
        {"ge": 0, "le": 50},
        "Gaussian smoothing of the frames (px): cells are 11 px across by default and at most "
        "1000 (cell_diameter_px); smoothing beyond a few px blurs neighbours together, so 50 "
        "is far past any use. Its cost grows with sigma (the 1e5 of issue 13 took 228 s on "
        "40x64x64); the time estimate counts it",
    ),
    "background_radius_px": (
        {"gt": 0, "le": 1000},
        "larger than the largest cell radius; 1000 matches cell_diameter_px's bound. The "
        "opening and rolling-ball cost grows with radius^2: the time estimate counts it",
    ),
    "threshold_k": ({"gt": 0, "le": 1000}, "activity threshold in noise sigmas: 3-10 used"),
    "min_dff": ({"ge": 0, "le": 1000}, "a dF/F threshold: calcium signals are far below 1000"),
    "min_region_px": (
        {"ge": 1, "le": 4096 * 4096},
        "a pixel count: at most a whole 4096 x 4096 frame",
    ),
    "max_prompts_per_frame": (
        {"ge": 1, "le": 5000},
        "one prompt per active cell; at most 5000 cells per frame (MAX_CELLS); decoder time "
        "grows with it",
    ),
    "mask_threshold": (
        {"ge": -100, "le": 100},
        "a threshold on SAM's mask logits: sigmoid saturates beyond +-20",
    ),
    "min_mask_area_px": ({"ge": 1, "le": 4096 * 4096}, "a pixel count (whole frame at most)"),
    "decoder_batch_size": (
        {"ge": 1, "le": 1024},
        "prompts per decoder call; memory grows with it (3 masks of 256^2 floats each)",
    ),
    # reading (issue 13 item 8 adds these to the infer job; bounded here by name in advance)
    "channel": ({"ge": 0, "le": 63}, "a channel index: microscopes record a handful of channels"),
    "interleaved_channels": (
        {"ge": 1, "le": 64},
        "channels interleaved frame by frame: a handful in practice",
    ),
    "pattern_classes": (
        {"max_length": 64},
        "four classes exist, cycled over the videos; a longer list only bloats the job row",
    ),
}
"""Service bounds of numeric job parameters, by field name, with the reason for each."""

_BoundedFloat = Annotated[float, Field(ge=0, le=1e6)]


@cache
def _nested_annotations() -> dict[str, Any]:
    """Bounded types for parameters holding nested numbers (dict values, tuples, models)."""
    from calseg.segment.augment import AugmentConfig

    def pair(lo: float, hi: float) -> Any:
        item = Annotated[float, Field(ge=lo, le=hi)]
        return tuple[item, item]

    class BoundedAugmentConfig(AugmentConfig):
        """AugmentConfig with both ends of every range bounded (and ordered)."""

        crop_scale: pair(0.05, 1.0) = Field((0.6, 1.0), description="crop side fraction range")
        gain_range: pair(0.01, 100.0) = Field((0.5, 2.0))
        offset_range: pair(-10.0, 10.0) = Field((-0.05, 0.2), description="x the recording range")
        contrast_range: pair(0.01, 100.0) = Field((0.5, 1.0))
        photons_range: pair(1.0, 1e7) = Field((30.0, 3000.0), description="e- at the 99.8 pct")
        read_noise_range: pair(0.0, 1000.0) = Field((0.5, 10.0), description="read noise (e-)")

        @model_validator(mode="after")
        def _ordered(self) -> BoundedAugmentConfig:
            for name in (
                "crop_scale",
                "gain_range",
                "offset_range",
                "contrast_range",
                "photons_range",
                "read_noise_range",
            ):
                lo, hi = getattr(self, name)
                if lo > hi:
                    raise ValueError(f"{name}: the low end {lo} is above the high end {hi}")
            return self

    prompt_kind = Literal["point", "box", "box+point"]
    return {
        "model_overrides": (
            dict[str, _BoundedFloat],
            "calcium-model parameters are rates, constants and fractions >= 0; 1e6 is 1000x "
            "the largest default (taumax 800 s)",
        ),
        "prompt_mix": (
            dict[prompt_kind, Annotated[float, Field(ge=0, le=1000)]],
            "relative frequencies of prompt types",
        ),
        "augment": (
            BoundedAugmentConfig | None,
            "every augmentation range bounded and ordered (low <= high)",
        ),
    }


DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"
"""What a ``device`` parameter may look like; which of them a server accepts is the setting
``allowed_devices`` (checked at submit, :func:`calseg.service.costs.check_admission`)."""


def _bounded_field(name: str, annotation: Any, info: Any) -> tuple[Any, Any]:
    """``(annotation, FieldInfo)`` of a parameter with its service bound applied."""
    nested = _nested_annotations()
    if name in nested:
        return nested[name][0], info
    if name == "model":
        from calseg.segment.model import KNOWN_CONFIGS

        names = tuple(KNOWN_CONFIGS)
        return Literal[names], Field(  # type: ignore[valid-type]
            info.default if isinstance(info, FieldInfo) else info,
            description="SAM2 configuration (unknown names are refused at submit)",
        )
    if name == "device":
        return str, Field(
            info.default if isinstance(info, FieldInfo) else info,
            pattern=DEVICE_PATTERN,
            max_length=8,
            description="auto, cpu, cuda or cuda:N; the server's allowed_devices setting "
            "says which it runs",
        )
    if name not in SERVICE_BOUNDS:
        return annotation, info
    limits, _why = SERVICE_BOUNDS[name]
    if not isinstance(info, FieldInfo):
        info = Field(info)
    return annotation, FieldInfo.merge_field_infos(info, Field(**limits))


def _config_fields(config_cls: type, skip: set[str]) -> dict[str, Any]:
    """``create_model`` field definitions mirroring a pydantic model or dataclass."""
    fields: dict[str, Any] = {}
    if isinstance(config_cls, type) and issubclass(config_cls, BaseModel):
        for name, info in config_cls.model_fields.items():
            if name not in skip:
                fields[name] = _bounded_field(name, info.annotation, info)
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
            fields[f.name] = _bounded_field(f.name, hints.get(f.name, Any), default)
        return fields
    raise TypeError(f"{config_cls!r} is neither a pydantic model nor a dataclass")


def _wrap(
    name: str,
    doc: str,
    config_cls: type,
    own: dict[str, Any],
    base: type[_Params] = _Params,
    drop: frozenset[str] = frozenset(),
) -> type[_Params]:
    """A parameter model with ``own`` fields plus every field of ``config_cls`` not in
    ``drop`` (fields that kind of job sets itself: the configuration's default is used)."""
    own = {key: _bounded_field(key, *value) for key, value in own.items()}
    wrapped = _config_fields(config_cls, skip=set(own) | set(drop))
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

    def to_config(self, method: str | None = None) -> Any:
        """The InferenceConfig; ``method="auto"`` becomes ``method`` (the runner's choice,
        :func:`calseg.segment.choice.best_method`), or ``"classical"`` for validation."""
        values = {name: getattr(self, name) for name in type(self)._config_fields}
        if values.get("method") == "auto":
            values["method"] = method or "classical"
        return type(self)._config_cls(**values)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") == "baseline":  # the old name
            data = {**data, "method": "classical"}
        from calseg.segment.decode import apply_config_aliases

        data = apply_config_aliases(data)  # e.g. projection_cell_diameter_px
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
def simulate_params() -> type[_Params]:
    """The parameter model of simulate jobs (registered in :mod:`calseg.service.kinds`)."""
    from calseg.simulate.config import SimulationConfig

    own = {
        "recording_id": (
            str | None,
            Field(
                None,
                max_length=ID_LENGTH,
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


@cache
def finetune_params() -> type[_Params]:
    """The parameter model of finetune jobs (registered in :mod:`calseg.service.kinds`)."""
    from calseg.segment.finetune import FinetuneConfig

    own = {
        "dataset_job_id": (
            str,
            Field(max_length=ID_LENGTH, description="id of a succeeded simulate job"),
        ),
    }
    return _wrap(
        "FinetuneParams",
        "Parameters of a finetune job: the dataset (a simulate job) + FinetuneConfig.",
        FinetuneConfig,
        own,
    )


@cache
def infer_params() -> type[_Params]:
    """The parameter model of infer jobs (registered in :mod:`calseg.service.kinds`)."""
    from calseg.io.recordings import FRAME_INTERVAL_RANGE_S, PIXEL_SIZE_RANGE_UM
    from calseg.segment.infer import InferenceConfig

    own = {
        "recording_id": (
            str | None,
            Field(None, max_length=ID_LENGTH, description="an uploaded recording"),
        ),
        "dataset_job_id": (
            str | None,
            Field(None, max_length=ID_LENGTH, description="a simulate job"),
        ),
        "video_id": (
            str | None,
            Field(None, max_length=ID_LENGTH, description="a video of that simulate job"),
        ),
        "model_job_id": (
            str | None,
            Field(
                None,
                max_length=ID_LENGTH,
                description="a succeeded finetune job; None = the base model",
            ),
        ),
        "method": (
            Literal["auto", "classical", "sam2"],
            Field(
                "auto",
                description="auto: the best method on this server (classical unless "
                "a SAM2 with real weights is configured and measured better; SAM2 when "
                "model_job_id is given); classical: no weights needed ('baseline' is "
                "accepted); sam2: SAM2",
            ),
        ),
        # reading, preprocessing (calseg.preprocess; all off by default), trace analysis
        # how the recording is read (None = as given at upload, else the reader's default)
        "axes": (
            str | None,
            Field(
                None,
                pattern=r"^[TZCYXStzcyxs]{2,6}$",
                description="the stored axes, one of T Z C Y X S per dimension (e.g. "
                "'TZCYX'); None = as uploaded / detected",
            ),
        ),
        "channel": (
            int | None,
            Field(None, ge=0, le=255, description="channel to read (0-based); None = 0"),
        ),
        "interleaved_channels": (
            int | None,
            Field(
                None,
                ge=1,
                le=16,
                description="images alternate between this many channels (c0, c1, c0, "
                "...): read `channel` of them; None = as uploaded",
            ),
        ),
        "z_projection": (
            Literal["max", "mean", "median"] | None,
            Field(
                None,
                description="how a Z axis is collapsed when the file also has T; None = as "
                "uploaded, else max",
            ),
        ),
        "register_drift": (bool, Field(False, description="rigid drift registration")),
        "background": (
            Literal["opening", "rolling_ball", "gaussian"] | None,
            Field(None, description="static background subtraction method (None = off)"),
        ),
        "background_radius_px": (
            float,
            Field(50.0, gt=0, description="background radius (px), > cell radius"),
        ),
        "bleach_correction": (
            Literal["exp", "biexp"] | None,
            Field(None, description="photobleaching correction by exponential fit"),
        ),
        "frame_interval_s": (
            float | None,
            Field(
                None,
                ge=FRAME_INTERVAL_RANGE_S[0],
                le=FRAME_INTERVAL_RANGE_S[1],
                description="s per frame; None = from the file (traces, events, and the "
                "cell-size estimate's 3 s lag; unknown: 1 s for traces, 2 frames for the lag)",
            ),
        ),
        "pixel_size_um": (
            float | None,
            Field(
                None,
                ge=PIXEL_SIZE_RANGE_UM[0],
                le=PIXEL_SIZE_RANGE_UM[1],
                description="um per px; None = from the file",
            ),
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


class _EvaluateBase(_Params):
    """An evaluate job scores every model side by side, so it takes no ``method``."""

    @model_validator(mode="before")
    @classmethod
    def _no_method(cls, data: Any) -> Any:
        """``method`` is refused with the reason (it was accepted and ignored: a user asking
        for ``"classical"`` got every model's rows). ``"sam2"``, the value every evaluate job
        stored before (the configuration's default), is dropped, so those jobs still retry."""
        if isinstance(data, dict) and "method" in data:
            if data["method"] not in (None, "sam2"):
                raise ValueError(
                    f"method {data['method']!r}: an evaluate job scores every model side by "
                    "side (SAM2 fine-tuned, its disc prior, SAM2 untuned, classical) and takes "
                    "no method; read the row you want from its table"
                )
            data = {k: v for k, v in data.items() if k != "method"}
        return data


@cache
def evaluate_params() -> type[_Params]:
    """The parameter model of evaluate jobs (registered in :mod:`calseg.service.kinds`)."""
    from calseg.segment.infer import InferenceConfig

    own = {
        "dataset_job_id": (
            str,
            Field(max_length=ID_LENGTH, description="id of a succeeded simulate job"),
        ),
        "model_job_id": (
            str | None,
            Field(
                None,
                max_length=ID_LENGTH,
                description="a succeeded finetune job (SAM2 fine-tuned), compared with "
                "SAM2 untuned and classical",
            ),
        ),
        "split": (Split, "test"),
    }
    return _wrap(
        "EvaluateParams",
        "Parameters of an evaluate job: held-out videos of a simulate job, the models.",
        InferenceConfig,
        own,
        base=_EvaluateBase,
        drop=frozenset({"method"}),  # set per model by calseg.segment.evaluate
    )


_MODELS: dict[str, tuple[Any, type[_Params]]] = {}


def params_model(kind: str) -> type[_Params]:
    """The parameter model of a job kind (:func:`calseg.service.kinds.get`; built once per
    registered kind, on first use).

    Raises:
        calseg.service.kinds.UnknownKind: unknown kind (a ValueError).
    """
    from calseg.service.kinds import get

    spec = get(kind)
    cached = _MODELS.get(kind)
    if cached is None or cached[0] is not spec:
        cached = _MODELS[kind] = (spec, spec.parameter_model())
    return cached[1]


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
    job_kind: str
    dataset_job_id: str | None = None
    model_job_id: str | None = None


class UserOut(BaseModel):
    """The user of a token (``GET /api/me``)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    is_admin: bool


class LimitsIn(BaseModel):
    """Body of ``PUT /api/users/{name}/limits`` (admins): every limit of the user; a limit left
    out or null follows the server's setting of the same name. ``PATCH`` changes only the
    limits present (null: the server's again). Memory and disk in bytes, time
    in seconds of worker time (scaled by the server's ``cost_time_scale``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_job_memory_bytes: int | None = Field(None, gt=0, le=2**50)
    max_job_disk_bytes: int | None = Field(None, gt=0, le=2**53)
    max_job_time_s: float | None = Field(None, gt=0, le=365 * 86400)
    max_queued_jobs: int | None = Field(None, ge=1, le=100_000)
    max_running_jobs: int | None = Field(None, ge=1, le=10_000)
    max_storage_bytes: int | None = Field(None, gt=0, le=2**53)

    @model_validator(mode="before")
    @classmethod
    def _numbers_only(cls, data: Any) -> Any:
        """A limit is a JSON number: ``true`` became a 1-byte quota and ``"100"`` was read as
        100 (pydantic's lax mode; an attack check)."""
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, bool | str) and name in cls.model_fields:
                    raise ValueError(f"{name}: a number (or null) is needed, not {value!r}")
        return data


class LimitsOut(BaseModel):
    """A user's limits in force (``sources``: ``user`` where an admin set the user's own value,
    ``server`` where the server's setting applies)."""

    user: str
    max_job_memory_bytes: int
    max_job_disk_bytes: int
    max_job_time_s: float
    max_queued_jobs: int
    max_running_jobs: int | None
    max_storage_bytes: int | None = Field(None, description="storage quota (bytes); null: none")
    sources: dict[str, Literal["user", "server"]]
    queued_or_running: int = Field(0, description="the user's jobs queued or running now")
    storage_used_bytes: int = Field(
        0,
        description="bytes the user has on the server: recordings, files their jobs left and "
        "the estimated writes of their queued and running jobs (calseg.service.costs)",
    )


class EstimateOut(BaseModel):
    """``POST /api/jobs/estimate``: what a job would cost and whether the caller may run it.
    Memory (peak RSS of the worker) and disk (artifacts + embedding cache) in bytes, time in
    seconds (``calseg.service.costs``)."""

    kind: str
    estimate: dict[str, Any]
    limits: LimitsOut
    fits: bool
    over: list[str] = Field(default_factory=list, description="resources over the limit")


class JobOut(BaseModel):
    """A job: its parameters, state, progress and (in detail) results."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str | None = None
    owner_name: str | None = None
    kind: str
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
    read_options: dict[str, Any] | None = Field(
        None, description="reading options given at upload (axes, channel, ...)"
    )
    axes: str | None = Field(None, description="the stored data's axes as read, e.g. TZCYX")
    warnings: list[str] = Field(
        default_factory=list, description="what the reader noticed or converted"
    )
    info: dict[str, Any] | None = Field(
        None, description="the reader's description (format, stored shape, interval, ...)"
    )
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
    label: str | None = Field(
        None,
        description='what it is, e.g. "SAM2 fine-tuned" or "SAM2 base, kept" (no training step '
        "improved on the initial model, so it is the base's weights)",
    )
    best_step: int | None = Field(None, description="the training step its weights are from")
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
