"""Meta-World (MT50, MT10, ML10 / ML45) behind pirl's batched env API, on MuJoCo on the CPU.

``pip install 'pirl[metaworld]'`` (Meta-World 3.1.1: MuJoCo 3, Gymnasium 1.x; no second torch,
no downloads; it installs into the core venv).

Tasks and benchmarks (:func:`benchmark_tasks`): ``mt50`` (all 50 v3 tasks), ``mt10``,
``ml10`` / ``ml45`` (``split="train"``: their training tasks; ``split="test"``: their held-out
test tasks), or any list of v3 task names (``"pick-place-v3"`` ...).  Every task has a short
imperative instruction (:data:`TASK_INSTRUCTIONS`).

Slots: one MuJoCo env per slot (one env is ~25 MB and takes ~0.15 s to build, measured).  A
slot builds a task's env the first time it runs it and keeps the ``max_cached`` most recently
used ones (:data:`MAX_CACHED_TASKS`).  Env row ``i`` of the batch is served by some slot: at each
:meth:`MetaWorldEnv.reset` the rows are matched to slots that already hold their task where
possible (an episode depends only on its task and seed, not on the slot), so RL's random task
draws rebuild few envs.  ``reset()`` without ``task_ids`` runs ``slot_tasks`` (default
``i mod T``: ``num_envs`` a multiple of ``T`` spreads the tasks evenly).  Slots run in this
process (``num_workers=0``) or split over ``num_workers`` worker processes, each stepping its
slots in a loop (:class:`pirl.envs.pool.SlotGroup`).

Observations: ``state [N, 39]`` float32 is Meta-World's own observation with the goal exposed
(its "goal-observable" mode): hand xyz (3), gripper opening (1), up to two objects' xyz +
quaternion (14, zero-padded), the same 18 values of the previous step (frame stacking), and the
goal position xyz (3, entries 36-38).  ``state_features="relative"`` appends 12 offsets
(:func:`relative_state`: object 1, object 2 and goal minus the hand, goal minus object 1):
``state [N, 51]``.  With ``obs_mode="rgb"`` also ``images
[N, 1, 3, S, S]`` uint8 from one MuJoCo camera (``camera``, default ``corner``; rendered at
``image_size`` with MuJoCo's offscreen renderer: EGL / OSMesa, see
:func:`pirl.envs.pool.select_mujoco_gl`).  Actions ``[N, 4]`` in ``[-1, 1]``: end-effector
delta xyz and gripper effort (``+1`` closes); an action of another shape is a ``ValueError``.

Episodes: the initial state (object and goal positions: Meta-World's ``rand_vec``) is a function
of (task, episode seed): the slot seeds the env's generator with the episode seed before every
reset.  ``terminated`` = ``info["success"]`` (Meta-World never terminates by itself);
``truncated`` = ``max_episode_steps`` (default :data:`DEFAULT_MAX_STEPS`; Meta-World's own limit
is 500, which pirl lifts and counts itself).  Reward ``"sparse"``: 1 at the success step, else 0;
``"dense"``: Meta-World's shaped reward divided by 10 (in ``[0, 1]``) per step;
``"dense_absorbing"``: Meta-World's shaped reward divided by ``10 * T`` per step (``T`` =
``max_episode_steps``), and at the success step, which ends the episode, the remaining steps'
maximum reward ``(T - t) / T`` (``t`` steps taken): the return of a success state that were
absorbing at the top reward until the time limit, in ``[0, 1]``.  With plain ``"dense"`` a
success ends the reward stream, so hovering just short of success would out-earn finishing;
here finishing earlier never earns less.

Episode seeds: training draws them from ``[0, HELDOUT_SEED_OFFSET)``; :func:`eval_episode_seeds`
gives each task fixed evaluation seeds from ``[HELDOUT_SEED_OFFSET, 2 * HELDOUT_SEED_OFFSET)``
(used by the scripted-policy table); ``split="test"`` of an MT benchmark draws from that
held-out range.  (``pirl``'s evaluator passes its own fixed seeds, ``>= 10**9``, also disjoint.)
``fixed_variations=True`` is the MT benchmarks' own protocol instead: each task has
:data:`NUM_VARIATIONS` fixed goal / object placements (:func:`variation_seed`), an episode seed
``s`` starts variation ``s % 50``, and training and evaluation run the same placements (the
evaluator's k-th episode of a task: variation k, like LIBERO's fixed init states).

Demos and the scripted policies' success table: :mod:`pirl.envs.metaworld_scripted`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Sequence

import numpy as np
import torch

from pirl.envs.base import Obs, Step
from pirl.envs.pool import GroupedSlotPool, PoolBatchedEnv, SimulatorUnavailable

METAWORLD_INSTALL = "pip install 'pirl[metaworld]'"
#: Default time limit.  Meta-World's scripted policies succeed (10 fixed seeds per task,
#: docs/benchmarks/metaworld.md) in 82.4% of MT50 episodes within 100 steps, 96.2% within 150,
#: 97.0% within 200 and 97.0% within Meta-World's own 500; RLinf allows 100 policy steps.
DEFAULT_MAX_STEPS = 200
HELDOUT_SEED_OFFSET = 1_000_000
#: Goal / object variations per task of Meta-World's MT benchmarks (its ``_N_GOALS``): MT10 and
#: MT50 train and evaluate on these fixed variations of each task (``fixed_variations=``).
NUM_VARIATIONS = 50
#: Episode seed of variation 0 of the first MT50 task (:func:`variation_seed`): above the
#: training and held-out ranges, below the evaluator's own seeds (``>= 10**9``).
VARIATION_SEED_OFFSET = 2 * HELDOUT_SEED_OFFSET
#: Envs kept per slot (each ~25 MB of MuJoCo model and data); older ones are closed.
MAX_CACHED_TASKS = 2
ACTION_DIM = 4
REWARD_MODES = ("sparse", "dense", "dense_absorbing")
STATE_DIM = 39
STATE_FEATURES = ("raw", "relative")
#: Entries ``state_features="relative"`` appends to the 39: object 1 - hand, object 2 - hand
#: (zero when the task has no second object), goal - hand, goal - object 1 (xyz each).
RELATIVE_DIM = 12
#: Tasks whose goal (``_target_pos``, the state's last 3 entries) is a free point in space,
#: with no body at it, that the task must bring the hand (state ``[0:3]``) or the object
#: (``[4:7]``) to: a failed episode of one is a success for the goal where that point went
#: (:meth:`MetaWorldEnv.hindsight_episode`).  Goals tied to a body (a shelf, a basket, a coffee
#: machine, a hole) move physics with them and are left out.
HINDSIGHT_TASKS: dict[str, slice] = {
    "reach-v3": slice(0, 3), "reach-wall-v3": slice(0, 3),
    "push-v3": slice(4, 7), "push-wall-v3": slice(4, 7), "push-back-v3": slice(4, 7),
    "pick-place-v3": slice(4, 7), "pick-place-wall-v3": slice(4, 7),
}
#: A relabelled goal lies at least this far (m) from where the hand / object started (twice
#: the tasks' success radii of 0.05-0.07), so that its episode has to move it there
HINDSIGHT_MIN_MOVE = 0.10

#: One short imperative instruction per v3 task (Meta-World's tasks carry no language).
TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "move the puck from one bin into the other bin",
    "box-close-v3": "pick up the lid and close the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the ring up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the lock to lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "turn the lock to unlock the door",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grab the stick and use it to push the bottle",
    "stick-pull-v3": "grab the stick and use it to pull the bottle",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
#: MT50 in Meta-World's own order.
MT50_TASKS: tuple[str, ...] = tuple(TASK_INSTRUCTIONS)


# --------------------------------------------------------------------------------------------
# Availability, tasks
# --------------------------------------------------------------------------------------------

def require_metaworld() -> None:
    """Raise :class:`SimulatorUnavailable` naming the install command if Meta-World is missing."""
    missing = [m for m in ("metaworld", "mujoco", "gymnasium")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SimulatorUnavailable(
            f"Meta-World is not installed (missing Python packages: {', '.join(missing)}). "
            f"Install it with: {METAWORLD_INSTALL}")


def check_state_features(state_features: str) -> str:
    """``state_features`` if it is one of :data:`STATE_FEATURES`, else a ``ValueError``."""
    if state_features not in STATE_FEATURES:
        raise ValueError(f"state_features: must be one of {', '.join(STATE_FEATURES)}, "
                         f"got {state_features!r}")
    return state_features


def state_dim(state_features: str = "raw") -> int:
    """Width of the ``state`` observation: 39 (``raw``) or 51 (``relative``)."""
    return STATE_DIM + (RELATIVE_DIM if check_state_features(state_features) == "relative" else 0)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` as a list; a name that is not a Meta-World v3 task is a ``ValueError`` naming
    it (and the closest names)."""
    import difflib

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks: empty task list")
    for t in tasks:
        if t not in TASK_INSTRUCTIONS:
            close = difflib.get_close_matches(t, list(TASK_INSTRUCTIONS), n=3)
            raise ValueError(f"unknown Meta-World task {t!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; tasks are the 50 MT50 v3 names, e.g. 'pick-place-v3'")
    return tasks


