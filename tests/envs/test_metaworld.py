"""Meta-World adapter tests.

They need the ``metaworld`` extra, which CI installs into the core venv (.ci/run), so they run in
the default suite (skipped, with the reason, where it is missing): reset / step / success flag /
determinism on real MuJoCo envs, the scripted-policy demos written in pirl's format and replayed
through the batched env, the process pool, image observations where a headless GL library
exists, and the bad-input errors.  A few seconds in all.
"""

from __future__ import annotations

import ctypes.util
import importlib.util

import numpy as np
import pytest
import torch

from pirl.envs import metaworld as M
from pirl.envs import metaworld_scripted as S
from pirl.envs.pool import SimulatorUnavailable

HAVE_MW = importlib.util.find_spec("metaworld") is not None
needs_mw = pytest.mark.skipif(not HAVE_MW, reason="needs the metaworld extra: "
                                                  "pip install 'pirl[metaworld]'")
HAVE_GL = ctypes.util.find_library("EGL") or ctypes.util.find_library("OSMesa")


# ----------------------------------------------------------------------------- no simulator

def test_task_table_and_unknown_task():
    assert len(M.MT50_TASKS) == 50 and len(set(M.TASK_INSTRUCTIONS.values())) == 50
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'pick-plcae-v3'.*pick-place-v3"):
        M.check_tasks(["reach-v3", "pick-plcae-v3"])
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v2'"):
        M.make_env("metaworld/reach-v2", 1)
    seeds = [M.eval_episode_seeds(i, 10) for i in range(50)]
    flat = sum(seeds, [])
    assert len(set(flat)) == 500 and min(flat) >= M.HELDOUT_SEED_OFFSET


def test_missing_metaworld_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SimulatorUnavailable, match=r"pip install 'pirl\[metaworld\]'"):
        M.MetaWorldEnv(["reach-v3"], 1)


# ----------------------------------------------------------------------------- real envs

@needs_mw
def test_task_names_match_metaworld():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
    from metaworld.policies import ENV_POLICY_MAP

    assert list(M.MT50_TASKS) == list(ALL_V3_ENVIRONMENTS)
    assert set(M.MT50_TASKS) == set(ENV_POLICY_MAP)
    assert M.benchmark_tasks("mt10") == list(MT10_V3)
    train, test = M.benchmark_tasks("ml10", "train"), M.benchmark_tasks("ml10", "test")
    assert len(train) == 10 and len(test) == 5 and not set(train) & set(test)
    assert S.demo_tasks("metaworld/ml45", split="test") == M.benchmark_tasks("ml45", "test")


@needs_mw
def test_reset_step_shapes_determinism_and_goal():
    from pirl.envs import make_env

    env = make_env("metaworld", 3, tasks=["reach-v3", "push-v3"], device="cpu")
    assert env.task_names == ["reach-v3", "push-v3"] and env.slot_tasks.tolist() == [0, 1, 0]
    o1 = env.reset(episode_seeds=torch.tensor([5, 5, 6]))
    assert o1["state"].shape == (3, 39) and o1["state"].dtype == torch.float32
    assert "images" not in o1 and o1["task_id"].tolist() == [0, 1, 0]
    assert o1["instruction"][1] == M.TASK_INSTRUCTIONS["push-v3"]
    o2 = env.reset(episode_seeds=torch.tensor([5, 7, 7]))
    # same task + seed => same initial state (goal included); another seed moves the goal
    assert torch.equal(o1["state"][0], o2["state"][0])
    assert not torch.allclose(o1["state"][1, 36:], o2["state"][1, 36:])
    assert not torch.allclose(o1["state"][2, 36:], o2["state"][2, 36:])
    assert all(w in env.vocabulary() for s in M.TASK_INSTRUCTIONS.values() for w in s.split())
    step = env.step(torch.zeros(3, 4))
    assert step.reward.shape == (3,) and not step.done.any()
    assert step.info["success"].dtype == torch.bool
    env.close()


