"""Parity with LeRobot 0.6.1's pi0 / pi0.5 / SmolVLA on tiny models it built and saved.

tests/artifacts/parity/<kind>/ holds LeRobot's ``save_pretrained`` of the policy and of its pre /
post processors, a tokenizer trained by the generator, the raw inputs and LeRobot's outputs at
every stage (tools/parity/make_lerobot_reference.py, which needs LeRobot; these tests do not).
Each folder is loaded as a user loads a downloaded LeRobot checkpoint (``load_pi0`` /
``load_smolvla``; ``arch=`` only because the toy sizes have no variant name) and the raw inputs go
through pirl's own preprocessing: its tokenizer from the folder's ``tokenizer.json``, its prompt
format, its normaliser from the processor files, ``resize_with_pad`` (45x56 images to 32x32),
two cameras given and the third masked as missing, the 5-dim state padded to 8.

float32: every stage within 1e-5 absolute plus 4 float32 ulps relative (observed maxima in
docs/models.md; the relative part matters only for the loss elements, squared errors up to ~270,
whose last bit differs between CPUs).  bf16 autocast:
within the tolerances below (measured maxima x ~3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pirl.flow.ode import ODESampler
from pirl.models.checkpoint_io import CheckpointError, load_pi0, load_smolvla
from pirl.models.pi0 import Pi0Config
from pirl.models.smolvla import SmolVLAConfig
from pirl.models.vla_common import images_to_model
from pirl.models.vla_layers import DecoderConfig, VisionConfig

torch.set_num_threads(1)

ART = Path(__file__).resolve().parents[1] / "artifacts" / "parity"
KINDS = ["pi0", "pi05", "smolvla"]
ATOL = 1e-5
# 4 ulps of float32 (eps 1.19e-7): on an Intel Xeon pi0's loss element of ~200 came out 3.05e-5
# (1.5e-7 relative, 1-2 ulps) from LeRobot's value computed on an AMD EPYC
RTOL = 4 * torch.finfo(torch.float32).eps
# bf16 autocast against LeRobot's float32 outputs (max abs measured on these artifacts, see
# docs/models.md): prefix / expert in bf16, so differences are bf16 rounding of O(1) values
BF16_ATOL = {"velocity_t1": 0.03, "actions_3": 0.025, "actions_10": 0.025, "env_actions_10": 0.02,
             "loss_per_element": 0.25}


def arch_for(folder: Path):
    a = json.loads((folder / "pirl_arch.json").read_text())
    a["vision"] = VisionConfig(**a["vision"])
    a["vlm"] = DecoderConfig(**a["vlm"])
    if "expert" in a:
        a["expert"] = DecoderConfig(**a["expert"])
        return Pi0Config(**a)
    return SmolVLAConfig(**a)


def load(folder: Path, **kw):
    loader = load_smolvla if json.loads((folder / "config.json").read_text())["type"] == "smolvla" \
        else load_pi0
    return loader(folder, arch=arch_for(folder), **kw)


def reference(folder: Path):
    return load_file(str(folder / "reference.safetensors")), \
        json.loads((folder / "reference.json").read_text())


def obs_from(ref, meta, cameras: int = 3) -> dict:
    """The raw batch as an env gives it: uint8 [B, C, 3, 45, 56]; the missing third camera is a
    black placeholder with its mask off."""
    raw = ref["raw_images"]
    b = raw.shape[0]
    imgs = torch.cat([raw, torch.zeros_like(raw[:, :1])], 1)[:, :cameras]
    masks = torch.tensor([[True, True, False][:cameras]] * b)
    return {"images": imgs, "image_masks": masks, "state": ref["raw_state"],
            "instruction": list(meta["instructions"])}


def stage_outputs(pol, ref, meta, cameras: int = 3) -> dict[str, torch.Tensor]:
    """pirl's outputs for every stage LeRobot's reference holds (``ref`` keys)."""
    obs = obs_from(ref, meta, cameras)
    b = obs["state"].shape[0]
    out = {"state_norm": pol.normalizer.normalize_state(obs["state"])}
    pad = "top_left" if type(pol).__name__ == "SmolVLAPolicy" else "center"
    for i, img in enumerate(images_to_model(obs["images"], pol.cfg.vision.image_size, pad)):
        if f"image_{i}" in ref:  # the missing camera: LeRobot's -1 image (SmolVLA drops it)
            out[f"image_{i}"] = img
    with torch.no_grad():
        prefix = pol.encode_prefix(obs)
        out["velocity_t1"] = pol.velocity(prefix, ref["noise"], torch.ones(b)).velocity
        for k in (3, 10):
            out[f"actions_{k}"] = ODESampler(k).sample(pol, prefix, noise=ref["noise"]).actions
        out["env_actions_10"] = pol.postprocess_actions(out["actions_10"])
        a = pol.preprocess_actions(ref["demo_actions"])
        out["demo_actions_norm"] = a
        t = ref["time"].view(-1, 1, 1)
        v = pol.velocity(prefix, t * ref["noise"] + (1 - t) * a, ref["time"]).velocity
        out["loss_per_element"] = (v - (ref["noise"] - a)).pow(2)
    return out


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    folder = ART / request.param
    ref, meta = reference(folder)
    return request.param, folder, load(folder), ref, meta


def test_prompts_and_tokens(case):
    """Prompt strings (pi0: task + newline; pi0.5: cleaned task and the discretised normalised
    state) and token ids / masks from the folder's tokenizer equal LeRobot's."""
    kind, _, pol, ref, meta = case
    if kind == "smolvla":
        ids, mask = pol.tokenize(meta["instructions"])
    else:
        ids, mask = pol.tokenize(meta["instructions"], pol.normalizer.normalize_state(ref["raw_state"]))
    want = [pol.tokenizer.encode(p, add_bos=kind != "smolvla") for p in meta["prompts"]]
    assert [row[: len(w)] for row, w in zip(ids.tolist(), want)] == want
    n = ref["token_ids"].shape[1]  # SmolVLA pads to the longest prompt, pirl to max_token_len
    assert ids[:, :n].tolist() == ref["token_ids"].tolist()
    assert mask[:, :n].tolist() == ref["token_mask"].bool().tolist()
    assert not mask[:, n:].any()


def test_float32_stages_match(case):
    kind, _, pol, ref, meta = case
    got = stage_outputs(pol, ref, meta)
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{kind} {name}: {m}")


def test_image_masks_match(case):
    """LeRobot's per-camera masks: the two given cameras on, the missing one off (SmolVLA with
    ``empty_cameras=0`` drops it instead: pirl's masked camera and no camera agree)."""
    kind, _, pol, ref, meta = case
    masks = [ref[k].bool() for k in sorted(ref) if k.startswith("image_mask_")]
    assert [bool(m.all()) for m in masks] == [True, True, False][: len(masks)]
    if kind == "smolvla":
        two = stage_outputs(pol, ref, meta, cameras=2)
        torch.testing.assert_close(two["actions_10"], ref["actions_10"], atol=ATOL, rtol=0)


