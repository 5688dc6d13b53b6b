"""The RL loop: rollout bookkeeping, PPO / GRPO learning on an easy task, exact resume."""

import json

import pytest
import torch

from pirl.config.loading import apply_overrides
from pirl.flow import SamplerConfig, build_sampler
from pirl.models import build_policy
from pirl.config.schema import RLConfig, TrainConfig
from pirl.runners.rl import RLTrainer
from pirl.runners.rollout import collect
from pirl.envs.base import ChunkedEnv
from tests.runners.reach_env import ReachEnv, reach_policy
from tests.runners.tiny_run import TINY_RUN_OVERRIDES


def test_rollout_logprob_matches_recompute_and_masks():
    """Rollout log-probs equal the sampler's recomputation; rewards/valid follow the episodes."""
    pol = reach_policy()
    smp = build_sampler("flow_noise", 3, pol.feature_dim, pol.action_dim, config=SamplerConfig())
    env = ChunkedEnv(ReachEnv(16, max_episode_steps=4))
    ro = collect(pol, smp, env, num_chunks=2, reset_kwargs={"seed": 0},
                 action_chunk=2, generator=torch.Generator().manual_seed(0))
    assert ro.valid[0].all()
    # an env that succeeded in chunk 0 is invalid in chunk 1 and got reward exactly once
    first = ro.success[0]
    assert torch.equal(ro.valid[1], ~first)
    assert torch.equal(ro.episode_return, ro.episode_success.float())
    for t, obs in enumerate(ro.obs):
        new = smp.log_prob(pol, pol.encode_prefix(obs), ro.chains[t])
        torch.testing.assert_close(new.logp, ro.chains[t].logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo,kind", [("ppo", "flow_noise"), ("grpo", "flow_sde")])
def test_short_rl_run_increases_success(algo, kind):
    torch.manual_seed(0)
    pol = reach_policy()
    scfg = SamplerConfig(kind=kind, num_steps=3, min_std=0.1, max_std=0.3, hybrid=False)
    smp = build_sampler(kind, 3, pol.feature_dim, pol.action_dim, config=scfg)
    cfg = apply_overrides(RLConfig(algo=algo), [
        "train_mode=full", f"{algo}.lr_policy=0.01", f"{algo}.lr_noise=0.01",
        f"{algo}.update_epochs=4", f"{algo}.num_minibatches=2", f"{algo}.logp_mode=chain_mean"]
        + (["ppo.lr_value=0.01", "ppo.lr_schedule=constant"] if algo == "ppo"
           else ["grpo.group_size=8"]))
    tr = RLTrainer(pol, smp, ReachEnv(128, max_episode_steps=2, radius=0.45), cfg, seed=0)
    succ = [tr.iteration()["rollout/success"] for _ in range(20)]
    before, after = sum(succ[:3]) / 3, sum(succ[-3:]) / 3
    assert after > before + 0.25, succ


def test_grpo_logs_fraction_of_episodes_with_signal():
    """``grpo/nonzero_adv_fraction`` (episodes with a non-zero advantage) equals, for ReachEnv's
    0/1 returns, the share of episodes whose group's returns differ, counted here with a plain
    loop over the groups."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3, hybrid=False))
    cfg = apply_overrides(RLConfig(algo="grpo"), ["grpo.group_size=4", "train_mode=full"])
    tr = RLTrainer(pol, smp, ReachEnv(32, max_episode_steps=2, radius=0.45), cfg, seed=0)
    ro = tr.rollout()
    groups, returns = tr._groups.tolist(), ro.episode_return.tolist()
    mixed = 0
    for g in set(groups):
        members = [r for r, gi in zip(returns, groups) if gi == g]
        if max(members) != min(members):
            mixed += len(members)
    assert 0 < mixed < len(returns)  # the check below is not vacuous
    m = tr.learn(ro)
    assert m["grpo/nonzero_adv_fraction"] == pytest.approx(mixed / len(returns))


def _tiny_run_cfg(tmp_path, name, iterations=2, extra=()):
    return apply_overrides(TrainConfig(), [
        f"run_dir={tmp_path / name}", *TINY_RUN_OVERRIDES, f"rl.iterations={iterations}",
        "rl.eval_every=100", "checkpoint_every=1", *extra])


@pytest.mark.parametrize("task_sampling", ["uniform", "failure", "failure+replay", "uniform+bc",
                                           "failure+2rollouts", "uniform+silbuffer"])
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, task_sampling):
    from pirl.runners import train as train_mod
    from pirl.runners.checkpoint import load_checkpoint

    replay = task_sampling.endswith("+replay")
    bc = task_sampling.endswith("+bc")
    two = task_sampling.endswith("+2rollouts")
    silbuf = task_sampling.endswith("+silbuffer")
    task_sampling = (task_sampling.removesuffix("+replay").removesuffix("+bc")
                     .removesuffix("+2rollouts").removesuffix("+silbuffer"))
    extra = [f"rl.task_sampling={task_sampling}"]
    if two:  # each iteration's second rollout draws its seeds from the resumed counters
        extra += ["rl.rollouts_per_update=2"]
    if replay:  # the resumed iteration replays the failures stored with the checkpoint
        extra += ["rl.replay_failures=0.5"]
    if bc:  # the demo loss's draws continue from the checkpointed update generator
        extra += ["rl.bc_coef=0.5", "rl.bc_batch_size=4"]
    if silbuf:  # the success buffer travels with the checkpoint
        extra += ["rl.ppo.sil_coef=0.5", "rl.sil_buffer_per_task=2", "rl.sil_batch_size=4"]
    train_mod.run(_tiny_run_cfg(tmp_path, "a", extra=extra))
    # the same run, killed during its second RL iteration, then resumed from the checkpoint
    calls = {"n": 0}
    orig = RLTrainer.iteration

    def crashing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return orig(self)

    monkeypatch.setattr(RLTrainer, "iteration", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(_tiny_run_cfg(tmp_path, "b", extra=extra))
    monkeypatch.setattr(RLTrainer, "iteration", orig)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["trainer"]["iter"] == 1
    train_mod.run(resume=tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    for k in a["sampler"]:
        assert torch.equal(a["sampler"][k], b["sampler"][k]), k
    assert a["results"] == b["results"]
    if task_sampling == "failure":  # the curriculum's counts travel with the checkpoint
        ca, cb = a["trainer"]["curriculum"], b["trainer"]["curriculum"]
        assert float(ca["counts"].sum()) > 0
        assert torch.equal(ca["counts"], cb["counts"])
        assert torch.equal(ca["successes"], cb["successes"])
    if replay:  # and so does the replay buffer
        ra, rb = a["trainer"]["replay"], b["trainer"]["replay"]
        assert ra["tasks"].numel() > 0
        assert torch.equal(ra["tasks"], rb["tasks"]) and torch.equal(ra["seeds"], rb["seeds"])
    ma = [l for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "rollout/" in l]
    mb = [l for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if "rollout/" in l]
    strip = lambda rows: [{k: v for k, v in __import__("json").loads(r).items()
                           if not k.startswith("perf/")} for r in rows]
    assert strip(ma) == strip(mb)
    if bc:
        assert all("bc/loss" in __import__("json").loads(r) for r in ma)
    if silbuf:  # (the tiny run's episodes all fail: an empty buffer, checked for its key)
        assert a["trainer"]["successes"] is not None and b["trainer"]["successes"] is not None


def test_resume_extends_a_finished_run(tmp_path):
    """``run(resume=RUN, iterations=N)`` continues a finished 1-iteration run to N = 2, and with
    a constant lr it ends exactly where a run planned for 2 iterations ends; the earlier final
    evaluation is kept as rl_1 and config.yaml says 2.  Shortening is an error."""
    from pirl.config.loading import ConfigError, load_yaml
    from pirl.runners import train as train_mod
    from pirl.runners.checkpoint import load_checkpoint

    const = ["rl.ppo.lr_schedule=constant"]
    train_mod.run(apply_overrides(_tiny_run_cfg(tmp_path, "planned", iterations=2), const))
    train_mod.run(apply_overrides(_tiny_run_cfg(tmp_path, "short", iterations=1), const))
    first_final = load_checkpoint(tmp_path / "short" / "checkpoints" / "last.pt")["results"]["final"]
    with pytest.raises(ConfigError, match="shortened"):
        train_mod.run(resume=tmp_path / "short", iterations=0)
    train_mod.run(resume=tmp_path / "short", iterations=2)
    a = load_checkpoint(tmp_path / "planned" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "short" / "checkpoints" / "last.pt")
    assert b["stage"] == "done" and b["trainer"]["iter"] == 2
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    for k in a["sampler"]:
        assert torch.equal(a["sampler"][k], b["sampler"][k]), k
    assert b["results"]["rl_1"] == first_final
    assert b["results"]["final"] == a["results"]["final"]
    assert load_yaml(TrainConfig, tmp_path / "short" / "config.yaml").rl.iterations == 2
    # each completed invocation is recorded (the refused one is not); the wall-clock sums them
    inv = [json.loads(x) for x in (tmp_path / "short" / "invocations.jsonl").read_text()
           .splitlines()]
    assert [(x["resumed"], x["stage"]) for x in inv] == [(False, "done"), (True, "done")]
    assert train_mod.run_wall_clock(tmp_path / "short") == pytest.approx(
        inv[0]["wall_s"] + inv[1]["wall_s"])
    assert train_mod.run_wall_clock(tmp_path / "nothing") is None


def test_resume_rejects_other_model(tmp_path):
    from pirl.runners import train as train_mod
    from pirl.runners.checkpoint import CheckpointError

    cfg = _tiny_run_cfg(tmp_path, "c", iterations=0)
    train_mod.run(cfg)
    r = train_mod.Run(apply_overrides(cfg, ["model.kwargs={width: 64}"]), tmp_path / "d")
    with pytest.raises(CheckpointError, match="model"):
        r.load(tmp_path / "c" / "checkpoints" / "last.pt")


@pytest.mark.parametrize("algo,kind,critic_time", [("ppo", "flow_noise", False),
                                                   ("grpo", "flow_sde", False),
                                                   ("ppo", "flow_sde", True)])
def test_reused_frozen_prefix_equals_reencoding(algo, kind, critic_time, monkeypatch):
    """expert_only: the update on the rollout's frozen prefix caches gives the parameters and
    metrics of re-encoding every observation, and never runs the prefix encoder (also with a
    critic that reads the time left, which the frozen caches carry)."""
    from pirl.envs.tabletop import TabletopEnv

    def run(reuse: bool):
        torch.manual_seed(0)
        env = TabletopEnv(8, max_episode_steps=16, num_distractors=0)
        pol = build_policy("tiny", action_dim=3, state_dim=4, action_horizon=4, width=32,
                           depth=1, heads=2, conv_channels=[8, 16], value_hidden=32,
                           vocab=list(env.vocabulary()), critic_time=critic_time)
        smp = build_sampler(kind, 3, pol.feature_dim, pol.action_dim, config=SamplerConfig())
        cfg = apply_overrides(RLConfig(algo=algo), [
            "train_mode=expert_only", f"reuse_prefix={str(reuse).lower()}",
            f"{algo}.update_epochs=2", f"{algo}.num_minibatches=2"]
            + (["grpo.group_size=4", "grpo.kl_coef=0.1"] if algo == "grpo" else []))
        tr = RLTrainer(pol, smp, env, cfg, seed=0)
        ro = tr.rollout()
        assert (ro.prefixes is not None) == reuse
        calls = {"n": 0}
        orig = type(pol).encode_prefix

        def counting(self, obs):
            calls["n"] += 1
            return orig(self, obs)

        monkeypatch.setattr(type(pol), "encode_prefix", counting)
        m = tr.learn(ro)
        monkeypatch.setattr(type(pol), "encode_prefix", orig)
        return pol.state_dict(), m, calls["n"]

    sd_a, m_a, n_a = run(True)
    sd_b, m_b, n_b = run(False)
    assert n_a == 0 and n_b > 0
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in ("policy/loss", "policy/approx_kl", "policy/clip_fraction") + (
            ("value/loss",) if algo == "ppo" else ()):
        assert m_a[k] == pytest.approx(m_b[k], rel=1e-3, abs=1e-5), k


def test_rollout_sends_unnormalised_actions_to_the_env():
    """Chains stay in model space; the env gets ``policy.postprocess_actions`` of them."""
    pol = reach_policy(None, normalization="mean_std")
    pol.normalizer.actions_mean.copy_(torch.tensor([0.3, -0.2]))
    pol.normalizer.actions_std.copy_(torch.tensor([0.05, 2.0]))
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim, config=SamplerConfig())
    sent = []

    class Recording(ReachEnv):
        def step(self, action):
            sent.append(action.clone())
            return super().step(action)

    env = ChunkedEnv(Recording(8, max_episode_steps=2, radius=0.0))
    ro = collect(pol, smp, env, num_chunks=1, reset_kwargs={"seed": 0}, action_chunk=2,
                 generator=torch.Generator().manual_seed(0), with_values=False)
    # the shared Normalizer's mean_std inverse: x * (std + 1e-6) + mean            [N, H, A]
    expect = ro.chains[0].actions * (torch.tensor([0.05, 2.0]) + 1e-6) + torch.tensor([0.3, -0.2])
    torch.testing.assert_close(torch.stack(sent, 1), expect)


def test_critic_warmup_trains_only_the_critic_first():
    """With ppo.critic_warmup_iters=2 the first two updates leave the policy and the noise net
    exactly as they were and move the critic; the third moves the policy."""
    torch.manual_seed(0)
    pol = reach_policy()
    smp = build_sampler("flow_noise", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_noise", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo"), [
        "train_mode=full", "ppo.critic_warmup_iters=2", "ppo.lr_policy=0.01",
        "ppo.lr_noise=0.01", "ppo.entropy_coef=0.01"])
    tr = RLTrainer(pol, smp, ReachEnv(32, max_episode_steps=2), cfg, seed=0)
    critic = set(pol.critic_parameter_names())

    def snap():
        actor = {n: p.detach().clone() for n, p in pol.named_parameters() if n not in critic}
        actor.update({f"noise.{n}": p.detach().clone() for n, p in smp.named_parameters()})
        return actor, {n: p.detach().clone() for n, p in pol.named_parameters() if n in critic}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    a0, c0 = snap()
    for _ in range(2):
        tr.iteration()
    a1, c1 = snap()
    assert same(a0, a1) and not same(c0, c1)
    tr.iteration()
    a2, _ = snap()
    assert not same(a1, a2)


def test_lr_prefix_gives_the_prefix_its_own_learning_rate():
    """train_mode=full with ppo.lr_prefix: the prefix parameters (and only they) form the
    "prefix" group, and Adam's first step moves each of them by at most lr_prefix (its first
    step is lr * g / (|g| + eps) per element), the expert's by up to lr_policy."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo"), [
        "train_mode=full", "ppo.lr_policy=1e-2", "ppo.lr_prefix=1e-4", "ppo.update_epochs=1",
        "ppo.num_minibatches=1", "ppo.lr_schedule=constant"])
    tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=2), cfg, seed=0)
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    prefix = set(pol.prefix_parameter_names())
    by_id = {id(p): n for n, p in pol.named_parameters()}
    assert {by_id[id(p)] for p in groups["prefix"]["params"]} == prefix
    assert not prefix & {by_id[id(p)] for p in groups["policy"]["params"]}
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    tr.iteration()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in pol.named_parameters()}
    assert max(moved[n] for n in prefix) <= 1e-4 * (1 + 1e-3)
    assert max(moved[n] for n in prefix) > 0.5e-4
    expert = [n for n in moved if n.startswith("expert_blocks.")]
    assert max(moved[n] for n in expert) > 0.5e-2


