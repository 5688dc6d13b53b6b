"""Split-invariant sampling: chain noise drawn for the full batch in the sampler's own order
(replayed chains equal ``sampler.sample`` bit for bit; any subset of rows gets its rows)."""

from __future__ import annotations

import pytest
import torch

from pirl.flow import build_sampler
from pirl.runners.distributed import draw_chain_noise, sample_with_noise
from tests.runners.distributed.helpers import N, reset_kwargs

SAMPLERS = [("flow_noise", {}), ("flow_sde", {}), ("flow_sde", {"shared_across_batch": False}),
            ("ode", {})]


@pytest.mark.parametrize("kind,kw", SAMPLERS)
def test_replayed_chain_equals_sampler_sample_bitwise(setup, kind, kw):
    """Noise drawn in the sampler's order + replay == sampler.sample with the same generator."""
    env, policy = setup
    sampler = build_sampler(kind, num_steps=3, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim, **kw)
    obs = env.reset(**reset_kwargs(env))
    prefix = policy.encode_prefix({k: obs[k] for k in ("images", "state", "instruction")})
    with torch.no_grad():
        ref = sampler.sample(policy, prefix, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        noise = draw_chain_noise(sampler, policy, N, generator=g)
        got = sample_with_noise(sampler, policy, prefix, noise)
    for f in ("x", "mean", "std", "stochastic", "step_logp", "init_logp", "logp"):
        assert torch.equal(getattr(ref, f), getattr(got, f)), f
    # the generator is left where sampler.sample leaves it
    g_ref = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sampler.sample(policy, prefix, generator=g_ref)
    assert torch.equal(g.get_state(), g_ref.get_state())
    # rows sampled on their own get the same chain (up to batch-size float effects)
    with torch.no_grad():
        part = sample_with_noise(sampler, policy, policy.prefix_index(prefix, torch.arange(2, 5)),
                                 noise.rows(2, 5))
    torch.testing.assert_close(part.x, ref.x[2:5], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.logp, ref.logp[2:5], rtol=1e-5, atol=1e-4)
