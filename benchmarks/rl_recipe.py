"""The headline table: few-shot SFT, then RL with each algorithm x sampler, on the tabletop.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/rl_recipe.py --out runs/recipe

One SFT run (demos -> few-shot SFT -> ODE evaluation per split) is shared by every RL variant,
which starts from its checkpoint (``model.checkpoint=.../sft.pt``, ``sft.steps=0``).  Each variant
is a normal ``pirl train`` run folder; the table reads their ``results.json`` and
``metrics.jsonl``, and its wall-clock is the run folder's (``invocations.jsonl``: the sum over
the calls that ran it, also when the table is printed again later).  Extra
``section.field=value`` arguments apply to every run (e.g. a smaller ``rl.iterations`` for a
quick look).  The shared start is the default's (grounding pretraining of the prefix, then
500 SFT steps on 6 demos per task, in the few-shot band); ``--config tabletop_pretrained``
shares a start above the band (1000 SFT steps) instead, and ``--config tabletop_headline`` the
headline protocol (4000 pretraining and 400 SFT steps, 60 iterations at 512 envs, re-planning
every 2 steps; 1 thread, which reproduces a start exactly on one machine, but CPU numerics
differ between machines: one gave a 70.1% start, another 57.3%, 56.6% re-planning every 2).  A variant's "before" is its own evaluation of the shared start, so a variant run with
another ``rl.action_chunk`` compares like with like.  On 1 thread beside another run a Flow-SDE
variant takes ~85 min (~2x an iteration re-planning every 4) and a Flow-Noise one ~4 h, so
run the variants in parts; a finished variant is skipped, an interrupted one resumed, and the
shared SFT start made once.  The commands of the re-planning-every-2 experiment
(docs/experiments.md#2026-12-04--re-planning-every-2-steps-in-rl):

    PYTHONPATH=src .venv/bin/python benchmarks/rl_recipe.py --config tabletop_headline \
        --out runs/headline --variants ppo_flow_sde eval.videos=0
    # re-planning every 4 steps (the start evaluated the same way), 40
    # iterations extended to 60 and then 90 (each extension re-opens the cosine lr schedule):
    PYTHONPATH=src .venv/bin/python benchmarks/rl_recipe.py --config tabletop_headline \
        --out runs/headline --variants ppo_flow_noise eval.videos=0 rl.action_chunk=4 \
        rl.iterations=40
    pirl train --resume runs/headline/ppo_flow_noise rl.iterations=60
    pirl train --resume runs/headline/ppo_flow_noise rl.iterations=90
    # PPO against GRPO re-planning every 4 (60 iterations each; GRPO extended to 80):
    PYTHONPATH=src .venv/bin/python benchmarks/rl_recipe.py --config tabletop_headline \
        --out runs/headline_replan4 --variants ppo_flow_sde grpo_flow_sde eval.videos=0 \
        rl.action_chunk=4
    pirl train --resume runs/headline_replan4/grpo_flow_sde rl.iterations=80
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Per-variant settings are the measured ones (docs/experiments.md): PPO with Flow-Noise as in the
# tabletop_flow_noise preset (per-step std 0.16-0.32, one ratio per chunk whose log-ratio is the
# chain's average, lr 1e-4, failure-weighted task sampling: +15.3 points in 20 iterations, where
# the 0.08-0.16 range gained 4.7 and per-element ratios collapsed).  GRPO with Flow-Noise: one
# summed ratio per chunk at lr 1e-4 (the std range 0.16-0.32 not measured with GRPO).  GRPO with
# Flow-SDE as measured from the default's SFT checkpoint (groups of 8, lr 3e-4, cosine).
VARIANTS = {
    "ppo_flow_noise": ["rl.algo=ppo", "sampler.kind=flow_noise", "sampler.min_std=0.16",
                       "sampler.max_std=0.32", "rl.ppo.logp_mode=chain_mean",
                       "rl.ppo.logp_level=chunk", "rl.ppo.lr_policy=1e-4",
                       "rl.task_sampling=failure"],
    "ppo_flow_sde": ["rl.algo=ppo", "sampler.kind=flow_sde"],
    "grpo_flow_noise": ["rl.algo=grpo", "sampler.kind=flow_noise", "rl.grpo.logp_mode=chain",
                        "rl.grpo.lr_policy=1e-4"],
    "grpo_flow_sde": ["rl.algo=grpo", "sampler.kind=flow_sde", "rl.grpo.lr_policy=3e-4",
                      "rl.grpo.lr_schedule=cosine"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: ``--variants`` names (overrides may follow them) and a preset name or
    YAML path for ``--config`` (resolved to a path)."""
    from pirl.config import ConfigError, resolve_preset

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/recipe")
    ap.add_argument("--config", default=None, help="YAML preset shared by all runs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("overrides", nargs="*", help="section.field=value, applied to every run")
    args = ap.parse_args(argv)
    # "--variants a b x.y=1": argparse hands the overrides after the names to --variants
    args.overrides += [v for v in args.variants if "=" in v]
    args.variants = [v for v in args.variants if "=" not in v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    try:
        args.config = resolve_preset(args.config)
    except ConfigError as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> list[tuple]:
    """Run (or complete) the recipe; print the table and return its rows
    ``(variant, start results per split, final results per split, env steps, wall-clock s)``.
    A variant's start is its own evaluation of the shared SFT checkpoint (the same unless the
    overrides of the call that ran it changed the evaluation, e.g. ``eval.action_chunk``)."""
    from pirl.runners.logger import read_metrics
    from pirl.runners.train import resolve_config, run, run_wall_clock

    def wall_of(d: Path, measured: float) -> float:
        """The run folder's recorded wall-clock (all its invocations; older run folders have no
        invocations.jsonl: the time measured by this call if it ran one, else NaN)."""
        w = run_wall_clock(d)
        return w if w is not None else measured

    args = parse_args(argv)
    out = Path(args.out)
    # what each run folder records as its command (benchmarks/report.py's table shows it): the
    # preset by name when it is a shipped one, and the overrides this script gives the run
    from pirl.config import presets_dir

    preset = (None if args.config is None else Path(args.config).stem
              if Path(args.config).parent.resolve() == presets_dir().resolve() else args.config)

    def command(overrides: list[str]) -> dict:
        return {"subcommand": "train", "preset": preset, "overrides": overrides}

    rows = []
    sft_dir = out / "sft"
    sft_wall = float("nan")
    if not (sft_dir / "checkpoints" / "sft.pt").exists():
        t0 = time.perf_counter()
        ov = args.overrides + [f"run_dir={sft_dir}", "rl.iterations=0", "progress=false"]
        run(resolve_config(args.config, ov), command=command(ov))
        sft_wall = time.perf_counter() - t0
    sft_wall = wall_of(sft_dir, sft_wall)
    sft_res = json.loads((sft_dir / "results.json").read_text())["sft"]
    for name in args.variants:
        d = out / name
        measured = float("nan")
        if not (d / "results.json").exists() or "final" not in json.loads((d / "results.json").read_text()):
            t0 = time.perf_counter()
            ov = args.overrides + VARIANTS[name] + [
                f"run_dir={d}", f"model.checkpoint={sft_dir / 'checkpoints' / 'sft.pt'}",
                "sft.steps=0", "progress=false"]
            if (d / "checkpoints" / "last.pt").exists():
                run(resume=d, command={"subcommand": "train", "preset": None, "overrides": []})
            else:
                run(resolve_config(args.config, ov), command=command(ov))
            measured = time.perf_counter() - t0
        wall = wall_of(d, measured)
        res = json.loads((d / "results.json").read_text())
        steps = max((m.get("env_steps", 0) for m in read_metrics(d)), default=0)
        rows.append((name, res.get("sft", sft_res), res["final"], steps, wall))
    splits = list(sft_res)
    head = "| variant | " + " | ".join(f"{s} before -> after (%)" for s in splits) + \
        " | env steps | wall-clock (min) |"
    print("\nSFT (shared start): " + ", ".join(f"{s} {100 * sft_res[s]['success']:.1f}%"
                                                for s in splits)
          + (f", {sft_wall / 60:.1f} min" if sft_wall == sft_wall else ""))
    print(head)
    print("|---|" + "---|" * (len(splits) + 2))
    for name, start, fin, steps, wall in rows:
        cells = [f"{100 * start[s]['success']:.1f} -> {100 * fin[s]['success']:.1f}"
                 for s in splits]
        minutes = f"{wall / 60:.1f}" if wall == wall else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {int(steps)} | {minutes} |")
    return rows


if __name__ == "__main__":
    main()
