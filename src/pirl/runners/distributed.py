"""Scale-out: Ray env / rollout / learner workers and a torch.distributed learner.

The placement modes are described in :mod:`pirl.runners.placement`.  This module holds

- **split-invariant sampling**: :func:`draw_chain_noise` draws every random number one
  denoising-chain batch needs, for the *full* batch of N envs and in exactly the order
  :meth:`GaussianChainSampler.sample` draws them from its generator; :func:`sample_with_noise`
  integrates a chain from such pre-drawn noise (any subset of rows).  So env ``i`` gets the same
  noise whichever worker, stage or batch it is sampled in, and a full-batch replay equals
  ``sampler.sample`` bit for bit (tested);
- :func:`collect_staged`: :func:`pirl.runners.rollout.collect` over env *stages* (local slices or
  remote Ray env workers), pipelined so that while one stage's envs step, the policy infers for
  the next stage; it returns the same :class:`~pirl.runners.rollout.Rollout` as ``collect``;
- the workers: :class:`EnvWorker` (a slice of the envs), :class:`RolloutWorker` (inference,
  drives the env workers), :class:`LearnerWorker` (one torch.distributed rank: DDP or FSDP2
  data-parallel PPO/GRPO update) and :class:`ColocatedWorker` (env slice + rollout + learner
  rank in one process);
- :class:`DistributedTrainer`: the driver-side object with :class:`~pirl.runners.rl.RLTrainer`'s
  interface (``iteration()``, ``state_dict()``, ``load_state_dict()``, ``iter``, ``env_steps``)
  that runs the colocated or disaggregated placement on Ray.

Data parallelism: every learner rank holds the full rollout (it is small next to the model:
obs, chains, rewards), computes the same advantages, draws the same minibatch permutation, and
takes its contiguous share of each minibatch; the share's loss is scaled by
``world * n_rank / n_minibatch`` so that DDP's gradient average equals the full minibatch's mean
gradient (also for unequal or empty shares).  The update is therefore the local one up to float
summation order.

Failures: any worker that dies (killed process, OOM, crash) makes :meth:`DistributedTrainer.
iteration` raise :class:`WorkerError` naming the worker; no update runs on partial data, and the
trainer's counters are unchanged, so ``pirl train --resume RUN_DIR`` continues from the last
checkpoint.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pirl.envs.base import BatchedEnv, ChunkedEnv
from pirl.flow.base import Chain, Sampler
from pirl.models.base import FlowPolicy
from pirl.runners.placement import LearnerPlacement, PlacementConfig, shard_rows
from pirl.runners.rollout import Rollout, cat_chains, env_actions, policy_obs, stack_obs

Obs = dict[str, Any]


class WorkerError(RuntimeError):
    """A Ray worker of the run died or failed; the message names it (role, index, env rows)."""


# ============================================================================ split-invariant noise
@dataclass
class ChainNoise:
    """Every random number of one batch of denoising chains.

    x0: ``[B, H, A]`` initial noise; z: ``[B, K, H, A]`` the standard-normal draws of the
    stochastic transitions (zeros for steps no row samples); stochastic: ``[B, K]`` bool mask.
    """

    x0: torch.Tensor
    z: torch.Tensor
    stochastic: torch.Tensor

    def rows(self, start: int, stop: int) -> "ChainNoise":
        """Rows ``[start, stop)``."""
        return ChainNoise(self.x0[start:stop], self.z[start:stop], self.stochastic[start:stop])


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor of a (nested) prefix cache (gives device and dtype)."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        items = list(x.values())
    elif isinstance(x, (list, tuple)):
        items = list(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = [getattr(x, f.name) for f in dataclasses.fields(x)]
    else:
        return None
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def chain_dtype(prefix: Any) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of the chains sampled from ``prefix`` (the sampler's rule: float64 for
    float64 policies, else float32)."""
    ref = _first_tensor(prefix)
    if ref is None:
        raise ValueError("cannot infer device / dtype from the prefix cache")
    return (torch.float64 if ref.dtype == torch.float64 else torch.float32), ref.device


def _require_gaussian_chain(sampler: Sampler) -> None:
    from pirl.flow.common import GaussianChainSampler

    if not isinstance(sampler, GaussianChainSampler):
        raise TypeError(f"{type(sampler).__name__} is not a GaussianChainSampler: split "
                        "placements need pre-drawn chain noise (draw_chain_noise)")


