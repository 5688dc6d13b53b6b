"""PPO for flow-matching policies: log-prob aggregation, clipped policy loss, value loss, config.

The sampler (:class:`pirl.flow.base.Chain`) gives per-element Gaussian log-probs of every denoise
transition, ``step_logp [B, K, H, A]``, a mask ``stochastic [B, K]`` of the transitions that count
and the initial noise's ``init_logp [B, H, A]`` (counted by joint samplers only).
:func:`aggregate_logp` turns them into the log-prob PPO forms its ratio from; the granularity of
the ratio is configurable:

- ``mode``: how the counted denoise terms are combined per action element:
  ``"chain"`` sums them (the exact log-likelihood of the denoising chain),
  ``"chain_mean"`` averages them (RLinf's "token-mean" over denoise steps in joint mode).
- ``level``: how action elements are combined: ``"chunk"`` sums over the whole chunk ``-> [B]``
  (one ratio per chunk), ``"action"`` sums over action dims ``-> [B, H]`` (one ratio per executed
  action), ``"element"`` keeps ``[B, H, A]`` (one ratio per action dimension; RLinf's
  ``token_level``).  Default: ``"chunk"`` for ``"chain"``, ``"element"`` for ``"chain_mean"``.

:func:`policy_loss` and :func:`value_loss` broadcast advantages / masks over the ratio's trailing
dims, so ``advantages [B]`` work with any level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LogpMode = Literal["chain", "chain_mean"]
LogpLevel = Literal["chunk", "action", "element"]
LRSchedule = Literal["constant", "cosine", "linear"]
Truncation = Literal["bootstrap", "terminal"]

_LEVEL_DIMS = {"chunk": 1, "action": 2, "element": 3}


# --------------------------------------------------------------------------- log-prob aggregation
def default_level(mode: str) -> str:
    """The ratio granularity a mode uses when ``level`` is not given."""
    return "chunk" if mode == "chain" else "element"


def aggregate_logp(step_logp: torch.Tensor, stochastic: torch.Tensor,
                   init_logp: torch.Tensor | None = None, mode: LogpMode = "chain",
                   action_mask: torch.Tensor | None = None,
                   level: LogpLevel | None = None) -> torch.Tensor:
    """Combine a chain's per-element log-probs into PPO's log-prob (see module docstring).

    Per action element ``(h, a)`` the counted terms are the stochastic transitions
    ``step_logp[:, k]`` (``stochastic[:, k]``) plus ``init_logp`` when given (pass it only for
    joint samplers, ``sampler.includes_init``).  ``"chain"`` sums them; ``"chain_mean"`` divides
    the sum by their number ``n_k(b) + [init given]`` (0 terms give 0).  Since ``init_logp``
    does not depend on the parameters it cancels in ratios; in ``"chain_mean"`` it only changes
    the divisor.  Then elements outside ``action_mask`` are zeroed and the result is summed to the
    requested ``level``.

    Args:
        step_logp: ``[B, K, H, A]`` per-element transition log-probs.
        stochastic: ``[B, K]`` bool, which transitions count.
        init_logp: ``[B, H, A]`` or None.
        mode: ``"chain"`` | ``"chain_mean"``.
        action_mask: ``[H, A]`` or ``[B, H, A]`` (bool or 0/1): the executed horizon steps and
            env action dims of a padded model (None: all count).
        level: ``"chunk"`` | ``"action"`` | ``"element"`` (None: :func:`default_level`).

    Returns:
        ``[B]`` (chunk), ``[B, H]`` (action) or ``[B, H, A]`` (element); masked-out elements
        are 0 at the element level (their ratio is 1: give :func:`policy_loss` the mask from
        :func:`level_mask` so that they do not dilute the mean).
    """
    if mode not in ("chain", "chain_mean"):
        raise ValueError(f"mode must be 'chain' or 'chain_mean', got {mode!r}")
    level = level or default_level(mode)
    if level not in _LEVEL_DIMS:
        raise ValueError(f"level must be one of {list(_LEVEL_DIMS)}, got {level!r}")
    if step_logp.dim() != 4 or stochastic.shape != step_logp.shape[:2]:
        raise ValueError(f"step_logp must be [B, K, H, A] and stochastic [B, K]; got "
                         f"{tuple(step_logp.shape)} and {tuple(stochastic.shape)}")
    counted = stochastic.bool()[:, :, None, None]
    per_elem = torch.where(counted, step_logp, torch.zeros_like(step_logp)).sum(dim=1)
    n_terms = stochastic.bool().sum(dim=1).to(step_logp.dtype)  # [B]
    if init_logp is not None:
        if init_logp.shape != per_elem.shape:
            raise ValueError(f"init_logp must be [B, H, A] {tuple(per_elem.shape)}, "
                             f"got {tuple(init_logp.shape)}")
        per_elem = per_elem + init_logp
        n_terms = n_terms + 1
    if mode == "chain_mean":
        per_elem = per_elem / n_terms.clamp_min(1.0)[:, None, None]
    if action_mask is not None:
        m = action_mask.to(per_elem.device).bool().expand_as(per_elem)
        per_elem = torch.where(m, per_elem, torch.zeros_like(per_elem))
    if level == "chunk":
        return per_elem.sum(dim=(1, 2))
    if level == "action":
        return per_elem.sum(dim=2)
    return per_elem


def level_mask(action_mask: torch.Tensor | None, batch: int, level: LogpLevel) -> torch.Tensor | None:
    """The mask of counted ratio entries for :func:`aggregate_logp`'s output at ``level``.

    action_mask: ``[H, A]`` or ``[B, H, A]`` or None.  Returns None for ``"chunk"`` (or no mask),
    ``[B, H]`` bool for ``"action"`` (a step counts if any of its dims does), ``[B, H, A]`` bool
    for ``"element"``.  Combine it with a per-sample mask ``[B]`` by broadcasting.
    """
    if action_mask is None or level == "chunk":
        return None
    m = action_mask.bool()
    if m.dim() == 2:
        m = m.unsqueeze(0).expand(batch, *m.shape)
    if level == "action":
        return m.any(dim=-1)
    if level == "element":
        return m
    raise ValueError(f"level must be one of {list(_LEVEL_DIMS)}, got {level!r}")


def make_action_mask(horizon: int, action_dim: int, action_chunk: int | None = None,
                     env_action_dim: int | None = None) -> torch.Tensor:
    """``[H, A]`` bool mask of the executed part of a padded chunk: the first ``action_chunk``
    horizon steps and the first ``env_action_dim`` action dims (None: all)."""
    c = horizon if action_chunk is None else action_chunk
    d = action_dim if env_action_dim is None else env_action_dim
    if not (1 <= c <= horizon and 1 <= d <= action_dim):
        raise ValueError(f"action_chunk={c} / env_action_dim={d} must be in [1, {horizon}] / "
                         f"[1, {action_dim}]")
    m = torch.zeros(horizon, action_dim, dtype=torch.bool)
    m[:c, :d] = True
    return m


# --------------------------------------------------------------------------- helpers
def _expand_right(x: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast ``x`` (shape a prefix of ``like``'s, e.g. ``[B]`` for ``[B, H, A]``) to ``like``."""
    if x.shape == like.shape:
        return x
    if x.dim() > like.dim() or tuple(x.shape) != tuple(like.shape[: x.dim()]):
        raise ValueError(f"{name} shape {tuple(x.shape)} is not a prefix of {tuple(like.shape)}")
    return x.reshape(*x.shape, *([1] * (like.dim() - x.dim()))).expand_as(like)


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like)
    return _expand_right(mask.to(device=like.device), like, "mask").to(like.dtype)


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` (0 when nothing counts, keeping the graph)."""
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def approx_kl(new_logp: torch.Tensor, old_logp: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Schulman's k3 estimator of ``KL(old || new)`` from samples of ``old``:
    ``mean((r - 1) - log r)`` with ``r = exp(new - old)``; >= 0 elementwise.  Differentiable
    (usable as a KL penalty to a reference policy: pass ``ref`` as ``old``)."""
    log_r = new_logp - old_logp
    k3 = torch.expm1(log_r) - log_r
    return _masked_mean(k3, _weights(mask, k3))


# --------------------------------------------------------------------------- losses
def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = 3.0,
                mask: torch.Tensor | None = None, max_log_ratio: float = 20.0
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (to minimise), with optional dual clip (Ye et al., 2020).

    Per ratio entry, with ``r = exp(clamp(new - old, +-max_log_ratio))`` and advantage ``A``::

        l = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
        l = min(l, -A * dual_clip)            if A < 0 and dual_clip is set

    and the loss is the ``mask``-weighted mean of ``l``.

    Args:
        new_logp: ``[B]``, ``[B, H]`` or ``[B, H, A]`` current log-probs (differentiable).
        old_logp: same shape, rollout log-probs (treated as constants).
        advantages: same shape or a prefix of it (``[B]``), broadcast over trailing dims.
        clip_low, clip_high: ratio range ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: ``c > 1`` bounding the loss of negative-advantage entries by ``c * |A|``
            (None: off).
        mask: weights, same shape as the ratio or a prefix of it (None: all count).
        max_log_ratio: log-ratios are clamped to ``+-max_log_ratio`` before ``exp`` so that far
            off-policy entries cannot produce ``inf`` / NaN gradients.

    Returns:
        ``(loss, stats)``; stats (floats): ``approx_kl`` (k3), ``clip_fraction`` (entries where
        the clipped term is the active one), ``dual_clip_fraction``, ``ratio_mean``,
        ``ratio_max``, ``ratio_min`` (over counted entries).
    """
    if new_logp.shape != old_logp.shape:
        raise ValueError(f"new_logp {tuple(new_logp.shape)} and old_logp "
                         f"{tuple(old_logp.shape)} differ in shape")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    old_logp = old_logp.detach()
    adv = _expand_right(advantages.detach().to(new_logp.dtype), new_logp, "advantages")
    w = _weights(mask, new_logp)
    log_r = (new_logp - old_logp).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_r)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual_active = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg3 < pg)
        pg = torch.where(dual_active, pg3, pg)
    loss = _masked_mean(pg, w)
    with torch.no_grad():
        counted = w > 0
        r_c = ratio[counted]
        stats = {
            "approx_kl": float(approx_kl(log_r, torch.zeros_like(log_r), w)),
            "clip_fraction": float(_masked_mean((pg2 > pg1).to(w.dtype), w)),
            "dual_clip_fraction": float(_masked_mean(dual_active.to(w.dtype), w)),
            "ratio_mean": float(r_c.mean()) if r_c.numel() else 1.0,
            "ratio_max": float(r_c.max()) if r_c.numel() else 1.0,
            "ratio_min": float(r_c.min()) if r_c.numel() else 1.0,
        }
    return loss, stats


def huber(x: torch.Tensor, delta: float | None) -> torch.Tensor:
    """Elementwise ``0.5 x^2`` if ``|x| <= delta`` else ``delta (|x| - delta / 2)``;
    ``delta=None`` gives the plain ``0.5 x^2`` (the ``delta -> inf`` limit)."""
    if delta is None:
        return 0.5 * x.pow(2)
    ax = x.abs()
    return torch.where(ax <= delta, 0.5 * x.pow(2), delta * (ax - 0.5 * delta))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None = 0.2, huber_delta: float | None = 10.0,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss with optional PPO-style value clipping and Huber penalty.

    With ``f = huber(., huber_delta)`` (``0.5 x^2`` when None) per entry::

        l = f(R - V)                                             clip is None
        l = max(f(R - V), f(R - (V_old + clamp(V - V_old, +-clip))))   otherwise

    and the loss is the ``mask``-weighted mean.  All tensors ``[B]`` (or any equal shape);
    ``mask`` same shape or a prefix.  Stats: ``clip_fraction`` (entries where the clipped term
    is the larger one), ``value_mean``, ``return_mean``, ``abs_error`` (mean ``|R - V|``).
    """
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError(f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)} "
                         f"and returns {tuple(returns.shape)} must have one shape")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    returns = returns.detach().to(values.dtype)
    old_values = old_values.detach().to(values.dtype)
    w = _weights(mask, values)
    l1 = huber(returns - values, huber_delta)
    if clip is None:
        per = l1
        clipped = torch.zeros_like(per, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        l2 = huber(returns - v_clip, huber_delta)
        per = torch.maximum(l1, l2)
        clipped = l2 > l1
    loss = _masked_mean(per, w)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(_masked_mean(clipped.to(w.dtype), w)),
            "value_mean": float(_masked_mean(values, w)),
            "return_mean": float(_masked_mean(returns, w)),
            "abs_error": float(_masked_mean((returns - values).abs(), w)),
        }
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` (population variances over ``mask`` entries), a scalar tensor.

    1 = perfect critic, 0 = no better than a constant, < 0 worse; NaN when ``Var[R] = 0``,
    which includes a ``Var[R]`` under ``1e-12``: returns that are all equal up to rounding (GAE's
    ``A + V`` of a rollout with no reward) would otherwise read as ~-1e15.
    """
    v = values.detach().double()
    r = returns.detach().double()
    w = _weights(mask, r)
    n = w.sum()

    def var(x: torch.Tensor) -> torch.Tensor:
        mu = (x * w).sum() / n
        return ((x - mu).pow(2) * w).sum() / n

    var_r = var(r)
    if float(n) == 0 or float(var_r) < 1e-12:
        return torch.tensor(float("nan"))
    return (1.0 - var(r - v) / var_r).float()


def lr_scale(schedule: LRSchedule, step: int, total_steps: int, warmup_steps: int = 0,
             min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at update ``step`` of ``total_steps``.

    Linear warm-up over ``warmup_steps`` (from ``1/warmup_steps`` to 1), then ``"constant"``: 1;
    ``"linear"``: from 1 down to ``min_ratio`` at ``total_steps``; ``"cosine"``: half-cosine
    from 1 down to ``min_ratio``.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    frac = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    shape = 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_ratio + (1.0 - min_ratio) * shape


# --------------------------------------------------------------------------- configs
def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass
class PolicyUpdateConfig:
    """Fields shared by PPO and GRPO: the clipped-ratio policy update and its optimiser.

    The RLinf pi0 / LIBERO values (REFERENCE.md) are used where they carry over; learning rates
    are larger than RLinf's (5e-6 for a 3B model) because pirl's default policy is a tiny
    randomly initialised network trained on CPU.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    max_log_ratio: float = 20.0
    update_epochs: int = 4
    num_minibatches: int = 4
    lr_policy: float = 1e-4
    lr_noise: float = 1e-4
    # the prefix (VLM / image encoder) when it trains (rl.train_mode=full); None: lr_policy
    lr_prefix: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    max_grad_norm: float = 1.0
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    target_kl: float | None = None
    # self-imitation: weight of a flow-matching loss on the executed chunks of the rollout's
    # successful episodes, added to the policy loss (0: off, plain PPO / GRPO)
    sil_coef: float = 0.0
    lr_schedule: LRSchedule = "constant"
    lr_warmup_iters: int = 0
    logp_mode: LogpMode = "chain_mean"  # RLinf token-mean: per-element ratios (stable)
    logp_level: LogpLevel | None = None

    def __post_init__(self):
        _check(0.0 <= self.clip_low < 1.0, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        _check(self.clip_high >= 0.0, "clip_high", f"must be >= 0, got {self.clip_high}")
        _check(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip",
               f"must be > 1 or null, got {self.dual_clip}")
        _check(self.max_log_ratio > 0, "max_log_ratio", f"must be > 0, got {self.max_log_ratio}")
        _check(self.update_epochs >= 1, "update_epochs", f"must be >= 1, got {self.update_epochs}")
        _check(self.num_minibatches >= 1, "num_minibatches",
               f"must be >= 1, got {self.num_minibatches}")
        _check(self.lr_policy > 0, "lr_policy", f"must be > 0, got {self.lr_policy}")
        _check(self.lr_noise > 0, "lr_noise", f"must be > 0, got {self.lr_noise}")
        _check(self.lr_prefix is None or self.lr_prefix > 0, "lr_prefix",
               f"must be > 0 or null, got {self.lr_prefix}")
        _check(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0
                                            for b in self.betas), "betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _check(self.target_kl is None or self.target_kl > 0, "target_kl",
               f"must be > 0 or null, got {self.target_kl}")
        _check(self.sil_coef >= 0, "sil_coef", f"must be >= 0, got {self.sil_coef}")
        _check(self.lr_schedule in ("constant", "cosine", "linear"), "lr_schedule",
               f"must be 'constant', 'cosine' or 'linear', got {self.lr_schedule!r}")
        _check(self.lr_warmup_iters >= 0, "lr_warmup_iters",
               f"must be >= 0, got {self.lr_warmup_iters}")
        _check(self.logp_mode in ("chain", "chain_mean"), "logp_mode",
               f"must be 'chain' or 'chain_mean', got {self.logp_mode!r}")
        _check(self.logp_level is None or self.logp_level in _LEVEL_DIMS, "logp_level",
               f"must be one of {list(_LEVEL_DIMS)} or null, got {self.logp_level!r}")

    @property
    def ratio_level(self) -> str:
        """The effective ratio granularity (``logp_level`` or the mode's default)."""
        return self.logp_level or default_level(self.logp_mode)