def test_train_fits_the_normaliser_on_the_demos(tmp_path):
    """model.kwargs.normalization=mean_std: pirl train sets the policy's stats from the SFT
    samples (float64 reference over the valid demo steps) and the SFT checkpoint keeps them."""
    from pirl.runners import train as train_mod
    from pirl.runners.checkpoint import load_checkpoint

    cfg = apply_overrides(_tiny_run_cfg(tmp_path, "n", iterations=0),
                          ["model.kwargs.normalization=mean_std"])
    train_mod.run(cfg)
    sd = load_checkpoint(tmp_path / "n" / "checkpoints" / "sft.pt")["policy"]
    data = train_mod.load_sft_data(cfg, tmp_path / "n" / "demos", horizon=8)
    acts = data.actions.double()[data.mask.bool()]
    torch.testing.assert_close(sd["normalizer.actions_mean"].double(), acts.mean(0), atol=1e-5, rtol=1e-5)
    std = acts.std(0, unbiased=False)
    torch.testing.assert_close(sd["normalizer.actions_std"].double(), torch.where(std < 1e-3, 1.0, std),
                               atol=1e-5, rtol=1e-5)
    state = data.obs["state"].double()
    torch.testing.assert_close(sd["normalizer.state_mean"].double(), state.mean(0), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("truncation", ["bootstrap", "terminal"])
def test_time_limit_truncation_in_gae(monkeypatch, truncation):
    """``ppo.truncation``: the last chunk of an episode that ran into the time limit has return
    ``r + gamma * V(final obs)`` with "bootstrap" and exactly ``r`` (advantage ``r - V``) with
    "terminal"; a success (terminated) ends the return in both."""
    import pirl.runners.rl as rl_mod

    seen = {}
    real_gae = rl_mod.gae

    def spy(rewards, values, next_values, terminated, truncated, **kw):
        out = real_gae(rewards, values, next_values, terminated, truncated, **kw)
        seen.update(rewards=rewards, values=values, next_values=next_values, ret=out[1])
        return out

    monkeypatch.setattr(rl_mod, "gae", spy)
    torch.manual_seed(0)
    pol = reach_policy()
    with torch.no_grad():  # a critic far from 0, so that the two modes really differ
        pol.value_mlp[-1].bias.fill_(0.5)
    smp = build_sampler("flow_noise", 3, pol.feature_dim, pol.action_dim, config=SamplerConfig())
    cfg = apply_overrides(RLConfig(algo="ppo"), ["action_chunk=2", "ppo.gamma=0.9",
                                                 f"ppo.truncation={truncation}"])
    tr = RLTrainer(pol, smp, ReachEnv(64, max_episode_steps=4, radius=0.2), cfg, seed=0)
    ro = tr.rollout()
    tr.learn(ro)
    last = ro.truncated[-1]  # episodes that timed out in the final chunk
    assert 0 < int(last.sum()) < 64 and bool(ro.terminated.any())
    r, v, nv, ret = (seen[k][-1] for k in ("rewards", "values", "next_values", "ret"))
    want = r[last] + (0.9 * nv[last] if truncation == "bootstrap" else 0.0)
    torch.testing.assert_close(ret[last], want.to(ret.dtype))
    succ = ro.terminated[-1]
    torch.testing.assert_close(ret[succ], r[succ].to(ret.dtype))
    assert bool((nv[last] > 0.1).all())


def test_truncation_is_checked():
    with pytest.raises(ValueError, match="truncation"):
        apply_overrides(RLConfig(), ["ppo.truncation=drop"])


def test_sft_freeze_keeps_the_named_parameters_and_gives_them_back_to_rl(tmp_path):
    """sft.freeze=[prefix]: after SFT every prefix parameter equals its initial value and the
    expert's have moved; afterwards every parameter's requires_grad is what it was before (a
    parameter the model itself froze stays frozen); an entry that names no parameter is an
    error naming the field."""
    from pirl.config.loading import ConfigError
    from pirl.runners import train as train_mod

    init = train_mod.Run(_tiny_run_cfg(tmp_path, "i", iterations=0, extra=["sft.steps=0"]),
                         tmp_path / "i")
    # (no grounding pretraining here: it trains the prefix before SFT)
    r = train_mod.Run(_tiny_run_cfg(tmp_path, "f", iterations=0,
                                    extra=["sft.freeze=[prefix]", "pretrain.steps=0"]),
                      tmp_path / "f")
    r.policy.text_embed.weight.requires_grad_(False)  # frozen by the model, not by sft.freeze
    flags = {n: p.requires_grad for n, p in r.policy.named_parameters()}
    r.sft()
    before = dict(init.policy.named_parameters())
    prefix = set(r.policy.prefix_parameter_names())
    assert prefix
    moved = {n: not torch.equal(p, before[n]) for n, p in r.policy.named_parameters()}
    assert not any(moved[n] for n in prefix)
    assert any(moved[n] for n in moved if n.startswith("expert_blocks"))
    assert {n: p.requires_grad for n, p in r.policy.named_parameters()} == flags
    assert not flags["text_embed.weight"] and sum(flags.values()) == len(flags) - 1
    bad = train_mod.Run(_tiny_run_cfg(tmp_path, "b", iterations=0,
                                      extra=["sft.freeze=[no_such_module]"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="sft.freeze"):
        bad.sft()


def test_pretrain_stage_runs_before_sft_and_needs_the_tabletop(tmp_path):
    """pretrain.steps > 0: the run's SFT stage first pretrains the prefix (its loss is logged
    under pretrain/), then fine-tunes; grounding pretraining on another env is an error naming
    the field."""
    import json

    from pirl.config.loading import ConfigError
    from pirl.runners import train as train_mod

    cfg = _tiny_run_cfg(tmp_path, "p", iterations=0,
                        extra=["pretrain.steps=4", "pretrain.num_envs=4",
                               "pretrain.warmup_steps=1"])
    r = train_mod.Run(cfg, tmp_path / "p")
    r.sft()
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert any("pretrain/loss" in row for row in rows)
    assert any("sft/loss" in row for row in rows)
    r.cfg.env.name = "maniskill/PushCube-v1"
    with pytest.raises(ConfigError, match="pretrain.steps"):
        r.pretrain()
    # on by default: a config for another env or model without pretrain.steps=0 is refused when
    # it is built (not after its demos); a loaded model.checkpoint skips the stage
    for ov in (["env.name=maniskill/PushCube-v1"], ["model.name=pi0"]):
        with pytest.raises(ConfigError, match="pretrain.steps=0"):
            apply_overrides(TrainConfig(), ov)
        assert apply_overrides(TrainConfig(), ov + ["pretrain.steps=0"]).pretrain.steps == 0
        assert apply_overrides(TrainConfig(), ov + ["model.checkpoint=x.pt"]).pretrain.steps > 0


@pytest.mark.parametrize("kind", ["flow_sde", "flow_noise"])
def test_noise_schedule_scales_the_rollout_std_and_keeps_ratios_exact(kind):
    """``rl.noise_schedule``: before each rollout the sampler's ``noise_scale`` is set to the
    schedule's factor (1 at the first iteration, ``noise_final`` at the end, the lr schedule's
    shape), every stochastic std of that rollout is the unscaled one times it, and the rollout's
    log-probs equal the recomputed ones under the same scale (PPO's ratio starts at 1)."""
    from pirl.algos.ppo import lr_scale

    pol = reach_policy()
    scfg = SamplerConfig(kind=kind, num_steps=3, hybrid=False)
    smp = build_sampler(kind, 3, pol.feature_dim, pol.action_dim, config=scfg)
    cfg = apply_overrides(RLConfig(), ["iterations=4", "noise_schedule=linear",
                                       "noise_final=0.2", "ppo.update_epochs=1"])
    tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=4), cfg, seed=0)
    scales = []
    for it in range(3):
        ro = tr.rollout()
        want = lr_scale("linear", it, 4, min_ratio=0.2)   # 1.0, 0.8, 0.6
        assert smp.noise_scale == pytest.approx(want)
        scales.append(smp.noise_scale)
        for t, obs in enumerate(ro.obs):
            prefix = pol.encode_prefix(obs)
            new = smp.log_prob(pol, prefix, ro.chains[t])
            torch.testing.assert_close(new.logp, ro.chains[t].logp, atol=1e-5, rtol=0)
            smp.noise_scale = 1.0
            unscaled = smp.log_prob(pol, prefix, ro.chains[t])
            smp.noise_scale = want
            m = ro.chains[t].stochastic
            torch.testing.assert_close(ro.chains[t].std[m], unscaled.std[m] * want)
        m = tr.learn(ro)
        assert m["rollout/noise_scale"] == pytest.approx(want)
    assert scales == pytest.approx([1.0, 0.8, 0.6])


def test_noise_schedule_is_checked():
    with pytest.raises(ValueError, match="rl.noise_final"):
        RLConfig(noise_schedule="cosine", noise_final=0.0)
    with pytest.raises(ValueError, match="rl.noise_schedule"):
        RLConfig(noise_schedule="exp")
    # the Ray placements run the schedule too (tests/runners/distributed/test_parity.py)
    cfg = apply_overrides(TrainConfig(), ["rl.noise_schedule=cosine", "rl.noise_final=0.3",
                                          "placement.mode=colocated"])
    assert cfg.rl.noise_schedule == "cosine"


def test_noise_schedule_also_scales_grpo_kl_reference():
    """With GRPO's KL penalty the frozen reference sampler follows the schedule too, so that
    right after the first rollout (policy == reference) the reference's log-probs of the
    rollout's chains equal the rollout's own."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3, hybrid=False))
    cfg = apply_overrides(RLConfig(algo="grpo"), [
        "iterations=4", "noise_schedule=linear", "noise_final=0.2", "grpo.group_size=4",
        "grpo.kl_coef=0.1", "train_mode=full"])
    tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=4), cfg, seed=0)
    tr.iter = 2  # scale 0.6
    ro = tr.rollout()
    ref_pol, ref_smp = tr.ref
    assert ref_smp.noise_scale == pytest.approx(0.6)
    new = ref_smp.log_prob(ref_pol, ref_pol.encode_prefix(ro.obs[0]), ro.chains[0])
    torch.testing.assert_close(new.logp, ro.chains[0].logp, atol=1e-5, rtol=0)


def test_time_aware_critic_reads_the_time_left_of_each_chunk_step():
    """With ``critic_time`` the rollout stores ``time_left = 1 - t / T`` with the observations of
    chunk step t, the rollout's values are the critic's at that time (recomputed here), the
    bootstrap value after the last step reads time 0, and the critic's output depends on it."""
    pol = reach_policy(None, critic_time=True)
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    env = ChunkedEnv(ReachEnv(8, max_episode_steps=8, radius=0.01))  # (rarely solved)
    ro = collect(pol, smp, env, num_chunks=4, reset_kwargs={"seed": 0}, action_chunk=2,
                 generator=torch.Generator().manual_seed(0))
    assert len(ro.obs) == 4
    for t, obs in enumerate(ro.obs):
        torch.testing.assert_close(obs["time_left"], torch.full((8,), 1.0 - t / 4))
        with torch.no_grad():
            torch.testing.assert_close(pol.value(pol.encode_prefix(obs)), ro.values[t])
    with torch.no_grad():
        prefix = pol.encode_prefix(ro.obs[3])
        later = pol.encode_prefix(dict(ro.obs[3], time_left=torch.zeros(8)))
        assert not torch.allclose(pol.value(prefix), pol.value(later))
        # the frozen cache keeps the time; without one the critic refuses to guess
        torch.testing.assert_close(pol.value(pol.thaw_prefix(pol.frozen_prefix(prefix))),
                                   pol.value(prefix))
        obs = {k: v for k, v in ro.obs[3].items() if k != "time_left"}
        with pytest.raises(ValueError, match="time_left"):
            pol.value(pol.encode_prefix(obs))
    # the actor never reads it
    x = torch.randn(8, 2, 2)
    t1 = torch.full((8,), 0.5)
    torch.testing.assert_close(pol.velocity(prefix, x, t1).velocity,
                               pol.velocity(later, x, t1).velocity)


def test_time_aware_critic_bootstraps_at_time_zero(monkeypatch):
    """The value after the last chunk step (``next_values[-1]``) is the critic's at the final
    observation with ``time_left = 0``."""
    pol = reach_policy(None, critic_time=True)
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    seen = []
    orig = type(pol).encode_prefix

    def spy(self, obs):
        seen.append(obs.get("time_left"))
        return orig(self, obs)

    monkeypatch.setattr(type(pol), "encode_prefix", spy)
    env = ChunkedEnv(ReachEnv(8, max_episode_steps=6, radius=0.01))
    ro = collect(pol, smp, env, num_chunks=3, reset_kwargs={"seed": 0}, action_chunk=2,
                 generator=torch.Generator().manual_seed(0))
    assert len(ro.obs) == 3 and len(seen) == 4
    torch.testing.assert_close(seen[-1], torch.zeros(8))


def test_time_aware_critic_loads_an_sft_checkpoint_without_it(tmp_path):
    """An SFT checkpoint of a model without ``critic_time`` loads into one with it (the new
    critic weight keeps its initialisation, and the run says so); any other missing key is
    still an error."""
    from pirl.runners import train as train_mod
    from pirl.runners.checkpoint import CheckpointError, load_checkpoint, load_module_state

    train_mod.run(_tiny_run_cfg(tmp_path, "sft", iterations=0))
    ckpt = tmp_path / "sft" / "checkpoints" / "sft.pt"
    kw = "model.kwargs={width: 32, depth: 1, heads: 2, conv_channels: [8, 16], value_hidden: 32, critic_time: true}"
    cfg = _tiny_run_cfg(tmp_path, "rl", iterations=1,
                        extra=[kw, f"model.checkpoint={ckpt}", "pretrain.steps=0", "sft.steps=0",
                               "rl.ppo.truncation=terminal"])
    res = train_mod.run(cfg)
    assert "final" in res
    sd = load_checkpoint(ckpt)["policy"]
    rl_sd = load_checkpoint(tmp_path / "rl" / "checkpoints" / "last.pt")["policy"]
    assert "value_time.weight" in rl_sd and "value_time.weight" not in sd
    # the prefix came from the checkpoint (and stays frozen in RL)
    prefix = train_mod.make_policy(cfg, train_mod.make_train_env(cfg)).prefix_parameter_names()
    assert prefix and all(torch.equal(rl_sd[k], sd[k]) for k in prefix)
    pol = reach_policy(None, critic_time=True)
    part = {k: v for k, v in pol.state_dict().items() if k != "action_out.weight"}
    with pytest.raises(CheckpointError, match="action_out.weight"):
        load_module_state(pol, part, "policy", allow_missing=pol.critic_parameter_names())


def test_pretrain_relative_adds_the_offset_target(tmp_path):
    """pretrain.relative > 0: the run's pretraining regresses a fourth point (the object's
    offset from the gripper, squashed), whose error is logged as pretrain/error_3; without it
    there are three; a negative value is an error naming the field."""
    import json

    from pirl.config.loading import ConfigError
    from pirl.runners import train as train_mod

    for rel, want in ((0.0, False), (4.0, True)):
        name = f"r{int(rel)}"
        cfg = _tiny_run_cfg(tmp_path, name, iterations=0,
                            extra=["pretrain.steps=2", "pretrain.num_envs=4",
                                   "pretrain.warmup_steps=1", f"pretrain.relative={rel}",
                                   "sft.steps=0"])
        train_mod.Run(cfg, tmp_path / name).sft()
        rows = [json.loads(x) for x in
                (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        pre = [row for row in rows if "pretrain/loss" in row]
        assert pre and all(("pretrain/error_3" in row) == want for row in pre)
        assert all("pretrain/error_2" in row for row in pre)
    with pytest.raises(ConfigError, match="pretrain.relative"):
        apply_overrides(TrainConfig(), ["pretrain.relative=-1"])


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_several_rollouts_per_update(algo, monkeypatch):
    """With rl.rollouts_per_update=2 an iteration collects two rollouts with different episode
    seeds and makes one update on all their valid chunk steps, whose advantages are each
    rollout's own (PPO: Monte-Carlo return minus value, gamma = lambda = 1; GRPO: return minus
    the group mean over the rollout's groups, written out here), PPO's normalised over both."""
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3, hybrid=False))
    over = ["rollouts_per_update=2", "train_mode=full"]
    over += (["ppo.gamma=1.0", "ppo.gae_lambda=1.0", "ppo.truncation=terminal"]
             if algo == "ppo" else ["grpo.group_size=4", "grpo.normalize_std=false"])
    cfg = apply_overrides(RLConfig(algo=algo), over)
    tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=4, radius=0.3), cfg, seed=0)
    tr.action_chunk = 1  # one executed step per chunk: episodes of 1-4 chunk steps
    tr.num_chunks = 4
    tr.action_mask[1:] = 0.0
    seen: dict = {"ro": [], "groups": [], "kwargs": []}
    orig_rollout, orig_begin = tr.rollout, tr.begin_rollout

    def begin(round_=0):
        kw = orig_begin(round_)
        seen["kwargs"].append(kw)
        if algo == "grpo":
            seen["groups"].append(tr._groups.clone())
        return kw

    def rollout(round_=0):
        ro = orig_rollout(round_)
        seen["ro"].append(ro)
        return ro

    def update(obs, chain, old_logp, adv, ret, old_values, frozen=None, sil=None):
        seen.update(obs=obs, adv=adv)
        return {}

    monkeypatch.setattr(tr, "begin_rollout", begin)
    monkeypatch.setattr(tr, "rollout", rollout)
    monkeypatch.setattr(tr, "update", update)
    m = tr.iteration()
    ros = seen["ro"]
    assert len(ros) == 2 and tr.iter == 1
    s0, s1 = (kw["episode_seeds"] for kw in seen["kwargs"])
    assert not set(s0.tolist()) & set(s1.tolist())  # fresh episodes in the second rollout
    raw, states = [], []
    for r, ro in enumerate(ros):
        T, N = ro.valid.shape
        for t in range(T):
            for i in range(N):
                if not ro.valid[t, i]:
                    continue
                states.append(ro.obs[t]["state"][i])
                if algo == "ppo":
                    future = sum(float(ro.rewards[u, i]) for u in range(t, T)
                                 if ro.valid[u, i])
                    raw.append(future - float(ro.values[t, i]))
                else:
                    g = seen["groups"][r]
                    ret = ro.episode_return
                    raw.append(float(ret[i] - ret[g == g[i]].mean()))
    raw = torch.tensor(raw)
    assert seen["adv"].shape == raw.shape
    torch.testing.assert_close(seen["obs"]["state"], torch.stack(states))
    # PPO normalises the advantages over both rollouts' rows; GRPO's are per group already
    want = (raw - raw.mean()) / (raw.std() + 1e-8) if algo == "ppo" else raw
    torch.testing.assert_close(seen["adv"], want, atol=1e-5, rtol=1e-5)
    assert raw.std() > 0  # not vacuous: the rows carry different advantages
    assert m["env_steps"] == sum(ro.env_steps for ro in ros)
    assert m["rollout/success"] == pytest.approx(
        float(torch.cat([ro.episode_success for ro in ros]).float().mean()))


