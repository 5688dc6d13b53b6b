"""Real-simulator throughput: ManiSkill3, LIBERO and Meta-World behind pirl's batched env API.

Run in the simulator venv (see docs/benchmarks/maniskill.md)::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv-sim/bin/python benchmarks/sim_throughput.py

Meta-World's rows need only the core venv with the ``metaworld`` extra
(docs/benchmarks/metaworld.md)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sim_throughput.py --rows metaworld_state_loop \
        metaworld_state_pool2 metaworld_rgb_loop metaworld_rgb_pool2

Each row is produced by one function returning a dict; rows that cannot run on this machine say
why instead of a number.  Steps/s counts env steps summed over all envs (``num_envs * steps /
seconds``) with random actions, rendering included, after a reset that is not timed (env
construction and the first reset are reported separately as ``setup_s``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch


def _time_steps(env, steps: int, action_dim: int, seed: int = 0) -> tuple[float, float]:
    t0 = time.perf_counter()
    env.reset(seed=seed)
    setup = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(torch.rand(env.num_envs, action_dim, generator=g) * 2 - 1)
    dt = time.perf_counter() - t0
    return env.num_envs * steps / dt, setup


def maniskill_row(num_envs: int = 1, obs_mode: str = "rgb", vectorization: str = "loop",
                  image_size: int = 128, wrist_camera: bool = False, steps: int = 20,
                  task: str = "PickCube-v1") -> dict[str, Any]:
    """ManiSkill3 task on this machine's backend (GPU if CUDA, else CPU sim; Vulkan render)."""
    from pirl.envs.maniskill import ManiSkillEnv

    t0 = time.perf_counter()
    env = ManiSkillEnv(task, num_envs, obs_mode=obs_mode, vectorization=vectorization,
                       image_size=image_size, wrist_camera=wrist_camera, max_episode_steps=10**6)
    build = time.perf_counter() - t0
    try:
        sps, setup = _time_steps(env, steps, env.action_dim)
    finally:
        env.close()
    cams = (2 if wrist_camera else 1) if obs_mode == "rgb" else 0
    return {"sim": f"ManiSkill {task}", "backend": env.sim_backend, "num_envs": num_envs,
            "vectorization": vectorization if env.sim_backend == "cpu" else "gpu",
            "obs": f"{obs_mode}" + (f" {cams}x{image_size}px" if cams else ""),
            "steps_per_s": round(sps, 1), "setup_s": round(build + setup, 1)}


def libero_row(num_envs: int = 2, suite: str = "libero_spatial", steps: int = 20,
               image_size: int = 224, processes: bool | int = True,
               obs_mode: str = "image", fused_substeps: bool = True) -> dict[str, Any]:
    """LIBERO suite, one process per env (or all in this process).  ``image``: agent-view +
    wrist rendered at 256 px and resized to ``image_size``; ``state``: no rendering, robot state
    + the task's object poses.  ``fused_substeps``: pirl's split MuJoCo step (the default;
    bitwise the same trajectory), or robosuite's own loop.  Assets: resolved as by
    ``LiberoEnv`` (the asset package)."""
    from pirl.envs import libero as L

    gl = L.select_mujoco_gl() if obs_mode == "image" else "none"
    loop = "fused substeps" if fused_substeps else "robosuite loop"
    base = {"sim": f"LIBERO {suite}", "backend": f"cpu (MuJoCo, {gl}, {loop})",
            "num_envs": num_envs,
            "vectorization": ("loop" if not processes else "process" if processes is True
                              else f"{processes} processes"),
            "obs": (f"rgb 2x{image_size}px" if obs_mode == "image"
                    else f"state {L.suite_state_dim(suite)}-D")}
    t0 = time.perf_counter()
    env = L.LiberoEnv(suite, num_envs, image_size=image_size, max_episode_steps=10**6,
                      processes=processes, obs_mode=obs_mode, fused_substeps=fused_substeps)
    build = time.perf_counter() - t0
    try:
        sps, setup = _time_steps(env, steps, 7)
    finally:
        env.close()
    return {**base, "steps_per_s": round(sps, 1), "setup_s": round(build + setup, 1)}


def maniskill_demo_row(task: str = "PickCube-v1", episodes: int = 3) -> dict[str, Any]:
    """Motion-planning demos (plan in joint space, convert to pd_ee_delta_pose, record rgb)."""
    from pirl.envs.maniskill_demos import generate_motionplanning_demos

    eps, st = generate_motionplanning_demos(task, episodes, seed=0, image_size=128)
    return {"sim": f"ManiSkill demos {task}", "backend": "cpu", "num_envs": 1,
            "vectorization": "-", "obs": "rgb 1x128px",
            "steps_per_s": f"{st['seconds'] / max(len(eps), 1):.1f} s/demo",
            "setup_s": (f"{len(eps)} demos, plan ok {st['plan_success']:.0%}, replay ok "
                        f"{st['success']:.0%}, mean len {st['mean_len']:.0f}")}


