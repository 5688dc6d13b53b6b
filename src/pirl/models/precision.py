"""Compute precision of a policy's forward passes (the run's ``precision`` field).

``"fp32"``: everything in float32.  ``"bf16"``: the policy's matmuls, convolutions and attention
run under ``torch.autocast(dtype=torch.bfloat16)``; parameters, gradients and optimiser state
stay float32 (autocast casts a bf16 copy of each weight per forward), and every
:class:`~pirl.models.base.FlowPolicy` method returns float32 velocities, features and values,
so the denoising chain, its log-probs and everything RL computes from them stay float32
(docs/method.md, "Precision").  ``"auto"``: bf16 where the hardware runs it fast (a CUDA device,
or a CPU with AMX or AVX512-BF16 instructions), else fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags (Linux /proc/cpuinfo) of native bf16 matmul instructions
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 CPU flags present (``amx_bf16`` / ``avx512_bf16``); () when none or
    when ``/proc/cpuinfo`` is unreadable (non-Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return tuple(f for f in _BF16_CPU_FLAGS if f in flags)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``torch.bfloat16`` or None (float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_bf16_flags()):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"`` / ``"fp32"`` for an autocast dtype from :func:`resolve_precision`."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context when None (so the
    float32 path is the plain one, bit for bit)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a reduced-precision float (bf16 / fp16), else unchanged (a
    float32 or float64 tensor passes through as the same object)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
