"""Tiny random checkpoints written in openpi / LeRobot / pirl layouts load back exactly; broken
checkpoints fail naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pirl.models.checkpoint_io import CheckpointError, load_pi0, load_smolvla, save_pirl
from pirl.models.pi0 import Pi0Policy, tiny_pi0_config
from pirl.models.smolvla import SmolVLAPolicy, tiny_smolvla_config
from pirl.models.vla_common import TrainConfig
from pirl.models.vla_tokenizer import WordTokenizer, load_tokenizer

from vla_helpers import make_obs, make_tokenizer

torch.set_num_threads(1)

STATS = {"state": {"mean": [0.1, 0.2, -0.1, 0.0], "std": [0.5, 1.5, 1.0, 2.0],
                   "q01": [-1.0, -2.0, -0.5, -1.0], "q99": [1.0, 0.5, 0.5, 3.0]},
         "actions": {"mean": [0.3, 0.0, 0.1, -0.2], "std": [2.0, 1.0, 0.5, 1.0],
                     "q01": [-2.0, -1.0, -1.0, -0.5], "q99": [2.0, 1.5, 0.5, 0.5]}}


def tensors(stats):
    return {k: {s: torch.tensor(v) for s, v in d.items()} for k, d in stats.items()}


def velocity(pol, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 6, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        pre = pol.encode_prefix(make_obs())
        return pol.velocity(pre, x, t).velocity, pol.postprocess_actions(x)


def model_sd(pol):
    return {k: v.clone().contiguous() for k, v in pol.state_dict().items()
            if not k.startswith(("value_head.", "normalizer."))}


def make_pi0(pi05, seed=0):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    return Pi0Policy(tiny_pi0_config(pi05=pi05, vocab_size=len(tok)), tok, norm_stats=tensors(STATS))


@pytest.mark.parametrize("pi05", [False, True])
def test_openpi_layout(tmp_path, pi05):
    """openpi PyTorch layout (older HF key names, lm_head tied in place of embed_tokens,
    assets/<id>/norm_stats.json, config.json without a pi05 flag)."""
    pol = make_pi0(pi05)
    sd = model_sd(pol)
    emb = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    sd["paligemma_with_expert.paligemma.lm_head.weight"] = sd.pop(emb)
    sd = {k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
           .replace("paligemma.model.vision_tower.", "paligemma.vision_tower."): v
          for k, v in sd.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"action_dim": 8, "action_horizon": 6, "paligemma_variant": "tiny",
         "action_expert_variant": "tiny", "precision": "float32"}))
    (tmp_path / "assets" / "libero").mkdir(parents=True)
    (tmp_path / "assets" / "libero" / "norm_stats.json").write_text(json.dumps({"norm_stats": STATS}))
    pol.tokenizer.save(tmp_path)
    with pytest.raises(CheckpointError, match="Gemma variant"):
        load_pi0(tmp_path)
    arch = tiny_pi0_config(pi05=False, vocab_size=len(pol.tokenizer), env_action_dim=4)
    got = load_pi0(tmp_path, arch=arch)
    assert got.cfg.pi05 == pi05
    assert got.normalizer.mode == ("quantile" if pi05 else "mean_std")
    v0, a0 = velocity(pol)
    v1, a1 = velocity(got)
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)
    torch.testing.assert_close(a1, a0, atol=0, rtol=0)


def lerobot_folder(tmp, sd, meta, stats, norm_keys=("mean", "std")):
    save_file({"model." + k: v for k, v in sd.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(meta))
    norm = {f"observation.state.{s}": torch.tensor(stats["state"][s]) for s in norm_keys}
    norm |= {f"action.{s}": torch.tensor(stats["actions"][s]) for s in norm_keys}
    save_file(norm, str(tmp / "policy_preprocessor_step_2_normalizer_processor.safetensors"))
    (tmp / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {},
         "state_file": "policy_preprocessor_step_2_normalizer_processor.safetensors"}]}))


@pytest.mark.parametrize("pi05", [False, True])
def test_lerobot_pi0_layout(tmp_path, pi05):
    pol = make_pi0(pi05, seed=1)
    if not pi05:
        pol.normalizer.mode = pol.normalizer.action_mode = "mean_std"
    # what a LeRobot folder means: its processors' eps convention and prompt format
    pol.normalizer.convention, pol.normalizer.eps = "lerobot", 1e-8
    pol.cfg.prompt_format = "lerobot"
    meta = {"type": "pi05" if pi05 else "pi0", "chunk_size": 6, "n_action_steps": 6,
            "max_action_dim": 8, "max_state_dim": 8, "tokenizer_max_length": pol.cfg.max_token_len,
            "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
            "output_features": {"action": {"type": "ACTION", "shape": [4]}},
            "normalization_mapping": {"VISUAL": "IDENTITY",
                                      "STATE": "QUANTILES" if pi05 else "MEAN_STD",
                                      "ACTION": "QUANTILES" if pi05 else "MEAN_STD"}}
    lerobot_folder(tmp_path, model_sd(pol), meta, STATS,
                   ("q01", "q99") if pi05 else ("mean", "std"))
    pol.tokenizer.save(tmp_path)
    # the real Gemma sizes named in config.json do not fit the tiny weights: named shape error
    with pytest.raises(CheckpointError, match="shape mismatch for 'paligemma_with_expert"):
        load_pi0(tmp_path)
    got = load_pi0(tmp_path, arch=tiny_pi0_config(vocab_size=len(pol.tokenizer)))
    assert got.env_action_dim == 4 and got.cfg.pi05 == pi05
    v0, a0 = velocity(pol)
    v1, a1 = velocity(got)
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)
    torch.testing.assert_close(a1, a0, atol=0, rtol=0)


def test_lerobot_smolvla_layout(tmp_path):
    torch.manual_seed(2)
    tok = make_tokenizer()
    pol = SmolVLAPolicy(tiny_smolvla_config(vocab_size=len(tok)), tok, norm_stats=tensors(STATS))
    meta = {"type": "smolvla", "chunk_size": 6, "max_action_dim": 8, "max_state_dim": 8,
            "tokenizer_max_length": 16, "num_vlm_layers": 4, "attention_mode": "cross_attn",
            "self_attn_every_n_layers": 2, "expert_width_multiplier": 0.75,
            "num_expert_layers": -1, "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
            "output_features": {"action": {"type": "ACTION", "shape": [4]}},
            "normalization_mapping": {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
    sd = model_sd(pol)
    sd["vlm_with_expert.vlm.lm_head.weight"] = torch.zeros(len(tok), 48)  # unused, ignored
    lerobot_folder(tmp_path, sd, meta, STATS)
    tok.save(tmp_path)
    got = load_smolvla(tmp_path, arch=tiny_smolvla_config(vocab_size=len(tok)))
    v0, a0 = velocity(pol)
    v1, a1 = velocity(got)
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)
    torch.testing.assert_close(a1, a0, atol=0, rtol=0)


def test_errors_name_the_key(tmp_path):
    pol = make_pi0(False)
    sd = model_sd(pol)
    key = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    arch = tiny_pi0_config(vocab_size=len(pol.tokenizer))
    pol.tokenizer.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"action_dim": 8, "action_horizon": 6}))

    bad = dict(sd)
    del bad[key]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        load_pi0(tmp_path, arch=arch)

    bad = dict(sd)
    bad[key] = bad[key][:, :-1].contiguous()
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"shape mismatch for '{key}'"):
        load_pi0(tmp_path, arch=arch)

    bad = dict(sd)
    bad["rlinf_extra_head.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="rlinf_extra_head.weight"):
        load_pi0(tmp_path, arch=arch)
    assert load_pi0(tmp_path, arch=arch, ignore=r"^rlinf_extra_head\.") is not None


@pytest.mark.parametrize("kind", ["pi0", "pi05", "smolvla"])
def test_pirl_round_trip_with_lora(tmp_path, kind):
    """save_pirl / load_pi0 / load_smolvla reproduce the policy (LoRA merged, value head and
    normaliser included)."""
    torch.manual_seed(3)
    tok = make_tokenizer()
    if kind == "smolvla":
        pol = SmolVLAPolicy(tiny_smolvla_config(vocab_size=len(tok)), tok, norm_stats=tensors(STATS))
    else:
        pol = Pi0Policy(tiny_pi0_config(pi05=kind == "pi05", vocab_size=len(tok)), tok,
                        norm_stats=tensors(STATS))
    pol.configure_training(TrainConfig(mode="lora", lora_rank=2))
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if n.endswith("lora_B") or n.startswith("value_head"):
                p.normal_(0, 0.1)
    save_pirl(pol, tmp_path)
    got = (load_smolvla if kind == "smolvla" else load_pi0)(tmp_path)
    assert type(got) is type(pol)
    assert isinstance(load_tokenizer(tmp_path), WordTokenizer)
    v0, a0 = velocity(pol)
    v1, a1 = velocity(got)
    torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, a0, atol=0, rtol=0)
    with torch.no_grad():
        pre = got.encode_prefix(make_obs())
        torch.testing.assert_close(got.value(pre), pol.value(pol.encode_prefix(make_obs())),
                                   atol=1e-5, rtol=1e-5)


def test_tokenizer_json_readable_by_hf_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = make_tokenizer()
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "pick up the red cube , State : 12 200"
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
