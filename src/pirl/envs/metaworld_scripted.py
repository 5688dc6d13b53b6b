"""Meta-World's bundled scripted policies behind pirl: their success table and demos.

:func:`scripted_policy` finds a task's policy (``metaworld.policies``), :func:`run_scripted`
runs it on :class:`pirl.envs.metaworld.MetaWorldSlot` (the env pirl trains on),
:func:`scripted_success_table` measures it on fixed evaluation seeds, and
:func:`generate_metaworld_demos` records its episodes in pirl's demo format
(:mod:`pirl.envs.demos`; ``pirl demos --env metaworld``), actions clipped to ``[-1, 1]`` as the
env clips them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pirl.envs.metaworld import (ACTION_DIM, DEFAULT_MAX_STEPS, MT50_TASKS, STATE_DIM,
                                 TASK_INSTRUCTIONS, MetaWorldSlot, benchmark_tasks, check_tasks,
                                 eval_episode_seeds, require_metaworld, state_dim)


def scripted_policy(task: str):
    """Meta-World's bundled scripted policy for ``task`` (class names do not always follow the
    task names, e.g. ``peg-insert-side-v3`` -> ``SawyerPegInsertionSideV3Policy``)."""
    require_metaworld()
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise ValueError(f"no scripted policy for Meta-World task {task!r}: demos need one "
                         f"(metaworld.policies has {len(ENV_POLICY_MAP)}, e.g. "
                         f"{sorted(ENV_POLICY_MAP)[:3]})")
    return ENV_POLICY_MAP[task]()


def run_scripted(task: str, seeds: Sequence[int], max_episode_steps: int = DEFAULT_MAX_STEPS,
                 obs_mode: str = "state", image_size: int = 64, camera: str = "corner",
                 state_features: str = "raw") -> list[dict[str, Any]]:
    """Run ``task``'s scripted policy once per episode seed on a :class:`MetaWorldSlot`
    (the env pirl trains on).  Returns one dict per episode: ``seed``, ``success``, ``length``
    (steps until success, or the limit), ``state [T, D]`` (D = 39, or 51 with
    ``state_features="relative"``; the policy reads the first 39), ``actions [T, 4]`` (clipped),
    ``images [T, 1, 3, S, S]`` in ``rgb`` mode.  Frame t is the observation before action t; an
    episode stops at its first success step."""
    import warnings

    policy = scripted_policy(check_tasks([task])[0])
    slot = MetaWorldSlot([task], obs_mode=obs_mode, image_size=image_size, camera=camera,
                         state_features=state_features)
    out = []
    try:
        for s in seeds:
            o = slot.reset(0, 0, int(s))
            states, actions, images = [], [], []
            ok = False
            full = o["state"][:STATE_DIM].astype(np.float64)
            for _ in range(max_episode_steps):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "Constant(s) may be too high"
                    a = np.clip(policy.get_action(full), -1.0, 1.0).astype(np.float32)
                states.append(o["state"])
                actions.append(a)
                if "images" in o:
                    images.append(o["images"])
                o, _, ok = slot.step(a)
                full = o["state"][:STATE_DIM].astype(np.float64)
                if ok:
                    break
            ep = {"seed": int(s), "success": bool(ok), "length": len(actions),
                  "state": np.stack(states), "actions": np.stack(actions)}
            if images:
                ep["images"] = np.stack(images)
            out.append(ep)
    finally:
        slot.close()
    return out


def scripted_success_table(tasks: Sequence[str] = MT50_TASKS, episodes: int = 10,
                           max_episode_steps: int = DEFAULT_MAX_STEPS,
                           limits: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Success of every task's scripted policy over ``episodes`` fixed evaluation seeds
    (:func:`eval_episode_seeds`) with a ``max_episode_steps`` time limit.  Rows: ``task``,
    ``success`` (rate), ``mean_len`` / ``max_len`` (steps of the successful episodes), and
    ``success@L`` for each extra limit ``L`` of ``limits`` (<= ``max_episode_steps``)."""
    rows = []
    for i, t in enumerate(check_tasks(list(tasks))):
        eps = run_scripted(t, eval_episode_seeds(MT50_TASKS.index(t), episodes),
                           max_episode_steps=max_episode_steps)
        lens = [e["length"] for e in eps if e["success"]]
        row = {"task": t, "success": float(np.mean([e["success"] for e in eps])),
               "mean_len": float(np.mean(lens)) if lens else float("nan"),
               "max_len": int(max(lens)) if lens else 0}
        for lim in limits:
            row[f"success@{lim}"] = float(np.mean([e["success"] and e["length"] <= lim
                                                   for e in eps]))
        rows.append(row)
    return rows


