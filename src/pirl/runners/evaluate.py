"""Evaluation: deterministic ODE sampling, success per task and per split, JSON + table + video."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pirl.envs.base import BatchedEnv, ChunkedEnv, fixed_init_states
from pirl.flow.base import Sampler
from pirl.models.base import FlowPolicy
from pirl.runners.rollout import collect


def evaluate_env(policy: FlowPolicy, sampler: Sampler, env: BatchedEnv, *, episodes_per_task: int,
                 seed: int, action_chunk: int, num_chunks: int,
                 video_path: str | Path | None = None, video_episodes: int = 8,
                 first_init_state: int = 0) -> dict[str, Any]:
    """Run ``episodes_per_task`` episodes of every task of ``env`` (tasks spread over the N envs,
    several rounds if needed); return ``{"success": mean, "per_task": {name: rate},
    "episodes": count}``.  Sampling is driven by ``sampler`` (an ODE sampler for evaluation).

    An env with ``fixed_init_states`` (LIBERO: 50 per task, ``init = episode_seed % 50``) is
    evaluated on the benchmark's protocol: the k-th episode of each task starts from fixed
    initial state ``first_init_state + k`` (that episode seed), whatever ``seed``.  Each
    episode's initial denoising noise comes from its own seed (``seed`` and its index;
    :func:`pirl.runners.rollout.episode_noise`), so the result does not depend on how many envs
    run the episodes side by side."""
    n = env.num_envs
    tasks = list(env.task_names)
    total = episodes_per_task * len(tasks)
    rounds = math.ceil(total / n)
    wins = torch.zeros(len(tasks))
    counts = torch.zeros(len(tasks))
    chunked = ChunkedEnv(env)
    fixed = fixed_init_states(env)
    if fixed and first_init_state + episodes_per_task > fixed:
        raise ValueError(f"episodes_per_task={episodes_per_task} from initial state "
                         f"{first_init_state}: the env has {fixed} fixed initial states per "
                         "task (one episode each on the benchmark protocol)")
    if not fixed and first_init_state:
        raise ValueError(f"first_init_state={first_init_state}: the env has no fixed initial "
                         "states")
    gen = torch.Generator().manual_seed(seed)
    was_training = policy.training
    policy.eval()
    for r in range(rounds):
        ep = torch.arange(r * n, (r + 1) * n)
        task_ids = ep % len(tasks)
        keep = ep < total
        record = video_path is not None and r == 0
        # the k-th episode of a task: ep // len(tasks) (task_ids = ep mod len(tasks))
        ep_seeds = first_init_state + ep // len(tasks) if fixed else seed * 100_003 + ep
        ro = collect(policy, sampler, chunked, num_chunks=num_chunks,
                     reset_kwargs={"seed": seed + r, "task_ids": task_ids,
                                   "episode_seeds": ep_seeds},
                     action_chunk=action_chunk, generator=gen, with_values=False, record=record,
                     noise_seeds=seed * 100_003 + ep)
        s = ro.episode_success.float()
        wins.index_add_(0, task_ids[keep], s[keep])
        counts.index_add_(0, task_ids[keep], torch.ones(int(keep.sum())))
        if record and ro.frames is not None:
            from pirl.envs.video import write_video_grid

            write_video_grid(ro.frames[:, :video_episodes], str(video_path), fps=15)
    policy.train(was_training)
    per_task = {name: float(wins[i] / counts[i]) for i, name in enumerate(tasks) if counts[i] > 0}
    return {"success": float(wins.sum() / counts.sum()), "per_task": per_task,
            "episodes": int(counts.sum())}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per task, one column per split, and a mean row."""
    splits = list(results)
    tasks: list[str] = []
    for s in splits:
        tasks += [t for t in results[s]["per_task"] if t not in tasks]
    lines = ["| task | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for t in tasks:
        cells = [f"{100 * results[s]['per_task'][t]:.1f}" if t in results[s]["per_task"] else "-"
                 for s in splits]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * results[s]['success']:.1f}**"
                                             for s in splits) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))
