"""Advantage estimators for the chunk-level (outer) MDP of pi_RL.

One outer step is one action chunk executed in the env: its reward is the sum of the chunk's env
rewards and it is *done* if the episode ended inside the chunk.  Rollouts are stored time-major
as ``[T, N]`` (T chunk steps, N envs).

Episode bookkeeping (the same conventions as :mod:`pirl.runners.rollout`):

- ``values[t]`` is ``V(s_t)``, the critic's value of the obs the chunk at step ``t`` was chosen
  from; ``next_values[t]`` is ``V(s_{t+1})``, the value of the obs *after* that chunk.  When the
  episode ended at step ``t`` this must be the value of the episode's final obs (with auto-reset
  envs: ``info["final_obs"]``, not the first obs of the next episode).  In fixed-horizon runs
  finished envs are frozen, so ``values[t+1]`` already is that value.
- ``terminated[t]``: the episode ended inside chunk ``t`` by success / failure: nothing to
  bootstrap (the future value is 0).
- ``truncated[t]``: the episode was cut by a time limit: bootstrap from ``next_values[t]``.
- ``valid[t]``: the env was still running when chunk ``t`` started (steps of a frozen, finished
  env are invalid).  Invalid steps get advantage 0, their rewards / values are ignored and nothing
  flows through them into earlier steps.  A valid step followed by an invalid one *without* a done
  flag is treated like a truncation (bootstrap from ``next_values``, no propagation).
- The end of the ``T`` window of a still-running env is also a truncation: the last step
  bootstraps from ``next_values[T-1]``.
- Episode boundaries inside the window (auto-reset envs: ``done[t]`` then a new episode at
  ``t+1``) stop propagation, so advantages never mix two episodes.
"""

from __future__ import annotations

import torch


def _bool(x: torch.Tensor | None, like: torch.Tensor, default: bool) -> torch.Tensor:
    """``x`` as a bool tensor shaped like ``like`` (``default`` everywhere when None)."""
    if x is None:
        return torch.full(like.shape, default, dtype=torch.bool, device=like.device)
    if x.shape != like.shape:
        raise ValueError(f"mask shape {tuple(x.shape)} does not match {tuple(like.shape)}")
    return x.to(device=like.device).bool()


def _next_values(values: torch.Tensor, next_values: torch.Tensor) -> torch.Tensor:
    """Expand ``next_values`` to ``[T, N]``.

    ``[T, N]`` is returned as is; ``[N]`` (the value of the obs after the last step) means
    ``next_values[t] = values[t+1]`` for ``t < T-1``, which is right for fixed-horizon (frozen)
    runs but not for truncations inside the window of auto-reset runs (pass ``[T, N]`` there).
    """
    if next_values.shape == values.shape:
        return next_values
    if values.dim() == 2 and next_values.shape == values.shape[1:]:
        return torch.cat([values[1:], next_values[None]], dim=0)
    raise ValueError(f"next_values must be [T, N] {tuple(values.shape)} or [N], "
                     f"got {tuple(next_values.shape)}")


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        terminated: torch.Tensor | None = None, truncated: torch.Tensor | None = None, *,
        gamma: float, lam: float, valid: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a ``[T, N]`` rollout (see module docstring).

    With ``d_t = terminated_t | truncated_t`` and ``c_t = (1 - d_t) * valid_{t+1}``
    (``valid_T = 1``)::

        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = valid_t * (delta_t + gamma * lam * c_t * A_{t+1}),     A_T = 0
        R_t     = A_t + V(s_t)

    Args:
        rewards: ``[T, N]`` chunk rewards.
        values: ``[T, N]`` ``V(s_t)``.
        next_values: ``[T, N]`` ``V(s_{t+1})`` (value of the final obs at episode ends), or
            ``[N]``: the value after the last step, with ``next_values[t] = values[t+1]`` before.
        terminated, truncated: ``[T, N]`` bool (None: never).
        gamma: discount per chunk step; lam: GAE lambda.
        valid: ``[T, N]`` bool (None: all valid).

    Returns:
        ``(advantages [T, N], returns [T, N])``; both in the dtype of ``values``.  Invalid steps
        have advantage 0 and return ``values`` (mask them out of every loss).
    """
    if rewards.dim() != 2 or rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must "
                         f"both be [T, N]")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    nv = _next_values(values, next_values).to(values.dtype)
    rewards = rewards.to(values.dtype)
    valid_b = _bool(valid, values, True)
    term = _bool(terminated, values, False) & valid_b
    done = (term | _bool(truncated, values, False)) & valid_b
    valid_f = valid_b.to(values.dtype)
    # does step t+1 continue step t's episode inside the window?
    next_valid = torch.cat([valid_f[1:], torch.ones_like(valid_f[:1])], dim=0)
    cont = (1.0 - done.to(values.dtype)) * next_valid
    # torch.where (not multiplication by masks) so that values / rewards that must be ignored
    # (next value of a terminated step, anything at invalid steps) may hold anything, even NaN
    zero = torch.zeros_like(values)
    delta = rewards + gamma * torch.where(term, zero, nv) - values
    delta = torch.where(valid_b, delta, zero)
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[0])  # A_T = 0: the window end bootstraps via delta
    for t in range(values.shape[0] - 1, -1, -1):
        running = valid_f[t] * (delta[t] + gamma * lam * cont[t] * running)
        adv[t] = running
    return adv, torch.where(valid_b, adv + values, values)


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor | None = None, *,
                       gamma: float, valid: torch.Tensor | None = None,
                       bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo discounted returns-to-go ``R_t = r_t + gamma * (1 - d_t) * R_{t+1}``.

    Args:
        rewards: ``[T, N]``; dones: ``[T, N]`` bool episode ends (None: none).
        gamma: discount per step; valid: ``[T, N]`` bool (invalid steps: return 0, and they cut
            the sum like an episode end).
        bootstrap: optional ``[N]`` value of the obs after the last step (``R_T``; default 0),
            used only by envs still running at the window end.

    Returns:
        ``[T, N]`` returns-to-go (0 at invalid steps).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [T, N], got {tuple(rewards.shape)}")
    valid_b = _bool(valid, rewards, True)
    done = _bool(dones, rewards, False) | ~valid_b
    next_valid = torch.cat([valid_b[1:], torch.ones_like(valid_b[:1])], dim=0)
    cont = (~done & next_valid).to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = (torch.zeros_like(rewards[0]) if bootstrap is None
               else bootstrap.to(rewards.dtype).clone())
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = torch.where(valid_b[t], rewards[t] + gamma * cont[t] * running,
                              torch.zeros_like(running))
        out[t] = running
    return out


def normalize_advantages(adv: torch.Tensor, mask: torch.Tensor | None = None,
                         eps: float = 1e-8) -> torch.Tensor:
    """``(adv - mean) / (std + eps)`` with the (population) mean / std over ``mask`` entries.

    adv: any shape; mask: same shape, bool or 0/1 weights (None: all).  Masked-out entries are
    returned as 0.  With fewer than two counted entries the advantages are only centred.
    """
    if mask is None:
        w = torch.ones_like(adv)
    else:
        if mask.shape != adv.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != adv shape {tuple(adv.shape)}")
        w = mask.to(adv.dtype)
    n = w.sum()
    if float(n) == 0:
        return torch.zeros_like(adv)
    mean = (adv * w).sum() / n
    centred = (adv - mean) * w
    if float(n) < 2:
        return centred
    std = (centred.pow(2).sum() / n).sqrt()
    return centred / (std + eps)
