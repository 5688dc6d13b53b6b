"""Environment throughput: env steps per second of pirl's batched envs (observation rendering
included on every step), printed as a markdown table.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/env_throughput.py --threads 2

Every row is produced by one function in :data:`ROWS` (a list of zero-argument callables that
return a dict, or a list of dicts); simulators other than the built-in tabletop add their rows
there.  ``steps/s`` counts env steps summed over the N envs (``N * steps / wall seconds``) with
uniform random actions and automatic resets; ``cpu steps/s`` divides by this process's CPU time
instead, which is the more stable number on a shared machine (with 1 thread it is what the
process would reach alone).  The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any, Callable

import torch

DEFAULT_SECONDS = 2.0


def time_env(env, seconds: float = DEFAULT_SECONDS, warmup: int = 5,
             seed: int = 0) -> dict[str, float]:
    """Step ``env`` with random actions for about ``seconds``; return throughput numbers."""
    env.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    dev = getattr(env, "device", torch.device("cpu"))
    actions = [(torch.rand(env.num_envs, env.action_dim, generator=g) * 2 - 1).to(dev)
               for _ in range(16)]
    for i in range(warmup):
        env.step(actions[i % 16])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or steps < 3:
        env.step(actions[steps % 16])
        steps += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = env.num_envs
    return {"steps_per_s": n * steps / wall, "cpu_steps_per_s": n * steps / max(cpu, 1e-9),
            "ms_per_step": 1e3 * wall / steps}


def tabletop_row(num_envs: int, num_cameras: int = 1, image_size: int = 64,
                 device: str = "cpu", seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """The built-in tabletop benchmark (auto-reset on, all task families of the train split)."""
    from pirl.envs.tabletop import TabletopEnv

    env = TabletopEnv(num_envs, num_cameras=num_cameras, image_size=image_size, auto_reset=True,
                      device=device, task_families=("pick_place", "push", "stack"))
    r = time_env(env, seconds)
    obs = f"{num_cameras}x{image_size}px rgb" if num_cameras else "state only"
    return {"env": "tabletop", "device": device, "num_envs": num_envs, "obs": obs,
            "steps/s": f"{r['steps_per_s']:,.0f}", "cpu steps/s": f"{r['cpu_steps_per_s']:,.0f}",
            "ms/step": f"{r['ms_per_step']:.2f}"}


def tabletop_expert_row(num_envs: int = 256, seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """Scripted-expert rollouts (what demo generation runs), 1 camera, fixed horizon."""
    from pirl.envs.tabletop import ScriptedExpert, TabletopEnv

    env = TabletopEnv(num_envs, task_families=("pick_place", "push", "stack"), auto_reset=True)
    expert = ScriptedExpert(env, noise=0.1)
    env.reset(seed=0)
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        env.step(expert.act())
        steps += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"env": "tabletop + scripted expert", "device": "cpu", "num_envs": num_envs,
            "obs": "1x64px rgb", "steps/s": f"{num_envs * steps / wall:,.0f}",
            "cpu steps/s": f"{num_envs * steps / cpu:,.0f}", "ms/step": f"{1e3 * wall / steps:.2f}"}


def _rows(seconds: float, device: str) -> list[Callable[[], dict[str, Any] | list[dict[str, Any]]]]:
    p = functools.partial
    rows: list[Callable[[], Any]] = []
    for n in (1, 64, 256, 1024):
        rows.append(p(tabletop_row, n, 1, 64, device, seconds))
    for n in (1, 64, 256, 1024):
        rows.append(p(tabletop_row, n, 2, 64, device, seconds))
    rows.append(p(tabletop_row, 256, 0, 64, device, seconds))
    rows.append(p(tabletop_row, 256, 1, 128, device, seconds))
    rows.append(p(tabletop_expert_row, 256, seconds))
    return rows


#: Row-producing functions (other simulators append theirs, e.g. ManiSkill / LIBERO rows).
ROWS: list[Callable[[], dict[str, Any] | list[dict[str, Any]]]] = []

def sim_rows() -> list[Callable[[], dict[str, Any]]]:
    """``benchmarks/sim_throughput.py``'s ManiSkill / LIBERO rows in this table's columns
    (a row that cannot run here says why in the steps/s column)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "sim_throughput", Path(__file__).with_name("sim_throughput.py"))
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)

    def convert(name: str) -> dict[str, Any]:
        r = sim.ROWS[name]()
        sps = r.get("steps_per_s")
        num = isinstance(sps, (int, float))
        return {"env": r["sim"], "device": r["backend"], "num_envs": r["num_envs"],
                "obs": f"{r['obs']} ({r['vectorization']})",
                "steps/s": f"{sps:,.1f}" if num else f"{sps}: {r.get('setup_s', '')}",
                "cpu steps/s": "", "ms/step": ""}

    names = ("maniskill_state_1", "maniskill_rgb_1", "maniskill_rgb_2_process",
             "maniskill_gpu_state_320", "maniskill_gpu_rgb_320", "libero_1", "libero_2")
    return [functools.partial(convert, n) for n in names]


COLUMNS = ["env", "device", "num_envs", "obs", "steps/s", "cpu steps/s", "ms/step"]


def format_table(rows: list[dict[str, Any]], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="timed seconds per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="only the 1-camera tabletop rows")
    ap.add_argument("--sim", action="store_true",
                    help="add the real-simulator rows (ManiSkill CPU / GPU, LIBERO processes) of "
                         "benchmarks/sim_throughput.py; run in the simulator venv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = _rows(args.seconds, args.device)
    if args.quick:
        rows = rows[:4]
    rows += ROWS
    if args.sim:
        rows += sim_rows()
    print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
          f"load avg before: {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    out = []
    for fn in rows:
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - a row that cannot run says why
            r = {"env": getattr(fn, "__name__", str(fn)), "steps/s": f"error: {e}"}
        out.extend(r if isinstance(r, list) else [r])
        print(format_table(out[-1:]).splitlines()[-1], flush=True)
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}\n")
    print(format_table(out))


if __name__ == "__main__":
    main()