def benchmark_tasks(benchmark: str = "mt50", split: str = "train") -> list[str]:
    """Task names of a Meta-World benchmark: ``mt50``, ``mt10``, ``ml10`` / ``ml45`` (``split``
    ``train``: their training tasks, ``test``: their held-out tasks), or one v3 task name."""
    b = benchmark.lower()
    if b == "mt50":
        return list(MT50_TASKS)
    if b in ("mt10", "ml10", "ml45"):
        require_metaworld()
        from metaworld import env_dict as D

        if b == "mt10":
            return list(D.MT10_V3)
        if split not in ("train", "test"):
            raise ValueError(f"split: {b} has 'train' and 'test' task sets, not {split!r}")
        return list((D.ML10_V3 if b == "ml10" else D.ML45_V3)[split])
    return check_tasks([benchmark])


def eval_episode_seeds(task_index: int, n: int) -> list[int]:
    """``n`` fixed evaluation episode seeds of task ``task_index`` (held-out range: disjoint
    from training draws and from the other tasks' evaluation seeds)."""
    return [HELDOUT_SEED_OFFSET + 1000 * int(task_index) + j for j in range(n)]


def variation_seed(task: str, variation: int) -> int:
    """The episode seed of fixed variation ``variation`` of ``task`` (a v3 task name; the same
    seed whichever benchmark or task list the task runs in): disjoint from the training draws,
    the held-out seeds, the evaluator's own seeds and the other tasks' variations."""
    if task not in MT50_TASKS:
        raise ValueError(f"unknown Meta-World task {task!r}")
    if not 0 <= int(variation) < NUM_VARIATIONS:
        raise IndexError(f"variation {variation} out of range: Meta-World tasks have "
                         f"{NUM_VARIATIONS} fixed variations (0-{NUM_VARIATIONS - 1})")
    return VARIATION_SEED_OFFSET + 1000 * MT50_TASKS.index(task) + int(variation)


