"""Batched rollout collection for the two-layer MDP (outer: env chunk steps; inner: denoising).

One call of :func:`collect` runs all N envs of a :class:`~pirl.envs.base.ChunkedEnv` for T
chunk steps in fixed-horizon mode: the prefix is encoded once per chunk step for the whole batch,
the sampler draws a denoising chain (with its log-prob), the first ``action_chunk`` steps of the
chunk are executed, and everything PPO / GRPO need is stored as ``[T, N, ...]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pirl.envs.base import ChunkedEnv
from pirl.flow.base import Chain, Sampler
from pirl.flow.common import chain_dtype
from pirl.models.base import FlowPolicy, to_device

Obs = dict[str, Any]


def stack_obs(obs_list: list[Obs]) -> Obs:
    """Concatenate batched obs dicts along the batch dim (tensors cat, lists extended)."""
    out: Obs = {}
    for k in obs_list[0]:
        v0 = obs_list[0][k]
        if isinstance(v0, torch.Tensor):
            out[k] = torch.cat([o[k] for o in obs_list], dim=0)
        elif isinstance(v0, list):
            out[k] = [x for o in obs_list for x in o[k]]
    return out


def policy_obs(obs: Obs) -> Obs:
    """The part of an env observation the policy reads (drops privileged / info entries;
    ``time_left`` is the rollout's own entry for a critic that reads it)."""
    return {k: v for k, v in obs.items()
            if k in ("images", "state", "instruction", "task_id", "time_left")}


def cat_chains(chains: list[Chain]) -> Chain:
    """Concatenate chains along the batch dim (shared time grid)."""
    c0 = chains[0]
    fields = ("x", "mean", "std", "stochastic", "step_logp", "init_logp", "logp")
    kw = {f: torch.cat([getattr(c, f) for c in chains], dim=0) for f in fields}
    return Chain(t=c0.t, **kw)


def env_actions(actions: torch.Tensor, action_chunk: int, env_action_dim: int) -> torch.Tensor:
    """The executed part of a policy chunk: ``[N, H, A_policy] -> [N, action_chunk, A_env]``."""
    return actions[:, :action_chunk, :env_action_dim]


def episode_noise(seeds: torch.Tensor, step: int, shape: tuple[int, ...],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial denoising noise ``[N, *shape]``: row ``i`` is ``N(0, I)`` drawn from its own
    generator seeded with ``(seeds[i], step)``, so an episode's draws do not depend on the batch
    row that runs it or on the batch size."""
    return torch.stack([torch.randn(shape, dtype=dtype,
                                    generator=torch.Generator().manual_seed(s * 10_007 + step))
                        for s in seeds.tolist()])


@dataclass
class Rollout:
    """T chunk steps of N envs.

    obs: list of T policy-obs dicts (each batched over N); chains: list of T chains ``[N, ...]``;
    values ``[T, N]`` (zeros without a critic); next_values ``[T, N]`` values of the obs after
    each chunk step; rewards ``[T, N]``; terminated / truncated ``[T, N]`` bool (the episode ended
    inside that chunk); success ``[T, N]`` bool; valid ``[T, N]`` bool (the env was still running
    when the chunk started); episode_success ``[N]`` bool; episode_return ``[N]``.
    frames: optional ``[T*H, N, 3, h, w]`` uint8 for videos.
    prefixes: optional list of T frozen prefix caches (:meth:`FlowPolicy.frozen_prefix`, on the
    CPU), kept when the learner reuses them instead of re-encoding ``obs``.
    env_s / policy_s: wall seconds spent in the env (reset, chunk steps, rendering) and in the
    policy (prefix, sampler chain, critic) during the collection; the rest is bookkeeping.
    """

    obs: list[Obs]
    chains: list[Chain]
    values: torch.Tensor
    next_values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    success: torch.Tensor
    valid: torch.Tensor
    env_steps: int
    frames: torch.Tensor | None = None
    prefixes: list[Any] | None = None
    env_s: float = 0.0
    policy_s: float = 0.0

    @property
    def episode_success(self) -> torch.Tensor:
        return (self.success & self.valid).any(dim=0)

    @property
    def episode_return(self) -> torch.Tensor:
        return (self.rewards * self.valid).sum(dim=0)


@torch.no_grad()
def collect(policy: FlowPolicy, sampler: Sampler, env: ChunkedEnv, *, num_chunks: int,
            reset_kwargs: dict[str, Any], action_chunk: int, generator: torch.Generator,
            with_values: bool = True, record: bool = False,
            keep_prefix: bool = False, noise_seeds: torch.Tensor | None = None) -> Rollout:
    """Reset all envs (``env.reset(**reset_kwargs)``) and run ``num_chunks`` chunk steps.

    Envs whose episode ended are frozen by the env; rollout stops early when all are done.
    ``keep_prefix``: also return each step's frozen prefix cache (when the policy has one).
    A critic that reads the time left (``policy.critic_takes_time``) gets ``obs["time_left"]
    [N]`` = ``1 - t / num_chunks`` at chunk step ``t`` (every env starts its episode at the
    reset), 0 at the final bootstrap observation; it is stored with the observations.
    The rollout's ``env_s`` / ``policy_s`` time the env and the policy calls (on a GPU the
    policy's time includes the transfer of its values to the CPU, which waits for it).
    ``noise_seeds [N]`` (evaluation): each env's initial denoising noise at chunk step ``t`` is
    :func:`episode_noise` of its own seed instead of a draw from ``generator`` in batch order.
    """
    clock = time.perf_counter
    t_env = clock()
    obs = env.reset(**reset_kwargs)
    n = env.num_envs
    device = next(policy.parameters()).device
    done = torch.zeros(n, dtype=torch.bool)
    obs_l, chains, values = [], [], []
    rewards, terms, truncs, succ, valid = [], [], [], [], []
    frames = [env.render()] if record else None
    env_s, policy_s = clock() - t_env, 0.0
    prefixes: list[Any] | None = [] if keep_prefix else None
    steps = 0
    timed = with_values and getattr(policy, "critic_takes_time", False)
    if noise_seeds is not None and noise_seeds.shape != (n,):
        raise ValueError(f"noise_seeds must be [{n}] (one per env), got {tuple(noise_seeds.shape)}")

    def observe(o: Obs, t: int) -> Obs:  # the policy's obs at chunk step t, on its device
        p = to_device(policy_obs(o), device)
        if timed:
            p["time_left"] = torch.full((n,), 1.0 - t / num_chunks, device=device)
        return p

    for t in range(num_chunks):
        t_pol = clock()
        pobs = observe(obs, t)
        prefix = policy.encode_prefix(pobs)
        noise = None
        if noise_seeds is not None:  # in the sampler's chain dtype, on the prefix's device
            dtype, dev = chain_dtype(prefix)
            noise = episode_noise(noise_seeds, t, (policy.action_horizon, policy.action_dim),
                                  dtype).to(dev)
        chain = sampler.sample(policy, prefix, noise=noise, generator=generator)
        v = policy.value(prefix).float().cpu() if with_values else torch.zeros(n)
        act = env_actions(policy.postprocess_actions(chain.actions), action_chunk,
                          env.action_dim).to(env.device)
        t_env = clock()
        out = env.step_chunk(act, record=record)
        t_done = clock()
        policy_s += t_env - t_pol
        env_s += t_done - t_env
        obs_l.append(to_device(pobs, "cpu"))
        if prefixes is not None:
            frozen = policy.frozen_prefix(prefix)
            if frozen is None:
                prefixes = None
            else:
                prefixes.append(to_device(frozen, "cpu"))
        chains.append(to_device(chain, "cpu"))
        values.append(v)
        valid.append(~done)
        rewards.append(out.reward.float().cpu())
        terms.append(out.terminated.cpu() & ~done)
        truncs.append(out.truncated.cpu() & ~done)
        succ.append(out.success.cpu() & ~done)
        steps += int(out.steps.sum())
        if record:
            frames.extend(out.frames)
        done = done | out.done.cpu()
        obs = out.obs
        if bool(done.all()):
            break
    vals = torch.stack(values)
    if with_values:
        # (after the last chunk step or, if all envs ended early, their final obs)
        t_pol = clock()
        last = policy.value(policy.encode_prefix(observe(obs, len(obs_l)))).float().cpu()
        policy_s += clock() - t_pol
        nxt = torch.cat([vals[1:], last[None]], dim=0)
    else:
        nxt = torch.zeros_like(vals)
    # A frozen env's obs no longer changes, so values[t+1] of a finished env is the value of its
    # final obs: exactly what truncation bootstrapping needs.
    return Rollout(obs=obs_l, chains=chains, values=vals, next_values=nxt,
                   rewards=torch.stack(rewards), terminated=torch.stack(terms),
                   truncated=torch.stack(truncs), success=torch.stack(succ),
                   valid=torch.stack(valid), env_steps=steps,
                   frames=torch.stack([f.cpu() for f in frames]) if record else None,
                   prefixes=prefixes, env_s=env_s, policy_s=policy_s)
