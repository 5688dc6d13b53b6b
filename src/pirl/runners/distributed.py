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
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pirl.envs.base import BatchedEnv, ChunkedEnv
from pirl.flow.base import Chain, Sampler
from pirl.models.base import FlowPolicy, first_tensor, to_device
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




def chain_dtype(prefix: Any) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of the chains sampled from ``prefix`` (the sampler's rule: float64 for
    float64 policies, else float32)."""
    ref = first_tensor(prefix)
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
            pobs = to_device(res.obs, device)
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
            cur.obs[s], cur.chains[s], cur.values[s] = res.obs, to_device(chain, "cpu"), v
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
        last = torch.cat([policy.value(policy.encode_prefix(to_device(o, device))).float().cpu()
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
            cause = getattr(e, "cause", None)
            if isinstance(cause, WorkerError):  # a worker that this one depends on died
                raise WorkerError(f"{cause} (reported by {names[index[r]]})") from e
            raise WorkerError(f"{names[index[r]]} failed: {_short(e)}") from e
    return out


def _short(e: BaseException, limit: int = 600) -> str:
    s = str(e).strip().splitlines()
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
    """

    env_fn: Callable[..., BatchedEnv]
    modules: Any
    env_spec: EnvSpec
    rl: Any  # pirl.config.schema.RLConfig
    seed: int
    device: str = "cpu"
    threads: int | None = 1


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
    import copy

    mods = _resolve(spec.modules)
    policy, sampler = copy.deepcopy(mods["policy"]), copy.deepcopy(mods["sampler"])
    return policy.to(device), sampler.to(device)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module.state_dict()`` (what weight sync ships)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


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

    Holds a policy replica and the trainer's rollout state (sample / group generators, the
    iteration counter that seeds the episodes) and drives its env workers, pipelined over
    ``stages`` stages of consecutive workers (see :func:`collect_staged`).  With several
    rollout workers (each driving a contiguous group of env workers) every one keeps identical
    generators, draws the chain noise for all N envs and uses its rows; they form a gloo group
    to agree on when every episode has ended."""

    def __init__(self, spec: WorkerSpec, env_workers: Sequence[tuple[Any, int, int, str]],
                 stages: int = 1, device: str | None = None):
        from pirl.runners.rl import RLTrainer

        _set_threads(spec.threads)
        self.device = device or spec.device
        self.policy, self.sampler = _build_modules(spec, self.device)
        self.trainer = RLTrainer(self.policy, self.sampler, spec.env_spec, spec.rl, spec.seed)
        self.trainer.optimizer = None  # inference only
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

    def rollout(self) -> dict[str, Any]:
        """This worker's env rows for one iteration: ``{"rollout", "groups", "time"}``."""
        tr = self.trainer
        self.policy.eval()
        t0 = time.perf_counter()
        ro = collect_staged(self.policy, self.sampler, self.stages, num_envs=self.num_envs,
                            num_chunks=tr.num_chunks, reset_kwargs=tr._reset_kwargs(),
                            action_chunk=tr.action_chunk, generator=tr.sample_gen,
                            with_values=tr.algo == "ppo", all_done=self._all_done)
        tr.iter += 1
        return {"rollout": ro, "groups": getattr(tr, "_groups", None),
                "time": time.perf_counter() - t0}

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.policy.load_state_dict(weights["policy"])
        self.sampler.load_state_dict(weights["sampler"])

    def rollout_state(self) -> dict[str, Any]:
        tr = self.trainer
        return {"iter": tr.iter, "sample_gen": tr.sample_gen.get_state(),
                "group_gen": tr.group_gen.get_state()}

    def load_rollout_state(self, sd: dict[str, Any]) -> None:
        tr = self.trainer
        tr.iter = sd["iter"]
        tr.sample_gen.set_state(sd["sample_gen"])
        tr.group_gen.set_state(sd["group_gen"])


def _split(items: list, parts: int) -> list[list]:
    return [items[a:b] for a, b in shard_rows(len(items), parts)]


