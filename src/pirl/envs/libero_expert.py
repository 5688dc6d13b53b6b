"""A scripted expert for LIBERO's pick-and-place suites (``libero_spatial``, ``libero_object``).

The expert reads privileged state: which object to move and where to (the task's bddl objects of
interest, :func:`pirl.envs.libero.task_of_interest`: libero_spatial's named black bowl and
``plate_1``, libero_object's grocery item and ``basket_1``), the objects' positions (LIBERO's
``<name>_pos`` observables) and, once per episode, their collision-geometry bounding boxes from
the MuJoCo model.  It drives LIBERO's ``OSC_POSE`` delta-pose controller through seven phases:
approach above the grasp point, descend, close the gripper, lift, carry above the target, lower,
release (then rise).  Actions are 7-D (delta position 3, delta rotation 3 held at the start
orientation, gripper ``-1`` open / ``+1`` close), clipped to ``[-1, 1]`` like a policy's.

Grasps: the Panda's fingers close along the world y axis in LIBERO's start pose.  A bowl (wider
than the gripper opens) is taken by its rim on the +y side; other objects at their centre, the
fingertips :data:`GRASP_DEPTH` below the object's top.  Before the first grasp the expert casts
rays down through the footprints of the fingers (bowls) or of the hand (other objects) in the
scene (:func:`highest_surface`): a rim grasp whose open fingers would land on something beside
the bowl (the walls of the open drawer in libero_spatial task 4) takes a rim point off the y
axis or a narrower opening; a centre grasp whose hand would land on a taller neighbour (the
tomato sauce beside the flat cream cheese box in libero_object task 1) shifts along the
object.  An object that slips out of the hand while carried is grasped again.

:func:`expert_success_table` runs it on LIBERO's 50 fixed initial states of every task of a suite
(benchmark protocol: 10 no-op steps after reset, the suite's step limit) over a process pool;
:func:`generate_libero_demos` records successful episodes in pirl's demo format
(:mod:`pirl.envs.demos`) with the ``state`` observation of :class:`pirl.envs.libero.LiberoEnv`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pirl.envs import libero as L

#: Suites whose tasks are "pick object X, place it on / in Y" (objects of interest: X, Y).
EXPERT_SUITES = ("libero_spatial", "libero_object")
#: Proportional gain: metres of position error -> normalised OSC_POSE delta (1 = 5 cm target
#: shift per step; 0.1 m of error saturates the action).
POS_GAIN = 10.0
#: Beyond this position error (m) an axis gets at least :data:`MIN_ACTION`: the impedance
#: controller otherwise settles 1-2 cm short under a payload (measured: a carried bowl stalled
#: at 0.15-0.19 actions, 1.5-1.9 cm from its goal).
DEADBAND = 0.005
MIN_ACTION = 0.3
#: Gain of the orientation hold (axis-angle error in rad -> normalised delta, 1 = 0.5 rad).
ROT_GAIN = 2.0
#: Fingertips this far below an object's top (m); a bowl is held by its rim this far below it.
GRASP_DEPTH = 0.025
RIM_DEPTH = 0.02
#: Rim grasp: the grasp point sits this far inside the bowl's outer radius (m).
RIM_INSET = 0.008
#: Clearance above the highest obstacle while carrying (m).
CARRY_CLEARANCE = 0.06
#: Height of the object's bottom above the target's top when released (m).
RELEASE_HEIGHT = 0.02
#: Steps the gripper is given to close / open.
GRIP_STEPS = 12
#: Grasp attempts per episode (a bowl's next attempt takes the next clear rim grasp: the rim's
#: other side where both are clear).
MAX_ATTEMPTS = 3
#: An object this far (m) from where the hand held it after the lift has slipped out of the
#: hand while carried or lowered (measured: a bowl dropped by a fast carry, libero_spatial
#: task 7); the expert grasps it again where it lies.  Measured in docs/experiments.md,
#: "LIBERO scripted expert on all 50 init states", like the grasp choices below.
DROP_DISTANCE = 0.04
#: The Panda gripper's command level (-1 open .. +1 closed) moves 0.01 per simulation step
#: towards the sign of the action, 25 simulation steps per policy step (robosuite's
#: ``PandaGripper.format_action``, LIBERO's 20 Hz control at a 2 ms physics step).
GRIP_LEVEL_STEP = 0.25
#: Command levels of the narrowed openings for a rim grasp (each finger's inner face 1.5 /
#: 1 cm from the grip site instead of 4 cm), used when the open fingers would come down on
#: something beside the bowl (the walls of an open drawer).
NARROW_LEVELS = (0.25, 0.5)
#: Rim points off the y axis (rad) tried when straight along y is blocked (the fingers still
#: close along y, pinching the rim at a slant).
RIM_ANGLES = (0.35, 0.7)
#: Footprint of a finger around its inner face (m): its thickness along the closing axis, half
#: its width across it (the Panda finger is about 2 cm wide) plus 5 mm for the hand's drift
#: while it descends.
FINGER_THICKNESS = 0.02
FINGER_HALF_WIDTH = 0.015
#: The Panda hand's collision box around the grip site in LIBERO's start pose (m, measured
#: from its mesh): x -0.027 .. 0.037, y -0.100 .. 0.104, bottom 3 cm above the grip site.
HAND_X = (-0.027, 0.037)
HAND_Y = (-0.100, 0.104)
HAND_BOTTOM = 0.03
#: Shifts (m) of a centre grasp along x, the object's axis across the fingers, tried in this
#: order when the hand would come down on a taller neighbour (libero_object's flat cream
#: cheese box beside the tomato sauce).
GRASP_SHIFTS = tuple(s * k * 0.005 for k in range(1, 7) for s in (1, -1))


def finger_opening(level: float) -> float:
    """Distance (m) from the grip site to each finger's inner face at gripper command level
    ``level`` (-1 open: 0.04, +1 closed: 0): the finger joints' control range is 0 .. 0.04."""
    return 0.02 * (1.0 - float(level))


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of xyzw quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])


