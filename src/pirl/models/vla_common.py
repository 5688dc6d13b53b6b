"""Pieces shared by the real VLAs: the prefix cache, normalisation, value head, image
preprocessing and the "what trains" switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from pirl.models.base import Obs, flow_matching_loss
from pirl.models.vla_layers import pad_last, resize_with_pad

TrainMode = Literal["full", "expert_only", "vision_frozen", "lora"]
ValuePlacement = Literal["expert", "prefix"]


@dataclass
class VLAPrefix:
    """Cached prefix of a real VLA (what :meth:`encode_prefix` returns).

    keys / values: ``[B, L, Hkv, P, D]`` per-layer K / V of the VLM over the prefix (rotary already
        applied to K), L = number of VLM layers the expert reads;
    pad_mask: ``[B, P]`` bool, True on real prefix tokens;
    state: ``[B, S]`` normalised, padded proprio state (pi0 feeds it to the expert);
    pooled: ``[B, W]`` masked mean of the VLM's final (normed) hidden states over the prefix
        (what a prefix-side value head reads).
    Every field is batch-first, so :func:`pirl.models.base.index_batch` selects rows.
    """

    keys: torch.Tensor
    values: torch.Tensor
    pad_mask: torch.Tensor
    state: torch.Tensor
    pooled: torch.Tensor

    @property
    def num_valid(self) -> torch.Tensor:
        """``[B]`` number of real prefix tokens (the first suffix position id)."""
        return self.pad_mask.long().sum(-1)


NORM_MODES = ("identity", "mean_std", "quantile", "quantile10", "min_max")
_MODE_STATS = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99"),
               "quantile10": ("q10", "q90"), "min_max": ("min", "max")}
_STATS = ("mean", "std", "q01", "q99", "q10", "q90", "min", "max")


class Normalizer(nn.Module):
    """Per-dimension normalisation of state and actions with stats from a checkpoint.

    mode (``action_mode`` for the actions when they differ, as LeRobot allows):
    ``"mean_std"`` ``(x - mean) / std``; ``"quantile"`` (pi0.5) ``2 (x - q01) / (q99 - q01) - 1``
    (``"quantile10"``: q10 / q90; ``"min_max"``: min / max); ``"identity"``.
    convention: where the epsilon goes, as the checkpoint's code had it:

    - ``"openpi"``: ``std + eps`` / ``q99 - q01 + eps`` both ways (eps 1e-6);
    - ``"lerobot"``: ``std + eps`` only when normalising (unnormalise: ``x * std + mean``);
      range modes use the bare range, ``eps`` only where it is 0 (eps 1e-8, or the
      processor file's).

    Stats are buffers (saved with the model); dims beyond the stats' length pass through unchanged.
    """

    def __init__(self, mode: str = "identity", stats: dict[str, dict[str, torch.Tensor]] | None = None,
                 convention: str = "openpi", eps: float | None = None,
                 action_mode: str | None = None):
        super().__init__()
        for m in (mode, action_mode):
            if m is not None and m not in NORM_MODES:
                raise ValueError(f"unknown normalisation mode {m!r} (one of {NORM_MODES})")
        if convention not in ("openpi", "lerobot"):
            raise ValueError(f"unknown normalisation convention {convention!r}")
        self.mode = mode
        self.action_mode = action_mode or mode
        self.convention = convention
        self.eps = (1e-6 if convention == "openpi" else 1e-8) if eps is None else float(eps)
        for key in ("state", "actions"):
            for stat in _STATS:
                val = (stats or {}).get(key, {}).get(stat)
                if val is None and stat not in _STATS[:4]:
                    continue  # the rarer stats are buffers only when given (state-dict keys stay)
                t = torch.as_tensor(val, dtype=torch.float32) if val is not None else torch.zeros(0)
                self.register_buffer(f"{key}_{stat}", t)

    def _transform(self, x: torch.Tensor, key: str, inverse: bool) -> torch.Tensor:
        mode = self.mode if key == "state" else self.action_mode
        if mode == "identity":
            return x
        lo_name, hi_name = _MODE_STATS[mode]
        lo = getattr(self, f"{key}_{lo_name}", torch.zeros(0))
        hi = getattr(self, f"{key}_{hi_name}", torch.zeros(0))
        if lo.numel() == 0 or hi.numel() == 0:
            raise ValueError(f"normalisation mode {mode!r} but no {key} {lo_name} / {hi_name} "
                             "statistics loaded")
        n = min(lo.numel(), x.shape[-1])
        lo, hi = lo[:n].to(x), hi[:n].to(x)
        head, tail = x[..., :n], x[..., n:]
        if mode == "mean_std":
            if self.convention == "openpi":
                head = head * (hi + self.eps) + lo if inverse else (head - lo) / (hi + self.eps)
            else:
                head = head * hi + lo if inverse else (head - lo) / (hi + self.eps)
        else:
            rng = hi - lo
            rng = rng + self.eps if self.convention == "openpi" else torch.where(
                rng == 0, torch.full_like(rng, self.eps), rng)
            head = (head + 1.0) * rng / 2.0 + lo if inverse else 2.0 * (head - lo) / rng - 1.0
        return torch.cat([head, tail], dim=-1)

    def normalize_state(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, "state", False)

    def normalize_actions(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, "actions", False)

    def unnormalize_actions(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, "actions", True)


class ValueHead(nn.Module):
    """Critic MLP ``[B, D] -> [B]``: Linear, GELU, Linear, GELU, Linear (last layer zero-init so
    a fresh critic predicts 0)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).squeeze(-1)


