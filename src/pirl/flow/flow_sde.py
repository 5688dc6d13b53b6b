"""Flow-SDE: the marginal-preserving SDE of the flow (Flow-GRPO / pi_RL), joint or hybrid.

With predicted endpoints ``a_hat = x - t v`` and ``eps_hat = x + (1 - t) v`` the stochastic step
from ``t`` to ``t - dt`` is

    x' ~ N( a_hat (1 - (t - dt)) + eps_hat ((t - dt) - sigma_t^2 dt / (2 t)),  sigma_t^2 dt )
    sigma_t = a * sqrt(t / (1 - t))        (a = noise_level)

(the Euler-Maruyama step of ``dx = [v + sigma^2/(2t) (x + (1-t) v)](-dt) + sigma dW``, whose
marginals equal the ODE's).  Numerical edges, handled as in RLinf:

- ``t = 1`` (first step): ``1 - t = 0`` would make sigma infinite; the denominator uses the next
  grid point, ``sigma_1 = a * sqrt(1 / (1 - t_1))`` (``= a sqrt(K)`` on the default grid).
  Because sigma is singular at t = 1, this first step is only approximately marginal-preserving
  even for large K: on an exact Gaussian flow it inflates the variance of ``x_1`` by about
  ``a^4 / 4`` (0.016 at a = 0.5); the drift correction of later steps contracts it again (the
  final marginal matches the ODE's, see tests/flow/test_sde_marginal.py).
- last step ``t = 1/K -> 0``: every evaluated time is ``>= 1/K > 0``, so ``sigma^2 dt / (2t)`` and
  the std ``sigma sqrt(dt)`` are finite (sigma_t -> 0 as t -> 0); the last step adds noise of std
  ``a / sqrt(K (K - 1))`` to the action.  ``exclude_last=True`` makes the last step deterministic
  (ODE) instead, so the executed action is the mean of the final transition.

Modes:

- joint (``hybrid=False``): every step stochastic; the log-prob counts all K transitions plus
  ``log N(x_0; 0, I)`` (``includes_init``).
- hybrid (``hybrid=True``): the steps in ``stochastic_steps`` are stochastic, or (if it is None)
  one step drawn uniformly per chain (``shared_across_batch``: one draw for the whole batch, as
  RLinf, or one per sample); all other steps are plain ODE (Euler) steps and the log-prob counts
  the stochastic steps only.
"""

from __future__ import annotations

import torch

from pirl.flow.common import GaussianChainSampler


class FlowSDESampler(GaussianChainSampler):
    """Flow-SDE sampler (see module docstring).

    Args:
        num_steps: K denoise steps.
        noise_level: a in ``sigma_t = a sqrt(t / (1 - t))``, > 0.
        hybrid: one (or the listed) stochastic step(s) per chain instead of all.
        stochastic_steps: fixed stochastic step indices in ``[0, K)`` (hybrid only).
        exclude_last: never make the last step stochastic (joint: last step is ODE; hybrid: the
            random draw is over the first K-1 steps).
        shared_across_batch: hybrid random draw shared by the whole batch (True) or per sample.
    """

    def __init__(self, num_steps: int, noise_level: float = 0.5, hybrid: bool = True,
                 stochastic_steps: list[int] | None = None, exclude_last: bool = False,
                 shared_across_batch: bool = True):
        super().__init__(num_steps)
        if not noise_level > 0.0:
            raise ValueError(f"noise_level must be > 0, got {noise_level}")
        if stochastic_steps is not None:
            if not hybrid:
                raise ValueError("stochastic_steps requires hybrid=True")
            steps = sorted(set(int(s) for s in stochastic_steps))
            if not steps or steps[0] < 0 or steps[-1] >= num_steps:
                raise ValueError(f"stochastic_steps must be a non-empty subset of "
                                 f"[0, {num_steps}), got {stochastic_steps}")
            if exclude_last and steps[-1] == num_steps - 1:
                raise ValueError("stochastic_steps contains the last step but exclude_last=True")
            stochastic_steps = steps
        if exclude_last and num_steps < 2:
            raise ValueError("exclude_last needs num_steps >= 2")
        self.noise_level = float(noise_level)
        self.hybrid = hybrid
        self.stochastic_steps = stochastic_steps
        self.exclude_last = exclude_last
        self.shared_across_batch = shared_across_batch
        self.includes_init = not hybrid

    def sigma(self, t: torch.Tensor, t_first_next: float | torch.Tensor) -> torch.Tensor:
        """``sigma_t = a s sqrt(t / (1 - t'))`` with ``t' = t`` except ``t' = t_1`` where ``t = 1``
        (``s = noise_scale``, 1 unless RL's noise schedule lowers it)."""
        denom_t = torch.where(t >= 1.0, torch.as_tensor(t_first_next, dtype=t.dtype,
                                                         device=t.device), t)
        return (self.noise_level * self.noise_scale) * torch.sqrt(t / (1.0 - denom_t))

    def transition(self, x, out, t, t_next, stochastic):
        v = out.velocity
        t3 = t.view(-1, 1, 1)
        tn3 = t_next.view(-1, 1, 1)
        dt = t3 - tn3
        ode_mean = x - v * dt
        # next grid point after t = 1 is 1 - 1/K on the default grid (== t_next of step 0)
        t1 = 1.0 - 1.0 / self.num_steps if self.num_steps > 1 else 0.0
        sig = self.sigma(t, t1).view(-1, 1, 1)
        a_hat = x - t3 * v
        eps_hat = x + (1.0 - t3) * v
        sde_mean = a_hat * (1.0 - tn3) + eps_hat * (tn3 - sig * sig * dt / (2.0 * t3))
        mean = torch.where(stochastic.view(-1, 1, 1), sde_mean, ode_mean)
        std = (sig * dt.sqrt()).expand_as(mean)
        return mean, std

    def stochastic_mask(self, batch, device, generator=None):
        k = self.num_steps
        mask = torch.zeros(batch, k, dtype=torch.bool, device=device)
        if not self.hybrid:
            mask[:] = True
            if self.exclude_last:
                mask[:, -1] = False
            return mask
        if self.stochastic_steps is not None:
            mask[:, self.stochastic_steps] = True
            return mask
        n = k - 1 if self.exclude_last else k
        draws = 1 if self.shared_across_batch else batch
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, n, (draws,), generator=generator, device=gen_dev).to(device)
        mask[torch.arange(batch, device=device), idx.expand(batch)] = True
        return mask
