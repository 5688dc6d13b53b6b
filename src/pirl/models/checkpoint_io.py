"""Load pi0 / pi0.5 / SmolVLA from the local checkpoint folders users have; save pirl folders.

Formats read (detected from the folder's contents):

- **openpi PyTorch** (``examples/convert_jax_model_to_pytorch.py`` output; also the layout of the
  pi_RL / RLinf few-shot SFT checkpoints): ``model.safetensors`` with keys such as
  ``paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight`` and
  ``action_in_proj.weight``; ``config.json`` with ``action_dim``, ``action_horizon``,
  ``paligemma_variant``, ``action_expert_variant`` (no pi0.5 flag: pi0.5 is recognised by its
  ``time_mlp_in`` keys); normalisation stats in ``assets/<asset_id>/norm_stats.json``
  (``{"norm_stats": {"state": {"mean", "std", "q01", "q99"}, "actions": {...}}}``).
- **LeRobot** ``pretrained_model``: ``config.json`` with ``"type": "pi0" | "pi05" | "smolvla"``,
  ``model.safetensors`` whose keys carry LeRobot's ``model.`` prefix, stats in the
  pre/post-processor files (``policy_preprocessor.json`` naming a
  ``*normalizer_processor.safetensors`` with ``observation.state.mean`` / ``action.std`` ...).
- **pirl** (:func:`save_pirl`): ``config.json`` with ``"format": "pirl"`` and the full config,
  ``model.safetensors`` (value head and stats included), ``tokenizer.json``.

Older HF layouts (``paligemma.language_model.model.*``, ``paligemma.vision_tower.*``) are mapped
to the current one; a tied ``lm_head.weight`` stands in for a missing ``embed_tokens.weight``.
Tokenizers come from files in the folder (``tokenizer.model`` / ``tokenizer.json``) or a
``tokenizer=`` path / object; nothing is downloaded.

Every model parameter must be found with the right shape: a missing key raises
:class:`CheckpointError` naming it, a shape mismatch names the key and both shapes, and keys the
model does not use raise too (``ignore=`` regex to accept them).  Only the pirl-specific value
head (fresh critic) and the normaliser buffers (filled from the stats files) may be absent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from pirl.models.vla_common import _MODE_STATS, TrainConfig
from pirl.models.vla_layers import DecoderConfig, VisionConfig
from pirl.models.vla_tokenizer import load_tokenizer


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (the message names the key)."""


