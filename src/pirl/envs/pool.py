"""Simulator-agnostic env plumbing: worker processes of single envs and pirl's episode
bookkeeping over them.

- :class:`SubprocEnvPool` runs one single-env object per process (``spawn`` by default) and calls
  a method on all of them at once (send to every worker, then gather: the simulators step in
  parallel); ``in_process=True`` runs the same objects in a loop in this process.  A dead worker
  closes the whole pool and raises, naming it: no call goes on with partial results.
- :class:`GroupedSlotPool`: the same interface with several slots per worker process
  (contiguous blocks), where a worker's imports cost more memory than its env.
- :class:`PoolBatchedEnv` turns a pool of *slots* into a :class:`~pirl.envs.base.BatchedEnv`:
  stacked observations, step counting against ``max_episode_steps``, auto-reset or
  frozen-when-done, episode seeds mapped onto each slot's start (``seed % seed_space``).
- :class:`SimulatorUnavailable` (an ``ImportError`` whose message names the fix) and
  :func:`select_mujoco_gl` (headless MuJoCo rendering: EGL, else OSMesa).

Used by the LIBERO, Meta-World and ManiSkill adapters (:mod:`pirl.envs.libero`,
:mod:`pirl.envs.metaworld`, :mod:`pirl.envs.maniskill`).
"""

from __future__ import annotations

import ctypes.util
import functools
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pirl.envs.base import BatchedEnv, Obs, Step

EGL_APT = "apt-get install -y libegl1 libgl1 libosmesa6"

class SimulatorUnavailable(ImportError):
    """A simulator package or its rendering backend is missing; the message names the fix."""


def select_mujoco_gl(preferred: str | None = None) -> str:
    """Pick MuJoCo's headless GL backend: ``$MUJOCO_GL`` if set, else ``egl`` if libEGL loads,
    else ``osmesa`` if libOSMesa loads; raise :class:`SimulatorUnavailable` naming the apt
    packages otherwise."""
    choice = preferred or os.environ.get("MUJOCO_GL")
    if choice:
        return choice
    for backend, lib in (("egl", "EGL"), ("osmesa", "OSMesa")):
        if ctypes.util.find_library(lib) is not None:
            return backend
    raise SimulatorUnavailable(
        "No headless OpenGL library found for MuJoCo rendering (neither libEGL nor libOSMesa). "
        f"Install one with: {EGL_APT}")


# --------------------------------------------------------------------------------------------
# A process pool of single environments
# --------------------------------------------------------------------------------------------

def _worker(conn, factory: Callable[[], Any], env_vars: dict[str, str]) -> None:
    """Worker loop: build one object with ``factory`` and run method calls sent over ``conn``."""
    os.environ.update(env_vars)
    try:
        torch.set_num_threads(1)
        obj = factory()
        conn.send(("ok", None))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    while True:
        try:
            cmd, method, args, kwargs = conn.recv()
        except EOFError:
            break
        if cmd == "close":
            try:
                if hasattr(obj, "close"):
                    obj.close()
            finally:
                conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(obj, method)(*args, **kwargs)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    conn.close()


