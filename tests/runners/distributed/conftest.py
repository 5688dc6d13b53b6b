"""Fixtures of the scale-out tests: the tiny env + policy, and one 2-CPU local Ray for them all."""

from __future__ import annotations

import pytest
import torch

from tests.runners.distributed.helpers import N, make_env, make_policy

try:
    import ray
except ImportError:  # the Ray tests skip without the `dist` extra; the others still run
    ray = None


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    env = make_env(N)
    return env, make_policy(env).eval()


@pytest.fixture(scope="package")
def ray_local():
    """A 2-CPU local Ray shared by this folder's tests (workers request fractions of a CPU)."""
    from pirl.runners.placement import connect

    if ray is None:
        pytest.skip("Ray is not installed: pip install 'pirl[dist]'")
    connect("local", num_cpus=2)
    yield
    ray.shutdown()
