"""The env registry: built-in tabletop and lazy simulator entries."""

import pytest
import torch

from pirl.envs import ENV_REGISTRY, make_env, register_env
from pirl.envs.base import BatchedEnv
from pirl.envs.tabletop import TabletopEnv


def test_make_tabletop_with_kwargs():
    env = make_env("tabletop", 3, split="ood", num_cameras=2, image_size=32)
    assert isinstance(env, TabletopEnv) and isinstance(env, BatchedEnv)
    obs = env.reset(seed=0)
    assert obs["images"].shape == (3, 2, 3, 32, 32) and env.split == "ood"
    assert make_env("tabletop/all", 1).split == "all"
    assert make_env("tabletop:ood", 1).split == "ood"
    vocab = env.vocabulary()
    every = make_env("tabletop/all", 1, task_families=("pick_place", "push", "stack"))
    for text in every.instructions:
        assert set(text.split()) <= set(vocab)


def test_lazy_entries_and_registration():
    assert ENV_REGISTRY["maniskill"] == "pirl.envs.maniskill:make_env"
    assert ENV_REGISTRY["libero"] == "pirl.envs.libero:make_env"
    with pytest.raises(KeyError):
        make_env("no-such-env", 1)
    register_env("_test_missing", "pirl.envs._no_such_module:make_env")
    with pytest.raises(ImportError, match="_no_such_module"):
        make_env("_test_missing", 1)
    register_env("_test_callable",
                 lambda name, num_envs, **kw: TabletopEnv(num_envs, num_cameras=0, **kw))
    env = make_env("_test_callable", 2, split="all")
    assert env.reset(seed=0)["state"].shape == (2, 4)
    del ENV_REGISTRY["_test_missing"], ENV_REGISTRY["_test_callable"]
    assert torch.is_tensor(env.step(torch.zeros(2, 3)).reward)
