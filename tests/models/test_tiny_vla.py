"""TinyVLA and WordTokenizer: shapes, prefix caching against an uncached float64 reference,
masking, SFT training, both value-head placements, config round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pirl.flow import build_sampler
from pirl.models import (TinyVLA, TinyVLAConfig, WordTokenizer, available_policies, build_policy,
                         vocab_from_texts)
from pirl.models.tiny_vla import sinusoidal_embedding

TEXTS = ["pick up the red cube", "push the blue cube to the goal", "open the drawer"]
VOCAB = vocab_from_texts(TEXTS)


def small_cfg(**kw) -> dict:
    cfg = dict(action_dim=3, state_dim=5, action_horizon=4, width=32, depth=2, heads=2,
               conv_channels=[8, 16], value_hidden=32, vocab=VOCAB)
    cfg.update(kw)
    return cfg


def make_obs(b: int, cams: int = 1, seed: int = 0, state_dim: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = TEXTS + ["pick the zebra", ""]
    obs = {"state": torch.randn(b, state_dim, generator=g),
           "instruction": [texts[i % len(texts)] for i in range(b)]}
    if cams:
        obs["images"] = torch.randint(0, 256, (b, cams, 3, 64, 64), generator=g, dtype=torch.uint8)
    return obs


# ------------------------------------------------------------------------------- tokenizer
def test_word_tokenizer():
    tok = WordTokenizer.from_texts(TEXTS, max_len=6)
    assert tok.itos[:2] == ["<pad>", "<unk>"] and tok.vocab_size == 2 + len(VOCAB)
    ids, mask = tok.encode(["Pick up the RED cube!", "pick the zebra", ""])
    assert ids.shape == (3, 6) and mask.dtype == torch.bool
    pick, the, red = tok.stoi["pick"], tok.stoi["the"], tok.stoi["red"]
    assert ids[0, :5].tolist() == [pick, tok.stoi["up"], the, red, tok.stoi["cube"]]
    assert ids[1, :3].tolist() == [pick, the, tok.unk_id]          # unknown word -> <unk>
    assert ids[2].tolist() == [tok.unk_id] + [0] * 5              # empty text -> one <unk>
    assert mask.sum(1).tolist() == [5, 3, 1]
    long_ids, _ = tok.encode(["the " * 20])
    assert (long_ids == the).all()                                 # truncated to max_len
    assert tok.decode(ids[1]) == "pick the <unk>"
    # serialisation round trip (dict and JSON); whole texts are accepted as vocabulary entries
    tok2 = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert tok2 == tok and torch.equal(tok2.encode(["pick up the red cube"])[0],
                                       tok.encode(["pick up the red cube"])[0])
    assert WordTokenizer(TEXTS, max_len=6) == tok


# ------------------------------------------------------------------------------- structure
def test_default_size_and_shapes():
    pol = build_policy("tiny", vocab=VOCAB, action_dim=4, state_dim=8)
    n = pol.num_parameters()
    assert 5e5 < n < 3e6, n  # "a few million at most": about 1.3M by default
    assert "tiny" in available_policies()
    obs = make_obs(3, state_dim=8)
    prefix = pol.encode_prefix(obs)
    p_len = 16 + 16 + 1  # 4x4 image tokens, max_text_len, state
    assert prefix.tokens.shape == (3, p_len, 128) and prefix.mask.shape == (3, p_len)
    assert prefix.kv.shape == (3, 3, 2, 4, p_len, 32)
    out = pol.velocity(prefix, torch.randn(3, 8, 4), torch.rand(3))
    assert out.velocity.shape == (3, 8, 4) and out.features.shape == (3, 8, pol.feature_dim)
    assert pol.value(prefix).shape == (3,)


@pytest.mark.parametrize("cams,state_dim", [(2, 5), (0, 5), (1, 0)])
def test_camera_and_state_variants(cams, state_dim):
    pol = TinyVLA(TinyVLAConfig(**small_cfg(num_cameras=cams, state_dim=state_dim)))
    obs = make_obs(4, cams=cams, state_dim=max(state_dim, 1))
    loss = pol.sft_loss(obs, torch.randn(4, 4, 3))
    loss.backward()
    assert torch.isfinite(loss)
    if cams == 2:  # both cameras reach the output
        pol.zero_grad()
        prefix = pol.encode_prefix(obs)
        x = torch.randn(4, 4, 3)
        img = obs["images"].clone()
        img[:, 1] = 255 - img[:, 1]
        v2 = pol.velocity(pol.encode_prefix({**obs, "images": img}), x, torch.full((4,), 0.5))
        assert (v2.velocity - pol.velocity(prefix, x, torch.full((4,), 0.5)).velocity).abs().max() > 1e-4


def test_bad_config_raises():
    with pytest.raises(ValueError, match="value_head"):
        TinyVLAConfig(value_head="middle")
    with pytest.raises(ValueError, match="width"):
        TinyVLAConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="action_horizon"):
        TinyVLAConfig(action_horizon=0)
    with pytest.raises(ValueError, match="bogus"):
        build_policy("tiny", bogus=1)
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("gpt")
    pol = TinyVLA(TinyVLAConfig(**small_cfg()))
    with pytest.raises(ValueError, match="images"):
        pol.encode_prefix({**make_obs(2), "images": torch.zeros(2, 2, 3, 64, 64, dtype=torch.uint8)})


def test_get_config_rebuilds_identical_model():
    pol = build_policy("tiny", **small_cfg(value_head="prefix"))
    cfg = json.loads(json.dumps(pol.get_config()))  # JSON-safe
    assert cfg["vocab"] == VOCAB and cfg["value_head"] == "prefix"
    pol2 = build_policy("tiny", **cfg)
    pol2.load_state_dict(pol.state_dict())
    obs, x, t = make_obs(3), torch.randn(3, 4, 3), torch.rand(3)
    with torch.no_grad():
        a = pol.velocity(pol.encode_prefix(obs), x, t).velocity
        b = pol2.velocity(pol2.encode_prefix(obs), x, t).velocity
    assert torch.equal(a, b)
    # the runner's alias
    cfg = small_cfg()
    del cfg["vocab"]
    assert build_policy("tiny", **cfg, vocabulary=TEXTS).cfg.vocab == TEXTS
    assert build_policy("tiny", **cfg, vocabulary=TEXTS).tokenizer.words == VOCAB


# ------------------------------------------------------------------------------- prefix caching
def _reference_velocity(pol: TinyVLA, obs: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Uncached float64 velocity: recomputes the prefix and, in every expert layer, the
    cross-attention keys/values from the prefix tokens, with explicit softmax attention."""
    pol = pol.double()
    x, t = x.double(), t.double()
    tokens, mask = pol._prefix_tokens(obs)
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)

    def attend(q, k, v, heads, bias_k):
        b, nq, d = q.shape
        dh = d // heads
        q = q.view(b, nq, heads, dh).transpose(1, 2)
        k = k.view(b, -1, heads, dh).transpose(1, 2)
        v = v.view(b, -1, heads, dh).transpose(1, 2)
        w = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if bias_k is not None:
            w = w + bias_k[:, None, None, :]
        return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)

    heads = pol.cfg.heads
    h = tokens
    for blk in pol.prefix_blocks:
        q, k, v = blk.attn.qkv(blk.norm1(h)).chunk(3, -1)
        h = h + blk.attn.out(attend(q, k, v, heads, bias))
        h = h + blk.mlp(blk.norm2(h))
    ctx = pol.prefix_norm(h)
    a = pol.action_in(x)
    te = sinusoidal_embedding(t, pol.feature_dim)[:, None].expand_as(a)
    h = pol.action_time_mlp(torch.cat([a, te], -1)) + pol.action_pos
    for blk in pol.expert_blocks:
        q, k, v = blk.self_attn.qkv(blk.norm1(h)).chunk(3, -1)
        h = h + blk.self_attn.out(attend(q, k, v, heads, None))
        k, v = blk.cross_attn.kv(ctx).chunk(2, -1)
        h = h + blk.cross_attn.out(attend(blk.cross_attn.q(blk.norm2(h)), k, v, heads, bias))
        h = h + blk.mlp(blk.norm3(h))
    return pol.action_out(pol.expert_norm(h))