def test_bf16_autocast_within_measured_tolerance(case):
    kind, folder, _, ref, meta = case
    pol = load(folder)
    pol.cfg.train.autocast_bf16 = True
    got = stage_outputs(pol, ref, meta)
    for name, tol in BF16_ATOL.items():
        torch.testing.assert_close(got[name], ref[name], atol=tol, rtol=0,
                                   msg=lambda m: f"{kind} {name} (bf16): {m}")


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def copy_of(tmp_path):
    def make(kind: str) -> Path:
        dst = tmp_path / kind
        shutil.copytree(ART / kind, dst)
        return dst
    return make


def test_missing_stats_file_is_named(copy_of):
    folder = copy_of("pi0")
    stats = next(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    stats.unlink()
    with pytest.raises(CheckpointError, match=f"policy_preprocessor.json names the stats file "
                                              f"'{stats.name}', which is missing"):
        load(folder)


def test_no_stats_at_all_is_an_error(copy_of):
    folder = copy_of("pi05")
    for f in folder.glob("policy_*processor*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="state normalisation 'quantile' needs q01 / q99"):
        load(folder)


def test_stats_of_wrong_dimension_are_named(copy_of):
    folder = copy_of("smolvla")
    f = next(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    sd = load_file(str(f))
    sd["observation.state.std"] = torch.ones(7)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=rf"{f.name}: observation.state.std has 7 values "
                                              r"but config.json's observation.state feature has 5"):
        load(folder)


def test_tokenizer_larger_than_vocabulary_is_named(copy_of):
    folder = copy_of("pi0")
    arch = arch_for(folder)
    arch.vocab_size = 50
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer.json has \d+ tokens but the "
                                              r"model's embedding table has 50 rows"):
        load_pi0(folder, arch=arch)


def test_wrong_channel_count_is_named():
    folder = ART / "pi0"
    ref, meta = reference(folder)
    pol = load(folder)
    obs = obs_from(ref, meta)
    obs["images"] = obs["images"][:, :, :1]  # grayscale
    with pytest.raises(ValueError, match=r"obs\['images'\] must be \[B, cameras, 3, H, W\].*"
                                         r"got shape \(3, 3, 1, 45, 56\)"):
        pol.encode_prefix(obs)


# ------------------------------------------------------------------------------ openpi layout


def openpi_folder(src: Path, dst: Path) -> None:
    """The LeRobot pi0 artifact rewritten in openpi's PyTorch layout: no ``model.`` prefix, the
    older HF names (``paligemma.language_model.model.*``, ``paligemma.vision_tower.*``), the
    embedding only as the tied ``lm_head``, ``config.json`` with openpi's fields and the stats in
    ``assets/<asset_id>/norm_stats.json``."""
    sd = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if k.endswith("lm_head.weight"):
            continue  # LeRobot saves the (unused) head apart; openpi's is the tied embedding
        k = k[len("model."):]
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        k = k.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
        if k.endswith("language_model.model.embed_tokens.weight"):
            k = "paligemma_with_expert.paligemma.language_model.lm_head.weight"
        sd[k] = v
    dst.mkdir()
    save_file(sd, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps({
        "action_dim": 8, "action_horizon": 6, "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m"}))
    pre = next(src.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    raw = load_file(str(pre))
    stats = {ours: {s: raw[f"{theirs}.{s}"].tolist() for s in ("mean", "std", "q01", "q99")}
             for ours, theirs in (("state", "observation.state"), ("actions", "action"))}
    (dst / "assets" / "robot").mkdir(parents=True)
    (dst / "assets" / "robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")


def test_openpi_layout_keys_and_conventions(tmp_path):
    """Same weights in openpi's layout load key for key; the folder keeps openpi's conventions:
    eps 1e-6 on both sides of mean / std, the prompt cleaned with its newline tokenized apart."""
    lerobot = ART / "pi0"
    openpi_folder(lerobot, tmp_path / "openpi")
    a = load(lerobot)
    arch = arch_for(lerobot)
    b = load_pi0(tmp_path / "openpi", arch=arch, env_action_dim=4)
    sa, sb = a.state_dict(), b.state_dict()
    model_keys = [k for k in sa if not k.startswith(("normalizer.", "value_head."))]
    assert sorted(model_keys) == sorted(k for k in sb if not k.startswith(("normalizer.", "value_head.")))
    for k in model_keys:
        assert torch.equal(sa[k], sb[k]), k
    assert (b.cfg.norm_convention, b.cfg.prompt_format, b.normalizer.eps) == ("openpi", "openpi", 1e-6)
    ref, meta = reference(lerobot)
    x = ref["actions_10"]
    mean, std = b.normalizer.actions_mean, b.normalizer.actions_std
    torch.testing.assert_close(b.postprocess_actions(x), x[..., :4] * (std + 1e-6) + mean,
                               atol=0, rtol=0)
    s = ref["raw_state"]
    torch.testing.assert_close(b.normalizer.normalize_state(s),
                               (s - b.normalizer.state_mean) / (b.normalizer.state_std + 1e-6),
                               atol=0, rtol=0)
    ids, _ = b.tokenize(meta["instructions"], None)
    tok = b.tokenizer
    for row, text in zip(ids.tolist(), meta["instructions"]):
        clean = text.strip().replace("_", " ")
        want = tok.encode(clean, add_bos=True) + tok.encode("\n")
        assert row[: len(want)] == want
