"""Ray actor bodies of the disaggregated placement's rollout side: :class:`EnvWorker` (a slice
of the envs, stepped on CPU) and :class:`RolloutWorker` (a policy replica that drives a group of
env workers, pipelined over stages)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch

from pirl.envs.base import BatchedEnv
from pirl.runners.distributed.remote import WorkerSpec, _build_modules, _set_threads, _split
from pirl.runners.distributed.stages import EnvSlice, RemoteStage, collect_staged


class EnvWorker(EnvSlice):
    """Ray actor body: env rows ``[start, stop)`` built in this process."""

    def __init__(self, env_fn: Callable[..., BatchedEnv], start: int, stop: int,
                 threads: int | None = 1):
        _set_threads(threads)
        super().__init__(env_fn(num_envs=stop - start), start, stop)

    def pid(self) -> int:
        return os.getpid()


class RolloutWorker:
    """Ray actor body: an inference worker of the disaggregated mode.

    Holds a policy replica and the chain-noise generator, and drives its env workers, pipelined
    over ``stages`` stages of consecutive workers (see :func:`collect_staged`).  What to roll
    out (tasks, episode seeds, replayed states, GRPO groups, the noise scale, the horizon) comes
    from the learner's :meth:`~pirl.runners.rl.RLTrainer.begin_rollout` each iteration, so the
    learner alone owns the task statistics.  With several rollout workers (each driving a
    contiguous group of env workers) every one keeps an identical generator, draws the chain
    noise for all N envs and uses its rows; they form a gloo group to agree on when every
    episode has ended."""

    def __init__(self, spec: WorkerSpec, env_workers: Sequence[tuple[Any, int, int, str]],
                 stages: int = 1, device: str | None = None):
        _set_threads(spec.threads)
        self.device = device or spec.device
        self.policy, self.sampler = _build_modules(spec, self.device)
        self.sample_gen = torch.Generator()  # its state comes from the learner (load_rollout_state)
        self.num_envs = spec.env_spec.num_envs
        groups = [list(g) for g in _split(list(env_workers), stages)]
        self.stages = [RemoteStage(g, spec.env_spec.action_dim) for g in groups]
        self.group = None

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        from pirl.runners.placement import free_port, node_ip

        return node_ip(), free_port()

    def init_group(self, addr: str, port: int, rank: int, world: int,
                   timeout_s: float = 300.0) -> None:
        """Join the rollout workers' gloo group (only needed with several rollout workers)."""
        import datetime

        import torch.distributed as dist

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.group = dist.group.WORLD

    def _all_done(self, mine: bool) -> bool:
        if self.group is None:
            return mine
        import torch.distributed as dist

        flag = torch.tensor([0 if mine else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group)
        return int(flag) == 0

    def rollout(self, plan: dict[str, Any]) -> dict[str, Any]:
        """This worker's env rows for one iteration: ``{"rollout", "time"}``.  ``plan``: the
        learner's :meth:`~pirl.runners.distributed.learner.LearnerWorker.plan`."""
        self.policy.eval()
        if plan["noise_scale"] is not None:
            self.sampler.noise_scale = plan["noise_scale"]
        t0 = time.perf_counter()
        ro = collect_staged(self.policy, self.sampler, self.stages, num_envs=self.num_envs,
                            num_chunks=plan["num_chunks"], reset_kwargs=plan["reset_kwargs"],
                            action_chunk=plan["action_chunk"], generator=self.sample_gen,
                            with_values=plan["with_values"], all_done=self._all_done)
        return {"rollout": ro, "time": time.perf_counter() - t0}

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.policy.load_state_dict(weights["policy"])
        self.sampler.load_state_dict(weights["sampler"])

    def rollout_state(self) -> dict[str, Any]:
        return {"sample_gen": self.sample_gen.get_state()}

    def load_rollout_state(self, sd: dict[str, Any]) -> None:
        self.sample_gen.set_state(sd["sample_gen"])
