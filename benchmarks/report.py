"""The README's results table and learning-curve figure, generated from the run records in results/.

A run record is ``results/<run-name>/`` holding the small files of a finished run folder:
``config.yaml`` (the run's full config), ``results.json`` (each evaluation: success and episode
count per split, tagged ``sft``, ``rl_<iteration>``, ``final``), ``metrics.jsonl`` (training
and evaluation scalars by env step) and ``invocations.jsonl`` (one line per ``pirl`` call that
worked on the run: wall-clock, hardware, the preset and the command-line overrides), and
optionally ``conditions.txt``: one line on what else ran on the machine meanwhile (wall-clock
depends on it), shown beside the wall-clock.

Runs whose configs differ only in the seed (and in where they were written) make one row, with
the seeds listed and the success averaged.  Each row gives the benchmark, model, sampler +
algorithm, success at the start of RL (after few-shot SFT) -> at the end, per split, with one
standard error, the seeds, env steps, wall-clock, hardware and the command.  The table replaces
what lies between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in the README, and
``docs/img/learning_curves.png`` plots evaluation success against env steps for every row.

    python benchmarks/report.py                 # rewrite README.md's table and the figure
    python benchmarks/report.py --check         # exit 1 if README.md's table is out of date
    python benchmarks/report.py --results DIR --readme FILE --figure PNG
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# fields that say where or how verbosely a run ran, not what it computed
IGNORED = {"seed", "run_dir", "progress", "checkpoint_every"}
SAMPLERS = {"flow_sde": "Flow-SDE", "flow_noise": "Flow-Noise", "ode": "ODE"}
# TrainConfig.precision's default (a run made with another setting names it in its command;
# the hardware column says what 'auto' resolved to)
DEFAULT_PRECISION = "auto"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """One run record, or None when the folder has no config.yaml and results.json."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "results.json").is_file():
        return None
    return {"name": run_dir.name, "dir": run_dir,
            "config": yaml.safe_load((run_dir / "config.yaml").read_text()) or {},
            "results": json.loads((run_dir / "results.json").read_text()),
            "metrics": _jsonl(run_dir / "metrics.jsonl"),
            "invocations": _jsonl(run_dir / "invocations.jsonl"),
            "conditions": ((run_dir / "conditions.txt").read_text().strip()
                           if (run_dir / "conditions.txt").is_file() else "")}


def _end_tag(results: dict[str, Any]) -> str | None:
    """The evaluation a run ended with: ``final``, else its latest ``rl_<iteration>``."""
    if "final" in results:
        return "final"
    rl = sorted((int(k[3:]), k) for k in results if k.startswith("rl_") and k[3:].isdigit())
    return rl[-1][1] if rl else None


def _group_key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in IGNORED}, sort_keys=True)


def _env_steps(run: dict[str, Any]) -> int | None:
    steps = [r["env_steps"] for r in run["metrics"] if "env_steps" in r]
    return int(max(steps)) if steps else None


def _wall_s(run: dict[str, Any]) -> float | None:
    walls = [x["wall_s"] for x in run["invocations"] if "wall_s" in x]
    return sum(walls) if walls else None


def _hardware(inv: dict[str, Any]) -> str | None:
    hw = inv.get("hardware")
    if not hw:
        return None
    parts = [hw["gpu"]] if hw.get("gpu") else []
    parts.append(f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} cores, torch threads: "
                 f"{hw.get('torch_threads', '?')})")
    parts.append(f"torch {hw.get('torch', '?')}")
    return ", ".join(parts)


def _command(run: dict[str, Any]) -> str | None:
    """The command line(s) that made the run: each ``pirl`` invocation's preset and overrides
    (a resume that extends: ``--resume RUN rl.iterations=N``), or the process's command line for
    a run started from a script; None if not recorded."""
    parts = []
    for inv in run["invocations"]:
        if "overrides" not in inv:  # not through the CLI (a script): its process command line
            if not inv.get("argv"):
                return None
            parts.append(" ".join(map(shlex.quote, inv["argv"])))
            continue
        ov = [o for o in inv["overrides"] if o.split("=", 1)[0] not in IGNORED]
        if inv.get("resumed"):
            if ov:  # a resume without overrides continues; with rl.iterations=N it extends
                parts.append(" ".join(["pirl train --resume RUN", *map(shlex.quote, ov)]))
            continue
        cmd = f"pirl {inv.get('subcommand', 'train')}"
        if inv.get("preset"):
            cmd += f" --config {inv['preset']}"
        # a run made with another precision setting than today's default (e.g. before the
        # default was 'auto') reproduces only with its setting said aloud
        made = run["config"].get("precision", "fp32")
        if made != DEFAULT_PRECISION and not any(o.startswith("precision=") for o in ov):
            ov.append(f"precision={made}")
        parts.append(" ".join([cmd, *map(shlex.quote, ov)]))
    return "; ".join(parts) or None


