"""Compute precision: ``precision`` resolution and the float32 boundary of a bf16 policy."""

import pytest
import torch

from pirl.flow import SamplerConfig, build_sampler
from pirl.models import build_policy
from pirl.models import precision as prec


def test_resolve_precision(monkeypatch):
    assert prec.resolve_precision("fp32", "cpu") is None
    assert prec.resolve_precision("bf16", "cpu") is torch.bfloat16
    assert prec.resolve_precision("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert prec.resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ())
    assert prec.resolve_precision("auto", "cpu") is None
    with pytest.raises(ValueError, match="precision"):
        prec.resolve_precision("fp16", "cpu")
    assert prec.precision_name(None) == "fp32" and prec.precision_name(torch.bfloat16) == "bf16"


def test_cpu_flags_come_from_cpuinfo():
    """The detected flags are the native-bf16 ones /proc/cpuinfo lists (none off Linux)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert set(prec.cpu_bf16_flags()) == flags & {"amx_bf16", "avx512_bf16"}


def _tiny(**kw):
    torch.manual_seed(0)
    return build_policy("tiny", action_horizon=4, action_dim=3, state_dim=4, num_cameras=2,
                        width=32, depth=2, heads=2, conv_channels=[8, 16], value_hidden=32,
                        vocab=["push", "the", "red", "block"], **kw)


def _obs(b=6):
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randint(0, 256, (b, 2, 3, 32, 32), generator=g, dtype=torch.uint8),
            "state": torch.randn(b, 4, generator=g),
            "instruction": ["push the red block"] * b}


@pytest.mark.parametrize("value_head", ["expert", "prefix"])
def test_bf16_tiny_vla_returns_float32_close_to_fp32(value_head):
    """Under bf16 the policy's parameters stay float32, its matmuls run in bf16 (the outputs
    differ from float32's, by bf16 rounding only) and every output that leaves the policy --
    velocity, features, value -- is float32; gradients reach the float32 parameters."""
    ref, pol = _tiny(value_head=value_head), _tiny(value_head=value_head)
    pol.set_precision(torch.bfloat16)
    obs, x = _obs(), torch.randn(6, 4, 3)
    t = torch.rand(6)
    p32, p16 = ref.encode_prefix(obs), pol.encode_prefix(obs)
    o32, o16 = ref.velocity(p32, x, t), pol.velocity(p16, x, t)
    v32, v16 = ref.value(p32), pol.value(p16)
    for a, b in ((o32.velocity, o16.velocity), (o32.features, o16.features), (v32, v16)):
        assert b.dtype == torch.float32
        assert not torch.equal(a, b)          # bf16 really ran
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.1)
    assert all(p.dtype == torch.float32 for p in pol.parameters())
    loss = o16.velocity.square().mean() + v16.square().mean()
    loss.backward()
    grads = [p.grad for p in pol.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fp32_precision_is_the_plain_path():
    """``set_precision(None)`` is no autocast: outputs equal a policy never told a precision."""
    ref, pol = _tiny(), _tiny().set_precision(None)
    obs, x, t = _obs(), torch.randn(6, 4, 3), torch.rand(6)
    a = ref.velocity(ref.encode_prefix(obs), x, t).velocity
    b = pol.velocity(pol.encode_prefix(obs), x, t).velocity
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["flow_sde", "flow_noise"])
def test_bf16_chain_is_float32_and_its_logp_recomputes(kind):
    """A bf16 policy's denoising chain (states, means, stds, log-probs) is float32, and the
    sampler's recomputation reproduces the rollout's log-probs."""
    pol = _tiny().set_precision(torch.bfloat16)
    smp = build_sampler(kind, 3, pol.feature_dim, pol.action_dim,
                        config=SamplerConfig(kind=kind, hybrid=False))
    with torch.no_grad():
        prefix = pol.encode_prefix(_obs())
        chain = smp.sample(pol, prefix, generator=torch.Generator().manual_seed(0))
    for f in ("x", "mean", "std", "step_logp", "init_logp", "logp"):
        assert getattr(chain, f).dtype == torch.float32, f
    new = smp.log_prob(pol, pol.encode_prefix(_obs()), chain)
    torch.testing.assert_close(new.logp, chain.logp, atol=1e-5, rtol=0)
