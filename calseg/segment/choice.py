"""Which segmentation method a user gets by default, and the one name each model goes by.

**The default rule** (``method="auto"`` in ``calseg segment``, the infer job and the page;
:func:`best_method`). The default is the **classical** method (activity map + cell territories,
:mod:`calseg.segment.baseline`, no weights), unless all three hold for the SAM2 checkpoint this
server is configured with (``CALSEG_SAM2_CHECKPOINT``, or ``--checkpoint`` on the CLI):

1. its weights are *real*: a SAM2 release (``{"model": state_dict}``), a CalSeg checkpoint
   fine-tuned from one, or a CalSeg checkpoint whose image encoder was *trained here*
   (``train_mode`` ``"full"``); a SAM2 with random weights -- no checkpoint at all, or only the
   decoder (or LoRA factors) trained on a random-weight encoder -- never qualifies;
2. it has been *measured*: an evaluation report next to it, ``<checkpoint>.evaluation.json``
   (the JSON that ``calseg evaluate DATASET --model CKPT --out CKPT.evaluation.json`` writes,
   :meth:`calseg.segment.evaluate.EvaluationReport.to_dict`), whose SAM2 entry has this file's
   sha256 and which scored the classical method on the same held-out videos;
3. it is *better* there: mean instance F1 and mean foreground IoU both higher than the
   classical method's, and, when the report has bootstrap CIs (>= 3 videos), the lower end of
   its F1 CI above the classical mean F1.

Otherwise ``auto`` means classical, and :attr:`MethodChoice.reason` says which condition failed
(e.g. "no SAM2 weights configured"). An explicit ``method="sam2"`` (or a fine-tuned model picked
by the user) is always honoured; when its weights are random every output says so
(:func:`model_label` appends "(random weights)").

**Names.** One name per model everywhere (CLI tables, ``calseg evaluate``, the demo table, the
page): ``"classical"`` (the method formerly called "baseline"; ``"baseline"`` is still accepted
as input, :func:`canonical_method`), ``"SAM2 untuned"`` (a SAM2 checkpoint as released, or random
weights) and ``"SAM2 fine-tuned"`` (a CalSeg fine-tuned checkpoint).

Nothing here imports torch unless a checkpoint file must be opened to read its metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

CLASSICAL = "classical"
SAM2 = "sam2"
AUTO = "auto"
METHOD_ALIASES = {"baseline": CLASSICAL}
"""Accepted input names of methods -> their one name (``baseline`` was the old name)."""
LABEL_CLASSICAL = "classical"
LABEL_UNTUNED = "SAM2 untuned"
LABEL_FINETUNED = "SAM2 fine-tuned"
LABEL_KEPT = "SAM2 base, kept"
"""A fine-tune whose best checkpoint is its step 0 (no step improved on the initial model): the
base's weights, its disc prior (if any) re-fitted; "SAM2 fine-tuned" would claim training that
did not happen (found by a new-user check of the demo)."""
LABEL_DISC = "disc prior (no image)"
"""The no-image reference row of an evaluation: at each of SAM2's prompts, a disc of the
training cells' mean radius (:func:`calseg.segment.model.run_decoder` ``prior_mode="disc"``)."""
RANDOM_SUFFIX = " (random weights)"
PRIOR_SUFFIX = " + disc prior"
"""Added to the name of a SAM2 whose masks are a learned correction of a disc
(``mask_prior="residual"``) or prompted by one (``"prompt"``)."""
PRIOR_MODES = ("residual", "prompt")
"""The ``mask_prior`` modes whose masks build on a disc at the prompt (a model's
``prior_mode``): named with :data:`PRIOR_SUFFIX`, and not runnable in video mode."""
DISC = "disc"
MODEL_JOB_REASON = "SAM2: model_job_id names a fine-tune job's model"
"""Why an infer job with a ``model_job_id`` runs SAM2. Neutral: whether that model was
fine-tuned or kept its base (:data:`LABEL_KEPT`) is said by the model's label."""
EVALUATION_SUFFIX = ".evaluation.json"

