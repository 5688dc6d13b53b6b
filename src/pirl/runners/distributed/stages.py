"""Env *stages* and the pipelined rollout over them.

An env stage is a contiguous group of env rows stepped together: :class:`LocalStage` (an
:class:`EnvSlice` in this process) or :class:`RemoteStage` (Ray env workers).
:func:`collect_staged` is :func:`pirl.runners.rollout.collect` over stages, pipelined so that
while one stage's envs step the policy infers for the next stage; it returns the same
:class:`~pirl.runners.rollout.Rollout` as ``collect``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pirl.envs.base import BatchedEnv, ChunkedEnv
from pirl.flow.base import Chain, Sampler
from pirl.models.base import FlowPolicy, to_device
from pirl.flow.common import chain_dtype
from pirl.runners.distributed.noise import (ChainNoise, draw_chain_noise,
                                            sample_with_noise)
from pirl.runners.distributed.remote import get_all
from pirl.runners.rollout import Rollout, cat_chains, env_actions, policy_obs, stack_obs

Obs = dict[str, Any]


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
        return StepResult(obs=to_device(policy_obs(obs), "cpu"))

    def step(self, actions: torch.Tensor) -> StepResult:
        """actions: ``[n, c, A_env]`` the executed chunk of this slice."""
        out = self.env.step_chunk(actions.to(self.env.device))
        return StepResult(obs=to_device(policy_obs(out.obs), "cpu"), reward=out.reward.float().cpu(),
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

    A critic that reads the time left gets ``obs["time_left"]`` as in ``collect``: ``1 - t /
    num_chunks`` at chunk step ``t``, ``1 - T / num_chunks`` at the final bootstrap obs.
    """
    stages = list(stages)
    for a, b in zip(stages, stages[1:]):
        if a.stop != b.start:
            raise ValueError("stages must be contiguous and in row order")
    r0, r1 = stages[0].start, stages[-1].stop
    all_done = all_done or (lambda x: x)
    timed = with_values and getattr(policy, "critic_takes_time", False)

    def observe(o: Obs, t: int, rows: int) -> Obs:  # collect's time_left rule, on the CPU
        return dict(o, time_left=torch.full((rows,), 1.0 - t / num_chunks)) if timed else o

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
            obs_t = observe(res.obs, t, st.stop - st.start)
            pobs = to_device(obs_t, device)
            prefix = policy.encode_prefix(pobs)
            if noise is None:
                dtype, dev = chain_dtype(prefix)
                noise = draw_chain_noise(sampler, policy, num_envs, generator=generator,
                                         dtype=dtype, device=dev)
            chain = sample_with_noise(sampler, policy, prefix,
                                      noise.rows(st.start, st.stop))
            v = (policy.value(prefix).float().cpu() if with_values
                 else torch.zeros(st.stop - st.start))
            act = env_actions(policy.postprocess_actions(chain.actions), action_chunk,
                              st.env_action_dim)
            pending[s] = st.submit_step(act.cpu())
            cur.obs[s], cur.chains[s], cur.values[s] = obs_t, to_device(chain, "cpu"), v
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
        last = torch.cat([policy.value(policy.encode_prefix(to_device(
            observe(o, len(obs_l), st.stop - st.start), device))).float().cpu()
            for o, st in zip(obs_cur, stages)])
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
