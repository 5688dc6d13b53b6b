"""Success of pirl's scripted LIBERO expert on the benchmark's fixed initial states.

Run in the simulator venv (docs/benchmarks/libero.md)::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv-sim/bin/python benchmarks/libero_expert.py \
        --suites libero_spatial libero_object --inits 50 --processes 2 --json expert.json

For every task of each suite the expert plays the fixed initial states ``0 .. inits-1`` (10
no-op steps after reset, the suite's step limit, ``state`` observation mode: nothing rendered)
over a pool of worker processes, and the table gives the success rate per task with its standard
error and, for failures, the phase the expert was in when the step limit ran out.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

if __name__ == "__main__":
    from pirl.envs.libero_expert import EXPERT_SUITES, expert_success_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", nargs="*", default=list(EXPERT_SUITES), choices=EXPERT_SUITES)
    ap.add_argument("--tasks", nargs="*", type=int, default=None)
    ap.add_argument("--inits", type=int, default=50, help="init states start..start+inits-1")
    ap.add_argument("--init-start", type=int, default=0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the tables here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"cpu cores: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.1f}")
    tables = []
    for suite in args.suites:
        from pirl.envs.libero import suite_tasks

        tasks = args.tasks if args.tasks is not None else range(len(suite_tasks(suite)))
        tab = {"suite": suite, "rows": [], "seconds": 0.0}
        tables.append(tab)
        print(f"\n{suite}\n| task | success | s.e. | failures: phase at the step limit |")
        print("|---|---|---|---|", flush=True)
        for t in tasks:  # one task at a time: rows appear (and are saved) as they finish
            part = expert_success_table(suite, tasks=[t], init_indices=range(args.init_start,
                                                               args.init_start + args.inits),
                                        processes=args.processes)
            r = part["rows"][0]
            tab["rows"].append(r)
            tab["seconds"] += part["seconds"]
            p, n = r["success"], r["n"]
            se = math.sqrt(p * (1 - p) / n) if n else float("nan")
            print(f"| {r['task']}: {r['name']} | {100 * p:.0f}% ({round(p * n)}/{n}) | "
                  f"{100 * se:.1f} | {r['failed_phases'] or '-'} |", flush=True)
            tab["mean"] = sum(x["success"] for x in tab["rows"]) / len(tab["rows"])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(tables, f, indent=2)
        print(f"{suite}: mean {100 * tab['mean']:.1f}% over {len(tab['rows'])} tasks "
              f"({tab['seconds'] / 60:.1f} min)", flush=True)
