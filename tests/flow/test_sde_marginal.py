"""Monte-Carlo checks that Flow-SDE samples have the ODE's marginals (Gaussian-to-Gaussian flow).

For the analytic flow of ``conftest.GaussianFlow`` the velocity is affine in ``x``, so every
transition of the discretised chains is linear-Gaussian and the exact moments of the *discrete*
chain can be propagated in closed form (python floats, per dimension).  Two checks:

1. at the practical K = 4, MC moments of the sampler match the closed-form moments of the chain
   it claims to sample (joint, hybrid shared / per-sample), for several noise levels;
2. with a fine grid (K = 64), where discretisation error is small, the SDE's final (t = 0) and
   intermediate (t = 0.5) marginals match both the ODE's and the exact flow marginal
   ``N((1 - t) mu, t^2 + (1 - t)^2 s^2)``, for several noise levels, joint and hybrid.
"""

from __future__ import annotations

import math

import pytest
import torch

from pirl.flow import FlowSDESampler, ODESampler

MU = [0.7, -1.0]
S = [0.5, 1.5]


def affine_velocity(t: float, mu: float, s: float) -> tuple[float, float]:
    """v(x, t) = alpha x + beta for the exact flow N(0,1) -> N(mu, s^2) (one dimension)."""
    var = t * t + (1 - t) ** 2 * s * s
    # E[eps|x] - E[a|x] = (t - (1 - t) s^2) (x - (1 - t) mu) / var - mu
    alpha = (t - (1 - t) * s * s) / var
    return alpha, -mu - alpha * (1 - t) * mu


def chain_moments(K: int, a: float, stochastic: list[bool], mu: float, s: float
                  ) -> list[tuple[float, float]]:
    """Exact (mean, var) of x_0 .. x_K of the discrete chain (one dimension)."""
    grid = [1.0 - k / K for k in range(K)] + [0.0]
    m, v = 0.0, 1.0
    out = [(m, v)]
    for k in range(K):
        t, tn = grid[k], grid[k + 1]
        dt = t - tn
        al, be = affine_velocity(t, mu, s)
        if stochastic[k]:
            sig = a * math.sqrt(t / (1 - (grid[1] if t == 1.0 else t)))
            ce = tn - sig * sig * dt / (2 * t)
            ca = 1 - tn
            # mean = ca (x - t v) + ce (x + (1 - t) v), v = al x + be
            c1 = ca * (1 - t * al) + ce * (1 + (1 - t) * al)
            c0 = -ca * t * be + ce * (1 - t) * be
            m, v = c1 * m + c0, c1 * c1 * v + sig * sig * dt
        else:
            m, v = (1 - al * dt) * m - be * dt, (1 - al * dt) ** 2 * v
        out.append((m, v))
    return out


