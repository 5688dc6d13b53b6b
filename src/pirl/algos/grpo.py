"""GRPO for flow-matching policies: group-relative advantages without a critic.

The N parallel envs are split into groups of G envs that start from the same initial state (same
task id and episode seed, see :func:`make_groups` and :meth:`pirl.envs.base.BatchedEnv.reset`).
Each env's episode return is compared with its group: ``A_i = (R_i - mean_g) / (std_g + eps)``
(:func:`group_advantages`), and that advantage is used for every valid chunk step of the episode
(:func:`broadcast_over_time`).  The policy update is PPO's clipped ratio
(:func:`pirl.algos.ppo.policy_loss`) with an optional k3 KL penalty to a reference policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pirl.algos.ppo import PolicyUpdateConfig, _check

SEED_HIGH = 2**31 - 1


def group_advantages(returns: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                     normalize_std: bool = True) -> torch.Tensor:
    """Group-relative advantages.

    For each group ``g`` (members ``i`` with ``group_ids[i] == g``), with the group mean ``mu_g``
    and population std ``s_g = sqrt(mean_i (R_i - mu_g)^2)``::

        A_i = (R_i - mu_g) / (s_g + eps)     if normalize_std
        A_i = R_i - mu_g                     otherwise

    A group whose returns are all equal (or whose std is ``<= eps``; this includes groups of
    size 1) carries no learning signal: its advantages are exactly 0 (no division of rounding
    noise by ~0).

    Args:
        returns: ``[M]`` episode returns (any float dtype).
        group_ids: ``[M]`` int group of each episode (any non-negative ids, not necessarily
            contiguous or sorted).
        eps: std floor (see above).
        normalize_std: divide by the group std (GRPO) or only subtract the mean (Dr. GRPO-style).

    Returns:
        ``[M]`` advantages in the dtype of ``returns``.
    """
    if returns.dim() != 1 or group_ids.shape != returns.shape:
        raise ValueError(f"returns and group_ids must both be [M], got {tuple(returns.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if returns.numel() == 0:
        return returns.clone()
    ids = group_ids.to(returns.device).long()
    if bool((ids < 0).any()):
        raise ValueError("group_ids must be non-negative")
    _, inv = torch.unique(ids, return_inverse=True)  # contiguous 0..G-1
    num = int(inv.max()) + 1
    r = returns.double()
    count = torch.zeros(num, dtype=torch.float64, device=r.device).index_add_(
        0, inv, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    var = torch.zeros_like(count).index_add_(0, inv, centred.pow(2)) / count
    std = var.sqrt()[inv]
    # all-equal groups are detected exactly (max == min), not only through the rounding noise
    # of their std, so that eps = 0 is safe too
    gmax = torch.zeros_like(count).scatter_reduce(0, inv, r, "amax", include_self=False)
    gmin = torch.zeros_like(count).scatter_reduce(0, inv, r, "amin", include_self=False)
    flat = (gmax == gmin)[inv] | (std <= eps)
    adv = centred / (std + eps) if normalize_std else centred
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(returns.dtype)


def make_groups(num_envs: int, group_size: int, num_tasks: int,
                generator: torch.Generator | None = None,
                task_probs: torch.Tensor | None = None, round_robin: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign N envs to N / G groups of G envs sharing one task and one initial state.

    Tasks are spread evenly: the group tasks run through random permutations of all tasks, so
    over ``num_envs / group_size`` groups every task appears ``floor`` or ``ceil`` of
    ``groups / num_tasks`` times; ``round_robin``: group ``g`` always runs task ``g mod T``
    (an env keeps its task from call to call, so a simulator that rebuilds itself when its task
    changes builds once).  Each group draws an episode seed in ``[0, 2**31 - 1)``.
    Envs of a group are contiguous: env ``i`` is in group ``i // G``.

    Returns:
        ``(task_ids [N], episode_seeds [N], group_ids [N])``, all int64, for
        ``env.reset(task_ids=..., episode_seeds=...)`` and :func:`group_advantages`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_envs < 1 or num_envs % group_size != 0:
        raise ValueError(f"num_envs ({num_envs}) must be a positive multiple of group_size "
                         f"({group_size})")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    num_groups = num_envs // group_size
    if round_robin and task_probs is not None:
        raise ValueError("round_robin groups and task_probs exclude each other")
    if round_robin:
        group_task = torch.arange(num_groups) % num_tasks
    elif task_probs is not None:
        if task_probs.shape != (num_tasks,):
            raise ValueError(f"task_probs must be [{num_tasks}], got {tuple(task_probs.shape)}")
        group_task = torch.multinomial(task_probs, num_groups, replacement=True,
                                       generator=generator)
    else:
        perms = [torch.randperm(num_tasks, generator=generator)
                 for _ in range(-(-num_groups // num_tasks))]
        group_task = torch.cat(perms)[:num_groups]
    group_seed = torch.randint(0, SEED_HIGH, (num_groups,), generator=generator)
    group_ids = torch.arange(num_groups).repeat_interleave(group_size)
    return group_task[group_ids], group_seed[group_ids], group_ids


def broadcast_over_time(episode_adv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-episode advantages ``[N]`` -> per-step ``[T, N]``: ``episode_adv`` at every valid step,
    0 at invalid (post-episode) steps."""
    if valid.dim() != 2 or episode_adv.shape != valid.shape[1:]:
        raise ValueError(f"episode_adv must be [N] and valid [T, N], got "
                         f"{tuple(episode_adv.shape)} and {tuple(valid.shape)}")
    return torch.where(valid.bool(), episode_adv[None].expand_as(valid),
                       torch.zeros((), dtype=episode_adv.dtype, device=episode_adv.device))


@dataclass
class GRPOConfig(PolicyUpdateConfig):
    """GRPO: group size, std normalisation and an optional KL penalty to the reference policy.

    ``normalize_advantages`` defaults to False here: the advantages are already normalised per
    group.  ``kl_coef`` weights :func:`pirl.algos.ppo.approx_kl` (k3) between the current and
    the reference (pre-RL) policy's log-probs (0: off, as in pi_RL).
    """

    group_size: int = 8
    normalize_std: bool = True
    std_eps: float = 1e-6
    kl_coef: float = 0.0
    normalize_advantages: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.group_size >= 2, "group_size",
               f"must be >= 2 (a group of 1 has zero advantage), got {self.group_size}")
        _check(self.std_eps >= 0, "std_eps", f"must be >= 0, got {self.std_eps}")
        _check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