@dataclass
class PPOConfig(PolicyUpdateConfig):
    """PPO with a critic and chunk-level GAE (RLinf-like defaults, see REFERENCE.md).

    ``value_coef`` weights the value loss in the summed loss (the critic has its own learning
    rate ``lr_value`` in a separate parameter group).  ``critic_warmup_iters``: the first N
    updates train only the critic (the policy and noise-net loss is weighted 0, as verl's
    ``critic_warmup``), so that GAE does not push a fine-tuned policy with a fresh critic's
    noise.
    """

    # per chunk step.  On the tabletop 0.95 and 0.9 raised OOD success and the critic's
    # explained variance but not the in-distribution end (one run each;
    # docs/experiments.md#2026-12-02--failure-replay-a-shorter-discount-and-the-push-failure-traced)
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_clip: float | None = 0.2
    huber_delta: float | None = 10.0
    lr_value: float = 1e-3
    value_coef: float = 1.0
    critic_warmup_iters: int = 0
    # an env's time-limit truncation in GAE: "bootstrap" continues the return with V(final
    # obs) (the infinite-horizon convention); "terminal" ends it there (value 0 after it), the
    # true value of a task that must be done within the time limit, so that a timed-out
    # episode's chunks carry the failure instead of the critic's guess
    truncation: Truncation = "bootstrap"

    def __post_init__(self):
        super().__post_init__()
        _check(0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        _check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda",
               f"must be in [0, 1], got {self.gae_lambda}")
        _check(self.value_clip is None or self.value_clip > 0, "value_clip",
               f"must be > 0 or null, got {self.value_clip}")
        _check(self.huber_delta is None or self.huber_delta > 0, "huber_delta",
               f"must be > 0 or null, got {self.huber_delta}")
        _check(self.lr_value > 0, "lr_value", f"must be > 0, got {self.lr_value}")
        _check(self.value_coef >= 0, "value_coef", f"must be >= 0, got {self.value_coef}")
        _check(self.critic_warmup_iters >= 0, "critic_warmup_iters",
               f"must be >= 0, got {self.critic_warmup_iters}")
        _check(self.truncation in ("bootstrap", "terminal"), "truncation",
               f"must be 'bootstrap' or 'terminal', got {self.truncation!r}")
