"""Rollout and PPO-update throughput of pi0, pi0.5 and SmolVLA.

Per model: rollout chunks/s at batch 1 / 16 / 64 (encode_prefix once + K denoise steps through a
Flow-SDE sampler, no grad), peak memory, and one PPO update's time and peak memory (re-encode the
prefix with grad, recompute the chain log-prob, clipped surrogate + value loss, backward, Adam
step).  On a GPU it runs the real-size configs in bf16 autocast; without one it runs the tiny
configs in float32 on the CPU and says so.  Real-size parameter counts are always printed (from
the configs, nothing is allocated for them).

    python benchmarks/model_throughput.py [--device cuda] [--steps 4] [--batches 1 16 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from pirl.algos.ppo import policy_loss
from pirl.flow import FlowSDESampler
from pirl.models.pi0 import Pi0Policy, pi0_config, pi05_config, tiny_pi0_config
from pirl.models.smolvla import SmolVLAConfig, SmolVLAPolicy, tiny_smolvla_config
from pirl.models.vla_common import TrainConfig
from pirl.models.vla_tokenizer import WordTokenizer


def build(name: str, real: bool, tok, train: TrainConfig):
    if name == "smolvla":
        cfg = SmolVLAConfig(train=train) if real else tiny_smolvla_config(len(tok), train=train)
        if real:
            cfg.vocab_size = max(cfg.vocab_size, len(tok))
        return SmolVLAPolicy(cfg, tok)
    pi05 = name == "pi05"
    if real:
        cfg = (pi05_config if pi05 else pi0_config)(train=train)
    else:
        cfg = tiny_pi0_config(pi05=pi05, vocab_size=len(tok), train=train)
    return Pi0Policy(cfg, tok)


def obs_for(policy, b: int, dev):
    size = policy.cfg.vision.image_size
    return {"images": torch.randint(0, 256, (b, 2, 3, size, size), dtype=torch.uint8, device=dev),
            "state": torch.rand(b, 8, device=dev) * 2 - 1,
            "instruction": ["pick up the red cube and put it in the bowl"] * b}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def bench(name: str, dev, real: bool, steps: int, batches: list[int], repeats: int):
    tok = WordTokenizer.train(["pick up the red cube and put it in the bowl", "Task: State: Action:"],
                              [str(i) for i in range(256)])
    train = TrainConfig(mode="expert_only", autocast_bf16=dev.type == "cuda",
                        gradient_checkpointing=dev.type == "cuda")
    pol = build(name, real, tok, train).to(dev)
    pol.configure_training(train)
    sampler = FlowSDESampler(num_steps=steps, hybrid=False).to(dev)
    rows = []
    for b in batches:
        obs = obs_for(pol, b, dev)
        pol.eval()
        with torch.no_grad():
            sampler.sample(pol, pol.encode_prefix(obs))  # warm-up
            sync(dev)
            peak_reset(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                chain = sampler.sample(pol, pol.encode_prefix(obs))
            sync(dev)
            dt = (time.perf_counter() - t0) / repeats
        roll_mem = peak_gb(dev)
        # one PPO update on this batch
        pol.train()
        opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad], lr=1e-5)
        sync(dev)
        peak_reset(dev)
        t0 = time.perf_counter()
        prefix = pol.encode_prefix(obs)
        new = sampler.log_prob(pol, prefix, chain)
        loss, _ = policy_loss(new.logp, chain.logp, torch.randn(b, device=dev))
        loss = loss + pol.value(prefix).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(dev)
        upd = time.perf_counter() - t0
        rows.append((b, b / dt, dt * 1e3, roll_mem, upd * 1e3, peak_gb(dev)))
        del opt
    return pol, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4, help="denoise steps per chunk")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["pi0", "pi05", "smolvla"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    real = dev.type == "cuda"
    print(f"# device: {dev}{' (' + torch.cuda.get_device_name() + ')' if real else ''}; "
          f"{'REAL-size configs, bf16 autocast, gradient checkpointing' if real else 'TINY configs on CPU, float32 (no GPU here): numbers show the code path, not real-size speed'}; "
          f"{args.steps} denoise steps (Flow-SDE, joint); PPO update with the VLM frozen (expert_only)")
    print("\n## Real-size parameter counts (from the configs, value head excluded)")
    print("| model | vision | VLM (text) | action expert | total |")
    print("|---|---|---|---|---|")
    for name, cfg in (("pi0", pi0_config()), ("pi05", pi05_config()), ("smolvla", SmolVLAConfig())):
        vis = cfg.vision.num_params()
        vlm = cfg.vlm.num_params(cfg.vocab_size)
        exp = cfg.num_params() - vis - vlm
        print(f"| {name} | {vis / 1e6:.1f} M | {vlm / 1e6:.1f} M | {exp / 1e6:.1f} M "
              f"(incl. projections) | {cfg.num_params() / 1e9:.3f} B |")
    print("\n## Throughput")
    print("| model | params (run) | batch | rollout chunks/s | ms / chunk batch | rollout peak GiB "
          "| PPO update ms | update peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        pol, rows = bench(name, dev, real, args.steps, args.batches, args.repeats)
        n = sum(p.numel() for p in pol.parameters())
        for b, cps, ms, rm, um, upm in rows:
            fmt = lambda x: "n/a (CPU)" if x is None else f"{x:.2f}"  # noqa: E731
            print(f"| {name} | {n / 1e6:.2f} M | {b} | {cps:.1f} | {ms:.1f} | {fmt(rm)} | "
                  f"{um:.1f} | {fmt(upm)} |")
        del pol
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
