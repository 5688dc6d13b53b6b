"""Sampler math: time grid, transitions and log-probs against independent float64 references,
log-prob re-evaluation, gradients, hybrid masks, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from pirl.flow import (FlowNoiseSampler, FlowSDESampler, ODESampler, SamplerConfig, build_sampler,
                       time_grid)
from pirl.models import TinyVLA, TinyVLAConfig

VOCAB = ["pick", "up", "the", "red", "blue", "cube", "push", "to", "goal"]


def tiny_policy(seed: int = 0, **kw) -> TinyVLA:
    torch.manual_seed(seed)
    cfg = dict(action_dim=3, state_dim=5, action_horizon=4, width=32, depth=2, heads=2,
               conv_channels=[8, 16], value_hidden=32, vocab=VOCAB)
    cfg.update(kw)
    return TinyVLA(TinyVLAConfig(**cfg))


def tiny_obs(b: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = ["pick up the red cube", "push the blue cube to the goal", "pick cube", "zebra"]
    return {"images": torch.randint(0, 256, (b, 1, 3, 64, 64), generator=g, dtype=torch.uint8),
            "state": torch.randn(b, 5, generator=g),
            "instruction": [texts[i % len(texts)] for i in range(b)]}


def ref_sde_sigma(a: float, grid: list[float], k: int) -> float:
    """sigma at step k: a sqrt(t / (1 - t)), with the next grid point in the denominator at t=1."""
    t = grid[k]
    den = grid[k + 1] if t == 1.0 else t
    return a * math.sqrt(t / (1.0 - den))


def ref_normal_logp(x, m, s):
    """Elementwise log N(x; m, s^2) in float64 via torch.distributions."""
    return torch.distributions.Normal(m.double(), s.double()).log_prob(x.double())


# --------------------------------------------------------------------------------- schedule
def test_time_grid_values():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(1).tolist() == [1.0, 0.0]
    g5 = time_grid(5, dtype=torch.float64)
    assert torch.allclose(g5, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        time_grid(0)


# --------------------------------------------------------------------------------- ODE
def test_ode_is_exact_euler_on_analytic_flow(gaussian_flow):
    pol = gaussian_flow([0.3, -1.0], [0.5, 2.0], horizon=2)
    x0 = torch.randn(7, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chain = ODESampler(5).sample(pol, torch.zeros(7, 1), noise=x0)
    # independent Euler loop with the closed-form velocity, python-float time grid
    x = x0.clone()
    grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    s2 = torch.tensor([0.25, 4.0], dtype=torch.float64)
    mu = torch.tensor([0.3, -1.0], dtype=torch.float64)
    for k in range(5):
        t = grid[k]
        var = t * t + (1 - t) ** 2 * s2
        r = (x - (1 - t) * mu) / var
        v = t * r - (mu + (1 - t) * s2 * r)
        x = x - v * (grid[k] - grid[k + 1])
        torch.testing.assert_close(chain.x[:, k + 1], x, rtol=1e-12, atol=1e-12)
    assert torch.equal(chain.std, torch.zeros_like(chain.std))
    assert not chain.stochastic.any()
    assert torch.equal(chain.logp, torch.zeros(7, dtype=torch.float64))


# --------------------------------------------------------------------------------- closed forms
def test_flow_sde_transitions_match_float64_closed_form(gaussian_flow):
    """Every per-element transition log-prob of a joint Flow-SDE chain equals an explicit float64
    Gaussian built from the closed-form velocity and the reference sigma schedule."""
    K, a = 4, 0.7
    pol = gaussian_flow([0.5, -0.2, 1.0], [0.3, 1.0, 2.0], horizon=2)
    sampler = FlowSDESampler(K, noise_level=a, hybrid=False)
    chain = sampler.sample(pol, torch.zeros(64, 1), noise=torch.randn(64, 2, 3, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(3))
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    mu = torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64)
    s2 = torch.tensor([0.09, 1.0, 4.0], dtype=torch.float64)
    total = torch.distributions.Normal(0.0, 1.0).log_prob(chain.x[:, 0]).sum((1, 2))
    for k in range(K):
        t, tn = grid[k], grid[k + 1]
        dt = t - tn
        x = chain.x[:, k]
        var = t * t + (1 - t) ** 2 * s2
        e_eps = t * (x - (1 - t) * mu) / var
        e_a = mu + (1 - t) * s2 * (x - (1 - t) * mu) / var
        v = e_eps - e_a
        sig = ref_sde_sigma(a, grid, k)
        a_hat, eps_hat = x - t * v, x + (1 - t) * v
        mean = a_hat * (1 - tn) + eps_hat * (tn - sig ** 2 * dt / (2 * t))
        std = torch.full_like(mean, sig * math.sqrt(dt))
        torch.testing.assert_close(chain.mean[:, k], mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(chain.std[:, k], std, rtol=1e-12, atol=1e-12)
        ref = ref_normal_logp(chain.x[:, k + 1], mean, std)
        torch.testing.assert_close(chain.step_logp[:, k], ref, rtol=1e-9, atol=1e-9)
        total = total + ref.sum((1, 2))
    torch.testing.assert_close(chain.logp, total, rtol=1e-9, atol=1e-9)
    assert sampler.includes_init


def test_sde_sigma_finite_at_both_ends():
    for K in (1, 2, 4, 10):
        s = FlowSDESampler(K, noise_level=0.5, hybrid=False)
        grid = time_grid(K, dtype=torch.float64)
        sig = s.sigma(grid[:-1], grid[1] if K > 1 else 0.0)
        assert torch.isfinite(sig).all()
        ref = torch.tensor([ref_sde_sigma(0.5, grid.tolist(), k) for k in range(K)],
                           dtype=torch.float64)
        torch.testing.assert_close(sig, ref)
    # default grid K=4: sigma_1 = a*sqrt(1/(1-0.75)) = 2a, last step a*sqrt(0.25/0.75)
    s = FlowSDESampler(4, noise_level=0.5)
    torch.testing.assert_close(s.sigma(torch.tensor([1.0, 0.25], dtype=torch.float64), 0.75),
                               torch.tensor([1.0, 0.5 * math.sqrt(1 / 3)], dtype=torch.float64))


def test_flow_sde_hybrid_deterministic_steps_are_ode(gaussian_flow):
    pol = gaussian_flow([0.5], [0.7])
    sampler = FlowSDESampler(5, noise_level=0.5, hybrid=True, stochastic_steps=[2])
    chain = sampler.sample(pol, torch.zeros(16, 1), noise=torch.randn(16, 1, 1, dtype=torch.float64))
    grid = time_grid(5, dtype=torch.float64)
    for k in range(5):
        x = chain.x[:, k]
        v = pol.velocity(None, x, grid[k].expand(16)).velocity
        if k != 2:
            torch.testing.assert_close(chain.x[:, k + 1], x - v * 0.2, rtol=1e-12, atol=1e-12)
            assert (chain.step_logp[:, k] == 0).all() and (chain.std[:, k] == 0).all()
    # the chain log-prob is that one step's Gaussian log-prob (no init term in hybrid mode)
    ref = ref_normal_logp(chain.x[:, 3], chain.mean[:, 2], chain.std[:, 2]).sum((1, 2))
    torch.testing.assert_close(chain.logp, ref)
    assert not sampler.includes_init


def test_flow_noise_transitions_match_float64_closed_form():
    """Flow-Noise on TinyVLA (float32): recompute each transition in float64 from the network's
    velocity and the noise net's raw output with the explicit tanh-squash formula."""
    torch.manual_seed(0)
    pol = tiny_policy()
    sampler = FlowNoiseSampler(4, pol.feature_dim, pol.action_dim, min_std=0.05, max_std=0.3)
    # make the noise net non-trivial so the std varies per element
    with torch.no_grad():
        for p in sampler.noise_net.parameters():
            p.normal_(0, 0.3)
    obs = tiny_obs(6)
    with torch.no_grad():
        prefix = pol.encode_prefix(obs)
        chain = sampler.sample(pol, prefix, generator=torch.Generator().manual_seed(1))
        grid = [1.0, 0.75, 0.5, 0.25, 0.0]
        total = (-0.5 * chain.x[:, 0].double() ** 2 - 0.5 * math.log(2 * math.pi)).sum((1, 2))
        for k in range(4):
            x = chain.x[:, k]
            out = pol.velocity(prefix, x, torch.full((6,), grid[k]))
            mean = x.double() - out.velocity.double() * (grid[k] - grid[k + 1])
            raw = sampler.noise_net.net(torch.cat(
                [out.features, x, _time_feats(torch.full((6,), grid[k]), 16)[:, None].expand(-1, 4, -1)],
                -1)).double()
            lo, hi = math.log(0.05), math.log(0.3)
            std = torch.exp(lo + (hi - lo) * (torch.tanh(raw) + 1) / 2)
            assert float(std.min()) >= 0.05 - 1e-9 and float(std.max()) <= 0.3 + 1e-9
            assert float(std.std()) > 1e-3  # really per-element
            x1 = chain.x[:, k + 1].double()
            ref = -0.5 * ((x1 - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
            torch.testing.assert_close(chain.step_logp[:, k].double(), ref, rtol=1e-4, atol=1e-4)
            total = total + ref.sum((1, 2))
    torch.testing.assert_close(chain.logp.double(), total, rtol=1e-5, atol=1e-3)


def _time_feats(t: torch.Tensor, dim: int) -> torch.Tensor:
    # the documented NoiseNet time features: sin/cos(pi * 2^j * t), j < dim/2
    freq = torch.tensor([math.pi * 2.0 ** j for j in range(dim // 2)])
    ang = t[:, None] * freq
    return torch.cat([ang.sin(), ang.cos()], -1)


def test_flow_noise_std_bounds_and_init():
    s = FlowNoiseSampler(3, feature_dim=8, action_dim=2, min_std=0.08, max_std=0.16)
    f, x, t = torch.randn(5, 4, 8), torch.randn(5, 4, 2), torch.rand(5)
    torch.testing.assert_close(s.noise_net(f, x, t), torch.full((5, 4, 2), math.sqrt(0.08 * 0.16)))
    with torch.no_grad():
        for p in s.noise_net.parameters():
            p.normal_(0, 50.0)  # saturate the tanh both ways
    std = s.noise_net(f * 100, x * 100, t).detach()
    assert float(std.min()) >= 0.08 * (1 - 1e-6) and float(std.max()) <= 0.16 * (1 + 1e-6)
    assert float(std.min()) < 0.081 and float(std.max()) > 0.159


# --------------------------------------------------------------------------------- re-evaluation
SAMPLERS = {
    "flow_noise": dict(kind="flow_noise"),
    "sde_joint": dict(kind="flow_sde", hybrid=False),
    "sde_joint_exclude_last": dict(kind="flow_sde", hybrid=False, exclude_last=True),
    "sde_hybrid_shared": dict(kind="flow_sde", hybrid=True, shared_across_batch=True),
    "sde_hybrid_per_sample": dict(kind="flow_sde", hybrid=True, shared_across_batch=False),
    "sde_hybrid_fixed": dict(kind="flow_sde", hybrid=True, stochastic_steps=[0, 2]),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_log_prob_reevaluation_matches_rollout(name):
    pol = tiny_policy()
    kw = dict(SAMPLERS[name])
    kind = kw.pop("kind")
    sampler = build_sampler(kind, 4, pol.feature_dim, pol.action_dim, **kw)
    obs = tiny_obs(10)
    with torch.inference_mode():
        prefix = pol.encode_prefix(obs)
        chain = sampler.sample(pol, prefix, generator=torch.Generator().manual_seed(5))
    prefix = pol.encode_prefix(obs)  # fresh, grad-enabled (as in a PPO update)
    re = sampler.log_prob(pol, prefix, chain)  # the chain holds inference-mode tensors
    assert (re.logp.detach() - chain.logp).abs().max().item() < 1e-5
    re.logp.sum().backward()
    assert pol.action_out.weight.grad.abs().sum() > 0
    with torch.no_grad():  # comparisons with the (inference-mode) rollout chain
        re = sampler.log_prob(pol, prefix, chain)
        assert (re.logp - chain.logp).abs().max().item() < 1e-5
        assert torch.isfinite(chain.logp).all() and (chain.logp != 0).all()
        s4 = chain.stochastic[:, :, None, None]
        assert (re.step_logp - chain.step_logp).abs().max().item() < 1e-5
        assert ((re.mean - chain.mean).abs() * s4).max().item() < 1e-6
        # all-steps recomputation and a minibatch give the same numbers
        re_all = sampler.log_prob(pol, prefix, chain, all_steps=True)
        assert (re_all.mean - chain.mean).abs().max().item() < 1e-5
        assert (re_all.logp - chain.logp).abs().max().item() < 1e-5
        idx = torch.tensor([7, 2, 3])
        re_mb = sampler.log_prob(pol, pol.prefix_index(prefix, idx), chain.index(idx))
        assert (re_mb.logp - chain.logp[idx]).abs().max().item() < 1e-5
    # after a parameter change, the log-prob moves (it is really recomputed)
    with torch.no_grad():
        pol.action_out.bias.add_(0.05)
    re2 = sampler.log_prob(pol, pol.encode_prefix(obs), chain)
    assert (re2.logp - chain.logp).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["flow_noise", "flow_sde"])
def test_gradients_reach_policy_and_noise_net(kind):
    pol = tiny_policy()
    sampler = build_sampler(kind, 3, pol.feature_dim, pol.action_dim, hybrid=False)
    if kind == "flow_noise":
        # the noise net's last layer starts at zero (std = sqrt(min*max)); at init only that
        # layer gets a gradient, so move it off zero to check the whole net is reached
        first = sampler.log_prob
        with torch.no_grad():
            c0 = sampler.sample(pol, pol.encode_prefix(tiny_obs(2)))
        first(pol, pol.encode_prefix(tiny_obs(2)), c0).logp.sum().backward()
        last = sampler.noise_net.net[-1]
        assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
        sampler.zero_grad(set_to_none=True)
        pol.zero_grad(set_to_none=True)
        with torch.no_grad():
            last.weight.normal_(0, 0.1)
    obs = tiny_obs(4)
    with torch.no_grad():
        chain = sampler.sample(pol, pol.encode_prefix(obs), generator=torch.Generator().manual_seed(0))
    out = sampler.log_prob(pol, pol.encode_prefix(obs), chain)
    out.logp.sum().backward()
    for name in ("action_out.weight", "expert_blocks.0.cross_attn.q.weight",
                 "prefix_blocks.0.attn.qkv.weight", "image_encoder.convs.0.weight",
                 "text_embed.weight", "state_proj.weight"):
        g = dict(pol.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    if kind == "flow_noise":
        for n, p in sampler.noise_net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    # the value MLP is not part of the actor's log-prob
    assert all(p.grad is None for p in pol.value_mlp.parameters())


def test_flow_noise_logprob_gradient_matches_finite_difference(gaussian_flow):
    """d logp / d mu on the analytic float64 flow equals a central finite difference."""
    pol = gaussian_flow([0.2, -0.4], [0.8, 1.3])
    sampler = FlowNoiseSampler(3, pol.feature_dim, pol.action_dim, min_std=0.1, max_std=0.4).double()
    with torch.no_grad():
        for p in sampler.noise_net.parameters():
            p.normal_(0, 0.5)
    pre = torch.zeros(5, 1)
    chain = sampler.sample(pol, pre, noise=torch.randn(5, 1, 2, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(2))
    logp = sampler.log_prob(pol, pre, chain).logp.sum()
    (g_mu,) = torch.autograd.grad(logp, pol.mu)
    w = sampler.noise_net.net[0].weight
    (g_w,) = torch.autograd.grad(sampler.log_prob(pol, pre, chain).logp.sum(), w)
    eps = 1e-6
    with torch.no_grad():
        for i in range(2):
            pol.mu[i] += eps
            up = sampler.log_prob(pol, pre, chain).logp.sum()
            pol.mu[i] -= 2 * eps
            dn = sampler.log_prob(pol, pre, chain).logp.sum()
            pol.mu[i] += eps
            assert abs((up - dn).item() / (2 * eps) - g_mu[i].item()) < 1e-5 * max(1, abs(g_mu[i].item()))
        w[0, 0] += eps
        up = sampler.log_prob(pol, pre, chain).logp.sum()
        w[0, 0] -= 2 * eps
        dn = sampler.log_prob(pol, pre, chain).logp.sum()
        w[0, 0] += eps
        assert abs((up - dn).item() / (2 * eps) - g_w[0, 0].item()) < 1e-5 * max(1, abs(g_w[0, 0].item()))


# --------------------------------------------------------------------------------- masks
def test_hybrid_masks():
    b, k = 200, 5
    g = torch.Generator().manual_seed(0)
    shared = FlowSDESampler(k, hybrid=True, shared_across_batch=True)
    seen = set()
    for _ in range(40):
        m = shared.stochastic_mask(b, torch.device("cpu"), g)
        assert (m.sum(1) == 1).all() and (m == m[:1]).all()
        seen.add(int(m[0].nonzero()))
    assert seen == set(range(k))
    per = FlowSDESampler(k, hybrid=True, shared_across_batch=False, exclude_last=True)
    m = per.stochastic_mask(b, torch.device("cpu"), g)
    assert (m.sum(1) == 1).all() and not m[:, -1].any()
    assert set(m.float().argmax(1).tolist()) == set(range(k - 1))
    fixed = FlowSDESampler(k, hybrid=True, stochastic_steps=[3, 1])
    assert fixed.stochastic_mask(3, torch.device("cpu")).tolist() == [[False, True, False, True, False]] * 3
    joint = FlowSDESampler(k, hybrid=False)
    assert joint.stochastic_mask(2, torch.device("cpu")).all()
    joint_x = FlowSDESampler(k, hybrid=False, exclude_last=True)
    m = joint_x.stochastic_mask(2, torch.device("cpu"))
    assert m[:, :-1].all() and not m[:, -1].any()


def test_sampling_is_reproducible_with_generator():
    pol = tiny_policy()
    s = build_sampler("flow_sde", 4, pol.feature_dim, pol.action_dim, hybrid=True,
                      shared_across_batch=False)
    with torch.no_grad():
        prefix = pol.encode_prefix(tiny_obs(5))
        a = s.sample(pol, prefix, generator=torch.Generator().manual_seed(9))
        b = s.sample(pol, prefix, generator=torch.Generator().manual_seed(9))
        c = s.sample(pol, prefix, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.x, b.x) and torch.equal(a.stochastic, b.stochastic)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (5, 5, 4, 3) and a.actions.shape == (5, 4, 3)


# --------------------------------------------------------------------------------- config
def test_build_sampler_and_config():
    assert isinstance(build_sampler("ode", 4, 8, 2), ODESampler)
    fn = build_sampler("flow_noise", 5, 8, 2, min_std=0.1, max_std=0.2, noise_level=0.3)
    assert isinstance(fn, FlowNoiseSampler) and fn.num_steps == 5
    sde = SamplerConfig(kind="flow_sde", num_steps=4, noise_level=0.3, hybrid=False).build(8, 2)
    assert isinstance(sde, FlowSDESampler) and sde.noise_level == 0.3 and not sde.hybrid
    with pytest.raises(ValueError, match="kind"):
        build_sampler("ddpm", 4, 8, 2)
    with pytest.raises(ValueError, match="bogus"):
        build_sampler("ode", 4, 8, 2, bogus=1)
    bad = [dict(kind="x"), dict(num_steps=0), dict(noise_level=0.0), dict(min_std=-1.0),
           dict(max_std=0.01), dict(noise_hidden=0), dict(stochastic_steps=[4]),
           dict(stochastic_steps=[1], hybrid=False),
           dict(kind="flow_sde", num_steps=1, exclude_last=True)]
    fields = ["kind", "num_steps", "noise_level", "min_std", "max_std", "noise_hidden",
              "stochastic_steps", "stochastic_steps", "exclude_last"]
    for kw, field in zip(bad, fields):
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**kw)
