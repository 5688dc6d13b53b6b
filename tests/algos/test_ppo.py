"""PPO math against independent float64 computations: log-prob aggregation (explicit loops),
the clipped / dual-clipped surrogate and its gradient (element-wise numpy, cases hitting every
branch), the k3 KL estimator (closed-form Gaussian KL by Monte-Carlo), the value loss, the
explained variance, the lr schedule and the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pirl.algos.ppo import (PPOConfig, aggregate_logp, approx_kl, explained_variance, huber,
                            level_mask, lr_scale, make_action_mask, policy_loss, value_loss)


# --------------------------------------------------------------------------- aggregate_logp
def aggregate_reference(step_logp, stochastic, init_logp, mode, mask, level):
    """Explicit Python loops over b, h, a, k (float64)."""
    B, K, H, A = step_logp.shape
    per = np.zeros((B, H, A))
    for b in range(B):
        counted = [k for k in range(K) if stochastic[b, k]]
        n = len(counted) + (1 if init_logp is not None else 0)
        for h in range(H):
            for a in range(A):
                if mask is not None and not mask[b, h, a]:
                    continue
                s = sum(float(step_logp[b, k, h, a]) for k in counted)
                if init_logp is not None:
                    s += float(init_logp[b, h, a])
                if mode == "chain_mean":
                    s = s / n if n > 0 else 0.0
                per[b, h, a] = s
    if level == "chunk":
        return per.sum(axis=(1, 2))
    if level == "action":
        return per.sum(axis=2)
    return per


@pytest.mark.parametrize("mode", ["chain", "chain_mean"])
@pytest.mark.parametrize("level", ["chunk", "action", "element", None])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "HA", "BHA"])
def test_aggregate_logp_matches_loops(mode, level, with_init, mask_kind):
    g = torch.Generator().manual_seed(0)
    B, K, H, A = 4, 3, 5, 3
    stochastic = torch.rand(B, K, generator=g) < 0.5
    stochastic[0] = False  # a row with no counted transition
    stochastic[1] = True  # a joint row
    step_logp = torch.randn(B, K, H, A, generator=g, dtype=torch.float64)
    step_logp[~stochastic] = 0.0  # the sampler's convention for deterministic steps
    init_logp = torch.randn(B, H, A, generator=g, dtype=torch.float64) if with_init else None
    if mask_kind == "HA":
        amask = make_action_mask(H, A, action_chunk=3, env_action_dim=2)
        full_mask = amask.expand(B, H, A).numpy()
    elif mask_kind == "BHA":
        amask = torch.rand(B, H, A, generator=g) < 0.7
        full_mask = amask.numpy()
    else:
        amask, full_mask = None, None
    out = aggregate_logp(step_logp, stochastic, init_logp, mode=mode, action_mask=amask,
                         level=level)
    eff_level = level or ("chunk" if mode == "chain" else "element")
    ref = aggregate_reference(step_logp.numpy(), stochastic.numpy(),
                              None if init_logp is None else init_logp.numpy(), mode,
                              full_mask, eff_level)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_aggregate_logp_hybrid_and_deterministic_garbage():
    """One stochastic step (Flow-SDE hybrid): chain == that step's log-prob, chain_mean == the
    same per element; values stored at uncounted steps are ignored (even -inf)."""
    g = torch.Generator().manual_seed(1)
    B, K, H, A = 3, 4, 2, 2
    step_logp = torch.randn(B, K, H, A, generator=g)
    stochastic = torch.zeros(B, K, dtype=torch.bool)
    idx = torch.tensor([0, 2, 3])
    stochastic[torch.arange(B), idx] = True
    chosen = step_logp[torch.arange(B), idx]  # [B, H, A]
    step_logp[~stochastic] = float("-inf")
    torch.testing.assert_close(aggregate_logp(step_logp, stochastic), chosen.sum(dim=(1, 2)))
    torch.testing.assert_close(aggregate_logp(step_logp, stochastic, mode="chain_mean"), chosen)


def test_aggregate_logp_gradient_flows():
    g = torch.Generator().manual_seed(2)
    step_logp = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    stochastic = torch.tensor([[True, True, False], [False, True, False]])
    out = aggregate_logp(step_logp, stochastic, mode="chain_mean", level="chunk")
    out.sum().backward()
    # d/d step_logp[b, k] = 1 / n_b on counted steps, 0 elsewhere
    expected = torch.zeros(2, 3, 2, 2)
    expected[0, :2] = 0.5
    expected[1, 1] = 1.0
    torch.testing.assert_close(step_logp.grad, expected)


def test_aggregate_logp_validation():
    x = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match="mode"):
        aggregate_logp(x, torch.ones(2, 3, dtype=torch.bool), mode="sum")
    with pytest.raises(ValueError, match="level"):
        aggregate_logp(x, torch.ones(2, 3, dtype=torch.bool), level="token")
    with pytest.raises(ValueError, match="stochastic"):
        aggregate_logp(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="init_logp"):
        aggregate_logp(x, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, 4))


def test_level_mask_and_action_mask():
    m = make_action_mask(4, 3, action_chunk=2, env_action_dim=1)
    assert m.dtype == torch.bool and m.sum() == 2 and bool(m[:2, 0].all())
    assert level_mask(m, 5, "chunk") is None
    assert level_mask(None, 5, "element") is None
    em = level_mask(m, 5, "element")
    assert em.shape == (5, 4, 3) and bool((em == m).all())
    am = level_mask(m, 5, "action")
    assert am.shape == (5, 4) and am[0].tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        make_action_mask(4, 3, action_chunk=5)


# --------------------------------------------------------------------------- policy loss
def ppo_reference(new, old, adv, clip_low, clip_high, dual_clip, w):
    """The PPO objective written as maximisation (float64 numpy), its gradient w.r.t. ``new``,
    and the branch indicators."""
    new, old, adv, w = (np.asarray(x, dtype=np.float64) for x in (new, old, adv, w))
    r = np.exp(new - old)
    s1 = r * adv
    s2 = np.clip(r, 1 - clip_low, 1 + clip_high) * adv
    obj = np.minimum(s1, s2)
    clipped = s2 < s1
    dual = np.zeros_like(clipped)
    if dual_clip is not None:
        dual = (adv < 0) & (dual_clip * adv > obj)
        obj = np.where(dual, dual_clip * adv, obj)
    loss = -(w * obj).sum() / w.sum()
    # d(-obj)/d new = -adv * r on entries where the unclipped term is the active one
    active = ~clipped & ~dual
    grad = np.where(active, -adv * r, 0.0) * w / w.sum()
    kl = ((r - 1) - np.log(r))
    stats = {"approx_kl": (w * kl).sum() / w.sum(),
             "clip_fraction": (w * clipped).sum() / w.sum(),
             "dual_clip_fraction": (w * dual).sum() / w.sum(),
             "ratio_mean": r[w > 0].mean(), "ratio_max": r[w > 0].max(),
             "ratio_min": r[w > 0].min()}
    return loss, grad, stats


def _check_policy_loss(new, old, adv, w, clip_low, clip_high, dual_clip, mask=None):
    new_t = torch.tensor(new, dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(new_t, torch.tensor(old, dtype=torch.float64),
                              torch.tensor(adv, dtype=torch.float64), clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip,
                              mask=None if mask is None else torch.tensor(mask))
    loss.backward()
    ref_loss, ref_grad, ref_stats = ppo_reference(
        new, old, np.broadcast_to(np.reshape(adv, np.shape(adv) + (1,) * (np.ndim(new) - np.ndim(adv))),
                                  np.shape(new)), clip_low, clip_high, dual_clip, w)
    np.testing.assert_allclose(float(loss.detach()), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_t.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)
    for k, v in ref_stats.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    return stats


def test_policy_loss_every_branch():
    """Hand-picked entries (clip 0.2 / 0.3, dual clip 3) hitting each branch."""
    #           A     r      branch (objective = min(rA, clip(r)A), then max(., 3A) if A<0)
    cases = [(+1.0, 1.10),  # inside the range: unclipped
             (+1.0, 1.50),  # A>0, r > 1.3: clipped at 1.3 (no gradient)
             (+1.0, 0.50),  # A>0, r < 0.8: unclipped (pessimistic min keeps rA)
             (-1.0, 0.50),  # A<0, r < 0.8: clipped at 0.8 (no gradient)
             (-1.0, 1.10),  # A<0 inside the range: unclipped
             (-1.0, 2.00),  # A<0, 1.3 < r < 3: unclipped, dual clip not reached
             (-1.0, 5.00),  # A<0, r > 3: dual clip (loss bounded by 3|A|, no gradient)
             (+2.0, 1.31),  # A>0 just above 1.3: clipped
             (0.0, 1.70)]  # A=0: no contribution
    adv = np.array([c[0] for c in cases])
    ratio = np.array([c[1] for c in cases])
    old = np.linspace(-3.0, 1.0, len(cases))
    new = old + np.log(ratio)
    w = np.ones_like(adv)
    stats = _check_policy_loss(new, old, adv, w, 0.2, 0.3, 3.0)
    # hand count: clipped entries 1, 3, 7 -> 3/9; dual entry 6 -> 1/9
    assert math.isclose(stats["clip_fraction"], 3 / 9, rel_tol=1e-12)
    assert math.isclose(stats["dual_clip_fraction"], 1 / 9, rel_tol=1e-12)
    # hand-computed loss: -(1.1 + 1.3 + .5 - .8 - 1.1 - 2 - 3 + 2.6 + 0) / 9 = 1.4 / 9
    new_t = torch.tensor(new)
    loss, _ = policy_loss(new_t, torch.tensor(old), torch.tensor(adv), 0.2, 0.3, 3.0)
    assert math.isclose(float(loss), 1.4 / 9, rel_tol=1e-12)
    # without dual clip the r=5 entry contributes -5 * -1 = 5 instead of 3
    loss_nd, s = policy_loss(new_t, torch.tensor(old), torch.tensor(adv), 0.2, 0.3, None)
    assert math.isclose(float(loss_nd), 3.4 / 9, rel_tol=1e-12)
    assert s["dual_clip_fraction"] == 0.0
    _check_policy_loss(new, old, adv, w, 0.2, 0.3, None)


@pytest.mark.parametrize("shape,adv_shape,mask_shape", [
    ((64,), (64,), None),
    ((16, 5, 3), (16,), (16,)),  # element-level ratios, per-sample advantages and mask
    ((16, 5, 3), (16, 5, 3), (16, 5, 3)),  # full per-element weights
    ((16, 5), (16,), (16, 5)),  # action-level
])
@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_policy_loss_random_matches_reference(shape, adv_shape, mask_shape, dual_clip):
    rng = np.random.default_rng(0)
    old = rng.normal(size=shape)
    new = old + rng.normal(scale=0.4, size=shape)
    adv = rng.normal(size=adv_shape)
    if mask_shape is None:
        mask, w = None, np.ones(shape)
    else:
        mask = rng.random(mask_shape) < 0.7
        w = np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - len(mask_shape))),
                            shape).astype(np.float64)
    _check_policy_loss(new, old, adv, w, 0.2, 0.28, dual_clip, mask=mask)


def test_policy_loss_at_old_policy_and_masked_levels():
    """At unchanged parameters r = 1: loss = -mean(A), gradient -A/n, KL 0.  A masked element
    level gives the mean over the executed elements only."""
    g = torch.Generator().manual_seed(3)
    B, K, H, A = 6, 2, 4, 3
    step = torch.randn(B, K, H, A, generator=g, dtype=torch.float64)
    stoch = torch.ones(B, K, dtype=torch.bool)
    amask = make_action_mask(H, A, action_chunk=2, env_action_dim=2)
    new = aggregate_logp(step, stoch, mode="chain_mean", action_mask=amask).requires_grad_(True)
    old = new.detach().clone()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    loss, stats = policy_loss(new, old, adv, mask=level_mask(amask, B, "element"))
    # 4 executed elements per sample, all with ratio 1
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == 1.0
    loss.backward()
    expected = (-adv / (B * 4))[:, None, None] * amask.double()
    torch.testing.assert_close(new.grad, expected)


def test_policy_loss_extreme_ratio_is_finite():
    new = torch.tensor([500.0, -500.0, 0.0], requires_grad=True)
    old = torch.zeros(3)
    loss, stats = policy_loss(new, old, torch.tensor([-1.0, 1.0, 1.0]), dual_clip=None)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(new.grad).all())
    assert math.isclose(stats["ratio_max"], math.exp(20.0), rel_tol=1e-5)


def test_policy_loss_validation():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, torch.zeros(4), x)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        policy_loss(x, x, x, mask=torch.ones(2))


def test_approx_kl_k3_monte_carlo():
    """k3 is an unbiased estimator of KL(old || new): compare with the closed-form Gaussian KL."""
    g = torch.Generator().manual_seed(4)
    m1, s1, m2, s2 = 0.0, 1.0, 0.3, 1.2
    x = m1 + s1 * torch.randn(400_000, generator=g, dtype=torch.float64)

    def logn(x, m, s):
        return -0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    old, new = logn(x, m1, s1), logn(x, m2, s2)
    kl_true = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    r = torch.exp(new - old)
    k3 = (r - 1) - torch.log(r)
    se = float(k3.std()) / math.sqrt(x.numel())
    est = float(approx_kl(new, old))
    assert abs(est - kl_true) < 4 * se, (est, kl_true, se)
    assert math.isclose(est, float(k3.mean()), rel_tol=1e-10)


# --------------------------------------------------------------------------- value loss
def value_reference(values, old_values, returns, clip, delta, w):
    v, vo, ret, w = (np.asarray(x, dtype=np.float64) for x in (values, old_values, returns, w))

    def f(e):
        if delta is None:
            return 0.5 * e ** 2
        return np.where(np.abs(e) <= delta, 0.5 * e ** 2, delta * (np.abs(e) - 0.5 * delta))

    l1 = f(ret - v)
    if clip is None:
        per, clipped = l1, np.zeros_like(l1, dtype=bool)
        dper = -(ret - v) if delta is None else -np.clip(ret - v, -delta, delta)
    else:
        vc = vo + np.clip(v - vo, -clip, clip)
        l2 = f(ret - vc)
        per = np.maximum(l1, l2)
        clipped = l2 > l1
        inside = np.abs(v - vo) < clip
        d1 = -(ret - v) if delta is None else -np.clip(ret - v, -delta, delta)
        d2 = np.where(inside, d1, 0.0)  # the clipped value has no gradient outside the clip
        dper = np.where(clipped, d2, d1)
    loss = (w * per).sum() / w.sum()
    return loss, dper * w / w.sum(), (w * clipped).sum() / w.sum()


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("delta", [1.0, 10.0, None])
def test_value_loss_hand_cases(clip, delta):
    #         V     V_old  R      (clip 0.2, delta 1)
    cases = [(0.1, 0.0, 1.0),    # inside the clip: both terms equal
             (0.5, 0.0, 1.0),    # moved towards R past the clip: clipped term (err .8) larger
             (1.5, 0.0, 1.0),    # overshoot: clipped .2 -> err .8 > .5
             (-0.5, 0.0, 1.0),   # moved away: unclipped err 1.5 (Huber linear for delta 1)
             (2.0, 1.9, -3.0)]   # big error: Huber linear region on both terms
    v, vo, ret = (np.array(c) for c in zip(*cases))
    w = np.array([1.0, 1.0, 0.0, 1.0, 1.0])  # masks out one entry
    v_t = torch.tensor(v, requires_grad=True)
    loss, stats = value_loss(v_t, torch.tensor(vo), torch.tensor(ret), clip=clip,
                             huber_delta=delta, mask=torch.tensor(w))
    loss.backward()
    ref_loss, ref_grad, ref_clip = value_reference(v, vo, ret, clip, delta, w)
    np.testing.assert_allclose(float(loss.detach()), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(v_t.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["clip_fraction"], ref_clip, rtol=1e-12)


def test_value_loss_numbers_by_hand():
    # V=.5, V_old=0, R=1, clip .2: unclipped .5*.5^2 = .125, clipped .5*.8^2 = .32 -> .32
    loss, s = value_loss(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1.0]),
                         clip=0.2, huber_delta=None)
    assert math.isclose(float(loss), 0.32, rel_tol=1e-6) and s["clip_fraction"] == 1.0
    # Huber delta 1, error 3: 1 * (3 - .5) = 2.5
    loss, _ = value_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]),
                         clip=None, huber_delta=1.0)
    assert math.isclose(float(loss), 2.5, rel_tol=1e-6)
    # huber() agrees with torch's own Huber loss
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(huber(x, 2.0), torch.nn.functional.huber_loss(
        x, torch.zeros_like(x), reduction="none", delta=2.0))


def test_value_loss_random_matches_reference():
    rng = np.random.default_rng(1)
    n = 200
    vo = rng.normal(size=n)
    v = vo + rng.normal(scale=0.3, size=n)
    ret = rng.normal(scale=4.0, size=n)
    w = (rng.random(n) < 0.8).astype(np.float64)
    v_t = torch.tensor(v, requires_grad=True)
    loss, stats = value_loss(v_t, torch.tensor(vo), torch.tensor(ret), clip=0.2,
                             huber_delta=3.0, mask=torch.tensor(w > 0))
    loss.backward()
    ref_loss, ref_grad, ref_clip = value_reference(v, vo, ret, 0.2, 3.0, w)
    np.testing.assert_allclose(float(loss.detach()), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(v_t.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["clip_fraction"], ref_clip, rtol=1e-12)


def test_explained_variance():
    rng = np.random.default_rng(2)
    ret = rng.normal(size=100)
    v = ret + rng.normal(scale=0.5, size=100)
    ev = float(explained_variance(torch.tensor(v), torch.tensor(ret)))
    assert math.isclose(ev, 1 - np.var(ret - v) / np.var(ret), rel_tol=1e-6)
    mask = rng.random(100) < 0.5
    evm = float(explained_variance(torch.tensor(v), torch.tensor(ret), torch.tensor(mask)))
    assert math.isclose(evm, 1 - np.var((ret - v)[mask]) / np.var(ret[mask]), rel_tol=1e-6)
    assert float(explained_variance(torch.tensor(ret), torch.tensor(ret))) == 1.0
    assert math.isnan(float(explained_variance(torch.zeros(5), torch.ones(5))))
    # returns all zero up to rounding (A + V of a rollout without reward): undefined, not ~-1e15
    v = torch.tensor([0.3, 0.1, 0.2, 0.4])
    r = torch.tensor([1e-8, -1e-8, 0.0, 0.0])
    assert math.isnan(float(explained_variance(v, r)))


# --------------------------------------------------------------------------- schedule, config
def test_lr_scale_by_hand():
    assert lr_scale("constant", 7, 10) == 1.0
    assert math.isclose(lr_scale("linear", 25, 100), 0.75)
    assert math.isclose(lr_scale("cosine", 50, 100), 0.5)
    assert math.isclose(lr_scale("cosine", 100, 100), 0.0, abs_tol=1e-12)
    assert math.isclose(lr_scale("cosine", 100, 100, min_ratio=0.1), 0.1)
    # warm-up 4: 1/4, 2/4, 3/4, 4/4, then linear from 1 over the remaining 6 steps
    assert [lr_scale("linear", s, 10, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_scale("linear", 7, 10, warmup_steps=4), 0.5)
    with pytest.raises(ValueError):
        lr_scale("step", 0, 10)


def test_ppo_config_defaults_and_validation():
    cfg = PPOConfig()
    assert (cfg.gamma, cfg.gae_lambda, cfg.clip_low, cfg.clip_high, cfg.dual_clip) == \
        (0.99, 0.95, 0.2, 0.2, 3.0)
    assert (cfg.value_clip, cfg.huber_delta, cfg.betas, cfg.eps, cfg.max_grad_norm) == \
        (0.2, 10.0, (0.9, 0.95), 1e-5, 1.0)
    assert cfg.entropy_coef == 0.0 and cfg.target_kl is None and cfg.normalize_advantages
    assert cfg.logp_mode == "chain_mean" and cfg.ratio_level == "element"  # RLinf token-mean
    for field, value in [("gamma", 1.1), ("gae_lambda", -0.5), ("clip_low", -0.1),
                         ("clip_high", -1.0), ("dual_clip", 0.9), ("value_clip", 0.0),
                         ("huber_delta", -1.0), ("update_epochs", 0), ("num_minibatches", 0),
                         ("lr_policy", 0.0), ("lr_value", -1.0), ("lr_noise", 0.0),
                         ("betas", (0.9, 1.0)), ("eps", 0.0), ("max_grad_norm", 0.0),
                         ("target_kl", 0.0), ("lr_schedule", "step"), ("logp_mode", "x"),
                         ("logp_level", "token"), ("entropy_coef", -1.0), ("value_coef", -1.0),
                         ("lr_warmup_iters", -1), ("max_log_ratio", 0.0)]:
        with pytest.raises(ValueError, match=field):
            PPOConfig(**{field: value})


def test_ppo_config_through_loader():
    from pirl.config.loading import ConfigError, from_dict

    cfg = from_dict(PPOConfig, {"value_clip": None, "lr_schedule": "cosine",
                                "logp_mode": "chain_mean", "logp_level": "chunk"})
    assert cfg.value_clip is None and cfg.lr_schedule == "cosine" and cfg.ratio_level == "chunk"
    with pytest.raises(ConfigError, match="gae_lambda"):
        from_dict(PPOConfig, {"gae_lambda": 2.0})


def test_ppo_learns_a_gaussian_bandit():
    """End-to-end sign check of GAE + policy loss + value loss: a Gaussian policy N(mu, 0.5^2)
    on one-step episodes with reward -(a - 2)^2 moves its mean from 0 to ~2 and the critic
    tracks the expected reward."""
    from pirl.algos.advantages import gae, normalize_advantages

    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(1, requires_grad=True)
    v = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([{"params": [mu], "lr": 0.05}, {"params": [v], "lr": 0.2}])
    n, std = 256, 0.5
    for _ in range(40):
        with torch.no_grad():
            a = mu + std * torch.randn(n, generator=g)
            old_logp = -0.5 * ((a - mu) / std) ** 2
            r = -(a - 2.0) ** 2
            values = v.expand(n).clone()
        adv, ret = gae(r[None], values[None], torch.zeros(1, n), torch.ones(1, n, dtype=torch.bool),
                       gamma=0.99, lam=0.95)
        adv = normalize_advantages(adv[0])
        for _ in range(4):
            new_logp = -0.5 * ((a - mu) / std) ** 2
            pl, _ = policy_loss(new_logp, old_logp, adv)
            vl, _ = value_loss(v.expand(n), values, ret[0], clip=None, huber_delta=None)
            opt.zero_grad()
            (pl + vl).backward()
            opt.step()
    assert abs(float(mu) - 2.0) < 0.2, float(mu)
    # the critic's target is E[r] = -std^2 - (mu - 2)^2 (about -0.25 at the optimum)
    expected_v = -std ** 2 - (float(mu) - 2.0) ** 2
    assert abs(float(v) - expected_v) < 0.15, (float(v), expected_v)