@needs_mw
def test_wrong_action_shape_names_the_shape():
    env = M.MetaWorldEnv(["reach-v3"], 2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action: .*\[2, 4\].*got \[2, 7\]"):
        env.step(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"got \[4\]"):
        env.step(torch.zeros(4))
    env.close()


@needs_mw
def test_success_flag_terminates_with_sparse_reward_and_time_limit():
    seed = 3
    ep = S.run_scripted("reach-v3", [seed])[0]
    assert ep["success"] and ep["length"] < M.DEFAULT_MAX_STEPS
    env = M.MetaWorldEnv(["reach-v3"], 2, max_episode_steps=ep["length"] + 5)
    env.reset(episode_seeds=torch.tensor([seed, seed]))
    acts = torch.from_numpy(ep["actions"])
    for t in range(ep["length"]):
        # env 0 replays the scripted actions, env 1 holds still
        out = env.step(torch.stack([acts[t], torch.zeros(4)]))
        if t < ep["length"] - 1:
            assert not out.info["success"][0] and out.reward[0] == 0
    assert out.info["success"][0] and out.terminated[0] and out.reward[0] == 1.0
    assert not out.done[1]
    for _ in range(5):
        out = env.step(torch.zeros(2, 4))
    assert out.truncated[1] and not out.terminated[1] and out.terminated[0]
    env.close()


@needs_mw
def test_dense_absorbing_reward_against_the_dense_stream():
    """``dense_absorbing`` = the ``dense`` stream / T per step, plus (T - t) / T at the success
    step t (1-based): checked step by step against a ``dense`` env replaying the same actions,
    and the return of a success at step t is at least (T - t) / T and at most 1."""
    seed = 3
    ep = S.run_scripted("reach-v3", [seed])[0]
    n = ep["length"]
    big_t = n + 7
    envs = {m: M.MetaWorldEnv(["reach-v3"], 1, reward_mode=m, max_episode_steps=big_t)
            for m in ("dense", "dense_absorbing")}
    for e in envs.values():
        e.reset(episode_seeds=torch.tensor([seed]))
    acts = torch.from_numpy(ep["actions"])
    ret = 0.0
    for t in range(n):
        out = {m: e.step(acts[t][None]) for m, e in envs.items()}
        dense = float(out["dense"].reward[0])
        got = float(out["dense_absorbing"].reward[0])
        success = bool(out["dense"].info["success"][0])
        assert success == bool(out["dense_absorbing"].terminated[0]) == (t == n - 1)
        want = dense / big_t + (big_t - (t + 1)) / big_t * success
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
        ret += got
    assert (big_t - n) / big_t <= ret <= 1.0
    for e in envs.values():
        e.close()


@needs_mw
def test_scripted_demos_written_and_replayed(tmp_path):
    from pirl.envs.demos import generate_demos, load_demos

    tasks = ["reach-v3", "button-press-v3"]
    out = generate_demos("metaworld", episodes_per_task=2, out_dir=tmp_path / "d", seed=1,
                         env_kwargs={"tasks": tasks, "max_episode_steps": 150})
    ds = load_demos(out)
    assert ds.task_names == tasks and ds.num_episodes == 4 and bool(ds.ep_success.all())
    assert ds.episodes_per_task() == {0: 2, 1: 2}
    assert ds.state.shape[1] == 39 and ds.actions.shape[1] == 4
    assert float(ds.actions.abs().max()) <= 1.0
    assert ds.info["max_episode_steps"] == 150
    # replay every demo's actions through the batched env from its episode seed
    n = ds.num_episodes
    env = M.MetaWorldEnv(tasks, n, slot_tasks=ds.ep_task.tolist(), max_episode_steps=150)
    obs = env.reset(task_ids=ds.ep_task, episode_seeds=ds.ep_seed)
    succ = torch.zeros(n, dtype=torch.bool)
    for t in range(int(ds.ep_length.max())):
        act = torch.zeros(n, 4)
        for e in range(n):
            if t < ds.ep_length[e]:
                f = int(ds.ep_start[e]) + t
                act[e] = ds.actions[f]
                assert torch.allclose(obs["state"][e], ds.state[f], atol=1e-5)
        out = env.step(act)
        obs = out.obs
        succ |= out.info["success"]
        for e in range(n):  # success exactly at the demo's last step
            assert bool(out.info["success"][e]) == (t == int(ds.ep_length[e]) - 1)
    assert bool(succ.all())
    env.close()


@needs_mw
def test_demo_for_task_without_scripted_policy(monkeypatch, tmp_path):
    from metaworld import policies

    with pytest.raises(ValueError, match="no scripted policy for Meta-World task 'reach-v2'"):
        S.scripted_policy("reach-v2")
    monkeypatch.delitem(policies.ENV_POLICY_MAP, "push-v3")
    with pytest.raises(ValueError, match="no scripted policy for Meta-World task 'push-v3'"):
        S.generate_metaworld_demos(["reach-v3", "push-v3"], 1, tmp_path)
    assert not (tmp_path / "meta").exists()  # checked before recording anything


@needs_mw
def test_process_pool_matches_in_process():
    kw = dict(tasks=["reach-v3", "push-v3", "door-open-v3"], num_envs=3)
    a = M.MetaWorldEnv(**kw)
    b = M.MetaWorldEnv(**kw, num_workers=2)
    try:
        oa, ob = a.reset(seed=4), b.reset(seed=4)
        assert torch.equal(oa["state"], ob["state"])
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            act = torch.rand(3, 4, generator=g) * 2 - 1
            sa, sb = a.step(act), b.step(act)
        assert torch.equal(sa.obs["state"], sb.obs["state"])
    finally:
        a.close()
        b.close()


@needs_mw
@pytest.mark.skipif(not HAVE_GL, reason="image mode needs libEGL or libOSMesa")
def test_rgb_observations():
    env = M.MetaWorldEnv(["reach-v3"], 1, obs_mode="rgb", image_size=32)
    obs = env.reset(seed=0)
    assert obs["images"].shape == (1, 1, 3, 32, 32) and obs["images"].dtype == torch.uint8
    assert obs["images"].float().std() > 0
    assert env.render().shape == (1, 3, 32, 32) and env.num_cameras == 1
    env.close()
    with pytest.raises(RuntimeError, match="obs_mode='state'"):
        M.MetaWorldEnv(["reach-v3"], 1).render()


@needs_mw
def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="obs_mode"):
        M.MetaWorldEnv(["reach-v3"], 1, obs_mode="depth")
    with pytest.raises(ValueError, match="reward_mode"):
        M.MetaWorldEnv(["reach-v3"], 1, reward_mode="shaped")
    with pytest.raises(ValueError, match="split"):
        M.MetaWorldEnv("ml10", 1, split="val")


