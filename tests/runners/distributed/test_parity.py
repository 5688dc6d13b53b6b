"""Feature parity of the Ray placements with the local trainer: for the same seed, colocated and
disaggregated runs give the local run's metrics with every recipe feature of the RL stage:
failure-weighted task sampling, replay of failed initial states, the ``rl.bc_coef`` demo loss,
the noise schedule, re-planning (``rl.action_chunk`` < horizon), a critic that reads the time
left, GRPO groups.

Exactly (every metric bit for bit, same final weights) where the computation is the same: one
colocated rank, or one env worker + one rollout worker + one learner rank (the chain noise is
replayed from the sampler's own draws, the full batch is one forward, a one-rank all-reduce is
the identity).  Up to float summation order where it is split: several learner ranks sum
gradient shares, several env slices / pipeline stages run the policy on smaller batches (a
matmul's result can change in the last bits with the batch size), so those compare with a
tolerance.

The default suite runs all features at once in both placements; ``-m slow`` runs each feature
on its own.
"""

from __future__ import annotations

import pytest
import torch

from pirl.algos.sft import SFTData
from pirl.flow import build_sampler
from pirl.runners.distributed import DistributedTrainer
from pirl.runners.rl import RLTrainer
from pirl.runners.rollout import policy_obs
from tests.runners.distributed.helpers import (N, assert_same_curve, env_fn, make_env,
                                               make_policy, placement, rl_parts)

ITERS = 3
# each feature as config changes (and the policy's critic_time): applied to rl_parts' config
FEATURES = {
    "failure_sampling": {"task_sampling": "failure"},
    "replay": {"replay_failures": 0.5},
    "bc": {"bc_coef": 0.5, "bc_batch_size": 4},
    "noise_schedule": {"noise_schedule": "linear", "noise_final": 0.3},
    "replan": {"action_chunk": 2},
    "critic_time": {"critic_time": True},
    "grpo": {"algo": "grpo"},
    # a frozen prefix: the local trainer reuses the rollout's prefix caches, the Ray learner
    # re-encodes the observations (the same numbers)
    "frozen_prefix": {"train_mode": "expert_only"},
}
PPO_ALL = [k for k in FEATURES if k not in ("grpo", "frozen_prefix")]
GRPO_ALL = ["grpo", "failure_sampling", "noise_schedule", "bc", "replan"]


def demo_data(env, policy, n: int = 8) -> SFTData:
    """Few-shot-demo stand-ins: reset observations and random action chunks ``[n, H, A]``."""
    g = torch.Generator().manual_seed(7)
    obs = policy_obs(env.reset(seed=3, task_ids=torch.arange(env.num_envs) % 5,
                               episode_seeds=torch.arange(env.num_envs) + 50))
    rows = torch.arange(n) % env.num_envs
    obs = {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows.tolist()])
           for k, v in obs.items()}
    actions = torch.rand(n, policy.action_horizon, env.action_dim, generator=g) * 2 - 1
    return SFTData(obs=obs, actions=actions, mask=torch.ones(n, policy.action_horizon))


