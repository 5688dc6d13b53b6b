"""ManiSkill3 adapter tests.

Default suite (core venv, ManiSkill absent): the missing-package / missing-Vulkan error paths,
the registry name parsing and the multitask split table.  ``-m sim`` (``.venv-sim``, needs a
Vulkan driver): real PickCube-v1 episodes on the CPU simulator (reset with seeds, determinism,
stepping chunks with the TinyVLA policy when available, reading success), state mode, the
multitask wrapper, and motion-planning demo generation.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pirl.envs import maniskill as M
from pirl.envs import maniskill_demos as MD
from pirl.envs.pool import SimulatorUnavailable

HAVE_MANISKILL = importlib.util.find_spec("mani_skill") is not None


# ----------------------------------------------------------------------------- error paths

@pytest.mark.skipif(HAVE_MANISKILL, reason="ManiSkill is installed in this environment")
def test_missing_maniskill_names_install_command():
    with pytest.raises(SimulatorUnavailable, match=r"pip install 'pirl\[maniskill\]'"):
        M.ManiSkillEnv("PickCube-v1", 1)
    with pytest.raises(SimulatorUnavailable, match=r"pip install 'pirl\[maniskill\]'"):
        M.make_env("maniskill_multitask", 2)
    from pirl.envs import make_env  # the registry (lazy import of this module)

    for name in ("maniskill/PickCube-v1", "maniskill_multitask/train"):
        with pytest.raises(ImportError, match=r"pip install 'pirl\[maniskill\]'"):
            make_env(name, 1)


def test_missing_vulkan_names_apt_packages(monkeypatch, tmp_path):
    import ctypes.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SimulatorUnavailable, match="libvulkan1 mesa-vulkan-drivers"):
        M.require_maniskill(icd_dirs=[str(tmp_path)])
    # a loader but no ICD (driver) file is still an error
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libvulkan.so.1")
    with pytest.raises(SimulatorUnavailable, match="Vulkan"):
        M.require_maniskill(icd_dirs=[str(tmp_path)])
    (tmp_path / "lvp_icd.x86_64.json").write_text("{}")
    M.require_maniskill(icd_dirs=[str(tmp_path)])  # both present: no error


def test_split_config_disjoint():
    train, lo, hi = M.split_config("train")
    seen, slo, shi = M.split_config("test_seen")
    unseen, ulo, uhi = M.split_config("test_unseen")
    assert train == seen and not set(train) & set(unseen)
    assert hi <= slo and (slo, shi) == (ulo, uhi) and lo == 0
    assert all(t in M.TASK_INSTRUCTIONS for t in train + unseen)
    with pytest.raises(ValueError):
        M.split_config("nope")


# ----------------------------------------------------------------------------- real ManiSkill

def _sim_env(**kw):
    pytest.importorskip("mani_skill")
    try:
        M.require_maniskill()
    except SimulatorUnavailable as e:  # pragma: no cover - depends on the machine
        pytest.fail(f"simulator extras installed but unusable: {e}")
    return M.ManiSkillEnv(**kw)


@pytest.mark.sim
def test_pickcube_rgb_reset_seeds_and_chunks():
    env = _sim_env(tasks="PickCube-v1", num_envs=2, image_size=64, wrist_camera=True,
                   sim_backend="cpu", max_episode_steps=12)
    try:
        obs = env.reset(seed=0, episode_seeds=torch.tensor([11, 11]))
        assert obs["images"].shape == (2, 2, 3, 64, 64) and obs["images"].dtype == torch.uint8
        assert obs["state"].shape == (2, 16) and obs["state"].dtype == torch.float32
        assert obs["instruction"] == [M.TASK_INSTRUCTIONS["PickCube-v1"]] * 2
        # same task + same seed => identical start (state and pixels)
        assert torch.equal(obs["state"][0], obs["state"][1])
        assert torch.equal(obs["images"][0], obs["images"][1])
        # different seed => different start
        obs2 = env.reset(seed=0, episode_seeds=torch.tensor([11, 12]))
        assert torch.equal(obs2["state"][0], obs["state"][0])
        assert not torch.equal(obs2["images"][0], obs2["images"][1])
        from pirl.envs.base import ChunkedEnv

        chunked = ChunkedEnv(env)
        policy, sampler = _tiny_policy_or_none(env)
        g = torch.Generator().manual_seed(0)
        total = torch.zeros(2, dtype=torch.long)
        for _ in range(3):  # 3 chunks of 4 steps = the 12-step horizon
            if policy is not None:
                with torch.no_grad():
                    chain = sampler.sample(policy, policy.encode_prefix(obs2), generator=g)
                    assert torch.isfinite(chain.logp).all()
                    chunk = chain.actions.clamp(-1, 1)
            else:
                chunk = torch.rand(2, 4, 7, generator=g) * 2 - 1
            res = chunked.step_chunk(chunk)
            total += res.steps
            assert res.success.dtype == torch.bool and res.reward.shape == (2,)
            obs2 = res.obs
        # sparse reward: 1 exactly when the episode succeeded; else truncated at the horizon
        assert bool((res.done).all())
        assert torch.equal(res.truncated, ~res.terminated)
        assert (total <= 12).all()
    finally:
        env.close()


def _tiny_policy_or_none(env):
    """A small random-init TinyVLA + Flow-SDE sampler for ``env`` (None, None if the model /
    flow packages are not importable: then the test steps random chunks)."""
    try:
        from pirl.flow import build_sampler
        from pirl.models import build_policy
        from pirl.models.tokenizer import vocab_from_texts
    except ImportError:
        return None, None
    torch.manual_seed(0)
    policy = build_policy("tiny", action_horizon=4, action_dim=env.action_dim,
                          state_dim=env.state_dim, num_cameras=2, image_size=64, width=32,
                          depth=1, heads=2, conv_channels=[8, 16, 16],
                          vocab=vocab_from_texts(env.instructions))
    sampler = build_sampler("flow_sde", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=env.action_dim)
    return policy.eval(), sampler


@pytest.mark.sim
def test_state_mode_and_multitask_padding():
    env = _sim_env(tasks=["PickCube-v1", "PushCube-v1"], num_envs=2, obs_mode="state",
                   sim_backend="cpu", max_episode_steps=3)
    try:
        obs = env.reset(seed=0, task_ids=torch.tensor([0, 1]), episode_seeds=torch.tensor([1, 1]))
        assert "images" not in obs
        assert obs["state"].shape == (2, env.state_dim)
        assert obs["task_id"].tolist() == [0, 1]
        assert obs["instruction"][1] == M.TASK_INSTRUCTIONS["PushCube-v1"]
        for _ in range(3):
            out = env.step(torch.zeros(2, 7))
        assert out.truncated.all()
        out2 = env.step(torch.ones(2, 7))  # frozen: ignored
        assert torch.equal(out2.obs["state"], out.obs["state"]) and (out2.reward == 0).all()
    finally:
        env.close()


@pytest.mark.sim
def test_motionplanning_demos_replay_in_env(tmp_path):
    """A motion-planned PickCube demo (converted to pd_ee_delta_pose) is a valid episode of
    ManiSkillEnv: replaying its actions from the same seed reproduces its observations and
    succeeds at its last step."""
    pytest.importorskip("mplib")
    eps, stats = MD.generate_motionplanning_demos("PickCube-v1", 1, seed=3, image_size=64)
    assert stats["attempts"] >= 1 and len(eps) == 1
    e = eps[0]
    t = len(e.actions)
    assert e.success and e.images.shape == (t, 1, 3, 64, 64) and e.state.shape == (t, 16)
    assert np.abs(e.actions).max() <= 1.0 + 1e-6
    paths = MD.save_demos(eps, tmp_path / "npz")
    with np.load(paths[0]) as z:
        assert np.array_equal(z["actions"], e.actions) and str(z["task"]) == "PickCube-v1"
    # pirl's demo format round trip (what few-shot SFT reads)
    from pirl.envs.demos import load_demos

    MD.write_pirl_demos(tmp_path / "pirl", eps, ["StackCube-v1", "PickCube-v1"])
    ds = load_demos(tmp_path / "pirl")
    assert torch.equal(ds.actions, torch.from_numpy(e.actions))
    assert torch.equal(ds.state, torch.from_numpy(e.state))
    assert torch.equal(ds.images, torch.from_numpy(e.images))
    assert ds.task_index.unique().tolist() == [1] and float(ds.reward.sum()) == 1.0
    env = _sim_env(tasks="PickCube-v1", num_envs=1, image_size=64, sim_backend="cpu")
    try:
        obs = env.reset(seed=0, episode_seeds=torch.tensor([e.seed]))
        assert torch.allclose(obs["state"][0], torch.from_numpy(e.state[0]), atol=1e-5)
        success_at = None
        for k in range(t):
            if k > 0:
                assert torch.allclose(obs["state"][0], torch.from_numpy(e.state[k]), atol=1e-3)
            out = env.step(torch.from_numpy(e.actions[k])[None])
            obs = out.obs
            if bool(out.info["success"][0]):
                success_at = k
                break
        assert success_at == t - 1 and bool(out.terminated[0]) and float(out.reward[0]) == 1.0
    finally:
        env.close()


def test_make_env_name_parsing(monkeypatch):
    """Registry names map to the right class and tasks (constructors replaced by recorders)."""
    calls = []

    def fake_env(tasks, num_envs, **kw):
        calls.append(("env", tasks, num_envs, kw))

    def fake_multi(num_envs=1, **kw):
        calls.append(("multi", None, num_envs, kw))

    monkeypatch.setattr(M, "ManiSkillEnv", fake_env)
    monkeypatch.setattr(M, "ManiSkillMultiTask", fake_multi)
    M.make_env("maniskill", 4)
    M.make_env("maniskill/StackCube-v1", 2, obs_mode="state")
    M.make_env("maniskill:PushCube-v1", 1)
    M.make_env("PlaceSphere-v1", 3)
    M.make_env("maniskill", 1, tasks=["PickCube-v1", "PullCube-v1"])
    M.make_env("maniskill_multitask/test_unseen", 5)
    M.make_env("maniskill_multitask", 5, split="test_seen")
    # pirl train passes device= to every env; ManiSkill's observations come back on the CPU
    M.make_env("maniskill_multitask", 2, split="train", device="cpu", tasks=["PushCube-v1"])
    M.make_env("maniskill/PushCube-v1", 2, device="cpu")
    assert calls == [
        ("env", "PickCube-v1", 4, {}),
        ("env", "StackCube-v1", 2, {"obs_mode": "state"}),
        ("env", "PushCube-v1", 1, {}),
        ("env", "PlaceSphere-v1", 3, {}),
        ("env", ["PickCube-v1", "PullCube-v1"], 1, {}),
        ("multi", None, 5, {"split": "test_unseen"}),
        ("multi", None, 5, {"split": "test_seen"}),
        ("multi", None, 2, {"split": "train", "tasks": ["PushCube-v1"]}),
        ("env", "PushCube-v1", 2, {}),
    ]


@pytest.mark.sim
def test_multitask_splits_draw_heldout_seeds():
    pytest.importorskip("mani_skill")
    env = M.ManiSkillMultiTask(num_envs=2, split="test_unseen", obs_mode="state",
                               sim_backend="cpu")
    try:
        obs = env.reset(seed=7)
        assert env.task_names == list(M.MULTITASK_HELDOUT_TASKS)
        assert obs["instruction"] == [M.TASK_INSTRUCTIONS["PullCube-v1"]] * 2
        seeds = env._episode_seeds
        assert ((seeds >= M.HELDOUT_SEED_OFFSET) & (seeds < 2 * M.HELDOUT_SEED_OFFSET)).all()
        out = env.step(torch.zeros(2, env.action_dim))
        assert out.obs["state"].shape == (2, env.state_dim)
    finally:
        env.close()


@pytest.mark.sim
@pytest.mark.parametrize("reward_mode", ["sparse", "shaped"])
def test_gpu_slot_pool_logic_on_cpu_matches_cpu_slots(reward_mode):
    """The GPU code path (per-task batched envs, partial resets, row bookkeeping), run on the CPU
    simulator with one slot per task, gives the same episodes (and rewards) as the CPU slots."""
    pytest.importorskip("mani_skill")
    from pirl.envs.pool import PoolBatchedEnv

    tasks = ["PickCube-v1", "PushCube-v1"]
    kw = dict(obs_mode="rgb", control_mode="pd_ee_delta_pose", image_size=32,
              wrist_camera=False, reward_mode=reward_mode, render_backend="gpu")
    pool = M.GpuSlotPool(tasks, [1, 0], state_dim=16, physx_backend="physx_cpu", **kw)
    gpu_like = PoolBatchedEnv(pool, task_names=tasks, instructions=tasks, action_dim=7,
                              state_dim=16, max_episode_steps=4, seed_space=1)
    cpu = _sim_env(tasks=tasks, num_envs=2, sim_backend="cpu", image_size=32,
                   max_episode_steps=4, reward_mode=reward_mode)
    try:
        ids, seeds = torch.tensor([1, 0]), torch.tensor([5, 9])
        a = gpu_like.reset(task_ids=ids, episode_seeds=seeds)
        b = cpu.reset(task_ids=ids, episode_seeds=seeds)
        assert torch.equal(a["state"], b["state"]) and torch.equal(a["images"], b["images"])
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            act = torch.rand(2, 7, generator=g) * 2 - 1
            sa, sb = gpu_like.step(act), cpu.step(act)
            assert torch.allclose(sa.obs["state"], sb.obs["state"], atol=1e-5)
            assert torch.allclose(sa.reward, sb.reward, atol=1e-5)
            assert torch.equal(sa.terminated, sb.terminated)
            assert torch.equal(sa.truncated, sb.truncated)
        assert sa.done.all()
        with pytest.raises(ValueError, match="fixed"):
            gpu_like.reset(task_ids=torch.tensor([0, 0]), episode_seeds=seeds)
    finally:
        gpu_like.close()
        cpu.close()


def test_potential_shaper_telescopes_and_resets():
    """Shaped rewards equal success + scale * (phi_t - phi_{t-1}) (no term on an episode's first
    step), so an episode's shaping sums to scale * (phi_T - phi_1); rows are independent and a
    reset forgets the previous episode's phi."""
    rng = np.random.default_rng(0)
    scale = 0.7
    phi = rng.uniform(0, 1, size=(6, 3))  # [T, rows]
    success = np.zeros((6, 3))
    success[5, 1] = 1.0
    sh = M.PotentialShaper(3, scale)
    got = np.stack([sh.reward(phi[t], success[t]) for t in range(6)])
    want = success.copy()
    for t in range(1, 6):  # independent loop form
        for r in range(3):
            want[t, r] += scale * (phi[t, r] - phi[t - 1, r])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sum(0), success.sum(0) + scale * (phi[-1] - phi[0]),
                               atol=1e-12)
    sh.reset([1])  # new episode in row 1 only: its next step has no shaping term
    nxt = sh.reward(np.array([0.5, 0.9, 0.5]), np.zeros(3))
    np.testing.assert_allclose(nxt, [scale * (0.5 - phi[-1, 0]), 0.0, scale * (0.5 - phi[-1, 2])],
                               atol=1e-12)
    # a row subset updates only those rows
    out = sh.reward(np.array([0.2]), np.array([1.0]), rows=slice(2, 3))
    np.testing.assert_allclose(out, [1.0 + scale * (0.2 - 0.5)], atol=1e-12)


