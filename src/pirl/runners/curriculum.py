"""Task sampling for multitask RL: uniform, or weighted towards the tasks the policy still fails.

With 72 tasks and 512 envs (the default) each task gets ~7 rollout episodes per iteration when
tasks are drawn uniformly, and once most tasks succeed most of those episodes carry no learning
signal (a success among successes has an advantage near 0).  :class:`FailureCurriculum` keeps a
decayed count of each task's rollout episodes and successes and draws a share ``mix`` of the envs
in proportion to each task's estimated failure rate, the rest uniformly (so every task keeps
being visited and its estimate stays current):

    s_t = (S_t + 1) / (N_t + 2)                       (posterior mean under a Beta(1, 1) prior)
    p_t = (1 - mix) / T + mix * (1 - s_t) / sum_u (1 - s_u)

where ``S_t``, ``N_t`` are the successes and episodes of task ``t``, both multiplied by
``decay`` after every iteration before the new episodes are added.  With no data yet ``p`` is
uniform.  The evaluation still weighs every task equally; the curriculum only decides where the
rollout episodes go.
"""

from __future__ import annotations

from typing import Any

import torch


class FailureCurriculum:
    """Failure-weighted task draws (see module docstring).

    Args:
        num_tasks: T.
        mix: share of the draws proportional to the failure estimate, in ``[0, 1]``
            (0: uniform).
        decay: factor on the counts per :meth:`update`, in ``(0, 1]`` (1: no forgetting).
    """

    def __init__(self, num_tasks: int, mix: float = 0.5, decay: float = 0.8):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.num_tasks, self.mix, self.decay = num_tasks, mix, decay
        self.successes = torch.zeros(num_tasks, dtype=torch.float64)
        self.counts = torch.zeros(num_tasks, dtype=torch.float64)

    def success_rate(self) -> torch.Tensor:
        """``[T]`` float64 estimate of each task's success rate."""
        return (self.successes + 1.0) / (self.counts + 2.0)

    def probs(self) -> torch.Tensor:
        """``[T]`` float64 draw probabilities (sum 1)."""
        fail = 1.0 - self.success_rate()
        uniform = torch.full_like(fail, 1.0 / self.num_tasks)
        return (1.0 - self.mix) * uniform + self.mix * fail / fail.sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n]`` int64 task ids drawn i.i.d. from :meth:`probs`."""
        return torch.multinomial(self.probs(), n, replacement=True, generator=generator)

    def update(self, task_ids: torch.Tensor, success: torch.Tensor) -> None:
        """Decay the counts, then add episodes ``task_ids [N]`` with outcomes ``success [N]``."""
        ids = task_ids.long().reshape(-1).cpu()
        ok = success.reshape(-1).cpu().to(torch.float64)
        if ids.shape != ok.shape:
            raise ValueError(f"task_ids {tuple(ids.shape)} and success {tuple(ok.shape)} differ")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks})")
        self.successes.mul_(self.decay).index_add_(0, ids, ok)
        self.counts.mul_(self.decay).index_add_(0, ids, torch.ones_like(ok))

    def state_dict(self) -> dict[str, Any]:
        return {"successes": self.successes.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["counts"].shape != (self.num_tasks,):
            raise ValueError(f"curriculum state is for {sd['counts'].shape[0]} tasks, "
                             f"not {self.num_tasks}")
        self.successes = sd["successes"].clone().to(torch.float64)
        self.counts = sd["counts"].clone().to(torch.float64)


class FailureReplay:
    """Replay of recently failed initial states (prioritised level replay at the state level).

    Failure-weighted task draws (:class:`FailureCurriculum`) move rollouts towards hard *tasks*;
    on the tabletop the failures of a ~85% policy are spread over many tasks and sit in
    particular layouts (a push whose object lies between the gripper and the pushing side).
    This buffer keeps the ``(task id, episode seed)`` pairs of the latest failed episodes; an env
    reset with the same pair starts from the same initial state.  Each iteration a share of the
    envs restarts from states drawn from it (uniformly, without replacement); drawn states leave
    the buffer, and every episode of the iteration that fails (replayed or fresh) is added, the
    oldest entries dropping out past ``capacity``.  So a replayed state stays while the policy
    keeps failing it and leaves once a rollout of it succeeds.

    The draws change which initial states PPO's objective weighs (towards those the policy
    fails), as the task curriculum does; the estimator per episode is unchanged.

    Args:
        capacity: the most entries kept (the newest).
    """

    def __init__(self, capacity: int = 512):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.tasks = torch.zeros(0, dtype=torch.long)
        self.seeds = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.tasks.numel())

    def draw(self, n: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return ``min(n, len(self))`` entries drawn uniformly without replacement:
        ``(task_ids [k], episode_seeds [k])`` int64."""
        k = min(max(n, 0), len(self))
        perm = torch.randperm(len(self), generator=generator)
        take, rest = perm[:k], perm[k:].sort().values  # the rest keep their age order
        out = (self.tasks[take].clone(), self.seeds[take].clone())
        self.tasks, self.seeds = self.tasks[rest], self.seeds[rest]
        return out

    def update(self, task_ids: torch.Tensor, episode_seeds: torch.Tensor,
               success: torch.Tensor) -> None:
        """Add the failed episodes among ``task_ids [N]``, ``episode_seeds [N]``,
        ``success [N]`` as the newest entries; keep the newest ``capacity``."""
        ids = task_ids.long().reshape(-1).cpu()
        seeds = episode_seeds.long().reshape(-1).cpu()
        ok = success.reshape(-1).cpu().bool()
        if not ids.shape == seeds.shape == ok.shape:
            raise ValueError(f"task_ids {tuple(ids.shape)}, episode_seeds {tuple(seeds.shape)} "
                             f"and success {tuple(ok.shape)} differ")
        fail = ~ok
        self.tasks = torch.cat([self.tasks, ids[fail]])[-self.capacity:]
        self.seeds = torch.cat([self.seeds, seeds[fail]])[-self.capacity:]

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks.clone(), "seeds": self.seeds.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["tasks"].shape != sd["seeds"].shape or sd["tasks"].numel() > self.capacity:
            raise ValueError(f"replay state of {sd['tasks'].numel()} entries does not fit "
                             f"capacity {self.capacity}")
        self.tasks = sd["tasks"].clone().long()
        self.seeds = sd["seeds"].clone().long()
