"""Transformer building blocks shared by pirl's real VLAs (pi0, pi0.5, SmolVLA).

Plain PyTorch re-implementations of the layers of PaliGemma (SigLIP + Gemma), the Gemma action
expert with adaRMSNorm (pi0.5) and SmolVLM (Idefics3 vision + Llama text), written so that their
``state_dict`` keys follow the names of the Hugging Face ``transformers`` modules that openpi's and
LeRobot's checkpoints were saved from (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ``encoder.layers.{i}.layer_norm1`` ...).  That makes loading a checkpoint a
key-for-key copy (see :mod:`pirl.models.checkpoint_io`) without depending on ``transformers``.

The decoder layers are not called one model at a time: pi0's "mixture of transformers" runs the
VLM stream and the action-expert stream through the *same* attention (queries, keys and values
are concatenated along the sequence), each stream with its own weights.  :func:`attention` takes
the already-projected, already-rotated tensors, so a caller can mix streams and cached prefix
keys / values freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Additive mask value for "cannot attend" (openpi / big_vision use -2.3819763e38).  Finite, so a
# query row with nothing to attend to (a padding token) gets a uniform softmax instead of NaN.
MASK_VALUE = -2.3819763e38


# --------------------------------------------------------------------------------------------
# Attention masks and positions (big_vision / openpi conventions)
# --------------------------------------------------------------------------------------------


def make_att_2d_masks(pad_masks: torch.Tensor, ar_masks: torch.Tensor) -> torch.Tensor:
    """Block-causal attention mask from per-token flags.

    pad_masks: ``[B, N]`` bool, True for real tokens; ar_masks: ``[B, N]`` int/bool, 1 where a
    new block starts (earlier tokens cannot see it).  Token i may attend to token j iff
    ``cumsum(ar)[j] <= cumsum(ar)[i]`` and both are real.  Returns ``[B, N, N]`` bool.
    """
    cum = torch.cumsum(ar_masks.long(), dim=1)
    att = cum[:, None, :] <= cum[:, :, None]
    pad = pad_masks[:, None, :] & pad_masks[:, :, None]
    return att & pad


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos / sin tables, float32.  positions: ``[B, L]`` -> two ``[B, L, head_dim]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, L, D]`` by the tables ``[B, L, D]`` (half-split convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rot = torch.cat([-x2, x1], dim=-1)
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * c + rot * s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Grouped-query attention with an additive mask.

    q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (Hq a multiple of Hkv);
    allowed: ``[B, Lq, Lk]`` bool.  Softmax in float32.  Returns ``[B, Lq, Hq * D]``.
    """
    b, hq, lq, d = q.shape
    rep = hq // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill(~allowed, MASK_VALUE)[:, None]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
    probs = logits.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, Hq, Lq, D]
    return out.transpose(1, 2).reshape(b, lq, hq * d)


# --------------------------------------------------------------------------------------------
# Decoder (Gemma / Llama) layers
# --------------------------------------------------------------------------------------------


@dataclass
class DecoderConfig:
    """One decoder stack (Gemma: PaliGemma's LM and pi0's expert; Llama: SmolVLM's LM).

    norm: ``"gemma"`` scales by ``1 + w`` (weights stored as offsets), ``"llama"`` by ``w``.
    adarms_cond_dim: if set, every RMSNorm is adaptive (pi0.5 expert): a Linear on the time
    conditioning gives (scale, shift, gate) and residuals are gated.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: Literal["gemma", "llama"] = "gemma"
    act: Literal["gelu_tanh", "silu"] = "gelu_tanh"
    eps: float = 1e-6
    adarms_cond_dim: int | None = None

    def num_params(self, vocab: int = 0) -> int:
        """Parameter count of the stack (embedding ``vocab x width`` included when vocab > 0)."""
        attn = self.width * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.width * self.mlp_dim
        norm = (self.adarms_cond_dim * 3 * self.width + 3 * self.width
                if self.adarms_cond_dim else self.width)
        return self.depth * (attn + mlp + 2 * norm) + norm + vocab * self.width


class RMSNorm(nn.Module):
    """RMSNorm, Gemma (``1 + w``) or Llama (``w``) style, optionally adaptive (adaRMS).

    forward(x ``[B, L, W]``, cond ``[B, C]`` or None) -> (normed ``[B, L, W]``, gate or None).
    """

    def __init__(self, dim: int, eps: float = 1e-6, style: str = "gemma",
                 cond_dim: int | None = None):
        super().__init__()
        self.eps, self.style, self.cond_dim = eps, style, cond_dim
        if cond_dim is not None:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)
        else:
            init = torch.zeros(dim) if style == "gemma" else torch.ones(dim)
            self.weight = nn.Parameter(init)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = x.dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cond_dim is None:
            w = self.weight.float()
            normed = normed * (1.0 + w) if self.style == "gemma" else normed * w
            return normed.to(dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the conditioning vector")
        mod = self.dense(cond)
        if x.dim() == 3:
            mod = mod[:, None]
        scale, shift, gate = mod.chunk(3, dim=-1)
        normed = normed * (1.0 + scale.float()) + shift.float()
        return normed.to(dtype), gate.to(dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + y * gate`` (adaRMS) or ``x + y``."""
    return x + y if gate is None else x + y * gate


