"""MuJoCo's split step for robosuite envs: one kinematics / collision pass per physics substep.

:class:`FusedSubsteps` wraps robosuite's ``MujocoEnv.step`` (the LIBERO adapter steps every
env inside it); the trajectory is bitwise robosuite's own (tests/envs/test_mujoco_substeps.py,
and tests/envs/test_libero.py on real LIBERO scenes).
"""

from __future__ import annotations

import functools
import re

#: MuJoCo 3.3.6 moved the solver's warm-start update from ``mj_forward`` to ``mj_step``
#: (changelog: "makes mj_forward fully idempotent"); :class:`FusedSubsteps` relies on it
FUSED_MIN_MUJOCO = (3, 3, 6)


class FusedSubsteps:
    """Context: run robosuite's physics substeps with one kinematics / collision pass each.

    robosuite's ``MujocoEnv.step`` runs, per physics substep, ``sim.forward()``, the
    controller (whose ``update`` calls ``sim.forward()`` again on the same state and controls)
    and ``sim.step()`` (``mj_step``, a third forward pass, then integration).  The three passes
    recompute the same positions, contacts and velocities: ~0.17 ms of collision detection
    each on a LIBERO scene, two thirds of a step's physics.  Inside this context a ``forward``
    is ``mj_forward``, except a second one before the substep's ``step``, which is skipped (in
    robosuite's loop only the controller runs there: it forwards, reads positions, Jacobians,
    the mass matrix and bias forces, and writes the controls after its forward, so it reads
    what the first pass computed), and a ``step`` after a ``forward`` is ``mj_step``'s checks followed
    by ``mj_step2`` (actuation, acceleration, constraints with the new controls, Euler
    integration) instead of a second full pass.  ``mj_step`` is checks, ``mj_forward`` and the
    same integration, so the trajectory is bitwise the same (tests/envs/test_libero.py
    compares it over an expert episode with grasps); a ``forward`` after the substeps (in
    rewards or observations) is a full ``mj_forward`` as before.  Only with the Euler
    integrator (RK4 would differ) and MuJoCo >= :data:`FUSED_MIN_MUJOCO`: before 3.3.6 every
    ``mj_forward`` advanced the solver's warm start, so robosuite's extra passes changed the
    next step in the last bits.

    ``sim``: robosuite's ``MjSim`` of the env, fetched afresh for every step (a hard reset
    rebuilds it).  Its instance gets ``forward`` / ``step`` attributes for the duration.
    """

    def __init__(self, sim):
        import mujoco

        self.sim = sim
        self._mj = mujoco
        self._m, self._d = sim.model._model, sim.data._data
        if not self.supports(sim):
            raise ValueError(
                "FusedSubsteps needs the Euler integrator and MuJoCo >= "
                f"{'.'.join(map(str, FUSED_MIN_MUJOCO))} (the split step equals robosuite's "
                f"loop only then), got integrator {self._m.opt.integrator} and MuJoCo "
                f"{mujoco.__version__}")
        self._ready = False      # data are mj_forward's for the current state and controls
        self._checked = (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL)

    @staticmethod
    def supports(sim) -> bool:
        """Whether ``sim``'s model integrates with Euler (LIBERO's scenes all do) and MuJoCo's
        ``mj_forward`` is idempotent (>= :data:`FUSED_MIN_MUJOCO`)."""
        import mujoco

        return (_idempotent_forward(mujoco.__version__)
                and sim.model._model.opt.integrator == mujoco.mjtIntegrator.mjINT_EULER)

    def forward(self) -> None:
        if not self._ready:
            self._mj.mj_forward(self._m, self._d)
            self._ready = True

    def step(self, with_udd: bool = True) -> None:
        mj, m, d = self._mj, self._m, self._d
        if not self._ready:   # no forward since the last step: mj_step as it is
            mj.mj_step(m, d)
            return
        # mj_step's checks; one that resets a bad state invalidates the forward before it
        bad = [d.warning[w].number for w in self._checked]
        mj.mj_checkPos(m, d)
        mj.mj_checkVel(m, d)
        if [d.warning[w].number for w in self._checked] != bad:
            mj.mj_forward(m, d)
        mj.mj_step2(m, d)
        self._ready = False

    def __enter__(self):
        self.sim.forward, self.sim.step = self.forward, self.step
        return self

    def __exit__(self, *exc) -> None:
        del self.sim.forward, self.sim.step


@functools.cache  # called on every env step: parse each version string once
def _idempotent_forward(version: str) -> bool:
    """Whether MuJoCo ``version`` is at least :data:`FUSED_MIN_MUJOCO`."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3]) >= FUSED_MIN_MUJOCO
