"""The run's ``precision``: the config field, bf16 RL with exact first-minibatch ratios, and
run folders made before the field resuming in float32."""

import pytest
import torch
import yaml

from pirl.config.loading import ConfigError, apply_overrides
from pirl.config.schema import RLConfig, TrainConfig
from pirl.envs.tabletop import TabletopEnv
from pirl.flow import SamplerConfig, build_sampler
from pirl.models import build_policy
import pirl.runners.rl as rl_mod
from pirl.runners import train as train_mod
from tests.runners.tiny_run import TINY_RUN_OVERRIDES


def test_precision_field():
    assert TrainConfig().precision == "auto"
    assert apply_overrides(TrainConfig(), ["precision=fp32"]).precision == "fp32"
    assert apply_overrides(TrainConfig(), ["precision=auto"]).precision == "auto"
    assert apply_overrides(TrainConfig(), ["precision=bf16"]).precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(TrainConfig(), ["precision=fp16"])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")


def _first_minibatch(precision, kind, monkeypatch):
    """(new, old) log-probs of the first PPO minibatch after one rollout, and the rollout."""
    torch.manual_seed(0)
    env = TabletopEnv(16, max_episode_steps=16, num_distractors=0, num_cameras=2)
    pol = build_policy("tiny", action_dim=env.action_dim, state_dim=env.state_dim,
                       action_horizon=8, num_cameras=2, width=64, depth=2, heads=2,
                       conv_channels=[8, 16], value_hidden=32, vocab=list(env.vocabulary()))
    pol.set_precision(precision)
    smp = build_sampler(kind, 4, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind=kind, noise_level=1.0))
    cfg = apply_overrides(RLConfig(), ["action_chunk=4", "ppo.update_epochs=1",
                                       "ppo.num_minibatches=4"])
    tr = rl_mod.RLTrainer(pol, smp, env, cfg, seed=0)
    seen = []
    orig = rl_mod.policy_loss

    def spy(new, old, *a, **k):
        seen.append((new.detach().clone(), old.clone()))
        return orig(new, old, *a, **k)

    monkeypatch.setattr(rl_mod, "policy_loss", spy)
    ro = tr.rollout()
    tr.learn(ro)
    return seen[0], ro


@pytest.mark.parametrize("kind", ["flow_sde", "flow_noise"])
def test_bf16_rollout_logp_equals_first_update_recompute(kind, monkeypatch):
    """In bf16 as in fp32 the update's first-epoch recomputation of the first minibatch's
    log-probs (frozen prefix caches thawed, chains re-evaluated) equals the rollout's: PPO's
    ratio is 1 there.  The bf16 rollout really differs from the fp32 one (its actions)."""
    (new16, old16), ro16 = _first_minibatch(torch.bfloat16, kind, monkeypatch)
    (new32, old32), ro32 = _first_minibatch(None, kind, monkeypatch)
    assert old16.dtype == new16.dtype == torch.float32
    torch.testing.assert_close(new16, old16, atol=1e-5, rtol=0)
    torch.testing.assert_close(new32, old32, atol=1e-5, rtol=0)
    assert torch.exp(new16 - old16).sub(1).abs().max() < 1e-4
    assert not torch.equal(ro16.chains[0].x[:, -1], ro32.chains[0].x[:, -1])


def _tiny_cfg(tmp_path, name, *extra):
    return apply_overrides(TrainConfig(), [f"run_dir={tmp_path / name}", *TINY_RUN_OVERRIDES,
                                           "rl.iterations=1", "threads=1", *extra])


def test_run_applies_precision_and_old_run_folders_resume_in_fp32(tmp_path, monkeypatch):
    """``make_policy`` gives the policy the config's precision; a run folder whose config.yaml
    has no ``precision`` (made before the field existed, in float32) is loaded as fp32 --
    whatever the field's default -- and an extension writes fp32 into its config."""
    cfg = _tiny_cfg(tmp_path, "b", "precision=bf16")
    env = train_mod.make_train_env(cfg)
    assert train_mod.make_policy(cfg, env).autocast_dtype is torch.bfloat16
    cfg32 = apply_overrides(cfg, ["precision=fp32"])
    assert train_mod.make_policy(cfg32, env).autocast_dtype is None

    train_mod.run(_tiny_cfg(tmp_path, "old", "precision=fp32"))
    path = tmp_path / "old" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    del raw["precision"]                      # as a config.yaml written before the field
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert train_mod.load_run_config(tmp_path / "old").precision == "fp32"
    seen = []
    orig = train_mod.Run.__init__

    def spy(self, cfg, run_dir):
        orig(self, cfg, run_dir)
        seen.append(self.policy.autocast_dtype)

    monkeypatch.setattr(train_mod.Run, "__init__", spy)
    train_mod.run(resume=tmp_path / "old", iterations=2)
    assert seen == [None]
    assert yaml.safe_load(path.read_text())["precision"] == "fp32"
    # a config that names its precision keeps it
    assert train_mod.load_run_config(tmp_path / "old", ["precision=bf16"]).precision == "bf16"
