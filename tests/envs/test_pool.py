"""Simulator-agnostic pool tests (:mod:`pirl.envs.pool`), default suite (no simulator needed).

The process pool and the episode bookkeeping run over a fake single-env slot (a counter; pool
mechanics only); the headless-GL choice and its missing-library error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pirl.envs import pool as P


def test_missing_gl_names_apt_packages(monkeypatch):
    import ctypes.util

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(P.SimulatorUnavailable, match="libegl1 libgl1 libosmesa6"):
        P.select_mujoco_gl()
    monkeypatch.setattr(ctypes.util, "find_library",
                        lambda name: "libOSMesa.so.8" if name == "OSMesa" else None)
    assert P.select_mujoco_gl() == "osmesa"
    monkeypatch.setenv("MUJOCO_GL", "egl")
    assert P.select_mujoco_gl() == "egl"


# ----------------------------------------------------------------------------- pool mechanics

class FakeSlotForPoolTests:
    """A fake single-env slot, ONLY for testing the pool and the episode bookkeeping.

    State: a counter; ``reset(task, init, seed)`` sets it to ``100 * task + init``; ``step(a)``
    adds ``a[0]``; success when the counter reaches ``goal``.
    """

    def __init__(self, goal: float = 3.0, fail_on_step: bool = False):
        self.goal = goal
        self.fail_on_step = fail_on_step
        self.value = 0.0
        self.pid = os.getpid()

    def _obs(self):
        return {"images": np.full((1, 3, 2, 2), int(self.value) % 256, np.uint8),
                "state": np.array([self.value], np.float32)}

    def reset(self, task, init, seed):
        self.value = 100.0 * task + init
        return self._obs()

    def step(self, action):
        if self.fail_on_step:
            raise ValueError("boom in worker")
        self.value += float(action[0])
        success = self.value >= self.goal
        return self._obs(), float(success), success

    def getpid(self):
        return self.pid


def _fake_env(n, in_process=True, auto_reset=False, max_steps=5, goal=3.0):
    import functools

    pool = P.SubprocEnvPool([functools.partial(FakeSlotForPoolTests, goal)] * n,
                            in_process=in_process)
    return P.PoolBatchedEnv(pool, task_names=["a", "b"], instructions=["do a", "do b"],
                            action_dim=1, state_dim=1, max_episode_steps=max_steps,
                            auto_reset=auto_reset, seed_space=1000)


def test_pool_processes_parallel_ordered_and_errors():
    import functools

    pool = P.SubprocEnvPool([functools.partial(FakeSlotForPoolTests, 3.0),
                             functools.partial(FakeSlotForPoolTests, 3.0, True)],
                            start_method="fork")  # fork: fast start; LIBERO itself uses spawn
    try:
        pids = pool.call("getpid")
        assert len(set(pids)) == 2 and os.getpid() not in pids
        outs = pool.call("reset", args=[(0, 7, 7), (1, 2, 2)])
        assert [o["state"][0] for o in outs] == [7.0, 102.0]
        outs = pool.call("step", args=[(np.array([1.0]),)], indices=[0])
        assert outs[0][0]["state"][0] == 8.0
        # worker 1 raises inside step: the parent re-raises with the worker's traceback
        with pytest.raises(RuntimeError, match="boom in worker"):
            pool.call("step", args=[(np.array([1.0]),)], indices=[1])
    finally:
        pool.close()


def test_frozen_when_done_without_auto_reset():
    env = _fake_env(3, max_steps=4)
    obs = env.reset(task_ids=torch.tensor([0, 0, 1]), episode_seeds=torch.tensor([0, 2, 0]))
    assert obs["instruction"] == ["do a", "do a", "do b"]
    assert obs["state"][:, 0].tolist() == [0.0, 2.0, 100.0]
    assert obs["images"].shape == (3, 1, 3, 2, 2) and obs["images"].dtype == torch.uint8
    a = torch.ones(3, 1)
    out = env.step(a)  # values 1, 3 (success), 101 (success: >= goal)
    assert out.terminated.tolist() == [False, True, True]
    assert out.reward.tolist() == [0.0, 1.0, 1.0]
    for t in range(3):
        out = env.step(a)
        # finished envs are frozen: reward 0, flags kept, obs unchanged
        assert out.reward[1:].tolist() == [0.0, 0.0]
        assert out.terminated[1:].all() and out.obs["state"][1:, 0].tolist() == [3.0, 101.0]
    # env 0: 1 -> 2 -> 3 (success at its 3rd step) -> frozen at step 4
    assert out.terminated.tolist() == [True, True, True] and not out.truncated.any()


def test_truncation_and_auto_reset():
    env = _fake_env(2, auto_reset=True, max_steps=2, goal=1e9)
    env.reset(seed=0, task_ids=torch.tensor([0, 1]), episode_seeds=torch.tensor([0, 0]))
    out = env.step(torch.ones(2, 1))
    assert not out.done.any()
    out = env.step(torch.ones(2, 1))
    assert out.truncated.all() and not out.terminated.any()
    assert out.info["final_obs"]["state"][:, 0].tolist() == [2.0, 102.0]
    assert out.info["episode_success"].tolist() == [False, False]
    # the new episode starts from a fresh seed: value = 100 * task + (seed % seed_space)
    init = (env._episode_seeds % 1000).tolist()
    assert out.obs["state"][:, 0].tolist() == [float(init[0]), 100.0 + float(init[1])]
    out = env.step(torch.ones(2, 1))
    assert not out.done.any()


def test_auto_reset_seeds_stay_in_seed_range():
    import functools

    pool = P.SubprocEnvPool([functools.partial(FakeSlotForPoolTests, 1e9)] * 3, in_process=True)
    env = P.PoolBatchedEnv(pool, task_names=["a"], instructions=["do a"], action_dim=1,
                           state_dim=1, max_episode_steps=1, auto_reset=True, seed_space=1000,
                           seed_range=(5000, 5010))
    env.reset(seed=1)
    for _ in range(5):
        assert ((env._episode_seeds >= 5000) & (env._episode_seeds < 5010)).all()
        out = env.step(torch.zeros(3, 1))
        assert out.truncated.all()


def test_same_seed_same_start_defaults_deterministic():
    env = _fake_env(4)
    o1 = env.reset(seed=123)
    o2 = env.reset(seed=123)
    assert torch.equal(o1["state"], o2["state"]) and torch.equal(o1["task_id"], o2["task_id"])


def test_wrong_action_shape_is_an_error():
    env = _fake_env(2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \[num_envs=2, action_dim=1\]"):
        env.step(torch.ones(2, 3))
    with pytest.raises(ValueError, match="got \\[3, 1\\]"):
        env.step(torch.ones(3, 1))


class DyingSlotForPoolTests(FakeSlotForPoolTests):
    """Fake slot whose process exits hard on its first step (a crashed simulator)."""

    def step(self, action):
        os._exit(3)


def test_dead_worker_stops_the_pool():
    import functools

    pool = P.SubprocEnvPool([functools.partial(FakeSlotForPoolTests, 3.0),
                             functools.partial(DyingSlotForPoolTests, 3.0)],
                            start_method="fork")
    env = P.PoolBatchedEnv(pool, task_names=["a"], instructions=["do a"], action_dim=1,
                           state_dim=1, max_episode_steps=5)
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match=r"env worker 1 .*died \(exit code 3\)"):
        env.step(torch.ones(2, 1))
    # no further step on the survivors' partial data: the pool is closed
    with pytest.raises(RuntimeError, match="pool is closed"):
        env.step(torch.ones(2, 1))




def test_grouped_pool_blocks_of_slots_per_worker():
    import functools

    pool = P.GroupedSlotPool(functools.partial(FakeSlotForPoolTests, 3.0), 5, 2,
                             start_method="fork")
    try:
        pids = pool.call("getpid")
        # contiguous blocks: slots 0-2 in one worker, 3-4 in the other, neither this process
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4]
        outs = pool.call("reset", args=[(0, i, i) for i in range(5)])
        assert [o["state"][0] for o in outs] == [0.0, 1.0, 2.0, 3.0, 4.0]
        # a subset across both workers comes back in the order asked for
        outs = pool.call("step", args=[(np.array([10.0]),), (np.array([20.0]),)],
                         indices=[4, 1])
        assert [o[0]["state"][0] for o in outs] == [14.0, 21.0]
        # the batched env over it: stacked observations, one row per slot
        env = P.PoolBatchedEnv(pool, task_names=["a"], instructions=["do a"], action_dim=1,
                               state_dim=1, max_episode_steps=5, seed_space=1000)
        obs = env.reset(task_ids=torch.zeros(5, dtype=torch.long),
                        episode_seeds=torch.arange(5))
        assert obs["state"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        step = env.step(torch.full((5, 1), 2.5))
        assert step.obs["state"][:, 0].tolist() == [2.5, 3.5, 4.5, 5.5, 6.5]
    finally:
        pool.close()
    with pytest.raises(ValueError, match="num_workers >= 0"):
        P.GroupedSlotPool(functools.partial(FakeSlotForPoolTests, 3.0), 2, -1)


def test_grouped_pool_dead_worker_stops_it():
    import functools

    pool = P.GroupedSlotPool(functools.partial(DyingSlotForPoolTests, 3.0), 4, 2,
                             start_method="fork")
    pool.call("reset", args=[(0, 0, 0)] * 4)
    with pytest.raises(RuntimeError, match=r"env worker 0 .*died \(exit code 3\)"):
        pool.call("step", args=[(np.array([1.0]),)] * 4)
    with pytest.raises(RuntimeError, match="pool is closed"):
        pool.call("step", args=[(np.array([1.0]),)] * 4)