def images_to_model(images: torch.Tensor, size: int, pad: str = "center") -> list[torch.Tensor]:
    """``[B, C, 3, H, W]`` uint8 (or float in [0, 1]) -> C tensors ``[B, 3, size, size]`` in
    [-1, 1] (SigLIP's input range), aspect kept with padding (``pad``: see
    :func:`~pirl.models.vla_layers.resize_with_pad`)."""
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"obs['images'] must be [B, cameras, 3, H, W] (RGB, channels first); "
                         f"got shape {tuple(images.shape)}")
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x * 2.0 - 1.0
    return [resize_with_pad(x[:, c], size, pad) for c in range(x.shape[1])]


def clean_instruction(text: str) -> str:
    """openpi's prompt cleaning: strip, ``_`` and newlines to spaces."""
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: torch.Tensor, bins: int = 256) -> list[list[int]]:
    """pi0.5's state tokens: bin index of each (normalised, in [-1, 1]) dim among ``bins`` equal
    bins (``np.digitize(x, linspace(-1, 1, bins + 1)[:-1]) - 1``).  ``[B, S]`` -> ``[B][S]``."""
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)[:-1]
    idx = torch.bucketize(state.detach().double().cpu(), edges, right=True) - 1
    return idx.tolist()


@dataclass
class TrainConfig:
    """What trains (see :func:`configure_trainable`) and how.

    mode: ``full`` (everything), ``expert_only`` (VLM + vision frozen: RLinf's
    ``train_expert_only``; the "VLM frozen" setting), ``vision_frozen`` (only the vision tower
    frozen), ``lora`` (VLM + vision frozen, LoRA adapters on the VLM's linear layers; the expert
    trains fully).
    """

    mode: TrainMode = "full"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_target: str = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False
    extra: dict = field(default_factory=dict)


class PaddedActions:
    """Actions of pi0 / SmolVLA (a mixin before :class:`~pirl.models.base.FlowPolicy`): the model
    acts in ``action_dim`` (32) dims; env-space chunks ``[B, H, A_env]`` are normalised with
    ``self.normalizer`` and zero-padded, and the flow-matching loss counts the env's dims only,
    as LeRobot's."""

    def preprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Env-space chunk ``[B, H, A_env]`` -> normalised, zero-padded ``[B, H, A]``."""
        return pad_last(self.normalizer.normalize_actions(actions.float()), self.action_dim)

    def sft_loss(self, obs: Obs, actions: torch.Tensor, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 time: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss on env-space demo chunks ``[B, H, A_env]``; ``mask`` ``[B, H]``
        or ``[B, H, A]`` weights chunk steps / dims, ``noise`` ``[B, H, A]`` and ``time``
        ``[B]`` are the draws to use (None: drawn from ``generator``)."""
        a = self.preprocess_actions(actions.to(next(self.parameters()).device))
        dims = torch.zeros_like(a)
        dims[..., : actions.shape[-1]] = 1.0
        if mask is not None:
            dims = dims * (mask.unsqueeze(-1) if mask.dim() == 2 else mask).to(dims)
        return flow_matching_loss(self, self.encode_prefix(obs), a, mask=dims,
                                  generator=generator, noise=noise, time=time)
