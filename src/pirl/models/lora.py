"""A small LoRA implementation (low-rank adapters on ``nn.Linear``).

Why our own instead of ``peft``: peft pulls ``transformers`` and ``accelerate`` and wraps models
in its own ``PeftModel`` class, which would hide pirl's :class:`~pirl.models.base.FlowPolicy`
interface; LoRA on a Linear is a few lines.  ``W x + (alpha / r) * B A x`` with ``A`` Kaiming-
initialised and ``B = 0`` (so a freshly adapted model computes exactly what the base model does).

The wrapped layer keeps the base ``weight`` / ``bias`` under ``base.`` and adds ``lora_A`` /
``lora_B``; :func:`merge_lora` folds the adapters back into plain Linears (for export).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ A^T) @ B^T``; A: ``[r, in]``, B: ``[out, r]``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # so callers reading .weight.dtype keep working
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + self.scale * delta

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def apply_lora(module: nn.Module, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
               target: str = DEFAULT_TARGETS) -> list[str]:
    """Replace every ``nn.Linear`` under ``module`` whose qualified name matches the regex
    ``target`` by a :class:`LoRALinear`.  Returns the wrapped names (error if none matched)."""
    pat = re.compile(target)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and pat.search(n)]
    if not names:
        raise ValueError(f"LoRA target {target!r} matched no Linear layer")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRALinear under ``module`` back into a plain Linear; returns how many."""
    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, getattr(parent, child).merged())
    return len(names)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A`` / ``lora_B``) under ``module``."""
    return [p for n, p in module.named_parameters() if n.endswith(("lora_A", "lora_B"))]
