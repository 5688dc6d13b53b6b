"""A deliberately easy batched env for fast RL tests: reach a target point in one chunk.

State ``[N, 2]`` is the target in ``[-0.5, 0.5]^2``; the agent succeeds (reward 1, terminated)
when an executed action lands within ``radius`` of the target.  A random-init policy succeeds
rarely, a policy that copies the state always: RL must learn the mapping from state to action.
"""

from __future__ import annotations

import torch

from pirl.envs.base import BatchedEnv, Step


class ReachEnv(BatchedEnv):
    action_dim = 2
    state_dim = 2
    num_cameras = 0
    task_names = ["reach"]

    def __init__(self, num_envs: int, max_episode_steps: int = 2, radius: float = 0.3, **_):
        self.num_envs, self.max_episode_steps, self.radius = num_envs, max_episode_steps, radius

    def vocabulary(self):
        return ["reach the point"]

    def _obs(self):
        return {"state": self.target.clone(), "instruction": ["reach the point"] * self.num_envs,
                "task_id": torch.zeros(self.num_envs, dtype=torch.long)}

    def reset(self, seed=None, task_ids=None, episode_seeds=None):
        n = self.num_envs
        seeds = episode_seeds if episode_seeds is not None else torch.arange(n) + (seed or 0)
        self.target = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed(int(s)))
                                   for s in seeds]) - 0.5
        self.t = 0
        self.done = torch.zeros(n, dtype=torch.bool)
        self.term = torch.zeros(n, dtype=torch.bool)
        return self._obs()

    def step(self, action):
        self.t += 1
        hit = (action.float() - self.target).norm(dim=-1) < self.radius
        succ = hit & ~self.done
        self.term |= succ
        trunc = torch.full((self.num_envs,), self.t >= self.max_episode_steps) & ~self.term
        self.done |= succ | trunc
        return Step(obs=self._obs(), reward=succ.float(), terminated=self.term.clone(),
                    truncated=trunc, info={"success": succ})

    def render(self):
        return torch.zeros(self.num_envs, 3, 8, 8, dtype=torch.uint8)


def reach_policy(seed: int | None = 0, **kwargs):
    """A small TinyVLA sized for :class:`ReachEnv` (chunks of 2 steps of 2-D actions), its
    weights drawn after ``torch.manual_seed(seed)`` (``None``: from the RNG as it stands);
    ``kwargs`` add to or override the model's settings (``normalization``, ``critic_time``)."""
    from pirl.models import build_policy

    if seed is not None:
        torch.manual_seed(seed)
    return build_policy("tiny", **{"action_horizon": 2, "action_dim": 2, "state_dim": 2,
                                   "num_cameras": 0, "width": 32, "depth": 1, "heads": 2,
                                   "value_hidden": 32, "vocab": ["reach the point"], **kwargs})
