"""pi0 and pi0.5 (PaliGemma VLM + Gemma action expert) as pirl :class:`FlowPolicy` s.

Why our own port (of openpi's PyTorch model, ``openpi/models_pytorch/pi0_pytorch.py``) rather
than wrapping LeRobot's ``PI0Policy`` / ``PI05Policy``:

- dependencies: LeRobot pulls torchvision (which needs a different torch than pirl's CPU 2.13
  build) plus datasets / gymnasium / av, and its pi0 wants a patched ``transformers``; openpi's
  PyTorch model needs ``transformers==4.53.2`` with files copied *into* the installed package.
  This module needs nothing beyond torch (``tokenizers`` / ``sentencepiece`` only to read a real
  tokenizer file).
- interface: pirl's samplers drive the denoising loop through :meth:`velocity` on a cached prefix
  and need the expert's features; both references fuse the loop into ``sample_actions`` and keep
  the cache in a ``transformers`` ``DynamicCache`` (mutated in place).  Here the cache is a plain
  batch-first dataclass (:class:`~pirl.models.vla_common.VLAPrefix`) that runners can index.
- numerics: the layers follow openpi's PyTorch code (float32 softmax, Gemma ``1 + w`` RMSNorm,
  adaRMS with gated residuals, ``sqrt(width)`` token-embedding scale, no image-feature scaling,
  float64 time embedding); module names follow the HF modules openpi saves, so an openpi or
  LeRobot ``model.safetensors`` loads key-for-key (:mod:`pirl.models.checkpoint_io`).

pi0 vs pi0.5 (``Pi0Config.pi05``):

- pi0: the proprio state is a continuous token at the start of the expert's suffix
  (``state_proj``); the flow time is fused with each action token by an MLP
  (``action_time_mlp_in/out`` on ``[action_emb, time_emb]``).
- pi0.5: the state is discretised into 256 bins and written into the language prompt
  (``"Task: ..., State: 12 200 ...;\\nAction: "``); the time conditions every RMSNorm of the expert
  through adaRMSNorm (``time_mlp_in/out`` -> scale, shift, gate).

Attention: the prefix (images, instruction) attends bidirectionally to itself; the suffix attends
to all real prefix tokens and, block-causally, to itself (state token first for pi0, then the
action chunk, bidirectional within).  Since the prefix never attends to the suffix, its per-layer
K / V are computed once by :meth:`Pi0Policy.encode_prefix` and reused by every
:meth:`Pi0Policy.velocity` call: exactly what a joint forward pass computes.

Model-space vs env-space: the model works on padded, normalised vectors (``action_dim`` = 32 for
the real models).  :meth:`Pi0Policy.postprocess_actions` maps a sampled chunk to env actions
(unnormalise, keep the first ``env_action_dim`` dims); :meth:`Pi0Policy.sft_loss` takes env-space
demo chunks and counts only the real dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from pirl.models.base import FlowPolicy, Obs, VelocityOut
from pirl.models.lora import apply_lora
from pirl.models.vla_common import (Normalizer, PaddedActions, TrainConfig, ValueHead,
                                    VLAPrefix, clean_instruction, discretize_state, images_to_model)
from pirl.models.vla_layers import (DecoderConfig, DecoderStack, VisionConfig, VisionTransformer,
                                    apply_rope, attention, make_att_2d_masks, maybe_checkpoint,
                                    pad_last, rope_cos_sin, sinusoidal_time_embedding)
from pirl.models.vla_tokenizer import TextTokenizer, pad_tokens

PALIGEMMA_VOCAB = 257152


def siglip_so400m(image_size: int = 224) -> VisionConfig:
    """SigLIP So400m/14 (PaliGemma's vision tower)."""
    return VisionConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14,
                        image_size=image_size)


def gemma_2b() -> DecoderConfig:
    """Gemma 2B (PaliGemma's language model; openpi ``gemma_2b``)."""
    return DecoderConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                         head_dim=256)


def gemma_300m() -> DecoderConfig:
    """The ~300M Gemma action expert (openpi ``gemma_300m``)."""
    return DecoderConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1,
                         head_dim=256)


