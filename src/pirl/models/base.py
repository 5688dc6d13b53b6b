"""The policy interface every flow-matching VLA in pirl implements.

Conventions (pi0 / openpi):

- ``t = 1`` is pure noise, ``t = 0`` is the action.  ``x_t = t * eps + (1 - t) * a``.
- The network predicts the velocity ``v(x_t, t) ~ eps - a`` (so ``dx/dt = v`` and integrating
  from ``t=1`` down to ``t=0`` with ``x_{t-dt} = x_t - v * dt`` turns noise into an action).
- Training times are drawn from a Beta distribution (pi0: ``t = 0.999 * Beta(1.5, 1) + 0.001``),
  which puts more weight on the noisy end.

A policy splits into

- a **prefix** (images + instruction + proprio state -> context), computed once per env step and
  cached: :meth:`FlowPolicy.encode_prefix`;
- an **action expert**: the velocity field over an action chunk ``[B, H, A]`` given the cached
  prefix: :meth:`FlowPolicy.velocity`, which also returns the expert's per-token features
  ``[B, H, D]`` (what the Flow-Noise noise network and an expert-side value head read);
- a **value head** (critic): :meth:`FlowPolicy.value`, reading either the prefix features or the
  action expert's features (configurable per model);
- the flow-matching SFT loss: :meth:`FlowPolicy.sft_loss`.

Observations are batched dicts (see :mod:`pirl.envs.base`): ``images [B, C, 3, H, W] uint8``,
``state [B, S] float32``, ``instruction: list[str]`` of length B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Obs = dict[str, Any]


@dataclass
class VelocityOut:
    """Output of one action-expert evaluation.

    velocity: ``[B, H, A]`` predicted ``eps - a``.
    features: ``[B, H, D]`` the expert's last hidden states (``D = policy.feature_dim``).
    """

    velocity: torch.Tensor
    features: torch.Tensor


def sample_flow_time(batch: int, *, generator: torch.Generator | None = None, device=None,
                     alpha: float = 1.5, beta: float = 1.0, t_min: float = 0.001) -> torch.Tensor:
    """pi0's training-time distribution: ``t = (1 - t_min) * Beta(alpha, beta) + t_min``, ``[B]``.

    Sampled through two Gamma draws so that a ``torch.Generator`` makes it reproducible.
    """
    # Beta(a, b) = Ga / (Ga + Gb); torch's _standard_gamma takes no generator, so use the
    # inverse-CDF for the default Beta(1.5, 1): F(x) = x^1.5 -> x = u^(1/1.5).  General (alpha, 1)
    # also has a closed form; other shapes fall back to torch.distributions (global RNG).
    if beta == 1.0:
        u = torch.rand(batch, generator=generator, device=device)
        b = u.pow(1.0 / alpha)
    else:
        b = torch.distributions.Beta(alpha, beta).sample((batch,)).to(device)
    return (1.0 - t_min) * b + t_min


def flow_matching_loss(policy: "FlowPolicy", prefix: Any, actions: torch.Tensor,
                       noise: torch.Tensor | None = None, time: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Conditional flow-matching loss ``|| v(x_t, t) - (eps - a) ||^2`` averaged over the batch.

    actions: ``[B, H, A]``; noise: ``[B, H, A]`` (drawn if None); time: ``[B]`` (Beta if None);
    mask: optional ``[B, H, A]`` or ``[B, H]`` weights (1 = counts), e.g. for padded chunks.
    """
    b = actions.shape[0]
    if noise is None:
        noise = torch.randn(actions.shape, generator=generator, device=actions.device,
                            dtype=actions.dtype)
    if time is None:
        time = sample_flow_time(b, generator=generator, device=actions.device).to(actions.dtype)
    tt = time.view(b, 1, 1)
    x_t = tt * noise + (1.0 - tt) * actions
    target = noise - actions
    v = policy.velocity(prefix, x_t, time).velocity.to(target.dtype)
    err = (v - target).pow(2)
    if mask is None:
        return err.mean()
    if mask.dim() == 2:
        mask = mask.unsqueeze(-1).expand_as(err)
    mask = mask.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