def test_rollouts_per_update_is_checked():
    with pytest.raises(ValueError, match="rl.rollouts_per_update"):
        apply_overrides(TrainConfig(), ["rl.rollouts_per_update=0"])
    with pytest.raises(ValueError, match="rl.rollouts_per_update"):
        apply_overrides(TrainConfig(), ["rl.rollouts_per_update=2",
                                        "placement.mode=colocated"])


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rollouts_start_from_the_chosen_fixed_init_states(algo):
    """rl.init_states on an env with F fixed initial states (init = episode seed % F): every
    rollout seed lands on one of the chosen states, seeds that were equal stay equal (GRPO's
    groups share their start), the chosen states are all used, and the rest of each seed is kept
    (seed // F)."""
    F = 50
    states = [0, 3, 7]
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3, hybrid=False))
    over = [f"init_states={states}"] + (["grpo.group_size=4"] if algo == "grpo" else [])
    cfg = apply_overrides(RLConfig(algo=algo), over)
    env = ReachEnv(16, max_episode_steps=2)
    env.fixed_init_states = F
    tr = RLTrainer(pol, smp, env, cfg, seed=0)
    free = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=2),
                     apply_overrides(RLConfig(algo=algo),
                                     ["grpo.group_size=4"] if algo == "grpo" else []), seed=0)
    seen = set()
    for it in range(4):
        tr.iter = free.iter = it
        got = tr._reset_kwargs()["episode_seeds"]
        raw = free._reset_kwargs()["episode_seeds"]
        assert set((got % F).tolist()) <= set(states)
        torch.testing.assert_close(got // F, raw // F)
        for i in range(len(raw)):
            for j in range(len(raw)):
                if raw[i] == raw[j]:
                    assert got[i] == got[j]
        seen |= set((got % F).tolist())
    assert seen == set(states)


def test_init_states_are_checked():
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3, hybrid=False))
    with pytest.raises(ValueError, match="no fixed initial states"):
        RLTrainer(pol, smp, ReachEnv(4), apply_overrides(RLConfig(), ["init_states=[0,1]"]), seed=0)
    env = ReachEnv(4)
    env.fixed_init_states = 50
    with pytest.raises(ValueError, match=r"\[50\] out of range"):
        RLTrainer(pol, smp, env, apply_overrides(RLConfig(), ["init_states=[0,50]"]), seed=0)
    from pirl.config.loading import ConfigError

    with pytest.raises(ConfigError, match="rl.init_states"):
        apply_overrides(TrainConfig(), ["rl.init_states=[]"])
