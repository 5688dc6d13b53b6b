"""Sampler interface: turn a policy's velocity field into action chunks with log-probs.

A sampler integrates the flow from noise (``t=1``) to action (``t=0``) on the grid
``t_k = linspace(1, 1/K, K)`` followed by ``0`` (:func:`pirl.flow.schedule.time_grid`).  The
denoising chain ``x_0 (noise) -> x_1 -> ... -> x_K (action)`` is an inner MDP whose transitions
are Gaussian for the stochastic samplers; their exact log-likelihood is what PPO / GRPO need.

Every sampler returns a :class:`Chain` from :meth:`Sampler.sample` and can recompute the log-prob
of a stored chain under the current parameters with :meth:`Sampler.log_prob` (at unchanged
parameters it reproduces the rollout's log-prob exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Chain:
    """One batch of denoising chains.

    x: ``[B, K+1, H, A]`` the states; ``x[:, 0]`` is the initial noise, ``x[:, K]`` the action chunk.
    t: ``[K+1]`` the time grid (``t[0] = 1``, ``t[K] = 0``).
    mean: ``[B, K, H, A]`` transition means (for deterministic steps: the ODE update).
    std: ``[B, K, H, A]`` transition stds (0 on deterministic steps).
    stochastic: ``[B, K]`` bool, which transitions were sampled (and count in the log-prob).
    step_logp: ``[B, K, H, A]`` per-element Gaussian log-probs of the transitions (0 where
        deterministic).
    init_logp: ``[B, H, A]`` log N(x_0; 0, I) per element (counted only by joint samplers,
        see :attr:`Sampler.includes_init`).
    logp: ``[B]`` the chain's log-likelihood (sum over counted transitions and elements;
        aggregation for the PPO ratio is the algorithm's choice, see ``pirl.algos``).
    """

    x: torch.Tensor
    t: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    stochastic: torch.Tensor
    step_logp: torch.Tensor
    init_logp: torch.Tensor
    logp: torch.Tensor

    @property
    def actions(self) -> torch.Tensor:
        """The final action chunk ``[B, H, A]``."""
        return self.x[:, -1]

    def index(self, idx: torch.Tensor) -> "Chain":
        """Rows ``idx`` (``t`` is shared)."""
        return Chain(*(getattr(self, f).index_select(0, idx) if f != "t" else self.t
                       for f in ("x", "t", "mean", "std", "stochastic", "step_logp",
                                 "init_logp", "logp")))


class Sampler(nn.Module):
    """Base class.  Samplers are modules because Flow-Noise owns a trainable noise network.

    ``includes_init``: whether the chain log-prob counts ``log N(x_0; 0, I)`` (joint mode).
    """

    includes_init: bool = False

    def __init__(self, num_steps: int):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps

    def sample(self, policy, prefix: Any, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> Chain:
        """Sample a chain for a batch of cached prefixes.  noise: optional ``[B, H, A]`` x_0."""
        raise NotImplementedError

    def log_prob(self, policy, prefix: Any, chain: Chain) -> Chain:
        """Recompute means / stds / log-probs of the stored states ``chain.x`` (and the same
        ``chain.stochastic`` mask) under the current parameters; differentiable."""
        raise NotImplementedError