class SubprocEnvPool:
    """Run ``len(factories)`` single-env objects, one per process, and call methods on all of
    them at once (send to every worker first, then gather: the workers run in parallel).

    ``in_process=True`` builds the objects in this process and calls them in a loop (same API;
    what single-core machines and debugging want).  Generic: used for LIBERO sub-envs and for
    ManiSkill's CPU simulation with ``vectorization="process"``.
    """

    def __init__(self, factories: Sequence[Callable[[], Any]], in_process: bool = False,
                 start_method: str = "spawn", env_vars: dict[str, str] | None = None):
        self.in_process = in_process
        self.size = len(factories)
        self._closed = False
        if in_process:
            if env_vars:
                os.environ.update(env_vars)
            self._objs = [f() for f in factories]
            return
        ctx = mp.get_context(start_method)
        self._conns, self._procs = [], []
        for f in factories:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, f, dict(env_vars or {})), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        errors = [self._recv(i) for i in range(self.size)]
        del errors

    def _recv(self, i: int) -> Any:
        try:
            status, payload = self._conns[i].recv()
        except (EOFError, ConnectionResetError) as e:
            raise self._died(i) from e
        if status == "error":
            self.close()
            raise RuntimeError(f"env worker {i} failed:\n{payload}")
        return payload

    def _died(self, i: int) -> RuntimeError:
        """Close the whole pool (no call may go on with the other workers' partial results)
        and return the error naming the dead worker and its exit code."""
        self._procs[i].join(timeout=2)
        code = self._procs[i].exitcode
        self.close()
        return RuntimeError(f"env worker {i} (pid {self._procs[i].pid}) died (exit code {code}); "
                            "the pool is closed: its envs' episodes are lost, so training / "
                            "evaluation cannot continue on this pool")

    def call(self, method: str, args: Sequence[tuple] | None = None,
             kwargs: Sequence[dict] | None = None,
             indices: Sequence[int] | None = None) -> list[Any]:
        """Call ``method(*args[j], **kwargs[j])`` on worker ``indices[j]`` (default: all);
        return the results in order."""
        idx = list(range(self.size)) if indices is None else list(indices)
        args = [()] * len(idx) if args is None else list(args)
        kwargs = [{}] * len(idx) if kwargs is None else list(kwargs)
        if not (len(args) == len(kwargs) == len(idx)):
            raise ValueError("args / kwargs must have one entry per called worker")
        if self._closed:
            raise RuntimeError(f"env pool is closed (a worker died or close() was called); "
                               f"cannot call {method!r}")
        if self.in_process:
            return [getattr(self._objs[i], method)(*a, **k) for i, a, k in zip(idx, args, kwargs)]
        for i, a, k in zip(idx, args, kwargs):
            try:
                self._conns[i].send(("call", method, tuple(a), dict(k)))
            except (BrokenPipeError, ConnectionResetError, OSError) as e:
                raise self._died(i) from e
        return [self._recv(i) for i in idx]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.in_process:
            for o in self._objs:
                if hasattr(o, "close"):
                    o.close()
            return
        for c, p in zip(self._conns, self._procs):
            try:
                if p.is_alive():
                    c.send(("close", None, (), {}))
                    c.poll(10) and c.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            c.close()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------
# Several slots per worker process
# --------------------------------------------------------------------------------------------

class SlotGroup:
    """``num_slots`` objects made by ``slot_factory``, in one process: ``call(method, items)``
    runs ``slot[j].method(*args)`` for each ``(j, args)`` of ``items`` in a loop."""

    def __init__(self, slot_factory: Callable[[], Any], num_slots: int):
        self.slots = [slot_factory() for _ in range(num_slots)]

    def call(self, method: str, items: Sequence[tuple[int, tuple]]) -> list[Any]:
        return [getattr(self.slots[j], method)(*a) for j, a in items]

    def close(self) -> None:
        for s in self.slots:
            if hasattr(s, "close"):
                s.close()


