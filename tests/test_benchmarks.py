"""benchmarks/rl_recipe.py: its documented command lines parse, and a tiny recipe runs end to end
(shared SFT start, one RL variant, the table's rows), also when resumed from a finished start."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.runners.tiny_run import TINY_RUN_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rl_recipe_parses_its_docstring_commands():
    recipe = _load("rl_recipe")
    # the docstring's form: overrides after the variant names, a preset given by name
    args = recipe.parse_args(["--config", "tabletop_headline", "--out", "x", "--variants",
                              "ppo_flow_noise", "eval.videos=0", "rl.iterations=40"])
    assert args.variants == ["ppo_flow_noise"]
    assert args.overrides == ["eval.videos=0", "rl.iterations=40"]
    assert Path(args.config).name == "tabletop_headline.yaml" and Path(args.config).is_file()
    args = recipe.parse_args(["eval.videos=0", "--variants", "ppo_flow_sde", "grpo_flow_sde"])
    assert args.variants == ["ppo_flow_sde", "grpo_flow_sde"]
    assert args.overrides == ["eval.videos=0"] and args.config is None
    assert recipe.parse_args([]).variants == list(recipe.VARIANTS)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--variants", "ppo_flow_sdee"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--config", "no_such_preset"])


def test_rl_recipe_runs_a_tiny_recipe_with_a_preset(tmp_path, capsys):
    recipe = _load("rl_recipe")
    out = tmp_path / "recipe"
    argv = ["--config", "tabletop_headline", "--out", str(out), "--variants", "ppo_flow_sde",
            "threads=1", *TINY_RUN_OVERRIDES, "rl.iterations=1"]
    rows = recipe.main(argv)
    assert [r[0] for r in rows] == ["ppo_flow_sde"]
    _name, start, final, steps, wall = rows[0]
    sft = json.loads((out / "sft" / "results.json").read_text())["sft"]
    run = json.loads((out / "ppo_flow_sde" / "results.json").read_text())
    assert final == run["final"] and set(final) == set(sft) == {"train"}
    # the start is the variant's own evaluation of the shared checkpoint: the shared one's here
    assert start == run["sft"] == sft
    assert steps == 8 * 16  # one iteration: 8 envs x the 16-step time limit
    # the variant started from the shared SFT checkpoint, with the preset's other fields
    import yaml
    cfg = yaml.safe_load((out / "ppo_flow_sde" / "config.yaml").read_text())
    assert cfg["model"]["checkpoint"] == str(out / "sft" / "checkpoints" / "sft.pt")
    assert cfg["sft"]["steps"] == 0 and cfg["pretrain"]["steps"] == 2
    assert cfg["sampler"]["kind"] == "flow_sde" and cfg["threads"] == 1
    table = capsys.readouterr().out
    assert "| ppo_flow_sde | " in table
    # the wall-clock is the run folder's record of its invocations
    from pirl.runners.train import run_wall_clock
    inv = [json.loads(x) for x in (out / "ppo_flow_sde" / "invocations.jsonl").read_text()
           .splitlines()]
    assert len(inv) == 1 and inv[0]["stage"] == "done" and not inv[0]["resumed"]
    # ... and of its command, for benchmarks/report.py: the preset by name and the overrides
    assert inv[0]["preset"] == "tabletop_headline" and inv[0]["subcommand"] == "train"
    assert inv[0]["overrides"][-4:] == [f"run_dir={out / 'ppo_flow_sde'}",
                                        f"model.checkpoint={out / 'sft' / 'checkpoints' / 'sft.pt'}",
                                        "sft.steps=0", "progress=false"]
    assert "rl.iterations=1" in inv[0]["overrides"] and "rl.algo=ppo" in inv[0]["overrides"]
    assert wall == run_wall_clock(out / "ppo_flow_sde") == inv[0]["wall_s"] > 0
    # a second call reuses the start, skips the finished variant and reports the same row
    assert recipe.main(argv) == rows
    # a variant run with another evaluation (re-planning every 2 steps) reports its own start
    argv2 = ["grpo_flow_sde" if a == "ppo_flow_sde" else a for a in argv]
    rows2 = recipe.main(argv2 + ["eval.action_chunk=2"])
    run2 = json.loads((out / "grpo_flow_sde" / "results.json").read_text())
    cfg2 = yaml.safe_load((out / "grpo_flow_sde" / "config.yaml").read_text())
    assert cfg2["eval"]["action_chunk"] == 2 and rows2[0][1] == run2["sft"]


@pytest.mark.parametrize("kind,opts", [("ode", {}), ("flow_sde", {"hybrid": False}),
                                       ("flow_sde", {"hybrid": True})])
def test_sampler_spread_matches_the_closed_form_chain(kind, opts):
    """benchmarks/sampler_spread.py's chunk spread (std over sampler calls at one observation)
    on the analytic Gaussian flow: the exact std of the discrete chain's final sample, written
    out per dimension (tests/flow/test_sde_marginal.py's moments; a hybrid chain's is the
    mixture over its one stochastic step, drawn once per call)."""
    from pirl.flow import build_sampler
    from tests.flow.conftest import GaussianFlow
    from tests.flow.test_sde_marginal import MU, S, chain_moments, mixture

    spread = _load("sampler_spread")
    k, a = 4, 0.5
    pol = GaussianFlow(MU, S)
    sampler = build_sampler(kind, num_steps=k, feature_dim=pol.feature_dim,
                            action_dim=pol.action_dim, noise_level=a, **opts)
    # (the analytic flow reads no observation: its prefix is a [B, 1] placeholder)
    got = spread.chunk_spread(pol, sampler, torch.zeros(2, 1), samples=3000)
    if kind == "ode":
        var = [chain_moments(k, a, [False] * k, m, s)[-1][1] for m, s in zip(MU, S)]
    elif not opts["hybrid"]:
        var = [chain_moments(k, a, [True] * k, m, s)[-1][1] for m, s in zip(MU, S)]
    else:
        var = [mixture([chain_moments(k, a, [j == i for j in range(k)], m, s)[-1]
                        for i in range(k)])[1] for m, s in zip(MU, S)]
    want = sum(v ** 0.5 for v in var) / len(var)
    # 3000 draws at 2 observations x 2 dims: the std's standard error is ~0.7%
    assert abs(got - want) < 0.04 * want, (got, want)