# ============================================================================ data-parallel learner
class _LossModule(nn.Module):
    """Policy + sampler as one module whose ``forward`` is the minibatch loss, so DDP's gradient
    hooks and FSDP2's unshard / reshard hooks run around it."""

    def __init__(self, trainer: "DataParallelRLTrainer"):
        super().__init__()
        self.policy = trainer.policy
        self.sampler = trainer.sampler
        self._trainer = [trainer]  # a list: not registered as a submodule

    def forward(self, o, c, old_logp, adv, ret, old_values, *rest):
        # rest: (frozen_prefix, sil, bc, scale)
        scale, extra = rest[-1], rest[:-1]
        loss, stats = self._trainer[0].minibatch_loss(o, c, old_logp, adv, ret, old_values,
                                                      *extra)
        return loss * scale, stats


def _rl_trainer_cls():
    from pirl.runners.rl import RLTrainer

    return RLTrainer


class DataParallelRLTrainer(_rl_trainer_cls()):
    """:class:`~pirl.runners.rl.RLTrainer` whose update runs on ``world`` torch.distributed ranks.

    Every rank holds the full rollout and computes the same advantages and minibatch
    permutations; rank ``r`` takes rows ``shard_rows(M, world)[r]`` of each minibatch of ``M``
    and scales its mean loss by ``world * M_r / M``, so the averaged gradient (DDP all-reduce, or
    FSDP2 reduce-scatter) is the full minibatch's.  A rank whose share is empty (``M < world``)
    runs one row with weight 0, so collectives stay matched.  Stats are the ``M_r / M``-weighted
    sums over ranks (identical on every rank, so ``target_kl`` early stopping agrees).
    Call :meth:`parallelize` after ``torch.distributed.init_process_group``.
    """

    fsdp: bool = False
    world: int = 1
    rank: int = 0

    def parallelize(self, fsdp: bool = False) -> None:
        import torch.distributed as dist

        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.fsdp = fsdp
        # object / flag collectives on CPU whatever the learner's backend
        self.cpu_group = dist.new_group(backend="gloo")
        self.loss_module = _LossModule(self)
        self._scale = 1.0
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            dev = next(self.policy.parameters()).device
            mesh = init_device_mesh(dev.type, (self.world,))
            fully_shard(self.loss_module, mesh=mesh)
            self.optimizer = self._make_optimizer()  # over the sharded (DTensor) parameters
            self.wrapped = self.loss_module
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(self.loss_module, find_unused_parameters=True,
                               process_group=None)

    # --------------------------------------------------------- RLTrainer hooks
    def _minibatch_rows(self, i: torch.Tensor) -> torch.Tensor:
        m = i.shape[0]
        base, extra = divmod(m, self.world)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        if stop > start:
            self._scale = self.world * (stop - start) / m
            return i[start:stop]
        self._scale = 0.0
        return i[:1]

    def _loss(self, *args):
        return self.wrapped(*args, self._scale)

    def _reduce_stats(self, s: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(s)
        w = self._scale / self.world
        t = torch.tensor([s[k] * w for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=self.cpu_group)
        return dict(zip(keys, t.tolist()))

    # --------------------------------------------------------- weights / state
    def full_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Full CPU state dicts ``{"policy", "sampler"}`` (a collective under FSDP: call it on
        every rank; only rank 0's result is complete)."""
        if not self.fsdp:
            return {"policy": cpu_state(self.policy), "sampler": cpu_state(self.sampler)}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        sd = get_model_state_dict(self.loss_module,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"policy": {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")},
                "sampler": {k[len("sampler."):]: v for k, v in sd.items()
                            if k.startswith("sampler.")}}

    def state_dict(self) -> dict[str, Any]:
        """RLTrainer's state (a collective under FSDP).  DDP: the optimizer state has the local
        layout (a local run resumes it); FSDP: the full FQN-keyed layout (FSDP runs resume it)."""
        if not self.fsdp:
            return super().state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        opt = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
        return {"iter": self.iter, "env_steps": self.env_steps, "optimizer": opt,
                "optimizer_format": "fsdp-full", "sample_gen": self.sample_gen.get_state(),
                "update_gen": self.update_gen.get_state(), "group_gen": self.group_gen.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not self.fsdp:
            if sd.get("optimizer_format") == "fsdp-full":
                raise ValueError("this checkpoint's optimizer state was saved by an FSDP learner; "
                                 "resume it with placement.learner.fsdp=true")
            return super().load_state_dict(sd)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        if sd.get("optimizer_format") != "fsdp-full":
            raise ValueError("this checkpoint's optimizer state has the local/DDP layout; "
                             "resume it with placement.learner.fsdp=false")
        self.iter, self.env_steps = sd["iter"], sd["env_steps"]
        set_optimizer_state_dict(self.loss_module, self.optimizer, optim_state_dict=sd["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.sample_gen.set_state(sd["sample_gen"])
        self.update_gen.set_state(sd["update_gen"])
        self.group_gen.set_state(sd["group_gen"])


class LearnerWorker:
    """Ray actor body: learner rank ``rank`` of ``world`` (DDP or FSDP2)."""

    def __init__(self, spec: WorkerSpec, rank: int, world: int, learner: LearnerPlacement):
        _set_threads(spec.threads)
        self.rank, self.world, self.learner = rank, world, learner
        use_gpu = learner.gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else spec.device
        self.spec = spec
        self.policy, self.sampler = _build_modules(spec, self.device)
        self.trainer = DataParallelRLTrainer(self.policy, self.sampler, spec.env_spec, spec.rl,
                                             spec.seed)

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for rank 0's TCP store."""
        from pirl.runners.placement import free_port, node_ip

        return node_ip(), free_port()

    def init_distributed(self, addr: str, port: int) -> None:
        import datetime

        import torch.distributed as dist

        backend = self.learner.backend
        if backend == "auto":
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if self.device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU(s) as cuda:0..
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.learner.timeout_s))
        self.trainer.parallelize(fsdp=self.learner.fsdp)

    def learn(self, *payloads: dict[str, Any]) -> dict[str, float]:
        """Advantages + data-parallel update on the rollout workers' rollouts (in env order)."""
        if payloads[0].get("groups") is not None:
            self.trainer._groups = payloads[0]["groups"]
        ro = cat_rollouts([p["rollout"] for p in payloads])
        return self.trainer.learn(ro, max(p.get("time", 0.0) for p in payloads))

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.trainer.full_weights()

    def trainer_state(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_trainer_state(self, sd: dict[str, Any]) -> None:
        self.trainer.load_state_dict(sd)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ColocatedWorker(LearnerWorker):
    """Ray actor body of the colocated mode: env rows ``[start, stop)`` + rollout + learner rank.

    One iteration: roll out the own env slice (chain noise drawn for all N envs, so the slice is
    the rows of the local run; "all envs done" is all-reduced), all-gather the slices into the
    full rollout, then the data-parallel update.  Under FSDP2 the parameters are unsharded for
    the rollout and resharded for the update (the phase swap of colocated placement).
    """

    def __init__(self, spec: WorkerSpec, rank: int, world: int, learner: LearnerPlacement,
                 start: int, stop: int):
        super().__init__(spec, rank, world, learner)
        self.stage = LocalStage(EnvSlice(spec.env_fn(num_envs=stop - start), start, stop))

    def _all_done(self, mine: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0 if mine else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.trainer.cpu_group)
        return int(flag) == 0

    def iteration(self) -> dict[str, float]:
        import torch.distributed as dist

        tr = self.trainer
        tr.policy.eval()
        t0 = time.perf_counter()
        if tr.fsdp:
            tr.loss_module.unshard()
        try:
            part = collect_staged(tr.policy, tr.sampler, [self.stage],
                                  num_envs=tr.env.num_envs, num_chunks=tr.num_chunks,
                                  reset_kwargs=tr._reset_kwargs(), action_chunk=tr.action_chunk,
                                  generator=tr.sample_gen, with_values=tr.algo == "ppo",
                                  all_done=self._all_done)
        finally:
            if tr.fsdp:
                tr.loss_module.reshard()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part, group=tr.cpu_group)
        ro = cat_rollouts(parts)
        return tr.learn(ro, time.perf_counter() - t0)


# ============================================================================ driver
class DistributedTrainer:
    """Runs RL iterations with the colocated or disaggregated placement on Ray.

    Same interface as :class:`~pirl.runners.rl.RLTrainer` (``iteration()``, ``state_dict()``,
    ``load_state_dict()``, ``iter``, ``env_steps``), so :class:`pirl.runners.train.Run` uses
    either.  ``policy`` / ``sampler``: the driver's modules; their current weights seed every
    worker, and with ``placement.sync_driver`` they receive the trained weights after every
    iteration (for the driver's evaluations and checkpoints).

    env_fn: ``env_fn(num_envs=n)`` builds ``n`` training envs in a worker (picklable);
    ``env``: the driver's training env (only its spec is used: N, dims, tasks, horizon).
    """

    def __init__(self, policy: FlowPolicy, sampler: Sampler, env: BatchedEnv, cfg: Any,
                 seed: int, placement: PlacementConfig, env_fn: Callable[..., BatchedEnv],
                 device: str = "cpu"):
        import ray

        from pirl.runners.placement import connect

        if placement.mode == "local":
            raise ValueError("placement.mode='local' runs RLTrainer; DistributedTrainer is for "
                             "colocated / disaggregated")
        connect(placement.cluster, placement.ray_num_cpus)
        self.policy, self.sampler, self.cfg, self.placement = policy, sampler, cfg, placement
        self.iter, self.env_steps = 0, 0
        self._final_state: dict[str, Any] | None = None
        spec_env = EnvSpec.from_env(env)
        placement.validate_for(spec_env.num_envs)
        check_resources(placement, dict(ray.cluster_resources()))
        modules = ray.put({"policy": _cpu_module(policy), "sampler": _cpu_module(sampler)})
        spec = WorkerSpec(env_fn=env_fn, modules=modules, env_spec=spec_env, rl=cfg, seed=seed,
                          device=device, threads=placement.threads)
        lp = placement.learner
        world = lp.ranks
        self.env_workers: list[tuple[Any, int, int, str]] = []
        self.rollout_workers: list[Any] = []
        self.rollout_names: list[str] = []
        if placement.mode == "colocated":
            actor = ray.remote(ColocatedWorker)
            rows = shard_rows(spec_env.num_envs, world)
            self.learners = [actor.options(num_cpus=lp.cpus, num_gpus=lp.gpus).remote(
                spec, r, world, lp, a, b) for r, (a, b) in enumerate(rows)]
            self.learner_names = [f"colocated worker {r} (learner rank {r}, envs [{a}, {b}))"
                                  for r, (a, b) in enumerate(rows)]
        else:
            env_actor = ray.remote(EnvWorker)
            for w, (a, b) in enumerate(shard_rows(spec_env.num_envs, placement.env_workers)):
                h = env_actor.options(num_cpus=placement.env_cpus).remote(env_fn, a, b,
                                                                          placement.threads)
                self.env_workers.append((h, a, b, f"env worker {w} (envs [{a}, {b}))"))
            use_gpu = placement.rollout_gpus > 0
            rollout_actor = ray.remote(RolloutWorker).options(
                num_cpus=placement.rollout_cpus, num_gpus=placement.rollout_gpus)
            for r, group in enumerate(_split(self.env_workers, placement.rollout_workers)):
                self.rollout_workers.append(rollout_actor.remote(
                    spec, group, placement.pipeline_stages, "cuda" if use_gpu else device))
                self.rollout_names.append(f"rollout worker {r} (envs [{group[0][1]}, "
                                          f"{group[-1][2]}))")
            actor = ray.remote(LearnerWorker)
            self.learners = [actor.options(num_cpus=lp.cpus, num_gpus=lp.gpus).remote(
                spec, r, world, lp) for r in range(world)]
            self.learner_names = [f"learner rank {r}" for r in range(world)]
        try:
            self._init_distributed()
        except WorkerError:
            self.close(keep_state=False)
            raise

    # ----------------------------------------------------------------- setup
    def _init_distributed(self) -> None:
        t = self.placement.startup_timeout_s
        addr, port = get_all([self.learners[0].rendezvous.remote()], [self.learner_names[0]],
                             timeout_s=t)[0]
        get_all([w.init_distributed.remote(addr, port) for w in self.learners],
                self.learner_names, timeout_s=t)
        if len(self.rollout_workers) > 1:
            addr, port = get_all([self.rollout_workers[0].rendezvous.remote()],
                                 self.rollout_names[:1], timeout_s=t)[0]
            world = len(self.rollout_workers)
            get_all([w.init_group.remote(addr, port, r, world, self.placement.learner.timeout_s)
                     for r, w in enumerate(self.rollout_workers)], self.rollout_names, timeout_s=t)
        if self.rollout_workers:  # start-up errors of the other workers surface here
            get_all([w.pid.remote() for w in self.rollout_workers]
                    + [w.pid.remote() for w, *_ in self.env_workers],
                    self.rollout_names + [n for *_, n in self.env_workers], timeout_s=t)

    def _gathering_ranks(self) -> list:
        """The ranks to ask for full weights / state: all of them under FSDP (gathering is a
        collective; ranks > 0 return empty dicts), only rank 0 under DDP (replicas)."""
        return list(self.learners) if self.placement.learner.fsdp else self.learners[:1]

    def worker_pids(self) -> dict[str, int]:
        """Process ids of every worker, by name (for monitoring and the fault tests)."""
        handles = [(w, n) for (w, *_, n) in self.env_workers]
        handles += list(zip(self.rollout_workers, self.rollout_names))
        handles += list(zip(self.learners, self.learner_names))
        pids = get_all([h.pid.remote() for h, _ in handles], [n for _, n in handles])
        return {n: p for (_, n), p in zip(handles, pids)}

    # ----------------------------------------------------------------- iteration
    def iteration(self) -> dict[str, float]:
        """One rollout + data-parallel update; raises :class:`WorkerError` (naming the worker)
        if any worker dies, before any update is counted."""
        try:
            if not self.rollout_workers:
                metrics = get_all([w.iteration.remote() for w in self.learners],
                                  self.learner_names)[0]
            else:
                payloads = [w.rollout.remote() for w in self.rollout_workers]
                metrics = get_all([w.learn.remote(*payloads) for w in self.learners],
                                  self.learner_names)[0]
            weights = None
            if self.rollout_workers or self.placement.sync_driver:
                refs = [w.weights.remote() for w in self._gathering_ranks()]
                get_all(refs, self.learner_names)
                weights = refs[0]
            if self.rollout_workers:
                get_all([w.load_weights.remote(weights) for w in self.rollout_workers],
                        self.rollout_names)
            if self.placement.sync_driver:
                import ray

                w = ray.get(weights)
                self.policy.load_state_dict(w["policy"])
                self.sampler.load_state_dict(w["sampler"])
        except WorkerError as e:
            self.close(keep_state=False)
            raise WorkerError(f"{e}\n(the run stopped before using this iteration's data; "
                              "resume from the last checkpoint with pirl train --resume RUN_DIR)"
                              ) from e
        self.iter += 1
        self.env_steps = int(metrics["env_steps"])
        return metrics

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """RLTrainer-compatible state (DDP: a local run can resume it, and vice versa)."""
        if not self.learners:
            if self._final_state is None:
                raise WorkerError("the workers were stopped after a failure: no state to save")
            return self._final_state
        refs = [w.trainer_state.remote() for w in self._gathering_ranks()]
        sd = get_all(refs, self.learner_names)[0]
        if self.rollout_workers:  # identical on every rollout worker
            ro = get_all([self.rollout_workers[0].rollout_state.remote()],
                         self.rollout_names[:1])[0]
            sd["sample_gen"], sd["group_gen"] = ro["sample_gen"], ro["group_gen"]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        get_all([w.load_trainer_state.remote(sd) for w in self.learners], self.learner_names)
        if self.rollout_workers:
            ro = {"iter": sd["iter"], "sample_gen": sd["sample_gen"], "group_gen": sd["group_gen"]}
            get_all([w.load_rollout_state.remote(ro) for w in self.rollout_workers],
                    self.rollout_names)
        self.iter, self.env_steps = sd["iter"], sd["env_steps"]

    def close(self, keep_state: bool = True) -> None:
        """Stop every worker (idempotent).  ``keep_state``: first fetch :meth:`state_dict` so that
        it stays readable (final checkpoints) after the workers are gone."""
        import ray

        if keep_state and self.learners and self._final_state is None:
            self._final_state = self.state_dict()
        handles = [w for w, *_ in self.env_workers] + list(self.learners)
        handles += list(self.rollout_workers)
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.env_workers, self.learners, self.rollout_workers = [], [], []


def placement_resources(placement: PlacementConfig) -> dict[str, float]:
    """Total Ray CPUs / GPUs the placement's workers ask for."""
    lp = placement.learner
    cpus, gpus = lp.ranks * lp.cpus, lp.ranks * lp.gpus
    if placement.mode == "disaggregated":
        cpus += placement.env_workers * placement.env_cpus
        cpus += placement.rollout_workers * placement.rollout_cpus
        gpus += placement.rollout_workers * placement.rollout_gpus
    return {"CPU": cpus, "GPU": gpus}


def check_resources(placement: PlacementConfig, available: dict[str, float]) -> None:
    """Raise ValueError if the workers cannot all fit on the cluster as it is now (Ray would
    otherwise wait forever for the missing resources)."""
    need = placement_resources(placement)
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items()
             if v > available.get(k, 0.0) + 1e-9}
    if short:
        what = ", ".join(f"{v:g} {k} (the cluster has {have:g})" for k, (v, have) in short.items())
        raise ValueError(f"placement.mode={placement.mode} asks Ray for {what}; lower "
                         "placement.*_cpus / *_gpus / learner.cpus / learner.gpus (fractions "
                         "are allowed) or use a larger cluster")


def _cpu_module(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).cpu()


def trainer_from_config(cfg: Any, policy: FlowPolicy, sampler: Sampler, env: BatchedEnv,
                        demos: Any = None):
    """The trainer of a :class:`~pirl.config.schema.TrainConfig`: :class:`RLTrainer` for
    ``placement.mode == "local"`` (``demos``: the SFT samples of ``rl.bc_coef``'s loss), else a
    :class:`DistributedTrainer` whose env workers build the config's training env."""
    placement = getattr(cfg, "placement", None)
    if placement is None or placement.mode == "local":
        return _rl_trainer_cls()(policy, sampler, env, cfg.rl, cfg.seed, demos=demos)
    if getattr(policy, "critic_takes_time", False):
        # the rollout workers' observations carry no time_left for the learner's critic
        raise ValueError(f"a critic that reads the time left (critic_time) needs "
                         f"placement.mode=local (got {placement.mode!r})")
    if cfg.rl.task_sampling != "uniform":
        # the workers draw the tasks, the learner sees the outcomes: not synced (yet)
        raise ValueError(f"rl.task_sampling={cfg.rl.task_sampling!r} needs "
                         f"placement.mode=local (got {placement.mode!r})")
    from pirl.envs import make_env

    kw = dict(cfg.env.kwargs)
    kw.setdefault("split", "train")
    env_fn = functools.partial(make_env, cfg.env.name, device="cpu", **kw)
    return DistributedTrainer(policy, sampler, env, cfg.rl, cfg.seed, placement, env_fn,
                              device=cfg.device)
