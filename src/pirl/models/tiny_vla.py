"""TinyVLA: a small but structurally faithful pi0-style flow-matching VLA that trains on a CPU.

Structure (mirrors pi0 at toy scale):

- **Prefix** (the "VLM"): a small conv encoder turns each 64x64 camera image into a 4x4 grid of
  tokens; instruction words (:class:`~pirl.models.tokenizer.WordTokenizer`) get a learned
  embedding; the proprio state is projected to one token.  A few transformer layers mix the
  prefix tokens ``[B, P, D]``.  :meth:`TinyVLA.encode_prefix` runs this once per env step and also
  precomputes every expert layer's cross-attention keys/values of the prefix (the "KV cache").
- **Action expert**: ``H`` action tokens (``x_t`` projected, fused with a sinusoidal embedding of
  ``t`` by an MLP as in pi0, plus learned positions) go through ``depth`` blocks of
  self-attention over the chunk, cross-attention to the cached prefix K/V, and an MLP.  A linear
  head reads the velocity ``[B, H, A]``; the normalised hidden states are the features
  ``[B, H, D]`` used by Flow-Noise and the expert-side value head.
  :meth:`TinyVLA.velocity` never touches the prefix encoder.
- **Value head** (``value_head``): ``"prefix"`` = MLP on the masked mean of the prefix tokens;
  ``"expert"`` = run the expert once at the fixed query ``x = 0, t = 1`` and MLP on its features
  averaged over the chunk (pi0 in RLinf).  ``critic_detach=True`` stops the critic's gradient at
  its input, so the value loss trains only the value MLP.  ``critic_time=True`` also gives the
  critic the share of the episode's time limit still ahead (``obs["time_left"] [B]``, which the
  RL rollout adds; Pardo et al. 2018: with a time limit the return depends on the time left,
  and a critic that cannot see it averages over it).  The actor never reads it.  On the
  tabletop neither it (with ``rl.ppo.truncation=terminal``) nor the prefix head moved PPO's end
  from the default's start
  (docs/experiments.md#2026-12-02--demos-in-the-rl-loss-critic-variants-80-iterations-rl-seeds).

The image encoder is CoordConv (pixel coordinates as input channels) and FiLM-conditioned on
the instruction by default: on the tabletop, a few-shot SFT policy without FiLM picked the wrong
plate in a third of its failed pick-and-place episodes (measured), i.e. the instruction's target
word was not bound to a place in the image.

Default size (width 128, 1 prefix layer, 3 expert layers, 1 camera): about 1.4M parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pirl.models.base import FlowPolicy, Obs, VelocityOut
from pirl.models.precision import full_precision
from pirl.models.tokenizer import WordTokenizer
from pirl.models.vla_common import Normalizer


@dataclass
class TinyVLAConfig:
    """Hyper-parameters of :class:`TinyVLA` (all plain values, so a checkpoint can store them).

    vocab: instruction words (build it with ``pirl.models.tokenizer.vocab_from_texts``); words
        outside it map to ``<unk>``.
    image_size: the env's image side (informational: the conv encoder ends with adaptive
        pooling, so any square size works; 64 is what the tiny model is sized for).
    image_tokens: side of the token grid per camera (4 -> 16 tokens per image).
    value_head: ``"expert"`` or ``"prefix"`` (see module docstring).
    critic_detach: whether the critic's input is detached from the shared trunk.
    critic_time: whether the critic also reads ``obs["time_left"]`` (see module docstring): a
        linear map of it is added to the value MLP's first pre-activation (parameter
        ``value_time``).
    coord_conv: append two pixel-coordinate channels to every image (CoordConv, Liu et al.
        2018), so the conv encoder can report *where* an object is, not only what it is.
    film: condition the image encoder on the instruction (FiLM on every conv block; the
        condition is the masked mean of an MLP over the instruction's token + position
        embeddings, so word order survives the pooling).
    normalization: ``"identity"`` (the env's state and actions as they are) or ``"mean_std"``
        (LeRobot's MEAN_STD: the state and the action chunk are standardised with per-dim
        statistics that :meth:`TinyVLA.fit_normalization` sets from the SFT demos and that the
        checkpoint stores; the flow then runs in normalised action units and
        :meth:`TinyVLA.postprocess_actions` maps its chunks back to env actions).  Use it when
        the env's action scale is far from ``[-1, 1]`` (ManiSkill's ``pd_ee_delta_pose`` demos
        move by ~0.05) or its state mixes scales.
    """

    action_horizon: int = 8
    action_dim: int = 4
    state_dim: int = 8
    num_cameras: int = 1
    image_size: int = 64
    width: int = 128
    depth: int = 3
    prefix_depth: int = 1
    heads: int = 4
    mlp_ratio: int = 4
    vocab: list[str] = field(default_factory=list)
    max_text_len: int = 16
    image_tokens: int = 4
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    value_head: str = "expert"
    critic_detach: bool = True
    critic_time: bool = False
    value_hidden: int = 128
    coord_conv: bool = True
    film: bool = True
    normalization: str = "identity"

    def __post_init__(self) -> None:
        positive = ("action_horizon", "action_dim", "image_size", "width", "depth", "heads",
                    "mlp_ratio", "max_text_len", "image_tokens", "value_hidden")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("state_dim", "num_cameras", "prefix_depth"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.width % self.heads != 0:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.value_head not in ("expert", "prefix"):
            raise ValueError(f"value_head must be 'expert' or 'prefix', got {self.value_head!r}")
        if self.normalization not in ("identity", "mean_std"):
            raise ValueError(f"normalization must be 'identity' or 'mean_std', "
                             f"got {self.normalization!r}")
        if not self.conv_channels or any(c < 1 for c in self.conv_channels):
            raise ValueError(f"conv_channels must be a non-empty list of positive ints, "
                             f"got {self.conv_channels}")
        self.vocab = list(self.vocab)
        self.conv_channels = list(self.conv_channels)


@dataclass
class TinyPrefix:
    """Prefix cache of :class:`TinyVLA` (row-indexable with :func:`pirl.models.base.index_batch`).

    tokens: ``[B, P, D]`` prefix features after the prefix transformer.
    mask: ``[B, P]`` bool, True on real (non-padding) tokens.
    kv: ``[B, L, 2, nh, P, dh]`` every expert layer's cross-attention keys (0) and values (1);
        None in a frozen prefix (:meth:`TinyVLA.frozen_prefix`), whose K/V projections belong to
        the trainable expert.
    time_left: ``[B]`` the observation's ``time_left`` (read by a ``critic_time`` critic only),
        or None when the observation has none.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    kv: torch.Tensor | None
    time_left: torch.Tensor | None = None