def test_cached_prefix_matches_uncached_reference():
    torch.manual_seed(0)
    pol = TinyVLA(TinyVLAConfig(**small_cfg()))
    obs = make_obs(5)
    prefix32 = pol.encode_prefix(obs)
    pol.double()
    prefix = pol.encode_prefix(obs)  # the cached path in float64: must match to rounding
    with torch.no_grad():
        for step in range(3):  # the same cache serves several velocity calls
            x, t = torch.randn(5, 4, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
            v = pol.velocity(prefix, x, t).velocity
            ref = _reference_velocity(pol, obs, x, t)
            torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-10)
            pol.float()  # and the float32 cache agrees to float32 precision
            v32 = pol.velocity(prefix32, x.float(), t.float()).velocity
            pol.double()
            torch.testing.assert_close(v32.double(), ref, rtol=1e-3, atol=1e-4)


def test_sampling_never_recomputes_the_prefix():
    pol = TinyVLA(TinyVLAConfig(**small_cfg()))
    calls = {"prefix": 0, "expert": 0}
    pol.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("prefix", calls["prefix"] + 1))
    pol.prefix_blocks[0].register_forward_hook(lambda *a: calls.__setitem__("prefix", calls["prefix"] + 1))
    pol.expert_blocks[0].register_forward_hook(lambda *a: calls.__setitem__("expert", calls["expert"] + 1))
    with torch.no_grad():
        prefix = pol.encode_prefix(make_obs(6))
        assert calls == {"prefix": 2, "expert": 0}
        for kind in ("ode", "flow_noise", "flow_sde"):
            build_sampler(kind, 5, pol.feature_dim, pol.action_dim).sample(pol, prefix)
    assert calls == {"prefix": 2, "expert": 15}


