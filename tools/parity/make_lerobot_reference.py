"""Regenerate tests/artifacts/parity/{pi0,pi05,smolvla}/ with LeRobot 0.6.1 (not run by CI).

Each folder holds what a user downloads from a LeRobot training run, at toy size:

- ``config.json`` + ``model.safetensors``: LeRobot's ``policy.save_pretrained`` of a tiny model
  whose every weight (norms and adaRMS included) is drawn from N(0, 0.1^2) with a fixed seed;
- ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their
  ``*normalizer_processor.safetensors``: LeRobot's processors, saved by their ``save_pretrained``
  (so the normalisation stats files are LeRobot's own);
- ``tokenizer.json`` / ``tokenizer_config.json``: a BPE tokenizer trained here on a few strings
  with the ``tokenizers`` package (never downloaded); LeRobot's tokenizer step runs it through
  ``transformers.PreTrainedTokenizerFast``.  (Real pi0 / pi0.5 folders name
  ``google/paligemma-3b-pt-224`` instead; the saved processor config still does.)
- ``pirl_arch.json``: the tiny architecture (real checkpoints are recognised by their variant
  names; toy ones need ``arch=``);
- ``reference.safetensors`` + ``reference.json``: the raw inputs (uint8 images of two cameras at
  another resolution than the model's, a third camera missing, env-dim state, instructions,
  fixed noise / time / demo actions) and LeRobot's outputs at every stage: normalised state,
  resized and padded images, prompt strings, token ids and masks, velocities at t = 1, actions
  after 3 and 10 Euler steps, the per-element flow-matching loss, unnormalised env actions.

Environment (see tools/parity/README.md): a separate venv with torch 2.13 (CPU),
``lerobot==0.6.1`` installed with ``--no-deps --ignore-requires-python`` plus its dependencies,
``transformers`` 5.5, its PEP 695 syntax patched by ``patch_lerobot_py311.py``.

    /work/lerobot-venv/bin/python tools/parity/make_lerobot_reference.py [--out DIR] [--only pi0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import types
from pathlib import Path

import torch

# torchvision 0.28 from the registry is built against CUDA torch: its C++ operators fail to
# register on the CPU build.  The policies never call them; stand-in schemas let it import.
_tv = torch.library.Library("torchvision", "DEF")
_tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import lerobot  # noqa: E402
import transformers  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.processor import TokenizerProcessorStep  # noqa: E402
from lerobot.processor.converters import create_transition  # noqa: E402
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234
B, H_CHUNK, A_MAX, S_MAX = 3, 6, 8, 8
STATE_DIM, ACTION_DIM = 5, 4          # env dims (padded to S_MAX / A_MAX by the model)
IMAGE = 32                            # model resolution
CAMERAS = ["observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb",
           "observation.images.right_wrist_0_rgb"]   # the third is missing from the batch
RAW_SIZE = (45, 56)                   # (H, W) of the two cameras given: resize + odd padding
INSTRUCTIONS = ["pick up the red cube", "put the bowl on the plate ", "open_the top drawer"]

# ------------------------------------------------------------------------------ tokenizer


def train_tokenizer(add_bos: bool):
    """A byte-free BPE (SentencePiece-like: spaces become '▁', '\\n' is its own token) trained on
    the instructions, prompt templates and the numbers 0..255, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n|▁?[^▁\n]+|▁"), behavior="isolated")
    corpus = INSTRUCTIONS + ["Task: pick up the red cube, State: 1 2 3;\nAction: ",
                             "open the drawer\n", "put the bowl on the plate\n"]
    corpus += [" ".join(str(i) for i in range(k, 256, 7)) for k in range(7)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list("▁\n_,:;.0123456789abcdefghijklmnopqrstuvwxyzTSA"))
    tok.train_from_iterator(corpus, trainer)
    if add_bos:  # as PaliGemma's tokenizer: <bos> before the text
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>")
    return tok, fast


# ------------------------------------------------------------------------------ tiny models


def _gemma_config(mod, width, depth, mlp, heads, kv, head_dim):
    return mod.GemmaConfig(width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
                           num_kv_heads=kv, head_dim=head_dim)


