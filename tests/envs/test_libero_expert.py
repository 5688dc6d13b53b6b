"""The scripted LIBERO expert (``pirl.envs.libero_expert``).

Default suite: its rotation error against an independent rotation check, and the ray cast it
uses to find the surface under a point, on a hand-built MuJoCo scene.  ``-m sim``
(``.venv-sim``): its gripper bookkeeping against robosuite's gripper, and its grasps and demos
on real libero_spatial / libero_object tasks from fixed init states.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pirl.envs import libero as L
from tests.envs.rotations import matrix_to_quat_xyzw, rodrigues


def test_rotation_error_matches_relative_rotation():
    from pirl.envs.libero_expert import rotation_error

    rng = np.random.default_rng(4)
    for _ in range(20):
        a = matrix_to_quat_xyzw(rodrigues(rng.normal(size=3), rng.uniform(0.1, 3.0)))
        b = matrix_to_quat_xyzw(rodrigues(rng.normal(size=3), rng.uniform(0.1, 3.0)))
        ra, rb = (rodrigues(*(lambda q: (q, np.linalg.norm(q)))(L.quat_to_axis_angle(
            q if q[3] >= 0 else -q))) for q in (a, b))
        e = rotation_error(a, b)
        # the error rotation applied (in the world frame) after a gives b
        assert np.allclose(rodrigues(e, np.linalg.norm(e)) @ ra, rb, atol=1e-8)
        assert np.linalg.norm(e) <= np.pi + 1e-9


def _ray_scene():
    """A MuJoCo scene of boxes with known tops: a floor (top z 0, |x|, |y| < 1), a wall (x 0.10 ..
    0.12, top 0.2), the object to grasp (a child body's box at |x| < 0.05, top 0.1), a visual-only
    box (x -0.2, top 0.5), a robot link (x 0.3, top 0.4) and a small marker body elsewhere."""
    mujoco = pytest.importorskip("mujoco")
    xml = """<mujoco><worldbody>
      <geom name="floor" type="box" size="1 1 0.05" pos="0 0 -0.05"/>
      <geom name="wall" type="box" size="0.01 0.5 0.1" pos="0.11 0 0.1"/>
      <geom name="ghost" type="box" size="0.02 0.02 0.25" pos="-0.2 0 0.25" contype="0"
            conaffinity="0"/>
      <body name="obj_main" pos="0 0 0"><body name="obj_part">
        <geom type="box" size="0.05 0.05 0.05" pos="0 0 0.05"/></body></body>
      <body name="robot0_link" pos="0.3 0 0"><geom type="box" size="0.02 0.02 0.2"
            pos="0 0 0.2"/></body>
      <body name="marker" pos="-0.5 0.5 0"><geom type="box" size="0.01 0.01 0.01"
            pos="0 0 0.01"/></body>
    </worldbody></mujoco>"""
    m = mujoco.MjModel.from_xml_string(xml)
    d = mujoco.MjData(m)
    mujoco.mj_forward(m, d)

    def body_id(name: str) -> int:
        return mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)

    return SimpleNamespace(sim=SimpleNamespace(model=SimpleNamespace(_model=m,
                                                                      body_name2id=body_id),
                                               data=SimpleNamespace(_data=d)))


def test_highest_surface_sees_past_the_object_and_the_robot():
    from pirl.envs.libero_expert import highest_surface

    env = _ray_scene()
    xy = np.array([[0.0, 0.0],     # the object (skipped) -> the floor under it
                   [0.11, 0.3],    # the wall
                   [0.095, 0.0],   # beside the wall
                   [-0.2, 0.0],    # a visual-only geom (skipped) -> the floor
                   [0.3, 0.0],     # the robot (skipped) -> the floor
                   [2.0, 0.0]])    # nothing below
    top = highest_surface(env, xy, 1.0, "obj_main")
    assert np.allclose(top[:5], [0.0, 0.2, 0.0, 0.0, 0.0], atol=1e-9)
    assert top[5] == -np.inf
    # skipping another body, the ray meets the object's own top
    assert highest_surface(env, xy[:1], 1.0, "marker")[0] == pytest.approx(0.1)


@pytest.mark.sim
def test_gripper_level_bookkeeping_matches_robosuite():
    """The expert's gripper command level (narrowed rim grasps open to it, then hold with 0)
    against robosuite's PandaGripper fed the same actions for 25 physics steps per policy
    step; the finger opening it assumes against the actuators' control range (0 .. 0.04)."""
    pytest.importorskip("robosuite")
    from robosuite.models.grippers import PandaGripper

    from pirl.envs.libero_expert import NARROW_LEVELS, PickPlaceExpert, finger_opening

    g = PandaGripper()
    for _ in range(10 * 25):  # LIBERO's no-op steps after reset: gripper action -1
        g.format_action(np.array([-1.0]))
    ex = PickPlaceExpert("obj", "target")
    ex.grip_level = -1.0
    script = [None] * 12 + [1.0] * 3 + [-1.0] * 10 + [None] * 6
    for level in (NARROW_LEVELS[0], NARROW_LEVELS[1], -1.0):
        ex.grip_open = level
        for cmd in script:
            ex._act = lambda raw, c=cmd: np.r_[np.zeros(6), ex._open_grip() if c is None else c]
            a = ex.act(None)
            for _ in range(25):
                g.format_action(a[6:])
            # robosuite's level: the right finger's normalised command (+1 closed)
            assert ex.grip_level == pytest.approx(g.current_action[1])
            assert g.current_action[0] == pytest.approx(-g.current_action[1])
        # after the open-to-level commands the hand sits at the level asked for
        assert ex.grip_level == pytest.approx(max(level, -1.0))
        ctrl = 0.02 + 0.02 * g.current_action[0]  # finger 1's position target, range 0 .. 0.04
        assert finger_opening(ex.grip_level) == pytest.approx(ctrl)


@pytest.mark.sim
@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object"])
def test_expert_succeeds_and_writes_demos(suite, tmp_path: Path):
    """The scripted expert places task 0's object on / in its target from fixed init states,
    and its demos load through pirl's demo reader with the state-mode layout."""
    pytest.importorskip("libero")
    from pirl.envs.demos import load_demos
    from pirl.envs.libero_expert import generate_libero_demos, run_expert

    res = run_expert(suite, [(0, 0), (0, 1)], processes=0)
    assert [r["success"] for r in res] == [True, True], res
    out = generate_libero_demos(suite, episodes_per_task=1, out_dir=tmp_path / "d", tasks=[0],
                                processes=0)
    ds = load_demos(out)
    assert len(ds.instructions) == 10 and ds.instructions[0] == L.suite_tasks(suite)[0].instruction
    samples = ds.sft_samples(horizon=4)
    assert samples.obs["state"].shape[-1] == L.suite_state_dim(suite)
    assert samples.actions.shape[-1] == 7 and samples.actions.abs().max() <= 1.0


@pytest.mark.sim
def test_expert_reaches_the_drawer_bowl_and_the_flat_box():
    """The two grasps that needed the scene's geometry: libero_spatial task 4 (the bowl in the
    open top drawer: the open fingers would land on the drawer's walls, so the expert takes a
    narrower or slanted rim grasp) and libero_object task 1 (the flat cream cheese box beside
    the taller tomato sauce: the grasp shifts along the box so the hand clears it).  Each
    places its object from a fixed init state; the gripper-level bookkeeping matches LIBERO's
    physics steps per policy step."""
    pytest.importorskip("libero")
    from pirl.envs.libero_expert import GRIP_LEVEL_STEP, LiberoExpertSubEnv, PickPlaceExpert

    se = LiberoExpertSubEnv("libero_spatial")
    try:
        se.reset(4, 0, 0)
        env = se.env.env
        substeps = round(env.control_timestep / env.model_timestep)
        assert substeps * 0.01 == pytest.approx(GRIP_LEVEL_STEP)  # PandaGripper's speed 0.01
        ex = PickPlaceExpert(*L.task_of_interest(se.tasks[4]))
        ex.reset(se.env, se.raw)
        assert ex.rim_grasps[0] != (-1.0, 1.0, 0.0)  # the open hand straight along y is blocked
        assert se.expert_episode(4, 0)["success"]
    finally:
        se.close()
    se = LiberoExpertSubEnv("libero_object")
    try:
        se.reset(1, 1, 0)
        ex = PickPlaceExpert(*L.task_of_interest(se.tasks[1]))
        ex.reset(se.env, se.raw)
        assert ex.grasp_offset[0] - ex.centre_offset[0] < -0.01  # away from the tomato sauce
        assert se.expert_episode(1, 1)["success"]
    finally:
        se.close()