# --------------------------------------------------------------------------------------------
# One slot: one MuJoCo env at a time (cached per task)
# --------------------------------------------------------------------------------------------

def relative_state(state: np.ndarray) -> np.ndarray:
    """``state [..., 39]`` -> ``[..., 51]``: Meta-World's observation followed by the
    :data:`RELATIVE_DIM` offsets between hand, objects and goal (float32).

    From one demo per task the goal and the objects sit at one place, so how the action depends
    on where they are is not in the data; as offsets from the hand it is, because the hand
    moves through the demo (docs/benchmarks/metaworld.md, "Relative state features")."""
    s = np.asarray(state, dtype=np.float32)
    hand, obj1, obj2, goal = s[..., 0:3], s[..., 4:7], s[..., 11:14], s[..., 36:39]
    has2 = np.any(obj2 != 0.0, axis=-1, keepdims=True)  # zero-padded when there is none
    rel = [obj1 - hand, np.where(has2, obj2 - hand, 0.0), goal - hand, goal - obj1]
    return np.concatenate([s] + [r.astype(np.float32) for r in rel], axis=-1)


@functools.cache  # a process-wide setting: once per process, however many slots it steps
def _limit_heap_fragmentation() -> bool:
    """Serve allocations of 1 MB and more from their own mmap (glibc ``mallopt``); True if set.

    A MuJoCo env's data arena (~15 MB) is freed when a slot switches task, and glibc then raises
    its mmap threshold so that later arenas come from the heap, which fragments: with random task
    draws a process's memory grew ~0.2 GB per RL iteration of 100 slots; with a fixed 1 MB
    threshold it stays flat
    (docs/experiments.md#2026-12-06--meta-world-mt50-shared-evaluation-envs-grpo-and-a-lower-sft-start).
    A no-op (False) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = -3 in glibc's malloc.h
    except (OSError, AttributeError):
        return False


def _build_env(task: str, render: bool, camera: str, image_size: int):
    """Meta-World's env class for ``task`` in goal-observable mode, its generator seeded per
    episode (``seeded_rand_vec``) and no internal time limit."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    kw: dict[str, Any] = {}
    if render:
        kw = dict(render_mode="rgb_array", camera_name=camera, width=image_size,
                  height=image_size)
    env = ALL_V3_ENVIRONMENTS[task](**kw)
    # what Meta-World's own goal-observable classes do, with the goal re-drawn every reset from
    # the env's generator (which the slot seeds with the episode seed)
    env._partially_observable = False
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    del env.sawyer_observation_space  # cached property: recomputed with the goal visible
    env.max_path_length = 2**62  # pirl counts the time limit itself
    return env