def parts(features: list[str]):
    """env, policy, sampler, RL config and demos of a run with ``features`` on."""
    changes: dict = {}
    for f in features:
        changes.update(FEATURES[f])
    env, _, _, cfg = rl_parts(changes.pop("algo", "ppo"))
    torch.manual_seed(0)
    policy = make_policy(env, critic_time=changes.pop("critic_time", False))
    sampler = build_sampler("flow_noise", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    for k, v in changes.items():
        setattr(cfg, k, v)
    demos = demo_data(make_env(N), policy) if cfg.bc_coef > 0 else None
    return env, policy, sampler, cfg, demos


def check_features_took_effect(features: list[str], metrics: list[dict]) -> None:
    """The features changed the run (else the comparison would not test them)."""
    if "failure_sampling" in features:
        assert all("curriculum/task_success" in m for m in metrics)
    if "replay" in features:
        assert any(m["replay/envs"] > 0 for m in metrics)
    if "bc" in features:
        assert all(m["bc/loss"] > 0 for m in metrics)
    if "noise_schedule" in features:
        assert metrics[0]["rollout/noise_scale"] > metrics[-1]["rollout/noise_scale"]
    if "grpo" in features:
        assert "grpo/nonzero_adv_fraction" in metrics[0]


def run_placement(features: list[str], mode: str | None, exact: bool):
    env, policy, sampler, cfg, demos = parts(features)
    if mode is None:
        tr = RLTrainer(policy, sampler, env, cfg, seed=0, demos=demos)
        return [tr.iteration() for _ in range(ITERS)], policy
    if exact:  # one process per role, the full batch in one piece
        pl = placement(mode, ranks=1, env_workers=1, pipeline_stages=1)
    else:  # two learner ranks; disaggregated: 2 env workers in 2 pipeline stages
        pl = placement(mode, ranks=2)
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn, demos=demos)
    try:
        metrics = [tr.iteration() for _ in range(ITERS)]
    finally:
        tr.close(keep_state=False)
    return metrics, policy


def assert_identical(ref_metrics, metrics, ref_policy, policy):
    for a, b in zip(ref_metrics, metrics):
        keys = {k for k in a if not k.startswith("perf/")}
        assert keys == {k for k in b if not k.startswith("perf/")}
        for k in sorted(keys):
            assert a[k] == b[k], k
    ref_sd, sd = ref_policy.state_dict(), policy.state_dict()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in ref_sd)


def check_parity(ray_local, features: list[str], mode: str, exact: bool):
    ref_metrics, ref_policy = run_placement(features, None, exact)
    check_features_took_effect(features, ref_metrics)
    metrics, policy = run_placement(features, mode, exact)
    if exact:
        assert_identical(ref_metrics, metrics, ref_policy, policy)
    else:
        assert_same_curve(ref_metrics, metrics, ref_policy, policy)
        for a, b in zip(ref_metrics, metrics):
            for k in ("bc/loss", "value/loss", "replay/envs", "curriculum/task_success",
                      "rollout/noise_scale", "grpo/nonzero_adv_fraction"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), k


@pytest.mark.parametrize("mode,exact", [("colocated", True), ("disaggregated", False)])
def test_all_ppo_features_match_local(ray_local, mode, exact):
    """PPO with failure-weighted tasks, failure replay, the demo loss, a noise schedule,
    re-planning every 2 of 4 steps and a time-aware critic: colocated (one rank) equals the
    local run bit for bit; disaggregated (2 env workers, 2 stages, 2 learner ranks) to float
    tolerance."""
    check_parity(ray_local, PPO_ALL, mode, exact)


@pytest.mark.slow
@pytest.mark.parametrize("mode,exact", [("colocated", False), ("disaggregated", True)])
def test_all_ppo_features_match_local_other_splits(ray_local, mode, exact):
    """The same with the other splits: colocated on 2 ranks, disaggregated one of each role
    (bit for bit)."""
    check_parity(ray_local, PPO_ALL, mode, exact)


@pytest.mark.slow
@pytest.mark.parametrize("mode,exact", [("colocated", True), ("colocated", False),
                                        ("disaggregated", True), ("disaggregated", False)])
def test_grpo_features_match_local(ray_local, mode, exact):
    """GRPO groups with failure-weighted tasks, a noise schedule, the demo loss and
    re-planning."""
    check_parity(ray_local, GRPO_ALL, mode, exact)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_frozen_prefix_matches_local_bit_for_bit(ray_local, mode):
    """train_mode=expert_only with failure-weighted tasks, one process per role."""
    check_parity(ray_local, ["frozen_prefix", "failure_sampling"], mode, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_each_feature_matches_local(ray_local, feature, mode):
    """Each feature on its own, split placements (2 learner ranks; disaggregated: 2 env workers
    in 2 pipeline stages)."""
    check_parity(ray_local, [feature], mode, exact=False)
