"""Shared machinery of the Gaussian-chain samplers (ODE, Flow-Noise, Flow-SDE).

Every sampler here is a chain of transitions ``x_{k+1} ~ N(mean_k, std_k^2)`` (elementwise) on the
grid of :func:`pirl.flow.schedule.time_grid`; deterministic steps set ``x_{k+1} = mean_k``.  A
subclass only defines

- :meth:`GaussianChainSampler.transition`: ``(mean, std)`` of step(s) from ``x_t`` at per-row
  times ``t -> t_next`` given the policy's :class:`~pirl.models.base.VelocityOut` there, and
- :meth:`GaussianChainSampler.stochastic_mask`: which steps of each chain are sampled.

:meth:`GaussianChainSampler.log_prob` re-evaluates a stored chain.  By default it recomputes only
the stochastic transitions (the only ones with a log-prob), all of them in **one** batched
velocity call of ``N = #stochastic (row, step)`` pairs: hybrid Flow-SDE then costs one expert
forward per sample instead of K.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pirl.flow.base import Chain, Sampler
from pirl.flow.schedule import time_grid
from pirl.models.base import first_tensor


def chain_dtype(prefix: Any) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of the chains sampled from ``prefix``: float32 (float64 for float64
    policies) whatever the policy's compute dtype, since log-probs of small-std Gaussians need
    the precision; the prefix's device."""
    ref = first_tensor(prefix)
    if ref is None:
        raise ValueError("cannot infer device / dtype from the prefix cache")
    return (torch.float64 if ref.dtype == torch.float64 else torch.float32), ref.device


_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; mean, std^2)`` (std > 0)."""
    z = (x - mean) / std
    return -0.5 * z * z - std.log() - _LOG_SQRT_2PI


def standard_normal_logp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; 0, 1)``."""
    return -0.5 * x * x - _LOG_SQRT_2PI




def _plain(x: torch.Tensor) -> torch.Tensor:
    """Detached, and a normal tensor if ``x`` was made under ``torch.inference_mode`` (a
    rollout's chain) so autograd may use it."""
    x = x.detach()
    return x.clone() if x.is_inference() else x


def _velocity(policy, prefix: Any, x: torch.Tensor, t: torch.Tensor):
    """``policy.velocity`` with its velocity in the chain's dtype ``x.dtype``: the precision
    boundary of the chain (a policy running in bf16 returns float32 already; this makes the
    float32 chain independent of what a policy returns)."""
    out = policy.velocity(prefix, x, t)
    if out.velocity.dtype != x.dtype:
        out = type(out)(velocity=out.velocity.to(x.dtype), features=out.features)
    return out


def _index_prefix(policy, prefix: Any, index: torch.Tensor) -> Any:
    if hasattr(policy, "prefix_index"):
        return policy.prefix_index(prefix, index)
    from pirl.models.base import index_batch
    return index_batch(prefix, index)


