"""pirl's built-in tabletop benchmark (see :mod:`pirl.envs.tabletop.sim`)."""

from pirl.envs.tabletop.expert import ScriptedExpert
from pirl.envs.tabletop.sim import TabletopEnv, hash_uniform
from pirl.envs.tabletop.tasks import (COLOURS, EDGES, FAMILIES, SHAPES, TaskSpec, all_tasks,
                                      build_tasks)



def make_env(name: str = "tabletop", num_envs: int = 64, **kwargs) -> TabletopEnv:
    """Registry entry: ``"tabletop"`` or ``"tabletop/<split>"`` (``train``, ``ood``, ``all``);
    ``kwargs`` go to :class:`TabletopEnv`."""
    variant = name.replace(":", "/").split("/", 1)[1] if "/" in name.replace(":", "/") else ""
    if variant:
        kwargs["split"] = variant
    return TabletopEnv(num_envs, **kwargs)


__all__ = ["make_env", "TabletopEnv", "ScriptedExpert", "TaskSpec", "build_tasks", "all_tasks",
           "hash_uniform", "COLOURS", "SHAPES", "EDGES", "FAMILIES"]