class GroupedSlotPool:
    """The ``call`` / ``size`` / ``close`` interface of :class:`SubprocEnvPool` over
    ``num_slots`` slots held by ``num_workers`` :class:`SlotGroup` s (contiguous blocks), for
    simulators whose worker process costs more memory than its env (a LIBERO worker holds ~1.6
    GB of imports against ~0.3 GB per env: 20 one-slot workers do not fit 24 GB).
    ``num_workers=0``: one group in this process.  A call sends one message per worker (its
    slots' arguments together), so the workers step their blocks in parallel; a dead worker
    closes the pool and raises, as in :class:`SubprocEnvPool`."""

    def __init__(self, slot_factory: Callable[[], Any], num_slots: int, num_workers: int,
                 env_vars: dict[str, str] | None = None, start_method: str = "spawn"):
        if num_slots < 1 or num_workers < 0:
            raise ValueError(f"need num_slots >= 1 and num_workers >= 0, got {num_slots}, "
                             f"{num_workers}")
        self.size = num_slots
        parts = max(1, min(num_workers, num_slots))
        blocks = np.array_split(np.arange(num_slots), parts)
        self.owner = np.concatenate([np.full(len(b), w) for w, b in enumerate(blocks)])
        self.local = np.concatenate([np.arange(len(b)) for b in blocks])
        factories = [functools.partial(SlotGroup, slot_factory, len(b)) for b in blocks]
        self.pool = SubprocEnvPool(factories, in_process=num_workers == 0, env_vars=env_vars,
                                   start_method=start_method)
        #: which slot serves each row (``call``'s indices are rows; Meta-World remaps them)
        self.slot_of_row = np.arange(num_slots)

    def call(self, method: str, args: Sequence[tuple] | None = None,
             indices: Sequence[int] | None = None) -> list[Any]:
        rows = range(self.size) if indices is None else indices
        idx = [int(self.slot_of_row[int(i)]) for i in rows]
        args = [()] * len(idx) if args is None else list(args)
        per_worker: dict[int, list[tuple[int, tuple]]] = {}
        where: dict[int, list[int]] = {}
        for k, (i, a) in enumerate(zip(idx, args)):
            w = int(self.owner[i])
            per_worker.setdefault(w, []).append((int(self.local[i]), tuple(a)))
            where.setdefault(w, []).append(k)
        workers = sorted(per_worker)
        outs = self.pool.call("call", args=[(method, per_worker[w]) for w in workers],
                              indices=workers)
        result: list[Any] = [None] * len(idx)
        for w, out in zip(workers, outs):
            for k, o in zip(where[w], out):
                result[k] = o
        return result

    def close(self) -> None:
        self.pool.close()


# --------------------------------------------------------------------------------------------
# Batched env over a pool of slots
# --------------------------------------------------------------------------------------------


