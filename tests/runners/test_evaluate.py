"""Evaluation settings of a run: how often the policy re-plans (``eval.action_chunk``), how many
episodes each evaluation runs, and the fixed-initial-state protocol (LIBERO)."""

import pytest

from pirl.config.loading import ConfigError, apply_overrides
from pirl.envs.base import ChunkedEnv
from pirl.config.schema import TrainConfig
from tests.runners.tiny_run import TINY_RUN_OVERRIDES


def _run(tmp_path, *extra):
    from pirl.runners.train import Run

    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path}", *TINY_RUN_OVERRIDES, *extra])
    return Run(cfg, tmp_path)


@pytest.mark.parametrize("eval_chunk,executed,chunk_steps", [(None, 4, 4), (2, 2, 8), (1, 1, 16)])
def test_eval_action_chunk_sets_how_often_the_policy_replans(tmp_path, monkeypatch, eval_chunk,
                                                             executed, chunk_steps):
    """16-step episodes with rl.action_chunk=4 (the default): evaluation executes 4 steps of each
    predicted chunk over 4 chunk steps unless ``eval.action_chunk`` says otherwise (2: 8 chunk
    steps of 2, 1: 16 of 1); rl.max_chunks, counted in the rollouts' chunks, does not cut a
    finer evaluation short."""
    extra = ["rl.max_chunks=4"] + ([f"eval.action_chunk={eval_chunk}"] if eval_chunk else [])
    r = _run(tmp_path, *extra)
    calls = []
    real = ChunkedEnv.step_chunk

    def spy(self, actions, **kw):
        calls.append(actions.shape[1])
        return real(self, actions, **kw)

    monkeypatch.setattr(ChunkedEnv, "step_chunk", spy)
    # a policy that never finishes an episode early: every chunk step is taken
    monkeypatch.setattr(r.policy, "postprocess_actions", lambda a: a * 0)
    res = r.evaluate("eval")
    assert res["train"]["episodes"] == 72  # one per train task, in one round of 72 envs
    assert set(calls) == {executed} and len(calls) == chunk_steps


def test_eval_action_chunk_beyond_the_horizon_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="eval.action_chunk"):
        _run(tmp_path, "eval.action_chunk=9")  # TinyVLA predicts 8 steps
    with pytest.raises(ConfigError, match="eval.action_chunk"):
        apply_overrides(TrainConfig(), ["eval.action_chunk=0"])


def test_intermediate_evaluations_use_their_own_episode_count(tmp_path):
    """eval.intermediate_episodes_per_task sizes the evaluations during RL; the start and the
    final evaluation keep eval.episodes_per_task (72 train tasks).  Evaluated on the training
    envs themselves (eval.num_envs = env.num_envs), which RL keeps using in between."""
    from pirl.runners.train import run

    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path}", *TINY_RUN_OVERRIDES,
                                          "rl.iterations=2", "rl.eval_every=1",
                                          "eval.episodes_per_task=2",
                                          "eval.intermediate_episodes_per_task=1",
                                          "eval.num_envs=8"])
    res = run(cfg)
    assert res["sft"]["train"]["episodes"] == 144
    assert res["rl_1"]["train"]["episodes"] == 72
    assert res["final"]["train"]["episodes"] == 144
    with pytest.raises(ConfigError, match="eval.intermediate_episodes_per_task"):
        apply_overrides(TrainConfig(), ["eval.intermediate_episodes_per_task=0"])


@pytest.mark.parametrize("eval_envs,shared", [(8, True), (16, False)])
def test_train_split_evaluates_on_the_training_envs_when_sizes_match(tmp_path, eval_envs, shared):
    """eval.num_envs == env.num_envs (8): the train split's evaluation runs on the training env
    object itself; another size builds its own env."""
    r = _run(tmp_path, f"eval.num_envs={eval_envs}")
    res = r.evaluate("eval")
    assert res["train"]["episodes"] == 72
    assert (r._eval_envs["train"] is r.env) is shared


class _FixedStartsReach:
    """ReachEnv with three tasks and LIBERO-like fixed initial states (``fixed_init_states``);
    records every reset's task ids and episode seeds."""

    @staticmethod
    def make(num_envs: int, fixed: int):
        from tests.runners.reach_env import ReachEnv

        class Env(ReachEnv):
            task_names = ("a", "b", "c")
            fixed_init_states = fixed

            def reset(self, seed=None, task_ids=None, episode_seeds=None):
                self.resets.append((task_ids.tolist(), episode_seeds.tolist()))
                return super().reset(seed, task_ids, episode_seeds)

        env = Env(num_envs)
        env.resets = []
        return env


