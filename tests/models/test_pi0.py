"""pi0 / pi0.5 on tiny configs: cached prefix == joint forward, PPO step, train modes, SFT loss,
pi0.5 state tokens, gradient checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pirl.algos.ppo import policy_loss
from pirl.flow import FlowSDESampler
from pirl.models.base import index_batch, sample_flow_time
from pirl.models.lora import LoRALinear
from pirl.models.pi0 import Pi0Policy, tiny_pi0_config
from pirl.models.vla_common import TrainConfig, VLAPrefix, discretize_state

from vla_helpers import (block_mask, check_frozen_prefix_reuse, heads, make_obs, make_tokenizer,
                         mlp, ref_attn, ref_rms, ref_rope)

torch.set_num_threads(1)


def make_policy(pi05: bool, seed: int = 0, **kw) -> Pi0Policy:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    stats = {"state": {"mean": torch.full((4,), 0.1), "std": torch.full((4,), 0.5),
                       "q01": torch.full((4,), -0.9), "q99": torch.full((4,), 0.8)},
             "actions": {"mean": torch.full((4,), 0.2), "std": torch.full((4,), 2.0),
                         "q01": torch.full((4,), -2.0), "q99": torch.full((4,), 3.0)}}
    pol = Pi0Policy(tiny_pi0_config(pi05=pi05, vocab_size=len(tok), **kw), tok, norm_stats=stats)
    with torch.no_grad():  # non-trivial norms / adaRMS (zero-init in the real model)
        for n, p in pol.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight") or ".dense." in n:
                p.normal_(0, 0.3)
    return pol.to("cpu")  # exercises nn.Module._apply on the normaliser buffers


def joint_velocity(pol: Pi0Policy, obs, x_t, t):
    """openpi's uncached forward: both streams through every layer with one shared attention,
    written independently of the model's layer code."""
    x_pre, pad_pre, state = pol.embed_prefix(obs)
    fake = VLAPrefix(keys=None, values=None, pad_mask=pad_pre, state=state, pooled=None)
    x_suf, ar_suf, cond = pol.embed_suffix(fake, x_t, t)
    b, p = pad_pre.shape
    s = x_suf.shape[1]
    pad = torch.cat([pad_pre, torch.ones(b, s, dtype=torch.bool)], 1)
    ar = torch.cat([torch.zeros(b, p, dtype=torch.long), ar_suf], 1)
    allowed, pos = block_mask(pad, ar), pad.long().cumsum(1) - 1
    pwe = pol.paligemma_with_expert
    hd = pol.cfg.vlm.head_dim
    xs = [x_pre, x_suf]
    for l_vlm, l_exp in zip(pwe.vlm.layers, pwe.expert.layers):
        layers, conds = [l_vlm, l_exp], [None, cond]
        qs, ks, vs, gates = [], [], [], []
        for lay, x, c in zip(layers, xs, conds):
            nrm = lay.input_layernorm
            h, gate = ref_rms(x, getattr(nrm, "weight", None), dense=getattr(nrm, "dense", None),
                              cond=c)
            qs.append(heads(lay.self_attn.q_proj, h, hd))
            ks.append(heads(lay.self_attn.k_proj, h, hd))
            vs.append(heads(lay.self_attn.v_proj, h, hd))
            gates.append(gate)
        q = ref_rope(torch.cat(qs, 2), pos)
        k = ref_rope(torch.cat(ks, 2), pos)
        o = ref_attn(q, k, torch.cat(vs, 2), allowed)
        outs, start = [], 0
        for lay, x, c, gate in zip(layers, xs, conds, gates):
            a = F.linear(o[:, start:start + x.shape[1]], lay.self_attn.o_proj.weight)
            start += x.shape[1]
            x = x + (a if gate is None else a * gate)
            nrm = lay.post_attention_layernorm
            h, gate2 = ref_rms(x, getattr(nrm, "weight", None), dense=getattr(nrm, "dense", None),
                               cond=c)
            m = mlp(lay.mlp, h, "gelu_tanh")
            outs.append(x + (m if gate2 is None else m * gate2))
        xs = outs
    nrm = pwe.expert.norm
    out, _ = ref_rms(xs[1], getattr(nrm, "weight", None), dense=getattr(nrm, "dense", None),
                     cond=cond)
    return pol.action_out_proj(out[:, -pol.cfg.action_horizon:])


