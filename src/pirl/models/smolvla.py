"""SmolVLA (SmolVLM2 backbone + a narrow Llama action expert) as a pirl :class:`FlowPolicy`.

A port of LeRobot's SmolVLA (``lerobot/policies/smolvla/{modeling_smolvla,smolvlm_with_expert}.py``)
in plain PyTorch, for the same reasons as :mod:`pirl.models.pi0` (LeRobot needs torchvision and
therefore a different torch than pirl's CPU build; its SmolVLM backbone is built from a hub config
at run time; its denoising loop keeps the prefix in a mutable ``DynamicCache``).  Module names
follow LeRobot's (``vlm_with_expert.vlm.model.{vision_model, connector, text_model}``,
``vlm_with_expert.lm_expert``), so a LeRobot ``pretrained_model`` loads key-for-key.

Architecture (LeRobot defaults): the first 16 layers of SmolVLM2-500M's Llama text model; an
Idefics3 (SigLIP-B/16 at 512 px) vision tower whose 1024 patch features are pixel-shuffled (x4)
to 64 tokens and projected to the text width; image and language embeddings scaled by
``sqrt(width)``; the proprio state is one token at the *end of the prefix* (``state_proj``; image
and language tokens do not attend to it).  The expert (width ``0.75 * 960``, same heads / head dim)
has one layer per VLM layer and alternates:

- self-attention layers (even index): expert queries over [prefix K/V, suffix K/V], rotary
  positions continuing after the prefix;
- cross-attention layers (odd index): expert queries (positions restarting at 0) over the
  prefix only, through the expert's own ``k_proj`` / ``v_proj`` applied to the VLM's cached
  (already rotated) keys and values.

Action tokens attend causally to each other (SmolVLA's suffix flags are all 1), unlike pi0.
Time is fused with actions by pi0's ``action_time_mlp``.  Rotary base 10000 (SmolVLA's own
``apply_rope``), float32 softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pirl.models.base import FlowPolicy, Obs, VelocityOut
from pirl.models.lora import apply_lora
from pirl.models.vla_common import (Normalizer, PaddedActions, TrainConfig, ValueHead,
                                    VLAPrefix, images_to_model)
from pirl.models.vla_layers import (DecoderConfig, DecoderStack, VisionConfig, VisionTransformer,
                                    apply_rope, attention, make_att_2d_masks, maybe_checkpoint,
                                    pad_last, rope_cos_sin, sinusoidal_time_embedding)
from pirl.models.vla_tokenizer import TextTokenizer, pad_tokens

SMOLVLM_VOCAB = 49280


def expert_mlp_dim(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's ``get_intermediate_size``: ``multiple_of``-rounded ``multiplier * 2/3 * width``."""
    h = int(multiplier * int(2 * width / 3))
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def smolvlm2_500m_text(num_layers: int = 16) -> DecoderConfig:
    """SmolVLM2-500M's SmolLM2 text model, truncated to ``num_layers`` (SmolVLA keeps 16)."""
    return DecoderConfig(width=960, depth=num_layers, mlp_dim=2560, num_heads=15, num_kv_heads=5,
                         head_dim=64, norm="llama", act="silu", eps=1e-5)


def smolvlm2_500m_vision() -> VisionConfig:
    """SmolVLM2-500M's vision tower (SigLIP-B/16 at 512 px)."""
    return VisionConfig(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16,
                        image_size=512)


