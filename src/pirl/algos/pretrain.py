"""Grounding pretraining of a policy's prefix (the "VLM"), before few-shot SFT.

pi0's prefix is a pretrained vision-language model (PaliGemma, whose pretraining includes
localising what a text names); pi_RL keeps it frozen during RL.  A from-scratch tiny VLA has
no such prefix: few-shot SFT fits its image encoder to a handful of demos, and that prefix then
caps what RL on the action expert can reach (docs/experiments.md, "Why RL stops at ~85%").
This stage gives the tiny prefix the analogous, action-free skill: from the images +
instruction (+ state) tokens, predict *where* the instruction's object and place are, and
where the gripper is.

Data are observations of the env under some behaviour (a noisy scripted controller here, i.e.
play data; its actions are never a training target) with the env's scene annotation
``points [B, Q, 2]``.  A small head -- ``Q`` learned queries attending over the prefix tokens,
the way the action expert reads the prefix -- regresses the points; it is thrown away after
pretraining.  Loss: mean squared error over points and coordinates.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from pirl.algos.sft import lr_lambda
from pirl.models.base import FlowPolicy


class GroundingHead(nn.Module):
    """``Q`` learned queries, one cross-attention over the prefix tokens, a linear read-out.

    ``forward(tokens [B, P, D], mask [B, P] bool) -> points [B, Q, 2]``.
    """

    def __init__(self, dim: int, num_points: int, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_points, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        h, _ = self.attn(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return self.out(self.norm(h + q))


def with_relative_offset(points: torch.Tensor, scale: float) -> torch.Tensor:
    """Append the object's offset from the gripper to scene points ``[B, 3, 2]`` (object, place,
    gripper) as a fourth point, ``tanh(scale * (object - gripper))`` per coordinate ->
    ``[B, 4, 2]``: a relational target whose error counts most near contact (where tanh is
    steepest, slope ``scale``) and saturates far away."""
    if points.dim() != 3 or points.shape[1] < 3 or points.shape[2] != 2:
        raise ValueError(f"points must be [B, >=3, 2] (object, place, gripper, ...), "
                         f"got {tuple(points.shape)}")
    rel = torch.tanh(scale * (points[:, 0] - points[:, 2]))
    return torch.cat([points, rel[:, None]], dim=1)


def prefix_tokens(policy: FlowPolicy, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix tokens ``[B, P, D]`` and mask ``[B, P]`` of ``policy.encode_prefix(obs)``."""
    prefix = policy.encode_prefix(obs)
    tokens, mask = getattr(prefix, "tokens", None), getattr(prefix, "mask", None)
    if not isinstance(tokens, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"grounding pretraining needs a prefix with .tokens [B, P, D] and .mask "
                        f"[B, P]; {type(policy).__name__}'s prefix is {type(prefix).__name__}")
    return tokens, mask


def grounding_loss(policy: FlowPolicy, head: GroundingHead, obs: dict[str, Any],
                   points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of ``head``'s points from the prefix of ``obs`` against ``points
    [B, Q, 2]``, and the predictions ``[B, Q, 2]``."""
    tokens, mask = prefix_tokens(policy, obs)
    pred = head(tokens, mask)
    return (pred - points).pow(2).mean(), pred


def pretrain_grounding(policy: FlowPolicy, env, act: Callable[[], torch.Tensor],
                       points: Callable[[], torch.Tensor], *, steps: int, lr: float = 1e-3,
                       weight_decay: float = 1e-4, grad_clip: float = 1.0,
                       warmup_steps: int = 100, burn_in: int = 24, seed: int = 0,
                       callback: Callable[[int, dict[str, float]], None] | None = None
                       ) -> dict[str, Any]:
    """Train the prefix of ``policy`` (and a fresh :class:`GroundingHead`) for ``steps`` steps.

    ``env`` must auto-reset; every step acts with ``act() -> [N, A]``, then trains on the new
    observation batch (all ``N`` envs) against ``points() -> [N, Q, 2]`` of the same state.
    ``burn_in`` env steps first spread the envs over their episodes.  Only the parameters in
    ``policy.prefix_parameter_names()`` (that require grad) change.  The lr warms up linearly,
    then decays with a cosine to 10% (SFT's schedule).  ``seed`` seeds the env's reset and
    torch's global RNG (the head's initialisation), so the stage is reproducible.  Returns
    ``{"head": GroundingHead, "losses": [...], "error": [Q] mean Euclidean error over the last
    10% of the steps}``.
    """
    named = dict(policy.named_parameters())
    params = [named[n] for n in policy.prefix_parameter_names() if named[n].requires_grad]
    if not params:
        raise ValueError("grounding pretraining: the policy has no trainable prefix parameter")
    device = params[0].device
    obs = env.reset(seed=seed)
    q = points().shape[1]
    torch.manual_seed(seed)
    head = GroundingHead(policy.feature_dim, q).to(device)
    trainable = params + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup_steps, steps))
    for _ in range(burn_in):
        obs = env.step(act()).obs
    was_training = policy.training
    policy.train()
    losses: list[float] = []
    errors: list[torch.Tensor] = []
    try:
        for step in range(steps):
            obs = env.step(act()).obs
            target = points().to(device)
            loss, pred = grounding_loss(policy, head, obs, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            err = (pred.detach() - target).norm(dim=-1).mean(0)  # [Q]
            if step >= steps - max(1, steps // 10):
                errors.append(err)
            if callback is not None:
                callback(step, {"loss": losses[-1]} | {f"error_{i}": float(e)
                                                       for i, e in enumerate(err)})
    finally:
        policy.train(was_training)
    error = torch.stack(errors).mean(0) if errors else torch.zeros(q)
    return {"head": head, "losses": losses, "error": error}
