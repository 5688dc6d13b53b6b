"""The writer of pirl's demo folders (the layout is described in :mod:`pirl.envs.demos`).

It sits below every module that records demos (the tabletop expert in :mod:`pirl.envs.demos`,
ManiSkill's motion planner, Meta-World's scripted policies), so that none of them imports
another to write its episodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

CAMERA_NAMES = ("top", "wrist")
FORMAT = "pirl-demos/v1 (LeRobotDataset v3-like)"


def _fixed_list(arr: np.ndarray, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = arr.reshape(arr.shape[0], -1)
    values = pa.array(flat.reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(values, flat.shape[1])


def write_demo_folder(out: Path, env, episodes: list[dict[str, Any]],
                      meta: dict[str, Any]) -> Path:
    """Write ``episodes`` (dicts with ``task_index``, ``episode_seed``, ``success``, ``length``,
    ``state [T, S]``, ``action [T, A]``, ``reward [T]`` and optionally ``images [T, C, 3, S, S]``)
    into ``out`` in pirl's demo layout.  ``env``: anything with ``state_dim``, ``action_dim``,
    ``tasks``, ``task_names``, ``instructions`` and ``max_episode_steps``; ``meta`` goes into
    ``meta/info.json``.  Returns ``out``."""
    (out / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    (out / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
    fps = 10
    lengths = [e["length"] for e in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if episodes else \
        np.zeros(0, np.int64)
    total = int(sum(lengths))
    cat = lambda key: torch.cat([e[key] for e in episodes]).numpy() if episodes else None  # noqa
    ep_index = np.repeat(np.arange(len(episodes)), lengths).astype(np.int64)
    frame_index = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64) \
        if episodes else np.zeros(0, np.int64)
    task_index = np.repeat([e["task_index"] for e in episodes], lengths).astype(np.int64)
    done = frame_index == np.repeat(np.array(lengths) - 1, lengths)
    succ = done & np.repeat([e["success"] for e in episodes], lengths).astype(bool)
    columns: dict[str, pa.Array] = {
        "index": pa.array(np.arange(total, dtype=np.int64)),
        "episode_index": pa.array(ep_index), "frame_index": pa.array(frame_index),
        "timestamp": pa.array((frame_index / fps).astype(np.float32)),
        "task_index": pa.array(task_index),
        "observation.state": _fixed_list(cat("state").astype(np.float32), pa.float32()),
        "action": _fixed_list(cat("action").astype(np.float32), pa.float32()),
        "next.reward": pa.array(cat("reward").astype(np.float32)),
        "next.done": pa.array(done), "next.success": pa.array(succ),
    }
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": [env.state_dim]},
        "action": {"dtype": "float32", "shape": [env.action_dim]},
    }
    image_keys = []
    if episodes and "images" in episodes[0]:
        images = cat("images")  # [F, C, 3, S, S]
        for c in range(images.shape[1]):
            key = f"observation.images.{CAMERA_NAMES[c]}"
            image_keys.append(key)
            columns[key] = _fixed_list(images[:, c], pa.uint8())
            features[key] = {"dtype": "uint8", "shape": list(images.shape[2:]),
                             "names": ["channel", "height", "width"]}
    pq.write_table(pa.table(columns), out / "data" / "chunk-000" / "file-000.parquet",
                   compression="zstd")
    pq.write_table(pa.table({
        "episode_index": pa.array(np.arange(len(episodes), dtype=np.int64)),
        "task_index": pa.array(np.array([e["task_index"] for e in episodes], dtype=np.int64)),
        "length": pa.array(np.array(lengths, dtype=np.int64)),
        "success": pa.array(np.array([e["success"] for e in episodes], dtype=bool)),
        "episode_seed": pa.array(np.array([e["episode_seed"] for e in episodes], dtype=np.int64)),
        "dataset_from_index": pa.array(starts),
        "dataset_to_index": pa.array(starts + np.array(lengths, dtype=np.int64)),
    }), out / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({
        "task_index": pa.array(np.arange(len(env.tasks), dtype=np.int64)),
        "task": pa.array(env.instructions), "task_name": pa.array(env.task_names),
    }), out / "meta" / "tasks.parquet")
    info = {"format": FORMAT, "fps": fps, "total_episodes": len(episodes), "total_frames": total,
            "total_tasks": len(env.tasks), "image_keys": image_keys, "features": features,
            "data_path": "data/chunk-000/file-000.parquet",
            "episodes_path": "meta/episodes/chunk-000/file-000.parquet",
            "max_episode_steps": env.max_episode_steps, **meta}
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return out