class MetaWorldSlot:
    """One env slot (slot protocol of :class:`pirl.envs.libero.PoolBatchedEnv`):
    ``reset(task_index, init_index, seed) -> obs`` and ``step(action) -> (obs, reward, success)``
    with numpy values (``state [39]`` float32, ``images [1, 3, S, S]`` uint8 in ``rgb`` mode)."""

    def __init__(self, tasks: Sequence[str], obs_mode: str = "state", image_size: int = 64,
                 camera: str = "corner", reward_mode: str = "sparse",
                 max_cached: int = MAX_CACHED_TASKS,
                 max_episode_steps: int = DEFAULT_MAX_STEPS, state_features: str = "raw",
                 fixed_variations: bool = False):
        self.tasks = list(tasks)
        # reset's init_index picks one of the task's NUM_VARIATIONS fixed variations
        self.fixed_variations = bool(fixed_variations)
        self.obs_mode = obs_mode
        self.state_features = check_state_features(state_features)
        self.image_size = image_size
        self.camera = camera
        self.reward_mode = reward_mode
        # T of the "dense_absorbing" reward (the env's time limit) and the steps of this episode
        self.max_episode_steps = int(max_episode_steps)
        self.t = 0
        self.max_cached = max(1, int(max_cached))
        self.envs: dict[int, Any] = {}  # insertion order = least recently used first
        self.current: int | None = None
        _limit_heap_fragmentation()  # in the process that steps the slot (worker or main)

    def env(self, task_index: int):
        if task_index in self.envs:
            self.envs[task_index] = self.envs.pop(task_index)  # most recently used
        else:
            while len(self.envs) >= self.max_cached:
                old = next(iter(self.envs))
                self.envs.pop(old).close()
            self.envs[task_index] = _build_env(self.tasks[task_index], self.obs_mode == "rgb",
                                               self.camera, self.image_size)
        return self.envs[task_index]

    def _format(self, state: np.ndarray) -> dict[str, np.ndarray]:
        out = {"state": np.asarray(state, dtype=np.float32)}
        if self.state_features == "relative":
            out["state"] = relative_state(out["state"])
        if self.obs_mode == "rgb":
            img = self.envs[self.current].render()  # [S, S, 3] uint8
            out["images"] = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))[None]
        return out

    def reset(self, task_index: int, init_index: int, seed: int) -> dict[str, np.ndarray]:
        """Start an episode of task ``task_index`` from episode ``seed``, or with
        ``fixed_variations`` from the task's variation ``init_index`` (whatever ``seed``)."""
        if self.fixed_variations:
            seed = variation_seed(self.tasks[int(task_index)], init_index)
        env = self.env(int(task_index))
        self.current = int(task_index)
        env.seed(int(seed))
        state, _ = env.reset()
        self.t = 0
        return self._format(state)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        state, reward, _, _, info = self.envs[self.current].step(a)
        success = bool(info["success"])
        self.t += 1
        if self.reward_mode == "sparse":
            r = float(success)
        elif self.reward_mode == "dense":
            r = float(reward) / 10.0
        else:  # dense_absorbing (module docstring)
            big_t = self.max_episode_steps
            r = float(reward) / (10.0 * big_t)
            if success:
                r += max(big_t - self.t, 0) / big_t
        return self._format(state), r, success

    def close(self) -> None:
        for e in self.envs.values():
            e.close()
        self.envs.clear()