def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3,
                         max_period: float = 4.0) -> torch.Tensor:
    """pi0-style sine-cosine embedding of scalar times ``t [B]`` -> ``[B, dim]``.

    Periods are log-spaced in ``[min_period, max_period]`` (good resolution on ``t in [0, 1]``).
    """
    half = dim // 2
    frac = torch.linspace(0.0, 1.0, half, device=t.device, dtype=t.dtype)
    period = min_period * (max_period / min_period) ** frac
    ang = t[:, None] * (2.0 * math.pi / period)[None, :]
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    """``[B, N, D] -> [B, nh, N, D / nh]``."""
    b, n, d = x.shape
    return x.view(b, n, nh, d // nh).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on the CPU in float32 also under bf16 autocast: there
    its bf16 kernels are slower than float32's, the backward ~6x (a profile of the PPO update,
    docs/experiments.md#2026-12-06--mixed-precision-and-where-the-default-jobs-time-goes)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, nh, N, dh] -> [B, N, nh * dh]``."""
    b, nh, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, nh * dh)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[B, N, D]``; mask: optional ``[B, N]`` bool of keys to attend to."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = _attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads),
                       attn_mask=attn_mask)
        return self.out(_merge(y))


class CrossAttention(nn.Module):
    """Queries from the action tokens, keys/values from the (cached) prefix."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def project_kv(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx ``[B, P, D]`` -> stacked keys/values ``[B, 2, nh, P, dh]``."""
        b, p, d = ctx.shape
        kv = self.kv(ctx).view(b, p, 2, self.heads, d // self.heads)
        return kv.permute(0, 2, 3, 1, 4)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, D]``; kv ``[B, 2, nh, P, dh]``; mask ``[B, P]`` bool."""
        q = _heads(self.q(x), self.heads)
        y = _attention(q, kv[:, 0], kv[:, 1], attn_mask=mask[:, None, None, :])
        return self.out(_merge(y))


def _mlp(dim: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class PrefixBlock(nn.Module):
    """Pre-norm transformer encoder block over the prefix tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ExpertBlock(nn.Module):
    """Action-expert block: self-attention over the chunk, cross-attention to the prefix, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), kv, mask)
        return x + self.mlp(self.norm3(x))


class ImageEncoder(nn.Module):
    """Conv stack: ``[N, 3, S, S]`` float -> ``[N, T*T, D]`` tokens (stride-2 convs + pooling).

    With ``coord_conv`` two channels holding the pixel's x and y in ``[-1, 1]`` are appended to the
    input, which makes absolute positions (where to reach) a linear read-out.

    With ``film_dim > 0`` every conv block is FiLM-conditioned (Perez et al. 2018, as in RT-1's
    language-conditioned image encoder): a per-image vector ``cond [N, film_dim]`` (the
    instruction) scales and shifts the normalised channels, ``h * (1 + gamma) + beta``, with the
    FiLM projections zero-initialised (identity at init).  The visual features can then depend
    on what the instruction asks for ("the blue plate"), not only on the image.
    """

    def __init__(self, channels: list[int], width: int, grid: int, coord_conv: bool = False,
                 film_dim: int = 0):
        super().__init__()
        self.coord_conv = coord_conv
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.films = nn.ModuleList() if film_dim > 0 else None
        c_in = 5 if coord_conv else 3
        for c in channels:
            self.convs.append(nn.Conv2d(c_in, c, 3, stride=2, padding=1))
            self.norms.append(nn.GroupNorm(min(8, c), c))
            if self.films is not None:
                film = nn.Linear(film_dim, 2 * c)
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
                self.films.append(film)
            c_in = c
        self.out = nn.Conv2d(c_in, width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(grid)

    def forward(self, img: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``img [N, 3, S, S]`` (and ``cond [N, film_dim]`` with FiLM) -> tokens ``[N, T*T, D]``."""
        if self.coord_conv:
            n, _, h, w = img.shape
            ys = torch.linspace(-1.0, 1.0, h, device=img.device, dtype=img.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=img.device, dtype=img.dtype)
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))       # [2, H, W]
            img = torch.cat([img, grid.expand(n, 2, h, w)], dim=1)
        if (self.films is not None) != (cond is not None):
            raise ValueError("a FiLM image encoder needs cond, a plain one takes none")
        x = img
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            if self.films is not None:
                gamma, beta = self.films[i](cond).chunk(2, dim=-1)       # [N, C] each
                x = x * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
            x = F.gelu(x)
        return self.pool(self.out(x)).flatten(2).transpose(1, 2)


