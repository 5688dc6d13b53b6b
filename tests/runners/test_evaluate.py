"""Evaluation settings of a run: how often the policy re-plans (``eval.action_chunk``)."""

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
