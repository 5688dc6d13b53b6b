"""Few-shot supervised fine-tuning with the flow-matching loss (the RL starting policy).

The data are (observation, action chunk) pairs: ``obs`` a batched dict (``images [M, C, 3, h, w]``
uint8, ``state [M, S]``, ``instruction`` list of M str), ``actions [M, H, A]`` and an optional
validity mask ``[M, H]`` (chunks that run past the episode end are padded).  The loss is the
policy's conditional flow-matching loss (:func:`pirl.models.base.flow_matching_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pirl.models.base import FlowPolicy, index_batch


@dataclass
class SFTData:
    """Flattened SFT samples; see module docstring for shapes."""

    obs: dict[str, Any]
    actions: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.actions.shape[0]


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train_sft(policy: FlowPolicy, data: SFTData, *, steps: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, grad_clip: float = 1.0, warmup_steps: int = 0,
              generator: torch.Generator | None = None,
              callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``policy`` for ``steps`` minibatch steps; return the loss of every step.

    Minibatches are drawn uniformly (with a ``generator`` for reproducibility); the optimiser is
    AdamW over the policy's trainable parameters.
    """
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup_steps, steps))
    policy.train()
    losses: list[float] = []
    m = len(data)
    for step in range(steps):
        idx = torch.randint(0, m, (min(batch_size, m),), generator=generator)
        obs = index_batch(data.obs, idx)
        obs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}
        actions = data.actions.index_select(0, idx).to(device)
        mask = data.mask.index_select(0, idx).to(device) if data.mask is not None else None
        loss = policy.sft_loss(obs, actions, mask=mask, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    return losses
