"""Typed dataclass configs: YAML presets, dotted command-line overrides, validation.

A config is a tree of dataclasses.  :func:`from_dict` builds one from a (YAML) dict, checking
every key and value type; :func:`apply_overrides` applies ``section.field=value`` strings (values
parsed as YAML scalars); validation errors are :class:`ConfigError` naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the field (``rl.ppo.clip_low``)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check / convert ``value`` to the annotated type ``tp``; raise ConfigError naming path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    data = dict(data)
    for f in dataclasses.fields(cls):
        # a partial section starts from the parent's default for it (which may differ from the
        # section class's own defaults, e.g. TrainConfig's sampler kind); one level here, deeper
        # sections by the recursion; free-form dicts (env.kwargs) given are taken whole
        if f.name in data and isinstance(data[f.name], dict) \
                and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                data[f.name] = {**to_dict(default), **data[f.name]}
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ validation of a section
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict (YAML-safe) form of a dataclass config."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a new config with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form section.field=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            mark = getattr(e, "problem", None) or "not valid YAML"
            raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({mark})") from None
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"unknown config field {'.'.join(parts[:i + 1])!r}")
            node = node[p]
            if node is None:  # optional sub-dict
                node = {}
        if not isinstance(node, dict) or (parts[-1] not in node and not _is_free_dict(cfg, parts)):
            raise ConfigError(f"unknown config field {key!r}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _is_free_dict(cfg: Any, parts: list[str]) -> bool:
    """Whether ``parts[:-1]`` addresses a ``dict[str, Any]`` field (free-form kwargs)."""
    node: Any = cfg
    for p in parts[:-1]:
        node = getattr(node, p, None) if not isinstance(node, dict) else node.get(p)
    return isinstance(node, dict)


def load_yaml(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load a YAML preset into ``cls`` (missing fields take defaults), then apply overrides."""
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides or [])


def save_yaml(cfg: Any, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