def tiny_pi_patches(mod, vocab: int):
    """Make ``mod`` (modeling_pi0 / modeling_pi05) build a tiny model: both Gemma variants get
    toy sizes (8 heads: LeRobot's attention reshape hard-codes them), and the PaliGemma config a
    toy SigLIP + vocabulary.  Forward, sampling and loss code stay LeRobot's."""
    sizes = {"gemma_2b": (64, 2, 128, 8, 1, 8), "gemma_300m": (32, 2, 64, 8, 1, 8)}
    mod.get_gemma_config = lambda variant: _gemma_config(mod, *sizes[variant])

    def init(self, vlm_config, action_expert_config, use_adarms=None, precision="float32",
             image_size=IMAGE, freeze_vision_encoder=False, train_expert_only=False):
        use_adarms = use_adarms or [False, False]
        torch.nn.Module.__init__(self)
        self.freeze_vision_encoder = freeze_vision_encoder
        self.train_expert_only = train_expert_only
        cfg = mod.CONFIG_MAPPING["paligemma"]()
        cfg._vocab_size = vocab  # noqa: SLF001
        cfg.image_token_index = vocab
        t = cfg.text_config
        t.hidden_size, t.intermediate_size = vlm_config.width, vlm_config.mlp_dim
        t.num_attention_heads, t.head_dim = vlm_config.num_heads, vlm_config.head_dim
        t.num_hidden_layers, t.num_key_value_heads = vlm_config.depth, vlm_config.num_kv_heads
        t.hidden_activation, t.dtype, t.vocab_size = "gelu_pytorch_tanh", "float32", vocab
        t.use_adarms = use_adarms[0]
        t.adarms_cond_dim = vlm_config.width if use_adarms[0] else None
        v = cfg.vision_config
        v.image_size, v.patch_size, v.hidden_size = image_size, 8, 32
        v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 64, 2, 2
        v.projection_dim, v.projector_hidden_act, v.dtype = vlm_config.width, "gelu_fast", "float32"
        cfg.projection_dim = vlm_config.width
        cfg.text_config.vocab_size = vocab
        e = action_expert_config
        expert_cfg = mod.CONFIG_MAPPING["gemma"](
            head_dim=e.head_dim, hidden_size=e.width, intermediate_size=e.mlp_dim,
            num_attention_heads=e.num_heads, num_hidden_layers=e.depth,
            num_key_value_heads=e.num_kv_heads, vocab_size=vocab,
            hidden_activation="gelu_pytorch_tanh", dtype="float32", use_adarms=use_adarms[1],
            adarms_cond_dim=e.width if use_adarms[1] else None)
        self.paligemma = mod.PaliGemmaForConditionalGenerationWithPiGemma(config=cfg)
        self.gemma_expert = mod.PiGemmaForCausalLM(config=expert_cfg)
        self.gemma_expert.model.embed_tokens = None
        self.to_bfloat16_for_selected_params(precision)
        self._set_requires_grad()

    mod.PaliGemmaWithExpertModel.__init__ = init


def tiny_smolvla_patches(vocab: int, fast_tok):
    """SmolVLA builds its VLM from ``AutoConfig.from_pretrained(vlm_model_name)`` and reads image
    token ids from ``AutoProcessor``: hand it a toy SmolVLM config and the local tokenizer."""
    from lerobot.policies.smolvla import smolvlm_with_expert as swe
    from transformers import SmolVLMConfig

    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=96,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=8, vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=512, tie_word_embeddings=False),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=8, image_size=IMAGE),
        scale_factor=2, vocab_size=vocab, image_token_id=fast_tok.convert_tokens_to_ids("<unk>"))
    fast_tok.fake_image_token_id = fast_tok.convert_tokens_to_ids("<unk>")
    fast_tok.global_image_token_id = fast_tok.convert_tokens_to_ids("<unk>")
    swe.AutoConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: cfg)
    swe.AutoProcessor = types.SimpleNamespace(
        from_pretrained=lambda *a, **k: types.SimpleNamespace(tokenizer=fast_tok))
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.1^2) (norm weights, adaRMS and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.1)


def features():
    img = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE)) for k in CAMERAS}
    return ({**img, "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))},
            {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))})


def dataset_stats(g: torch.Generator) -> dict:
    out = {}
    for key, d in (("observation.state", STATE_DIM), ("action", ACTION_DIM)):
        mean = torch.randn(d, generator=g) * 0.5
        std = torch.rand(d, generator=g) * 1.5 + 0.05
        q01 = mean - 2 * std * (0.5 + torch.rand(d, generator=g))
        q99 = mean + 2 * std * (0.5 + torch.rand(d, generator=g))
        out[key] = {"mean": mean, "std": std, "min": q01 - 0.5, "max": q99 + 0.5,
                    "q01": q01, "q99": q99, "q10": mean - std, "q90": mean + std,
                    "count": torch.tensor([1000])}
    return out


