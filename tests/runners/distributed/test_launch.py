"""The Ray placements end to end (2-CPU local Ray per module): colocated / disaggregated
learning curves equal the local run's, trainer state resumes, dead workers fail fast naming
themselves, and the whole recipe runs disaggregated."""

from __future__ import annotations

import os

import pytest
import torch

from pirl.config.schema import RLConfig
from pirl.runners.distributed import DistributedTrainer, WorkerError
from pirl.runners.rl import RLTrainer
from tests.runners.distributed.helpers import (IMG, assert_rollouts_close, assert_same_curve,
                                               env_fn, placement, rl_parts, run_local)

try:
    import ray
except ImportError:  # the ray_local fixture skips these tests
    ray = None



def test_disaggregated_matches_local_and_dead_env_worker_fails(ray_local):
    """2 env workers (pipelined, 2 stages) + rollout worker + 1 learner rank: the rollout data
    and the first update equal the local run's; then an env worker killed with SIGKILL makes
    the next iteration fail naming it, with nothing trained on partial data."""
    ref_metrics, ref_policy, _ = run_local(1)
    env, policy, sampler, cfg = rl_parts()
    # the local rollout of iteration 0 (a fresh trainer with the same seed)
    local = RLTrainer(*rl_parts()[1:3], env, cfg, seed=0).rollout()
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, placement("disaggregated", ranks=1),
                            env_fn)
    try:
        start = ray.get(tr.rollout_workers[0].rollout_state.remote())
        # (PPO with uniform tasks: asking the learner for the plan changes none of its state)
        plan = ray.get(tr.learners[0].plan.remote())
        payload = ray.get(tr.rollout_workers[0].rollout.remote(plan))
        assert_rollouts_close(local, payload["rollout"])
        # rewind the rollout worker (iteration counter and noise stream) and train for real
        ray.get(tr.rollout_workers[0].load_rollout_state.remote(start))
        metrics = [tr.iteration()]
        assert_same_curve(ref_metrics, metrics, ref_policy, policy)

        before = {k: v.clone() for k, v in policy.state_dict().items()}
        pids = tr.worker_pids()
        os.kill(pids["env worker 1 (envs [3, 6))"], 9)
        with pytest.raises(WorkerError, match=r"env worker 1 \(envs \[3, 6\)\) died"):
            tr.iteration()
        assert tr.iter == 1
        assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    finally:
        tr.close(keep_state=False)


TWO_ROLLOUT_WORKERS = {"rollout_workers": 2, "pipeline_stages": 1}


@pytest.mark.slow
@pytest.mark.parametrize("mode,algo,fsdp,extra", [("colocated", "ppo", False, {}),
                                                  ("disaggregated", "ppo", False, {}),
                                                  ("colocated", "grpo", False, {}),
                                                  ("disaggregated", "grpo", False, {}),
                                                  ("colocated", "ppo", True, {}),
                                                  ("disaggregated", "ppo", True, {}),
                                                  ("disaggregated", "ppo", False,
                                                   TWO_ROLLOUT_WORKERS)],
                         ids=["colocated-ddp", "disaggregated-ddp", "colocated-grpo",
                              "disaggregated-grpo", "colocated-fsdp", "disaggregated-fsdp",
                              "disaggregated-2-rollout-workers"])
def test_learning_curve_matches_local(ray_local, mode, algo, fsdp, extra):
    """3 iterations with 2 gloo learner ranks (DDP or FSDP2) == the local run: same rollout
    returns / episode lengths, same losses and KL, same final weights (float tolerance).
    Disaggregated: 2 env workers in 2 pipeline stages, or 2 rollout workers (1 env worker
    each)."""
    ref_metrics, ref_policy, _ = run_local(3, algo)
    env, policy, sampler, cfg = rl_parts(algo)
    tr = DistributedTrainer(policy, sampler, env, cfg, 0,
                            placement(mode, ranks=2, learner={"fsdp": fsdp}, **extra), env_fn)
    try:
        metrics = [tr.iteration() for _ in range(3)]
        sd = tr.state_dict()
    finally:
        tr.close(keep_state=False)
    assert_same_curve(ref_metrics, metrics, ref_policy, policy)
    assert sd["iter"] == 3 and sd["env_steps"] == ref_metrics[-1]["env_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_trainer_state_resumes(ray_local, fsdp):
    """Stop after 2 iterations, resume from the trainer state (optimizer, generators, counters)
    and the driver's synced weights: the 3rd iteration equals an uninterrupted local run's.
    DDP state has the local layout, so a local trainer resumes it; FSDP2 state resumes under
    FSDP2 (and a local trainer refuses it with a clear error)."""
    ref_metrics, ref_policy, _ = run_local(3)
    env, policy, sampler, cfg = rl_parts()
    pl = placement("colocated", learner={"fsdp": fsdp})
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn)
    try:
        [tr.iteration() for _ in range(2)]
        sd = tr.state_dict()
    finally:
        tr.close(keep_state=False)
    if not fsdp:
        resumed = RLTrainer(policy, sampler, env, cfg, seed=0)
        resumed.load_state_dict(sd)
        m = resumed.iteration()
    else:
        assert sd["optimizer_format"] == "fsdp-full"
        with pytest.raises(ValueError, match="FSDP"):
            from pirl.runners.distributed import DataParallelRLTrainer
            DataParallelRLTrainer(policy, sampler, env, cfg, seed=0).load_state_dict(sd)
        resumed = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn)
        try:
            resumed.load_state_dict(sd)
            m = resumed.iteration()
        finally:
            resumed.close(keep_state=False)
    assert_same_curve(ref_metrics[2:], [m], ref_policy, policy)