class GaussianChainSampler(Sampler):
    """Base of the concrete samplers (see module docstring).

    ``noise_scale`` (a plain attribute, default 1.0) multiplies every stochastic transition's
    std: Flow-SDE's ``sigma_t``, Flow-Noise's learned std.  RL's noise schedule
    (``rl.noise_schedule``) sets it once per iteration, before the rollout, so that the
    rollout's log-probs and the update's recomputed ones use the same value.
    """

    noise_scale: float = 1.0

    def transition(self, x: torch.Tensor, out, t: torch.Tensor, t_next: torch.Tensor,
                   stochastic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[N, H, A]`` of the step from ``x [N, H, A]`` at times ``t [N]`` to
        ``t_next [N]``; ``out`` is the policy's VelocityOut at ``(x, t)``; ``stochastic [N]``
        bool says which rows are sampled (the std of the other rows is ignored)."""
        raise NotImplementedError

    def stochastic_mask(self, batch: int, device: torch.device,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, K]`` bool: which steps of each chain are sampled."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ rollout
    def sample(self, policy, prefix: Any, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> Chain:
        """Integrate from ``x_0 = noise`` (drawn ``N(0, I)`` if None) to the action chunk.

        The prefix cache is reused by all K velocity calls.  Returns a :class:`Chain`.
        """
        if noise is None:
            ref = first_tensor(prefix)
            if ref is None:
                raise ValueError("cannot infer batch size from the prefix; pass noise")
            dtype, dev = chain_dtype(prefix)
            shape = (ref.shape[0], policy.action_horizon, policy.action_dim)
            noise = torch.randn(shape, generator=generator, device=dev, dtype=dtype)
        b = noise.shape[0]
        dev, dtype = noise.device, noise.dtype
        grid = time_grid(self.num_steps, device=dev, dtype=dtype)
        stoch = self.stochastic_mask(b, dev, generator)                       # [B, K]
        any_k, all_k = stoch.any(0).tolist(), stoch.all(0).tolist()  # one host sync
        x = noise
        xs, means, stds = [x], [], []
        for k in range(self.num_steps):
            t = grid[k].expand(b)
            t_next = grid[k + 1].expand(b)
            out = _velocity(policy, prefix, x, t)
            s_k = stoch[:, k]
            mean, std = self.transition(x, out, t, t_next, s_k)
            if all_k[k]:  # fast paths: whole batch stochastic / deterministic at this step
                z = torch.randn(mean.shape, generator=generator, device=dev, dtype=dtype)
                x = mean + std * z
            elif not any_k[k]:
                std = torch.zeros_like(std)
                x = mean
            else:
                sk3 = s_k.view(b, 1, 1)
                std = torch.where(sk3, std, torch.zeros_like(std))
                z = torch.randn(mean.shape, generator=generator, device=dev, dtype=dtype)
                x = torch.where(sk3, mean + std * z, mean)
            xs.append(x)
            means.append(mean)
            stds.append(std)
        return self._finish(torch.stack(xs, 1), grid, torch.stack(means, 1),
                            torch.stack(stds, 1), stoch)

    def _finish(self, x: torch.Tensor, grid: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                stoch: torch.Tensor) -> Chain:
        """Log-probs of ``x[:, 1:]`` under ``(mean, std)`` on the stochastic steps -> Chain."""
        s4 = stoch[:, :, None, None]
        safe_std = torch.where(s4, std, torch.ones_like(std))
        step_logp = torch.where(s4, gaussian_logp(x[:, 1:], mean, safe_std),
                                torch.zeros_like(mean))
        init_logp = standard_normal_logp(x[:, 0])
        logp = step_logp.sum(dim=(1, 2, 3))
        if self.includes_init:
            logp = logp + init_logp.sum(dim=(1, 2))
        return Chain(x=x, t=grid, mean=mean, std=std, stochastic=stoch, step_logp=step_logp,
                     init_logp=init_logp, logp=logp)

    # ------------------------------------------------------------------------------ training
    def log_prob(self, policy, prefix: Any, chain: Chain, all_steps: bool = False) -> Chain:
        """Re-evaluate the stored chain ``chain.x`` under the current parameters (differentiable).

        Only the stochastic ``(row, step)`` pairs of ``chain.stochastic`` are recomputed, in one
        batched velocity call; with ``all_steps=True`` (or when no step is stochastic, e.g. the
        ODE sampler) every transition is.  The ``mean`` / ``std`` of transitions that were not
        recomputed are copied from ``chain`` (detached).
        """
        x = _plain(chain.x)
        b, k1 = x.shape[:2]
        k = k1 - 1
        if k != self.num_steps:
            raise ValueError(f"chain has {k} steps but the sampler has num_steps={self.num_steps}")
        stoch = _plain(chain.stochastic)
        grid = _plain(chain.t).to(device=x.device, dtype=x.dtype)
        compute = torch.ones_like(stoch) if (all_steps or not bool(stoch.any())) else stoch
        rows, steps = compute.nonzero(as_tuple=True)                               # [N]
        pre = _index_prefix(policy, prefix, rows)
        x_in = x[rows, steps]
        t, t_next = grid[steps], grid[steps + 1]
        out = _velocity(policy, pre, x_in, t)
        mean_n, std_n = self.transition(x_in, out, t, t_next, stoch[rows, steps])
        mean = _plain(chain.mean).to(mean_n.dtype).index_put((rows, steps), mean_n)
        std = _plain(chain.std).to(std_n.dtype).index_put((rows, steps), std_n)
        std = torch.where(stoch[:, :, None, None], std, torch.zeros_like(std))
        return self._finish(x, grid, mean, std, stoch)
