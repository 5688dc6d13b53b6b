"""Failure-weighted task sampling: the estimate and probabilities against hand-computed values,
the draws against the probabilities (Monte Carlo), and the trainer's use of them."""

import math

import pytest
import torch

from pirl.algos.grpo import make_groups
from pirl.configs import apply_overrides
from pirl.flow import SamplerConfig, build_sampler
from pirl.models import build_policy
from pirl.runners.config import RLConfig
from pirl.runners.curriculum import FailureCurriculum
from pirl.runners.rl import RLTrainer
from tests.runners.reach_env import ReachEnv


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
    torch.manual_seed(0)
    pol = build_policy("tiny", action_horizon=2, action_dim=2, state_dim=2, num_cameras=0,
                       width=32, depth=1, heads=2, value_hidden=32, vocab=["reach the point"])
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
