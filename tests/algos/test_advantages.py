"""Chunk-level GAE, discounted returns and advantage normalisation against independent references:
a hand-computed example and a naive per-env float64 forward-sum written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pirl.algos.advantages import discounted_returns, gae, normalize_advantages


def gae_reference(rewards, values, next_values, terminated, truncated, valid, gamma, lam):
    """Per env, per step: A_t = sum_l (gamma*lam)^l delta_{t+l} over the rest of the episode
    segment (forward sum, float64, plain Python).  The segment of step t ends at the first step
    s >= t that is done, or whose successor is invalid, or that is the window's last step."""
    r, v, nv = (np.asarray(x, dtype=np.float64) for x in (rewards, values, next_values))
    term, trunc, ok = (np.asarray(x, dtype=bool) for x in (terminated, truncated, valid))
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        def delta(s):
            boot = 0.0 if term[s, n] else nv[s, n]
            return r[s, n] + gamma * boot - v[s, n]

        for t in range(T):
            if not ok[t, n]:
                continue
            total, s, w = 0.0, t, 1.0
            while True:
                total += w * delta(s)
                ends = term[s, n] or trunc[s, n] or s == T - 1 or not ok[s + 1, n]
                if ends:
                    break
                s, w = s + 1, w * gamma * lam
            adv[t, n] = total
    ret = np.where(ok, adv + v, v)
    return adv, ret