@needs_mw
def test_rows_reuse_slots_that_hold_their_task():
    tasks = ["reach-v3", "push-v3", "door-open-v3"]
    env = M.MetaWorldEnv(tasks, 3, max_cached=1)
    first = env.reset(episode_seeds=torch.tensor([1, 2, 3]))
    assert env.env_builds == 3
    # the same episodes in another row order: served by the slots that hold the tasks
    obs = env.reset(task_ids=torch.tensor([2, 0, 1]), episode_seeds=torch.tensor([3, 1, 2]))
    assert env.env_builds == 3 and env.pool.slot_of_row.tolist() == [2, 0, 1]
    assert torch.equal(obs["state"], first["state"][[2, 0, 1]])
    assert obs["task_id"].tolist() == [2, 0, 1]
    # two rows of one task: one slot must switch (one build), and the episodes do not depend
    # on which slot runs them
    obs = env.reset(task_ids=torch.tensor([0, 0, 1]), episode_seeds=torch.tensor([1, 1, 2]))
    assert env.env_builds == 4
    assert torch.equal(obs["state"][0], obs["state"][1])
    assert torch.equal(obs["state"][0], first["state"][0])
    out = env.step(torch.zeros(3, 4))
    assert torch.equal(out.obs["state"][0], out.obs["state"][1])
    with pytest.raises(ValueError, match="task_ids"):
        env.reset(task_ids=torch.tensor([0, 3, 1]))
    env.close()


_RSS_SCRIPT = """
import sys, torch
from pirl.envs import metaworld as M
if sys.argv[1] == "off":
    M._limit_heap_fragmentation = lambda: False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
env = M.MetaWorldEnv("mt50", 10, max_cached=1)
g = torch.Generator().manual_seed(0)
sizes = []
for i in range(10):
    env.reset(seed=i, task_ids=torch.randint(0, 50, (10,), generator=g))
    sizes.append(rss())
print(sizes[-1] - sizes[1])
"""