@pytest.mark.sim
def test_shaped_reward_matches_normalized_dense_differences():
    """reward_mode="shaped" on the real simulator: success + scale * first differences of the
    same episode's normalized_dense rewards (two envs, same seeds and actions)."""
    kw = dict(tasks=["PushCube-v1"], num_envs=1, obs_mode="state", sim_backend="cpu",
              max_episode_steps=6)
    shaped = _sim_env(reward_mode="shaped", shaping_scale=2.0, **kw)
    dense = _sim_env(reward_mode="normalized_dense", **kw)
    try:
        for e in (shaped, dense):
            e.reset(task_ids=torch.tensor([0]), episode_seeds=torch.tensor([3]))
        g = torch.Generator().manual_seed(1)
        rs, rd, succ = [], [], []
        for _ in range(6):
            act = torch.rand(1, 7, generator=g) * 2 - 1
            a, b = shaped.step(act), dense.step(act)
            rs.append(float(a.reward[0]))
            rd.append(float(b.reward[0]))
            succ.append(float(a.info["success"][0]))
        want = [succ[0]] + [succ[t] + 2.0 * (rd[t] - rd[t - 1]) for t in range(1, 6)]
        np.testing.assert_allclose(rs, want, atol=1e-5)
        assert any(abs(r) > 1e-4 for r in rs)  # the random actions moved the arm
    finally:
        shaped.close()
        dense.close()
