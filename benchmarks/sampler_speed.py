"""Time per sampled action chunk: ODE vs Flow-Noise vs Flow-SDE with TinyVLA (CPU by default).

    PYTHONPATH=src python benchmarks/sampler_speed.py [--batches 1 64 256] [--steps 4]

For each batch size the prefix is encoded once (as in a rollout) and each sampler draws a chunk
``[B, H, A]`` from it under ``torch.inference_mode``.  Samplers are timed interleaved, round
after round, and the median per round is reported (robust on a shared machine).  Columns:
``sample ms`` = one chunk from a cached prefix, ``+prefix ms`` = including ``encode_prefix``
(one env step's inference), ``x ODE`` = sample-time ratio to the ODE sampler.

``--log-prob`` adds a table of the training-side cost: ``Sampler.log_prob`` forward + backward
on a stored chain (the PPO update's inner loop), batched over the recomputed transitions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pirl.flow import build_sampler
from pirl.models import TinyVLA, TinyVLAConfig


def make_obs(b: int, cfg: TinyVLAConfig, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randint(0, 256, (b, cfg.num_cameras, 3, cfg.image_size, cfg.image_size),
                                    generator=g, dtype=torch.uint8).to(device),
            "state": torch.randn(b, cfg.state_dim, generator=g).to(device),
            "instruction": ["pick up the red cube and place it on the plate"] * b}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=4, help="denoise steps K")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--action-dim", type=int, default=4)
    ap.add_argument("--log-prob", action="store_true", help="also time log_prob fwd+bwd")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = TinyVLAConfig(action_dim=args.action_dim, state_dim=8,
                        vocab="pick up the red cube and place it on plate".split())
    policy = TinyVLA(cfg).to(device).eval()
    samplers = {
        "ode": build_sampler("ode", args.steps, policy.feature_dim, policy.action_dim),
        "flow_noise": build_sampler("flow_noise", args.steps, policy.feature_dim, policy.action_dim),
        "flow_sde (joint)": build_sampler("flow_sde", args.steps, policy.feature_dim,
                                          policy.action_dim, hybrid=False),
        "flow_sde (hybrid)": build_sampler("flow_sde", args.steps, policy.feature_dim,
                                           policy.action_dim, hybrid=True),
    }
    for s in samplers.values():
        s.to(device).eval()
    print(f"TinyVLA {policy.num_parameters() / 1e6:.2f}M params, H={cfg.action_horizon}, "
          f"A={cfg.action_dim}, K={args.steps}, device={device}, threads={torch.get_num_threads()}")
    header = f"{'batch':>5} | {'sampler':<18} | {'sample ms':>9} | {'+prefix ms':>10} | {'x ODE':>5}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for b in args.batches:
            obs = make_obs(b, cfg, device)
            prefix = policy.encode_prefix(obs)
            for s in samplers.values():  # warm-up
                s.sample(policy, prefix)
            t_prefix, t_sample = [], {k: [] for k in samplers}
            for _ in range(args.rounds):
                _sync(device)
                t0 = time.perf_counter()
                prefix = policy.encode_prefix(obs)
                _sync(device)
                t_prefix.append(time.perf_counter() - t0)
                for name, s in samplers.items():
                    t0 = time.perf_counter()
                    s.sample(policy, prefix)
                    _sync(device)
                    t_sample[name].append(time.perf_counter() - t0)
            pre = statistics.median(t_prefix) * 1e3
            ode = statistics.median(t_sample["ode"]) * 1e3
            for name in samplers:
                ms = statistics.median(t_sample[name]) * 1e3
                print(f"{b:>5} | {name:<18} | {ms:>9.2f} | {ms + pre:>10.2f} | {ms / ode:>5.2f}")
            print("-" * len(header))
    if args.log_prob:
        time_log_prob(policy, samplers, cfg, args, device)


def time_log_prob(policy, samplers, cfg, args, device) -> None:
    """log_prob forward + backward (prefix included) on chains sampled beforehand."""
    policy.train()
    header = f"{'batch':>5} | {'sampler':<18} | {'log_prob fwd+bwd ms':>19}"
    print(header)
    print("-" * len(header))
    for b in args.batches:
        obs = make_obs(b, cfg, device)
        for name, s in samplers.items():
            if name == "ode":
                continue
            with torch.inference_mode():
                chain = s.sample(policy, policy.encode_prefix(obs))
            ts = []
            for i in range(max(3, args.rounds // 3) + 1):
                _sync(device)
                t0 = time.perf_counter()
                out = s.log_prob(policy, policy.encode_prefix(obs), chain)
                out.logp.sum().backward()
                _sync(device)
                if i:  # first is warm-up
                    ts.append(time.perf_counter() - t0)
                policy.zero_grad(set_to_none=True)
                s.zero_grad(set_to_none=True)
            print(f"{b:>5} | {name:<18} | {statistics.median(ts) * 1e3:>19.2f}")
        print("-" * len(header))


if __name__ == "__main__":
    main()
