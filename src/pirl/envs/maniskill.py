"""ManiSkill3 behind pirl's batched env API (GPU-parallel when CUDA is present, CPU otherwise).

``pip install 'pirl[maniskill]'`` (mani-skill 3, SAPIEN 3).  SAPIEN needs a Vulkan device even
for state observations; on a machine without a GPU, Mesa's lavapipe software Vulkan works if it
is recent enough (Mesa >= 25; Debian 12: ``apt-get install -t bookworm-backports
mesa-vulkan-drivers libvulkan1``).

Backends (:class:`ManiSkillEnv`, ``sim_backend``):

- ``"gpu"`` (default when CUDA is available): one ManiSkill env per task holding all of that
  task's slots in one GPU-parallel PhysX scene (e.g. 320 envs as in pi_RL).  Slots are laid out
  in contiguous per-task blocks fixed at construction (:attr:`ManiSkillEnv.slot_tasks`).
- ``"cpu"``: ManiSkill's CPU simulation holds one env per scene, so pirl runs ``num_envs``
  single-env slots, either in this process one after another (``vectorization="loop"``) or one
  per worker process (``vectorization="process"``, :class:`pirl.envs.pool.SubprocEnvPool`).
  Each slot builds an env for a task the first time it is asked for it, so a slot can switch
  tasks between episodes.

Observations (pirl layout): ``images [N, C, 3, H, W]`` uint8 with the task's ``base_camera``
first and, with ``wrist_camera=True`` (robot ``panda_wristcam``), the ``hand_camera`` second;
``state [N, 16]`` = Panda joint positions (9) + TCP pose (xyz + wxyz quaternion, 7) in ``rgb``
mode, or ManiSkill's flattened task state zero-padded to the largest task's size in ``state``
mode (then ``images`` is absent).  Actions: ``pd_ee_delta_pose`` by default (``[N, 7]``:
normalised delta xyz, delta axis-angle, gripper in ``[-1, 1]``, ``+1`` open).

Episodes: ``terminated`` = the task's success (``info["success"]``), ``truncated`` = the time
limit (default: ``max(DEFAULT_MAX_STEPS = 150, the task's registered limit)``); reward is
ManiSkill's ``reward_mode`` (``"sparse"`` by default: 1 on success), or pirl's ``"shaped"``: 1 on
success plus potential-based shaping ``shaping_scale * (phi_t - phi_{t-1})`` with ``phi`` the
task's ``normalized_dense`` reward (:class:`PotentialShaper`).  ManiSkill's own dense rewards are
not returned as such by default because an episode ends at success here: a per-step dense reward
then pays the policy for *not* finishing (measured: dense return rose while success fell), where
the shaping terms telescope and cannot be farmed by waiting.  Same task + same episode
seed => same initial state (CPU: ``env.reset(seed)``; GPU: each slot is reset on its own with its
own seed).

Multitask (:class:`ManiSkillMultiTask` / ``make_env("maniskill_multitask", ...)``): a small
stand-in for pi_RL's 4352-task pick-and-place set, mixing the tabletop tasks that load without
asset downloads, each with its own instruction.  Held-out split: ``PullCube-v1`` is an unseen
task (the mirror of ``PushCube-v1``), and episode seeds ``>= HELDOUT_SEED_OFFSET`` are held-out
initial states of the training tasks (see :func:`split_config`).

Demonstrations from ManiSkill's motion-planning solutions: :mod:`pirl.envs.maniskill_demos`.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from typing import Any, Sequence

import numpy as np
import torch

from pirl.envs.base import Obs
from pirl.envs.pool import PoolBatchedEnv, SimulatorUnavailable, SubprocEnvPool

MANISKILL_INSTALL = "pip install 'pirl[maniskill]'"
VULKAN_APT = ("apt-get install -y libvulkan1 mesa-vulkan-drivers  (on Debian 12 from "
              "bookworm-backports: Mesa >= 25 is needed for CPU-only machines)")

#: Instructions written for the tabletop tasks (ManiSkill tasks carry no language).
TASK_INSTRUCTIONS: dict[str, str] = {
    "PickCube-v1": "pick up the red cube and move it to the green target",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PushCube-v1": "push the cube forward onto the red and white target",
    "PullCube-v1": "pull the cube back onto the red and white target",
    "PlaceSphere-v1": "place the blue sphere into the shallow bin",
    "PokeCube-v1": "use the peg to poke the red cube to the goal",
    "LiftPegUpright-v1": "lift the peg and stand it upright on the table",
    "RollBall-v1": "push the ball so it rolls into the goal region",
    "PullCubeTool-v1": "use the L-shaped tool to pull the cube closer",
}

#: Multitask split (see module docstring).
MULTITASK_TRAIN_TASKS = ("PickCube-v1", "StackCube-v1", "PushCube-v1", "PlaceSphere-v1")
MULTITASK_HELDOUT_TASKS = ("PullCube-v1",)
HELDOUT_SEED_OFFSET = 1_000_000
#: Default time limit.  ManiSkill registers 50 steps for these tasks (tuned for joint-delta
#: control); its motion-planning demos converted to ``pd_ee_delta_pose`` take (measured, 2-3
#: demos each) PickCube 47-71, PushCube 58-63, PullCube 55-65, StackCube 90-102 and
#: PlaceSphere 105-115 steps, so pirl allows 150.
DEFAULT_MAX_STEPS = 150


def split_config(split: str) -> tuple[tuple[str, ...], int, int]:
    """``(tasks, seed_low, seed_high)`` of a multitask split.

    ``train``: training tasks, seeds in ``[0, HELDOUT_SEED_OFFSET)``; ``test_seen``: training
    tasks, held-out seeds ``[HELDOUT_SEED_OFFSET, 2 * HELDOUT_SEED_OFFSET)``; ``test_unseen``:
    the held-out task(s), held-out seeds.
    """
    lo, hi = HELDOUT_SEED_OFFSET, 2 * HELDOUT_SEED_OFFSET
    if split == "train":
        return MULTITASK_TRAIN_TASKS, 0, HELDOUT_SEED_OFFSET
    if split == "test_seen":
        return MULTITASK_TRAIN_TASKS, lo, hi
    if split == "test_unseen":
        return MULTITASK_HELDOUT_TASKS, lo, hi
    raise ValueError(f"unknown split {split!r} (train, test_seen, test_unseen)")


# --------------------------------------------------------------------------------------------
# Availability checks
# --------------------------------------------------------------------------------------------

VULKAN_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


def require_maniskill(icd_dirs: Sequence[str] = VULKAN_ICD_DIRS) -> None:
    """Raise :class:`SimulatorUnavailable` naming the fix if ManiSkill or Vulkan is missing."""
    missing = [m for m in ("mani_skill", "sapien", "gymnasium")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SimulatorUnavailable(
            f"ManiSkill3 is not installed (missing Python packages: {', '.join(missing)}). "
            f"Install it with: {MANISKILL_INSTALL}   (SAPIEN also needs Vulkan: {VULKAN_APT})")
    import ctypes.util

    icds = [f for d in icd_dirs for f in glob.glob(os.path.join(d, "*.json"))]
    if ctypes.util.find_library("vulkan") is None or not icds:
        raise SimulatorUnavailable(
            "ManiSkill3's renderer (SAPIEN) needs a Vulkan driver and none was found "
            f"(libvulkan: {ctypes.util.find_library('vulkan')}, ICD files: {icds}). "
            f"Install one with: {VULKAN_APT}")


def _registered_max_steps(task: str) -> int:
    from mani_skill.utils.registration import REGISTERED_ENVS

    if task not in REGISTERED_ENVS:
        raise ValueError(f"unknown ManiSkill task {task!r}")
    return int(REGISTERED_ENVS[task].max_episode_steps or 100)


def _make_gym_env(task: str, num_envs: int, sim_backend: str, obs_mode: str, control_mode: str,
                  image_size: int, wrist_camera: bool, reward_mode: str,
                  render_backend: str | None):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    kw: dict[str, Any] = dict(num_envs=num_envs, obs_mode=obs_mode, control_mode=control_mode,
                              reward_mode="normalized_dense" if reward_mode == "shaped"
                              else reward_mode, sim_backend=sim_backend,
                              max_episode_steps=10**9)  # pirl counts the time limit itself
    if render_backend is not None:
        kw["render_backend"] = render_backend
    if obs_mode != "state":
        kw["sensor_configs"] = dict(width=image_size, height=image_size)
    if wrist_camera:
        kw["robot_uids"] = "panda_wristcam"
    return gym.make(task, **kw)


def format_obs(env, raw: Any, obs_mode: str, state_dim: int, cameras: Sequence[str],
               rows: Any = slice(None)) -> dict[str, torch.Tensor]:
    """ManiSkill obs (batched torch) -> ``{"images": [b, C, 3, H, W] uint8, "state": [b, S]}``
    for the env rows ``rows`` (default all)."""
    if obs_mode == "state":
        s = raw[rows].float()
        pad = state_dim - s.shape[-1]
        return {"state": torch.nn.functional.pad(s, (0, pad)) if pad > 0 else s}
    imgs = torch.stack([raw["sensor_data"][c]["rgb"][rows] for c in cameras], dim=1)
    extra = raw.get("extra", {})
    # the TCP pose at observation time (ManiSkill's own obs field if the task has it)
    tcp = extra["tcp_pose"] if "tcp_pose" in extra else env.unwrapped.agent.tcp.pose.raw_pose
    qpos = raw["agent"]["qpos"][rows].float()
    state = torch.cat([qpos, tcp[rows].float().to(qpos.device)], dim=-1)
    return {"images": imgs.permute(0, 1, 4, 2, 3).contiguous(), "state": state}


class PotentialShaper:
    """pirl's ``reward_mode="shaped"`` for ``n`` env rows (numpy, float64).

    ``reward(phi, success, rows)`` turns ManiSkill's ``normalized_dense`` reward ``phi_t`` (in
    ``[0, 1]``, 1 at success) of rows ``rows`` into ``success_t + scale * (phi_t - phi_{t-1})``.
    :meth:`reset` marks rows as new episodes; their first step has no previous ``phi`` and gets
    no shaping term.  Over an episode the shaping sums to ``scale * (phi_T - phi_1)``, so it
    does not change which policies are optimal for reaching success (Ng et al., 1999; exactly
    so with discount 1) and waiting earns nothing.
    """

    def __init__(self, n: int, scale: float):
        self.scale = float(scale)
        self.prev = np.full(n, np.nan)

    def reset(self, rows: Any) -> None:
        self.prev[rows] = np.nan

    def reward(self, phi: np.ndarray, success: np.ndarray, rows: Any = slice(None)) -> np.ndarray:
        phi = np.asarray(phi, dtype=np.float64)
        prev = self.prev[rows]
        shaping = np.where(np.isnan(prev), 0.0, phi - prev)
        self.prev[rows] = phi
        return np.asarray(success, dtype=np.float64) + self.scale * shaping

    def reward_row(self, row: int, phi: float, success: bool) -> float:
        """:meth:`reward` of one row (scalars in and out), as the env slots call it."""
        return float(self.reward(np.array([phi]), np.array([success]), slice(row, row + 1))[0])


# --------------------------------------------------------------------------------------------
# CPU: single-env slots (in this process or one per worker process)
# --------------------------------------------------------------------------------------------

class ManiSkillSlot:
    """One CPU-simulated env slot; builds one ManiSkill env per task on first use.

    Implements the slot protocol of :class:`pirl.envs.pool.PoolBatchedEnv`:
    ``reset(task_index, init_index, seed) -> obs`` and ``step(action) -> (obs, reward, success)``
    with numpy values (``images [C, 3, H, W]`` uint8, ``state [S]`` float32).
    """

    def __init__(self, tasks: Sequence[str], obs_mode: str = "rgb",
                 control_mode: str = "pd_ee_delta_pose", image_size: int = 128,
                 wrist_camera: bool = False, reward_mode: str = "sparse",
                 render_backend: str | None = "gpu", state_dim: int = 16,
                 shaping_scale: float = 1.0):
        self.tasks = list(tasks)
        self.shaper = PotentialShaper(1, shaping_scale) if reward_mode == "shaped" else None
        self.obs_mode = obs_mode
        self.kw = dict(sim_backend="physx_cpu", obs_mode=obs_mode, control_mode=control_mode,
                       image_size=image_size, wrist_camera=wrist_camera, reward_mode=reward_mode,
                       render_backend=render_backend)
        self.cameras = ["base_camera"] + (["hand_camera"] if wrist_camera else [])
        self.state_dim = state_dim
        self.envs: dict[int, Any] = {}
        self.current: int | None = None

    def env(self, task_index: int):
        if task_index not in self.envs:
            self.envs[task_index] = _make_gym_env(self.tasks[task_index], 1, **self.kw)
        return self.envs[task_index]

    def raw_state_dims(self) -> list[int]:
        """Flattened ``state``-mode observation size of every task (builds all envs)."""
        dims = []
        for i in range(len(self.tasks)):
            obs, _ = self.env(i).reset(seed=0)
            dims.append(int(obs.shape[-1]))
        return dims

    def _format(self, raw) -> dict[str, np.ndarray]:
        o = format_obs(self.envs[self.current], raw, self.obs_mode, self.state_dim, self.cameras)
        return {k: v[0].cpu().numpy() for k, v in o.items()}

    def reset(self, task_index: int, init_index: int, seed: int) -> dict[str, np.ndarray]:
        del init_index  # ManiSkill draws the initial state from the seed
        self.current = task_index
        raw, _ = self.env(task_index).reset(seed=int(seed))
        if self.shaper is not None:
            self.shaper.reset(0)
        return self._format(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        raw, reward, _, _, info = self.envs[self.current].step(
            torch.as_tensor(np.asarray(action, dtype=np.float32))[None])
        r = float(reward.reshape(-1)[0])
        success = bool(info["success"].reshape(-1)[0])
        if self.shaper is not None:
            r = self.shaper.reward_row(0, r, success)
        return self._format(raw), r, success

    def close(self) -> None:
        for e in self.envs.values():
            e.close()
        self.envs.clear()


# --------------------------------------------------------------------------------------------
# GPU: one GPU-parallel ManiSkill env per task, exposed as a slot pool
# --------------------------------------------------------------------------------------------

class GpuSlotPool:
    """Same ``call`` interface as :class:`SubprocEnvPool`, backed by one GPU-parallel ManiSkill
    env per task.  ``slot_tasks [N]`` fixes which task each slot runs.

    ``reset`` resets each called slot on its own (partial reset ``env_idx=[j]`` with its own seed,
    so a slot's initial state depends only on its task and seed); ``step`` steps every task env
    once with the called slots' actions (uncalled slots get a zero action and are ignored).
    Returned observations are moved to the CPU.  ``physx_backend="physx_cpu"`` (one slot per
    task) runs the same code on the CPU simulator, which is how it is tested without a GPU.
    """

    def __init__(self, tasks: Sequence[str], slot_tasks: Sequence[int], obs_mode: str,
                 control_mode: str, image_size: int, wrist_camera: bool, reward_mode: str,
                 render_backend: str | None, state_dim: int, physx_backend: str = "physx_cuda",
                 shaping_scale: float = 1.0):
        self.tasks = list(tasks)
        self.slot_tasks = [int(t) for t in slot_tasks]
        self.size = len(self.slot_tasks)
        self.obs_mode = obs_mode
        self.state_dim = state_dim
        self.cameras = ["base_camera"] + (["hand_camera"] if wrist_camera else [])
        self.local = []  # slot -> index inside its task's env
        counts: dict[int, int] = {}
        for t in self.slot_tasks:
            self.local.append(counts.get(t, 0))
            counts[t] = counts.get(t, 0) + 1
        self.envs = {t: _make_gym_env(self.tasks[t], n, physx_backend, obs_mode, control_mode,
                                      image_size, wrist_camera, reward_mode, render_backend)
                     for t, n in counts.items()}
        first = next(iter(self.envs.values())).unwrapped
        self.action_dim = int(first.single_action_space.shape[0])
        self.shaper = (PotentialShaper(self.size, shaping_scale) if reward_mode == "shaped"
                       else None)

    def _rows(self, t: int, raw, rows: Any = slice(None)) -> dict[str, np.ndarray]:
        """Formatted observations of task ``t``'s env rows, on the CPU."""
        o = format_obs(self.envs[t], raw, self.obs_mode, self.state_dim, self.cameras, rows)
        return {k: v.cpu().numpy() for k, v in o.items()}

    def call(self, method: str, args: Sequence[tuple] | None = None, kwargs=None,
             indices: Sequence[int] | None = None) -> list[Any]:
        idx = list(range(self.size)) if indices is None else list(indices)
        args = [()] * len(idx) if args is None else list(args)
        if method == "reset":
            out = []
            for i, (task, _init, seed) in zip(idx, args):
                if task != self.slot_tasks[i]:
                    raise ValueError(f"GPU slot {i} runs task {self.slot_tasks[i]}, not {task}; "
                                     "GPU layouts are fixed (see ManiSkillEnv.slot_tasks)")
                env = self.envs[task]
                raw, _ = env.reset(seed=[int(seed)], options={
                    "env_idx": torch.tensor([self.local[i]], device=env.unwrapped.device)})
                j = self.local[i]
                if self.shaper is not None:
                    self.shaper.reset(i)
                out.append({k: v[0] for k, v in self._rows(task, raw, slice(j, j + 1)).items()})
            return out
        if method == "step":
            acts = {t: torch.zeros(e.unwrapped.num_envs, self.action_dim,
                                   device=e.unwrapped.device) for t, e in self.envs.items()}
            for i, (a,) in zip(idx, args):
                acts[self.slot_tasks[i]][self.local[i]] = torch.as_tensor(
                    np.asarray(a, dtype=np.float32), device=acts[self.slot_tasks[i]].device)
            res = {}
            for t, e in self.envs.items():  # one step and one device->host copy per task
                raw, reward, _, _, info = e.step(acts[t])
                res[t] = (self._rows(t, raw), reward.float().cpu().numpy(),
                          info["success"].cpu().numpy())
            out = []
            for i in idx:
                t, j = self.slot_tasks[i], self.local[i]
                obs, reward, success = res[t]
                r = float(reward[j])
                if self.shaper is not None:
                    r = self.shaper.reward_row(i, r, bool(success[j]))
                out.append(({k: v[j] for k, v in obs.items()}, r, bool(success[j])))
            return out
        raise ValueError(f"GpuSlotPool supports reset / step, not {method}")

    def close(self) -> None:
        for e in self.envs.values():
            e.close()


# --------------------------------------------------------------------------------------------
# The batched env
# --------------------------------------------------------------------------------------------

class ManiSkillEnv(PoolBatchedEnv):
    """ManiSkill3 task(s) as a pirl :class:`BatchedEnv` (see the module docstring).

    tasks: one task id or several (multitask); task_ids of observations index this list.
    num_envs: parallel envs.  sim_backend: ``"auto"`` (GPU if CUDA is available), ``"gpu"``,
    ``"cpu"``.  vectorization (CPU): ``"loop"`` (one process) or ``"process"``.
    obs_mode: ``"rgb"`` or ``"state"``.  control_mode: any ManiSkill controller of the robot
    (default ``pd_ee_delta_pose``).  image_size: square camera side.  wrist_camera: add the
    Panda hand camera (robot ``panda_wristcam``).  max_episode_steps: default the largest
    registered limit of the tasks and :data:`DEFAULT_MAX_STEPS`.
    reward_mode: ManiSkill's ``"sparse"`` / ``"dense"`` / ``"normalized_dense"`` / ``"none"``,
    or ``"shaped"`` (success + ``shaping_scale`` x potential shaping, :class:`PotentialShaper`).
    instructions: override :data:`TASK_INSTRUCTIONS`.
    render_backend: ManiSkill's (default ``"gpu"``: SAPIEN's Vulkan renderer, which is Mesa's
    lavapipe on a CPU-only machine; ``"sapien_cpu"`` is the alternative, slower here).
    seed_range: ``[low, high)`` of the episode seeds drawn by :meth:`reset` (when none are
    given) and by auto-resets.
    slot_tasks: GPU only, the task index of each slot (default: contiguous near-equal blocks).
    """

    def __init__(self, tasks: str | Sequence[str] = "PickCube-v1", num_envs: int = 1, *,
                 sim_backend: str = "auto", vectorization: str = "loop", obs_mode: str = "rgb",
                 control_mode: str = "pd_ee_delta_pose", image_size: int = 128,
                 wrist_camera: bool = False, reward_mode: str = "sparse",
                 render_backend: str | None = None, max_episode_steps: int | None = None,
                 auto_reset: bool = False, instructions: dict[str, str] | None = None,
                 seed_range: tuple[int, int] = (0, 2**31 - 1),
                 slot_tasks: Sequence[int] | None = None, shaping_scale: float = 1.0):
        require_maniskill()
        if reward_mode not in ("sparse", "dense", "normalized_dense", "shaped", "none"):
            raise ValueError(f"reward_mode must be sparse, dense, normalized_dense, shaped or "
                             f"none, got {reward_mode!r}")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if obs_mode not in ("rgb", "state"):
            raise ValueError(f"obs_mode must be 'rgb' or 'state', got {obs_mode!r}")
        if sim_backend == "auto":
            sim_backend = "gpu" if torch.cuda.is_available() else "cpu"
        if sim_backend not in ("gpu", "cpu"):
            raise ValueError(f"sim_backend must be auto, gpu or cpu, got {sim_backend!r}")
        if render_backend is None:
            # SAPIEN's Vulkan renderer; on a CPU-only machine that is Mesa's lavapipe, measured
            # 2.3x faster here than render_backend="sapien_cpu" (15.5 vs 6.6 steps/s, 1 camera)
            render_backend = "gpu"
        instr = {**TASK_INSTRUCTIONS, **(instructions or {})}
        self.tasks = tasks
        self.sim_backend = sim_backend
        self.obs_mode = obs_mode
        slot_kw = dict(obs_mode=obs_mode, control_mode=control_mode, image_size=image_size,
                       wrist_camera=wrist_camera, reward_mode=reward_mode,
                       render_backend=render_backend)
        state_dim = 16
        if obs_mode == "state":
            probe = ManiSkillSlot(tasks, **slot_kw)
            state_dim = max(probe.raw_state_dims())
            probe.close()
        if sim_backend == "gpu":
            if slot_tasks is None:
                slot_tasks = np.repeat(np.arange(len(tasks)),
                                       [len(b) for b in np.array_split(np.arange(num_envs),
                                                                       len(tasks))]).tolist()
            pool: Any = GpuSlotPool(tasks, slot_tasks, state_dim=state_dim, **slot_kw,
                                    shaping_scale=shaping_scale)
            self.slot_tasks = torch.as_tensor(slot_tasks, dtype=torch.long)
        else:
            if vectorization not in ("loop", "process"):
                raise ValueError(f"vectorization must be loop or process, got {vectorization!r}")
            factory = functools.partial(ManiSkillSlot, tasks, state_dim=state_dim, **slot_kw,
                                        shaping_scale=shaping_scale)
            pool = SubprocEnvPool([factory] * num_envs, in_process=vectorization == "loop")
            self.slot_tasks = None
        # ManiSkill's pd_ee_delta_pose / pd_joint_* arms are 7-D (+gripper) for the Panda
        action_dim = 7 if control_mode.startswith("pd_ee_delta_pose") else None
        if action_dim is None:
            probe_env = _make_gym_env(tasks[0], 1, "physx_cpu", **slot_kw)
            action_dim = int(probe_env.action_space.shape[-1])
            probe_env.close()
        super().__init__(pool, task_names=tasks, instructions=[instr.get(t, t) for t in tasks],
                         action_dim=action_dim, state_dim=state_dim,
                         max_episode_steps=max_episode_steps or max(
                             [DEFAULT_MAX_STEPS] + [_registered_max_steps(t) for t in tasks]),
                         auto_reset=auto_reset, seed_space=1, seed_range=seed_range)

    def reset(self, seed: int | None = None, task_ids: torch.Tensor | None = None,
              episode_seeds: torch.Tensor | None = None) -> Obs:
        """Reset all envs; defaults: GPU slots keep their fixed tasks, CPU tasks are drawn
        uniformly from ``seed``; episode seeds are drawn from :attr:`seed_range`."""
        rng = np.random.default_rng(seed)
        n = self.num_envs
        if task_ids is None:
            task_ids = (self.slot_tasks if self.slot_tasks is not None
                        else torch.from_numpy(rng.integers(0, len(self.tasks), n)))
        if episode_seeds is None:
            episode_seeds = torch.from_numpy(rng.integers(*self.seed_range, n))
        obs = super().reset(seed=seed, task_ids=task_ids, episode_seeds=episode_seeds)
        self._rng = rng
        return obs

    def _slot_reset_args(self, i: int) -> tuple:
        return int(self._task_ids[i]), 0, int(self._episode_seeds[i])


class ManiSkillMultiTask(ManiSkillEnv):
    """The multitask stand-in for pi_RL's ManiSkill set: :func:`split_config` picks the tasks
    and the episode-seed range (``train`` / ``test_seen`` / ``test_unseen``)."""

    def __init__(self, num_envs: int = 1, split: str = "train",
                 tasks: Sequence[str] | None = None, **kw):
        split_tasks, lo, hi = split_config(split)
        self.split = split
        super().__init__(list(tasks or split_tasks), num_envs, seed_range=(lo, hi), **kw)


def make_env(name: str = "maniskill", num_envs: int = 1, **kw) -> ManiSkillEnv:
    """Registry entry.  ``name``: ``"maniskill"`` (PickCube-v1 unless ``tasks=`` is given),
    ``"maniskill/<TaskId>"`` / ``"maniskill:<TaskId>"`` / ``"<TaskId>"`` (e.g. ``PickCube-v1``),
    or ``"maniskill_multitask"`` (optionally ``.../train|test_seen|test_unseen``, or
    ``split=``).  ``device`` (what ``pirl train`` passes every env) is accepted and ignored:
    observations come back on the CPU and the rollout moves them to the policy's device.
    Other keywords go to :class:`ManiSkillEnv`."""
    kw.pop("device", None)
    base, _, rest = name.replace(":", "/").partition("/")
    if base in ("maniskill_multitask", "maniskill-multitask"):
        if rest:
            kw["split"] = rest
        return ManiSkillMultiTask(num_envs=num_envs, **kw)
    if base == "maniskill":
        tasks = kw.pop("tasks", rest or "PickCube-v1")
    else:
        tasks = kw.pop("tasks", name)
    return ManiSkillEnv(tasks, num_envs, **kw)