WeightsKind = Literal["random", "pretrained", "trained here"]


def canonical_method(name: str) -> str:
    """``"baseline" -> "classical"``; other names unchanged (validation happens elsewhere)."""
    return METHOD_ALIASES.get(name, name)


@dataclass(frozen=True)
class CheckpointSummary:
    """What a SAM2 checkpoint is, without building the model.

    ``weights``: ``"random"`` (no checkpoint, or decoder/LoRA trained on a random-weight
    encoder), ``"pretrained"`` (a SAM2 release or a CalSeg checkpoint fine-tuned from one) or
    ``"trained here"`` (a CalSeg checkpoint whose whole image encoder was trained, from random
    initialisation); ``finetuned``: a CalSeg fine-tuned checkpoint; ``sha256``: of the file
    (``None`` without a file); ``label``: :func:`model_label` of it; ``prior``: it was
    fine-tuned with a disc prior (its masks add to, or are prompted by, a disc at the prompt).
    """

    path: str | None
    sha256: str | None
    weights: WeightsKind
    finetuned: bool
    label: str
    prior: bool = False

    @property
    def random_weights(self) -> bool:
        """Whether masks from this model are meaningless (random-weight encoder)."""
        return self.weights == "random"


def model_label(
    finetuned: bool, random_weights: bool, prior: bool = False, kept: bool = False
) -> str:
    """``"SAM2 fine-tuned"`` / ``"SAM2 untuned"`` (``"SAM2 base, kept"``: a fine-tune that
    kept its initial model, ``kept``), + ``" + disc prior"`` when its masks build on a disc
    prior, + ``" (random weights)"`` when random."""
    name = (LABEL_KEPT if kept else LABEL_FINETUNED) if finetuned else LABEL_UNTUNED
    return name + (PRIOR_SUFFIX if prior else "") + (RANDOM_SUFFIX if random_weights else "")


def label_of_result(method: str, model_info: dict | None) -> str:
    """The name of the model behind a segmentation result: ``"classical"`` for the classical
    method, else :func:`model_label` from its :class:`calseg.segment.model.ModelInfo` dict
    (``finetuned_from`` set = fine-tuned; random weights as :func:`summarise_checkpoint`)."""
    if canonical_method(method) == CLASSICAL:
        return LABEL_CLASSICAL
    info = model_info or {}
    finetuned = info.get("finetuned_from") is not None
    random = bool(info.get("random_weights")) and info.get("train_mode") != "full"
    if not info:
        random = True
    kept = finetuned and info.get("finetune_step") == 0
    return model_label(finetuned, random, info.get("prior_mode") in PRIOR_MODES, kept)


def label_of_finetune(params: dict, result: dict | None) -> str:
    """The name of a finetune job's model (:func:`model_label`) from its parameters and result:
    ``"SAM2 base, kept"`` when its best checkpoint is step 0 (``result["best_step"]``), random
    weights when its base had them (``result["model_info"]``) and only the decoder or LoRA was
    trained, ``" + disc prior"`` for ``mask_prior`` ``"residual"`` / ``"prompt"``."""
    result = result or {}
    info = result.get("model_info") or {}
    random = bool(info.get("random_weights", True)) and params.get("train_mode") != "full"
    prior = params.get("mask_prior") in PRIOR_MODES
    return model_label(True, random, prior, kept=result.get("best_step") == 0)


def _sha256_of(path: Path) -> str:
    """sha256 of a checkpoint: its ``<file>.sha256`` sidecar when newer than the file (written
    by :func:`calseg.segment.model.save_finetuned`), else computed."""
    side = path.with_name(path.name + ".sha256")
    try:
        if side.is_file() and side.stat().st_mtime >= path.stat().st_mtime:
            text = side.read_text().split()
            if text and len(text[0]) == 64:
                return text[0].lower()
    except OSError:
        pass
    from calseg.segment.model import file_sha256

    return file_sha256(path)


