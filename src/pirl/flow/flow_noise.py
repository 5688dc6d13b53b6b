"""Flow-Noise (ReinFlow-style): the ODE mean plus a learned, bounded, per-dimension noise.

Each transition is ``x_{k+1} ~ N(x_k - v(x_k, t_k) dt, sigma_k^2)`` with
``sigma_k = NoiseNet(features_k, x_k, t_k)`` (elementwise, ``[B, H, A]``), where ``features_k`` are
the action expert's features from the *same* velocity call (no extra expert forward).  The
log-std is squashed with tanh into ``[log min_std, log max_std]``.  Every step is stochastic and
the chain log-likelihood is exact and joint: ``log N(x_0; 0, I) + sum_k log N(x_{k+1}; ...)``
(``includes_init = True``, as RLinf's joint variant).  The noise net trains with the policy; at
evaluation use the ODE sampler (noise net unused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pirl.flow.common import GaussianChainSampler


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine-cosine features of ``t [N]`` in ``[0, 1]`` -> ``[N, dim]`` (frequencies 1..2^(dim/2))."""
    half = dim // 2
    freq = (2.0 ** torch.arange(half, device=t.device, dtype=t.dtype)) * math.pi
    ang = t[:, None] * freq[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class NoiseNet(nn.Module):
    """``std = exp(log_min + (log_max - log_min) * (tanh(raw) + 1) / 2)``, raw from an MLP on
    ``[features (D), x_t (A), time features]`` per action token.

    The last layer starts at zero, so the initial std is ``sqrt(min_std * max_std)`` everywhere.
    ``detach_features``: stop the noise net's gradient from reaching the action expert.
    """

    def __init__(self, feature_dim: int, action_dim: int, min_std: float, max_std: float,
                 hidden: int = 128, time_dim: int = 16, detach_features: bool = False):
        super().__init__()
        if not 0.0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got min_std={min_std}, "
                             f"max_std={max_std}")
        self.log_min = math.log(min_std)
        self.log_max = math.log(max_std)
        self.time_dim = time_dim
        self.detach_features = detach_features
        self.net = nn.Sequential(nn.Linear(feature_dim + action_dim + time_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, action_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """features ``[N, H, D]``, x_t ``[N, H, A]``, t ``[N]`` -> std ``[N, H, A]``."""
        if self.detach_features:
            features = features.detach()
        dtype = self.net[0].weight.dtype  # the noise net's own precision
        tf = time_features(t.to(dtype), self.time_dim)[:, None, :].expand(-1, x_t.shape[1], -1)
        raw = self.net(torch.cat([features.to(dtype), x_t.to(dtype), tf], dim=-1))
        frac = 0.5 * (torch.tanh(raw) + 1.0)
        std = torch.exp(self.log_min + (self.log_max - self.log_min) * frac)
        return std.to(torch.promote_types(std.dtype, x_t.dtype))


class FlowNoiseSampler(GaussianChainSampler):
    """Flow-Noise sampler owning a learnable :class:`NoiseNet` (see module docstring).

    Args:
        num_steps: K denoise steps.
        feature_dim: D of the policy's expert features; action_dim: A.
        min_std, max_std: bounds of the per-dimension noise std.
        hidden: noise-net width; detach_features: see :class:`NoiseNet`.
    """

    includes_init = True

    def __init__(self, num_steps: int, feature_dim: int, action_dim: int, min_std: float = 0.08,
                 max_std: float = 0.16, hidden: int = 128, detach_features: bool = False):
        super().__init__(num_steps)
        self.noise_net = NoiseNet(feature_dim, action_dim, min_std, max_std, hidden=hidden,
                                  detach_features=detach_features)

    def transition(self, x, out, t, t_next, stochastic):
        dt = (t - t_next).view(-1, 1, 1)
        mean = x - out.velocity * dt
        return mean, self.noise_net(out.features, x, t) * self.noise_scale

    def stochastic_mask(self, batch, device, generator=None):
        return torch.ones(batch, self.num_steps, dtype=torch.bool, device=device)
