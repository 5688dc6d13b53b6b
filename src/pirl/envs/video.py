"""Rollout videos: tile a batch of episodes into a grid and write an .mp4 or .gif."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def tile_frames(frames: torch.Tensor, ncols: int | None = None, pad: int = 2,
                pad_value: int = 255, multiple: int = 1) -> np.ndarray:
    """Tile ``frames [T, N, 3, H, W]`` uint8 into a video ``[T, H', W', 3]`` uint8 grid of
    ``ncols`` columns (default ``ceil(sqrt(N))``) with ``pad`` pixels between cells; the output
    size is rounded up to a multiple of ``multiple`` (video codecs want even sizes)."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [T, N, 3, H, W], got {list(frames.shape)}")
    t, n, _, h, w = frames.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    gh, gw = nrows * (h + pad) + pad, ncols * (w + pad) + pad
    gh, gw = -(-gh // multiple) * multiple, -(-gw // multiple) * multiple
    grid = np.full((t, gh, gw, 3), pad_value, dtype=np.uint8)
    arr = frames.detach().to("cpu", torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # [T,N,H,W,3]
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y:y + h, x:x + w] = arr[:, i]
    return grid


def write_video_grid(frames: list[torch.Tensor] | torch.Tensor, path: str | Path, fps: int = 10,
                     ncols: int | None = None, scale: int | None = None, pad: int = 2) -> Path:
    """Write a grid video of a batch of episodes.

    frames: a list of T tensors ``[N, 3, H, W]`` uint8 (one per step, e.g. ``ChunkStep.frames``)
    or a tensor ``[T, N, 3, H, W]``; path: ``.mp4`` (H.264 via imageio-ffmpeg) or ``.gif``;
    scale: integer nearest-neighbour upscaling of every frame (default: enough to make cells at
    least 128 pixels high, for small sim images).  Returns path.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames to write")
        frames = torch.stack([f.detach().cpu() for f in frames])
    if scale is None:
        scale = max(1, 128 // frames.shape[-2])
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    import imageio.v2 as imageio

    if suffix == ".gif":
        video = tile_frames(frames, ncols, pad)
        imageio.mimsave(path, list(video), duration=1000.0 / fps, loop=0)
    elif suffix == ".mp4":
        video = tile_frames(frames, ncols, pad, multiple=16)
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8,
                                macro_block_size=16) as writer:
            for frame in video:
                writer.append_data(frame)
    else:
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4 or .gif")
    return path