# ------------------------------------------------------------------------------ one model


def build(kind: str, fast_tok, vocab: int):
    in_f, out_f = features()
    common = dict(input_features=in_f, output_features=out_f, chunk_size=H_CHUNK,
                  n_action_steps=H_CHUNK, max_state_dim=S_MAX, max_action_dim=A_MAX,
                  device="cpu")
    if kind in ("pi0", "pi05"):
        if kind == "pi0":
            from lerobot.policies.pi0 import modeling_pi0 as mod
            from lerobot.policies.pi0.configuration_pi0 import PI0Config as Cfg
            from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as mk
            cfg = Cfg(**common, tokenizer_max_length=24)
        else:
            from lerobot.policies.pi05 import modeling_pi05 as mod
            from lerobot.policies.pi05.configuration_pi05 import PI05Config as Cfg
            from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as mk
            cfg = Cfg(**common, tokenizer_max_length=48)
        cfg.dtype = "float32"
        cfg.image_resolution = (IMAGE, IMAGE)
        tiny_pi_patches(mod, vocab)
        policy = (mod.PI0Policy if kind == "pi0" else mod.PI05Policy)(cfg)
    else:
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig as Cfg
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
        from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors as mk
        tiny_smolvla_patches(vocab, fast_tok)
        cfg = Cfg(**common, tokenizer_max_length=16, resize_imgs_with_padding=(IMAGE, IMAGE),
                  num_vlm_layers=4, num_expert_layers=-1, self_attn_every_n_layers=2,
                  expert_width_multiplier=0.75, load_vlm_weights=False)
        policy = SmolVLAPolicy(cfg)
    return cfg, policy, mk


def _tokenizer_patch(fast_tok):
    """The pi0 / pi0.5 / SmolVLA processors load their tokenizer by hub name: serve the local one
    (the saved processor config keeps the name a real checkpoint has)."""
    import lerobot.processor.tokenizer_processor as tp

    tp.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: fast_tok)


def run_stages(kind, policy, pre, post, raw):
    """Everything LeRobot computes from the raw batch, stage by stage."""
    batch = {CAMERAS[i]: raw["images"][:, i].float() / 255.0 for i in range(2)}  # [0, 1]
    batch["observation.state"] = raw["state"].clone()
    batch["task"] = list(raw["instruction"])
    # the preprocessor, step by step: the prompt strings as they enter the tokenizer
    prompts = None
    transition = pre.to_transition(batch)
    for step in pre.steps:
        if isinstance(step, TokenizerProcessorStep):
            prompts = list(transition["complementary_data"]["task"])
        transition = step(transition)
    proc = pre.to_output(transition)
    out = {"state_norm": proc["observation.state"].clone(),
           "token_ids": proc[OBS_LANGUAGE_TOKENS].clone(),
           "token_mask": proc[OBS_LANGUAGE_ATTENTION_MASK].clone()}
    policy.eval()
    if kind == "smolvla":
        images, img_masks = policy.prepare_images(proc)
        state = policy.prepare_state(proc)
    else:
        images, img_masks = policy._preprocess_images(proc)
        state = policy.prepare_state(proc) if kind == "pi0" else None  # pi0.5: state in the prompt
    for i, (im, m) in enumerate(zip(images, img_masks)):
        out[f"image_{i}"] = im.clone()
        out[f"image_mask_{i}"] = m.clone()
    model = policy.model
    tokens, masks = proc[OBS_LANGUAGE_TOKENS], proc[OBS_LANGUAGE_ATTENTION_MASK]
    noise = raw["noise"]
    recorded = []
    orig = model.denoise_step

    def recording(*a, **k):
        v = orig(*a, **k)
        recorded.append(v.clone())
        return v

    model.denoise_step = recording
    with torch.no_grad():
        for k in (3, 10):
            recorded.clear()
            if kind == "smolvla":
                model.config.num_steps = k
                acts = model.sample_actions(images, img_masks, tokens, masks, state, noise=noise)
            elif kind == "pi0":
                acts = model.sample_actions(images, img_masks, tokens, masks, state, noise=noise,
                                            num_steps=k)
            else:
                acts = model.sample_actions(images, img_masks, tokens, masks, noise=noise,
                                            num_steps=k)
            out[f"actions_{k}"] = acts.clone()
            out["velocity_t1"] = recorded[0]
        env = post(out["actions_10"][:, :, :ACTION_DIM].clone())
        out["env_actions_10"] = env.clone()
        # flow-matching loss at fixed (noise, time) on normalised, padded demo actions
        demo = pre.steps[[type(s).__name__ for s in pre.steps].index("NormalizerProcessorStep")]
        a_norm = demo(create_transition(action=raw["demo_actions"].clone()))["action"]
        a_pad = torch.nn.functional.pad(a_norm, (0, A_MAX - ACTION_DIM))
        t = raw["time"]
        if kind == "smolvla":
            loss = model.forward(images, img_masks, tokens, masks, state, a_pad, noise, t)
        elif kind == "pi0":
            loss = model.forward(images, img_masks, tokens, masks, state, a_pad, noise, t)
        else:
            loss = model.forward(images, img_masks, tokens, masks, a_pad, noise, t)
        out["demo_actions_norm"] = a_pad.clone()
        out["loss_per_element"] = loss.clone()
    model.denoise_step = orig
    return out, prompts