@lru_cache(maxsize=32)
def _summary_cached(path: str, mtime_ns: int, size: int) -> CheckpointSummary:  # noqa: ARG001
    from calseg.segment.model import FINETUNE_FORMAT, _torch_load

    p = Path(path)
    obj = _torch_load(p)
    if obj.get("format") == FINETUNE_FORMAT:
        meta = obj.get("metadata") or {}
        base_random = meta.get("base_random_weights")
        if base_random is None:  # written before the flag existed
            base_random = meta.get("base_checkpoint") is None
        if not base_random:
            weights: WeightsKind = "pretrained"
        elif meta.get("train_mode") == "full":
            weights = "trained here"
        else:
            weights = "random"
        # a SAM2 trained here from scratch (calseg pretrain, e.g. the bundled small SAM2) is
        # a base to fine-tune, i.e. "SAM2 untuned"; its fine-tunes are "SAM2 fine-tuned"
        finetuned = not meta.get("pretrain")
        kept = finetuned and meta.get("step") == 0  # no step improved on the initial model
        prior_meta = meta.get("mask_prior") or {}
        prior = (
            prior_meta.get("mode") in PRIOR_MODES and prior_meta.get("radius_model_px") is not None
        )
    else:
        weights, finetuned, prior, kept = "pretrained", False, False, False
    return CheckpointSummary(
        path,
        _sha256_of(p),
        weights,
        finetuned,
        model_label(finetuned, weights == "random", prior, kept),
        prior,
    )


def summarise_checkpoint(checkpoint: str | Path | None) -> CheckpointSummary:
    """:class:`CheckpointSummary` of a checkpoint file (``None``: random weights; a hub id
    ``hf:...``: a SAM2 release). Cached per file path, size and modification time.

    Raises:
        calseg.segment.model.ModelLoadError: the file is missing or not a checkpoint.
    """
    if checkpoint is None:
        return CheckpointSummary(None, None, "random", False, model_label(False, True))
    text = str(checkpoint)
    if text.startswith("hf:"):
        return CheckpointSummary(text, None, "pretrained", False, model_label(False, False))
    p = Path(text).expanduser()
    if not p.is_file():
        from calseg.segment.model import ModelLoadError

        raise ModelLoadError(f"SAM2 checkpoint {p} not found")
    st = p.stat()
    return _summary_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class MethodChoice:
    """The outcome of the default rule: ``method`` (``"classical"`` or ``"sam2"``),
    ``checkpoint`` (for SAM2), ``label`` (the model's one name), ``reason`` (one sentence, for
    people) and ``evidence`` (the compared means, when a report was read)."""

    method: str
    checkpoint: str | None
    label: str
    reason: str
    evidence: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return asdict(self)


def _means(summary: dict[str, Any]) -> tuple[float | None, float | None, list | None]:
    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    return num(summary.get("f1_mean")), num(summary.get("iou_mean")), summary.get("f1_ci95")