@dataclass
class SmolVLAConfig:
    """SmolVLA architecture + RL options (defaults: LeRobot's ``smolvla_base``).

    expert_width_multiplier: expert width = multiplier * VLM width; num_expert_layers: <= 0 for
    one per VLM layer (else a divisor of the VLM depth); self_attn_every_n_layers: expert layers
    with ``index % n == 0`` self-attend, the rest cross-attend (<= 0: all self-attention).
    """

    vision: VisionConfig = field(default_factory=smolvlm2_500m_vision)
    vlm: DecoderConfig = field(default_factory=smolvlm2_500m_text)
    vocab_size: int = SMOLVLM_VOCAB
    scale_factor: int = 4
    expert_width_multiplier: float = 0.75
    num_expert_layers: int = -1
    self_attn_every_n_layers: int = 2
    action_horizon: int = 50
    action_dim: int = 32
    state_dim: int = 32
    env_action_dim: int | None = None
    max_token_len: int = 48
    num_cameras: int = 3
    value_placement: str = "prefix"
    value_hidden: int = 256
    value_detach: bool = True
    normalization: str = "mean_std"
    norm_convention: str = "lerobot"  # see Pi0Config (SmolVLA checkpoints are LeRobot's)
    norm_eps: float | None = None
    action_normalization: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def expert(self) -> DecoderConfig:
        w = int(self.vlm.width * self.expert_width_multiplier)
        depth = self.vlm.depth if self.num_expert_layers <= 0 else self.num_expert_layers
        return DecoderConfig(width=w, depth=depth, mlp_dim=expert_mlp_dim(w),
                             num_heads=self.vlm.num_heads, num_kv_heads=self.vlm.num_kv_heads,
                             head_dim=self.vlm.head_dim, norm="llama", act="silu",
                             eps=self.vlm.eps)

    def __post_init__(self):
        if self.vlm.depth % self.expert.depth:
            raise ValueError(f"VLM depth {self.vlm.depth} is not a multiple of the expert's "
                             f"{self.expert.depth}")
        if self.value_placement not in ("expert", "prefix"):
            raise ValueError(f"bad value_placement {self.value_placement!r}")

    def is_cross(self, expert_layer: int) -> bool:
        n = self.self_attn_every_n_layers
        return n > 0 and expert_layer % n != 0

    def num_params(self) -> int:
        """Parameter count from the config (value head excluded)."""
        e, v = self.expert, self.vlm
        kvd = v.num_kv_heads * v.head_dim
        cross = sum(self.is_cross(i) for i in range(e.depth))
        # cross layers: k/v_proj take the VLM's kv (kvd) instead of the expert width
        exp = e.num_params() - cross * 2 * kvd * (e.width - kvd)
        conn = self.vision.width * self.scale_factor ** 2 * v.width
        heads = (self.state_dim * v.width + v.width + self.action_dim * e.width + e.width
                 + e.width * self.action_dim + self.action_dim + 2 * e.width * e.width + e.width
                 + e.width * e.width + e.width)
        return self.vision.num_params() + conn + v.num_params(self.vocab_size) + exp + heads


def tiny_smolvla_config(vocab_size: int = 300, **kw) -> SmolVLAConfig:
    """A few-layer SmolVLA with the real code path (CPU tests): 4 VLM layers, 4 expert layers
    alternating self / cross attention, 2x pixel shuffle."""
    base = dict(
        vision=VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                            image_size=32),
        vlm=DecoderConfig(width=48, depth=4, mlp_dim=96, num_heads=6, num_kv_heads=2,
                          head_dim=8, norm="llama", act="silu", eps=1e-5),
        vocab_size=vocab_size, scale_factor=2, action_horizon=6, action_dim=8, state_dim=8,
        env_action_dim=4, max_token_len=16, num_cameras=2, value_hidden=32)
    base.update(kw)
    return SmolVLAConfig(**base)