# ---------------------------------------------------------------------------------- raw files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def detect_format(folder: Path) -> str:
    """``"pirl"``, ``"lerobot"`` or ``"openpi"``."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("format") == "pirl":
        return "pirl"
    if "type" in cfg or any(folder.glob("policy_preprocessor*.json")):
        return "lerobot"
    return "openpi"


# ---------------------------------------------------------------------------------- stats


def load_openpi_norm_stats(folder: Path, asset_id: str | None = None) -> dict | None:
    """``{"state": {...}, "actions": {...}}`` from ``**/norm_stats.json`` (``asset_id`` picks one
    when several exist)."""
    files = sorted(folder.rglob("norm_stats.json"))
    if asset_id is not None:
        files = [f for f in files if asset_id in str(f.relative_to(folder))]
    if not files:
        return None
    if len(files) > 1:
        raise CheckpointError(f"several norm_stats.json in {folder}: "
                              f"{[str(f) for f in files]}; pass asset_id=")
    data = json.loads(files[0].read_text())
    data = data.get("norm_stats", data)
    return {k: {s: torch.tensor(v, dtype=torch.float32) for s, v in data[k].items()
                if s in ("mean", "std", "q01", "q99")} for k in ("state", "actions") if k in data}


def lerobot_normalizer_steps(folder: Path) -> list[tuple[Path, dict]]:
    """``(processor json, step)`` of every (un)normaliser step the folder's
    ``policy_*processor*.json`` files name."""
    out = []
    for js in sorted(folder.glob("policy_*processor*.json")):
        try:
            data = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{js}: not valid JSON ({e})") from e
        for step in data.get("steps", []):
            if "normalizer" in step.get("registry_name", ""):
                out.append((js, step))
    return out


def load_lerobot_norm_stats(folder: Path, state_key: str = "observation.state",
                            action_key: str = "action",
                            dims: dict[str, int] | None = None) -> dict | None:
    """Stats from LeRobot's normaliser / unnormaliser processor state files.

    A state file that a processor json names but that is missing raises CheckpointError naming
    both; ``dims`` (``{"state": 5, "actions": 4}``, the config's feature shapes) checks every
    stat's length, naming the file and field on a mismatch."""
    from safetensors.torch import load_file

    files = []
    for js, step in lerobot_normalizer_steps(folder):
        if step.get("state_file"):
            f = folder / step["state_file"]
            if not f.is_file():
                raise CheckpointError(f"{js.name} names the stats file {step['state_file']!r}, "
                                      f"which is missing from {folder}")
            files.append(f)
    files += [f for f in sorted(folder.glob("*normalizer_processor*.safetensors"))
              if f not in files]
    raw: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        raw.update({k: (v, f) for k, v in load_file(str(f)).items()})
    if not raw:
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for ours, theirs in (("state", state_key), ("actions", action_key)):
        stats = {}
        for s in ("mean", "std", "q01", "q99", "q10", "q90", "min", "max"):
            if f"{theirs}.{s}" not in raw:
                continue
            v, f = raw[f"{theirs}.{s}"]
            want = (dims or {}).get(ours)
            if want is not None and v.numel() != want:
                raise CheckpointError(f"{f.name}: {theirs}.{s} has {v.numel()} values but "
                                      f"config.json's {theirs} feature has {want} dims")
            stats[s] = v.float().reshape(-1)
        if stats:
            out[ours] = stats
    return out or None


def _lerobot_norm_setup(folder: Path, meta: dict, cfg) -> dict | None:
    """Set ``cfg``'s normalisation (modes, LeRobot's eps convention) from ``config.json`` and the
    processor files; return the stats, checked against the config's feature dims."""
    mapping = meta.get("normalization_mapping", {})
    modes = {}
    for ours, theirs in (("state", "STATE"), ("actions", "ACTION")):
        mode = mapping.get(theirs)
        if mode is not None and mode not in _LEROBOT_NORM:
            raise CheckpointError(f"{folder / 'config.json'}: normalization_mapping.{theirs} "
                                  f"{mode!r} is not supported (one of {sorted(_LEROBOT_NORM)})")
        modes[ours] = _LEROBOT_NORM[mode] if mode else cfg.normalization
    cfg.normalization, cfg.action_normalization = modes["state"], modes["actions"]
    cfg.norm_convention = "lerobot"
    for _, step in lerobot_normalizer_steps(folder):
        if "eps" in step.get("config", {}):
            cfg.norm_eps = float(step["config"]["eps"])
    feats = {**meta.get("input_features", {}), **meta.get("output_features", {})}
    dims = {ours: int(feats[k]["shape"][0]) for ours, k in
            (("state", "observation.state"), ("actions", "action")) if k in feats}
    stats = load_lerobot_norm_stats(folder, dims=dims)
    for key, mode in modes.items():
        if mode == "identity":
            continue
        need = _MODE_STATS[mode]
        have = (stats or {}).get(key, {})
        if not all(n in have for n in need):
            raise CheckpointError(
                f"{folder}: {key} normalisation {mode!r} needs {' / '.join(need)} statistics, "
                f"but the processor files (policy_*processor*.json and their "
                f"*normalizer_processor.safetensors) have {sorted(have) or 'none'}")
    return stats


_LEROBOT_NORM = {"MEAN_STD": "mean_std", "QUANTILES": "quantile", "IDENTITY": "identity",
                 "QUANTILE10": "quantile10", "MIN_MAX": "min_max"}


# ---------------------------------------------------------------------------------- state dicts


def _canon_pi0_key(k: str) -> str:
    if k.startswith("model.") and not k.startswith("model.layers"):
        k = k[len("model."):]
    k = k.replace("paligemma.language_model.model.", "paligemma.model.language_model.")
    k = k.replace("paligemma.language_model.lm_head.", "paligemma.lm_head.")
    for sub in ("vision_tower.", "multi_modal_projector."):
        k = k.replace(f"paligemma.{sub}", f"paligemma.model.{sub}")
    return k


def _canon_smolvla_key(k: str) -> str:
    if k.startswith("model.vlm_with_expert.") or re.match(
            r"model\.(state_proj|action_|value_head|normalizer)", k):
        k = k[len("model."):]
    k = k.replace("vlm_with_expert.vlm.model.text_model.model.", "vlm_with_expert.vlm.model.text_model.")
    return k


_OPTIONAL = re.compile(r"^(value_head\.|normalizer\.)")
_IGNORED = re.compile(r"(lm_head\.weight$|rotary_emb\.inv_freq$|gemma_expert\.model\.embed_tokens"
                      r"|lm_expert\.embed_tokens|\.num_batches_tracked$)")


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], canon,
                           ignore: str | None = None, pi05: bool = False,
                           copy: bool = True) -> list[str]:
    """Copy ``sd`` (source keys mapped by ``canon``) into ``model``; raise CheckpointError naming
    the first missing key / shape mismatch / unused key (all checked before anything is copied;
    ``copy=False`` only checks, e.g. against a model built on the ``meta`` device).  Returns the
    optional keys that were missing (left at their initial values)."""
    src = {canon(k): v for k, v in sd.items()}
    if pi05:  # LeRobot's older pi0.5 names
        src = {k.replace("action_time_mlp_", "time_mlp_"): v for k, v in src.items()}
    tied = [k for k in src if k.endswith("paligemma.lm_head.weight")
            or k.endswith("vlm.lm_head.weight")]
    target = model.state_dict()
    missing_opt, pairs, used = [], [], set()
    for name, param in target.items():
        val = src.get(name)
        if val is None and name.endswith("language_model.embed_tokens.weight") and tied:
            val = src[tied[0]]
            used.add(tied[0])
        if val is None:
            if _OPTIONAL.match(name):
                missing_opt.append(name)
                continue
            raise CheckpointError(f"checkpoint is missing key {name!r} "
                                  f"(expected shape {tuple(param.shape)})")
        if tuple(val.shape) != tuple(param.shape):
            raise CheckpointError(f"shape mismatch for {name!r}: checkpoint "
                                  f"{tuple(val.shape)} vs model {tuple(param.shape)}")
        pairs.append((param, val))
        used.add(name)
    ign = re.compile(ignore) if ignore else None
    extra = [k for k in src if k not in used and not _IGNORED.search(k)
             and not (ign and ign.search(k))]
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} key(s) the model does not use, e.g. "
                              f"{extra[:5]} (pass ignore=<regex> to skip them)")
    if copy:
        with torch.no_grad():
            for param, val in pairs:
                param.copy_(val.to(param.dtype))
    return missing_opt


