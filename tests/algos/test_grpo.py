"""GRPO: group-relative advantages against a direct numpy computation per group, the group
assignment, and the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pirl.algos.grpo import GRPOConfig, broadcast_over_time, group_advantages, make_groups


def group_adv_reference(returns, group_ids, eps, normalize_std):
    """Loop over groups with numpy (float64, population std)."""
    r = np.asarray(returns, dtype=np.float64)
    ids = np.asarray(group_ids)
    out = np.zeros_like(r)
    for g in np.unique(ids):
        sel = ids == g
        x = r[sel]
        if x.max() == x.min() or x.std() <= eps:
            out[sel] = 0.0
        elif normalize_std:
            out[sel] = (x - x.mean()) / (x.std() + eps)
        else:
            out[sel] = x - x.mean()
    return out


def test_group_advantages_hand_computed():
    # group 7: returns (1, 0, 0, 1): mean .5, std .5 -> +-1/(.5 + eps)
    # group 2: (3,): a single member -> 0;  group 4: (2, 2): equal -> 0
    returns = torch.tensor([1.0, 0.0, 3.0, 0.0, 2.0, 1.0, 2.0])
    ids = torch.tensor([7, 7, 2, 7, 4, 7, 4])
    out = group_advantages(returns, ids, eps=1e-6)
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(out, torch.tensor([a, -a, 0.0, -a, 0.0, a, 0.0]))
    out = group_advantages(returns, ids, normalize_std=False)
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, 0.0, -0.5, 0.0, 0.5, 0.0]))


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_advantages_matches_numpy(normalize_std, seed):
    g = torch.Generator().manual_seed(seed)
    m = 200
    ids = torch.randint(0, 40, (m,), generator=g) * 3 + 5  # sparse, unsorted ids
    returns = torch.randn(m, generator=g, dtype=torch.float64)
    # a degenerate group (all equal, but not exactly representable) and binary returns
    returns[ids == ids[0]] = 0.1
    binary = (torch.rand(m, generator=g) < 0.3).double()
    for r in (returns, binary):
        out = group_advantages(r, ids, eps=1e-6, normalize_std=normalize_std)
        ref = group_adv_reference(r.numpy(), ids.numpy(), 1e-6, normalize_std)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
        assert bool((out[ids == ids[0]] == 0).all()) or r is binary
        # advantages of every group sum to zero
        for gid in torch.unique(ids):
            assert abs(float(out[ids == gid].sum())) < 1e-9


def test_group_advantages_float32_and_eps0():
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7], dtype=torch.float32)
    ids = torch.tensor([0, 0, 0, 1, 1])
    out = group_advantages(r, ids, eps=0.0)
    assert out.dtype == torch.float32
    # group 0 is all-equal: exactly 0 even with eps = 0; group 1: +-1
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0]))
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        group_advantages(torch.zeros(2), torch.tensor([0, -1]))


def test_make_groups_properties():
    gen = torch.Generator().manual_seed(0)
    n, gsize, tasks = 48, 4, 5
    task_ids, seeds, group_ids = make_groups(n, gsize, tasks, gen)
    assert task_ids.shape == seeds.shape == group_ids.shape == (n,)
    assert task_ids.dtype == seeds.dtype == group_ids.dtype == torch.int64
    torch.testing.assert_close(group_ids, torch.arange(n) // gsize)
    for gid in range(n // gsize):
        sel = group_ids == gid
        assert int(sel.sum()) == gsize
        assert len(torch.unique(task_ids[sel])) == 1
        assert len(torch.unique(seeds[sel])) == 1
    assert bool(((task_ids >= 0) & (task_ids < tasks)).all())
    assert bool(((seeds >= 0) & (seeds < 2**31 - 1)).all())
    # tasks are balanced over the 12 groups: each of the 5 tasks 2 or 3 times
    per_task = torch.bincount(task_ids[::gsize], minlength=tasks)
    assert int(per_task.min()) == 2 and int(per_task.max()) == 3
    # groups draw distinct initial states (collisions in 2^31 are practically impossible)
    assert len(torch.unique(seeds[::gsize])) == n // gsize
    # reproducible from the generator state, different on the next draw
    again = make_groups(n, gsize, tasks, torch.Generator().manual_seed(0))
    for a, b in zip((task_ids, seeds, group_ids), again):
        torch.testing.assert_close(a, b)
    nxt = make_groups(n, gsize, tasks, gen)
    assert not torch.equal(nxt[1], seeds)


def test_make_groups_round_robin_keeps_each_env_on_its_task():
    """round_robin: group g runs task g mod T in every call (env i: task (i // G) mod T), and
    only the groups' initial states change from call to call."""
    gen = torch.Generator().manual_seed(0)
    n, gsize, tasks = 24, 2, 5
    first = make_groups(n, gsize, tasks, gen, round_robin=True)
    second = make_groups(n, gsize, tasks, gen, round_robin=True)
    want = torch.tensor([(i // gsize) % tasks for i in range(n)])
    assert torch.equal(first[0], want) and torch.equal(second[0], want)
    assert torch.equal(first[2], torch.arange(n) // gsize)
    assert not torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="round_robin"):
        make_groups(n, gsize, tasks, gen, task_probs=torch.ones(tasks) / tasks,
                    round_robin=True)


def test_make_groups_validation():
    with pytest.raises(ValueError, match="multiple of group_size"):
        make_groups(10, 4, 3)
    with pytest.raises(ValueError, match="group_size"):
        make_groups(8, 0, 3)
    with pytest.raises(ValueError, match="num_tasks"):
        make_groups(8, 4, 0)


def test_broadcast_over_time():
    adv = torch.tensor([1.0, -2.0, 3.0])
    valid = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    out = broadcast_over_time(adv, valid)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 3.0], [1.0, 0.0, 3.0],
                                                  [0.0, 0.0, 3.0]]))
    with pytest.raises(ValueError):
        broadcast_over_time(adv, valid[:, :2])


def test_grpo_config_defaults_and_validation():
    cfg = GRPOConfig()
    assert cfg.group_size == 8 and cfg.normalize_std and cfg.kl_coef == 0.0
    assert cfg.normalize_advantages is False
    for field, value in [("group_size", 1), ("std_eps", -1.0), ("kl_coef", -0.1),
                         ("clip_low", 1.0), ("dual_clip", 1.0), ("update_epochs", 0)]:
        with pytest.raises(ValueError, match=field):
            GRPOConfig(**{field: value})


def test_grpo_config_from_yaml_dict():
    """The typed config loader reports the dotted field of a bad GRPO value."""
    from pirl.config.loading import ConfigError, from_dict

    cfg = from_dict(GRPOConfig, {"group_size": 4, "logp_mode": "chain_mean", "dual_clip": None,
                                 "betas": [0.8, 0.99]})
    assert cfg.group_size == 4 and cfg.dual_clip is None and cfg.ratio_level == "element"
    assert cfg.betas == (0.8, 0.99)
    with pytest.raises(ConfigError, match="group_size"):
        from_dict(GRPOConfig, {"group_size": 1})
    with pytest.raises(ConfigError, match="logp_mode"):
        from_dict(GRPOConfig, {"logp_mode": "mean"})


def test_grpo_policy_gradient_monte_carlo():
    """At the rollout policy (ratio 1) the gradient of the PPO loss with group-mean-centred
    advantages is an estimate of -(1 - 1/G) dJ/dmu (the group mean includes the sample itself).

    Gaussian policy a ~ N(mu, 1), reward r(a) = -(a - 2)^2, so J(mu) = -((mu - 2)^2 + 1) and
    dJ/dmu = -2 (mu - 2) = 4 at mu = 0.
    """
    from pirl.algos.ppo import policy_loss

    g = torch.Generator().manual_seed(0)
    G, groups = 8, 25_000
    mu = torch.zeros((), dtype=torch.float64, requires_grad=True)
    a = torch.randn(G * groups, generator=g, dtype=torch.float64)  # samples at mu = 0
    logp = -0.5 * (a - mu) ** 2
    reward = -(a - 2.0) ** 2
    ids = torch.arange(groups).repeat_interleave(G)
    adv = group_advantages(reward, ids, normalize_std=False)
    loss, _ = policy_loss(logp, logp.detach(), adv, dual_clip=None)
    loss.backward()
    # per-sample terms for the standard error
    per = -(adv * (a - 0.0)).detach()
    se = float(per.std()) / math.sqrt(per.numel())
    expected = -(1 - 1 / G) * 4.0
    assert abs(float(mu.grad) - expected) < 4 * se, (float(mu.grad), expected, se)