class FlowPolicy(nn.Module):
    """Abstract flow-matching VLA.  Subclasses set ``action_horizon`` (H), ``action_dim`` (A)
    and ``feature_dim`` (D) and implement the three abstract methods.
    """

    action_horizon: int
    action_dim: int
    feature_dim: int
    #: the dtype the policy's matmuls / convolutions / attention run in under autocast (None:
    #: its parameters' own, float32); set with :meth:`set_precision` (the run's ``precision``).
    #: Whatever it is, the methods below return float32 velocities, features and values: the
    #: precision boundary is this interface (docs/method.md, "Precision")
    autocast_dtype: torch.dtype | None = None

    def set_precision(self, dtype: torch.dtype | None) -> "FlowPolicy":
        """Run the forward passes under ``torch.autocast(dtype)`` (None: no autocast)."""
        self.autocast_dtype = dtype
        return self

    def autocast(self, device: Any = None):
        """The context the policy's forward passes run in (see :attr:`autocast_dtype`)."""
        from pirl.models.precision import autocast

        if device is None:
            p = next(self.parameters(), None)
            device = p.device if p is not None else "cpu"
        return autocast(device, self.autocast_dtype)

    def encode_prefix(self, obs: Obs) -> Any:
        """Run the prefix (VLM) once for a batch of observations; return a cache object that
        :meth:`velocity` and :meth:`value` accept.  The cache must support
        :meth:`prefix_index` (row selection) so runners can minibatch it."""
        raise NotImplementedError

    def velocity(self, prefix: Any, x_t: torch.Tensor, t: torch.Tensor) -> VelocityOut:
        """Action-expert velocity.  x_t: ``[B, H, A]``; t: ``[B]`` in (0, 1]."""
        raise NotImplementedError

    def value(self, prefix: Any) -> torch.Tensor:
        """Critic estimate ``[B]`` of the return from this observation (chunk-level MDP)."""
        raise NotImplementedError

    def critic_parameter_names(self) -> list[str]:
        """Names of the value head's parameters (own learning rate in PPO; unused by GRPO).
        Default: parameters whose name starts with ``value_``."""
        return [n for n, _ in self.named_parameters() if n.startswith("value_")]

    def prefix_parameter_names(self) -> list[str]:
        """Names of the prefix (VLM) parameters, frozen by RL's ``train_mode="expert_only"``
        (pi_RL's default: only the action expert, the noise net and the critic train).
        Policies that support that mode override this."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its prefix "
                                  "parameters; use rl.train_mode=full")

    def frozen_prefix(self, prefix: Any) -> Any | None:
        """The part of a prefix cache that only the prefix parameters compute, for learners that
        keep it from the rollout while those parameters are frozen (``rl.train_mode=expert_only``)
        instead of re-encoding every observation in every update epoch.  It must be a (nested)
        batch of tensors (:func:`index_batch` / :func:`cat_batch` work on it).  Default: None, the
        learner re-encodes the observations."""
        return None

    def thaw_prefix(self, frozen: Any) -> Any:
        """A full prefix cache from :meth:`frozen_prefix`'s output, computing the parts that
        depend on trainable (action-expert) parameters with their current values."""
        raise NotImplementedError(f"{type(self).__name__} keeps no frozen prefix")

    def prefix_index(self, prefix: Any, index: torch.Tensor) -> Any:
        """Rows ``index`` of a prefix cache (default: index every tensor / list field)."""
        return index_batch(prefix, index)

    def postprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """A sampled model-space chunk ``[B, H, A]`` -> the env's actions ``[B, H, A_env]``
        (unnormalised).  Runners apply this to every chunk they send to an env; the log-probs
        stay in model space.  Default: identity."""
        return actions

    def preprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """An env-space chunk ``[B, H, A_env]`` -> the model's action space ``[B, H, A]``
        (normalised, padded), the inverse of :meth:`postprocess_actions`: what a flow-matching
        loss on env-space demo actions must see.  Default: identity."""
        return actions

    def fit_normalization(self, state: torch.Tensor | None, actions: torch.Tensor,
                          mask: torch.Tensor | None = None) -> bool:
        """Set the policy's state / action normaliser from SFT data (``state [M, S]``, env-space
        ``actions [M, H, A_env]``, validity ``mask [M, H]``) before few-shot SFT.  Return whether
        anything was fitted.  Default: the policy keeps no fitted normaliser (False)."""
        return False

    def sft_loss(self, obs: Obs, actions: torch.Tensor, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 time: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss on a batch of (obs, action chunk ``[B, H, A]``); ``noise``
        (model action space ``[B, H, A]``) and ``time [B]``: drawn from ``generator`` if None."""
        return flow_matching_loss(self, self.encode_prefix(obs), actions, mask=mask,
                                  generator=generator, noise=noise, time=time)


def index_batch(x: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` of a (nested) batch: tensors, lists, tuples, dicts, dataclasses."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x.index_select(0, index.to(x.device))
    if isinstance(x, dict):
        return {k: index_batch(v, index) for k, v in x.items()}
    if isinstance(x, list):
        return [x[i] for i in index.tolist()]
    if isinstance(x, tuple):
        return tuple(index_batch(v, index) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: index_batch(getattr(x, f.name), index)
                                         for f in dataclasses.fields(x)})
    return x


def cat_batch(items: list[Any]) -> Any:
    """Concatenate (nested) batches along dim 0: tensors, dicts, lists, tuples, dataclasses
    (the inverse of :func:`index_batch` over a split); None fields stay None."""
    import dataclasses

    x = items[0]
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return torch.cat(items, dim=0)
    if isinstance(x, dict):
        return {k: cat_batch([it[k] for it in items]) for k in x}
    if isinstance(x, list):
        return [v for it in items for v in it]
    if isinstance(x, tuple):
        return tuple(cat_batch([it[j] for it in items]) for j in range(len(x)))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: cat_batch([getattr(it, f.name) for it in items])
                                         for f in dataclasses.fields(x)})
    raise TypeError(f"cannot concatenate batches of {type(x).__name__}")


def to_device(x: Any, device: Any) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device)
                                         for f in dataclasses.fields(x)})
    return x


def first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor inside a (nested) batch or prefix cache (for batch size, device, dtype)."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        items = list(x.values())
    elif isinstance(x, (list, tuple)):
        items = list(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = [getattr(x, f.name) for f in dataclasses.fields(x)]
    else:
        return None
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None