def compare_with_classical(report: dict[str, Any], sha256: str | None) -> tuple[bool, str, dict]:
    """Condition 2 and 3 of the rule on one evaluation report (module docstring).

    Args:
        report: :meth:`EvaluationReport.to_dict` of a ``calseg evaluate`` run.
        sha256: the candidate checkpoint's sha256 (its SAM2 entry in ``report["models"]``).

    Returns:
        ``(better, reason, evidence)``: whether the SAM2 model beat the classical method,
        one sentence why (not), and the means compared.
    """
    models = report.get("models") or {}
    methods = {r.get("model"): canonical_method(str(r.get("method"))) for r in report["rows"]}
    summary = {s.get("model"): s for s in report.get("summary") or []}
    sam = next(
        (
            n
            for n, info in models.items()
            if info
            and sha256
            and str(info.get("checkpoint_sha256") or "").lower() == sha256
            and methods.get(n, SAM2) == SAM2  # not its disc-prior row (same file, no image)
        ),
        None,
    )
    classical = next((n for n, m in methods.items() if m == CLASSICAL), None)
    if sam is None:
        return False, "its evaluation report does not score this checkpoint (sha256)", {}
    if classical is None or classical not in summary or sam not in summary:
        return False, "its evaluation report has no classical row to compare with", {}
    f1, iou, ci = _means(summary[sam])
    f1c, iouc, _ = _means(summary[classical])
    ev = {
        "split": report.get("split"),
        "n_videos": summary[sam].get("n_videos"),
        "sam2": {"f1_mean": f1, "iou_mean": iou, "f1_ci95": ci},
        "classical": {"f1_mean": f1c, "iou_mean": iouc},
    }
    if None in (f1, iou, f1c, iouc):
        return False, "its evaluation report lacks F1 or IoU means", ev
    nums = f"F1 {f1:.3f} vs {f1c:.3f}, IoU {iou:.3f} vs {iouc:.3f}"
    if not (f1 > f1c and iou > iouc):
        return False, f"it did not beat the classical method on held-out videos ({nums})", ev
    if ci is not None and not (float(ci[0]) > f1c):
        return (
            False,
            f"its F1 CI [{float(ci[0]):.3f}, {float(ci[1]):.3f}] does not clear the classical "
            f"F1 {f1c:.3f}",
            ev,
        )
    return True, f"it beat the classical method on held-out videos ({nums})", ev


def _training_record_scores(checkpoint: Path) -> str | None:
    """The held-out F1 of a checkpoint and of classical from its training record
    (``<stem>.pretrain.json`` beside it, written by :mod:`calseg.pipelines.pretrain`, e.g. the
    bundled small SAM2), as one clause; ``None`` without a readable record."""
    record = checkpoint.with_name(checkpoint.stem + ".pretrain.json")
    try:
        per_model = json.loads(record.read_text())["heldout"]["per_model"]
        ours = next(v for k, v in per_model.items() if "trained here" in k)
        base = per_model[LABEL_CLASSICAL]
        n = int(ours["n_videos"])
        return (
            f"its held-out F1 was {float(ours['f1']):.3f} against classical's "
            f"{float(base['f1']):.3f} on {n} simulated videos ({record.name})"
        )
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def evaluation_path(checkpoint: str | Path) -> Path:
    """Where the evaluation report of a checkpoint lives: ``<checkpoint>.evaluation.json``."""
    p = Path(checkpoint)
    return p.with_name(p.name + EVALUATION_SUFFIX)


