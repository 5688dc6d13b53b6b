"""Failure-weighted task sampling: the estimate and probabilities against hand-computed values,
the draws against the probabilities (Monte Carlo), and the trainer's use of them; the replay
of failed initial states: its buffer by hand, and the trainer's resets from it."""

import math

import pytest
import torch

from pirl.algos.grpo import make_groups
from pirl.config.loading import apply_overrides
from pirl.flow import SamplerConfig, build_sampler
from pirl.config.schema import RLConfig
from pirl.runners.curriculum import FailureCurriculum, FailureReplay
from pirl.runners.rl import RLTrainer
from tests.runners.reach_env import ReachEnv, reach_policy


def test_no_data_gives_uniform_draws():
    cur = FailureCurriculum(5, mix=0.7)
    torch.testing.assert_close(cur.probs(), torch.full((5,), 0.2, dtype=torch.float64))


def test_estimate_and_probs_match_a_hand_computation():
    cur = FailureCurriculum(3, mix=0.5, decay=0.5)
    cur.update(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 1, 0, 1, 0, 0]).bool())
    cur.update(torch.tensor([0, 1]), torch.tensor([False, True]))
    # counts after decay 0.5: task 0: S = 2*0.5 + 0 = 1, N = 2*0.5 + 1 = 2
    #                        task 1: S = 0*0.5 + 1 = 1, N = 1*0.5 + 1 = 1.5
    #                        task 2: S = 1*0.5 = 0.5,  N = 3*0.5 = 1.5
    s = [(1 + 1) / (2 + 2), (1 + 1) / (1.5 + 2), (0.5 + 1) / (1.5 + 2)]
    torch.testing.assert_close(cur.success_rate(), torch.tensor(s, dtype=torch.float64))
    f = [1 - x for x in s]
    p = [0.5 / 3 + 0.5 * fi / sum(f) for fi in f]
    torch.testing.assert_close(cur.probs(), torch.tensor(p, dtype=torch.float64))
    assert math.isclose(float(cur.probs().sum()), 1.0)


def test_failing_tasks_are_drawn_more_often_in_proportion():
    cur = FailureCurriculum(4, mix=1.0, decay=1.0)
    # task 3 always fails, the others always succeed
    for _ in range(20):
        cur.update(torch.arange(4), torch.tensor([True, True, True, False]))
    p = cur.probs()
    assert int(p.argmax()) == 3 and float(p[3]) > 0.8
    ids = cur.sample(200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / ids.numel()
    # 4 standard errors of a frequency
    tol = 4 * torch.sqrt(p * (1 - p) / ids.numel())
    assert bool(((freq - p).abs() <= tol).all()), (freq, p)


def test_grpo_groups_follow_task_probs():
    p = torch.tensor([0.0, 0.0, 1.0])
    tasks, seeds, groups = make_groups(32, 8, 3, torch.Generator().manual_seed(0), task_probs=p)
    assert bool((tasks == 2).all())
    for g in groups.unique():  # a group still shares its task and its seed
        assert tasks[groups == g].unique().numel() == 1
        assert seeds[groups == g].unique().numel() == 1
    with pytest.raises(ValueError, match="task_probs"):
        make_groups(32, 8, 3, task_probs=torch.ones(2) / 2)


def test_bad_arguments_and_state_are_errors():
    with pytest.raises(ValueError, match="mix"):
        FailureCurriculum(3, mix=1.5)
    with pytest.raises(ValueError, match="decay"):
        FailureCurriculum(3, decay=0.0)
    cur = FailureCurriculum(3)
    with pytest.raises(ValueError, match="task ids"):
        cur.update(torch.tensor([3]), torch.tensor([True]))
    with pytest.raises(ValueError, match="4 tasks"):
        cur.load_state_dict(FailureCurriculum(4).state_dict())
    with pytest.raises(ValueError, match="task_sampling_mix"):
        RLConfig(task_sampling="failure", task_sampling_mix=-0.1)


class TwoTaskReach(ReachEnv):
    """ReachEnv with two task names (the reach itself is the same for both)."""

    task_names = ["reach_a", "reach_b"]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_trainer_draws_tasks_from_the_curriculum_and_updates_it(algo):
    pol = reach_policy()
    smp = build_sampler("flow_sde", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=2))
    cfg = apply_overrides(RLConfig(algo=algo), ["task_sampling=failure", "task_sampling_mix=1.0",
                                                "task_sampling_decay=1.0", "grpo.group_size=4"])
    tr = RLTrainer(pol, smp, TwoTaskReach(64, max_episode_steps=2, radius=0.3), cfg, seed=0)
    # pretend task 0 is solved and task 1 never is: the next draws all but avoid task 0
    tr.curriculum.update(torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.bool))
    tr.curriculum.update(torch.ones(50, dtype=torch.long), torch.zeros(50, dtype=torch.bool))
    p1 = float(tr.curriculum.probs()[1])
    assert p1 > 0.95
    ro = tr.rollout()
    assert float((tr._task_ids == 1).double().mean()) > 0.8
    counts_before = tr.curriculum.counts.clone()
    m = tr.learn(ro)
    # the rollout's episodes were added per task (after one decay of 1.0)
    added = torch.bincount(tr._task_ids, minlength=2).double()
    torch.testing.assert_close(tr.curriculum.counts, counts_before + added)
    assert "curriculum/task_success" in m


