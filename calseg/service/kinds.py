"""The registry of job kinds: one entry per kind says everything the service needs about it
(issue 16 item 2).

A :class:`JobKind` names its parameter model, its runner, its queue, the parameters that
reference other jobs (and their kind) and its cost estimate. Validation
(:func:`calseg.service.schemas.validate_params`), the API's schemas and forms
(``GET /api/job-kinds``, read by the page), routing (:mod:`calseg.service.broker`,
:mod:`calseg.service.fairness`), references (:func:`calseg.service.jobs.check_references`),
running (:func:`calseg.service.jobs.run_job`) and admission
(:func:`calseg.service.costs.estimate`) all read it; the database accepts any kind the
registry does (no CHECK on ``jobs.kind`` since migration 0005: rows are written by
:func:`calseg.service.jobs.submit_job` only, after validation).

Adding a kind is one module (its parameter model, runner and estimate) plus one
:func:`register` line below (or in that module); ``tests/test_service_kinds.py`` adds a kind
that exists only in the test and runs it end to end.

The parts are given as callables or as ``"module:attribute"`` strings, imported when first
used: the registry imports nothing of the service, and the api process never imports a
runner's science.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Queue = Literal["cpu", "gpu"]

KIND_LENGTH = 16
"""Longest kind name (the ``jobs.kind`` column, ``String(16)``)."""


class UnknownKind(ValueError):
    """No job kind of that name is registered."""


def _load(ref: Any) -> Any:
    """A ``"module:attribute"`` string imported, or ``ref`` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    Attributes:
        name: the kind (``jobs.kind``, the API's ``kind``), at most :data:`KIND_LENGTH`
            characters.
        params: a function returning the parameter model (a subclass of
            ``calseg.service.schemas._Params``, built on first use), or ``"module:function"``.
        runner: ``runner(params, ctx: JobContext) -> dict`` (the job's result), or its path.
        queue: the Celery queue: ``"cpu"``, or ``"gpu"`` for kinds that use SAM2 (the worker
            imports torch before forking their processes, :func:`calseg.service.jobproc.
            preload_for`).
        estimate: ``estimate(params, JobInputs, time_scale) -> CostEstimate``
            (:mod:`calseg.service.costs`), or its path.
        references: ``{parameter: kind}`` of parameters that name another job.
        description: one line for people (the API's list of kinds).
    """

    name: str
    params: Callable[[], type] | str
    runner: Callable[..., dict[str, Any]] | str
    queue: Queue
    estimate: Callable[..., Any] | str
    references: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    def parameter_model(self) -> type:
        """The parameter model class."""
        return _load(self.params)()

    def load_runner(self) -> Callable[..., dict[str, Any]]:
        """The runner function."""
        return _load(self.runner)

    def load_estimate(self) -> Callable[..., Any]:
        """The cost estimate function."""
        return _load(self.estimate)


KINDS: dict[str, JobKind] = {}
"""The registered kinds by name, in registration order (the page lists them so)."""


def register(kind: JobKind) -> JobKind:
    """Add (or replace) a kind; returns it."""
    if not kind.name or len(kind.name) > KIND_LENGTH:
        raise ValueError(f"a job kind's name has 1-{KIND_LENGTH} characters, not {kind.name!r}")
    if kind.queue not in ("cpu", "gpu"):
        raise ValueError(f"queue of {kind.name}: cpu or gpu, not {kind.queue!r}")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that registered their own)."""
    KINDS.pop(name, None)


def get(name: str) -> JobKind:
    """The kind called ``name``.

    Raises:
        UnknownKind: no such kind (the message lists the registered ones).
    """
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise UnknownKind(f"unknown job kind {name!r}; use one of {', '.join(KINDS)}") from None


def names() -> tuple[str, ...]:
    """The registered kinds' names."""
    return tuple(KINDS)


def queue_of(name: str) -> Queue:
    """The queue of a kind."""
    return get(name).queue


def references(name: str) -> Mapping[str, str]:
    """``{parameter: kind}`` of a kind's references to other jobs (empty for unknown kinds)."""
    kind = KINDS.get(name)
    return kind.references if kind is not None else {}


# ------------------------------------------------------------------------------ the kinds

register(
    JobKind(
        "simulate",
        params="calseg.service.schemas:simulate_params",
        runner="calseg.service.runners:run_simulate",
        queue="cpu",
        estimate="calseg.service.costs:estimate_simulate",
        description="simulate a dataset (optionally fitted to an uploaded recording)",
    )
)
register(
    JobKind(
        "finetune",
        params="calseg.service.schemas:finetune_params",
        runner="calseg.service.runners:run_finetune",
        queue="gpu",
        estimate="calseg.service.costs:estimate_finetune",
        references={"dataset_job_id": "simulate"},
        description="fine-tune SAM2 on a simulated dataset",
    )
)
register(
    JobKind(
        "infer",
        params="calseg.service.schemas:infer_params",
        runner="calseg.service.runners:run_infer",
        queue="gpu",
        estimate="calseg.service.costs:estimate_infer",
        references={"dataset_job_id": "simulate", "model_job_id": "finetune"},
        description="segment a recording or a simulated video",
    )
)
register(
    JobKind(
        "evaluate",
        params="calseg.service.schemas:evaluate_params",
        runner="calseg.service.runners:run_evaluate",
        queue="gpu",
        estimate="calseg.service.costs:estimate_evaluate",
        references={"dataset_job_id": "simulate", "model_job_id": "finetune"},
        description="compare SAM2 fine-tuned, SAM2 untuned and classical on held-out videos",
    )
)
