"""Shared fixtures for the real-VLA tests: a word tokenizer, observations, and independent
re-implementations of the *joint* (uncached) forward passes used as references."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pirl.models.vla_tokenizer import WordTokenizer

SENTENCES = ["pick up the red cube", "put the bowl on the plate", "open the top drawer",
             "Task: , State: ; Action:"]


def make_tokenizer() -> WordTokenizer:
    return WordTokenizer.train(SENTENCES, [str(i) for i in range(256)])


def make_obs(b: int = 3, cams: int = 2, seed: int = 0, state_dim: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (b, cams, 3, 40, 48), generator=g, dtype=torch.uint8),
            "state": torch.rand(b, state_dim, generator=g) * 2 - 1,
            "instruction": [SENTENCES[i % 3] if i % 2 == 0 else "pick" for i in range(b)]}


# ----------------------------------------------------------------- reference math (independent)


def ref_rms(x, w=None, style="gemma", eps=1e-6, dense=None, cond=None):
    """RMSNorm, returns (y, gate)."""
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if dense is not None:
        sc, sh, gate = F.linear(cond, dense.weight, dense.bias)[:, None].chunk(3, -1)
        return y * (1 + sc) + sh, gate
    return (y * (1 + w) if style == "gemma" else y * w), None


def ref_rope(x, pos, theta=10000.0):
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos * theta^(-2i/d); x: [B, H, L, D], pos [B, L]."""
    d = x.shape[-1] // 2
    i = torch.arange(d, dtype=torch.float64)
    ang = pos.double()[:, None, :, None] * theta ** (-2 * i / (2 * d))
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    a, b = x[..., :d], x[..., d:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def ref_attn(q, k, v, allowed):
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D], allowed [B, Lq, Lk]."""
    g = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(-1, -1, g, -1, -1).reshape(q.shape[0], -1, *k.shape[2:])
    v = v[:, :, None].expand(-1, -1, g, -1, -1).reshape(q.shape[0], -1, *v.shape[2:])
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed[:, None], -1e30)
    out = s.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def heads(lin, x, hd):
    b, n, _ = x.shape
    return F.linear(x, lin.weight).view(b, n, -1, hd).transpose(1, 2)


def block_mask(pad, ar):
    c = ar.long().cumsum(1)
    return (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def mlp(m, x, act):
    g = F.linear(x, m.gate_proj.weight)
    g = F.gelu(g, approximate="tanh") if act == "gelu_tanh" else F.silu(g)
    return F.linear(g * F.linear(x, m.up_proj.weight), m.down_proj.weight)


def check_frozen_prefix_reuse(pol, obs: dict) -> None:
    """Freeze ``pol.prefix_parameter_names()`` (RL's expert_only), take an Adam step on a loss
    through the kept ``frozen_prefix`` cache, and check that re-encoding ``obs`` still equals that
    cache field by field and gives the same velocity: the learner may reuse it."""
    frozen = set(pol.prefix_parameter_names())
    for n, p in pol.named_parameters():
        p.requires_grad_(n not in frozen)
    b = len(obs["instruction"])
    with torch.no_grad():
        kept = pol.frozen_prefix(pol.encode_prefix(obs))
    opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad], lr=1e-2)
    prefix = pol.thaw_prefix(kept)
    x_t, t = torch.randn(b, pol.action_horizon, pol.action_dim), torch.rand(b)
    loss = pol.velocity(prefix, x_t, t).velocity.pow(2).mean() + pol.value(prefix).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        again = pol.encode_prefix(obs)
        for f in ("keys", "values", "pad_mask", "state", "pooled"):
            assert torch.equal(getattr(again, f), getattr(kept, f)), f
        torch.testing.assert_close(pol.velocity(pol.thaw_prefix(kept), x_t, t).velocity,
                                   pol.velocity(again, x_t, t).velocity, atol=0, rtol=0)
