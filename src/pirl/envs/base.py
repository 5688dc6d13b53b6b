"""The batched environment API shared by every environment in pirl.

A :class:`BatchedEnv` steps ``N`` environments at once.  Observations are dicts:

- ``images``: ``[N, C, 3, H, W]`` uint8 (C cameras; may be absent for state-only envs),
- ``state``: ``[N, S]`` float32 proprioception,
- ``instruction``: ``list[str]`` of length N,
- ``task_id``: ``[N]`` int64 index into :attr:`BatchedEnv.task_names`.

Episode bookkeeping:

- ``reset(seed, task_ids=None, episode_seeds=None)`` resets all N envs.  ``episode_seeds [N]``
  fixes each env's initial state: two envs with the same ``task_id`` and episode seed start in the
  same state (what GRPO groups need).  Given only ``seed``, the per-env seeds and tasks are drawn
  deterministically from it.
- ``step(action [N, A])`` returns a :class:`Step`.  ``reward [N]`` float32,
  ``terminated [N]`` bool (success or failure ends the episode), ``truncated [N]`` bool (time
  limit), ``info["success"] [N]`` bool (success at this step).
- With ``auto_reset=True`` an env that finished is reset on the same call: the returned obs is the
  first obs of its next episode, the finished episode's last obs is in ``info["final_obs"]`` and
  ``info["episode_success"]`` / ``info["episode_return"]`` hold the finished episode's results.
  With ``auto_reset=False`` a finished env is frozen (it ignores actions, returns reward 0 and
  keeps ``terminated``/``truncated`` set) until the next :meth:`reset`, so every env can be run to
  a fixed horizon.

:class:`ChunkedEnv` executes whole action chunks ``[N, H, A]`` (the outer MDP step of pi_RL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Obs = dict[str, Any]


@dataclass
class Step:
    obs: Obs
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class BatchedEnv:
    """Abstract batched environment (see module docstring)."""

    num_envs: int
    action_dim: int
    state_dim: int
    max_episode_steps: int
    task_names: list[str]
    device: torch.device = torch.device("cpu")

    def reset(self, seed: int | None = None, task_ids: torch.Tensor | None = None,
              episode_seeds: torch.Tensor | None = None) -> Obs:
        raise NotImplementedError

    def step(self, action: torch.Tensor) -> Step:
        raise NotImplementedError

    def render(self) -> torch.Tensor:
        """Current frames ``[N, 3, H, W]`` uint8 for videos (default: first camera)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def fixed_init_states(env: Any) -> int:
    """How many fixed initial states per task ``env`` has, 0 if none: an env with F of them
    (its ``fixed_init_states`` attribute; LIBERO: 50) starts an episode with seed s from state
    ``s % F``."""
    return int(getattr(env, "fixed_init_states", 0) or 0)


@dataclass
class ChunkStep:
    """Result of executing one action chunk.

    reward: ``[N]`` sum of rewards over the executed steps; done: ``[N]`` episode ended inside the
    chunk (terminated or truncated); success: ``[N]`` success reached inside the chunk;
    steps: ``[N]`` env steps executed (< H when the episode ended inside the chunk);
    frames: optional list of ``[N, 3, H, W]`` frames, one per executed step (for videos).
    """

    obs: Obs
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    success: torch.Tensor
    steps: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    frames: list[torch.Tensor] | None = None

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class ChunkedEnv:
    """Execute action chunks ``[N, H, A]`` on a non-auto-resetting :class:`BatchedEnv`.

    Rewards are summed over the chunk's steps; an env whose episode ends inside the chunk ignores
    the rest of its chunk (the underlying env is frozen once done).
    """

    def __init__(self, env: BatchedEnv):
        self.env = env

    def __getattr__(self, name):  # delegate num_envs, task_names, reset, render, ...
        return getattr(self.env, name)

    def step_chunk(self, chunk: torch.Tensor, record: bool = False) -> ChunkStep:
        n, h, _ = chunk.shape
        dev = chunk.device
        reward = torch.zeros(n, device=dev)
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        frames = [] if record else None
        out = None
        for i in range(h):
            out = self.env.step(chunk[:, i])
            alive = ~done
            reward += out.reward.to(dev) * alive
            success |= out.info["success"].to(dev) & alive
            steps += alive.long()
            done = done | out.done.to(dev)
            if record:
                frames.append(self.env.render())
            if bool(done.all()):
                break
        return ChunkStep(obs=out.obs, reward=reward, terminated=out.terminated.to(dev),
                         truncated=out.truncated.to(dev), success=success, steps=steps,
                         info=out.info, frames=frames)
