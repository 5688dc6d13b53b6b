"""Shared test policies for the sampler tests.

:class:`GaussianFlow` is the exact flow between ``eps ~ N(0, I)`` (t = 1) and a diagonal Gaussian
action distribution ``a ~ N(mu, diag(s^2))`` (t = 0): with ``x_t = t eps + (1 - t) a`` the pair
``(x_t, eps - a)`` is jointly Gaussian, so ``v(x, t) = E[eps - a | x_t = x]`` is affine in ``x``:

    m_t = (1 - t) mu,   var_t = t^2 + (1 - t)^2 s^2,
    E[eps | x] = t (x - m_t) / var_t,   E[a | x] = mu + (1 - t) s^2 (x - m_t) / var_t.

``mu`` and ``log_s`` are parameters so gradients can be checked.  Features ``[B, H, A + 1]`` are
``[x, t]`` (what a Flow-Noise net reads).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pirl.models.base import FlowPolicy, VelocityOut


class GaussianFlow(FlowPolicy):
    def __init__(self, mu: list[float], s: list[float], horizon: int = 1):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.log_s = nn.Parameter(torch.tensor(s, dtype=torch.float64).log())
        self.action_horizon = horizon
        self.action_dim = len(mu)
        self.feature_dim = len(mu) + 1

    def encode_prefix(self, obs):
        return obs  # a [B, 1] dummy tensor: carries the batch size only

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v(x, t) = alpha(t) * x + beta(t); returns alpha, beta ``[B, 1, A]``."""
        t3 = t.view(-1, 1, 1)
        s2 = (2 * self.log_s).exp()
        var = t3 ** 2 + (1 - t3) ** 2 * s2
        alpha = (t3 - (1 - t3) * s2) / var
        beta = -self.mu - alpha * (1 - t3) * self.mu
        return alpha, beta

    def velocity(self, prefix, x_t, t):
        alpha, beta = self.affine(t)
        feats = torch.cat([x_t, t.view(-1, 1, 1).expand(-1, x_t.shape[1], 1).to(x_t.dtype)], -1)
        return VelocityOut(velocity=alpha * x_t + beta, features=feats)

    def value(self, prefix):
        return torch.zeros(prefix.shape[0], dtype=torch.float64)


@pytest.fixture
def gaussian_flow():
    """Factory: ``gaussian_flow(mu, s, horizon=1) -> GaussianFlow``."""
    return GaussianFlow
