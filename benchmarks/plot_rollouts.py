"""Rollout success per RL iteration (and the ODE evaluations) of a few run folders, one figure.

The README's figure (``benchmarks/report.py``) plots evaluations only; this one shows the
stochastic sampler's rollout success of every iteration beside them, which is where a run's
trend shows first on benchmarks whose evaluations are few (Meta-World, LIBERO).

    python benchmarks/plot_rollouts.py --out docs/img/metaworld_mt50_1demo.png \\
        --title "Meta-World MT50, 1-demo start" \\
        results/RUN_A:"PPO + Flow-SDE" runs/RUN_B:"+ demo loss"

Each argument is ``FOLDER[:LABEL]`` (a run folder or run record with ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(folder: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(rollouts, evaluations)``: (iteration, success) pairs from ``folder/metrics.jsonl``.
    Rollout rows are numbered 1, 2, ... in order; an evaluation sits at the number of rollout
    rows logged before it (0 = the start)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{folder}: no metrics.jsonl (not a run folder or run record)")
    rollouts, evals = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "rollout/success" in row:
            rollouts.append((len(rollouts) + 1, float(row["rollout/success"])))
        if "eval/train_success" in row:
            evals.append((len(rollouts), float(row["eval/train_success"])))
    return rollouts, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="FOLDER[:LABEL]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, spec in enumerate(args.runs):
        folder, _, label = spec.partition(":")
        rollouts, evals = series(Path(folder))
        color = f"C{i}"
        label = label or Path(folder).name
        if rollouts:
            ax.plot(*zip(*rollouts), color=color, alpha=0.8, label=f"{label}: rollouts")
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, label=f"{label}: evaluation (ODE)")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("success")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(args.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