class SelfAttentionProj(nn.Module):
    """The q / k / v / o projections of one decoder layer (no biases, as Gemma / Llama)."""

    def __init__(self, cfg: DecoderConfig, kv_in: int | None = None):
        super().__init__()
        self.head_dim = cfg.head_dim
        kv_in = cfg.width if kv_in is None else kv_in
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(kv_in, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(kv_in, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``."""

    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.act == "gelu_tanh" else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer whose halves are called separately so streams can share attention.

    ``qkv(x, cond)`` -> normalised projections; ``finish(x, attn_out, gate, cond)`` -> the layer's
    output after the output projection, residuals and MLP.
    """

    def __init__(self, cfg: DecoderConfig, kv_in: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps, cfg.norm, cfg.adarms_cond_dim)
        self.self_attn = SelfAttentionProj(cfg, kv_in)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps, cfg.norm, cfg.adarms_cond_dim)
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, cfg.act)

    def qkv(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        """x: ``[B, L, W]`` -> (q ``[B, H, L, D]``, k, v ``[B, Hkv, L, D]``, gate)."""
        h, gate = self.input_layernorm(x, cond)
        b, n, _ = h.shape
        d = self.cfg.head_dim
        q = self.self_attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
        k = self.self_attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
        v = self.self_attn.v_proj(h).view(b, n, -1, d).transpose(1, 2)
        return q, k, v, gate

    def query(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        """Only the queries (cross-attention layers): (q ``[B, H, L, D]``, gate)."""
        h, gate = self.input_layernorm(x, cond)
        b, n, _ = h.shape
        q = self.self_attn.q_proj(h).view(b, n, -1, self.cfg.head_dim).transpose(1, 2)
        return q, gate

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, gate: torch.Tensor | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[B, L, W]`` layer input; attn_out: ``[B, L, H * D]``."""
        out = gated_residual(x, self.self_attn.o_proj(attn_out.to(x.dtype)), gate)
        h, gate2 = self.post_attention_layernorm(out, cond)
        return gated_residual(out, self.mlp(h), gate2)


class DecoderStack(nn.Module):
    """``layers`` + final ``norm`` (+ optional ``embed_tokens``), HF key layout."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int = 0,
                 kv_in: list[int | None] | None = None):
        super().__init__()
        self.cfg = cfg
        if vocab_size > 0:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        kv_in = kv_in or [None] * cfg.depth
        self.layers = nn.ModuleList([DecoderLayer(cfg, kv_in[i]) for i in range(cfg.depth)])
        self.norm = RMSNorm(cfg.width, cfg.eps, cfg.norm, cfg.adarms_cond_dim)


# --------------------------------------------------------------------------------------------
# Vision towers (SigLIP, Idefics3)
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """A SigLIP-style ViT.  ``image_size / patch_size`` patches per side."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def num_params(self) -> int:
        w = self.width
        layer = 4 * (w * w + w) + 2 * w * self.mlp_dim + self.mlp_dim + w + 4 * w
        patch = 3 * self.patch_size ** 2 * w + w
        return self.depth * layer + patch + self.num_patches * w + 2 * w


class _VitAttention(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(w, w), nn.Linear(w, w)
        self.v_proj, self.out_proj = nn.Linear(w, w), nn.Linear(w, w)


class _VitMLP(nn.Module):
    def __init__(self, w: int, m: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(w, m), nn.Linear(m, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _VitLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = _VitAttention(cfg.width)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _VitMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn
        d = w // self.num_heads
        q = a.q_proj(h).view(b, n, -1, d).transpose(1, 2)
        k = a.k_proj(h).view(b, n, -1, d).transpose(1, 2)
        v = a.v_proj(h).view(b, n, -1, d).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * d ** -0.5).softmax(-1)
        o = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, n, w)
        x = x + a.out_proj(o)
        return x + self.mlp(self.layer_norm2(x))


class _VitEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, N, W]
        return x + self.position_embedding.weight[None, : x.shape[1]].to(x.dtype)


class _VitEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([_VitLayer(cfg) for _ in range(cfg.depth)])


class VisionTransformer(nn.Module):
    """``embeddings`` / ``encoder.layers`` / ``post_layernorm`` (HF SigLIP / Idefics3 layout).

    forward(pixels ``[B, 3, S, S]`` in [-1, 1]) -> ``[B, N, W]``.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _VitEmbeddings(cfg)
        self.encoder = _VitEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = maybe_checkpoint(layer, x, enabled=self.gradient_checkpointing and self.training)
        return self.post_layernorm(x)


def maybe_checkpoint(fn, *args, enabled: bool):
    """``torch.utils.checkpoint`` (non-reentrant) when enabled, else a plain call."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# --------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3,
                              max_period: float = 4.0) -> torch.Tensor:
    """pi0's sine-cosine embedding of the flow time.  t: ``[B]`` -> ``[B, dim]`` (float64 inside
    where the device supports it, as openpi, then cast to t's dtype)."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    dt = torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=dt, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    ang = (2 * math.pi / period)[None, :] * t.to(dt)[:, None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).to(t.dtype)


def resize_with_pad(img: torch.Tensor, size: int, pad: str = "center") -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` float in [-1, 1] to ``[B, 3, size, size]`` keeping the aspect ratio
    (bilinear, no antialiasing), padding with -1 (black).  ``pad="center"``: openpi / LeRobot's
    pi0 (the odd pixel at the bottom / right); ``"top_left"``: LeRobot's SmolVLA (all padding at
    the top and left)."""
    _, _, h, w = img.shape
    if h == size and w == size:
        return img
    ratio = max(h / size, w / size)
    nh, nw = int(h / ratio), int(w / ratio)
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False)
    pad_h, pad_w = size - nh, size - nw
    if pad == "top_left":
        return F.pad(img, (pad_w, 0, pad_h, 0), value=-1.0)
    if pad != "center":
        raise ValueError(f"pad must be 'center' or 'top_left', got {pad!r}")
    return F.pad(img, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                 value=-1.0)


def pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the last dim of ``x`` to ``n`` (error if larger)."""
    if x.shape[-1] > n:
        raise ValueError(f"dimension {x.shape[-1]} exceeds the model's {n}")
    return F.pad(x, (0, n - x.shape[-1]))
