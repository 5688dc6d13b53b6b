"""The language-task family of the tabletop benchmark and its train / OOD split.

A task is a tuple ``(family, colour, shape, target)``:

- ``pick_place``: "put the {colour} {shape} on the {target} plate" (target: a plate colour);
- ``push``: "push the {colour} {shape} to the {target} edge" (target: left / right / top / bottom);
- ``stack``: "stack the {colour} {shape} on the {target} cube" (target: the base cube's colour,
  always different from the object's colour).

**Split.**  For every family the ``(shape, target)`` pairs are divided between the splits: in each
family, for every shape, exactly one target is held out (a Latin pattern, so every shape and every
target occurs in both splits, but never together).  The ``ood`` split is every task whose
``(shape, target)`` pair is held out, ``train`` is the rest, ``all`` is both.  Hence the two splits
share no (object, target) combination, neither as (shape, target) nor as (colour + shape, target),
like the IND / OOD split of pi_RL's ManiSkill benchmark: an OOD task can only be solved by
composing a known object word with a known target word in a new way.
"""

from __future__ import annotations

from dataclasses import dataclass

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("cube", "disc", "triangle")
EDGES: tuple[str, ...] = ("left", "right", "top", "bottom")
FAMILIES: tuple[str, ...] = ("pick_place", "push", "stack")
DEFAULT_FAMILIES: tuple[str, ...] = ("pick_place", "push")
SPLITS: tuple[str, ...] = ("train", "ood", "all")

# Unit direction of each edge in table coordinates (x right, y up).
EDGE_DIRECTIONS: tuple[tuple[float, float], ...] = (
    (-1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, -1.0))


@dataclass(frozen=True)
class TaskSpec:
    """One language task.  ``target`` indexes COLOURS (pick_place, stack) or EDGES (push)."""

    family: str
    colour: int
    shape: int
    target: int

    @property
    def family_index(self) -> int:
        return FAMILIES.index(self.family)

    @property
    def object_name(self) -> str:
        return f"{COLOURS[self.colour]} {SHAPES[self.shape]}"

    @property
    def target_name(self) -> str:
        if self.family == "push":
            return f"{EDGES[self.target]} edge"
        if self.family == "stack":
            return f"{COLOURS[self.target]} cube"
        return f"{COLOURS[self.target]} plate"

    @property
    def name(self) -> str:
        """A stable identifier, e.g. ``pick_place/red_cube/blue_plate``."""
        obj, target = self.object_name.replace(" ", "_"), self.target_name.replace(" ", "_")
        return f"{self.family}/{obj}/{target}"

    @property
    def instruction(self) -> str:
        """The natural-language instruction given to the policy."""
        if self.family == "push":
            return f"push the {self.object_name} to the {self.target_name}"
        if self.family == "stack":
            return f"stack the {self.object_name} on the {self.target_name}"
        return f"put the {self.object_name} on the {self.target_name}"

    @property
    def split(self) -> str:
        """``"ood"`` if this task's (shape, target) pair is held out, else ``"train"``."""
        return "ood" if is_held_out(self.family, self.shape, self.target) else "train"


def _num_targets(family: str) -> int:
    return len(EDGES) if family == "push" else len(COLOURS)


def is_held_out(family: str, shape: int, target: int) -> bool:
    """Whether the ``(shape, target)`` pair of ``family`` belongs to the OOD split.

    For shape ``s`` the held-out target is ``(s + offset_f) % num_targets`` with a per-family
    offset, so each shape has exactly one held-out target and held-out targets differ per shape.
    """
    offset = {"pick_place": 1, "push": 2, "stack": 3}[family]
    return target == (shape + offset) % _num_targets(family)


def all_tasks(families: tuple[str, ...] | list[str] = FAMILIES) -> list[TaskSpec]:
    """Every task of the given families (both splits), in a fixed order."""
    out = []
    for fam in FAMILIES:
        if fam not in families:
            continue
        for c in range(len(COLOURS)):
            for s in range(len(SHAPES)):
                for t in range(_num_targets(fam)):
                    if fam == "stack" and t == c:  # the base cube has another colour
                        continue
                    out.append(TaskSpec(fam, c, s, t))
    return out


def build_tasks(split: str = "train",
                families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES) -> list[TaskSpec]:
    """The tasks of ``split`` ("train", "ood" or "all") restricted to ``families``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {FAMILIES}")
    tasks = all_tasks(tuple(families))
    if split == "all":
        return tasks
    return [t for t in tasks if t.split == split]
