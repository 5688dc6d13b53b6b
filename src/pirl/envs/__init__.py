"""Batched environments and the environment registry.

``make_env(name, num_envs, **kwargs)`` builds any registered :class:`~pirl.envs.base.BatchedEnv`.
The registry key is the part of ``name`` before the first ``/`` or ``:``; the whole name goes to
the factory, which may read a variant from it:

- ``"tabletop"`` (or ``"tabletop/ood"``, ``"tabletop/all"``: the split): pirl's built-in torch
  benchmark (:class:`pirl.envs.tabletop.TabletopEnv`);
- ``"maniskill"`` (``"maniskill/PickCube-v1"``, ``"maniskill_multitask"`` ...):
  ``pirl.envs.maniskill:make_env`` (needs the ``maniskill`` extra);
- ``"libero"`` (``"libero/libero_spatial"`` ...): ``pirl.envs.libero:make_env`` (needs the
  ``libero`` extra);
- ``"metaworld"`` (``"metaworld/mt10"``, ``"metaworld/pick-place-v3"`` ...; MT50 by default):
  ``pirl.envs.metaworld:make_env`` (needs the ``metaworld`` extra).

Entries are ``"module:function"`` strings imported on first use, so a missing simulator package
only fails when that environment is requested.  Every factory is called as
``factory(name, num_envs=num_envs, **kwargs)``; :func:`register_env` adds entries.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pirl.envs.base import BatchedEnv, ChunkedEnv, ChunkStep, Step

Factory = Callable[..., BatchedEnv]

ENV_REGISTRY: dict[str, str | Factory] = {
    "tabletop": "pirl.envs.tabletop:make_env",
    "maniskill": "pirl.envs.maniskill:make_env",
    "maniskill_multitask": "pirl.envs.maniskill:make_env",
    "libero": "pirl.envs.libero:make_env",
    "metaworld": "pirl.envs.metaworld:make_env",
}


def register_env(name: str, factory: str | Factory) -> None:
    """Register ``factory(name, num_envs=..., **kwargs)`` (or a lazy ``"module:function"``)."""
    ENV_REGISTRY[name] = factory


def env_key(name: str) -> str:
    """Registry key of an env name: the part before the first ``/`` or ``:``."""
    return name.replace(":", "/").split("/", 1)[0]


def _resolve(name: str) -> Factory:
    key = env_key(name)
    if key not in ENV_REGISTRY:
        raise KeyError(f"unknown env {name!r}; registered: {sorted(ENV_REGISTRY)}")
    entry = ENV_REGISTRY[key]
    if callable(entry):
        return entry
    module, _, attr = entry.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"env {name!r} needs {module}, which failed to import ({e}); "
                          f"install the matching extra, e.g. pip install 'pirl[{key}]'") from e
    return getattr(mod, attr)


def make_env(name: str, num_envs: int, **kwargs: Any) -> BatchedEnv:
    """Build the registered environment ``name`` with ``num_envs`` parallel envs."""
    return _resolve(name)(name, num_envs=num_envs, **kwargs)


__all__ = ["BatchedEnv", "ChunkedEnv", "ChunkStep", "Step", "ENV_REGISTRY", "env_key",
           "make_env", "register_env"]
