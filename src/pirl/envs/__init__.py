"""Batched environments and the environment registry.

``make_env(name, num_envs, **kwargs)`` builds any registered :class:`~pirl.envs.base.BatchedEnv`:

- ``"tabletop"``: pirl's built-in torch benchmark (:class:`pirl.envs.tabletop.TabletopEnv`);
- ``"maniskill"``: ``pirl.envs.maniskill:make_env`` (needs the ``maniskill`` extra);
- ``"libero"``: ``pirl.envs.libero:make_env`` (needs the ``libero`` extra).

Entries are ``"module:function"`` strings imported on first use, so a missing simulator package
only fails when that environment is requested.  :func:`register_env` adds entries.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pirl.envs.base import BatchedEnv, ChunkedEnv, ChunkStep, Step

ENV_REGISTRY: dict[str, str | Callable[..., BatchedEnv]] = {
    "tabletop": "pirl.envs.tabletop:TabletopEnv",
    "maniskill": "pirl.envs.maniskill:make_env",
    "libero": "pirl.envs.libero:make_env",
}


def register_env(name: str, factory: str | Callable[..., BatchedEnv]) -> None:
    """Register ``factory(num_envs=..., **kwargs)`` (or a lazy ``"module:attr"``) under name."""
    ENV_REGISTRY[name] = factory


def _resolve(name: str) -> Callable[..., BatchedEnv]:
    if name not in ENV_REGISTRY:
        raise KeyError(f"unknown env {name!r}; registered: {sorted(ENV_REGISTRY)}")
    entry = ENV_REGISTRY[name]
    if callable(entry):
        return entry
    module, _, attr = entry.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"env {name!r} needs {module}, which failed to import ({e}); "
                          f"install the matching extra, e.g. pip install 'pirl[{name}]'") from e
    return getattr(mod, attr)


def make_env(name: str, num_envs: int, **kwargs: Any) -> BatchedEnv:
    """Build the registered environment ``name`` with ``num_envs`` parallel envs."""
    return _resolve(name)(num_envs=num_envs, **kwargs)


__all__ = ["BatchedEnv", "ChunkedEnv", "ChunkStep", "Step", "ENV_REGISTRY", "make_env",
           "register_env"]
