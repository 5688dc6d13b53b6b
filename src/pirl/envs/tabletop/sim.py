"""The tabletop benchmark: a vectorised 2-D pick / place / push / stack world in torch.

**World.**  A table ``[-1, 1]^2`` (x right, y up) seen from above, with two coloured plates, three
objects (cube / disc / triangle in red / green / blue / yellow: the task's object plus two
distractors, one sharing its colour and one its shape, so that every word of the instruction
matters) and a gripper at table height.

**Control.**  ``action [N, 3] = (dx, dy, grip)`` in ``[-1, 1]``: the gripper moves by
``max_speed * (dx, dy)`` (clipped to the table) and is closed while ``grip > 0``.

**Contact rules** (one step, in this order):

1. *Release*: opening the gripper drops the held object where it is.
2. *Move*: the gripper moves; a held object moves with it (gripper and object are lifted while
   carrying, so they touch nothing).
3. *Push*: an empty gripper (open or closed, radius :data:`GRIPPER_RADIUS`, at table height)
   pushes every object it moves into: an object that was ahead of the gripper and ends up closer
   than :data:`CONTACT_DISTANCE` slides along the gripper's motion direction (no sideways slip,
   like a high-friction contact) until it is at that distance again.  Objects do not collide
   with each other (they may overlap) and stay within ``|x|, |y| <= OBJECT_LIMIT``.
4. *Grasp*: closing the gripper (open -> closed) grasps the nearest free object within
   :data:`GRASP_RADIUS` of it (an object it touches); the object is lifted into the claw
   (snapped to the gripper centre).  Closing with nothing in reach grasps nothing: the gripper
   must open and close again.

**Success** (sparse reward 1, episode terminates): *pick_place*: the object is released with its
centre on the named plate; *push*: the object rests (not held) in the named edge zone
(``coordinate beyond EDGE_ZONE``); *stack*: the object is released within :data:`STACK_TOLERANCE`
of the named cube's centre.  Episodes are truncated after ``max_episode_steps`` (default 48 = six
chunks of 8).  ``reward="dense"`` adds potential-based shaping ``dense_scale * (phi' - phi)`` with
``phi = -(gripper-to-object distance while not held + object-to-goal distance)``;
``reward="progress"`` the same with ``phi = -(object-to-goal distance)`` only (no pull towards
the object: a push must go around it first).

**Randomness.**  The initial state of an episode is a pure function of ``(task, episode seed)``
computed with a counter-based integer hash (vectorised, identical on every device and for any
batch position); the episode seeds and tasks themselves are drawn from a ``torch.Generator``
seeded by :meth:`reset`.  The global RNG is never used.

Observation dict: ``images [N, C, 3, S, S]`` uint8 (camera 0: top view of the whole table, camera 1
if ``num_cameras=2``: a gripper-centred "wrist" view), ``state [N, 4]`` float32
``(x, y, closed, holding)``, ``instruction`` list of N strings, ``task_id [N]`` int64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pirl.envs.base import BatchedEnv, Step
from pirl.envs.tabletop.render import (DISC_RADIUS, EDGE_ZONE, GRIPPER_RADIUS, Camera)
from pirl.envs.tabletop.tasks import (COLOURS, DEFAULT_FAMILIES, EDGE_DIRECTIONS, FAMILIES, SHAPES,
                                      TaskSpec, build_tasks)

NUM_OBJECTS = 3
NUM_PLATES = 2
MAX_SPEED = 0.1
OBJECT_RADIUS = DISC_RADIUS  # contact radius of every object shape
CONTACT_DISTANCE = GRIPPER_RADIUS + OBJECT_RADIUS  # 0.2
GRASP_RADIUS = 0.25
OBJECT_LIMIT = 0.88
STACK_TOLERANCE = 0.07
PLATE_SUCCESS_HALF = 0.2  # object centre within this (Chebyshev) distance of the plate centre

# Initial layout: items are placed in distinct cells of a 3 x 3 grid, jittered.
_CELL = 0.6
_JITTER = 0.12
_NUM_UNIFORMS = 32
_PARKED = 10.0  # coordinate of absent objects (far off the table and every camera)

FAMILY_PICK_PLACE, FAMILY_PUSH, FAMILY_STACK = (FAMILIES.index(f) for f in FAMILIES)

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 tensors holding values in ``[0, 2^32)`` without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), bijective on ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """Counter-based uniforms: ``[len(seeds), count]`` float32 in ``[0, 1)``, a pure function of
    each (int64, non-negative) seed; the same on every device and for every batch layout."""
    s = seeds.long()[:, None]
    lo, hi = s & _M32, (s >> 32) & _M32
    ctr = torch.arange(count, device=seeds.device, dtype=torch.long)[None, :]
    x = _mix32(lo ^ _mul32(ctr + 1, 0x9E3779B1))
    x = _mix32(x ^ _mix32(hi + 0x632BE5AB))
    x = _mix32(x + _mul32(ctr, 0x85EBCA77))
    return (x >> 8).float() * (1.0 / (1 << 24))


class TabletopEnv(BatchedEnv):
    """N tabletop episodes stepped together (see module docstring).

    Args:
        num_envs: N.
        split: ``"train"``, ``"ood"`` or ``"all"`` (see :mod:`pirl.envs.tabletop.tasks`).
        task_families: subset of ``("pick_place", "push", "stack")``.
        image_size: S, the side of every camera image.
        num_cameras: 1 (top view) or 2 (top view + gripper-centred wrist view); 0 for
            state-only observations (no ``images`` key).
        max_episode_steps: time limit (truncation).
        reward: ``"sparse"`` (1 on success), ``"dense"`` (plus potential shaping) or
            ``"progress"`` (plus the shaping of the object-to-goal distance alone).
        auto_reset: reset finished envs inside :meth:`step` (else freeze them until reset).
        resample_tasks: on auto-reset draw a new task uniformly (else keep each env's task).
        max_speed: gripper displacement per step at ``|action| = 1``.
        dense_scale: weight of the shaping term with ``reward="dense"`` / ``"progress"``.
        num_distractors: distractor objects per scene (2: one sharing the object's colour and
            one its shape; 1: only the same-shape one, told apart by colour; 0: none -- easier
            variants; absent objects are parked off the table and take no part in the
            dynamics).  stack scenes always keep their base cube.
        seed: seed of the generator used when :meth:`reset` gets no seed.
    """

    action_dim = 3
    state_dim = 4

    def __init__(self, num_envs: int = 64, split: str = "train",
                 task_families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES,
                 image_size: int = 64, num_cameras: int = 1, max_episode_steps: int = 48,
                 reward: str = "sparse", auto_reset: bool = False, resample_tasks: bool = True,
                 max_speed: float = MAX_SPEED, dense_scale: float = 0.5,
                 num_distractors: int = 2, seed: int = 0, device: str | torch.device = "cpu"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if num_cameras not in (0, 1, 2):
            raise ValueError(f"num_cameras must be 0, 1 or 2, got {num_cameras}")
        if reward not in ("sparse", "dense", "progress"):
            raise ValueError(f"reward must be 'sparse', 'dense' or 'progress', got {reward!r}")
        if num_distractors not in (0, 1, 2):
            raise ValueError(f"num_distractors must be 0, 1 or 2, got {num_distractors}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.num_envs = num_envs
        self.split = split
        self.task_families = tuple(task_families)
        self.tasks: list[TaskSpec] = build_tasks(split, self.task_families)
        if not self.tasks:
            raise ValueError(f"no tasks for split={split!r}, families={task_families}")
        self.task_names = [t.name for t in self.tasks]
        self.instructions = [t.instruction for t in self.tasks]
        self.image_size = image_size
        self.num_cameras = num_cameras
        self.max_episode_steps = max_episode_steps
        self.reward_type = reward
        self.auto_reset = auto_reset
        self.resample_tasks = resample_tasks
        self.max_speed = max_speed
        self.dense_scale = dense_scale
        self.num_distractors = num_distractors
        self.device = torch.device(device)
        dev = self.device

        self._task_family = torch.tensor([t.family_index for t in self.tasks], device=dev)
        self._task_colour = torch.tensor([t.colour for t in self.tasks], device=dev)
        self._task_shape = torch.tensor([t.shape for t in self.tasks], device=dev)
        self._task_target = torch.tensor([t.target for t in self.tasks], device=dev)
        self._edge_dirs = torch.tensor(EDGE_DIRECTIONS, device=dev)
        kinds = ["top", "wrist"][:num_cameras]
        self.cameras = [Camera(k, image_size, num_envs, dev) for k in kinds]
        # The camera behind render() (videos), also for state-only observations.
        self._video_camera = (self.cameras[0] if self.cameras
                              else Camera("top", image_size, num_envs, dev))
        grid = (-_CELL, 0.0, _CELL)
        self._cells = torch.tensor([(x, -y) for y in grid for x in grid], device=dev)
        self._slots = torch.arange(NUM_OBJECTS, device=dev)

        n = num_envs
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=dev)  # noqa: E731
        self.task_id = z(n, dtype=torch.long)
        self.episode_seed = z(n, dtype=torch.long)
        self.family = z(n, dtype=torch.long)
        self.goal_dir = z(n, 2)
        self.gripper = z(n, 2)
        self.closed = z(n, dtype=torch.bool)
        self.held = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.obj_pos = z(n, NUM_OBJECTS, 2)
        self.obj_shape = z(n, NUM_OBJECTS, dtype=torch.long)
        self.obj_colour = z(n, NUM_OBJECTS, dtype=torch.long)
        self.obj_active = torch.ones(n, NUM_OBJECTS, dtype=torch.bool, device=dev)
        self.plate_pos = z(n, NUM_PLATES, 2)
        self.plate_colour = z(n, NUM_PLATES, dtype=torch.long)
        self.elapsed = z(n, dtype=torch.long)
        self.episode_return = z(n)
        self.terminated = z(n, dtype=torch.bool)
        self.truncated = z(n, dtype=torch.bool)
        self._instruction: list[str] = [""] * n
        self._generator = torch.Generator().manual_seed(seed)
        self._obs: dict[str, Any] | None = None

    def vocabulary(self) -> list[str]:
        """Every word of every instruction of every family and split (sorted), so that a
        tokenizer built from it also covers OOD instructions."""
        from pirl.envs.tabletop.tasks import all_tasks

        return sorted({w for t in all_tasks() for w in t.instruction.split()})

    # ------------------------------------------------------------------ episode initialisation
    def sample_layout(self, task_ids: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Initial states for tasks ``task_ids [K]`` and episode seeds ``seeds [K]`` (a pure
        function of the pair).  Returns a dict of ``[K, ...]`` tensors named like the state."""
        dev = self.device
        task_ids, seeds = task_ids.to(dev).long(), seeds.to(dev).long()
        k = task_ids.shape[0]
        u = hash_uniform(seeds * 1009 + task_ids, _NUM_UNIFORMS)  # [K, 32]
        fam = self._task_family[task_ids]
        colour, shape, target = (self._task_colour[task_ids], self._task_shape[task_ids],
                                 self._task_target[task_ids])
        nc, ns = len(COLOURS), len(SHAPES)
        pick = lambda col, m: (u[:, col] * m).long().clamp_max(m - 1)  # noqa: E731

        # Objects: slot 0 the task object; pick_place / push: slot 1 same colour other shape,
        # slot 2 same shape other colour.  stack: slot 1 the base cube (colour = target),
        # slot 2 same shape as the object, colour different from both.
        obj_colour = torch.stack([colour, colour, (colour + 1 + pick(0, nc - 1)) % nc], 1)
        obj_shape = torch.stack([shape, (shape + 1 + pick(1, ns - 1)) % ns, shape], 1)
        is_stack = fam == FAMILY_STACK
        third = torch.stack([(colour + 1 + j) % nc for j in range(nc - 1)], 1)  # [K, 3] != colour
        third_ok = third != target[:, None]
        # first of the two colours different from both colour and target, chosen by u[:, 2]
        rank = third_ok.long().cumsum(1) - 1
        want = pick(2, 2)
        sel = (third_ok & (rank == want[:, None])).float().argmax(1)
        stack_third = third.gather(1, sel[:, None])[:, 0]
        obj_colour = torch.where(is_stack[:, None], torch.stack(
            [colour, target, stack_third], 1), obj_colour)
        obj_shape = torch.where(is_stack[:, None], torch.stack(
            [shape, torch.zeros_like(shape), shape], 1), obj_shape)

        # Plates: pick_place: plate 0 is the target plate; otherwise two random colours.
        p0 = torch.where(fam == FAMILY_PICK_PLACE, target, pick(3, nc))
        p1 = (p0 + 1 + pick(4, nc - 1)) % nc
        plate_colour = torch.stack([p0, p1], 1)

        # Positions: a random permutation of the 9 cells (objects, plates, gripper), jittered.
        cells = u[:, 5:14].argsort(1)[:, : NUM_OBJECTS + NUM_PLATES + 1]  # [K, 6]
        jitter = (u[:, 14:26].view(k, 6, 2) * 2 - 1) * _JITTER
        pos = self._cells[cells] + jitter  # [K, 6, 2]
        # push: mirror the layout so the object does not start next to its goal edge.
        goal_dir = torch.where((fam == FAMILY_PUSH)[:, None], self._edge_dirs[target.clamp_max(3)],
                               torch.zeros(k, 2, device=dev))
        along = (pos[:, 0] * goal_dir).sum(-1)
        flip = along > 0.5 * _CELL
        mirror = torch.where(flip[:, None], 1.0 - 2.0 * goal_dir.abs(),
                             torch.ones(k, 2, device=dev))
        pos = pos * mirror[:, None, :]
        # objects beyond the requested number of distractors are parked off the table
        d = self.num_distractors
        # (with one distractor: the same-shape one, so the colour word tells them apart)
        active = torch.stack([torch.ones_like(is_stack), is_stack | (d >= 2),
                              torch.full_like(is_stack, d >= 1)], 1)
        obj_pos = torch.where(active[..., None], pos[:, :NUM_OBJECTS], _PARKED)
        return {
            "obj_active": active,
            "family": fam, "goal_dir": goal_dir,
            "obj_pos": obj_pos.contiguous(), "obj_shape": obj_shape,
            "obj_colour": obj_colour,
            "plate_pos": pos[:, NUM_OBJECTS:NUM_OBJECTS + NUM_PLATES].contiguous(),
            "plate_colour": plate_colour, "gripper": pos[:, -1].contiguous(),
        }

    def _reset_envs(self, idx: torch.Tensor, task_ids: torch.Tensor, seeds: torch.Tensor) -> None:
        """Start new episodes in envs ``idx [K]``."""
        layout = self.sample_layout(task_ids, seeds)
        for name, value in layout.items():
            getattr(self, name)[idx] = value
        self.task_id[idx] = task_ids.to(self.device)
        self.episode_seed[idx] = seeds.to(self.device)
        self.closed[idx] = False
        self.held[idx] = -1
        self.elapsed[idx] = 0
        self.episode_return[idx] = 0.0
        self._video_camera.set_static(idx, self.plate_pos[idx], self.plate_colour[idx])
        self.terminated[idx] = False
        self.truncated[idx] = False
        for i, t in zip(idx.tolist(), task_ids.tolist()):
            self._instruction[i] = self.instructions[t]

    def _draw_tasks_and_seeds(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = torch.randint(len(self.tasks), (k,), generator=self._generator)
        seeds = torch.randint(2**31 - 1, (k,), generator=self._generator)
        return tasks, seeds

    def reset(self, seed: int | None = None, task_ids: torch.Tensor | None = None,
              episode_seeds: torch.Tensor | None = None) -> dict[str, Any]:
        """Reset all envs (see :class:`~pirl.envs.base.BatchedEnv`).  Tasks / seeds not given are
        drawn from the generator (re-seeded with ``seed`` if given)."""
        n = self.num_envs
        if seed is not None:
            self._generator.manual_seed(seed)
        tasks, seeds = self._draw_tasks_and_seeds(n)
        if task_ids is not None:
            tasks = torch.as_tensor(task_ids, dtype=torch.long).cpu().expand(n).clone()
            if bool((tasks < 0).any()) or bool((tasks >= len(self.tasks)).any()):
                raise ValueError(f"task_ids must lie in [0, {len(self.tasks)})")
        if episode_seeds is not None:
            seeds = torch.as_tensor(episode_seeds, dtype=torch.long).cpu().expand(n).clone()
        self._reset_envs(torch.arange(n, device=self.device), tasks, seeds)
        self._obs = self._observe()
        return self._obs

    # ------------------------------------------------------------------ observation / render
    def _observe(self, prev: dict[str, Any] | None = None,
                 idx: torch.Tensor | None = None) -> dict[str, Any]:
        """The observation dict.  With ``prev`` and ``idx``: re-render only envs ``idx`` and take
        the other envs' images from ``prev`` (after a partial auto-reset)."""
        state = torch.stack([self.gripper[:, 0], self.gripper[:, 1], self.closed.float(),
                             (self.held >= 0).float()], 1)
        obs: dict[str, Any] = {"state": state, "instruction": list(self._instruction),
                               "task_id": self.task_id.clone()}
        if self.cameras:
            if prev is None or idx is None:
                obs["images"] = self.render_cameras()
            else:
                images = prev["images"].clone()
                images[idx] = self.render_cameras(idx)
                obs["images"] = images
        return obs

    def render_cameras(self, idx: torch.Tensor | None = None,
                       cameras: list[Camera] | None = None) -> torch.Tensor:
        """Render the current state of envs ``idx`` (default all): ``[K, C, 3, S, S]`` uint8."""
        cameras = self.cameras if cameras is None else cameras
        sel = (lambda x: x) if idx is None else (lambda x: x[idx])  # noqa: E731
        held = sel(self.held)
        k = held.shape[0]
        sprite = sel(self.obj_shape) * len(COLOURS) + sel(self.obj_colour)
        # Draw order: free objects by slot, then the held object on top.
        key = self._slots[None, :] + NUM_OBJECTS * (self._slots[None, :] == held[:, None])
        order = key.argsort(1)
        s, nc = self.image_size, len(cameras)
        frame = 3 * s * s
        # one flat buffer: the K * C frames, then a scratch frame for off-view sprite pixels
        flat = torch.empty((k * nc + 1) * frame, dtype=torch.uint8, device=self.device)
        images = flat[: k * nc * frame].view(k, nc, 3, s, s)
        env = torch.arange(k, device=self.device)
        for c, cam in enumerate(cameras):
            cam.render(flat, images[:, c], (env * nc + c) * frame, k * nc * frame,
                       sel(self.gripper), sel(self.closed), sel(self.obj_pos), sprite, order,
                       sel(self.plate_pos), sel(self.plate_colour), idx=idx)
        return images

    def render(self) -> torch.Tensor:
        """Frames ``[N, 3, S, S]`` uint8 of the current state (top camera)."""
        if self._obs is not None and "images" in self._obs:
            return self._obs["images"][:, 0]
        return self.render_cameras(cameras=[self._video_camera])[:, 0]

    # ------------------------------------------------------------------ dynamics
    def _goal_distance(self) -> torch.Tensor:
        """Distance ``[N]`` of the task object from its goal (0 inside the goal region)."""
        o = self.obj_pos[:, 0]
        d_plate = (o - self.plate_pos[:, 0]).norm(dim=-1)
        d_edge = (EDGE_ZONE - (o * self.goal_dir).sum(-1)).clamp_min(0.0)
        d_stack = (o - self.obj_pos[:, 1]).norm(dim=-1)
        return torch.where(self.family == FAMILY_PUSH, d_edge,
                           torch.where(self.family == FAMILY_STACK, d_stack, d_plate))

    def scene_points(self) -> torch.Tensor:
        """Scene annotation ``[N, 3, 2]`` (table coordinates) of the current state: the object
        the instruction names, the place it names (the target plate, the base cube, or the
        middle of the named edge for push) and the gripper -- the grounding labels a
        vision-language model is pretrained on (no actions; used by
        :func:`pirl.algos.pretrain.pretrain_grounding`)."""
        stack = self.family == FAMILY_STACK
        push = self.family == FAMILY_PUSH
        goal = torch.where(stack[:, None], self.obj_pos[:, 1], self.plate_pos[:, 0])
        goal = torch.where(push[:, None], self.goal_dir, goal)
        return torch.stack([self.obj_pos[:, 0], goal, self.gripper], 1)

    def _potential(self) -> torch.Tensor:
        if self.reward_type == "progress":
            return -self._goal_distance()
        reach = (self.gripper - self.obj_pos[:, 0]).norm(dim=-1) * (self.held != 0)
        return -(reach + self._goal_distance())

    def success(self) -> torch.Tensor:
        """``[N]`` bool: whether the current state solves each env's task."""
        o = self.obj_pos[:, 0]
        free = self.held != 0
        on_plate = (o - self.plate_pos[:, 0]).abs().amax(-1) <= PLATE_SUCCESS_HALF
        at_edge = (o * self.goal_dir).sum(-1) >= EDGE_ZONE
        stacked = ((o - self.obj_pos[:, 1]).norm(dim=-1) <= STACK_TOLERANCE) & (self.held != 1)
        ok = torch.where(self.family == FAMILY_PUSH, at_edge,
                         torch.where(self.family == FAMILY_STACK, stacked, on_plate))
        return ok & free

    def _physics(self, action: torch.Tensor) -> None:
        """Advance every env by one step (in place)."""
        want_closed = action[:, 2] > 0
        # 1. release
        release = self.closed & ~want_closed & (self.held >= 0)
        held = torch.where(release, torch.full_like(self.held, -1), self.held)
        # 2. move
        g_old = self.gripper
        g_new = (g_old + action[:, :2] * self.max_speed).clamp(-1.0, 1.0)
        d = g_new - g_old
        is_held = self._slots[None, :] == held[:, None]  # [N, M]
        obj = torch.where(is_held[..., None], g_new[:, None, :], self.obj_pos)
        # 3. push
        rel_old = obj - g_old[:, None, :]
        rel_new = obj - g_new[:, None, :]
        dist = rel_new.norm(dim=-1)  # [N, M]
        ahead = ((rel_old * d[:, None, :]).sum(-1) > 0) & ((rel_new * d[:, None, :]).sum(-1) > 0)
        push = (held < 0)[:, None] & ahead & (dist < CONTACT_DISTANCE) & self.obj_active
        # the object slides along the motion direction (no slip sideways against the gripper)
        # until it touches the gripper again: along-distance sqrt(C^2 - lateral^2)
        u = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        along = (rel_new * u[:, None, :]).sum(-1)  # [N, M]
        lateral2 = (dist.pow(2) - along.pow(2)).clamp_min(0.0)
        target = (CONTACT_DISTANCE ** 2 - lateral2).clamp_min(0.0).sqrt()
        pushed = obj + u[:, None, :] * (target - along).clamp_min(0.0)[..., None]
        obj = torch.where(push[..., None], pushed, obj)
        # 4. grasp
        closing = want_closed & ~self.closed & (held < 0)
        free_dist = torch.where(is_held | ~self.obj_active, torch.full_like(dist, math.inf),
                                (obj - g_new[:, None, :]).norm(dim=-1))
        nearest_d, nearest = free_dist.min(1)
        grasp = closing & (nearest_d < GRASP_RADIUS)
        held = torch.where(grasp, nearest, held)
        snap = grasp[:, None] & (self._slots[None, :] == nearest[:, None])
        obj = torch.where(snap[..., None], g_new[:, None, :], obj)
        self.obj_pos = torch.where(self.obj_active[..., None],
                                   obj.clamp(-OBJECT_LIMIT, OBJECT_LIMIT), obj)
        self.gripper = g_new
        self.held = held
        self.closed = want_closed

    def step(self, action: torch.Tensor) -> Step:
        """One env step for all N envs (see :class:`~pirl.envs.base.BatchedEnv`)."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        action = action.to(self.device, torch.float32)
        if action.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"action must be [{self.num_envs}, {self.action_dim}], "
                             f"got {list(action.shape)}")
        action = torch.nan_to_num(action).clamp(-1.0, 1.0)
        frozen = self.terminated | self.truncated  # only possible without auto-reset
        dense = self.reward_type in ("dense", "progress")
        phi_old = self._potential() if dense else None
        saved = None
        if bool(frozen.any()):
            saved = {k: getattr(self, k).clone() for k in ("gripper", "closed", "held", "obj_pos")}
        self._physics(action)
        if saved is not None:
            for k, v in saved.items():
                new = getattr(self, k)
                mask = frozen.view(-1, *([1] * (new.dim() - 1)))
                setattr(self, k, torch.where(mask, v, new))
        active = ~frozen
        success = self.success() & active
        reward = success.float()
        if dense:
            reward = reward + self.dense_scale * (self._potential() - phi_old) * active
        self.elapsed += active.long()
        self.episode_return += reward
        terminated = success
        truncated = active & ~success & (self.elapsed >= self.max_episode_steps)
        self.terminated |= terminated
        self.truncated |= truncated
        done = terminated | truncated
        info: dict[str, Any] = {"success": success}
        obs = self._observe()
        if self.auto_reset:
            info["final_obs"] = obs
            info["episode_success"] = success & done
            info["episode_return"] = self.episode_return.clone()
            info["episode_length"] = self.elapsed.clone()
            info["done_mask"] = done
            out_terminated, out_truncated = self.terminated.clone(), self.truncated.clone()
            if bool(done.any()):
                idx = done.nonzero()[:, 0]
                tasks, seeds = self._draw_tasks_and_seeds(idx.numel())
                if not self.resample_tasks:
                    tasks = self.task_id[idx].cpu()
                self._reset_envs(idx, tasks, seeds)
                obs = self._observe(prev=obs, idx=idx)
            terminated_out, truncated_out = out_terminated, out_truncated
        else:
            terminated_out, truncated_out = self.terminated.clone(), self.truncated.clone()
        self._obs = obs
        return Step(obs=obs, reward=reward, terminated=terminated_out, truncated=truncated_out,
                    info=info)