def rotation_error(current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Axis-angle (world frame) of the rotation taking xyzw quaternion ``current`` to
    ``target`` (shortest way)."""
    inv = np.array([-current[0], -current[1], -current[2], current[3]])
    d = _quat_mul(target, inv)
    if d[3] < 0:
        d = -d
    return L.quat_to_axis_angle(d)


def object_box(env, name: str) -> tuple[np.ndarray, np.ndarray]:
    """World-frame axis-aligned bounding box ``(lo [3], hi [3])`` of the collision geoms of
    object ``name`` in a LIBERO ``ControlEnv`` (mesh vertices, or the corners of primitive
    geoms)."""
    import mujoco

    m, d = env.sim.model._model, env.sim.data._data
    root = env.sim.model.body_name2id(env.env.objects_dict[name].root_body)
    pts = []
    for g in range(m.ngeom):
        b = m.geom_bodyid[g]
        while b != 0 and b != root:
            b = m.body_parentid[b]
        if b != root or (m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0):
            continue
        c, r = d.geom_xpos[g], d.geom_xmat[g].reshape(3, 3)
        if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH:
            mid = m.geom_dataid[g]
            v = m.mesh_vert[m.mesh_vertadr[mid]:m.mesh_vertadr[mid] + m.mesh_vertnum[mid]]
        else:
            s = np.asarray(m.geom_size[g], dtype=np.float64)
            s = np.array([s[0], s[1] if s[1] > 0 else s[0], s[2] if s[2] > 0 else s[0]])
            if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_SPHERE:
                s = np.full(3, s[0])
            v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * s
        pts.append(v @ r.T + c)
    if not pts:
        raise ValueError(f"object {name!r} has no collision geoms")
    p = np.concatenate(pts)
    return p.min(0), p.max(0)


def highest_surface(env, xy: np.ndarray, z_from: float, skip_root: str) -> np.ndarray:
    """Height of the first collision geom straight below each point ``xy [N, 2]`` from height
    ``z_from`` (``-inf`` where nothing is), ignoring visual-only geoms, the geoms of body
    ``skip_root``'s subtree (the object to grasp) and the robot's."""
    import mujoco

    m, d = env.sim.model._model, env.sim.data._data
    root = env.sim.model.body_name2id(skip_root)
    skip = np.zeros(m.ngeom, bool)
    for g in range(m.ngeom):
        b = int(m.geom_bodyid[g])
        name = mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, b) or ""
        while b != 0 and b != root:
            b = int(m.body_parentid[b])
        skip[g] = ((m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0) or b == root
                   or name.startswith(("robot0_", "gripper0_", "mount0_")))
    # the rays see geom groups 0-4: the skipped geoms go to group 5 while they are cast
    groups = m.geom_group.copy()
    m.geom_group[skip] = 5
    try:
        mask = np.array([1, 1, 1, 1, 1, 0], np.uint8)
        down = np.array([0.0, 0.0, -1.0])
        gid = np.zeros(1, np.int32)
        out = np.full(len(xy), -np.inf)
        for k, (x, y) in enumerate(np.asarray(xy, np.float64)):
            dist = mujoco.mj_ray(m, d, np.array([x, y, z_from]), down, mask, 1, -1, gid)
            if dist >= 0:
                out[k] = z_from - dist
        return out
    finally:
        m.geom_group[:] = groups


class PickPlaceExpert:
    """The phase machine for one episode.  ``reset(env, raw)`` reads the task's geometry,
    ``act(raw)`` returns the next 7-D action."""

    PHASES = ("approach", "descend", "grasp", "lift", "carry", "lower", "release", "retreat")

    def __init__(self, obj: str, target: str, noise: float = 0.0,
                 rng: np.random.Generator | None = None):
        self.obj, self.target = obj, target
        self.noise = float(noise)
        self.rng = rng or np.random.default_rng(0)

    def reset(self, env, raw: dict[str, np.ndarray]) -> None:
        lo, hi = object_box(env, self.obj)
        tlo, thi = object_box(env, self.target)
        pos = np.asarray(raw[f"{self.obj}_pos"], np.float64)
        centre = (lo + hi) / 2
        self.centre_offset = centre - pos
        self.rim = "bowl" in self.obj
        self.side = 1.0
        self.grip_open = -1.0  # the gripper command level the hand opens to for a grasp
        if self.rim:
            self.radius = 0.5 * min(hi[0] - lo[0], hi[1] - lo[1])
            self.grasp_offset = np.array([centre[0] - pos[0],
                                          centre[1] - pos[1] + self.radius - RIM_INSET,
                                          hi[2] - RIM_DEPTH - pos[2]])
            self.rim_grasps = self._rim_grasps(env, centre, hi[2])
            self._set_rim_grasp(0)
        else:
            self.grasp_offset = np.array([centre[0] - pos[0], centre[1] - pos[1],
                                          max(hi[2] - GRASP_DEPTH, (lo[2] + hi[2]) / 2)
                                          - pos[2]])
            self.grasp_offset[0] += self._centre_shift(env, self.grasp_offset + pos, lo, hi)
        # object bottom below the grasp point; target top above its position
        self.hang = self.grasp_offset[2] + pos[2] - lo[2]
        tpos = np.asarray(raw[f"{self.target}_pos"], np.float64)
        self.target_centre_offset = (tlo + thi) / 2 - tpos
        self.target_top = thi[2]
        if "basket" in self.target:  # released inside, over the floor, not on the rim
            self.release_bottom = tlo[2] + 0.35 * (thi[2] - tlo[2])
        else:
            self.release_bottom = thi[2] + RELEASE_HEIGHT
        self.carry_z = max(thi[2], hi[2]) + CARRY_CLEARANCE + self.hang
        self.quat0 = np.asarray(raw["robot0_eef_quat"], np.float64).copy()
        self.phase = 0
        self.t_phase = 0
        self.hold: np.ndarray | None = None
        self.held: np.ndarray | None = None  # object centre - hand, measured after the lift
        self.attempts = 1
        # the gripper's command level: open after LIBERO's no-op steps (gripper action -1)
        self.grip_level = -1.0

    def _rim_grasps(self, env, centre: np.ndarray, rim_top: float
                    ) -> list[tuple[float, float, float]]:
        """Rim grasps ``(opening level, side, angle)`` to try, in order.  The fingers close
        along y; the grasp point is the rim point at ``angle`` (rad) from the y axis on the
        ``side`` (+1 / -1) of the centre.  A grasp qualifies when both fingers' footprints come
        down clear of everything but the bowl (:func:`highest_surface`, down to 1 cm below the
        grasp height).  Preference: the fully open hand straight along y on the +y, then the
        -y side; then :data:`RIM_ANGLES` off the y axis; then the same with the narrower
        openings of :data:`NARROW_LEVELS`; if none is clear, the open hand on both sides."""
        z_grasp = rim_top - RIM_DEPTH
        root = env.env.objects_dict[self.obj].root_body

        def clear(level: float, side: float, angle: float) -> bool:
            w = finger_opening(level)
            gx = centre[0] + (self.radius - RIM_INSET) * np.sin(angle)
            gy = centre[1] + side * (self.radius - RIM_INSET) * np.cos(angle)
            # a 3 mm grid: a drawer's wall is 5-7 mm thick
            ys = [gy + sign * (w + f) for sign in (side, -side)
                  for f in np.linspace(0.0, FINGER_THICKNESS, 8)]
            xs = gx + np.linspace(-FINGER_HALF_WIDTH, FINGER_HALF_WIDTH, 11)
            pts = np.array([[x, y] for x in xs for y in ys])
            return bool(np.all(highest_surface(env, pts, rim_top + 0.1, root) < z_grasp - 0.01))

        for level in (-1.0,) + NARROW_LEVELS:
            for angles in ((0.0,),) + tuple((a, -a) for a in RIM_ANGLES):
                ok = [(level, side, angle) for angle in angles for side in (1.0, -1.0)
                      if clear(level, side, angle)]
                if ok:
                    return ok
        return [(-1.0, 1.0, 0.0), (-1.0, -1.0, 0.0)]

    def _centre_shift(self, env, grasp: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
        """Shift along x of a centre grasp at ``grasp`` (world) so that the hand
        (:data:`HAND_X` / :data:`HAND_Y` / :data:`HAND_BOTTOM`, 2 mm margin) comes down clear of
        everything but the object: 0 where it does, else the first clear of
        :data:`GRASP_SHIFTS` that keeps the fingers' centre 1.2 cm inside the object's x
        extent, else 0."""
        root = env.env.objects_dict[self.obj].root_body
        ys = grasp[1] + np.arange(HAND_Y[0], HAND_Y[1] + 1e-9, 0.01)

        def clear(dx: float) -> bool:
            xs = grasp[0] + dx + np.linspace(HAND_X[0] - 0.002, HAND_X[1] + 0.002, 9)
            pts = np.array([[x, y] for x in xs for y in ys])
            top = highest_surface(env, pts, grasp[2] + 0.3, root)
            return bool(np.all(top < grasp[2] + HAND_BOTTOM - 0.005))

        if clear(0.0):
            return 0.0
        room = 0.5 * (hi[0] - lo[0]) - 0.012
        for dx in GRASP_SHIFTS:
            if abs(dx) <= room and clear(dx):
                return dx
        return 0.0

    def _set_rim_grasp(self, k: int) -> None:
        self.grip_open, self.side, angle = self.rim_grasps[k % len(self.rim_grasps)]
        r = self.radius - RIM_INSET
        self.grasp_offset[0] = self.centre_offset[0] + r * np.sin(angle)
        self.grasp_offset[1] = self.centre_offset[1] + self.side * r * np.cos(angle)

    def _open_grip(self) -> float:
        """The gripper action that opens the hand to ``self.grip_open`` for a grasp (0 holds
        the level reached)."""
        if self.grip_open <= -1.0:
            return -1.0
        d = self.grip_open - self.grip_level
        return 0.0 if abs(d) < GRIP_LEVEL_STEP / 2 else float(np.sign(d))

    def _retry(self) -> bool:
        """Start over from above (a bowl with its next clear rim grasp) after a descent that
        stalled, a grasp that closed on nothing or an object that slipped out on the way;
        False once :data:`MAX_ATTEMPTS` are used."""
        if self.attempts >= MAX_ATTEMPTS:
            return False
        self.attempts += 1
        if self.rim:  # the next of the clear rim grasps (the other side where both are)
            self._set_rim_grasp(self.attempts - 1)
        self.phase, self.t_phase, self.hold, self.held = 0, 0, None, None
        return True

    def _goto(self, raw, p: np.ndarray, grip: float) -> np.ndarray:
        eef = np.asarray(raw["robot0_eef_pos"], np.float64)
        a = np.zeros(7)
        err = p - eef
        a[:3] = np.clip(err * POS_GAIN, -1, 1)
        push = np.abs(err) > DEADBAND
        a[:3][push] = np.sign(err[push]) * np.maximum(np.abs(a[:3][push]), MIN_ACTION)
        a[3:6] = np.clip(rotation_error(np.asarray(raw["robot0_eef_quat"], np.float64),
                                        self.quat0) * ROT_GAIN, -1, 1)
        a[6] = grip
        if self.noise > 0:
            a[:6] += self.rng.normal(0, self.noise, 6)
        return np.clip(a, -1, 1)

    def _hold_still(self, raw, eef: np.ndarray, grip: float) -> np.ndarray:
        """Stay where the phase began while the gripper closes (grip 1) or opens (-1) for
        GRIP_STEPS steps, then move on."""
        if self.hold is None:
            self.hold = eef.copy()
        hold = self.hold  # _next() clears self.hold; this step still targets it
        if self.t_phase >= GRIP_STEPS:
            self._next()
        return self._goto(raw, hold, grip)

    def _next(self) -> None:
        self.phase += 1
        self.t_phase = 0
        self.hold = None

    def act(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        a = self._act(raw)
        self.grip_level = float(np.clip(self.grip_level + GRIP_LEVEL_STEP * np.sign(a[6]),
                                        -1.0, 1.0))
        return a

    def _act(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        eef = np.asarray(raw["robot0_eef_pos"], np.float64)
        obj = np.asarray(raw[f"{self.obj}_pos"], np.float64)
        tgt = np.asarray(raw[f"{self.target}_pos"], np.float64) + self.target_centre_offset
        grasp = obj + self.grasp_offset
        self.t_phase += 1
        name = self.PHASES[min(self.phase, len(self.PHASES) - 1)]
        if name == "approach":
            p = grasp + np.array([0, 0, 0.08])
            err = p - eef
            if (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02) or self.t_phase > 80:
                self._next()
            return self._goto(raw, p, self._open_grip())
        if name == "descend":
            # blocked above the grasp point (fingers on the floor, a drawer's sides): grasp
            # from there; the lift tells whether that held the object
            if np.linalg.norm(grasp - eef) < 0.008 or self.t_phase > 30:
                self._next()
            return self._goto(raw, grasp, self._open_grip())
        if name == "grasp":
            return self._hold_still(raw, eef, 1.0)
        if name == "lift":
            if self.t_phase == 1:
                self.lift_from = obj[2]
            p = np.array([eef[0], eef[1], self.carry_z])
            if abs(p[2] - eef[2]) < 0.02 or self.t_phase > 60:
                if obj[2] - self.lift_from < 0.03 and self._retry():
                    # the object stayed behind: grasp again
                    return self._goto(raw, eef, -1.0)
                self.held = obj + self.centre_offset - eef
                self._next()
            return self._goto(raw, p, 1.0)
        # the hand goes where it puts the object's centre over the target's, the object held
        # as measured after the lift
        held = self.held if self.held is not None else obj + self.centre_offset - eef
        if (name in ("carry", "lower") and self.held is not None
                and np.linalg.norm(obj + self.centre_offset - eef - self.held) > DROP_DISTANCE
                and self._retry()):
            # the object slipped out of the hand on the way: grasp it again where it lies
            return self._goto(raw, eef, -1.0)
        place_xy = tgt[:2] - held[:2]
        if name == "carry":
            p = np.array([place_xy[0], place_xy[1], self.carry_z])
            if np.linalg.norm(p[:2] - eef[:2]) < 0.01 or self.t_phase > 100:
                self._next()
            return self._goto(raw, p, 1.0)
        if name == "lower":
            p = np.array([place_xy[0], place_xy[1], self.release_bottom + self.hang])
            if abs(p[2] - eef[2]) < 0.01 or self.t_phase > 50:
                self._next()
            return self._goto(raw, p, 1.0)
        if name == "release":
            return self._hold_still(raw, eef, -1.0)
        return self._goto(raw, np.array([eef[0], eef[1], self.carry_z]), -1.0)


class LiberoExpertSubEnv(L.LiberoSubEnv):
    """A ``state``-mode LIBERO slot that can also play whole expert episodes in its process."""

    def __init__(self, suite: str, **kw):
        if suite not in EXPERT_SUITES:
            raise ValueError(f"the scripted expert covers {EXPERT_SUITES}, not {suite!r}")
        kw.setdefault("obs_mode", "state")
        super().__init__(suite, **kw)

    def expert_episode(self, task_index: int, init_index: int, seed: int = 0,
                       max_steps: int | None = None, noise: float = 0.0,
                       record: bool = False) -> dict[str, Any]:
        """Play one episode from fixed init state ``init_index`` (benchmark protocol); return
        ``success``, ``length`` (policy steps until success or the limit), ``phase`` reached,
        and with ``record`` the ``state [T, S]`` / ``action [T, 7]`` arrays."""
        max_steps = max_steps or L.MAX_STEPS[self.suite]
        obs = self.reset(task_index, init_index, seed)
        obj, target = L.task_of_interest(self.tasks[task_index])
        expert = PickPlaceExpert(obj, target, noise=noise,
                                 rng=np.random.default_rng([seed, task_index, init_index]))
        expert.reset(self.env, self.raw)
        states, actions = [], []
        success = False
        for _ in range(max_steps):
            a = expert.act(self.raw)
            if record:
                states.append(obs["state"])
                actions.append(a.astype(np.float32))
            obs, _, success = self.step(a)
            if success:
                break
        out: dict[str, Any] = {"success": bool(success), "length": len(actions) if record
                               else None, "phase": PickPlaceExpert.PHASES[
                                   min(expert.phase, len(PickPlaceExpert.PHASES) - 1)]}
        if record:
            out["state"] = np.stack(states).astype(np.float32)
            out["action"] = np.stack(actions).astype(np.float32)
        return out


def _pool(suite: str, processes: int, assets_dir=None,
          state_features: str = "raw") -> L.SubprocEnvPool:
    assets = str(L.resolve_assets(assets_dir))
    factory = functools.partial(LiberoExpertSubEnv, suite, assets=assets,
                                state_features=state_features)
    return L.SubprocEnvPool([factory] * max(processes, 1), in_process=processes <= 0)


def _run(pool: L.SubprocEnvPool, jobs: Sequence[tuple[int, int]], noise: float, record: bool,
         seed: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for lo in range(0, len(jobs), pool.size):
        batch = list(jobs[lo:lo + pool.size])
        results += pool.call("expert_episode",
                             args=[(t, i, seed, None, noise, record) for t, i in batch],
                             indices=list(range(len(batch))))
    return results


def run_expert(suite: str, jobs: Sequence[tuple[int, int]], processes: int = 2,
               noise: float = 0.0, record: bool = False, seed: int = 0,
               assets_dir=None) -> list[dict[str, Any]]:
    """Expert episodes for ``jobs = [(task_index, init_index), ...]`` over a pool of
    ``processes`` worker processes (0: in this process); results in job order."""
    pool = _pool(suite, processes, assets_dir)
    try:
        return _run(pool, jobs, noise, record, seed)
    finally:
        pool.close()


def expert_success_table(suite: str, tasks: Sequence[int] | None = None,
                         init_indices: Sequence[int] = range(L.NUM_INIT_STATES),
                         processes: int = 2) -> dict[str, Any]:
    """Success of the expert on the fixed init states of each task: ``{"rows": [{task, name,
    success, n, failed_phases}], "mean": ..., "seconds": ...}``."""
    t0 = time.time()
    names = [t.name for t in L.suite_tasks(suite)]
    tasks = list(range(len(names))) if tasks is None else list(tasks)
    jobs = [(t, i) for t in tasks for i in init_indices]
    res = run_expert(suite, jobs, processes=processes)
    rows = []
    for t in tasks:
        rs = [r for (tt, _), r in zip(jobs, res) if tt == t]
        fails: dict[str, int] = {}
        for r in rs:
            if not r["success"]:
                fails[r["phase"]] = fails.get(r["phase"], 0) + 1
        rows.append({"task": t, "name": names[t], "n": len(rs),
                     "success": sum(r["success"] for r in rs) / max(len(rs), 1),
                     "failed_phases": fails})
    return {"suite": suite, "rows": rows,
            "mean": float(np.mean([r["success"] for r in rows])) if rows else 0.0,
            "seconds": time.time() - t0}


def generate_libero_demos(suite: str = "libero_spatial", episodes_per_task: int = 2,
                          out_dir: str | Path = "demos", seed: int = 0,
                          tasks: Sequence[int] | None = None, processes: int = 2,
                          init_offset: int = 0, noise: float = 0.0,
                          max_attempts_per_task: int = 10,
                          min_episodes_per_task: int | None = None,
                          counts: dict[int, int] | None = None,
                          state_features: str = "raw") -> Path:
    """Successful expert episodes in pirl's demo format (:mod:`pirl.envs.demos`): per task
    ``episodes_per_task`` episodes from fixed init states ``init_offset, init_offset + 1, ...``
    (failed ones are skipped), ``state``-mode observations exactly as ``LiberoEnv(suite,
    obs_mode="state")`` returns them.  ``episode_seed`` is the init-state index (``LiberoEnv``
    maps ``episode_seed % 50`` to it); ``task_index`` is the suite's task index (the env's
    ``task_id`` when it runs all tasks).  A task with fewer than ``min_episodes_per_task``
    (None: ``episodes_per_task``) successes in ``max_attempts_per_task`` attempts is an error;
    above that it keeps what it got.  ``counts`` (a dict) receives the episodes kept per task.
    ``state_features``: as the training env's (``"relative"`` appends
    :func:`pirl.envs.libero.relative_offsets`).  Returns ``out_dir``."""
    from types import SimpleNamespace

    from pirl.envs.demo_writer import write_demo_folder

    all_tasks = L.suite_tasks(suite)
    tasks = list(range(len(all_tasks))) if tasks is None else list(tasks)
    kept: list[dict[str, Any]] = []
    pool = _pool(suite, processes, state_features=state_features)
    try:
        for t in tasks:
            jobs = [(t, (init_offset + k) % L.NUM_INIT_STATES)
                    for k in range(min(max_attempts_per_task, L.NUM_INIT_STATES))]
            got = 0
            for lo in range(0, len(jobs), pool.size):
                if got >= episodes_per_task:
                    break
                batch = jobs[lo:lo + pool.size]
                for (tt, i), r in zip(batch, _run(pool, batch, noise, True, seed)):
                    if r["success"] and got < episodes_per_task:
                        n = r["length"]
                        reward = torch.zeros(n)
                        reward[-1] = 1.0
                        kept.append({"task_index": tt, "episode_seed": i, "success": True,
                                     "length": n, "state": torch.from_numpy(r["state"]),
                                     "action": torch.from_numpy(r["action"]),
                                     "reward": reward})
                        got += 1
            if counts is not None:
                counts[t] = got
            need = episodes_per_task if min_episodes_per_task is None else min_episodes_per_task
            if got < need:
                raise RuntimeError(f"the expert succeeded on only {got} of {len(jobs)} init "
                                   f"states of {suite} task {t}; asked for {need}")
    finally:
        pool.close()
    if not kept:
        raise RuntimeError(f"the expert had no successful episode on any of tasks {tasks} of "
                           f"{suite}: no demos to write")
    env_like = SimpleNamespace(state_dim=L.state_size(suite, "state", state_features),
                               action_dim=7,
                               tasks=all_tasks, task_names=[t.name for t in all_tasks],
                               instructions=[t.instruction for t in all_tasks],
                               max_episode_steps=L.MAX_STEPS[suite])
    meta = dict(env_name=f"libero/{suite}",
                env_kwargs={"obs_mode": "state", "state_features": state_features}, seed=seed,
                noise=noise, episodes_per_task=episodes_per_task, source="libero scripted expert")
    return write_demo_folder(Path(out_dir), env_like, kept, meta)
