"""The phase-time breakdown: env vs policy time in a rollout, per-phase times of a run."""

import json
import time

import torch

from pirl.config.loading import apply_overrides
from pirl.config.schema import TrainConfig
from pirl.envs.base import ChunkedEnv
from pirl.flow import SamplerConfig, build_sampler
from pirl.runners import train as train_mod
from pirl.runners.rollout import collect
from tests.runners.reach_env import ReachEnv, reach_policy
from tests.runners.tiny_run import TINY_RUN_OVERRIDES


def test_rollout_times_env_and_policy_apart(monkeypatch):
    """With an env whose chunk step sleeps 30 ms and a policy whose prefix sleeps 20 ms, the
    rollout's ``env_s`` / ``policy_s`` hold each one's sleeps (and not the other's)."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim, config=SamplerConfig())
    env = ChunkedEnv(ReachEnv(8, max_episode_steps=8, radius=0.0))   # never succeeds: 4 chunks
    step, enc = env.step_chunk, type(pol).encode_prefix

    def slow_step(*a, **k):
        time.sleep(0.03)
        return step(*a, **k)

    def slow_prefix(self, obs):
        time.sleep(0.02)
        return enc(self, obs)

    monkeypatch.setattr(env, "step_chunk", slow_step)
    monkeypatch.setattr(type(pol), "encode_prefix", slow_prefix)
    t0 = time.perf_counter()
    ro = collect(pol, smp, env, num_chunks=4, reset_kwargs={"seed": 0}, action_chunk=2,
                 generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - t0
    assert ro.valid.shape[0] == 4
    # 4 chunk steps' sleeps and none of the 5 prefix sleeps (ReachEnv's own steps take us)
    assert 4 * 0.03 <= ro.env_s < 4 * 0.03 + 5 * 0.02
    assert ro.policy_s >= 5 * 0.02      # 4 chunk steps + the bootstrap value's prefix
    assert ro.env_s + ro.policy_s <= wall


def test_run_records_phase_times(tmp_path, capsys):
    """A whole tiny run writes every phase's seconds to results.json (summing, with "other",
    to the run folder's wall-clock), prints the table, logs the rollout's env / policy split
    per RL iteration, and a resumed run adds its time to the saved phases."""
    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path / 'r'}", *TINY_RUN_OVERRIDES,
                                          "rl.iterations=1", "threads=1"])
    train_mod.run(cfg)
    out = capsys.readouterr().out
    assert "time per phase" in out and "| RL rollouts (env " in out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    t = res["timing"]
    assert res["precision"] in ("fp32", "bf16") and "final" in res and "sft" in res
    for k in ("pretrain", "demos", "sft", "rl_rollout", "rl_update", "eval",
              "rl_rollout_env", "rl_rollout_policy"):
        assert t[k] > 0, k
    assert t["rl_rollout_env"] + t["rl_rollout_policy"] <= t["rl_rollout"]
    top = sum(t[k] for k, _ in train_mod.PHASES)
    assert abs(top + t["other"] - t["total"]) < 1e-6
    assert t["total"] == train_mod.run_wall_clock(tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "perf/rollout_s" in r]
    assert len(rl) == 1 and rl[0]["perf/rollout_env_s"] > 0 and rl[0]["perf/rollout_policy_s"] > 0
    assert t["rl_rollout"] == rl[0]["perf/rollout_s"]

    train_mod.run(resume=tmp_path / "r", iterations=2)
    t2 = json.loads((tmp_path / "r" / "results.json").read_text())["timing"]
    assert t2["pretrain"] == t["pretrain"] and t2["rl_update"] > t["rl_update"]
    assert t2["total"] == train_mod.run_wall_clock(tmp_path / "r") > t["total"]
