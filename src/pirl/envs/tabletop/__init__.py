"""pirl's built-in tabletop benchmark: language-conditioned pick-and-place, push and stack in a
vectorised torch simulator that renders its own small RGB images.

Quick start::

    from pirl.envs import make_env, ChunkedEnv
    env = make_env("tabletop", 64)              # train split, 1 camera, 64 px, 48 steps
    obs = env.reset(seed=0)                     # images [64, 1, 3, 64, 64] uint8, state [64, 4]
    step = env.step(torch.zeros(64, 3))         # actions (dx, dy, grip) in [-1, 1]

**Scene.**  A table ``[-1, 1]^2`` seen from above; a two-finger gripper at table height; three
objects (cube / disc / triangle in red / green / blue / yellow) -- the task's object, a
distractor of the same colour and one of the same shape -- and two coloured plates.  The darker
band along the border is the "edge" zone (``|x|`` or ``|y| > 0.75``).

**Tasks** (:mod:`~pirl.envs.tabletop.tasks`): ``pick_place`` "put the red cube on the blue
plate" (48 tasks), ``push`` "push the green disc to the left edge" (48), ``stack`` "stack the
yellow triangle on the red cube" (36).  Default families: pick_place + push.  The ``ood`` split
holds out one target per (family, shape), so train and OOD share no (object, target) pair
(train / OOD: 36 / 12 pick_place, 36 / 12 push, 27 / 9 stack).

**Dynamics** (:mod:`~pirl.envs.tabletop.sim`): the gripper moves ``0.1 * (dx, dy)`` per step and
is closed while ``grip > 0``; closing next to an object grasps it (it is carried), opening drops
it; an empty gripper pushes objects it moves into.  Sparse reward 1 on success, which ends the
episode; ``reward="dense"`` adds potential-based shaping (``"progress"``: of the object's goal
distance only).

**Expert** (:class:`ScriptedExpert`): a reactive controller on privileged state; 100 % success on
every family without noise, >= 97 % with action noise std 0.3; it needs ~18 steps for
pick_place / stack and ~26 for push (limit 48), a uniformly random policy ~0 %.

**Difficulty knobs**: ``num_distractors`` (2 default; 1 or 0 are easier), ``task_families``,
``max_episode_steps`` (48 = six chunks of 8), ``num_cameras=2`` (adds a gripper-centred view),
``reward="dense"`` / ``"progress"``.

**Rendering** (:mod:`~pirl.envs.tabletop.render`): precomputed sprites composited with one
``scatter_`` per layer into uint8 frames; a gripper-centred wrist view with ``num_cameras=2``.
"""

from pirl.envs.tabletop.expert import ScriptedExpert
from pirl.envs.tabletop.sim import TabletopEnv, hash_uniform
from pirl.envs.tabletop.tasks import (COLOURS, EDGES, FAMILIES, SHAPES, TaskSpec, all_tasks,
                                      build_tasks)


def make_env(name: str = "tabletop", num_envs: int = 64, **kwargs) -> TabletopEnv:
    """Registry entry: ``"tabletop"`` or ``"tabletop/<split>"`` (``train``, ``ood``, ``all``);
    ``kwargs`` go to :class:`TabletopEnv`."""
    parts = name.replace(":", "/").split("/", 1)
    if len(parts) == 2 and parts[1]:
        kwargs["split"] = parts[1]
    return TabletopEnv(num_envs, **kwargs)


__all__ = ["make_env", "TabletopEnv", "ScriptedExpert", "TaskSpec", "build_tasks", "all_tasks",
           "hash_uniform", "COLOURS", "SHAPES", "EDGES", "FAMILIES"]
