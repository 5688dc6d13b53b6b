"""SmolVLA on a tiny config: cached prefix == LeRobot-style joint forward, PPO step, pixel
shuffle, config parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pirl.algos.ppo import policy_loss
from pirl.flow import FlowNoiseSampler, FlowSDESampler
from pirl.models.smolvla import (SmolVLAConfig, SmolVLAPolicy, expert_mlp_dim, pixel_shuffle,
                                 tiny_smolvla_config)
from pirl.models.vla_common import TrainConfig
from pirl.models.vla_layers import sinusoidal_time_embedding

from vla_helpers import (block_mask, check_frozen_prefix_reuse, heads, make_obs, make_tokenizer,
                         mlp, ref_attn, ref_rms, ref_rope)

torch.set_num_threads(1)


def make_policy(seed: int = 0, **kw) -> SmolVLAPolicy:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    stats = {"state": {"mean": torch.full((4,), -0.1), "std": torch.full((4,), 0.7)},
             "actions": {"mean": torch.full((4,), 0.3), "std": torch.full((4,), 1.5)}}
    pol = SmolVLAPolicy(tiny_smolvla_config(vocab_size=len(tok), **kw), tok, norm_stats=stats)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    return pol


def joint_velocity(pol: SmolVLAPolicy, obs, x_t, t):
    """LeRobot's training forward (prefix and suffix in one pass, cross-attention layers reading
    the same layer's prefix keys / values), written independently of the model's layer code."""
    x_pre, pad_pre, ar_pre, _ = pol.embed_prefix(obs)
    act = pol.action_in_proj(x_t)
    temb = sinusoidal_time_embedding(t, act.shape[-1])
    x_suf = pol.action_time_mlp_out(F.silu(pol.action_time_mlp_in(
        torch.cat([act, temb[:, None].expand_as(act)], -1))))
    b, p = pad_pre.shape
    h = x_suf.shape[1]
    pad = torch.cat([pad_pre, torch.ones(b, h, dtype=torch.bool)], 1)
    ar = torch.cat([ar_pre, torch.ones(b, h, dtype=torch.long)], 1)
    allowed, pos = block_mask(pad, ar), pad.long().cumsum(1) - 1
    vwe = pol.vlm_with_expert
    hd = pol.cfg.vlm.head_dim
    eps = pol.cfg.vlm.eps

    def norm(n, x):
        return ref_rms(x, n.weight, style="llama", eps=eps)[0]

    def finish(lay, x, o):
        x = x + F.linear(o, lay.self_attn.o_proj.weight)
        return x + mlp(lay.mlp, norm(lay.post_attention_layernorm, x), "silu")

    for i, (lv, le) in enumerate(zip(vwe.text.layers, vwe.lm_expert.layers)):
        hp, hs = norm(lv.input_layernorm, x_pre), norm(le.input_layernorm, x_suf)
        qp, kp, vp = (heads(getattr(lv.self_attn, f"{c}_proj"), hp, hd) for c in "qkv")
        if i % 2 == 0:  # self-attention: one attention over both streams
            qs, ks, vs = (heads(getattr(le.self_attn, f"{c}_proj"), hs, hd) for c in "qkv")
            o = ref_attn(ref_rope(torch.cat([qp, qs], 2), pos), ref_rope(torch.cat([kp, ks], 2), pos),
                         torch.cat([vp, vs], 2), allowed)
            op, os_ = o[:, :p], o[:, p:]
        else:  # cross-attention
            kp_rot = ref_rope(kp, pos[:, :p])
            op = ref_attn(ref_rope(qp, pos[:, :p]), kp_rot, vp, allowed[:, :p, :p])
            spos = pos[:, p:] - pos[:, p:].min(1, keepdim=True).values
            qs = ref_rope(heads(le.self_attn.q_proj, hs, hd), spos)
            flat = lambda z: z.transpose(1, 2).flatten(2)  # noqa: E731
            ks = heads(le.self_attn.k_proj, flat(kp_rot), hd)
            vs = heads(le.self_attn.v_proj, flat(vp), hd)
            os_ = ref_attn(qs, ks, vs, allowed[:, p:, :p])
        x_pre, x_suf = finish(lv, x_pre, op), finish(le, x_suf, os_)
    return pol.action_out_proj(norm(vwe.lm_expert.norm, x_suf))


def test_cached_prefix_equals_joint_forward():
    pol = make_policy().eval()
    obs = make_obs(b=3)
    obs["image_masks"] = torch.tensor([[True, False], [True, True], [True, True]])
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(3, 6, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        prefix = pol.encode_prefix(obs)
        v = pol.velocity(prefix, x_t, t).velocity
        ref = joint_velocity(pol, obs, x_t, t)
        v2 = pol.velocity(prefix, x_t, t).velocity
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, v2)
    # action tokens attend causally: changing the last action leaves the first velocity alone
    x2 = x_t.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        v3 = pol.velocity(prefix, x2, t).velocity
    torch.testing.assert_close(v3[:, 0], v[:, 0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(v3[:, -1], v[:, -1])


def test_pixel_shuffle_matches_definition():
    """Output token (I, J) stacks the r x r block of input patches at rows r I.., cols r J..,
    channel order (row-in-block, col-in-block, channel) as Idefics3's reshape chain gives."""
    b, s, d, r = 2, 4, 3, 2
    x = torch.randn(b, s * s, d)
    y = pixel_shuffle(x, r)
    assert y.shape == (b, (s // r) ** 2, d * r * r)
    grid = x.view(b, s, s, d)
    for bi in range(s // r):
        for bj in range(s // r):
            tok = y[:, bi * (s // r) + bj].view(b, r, r, d)  # [b, row-in-block, col-in-block, d]
            for a in range(r):
                for c in range(r):
                    torch.testing.assert_close(tok[:, a, c], grid[:, bi * r + a, bj * r + c])


@pytest.mark.parametrize("mode", ["expert_only", "full"])
def test_ppo_update_step(mode):
    pol = make_policy()
    trainable = set(pol.configure_training(TrainConfig(mode=mode)))
    obs = make_obs(b=4)
    for sampler in (FlowSDESampler(num_steps=2, hybrid=True),
                    FlowNoiseSampler(num_steps=2, feature_dim=pol.feature_dim, action_dim=8)):
        with torch.no_grad():
            chain = sampler.sample(pol, pol.encode_prefix(obs), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad]
                               + list(sampler.parameters()), lr=1e-3)
        before = {n: q.detach().clone() for n, q in pol.named_parameters()}
        prefix = pol.encode_prefix(obs)
        new = sampler.log_prob(pol, prefix, chain)
        torch.testing.assert_close(new.logp, chain.logp, atol=1e-4, rtol=1e-5)
        loss, _ = policy_loss(new.logp, chain.logp, torch.tensor([1.0, -1.0, 2.0, 0.0]))
        loss = loss + pol.value(prefix).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved = {n for n, q in pol.named_parameters() if not torch.equal(q, before[n])}
        assert moved and moved <= trainable
        assert any("lm_expert" in n for n in moved)
        assert (mode == "full") == any(".vlm." in n for n in moved)


def test_config_sizes():
    assert expert_mlp_dim(720) == 2048  # LeRobot's get_intermediate_size for SmolVLA's expert
    tiny = make_policy()
    n_model = sum(p.numel() for n, p in tiny.named_parameters() if "value_head" not in n)
    assert n_model == tiny.cfg.num_params()
    real = SmolVLAConfig()
    assert real.expert.width == 720 and real.expert.depth == 16
    assert 3.5e8 < real.num_params() < 5e8


def test_frozen_prefix_stays_valid_after_an_expert_only_step():
    """As for pi0: with the VLM and the state projection frozen, the rollout's cache equals a
    re-encoding after an update of everything else."""
    pol = make_policy()
    frozen = set(pol.prefix_parameter_names())
    assert "state_proj.weight" in frozen and any(n.startswith("vlm_with_expert.vlm.")
                                                 for n in frozen)
    assert not any("lm_expert" in n or n.startswith("value_head") for n in frozen)
    check_frozen_prefix_reuse(pol, make_obs(b=3))


def test_sft_loss_normalises_pads_and_takes_given_noise_and_times():
    """sft_loss on env-space chunks ``[B, H, 4]``: mean-std normalised, padded to the model's 8
    dims, the given noise / times used, and only the env's 4 dims counted (the padded dims'
    error is left out, whatever it is); a padded time-step mask composes with it."""
    pol = make_policy().eval()
    obs = make_obs()
    acts = torch.randn(3, 6, 4)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(3, 6, 8, generator=g)
    t = torch.rand(3, generator=g)
    a = F.pad((acts - 0.3) / (1.5 + 1e-6), (0, 4))  # the stats of make_policy
    torch.testing.assert_close(pol.preprocess_actions(acts), a, atol=1e-5, rtol=1e-5)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    err = (pol.velocity(pol.encode_prefix(obs), x_t, t).velocity - (eps - a)).pow(2)
    assert float(err[..., 4:].mean()) > 0.01
    torch.testing.assert_close(pol.sft_loss(obs, acts, noise=eps, time=t), err[..., :4].mean(),
                               atol=1e-6, rtol=1e-5)
    mask = torch.ones(3, 6)
    mask[:, 3:] = 0.0
    torch.testing.assert_close(pol.sft_loss(obs, acts, mask=mask, noise=eps, time=t),
                               err[:, :3, :4].mean(), atol=1e-6, rtol=1e-5)
