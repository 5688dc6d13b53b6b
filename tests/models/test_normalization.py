"""Normaliser conventions (openpi / LeRobot) and modes against the formulas written out, LeRobot
folders whose STATE and ACTION modes differ, and tokenizer special tokens named by
``tokenizer_config.json``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pirl.models.checkpoint_io import CheckpointError, load_pi0
from pirl.models.pi0 import Pi0Policy, tiny_pi0_config
from pirl.models.vla_common import Normalizer
from pirl.models.vla_tokenizer import load_tokenizer

from vla_helpers import make_tokenizer

torch.set_num_threads(1)

g = torch.Generator().manual_seed(0)
LO = torch.randn(4, generator=g)
HI = LO + torch.rand(4, generator=g) + 0.1
HI[3] = LO[3]  # a constant dim: LeRobot divides by eps there
MEAN, STD = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.05
X = torch.randn(2, 3, 6, generator=g)  # 6 > 4 stats dims: the tail passes through


def stats():
    s = {"mean": MEAN, "std": STD, "q01": LO, "q99": HI, "q10": LO, "q90": HI, "min": LO,
         "max": HI}
    return {"state": dict(s), "actions": dict(s)}


@pytest.mark.parametrize("mode", ["mean_std", "quantile", "quantile10", "min_max"])
@pytest.mark.parametrize("convention", ["openpi", "lerobot"])
def test_modes_and_conventions_match_the_formulas(mode, convention):
    n = Normalizer(mode, stats(), convention=convention)
    head = X[..., :4]
    if mode == "mean_std":
        if convention == "openpi":  # openpi transforms.py: std + 1e-6 both ways
            fwd, inv = (head - MEAN) / (STD + 1e-6), head * (STD + 1e-6) + MEAN
        else:  # LeRobot normalize_processor.py: eps only when normalising
            fwd, inv = (head - MEAN) / (STD + 1e-8), head * STD + MEAN
    else:
        if convention == "openpi":
            rng = HI - LO + 1e-6
        else:
            rng = torch.where(HI - LO == 0, torch.full_like(HI, 1e-8), HI - LO)
        fwd = 2.0 * (head - LO) / rng - 1.0
        inv = (head + 1.0) * rng / 2.0 + LO
    torch.testing.assert_close(n.normalize_state(X)[..., :4], fwd, atol=0, rtol=0)
    torch.testing.assert_close(n.unnormalize_actions(X)[..., :4], inv, atol=0, rtol=0)
    torch.testing.assert_close(n.normalize_actions(X)[..., 4:], X[..., 4:], atol=0, rtol=0)


def test_separate_action_mode_and_missing_stats():
    n = Normalizer("mean_std", stats(), convention="lerobot", action_mode="min_max")
    torch.testing.assert_close(n.normalize_state(X)[..., :4], (X[..., :4] - MEAN) / (STD + 1e-8))
    rng = torch.where(HI - LO == 0, torch.full_like(HI, 1e-8), HI - LO)
    torch.testing.assert_close(n.normalize_actions(X)[..., :4], 2 * (X[..., :4] - LO) / rng - 1)
    only = Normalizer("quantile10", {"state": {"mean": MEAN, "std": STD}})
    with pytest.raises(ValueError, match="no state q10 / q90 statistics"):
        only.normalize_state(X)
    with pytest.raises(ValueError, match="unknown normalisation mode 'zscore'"):
        Normalizer("zscore")


def lerobot_folder(tmp_path, state_mode, action_mode, eps=1e-5):
    tok = make_tokenizer()
    pol = Pi0Policy(tiny_pi0_config(vocab_size=len(tok)), tok)
    sd = {"model." + k: v.contiguous() for k, v in pol.state_dict().items()
          if not k.startswith(("value_head.", "normalizer."))}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "type": "pi0", "chunk_size": 6, "max_action_dim": 8, "max_state_dim": 8,
        "tokenizer_max_length": 24,
        "input_features": {"observation.state": {"type": "STATE", "shape": [4]}},
        "output_features": {"action": {"type": "ACTION", "shape": [4]}},
        "normalization_mapping": {"STATE": state_mode, "ACTION": action_mode}}))
    st = {f"{k}.{s}": v.clone() for k in ("observation.state", "action")
          for s, v in stats()["state"].items()}
    save_file(st, str(tmp_path / "policy_preprocessor_step_2_normalizer_processor.safetensors"))
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps({"steps": [
        {"registry_name": "normalizer_processor", "config": {"eps": eps},
         "state_file": "policy_preprocessor_step_2_normalizer_processor.safetensors"}]}))
    tok.save(tmp_path)
    return tok


def test_lerobot_folder_modes_and_eps_per_feature(tmp_path):
    tok = lerobot_folder(tmp_path, "MEAN_STD", "QUANTILE10")
    pol = load_pi0(tmp_path, arch=tiny_pi0_config(vocab_size=len(tok)))
    assert (pol.normalizer.mode, pol.normalizer.action_mode) == ("mean_std", "quantile10")
    assert (pol.normalizer.convention, pol.normalizer.eps, pol.cfg.prompt_format) == \
        ("lerobot", 1e-5, "lerobot")
    torch.testing.assert_close(pol.normalizer.normalize_state(X)[..., :4],
                               (X[..., :4] - MEAN) / (STD + 1e-5), atol=0, rtol=0)
    rng = torch.where(HI - LO == 0, torch.full_like(HI, 1e-5), HI - LO)
    chunk = torch.full((2, 6, 8), 0.5)  # model-space chunk -> env actions (4 dims, unnormalised)
    torch.testing.assert_close(pol.postprocess_actions(chunk),
                               ((0.5 + 1.0) * rng / 2.0 + LO).expand(2, 6, 4), atol=0, rtol=0)


def test_unsupported_lerobot_mode_is_named(tmp_path):
    tok = lerobot_folder(tmp_path, "MEAN_STD", "LOG_SCALE")
    with pytest.raises(CheckpointError, match="normalization_mapping.ACTION 'LOG_SCALE' is not "
                                              "supported"):
        load_pi0(tmp_path, arch=tiny_pi0_config(vocab_size=len(tok)))


def test_tokenizer_config_names_pad_and_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "<pad>": 3, "pick": 4, "up": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).pad_id == 3  # no config: the usual name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"}}))
    got = load_tokenizer(tmp_path)
    assert (got.pad_id, got.bos_id, got.vocab_size) == (1, 2, 6)
    assert got.encode("pick up", add_bos=True) == [2, 4, 5]