def test_replay_keeps_the_newest_failures_and_draws_without_replacement():
    rep = FailureReplay(capacity=4)
    assert len(rep) == 0 and rep.draw(3)[0].numel() == 0
    rep.update(torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13]),
               torch.tensor([False, True, False, False]))
    assert rep.tasks.tolist() == [0, 2, 3] and rep.seeds.tolist() == [10, 12, 13]
    rep.update(torch.tensor([4, 5]), torch.tensor([14, 15]), torch.tensor([False, False]))
    # capacity 4: the oldest failure (task 0, seed 10) dropped out
    assert rep.tasks.tolist() == [2, 3, 4, 5] and rep.seeds.tolist() == [12, 13, 14, 15]
    tasks, seeds = rep.draw(3, torch.Generator().manual_seed(0))
    assert tasks.numel() == 3 and len(rep) == 1
    # a drawn pair keeps its task and seed together, and the draws are distinct
    assert sorted(zip(tasks.tolist(), seeds.tolist())) == sorted(
        set(zip(tasks.tolist(), seeds.tolist())))
    assert all(s == t + 10 for t, s in zip(tasks.tolist(), seeds.tolist()))
    left = set(zip([2, 3, 4, 5], [12, 13, 14, 15])) - set(zip(tasks.tolist(), seeds.tolist()))
    assert set(zip(rep.tasks.tolist(), rep.seeds.tolist())) == left
    # asking for more than the buffer holds gives what it has
    assert rep.draw(10)[0].numel() == 1 and len(rep) == 0
    state = FailureReplay(4)
    state.update(torch.tensor([1, 2]), torch.tensor([5, 6]), torch.tensor([False, False]))
    rep.load_state_dict(state.state_dict())
    assert rep.tasks.tolist() == [1, 2] and rep.seeds.tolist() == [5, 6]
    with pytest.raises(ValueError, match="capacity"):
        FailureReplay(1).load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="differ"):
        rep.update(torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="replay_failures"):
        RLConfig(replay_failures=1.0)
    with pytest.raises(ValueError, match="replay_failures"):
        RLConfig(algo="grpo", replay_failures=0.5)


def test_trainer_replays_failed_initial_states():
    pol = reach_policy()
    smp = build_sampler("flow_sde", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=2))
    cfg = apply_overrides(RLConfig(), ["task_sampling=failure", "replay_failures=0.5",
                                       "replay_capacity=1000", "ppo.update_epochs=1"])
    env = TwoTaskReach(64, max_episode_steps=2, radius=0.4)
    tr = RLTrainer(pol, smp, env, cfg, seed=0)
    ro = tr.rollout()
    assert tr._num_replayed == 0  # nothing failed yet
    first = {"tasks": tr._task_ids.clone(), "seeds": tr._ep_seeds.clone(),
             "targets": ro.obs[0]["state"].clone(), "ok": ro.episode_success.clone()}
    m = tr.learn(ro)
    fails = int((~first["ok"]).sum())
    assert 0 < fails < 64 and m["replay/size"] == fails
    counts = tr.curriculum.counts.clone()
    ro = tr.rollout()
    k = tr._num_replayed
    assert k == min(32, fails) and len(tr.replay) == fails - k
    # the replayed envs restart from the failed episodes' initial states: same task, same seed,
    # same observation as in the first rollout
    for i in range(k):
        j = int((first["seeds"] == tr._ep_seeds[i]).nonzero())
        assert not bool(first["ok"][j])
        assert int(tr._task_ids[i]) == int(first["tasks"][j])
        torch.testing.assert_close(ro.obs[0]["state"][i], first["targets"][j])
    # the fresh envs get new seeds; the curriculum counts only the fresh episodes
    assert not set(tr._ep_seeds[k:].tolist()) & set(first["seeds"].tolist())
    m = tr.learn(ro)
    added = torch.bincount(tr._task_ids[k:], minlength=2).double()
    torch.testing.assert_close(tr.curriculum.counts, counts * cfg.task_sampling_decay + added)
    assert m["replay/envs"] == k and "replay/success" in m and "rollout/success_fresh" in m
    assert m["replay/size"] == fails - k + int((~ro.episode_success).sum())


def test_round_robin_gives_env_i_task_i_mod_t_every_iteration():
    """rl.task_sampling=round_robin: env i runs task i mod T in every rollout (an env that
    rebuilds its simulation on a task change, LIBERO, builds it once), fresh episode seeds."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=2))
    cfg = apply_overrides(RLConfig(), ["task_sampling=round_robin"])
    tr = RLTrainer(pol, smp, TwoTaskReach(5, max_episode_steps=2, radius=0.3), cfg, seed=0)
    assert tr.curriculum is None
    seeds = []
    for _ in range(2):
        kw = tr._reset_kwargs()
        assert kw["task_ids"].tolist() == [0, 1, 0, 1, 0]
        seeds.append(kw["episode_seeds"])
        tr.iter += 1
    assert not set(seeds[0].tolist()) & set(seeds[1].tolist())
    with pytest.raises(ValueError, match="round_robin"):
        RLConfig(task_sampling="cyclic")