def maniskill_gpu_row(num_envs: int = 320, obs_mode: str = "state") -> dict[str, Any]:
    """ManiSkill's GPU-parallel simulation (pi_RL's 320 envs); says so where CUDA is absent."""
    if not torch.cuda.is_available():
        return {"sim": "ManiSkill PickCube-v1", "backend": "gpu", "num_envs": num_envs,
                "vectorization": "gpu", "obs": obs_mode, "steps_per_s": "n/a",
                "setup_s": "needs CUDA (no GPU on this machine; run it on a GPU machine)"}
    return maniskill_row(num_envs, obs_mode, steps=50)


def metaworld_row(num_envs: int = 8, obs_mode: str = "state", num_workers: int = 0,
                  steps: int = 200, image_size: int = 64) -> dict[str, Any]:
    """Meta-World MT50 envs (slot i runs task i mod 50) in this process (``num_workers=0``)
    or split over a pool of worker processes; ``rgb`` renders one camera with MuJoCo."""
    from pirl.envs.metaworld import MetaWorldEnv

    t0 = time.perf_counter()
    env = MetaWorldEnv("mt50", num_envs, obs_mode=obs_mode, image_size=image_size,
                       num_workers=num_workers, max_episode_steps=10**6)
    build = time.perf_counter() - t0
    try:
        sps, setup = _time_steps(env, steps, env.action_dim)
    finally:
        env.close()
    if obs_mode == "rgb":
        from pirl.envs.pool import select_mujoco_gl

        backend = f"cpu (MuJoCo, {select_mujoco_gl()})"
    else:
        backend = "cpu (MuJoCo)"
    return {"sim": "Meta-World MT50", "backend": backend,
            "num_envs": num_envs,
            "vectorization": f"pool of {num_workers}" if num_workers else "1 process",
            "obs": "state 39" if obs_mode == "state" else f"rgb 1x{image_size}px + state",
            "steps_per_s": round(sps, 1), "setup_s": round(build + setup, 1)}


ROWS: dict[str, Callable[[], dict[str, Any]]] = {
    "maniskill_state_1": lambda: maniskill_row(1, "state", steps=50),
    "maniskill_rgb_1": lambda: maniskill_row(1, "rgb"),
    "maniskill_rgb_1_224": lambda: maniskill_row(1, "rgb", image_size=224),
    "maniskill_rgb_wrist_1": lambda: maniskill_row(1, "rgb", wrist_camera=True),
    "maniskill_rgb_2_loop": lambda: maniskill_row(2, "rgb", "loop"),
    "maniskill_rgb_2_process": lambda: maniskill_row(2, "rgb", "process"),
    "maniskill_gpu_state_320": lambda: maniskill_gpu_row(320, "state"),
    "maniskill_gpu_rgb_320": lambda: maniskill_gpu_row(320, "rgb"),
    "maniskill_demos": maniskill_demo_row,
    "libero_1": lambda: libero_row(1, processes=False),
    "libero_2": lambda: libero_row(2),
    "libero_state_1": lambda: libero_row(1, processes=False, obs_mode="state", steps=300),
    "libero_state_2": lambda: libero_row(2, obs_mode="state", steps=300),
    # the same physics through robosuite's own substep loop (three collision passes a substep)
    "libero_state_1_robosuite": lambda: libero_row(1, processes=False, obs_mode="state",
                                                   steps=300, fused_substeps=False),
    # the libero_spatial_state preset's 20 envs: in this process, and in 2 worker processes
    "libero_state_20": lambda: libero_row(20, processes=False, obs_mode="state", steps=30),
    "libero_state_20x2": lambda: libero_row(20, processes=2, obs_mode="state", steps=30),
    "libero_state_20_robosuite": lambda: libero_row(20, processes=False, obs_mode="state",
                                                    steps=30, fused_substeps=False),
    "metaworld_state_loop": lambda: metaworld_row(8, "state", 0),
    "metaworld_state_pool2": lambda: metaworld_row(8, "state", 2),
    "metaworld_rgb_loop": lambda: metaworld_row(2, "rgb", 0, steps=20),
    "metaworld_rgb_pool2": lambda: metaworld_row(2, "rgb", 2, steps=20),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cols = ["sim", "backend", "num_envs", "vectorization", "obs", "steps_per_s", "setup_s"]
    print(f"cpu cores: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.1f}, "
          f"cuda: {torch.cuda.is_available()}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in args.rows:
        try:
            r = ROWS[name]()
        except Exception as e:  # noqa: BLE001 - a row that cannot run says why
            r = {"sim": name, "steps_per_s": "error", "setup_s": f"{type(e).__name__}: {e}"}
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
