"""Ray plumbing without a cluster: every kind of Ray failure of a worker's call becomes a
:class:`WorkerError` naming the worker (the CLI prints it as ``pirl: error: ...``)."""

from __future__ import annotations

import pytest

from pirl.runners.distributed import WorkerError, get_all

ray = pytest.importorskip("ray")


def test_get_all_names_the_worker_for_any_ray_error(monkeypatch):
    """Ray's memory monitor killing a worker raises OutOfMemoryError, neither an actor error
    nor a task error: it used to escape as a traceback."""
    oom = ray.exceptions.OutOfMemoryError("\x1b[36m2 worker(s) were killed\x1b[39m due to the "
                                          "node running low on memory")
    monkeypatch.setattr(ray, "wait", lambda left, num_returns, timeout: (left[:1], left[1:]))

    def get(ref):
        if ref == "bad":
            raise oom
        return ref

    monkeypatch.setattr(ray, "get", get)
    assert get_all(["a", "b"], ["w0", "w1"]) == ["a", "b"]
    with pytest.raises(WorkerError, match=r"^learner rank 0 failed: OutOfMemoryError: 2 "
                                          r"worker\(s\) were killed due to the node running "
                                          r"low on memory$"):
        get_all(["ok", "bad"], ["env worker 0", "learner rank 0"])
