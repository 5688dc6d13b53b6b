"""pirl's built-in tabletop benchmark (see :mod:`pirl.envs.tabletop.sim`)."""

from pirl.envs.tabletop.expert import ScriptedExpert
from pirl.envs.tabletop.sim import TabletopEnv, hash_uniform
from pirl.envs.tabletop.tasks import (COLOURS, EDGES, FAMILIES, SHAPES, TaskSpec, all_tasks,
                                      build_tasks)

__all__ = ["TabletopEnv", "ScriptedExpert", "TaskSpec", "build_tasks", "all_tasks",
           "hash_uniform", "COLOURS", "SHAPES", "EDGES", "FAMILIES"]