@pytest.mark.parametrize("pi05", [False, True])
def test_cached_prefix_equals_joint_forward(pi05):
    pol = make_policy(pi05).eval()
    obs = make_obs(b=3)
    obs["image_masks"] = torch.tensor([[True, True], [True, False], [True, True]])
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 6, 8, generator=g)
    t = torch.rand(3, generator=g)
    with torch.no_grad():
        prefix = pol.encode_prefix(obs)
        v_cached = pol.velocity(prefix, x_t, t).velocity
        v_joint = joint_velocity(pol, obs, x_t, t)
        # the same prefix reused for a second denoise step stays valid (cache not mutated)
        v_again = pol.velocity(prefix, x_t, t).velocity
    assert v_cached.shape == (3, 6, 8)
    torch.testing.assert_close(v_cached, v_joint, atol=1e-5, rtol=1e-5)
    assert torch.equal(v_cached, v_again)
    # padded prompts / masked cameras really vary across rows
    assert prefix.pad_mask.sum(1).unique().numel() > 1


@pytest.mark.parametrize("pi05", [False, True])
def test_prefix_index_selects_rows(pi05):
    pol = make_policy(pi05).eval()
    with torch.no_grad():
        prefix = pol.encode_prefix(make_obs(b=4))
        x_t, t = torch.randn(4, 6, 8), torch.rand(4)
        full = pol.velocity(prefix, x_t, t).velocity
        idx = torch.tensor([2, 0])
        sub = pol.velocity(pol.prefix_index(prefix, idx), x_t[idx], t[idx]).velocity
    torch.testing.assert_close(sub, full[idx], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pi05,mode", [(False, "expert_only"), (True, "lora"), (False, "full")])
def test_ppo_update_step(pi05, mode):
    """Sample a Flow-SDE chain, recompute its log-prob (equal at unchanged parameters), clipped
    surrogate + value loss, backward, Adam step; only the configured parameters move."""
    pol = make_policy(pi05)
    trainable = set(pol.configure_training(TrainConfig(mode=mode, lora_rank=2)))
    sampler = FlowSDESampler(num_steps=3, noise_level=0.5, hybrid=False)
    obs = make_obs(b=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prefix = pol.encode_prefix(obs)
        chain = sampler.sample(pol, prefix, generator=g)
        old_v = pol.value(prefix)
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad], lr=1e-3)
    prefix = pol.encode_prefix(obs)
    new = sampler.log_prob(pol, prefix, chain)
    torch.testing.assert_close(new.logp, chain.logp, atol=1e-4, rtol=1e-5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = policy_loss(new.logp, chain.logp, adv)
    v = pol.value(prefix)
    loss = loss + 0.5 * (v - (old_v + 1.0)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    grads = {n for n, p in pol.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable
    assert any("value_head" in n for n in grads)
    assert any("gemma_expert" in n for n in grads)
    opt.step()
    moved = {n for n, p in pol.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    vlm = [n for n in moved if ".paligemma." in n]
    if mode == "expert_only":
        assert not vlm
    elif mode == "lora":
        assert vlm and all(n.endswith(("lora_A", "lora_B")) for n in vlm)
    else:
        assert any("vision_tower" in n for n in vlm)


def test_lora_starts_as_identity_and_merges():
    pol = make_policy(False).eval()
    obs, x_t, t = make_obs(), torch.randn(3, 6, 8), torch.rand(3)
    with torch.no_grad():
        v0 = pol.velocity(pol.encode_prefix(obs), x_t, t).velocity
        pol.configure_training(TrainConfig(mode="lora", lora_rank=4))
        assert isinstance(pol.paligemma_with_expert.vlm.layers[0].self_attn.q_proj, LoRALinear)
        v1 = pol.velocity(pol.encode_prefix(obs), x_t, t).velocity
        torch.testing.assert_close(v0, v1, atol=0, rtol=0)
        lin = pol.paligemma_with_expert.vlm.layers[0].mlp.up_proj
        lin.lora_B.normal_()
        x = torch.randn(5, lin.in_features)
        expect = x @ lin.base.weight.T + lin.scale * (x @ lin.lora_A.T) @ lin.lora_B.T
        torch.testing.assert_close(lin(x), expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin.merged()(x), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pi05", [False, True])
def test_sft_loss_matches_manual(pi05):
    """sft_loss on env-space chunks == hand-built flow-matching loss over the env's dims."""
    pol = make_policy(pi05).eval()
    obs = make_obs()
    acts = torch.randn(3, 6, 4)
    loss = pol.sft_loss(obs, acts, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    nrm = pol.normalizer
    if pi05:
        a = 2 * (acts - nrm.actions_q01) / (nrm.actions_q99 - nrm.actions_q01 + 1e-6) - 1
    else:
        a = (acts - nrm.actions_mean) / (nrm.actions_std + 1e-6)
    a = F.pad(a, (0, 4))
    eps = torch.randn(a.shape, generator=g)
    t = sample_flow_time(3, generator=g)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    v = pol.velocity(pol.encode_prefix(obs), x_t, t).velocity
    manual = (v - (eps - a))[..., :4].pow(2).mean()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-5)
    # round trip env -> model -> env
    torch.testing.assert_close(pol.postprocess_actions(pol.preprocess_actions(acts)), acts,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pi05", [False, True])
def test_sft_loss_takes_given_noise_and_times(pi05):
    """With ``noise`` (model space, padded to 8 dims) and ``time`` given, sft_loss uses them
    (RL's demo term passes the trainer's draws) and still counts only the env's 4 dims: the
    padded dims' error is left out, whatever it is."""
    pol = make_policy(pi05).eval()
    obs = make_obs()
    acts = torch.randn(3, 6, 4)
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(3, 6, 8, generator=g)
    t = sample_flow_time(3, generator=g)
    loss = pol.sft_loss(obs, acts, noise=eps, time=t)
    a = pol.preprocess_actions(acts)
    assert a.shape == (3, 6, 8) and torch.all(a[..., 4:] == 0)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    err = (pol.velocity(pol.encode_prefix(obs), x_t, t).velocity - (eps - a)).pow(2)
    assert float(err[..., 4:].mean()) > 0.01  # the padded dims do have an error
    torch.testing.assert_close(loss, err[..., :4].mean(), atol=1e-6, rtol=1e-5)
    mask = torch.ones(3, 6)
    mask[:, 4:] = 0.0  # and a padded time-step mask composes with the dims mask
    torch.testing.assert_close(pol.sft_loss(obs, acts, mask=mask, noise=eps, time=t),
                               err[:, :4, :4].mean(), atol=1e-6, rtol=1e-5)


def test_pi05_state_in_prompt():
    s = torch.tensor([[-1.0, -0.999, 0.0, 0.5, 0.99999, 1.0, 1.5, -1.5]])
    expect = np.digitize(s.numpy(), bins=np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(s) == expect.tolist()
    pol = make_policy(True)
    st = torch.tensor([[0.1, -0.2, 0.3, 0.4]])
    ids, mask = pol.tokenize(["pick up the red cube"], st)
    bins = discretize_state(st)[0]
    words = pol.tokenizer.encode(f"Task: pick up the red cube, State: {' '.join(map(str, bins))};"
                                 "\nAction: ", add_bos=True)
    assert ids[0, : int(mask.sum())].tolist() == words
    # different states -> different prefixes (state only enters through the prompt)
    obs1, obs2 = make_obs(b=1, seed=0), make_obs(b=1, seed=0)
    obs2["state"] = obs2["state"] + 0.5
    with torch.no_grad():
        k1 = pol.encode_prefix(obs1).keys
        k2 = pol.encode_prefix(obs2).keys
    assert not torch.allclose(k1, k2)


def test_gradient_checkpointing_same_grads():
    grads = []
    for ckpt in (False, True):
        pol = make_policy(False, seed=4).train()
        pol.configure_training(TrainConfig(mode="full", gradient_checkpointing=ckpt))
        loss = pol.sft_loss(make_obs(), torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0)),
                            generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in pol.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_value_placements():
    for placement in ("expert", "prefix"):
        pol = make_policy(False, value_placement=placement)
        with torch.no_grad():
            pol.value_head.net[-1].weight.normal_()
        prefix = pol.encode_prefix(make_obs())
        v = pol.value(prefix)
        assert v.shape == (3,) and torch.isfinite(v).all()
        v.sum().backward()
        # critic input detached: no gradient reaches the VLM / expert
        assert all(p.grad is None for n, p in pol.named_parameters() if "value_head" not in n)
        sub = index_batch(prefix, torch.tensor([1]))
        torch.testing.assert_close(pol.value(sub), v[1:2].detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pi05", [False, True])
def test_frozen_prefix_stays_valid_after_an_expert_only_step(pi05):
    """With prefix_parameter_names frozen (RL's expert_only), an Adam step on a loss through the
    kept cache leaves re-encoding equal to that cache, so the learner may reuse it."""
    pol = make_policy(pi05)
    frozen = set(pol.prefix_parameter_names())
    assert frozen and all(".paligemma." in n for n in frozen)
    assert not any("gemma_expert" in n or n.startswith("value_head") for n in frozen)
    check_frozen_prefix_reuse(pol, make_obs(b=3))