@pytest.mark.parametrize("num_envs", [3, 6, 4])
def test_fixed_init_states_follow_the_benchmark_protocol(num_envs):
    """An env with fixed initial states (LIBERO) is evaluated on the benchmark's protocol: the
    k-th episode of every task starts from fixed state k (episode seed k), 0..E-1 for each task,
    whatever the number of envs and the evaluation seed; more episodes than fixed states is an
    error naming both."""
    from pirl.flow import SamplerConfig, build_sampler
    from pirl.runners.evaluate import evaluate_env
    from tests.runners.reach_env import reach_policy

    pol = reach_policy(None)
    smp = build_sampler("ode", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="ode", num_steps=2))
    for seed in (0, 123):
        env = _FixedStartsReach.make(num_envs, fixed=5)
        res = evaluate_env(pol, smp, env, episodes_per_task=4, seed=seed, action_chunk=2,
                           num_chunks=1)
        assert res["episodes"] == 12
        starts: dict[int, list[int]] = {0: [], 1: [], 2: []}
        total = 0
        for tasks, seeds in env.resets:
            for t, s in zip(tasks, seeds):
                if total < 12:  # the last round's padding rows do not count
                    starts[t].append(s)
                total += 1
        assert {t: sorted(s) for t, s in starts.items()} == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3],
                                                            2: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="episodes_per_task=6 from initial state 0: the env "
                                         "has 5 fixed initial"):
        evaluate_env(pol, smp, _FixedStartsReach.make(num_envs, fixed=5), episodes_per_task=6,
                     seed=0, action_chunk=2, num_chunks=1)


def test_evaluation_from_a_later_fixed_init_state():
    """eval.first_init_state=f: the k-th episode of every task starts from fixed state f + k;
    past the env's last state, or on an env without fixed states, it is an error."""
    from pirl.flow import SamplerConfig, build_sampler
    from pirl.runners.evaluate import evaluate_env
    from tests.runners.reach_env import ReachEnv, reach_policy

    pol = reach_policy(None)
    smp = build_sampler("ode", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="ode", num_steps=2))
    env = _FixedStartsReach.make(6, fixed=5)
    res = evaluate_env(pol, smp, env, episodes_per_task=2, seed=0, action_chunk=2, num_chunks=1,
                       first_init_state=3)
    assert res["episodes"] == 6
    tasks, seeds = env.resets[0]
    assert sorted(zip(tasks, seeds)) == [(t, s) for t in range(3) for s in (3, 4)]
    with pytest.raises(ValueError, match="episodes_per_task=2 from initial state 4"):
        evaluate_env(pol, smp, _FixedStartsReach.make(6, fixed=5), episodes_per_task=2, seed=0,
                     action_chunk=2, num_chunks=1, first_init_state=4)
    with pytest.raises(ValueError, match="no fixed initial states"):
        evaluate_env(pol, smp, ReachEnv(4), episodes_per_task=1, seed=0, action_chunk=2,
                     num_chunks=1, first_init_state=1)


def test_evaluation_does_not_depend_on_the_number_of_envs():
    """Every episode's initial denoising noise comes from its own seed, so the same episodes
    give the same per-task success (here on a reach env where the noise decides success) with
    3, 5 or 12 envs side by side; another evaluation seed draws other noise."""
    import torch

    from pirl.flow import SamplerConfig, build_sampler
    from pirl.runners.evaluate import evaluate_env
    from tests.runners.reach_env import ReachEnv, reach_policy

    pol = reach_policy()
    smp = build_sampler("ode", 2, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="ode", num_steps=2))

    def run(n, seed=0):
        return evaluate_env(pol, smp, ReachEnv(n, max_episode_steps=1, radius=0.5),
                            episodes_per_task=12, seed=seed, action_chunk=1, num_chunks=1)

    ref = run(12)
    assert 0 < ref["success"] < 1  # the draws matter: not all or none succeed
    for n in (3, 5):
        assert run(n) == ref
    others = [run(12, seed)["success"] for seed in (1, 2, 3)]
    assert any(s != ref["success"] for s in others)


def test_episode_noise_is_the_rows_own_draw():
    """:func:`episode_noise` row i is N(0, I) from a generator seeded by (seed_i, step): the
    same for a seed wherever it sits in the batch, different across steps."""
    import torch

    from pirl.runners.rollout import episode_noise

    a = episode_noise(torch.tensor([7, 3, 11]), 2, (4, 2))
    b = episode_noise(torch.tensor([11, 7]), 2, (4, 2))
    assert a.shape == (3, 4, 2) and a.dtype == torch.float32
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    want = torch.randn((4, 2), generator=torch.Generator().manual_seed(3 * 10_007 + 2))
    assert torch.equal(a[1], want)
    assert not torch.equal(episode_noise(torch.tensor([7]), 3, (4, 2))[0], a[0])