class _Wrap(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Idefics3's space-to-depth: ``[B, N, D]`` (N a square) -> ``[B, N / r^2, D r^2]``."""
    b, n, d = x.shape
    s = int(math.isqrt(n))
    x = x.view(b, s, s // r, d * r).permute(0, 2, 1, 3)
    x = x.reshape(b, s // r, s // r, d * r * r).permute(0, 2, 1, 3)
    return x.reshape(b, n // (r * r), d * r * r)


class SmolVLMWithExpert(nn.Module):
    """``vlm.model.{vision_model, connector.modality_projection.proj, text_model}`` and
    ``lm_expert`` (LeRobot's names)."""

    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        e = cfg.expert
        kvd = cfg.vlm.num_kv_heads * cfg.vlm.head_dim
        proj = nn.Linear(cfg.vision.width * cfg.scale_factor ** 2, cfg.vlm.width, bias=False)
        inner = _Wrap(vision_model=VisionTransformer(cfg.vision),
                      connector=_Wrap(modality_projection=_Wrap(proj=proj)),
                      text_model=DecoderStack(cfg.vlm, cfg.vocab_size))
        self.vlm = _Wrap(model=inner)
        self.lm_expert = DecoderStack(e, kv_in=[kvd if cfg.is_cross(i) else None
                                                for i in range(e.depth)])

    @property
    def vision(self) -> VisionTransformer:
        return self.vlm.model.vision_model

    @property
    def text(self) -> DecoderStack:
        return self.vlm.model.text_model


class SmolVLAPolicy(PaddedActions, FlowPolicy):
    """SmolVLA flow policy (obs as :class:`pirl.models.pi0.Pi0Policy`)."""

    def __init__(self, cfg: SmolVLAConfig, tokenizer: TextTokenizer,
                 norm_stats: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.action_horizon, self.action_dim = cfg.action_horizon, cfg.action_dim
        self.env_action_dim = cfg.env_action_dim or cfg.action_dim
        e = cfg.expert
        self.feature_dim = e.width
        self.vlm_with_expert = SmolVLMWithExpert(cfg)
        self.state_proj = nn.Linear(cfg.state_dim, cfg.vlm.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, e.width)
        self.action_out_proj = nn.Linear(e.width, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e.width, e.width)
        self.action_time_mlp_out = nn.Linear(e.width, e.width)
        vdim = cfg.vlm.width if cfg.value_placement == "prefix" else e.width
        self.value_head = ValueHead(vdim, cfg.value_hidden)
        self.normalizer = Normalizer(cfg.normalization if norm_stats else "identity", norm_stats,
                                     convention=cfg.norm_convention, eps=cfg.norm_eps,
                                     action_mode=cfg.action_normalization if norm_stats else None)
        self.lora_names: list[str] = []
        # VLM layer i -> expert layer (or None when the expert is shallower)
        every = cfg.vlm.depth // e.depth
        self.expert_of = [i // every if i % every == 0 else None for i in range(cfg.vlm.depth)]

    # ------------------------------------------------------------------ training switches
    def configure_training(self, train: TrainConfig | None = None) -> list[str]:
        """As :meth:`pirl.models.pi0.Pi0Policy.configure_training` (VLM = SmolVLM)."""
        train = train or self.cfg.train
        self.cfg.train = train
        vwe = self.vlm_with_expert
        for p in self.parameters():
            p.requires_grad_(True)
        if train.mode in ("expert_only", "lora"):
            for p in vwe.vlm.parameters():
                p.requires_grad_(False)
        elif train.mode == "vision_frozen":
            for p in vwe.vision.parameters():
                p.requires_grad_(False)
        elif train.mode != "full":
            raise ValueError(f"unknown train mode {train.mode!r}")
        if train.mode == "lora" and not self.lora_names:
            self.lora_names = apply_lora(vwe.text, train.lora_rank, train.lora_alpha,
                                         target=train.lora_target)
        vwe.vision.gradient_checkpointing = train.gradient_checkpointing
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ RL's frozen prefix
    def prefix_parameter_names(self) -> list[str]:
        """SmolVLM (vision, connector, text layers) and the state projection, whose token sits
        in the VLM prefix: everything the prefix cache is computed from.  (LeRobot's
        ``train_expert_only`` keeps ``state_proj`` trainable; RL's expert_only freezes it too, so
        that the rollout's cache stays valid in the update.)"""
        return [n for n, _ in self.named_parameters()
                if n.startswith(("vlm_with_expert.vlm.", "state_proj."))]

    def frozen_prefix(self, prefix: VLAPrefix) -> VLAPrefix:
        """The whole cache (K / V, pooled states and state all come from the parameters above)."""
        return prefix

    def thaw_prefix(self, frozen: VLAPrefix) -> VLAPrefix:
        return frozen

    def _autocast(self, device: torch.device):
        # train.autocast_bf16, or the run's precision (FlowPolicy.set_precision)
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.cfg.train.autocast_bf16
                              or self.autocast_dtype is not None)

    @property
    def _ckpt(self) -> bool:
        return self.cfg.train.gradient_checkpointing and self.training

    # ------------------------------------------------------------------ prefix
    def tokenize(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``task + "\\n"`` tokens (no BOS, the task not stripped: LeRobot's
        ``NewLineTaskProcessorStep``), right-padded: ``[B, T]`` ids and mask."""
        seqs = [self.tokenizer.encode(text if text.endswith("\n") else text + "\n")
                for text in instructions]
        ids, mask = pad_tokens(seqs, self.cfg.max_token_len, self.tokenizer.pad_id)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)

    def embed_prefix(self, obs: Obs):
        """(embeddings ``[B, P, W]``, pad ``[B, P]``, block flags ``[B, P]``, state ``[B, S]``):
        per camera its image tokens, then the prompt, then one state token (its own block)."""
        vwe = self.vlm_with_expert
        dev = self.state_proj.weight.device
        images = obs["images"].to(dev)
        b, c = images.shape[:2]
        if c > self.cfg.num_cameras:
            raise ValueError(f"{c} cameras but the model takes {self.cfg.num_cameras}")
        # LeRobot's SmolVLA pads at the top / left (pi0 centres)
        pix = torch.cat(images_to_model(images, self.cfg.vision.image_size, pad="top_left"), dim=0)
        feats = pixel_shuffle(vwe.vision(pix), self.cfg.scale_factor)
        img = vwe.vlm.model.connector.modality_projection.proj(feats)
        n_img, w = img.shape[1], img.shape[2]
        img = img * math.sqrt(w)
        img = img.view(c, b, n_img, w).transpose(0, 1).reshape(b, c * n_img, w)
        cam = obs.get("image_masks")
        cam = torch.ones(b, c, dtype=torch.bool, device=dev) if cam is None else cam.to(dev).bool()
        img_mask = cam[:, :, None].expand(b, c, n_img).reshape(b, c * n_img)
        ids, tok_mask = self.tokenize(list(obs["instruction"]))
        lang = vwe.text.embed_tokens(ids.to(dev)) * math.sqrt(w)
        state = pad_last(self.normalizer.normalize_state(obs["state"].to(dev).float()),
                         self.cfg.state_dim)
        st = self.state_proj(state)[:, None]
        x = torch.cat([img, lang.to(img.dtype), st.to(img.dtype)], dim=1)
        pad = torch.cat([img_mask, tok_mask.to(dev), torch.ones(b, 1, dtype=torch.bool,
                                                               device=dev)], dim=1)
        ar = torch.zeros_like(pad, dtype=torch.long)
        ar[:, -1] = 1
        return x, pad, ar, state

    def encode_prefix(self, obs: Obs) -> VLAPrefix:
        """Run the vision tower + the (truncated) SmolVLM text model once; cache each layer's
        rotated K and V ``[B, L, Hkv, P, D]``."""
        dev = self.state_proj.weight.device
        with self._autocast(dev):
            x, pad, ar, state = self.embed_prefix(obs)
            text = self.vlm_with_expert.text
            allowed = make_att_2d_masks(pad, ar)
            pos = torch.cumsum(pad.long(), dim=1) - 1
            cos, sin = rope_cos_sin(pos, text.cfg.head_dim)
            scale = text.cfg.head_dim ** -0.5
            ks, vs = [], []
            for layer in text.layers:
                x, k, v = maybe_checkpoint(_self_layer, layer, x, None, None, cos, sin, allowed,
                                           scale, enabled=self._ckpt)
                ks.append(k)
                vs.append(v)
            h, _ = text.norm(x)
            m = pad.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return VLAPrefix(keys=torch.stack(ks, 1), values=torch.stack(vs, 1), pad_mask=pad,
                         state=state, pooled=pooled.float())

    # ------------------------------------------------------------------ expert
    def velocity(self, prefix: VLAPrefix, x_t: torch.Tensor, t: torch.Tensor) -> VelocityOut:
        """Expert pass over the cached prefix.  x_t: ``[B, H, A]``; t: ``[B]``."""
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        cfg = self.cfg
        with self._autocast(x_t.device):
            act = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
            temb = sinusoidal_time_embedding(t.float(), act.shape[-1]).to(act.dtype)
            x = torch.cat([act, temb[:, None].expand_as(act)], dim=-1)
            x = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(x)))
            b, h = x.shape[:2]
            p = prefix.pad_mask.shape[1]
            ones = torch.ones(b, h, dtype=torch.bool, device=x.device)
            self_allowed = torch.cat([prefix.pad_mask[:, None].expand(b, h, p),
                                      make_att_2d_masks(ones, ones.long())], dim=2)
            cross_allowed = prefix.pad_mask[:, None].expand(b, h, p)
            ar = torch.arange(h, device=x.device)[None]
            hd = cfg.vlm.head_dim
            cs_self = rope_cos_sin(prefix.num_valid[:, None] + ar, hd)
            cs_cross = rope_cos_sin(ar.expand(b, h), hd)
            scale = hd ** -0.5
            layers = self.vlm_with_expert.lm_expert.layers
            for i, j in enumerate(self.expert_of):
                if j is None:
                    continue
                pk, pv = prefix.keys[:, i], prefix.values[:, i]
                if cfg.is_cross(j):
                    x = maybe_checkpoint(_cross_layer, layers[j], x, pk, pv, *cs_cross,
                                         cross_allowed, scale, enabled=self._ckpt)
                else:
                    x, _, _ = maybe_checkpoint(_self_layer, layers[j], x, pk, pv, *cs_self,
                                               self_allowed, scale, enabled=self._ckpt)
            out, _ = self.vlm_with_expert.lm_expert.norm(x)
        feats = out.float()
        v = F.linear(feats, self.action_out_proj.weight.float(), self.action_out_proj.bias.float())
        return VelocityOut(velocity=v, features=feats)

    # ------------------------------------------------------------------ critic / env space
    def value(self, prefix: VLAPrefix) -> torch.Tensor:
        """``[B]``: prefix placement reads the pooled VLM features; expert placement the expert's
        features averaged over the chunk at ``x = 0, t = 1``."""
        detach = self.cfg.value_detach
        if self.cfg.value_placement == "prefix":
            f = prefix.pooled
        else:
            b, dev = prefix.pad_mask.shape[0], prefix.pad_mask.device
            x0 = torch.zeros(b, self.cfg.action_horizon, self.cfg.action_dim, device=dev)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
                f = self.velocity(prefix, x0, torch.ones(b, device=dev)).features.mean(1)
        return self.value_head(f.detach() if detach else f)

    def postprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Model-space ``[B, H, A]`` -> env actions ``[B, H, env_action_dim]``."""
        return self.normalizer.unnormalize_actions(actions[..., : self.env_action_dim])


def _self_layer(layer, x, pk, pv, cos, sin, allowed, scale):
    """Self-attention layer; with cached (pk, pv) the queries also see the prefix.
    Returns (x, k rotated, v) of this stream."""
    q, k, v, _ = layer.qkv(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kk = k if pk is None else torch.cat([pk.to(k.dtype), k], dim=2)
    vv = v if pv is None else torch.cat([pv.to(v.dtype), v], dim=2)
    return layer.finish(x, attention(q, kk, vv, allowed, scale)), k, v


def _cross_layer(layer, x, pk, pv, cos, sin, allowed, scale):
    """Cross-attention layer: expert queries over its own projections of the VLM's cached
    (rotated) keys and values ``[B, Hkv, P, D]``."""
    q, _ = layer.query(x)
    q = apply_rope(q, cos, sin)
    b, hkv, p, d = pk.shape
    flat_k = pk.transpose(1, 2).reshape(b, p, hkv * d)
    flat_v = pv.transpose(1, 2).reshape(b, p, hkv * d)
    wk, wv = layer.self_attn.k_proj, layer.self_attn.v_proj
    k = wk(flat_k.to(wk.weight.dtype)).view(b, p, -1, d).transpose(1, 2)
    v = wv(flat_v.to(wv.weight.dtype)).view(b, p, -1, d).transpose(1, 2)
    return layer.finish(x, attention(q, k, v, allowed, scale))
