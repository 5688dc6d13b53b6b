"""The RL trainer's imitation terms: self-imitation (from the rollout and from the success
buffer, hindsight-relabelled failures, separate self-imitation steps) and the demo loss, each
against the flow-matching loss computed directly from the policy."""

import numpy as np
import pytest
import torch

from pirl.config.loading import apply_overrides
from pirl.config.schema import RLConfig, TrainConfig
from pirl.flow import SamplerConfig, build_sampler
from pirl.runners.rl import RLTrainer
from tests.runners.reach_env import ReachEnv, reach_policy


def test_self_imitation_term_is_the_flow_matching_loss_on_successful_chunks():
    """With ``sil_coef`` the minibatch loss gains ``sil_coef * FM`` where FM is the flow-matching
    loss on the executed elements of the rows whose episode succeeded (computed here directly
    from the policy's velocity), and rows of failed episodes do not reach it."""
    from pirl.runners.rollout import cat_chains, stack_obs
    from pirl.models.base import index_batch

    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo", action_chunk=1), ["ppo.sil_coef=0.7"])
    tr = RLTrainer(pol, smp, ReachEnv(32, max_episode_steps=2, radius=0.45), cfg, seed=0)
    ro = tr.rollout()
    valid = ro.valid.reshape(-1)
    idx = valid.nonzero().squeeze(1)
    obs = index_batch(stack_obs(ro.obs), idx)
    chain = cat_chains(ro.chains).index(idx)
    w = ro.episode_success[None, :].expand_as(ro.valid).reshape(-1)[idx].float()
    assert 0 < float(w.sum()) < w.numel()  # both kinds of rows are present
    m = idx.numel()
    old = tr._aggregate(chain)
    zeros = torch.zeros(m)
    sil = tr._sil_inputs(chain, w, "cpu")
    prefix = pol.encode_prefix(obs)
    with_sil, s = tr.minibatch_loss(obs, chain, old, zeros, zeros, zeros, None, sil)
    without, _ = tr.minibatch_loss(obs, chain, old, zeros, zeros, zeros, None, None)
    # the reference: || v(x_t, t) - (eps - a) ||^2 over successful rows, executed step 0 only
    a, eps, t = chain.actions, sil["noise"], sil["time"]
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    err = (pol.velocity(prefix, x_t, t).velocity - (eps - a)).pow(2)[:, :1, :]  # [M, 1, A]
    rows = w.bool()
    ref = err[rows].mean()
    torch.testing.assert_close(with_sil - without, 0.7 * ref, atol=1e-6, rtol=1e-5)
    assert s["sil/loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    # failed rows' actions do not reach the term
    a2 = chain.actions.clone()
    a2[~rows] += 5.0
    sil2 = dict(sil, actions=a2)
    with_sil2, _ = tr.minibatch_loss(obs, chain, old, zeros, zeros, zeros, None, sil2)
    torch.testing.assert_close(with_sil2, with_sil)
    with pytest.raises(ValueError, match="sil_coef"):
        apply_overrides(RLConfig(), ["ppo.sil_coef=-1"])

def test_self_imitation_from_the_success_buffer():
    """With ``rl.sil_buffer_per_task`` the rollout's successful episodes enter the buffer
    (newest per task), and the self-imitation term is ``sil_coef * FM`` on rows drawn from it
    (their own observations, executed elements only), whatever the minibatch's own rows."""
    from pirl.runners.rollout import cat_chains, stack_obs
    from pirl.models.base import index_batch

    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo", action_chunk=1),
                          ["ppo.sil_coef=0.7", "sil_buffer_per_task=3", "sil_batch_size=8"])
    tr = RLTrainer(pol, smp, ReachEnv(32, max_episode_steps=2, radius=0.45), cfg, seed=0)
    ro = tr.rollout()
    p = tr._prepare(ro)
    n_ok = int(ro.episode_success.sum())
    assert 3 < n_ok < 32 and p["sil_w"] is None
    assert tr.successes.episodes_per_task().tolist() == [3]  # the newest 3 of one task
    # the kept episodes are the last three successful envs, with their valid rows
    last = ro.episode_success.nonzero().reshape(-1)[-3:].tolist()
    all_obs, chain = stack_obs(ro.obs), cat_chains(ro.chains)
    for (o, a), env in zip(tr.successes.episodes[0], last):
        rows = ro.valid[:, env].nonzero().reshape(-1) * 32 + env
        torch.testing.assert_close(o["state"], all_obs["state"][rows])
        torch.testing.assert_close(a, chain.actions[rows])
    sil = tr._sil_buffer_inputs("cpu")
    assert sil["actions"].shape == (8, 2, 2)
    idx = ro.valid.reshape(-1).nonzero().squeeze(1)
    obs, ch = index_batch(all_obs, idx), chain.index(idx)
    old, zeros = tr._aggregate(ch), torch.zeros(idx.numel())
    with_sil, s = tr.minibatch_loss(obs, ch, old, zeros, zeros, zeros, None, sil)
    without, _ = tr.minibatch_loss(obs, ch, old, zeros, zeros, zeros, None, None)
    a, eps, t = sil["actions"], sil["noise"], sil["time"]
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    v = pol.velocity(pol.encode_prefix(sil["obs"]), x_t, t).velocity
    ref = (v - (eps - a)).pow(2)[:, :1, :].mean()  # executed step 0 only
    torch.testing.assert_close(with_sil - without, 0.7 * ref, atol=1e-6, rtol=1e-5)
    assert s["sil/loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    m = tr.iteration()
    assert m["sil/buffer_episodes"] == 3 and m["sil/buffer_tasks"] == 1 and "sil/loss" in m
    with pytest.raises(ValueError, match="sil_coef > 0"):
        RLTrainer(pol, smp, ReachEnv(4), apply_overrides(RLConfig(), ["sil_buffer_per_task=2"]),
                  seed=0)
    with pytest.raises(ValueError, match="sil_buffer_per_task"):
        apply_overrides(RLConfig(), ["sil_buffer_per_task=-1"])
    # rl.sil_buffer_keep reaches the buffer; an unknown rule is a config error
    kept = RLTrainer(pol, smp, ReachEnv(4), apply_overrides(
        RLConfig(), ["ppo.sil_coef=0.7", "sil_buffer_per_task=2", "sil_buffer_keep=shortest"]),
        seed=0)
    assert kept.successes.keep == "shortest" and tr.successes.keep == "newest"
    with pytest.raises(ValueError, match="sil_buffer_keep"):
        apply_overrides(RLConfig(), ["sil_buffer_keep=longest"])


def _one_step_trainer(kind, overrides, env):
    """``(policy, sampler, RLTrainer)``: the tiny reach policy, a 3-step ``kind`` sampler and
    PPO executing one action per chunk, with ``overrides`` of the RL config."""
    pol = reach_policy()
    smp = build_sampler(kind, 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind=kind, num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo", action_chunk=1), overrides)
    return pol, smp, RLTrainer(pol, smp, env, cfg, seed=0)


class _HindsightReach(ReachEnv):
    """ReachEnv whose failed episodes relabel to the point of their last action: the episode
    ends at the first action within ``radius`` of it.  It records the actions every env
    executed and the hindsight calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.executed, self.calls = [], []

    def step(self, action):
        self.executed.append(action.clone())
        return super().step(action)

    def hindsight_episode(self, task_index, seed, actions, action_chunk):
        self.calls.append((task_index, seed, actions.copy(), action_chunk))
        goal = actions[-1]
        first = int(np.nonzero(np.linalg.norm(actions - goal, axis=1) < self.radius)[0][0])
        return np.repeat(goal[None].astype(np.float32), first // action_chunk + 1, axis=0)


def test_hindsight_relabelled_failures_enter_the_buffer():
    """``rl.sil_hindsight``: every failed episode goes to the env's ``hindsight_episode`` with
    its task, episode seed and the env actions it executed; what comes back enters the success
    buffer as states + the episode's first action chunks, before the rollout's real successes;
    an env without relabelling and a run without the buffer are errors."""
    env = _HindsightReach(32, max_episode_steps=2, radius=0.45)
    pol, smp, tr = _one_step_trainer("flow_sde", ["ppo.sil_coef=0.7", "sil_buffer_per_task=64",
                                                  "sil_batch_size=8", "sil_hindsight=true"], env)
    ro = tr.rollout()
    p = tr._prepare(ro)
    failed = (~ro.episode_success).nonzero().reshape(-1).tolist()
    n_ok = 32 - len(failed)
    assert 3 < len(failed) < 32 and p["hindsight"] == len(env.calls) == len(failed)
    from pirl.runners.rollout import cat_chains, stack_obs

    executed = torch.stack(env.executed)  # [steps, N, 2]
    all_obs, chain = stack_obs(ro.obs), cat_chains(ro.chains)
    eps = tr.successes.episodes[0]
    assert len(eps) == len(failed) + n_ok
    for (task, seed, acts, chunk), i, (o, a) in zip(env.calls, failed, eps):
        rows = ro.valid[:, i].nonzero().reshape(-1)
        assert task == 0 and chunk == 1 and seed == int(tr._ep_seeds[i])
        np.testing.assert_allclose(acts, executed[rows, i].double().numpy(), rtol=0, atol=1e-6)
        k = o["state"].shape[0]
        assert torch.equal(o["state"], torch.from_numpy(acts[-1]).float().expand(k, 2))
        torch.testing.assert_close(a, chain.actions[rows[:k] * 32 + i])
        assert o["instruction"] == [all_obs["instruction"][r] for r in (rows[:k] * 32 + i)]
    m = tr.iteration()
    assert m["sil/hindsight_added"] > 0
    with pytest.raises(ValueError, match="hindsight"):
        RLTrainer(pol, smp, ReachEnv(4), tr.cfg, seed=0)
    with pytest.raises(ValueError, match="sil_hindsight"):
        apply_overrides(RLConfig(), ["sil_hindsight=true"])


def test_success_buffer_resumes_exactly():
    """A trainer restored from a checkpointed state (policy, sampler, trainer with a non-empty
    success buffer, through torch.save) takes the same next iteration as one that ran on."""
    import io

    def make():
        pol = reach_policy()
        smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                            config=SamplerConfig(kind="flow_sde", num_steps=3))
        cfg = apply_overrides(RLConfig(algo="ppo", action_chunk=1, iterations=3),
                              ["ppo.sil_coef=0.7", "sil_buffer_per_task=2", "sil_batch_size=8",
                               "ppo.num_minibatches=2", "ppo.update_epochs=1", "sil_steps=2"])
        return pol, smp, RLTrainer(pol, smp, ReachEnv(32, max_episode_steps=2, radius=0.45),
                                   cfg, seed=0)

    pol_a, _, a = make()
    a.iteration()
    f = io.BytesIO()
    torch.save({"policy": pol_a.state_dict(), "trainer": a.state_dict()}, f)
    assert len(a.successes) > 0
    m_a = a.iteration()
    pol_b, _, b = make()
    f.seek(0)
    ck = torch.load(f, weights_only=False)
    pol_b.load_state_dict(ck["policy"])
    b.load_state_dict(ck["trainer"])
    m_b = b.iteration()
    assert m_a["sil/loss"] == m_b["sil/loss"] and m_a["sil/step_loss"] == m_b["sil/step_loss"]
    for (k, va), vb in zip(pol_a.state_dict().items(), pol_b.state_dict().values()):
        assert torch.equal(va, vb), k
    sd = a.state_dict()
    sd["successes"] = None
    with pytest.raises(ValueError, match="sil_buffer_per_task"):
        make()[2].load_state_dict(sd)
    sd = a.state_dict()
    sd["sil_optimizer"] = None
    with pytest.raises(ValueError, match="sil_steps"):
        make()[2].load_state_dict(sd)


def test_self_imitation_steps_fit_the_buffer_and_leave_critic_and_noise():
    """``rl.sil_steps`` supervised steps on the success buffer lower the flow-matching loss of
    its episodes (measured on fixed noise / times) and change neither the critic nor the
    sampler's noise net; they need the buffer."""
    from pirl.models.base import flow_matching_loss

    pol, smp, tr = _one_step_trainer(
        "flow_noise", ["sil_buffer_per_task=4", "sil_batch_size=16", "sil_steps=60",
                       "sil_lr=3e-3"], ReachEnv(32, max_episode_steps=2, radius=0.45))
    assert tr.self_imitation_steps() == {}  # empty buffer: nothing to fit
    tr._prepare(tr.rollout())
    assert len(tr.successes) >= 2
    o = {k: torch.cat([ep[0][k] for ep in tr.successes.episodes[0]]) if k == "state"
         else sum((ep[0][k] for ep in tr.successes.episodes[0]), []) for k in ("state", "instruction")}
    a = torch.cat([ep[1] for ep in tr.successes.episodes[0]])
    g = torch.Generator().manual_seed(9)
    eps, t = torch.randn(a.shape, generator=g), torch.rand(a.shape[0], generator=g)
    mask = tr.action_mask[None].expand_as(a)

    def buffer_loss():
        with torch.no_grad():
            return float(flow_matching_loss(pol, pol.encode_prefix(o), a, noise=eps, time=t,
                                            mask=mask))

    critic = {n: p.clone() for n, p in pol.named_parameters()
              if n in set(pol.critic_parameter_names())}
    noise = [p.clone() for p in smp.parameters()]
    before = buffer_loss()
    m = tr.self_imitation_steps()
    assert buffer_loss() < 0.5 * before and m["sil/step_loss"] > 0
    for n, p in pol.named_parameters():
        if n in critic:
            assert torch.equal(p, critic[n]), n
    assert noise and all(torch.equal(p, q) for p, q in zip(smp.parameters(), noise))
    # with sil_coef 0 the buffer is read by the steps only: no term in the policy minibatches
    m = tr.iteration()
    assert "sil/step_loss" in m and "sil/loss" not in m
    with pytest.raises(ValueError, match="sil_steps"):
        apply_overrides(RLConfig(), ["sil_steps=3"])


def _reach_demos(m=24, seed=0):
    """Demo rows for the tiny reach policy: obs dict, action chunks ``[m, 2, 2]`` and a mask
    ``[m, 2]`` whose second step is padding in a third of the rows."""
    from pirl.algos.sft import SFTData

    g = torch.Generator().manual_seed(seed)
    state = torch.rand(m, 2, generator=g) * 2 - 1
    actions = state[:, None, :].expand(m, 2, 2).clone() * 0.5
    mask = torch.ones(m, 2)
    mask[::3, 1] = 0.0
    return SFTData(obs={"state": state, "instruction": ["reach the point"] * m},
                   actions=actions, mask=mask)


def _demo_loss_case(pol, demos):
    """A PPO trainer with ``bc_coef=0.3`` on ``demos``, one rollout, and the minibatch loss of
    its valid rows with and without a demo minibatch.  Returns ``(bc inputs, the demo rows
    drawn, loss with - loss without, the stats with)``."""
    from pirl.runners.rollout import cat_chains, stack_obs
    from pirl.models.base import index_batch

    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="ppo"), ["bc_coef=0.3", "bc_batch_size=16"])
    tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=2, radius=0.45), cfg, seed=0,
                   demos=demos)
    ro = tr.rollout()
    idx = ro.valid.reshape(-1).nonzero().squeeze(1)
    obs = index_batch(stack_obs(ro.obs), idx)
    chain = cat_chains(ro.chains).index(idx)
    old = tr._aggregate(chain)
    zeros = torch.zeros(idx.numel())
    g0 = tr.update_gen.get_state()
    rows = torch.randint(0, len(demos), (16,), generator=tr.update_gen)  # _bc_inputs' draw
    tr.update_gen.set_state(g0)
    bc = tr._bc_inputs("cpu")
    # the rows are drawn from the update generator: the same state gives the same rows
    tr.update_gen.set_state(g0)
    torch.testing.assert_close(tr._bc_inputs("cpu")["noise"], bc["noise"])
    with_bc, s = tr.minibatch_loss(obs, chain, old, zeros, zeros, zeros, None, None, bc)
    without, _ = tr.minibatch_loss(obs, chain, old, zeros, zeros, zeros, None, None, None)
    return bc, rows, with_bc - without, s


