"""The sprite / label-map renderer against an independent per-pixel reference renderer."""

import math

import numpy as np
import pytest
import torch

from pirl.envs.tabletop import ScriptedExpert, TabletopEnv
from pirl.envs.tabletop import render as R

COLOURS = ["red", "green", "blue", "yellow"]


def _mix(c, o, w):
    return tuple(int(round((1 - w) * a + w * b)) for a, b in zip(c, o))


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in float64 at sprite-relative pixel centres (u right, v up)."""
    if shape == 0:  # cube
        return np.maximum(abs(u), abs(v)) <= R.CUBE_HALF
    if shape == 1:  # disc
        return u * u + v * v <= R.DISC_RADIUS ** 2
    r = R.TRIANGLE_RADIUS  # upward triangle: bottom edge and two sides
    return (v >= -r / 2) & (v <= r - math.sqrt(3) * abs(u))


def _claw_mask(closed: bool, u, v, ppu):
    spread = R.GRIPPER_FINGER_CLOSED if closed else R.GRIPPER_FINGER_OPEN
    w = max(R.GRIPPER_FINGER_WIDTH, 0.5 / ppu)
    fingers = (abs(abs(u) - spread) <= w) & (v >= -0.06) & (v <= 0.1)
    palm = (abs(u) <= spread + w) & (v >= 0.1 - 2 * w) & (v <= 0.1)
    return fingers | palm


def reference_frame(env: TabletopEnv, i: int, kind: str) -> list[list[set]]:
    """For every pixel, the set of colours the topmost thing there may have (fill or border)."""
    s = env.image_size
    hw = 1.0 if kind == "top" else R.WRIST_HALF_WIDTH
    ppu = s / (2 * hw)
    g = env.gripper[i].double().numpy()
    cx, cy = (0.0, 0.0) if kind == "top" else (g[0], g[1])
    rr, cc = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    x = cx + ((cc + 0.5) / s * 2 - 1) * hw
    y = cy - ((rr + 0.5) / s * 2 - 1) * hw
    out = np.empty((s, s), dtype=object)
    off = (abs(x) > 1) | (abs(y) > 1)
    edge = (abs(x) > R.EDGE_ZONE) | (abs(y) > R.EDGE_ZONE)
    for r in range(s):
        for c in range(s):
            bg = R.OUTSIDE_RGB if off[r, c] else (R.EDGE_RGB if edge[r, c] else R.TABLE_RGB)
            out[r, c] = {bg}

    def sprite_uv(px, py):  # sprite centred at the pixel containing (px, py), relative coords
        col0 = math.floor((px - cx + hw) * ppu + R.PIXEL_EPS)
        row0 = math.floor((hw - (py - cy)) * ppu + R.PIXEL_EPS)
        return (cc - col0) / ppu, -(rr - row0) / ppu

    def paint(mask, colours):
        for r, c in zip(*np.nonzero(mask)):
            out[r, c] = set(colours)

    for p in range(2):
        px, py = env.plate_pos[i, p].double().tolist()
        rgb = R.PALETTE[COLOURS[int(env.plate_colour[i, p])]]
        cols = {_mix(rgb, (255, 255, 255), 0.6), _mix(rgb, (0, 0, 0), 0.1)}
        if kind == "top":
            u, v = sprite_uv(px, py)
            paint(np.maximum(abs(u), abs(v)) <= R.PLATE_HALF, cols)
        else:  # the wrist camera draws plates analytically at their exact position
            paint((abs(x - px) <= R.PLATE_HALF) & (abs(y - py) <= R.PLATE_HALF), cols)
    held = int(env.held[i])
    order = [j for j in range(3) if j != held] + ([held] if held >= 0 else [])
    for j in order:
        px, py = env.obj_pos[i, j].double().tolist()
        rgb = R.PALETTE[COLOURS[int(env.obj_colour[i, j])]]
        u, v = sprite_uv(px, py)
        paint(_shape_mask(int(env.obj_shape[i, j]), u, v), {rgb, _mix(rgb, (0, 0, 0), 0.55)})
    u, v = sprite_uv(g[0], g[1])
    closed = bool(env.closed[i])
    paint(_claw_mask(closed, u, v, ppu), {R.GRIPPER_CLOSED_RGB if closed else R.GRIPPER_OPEN_RGB})
    return out


@pytest.mark.parametrize("size,n", [(64, 12), (48, 8), (96, 3)])
def test_renderer_matches_reference(size, n):
    env = TabletopEnv(n, num_cameras=2, image_size=size, split="all",
                      task_families=("pick_place", "push", "stack"))
    env.reset(seed=5)
    expert = ScriptedExpert(env, noise=0.3, generator=torch.Generator().manual_seed(0))
    for _ in range(9):  # objects moved, some grasped, grippers open and closed
        env.step(expert.act())
    env.gripper[0] = torch.tensor([1.0, -1.0])  # clipped at the corner of the top view
    env.obj_pos[1, 2] = torch.tensor([0.9, 0.9])
    images = env.render_cameras()
    assert bool((env.held >= 0).any()) and bool(env.closed.any()) and bool((~env.closed).any())
    for i in range(env.num_envs):
        for c, kind in enumerate(("top", "wrist")):
            ref = reference_frame(env, i, kind)
            img = images[i, c].permute(1, 2, 0).numpy()
            bad = sum(tuple(int(a) for a in img[r, q]) not in ref[r, q]
                      for r in range(size) for q in range(size))
            assert bad == 0, (i, kind, bad)
