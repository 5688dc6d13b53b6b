"""Fail before work: impossible Ray placements stop with ``pirl: error: <field>: <reason>`` and
exit status 2 before any pretraining, demos or SFT; every placement's defaults fit 2 CPUs."""

from __future__ import annotations

import re

import pytest

from pirl.config.loading import ConfigError
from pirl.runners.distributed import check_resources, placement_resources
from pirl.runners.placement import LearnerPlacement, PlacementConfig
from tests.runners.tiny_run import TINY_RUN_OVERRIDES


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_default_placements_fit_a_two_cpu_machine(mode):
    pl = PlacementConfig(mode=mode)
    assert placement_resources(pl)["CPU"] <= 2 and placement_resources(pl)["GPU"] == 0
    check_resources(pl, {"CPU": 2.0}, [{"CPU": 2.0}])


def test_resource_errors_name_the_field():
    pl = PlacementConfig(mode="disaggregated", learner=LearnerPlacement(cpus=4.0))
    # 2 x 0.25 + 0.5 + 4 = 5 CPUs, the learner's the largest share
    with pytest.raises(ConfigError, match=r"^placement\.learner\.cpus: .* asks Ray for 5 CPU "
                                          r"\(the cluster has 2\)"):
        check_resources(pl, {"CPU": 2.0})
    gpu = PlacementConfig(mode="disaggregated", rollout_gpus=1.0)
    with pytest.raises(ConfigError, match=r"^placement\.rollout_gpus: .* 1 GPU \(the cluster "
                                          r"has 0\)"):
        check_resources(gpu, {"CPU": 8.0})
    # enough in all, but no single node holds a 1.5-CPU learner rank
    big = PlacementConfig(mode="colocated", learner=LearnerPlacement(cpus=1.5))
    check_resources(big, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"^placement\.learner\.cpus: one worker asks for 1\.5 "
                                          r"CPU .* than any node"):
        check_resources(big, {"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 1.0}])


def _train(tmp_path, capsys, *overrides):
    from pirl.cli import main

    run_dir = tmp_path / "run"
    rc = main(["train", "--cluster", "local", *TINY_RUN_OVERRIDES, f"run_dir={run_dir}",
               *overrides])
    return rc, capsys.readouterr().err, run_dir


@pytest.mark.parametrize("overrides,error", [
    (["placement.mode=disaggregated", "placement.learner.cpus=3"],
     r"pirl: error: placement\.learner\.cpus: placement\.mode=disaggregated asks Ray for 4 CPU "
     r"\(the cluster has 2\)"),
    (["placement.mode=colocated", "placement.learner.gpus=1"],
     r"pirl: error: placement\.learner\.gpus: .* 1 GPU \(the cluster has 0\)"),
    (["placement.mode=disaggregated", "placement.env_workers=16", "placement.pipeline_stages=1"],
     r"pirl: error: env\.num_envs: 8 envs cannot be split over 16 disaggregated workers"),
    (["placement.mode=disaggregated", "env.name=maniskill/PickCube-v1", "pretrain.steps=0",
      "env.kwargs={}"],
     r"pirl: error: env\.name: the Ray node .* cannot build the training env "
     r"'maniskill/PickCube-v1'"),
], ids=["cpus", "gpus", "env-split", "simulator"])
def test_impossible_placement_fails_before_work(ray_local, tmp_path, capsys, overrides, error):
    """Exit status 2, one error line naming the field, and no run folder: nothing (pretraining,
    demos, SFT) ran."""
    try:
        import mani_skill  # noqa: F401
        if "env.name=maniskill/PickCube-v1" in overrides:
            pytest.skip("ManiSkill is installed here: its env builds")
    except ImportError:
        pass
    rc, err, run_dir = _train(tmp_path, capsys, *overrides)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(error, err), err
    assert not run_dir.exists()