def test_rows_are_independent_of_batch_padding():
    """Each row's velocity equals encoding it alone (padding masks work, no cross-row leaks)."""
    pol = TinyVLA(TinyVLAConfig(**small_cfg()))
    obs = make_obs(5)
    x, t = torch.randn(5, 4, 3), torch.rand(5)
    with torch.no_grad():
        full = pol.velocity(pol.encode_prefix(obs), x, t).velocity
        for i in range(5):
            one = {"images": obs["images"][i:i + 1], "state": obs["state"][i:i + 1],
                   "instruction": [obs["instruction"][i]]}
            vi = pol.velocity(pol.encode_prefix(one), x[i:i + 1], t[i:i + 1]).velocity
            torch.testing.assert_close(vi, full[i:i + 1], rtol=1e-5, atol=1e-6)
        # the instruction matters: a different text changes the velocity
        other = {**obs, "instruction": ["open the drawer"] * 5}
        assert (pol.velocity(pol.encode_prefix(other), x, t).velocity - full).abs().max() > 1e-4
        # prefix_index selects rows of the cache
        idx = torch.tensor([4, 1])
        sub = pol.velocity(pol.prefix_index(pol.encode_prefix(obs), idx), x[idx], t[idx]).velocity
        torch.testing.assert_close(sub, full[idx], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- training
def test_sft_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    pol = TinyVLA(TinyVLAConfig(**small_cfg(width=64, heads=4)))
    obs = make_obs(8, seed=3)
    g = torch.Generator().manual_seed(0)
    # a state/instruction-dependent target chunk
    actions = torch.tanh(obs["state"][:, :3]).unsqueeze(1).repeat(1, 4, 1)
    actions = actions + 0.1 * torch.randn(8, 4, 3, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return pol.sft_loss(obs, actions, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(pol.parameters(), lr=2e-3)
    for _ in range(120):  # 60 steps gave ratios 0.23-0.46 over init seeds, 120 give 0.09-0.16
        loss = pol.sft_loss(obs, actions, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.4 * before, (before, after)


@pytest.mark.parametrize("head", ["prefix", "expert"])
@pytest.mark.parametrize("detach", [True, False])
def test_value_heads(head, detach):
    torch.manual_seed(0)
    pol = TinyVLA(TinyVLAConfig(**small_cfg(value_head=head, critic_detach=detach)))
    obs = make_obs(6)
    prefix = pol.encode_prefix(obs)
    v = pol.value(prefix)
    assert v.shape == (6,)
    v.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.value_mlp.parameters())
    trunk = dict(pol.named_parameters())
    prefix_w = trunk["prefix_blocks.0.attn.qkv.weight"].grad
    expert_w = trunk["expert_blocks.0.mlp.0.weight"].grad
    if detach:  # the critic's gradient stops at its input
        assert prefix_w is None and expert_w is None
    else:
        assert prefix_w is not None and prefix_w.abs().sum() > 0
        if head == "expert":
            assert expert_w is not None and expert_w.abs().sum() > 0
        else:
            assert expert_w is None
    # expert head reads the expert at the fixed query x = 0, t = 1
    if head == "expert":
        with torch.no_grad():
            feats = pol.velocity(prefix, torch.zeros(6, 4, 3), torch.ones(6)).features.mean(1)
            torch.testing.assert_close(pol.value(prefix), pol.value_mlp(feats).squeeze(-1))
    # the value head fits per-observation targets
    target = torch.linspace(-1, 1, 6)
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (pol.value(pol.encode_prefix(obs)) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


@pytest.mark.slow
def test_sft_then_ode_sampling_reproduces_demo_actions():
    """End to end: after a short SFT on a fixed batch, ODE chunks approach the demo chunks."""
    torch.manual_seed(0)
    pol = TinyVLA(TinyVLAConfig(**small_cfg(width=64, heads=4)))
    g = torch.Generator().manual_seed(0)
    obs = make_obs(8, seed=5)
    actions = torch.tanh(obs["state"][:, :3]).unsqueeze(1) * torch.linspace(0.5, 1.0, 4).view(1, 4, 1)
    opt = torch.optim.AdamW(pol.parameters(), lr=2e-3)
    ode = build_sampler("ode", 10, pol.feature_dim, pol.action_dim)
    for _ in range(100):
        loss = pol.sft_loss(obs, actions, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        chunk = ode.sample(pol, pol.encode_prefix(obs), generator=torch.Generator().manual_seed(1)).actions
    mse = (chunk - actions).pow(2).mean().item()
    assert mse < 0.5 * actions.var().item(), (mse, actions.var().item())


def test_coord_conv_appends_pixel_coordinates():
    """With coord_conv the first conv sees x (along width) and y (along height) in [-1, 1]."""
    from pirl.models.tiny_vla import ImageEncoder

    enc = ImageEncoder([8, 16], width=32, grid=2, coord_conv=True)
    first = enc.convs[0]
    assert first.in_channels == 5
    seen = {}

    def hook(module, inp, out):
        seen["x"] = inp[0]

    first.register_forward_hook(hook)
    img = torch.rand(2, 3, 6, 10)
    enc(img)
    x = seen["x"]
    assert x.shape == (2, 5, 6, 10)
    torch.testing.assert_close(x[:, :3], img)
    xs = torch.linspace(-1, 1, 10)
    ys = torch.linspace(-1, 1, 6)
    torch.testing.assert_close(x[1, 3], xs[None, :].expand(6, 10))
    torch.testing.assert_close(x[0, 4], ys[:, None].expand(6, 10))
    assert ImageEncoder([8], width=32, grid=2, coord_conv=False).convs[0].in_channels == 3


def test_mean_std_normalizer_fits_demo_statistics_and_round_trips():
    """fit_normalization = float64 mean / std of the valid demo steps and states; constant
    columns only get centred; model -> env -> model space is the identity; the prefix sees
    the standardised state; the stats travel with the state dict."""
    torch.manual_seed(0)
    pol = TinyVLA(**small_cfg(normalization="mean_std", num_cameras=0))
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(50, 4, 3, generator=g, dtype=torch.float64) * torch.tensor([0.05, 2.0, 1.0],
                                                                                  dtype=torch.float64)
    acts += torch.tensor([0.01, -3.0, 0.5], dtype=torch.float64)
    acts[..., 2] = 0.5  # a constant action column
    mask = torch.rand(50, 4, generator=g) > 0.3
    state = torch.randn(50, 5, generator=g, dtype=torch.float64) * 10 + 4
    assert pol.fit_normalization(state.float(), acts.float(), mask)
    valid = acts[mask]                                                    # [M, 3]
    ref_std = valid.std(0, unbiased=False)
    ref_std[2] = 1.0
    torch.testing.assert_close(pol.normalizer.actions_mean.double(), valid.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol.normalizer.actions_std.double(), ref_std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol.normalizer.state_mean.double(), state.mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pol.normalizer.state_std.double(), state.std(0, unbiased=False),
                               atol=1e-4, rtol=1e-5)
    a = acts[:4].float()
    torch.testing.assert_close(pol.postprocess_actions(pol.preprocess_actions(a)), a)
    # the prefix of raw states == an identity-mode twin fed the standardised states
    twin = TinyVLA(**small_cfg(num_cameras=0))
    twin.load_state_dict({k: v for k, v in pol.state_dict().items()
                          if not k.startswith("normalizer.")})
    obs = make_obs(4, cams=0)
    nz = pol.normalizer  # the shared Normalizer's mean_std: (x - mean) / (std + 1e-6)
    obs_std = dict(obs, state=(obs["state"] - nz.state_mean) / (nz.state_std + 1e-6))
    torch.testing.assert_close(pol.encode_prefix(obs).tokens, twin.encode_prefix(obs_std).tokens)
    # the stats are buffers: saved and loaded with the weights, not trained
    clone = TinyVLA(**pol.get_config())
    clone.load_state_dict(pol.state_dict())
    torch.testing.assert_close(clone.normalizer.actions_std, pol.normalizer.actions_std)
    assert not any(n.startswith("normalizer.") for n, _ in pol.named_parameters())
    # identity mode fits nothing and leaves actions alone
    assert not twin.fit_normalization(state.float(), acts.float(), mask)
    assert torch.equal(twin.postprocess_actions(a), a)
    with pytest.raises(ValueError, match="normalization"):
        TinyVLA(**small_cfg(normalization="minmax"))


def test_film_encoder_is_identity_at_init_and_then_reads_the_instruction():
    """FiLM projections start at zero: the image tokens equal the plain encoder's with the same
    conv weights; once trained (here: set) the tokens depend on the instruction, word order
    included, and the FiLM text MLP is part of the frozen prefix."""
    torch.manual_seed(0)
    pol = TinyVLA(**small_cfg(film=True))
    plain = TinyVLA(**small_cfg(film=False))
    plain.load_state_dict({k: v for k, v in pol.state_dict().items()
                           if ".films." not in k and not k.startswith("film_text.")})
    obs = make_obs(3)
    torch.testing.assert_close(pol.encode_prefix(obs).tokens, plain.encode_prefix(obs).tokens)
    with torch.no_grad():
        for film in pol.image_encoder.films:
            film.weight.normal_(0, 0.5)
    a = dict(obs, instruction=["pick up the red cube"] * 3)
    b = dict(obs, instruction=["pick up the cube red"] * 3)
    n_img = pol.cfg.image_tokens ** 2
    ta, tb = pol._prefix_tokens(a)[0][:, :n_img], pol._prefix_tokens(b)[0][:, :n_img]
    assert (ta - tb).abs().max() > 1e-3
    assert any(n.startswith("film_text.") for n in pol.prefix_parameter_names())
    assert any(".films." in n for n in pol.prefix_parameter_names())