def _fm_reference(pol, bc, a):
    """The flow-matching loss on model-space actions ``a`` with ``bc``'s noise and times, mean
    over the valid (unpadded) elements, from the policy's velocity."""
    eps, t, mask = bc["noise"], bc["time"], bc["mask"]
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    err = (pol.velocity(pol.encode_prefix(bc["obs"]), x_t, t).velocity - (eps - a)).pow(2)
    return err[mask.bool()].mean()  # [valid steps, A] -> mean over valid elements


def test_demo_loss_term_is_the_flow_matching_loss_on_demo_rows():
    """With ``rl.bc_coef`` the minibatch loss gains ``bc_coef * FM`` where FM is the
    flow-matching loss of the policy on the drawn demo rows' valid steps (computed here directly
    from the policy's velocity)."""
    pol = reach_policy()
    demos = _reach_demos()
    bc, rows, diff, s = _demo_loss_case(pol, demos)
    assert bc["actions"].shape == (16, 2, 2)
    torch.testing.assert_close(bc["actions"], demos.actions[rows])  # no normaliser: as given
    ref = _fm_reference(pol, bc, bc["actions"])
    assert 0 < float(bc["mask"].sum()) < bc["mask"].numel()  # padded steps are present
    torch.testing.assert_close(diff, 0.3 * ref, atol=1e-6, rtol=1e-5)
    assert s["bc/loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    # (a padded step's error is left out, as in SFT; its noisy input x_t still reaches the
    # expert, which attends over the whole chunk)


def test_demo_loss_runs_on_normalised_actions():
    """With a mean-std normaliser (the LIBERO / Meta-World / ManiSkill presets) the demo loss is
    the flow-matching loss on the *normalised* demo actions, as SFT's: the env-space demos go
    through ``policy.preprocess_actions``.  Reference: the standardisation written out with
    known statistics."""
    pol = reach_policy(normalization="mean_std")
    demos = _reach_demos()
    demos.actions.mul_(10.0).add_(3.0)  # env units far from the model's
    pol.fit_normalization(demos.obs["state"], demos.actions, demos.mask)
    mean, std = torch.tensor([3.0, -1.0]), torch.tensor([10.0, 4.0])
    pol.normalizer.actions_mean.copy_(mean)
    pol.normalizer.actions_std.copy_(std)
    bc, rows, diff, _ = _demo_loss_case(pol, demos)
    torch.testing.assert_close(bc["actions"], demos.actions[rows])  # env units, as drawn
    a = (demos.actions[rows] - mean) / std
    torch.testing.assert_close(diff, 0.3 * _fm_reference(pol, bc, a), atol=1e-6, rtol=1e-5)


def test_demo_loss_alone_fits_the_demos():
    """With the policy term off (a critic warm-up over the whole run) the demo loss alone still
    trains the policy towards the demos: the flow-matching loss on fixed demo draws falls, and
    without ``bc_coef`` the same run leaves the policy where it was."""
    from pirl.models.base import flow_matching_loss

    demos = _reach_demos(48)
    g = torch.Generator().manual_seed(5)
    noise, time_ = torch.randn(48, 2, 2, generator=g), torch.rand(48, generator=g)

    def demo_fm(pol):
        with torch.no_grad():
            return float(flow_matching_loss(pol, pol.encode_prefix(demos.obs), demos.actions,
                                            noise=noise, time=time_, mask=demos.mask))

    out = {}
    for coef in (0.0, 1.0):
        pol = reach_policy()
        smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                            config=SamplerConfig(kind="flow_sde", num_steps=3))
        cfg = apply_overrides(RLConfig(algo="ppo"), [
            f"bc_coef={coef}", "ppo.critic_warmup_iters=100", "ppo.lr_policy=0.003",
            "ppo.lr_schedule=constant"])
        tr = RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=2), cfg, seed=0,
                       demos=demos if coef else None)
        before = demo_fm(pol)
        for _ in range(4):
            m = tr.iteration()
        out[coef] = (before, demo_fm(pol), m)
    b0, a0, m0 = out[0.0]
    b1, a1, m1 = out[1.0]
    assert b0 == b1 and a0 == b0 and "bc/loss" not in m0
    assert a1 < 0.7 * b1, (b1, a1)
    assert m1["bc/loss"] > 0


def test_demo_loss_is_checked():
    pol = reach_policy()
    smp = build_sampler("flow_sde", 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind="flow_sde", num_steps=3))
    cfg = apply_overrides(RLConfig(algo="grpo"), ["bc_coef=0.5"])
    with pytest.raises(ValueError, match="bc_coef"):
        RLTrainer(pol, smp, ReachEnv(16, max_episode_steps=2), cfg, seed=0)
    with pytest.raises(ValueError, match="rl.bc_coef"):
        apply_overrides(RLConfig(), ["bc_coef=-0.1"])
    with pytest.raises(ValueError, match="rl.bc_batch_size"):
        apply_overrides(RLConfig(), ["bc_batch_size=0"])
    # the Ray placements' learner ranks hold the demos (tests/runners/distributed/test_parity.py)
    assert apply_overrides(TrainConfig(), ["rl.bc_coef=0.5", "placement.mode=disaggregated"]
                           ).rl.bc_coef == 0.5
