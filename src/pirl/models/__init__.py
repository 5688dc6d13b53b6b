"""VLA policies.  :func:`build_policy` builds one by registry name.

Registered: ``"tiny"`` (:class:`pirl.models.tiny_vla.TinyVLA`).  Other models register with
:func:`register_policy` (a factory taking the config as keyword arguments).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pirl.models.base import FlowPolicy, VelocityOut, flow_matching_loss, sample_flow_time
from pirl.models.tokenizer import WordTokenizer, vocab_from_texts
from pirl.models.tiny_vla import TinyPrefix, TinyVLA, TinyVLAConfig

_REGISTRY: dict[str, Callable[..., FlowPolicy]] = {}


def register_policy(name: str, factory: Callable[..., FlowPolicy] | None = None):
    """Register ``factory(**cfg) -> FlowPolicy`` under ``name`` (usable as a decorator)."""
    def deco(f: Callable[..., FlowPolicy]) -> Callable[..., FlowPolicy]:
        _REGISTRY[name] = f
        return f
    return deco(factory) if factory is not None else deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def build_policy(name: str, **cfg: Any) -> FlowPolicy:
    """Build policy ``name`` from keyword config; ``build_policy(n, **p.get_config())`` rebuilds p.

    Raises ValueError for an unknown name or an unknown / bad config field.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {available_policies()}")
    return _REGISTRY[name](**cfg)


def _build_tiny(**cfg: Any) -> TinyVLA:
    """``TinyVLA(TinyVLAConfig(**cfg))``; ``vocabulary`` is accepted as an alias of ``vocab``."""
    if "vocabulary" in cfg:
        if "vocab" in cfg:
            raise ValueError("give either vocab or vocabulary, not both")
        cfg["vocab"] = list(cfg.pop("vocabulary"))
    known = {f.name for f in dataclasses.fields(TinyVLAConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown TinyVLA config field(s) {unknown}; known: {sorted(known)}")
    return TinyVLA(TinyVLAConfig(**cfg))


register_policy("tiny", _build_tiny)

__all__ = ["FlowPolicy", "VelocityOut", "flow_matching_loss", "sample_flow_time", "WordTokenizer",
           "vocab_from_texts", "TinyPrefix", "TinyVLA", "TinyVLAConfig", "register_policy",
           "available_policies", "build_policy"]


def _build_real(kind: str):
    """Factories for the real VLAs: ``build_policy("pi0", path=<checkpoint folder>, **overrides)``
    loads a checkpoint; without ``path`` a random-init model is built from ``arch`` (a config
    object; default: the real size) and ``tokenizer`` (an object or a local folder / file)."""
    def factory(path: str | None = None, arch: Any = None, tokenizer: Any = None, **kw: Any):
        from pirl.models import checkpoint_io as io
        from pirl.models.pi0 import Pi0Policy, pi0_config, pi05_config
        from pirl.models.smolvla import SmolVLAConfig, SmolVLAPolicy
        from pirl.models.vla_tokenizer import load_tokenizer

        if path is not None:
            load = io.load_smolvla if kind == "smolvla" else io.load_pi0
            return load(path, arch=arch, tokenizer=tokenizer, **kw)
        if tokenizer is None:
            raise ValueError(f"{kind}: pass path=<checkpoint folder> or tokenizer=")
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if kind == "smolvla":
            return SmolVLAPolicy(arch or SmolVLAConfig(**kw), tok)
        return Pi0Policy(arch or (pi05_config if kind == "pi05" else pi0_config)(**kw), tok)
    return factory


for _kind in ("pi0", "pi05", "smolvla"):
    register_policy(_kind, _build_real(_kind))
