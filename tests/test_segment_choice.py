"""The default-method rule and the one name of each model (calseg.segment.choice)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from calseg.segment.choice import (
    CLASSICAL,
    LABEL_DISC,
    SAM2,
    best_method,
    canonical_method,
    evaluation_models,
    evaluation_path,
    label_of_finetune,
    label_of_result,
    model_label,
    summarise_checkpoint,
)


def _ckpt(tmp_path: Path, content: bytes = b"weights") -> tuple[Path, str]:
    p = tmp_path / "model.pt"
    p.write_bytes(content)
    return p, hashlib.sha256(content).hexdigest()


def _report(ckpt: Path, sha: str, sam2: dict, classical: dict, info: dict | None = None) -> None:
    """An evaluation report as calseg evaluate --out writes it (EvaluationReport.to_dict)."""
    info = {"checkpoint_sha256": sha, "random_weights": False, "finetuned_from": "sam2.pt",
            "train_mode": "decoder", **(info or {})}  # fmt: skip
    rep = {
        "split": "test",
        "models": {"SAM2 fine-tuned": info, "classical": None},
        "rows": [
            {"model": "SAM2 fine-tuned", "method": "sam2"},
            {"model": "classical", "method": "baseline"},  # the old name in older reports
        ],
        "summary": [
            {"model": "SAM2 fine-tuned", "n_videos": 4, **sam2},
            {"model": "classical", "n_videos": 4, **classical},
        ],
    }
    evaluation_path(ckpt).write_text(json.dumps(rep))


def test_no_weights_means_classical() -> None:
    c = best_method(None)
    assert c.method == CLASSICAL and c.label == "classical"
    assert "CALSEG_SAM2_CHECKPOINT" in c.reason


def test_unmeasured_or_missing_checkpoint_means_classical(tmp_path: Path) -> None:
    ckpt, _ = _ckpt(tmp_path)
    c = best_method(ckpt)
    assert c.method == CLASSICAL and "no evaluation report compares model.pt" in c.reason
    assert f"({evaluation_path(ckpt).name}: calseg evaluate" in c.reason  # how to measure it
    assert str(tmp_path) not in c.reason  # shown on the page: no server folders
    assert best_method(tmp_path / "nope.pt").method == CLASSICAL


def test_an_unmeasured_checkpoint_quotes_its_training_record() -> None:
    """The bundled small SAM2 has no evaluation report; the reason quotes the held-out scores
    of its training record instead of reading like a forgotten setup step (new-user check)."""
    from calseg.segment.model import BUNDLED_SMALL_CHECKPOINT

    record = json.loads(
        BUNDLED_SMALL_CHECKPOINT.with_name("sam2_small_calseg.pretrain.json").read_text()
    )["heldout"]["per_model"]
    c = best_method(BUNDLED_SMALL_CHECKPOINT)
    assert c.method == CLASSICAL
    assert f"held-out F1 was {record['SAM2 small (trained here)']['f1']:.3f}" in c.reason
    assert f"against classical's {record['classical']['f1']:.3f}" in c.reason
    assert "method sam2 runs it now" in c.reason  # the setting, for the page and the CLI


def test_measured_better_sam2_becomes_the_default(tmp_path: Path) -> None:
    ckpt, sha = _ckpt(tmp_path)
    _report(ckpt, sha, {"f1_mean": 0.8, "iou_mean": 0.7, "f1_ci95": [0.75, 0.85]},
            {"f1_mean": 0.6, "iou_mean": 0.5})  # fmt: skip
    c = best_method(ckpt)
    assert c.method == SAM2 and c.checkpoint == str(ckpt) and c.label == "SAM2 fine-tuned"
    assert "F1 0.800 vs 0.600" in c.reason and c.evidence["classical"]["f1_mean"] == 0.6


@pytest.mark.parametrize(
    ("sam2", "classical", "info", "why"),
    [
        ({"f1_mean": 0.5, "iou_mean": 0.7}, {"f1_mean": 0.6, "iou_mean": 0.5}, None, "did not"),
        ({"f1_mean": 0.8, "iou_mean": 0.4}, {"f1_mean": 0.6, "iou_mean": 0.5}, None, "did not"),
        (
            {"f1_mean": 0.65, "iou_mean": 0.7, "f1_ci95": [0.55, 0.75]},
            {"f1_mean": 0.6, "iou_mean": 0.5},
            None,
            "CI",
        ),
        (  # a decoder trained on a random-weight encoder never qualifies, whatever it scored
            {"f1_mean": 0.9, "iou_mean": 0.9},
            {"f1_mean": 0.6, "iou_mean": 0.5},
            {"random_weights": True},
            "random weights",
        ),
    ],
)
def test_not_better_or_random_stays_classical(tmp_path, sam2, classical, info, why) -> None:
    ckpt, sha = _ckpt(tmp_path)
    _report(ckpt, sha, sam2, classical, info)
    c = best_method(ckpt)
    assert c.method == CLASSICAL and why in c.reason, c.reason


def test_encoder_trained_here_counts_as_real_weights(tmp_path: Path) -> None:
    ckpt, sha = _ckpt(tmp_path)
    _report(ckpt, sha, {"f1_mean": 0.8, "iou_mean": 0.7}, {"f1_mean": 0.6, "iou_mean": 0.5},
            {"random_weights": True, "train_mode": "full"})  # fmt: skip
    assert best_method(ckpt).method == SAM2


def test_a_report_about_another_file_is_no_evidence(tmp_path: Path) -> None:
    ckpt, sha = _ckpt(tmp_path)
    _report(ckpt, sha, {"f1_mean": 0.8, "iou_mean": 0.7}, {"f1_mean": 0.6, "iou_mean": 0.5})
    ckpt.write_bytes(b"other weights")  # the file changed after it was measured
    c = best_method(ckpt)
    assert c.method == CLASSICAL and "does not score this file" in c.reason


def test_names() -> None:
    assert canonical_method("baseline") == "classical" == canonical_method("classical")
    assert label_of_result("baseline", None) == "classical"
    assert label_of_result("sam2", {"random_weights": True}) == "SAM2 untuned (random weights)"
    assert label_of_result("sam2", {"random_weights": False}) == "SAM2 untuned"
    info = {"random_weights": True, "finetuned_from": "random-init(seed=0)"}
    assert label_of_result("sam2", info) == "SAM2 fine-tuned (random weights)"
    assert list(evaluation_models(None, None)) == ["SAM2 untuned (random weights)", "classical"]
    assert label_of_result("sam2", {**info, "prior_mode": "residual"}) == (
        "SAM2 fine-tuned + disc prior (random weights)"
    )
    assert model_label(True, False, prior=True) == "SAM2 fine-tuned + disc prior"


def test_a_finetune_job_that_kept_its_base_is_named_so() -> None:
    """The page and ``/api/models`` name a finetune job's model from its result: a job whose
    best checkpoint is step 0 trained nothing that was kept (a new-user check read "SAM2
    fine-tuned" on the Jobs table for such a model)."""
    pretrained = {"model_info": {"random_weights": False}}
    params = {"train_mode": "decoder", "mask_prior": "residual"}
    assert label_of_finetune(params, {**pretrained, "best_step": 0}) == (
        "SAM2 base, kept + disc prior"
    )
    assert label_of_finetune(params, {**pretrained, "best_step": 50}) == (
        "SAM2 fine-tuned + disc prior"
    )
    # a decoder trained on a random encoder is random; a full (from-scratch) training is not
    random = {"model_info": {"random_weights": True}, "best_step": 100}
    assert label_of_finetune({"train_mode": "decoder"}, random) == (
        "SAM2 fine-tuned (random weights)"
    )
    assert label_of_finetune({"train_mode": "full"}, random) == "SAM2 fine-tuned"
    assert label_of_finetune({}, None) == "SAM2 fine-tuned (random weights)"  # nothing known


def test_a_finetune_with_a_disc_prior_brings_its_no_image_row(tmp_path: Path) -> None:
    """evaluation_models adds "disc prior (no image)" for a checkpoint fine-tuned with a disc
    prior (the reference its training must beat), and only then."""
    import torch

    from calseg.segment.model import FINETUNE_FORMAT

    def save(name: str, prior: dict | None) -> Path:
        meta = {"base_random_weights": False, "train_mode": "decoder"}
        if prior is not None:
            meta["mask_prior"] = prior
        path = tmp_path / name
        torch.save({"format": FINETUNE_FORMAT, "metadata": meta}, path)
        return path

    with_prior = save("prior.pt", {"mode": "residual", "radius_model_px": 11.0})
    models = evaluation_models(with_prior, None)
    assert models == {
        "SAM2 fine-tuned + disc prior": ("sam2", with_prior),
        LABEL_DISC: ("disc", with_prior),
        "SAM2 untuned (random weights)": ("sam2", None),
        "classical": ("classical", None),
    }
    for name, prior in (("plain.pt", None), ("off.pt", {"mode": None, "radius_model_px": None})):
        path = save(name, prior)
        assert list(evaluation_models(path, None, untuned=False)) == [
            "SAM2 fine-tuned",
            "classical",
        ]


def test_checkpoint_kinds_read_from_the_file(tmp_path: Path) -> None:
    import torch

    from calseg.segment.model import FINETUNE_FORMAT

    plain = tmp_path / "sam2.pt"
    torch.save({"model": {}}, plain)
    assert summarise_checkpoint(plain).weights == "pretrained"
    assert summarise_checkpoint(plain).label == "SAM2 untuned"
    for meta, kind, label in (
        (
            {"base_checkpoint": None, "train_mode": "decoder"},
            "random",
            "SAM2 fine-tuned (random weights)",
        ),  # noqa: E501
        ({"base_random_weights": True, "train_mode": "full"}, "trained here", "SAM2 fine-tuned"),
        (
            {"base_checkpoint": "sam2.pt", "base_random_weights": False},
            "pretrained",
            "SAM2 fine-tuned",
        ),  # noqa: E501
    ):
        p = tmp_path / f"ft-{kind.replace(' ', '')}.pt"
        torch.save({"format": FINETUNE_FORMAT, "metadata": meta}, p)
        s = summarise_checkpoint(p)
        assert (s.weights, s.label, s.finetuned) == (kind, label, True)
    assert summarise_checkpoint(None).random_weights


def test_the_old_method_name_is_accepted_everywhere() -> None:
    from calseg.segment.infer import InferenceConfig
    from calseg.service.schemas import validate_params

    assert InferenceConfig(method="baseline").method == "classical"
    p = validate_params("infer", {"recording_id": "r", "method": "baseline"})
    assert p.method == "classical" and p.to_config().method == "classical"
    p = validate_params("infer", {"recording_id": "r"})  # the default: the rule decides
    assert p.method == "auto" and p.to_config("sam2").method == "sam2"


def test_resolve_method_is_the_runners_rule() -> None:
    """What an infer job runs (and is estimated as): auto with a fine-tuned model is SAM2,
    auto without weights is classical, explicit methods are honoured."""
    from calseg.segment.choice import resolve_method

    assert resolve_method("auto", model_job_id="j1", checkpoint=None)[0] == "sam2"
    method, reason = resolve_method("auto", model_job_id=None, checkpoint=None)
    assert method == "classical" and "no SAM2 weights" in reason
    assert resolve_method("baseline", model_job_id=None, checkpoint=None)[0] == "classical"
    assert resolve_method("sam2", model_job_id=None, checkpoint=None) == ("sam2", "sam2: asked for")


def test_the_disc_row_is_not_taken_for_the_checkpoint(tmp_path: Path) -> None:
    """A report's disc-prior row scores the same file (same sha256) without its image use: it
    never stands in for the SAM2 row when deciding the default method."""
    ckpt, sha = _ckpt(tmp_path)
    _report(ckpt, sha, {"f1_mean": 0.5, "iou_mean": 0.5}, {"f1_mean": 0.6, "iou_mean": 0.6})
    path = evaluation_path(ckpt)
    rep = json.loads(path.read_text())
    info = rep["models"]["SAM2 fine-tuned"]
    rep["models"] = {LABEL_DISC: dict(info, prior_mode="disc"), **rep["models"]}
    rep["rows"].insert(0, {"model": LABEL_DISC, "method": "disc"})
    rep["summary"].insert(0, {"model": LABEL_DISC, "n_videos": 4, "f1_mean": 0.9, "iou_mean": 0.9})
    path.write_text(json.dumps(rep))
    c = best_method(ckpt)
    assert c.method == CLASSICAL and "did not beat the classical method" in c.reason
    assert "F1 0.500 vs 0.600" in c.reason


def test_a_finetune_that_kept_its_initial_model_is_named_so(tmp_path: Path) -> None:
    """A fine-tune whose best checkpoint is step 0 (no step improved on the initial model)
    holds the base's weights: "SAM2 base, kept", in the evaluation rows (from the file) and
    in a segmentation's label (from its ModelInfo), so the page, the API and the demo do not
    call it fine-tuned (found by a new-user check of the demo)."""
    import torch

    from calseg.segment.choice import LABEL_KEPT
    from calseg.segment.model import FINETUNE_FORMAT

    for step, name in ((0, LABEL_KEPT), (150, "SAM2 fine-tuned"), (None, "SAM2 fine-tuned")):
        meta = {"base_random_weights": False, "train_mode": "decoder"}
        meta["mask_prior"] = {"mode": "residual", "radius_model_px": 11.0}
        if step is not None:
            meta["step"] = step
        path = tmp_path / f"ft{step}.pt"
        torch.save({"format": FINETUNE_FORMAT, "metadata": meta}, path)
        assert summarise_checkpoint(path).label == f"{name} + disc prior"
        assert f"{name} + disc prior" in evaluation_models(path, None)
        info = {"random_weights": False, "finetuned_from": "base.pt", "prior_mode": "residual"}
        assert label_of_result("sam2", {**info, "finetune_step": step}) == f"{name} + disc prior"
    # a base trained here (calseg pretrain) is untuned whatever its step
    pre = tmp_path / "pre.pt"
    torch.save({"format": FINETUNE_FORMAT, "metadata": {"pretrain": True, "step": 0}}, pre)
    assert summarise_checkpoint(pre).label.startswith("SAM2 untuned")
