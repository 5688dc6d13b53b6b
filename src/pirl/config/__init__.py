"""pirl's configuration: the run schema, the YAML / override machinery, the named presets.

- :mod:`pirl.config.schema`   the typed dataclasses of a run (:class:`TrainConfig` and its sections);
- :mod:`pirl.config.loading`  YAML presets, dotted ``section.field=value`` overrides, validation
  (:class:`ConfigError` names the dotted field);
- ``pirl/config/presets/*.yaml``  named presets for ``pirl train --config NAME``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pirl.config.loading import (ConfigError, apply_overrides, from_dict, load_yaml, save_yaml,
                                 to_dict)

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "save_yaml", "to_dict",
           "presets_dir", "preset_names", "resolve_preset", "TrainConfig"]


def presets_dir() -> Path:
    """The folder of the named YAML presets (``pirl train --config NAME``)."""
    return Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_preset(name: str | None) -> str | None:
    """A ``--config`` value as a YAML path: a file as given, else the preset of that name.

    An unknown name raises :class:`ConfigError` suggesting the closest preset names."""
    if name is None or Path(name).exists():
        return name
    cand = presets_dir() / f"{name}.yaml"
    if cand.exists():
        return str(cand)
    names = preset_names()
    close = difflib.get_close_matches(Path(name).stem, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(f"--config: {name!r} is neither a file nor a preset; {hint}"
                      f"presets: {', '.join(names)}")


def __getattr__(name: str) -> Any:
    # The schema imports the algos / envs / flow packages; load it on first use so that
    # ``pirl.config.loading`` stays importable from anywhere without an import circle.
    if name == "TrainConfig":
        from pirl.config.schema import TrainConfig
        return TrainConfig
    raise AttributeError(f"module 'pirl.config' has no attribute {name!r}")
