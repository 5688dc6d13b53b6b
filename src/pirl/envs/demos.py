"""Scripted-expert demonstrations: generation, an on-disk layout, and SFT sample building.

Layout (LeRobotDataset-v3-like, parquet; images stored as raw uint8 arrays instead of videos)::

    DIR/meta/info.json                          # format, env + kwargs, fps, features, counts
    DIR/meta/tasks.parquet                      # task_index, task (instruction), task_name
    DIR/meta/episodes/chunk-000/file-000.parquet
        # episode_index, task_index, length, success, episode_seed,
        # dataset_from_index, dataset_to_index
    DIR/data/chunk-000/file-000.parquet         # one row per frame (see below)

Frame columns: ``index`` (global frame), ``episode_index``, ``frame_index``, ``timestamp``,
``task_index``, ``observation.state`` (float32[S]), ``action`` (float32[A]), ``next.reward``,
``next.done``, ``next.success`` and one ``observation.images.<camera>`` column per camera
(``top``, ``wrist``) holding the ``[3, H, W]`` uint8 image flattened (fixed-size list).
``task_index`` is the env's task id in the recorded split (``env.task_names[task_index]``).
Frame t holds the observation *before* action t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pirl.envs import env_key
from pirl.envs.demo_writer import CAMERA_NAMES, FORMAT, write_demo_folder  # noqa: F401


def _record_batch(env, expert, tasks: torch.Tensor, seeds: torch.Tensor) -> dict[str, Any]:
    """Run the expert on one batch of episodes (fixed horizon); return per-episode arrays."""
    n = env.num_envs
    k = tasks.shape[0]
    pad = n - k
    tasks_p = torch.cat([tasks, tasks[:1].expand(pad)]) if pad else tasks
    seeds_p = torch.cat([seeds, seeds[:1].expand(pad)]) if pad else seeds
    obs = env.reset(task_ids=tasks_p, episode_seeds=seeds_p)
    images, states, actions, rewards, successes = [], [], [], [], []
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(env.max_episode_steps):
        act = expert.act()
        if "images" in obs:
            images.append(obs["images"].cpu())
        states.append(obs["state"].cpu())
        actions.append(act.cpu())
        step = env.step(act)
        rewards.append(step.reward.cpu())
        successes.append(step.info["success"].cpu())
        done = step.done.cpu()
        obs = step.obs
        if bool(done.all()):
            break
    length = env.elapsed.cpu()[:k]
    success = torch.stack(successes).any(0)[:k]
    out = {"length": length, "success": success,
           "state": torch.stack(states, 1)[:k], "action": torch.stack(actions, 1)[:k],
           "reward": torch.stack(rewards, 1)[:k]}
    if images:
        out["images"] = torch.stack(images, 1)[:k]  # [K, T, C, 3, S, S]
    return out


def generate_demos(env_name: str = "tabletop", episodes_per_task: int = 4,
                   out_dir: str | Path = "demos", seed: int = 0, noise: float = 0.1,
                   split: str = "train", num_envs: int = 128, only_success: bool = True,
                   max_rounds: int = 10, env_kwargs: dict[str, Any] | None = None,
                   episodes: int | None = None, clearance: float | None = None) -> Path:
    """Record ``episodes_per_task`` scripted-expert episodes **per task** of ``split`` into
    ``out_dir`` (``episodes`` is an alias).

    ``env_kwargs`` go to :class:`~pirl.envs.tabletop.TabletopEnv` (use the training env's:
    ``task_families``, ``num_cameras``, ``image_size``, ``max_episode_steps`` ...).  The expert
    acts with Gaussian action noise of std ``noise``; ``clearance`` (None: the expert's default)
    is its push clearance beside the object.  With ``only_success`` failed episodes are
    dropped and retried with new seeds (up to ``max_rounds`` rounds), so every task gets
    ``episodes_per_task`` successful demos.  Deterministic given ``seed``.  Returns ``out_dir``.
    """
    if episodes is not None:
        episodes_per_task = episodes
    episodes = episodes_per_task
    base = env_key(env_name)
    if base.startswith("maniskill"):
        return _maniskill_demos(env_name, episodes_per_task, Path(out_dir), seed, split,
                                dict(env_kwargs or {}))
    if base == "metaworld":
        return _metaworld_demos(env_name, episodes_per_task, Path(out_dir), seed, split,
                                dict(env_kwargs or {}))
    if base == "libero":
        return _libero_demos(env_name, episodes_per_task, Path(out_dir), seed,
                             dict(env_kwargs or {}))
    if base != "tabletop":
        raise ValueError(f"scripted demos exist only for the 'tabletop', 'maniskill', "
                         f"'metaworld' and 'libero' envs, not {env_name!r}")
    from pirl.envs.tabletop import ScriptedExpert, TabletopEnv
    from pirl.envs.tabletop.expert import PUSH_CLEARANCE

    kwargs = dict(env_kwargs or {})
    kwargs.update(split=split, auto_reset=False)
    env = TabletopEnv(num_envs, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    expert = ScriptedExpert(env, noise=noise, generator=gen,
                            clearance=PUSH_CLEARANCE if clearance is None else clearance)
    num_tasks = len(env.tasks)
    kept: list[dict[str, Any]] = []
    need = torch.full((num_tasks,), episodes, dtype=torch.long)
    for _ in range(max_rounds):
        if int(need.sum()) == 0:
            break
        tasks = torch.repeat_interleave(torch.arange(num_tasks), need)
        seeds = torch.randint(2**31 - 1, (tasks.numel(),), generator=gen)
        for lo in range(0, tasks.numel(), num_envs):
            t, s = tasks[lo:lo + num_envs], seeds[lo:lo + num_envs]
            rec = _record_batch(env, expert, t, s)
            for i in range(t.numel()):
                ok = bool(rec["success"][i])
                if only_success and (not ok or need[t[i]] == 0):
                    continue
                if not only_success and need[t[i]] == 0:
                    continue
                need[t[i]] -= 1
                length = int(rec["length"][i])
                ep = {"task_index": int(t[i]), "episode_seed": int(s[i]), "success": ok,
                      "length": length}
                for key in ("state", "action", "reward", "images"):
                    if key in rec:
                        ep[key] = rec[key][i, :length]
                kept.append(ep)
    kept.sort(key=lambda e: (e["task_index"], e["episode_seed"]))
    meta = dict(env_name=env_name, env_kwargs=kwargs, seed=seed, noise=noise, split=split,
                episodes_per_task=episodes_per_task)
    if clearance is not None:
        meta["clearance"] = clearance
    return write_demo_folder(Path(out_dir), env, kept, meta)


def maniskill_demo_tasks(env_name: str, split: str = "train",
                         env_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The task list a ``maniskill*`` env of :func:`pirl.envs.make_env` runs (demo
    ``task_index`` values index it), without building the env."""
    from pirl.envs.maniskill import split_config

    kw = env_kwargs or {}
    base, _, rest = env_name.replace(":", "/").partition("/")
    if base in ("maniskill_multitask", "maniskill-multitask"):
        tasks = kw.get("tasks") or split_config(kw.get("split", rest or split))[0]
    elif base == "maniskill":
        tasks = kw.get("tasks", rest or "PickCube-v1")
    else:
        raise ValueError(f"not a ManiSkill env name: {env_name!r}")
    return [tasks] if isinstance(tasks, str) else list(tasks)


def _maniskill_demos(env_name: str, episodes_per_task: int, out: Path, seed: int, split: str,
                     env_kwargs: dict[str, Any]) -> Path:
    """ManiSkill motion-planning demos (``generate_maniskill_demos``) recorded with the
    training env's observation settings (``obs_mode``, ``control_mode``, ``image_size``,
    ``wrist_camera``).  Action noise does not apply: the demos are planned."""
    from pirl.envs.maniskill_demos import generate_maniskill_demos

    tasks = maniskill_demo_tasks(env_name, split, env_kwargs)
    kw = {k: env_kwargs[k] for k in ("obs_mode", "control_mode", "image_size", "wrist_camera")
          if k in env_kwargs}
    path, stats = generate_maniskill_demos(tasks, episodes_per_task, out, seed=seed, **kw)
    for t, st in stats.items():
        print(f"maniskill demos {t}: {st}")
    return Path(path)


def _metaworld_demos(env_name: str, episodes_per_task: int, out: Path, seed: int, split: str,
                     env_kwargs: dict[str, Any]) -> Path:
    """Meta-World scripted-policy demos (``generate_metaworld_demos``) recorded with the
    training env's observation settings (``obs_mode``, ``image_size``, ``camera``,
    ``state_features``) and time
    limit.  Action noise does not apply: the scripted policies act as they are."""
    from pirl.envs.metaworld import DEFAULT_MAX_STEPS
    from pirl.envs.metaworld_scripted import demo_tasks, generate_metaworld_demos

    tasks = demo_tasks(env_name, env_kwargs, split)
    kw = {k: env_kwargs[k] for k in ("obs_mode", "image_size", "camera", "state_features")
          if k in env_kwargs}
    kw["max_episode_steps"] = env_kwargs.get("max_episode_steps") or DEFAULT_MAX_STEPS
    path, _ = generate_metaworld_demos(tasks, episodes_per_task, out, seed=seed, **kw)
    return Path(path)


def _libero_demos(env_name: str, episodes_per_task: int, out: Path, seed: int,
                  env_kwargs: dict[str, Any]) -> Path:
    """LIBERO scripted-expert demos (``generate_libero_demos``; the pick-and-place suites
    libero_spatial and libero_object) with the state observation of the training env, from
    the fixed initial states ``seed % 50, seed % 50 + 1, ...`` (so that they can avoid the
    first ones, which evaluation uses), up to 10 attempts per task.  A task where the expert
    succeeds fewer times keeps what it got (printed; the expert's table:
    docs/benchmarks/libero.md).  Action noise does not apply."""
    from pirl.envs.libero import NUM_INIT_STATES, suite_from_env_name, suite_tasks
    from pirl.envs.libero_expert import EXPERT_SUITES, generate_libero_demos

    kw = dict(env_kwargs)
    suite = suite_from_env_name(env_name, kw.pop("suite", None))
    if suite not in EXPERT_SUITES:
        raise ValueError(f"the LIBERO scripted expert covers {EXPERT_SUITES}, not {suite!r}")
    if kw.get("obs_mode", "image") != "state":
        raise ValueError("LIBERO demos record the state observation (the expert runs without "
                         "rendering): set env.kwargs.obs_mode=state")
    tasks = kw.get("task_indices")
    if tasks is not None and list(tasks) != list(range(len(suite_tasks(suite)))):
        raise ValueError(f"LIBERO demos for `pirl train` cover the whole suite (their task "
                         f"index is the suite's); env.kwargs.task_indices={list(tasks)}")
    counts: dict[int, int] = {}
    path = generate_libero_demos(suite, episodes_per_task, out, seed=seed,
                                 processes=2 if kw.get("processes", True) else 0,
                                 init_offset=seed % NUM_INIT_STATES,
                                 max_attempts_per_task=10,
                                 min_episodes_per_task=0, counts=counts,
                                 state_features=kw.get("state_features", "raw"))
    short = {t: c for t, c in counts.items() if c < episodes_per_task}
    print(f"libero demos {suite}: {sum(counts.values())} episodes, per task {counts}"
          + (f"; fewer than {episodes_per_task} for tasks {sorted(short)}" if short else ""))
    return Path(path)


@dataclass
class DemoDataset:
    """Demonstrations in memory (frame-major tensors).

    images: ``[F, C, 3, S, S]`` uint8 or None; state: ``[F, S]``; actions: ``[F, A]``;
    reward: ``[F]``; episode_index / frame_index / task_index: ``[F]`` int64;
    ep_task / ep_start / ep_length / ep_success / ep_seed: ``[E]`` per episode;
    instructions / task_names: per task index.
    """

    images: torch.Tensor | None
    state: torch.Tensor
    actions: torch.Tensor
    reward: torch.Tensor
    episode_index: torch.Tensor
    frame_index: torch.Tensor
    task_index: torch.Tensor
    ep_task: torch.Tensor
    ep_start: torch.Tensor
    ep_length: torch.Tensor
    ep_success: torch.Tensor
    ep_seed: torch.Tensor
    instructions: list[str]
    task_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.state.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.ep_task.shape[0])

    def episodes_per_task(self) -> dict[int, int]:
        """``{task_index: number of episodes}`` for the tasks present."""
        t, c = self.ep_task.unique(return_counts=True)
        return dict(zip(t.tolist(), c.tolist()))

    def select_episodes(self, episodes: torch.Tensor | list[int]) -> "DemoDataset":
        """A new dataset with only the given episodes (renumbered in the given order)."""
        episodes = torch.as_tensor(episodes, dtype=torch.long)
        spans = [torch.arange(int(self.ep_start[e]), int(self.ep_start[e] + self.ep_length[e]))
                 for e in episodes.tolist()]
        frames = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        lengths = self.ep_length[episodes]
        starts = torch.cumsum(lengths, 0) - lengths
        return DemoDataset(
            images=None if self.images is None else self.images[frames],
            state=self.state[frames], actions=self.actions[frames], reward=self.reward[frames],
            episode_index=torch.repeat_interleave(torch.arange(episodes.numel()), lengths),
            frame_index=self.frame_index[frames], task_index=self.task_index[frames],
            ep_task=self.ep_task[episodes], ep_start=starts, ep_length=lengths,
            ep_success=self.ep_success[episodes], ep_seed=self.ep_seed[episodes],
            instructions=self.instructions, task_names=self.task_names, info=self.info)

    def few_shot(self, k: int, seed: int | None = None) -> "DemoDataset":
        """K episodes per task (the first K in file order, or K random ones given ``seed``)."""
        chosen = []
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for t in sorted(self.episodes_per_task()):
            eps = (self.ep_task == t).nonzero()[:, 0]
            if gen is not None:
                eps = eps[torch.randperm(eps.numel(), generator=gen)]
            chosen.append(eps[:k])
        return self.select_episodes(torch.cat(chosen) if chosen else [])

    def action_chunks(self, frames: torch.Tensor, horizon: int,
                      pad: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        """Action chunks starting at ``frames [B]``: ``actions[t : t + H]`` of the same episode,
        padded past the episode end with the episode's last action (``pad="last"``) or zeros
        (``pad="zero"``).  Returns ``(chunks [B, H, A], mask [B, H] bool: real steps)``."""
        if pad not in ("last", "zero"):
            raise ValueError(f"pad must be 'last' or 'zero', got {pad!r}")
        ep = self.episode_index[frames]
        end = self.ep_start[ep] + self.ep_length[ep]  # exclusive
        idx = frames[:, None] + torch.arange(horizon)[None, :]
        mask = idx < end[:, None]
        idx = torch.minimum(idx, (end - 1)[:, None])
        chunks = self.actions[idx]
        if pad == "zero":
            chunks = chunks * mask[..., None]
        return chunks, mask

    def observations(self, frames: torch.Tensor) -> dict[str, Any]:
        """Batched observation dict (the env's format) of ``frames [B]``."""
        obs: dict[str, Any] = {"state": self.state[frames], "task_id": self.task_index[frames],
                               "instruction": [self.instructions[t]
                                               for t in self.task_index[frames].tolist()]}
        if self.images is not None:
            obs["images"] = self.images[frames]
        return obs

    def sft_samples(self, horizon: int, pad: str = "last", frames: torch.Tensor | None = None,
                    episodes_per_task: int | None = None) -> "SFTSamples":
        """SFT samples ``(obs, actions [B, H, A], mask [B, H])`` for ``frames`` (default: every
        frame; with ``episodes_per_task=K`` every frame of the first K episodes of each task)."""
        ds = self if episodes_per_task is None else self.few_shot(episodes_per_task)
        frames = torch.arange(len(ds)) if frames is None else frames
        chunks, mask = ds.action_chunks(frames, horizon, pad)
        return SFTSamples(ds.observations(frames), chunks, mask)

    def sample_batch(self, batch_size: int, horizon: int, generator: torch.Generator | None = None,
                     pad: str = "last") -> "SFTSamples":
        """A uniformly random minibatch of SFT samples (frames drawn with replacement)."""
        frames = torch.randint(len(self), (batch_size,), generator=generator)
        return self.sft_samples(horizon, pad, frames)


class SFTSamples(NamedTuple):
    """A batch of SFT samples: obs dict (``images [B, C, 3, S, S]``, ``state [B, S]``,
    ``instruction``, ``task_id [B]``), ``actions [B, H, A]``, ``mask [B, H]`` bool (True on
    real, non-padded steps)."""

    obs: dict[str, Any]
    actions: torch.Tensor
    mask: torch.Tensor


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def load_demos(path: str | Path) -> DemoDataset:
    """Load a demo folder written by :func:`generate_demos`."""
    path = Path(path)
    info = json.loads((path / "meta" / "info.json").read_text())
    data = pq.read_table(path / info["data_path"])
    eps = pq.read_table(path / info["episodes_path"])
    tasks = pq.read_table(path / "meta" / "tasks.parquet")
    t = lambda a, dt=None: torch.from_numpy(np.array(a)).to(dt) if dt else \
        torch.from_numpy(np.array(a))  # noqa: E731
    images = None
    if info["image_keys"]:
        cams = [_column(data, k).reshape(data.num_rows, *info["features"][k]["shape"])
                for k in info["image_keys"]]
        images = t(np.stack(cams, 1))
    return DemoDataset(
        images=images,
        state=t(_column(data, "observation.state"), torch.float32),
        actions=t(_column(data, "action"), torch.float32),
        reward=t(_column(data, "next.reward"), torch.float32),
        episode_index=t(_column(data, "episode_index"), torch.long),
        frame_index=t(_column(data, "frame_index"), torch.long),
        task_index=t(_column(data, "task_index"), torch.long),
        ep_task=t(_column(eps, "task_index"), torch.long),
        ep_start=t(_column(eps, "dataset_from_index"), torch.long),
        ep_length=t(_column(eps, "length"), torch.long),
        ep_success=t(_column(eps, "success"), torch.bool),
        ep_seed=t(_column(eps, "episode_seed"), torch.long),
        instructions=tasks.column("task").to_pylist(),
        task_names=tasks.column("task_name").to_pylist(), info=info)
