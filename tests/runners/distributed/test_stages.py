"""Env stages and the pipelined rollout: staged collection equals
:func:`pirl.runners.rollout.collect`, slices concatenate to the full rollout, and the schedule
overlaps env steps with inference."""

from __future__ import annotations

import pytest
import torch

from pirl.envs.base import ChunkedEnv
from pirl.flow import build_sampler
from pirl.runners.distributed import (EnvSlice, LocalStage, cat_rollouts, collect_staged,
                                      slice_reset_kwargs)
from pirl.runners.rollout import collect
from tests.runners.distributed.helpers import N, assert_rollouts_close, make_env, reset_kwargs

@pytest.mark.parametrize("bounds,num_chunks", [([(0, 6)], 3), ([(0, 3), (3, 6)], 3),
                                               ([(0, 2), (2, 4), (4, 6)], 6)])
def test_staged_collect_equals_local_collect(setup, bounds, num_chunks):
    """Envs split into stages (pipelined) give the local rollout; with num_chunks=6 every
    episode (12 steps = 4 chunks of 3) ends early, exercising the speculative last step."""
    env, policy = setup
    sampler = build_sampler("flow_sde", num_steps=3, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim, shared_across_batch=False)
    kw = reset_kwargs(env)
    g_local, g_staged = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = collect(policy, sampler, ChunkedEnv(env), num_chunks=num_chunks, reset_kwargs=kw,
                  action_chunk=3, generator=g_local)
    stages = [LocalStage(EnvSlice(make_env(b - a), a, b)) for a, b in bounds]
    got = collect_staged(policy, sampler, stages, num_envs=N, num_chunks=num_chunks,
                         reset_kwargs=kw, action_chunk=3, generator=g_staged)
    assert len(ref.chains) == min(num_chunks, 4)
    assert_rollouts_close(ref, got, exact=len(bounds) == 1)
    # same generator position: the next iteration's noise is the same too
    assert torch.equal(g_local.get_state(), g_staged.get_state())


def test_slices_concatenate_to_full_rollout(setup):
    """Two processes each collecting their rows (colocated mode) == the full rollout."""
    env, policy = setup
    sampler = build_sampler("flow_noise", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    kw = reset_kwargs(env, seed=9)
    ref = collect(policy, sampler, ChunkedEnv(env), num_chunks=3, reset_kwargs=kw,
                  action_chunk=3, generator=torch.Generator().manual_seed(4))
    parts = [collect_staged(policy, sampler, [LocalStage(EnvSlice(make_env(b - a), a, b))],
                            num_envs=N, num_chunks=3, reset_kwargs=kw, action_chunk=3,
                            generator=torch.Generator().manual_seed(4))
             for a, b in [(0, 4), (4, 6)]]
    assert_rollouts_close(ref, cat_rollouts(parts))


def test_slice_reset_kwargs_needs_episode_seeds():
    kw = {"seed": 1, "task_ids": torch.arange(4), "episode_seeds": torch.arange(4) + 10}
    s = slice_reset_kwargs(kw, 1, 3)
    assert s["task_ids"].tolist() == [1, 2] and s["episode_seeds"].tolist() == [11, 12]
    assert s["seed"] == 1 and kw["task_ids"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="episode_seeds"):
        slice_reset_kwargs({"seed": 1}, 0, 2)

def test_pipeline_schedule_overlaps_env_and_inference(setup):
    """The pipelined schedule: at every chunk step, stage 1 is inferred after stage 0's chunk
    was submitted and before stage 0's result is awaited (with remote stages, stage 0's envs
    step meanwhile), and the next step's stage 0 is inferred before stage 1's result is
    awaited."""
    env, policy = setup
    sampler = build_sampler("flow_noise", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    log: list[tuple[str, int]] = []

    class Recording(LocalStage):
        def __init__(self, idx, a, b):
            super().__init__(EnvSlice(make_env(b - a), a, b))
            self.idx = idx

        def submit_step(self, actions):
            log.append(("submit", self.idx))
            return super().submit_step(actions)

        def wait(self, handle):
            log.append(("wait", self.idx))
            return super().wait(handle)

    class Spy(torch.nn.Module):
        """The policy, logging which stage (by batch size: 2 or 4 rows) each inference is for."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            if name == "inner":
                return super().__getattr__(name)
            return getattr(self.inner, name)

        def encode_prefix(self, obs):
            log.append(("infer", {2: 0, 4: 1}[obs["state"].shape[0]]))
            return self.inner.encode_prefix(obs)

    collect_staged(Spy(policy), sampler, [Recording(0, 0, 2), Recording(1, 2, 6)],
                   num_envs=N, num_chunks=2, reset_kwargs=reset_kwargs(env), action_chunk=3,
                   with_values=False, generator=torch.Generator().manual_seed(0))
    step = [("wait", 0), ("infer", 0), ("submit", 0), ("wait", 1), ("infer", 1), ("submit", 1)]
    assert log == step * 2 + [("wait", 0), ("wait", 1)]
