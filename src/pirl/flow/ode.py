"""Deterministic Euler ODE sampler (evaluation): ``x_{k+1} = x_k - v(x_k, t_k) * dt_k``."""

from __future__ import annotations

import torch

from pirl.flow.common import GaussianChainSampler


class ODESampler(GaussianChainSampler):
    """Euler integration of the learned flow.  Every step is deterministic (std 0), so the chain
    log-prob is 0 and carries no information; use it for evaluation and SFT sanity checks."""

    includes_init = False

    def __init__(self, num_steps: int = 4):
        super().__init__(num_steps)

    def transition(self, x, out, t, t_next, stochastic):
        dt = (t - t_next).view(-1, 1, 1)
        mean = x - out.velocity * dt
        return mean, torch.zeros_like(mean)

    def stochastic_mask(self, batch, device, generator=None):
        return torch.zeros(batch, self.num_steps, dtype=torch.bool, device=device)
