"""Split-invariant sampling: the chain noise of the *full* batch of N envs, drawn once.

:func:`draw_chain_noise` draws every random number one denoising-chain batch needs, for all N
envs and in exactly the order :meth:`GaussianChainSampler.sample` draws them from its generator;
:func:`sample_with_noise` integrates a chain from such pre-drawn noise (any subset of rows).  So
env ``i`` gets the same noise whichever worker, stage or batch it is sampled in, and a
full-batch replay equals ``sampler.sample`` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pirl.flow.base import Chain, Sampler
from pirl.models.base import FlowPolicy


@dataclass
class ChainNoise:
    """Every random number of one batch of denoising chains.

    x0: ``[B, H, A]`` initial noise; z: ``[B, K, H, A]`` the standard-normal draws of the
    stochastic transitions (zeros for steps no row samples); stochastic: ``[B, K]`` bool mask.
    """

    x0: torch.Tensor
    z: torch.Tensor
    stochastic: torch.Tensor

    def rows(self, start: int, stop: int) -> "ChainNoise":
        """Rows ``[start, stop)``."""
        return ChainNoise(self.x0[start:stop], self.z[start:stop], self.stochastic[start:stop])


def _require_gaussian_chain(sampler: Sampler) -> None:
    from pirl.flow.common import GaussianChainSampler

    if not isinstance(sampler, GaussianChainSampler):
        raise TypeError(f"{type(sampler).__name__} is not a GaussianChainSampler: split "
                        "placements need pre-drawn chain noise (draw_chain_noise)")


def draw_chain_noise(sampler: Sampler, policy: FlowPolicy, batch: int, *,
                     generator: torch.Generator, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> ChainNoise:
    """Draw all random numbers of ``batch`` chains from ``generator`` in the order
    :meth:`GaussianChainSampler.sample` consumes it: ``x0 [B, H, A]``, then the stochastic
    mask, then one ``[B, H, A]`` normal draw per step on which any row is stochastic."""
    _require_gaussian_chain(sampler)
    shape = (batch, policy.action_horizon, policy.action_dim)
    x0 = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    stoch = sampler.stochastic_mask(batch, x0.device, generator)
    k = sampler.num_steps
    z = torch.zeros(batch, k, *shape[1:], device=x0.device, dtype=dtype)
    for i in range(k):
        if bool(stoch[:, i].any()):
            z[:, i] = torch.randn(shape, generator=generator, device=x0.device, dtype=dtype)
    return ChainNoise(x0=x0, z=z, stochastic=stoch)


def sample_with_noise(sampler: Sampler, policy: FlowPolicy, prefix: Any,
                      noise: ChainNoise) -> Chain:
    """Integrate a batch of chains like :meth:`GaussianChainSampler.sample` but with the random
    numbers given (``noise`` rows = prefix rows); returns the same :class:`Chain`."""
    from pirl.flow.schedule import time_grid

    _require_gaussian_chain(sampler)
    x = noise.x0
    b, dev, dtype = x.shape[0], x.device, x.dtype
    grid = time_grid(sampler.num_steps, device=dev, dtype=dtype)
    stoch = noise.stochastic.to(dev)
    xs, means, stds = [x], [], []
    for k in range(sampler.num_steps):
        t, t_next = grid[k].expand(b), grid[k + 1].expand(b)
        out = policy.velocity(prefix, x, t)
        s_k = stoch[:, k]
        mean, std = sampler.transition(x, out, t, t_next, s_k)
        sk3 = s_k.view(b, 1, 1)
        std = torch.where(sk3, std, torch.zeros_like(std))
        x = torch.where(sk3, mean + std * noise.z[:, k].to(dev), mean) if bool(s_k.any()) else mean
        xs.append(x)
        means.append(mean)
        stds.append(std)
    return sampler._finish(torch.stack(xs, 1), grid, torch.stack(means, 1),
                           torch.stack(stds, 1), stoch)
