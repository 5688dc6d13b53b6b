"""Ray plumbing shared by the workers and the driver: :class:`WorkerError`, :func:`get_all`
(a fail-fast ``ray.get`` that names the dead worker), and the :class:`WorkerSpec` every worker is
built from."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pirl.envs.base import BatchedEnv
from pirl.flow.base import Sampler
from pirl.models.base import FlowPolicy
from pirl.runners.placement import shard_rows


class WorkerError(RuntimeError):
    """A Ray worker of the run died or failed; the message names it (role, index, env rows)."""


def get_all(refs: Sequence[Any], names: Sequence[str], timeout_s: float | None = None) -> list:
    """``ray.get`` of several futures, failing fast: the first one that errors (its worker died
    or raised) raises :class:`WorkerError` naming that worker, without waiting for the others
    (which may be blocked forever in a collective with the dead one)."""
    import ray

    index = {r: i for i, r in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    left = list(refs)
    t0 = time.monotonic()
    while left:
        wait = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - t0))
        ready, left = ray.wait(left, num_returns=1, timeout=wait)
        if not ready:
            raise WorkerError(f"timed out after {timeout_s:.0f}s waiting for "
                              + ", ".join(names[index[r]] for r in left))
        r = ready[0]
        try:
            out[index[r]] = ray.get(r)
        except ray.exceptions.RayActorError as e:
            raise WorkerError(f"{names[index[r]]} died: {_short(e)}") from e
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, WorkerError):  # a worker that this one depends on died
                raise WorkerError(f"{cause} (reported by {names[index[r]]})") from e
            raise WorkerError(f"{names[index[r]]} failed: {_short(e)}") from e
        except ray.exceptions.RayError as e:  # e.g. Ray's memory monitor killed the worker
            raise WorkerError(f"{names[index[r]]} failed: {type(e).__name__}: {_short(e)}") from e
    return out


def _short(e: BaseException, limit: int = 600) -> str:
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # (Ray colours its reprs)
    text = " | ".join(x.strip() for x in s if x.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


# ============================================================================ worker building blocks
@dataclass
class EnvSpec:
    """What the trainer needs to know about the N envs without holding them (learner ranks)."""

    num_envs: int
    action_dim: int
    state_dim: int
    max_episode_steps: int
    task_names: list[str]
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, env: BatchedEnv) -> "EnvSpec":
        return cls(num_envs=env.num_envs, action_dim=env.action_dim, state_dim=env.state_dim,
                   max_episode_steps=env.max_episode_steps, task_names=list(env.task_names))


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its part of the run (sent once through Ray).

    env_fn: ``env_fn(num_envs=n) -> BatchedEnv`` builds a slice of ``n`` envs (picklable, e.g.
    ``functools.partial(pirl.envs.make_env, "tabletop", split="train")``).
    modules: ``{"policy": FlowPolicy, "sampler": Sampler}`` with the starting weights (pickled
    once into the object store; each worker moves its copy to its device).
    demos: the SFT demos of ``rl.bc_coef``'s loss (:class:`~pirl.algos.sft.SFTData`, or its
    object-store ref), held by the learner ranks; None without that loss.
    """

    env_fn: Callable[..., BatchedEnv]
    modules: Any
    env_spec: EnvSpec
    rl: Any  # pirl.config.schema.RLConfig
    seed: int
    device: str = "cpu"
    threads: int | None = 1
    demos: Any = None


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _resolve(x: Any) -> Any:
    """An ObjectRef's value (workers may get either the ref or the value)."""
    try:
        import ray

        if isinstance(x, ray.ObjectRef):
            return ray.get(x)
    except ImportError:  # pragma: no cover
        pass
    return x


def _build_modules(spec: WorkerSpec, device: str) -> tuple[FlowPolicy, Sampler]:

    mods = _resolve(spec.modules)
    policy, sampler = copy.deepcopy(mods["policy"]), copy.deepcopy(mods["sampler"])
    return policy.to(device), sampler.to(device)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module.state_dict()`` (what weight sync ships)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _split(items: list, parts: int) -> list[list]:
    return [items[a:b] for a, b in shard_rows(len(items), parts)]