def test_gae_hand_computed():
    """T=3, gamma=0.9, lam=0.8 (gamma*lam = 0.72), four envs, numbers worked out by hand."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                            [0.0, 1.0, 1.0, 0.0],
                            [2.0, 7.0, 7.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5],
                           [0.4, 0.4, 0.4, 0.4],
                           [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    next_values = torch.tensor([[0.4, 0.4, 0.4, 9.9],
                                [0.3, 5.0, 2.0, 0.3],
                                [0.6, 0.3, 0.3, 0.6]], dtype=torch.float64)
    # env 0: runs through the window (bootstraps from next_values[2] = 0.6)
    # env 1: terminates in chunk 1 (no bootstrap: the 5.0 is ignored), chunk 2 invalid
    # env 2: truncated in chunk 1 (bootstraps from 2.0), chunk 2 invalid
    # env 3: auto-reset: terminates in chunk 0 (9.9 ignored), a new episode runs chunks 1-2
    terminated = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.8,
                   valid=valid)
    # env 0: d0 = 1 + .9*.4 - .5 = .86, d1 = 0 + .9*.3 - .4 = -.13, d2 = 2 + .9*.6 - .3 = 2.24
    #        A2 = 2.24, A1 = -.13 + .72*2.24 = 1.4828, A0 = .86 + .72*1.4828 = 1.927616
    # env 1: d1 = 1 - .4 = .6 -> A1 = .6, A0 = .86 + .72*.6 = 1.292, A2 = 0
    # env 2: d1 = 1 + .9*2 - .4 = 2.4 -> A1 = 2.4, A0 = .86 + .72*2.4 = 2.588, A2 = 0
    # env 3: A0 = 1 - .5 = .5 (stops at the boundary), A1 = 1.4828, A2 = 2.24 (as env 0)
    expected = torch.tensor([[1.927616, 1.292, 2.588, 0.5],
                             [1.4828, 0.6, 2.4, 1.4828],
                             [2.24, 0.0, 0.0, 2.24]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # returns = A + V on valid steps, V on invalid ones
    expected_ret = expected + values
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


def _random_rollout(seed: int, T: int = 12, N: int = 96):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g)
    values = torch.randn(T, N, generator=g)
    next_values = torch.randn(T, N, generator=g)
    terminated = torch.zeros(T, N, dtype=torch.bool)
    truncated = torch.zeros(T, N, dtype=torch.bool)
    valid = torch.ones(T, N, dtype=torch.bool)
    kind = torch.randint(0, 4, (N,), generator=g)
    for n in range(N):
        k = int(kind[n])
        if k == 0:  # fixed horizon: ends (term or trunc) at a random step, then frozen
            end = int(torch.randint(0, T, (1,), generator=g))
            if bool(torch.rand(1, generator=g) < 0.5):
                terminated[end, n] = True
            else:
                truncated[end, n] = True
            valid[end + 1:, n] = False
        elif k == 1:  # auto-reset: random episode boundaries, every step valid
            terminated[:, n] = torch.rand(T, generator=g) < 0.2
            truncated[:, n] = torch.rand(T, generator=g) < 0.1
        elif k == 2:  # arbitrary masks (incl. valid -> invalid without a done flag, both flags)
            valid[:, n] = torch.rand(T, generator=g) < 0.8
            terminated[:, n] = torch.rand(T, generator=g) < 0.2
            truncated[:, n] = torch.rand(T, generator=g) < 0.2
        # k == 3: runs through the whole window
    return rewards, values, next_values, terminated, truncated, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.8), (1.0, 1.0), (0.7, 0.0)])
def test_gae_matches_naive_reference(seed, gamma, lam):
    rewards, values, next_values, term, trunc, valid = _random_rollout(seed)
    adv, ret = gae(rewards.double(), values.double(), next_values.double(), term, trunc,
                   gamma=gamma, lam=lam, valid=valid)
    ref_adv, ref_ret = gae_reference(rewards, values, next_values, term, trunc, valid, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-10, atol=1e-10)
    assert bool((adv[~valid] == 0).all())
    # float32 inputs give float32 outputs close to the float64 reference
    adv32, _ = gae(rewards, values, next_values, term, trunc, gamma=gamma, lam=lam, valid=valid)
    assert adv32.dtype == torch.float32
    np.testing.assert_allclose(adv32.numpy(), ref_adv, rtol=1e-4, atol=1e-4)


def test_gae_ignored_entries_do_not_leak():
    """Garbage (NaN / huge) at invalid steps and in the next value of terminated steps changes
    nothing."""
    rewards, values, next_values, term, trunc, valid = _random_rollout(3)
    adv, ret = gae(rewards, values, next_values, term, trunc, gamma=0.99, lam=0.95, valid=valid)
    r2, v2, nv2 = rewards.clone(), values.clone(), next_values.clone()
    r2[~valid] = float("nan")
    v2[~valid] = 1e30
    nv2[term & valid] = float("nan")
    adv2, ret2 = gae(r2, v2, nv2, term, trunc, gamma=0.99, lam=0.95, valid=valid)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2[valid], ret[valid])


def test_gae_next_values_vector_form():
    """next_values [N] means next_values[t] = values[t+1] before the last step."""
    rewards, values, next_values, term, trunc, valid = _random_rollout(4)
    last = torch.randn(values.shape[1])
    full = torch.cat([values[1:], last[None]], dim=0)
    a1, r1 = gae(rewards, values, full, term, trunc, gamma=0.95, lam=0.9, valid=valid)
    a2, r2 = gae(rewards, values, last, term, trunc, gamma=0.95, lam=0.9, valid=valid)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_gae_closed_forms():
    """lam = 0: A = delta (one-step TD).  gamma = lam = 1, no dones: A_t = sum_{s>=t} r_s +
    V_last - V_t (Monte-Carlo with bootstrap)."""
    g = torch.Generator().manual_seed(5)
    r, v, nv = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a0, _ = gae(r, v, nv, gamma=0.9, lam=0.0)
    torch.testing.assert_close(a0, r + 0.9 * nv - v)
    # with next_values[t] = values[t+1] the deltas telescope
    a1, ret1 = gae(r, v, nv[-1], gamma=1.0, lam=1.0)
    mc = r.flip(0).cumsum(0).flip(0) + nv[-1]
    torch.testing.assert_close(a1, mc - v)
    torch.testing.assert_close(ret1, mc)


def test_gae_validation():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, x, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, x, gamma=0.9, lam=-0.1)
    with pytest.raises(ValueError, match="next_values"):
        gae(x, x, torch.zeros(3), gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        gae(torch.zeros(3), torch.zeros(3), torch.zeros(3), gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match="mask shape"):
        gae(x, x, x, gamma=0.9, lam=0.9, valid=torch.ones(2, 3, dtype=torch.bool))


def returns_reference(rewards, dones, valid, bootstrap, gamma):
    """Per env: R_t = sum of discounted rewards until the episode segment ends (float64 loop)."""
    r = np.asarray(rewards, dtype=np.float64)
    d, ok = np.asarray(dones, dtype=bool), np.asarray(valid, dtype=bool)
    T, N = r.shape
    out = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            if not ok[t, n]:
                continue
            total, w, s = 0.0, 1.0, t
            while True:
                total += w * r[s, n]
                if d[s, n] or (s + 1 < T and not ok[s + 1, n]):
                    break
                if s == T - 1:
                    total += w * gamma * float(bootstrap[n])
                    break
                s, w = s + 1, w * gamma
            out[t, n] = total
    return out


@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_discounted_returns_matches_reference(with_bootstrap):
    rewards, _, _, term, trunc, valid = _random_rollout(6)
    dones = term | trunc
    boot = torch.randn(rewards.shape[1], generator=torch.Generator().manual_seed(0))
    out = discounted_returns(rewards.double(), dones, gamma=0.9, valid=valid,
                             bootstrap=boot.double() if with_bootstrap else None)
    ref = returns_reference(rewards, dones, valid, boot if with_bootstrap else np.zeros(len(boot)),
                            0.9)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_discounted_returns_hand_computed():
    # one episode r = (1, 2, 3) ending at t=2, gamma 0.5: R = (1 + 1 + .75, 2 + 1.5, 3)
    r = torch.tensor([[1.0], [2.0], [3.0]])
    d = torch.tensor([[False], [False], [True]])
    torch.testing.assert_close(discounted_returns(r, d, gamma=0.5),
                               torch.tensor([[2.75], [3.5], [3.0]]))


def test_normalize_advantages_masked():
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 8, generator=g) < 0.6
    out = normalize_advantages(adv, mask, eps=1e-8)
    sel = adv.numpy()[mask.numpy()]
    expected = (sel - sel.mean()) / (sel.std() + 1e-8)
    np.testing.assert_allclose(out.numpy()[mask.numpy()], expected, rtol=1e-12)
    assert bool((out[~mask] == 0).all())
    full = normalize_advantages(adv)
    a = adv.numpy()
    np.testing.assert_allclose(full.numpy(), (a - a.mean()) / (a.std() + 1e-8), rtol=1e-12)
    # one counted entry: only centred (-> 0); none: zeros
    one = torch.zeros(5, 8, dtype=torch.bool)
    one[2, 3] = True
    assert bool((normalize_advantages(adv, one) == 0).all())
    assert bool((normalize_advantages(adv, torch.zeros_like(one)) == 0).all())
    assert math.isclose(float(normalize_advantages(torch.tensor([3.0, 3.0])).abs().sum()), 0.0)
