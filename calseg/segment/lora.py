"""Low-rank adaptation (LoRA; Hu et al. 2021, arXiv:2106.09685) of SAM2's image encoder.

A frozen ``nn.Linear`` ``W`` (out x in) becomes ``y = W x + b + (alpha / r) * B (A x)`` with
``A`` (r x in, Kaiming-uniform init as in the paper's reference code) and ``B`` (out x r,
zeros), so training starts exactly at the base model. CalSeg adapts the attention ``qkv``
projections of every Hiera block (``image_encoder.trunk.blocks.*.attn.qkv``, 12 layers in
``sam2.1_hiera_t``); only ``A`` and ``B`` are trained (about 0.1 M parameters at r = 4 for the
tiny model, vs 27 M in the encoder).

Consequence for fine-tuning: the encoder changes every step, so image embeddings cannot be
cached; each training step re-encodes its frames with gradients (about 15x slower per step on
CPU than cached embeddings, see BENCHMARKS.md). A fine-tuned checkpoint stores only the LoRA
factors; loading merges them into the weights (``W += (alpha / r) B A``), so inference costs
nothing extra and the merged encoder gets its own embedding-cache key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_TARGETS = ("attn.qkv",)


def _lora_linear_class():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """``base(x) + scale * (x @ A.T) @ B.T``; ``base`` frozen."""

        def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
            super().__init__()
            self.base = base
            self.rank = int(rank)
            self.scale = float(alpha) / float(rank)
            dev, dt = base.weight.device, base.weight.dtype
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            for p in self.base.parameters():
                p.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

        def merged(self) -> nn.Linear:
            """The base Linear with ``scale * B @ A`` added to its weight."""
            with torch.no_grad():
                self.base.weight += (self.lora_B @ self.lora_A * self.scale).to(
                    self.base.weight.dtype
                )
            return self.base

    return LoRALinear


def apply_lora(
    model: torch.nn.Module,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    prefix: str = "image_encoder.",
) -> list[str]:
    """Wrap every ``nn.Linear`` under ``prefix`` whose name ends with one of ``targets``.

    Args:
        model: SAM2Base (modified in place).
        rank: LoRA rank r (>= 1).
        alpha: LoRA scaling numerator (update scaled by alpha / r).
        targets: module-name suffixes to adapt.
        prefix: module-name prefix (the image encoder).

    Returns:
        Names of the wrapped modules (their parameters ``<name>.lora_A``/``.lora_B``).

    Raises:
        ValueError: bad rank, or no module matched (the config has no such layer).
    """
    from torch import nn

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cls = _lora_linear_class()
    names = [
        n
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, nn.Linear) and n.endswith(targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear named '{prefix}*{targets}' in this model")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, cls(getattr(parent, child), rank, alpha))
    return names


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of all LoRA factors (``*.lora_A``, ``*.lora_B``)."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the LoRA factors (what a checkpoint stores)."""
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(model).items()}


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every LoRA wrapper into its base Linear (in place). Returns the count merged."""
    cls_name = "LoRALinear"
    names = [n for n, m in model.named_modules() if type(m).__name__ == cls_name]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merged())
    return len(names)


def load_lora(
    model: torch.nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float
) -> int:
    """Apply LoRA with the checkpoint's rank/alpha, load its factors, merge. Returns count.

    Raises:
        ValueError: the factors do not match this model's layers.
    """
    names = apply_lora(model, rank, alpha)
    params = lora_parameters(model)
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"LoRA factors do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    import torch

    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))
    merge_lora(model)
    return len(names)