def make_one(kind: str, out_dir: Path) -> None:
    torch.manual_seed(SEED)
    tok, fast = train_tokenizer(add_bos=kind != "smolvla")
    _tokenizer_patch(fast)
    vocab = tok.get_vocab_size()
    cfg, policy, mk = build(kind, fast, vocab)
    randomize(policy, SEED + {"pi0": 0, "pi05": 1, "smolvla": 2}[kind])
    g = torch.Generator().manual_seed(SEED + 10)
    stats = dataset_stats(g)
    pre, post = mk(cfg, dataset_stats=stats)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    policy.save_pretrained(out_dir)
    pre.save_pretrained(out_dir)
    post.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)   # tokenizer.json + tokenizer_config.json
    for extra in ("special_tokens_map.json", "README.md"):
        (out_dir / extra).unlink(missing_ok=True)
    raw = {"images": torch.randint(0, 256, (B, 2, 3, *RAW_SIZE), generator=g, dtype=torch.uint8),
           "state": torch.randn(B, STATE_DIM, generator=g) * stats["observation.state"]["std"]
           + stats["observation.state"]["mean"],
           "instruction": INSTRUCTIONS,
           "noise": torch.randn(B, H_CHUNK, A_MAX, generator=g),
           "time": torch.tensor([1.0, 0.55, 0.1]),
           "demo_actions": torch.randn(B, H_CHUNK, ACTION_DIM, generator=g)}
    out, prompts = run_stages(kind, policy, pre, post, raw)
    tensors = {"raw_images": raw["images"], "raw_state": raw["state"], "noise": raw["noise"], "time": raw["time"],
               "demo_actions": raw["demo_actions"], **{k: v.contiguous() for k, v in out.items()}}
    tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous()
               for k, v in tensors.items()}
    save_file(tensors, str(out_dir / "reference.safetensors"))
    (out_dir / "reference.json").write_text(json.dumps({
        "instructions": INSTRUCTIONS, "prompts": prompts, "cameras": CAMERAS,
        "cameras_given": CAMERAS[:2], "bool_tensors": [k for k, v in out.items()
                                                       if v.dtype == torch.bool],
        "lerobot": lerobot.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "seed": SEED}, indent=1))
    arch = {"pi0": dict(vision=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                                    image_size=IMAGE),
                        vlm=dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1,
                                 head_dim=8),
                        expert=dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1,
                                    head_dim=8),
                        vocab_size=vocab, num_cameras=3),
            "smolvla": dict(vision=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                                        image_size=IMAGE),
                            vlm=dict(width=48, depth=4, mlp_dim=96, num_heads=6, num_kv_heads=2,
                                     head_dim=8, norm="llama", act="silu", eps=1e-5),
                            vocab_size=vocab, scale_factor=2, num_cameras=3)}
    (out_dir / "pirl_arch.json").write_text(json.dumps(arch["smolvla" if kind == "smolvla"
                                                            else "pi0"], indent=1))
    print(f"{kind}: wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir())} bytes)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "artifacts" / "parity"))
    ap.add_argument("--only", choices=["pi0", "pi05", "smolvla"], action="append")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for kind in args.only or ["pi0", "pi05", "smolvla"]:
        make_one(kind, Path(args.out) / kind)


if __name__ == "__main__":
    main()
