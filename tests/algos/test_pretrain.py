"""Grounding pretraining of the prefix (pirl.algos.pretrain)."""

import pytest
import torch

from pirl.algos.pretrain import (GroundingHead, grounding_loss, pretrain_grounding,
                                 with_relative_offset)
from pirl.envs.tabletop import ScriptedExpert, TabletopEnv
from pirl.models import build_policy


def _setup(num_envs=16):
    env = TabletopEnv(num_envs, split="train", auto_reset=True, seed=3, num_distractors=0,
                      num_cameras=2, max_episode_steps=24)
    torch.manual_seed(0)
    policy = build_policy("tiny", action_dim=3, state_dim=4, num_cameras=2,
                          vocabulary=env.vocabulary(), width=32, depth=1, heads=2,
                          conv_channels=[8, 16], value_hidden=32)
    return env, policy, ScriptedExpert(env, noise=0.5, generator=torch.Generator().manual_seed(1))


def test_grounding_head_shapes_and_padding_mask():
    """[B, P, D] tokens -> [B, Q, 2]; a masked-out token cannot change the output."""
    torch.manual_seed(0)
    head = GroundingHead(16, 3, heads=2)
    tok = torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, -1] = False
    out = head(tok, mask)
    assert out.shape == (4, 3, 2)
    tok2 = tok.clone()
    tok2[:, -1] = 100.0
    torch.testing.assert_close(head(tok2, mask), out)


def test_grounding_loss_is_the_mse_and_fits_a_batch():
    """The loss is the mean squared point error of the head on the prefix tokens (direct
    recomputation); 150 Adam steps on one observation batch bring it under a twentieth of the
    best constant prediction's (the points' variance)."""
    env, policy, _ = _setup()
    obs = env.reset(seed=0)
    pts = env.scene_points()
    torch.manual_seed(0)
    head = GroundingHead(policy.feature_dim, 3)
    loss, pred = grounding_loss(policy, head, obs, pts)
    prefix = policy.encode_prefix(obs)
    ref = ((head(prefix.tokens, prefix.mask).double() - pts.double()) ** 2).sum() / pts.numel()
    torch.testing.assert_close(loss.double(), ref)
    assert pred.shape == (16, 3, 2)
    opt = torch.optim.Adam(list(policy.parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(150):
        loss, _ = grounding_loss(policy, head, obs, pts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    constant = (pts - pts.mean(0)).pow(2).mean()
    final = float(loss.detach())
    assert final < 0.05 * float(constant), (final, float(constant))


def test_pretraining_loop_touches_only_the_prefix():
    """A few steps of the loop: losses and per-point errors are reported, the image encoder
    moves, no parameter outside the prefix does."""
    env, policy, expert = _setup()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    seen = []
    out = pretrain_grounding(policy, env, expert.act, env.scene_points, steps=6, lr=3e-3,
                             warmup_steps=2, burn_in=3, seed=0,
                             callback=lambda step, m: seen.append((step, sorted(m))))
    assert len(out["losses"]) == 6 and out["error"].shape == (3,)
    assert seen[0] == (0, ["error_0", "error_1", "error_2", "loss"]) and len(seen) == 6
    prefix = set(policy.prefix_parameter_names())
    for n, p in policy.named_parameters():
        if n not in prefix:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters()
               if n.startswith("image_encoder"))


def test_pretraining_needs_a_trainable_prefix():
    env, policy, expert = _setup(4)
    for n, p in policy.named_parameters():
        if n in set(policy.prefix_parameter_names()):
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable prefix"):
        pretrain_grounding(policy, env, expert.act, env.scene_points, steps=1)


def test_relative_offset_target_against_the_scene():
    """``with_relative_offset`` keeps the three scene points and appends tanh(k * (object -
    gripper)), recomputed here in float64 from the env's own state; bad shapes are refused."""
    env, _, _ = _setup(num_envs=8)
    env.reset(seed=5)
    pts = env.scene_points()
    out = with_relative_offset(pts, 4.0)
    assert out.shape == (8, 4, 2)
    torch.testing.assert_close(out[:, :3], pts)
    ref = torch.tanh(4.0 * (env.obj_pos[:, 0].double() - env.gripper.double()))
    torch.testing.assert_close(out[:, 3].double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="points"):
        with_relative_offset(pts[:, :2], 4.0)