def _check_tokenizer(tok, cfg) -> None:
    """A tokenizer that can emit ids past the model's embedding table would index out of range
    (or, padded tables aside, read the wrong rows): refuse it, naming its file."""
    n = getattr(tok, "vocab_size", None)
    if n is not None and n > cfg.vocab_size:
        where = getattr(tok, "path", None) or type(tok).__name__
        raise CheckpointError(f"tokenizer {where} has {n} tokens but the model's embedding "
                              f"table has {cfg.vocab_size} rows (wrong tokenizer for this "
                              "checkpoint? pass tokenizer=<file or folder>)")


def _build_checked(cls, cfg, tok, stats, sd, canon, ignore, pi05=False):
    """Check ``sd`` against a model built on the meta device (cheap even at 3B parameters),
    then build the real model and copy the weights in."""
    _check_tokenizer(tok, cfg)
    with torch.device("meta"):
        probe = cls(cfg, tok, norm_stats=stats)
    load_state_dict_strict(probe, sd, canon, ignore=ignore, pi05=pi05, copy=False)
    policy = cls(cfg, tok, norm_stats=stats)
    load_state_dict_strict(policy, sd, canon, ignore=ignore, pi05=pi05)
    policy.configure_training(cfg.train)
    return policy


# ---------------------------------------------------------------------------------- configs


GEMMA_VARIANTS = {"gemma_2b": "gemma_2b", "gemma_2b_lora": "gemma_2b",
                  "gemma_300m": "gemma_300m", "gemma_300m_lora": "gemma_300m"}


