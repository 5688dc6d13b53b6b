"""Meta-World's bundled scripted policies on pirl's env: success per MT50 task.

Each task's scripted policy (``metaworld.policies``) runs on the fixed evaluation seeds of the
task (:func:`pirl.envs.metaworld.eval_episode_seeds`) with a time limit of ``--max-steps``;
the table gives the success rate within that limit and within the shorter ``--limits``, and the
mean / max length of the successful episodes.  The demos pirl records for SFT come from these
policies (successful episodes only), so a task they fail often gets demos from fewer seeds::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metaworld_scripted.py --episodes 10
"""

from __future__ import annotations

import argparse
import math
import time


def main(argv: list[str] | None = None) -> list[dict]:
    from pirl.envs.metaworld import MT50_TASKS
    from pirl.envs.metaworld_scripted import scripted_success_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=10, help="seeds per task")
    ap.add_argument("--max-steps", type=int, default=500, help="time limit (Meta-World's: 500)")
    ap.add_argument("--limits", type=int, nargs="*", default=[100, 150, 200],
                    help="shorter time limits to report as well")
    ap.add_argument("--tasks", nargs="*", default=list(MT50_TASKS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = scripted_success_table(args.tasks, args.episodes, args.max_steps, args.limits)
    cols = [f"success@{lim}" for lim in args.limits]
    print(f"| task | success@{args.max_steps} | " + " | ".join(cols) + " | mean len | max len |")
    print("|---|---|" + "---|" * len(cols) + "---|---|")
    for r in rows:
        ml = "-" if math.isnan(r["mean_len"]) else f"{r['mean_len']:.0f}"
        print(f"| {r['task']} | {100 * r['success']:.0f} | "
              + " | ".join(f"{100 * r[c]:.0f}" for c in cols) + f" | {ml} | {r['max_len']} |")
    mean = lambda k: 100 * sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"| **mean** | **{mean('success'):.1f}** | "
          + " | ".join(f"**{mean(c):.1f}**" for c in cols) + " | | |")
    print(f"{len(rows)} tasks x {args.episodes} seeds in {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
