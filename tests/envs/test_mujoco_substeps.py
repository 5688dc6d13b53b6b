"""FusedSubsteps: MuJoCo's split step inside robosuite's substep loop, against the loop itself.

A toy scene (an actuated arm pushing a box) stands in for a robosuite env; real LIBERO scenes
are compared in tests/envs/test_libero.py (``-m sim``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pirl.envs.mujoco_substeps import FusedSubsteps

# an actuated two-link arm pushing a free box on a floor: contacts, a hinge with damping, a
# touch and a force sensor (acceleration stage), Euler integration as in LIBERO's scenes
_ARM_XML = """
<mujoco>
  <option timestep="0.002" integrator="{integrator}"/>
  <worldbody>
    <geom type="plane" size="2 2 0.1"/>
    <body pos="0 0 0.3">
      <joint name="j0" type="hinge" axis="0 0 1" damping="0.5"/>
      <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.03"/>
      <body pos="0.3 0 0">
        <joint name="j1" type="hinge" axis="0 1 0" damping="0.5"/>
        <geom type="capsule" fromto="0 0 0 0.3 0 -0.2" size="0.03"/>
        <site name="tip" pos="0.3 0 -0.2"/>
      </body>
    </body>
    <body pos="0.45 0.05 0.05">
      <freejoint/>
      <geom name="box" type="box" size="0.05 0.05 0.05"/>
      <site name="box_site"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="j0"/>
    <motor joint="j1"/>
  </actuator>
  <sensor>
    <touch site="box_site"/>
    <force site="tip"/>
  </sensor>
</mujoco>
"""


class _Sim:
    """robosuite's MjSim interface as the fused context sees it (``model._model``,
    ``data._data``, ``forward``, ``step``)."""

    def __init__(self, mujoco, integrator: str = "Euler"):
        self.mj = mujoco
        self.model = SimpleNamespace(_model=mujoco.MjModel.from_xml_string(
            _ARM_XML.format(integrator=integrator)))
        self.data = SimpleNamespace(_data=mujoco.MjData(self.model._model))

    def forward(self):
        self.mj.mj_forward(self.model._model, self.data._data)

    def step(self, with_udd=True):
        self.mj.mj_step(self.model._model, self.data._data)


def _robosuite_like_step(sim, target: np.ndarray, substeps: int = 25) -> list[np.ndarray]:
    """robosuite's ``MujocoEnv.step``: per substep forward, a controller that forwards again and
    reads positions, velocities, the mass matrix and bias forces, then ``step``; the first
    substep also records the acceleration-stage sensors (as the robot's force buffer does)."""
    mj, m, d = sim.mj, sim.model._model, sim.data._data
    recorded = []
    for i in range(substeps):
        sim.forward()
        sim.forward()  # the controller's update
        full = np.zeros((m.nv, m.nv))
        mj.mj_fullM(m, full, d.qM)
        err = target - d.qpos[:2]
        d.ctrl[:] = full[:2, :2] @ (40.0 * err - 4.0 * d.qvel[:2]) + d.qfrc_bias[:2]
        if i == 0:
            recorded.append(d.sensordata.copy())
        sim.step()
    return recorded


@pytest.mark.sim
def test_fused_substeps_reproduce_the_robosuite_loop_bitwise():
    """Inside ``FusedSubsteps`` the same loop (robosuite's three forward passes per substep)
    runs MuJoCo's split step and yields bitwise the same states, contacts and sensors,
    including the force sensors read at the policy substep and the accelerations and sensors
    of a forward after the substeps; outside it the sim is unchanged.
    (Marked sim: the simulator venv's MuJoCo is new enough; the core venv's 3.3.0, from
    Meta-World, is not, and there the slot runs robosuite's own loop.)"""
    mujoco = pytest.importorskip("mujoco")
    plain, fused = _Sim(mujoco), _Sim(mujoco)
    assert FusedSubsteps.supports(fused), mujoco.__version__
    rng = np.random.default_rng(0)
    contacts = 0
    for _ in range(30):
        target = rng.uniform(-1.5, 1.5, 2)
        a = _robosuite_like_step(plain, target)
        plain.forward()  # a forward after the substeps (as rewards / observations may run)
        with FusedSubsteps(fused):
            b = _robosuite_like_step(fused, target)
            fused.forward()
        assert "forward" not in vars(fused) and "step" not in vars(fused)
        pd, fd = plain.data._data, fused.data._data
        for name in ("qpos", "qvel", "qacc", "qacc_warmstart", "sensordata", "ctrl"):
            assert np.array_equal(getattr(pd, name), getattr(fd, name)), name
        assert pd.time == fd.time and pd.ncon == fd.ncon
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        contacts += pd.ncon
    assert contacts > 30  # the box touched the floor (and the arm) throughout
    assert np.abs(plain.data._data.qpos[2:5] - [0.45, 0.05, 0.05]).max() > 1e-3  # pushed


def test_fused_substeps_refuse_other_integrators_and_old_mujoco(monkeypatch):
    """The split step (mj_forward, checks, mj_step2) equals robosuite's loop only with Euler
    and an idempotent ``mj_forward`` (MuJoCo >= 3.3.6): otherwise refused, and the LIBERO slot
    falls back to robosuite's loop (``supports``)."""
    mujoco = pytest.importorskip("mujoco")
    euler, rk4 = _Sim(mujoco), _Sim(mujoco, integrator="RK4")
    for version, ok in [("3.3.5", False), ("3.3.6", True), ("3.10.0", True), ("2.3.7", False),
                        ("4.0.0rc1", True)]:
        monkeypatch.setattr(mujoco, "__version__", version)
        assert FusedSubsteps.supports(euler) is ok, version
        assert not FusedSubsteps.supports(rk4)
    with pytest.raises(ValueError, match="Euler integrator and MuJoCo >= 3.3.6"):
        FusedSubsteps(rk4)
    monkeypatch.setattr(mujoco, "__version__", "3.3.0")
    with pytest.raises(ValueError, match="MuJoCo 3.3.0"):
        FusedSubsteps(euler)