@needs_mw
@pytest.mark.skipif(not M._limit_heap_fragmentation(), reason="glibc's mallopt only")
def test_slots_switching_tasks_keep_memory_flat():
    """Slots that rebuild their MuJoCo env for other tasks (10 slots, 10 resets with random MT50
    tasks, ~80 env builds) keep the process's memory flat: < 100 MB growth after the first
    rebuilds (without the 1 MB mmap threshold it grew ~0.2 GB here)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, "on"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ,
                                                     "OMP_NUM_THREADS": "1"})
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 100, f"memory grew {growth:.0f} MB over 8 resets"


@needs_mw
def test_hindsight_episode_is_a_success_for_its_goal():
    """A failed push episode (the scripted policy steered to a goal shifted by 12 cm) comes back
    as the states of a success for the goal where the puck went: the goal lies in the task's
    goal space, at least HINDSIGHT_MIN_MOVE from the puck's start, and an independent replay of
    the episode's first K chunks with that goal succeeds in the K-th chunk, through the same
    states.  No free goal, no movement: None."""
    tasks, chunk = ["push-v3", "button-press-v3"], 4
    slot = M.MetaWorldSlot(tasks)
    policy = S.scripted_policy("push-v3")
    state, acts, seed = slot.reset(0, 0, 3)["state"], [], 3
    for _ in range(200):
        steered = state.copy()
        steered[36:39] += np.array([0.12, 0.0, 0.0])
        acts.append(np.clip(policy.get_action(steered), -1, 1))
        obs, _, success = slot.step(acts[-1])
        assert not success
        state = obs["state"]
    acts = np.stack(acts)
    env = M.MetaWorldEnv(tasks, 2)
    states = env.hindsight_episode(0, seed, acts, chunk)
    assert states is not None and states.shape[1] == M.STATE_DIM
    k = len(states)
    goal = states[0, 36:39].astype(np.float64)
    assert np.allclose(states[:, 36:39], goal)
    raw = slot.envs[0]
    start = slot.reset(0, 0, seed)["state"]
    assert np.all(goal >= raw.goal_space.low) and np.all(goal <= raw.goal_space.high)
    assert np.linalg.norm(goal - start[4:7]) >= M.HINDSIGHT_MIN_MOVE
    raw._target_pos = goal.copy()
    replay, first = [np.asarray(raw._get_obs(), np.float32)], None
    for j, a in enumerate(acts):
        obs, _, success = slot.step(a)
        if success:
            first = j + 1
            break
        replay.append(obs["state"])
    assert first is not None and (k - 1) * chunk < first <= k * chunk
    np.testing.assert_allclose(states, np.stack(replay[::chunk]), atol=1e-6)
    assert env.hindsight_episode(1, seed, acts, chunk) is None  # button press: no free goal
    assert env.hindsight_episode(0, seed, np.zeros((200, 4)), chunk) is None  # puck unmoved
    with pytest.raises(ValueError, match="task_index"):
        env.hindsight_episode(2, seed, acts, chunk)
    env.close()
    slot.close()


def test_relative_state_against_a_loop():
    """The 12 offsets ``relative_state`` appends, entry by entry against a plain loop (float64),
    and a task without a second object (its 7 entries zero) gets a zero object-2 offset."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, M.STATE_DIM)).astype(np.float32)
    s[1, 11:18] = 0.0  # no second object
    out = M.relative_state(s)
    assert out.shape == (5, M.STATE_DIM + M.RELATIVE_DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :M.STATE_DIM], s)
    for i in range(5):
        x = s[i].astype(np.float64)
        hand, o1, o2, goal = x[0:3], x[4:7], x[11:14], x[36:39]
        want = np.concatenate([o1 - hand, (o2 - hand) if i != 1 else np.zeros(3),
                               goal - hand, goal - o1])
        np.testing.assert_allclose(out[i, M.STATE_DIM:], want, atol=1e-6)
    np.testing.assert_array_equal(M.relative_state(s[2]), out[2])  # one state [39] too
    assert M.state_dim("raw") == 39 and M.state_dim("relative") == 51
    with pytest.raises(ValueError, match="state_features: must be one of raw, relative"):
        M.state_dim("offsets")