def draw_chain_noise(sampler: Sampler, policy: FlowPolicy, batch: int, *,
                     generator: torch.Generator, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> ChainNoise:
    """Draw all random numbers of ``batch`` chains from ``generator`` in the order
    :meth:`GaussianChainSampler.sample` consumes it: ``x0 [B, H, A]``, then the stochastic
    mask, then one ``[B, H, A]`` normal draw per step on which any row is stochastic."""
    _require_gaussian_chain(sampler)
    shape = (batch, policy.action_horizon, policy.action_dim)
    x0 = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    stoch = sampler.stochastic_mask(batch, x0.device, generator)
    k = sampler.num_steps
    z = torch.zeros(batch, k, *shape[1:], device=x0.device, dtype=dtype)
    for i in range(k):
        if bool(stoch[:, i].any()):
            z[:, i] = torch.randn(shape, generator=generator, device=x0.device, dtype=dtype)
    return ChainNoise(x0=x0, z=z, stochastic=stoch)


def sample_with_noise(sampler: Sampler, policy: FlowPolicy, prefix: Any,
                      noise: ChainNoise) -> Chain:
    """Integrate a batch of chains like :meth:`GaussianChainSampler.sample` but with the random
    numbers given (``noise`` rows = prefix rows); returns the same :class:`Chain`."""
    from pirl.flow.schedule import time_grid

    _require_gaussian_chain(sampler)
    x = noise.x0
    b, dev, dtype = x.shape[0], x.device, x.dtype
    grid = time_grid(sampler.num_steps, device=dev, dtype=dtype)
    stoch = noise.stochastic.to(dev)
    xs, means, stds = [x], [], []
    for k in range(sampler.num_steps):
        t, t_next = grid[k].expand(b), grid[k + 1].expand(b)
        out = policy.velocity(prefix, x, t)
        s_k = stoch[:, k]
        mean, std = sampler.transition(x, out, t, t_next, s_k)
        sk3 = s_k.view(b, 1, 1)
        std = torch.where(sk3, std, torch.zeros_like(std))
        x = torch.where(sk3, mean + std * noise.z[:, k].to(dev), mean) if bool(s_k.any()) else mean
        xs.append(x)
        means.append(mean)
        stds.append(std)
    return sampler._finish(torch.stack(xs, 1), grid, torch.stack(means, 1),
                           torch.stack(stds, 1), stoch)


# ============================================================================ env stages
def slice_reset_kwargs(kwargs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """The reset arguments of env rows ``[start, stop)``: per-env tensors are sliced.

    Split placements need ``episode_seeds`` (per-env initial states): without it an env slice
    would draw its own episodes and differ from the unsplit run."""
    if kwargs.get("episode_seeds") is None:
        raise ValueError("split env placements need reset(episode_seeds=...) so that each env's "
                         "episode does not depend on the worker split")
    out = dict(kwargs)
    for k in ("task_ids", "episode_seeds"):
        v = out.get(k)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = v[start:stop].clone()
    return out


@dataclass
class StepResult:
    """What an env slice returns after a reset (only ``obs``) or a chunk step.

    obs: policy obs of the slice; reward / terminated / truncated / success / done: ``[n]``;
    steps: env steps executed in this chunk step (summed over the slice).
    """

    obs: Obs
    reward: torch.Tensor | None = None
    terminated: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    success: torch.Tensor | None = None
    done: torch.Tensor | None = None
    steps: int = 0


class EnvSlice:
    """Rows ``[start, stop)`` of the N envs, stepped in this process: owns a :class:`ChunkedEnv`
    of ``stop - start`` envs.  Also the body of the :class:`EnvWorker` actor."""

    def __init__(self, env: BatchedEnv, start: int, stop: int):
        if env.num_envs != stop - start:
            raise ValueError(f"env has {env.num_envs} envs, rows [{start}, {stop}) need "
                             f"{stop - start}")
        self.env = env if isinstance(env, ChunkedEnv) else ChunkedEnv(env)
        self.start, self.stop = start, stop

    def reset(self, kwargs: dict[str, Any]) -> StepResult:
        """``kwargs``: the full batch's reset arguments (sliced here)."""
        obs = self.env.reset(**slice_reset_kwargs(kwargs, self.start, self.stop))
        return StepResult(obs=_cpu(policy_obs(obs)))

    def step(self, actions: torch.Tensor) -> StepResult:
        """actions: ``[n, c, A_env]`` the executed chunk of this slice."""
        out = self.env.step_chunk(actions.to(self.env.device))
        return StepResult(obs=_cpu(policy_obs(out.obs)), reward=out.reward.float().cpu(),
                          terminated=out.terminated.cpu(), truncated=out.truncated.cpu(),
                          success=out.success.cpu(), done=out.done.cpu(),
                          steps=int(out.steps.sum()))


class Stage:
    """A contiguous group of env rows whose envs step together (one pipeline stage).

    Subclasses submit work and return a handle; :meth:`wait` turns a handle into a
    :class:`StepResult` (for remote stages: concatenating its workers' results in row order).
    """

    start: int
    stop: int
    env_action_dim: int

    def submit_reset(self, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def submit_step(self, actions: torch.Tensor) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any) -> StepResult:
        raise NotImplementedError


class LocalStage(Stage):
    """A stage stepped synchronously in this process."""

    def __init__(self, env_slice: EnvSlice):
        self.slice = env_slice
        self.start, self.stop = env_slice.start, env_slice.stop
        self.env_action_dim = env_slice.env.action_dim

    def submit_reset(self, kwargs):
        return self.slice.reset(kwargs)

    def submit_step(self, actions):
        return self.slice.step(actions)

    def wait(self, handle):
        return handle


class RemoteStage(Stage):
    """A stage made of Ray :class:`EnvWorker` actors (contiguous row ranges, in order).

    ``workers``: ``(actor, start, stop, name)`` tuples.  Calls return immediately (Ray futures);
    :meth:`wait` raises :class:`WorkerError` naming a worker that died.
    """

    def __init__(self, workers: Sequence[tuple[Any, int, int, str]], env_action_dim: int):
        self.workers = list(workers)
        self.env_action_dim = env_action_dim
        self.start, self.stop = self.workers[0][1], self.workers[-1][2]
        for (_, _, b, _), (_, a, _, _) in zip(self.workers, self.workers[1:]):
            if a != b:
                raise ValueError("a stage's env workers must hold contiguous rows")

    def submit_reset(self, kwargs):
        return [w.reset.remote(kwargs) for w, *_ in self.workers]

    def submit_step(self, actions):
        return [w.step.remote(actions[a - self.start:b - self.start])
                for w, a, b, _ in self.workers]

    def wait(self, handle):
        results = get_all(handle, [name for *_, name in self.workers])
        return cat_results(results)


def cat_results(results: list[StepResult]) -> StepResult:
    """Concatenate the step results of consecutive row slices."""
    if len(results) == 1:
        return results[0]
    obs = stack_obs([r.obs for r in results])
    if results[0].reward is None:
        return StepResult(obs=obs)
    cat = lambda f: torch.cat([getattr(r, f) for r in results])  # noqa: E731
    return StepResult(obs=obs, reward=cat("reward"), terminated=cat("terminated"),
                      truncated=cat("truncated"), success=cat("success"), done=cat("done"),
                      steps=sum(r.steps for r in results))


# ============================================================================ staged rollout
@dataclass
class _StepBuffer:
    """Per-stage outputs of one chunk step, committed once every stage has its result."""

    obs: dict[int, Obs] = field(default_factory=dict)
    chains: dict[int, Chain] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    results: dict[int, StepResult] = field(default_factory=dict)


@torch.no_grad()
def collect_staged(policy: FlowPolicy, sampler: Sampler, stages: Sequence[Stage], *,
                   num_envs: int, num_chunks: int, reset_kwargs: dict[str, Any],
                   action_chunk: int, generator: torch.Generator, with_values: bool = True,
                   all_done: Callable[[bool], bool] | None = None) -> Rollout:
    """:func:`pirl.runners.rollout.collect` for env rows split into ``stages``, pipelined.

    stages: row-ordered, contiguous :class:`Stage` s covering rows ``[r0, r1)`` of the
    ``num_envs`` envs (``r0 > 0`` or ``r1 < num_envs`` when other processes own the other rows,
    as in the colocated mode).  At every chunk step the chain noise is drawn for all
    ``num_envs`` rows (:func:`draw_chain_noise`) and each stage uses its rows, so the result is
    the rows ``[r0, r1)`` of the unsplit ``collect`` (same seed), up to the float effects of
    batch size on the policy's matmuls.

    Pipelining: stage ``s``'s chunk is submitted as soon as it is inferred, and the policy moves
    on to stage ``s + 1`` while it steps.  Whether all envs are done after step ``t`` is known
    only once the last stage's result is in, so the first stages of step ``t + 1`` are inferred
    speculatively; if the rollout ends there, their outputs are dropped, the generator is rewound
    and their (no-op: frozen envs) steps are drained.

    all_done: reduces "all my rows are done" over processes (colocated mode: an all-reduce);
    default: identity.
    """
    stages = list(stages)
    for a, b in zip(stages, stages[1:]):
        if a.stop != b.start:
            raise ValueError("stages must be contiguous and in row order")
    r0, r1 = stages[0].start, stages[-1].stop
    all_done = all_done or (lambda x: x)
    device = next(policy.parameters()).device
    n = r1 - r0
    done = torch.zeros(n, dtype=torch.bool)
    pending = [st.submit_reset(reset_kwargs) for st in stages]
    obs_cur: list[Obs | None] = [None] * len(stages)
    obs_l, chains, values = [], [], []
    rewards, terms, truncs, succ, valid = [], [], [], [], []
    steps = 0
    prev: _StepBuffer | None = None
    t = 0
    while True:
        gen_state = generator.get_state()
        noise: ChainNoise | None = None
        cur = _StepBuffer()
        stop = False
        for s, st in enumerate(stages):
            res = st.wait(pending[s])
            pending[s] = None
            obs_cur[s] = res.obs
            if prev is not None:
                prev.results[s] = res
                if s == len(stages) - 1:
                    # step t-1 complete for every stage: record it, decide whether to go on
                    step_done = torch.cat([prev.results[i].done for i in range(len(stages))])
                    res_all = cat_results([prev.results[i] for i in range(len(stages))])
                    obs_l.append(stack_obs([prev.obs[i] for i in range(len(stages))]))
                    chains.append(cat_chains([prev.chains[i] for i in range(len(stages))]))
                    values.append(torch.cat([prev.values[i] for i in range(len(stages))]))
                    valid.append(~done)
                    rewards.append(res_all.reward)
                    terms.append(res_all.terminated & ~done)
                    truncs.append(res_all.truncated & ~done)
                    succ.append(res_all.success & ~done)
                    steps += res_all.steps
                    done = done | step_done
                    stop = all_done(bool(done.all()))
            if stop or t >= num_chunks:
                stop = True
                continue  # no more chunk steps: only collect the remaining stages' results
            pobs = _to_device(res.obs, device)
            prefix = policy.encode_prefix(pobs)
            if noise is None:
                dtype, dev = chain_dtype(prefix)
                noise = draw_chain_noise(sampler, policy, num_envs, generator=generator,
                                         dtype=dtype, device=dev)
            chain = sample_with_noise(sampler, policy, prefix,
                                      noise.rows(st.start, st.stop))
            v = (policy.value(prefix).float().cpu() if with_values
                 else torch.zeros(st.stop - st.start))
            act = env_actions(chain.actions, action_chunk, st.env_action_dim)
            pending[s] = st.submit_step(act.cpu())
            cur.obs[s], cur.chains[s], cur.values[s] = res.obs, _chain_cpu(chain), v
        if stop:
            if noise is not None:
                generator.set_state(gen_state)  # drop the speculative step's draws
            for s, h in enumerate(pending):
                if h is not None:
                    stages[s].wait(h)  # frozen envs: a no-op step; surfaces worker errors
            break
        prev = cur
        t += 1
    vals = torch.stack(values)
    if with_values:
        last = torch.cat([policy.value(policy.encode_prefix(_to_device(o, device))).float().cpu()
                          for o in obs_cur])
        nxt = torch.cat([vals[1:], last[None]], dim=0)
    else:
        nxt = torch.zeros_like(vals)
    return Rollout(obs=obs_l, chains=chains, values=vals, next_values=nxt,
                   rewards=torch.stack(rewards), terminated=torch.stack(terms),
                   truncated=torch.stack(truncs), success=torch.stack(succ),
                   valid=torch.stack(valid), env_steps=steps)


def cat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Concatenate rollouts of consecutive env slices (same number of chunk steps T) along the
    env dim: the rollout of all their envs."""
    t = {len(p.chains) for p in parts}
    if len(t) != 1:
        raise ValueError(f"rollout slices have different lengths {sorted(t)}")
    cat1 = lambda f: torch.cat([getattr(p, f) for p in parts], dim=1)  # noqa: E731
    return Rollout(obs=[stack_obs([p.obs[i] for p in parts]) for i in range(t.pop())],
                   chains=[cat_chains([p.chains[i] for p in parts])
                           for i in range(len(parts[0].chains))],
                   values=cat1("values"), next_values=cat1("next_values"),
                   rewards=cat1("rewards"), terminated=cat1("terminated"),
                   truncated=cat1("truncated"), success=cat1("success"), valid=cat1("valid"),
                   env_steps=sum(p.env_steps for p in parts))


def _cpu(obs: Obs) -> Obs:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}


def _to_device(obs: Obs, device) -> Obs:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}


def _chain_cpu(chain: Chain) -> Chain:
    return Chain(*(getattr(chain, f).cpu() for f in
                   ("x", "t", "mean", "std", "stochastic", "step_logp", "init_logp", "logp")))


# ============================================================================ Ray helpers
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
            raise WorkerError(f"{names[index[r]]} failed: {_short(e)}") from e
    return out


def _short(e: BaseException, limit: int = 600) -> str:
    s = str(e).strip().splitlines()
    text = " | ".join(x.strip() for x in s if x.strip())
    return text if len(text) <= limit else text[:limit] + " ..."