def _label_sampler_algo(cfg: dict[str, Any], precision: str | None = None) -> str:
    """The sampler + algorithm cell; ``precision`` is the resolved one (results.json)."""
    precision = precision or cfg.get("precision")
    s = cfg.get("sampler", {})
    rl = cfg.get("rl", {})
    if not rl.get("iterations"):
        return "few-shot SFT only"
    name = SAMPLERS.get(s.get("kind"), s.get("kind", "?"))
    if s.get("kind") == "flow_sde":
        # and its noise level a (the presets differ: 1.0 on the tabletop, 0.5 on LIBERO)
        hybrid = "hybrid, " if s.get("hybrid") else ""
        name += f" ({hybrid}a = {s.get('noise_level', 0.5):g})"
    algo = str(rl.get("algo", "?")).upper()
    chunk = rl.get("action_chunk")
    replan = f", re-plans every {chunk}" if chunk else ""
    rounds = rl.get("rollouts_per_update") or 1
    batched = f", {rounds} rollouts per update" if rounds > 1 else ""
    # how it ran, where that is not the default (rows that differ only there stay apart)
    mode = cfg.get("placement", {}).get("mode", "local")
    where = f", {mode} placement" if mode != "local" else ""
    env_kw = cfg.get("env", {}).get("kwargs", {}) or {}
    procs = env_kw.get("processes")  # LIBERO's slots in worker processes, not a loop
    if procs is True:
        where += ", envs in worker processes"
    elif not isinstance(procs, bool) and isinstance(procs, int) and procs > 0:
        where += f", envs in {procs} worker processes"
    bf16 = ", bf16" if precision == "bf16" else ""
    # the extra loss terms, which change what the row measures
    hp = rl.get(str(rl.get("algo", "ppo")), {}) or {}
    extra = ""
    if (hp.get("lr_policy") or 1.0) < 1e-9:  # an ablation: the other terms alone
        algo += " (policy-gradient step off)"
    if rl.get("bc_coef"):
        extra += f" + demo loss {rl['bc_coef']}"
    if rl.get("sil_steps"):
        extra += f" + self-imitation ({rl['sil_steps']} steps per iteration)"
    elif hp.get("sil_coef"):
        extra += f" + self-imitation {hp['sil_coef']}"
    if rl.get("sil_buffer_per_task") and rl.get("sil_buffer_keep", "newest") != "newest":
        extra += f" of the {rl['sil_buffer_keep']} successes"
    if rl.get("sil_buffer_per_task") and rl.get("sil_hindsight"):
        extra += " and hindsight-relabelled failures"
    reward = env_kw.get("reward_mode", "sparse")
    if reward != "sparse":  # a shaped reward changes what PPO's advantages see
        extra += f", {reward} reward"
    if env_kw.get("state_features", "raw") != "raw":  # a wider observation, another policy
        extra += f", {env_kw['state_features']} state features"
    if rl.get("noise_schedule", "constant") != "constant":
        extra += f", sampler noise {rl['noise_schedule']} to x{rl.get('noise_final', 1.0):g}"
    states = rl.get("init_states")
    if states:
        span = (f"{min(states)}-{max(states)}" if sorted(states) == list(
            range(min(states), max(states) + 1)) else ", ".join(map(str, states)))
        extra += f", rollouts from init states {span}"
    return f"{algo} + {name}{extra}{replan}{batched}{where}{bf16}"