def mixture(moments: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean and variance of an equal-weight mixture of Gaussians."""
    n = len(moments)
    m = sum(mm for mm, _ in moments) / n
    second = sum(vv + mm * mm for mm, vv in moments) / n
    return m, second - m * m


def mc_moments(pol, sampler, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample n chains; return per-step means / variances ``[K+1, A]``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, len(MU), generator=g, dtype=torch.float64)
    with torch.no_grad():
        chain = sampler.sample(pol, torch.zeros(n, 1), noise=noise, generator=g)
    x = chain.x[:, :, 0]  # [n, K+1, A]
    return x.mean(0), x.var(0)


def assert_moments(mean, var, ref_mean, ref_var, n, z=4.5, extra=0.0):
    """Within z standard errors (plus an optional relative slack ``extra`` for bias)."""
    se_m = math.sqrt(ref_var / n)
    se_v = ref_var * math.sqrt(2.0 / (n - 1))
    assert abs(mean - ref_mean) < z * se_m + extra * math.sqrt(ref_var), (mean, ref_mean)
    assert abs(var - ref_var) < z * se_v + extra * ref_var, (var, ref_var)


@pytest.mark.parametrize("a", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("mode", ["joint", "hybrid_shared", "hybrid_per_sample"])
def test_mc_matches_exact_discrete_chain(gaussian_flow, a, mode):
    K, n = 4, 40000
    pol = gaussian_flow(MU, S)
    sampler = FlowSDESampler(K, noise_level=a, hybrid=mode != "joint",
                             shared_across_batch=mode == "hybrid_shared")
    if mode == "hybrid_shared":  # one draw per batch: check each drawn step separately
        g = torch.Generator().manual_seed(0)
        for step in range(K):
            fixed = FlowSDESampler(K, noise_level=a, hybrid=True, stochastic_steps=[step])
            mean, var = mc_moments(pol, fixed, n // 4, seed=step)
            for d in range(len(MU)):
                ref = chain_moments(K, a, [k == step for k in range(K)], MU[d], S[d])[-1]
                assert_moments(mean[-1, d].item(), var[-1, d].item(), *ref, n // 4)
        masks = torch.stack([sampler.stochastic_mask(8, torch.device("cpu"), g) for _ in range(50)])
        assert (masks.sum(-1) == 1).all() and (masks == masks[:, :1]).all()
        return
    mean, var = mc_moments(pol, sampler, n, seed=1)
    for d in range(len(MU)):
        if mode == "joint":
            refs = chain_moments(K, a, [True] * K, MU[d], S[d])
            for k in range(K + 1):
                assert_moments(mean[k, d].item(), var[k, d].item(), *refs[k], n)
        else:
            ref = mixture([chain_moments(K, a, [k == j for k in range(K)], MU[d], S[d])[-1]
                           for j in range(K)])
            assert_moments(mean[-1, d].item(), var[-1, d].item(), *ref, n)


@pytest.mark.parametrize("a", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("hybrid", [False, True])
def test_sde_preserves_flow_marginals_fine_grid(gaussian_flow, a, hybrid):
    K, n = 64, 20000
    pol = gaussian_flow(MU, S)
    # hybrid: a fixed set of stochastic steps covering the whole trajectory (every 4th step)
    steps = list(range(0, K, 4)) if hybrid else None
    sde = FlowSDESampler(K, noise_level=a, hybrid=hybrid, stochastic_steps=steps)
    mean, var = mc_moments(pol, sde, n, seed=7)
    ode_mean, ode_var = mc_moments(pol, ODESampler(K), n, seed=8)
    for d in range(len(MU)):
        for k, t in ((K // 2, 0.5), (K, 0.0)):
            true_m = (1 - t) * MU[d]
            true_v = t * t + (1 - t) ** 2 * S[d] ** 2
            # discretisation bias at K = 64 is a few percent of the variance
            assert_moments(mean[k, d].item(), var[k, d].item(), true_m, true_v, n, extra=0.06)
            assert_moments(ode_mean[k, d].item(), ode_var[k, d].item(), true_m, true_v, n,
                           extra=0.06)
            assert_moments(mean[k, d].item(), var[k, d].item(), ode_mean[k, d].item(),
                           ode_var[k, d].item(), n, extra=0.06)
    # not trivially ODE: the SDE really injected noise
    assert sde.noise_level > 0


def test_closed_form_reference_detects_a_wrong_sde(gaussian_flow):
    """Sanity of the check itself: dropping the drift correction ``sigma^2 dt / (2t)`` inflates
    the final variance far beyond the tolerance used above (so the tests can fail)."""
    K, a = 64, 0.5
    good = chain_moments(K, a, [True] * K, MU[1], S[1])[-1][1]
    grid = [1.0 - k / K for k in range(K)] + [0.0]
    m, v = 0.0, 1.0
    for k in range(K):  # Euler + noise without the score correction
        t, tn = grid[k], grid[k + 1]
        al, be = affine_velocity(t, MU[1], S[1])
        sig = a * math.sqrt(t / (1 - (grid[1] if t == 1.0 else t)))
        m, v = (1 - al * (t - tn)) * m - be * (t - tn), (1 - al * (t - tn)) ** 2 * v + sig ** 2 * (t - tn)
    true_v = S[1] ** 2
    assert abs(good - true_v) < 0.06 * true_v
    assert abs(v - true_v) > 0.2 * true_v