class TinyVLA(FlowPolicy):
    """Small pi0-style VLA (see module docstring).  Build with ``TinyVLA(TinyVLAConfig(...))`` or
    ``pirl.models.build_policy("tiny", **cfg)``."""

    policy_name = "tiny"

    def __init__(self, cfg: TinyVLAConfig | None = None, **kw: Any):
        super().__init__()
        if cfg is None:
            cfg = TinyVLAConfig(**kw)
        elif kw:
            cfg = dataclasses.replace(cfg, **kw)
        self.cfg = cfg
        d = cfg.width
        self.action_horizon = cfg.action_horizon
        self.action_dim = cfg.action_dim
        self.feature_dim = d
        self.tokenizer = WordTokenizer(cfg.vocab, max_len=cfg.max_text_len)

        # ---- prefix ----
        n_img = cfg.image_tokens ** 2
        if cfg.num_cameras > 0:
            self.image_encoder = ImageEncoder(cfg.conv_channels, d, cfg.image_tokens,
                                              cfg.coord_conv, film_dim=d if cfg.film else 0)
            if cfg.film:
                self.film_text = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            self.image_pos = nn.Parameter(torch.randn(cfg.num_cameras, n_img, d) * 0.02)
        self.text_embed = nn.Embedding(self.tokenizer.vocab_size, d, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(cfg.max_text_len, d) * 0.02)
        if cfg.state_dim > 0:
            self.state_proj = nn.Linear(cfg.state_dim, d)
        self.prefix_blocks = nn.ModuleList(
            PrefixBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.prefix_depth))
        self.prefix_norm = nn.LayerNorm(d)

        # ---- action expert ----
        self.action_in = nn.Linear(cfg.action_dim, d)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.action_pos = nn.Parameter(torch.randn(cfg.action_horizon, d) * 0.02)
        self.expert_blocks = nn.ModuleList(
            ExpertBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.expert_norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, cfg.action_dim)

        # ---- critic ----
        self.value_mlp = nn.Sequential(nn.Linear(d, cfg.value_hidden), nn.GELU(),
                                       nn.Linear(cfg.value_hidden, cfg.value_hidden), nn.GELU(),
                                       nn.Linear(cfg.value_hidden, 1))
        # (created after everything else, so that the other parameters' init is unchanged)
        self.value_time = (nn.Linear(1, cfg.value_hidden, bias=False) if cfg.critic_time
                           else None)

        # ---- normaliser (buffers: saved with the weights, never trained) ----
        # (pirl's shared Normalizer, stats sized here so a fitted checkpoint loads into a fresh
        # model; None in identity mode, so identity checkpoints carry no normaliser keys)
        self.normalizer = None
        if cfg.normalization == "mean_std":
            self.normalizer = Normalizer("mean_std", {
                "state": {"mean": torch.zeros(cfg.state_dim), "std": torch.ones(cfg.state_dim)},
                "actions": {"mean": torch.zeros(cfg.action_dim),
                            "std": torch.ones(cfg.action_dim)}})

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Plain-dict config: ``build_policy("tiny", **policy.get_config())`` rebuilds the model."""
        return dataclasses.asdict(self.cfg)

    @property
    def device(self) -> torch.device:
        return self.action_in.weight.device

    # ------------------------------------------------------------------ prefix
    def prefix_parameter_names(self) -> list[str]:
        """The prefix encoder: images, instruction tokens, state projection, prefix blocks.
        (The expert's cross-attention K/V projections belong to the expert.)"""
        heads = ("image_encoder.", "image_pos", "text_embed.", "text_pos", "state_proj.",
                 "prefix_blocks.", "prefix_norm.", "film_text.")
        return [n for n, _ in self.named_parameters() if n.startswith(heads)]

    def _prefix_tokens(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the observation into prefix tokens ``[B, P, D]`` and mask ``[B, P]``."""
        cfg, dev = self.cfg, self.device
        dtype = self.action_in.weight.dtype
        parts: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        instr = obs["instruction"]
        if isinstance(instr, str):
            instr = [instr]
        b = len(instr)
        ids, tmask = self.tokenizer.encode(list(instr), device=dev)
        text = self.text_embed(ids) + self.text_pos                        # [B, L, D]
        if cfg.num_cameras > 0:
            img = obs["images"].to(dev)
            if img.dim() != 5 or img.shape[1] != cfg.num_cameras or img.shape[2] != 3:
                raise ValueError(f"images must be [B, {cfg.num_cameras}, 3, H, W], "
                                 f"got {tuple(img.shape)}")
            if img.dtype == torch.uint8:
                img = img.to(dtype) / 255.0
            else:
                img = img.to(dtype)
            img = (img - 0.5) / 0.5                                   # [-1, 1]
            c = img.shape[1]
            cond = None
            if cfg.film:
                m = tmask.unsqueeze(-1).to(text.dtype)
                cond = (self.film_text(text) * m).sum(1) / m.sum(1).clamp_min(1.0)   # [B, D]
                cond = cond.repeat_interleave(c, dim=0)                            # [B*C, D]
            tok = self.image_encoder(img.flatten(0, 1), cond)          # [B*C, T, D]
            tok = tok.reshape(b, c * tok.shape[1], -1) + self.image_pos.flatten(0, 1)
            parts.append(tok)
            masks.append(torch.ones(b, tok.shape[1], dtype=torch.bool, device=dev))
        parts.append(text)
        masks.append(tmask)
        if cfg.state_dim > 0:
            state = obs["state"].to(dev, dtype)
            if self.normalizer is not None:
                state = self.normalizer.normalize_state(state)
            parts.append(self.state_proj(state).unsqueeze(1))
            masks.append(torch.ones(b, 1, dtype=torch.bool, device=dev))
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def encode_prefix(self, obs: Obs) -> TinyPrefix:
        """Encode ``obs`` once: prefix tokens, mask and every expert layer's cross-attention K/V.
        (Under a bf16 precision the tokens are float32, the K/V cache bf16.)"""
        with self.autocast():
            x, mask = self._prefix_tokens(obs)
            for blk in self.prefix_blocks:
                x = blk(x, mask)
            x = full_precision(self.prefix_norm(x))
        time_left = obs.get("time_left")
        if time_left is not None:
            time_left = torch.as_tensor(time_left, device=x.device, dtype=x.dtype)
        return self.thaw_prefix(TinyPrefix(tokens=x, mask=mask, kv=None, time_left=time_left))

    def frozen_prefix(self, prefix: TinyPrefix) -> TinyPrefix:
        """Tokens and mask (the prefix encoder's output) and the time left; the expert's K/V
        are left out."""
        return TinyPrefix(tokens=prefix.tokens, mask=prefix.mask, kv=None,
                          time_left=prefix.time_left)

    def thaw_prefix(self, frozen: TinyPrefix) -> TinyPrefix:
        """Add every expert layer's cross-attention K/V (current expert weights) to the tokens."""
        x = frozen.tokens
        with self.autocast(x.device):
            kv = torch.stack([blk.cross_attn.project_kv(x) for blk in self.expert_blocks], dim=1)
        return TinyPrefix(tokens=x, mask=frozen.mask, kv=kv, time_left=frozen.time_left)

    # ------------------------------------------------------------------ expert
    def velocity(self, prefix: TinyPrefix, x_t: torch.Tensor, t: torch.Tensor) -> VelocityOut:
        """Velocity ``[B, H, A]`` and features ``[B, H, D]`` at ``x_t [B, H, A]``, ``t [B]``."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(b)
        with self.autocast(x_t.device):
            a = self.action_in(x_t)                                           # [B, H, D]
            te = sinusoidal_embedding(t, self.feature_dim)[:, None, :].expand_as(a)
            h = self.action_time_mlp(torch.cat([a, te], dim=-1)) + self.action_pos
            for i, blk in enumerate(self.expert_blocks):
                h = blk(h, prefix.kv[:, i], prefix.mask)
            feats = full_precision(self.expert_norm(h))
        # the velocity head runs outside autocast: float32 like the features (as pi0's)
        return VelocityOut(velocity=self.action_out(feats), features=feats)

    # ------------------------------------------------------------------ critic
    def value_features(self, prefix: TinyPrefix) -> torch.Tensor:
        """The critic's input ``[B, D]`` (pooled prefix or pooled expert features at x=0, t=1)."""
        if self.cfg.value_head == "prefix":
            m = prefix.mask.unsqueeze(-1).to(prefix.tokens.dtype)
            return (prefix.tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        b = prefix.tokens.shape[0]
        x0 = prefix.tokens.new_zeros(b, self.action_horizon, self.action_dim)
        t1 = prefix.tokens.new_ones(b)
        if self.cfg.critic_detach:
            with torch.no_grad():
                return self.velocity(prefix, x0, t1).features.mean(1)
        return self.velocity(prefix, x0, t1).features.mean(1)

    @property
    def critic_takes_time(self) -> bool:
        """Whether :meth:`value` reads the observation's ``time_left`` (``critic_time``)."""
        return self.cfg.critic_time

    def value(self, prefix: TinyPrefix) -> torch.Tensor:
        """Critic ``[B]`` (float32 under any precision); with ``critic_detach`` its gradient
        reaches only the value MLP."""
        with self.autocast(prefix.tokens.device):
            return full_precision(self._value(prefix))

    def _value(self, prefix: TinyPrefix) -> torch.Tensor:
        feat = self.value_features(prefix)
        if self.cfg.critic_detach:
            feat = feat.detach()
        if self.value_time is None:
            return self.value_mlp(feat).squeeze(-1)
        if prefix.time_left is None:
            raise ValueError("critic_time=True: the critic needs obs['time_left'] (the share of "
                             "the episode's time limit still ahead, [B]), which the RL rollout "
                             "adds")
        h = self.value_mlp[0](feat) + self.value_time(prefix.time_left.to(feat.dtype)[:, None])
        for layer in self.value_mlp[1:]:
            h = layer(h)
        return h.squeeze(-1)

    # ------------------------------------------------------------------ normaliser
    @staticmethod
    def _mean_std(x: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column mean and std of ``x [M, F]`` (float64); a column with std below
        ``min_std`` (a constant one, e.g. zero padding) gets std 1 so it is only centred."""
        x = x.double()
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std < min_std, torch.ones_like(std), std)
        return mean, std

    def fit_normalization(self, state: torch.Tensor | None, actions: torch.Tensor,
                          mask: torch.Tensor | None = None, min_std: float = 1e-3) -> bool:
        """With ``normalization="mean_std"``: set the state stats from ``state [M, S]`` and the
        action stats from the valid steps of ``actions [M, H, A]`` (``mask [M, H]``).  Returns
        False (nothing to fit) with ``"identity"``."""
        if self.normalizer is None:
            return False
        a = actions.reshape(-1, actions.shape[-1])
        if mask is not None:
            a = a[mask.reshape(-1).bool()]
        if a.shape[-1] != self.action_dim or a.shape[0] < 2:
            raise ValueError(f"fit_normalization needs >= 2 valid actions of dim "
                             f"{self.action_dim}, got {tuple(a.shape)}")
        mean, std = self._mean_std(a, min_std)
        self.normalizer.actions_mean.copy_(mean)
        self.normalizer.actions_std.copy_(std)
        if self.cfg.state_dim > 0:
            if state is None or state.shape[-1] != self.cfg.state_dim:
                raise ValueError(f"fit_normalization needs states of dim {self.cfg.state_dim}")
            mean, std = self._mean_std(state.reshape(-1, state.shape[-1]), min_std)
            self.normalizer.state_mean.copy_(mean)
            self.normalizer.state_std.copy_(std)
        return True

    def preprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Env-space ``[..., A]`` -> model space (identity without a normaliser)."""
        return actions if self.normalizer is None else self.normalizer.normalize_actions(actions)

    def postprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Model-space chunk ``[B, H, A]`` -> env actions ``[B, H, A]``."""
        return (actions if self.normalizer is None
                else self.normalizer.unnormalize_actions(actions))

    def sft_loss(self, obs: Obs, actions: torch.Tensor, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 time: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss on env-space demo chunks ``[B, H, A]`` (normalised here)."""
        a = self.preprocess_actions(actions.to(self.device, self.action_in.weight.dtype))
        return super().sft_loss(obs, a, mask=mask, generator=generator, noise=noise, time=time)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
