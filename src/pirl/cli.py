"""Command line: ``pirl train | sft | eval | demos``.

Configs are typed dataclasses (:class:`pirl.config.schema.TrainConfig`); ``--config FILE.yaml``
loads a preset and trailing ``section.field=value`` arguments override single fields, e.g.
``pirl train rl.algo=grpo sampler.kind=flow_sde env.num_envs=128``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pirl.config import presets_dir, resolve_preset  # noqa: F401  (re-exported for scripts)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a preset name (pirl/config/presets/) or a YAML file; fields not given keep defaults")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")


def cmd_train(args) -> int:
    from pirl.runners.train import resolve_config, run

    if args.resume:
        extend = [o for o in args.overrides if o.split("=", 1)[0] == "rl.iterations"]
        if args.config or len(extend) != len(args.overrides) or len(extend) > 1:
            raise SystemExit("pirl train --resume takes no --config and no override but "
                             "rl.iterations=N (to extend the run): a resumed run uses the "
                             "config saved in its folder")
        iterations = None
        if extend:
            value = extend[0].split("=", 1)[1]
            if not value.isdigit():
                raise SystemExit(f"pirl: rl.iterations must be a whole number, got {value!r}")
            iterations = int(value)
        run(resume=args.resume, iterations=iterations, cluster=args.cluster,
            command={"subcommand": "train", "preset": None, "overrides": list(args.overrides)})
        return 0
    overrides = list(args.overrides)
    if args.cluster:
        overrides.append(f"placement.cluster={args.cluster}")
    cfg = resolve_config(resolve_preset(args.config), overrides)
    if args.cluster and cfg.placement.mode == "local":
        print("pirl: --cluster given with placement.mode=local: using placement.mode=disaggregated")
        cfg.placement.mode = "disaggregated"
    run(cfg, command={"subcommand": "train", "preset": args.config, "overrides": overrides})
    return 0


def cmd_sft(args) -> int:
    from pirl.runners.train import resolve_config, run

    cfg = resolve_config(resolve_preset(args.config), list(args.overrides) + ["rl.iterations=0"])
    run(cfg, command={"subcommand": "sft", "preset": args.config,
                      "overrides": list(args.overrides)})
    return 0


def cmd_eval(args) -> int:
    import json

    from pirl.runners.checkpoint import CheckpointError, load_checkpoint, load_module_state
    from pirl.runners.train import Run, load_run_config

    for o in args.overrides:
        # only the evaluation's own settings: the model, env and sampler are the run's
        if not o.startswith("eval.") and not o.startswith("threads="):
            raise SystemExit(f"pirl eval: {o!r}: only eval.* and threads= can be overridden")
    target = Path(args.run)
    if not target.exists():
        raise CheckpointError(f"{target} does not exist (give a run folder or a checkpoint file)")
    run_dir = target if target.is_dir() else target.parent.parent
    ckpt = target if target.is_file() else run_dir / "checkpoints" / "last.pt"
    if not (run_dir / "config.yaml").exists():
        # name what was given: for a checkpoint file, also the folder that lacks config.yaml
        where = target if target.is_dir() else f"{target}'s run folder {run_dir}"
        raise CheckpointError(f"{where} is not a pirl run folder (no config.yaml)")
    ov = []
    if args.episodes:
        ov.append(f"eval.episodes_per_task={args.episodes}")
    if args.splits:
        ov.append(f"eval.splits=[{','.join(args.splits)}]")
    ov += args.overrides
    cfg = load_run_config(run_dir, ov)
    out_dir = Path(args.out or run_dir / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    r = Run(cfg, out_dir)  # logs and videos go to out_dir, not the run folder
    state = load_checkpoint(ckpt)
    load_module_state(r.policy, state["policy"], "policy")
    res = r.evaluate("eval", videos=True)
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out_dir / 'eval.json'}")
    return 0


def _env_kwargs(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"pirl: --kwarg {kv!r} is not of the form KEY=VALUE")
        k, v = kv.split("=", 1)
        out[k] = yaml.safe_load(v) if v else ""
    return out


def cmd_demos(args) -> int:
    from pirl.envs.demos import generate_demos

    path = generate_demos(env_name=args.env, episodes_per_task=args.episodes, out_dir=args.out,
                          seed=args.seed, noise=args.noise, env_kwargs=_env_kwargs(args.kwarg),
                          clearance=args.clearance)
    print(f"wrote demos to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pirl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="demos -> few-shot SFT -> online RL -> evaluation")
    _add_config_args(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder exactly")
    t.add_argument("--cluster", metavar="ADDR",
                   help="run the RL workers on Ray: 'local' (start a local Ray), 'auto' (the "
                        "running cluster) or ray://HOST:PORT; see docs/scaling.md")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("sft", help="demos -> few-shot SFT -> evaluation (no RL)")
    _add_config_args(s)
    s.set_defaults(fn=cmd_sft)
    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint (ODE sampling)")
    e.add_argument("run", help="RUN_DIR or RUN_DIR/checkpoints/X.pt")
    e.add_argument("--episodes", type=int, help="episodes per task")
    e.add_argument("--splits", nargs="+", help="splits to evaluate (default: the run's)")
    e.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    e.add_argument("overrides", nargs="*",
                   help="eval.* overrides on the run's config, e.g. eval.num_steps=10")
    e.set_defaults(fn=cmd_eval)
    d = sub.add_parser("demos", help="write scripted-expert (tabletop, metaworld, libero) or "
                                      "motion-planning (maniskill) demos for SFT")
    d.add_argument("--env", default="tabletop")
    d.add_argument("--episodes", type=int, default=10, help="episodes per task")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--noise", type=float, default=0.1)
    d.add_argument("--clearance", type=float,
                   help="tabletop push: the expert's clearance beside the object (default 0.04)")
    d.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="env keyword (YAML value), repeatable: e.g. image_size=32 (tabletop), "
                        "obs_mode=state (maniskill/PushCube-v1: motion-planning demos), "
                        "tasks=[reach-v3,push-v3] (metaworld: scripted policies), "
                        "obs_mode=state (libero/libero_spatial, libero/libero_object: the "
                        "scripted pick-and-place expert)")
    d.set_defaults(fn=cmd_demos)
    return p


def main(argv: list[str] | None = None) -> int:
    from pirl.config.loading import ConfigError
    from pirl.runners.checkpoint import CheckpointError
    from pirl.runners.distributed import WorkerError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves overrides that follow an option after the first positional unparsed
    # (``pirl eval RUN --episodes 8 eval.num_steps=10``): they are overrides too
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x
                                                 for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, WorkerError) as e:
        print(f"pirl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