def best_method(checkpoint: str | Path | None) -> MethodChoice:
    """The default method on this server, by the rule of the module docstring.

    Args:
        checkpoint: the SAM2 checkpoint configured (``Settings.sam2_checkpoint`` /
            ``$CALSEG_SAM2_CHECKPOINT``, or the CLI's ``--checkpoint``); ``None`` = none.

    Returns:
        :class:`MethodChoice`; ``method`` is ``"classical"`` unless the checkpoint qualifies.
        A checkpoint that cannot be read gives classical with the reason. Nothing is loaded
        with torch: the weights' kind comes from the evaluation report's model entry whose
        sha256 is the file's (so the api process stays light).
    """

    def classical(reason: str, evidence: dict | None = None) -> MethodChoice:
        return MethodChoice(CLASSICAL, None, LABEL_CLASSICAL, f"classical: {reason}", evidence)

    if checkpoint is None:
        return classical(
            "no SAM2 weights are configured (CALSEG_SAM2_CHECKPOINT), and SAM2 with random "
            "weights finds no cells"
        )
    name = Path(str(checkpoint)).name
    if str(checkpoint).startswith("hf:"):
        return classical(f"the hub model {checkpoint} has no evaluation report here")
    path = Path(str(checkpoint)).expanduser()
    # the reason is shown on the page to every user: file names, not the server's folders
    if not path.is_file():
        return classical(f"the configured SAM2 checkpoint {name} does not exist")
    report_path = evaluation_path(path)
    if not report_path.is_file():
        how = (
            f"SAM2 becomes the default once an evaluation report beside {name} "
            f"({report_path.name}: calseg evaluate DATASET --model CHECKPOINT --out "
            "CHECKPOINT.evaluation.json) shows it beats classical; method sam2 runs it now"
        )
        trained = _training_record_scores(path)
        if trained:
            return classical(f"when {name} was trained, {trained}. {how}")
        return classical(f"no evaluation report compares {name} with classical. {how}")
    try:
        sha = _sha256_of(path)
        report = json.loads(report_path.read_text())
        info = next(
            (
                i
                for i in (report.get("models") or {}).values()
                if i and str(i.get("checkpoint_sha256") or "").lower() == sha
            ),
            None,
        )
        if info is None:
            return classical(f"{report_path.name} does not score this file (sha256 {sha[:12]}...)")
        label = label_of_result(SAM2, info)
        if label.endswith(RANDOM_SUFFIX):
            return classical(f"{name} is {label}")
        better, why, evidence = compare_with_classical(report, sha)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return classical(f"{report_path.name} unreadable ({exc})")
    if not better:
        return classical(f"{label}: {why}", evidence)
    return MethodChoice(SAM2, str(path), label, f"{label}: {why}", evidence)


def evaluation_models(
    finetuned: str | Path | None, base: str | Path | None, *, untuned: bool = True
) -> dict[str, tuple[str, str | Path | None]]:
    """The ``models`` mapping of :func:`calseg.segment.evaluate.evaluate_dataset` under their
    one names: ``{"SAM2 fine-tuned[ + disc prior][ (random weights)]": ("sam2", finetuned),
    "disc prior (no image)": ("disc", finetuned), "SAM2 untuned[ (random weights)]": ("sam2",
    base), "classical": ("classical", None)}`` (the fine-tuned row only when given; the disc
    row when it was fine-tuned with a disc prior: the reference its training must beat; the
    untuned row unless ``untuned=False``)."""

    def summary(ckpt: str | Path | None) -> CheckpointSummary | None:
        try:
            return summarise_checkpoint(ckpt)
        except Exception:  # noqa: BLE001 - the evaluation itself reports a missing file
            return None

    def label(s: CheckpointSummary | None, ckpt: str | Path | None, finetuned_row: bool) -> str:
        return s.label if s is not None else model_label(finetuned_row, ckpt is None)

    models: dict[str, tuple[str, str | Path | None]] = {}
    if finetuned is not None:
        s = summary(finetuned)
        models[label(s, finetuned, True)] = (SAM2, finetuned)
        if s is not None and s.prior:
            models[LABEL_DISC] = (DISC, finetuned)
    if untuned:
        models[label(summary(base), base, False)] = (SAM2, base)
    models[LABEL_CLASSICAL] = (CLASSICAL, None)
    return models


def resolve_method(
    method: str, *, model_job_id: str | None, checkpoint: str | Path | None
) -> tuple[str, str]:
    """The method an infer job runs and why: ``(method, reason)`` with method ``"classical"``
    or ``"sam2"``. ``"auto"`` is SAM2 when ``model_job_id`` names a fine-tuned model, else
    :func:`best_method` of the configured ``checkpoint``; an explicit method is honoured
    (``"baseline"`` is read as ``"classical"``). The one rule for the infer runner and its
    cost estimate (:mod:`calseg.service.costs`), so that a job is estimated as it will run."""
    method = canonical_method(method)
    if method != AUTO:
        return method, f"{method}: asked for"
    if model_job_id:
        return SAM2, MODEL_JOB_REASON
    choice = best_method(checkpoint)
    return choice.method, choice.reason
