"""Placement config and row sharding (no Ray needed)."""

from __future__ import annotations

import pytest

from pirl.config.loading import ConfigError, apply_overrides
from pirl.runners.placement import LearnerPlacement, PlacementConfig, shard_rows


@pytest.mark.parametrize("n,parts", [(1, 1), (7, 1), (8, 2), (7, 2), (10, 3), (5, 5)])
def test_shard_rows_partition(n, parts):
    rows = shard_rows(n, parts)
    assert len(rows) == parts
    assert rows[0][0] == 0 and rows[-1][1] == n
    for (a, b), (c, _) in zip(rows, rows[1:]):
        assert b == c  # contiguous
    sizes = [b - a for a, b in rows]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra rows go to the first parts


def test_shard_rows_hand_example():
    assert shard_rows(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_shard_rows_rejects_too_many_parts():
    with pytest.raises(ValueError):
        shard_rows(2, 3)


def test_placement_validation_names_field():
    with pytest.raises(ValueError, match="placement.pipeline_stages"):
        PlacementConfig(mode="disaggregated", env_workers=3, pipeline_stages=2)
    with pytest.raises(ValueError, match="rollout_workers=2 x pipeline_stages=2"):
        PlacementConfig(mode="disaggregated", env_workers=2, rollout_workers=2)
    PlacementConfig(mode="disaggregated", env_workers=4, rollout_workers=2, pipeline_stages=2)
    with pytest.raises(ValueError, match="placement.learner.ranks"):
        LearnerPlacement(ranks=0)
    with pytest.raises(ValueError, match="env.num_envs"):
        PlacementConfig(mode="colocated", learner=LearnerPlacement(ranks=4)).validate_for(3)
    PlacementConfig(mode="local").validate_for(1)


def test_placement_overrides_parse():
    cfg = apply_overrides(PlacementConfig(), ["mode=disaggregated", "env_workers=4",
                                              "pipeline_stages=2", "learner.ranks=2",
                                              "learner.fsdp=true"])
    assert (cfg.mode, cfg.env_workers, cfg.pipeline_stages) == ("disaggregated", 4, 2)
    assert cfg.learner.ranks == 2 and cfg.learner.fsdp is True
    with pytest.raises((ConfigError, ValueError)):
        apply_overrides(PlacementConfig(), ["mode=everywhere"])


def test_resource_check_names_what_is_missing():
    from pirl.runners.distributed import check_resources, placement_resources

    pl = PlacementConfig(mode="disaggregated", env_workers=4, pipeline_stages=2, env_cpus=0.5,
                         rollout_cpus=1.0, rollout_gpus=1.0,
                         learner=LearnerPlacement(ranks=2, cpus=1.0, gpus=1.0))
    # hand count: 4 * 0.5 + 1 + 2 * 1 = 5 CPUs; 1 + 2 = 3 GPUs
    assert placement_resources(pl) == {"CPU": 5.0, "GPU": 3.0}
    pl2 = PlacementConfig(mode="disaggregated", env_workers=4, rollout_workers=2,
                          pipeline_stages=1, env_cpus=0.5, rollout_cpus=1.0, rollout_gpus=1.0,
                          learner=LearnerPlacement(cpus=1.0))
    # 4 * 0.5 + 2 * 1 + 1 learner rank * 1 = 5 CPUs; 2 rollout GPUs
    assert placement_resources(pl2) == {"CPU": 5.0, "GPU": 2.0}
    check_resources(pl, {"CPU": 8.0, "GPU": 3.0})
    with pytest.raises(ValueError, match=r"3 GPU \(the cluster has 0\)"):
        check_resources(pl, {"CPU": 8.0})
    colo = PlacementConfig(mode="colocated", learner=LearnerPlacement(ranks=3, cpus=0.5))
    assert placement_resources(colo) == {"CPU": 1.5, "GPU": 0.0}


@pytest.mark.parametrize("argv,mode,cluster", [
    (["train", "--cluster", "auto"], "disaggregated", "auto"),
    (["train", "--cluster", "ray://head:10001", "placement.mode=colocated"], "colocated",
     "ray://head:10001"),
    (["train"], "local", None),
    (["train", "--resume", "RUN", "--cluster", "auto"], None, "auto"),
])
def test_cli_cluster_flag_sets_placement(monkeypatch, argv, mode, cluster):
    """``pirl train --cluster ADDR`` sets placement.cluster (and a Ray mode if the config says
    local); without it the run stays local."""
    import pirl.runners.train as train
    from pirl.cli import main

    seen = {}
    monkeypatch.setattr(train, "run",
                        lambda cfg=None, resume=None, **kw: seen.update(cfg=cfg, **kw))
    assert main(argv) == 0
    if "--resume" in argv:  # the run folder's config is changed by run(): cluster= only
        assert seen["cfg"] is None and seen["cluster"] == cluster
        return
    assert seen["cfg"].placement.mode == mode and seen["cfg"].placement.cluster == cluster
