"""Shared pieces of the scale-out tests: a 6-env tabletop, a tiny policy, per-env reset
arguments, a tiny RL config and placement, and the comparisons "same rollout" / "same learning
curve as the local run"."""

from __future__ import annotations

import functools

import pytest
import torch

from pirl.config.schema import RLConfig
from pirl.envs.tabletop import TabletopEnv
from pirl.flow import build_sampler
from pirl.models import build_policy
from pirl.runners.placement import LearnerPlacement, PlacementConfig
from pirl.runners.rl import RLTrainer

N = 6
IMG = 32


def make_env(n: int, max_steps: int = 12) -> TabletopEnv:
    return TabletopEnv(num_envs=n, image_size=IMG, max_episode_steps=max_steps)


def make_policy(env: TabletopEnv, seed: int = 0, **kw):
    torch.manual_seed(seed)
    vocab = sorted({w for s in env.instructions for w in s.split()})
    return build_policy("tiny", action_dim=3, state_dim=4, vocabulary=vocab, width=32, depth=1,
                        heads=2, image_size=IMG, action_horizon=4, conv_channels=[8, 8, 8], **kw)


def reset_kwargs(env, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"seed": seed, "task_ids": torch.randint(0, len(env.task_names), (env.num_envs,),
                                                    generator=g),
            "episode_seeds": 1000 + torch.arange(env.num_envs)}


def assert_rollouts_close(a, b, exact: bool = False):
    assert len(a.chains) == len(b.chains)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-4)
    for ca, cb in zip(a.chains, b.chains):
        for f in ("x", "logp", "std", "stochastic"):
            torch.testing.assert_close(getattr(ca, f), getattr(cb, f), **tol)
    for oa, ob in zip(a.obs, b.obs):
        assert oa["instruction"] == ob["instruction"]
        # actions differ by float rounding when batch sizes differ: states by as little
        torch.testing.assert_close(oa["state"], ob["state"], **tol)
        assert (oa["images"].int() - ob["images"].int()).abs().float().mean() < 0.5
    for f in ("rewards", "terminated", "truncated", "success", "valid"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    torch.testing.assert_close(a.values, b.values, **tol)
    torch.testing.assert_close(a.next_values, b.next_values, **tol)
    assert a.env_steps == b.env_steps

# workers unpickle it by reference to pirl (this test module is not importable there)
env_fn = functools.partial(TabletopEnv, image_size=IMG, max_episode_steps=12)

def rl_parts(algo: str = "ppo", kind: str = "flow_noise"):
    env = make_env(N)
    policy = make_policy(env)
    sampler = build_sampler(kind, num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    cfg = RLConfig(algo=algo, iterations=3, action_chunk=3)
    cfg.ppo.num_minibatches = cfg.grpo.num_minibatches = 3
    cfg.ppo.update_epochs = cfg.grpo.update_epochs = 2
    cfg.grpo.group_size = 2
    return env, policy, sampler, cfg


def placement(mode: str, ranks: int = 2, **kw) -> PlacementConfig:
    base = dict(env_workers=2, pipeline_stages=2, env_cpus=0.2, rollout_cpus=0.2, threads=1)
    base.update(kw)
    learner = LearnerPlacement(ranks=ranks, cpus=0.2, **base.pop("learner", {}))
    return PlacementConfig(mode=mode, learner=learner, **base)


def run_local(iters: int, algo: str = "ppo"):
    env, policy, sampler, cfg = rl_parts(algo)
    tr = RLTrainer(policy, sampler, env, cfg, seed=0)
    return [tr.iteration() for _ in range(iters)], policy, tr


def assert_same_curve(ref_metrics, metrics, ref_policy, policy, atol=1e-4):
    for a, b in zip(ref_metrics, metrics):
        for k in ("rollout/return", "rollout/success", "rollout/episode_chunks", "env_steps"):
            assert a[k] == b[k], k
        for k in ("policy/loss", "policy/approx_kl", "rollout/noise_std"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=atol), k
    ref_sd, sd = ref_policy.state_dict(), policy.state_dict()
    assert max(float((ref_sd[k] - sd[k]).abs().max()) for k in ref_sd) < atol