@dataclass
class Pi0Config:
    """Architecture and RL options of pi0 / pi0.5.

    action_dim / state_dim: the model's padded dims (32 in openpi); env_action_dim: how many of
    them the env uses (``postprocess_actions`` keeps these).  value_placement: ``"expert"`` (value
    head on the action expert's output averaged over the chunk, pi0 in RLinf) or ``"prefix"``
    (on the VLM's pooled prefix features, pi0.5).  normalization: ``identity`` / ``mean_std`` (pi0)
    / ``quantile`` (pi0.5).
    """

    pi05: bool = False
    vision: VisionConfig = field(default_factory=siglip_so400m)
    vlm: DecoderConfig = field(default_factory=gemma_2b)
    expert: DecoderConfig = field(default_factory=gemma_300m)
    vocab_size: int = PALIGEMMA_VOCAB
    action_horizon: int = 50
    action_dim: int = 32
    state_dim: int = 32
    env_action_dim: int | None = None
    max_token_len: int = 48
    num_cameras: int = 3
    value_placement: str = "expert"
    value_hidden: int = 256
    value_detach: bool = True
    normalization: str = "mean_std"
    # how the checkpoint's own code normalised and prompted (the loader sets them):
    # openpi (eps 1e-6 both ways; prompt cleaned, "\n" tokenized apart) or LeRobot (its
    # processors' eps, bare std / range when unnormalising; pi0's task + "\n" as one string)
    norm_convention: str = "openpi"
    norm_eps: float | None = None
    action_normalization: str | None = None
    prompt_format: str = "openpi"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        v, e = self.vlm, self.expert
        if v.depth != e.depth or v.head_dim != e.head_dim or v.num_kv_heads != e.num_kv_heads \
                or v.num_heads != e.num_heads:
            raise ValueError("pi0's VLM and expert must share depth, heads, kv heads and head_dim "
                             f"(got {v} vs {e})")
        if self.value_placement not in ("expert", "prefix"):
            raise ValueError(f"value_placement must be 'expert' or 'prefix', got "
                             f"{self.value_placement!r}")
        want = e.width if self.pi05 else None
        if e.adarms_cond_dim != want:
            self.expert = replace(e, adarms_cond_dim=want)

    def num_params(self) -> int:
        """Parameter count of the architecture (value head excluded), computed from the config."""
        we, wv = self.expert.width, self.vlm.width
        heads = self.action_dim * we + we + we * self.action_dim + self.action_dim
        if self.pi05:
            heads += 2 * (we * we + we)
        else:
            heads += self.state_dim * we + we + 2 * we * we + we + we * we + we
        proj = self.vision.width * wv + wv
        return (self.vision.num_params() + proj + self.vlm.num_params(self.vocab_size)
                + self.expert.num_params() + heads)


def pi0_config(**kw) -> Pi0Config:
    """Real-size pi0 (PaliGemma 3B + 300M expert)."""
    return Pi0Config(**kw)


def pi05_config(**kw) -> Pi0Config:
    """Real-size pi0.5: state in the prompt (200 tokens), adaRMS expert, prefix value head,
    quantile normalisation."""
    kw.setdefault("max_token_len", 200)
    kw.setdefault("value_placement", "prefix")
    kw.setdefault("normalization", "quantile")
    return Pi0Config(pi05=True, **kw)


def tiny_pi0_config(pi05: bool = False, vocab_size: int = 300, **kw) -> Pi0Config:
    """A few-layer, narrow pi0 / pi0.5 with the real code path (CPU tests)."""
    base = dict(
        vision=VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                            image_size=32),
        vlm=DecoderConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1,
                          head_dim=16),
        expert=DecoderConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1,
                             head_dim=16),
        vocab_size=vocab_size, action_horizon=6, action_dim=8, state_dim=8, env_action_dim=4,
        max_token_len=24 if not pi05 else 40, num_cameras=2, value_hidden=32,
        value_placement="prefix" if pi05 else "expert",
        normalization="quantile" if pi05 else "mean_std")
    base.update(kw)
    return Pi0Config(pi05=pi05, **base)


# ---------------------------------------------------------------------------------------------
# Modules named like openpi's (HF transformers) so that checkpoints load key-for-key
# ---------------------------------------------------------------------------------------------