@needs_mw
def test_relative_state_features_in_env_demos_and_hindsight(tmp_path):
    """``state_features="relative"``: the env's ``state [N, 51]`` is its raw state followed by
    ``relative_state``'s offsets; scripted demos record the same 51 entries (the policy reads
    the first 39, so the demo is the raw one's) and replay through the relative env; a
    hindsight replay returns states of the same width.  A bad value names the field."""
    from pirl.envs.demos import generate_demos, load_demos

    tasks = ["push-v3", "pick-place-wall-v3"]
    raw = M.MetaWorldEnv(tasks, 2)
    rel = M.MetaWorldEnv(tasks, 2, state_features="relative")
    assert rel.state_dim == 51 and raw.state_dim == 39
    seeds = torch.tensor([4, 9])
    o_raw, o_rel = raw.reset(episode_seeds=seeds), rel.reset(episode_seeds=seeds)
    assert o_rel["state"].shape == (2, 51)
    torch.testing.assert_close(o_rel["state"][:, :39], o_raw["state"])
    np.testing.assert_allclose(o_rel["state"].numpy(), M.relative_state(o_raw["state"].numpy()))
    a = torch.full((2, 4), 0.3)
    torch.testing.assert_close(rel.step(a).obs["state"][:, :39], raw.step(a).obs["state"])
    raw.close()

    kw = {"tasks": tasks, "max_episode_steps": 150}
    d_raw = load_demos(generate_demos("metaworld", 1, tmp_path / "raw", seed=1, env_kwargs=kw))
    d_rel = load_demos(generate_demos("metaworld", 1, tmp_path / "rel", seed=1,
                                      env_kwargs=kw | {"state_features": "relative"}))
    assert d_rel.state.shape[1] == 51 and d_rel.info["state_features"] == "relative"
    torch.testing.assert_close(d_rel.state[:, :39], d_raw.state)
    torch.testing.assert_close(d_rel.actions, d_raw.actions)

    policy, slot = S.scripted_policy("push-v3"), M.MetaWorldSlot(tasks)
    state, acts = slot.reset(0, 0, 3)["state"], []
    for _ in range(150):  # steered 12 cm off the goal: a failure to relabel
        steered = state.copy()
        steered[36:39] += np.array([0.12, 0.0, 0.0])
        acts.append(np.clip(policy.get_action(steered), -1, 1))
        state = slot.step(acts[-1])[0]["state"]
    slot.close()
    states = rel.hindsight_episode(0, 3, np.stack(acts), 4)
    assert states is not None and states.shape[1] == 51
    np.testing.assert_allclose(states, M.relative_state(states[:, :39]), atol=1e-6)
    rel.close()
    with pytest.raises(ValueError, match="state_features"):
        M.MetaWorldEnv(tasks, 2, state_features="offsets")


@needs_mw
def test_fixed_variations_follow_the_mt_protocol():
    """fixed_variations: an episode seed s starts the task's variation s % 50, whose placement
    is that of a plain slot reset with variation_seed(task, s % 50); equal variations start
    identically, others move the goal; the evaluator and rl.init_states see 50 fixed states.
    Without it the env has none.  A variation index out of range is an IndexError."""
    from pirl.envs.base import fixed_init_states

    tasks = ["reach-v3", "push-v3"]
    env = M.MetaWorldEnv(tasks, 4, fixed_variations=True)
    assert fixed_init_states(env) == M.NUM_VARIATIONS == 50
    assert fixed_init_states(M.MetaWorldEnv(tasks, 2)) == 0
    seeds = torch.tensor([3, 53, 3, 4])
    obs = env.reset(task_ids=torch.tensor([1, 1, 0, 1]), episode_seeds=seeds)["state"]
    assert torch.equal(obs[0], obs[1])  # seeds 3 and 53: variation 3 of push
    assert not torch.allclose(obs[0, 36:], obs[3, 36:])  # variation 4 elsewhere
    plain = M.MetaWorldSlot(tasks)
    for row, (task, var) in enumerate([(1, 3), (1, 3), (0, 3), (1, 4)]):
        ref = plain.reset(task, 0, M.variation_seed(tasks[task], var))["state"]
        np.testing.assert_array_equal(obs[row].numpy(), ref)
    # the same variation in another task list (its index there differs): the same placement
    solo = M.MetaWorldSlot(["push-v3"], fixed_variations=True)
    np.testing.assert_array_equal(solo.reset(0, 4, 999)["state"], obs[3].numpy())
    seeds_all = {M.variation_seed(t, v) for t in M.MT50_TASKS for v in range(50)}
    assert len(seeds_all) == 50 * 50 and min(seeds_all) >= 2 * M.HELDOUT_SEED_OFFSET
    assert max(seeds_all) < 10**9  # below the evaluator's own seeds
    with pytest.raises(IndexError, match="variation 50 out of range"):
        solo.reset(0, 50, 0)
    with pytest.raises(ValueError, match="fixed_variations"):
        M.MetaWorldEnv(tasks, 2, fixed_variations="yes")
    env.close()
    plain.close()
    solo.close()
