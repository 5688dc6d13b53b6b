"""Self-imitation from a buffer of each task's successful rollout episodes.

With ``ppo.sil_coef`` (or ``grpo.sil_coef``) alone, the self-imitation term fits the successful
episodes of the current rollout only: on a multi-task benchmark those come mostly from the tasks
the policy already solves, and a half-solved task contributes an episode every few iterations
that is forgotten at the next update.  :class:`SuccessBuffer` keeps ``capacity_per_task``
successful episodes of every task (the newest or the shortest; their observations and the executed
action chunks, in the model's action units) and draws task-balanced minibatches from them, so
every task the stochastic policy has solved at least once keeps being imitated: Oh et al.
(2018)'s replayed self-imitation with success as the filter.  The data are the policy's own
rollouts and their rewards only (no demos).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from pirl.models.base import cat_batch, index_batch

# which successful episodes a full task keeps (SuccessBuffer; rl.sil_buffer_keep)
BufferKeep = Literal["newest", "shortest"]
KEEP = get_args(BufferKeep)


class SuccessBuffer:
    """``capacity_per_task`` successful episodes of each of ``num_tasks`` tasks.

    An episode is its valid chunk steps: observation rows (a batched obs dict ``[T_e, ...]``)
    and the executed action chunks ``[T_e, H, A]`` (the sampler's output, model units).
    ``keep`` says which episodes a full task keeps: ``"newest"`` (the latest policy's), or
    ``"shortest"`` (the fewest chunk steps; among equal lengths the newest): a success that
    wandered for most of the time limit is a poor demo of the task.
    :meth:`draw` picks a task uniformly among those with an episode, then an episode of it, then
    a chunk step of that episode, so a task's weight does not grow with its success rate.
    """

    def __init__(self, num_tasks: int, capacity_per_task: int, keep: BufferKeep = "newest"):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if capacity_per_task < 1:
            raise ValueError(f"capacity_per_task must be >= 1, got {capacity_per_task}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
        self.num_tasks, self.capacity, self.keep = num_tasks, capacity_per_task, keep
        self.episodes: list[list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = [
            [] for _ in range(num_tasks)]

    def __len__(self) -> int:
        """The number of episodes held."""
        return sum(len(e) for e in self.episodes)

    def episodes_per_task(self) -> torch.Tensor:
        """``[num_tasks]`` int64: the episodes held per task."""
        return torch.tensor([len(e) for e in self.episodes], dtype=torch.long)

    def add(self, obs: dict[str, torch.Tensor], actions: torch.Tensor, valid: torch.Tensor,
            task_ids: torch.Tensor, success: torch.Tensor) -> int:
        """Add a rollout's successful episodes; returns how many were added.

        ``obs``: the rollout's observation rows ``[T * N, ...]`` (chunk step major, as
        :func:`pirl.runners.rollout.stack_obs` gives them), ``actions [T * N, H, A]`` the chunks
        of the same rows, ``valid [T, N]`` the chunk steps inside each episode,
        ``task_ids [N]`` and ``success [N]`` per episode.
        """
        t, n = valid.shape
        if actions.shape[0] != t * n or task_ids.shape != (n,) or success.shape != (n,):
            raise ValueError(f"a rollout of valid {tuple(valid.shape)} needs {t * n} action "
                             f"rows and {n} task ids / successes, got {tuple(actions.shape)}, "
                             f"{tuple(task_ids.shape)}, {tuple(success.shape)}")
        added = 0
        for i in success.reshape(-1).bool().nonzero().reshape(-1).tolist():
            task = int(task_ids[i])
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task id {task} outside [0, {self.num_tasks})")
            rows = (valid[:, i].nonzero().reshape(-1) * n + i).cpu()
            if rows.numel() == 0:
                continue
            self.add_episode(task, index_batch(obs, rows), actions[rows])
            added += 1
        return added

    def add_episode(self, task: int, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> None:
        """Add one successful episode of ``task``: observation rows ``[T_e, ...]`` and its
        executed action chunks ``[T_e, H, A]``."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task} outside [0, {self.num_tasks})")
        if actions.ndim != 3 or actions.shape[0] == 0:
            raise ValueError(f"an episode's actions must be [T_e >= 1, H, A], got "
                             f"{tuple(actions.shape)}")
        for k, v in obs.items():
            if len(v) != actions.shape[0]:
                raise ValueError(f"obs[{k!r}] has {len(v)} rows for {actions.shape[0]} chunks")
        ep = (obs, actions.detach().float().cpu())
        self.episodes[task] = self._kept(self.episodes[task] + [ep])

    def _kept(self, eps: list) -> list:
        """The episodes of a task that stay (oldest first)."""
        if len(eps) <= self.capacity:
            return eps
        if self.keep == "newest":
            return eps[-self.capacity:]
        # the shortest; a later episode beats an earlier one of the same length
        order = sorted(range(len(eps)), key=lambda i: (eps[i][1].shape[0], -i))
        return [eps[i] for i in sorted(order[:self.capacity])]

    def draw(self, b: int, generator: torch.Generator | None = None
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``b`` chunk steps drawn with replacement (task, then episode, then step uniformly):
        ``(obs [b, ...], actions [b, H, A])``.  Needs a non-empty buffer."""
        tasks = [k for k, e in enumerate(self.episodes) if e]
        if not tasks:
            raise ValueError("the success buffer is empty")
        obs, acts = [], []
        for k in torch.randint(0, len(tasks), (b,), generator=generator).tolist():
            eps = self.episodes[tasks[k]]
            o, a = eps[int(torch.randint(0, len(eps), (1,), generator=generator))]
            j = torch.randint(0, a.shape[0], (1,), generator=generator)
            obs.append(index_batch(o, j))
            acts.append(a[j])
        return cat_batch(obs), torch.cat(acts)

    def state_dict(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "capacity": self.capacity, "keep": self.keep,
                "episodes": [[(dict(o), a.clone()) for o, a in e] for e in self.episodes]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["num_tasks"] != self.num_tasks:
            raise ValueError(f"success buffer of {sd['num_tasks']} tasks does not fit "
                             f"{self.num_tasks} tasks")
        if sd.get("keep", "newest") != self.keep:
            raise ValueError(f"success buffer kept its {sd.get('keep', 'newest')} episodes, "
                             f"not the {self.keep}")
        if any(len(e) > self.capacity for e in sd["episodes"]):
            raise ValueError(f"success buffer holds more than capacity_per_task="
                             f"{self.capacity} episodes of a task")
        self.episodes = [[(dict(o), a.clone()) for o, a in e] for e in sd["episodes"]]
