"""The data-parallel learner in this process (a one-rank gloo group, no Ray): DDP's
``find_unused_parameters`` is on only where a parameter really gets no gradient, DDP warns about
nothing, and a one-rank learner is the local trainer bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pirl.runners.distributed import DataParallelRLTrainer
from pirl.runners.rl import RLTrainer
from tests.runners.distributed.helpers import rl_parts


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("algo,unused", [("ppo", False), ("grpo", True)])
def test_ddp_finds_unused_parameters_only_where_there_are_some(one_rank_group, capfd, algo,
                                                               unused):
    """PPO trains every parameter: the option stays off and DDP prints no warning (it used to
    print 'find_unused_parameters=True was specified ... but did not find any unused
    parameters' on every rank).  GRPO has no value loss, so the critic gets no gradient: the
    option is on.  Either way the one-rank update equals RLTrainer's bit for bit."""
    env, policy, sampler, cfg = rl_parts(algo)
    ref_env, ref_policy, ref_sampler, _ = rl_parts(algo)
    tr = DataParallelRLTrainer(policy, sampler, env, cfg, seed=0)
    tr.parallelize(fsdp=False)
    ref = RLTrainer(ref_policy, ref_sampler, ref_env, cfg, seed=0)
    for _ in range(2):
        m, m_ref = tr.iteration(), ref.iteration()
        for k in m_ref:
            if not k.startswith("perf/"):
                assert m[k] == m_ref[k], k
    assert tr.find_unused_parameters is unused
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(),
                                                  ref_policy.state_dict().values()))
    assert "find_unused_parameters" not in capfd.readouterr().err