# --------------------------------------------------------------------------------------------
# The batched env
# --------------------------------------------------------------------------------------------

class MetaWorldEnv(PoolBatchedEnv):
    """``num_envs`` Meta-World env slots (see module docstring).

    tasks: a benchmark name (``mt50``, ``mt10``, ``ml10``, ``ml45``; with ``split``) or a list of
    v3 task names; slot_tasks: ``[N]`` task index of each slot (default ``i mod T``);
    obs_mode: ``"state"`` or ``"rgb"`` (also one camera image ``image_size`` px from ``camera``);
    reward_mode: one of :data:`REWARD_MODES` (module docstring); max_episode_steps: default
    :data:`DEFAULT_MAX_STEPS`; state_features: ``"raw"`` (``state [N, 39]``) or ``"relative"``
    (``[N, 51]``, :func:`relative_state`); num_workers: 0 = slots in this process, else that
    many worker processes; seed_range: training episode seeds (default by split, see module
    docstring); fixed_variations: the MT benchmarks' protocol, every episode of a task starts
    from one of its :data:`NUM_VARIATIONS` fixed variations (episode seed ``s``: variation
    ``s % 50``, :func:`variation_seed`), so that training and evaluation run the same 50 goal /
    object placements per task; :attr:`fixed_init_states` then tells the evaluator to run the
    k-th episode of a task on variation ``first_init_state + k`` and lets ``rl.init_states``
    choose the training variations.
    """

    def __init__(self, tasks: str | Sequence[str] = "mt50", num_envs: int = 50,
                 split: str = "train", slot_tasks: Sequence[int] | None = None,
                 obs_mode: str = "state", image_size: int = 64, camera: str = "corner",
                 reward_mode: str = "sparse", max_episode_steps: int | None = None,
                 auto_reset: bool = False, num_workers: int = 0,
                 seed_range: tuple[int, int] | None = None, mujoco_gl: str | None = None,
                 max_cached: int = MAX_CACHED_TASKS, state_features: str = "raw",
                 fixed_variations: bool = False):
        require_metaworld()
        self.state_features = check_state_features(state_features)
        if not isinstance(fixed_variations, bool):
            raise ValueError(f"fixed_variations: must be true or false, got {fixed_variations!r}")
        self.fixed_variations = fixed_variations
        if fixed_variations:
            # the instance attribute pirl.envs.base.fixed_init_states reads (0: none)
            self.fixed_init_states = NUM_VARIATIONS
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        if obs_mode not in ("state", "rgb"):
            raise ValueError(f"obs_mode: must be 'state' or 'rgb', got {obs_mode!r}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode: must be one of {', '.join(REWARD_MODES)}, "
                             f"got {reward_mode!r}")
        if num_envs < 1:
            raise ValueError(f"num_envs: must be >= 1, got {num_envs}")
        if isinstance(tasks, str):
            is_bench = tasks.lower() in ("mt50", "mt10", "ml10", "ml45")
            task_list = benchmark_tasks(tasks, split) if is_bench else check_tasks([tasks])
            mt_like = not (is_bench and tasks.lower() in ("ml10", "ml45"))
        else:
            task_list, mt_like = check_tasks(tasks), True
        self.tasks = task_list
        self.split = split
        self.obs_mode = obs_mode
        self.image_size = image_size
        self.camera = camera
        if seed_range is None:
            # MT test split: held-out initial states of the training tasks; ML test: new tasks
            held = split == "test" and mt_like
            seed_range = ((HELDOUT_SEED_OFFSET, 2 * HELDOUT_SEED_OFFSET) if held
                          else (0, HELDOUT_SEED_OFFSET))
        if slot_tasks is None:
            slot_tasks = [i % len(task_list) for i in range(num_envs)]
        self.slot_tasks = torch.as_tensor(list(slot_tasks), dtype=torch.long)
        if self.slot_tasks.shape != (num_envs,) or int(self.slot_tasks.max()) >= len(task_list):
            raise ValueError(f"slot_tasks: need {num_envs} task indices < {len(task_list)}")
        env_vars = None
        if obs_mode == "rgb":
            from pirl.envs.pool import select_mujoco_gl

            gl = select_mujoco_gl(mujoco_gl)
            env_vars = {"MUJOCO_GL": gl, "PYOPENGL_PLATFORM": gl}
            if num_workers == 0:
                os.environ.setdefault("MUJOCO_GL", gl)
                os.environ.setdefault("PYOPENGL_PLATFORM", gl)
        max_steps = int(max_episode_steps or DEFAULT_MAX_STEPS)
        slot = functools.partial(MetaWorldSlot, tasks=task_list, obs_mode=obs_mode,
                                 image_size=image_size, camera=camera, reward_mode=reward_mode,
                                 max_cached=max_cached, max_episode_steps=max_steps,
                                 state_features=state_features,
                                 fixed_variations=fixed_variations)
        pool = GroupedSlotPool(slot, num_envs, num_workers, env_vars=env_vars)
        self.max_cached = max(1, int(max_cached))
        #: mirror of each slot's env cache (task indices, least recently used first)
        self._slot_cache: list[list[int]] = [[] for _ in range(num_envs)]
        self.env_builds = 0  # envs built so far (cache misses), for diagnostics
        #: the private slot hindsight_episode replays on (built at its first call)
        self._replay: MetaWorldSlot | None = None
        self.num_workers = num_workers
        self.num_cameras = 1 if obs_mode == "rgb" else 0
        super().__init__(pool, task_names=task_list,
                         instructions=[TASK_INSTRUCTIONS[t] for t in task_list],
                         action_dim=ACTION_DIM, state_dim=state_dim(state_features),
                         max_episode_steps=max_steps,
                         auto_reset=auto_reset,
                         seed_space=NUM_VARIATIONS if fixed_variations else 1,
                         seed_range=seed_range)

    def vocabulary(self) -> list[str]:
        """Every word of every Meta-World instruction (sorted), so the tiny VLA's tokenizer
        covers all 50 tasks whichever subset this env runs."""
        return sorted({w for s in TASK_INSTRUCTIONS.values() for w in s.split()})

    def reset(self, seed: int | None = None, task_ids: torch.Tensor | None = None,
              episode_seeds: torch.Tensor | None = None) -> Obs:
        """Reset all slots; defaults: every slot its own task (:attr:`slot_tasks`), episode
        seeds drawn from ``seed`` in :attr:`seed_range`."""
        rng = np.random.default_rng(seed)
        if task_ids is None:
            task_ids = self.slot_tasks
        if episode_seeds is None:
            episode_seeds = torch.from_numpy(rng.integers(*self.seed_range, self.num_envs))
        task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        if task_ids.shape == (self.num_envs,):
            self._assign_slots(task_ids.tolist())
        obs = super().reset(seed=seed, task_ids=task_ids, episode_seeds=episode_seeds)
        self._rng = rng
        return obs

    def _assign_slots(self, tasks: list[int]) -> None:
        """Match rows to slots: first to a free slot whose current env is the row's task, then
        to one that caches it, then to any free slot (least useful first); update the cache
        mirror as the slots will update theirs."""
        if min(tasks) < 0 or max(tasks) >= len(self.tasks):
            raise ValueError(f"task_ids: must be in [0, {len(self.tasks)}), got {tasks}")
        n = self.num_envs
        slot_of_row = [-1] * n
        free = set(range(n))
        cache = self._slot_cache
        for level in ("current", "cached"):
            for i, t in enumerate(tasks):
                if slot_of_row[i] >= 0:
                    continue
                hit = next((j for j in sorted(free) if cache[j] and (
                    cache[j][-1] == t if level == "current" else t in cache[j])), None)
                if hit is not None:
                    slot_of_row[i] = hit
                    free.discard(hit)
        needed = set(tasks)
        for i, t in enumerate(tasks):
            if slot_of_row[i] < 0:  # a slot whose cached tasks this reset needs least
                j = min(sorted(free), key=lambda j: sum(c in needed for c in cache[j]))
                slot_of_row[i] = j
                free.discard(j)
        for i, t in enumerate(tasks):
            c = cache[slot_of_row[i]]
            if t in c:
                c.remove(t)
            else:
                self.env_builds += 1
                if len(c) >= self.max_cached:
                    c.pop(0)
            c.append(t)
        self.pool.slot_of_row = np.array(slot_of_row)

    def step(self, action: torch.Tensor) -> Step:
        """``action [N, 4]`` (delta xyz, gripper) in ``[-1, 1]`` (clipped)."""
        shape = tuple(action.shape)
        if shape != (self.num_envs, ACTION_DIM):
            raise ValueError(f"action: Meta-World takes actions of shape [num_envs, 4] = "
                             f"[{self.num_envs}, 4] (delta xyz, gripper), got {list(shape)}")
        return super().step(action)

    def hindsight_episode(self, task_index: int, seed: int, actions: np.ndarray,
                          action_chunk: int) -> np.ndarray | None:
        """Hindsight relabelling of a failed episode of a :data:`HINDSIGHT_TASKS` task.

        ``actions [S, 4]``: the env actions the episode executed from its reset with episode
        ``seed`` (``action_chunk`` per chunk step).  The episode is replayed on a private env of
        this process: the new goal is the last point the hand / object reached that lies in the
        task's goal space (within its success radius) and at least :data:`HINDSIGHT_MIN_MOVE`
        from its start; then the episode is replayed again with that goal as ``_target_pos``
        (the goal moves no body of these tasks, so the replay's physics is the episode's) until
        Meta-World's own ``info["success"]``.  Returns the replay's states ``[K, D]`` (goal
        entries = the new goal) at the starts of the ``K`` chunk steps up to that success: with
        the episode's first ``K`` action chunks, a successful episode of the same task.  None
        if the task has no free goal, no reached point qualifies or the second replay does not
        succeed.
        """
        if not 0 <= int(task_index) < len(self.tasks):
            raise ValueError(f"task_index {task_index} outside [0, {len(self.tasks)})")
        part = HINDSIGHT_TASKS.get(self.tasks[int(task_index)])
        acts = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
        acts = acts[:self.max_episode_steps]
        if part is None or len(acts) == 0:
            return None
        if self._replay is None:
            # state only, one cached env per free-goal task
            self._replay = MetaWorldSlot(self.tasks, max_cached=len(HINDSIGHT_TASKS),
                                         max_episode_steps=self.max_episode_steps,
                                         state_features=self.state_features,
                                         fixed_variations=self.fixed_variations)
        slot, task = self._replay, int(task_index)
        start = self._reset_args(task, seed)  # the batch's own reset (fixed_variations too)
        points = [slot.reset(*start)["state"][part]]
        points += [slot.step(a)[0]["state"][part] for a in acts]
        pts = np.stack(points).astype(np.float64)
        env = slot.envs[task]
        low, high = env.goal_space.low, env.goal_space.high
        radius = 0.05
        ok = (np.all((pts >= low - radius) & (pts <= high + radius), axis=1)
              & (np.linalg.norm(pts - pts[0], axis=1) >= HINDSIGHT_MIN_MOVE))
        if not ok.any():
            return None
        goal = np.clip(pts[int(np.nonzero(ok)[0][-1])], low, high)
        slot.reset(*start)
        env._target_pos = goal.copy()
        env.model.site("goal").pos = goal  # (the goal marker; no physics)
        states = [slot._format(env._get_obs())["state"]]
        for a in acts:
            obs, _, success = slot.step(a)
            if success:
                k = -(-(len(states)) // action_chunk)  # chunk steps up to the success step
                return np.stack(states[::action_chunk][:k])
            states.append(obs["state"])
        return None

    def close(self) -> None:
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        super().close()

    def render(self) -> torch.Tensor:
        """Camera frames ``[N, 3, S, S]`` uint8 (``obs_mode="rgb"`` only)."""
        if self.obs_mode != "rgb":
            raise RuntimeError("render(): this Meta-World env has obs_mode='state'; build it "
                               "with obs_mode='rgb' for frames and videos")
        return super().render()


def make_env(name: str = "metaworld", num_envs: int = 50, **kw) -> MetaWorldEnv:
    """Registry entry.  ``name``: ``"metaworld"`` (MT50 unless ``tasks=`` is given),
    ``"metaworld/<benchmark>"`` (``mt50``, ``mt10``, ``ml10``, ``ml45``) or
    ``"metaworld/<task>"`` (``metaworld/pick-place-v3``).  ``device`` (what ``pirl train``
    passes every env) is accepted and ignored: observations come back on the CPU.  Other
    keywords go to :class:`MetaWorldEnv`."""
    kw.pop("device", None)
    _, _, rest = name.replace(":", "/").partition("/")
    tasks = kw.pop("tasks", rest or "mt50")
    return MetaWorldEnv(tasks, num_envs, **kw)