class _Wrap(nn.Module):
    """A named container (reproduces HF nesting such as ``vision_tower.vision_model``)."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class PaliGemmaWithExpert(nn.Module):
    """``paligemma.model.{vision_tower.vision_model, multi_modal_projector.linear,
    language_model}`` and ``gemma_expert.model`` (the expert has no token embedding)."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        inner = _Wrap(
            vision_tower=_Wrap(vision_model=VisionTransformer(cfg.vision)),
            multi_modal_projector=_Wrap(linear=nn.Linear(cfg.vision.width, cfg.vlm.width)),
            language_model=DecoderStack(cfg.vlm, cfg.vocab_size))
        self.paligemma = _Wrap(model=inner)
        self.gemma_expert = _Wrap(model=DecoderStack(cfg.expert))

    @property
    def vision(self) -> VisionTransformer:
        return self.paligemma.model.vision_tower.vision_model

    @property
    def vlm(self) -> DecoderStack:
        return self.paligemma.model.language_model

    @property
    def expert(self) -> DecoderStack:
        return self.gemma_expert.model


class Pi0Policy(PaddedActions, FlowPolicy):
    """pi0 / pi0.5 flow policy.  See the module docstring.

    obs: ``images [B, C, 3, H, W]`` uint8 (C <= num_cameras; optional ``image_masks [B, C]``
    bool), ``state [B, S_env]``, ``instruction list[str]``.
    """

    def __init__(self, cfg: Pi0Config, tokenizer: TextTokenizer,
                 norm_stats: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.action_horizon = cfg.action_horizon
        self.action_dim = cfg.action_dim
        self.env_action_dim = cfg.env_action_dim or cfg.action_dim
        self.feature_dim = cfg.expert.width
        we = cfg.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(cfg)
        self.action_in_proj = nn.Linear(cfg.action_dim, we)
        self.action_out_proj = nn.Linear(we, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(we, we)
            self.time_mlp_out = nn.Linear(we, we)
        else:
            self.state_proj = nn.Linear(cfg.state_dim, we)
            self.action_time_mlp_in = nn.Linear(2 * we, we)
            self.action_time_mlp_out = nn.Linear(we, we)
        vdim = cfg.vlm.width if cfg.value_placement == "prefix" else we
        self.value_head = ValueHead(vdim, cfg.value_hidden)
        self.normalizer = Normalizer(cfg.normalization if norm_stats else "identity", norm_stats,
                                     convention=cfg.norm_convention, eps=cfg.norm_eps,
                                     action_mode=cfg.action_normalization if norm_stats else None)
        self.lora_names: list[str] = []

    # ------------------------------------------------------------------ training switches
    def configure_training(self, train: TrainConfig | None = None) -> list[str]:
        """Set ``requires_grad`` by ``train.mode`` (see :class:`TrainConfig`), add LoRA adapters
        for ``lora``, and switch gradient checkpointing.  Returns the trainable parameter names."""
        train = train or self.cfg.train
        self.cfg.train = train
        pwe = self.paligemma_with_expert
        for p in self.parameters():
            p.requires_grad_(True)
        if train.mode in ("expert_only", "lora"):
            for p in pwe.paligemma.parameters():
                p.requires_grad_(False)
        elif train.mode == "vision_frozen":
            for p in pwe.vision.parameters():
                p.requires_grad_(False)
        elif train.mode != "full":
            raise ValueError(f"unknown train mode {train.mode!r}")
        if train.mode == "lora" and not self.lora_names:
            self.lora_names = apply_lora(pwe.vlm, train.lora_rank, train.lora_alpha,
                                         target=train.lora_target)
        pwe.vision.gradient_checkpointing = train.gradient_checkpointing
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ RL's frozen prefix
    def prefix_parameter_names(self) -> list[str]:
        """PaliGemma (vision tower, projector, Gemma): what ``rl.train_mode=expert_only``
        freezes, as ``configure_training(TrainConfig("expert_only"))`` does."""
        return [n for n, _ in self.named_parameters()
                if n.startswith("paligemma_with_expert.paligemma.")]

    def frozen_prefix(self, prefix: VLAPrefix) -> VLAPrefix:
        """The whole cache: its K / V and pooled states come from the frozen VLM, the state from
        the normaliser (pi0 projects it in the expert, pi0.5 writes it into the prompt)."""
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
    def tokenize(self, instructions: list[str], state_norm: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens ``[B, T]`` and mask ``[B, T]`` (openpi's PaligemmaTokenizer format;
        pi0.5 writes the discretised normalised state into the prompt)."""
        seqs = []
        bins = discretize_state(state_norm) if self.cfg.pi05 else None
        for i, text in enumerate(instructions):
            text = clean_instruction(text)
            if self.cfg.pi05:
                prompt = f"Task: {text}, State: {' '.join(map(str, bins[i]))};\nAction: "
                seqs.append(self.tokenizer.encode(prompt, add_bos=True))
            elif self.cfg.prompt_format == "lerobot":  # LeRobot: raw task + "\n", one string
                raw = instructions[i] if instructions[i].endswith("\n") else instructions[i] + "\n"
                seqs.append(self.tokenizer.encode(raw, add_bos=True))
            else:
                seqs.append(self.tokenizer.encode(text, add_bos=True)
                            + self.tokenizer.encode("\n"))
        ids, mask = pad_tokens(seqs, self.cfg.max_token_len, self.tokenizer.pad_id)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)

    def embed_prefix(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix embeddings ``[B, P, W]``, pad mask ``[B, P]``, normalised padded state
        ``[B, S]``).  Images first (one block of tokens per camera), then the prompt."""
        pwe = self.paligemma_with_expert
        dev = self.action_in_proj.weight.device
        images = obs["images"].to(dev)
        b, c = images.shape[:2]
        if c > self.cfg.num_cameras:
            raise ValueError(f"{c} cameras but the model takes {self.cfg.num_cameras}")
        pix = torch.cat(images_to_model(images, self.cfg.vision.image_size), dim=0)
        img = pwe.paligemma.model.multi_modal_projector.linear(pwe.vision(pix))
        n_img = img.shape[1]
        img = img.view(c, b, n_img, -1).transpose(0, 1).reshape(b, c * n_img, -1)
        cam_mask = obs.get("image_masks")
        cam_mask = (torch.ones(b, c, dtype=torch.bool, device=dev) if cam_mask is None
                    else cam_mask.to(dev).bool())
        img_mask = cam_mask[:, :, None].expand(b, c, n_img).reshape(b, c * n_img)

        state_env = obs["state"].to(dev).float()
        state_norm = self.normalizer.normalize_state(state_env)
        ids, tok_mask = self.tokenize(list(obs["instruction"]), state_norm)
        emb = pwe.vlm.embed_tokens(ids.to(dev))
        emb = emb * math.sqrt(emb.shape[-1])
        x = torch.cat([img, emb.to(img.dtype)], dim=1)
        pad = torch.cat([img_mask, tok_mask.to(dev)], dim=1)
        return x, pad, pad_last(state_norm, self.cfg.state_dim)

    def encode_prefix(self, obs: Obs) -> VLAPrefix:
        """Run SigLIP + the Gemma VLM once; cache each layer's K (rotated) / V."""
        dev = self.action_in_proj.weight.device
        with self._autocast(dev):
            x, pad, state = self.embed_prefix(obs)
            vlm = self.paligemma_with_expert.vlm
            allowed = make_att_2d_masks(pad, torch.zeros_like(pad))
            pos = torch.cumsum(pad.long(), dim=1) - 1
            cos, sin = rope_cos_sin(pos, vlm.cfg.head_dim)
            ks, vs = [], []
            scale = vlm.cfg.head_dim ** -0.5
            for layer in vlm.layers:
                x, k, v = maybe_checkpoint(_prefix_layer, layer, x, cos, sin, allowed, scale,
                                           enabled=self._ckpt)
                ks.append(k)
                vs.append(v)
            h, _ = vlm.norm(x)
            m = pad.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return VLAPrefix(keys=torch.stack(ks, 1), values=torch.stack(vs, 1), pad_mask=pad,
                         state=state, pooled=pooled.float())

    # ------------------------------------------------------------------ expert
    def embed_suffix(self, prefix: VLAPrefix, x_t: torch.Tensor, t: torch.Tensor):
        """(suffix embeddings ``[B, S, We]``, block flags ``[B, S]``, adaRMS cond or None)."""
        b = x_t.shape[0]
        act = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        temb = sinusoidal_time_embedding(t.float(), act.shape[-1]).to(act.dtype)
        h = self.cfg.action_horizon
        if self.cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
            ar = torch.zeros(b, h, dtype=torch.long, device=x_t.device)
            ar[:, 0] = 1
            return act, ar, cond
        at = torch.cat([act, temb[:, None].expand_as(act)], dim=-1)
        at = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
        st = self.state_proj(prefix.state.to(act.dtype))[:, None]
        ar = torch.zeros(b, h + 1, dtype=torch.long, device=x_t.device)
        ar[:, :2] = 1
        return torch.cat([st, at], dim=1), ar, None

    def velocity(self, prefix: VLAPrefix, x_t: torch.Tensor, t: torch.Tensor) -> VelocityOut:
        """Action-expert pass over the cached prefix.  x_t: ``[B, H, A]``; t: ``[B]``."""
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        with self._autocast(x_t.device):
            x, ar, cond = self.embed_suffix(prefix, x_t, t)
            b, s = ar.shape
            p = prefix.pad_mask.shape[1]
            suffix_allowed = make_att_2d_masks(torch.ones_like(ar, dtype=torch.bool), ar)
            allowed = torch.cat([prefix.pad_mask[:, None, :].expand(b, s, p), suffix_allowed], 2)
            pos = prefix.num_valid[:, None] + torch.arange(s, device=x.device)[None]
            expert = self.paligemma_with_expert.expert
            cos, sin = rope_cos_sin(pos, expert.cfg.head_dim)
            scale = expert.cfg.head_dim ** -0.5
            for i, layer in enumerate(expert.layers):
                x = maybe_checkpoint(_suffix_layer, layer, x, cond, prefix.keys[:, i],
                                     prefix.values[:, i], cos, sin, allowed, scale,
                                     enabled=self._ckpt)
            out, _ = expert.norm(x, cond)
        feats = out[:, -self.cfg.action_horizon:].float()
        v = F.linear(feats, self.action_out_proj.weight.float(), self.action_out_proj.bias.float())
        return VelocityOut(velocity=v, features=feats)

    # ------------------------------------------------------------------ critic
    def value(self, prefix: VLAPrefix) -> torch.Tensor:
        """``[B]``.  Prefix placement: MLP on the pooled VLM features.  Expert placement: MLP on
        the expert's features averaged over the chunk, for the deterministic input ``x = 0``
        (the noise mean) at ``t = 1``, i.e. the first denoise step's context."""
        detach = self.cfg.value_detach
        if self.cfg.value_placement == "prefix":
            f = prefix.pooled
        else:
            b = prefix.pad_mask.shape[0]
            dev = prefix.pad_mask.device
            x0 = torch.zeros(b, self.cfg.action_horizon, self.cfg.action_dim, device=dev)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
                f = self.velocity(prefix, x0, torch.ones(b, device=dev)).features.mean(1)
        return self.value_head(f.detach() if detach else f)

    # ------------------------------------------------------------------ env-space helpers
    def postprocess_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Model-space chunk ``[B, H, A]`` -> env actions ``[B, H, env_action_dim]``."""
        return self.normalizer.unnormalize_actions(actions[..., : self.env_action_dim])


def _prefix_layer(layer, x, cos, sin, allowed, scale):
    """One VLM layer over the prefix; returns (x, k rotated, v)."""
    q, k, v, gate = layer.qkv(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return layer.finish(x, attention(q, k, v, allowed, scale), gate), k, v


def _suffix_layer(layer, x, cond, pk, pv, cos, sin, allowed, scale):
    """One expert layer: suffix queries over [cached prefix K/V, suffix K/V]."""
    q, k, v, gate = layer.qkv(x, cond)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kk = torch.cat([pk.to(k.dtype), k], dim=2)
    vv = torch.cat([pv.to(v.dtype), v], dim=2)
    return layer.finish(x, attention(q, kk, vv, allowed, scale), gate, cond)
