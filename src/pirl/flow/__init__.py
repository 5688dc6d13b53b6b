"""Samplers: turn a policy's velocity field into action chunks with exact log-probs.

- :class:`ODESampler` (deterministic Euler, evaluation),
- :class:`FlowNoiseSampler` (learned per-dimension noise, joint log-likelihood),
- :class:`FlowSDESampler` (marginal-preserving SDE, joint or hybrid ODE/SDE).

Build one with :func:`build_sampler` or :meth:`SamplerConfig.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pirl.flow.base import Chain, Sampler
from pirl.flow.common import GaussianChainSampler, gaussian_logp, standard_normal_logp
from pirl.flow.flow_noise import FlowNoiseSampler, NoiseNet
from pirl.flow.flow_sde import FlowSDESampler
from pirl.flow.ode import ODESampler
from pirl.flow.schedule import time_grid

SAMPLER_KINDS = ("ode", "flow_noise", "flow_sde")


@dataclass
class SamplerConfig:
    """Sampler settings (a config section).  ``__post_init__`` raises ValueError naming the field.

    kind: ``"ode" | "flow_noise" | "flow_sde"``; num_steps: K denoise steps.
    noise_level: Flow-SDE's a.  min_std / max_std / noise_hidden / detach_features: Flow-Noise.
    hybrid / stochastic_steps / exclude_last / shared_across_batch: Flow-SDE (see
    :class:`FlowSDESampler`).
    """

    kind: str = "flow_noise"
    num_steps: int = 4
    noise_level: float = 0.5
    min_std: float = 0.08
    max_std: float = 0.16
    noise_hidden: int = 128
    detach_features: bool = False
    hybrid: bool = True
    stochastic_steps: list[int] | None = None
    exclude_last: bool = False
    shared_across_batch: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {list(SAMPLER_KINDS)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level: must be > 0, got {self.noise_level}")
        if not self.min_std > 0:
            raise ValueError(f"min_std: must be > 0, got {self.min_std}")
        if not self.max_std >= self.min_std:
            raise ValueError(f"max_std: must be >= min_std ({self.min_std}), got {self.max_std}")
        if self.noise_hidden < 1:
            raise ValueError(f"noise_hidden: must be >= 1, got {self.noise_hidden}")
        if self.stochastic_steps is not None:
            steps = list(self.stochastic_steps)
            if not steps or any(not 0 <= s < self.num_steps for s in steps):
                raise ValueError(f"stochastic_steps: must be a non-empty subset of "
                                 f"[0, {self.num_steps}), got {self.stochastic_steps}")
            if not self.hybrid:
                raise ValueError("stochastic_steps: only valid with hybrid=true")
            if self.exclude_last and self.num_steps - 1 in steps:
                raise ValueError("stochastic_steps: contains the last step but exclude_last=true")
        if self.exclude_last and self.num_steps < 2 and self.kind == "flow_sde":
            raise ValueError("exclude_last: needs num_steps >= 2")

    def build(self, feature_dim: int, action_dim: int) -> Sampler:
        """The sampler this config describes, for a policy with the given feature / action dims."""
        return build_sampler(self.kind, self.num_steps, feature_dim, action_dim, config=self)


_KW = {
    "ode": set(),
    "flow_noise": {"min_std", "max_std", "noise_hidden", "detach_features"},
    "flow_sde": {"noise_level", "hybrid", "stochastic_steps", "exclude_last",
                 "shared_across_batch"},
}
_ALL_KW = set().union(*_KW.values())


def build_sampler(kind: str, num_steps: int, feature_dim: int, action_dim: int,
                  config: SamplerConfig | None = None, **kw: Any) -> Sampler:
    """Build a sampler by kind.

    Options come from ``config`` (a :class:`SamplerConfig`, whose own kind / num_steps are
    overridden by the arguments), then from ``kw``.  Options meant for another kind are ignored
    (so one config can drive all three); unknown options raise ValueError.
    """
    if config is not None:
        opts = {f: getattr(config, f) for f in sorted(_ALL_KW)}
        opts.update(kw)
        kw = opts
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {list(SAMPLER_KINDS)}")
    unknown = set(kw) - _ALL_KW
    if unknown:
        raise ValueError(f"unknown sampler option(s) {sorted(unknown)}; known: {sorted(_ALL_KW)}")
    opts = {k: v for k, v in kw.items() if k in _KW[kind]}
    if kind == "ode":
        return ODESampler(num_steps)
    if kind == "flow_noise":
        if "noise_hidden" in opts:
            opts["hidden"] = opts.pop("noise_hidden")
        return FlowNoiseSampler(num_steps, feature_dim, action_dim, **opts)
    return FlowSDESampler(num_steps, **opts)


__all__ = ["Chain", "Sampler", "GaussianChainSampler", "ODESampler", "FlowNoiseSampler",
           "NoiseNet", "FlowSDESampler", "SamplerConfig", "build_sampler", "time_grid",
           "gaussian_logp", "standard_normal_logp", "SAMPLER_KINDS"]