def _pct(values: list[float], episodes: list[int]) -> str:
    """Mean success in percent with one standard error: over seeds when there are several,
    else the binomial one of the single evaluation."""
    p = sum(values) / len(values)
    if len(values) > 1:
        sd = math.sqrt(sum((v - p) ** 2 for v in values) / (len(values) - 1))
        se = sd / math.sqrt(len(values))
    else:
        se = math.sqrt(p * (1 - p) / episodes[0]) if episodes[0] else float("nan")
    return f"{100 * p:.1f} ± {100 * se:.1f}"


def make_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_group_key(r["config"]), []).append(r)
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: (r["config"].get("seed", 0), r["name"]))
        first = members[0]
        cfg = first["config"]
        splits = list((first["results"].get(_end_tag(first["results"]) or "", {})
                       or first["results"].get("sft", {})).keys())
        cells = {}
        for split in splits:
            ends, starts = [], []
            for r in members:
                tag = _end_tag(r["results"])
                if tag and split in r["results"][tag]:
                    ends.append(r["results"][tag][split])
                if split in r["results"].get("sft", {}):
                    starts.append(r["results"]["sft"][split])
            start = (_pct([x["success"] for x in starts], [x["episodes"] for x in starts])
                     if len(starts) == len(members) else "–")
            end = (_pct([x["success"] for x in ends], [x["episodes"] for x in ends])
                   if len(ends) == len(members) else "–")
            cells[split] = f"{start} → {end}" if cfg.get("rl", {}).get("iterations") else start
        steps = [_env_steps(r) for r in members]
        walls = [_wall_s(r) for r in members]
        hws = sorted({h for r in members for h in map(_hardware, r["invocations"]) if h})
        cmds = sorted({c for c in map(_command, members) if c})
        unfinished = [r["name"] for r in members
                      if cfg.get("rl", {}).get("iterations") and _end_tag(r["results"]) != "final"]
        model = cfg.get("model", {})
        conditions = "; ".join(sorted({r["conditions"] for r in members if r["conditions"]}))
        rows.append({
            "runs": [r["name"] for r in members],
            "benchmark": cfg.get("env", {}).get("name", "?"),
            "model": model.get("name", "?") + (" (from a checkpoint)" if model.get("checkpoint") else ""),
            "method": _label_sampler_algo(cfg, first["results"].get("precision")),
            "splits": cells,
            "seeds": ", ".join(str(r["config"].get("seed", "?")) for r in members),
            "env_steps": (_count(sum(steps) / len(steps)) if all(s is not None for s in steps)
                          else "–"),
            "wall": ((f"{sum(walls) / len(walls) / 60:.1f} min" if all(w is not None for w in walls)
                      else "not recorded") + (f" ({conditions})" if conditions else "")),
            "hardware": "; ".join(hws) or "not recorded",
            "command": "; ".join(cmds) or "not recorded",
            "unfinished": unfinished,
            "members": members,
        })
    rows.sort(key=lambda r: (r["benchmark"], r["model"], r["method"], r["runs"][0]))
    return rows


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:.0f}"


def _split_name(split: str) -> str:
    return {"train": "train", "ood": "OOD"}.get(split, split)


