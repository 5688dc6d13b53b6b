"""Demonstrations for ManiSkill tasks from ManiSkill's own motion-planning solutions.

:func:`generate_motionplanning_demos` plans a task in ``pd_joint_pos`` and converts the plan
closed-loop to pirl's control mode on an env built like :class:`~pirl.envs.maniskill.ManiSkillEnv`'s
CPU slots, recording its observations; :func:`write_pirl_demos` writes the episodes in pirl's
demo format (:mod:`pirl.envs.demos`) and :func:`generate_maniskill_demos` does both for several
tasks.  Needs ``pirl[maniskill]`` (and ``mplib`` for the planner).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pirl.envs.maniskill import (DEFAULT_MAX_STEPS, TASK_INSTRUCTIONS, ManiSkillSlot,
                                 _make_gym_env, format_obs, require_maniskill)

@dataclass
class DemoEpisode:
    """One demonstration in pirl's layout (observation ``t`` is the one action ``t`` saw).

    images: ``[T, C, 3, H, W]`` uint8 (None in ``state`` mode); state: ``[T, S]`` float32;
    actions: ``[T, A]`` float32 in the env's control mode; success: reached the goal (the episode
    is cut at the first success step, pirl's ``terminated``).
    """

    task: str
    instruction: str
    seed: int
    images: np.ndarray | None
    state: np.ndarray
    actions: np.ndarray
    success: bool


def motion_planning_tasks() -> list[str]:
    """Tasks with a motion-planning solution in the installed ManiSkill (needs ``mplib``)."""
    from mani_skill.examples.motionplanning.panda import solutions as S

    names = {"PickCube-v1": "solvePickCube", "StackCube-v1": "solveStackCube",
             "PushCube-v1": "solvePushCube", "PullCube-v1": "solvePullCube",
             "PlaceSphere-v1": "solvePlaceSphere", "LiftPegUpright-v1": "solveLiftPegUpright",
             "PullCubeTool-v1": "solvePullCubeTool", "PegInsertionSide-v1":
             "solvePegInsertionSide", "PlugCharger-v1": "solvePlugCharger"}
    return [t for t, f in names.items() if hasattr(S, f)]


def _solver(task: str):
    from mani_skill.examples.motionplanning.panda import solutions as S

    return getattr(S, "solve" + task.split("-")[0])


class _Recorder:
    """Gymnasium-style wrapper recording (obs before the step, action, success) of each step;
    ``fmt`` converts a raw observation when it is produced (it may read the env's live state)."""

    def __init__(self, env, first_obs, fmt: Any = None):
        self.env = env
        self.fmt = fmt or (lambda raw: raw)
        self.last = self.fmt(first_obs) if first_obs is not None else None
        self.obs, self.actions, self.success = [], [], []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.obs.append(self.last)
        self.actions.append(np.asarray(torch.as_tensor(action).reshape(-1).cpu(), np.float32))
        out = self.env.step(action)
        self.last = self.fmt(out[0])
        self.success.append(bool(out[4]["success"].reshape(-1)[0]))
        return out


def generate_motionplanning_demos(task: str, num_episodes: int, seed: int = 0, *,
                                  obs_mode: str = "rgb", control_mode: str = "pd_ee_delta_pose",
                                  image_size: int = 128, wrist_camera: bool = False,
                                  max_attempts: int | None = None, only_success: bool = True,
                                  ) -> tuple[list[DemoEpisode], dict[str, float]]:
    """Demonstrations of ``task`` from ManiSkill's motion-planning solution, in pirl's layout.

    For each seed (``seed, seed + 1, ...``) the solution plans in ``pd_joint_pos`` on a
    state-free env; the joint-target trajectory is then converted closed-loop to
    ``control_mode`` (ManiSkill's own converter, ``from_pd_joint_pos``) on an env built exactly
    like :class:`ManiSkillEnv`'s CPU slots, recording its observations.  Returns the episodes and
    stats (``attempts``, ``plan_success`` = planner reached the goal, ``success`` = the converted
    replay reached the goal, ``mean_len``, ``seconds``).
    """
    import time

    from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos

    require_maniskill()
    t0 = time.time()
    solve = _solver(task)
    plan_env = _make_gym_env(task, 1, "physx_cpu", "none", "pd_joint_pos", image_size, False,
                             "sparse", "gpu")
    slot = ManiSkillSlot([task], obs_mode=obs_mode, control_mode=control_mode,
                         image_size=image_size, wrist_camera=wrist_camera)
    instruction = TASK_INSTRUCTIONS.get(task, task)
    if obs_mode == "state":
        slot.state_dim = slot.raw_state_dims()[0]
    episodes: list[DemoEpisode] = []
    attempts = plans_ok = 0
    lengths = []
    max_attempts = max_attempts or 3 * num_episodes
    s = seed
    while len(episodes) < num_episodes and attempts < max_attempts:
        attempts += 1
        rec_plan = _Recorder(plan_env, None)
        try:
            res = solve(rec_plan, seed=s)
        except Exception:  # noqa: BLE001 - planner failures count as failed attempts
            res = -1
        plan_ok = res != -1 and bool(res[-1]["success"].reshape(-1)[0])
        plans_ok += plan_ok
        if plan_ok:
            plan_env.reset(seed=s)
            genv = slot.env(0)
            slot.current = 0
            raw0, _ = genv.reset(seed=s)
            rec = _Recorder(genv, raw0, fmt=functools.partial(
                format_obs, genv, obs_mode=obs_mode, state_dim=slot.state_dim,
                cameras=slot.cameras))
            from_pd_joint_pos(control_mode, np.stack(rec_plan.actions), plan_env, rec)
            ok = any(rec.success)
            end = rec.success.index(True) + 1 if ok else len(rec.actions)
            if ok or not only_success:
                fo = rec.obs[:end]
                episodes.append(DemoEpisode(
                    task=task, instruction=instruction, seed=s,
                    images=(torch.cat([f["images"] for f in fo]).cpu().numpy()
                            if obs_mode != "state" else None),
                    state=torch.cat([f["state"] for f in fo]).cpu().numpy().astype(np.float32),
                    actions=np.stack(rec.actions[:end]).astype(np.float32), success=ok))
                lengths.append(end)
        s += 1
    plan_env.close()
    slot.close()
    n_ok = sum(e.success for e in episodes)
    return episodes, {"attempts": attempts, "plan_success": plans_ok / max(attempts, 1),
                      "success": n_ok / max(plans_ok, 1),
                      "mean_len": float(np.mean(lengths)) if lengths else 0.0,
                      "seconds": time.time() - t0}


def save_demos(episodes: Sequence[DemoEpisode], out_dir: str | os.PathLike) -> list[str]:
    """Write episodes as ``<out_dir>/<task>_<seed>.npz`` (fields of :class:`DemoEpisode`;
    ``images`` omitted in state mode).  Returns the paths.

    This is the adapter to pirl's demo format: ``pirl.envs.demos`` (once it has a writer) can
    take :class:`DemoEpisode` fields directly (obs ``images`` / ``state`` / ``instruction`` per
    step, actions per step).
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for e in episodes:
        p = out / f"{e.task}_{e.seed}.npz"
        arrays = dict(state=e.state, actions=e.actions, success=np.array(e.success),
                      seed=np.array(e.seed), task=np.array(e.task),
                      instruction=np.array(e.instruction))
        if e.images is not None:
            arrays["images"] = e.images
        np.savez_compressed(p, **arrays)
        paths.append(str(p))
    return paths


def write_pirl_demos(out_dir: str | os.PathLike, episodes: Sequence[DemoEpisode],
                     tasks: Sequence[str], max_episode_steps: int = DEFAULT_MAX_STEPS,
                     meta: dict[str, Any] | None = None):
    """Write ``episodes`` in pirl's demo format (:mod:`pirl.envs.demos`, parquet) so that
    ``pirl.envs.demos.load_demos(out_dir)`` reads them for few-shot SFT.

    ``tasks``: the env's task list (``task_index`` of an episode = its task's position in it,
    as in :class:`ManiSkillEnv`'s ``task_id``).  Rewards are sparse: 1 on a successful
    episode's last frame.  Returns ``out_dir``.
    """
    from pathlib import Path
    from types import SimpleNamespace

    from pirl.envs.demo_writer import write_demo_folder

    if not episodes:
        raise ValueError("no episodes to write")
    tasks = list(tasks)
    rows = []
    for e in episodes:
        t = len(e.actions)
        reward = torch.zeros(t)
        reward[-1] = float(e.success)
        ep = {"task_index": tasks.index(e.task), "episode_seed": int(e.seed),
              "success": bool(e.success), "length": t, "state": torch.from_numpy(e.state),
              "action": torch.from_numpy(e.actions), "reward": reward}
        if e.images is not None:
            ep["images"] = torch.from_numpy(e.images)
        rows.append(ep)
    env_like = SimpleNamespace(
        state_dim=int(episodes[0].state.shape[-1]), action_dim=int(episodes[0].actions.shape[-1]),
        tasks=tasks, task_names=tasks,
        instructions=[TASK_INSTRUCTIONS.get(t, t) for t in tasks],
        max_episode_steps=max_episode_steps)
    return write_demo_folder(Path(out_dir), env_like, rows,
                             dict(meta or {}, source="maniskill motionplanning"))


def generate_maniskill_demos(tasks: str | Sequence[str] = "PickCube-v1",
                             episodes_per_task: int = 4, out_dir: str | os.PathLike = "demos",
                             seed: int = 0, **kw):
    """Motion-planning demos for every task, written in pirl's demo format (the ManiSkill
    counterpart of ``pirl.envs.demos.generate_demos``).  ``kw`` goes to
    :func:`generate_motionplanning_demos` (``image_size``, ``wrist_camera``, ``obs_mode`` ...).
    Returns ``(out_dir, stats per task)``."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    episodes, stats = [], {}
    for t in tasks:
        eps, st = generate_motionplanning_demos(t, episodes_per_task, seed=seed, **kw)
        episodes += eps
        stats[t] = st
    out = write_pirl_demos(out_dir, episodes, tasks,
                           meta=dict(env_name="maniskill", tasks=tasks, seed=seed,
                                     episodes_per_task=episodes_per_task, env_kwargs=kw))
    return out, stats