def _config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_dict(cls, d: dict):
    d = dict(d)
    if "vision" in d:
        d["vision"] = VisionConfig(**d["vision"])
    for k in ("vlm", "expert"):
        if k in d and isinstance(d[k], dict):
            d[k] = DecoderConfig(**d[k])
    if "train" in d:
        d["train"] = TrainConfig(**d["train"])
    return cls(**d)


def _tokenizer_for(folder: Path, tokenizer):
    if tokenizer is None:
        return load_tokenizer(folder)
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _pirl_stats(sd: dict[str, torch.Tensor]) -> dict | None:
    """Normaliser stats stored in a pirl state dict (``normalizer.state_mean`` ...)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in ("state", "actions"):
        for stat in ("mean", "std", "q01", "q99", "q10", "q90", "min", "max"):
            v = sd.get(f"normalizer.{key}_{stat}")
            if v is not None and v.numel() > 0:
                out.setdefault(key, {})[stat] = v
    return out or None


# ---------------------------------------------------------------------------------- pi0


def load_pi0(path: str | Path, arch=None, tokenizer=None, asset_id: str | None = None,
             ignore: str | None = None, **overrides: Any):
    """Build a :class:`~pirl.models.pi0.Pi0Policy` from an openpi / LeRobot / pirl folder.

    arch: a :class:`~pirl.models.pi0.Pi0Config` for non-standard sizes (e.g. tiny test models);
    otherwise the config comes from the folder (Gemma variants by name).  tokenizer: object, file
    or folder (default: the checkpoint folder).  overrides: Pi0Config fields to set (e.g.
    ``env_action_dim=7``, ``train=TrainConfig(mode="expert_only")``).
    """
    from pirl.models.pi0 import Pi0Config, Pi0Policy, gemma_2b, gemma_300m

    folder = Path(path)
    fmt = detect_format(folder)
    meta = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    sd = read_safetensors(folder)
    if fmt == "pirl":
        cfg = _config_from_dict(Pi0Config, meta["config"])
        stats = _pirl_stats(sd)
    else:
        pi05 = (meta.get("type") == "pi05" or any("time_mlp_in" in k and "action_" not in k
                                                   for k in sd))
        if arch is not None:
            cfg = dataclasses.replace(arch, pi05=pi05)
        else:
            variants = {"gemma_2b": gemma_2b, "gemma_300m": gemma_300m}
            vlm_v = GEMMA_VARIANTS.get(meta.get("paligemma_variant", "gemma_2b"))
            exp_v = GEMMA_VARIANTS.get(meta.get("action_expert_variant", "gemma_300m"))
            if vlm_v is None or exp_v is None:
                raise CheckpointError(f"unknown Gemma variant in {folder / 'config.json'}; "
                                      "pass arch=Pi0Config(...)")
            cfg = Pi0Config(pi05=pi05, vlm=variants[vlm_v](), expert=variants[exp_v]())
        if fmt == "lerobot":
            cfg.action_horizon = meta.get("chunk_size", cfg.action_horizon)
            cfg.action_dim = meta.get("max_action_dim", cfg.action_dim)
            cfg.state_dim = meta.get("max_state_dim", cfg.state_dim)
            cfg.max_token_len = meta.get("tokenizer_max_length", cfg.max_token_len)
            act = meta.get("output_features", {}).get("action", {}).get("shape")
            if act:
                cfg.env_action_dim = int(act[0])
            cfg.normalization = "quantile" if pi05 else "mean_std"
            cfg.prompt_format = "lerobot"
            stats = _lerobot_norm_setup(folder, meta, cfg)
        else:
            cfg.action_horizon = meta.get("action_horizon", cfg.action_horizon)
            cfg.action_dim = meta.get("action_dim", cfg.action_dim)
            cfg.state_dim = cfg.action_dim  # openpi pads state to action_dim
            cfg.normalization = "quantile" if pi05 else "mean_std"
            stats = load_openpi_norm_stats(folder, asset_id)
        if pi05:
            cfg.value_placement = "prefix"
            if arch is None:
                cfg.max_token_len = max(cfg.max_token_len, 200) if fmt == "openpi" else cfg.max_token_len
        cfg.__post_init__()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return _build_checked(Pi0Policy, cfg, _tokenizer_for(folder, tokenizer), stats, sd,
                          _canon_pi0_key, ignore, pi05=cfg.pi05)


# ---------------------------------------------------------------------------------- smolvla


def load_smolvla(path: str | Path, arch=None, tokenizer=None, ignore: str | None = None,
                 **overrides: Any):
    """Build a :class:`~pirl.models.smolvla.SmolVLAPolicy` from a LeRobot or pirl folder.

    LeRobot's config names the VLM by hub id; its architecture is SmolVLM2-500M's unless
    ``arch=`` says otherwise (the state dict's shapes are checked either way).
    """
    from pirl.models.smolvla import SmolVLAConfig, SmolVLAPolicy, smolvlm2_500m_text

    folder = Path(path)
    fmt = detect_format(folder)
    meta = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    sd = read_safetensors(folder)
    stats = None
    if fmt == "pirl":
        cfg = _config_from_dict(SmolVLAConfig, meta["config"])
        stats = _pirl_stats(sd)
    elif fmt == "lerobot":
        if meta.get("type", "smolvla") != "smolvla":
            raise CheckpointError(f"{folder} holds a {meta.get('type')!r} policy, not smolvla")
        if arch is not None:
            cfg = dataclasses.replace(arch)
        else:
            n = meta.get("num_vlm_layers", 16)
            cfg = SmolVLAConfig(vlm=smolvlm2_500m_text(n))
        for ours, theirs in (("action_horizon", "chunk_size"), ("action_dim", "max_action_dim"),
                             ("state_dim", "max_state_dim"), ("max_token_len", "tokenizer_max_length"),
                             ("expert_width_multiplier", "expert_width_multiplier"),
                             ("num_expert_layers", "num_expert_layers"),
                             ("self_attn_every_n_layers", "self_attn_every_n_layers")):
            if theirs in meta:
                setattr(cfg, ours, meta[theirs])
        if meta.get("attention_mode", "cross_attn") == "self_attn":
            cfg.self_attn_every_n_layers = -1
        act = meta.get("output_features", {}).get("action", {}).get("shape")
        if act:
            cfg.env_action_dim = int(act[0])
        cfg.normalization = "mean_std"
        stats = _lerobot_norm_setup(folder, meta, cfg)
        cfg.__post_init__()
    else:
        raise CheckpointError(f"{folder}: SmolVLA checkpoints come in LeRobot or pirl folders")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return _build_checked(SmolVLAPolicy, cfg, _tokenizer_for(folder, tokenizer), stats, sd,
                          _canon_smolvla_key, ignore)


# ---------------------------------------------------------------------------------- save


def save_pirl(policy, path: str | Path) -> Path:
    """Write ``config.json`` (``"format": "pirl"``), ``model.safetensors`` and, when the tokenizer
    has ``save``, ``tokenizer.json``.  LoRA adapters are saved merged into the base weights."""
    from safetensors.torch import save_file

    from pirl.models.lora import LoRALinear

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    lora = {n: m for n, m in policy.named_modules() if isinstance(m, LoRALinear)}
    for k, v in policy.state_dict().items():
        owner = next((n for n in lora if k.startswith(n + ".")), None)
        if owner is None:
            sd[k] = v.detach().cpu().contiguous()
        elif k == owner + ".base.weight":
            m = lora[owner]
            sd[owner + ".weight"] = (m.base.weight + m.scale * m.lora_B @ m.lora_A).detach().cpu()
        elif k == owner + ".base.bias":
            sd[owner + ".bias"] = v.detach().cpu()
    save_file(sd, str(folder / "model.safetensors"))
    cfg = _config_to_dict(policy.cfg)
    cfg["normalization"] = policy.normalizer.mode
    if "action_normalization" in cfg:
        cfg["action_normalization"] = policy.normalizer.action_mode
    cfg["train"] = dict(cfg["train"], mode="full" if cfg["train"]["mode"] == "lora"
                        else cfg["train"]["mode"])
    model = "smolvla" if type(policy).__name__ == "SmolVLAPolicy" else (
        "pi05" if policy.cfg.pi05 else "pi0")
    (folder / "config.json").write_text(json.dumps(
        {"format": "pirl", "model": model, "config": cfg}, indent=2))
    if hasattr(policy.tokenizer, "save"):
        policy.tokenizer.save(folder)
    return folder