def table(rows: list[dict[str, Any]], results_dir: str = "results") -> str:
    if not rows:
        return (f"No run records in `{results_dir}/` yet: a finished run's `config.yaml`, "
                "`results.json`, `metrics.jsonl` and `invocations.jsonl`, copied to "
                f"`{results_dir}/<run-name>/`, become a row here.")
    head = ("| benchmark | model | sampler + algorithm | success: start → end (%) | seeds | "
            "env steps | wall-clock | hardware | command | run records |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        succ = "<br>".join(f"{_split_name(s)}: {c}" for s, c in r["splits"].items()) or "–"
        if r["unfinished"]:
            succ += "<br>(unfinished: " + ", ".join(r["unfinished"]) + ")"
        links = ", ".join(f"[{n}]({results_dir}/{n}/)" for n in r["runs"])
        cmd = "; ".join(f"`{c}`" for c in r["command"].split("; ")) \
            if r["command"] != "not recorded" else r["command"]
        cmd = cmd.replace("|", "\\|")  # a pipe would end the table's cell
        lines.append(f"| {r['benchmark']} | {r['model']} | {r['method']} | {succ} | {r['seeds']} | "
                     f"{r['env_steps']} | {r['wall']} | {r['hardware']} | {cmd} | {links} |")
    note = ("\n\nSuccess is the ODE policy's on each split's evaluation episodes, after few-shot "
            "SFT → after RL, ± one standard error (binomial for one seed; over seeds for "
            "several).  Wall-clock and env steps are per seed.")
    return head + "\n".join(lines) + note


def _curve(run: dict[str, Any], split: str) -> list[tuple[float, float]]:
    return [(m["eval/env_steps"], m[f"eval/{split}_success"]) for m in run["metrics"]
            if f"eval/{split}_success" in m and "eval/env_steps" in m]


def _has_curves(rows: list[dict[str, Any]]) -> bool:
    return any(_curve(run, s) for row in rows for run in row["members"] for s in ("train", "ood"))


def figure(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Evaluation success against env steps: one panel per benchmark, one colour per row, solid
    train, dashed OOD, each panel's legend to its right (the image grows with the rows, so that
    no label covers a curve); None (nothing written) when no record has evaluation metrics."""
    if not _has_curves(rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # per benchmark: its rows with curves, and each row's curves per split, one per member
    panels: dict[str, list[tuple[dict[str, Any], dict[str, list]]]] = {}
    for row in rows:
        curves = {s: [_curve(run, s) for run in row["members"]] for s in ("train", "ood")}
        if any(any(c) for c in curves.values()):
            panels.setdefault(row["benchmark"], []).append((row, curves))
    entries = {b: sum(1 for _, c in rs for pts in c.values() if any(pts))
               for b, rs in panels.items()}
    # a panel at least as tall as its legend: one 6-pt line (~0.14 in with spacing) per entry
    heights = [max(2.6, 0.14 * entries[b] + 0.2) for b in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, sum(heights) + 0.6 * len(panels)),
                             squeeze=False, gridspec_kw={"height_ratios": heights, "hspace": 0.4})
    for ax, (bench, brows) in zip(axes[:, 0], panels.items()):
        # tab20 where a panel has more rows than the default cycle's 10 colours
        cmap = plt.get_cmap("tab10" if len(brows) <= 10 else "tab20")
        for i, (row, curves) in enumerate(brows):
            colour = cmap(i % cmap.N)
            for split, style in (("train", "-"), ("ood", "--")):
                for j, pts in enumerate(curves[split]):
                    if not pts:
                        continue
                    label = f"{row['method']} ({_split_name(split)})" if j == 0 else None
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style,
                            color=colour, marker="o", markersize=3, label=label, alpha=0.9)
        ax.set_title(bench, fontsize=9, loc="left")
        ax.set_xlabel("env steps", fontsize=8)
        ax.set_ylabel("evaluation success (%)", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                  borderaxespad=0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def render(rows: list[dict[str, Any]], results_dir: str, figure_rel: str | None) -> str:
    body = table(rows, results_dir)
    if figure_rel and _has_curves(rows):
        body += f"\n\n![evaluation success against env steps, one line per row]({figure_rel})"
    return (f"{BEGIN}\n<!-- generated by `python benchmarks/report.py` from the run records in "
            f"{results_dir}/; do not edit by hand -->\n{body}\n{END}")


def replace_block(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"report: the README needs one {BEGIN} ... {END} pair")
    return text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results"), help="folder of run records")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "img" / "learning_curves.png"))
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the README's table differs from the records")
    args = ap.parse_args(argv)
    results, readme, fig = Path(args.results), Path(args.readme), Path(args.figure)
    runs = [r for d in sorted(results.glob("*/")) if (r := load_run(d))] if results.is_dir() else []
    rows = make_rows(runs)
    base = readme.resolve().parent

    def rel(p: Path) -> str:  # links in the README are relative to it
        try:
            return p.resolve().relative_to(base).as_posix()
        except ValueError:
            return str(p)

    block = render(rows, rel(results), rel(fig))
    text = readme.read_text()
    new = replace_block(text, block)
    print(table(rows, rel(results)))
    if args.check:
        if new != text:
            print("report: README.md's results table is out of date; run python "
                  "benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    if figure(rows, fig):
        print(f"wrote {fig}")
    print(f"wrote {readme} ({len(rows)} rows from {len(runs)} run records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