class PoolBatchedEnv(BatchedEnv):
    """pirl episode bookkeeping over a :class:`SubprocEnvPool` of single-env slots.

    Each slot object implements ``reset(task_index, init_index, seed) -> {"images", "state"}``
    and ``step(action) -> (obs, reward, success)`` with numpy values.  This class stacks them,
    counts steps against ``max_episode_steps``, and implements auto-reset / frozen-when-done.
    A slot's ``init_index`` is ``episode_seed % seed_space`` (LIBERO: its 50 fixed init states;
    Meta-World / ManiSkill pass 1 and seed the slot with ``seed``); new episode seeds are drawn
    from ``seed_range``.
    """

    def __init__(self, pool: SubprocEnvPool, task_names: list[str], instructions: list[str],
                 action_dim: int, state_dim: int, max_episode_steps: int,
                 auto_reset: bool = False, seed_space: int = 1,
                 seed_range: tuple[int, int] = (0, 2**31 - 1)):
        self.pool = pool
        self.num_envs = pool.size
        self.task_names = list(task_names)
        self.instructions = list(instructions)
        self.action_dim = action_dim
        self.state_dim = state_dim
        self.max_episode_steps = max_episode_steps
        self.auto_reset = auto_reset
        self.seed_space = seed_space
        self.seed_range = seed_range
        n = self.num_envs
        self._task_ids = torch.zeros(n, dtype=torch.long)
        self._episode_seeds = torch.zeros(n, dtype=torch.long)
        self._elapsed = torch.zeros(n, dtype=torch.long)
        self._return = torch.zeros(n)
        self._done = torch.zeros(n, dtype=torch.bool)
        self._terminated = torch.zeros(n, dtype=torch.bool)
        self._truncated = torch.zeros(n, dtype=torch.bool)
        self._buf: dict[str, np.ndarray] = {}  # "images" [N, C, 3, H, W] (optional), "state"
        self._rng = np.random.default_rng(0)

    # -- helpers -----------------------------------------------------------------------------
    def _obs(self) -> Obs:
        obs: Obs = {k: torch.from_numpy(v.copy()) for k, v in self._buf.items()}
        return {**obs,
                "instruction": [self.instructions[int(t)] for t in self._task_ids],
                "task_id": self._task_ids.clone()}

    def _store(self, i: int, o: dict[str, np.ndarray]) -> None:
        for k, v in o.items():
            if k not in self._buf:
                self._buf[k] = np.zeros((self.num_envs, *v.shape), v.dtype)
            self._buf[k][i] = v

    def _reset_args(self, task: int, seed: int) -> tuple:
        """A slot's ``reset`` arguments for an episode of ``task`` from episode ``seed``:
        (task index, init-state index ``seed % seed_space``, seed)."""
        return int(task), int(seed) % self.seed_space, int(seed)

    def _slot_reset_args(self, i: int) -> tuple:
        """Arguments of slot ``i``'s ``reset``: (task index, init-state index, seed)."""
        return self._reset_args(self._task_ids[i], self._episode_seeds[i])

    def _reset_slots(self, idx: list[int]) -> None:
        outs = self.pool.call("reset", args=[self._slot_reset_args(i) for i in idx],
                              indices=idx)
        for i, o in zip(idx, outs):
            self._store(i, o)
        t = torch.tensor(idx, dtype=torch.long)
        self._elapsed[t] = 0
        self._return[t] = 0.0
        self._done[t] = False
        self._terminated[t] = False
        self._truncated[t] = False

    # -- API ---------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, task_ids: torch.Tensor | None = None,
              episode_seeds: torch.Tensor | None = None) -> Obs:
        """Reset all slots.  ``task_ids [N]`` / ``episode_seeds [N]`` default to draws from
        ``seed`` (tasks uniformly over :attr:`task_names`)."""
        self._rng = np.random.default_rng(seed)
        n = self.num_envs
        if task_ids is None:
            task_ids = torch.from_numpy(self._rng.integers(0, len(self.task_names), n))
        if episode_seeds is None:
            episode_seeds = torch.from_numpy(self._rng.integers(*self.seed_range, n))
        self._task_ids = torch.as_tensor(task_ids, dtype=torch.long).clone()
        self._episode_seeds = torch.as_tensor(episode_seeds, dtype=torch.long).clone()
        if self._task_ids.shape != (n,) or self._episode_seeds.shape != (n,):
            raise ValueError(f"task_ids / episode_seeds must have shape [{n}]")
        self._reset_slots(list(range(n)))
        return self._obs()

    def step(self, action: torch.Tensor) -> Step:
        """``action [N, A]``; frozen (done, no auto-reset) slots are not stepped."""
        n = self.num_envs
        if tuple(action.shape) != (n, self.action_dim):
            raise ValueError(f"action must have shape [num_envs={n}, action_dim="
                             f"{self.action_dim}], got {list(action.shape)}")
        act = action.detach().to("cpu", torch.float64).numpy()
        live = [i for i in range(n) if not bool(self._done[i])]
        reward = torch.zeros(n)
        success = torch.zeros(n, dtype=torch.bool)
        outs = self.pool.call("step", args=[(act[i],) for i in live],
                              indices=live)
        for i, (o, r, s) in zip(live, outs):
            self._store(i, o)
            reward[i] = r
            success[i] = s
        live_t = torch.tensor(live, dtype=torch.long)
        self._elapsed[live_t] += 1
        self._return += reward
        self._terminated |= success
        timeout = (self._elapsed[live_t] >= self.max_episode_steps) & ~success[live_t]
        self._truncated[live_t] |= timeout
        self._done = self._terminated | self._truncated
        terminated, truncated = self._terminated.clone(), self._truncated.clone()
        info: dict[str, Any] = {"success": success}
        if self.auto_reset and bool(self._done.any()):
            info["final_obs"] = self._obs()
            info["episode_success"] = self._terminated.clone()
            info["episode_return"] = self._return.clone()
            finished = self._done.nonzero().flatten().tolist()
            self._episode_seeds[finished] = torch.from_numpy(
                self._rng.integers(*self.seed_range, len(finished)))
            self._reset_slots(finished)
        return Step(obs=self._obs(), reward=reward, terminated=terminated,
                    truncated=truncated, info=info)

    def render(self) -> torch.Tensor:
        """First camera ``[N, 3, H, W]`` uint8."""
        if "images" not in self._buf:
            raise RuntimeError("render() needs image observations (this env has none)")
        return torch.from_numpy(self._buf["images"][:, 0].copy())

    def close(self) -> None:
        self.pool.close()
