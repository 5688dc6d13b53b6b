"""Video grids: tiling layout and files that read back."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from pirl.envs.tabletop import TabletopEnv
from pirl.envs.video import tile_frames, write_video_grid


def test_tile_layout_places_each_episode_in_its_cell():
    t, n, h, w = 2, 5, 4, 6
    frames = torch.zeros(t, n, 3, h, w, dtype=torch.uint8)
    for i in range(n):
        frames[:, i] = 10 * (i + 1)
    grid = tile_frames(frames, ncols=3, pad=1)
    assert grid.shape == (t, 2 * (h + 1) + 1, 3 * (w + 1) + 1, 3)
    for i in range(n):
        r, c = divmod(i, 3)
        y, x = 1 + r * (h + 1), 1 + c * (w + 1)
        assert (grid[:, y:y + h, x:x + w] == 10 * (i + 1)).all()
    assert (grid[:, 0] == 255).all()  # padding


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_write_video_grid_from_env_frames(tmp_path, suffix):
    env = TabletopEnv(3, image_size=32)
    env.reset(seed=0)
    frames = [env.render().clone()]
    for _ in range(5):
        env.step(torch.rand(3, 3) * 2 - 1)
        frames.append(env.render().clone())
    path = write_video_grid(frames, tmp_path / f"grid{suffix}", fps=5, ncols=2, scale=2)
    assert path.exists() and path.stat().st_size > 0
    video = np.stack(imageio.mimread(path))
    assert video.shape[0] == 6
    expect = tile_frames(torch.stack(frames).repeat_interleave(2, 3).repeat_interleave(2, 4), 2,
                         multiple=16 if suffix == ".mp4" else 1)
    assert video.shape[1:3] == expect.shape[1:3]
    if suffix == ".gif":  # lossless palette for these few colours
        assert np.abs(video[..., :3].astype(int) - expect.astype(int)).max() <= 8
    else:  # lossy codec: close on average
        assert np.abs(video[..., :3].astype(float) - expect.astype(float)).mean() < 12
    with pytest.raises(ValueError):
        write_video_grid(frames, tmp_path / "x.avi")


def test_default_scale_enlarges_small_frames(tmp_path):
    frames = torch.randint(0, 255, (3, 2, 3, 32, 32), dtype=torch.uint8)
    path = write_video_grid(frames, tmp_path / "g.gif", ncols=2, pad=0)
    video = np.stack(imageio.mimread(path))
    assert video.shape[1:3] == (128, 256)  # 32 px cells upscaled x4