def demo_tasks(env_name: str = "metaworld", env_kwargs: dict[str, Any] | None = None,
               split: str = "train") -> list[str]:
    """The task list a ``metaworld*`` env of :func:`pirl.envs.make_env` runs (demo
    ``task_index`` values index it), without building the env."""
    kw = env_kwargs or {}
    _, _, rest = env_name.replace(":", "/").partition("/")
    tasks = kw.get("tasks", rest or "mt50")
    split = kw.get("split", split)
    if isinstance(tasks, str):
        if tasks.lower() in ("mt50", "mt10", "ml10", "ml45"):
            return benchmark_tasks(tasks, split)
        return check_tasks([tasks])
    return check_tasks(tasks)


def generate_metaworld_demos(tasks: str | Sequence[str] = "mt50", episodes_per_task: int = 5,
                             out_dir: str | os.PathLike = "demos", seed: int = 0,
                             max_episode_steps: int = DEFAULT_MAX_STEPS,
                             obs_mode: str = "state", image_size: int = 64,
                             camera: str = "corner", max_attempts: int | None = None,
                             verbose: bool = True, state_features: str = "raw",
                             ) -> tuple[Path, dict[str, dict[str, float]]]:
    """Scripted-policy demos (successful episodes only) for every task, written in pirl's demo
    format (:mod:`pirl.envs.demos`).  Episode seeds ``seed * 10_000 + j`` (``j = 0, 1, ...``,
    training range) until ``episodes_per_task`` succeed or ``max_attempts`` (default
    ``3 * episodes_per_task``) were tried; a task that gets none is a ``RuntimeError`` naming
    it.  Returns ``(out_dir, stats per task)``: ``attempts``, ``success`` (rate over the
    attempts), ``mean_len``, ``seconds``."""
    from types import SimpleNamespace

    from pirl.envs.demo_writer import write_demo_folder

    if isinstance(tasks, str):
        tasks = (benchmark_tasks(tasks) if tasks.lower() in ("mt50", "mt10", "ml10", "ml45")
                 else [tasks])
    tasks = check_tasks(tasks)
    for t in tasks:  # fail before recording anything
        scripted_policy(t)
    max_attempts = max_attempts or 3 * episodes_per_task
    rows, stats = [], {}
    for ti, t in enumerate(tasks):
        t0 = time.perf_counter()
        got, attempts, lengths = 0, 0, []
        base = seed * 10_000
        while got < episodes_per_task and attempts < max_attempts:
            batch = list(range(base + attempts,
                               base + min(max_attempts, attempts + episodes_per_task - got)))
            attempts += len(batch)
            for e in run_scripted(t, batch, max_episode_steps, obs_mode, image_size, camera,
                                  state_features):
                if not e["success"] or got >= episodes_per_task:
                    continue
                got += 1
                n = e["length"]
                lengths.append(n)
                reward = torch.zeros(n)
                reward[-1] = 1.0
                ep = {"task_index": ti, "episode_seed": e["seed"], "success": True,
                      "length": n, "state": torch.from_numpy(e["state"]),
                      "action": torch.from_numpy(e["actions"]), "reward": reward}
                if "images" in e:
                    ep["images"] = torch.from_numpy(e["images"])
                rows.append(ep)
        stats[t] = {"attempts": attempts, "success": got / max(attempts, 1),
                    "mean_len": float(np.mean(lengths)) if lengths else 0.0,
                    "seconds": time.perf_counter() - t0}
        if verbose:
            print(f"metaworld demos {t}: {got}/{attempts} successful, "
                  f"mean len {stats[t]['mean_len']:.0f}", flush=True)
        if got == 0:
            raise RuntimeError(f"Meta-World task {t!r}: its scripted policy succeeded in none of "
                               f"{attempts} episodes within {max_episode_steps} steps; raise "
                               "max_episode_steps or leave the task out")
    env_like = SimpleNamespace(state_dim=state_dim(state_features), action_dim=ACTION_DIM,
                               tasks=tasks, task_names=tasks,
                               instructions=[TASK_INSTRUCTIONS[t] for t in tasks],
                               max_episode_steps=max_episode_steps)
    meta = dict(env_name="metaworld", tasks=tasks, seed=seed,
                episodes_per_task=episodes_per_task, obs_mode=obs_mode,
                state_features=state_features,
                source="metaworld scripted policies")
    return write_demo_folder(Path(out_dir), env_like, rows, meta), stats