@pytest.mark.slow
def test_dead_learner_rank_fails_fast(ray_local):
    """A learner rank killed between iterations: the next iteration raises WorkerError naming
    it (instead of the surviving rank waiting in a collective)."""
    env, policy, sampler, cfg = rl_parts()
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, placement("colocated"), env_fn)
    try:
        tr.iteration()
        ray.kill(tr.learners[1])
        with pytest.raises(WorkerError, match=r"colocated worker 1 .* died"):
            tr.iteration()
        assert tr.iter == 1
    finally:
        tr.close(keep_state=False)


def test_trainer_from_config_local_is_rl_trainer():
    """placement.mode=local (the default) keeps the one-process RLTrainer."""
    from pirl.config.schema import TrainConfig
    from pirl.runners.distributed import trainer_from_config

    env, policy, sampler, cfg = rl_parts()
    tc = TrainConfig(rl=cfg)
    assert tc.placement.mode == "local"
    tr = trainer_from_config(tc, policy, sampler, env)
    assert type(tr) is RLTrainer


@pytest.mark.slow
def test_pirl_run_disaggregated_end_to_end(ray_local, tmp_path):
    """The whole recipe (demos -> SFT -> RL -> eval) with placement.mode=disaggregated: the
    run folder, metrics and a final checkpoint whose trainer state has the local layout."""
    from pirl.runners.checkpoint import load_checkpoint
    from pirl.config.schema import (DemoConfig, EnvConfig, EvalConfig, ModelConfig,
                                     PretrainConfig, SFTConfig, TrainConfig)
    from pirl.runners.train import run

    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"), progress=False,
        env=EnvConfig(num_envs=4, kwargs={"image_size": IMG, "max_episode_steps": 12}),
        model=ModelConfig(kwargs={"width": 32, "depth": 1, "heads": 2, "action_horizon": 4,
                                  "conv_channels": [8, 8, 8]}),
        pretrain=PretrainConfig(steps=0), sft=SFTConfig(steps=3),
        demos=DemoConfig(episodes_per_task=1),
        rl=RLConfig(iterations=2, action_chunk=3),
        eval=EvalConfig(episodes_per_task=1, num_envs=8, videos=0, splits=["train"]),
        placement=placement("disaggregated", ranks=2))
    res = run(cfg)
    assert set(res) >= {"sft", "final"}
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["stage"] == "done" and state["trainer"]["iter"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("rollout/success") == 2


@pytest.mark.slow
def test_local_run_resumes_on_a_ray_cluster(ray_local, tmp_path, capsys):
    """``pirl train --resume RUN rl.iterations=2 --cluster local`` continues a finished local
    run (1 RL iteration) in the disaggregated placement: its second iteration equals that of an
    uninterrupted 2-iteration local run (same returns, losses to float tolerance)."""
    import json

    from pirl.cli import main
    from pirl.config.loading import load_yaml
    from pirl.config.schema import TrainConfig
    from tests.runners.tiny_run import TINY_RUN_OVERRIDES

    def rl_lines(run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [x for x in lines if "rollout/success" in x]

    ref, moved = tmp_path / "ref", tmp_path / "moved"
    assert main(["train", *TINY_RUN_OVERRIDES, "rl.iterations=2", f"run_dir={ref}"]) == 0
    assert main(["train", *TINY_RUN_OVERRIDES, "rl.iterations=1", f"run_dir={moved}"]) == 0
    assert main(["train", "--resume", str(moved), "rl.iterations=2", "--cluster", "local"]) == 0
    assert "using placement.mode=disaggregated" in capsys.readouterr().out
    cfg = load_yaml(TrainConfig, moved / "config.yaml")
    assert (cfg.placement.mode, cfg.placement.cluster, cfg.rl.iterations) == (
        "disaggregated", "local", 2)
    a, b = rl_lines(ref), rl_lines(moved)
    assert len(a) == len(b) == 2
    for k in ("rollout/return", "rollout/success", "env_steps"):
        assert a[1][k] == b[1][k], k
    for k in ("policy/loss", "policy/approx_kl", "value/loss"):
        assert b[1][k] == pytest.approx(a[1][k], rel=1e-3, abs=1e-5), k
