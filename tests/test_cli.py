"""The command line's argument handling (the runs it starts are tested in tests/runners)."""

import pytest

from pirl import cli


def test_resume_passes_only_an_iteration_count_on(monkeypatch):
    """``pirl train --resume RUN rl.iterations=N`` extends the run; any other override, a
    --config or a non-integer count is refused before anything runs."""
    calls = []
    monkeypatch.setattr("pirl.runners.train.run", lambda **kw: calls.append(kw) or {})
    assert cli.main(["train", "--resume", "R"]) == 0
    assert cli.main(["train", "--resume", "R", "rl.iterations=80"]) == 0
    resumed = {"subcommand": "train", "preset": None}  # what the run folder records
    assert calls == [{"resume": "R", "iterations": None, "cluster": None,
                      "command": {**resumed, "overrides": []}},
                     {"resume": "R", "iterations": 80, "cluster": None,
                      "command": {**resumed, "overrides": ["rl.iterations=80"]}}]
    for bad in (["rl.ppo.lr_policy=1e-4"], ["rl.iterations=80", "seed=1"],
                ["rl.iterations=80", "rl.iterations=90"], ["rl.iterations=8.5"]):
        with pytest.raises(SystemExit):
            cli.main(["train", "--resume", "R", *bad])
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", "R", "--config", "x.yaml"])
    assert len(calls) == 2


def test_eval_takes_only_eval_overrides(monkeypatch, tmp_path):
    """``pirl eval RUN eval.num_steps=10`` passes the override into the run's config; an override
    of anything but the evaluation (the model, env, sampler are the run's) is refused first."""
    for bad in (["sampler.kind=ode"], ["eval.num_steps=10", "seed=3"]):
        with pytest.raises(SystemExit, match="only eval"):
            cli.main(["eval", str(tmp_path), *bad])
    seen = []

    def fake_load_run_config(run_dir, overrides):
        seen.append(list(overrides))
        raise RuntimeError("stop here")

    monkeypatch.setattr("pirl.runners.train.load_run_config", fake_load_run_config)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(RuntimeError, match="stop here"):
        cli.main(["eval", str(tmp_path), "--episodes", "4", "eval.num_steps=10", "threads=1"])
    assert seen == [["eval.episodes_per_task=4", "eval.num_steps=10", "threads=1"]]


@pytest.mark.parametrize("preset", sorted(p.stem for p in cli.presets_dir().glob("*.yaml")))
def test_every_preset_loads_into_a_valid_config(preset):
    """Each shipped preset resolves by name and type-checks into a TrainConfig (a typo in a
    field name or a bad value would raise naming the field)."""
    from pirl.config.loading import load_yaml
    from pirl.config.schema import TrainConfig

    cfg = load_yaml(TrainConfig, cli.resolve_preset(preset))
    assert isinstance(cfg, TrainConfig)


def test_flow_noise_preset_changes_only_the_sampler_and_ppo_settings():
    from pirl.config.loading import load_yaml, to_dict
    from pirl.config.schema import TrainConfig

    cfg = load_yaml(TrainConfig, cli.resolve_preset("tabletop_flow_noise"))
    assert (cfg.sampler.kind, cfg.sampler.min_std, cfg.sampler.max_std) == ("flow_noise", 0.16, 0.32)
    assert (cfg.rl.ppo.logp_mode, cfg.rl.ppo.logp_level, cfg.rl.ppo.lr_policy) == (
        "chain_mean", "chunk", 1e-4)
    base, got = to_dict(TrainConfig()), to_dict(cfg)
    assert got["env"] == base["env"] and got["demos"] == base["demos"]
    assert got["rl"]["action_chunk"] == base["rl"]["action_chunk"] == 4
    assert got["rl"]["ppo"]["lr_schedule"] == "cosine"


def test_headline_preset_changes_only_the_start_the_iterations_and_the_evaluation():
    """tabletop_headline: the default recipe with 4000 pretraining / 400 SFT steps and 60 PPO
    iterations at 512 envs, re-planning every 2 steps; the sampler, the other RL settings and
    the env's own stay the default's."""
    from pirl.config.loading import load_yaml, to_dict
    from pirl.config.schema import TrainConfig

    cfg = load_yaml(TrainConfig, cli.resolve_preset("tabletop_headline"))
    assert (cfg.pretrain.steps, cfg.sft.steps, cfg.env.num_envs, cfg.threads) == (4000, 400, 512, 1)
    base, got = to_dict(TrainConfig()), to_dict(cfg)
    assert got["env"]["kwargs"] == base["env"]["kwargs"]
    assert got["sampler"] == base["sampler"]
    assert got["rl"] == {**base["rl"], "iterations": 60, "action_chunk": 2}
    assert got["demos"] == base["demos"]
    assert got["pretrain"] == {**base["pretrain"], "steps": 4000}
    assert got["eval"] == {**base["eval"], "episodes_per_task": 8}


def test_unknown_preset_suggests_the_closest_names(capsys):
    assert cli.main(["train", "--config", "tabletop_headlin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pirl: error: --config: 'tabletop_headlin'")
    assert "did you mean 'tabletop_headline'" in err


def test_eval_of_a_missing_or_foreign_path_names_the_path_given(tmp_path, capsys):
    """``pirl eval PATH`` on a path that does not exist, a folder without config.yaml or a file
    outside a run folder exits 2 with an error that names PATH (it used to name PATH's
    grandparent, e.g. '/ is not a pirl run folder')."""
    missing = tmp_path / "nonexistent"
    assert cli.main(["eval", str(missing)]) == 2
    assert f"pirl: error: {missing} does not exist" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert f"pirl: error: {tmp_path} is not a pirl run folder" in capsys.readouterr().err
    stray = tmp_path / "last.pt"
    stray.write_bytes(b"")
    assert cli.main(["eval", str(stray)]) == 2
    err = capsys.readouterr().err
    assert str(stray) in err and "is not a pirl run folder" in err
