"""Scale-out benchmark: env steps/s and learner samples/s for local vs colocated vs
disaggregated placements at 1 and 2 workers (CPU, a local Ray).

    PYTHONPATH=src python benchmarks/scaling.py                 # the default table
    PYTHONPATH=src python benchmarks/scaling.py --num-envs 32 --iters 4 --workers 1 2 4

"workers" W means: colocated: W actors, each with N/W envs + a replica + one gloo learner rank;
disaggregated: W env-worker actors (N/W envs each, pipelined in W stages when W > 1), one rollout
(inference) actor and W gloo learner ranks.  Every actor runs torch with one thread.

Columns: env steps/s = env steps of one rollout / rollout wall time (inference + env stepping);
learner samples/s = samples x update epochs / update wall time; iteration/s over whole
iterations (rollout + update + weight sync).  Medians over the measured iterations after one
warm-up iteration.  The ratio columns divide by the local run's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch


def make_env(num_envs: int, image_size: int = 32, env_ms: float = 0.0):
    """The tabletop env; with ``env_ms > 0`` every step also sleeps ``env_ms`` ms per env, a
    stand-in for a CPU simulator (LIBERO, ManiSkill on CPU) whose worker has its own cores:
    the sleep costs no CPU here, so it shows what parallel env workers and pipelining hide."""
    from pirl.envs.tabletop import TabletopEnv

    env = TabletopEnv(num_envs=num_envs, image_size=image_size, max_episode_steps=24)
    if env_ms > 0:
        step = env.step

        def slow_step(action):
            time.sleep(env_ms * 1e-3 * env.num_envs)
            return step(action)

        env.step = slow_step
    return env


def build(num_envs: int, image_size: int, env_ms: float = 0.0, seed: int = 0):
    from pirl.flow import build_sampler
    from pirl.models import build_policy
    from pirl.config.schema import RLConfig

    env = make_env(num_envs, image_size, env_ms)
    torch.manual_seed(seed)
    vocab = sorted({w for s in env.instructions for w in s.split()})
    policy = build_policy("tiny", action_dim=env.action_dim, state_dim=env.state_dim,
                          vocabulary=vocab, image_size=image_size, action_horizon=4, width=64,
                          depth=2)
    sampler = build_sampler("flow_noise", num_steps=4, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    cfg = RLConfig(algo="ppo", iterations=100, action_chunk=4)
    cfg.ppo.update_epochs = 2
    cfg.ppo.num_minibatches = 2
    env_fn = functools.partial(make_env, image_size=image_size, env_ms=env_ms)
    return env, policy, sampler, cfg, env_fn


def measure(mode: str, workers: int, args, stages: int | None = None) -> dict:
    from pirl.runners.distributed import DistributedTrainer
    from pirl.runners.placement import LearnerPlacement, PlacementConfig
    from pirl.runners.rl import RLTrainer

    env, policy, sampler, cfg, env_fn = build(args.num_envs, args.image_size, args.env_ms)
    if mode == "local":
        tr = RLTrainer(policy, sampler, env, cfg, seed=0)
    else:
        frac = max(0.05, args.ray_cpus / (2 * workers + 2))
        stages = stages or workers
        pl = PlacementConfig(mode=mode, env_workers=workers, pipeline_stages=stages,
                             env_cpus=frac, rollout_cpus=frac, threads=1,
                             learner=LearnerPlacement(ranks=workers, cpus=frac))
        tr = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn)
    rows = []
    try:
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            m = tr.iteration()
            m["wall"] = time.perf_counter() - t0
            if i > 0:  # the first iteration warms up (allocations, lazy init)
                rows.append(m)
    finally:
        if hasattr(tr, "close"):
            tr.close(keep_state=False)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"mode": mode if mode != "disaggregated" else f"disaggregated ({stages} stage"
            + ("s)" if stages > 1 else ")"), "workers": workers if mode != "local" else 1,
            "env_steps_per_s": med("perf/env_steps_per_s"),
            "learner_samples_per_s": med("perf/learner_samples_per_s"),
            "iters_per_s": 1.0 / med("wall"), "wall_s": med("wall")}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="measured iterations (after 1 warm-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["local", "colocated", "disaggregated"])
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--env-ms", type=float, default=0.0,
                   help="extra simulated env cost, ms per env step (a sleep: see make_env)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    if "local" in args.modes:
        results.append(measure("local", 1, args))
    if any(m != "local" for m in args.modes):
        from pirl.runners.placement import connect

        connect("local", num_cpus=args.ray_cpus)
    for mode in [m for m in args.modes if m != "local"]:
        for w in args.workers:
            results.append(measure(mode, w, args))
            if mode == "disaggregated" and w > 1:  # the same workers without pipelining
                results.append(measure(mode, w, args, stages=1))
    base = next((r for r in results if r["mode"] == "local"), results[0])
    print(f"\n{args.num_envs} envs ({args.image_size}px, +{args.env_ms:g} ms/env step), tiny VLA, "
          f"Flow-Noise K=4, PPO; "
          f"{os.cpu_count()} CPU cores, torch threads=1 per process\n")
    print("| mode | workers | env steps/s | x local | learner samples/s | x local | "
          "iterations/s | x local |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['workers']} | {r['env_steps_per_s']:.0f} | "
              f"{r['env_steps_per_s'] / base['env_steps_per_s']:.2f} | "
              f"{r['learner_samples_per_s']:.0f} | "
              f"{r['learner_samples_per_s'] / base['learner_samples_per_s']:.2f} | "
              f"{r['iters_per_s']:.2f} | {r['iters_per_s'] / base['iters_per_s']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
