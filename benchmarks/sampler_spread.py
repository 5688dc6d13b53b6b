"""How far each sampler explores around a trained policy: the spread of its action chunks.

RL can only credit what the sampler varies.  For a checkpoint (an SFT start, say) this draws
``--samples`` chunks at each of ``--observations`` initial observations of the run's own env
(env i runs task i mod T, episode seed 0) with every sampler setting below, and prints the
standard deviation over the draws at one observation (model units: normalised actions),
averaged over observations and chunk elements, and its ratio to the ODE's.  The ODE's spread
is the policy's own (its draws differ only in the initial noise); a stochastic setting adds
the part its log-likelihood can credit.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_spread.py \
        runs/metaworld_mt50_seed0/checkpoints/sft.pt

LIBERO checkpoints need the simulator venv (``.venv-sim/bin/python``).  Measured numbers:
docs/experiments.md, entry "What Meta-World's success buffer is worth, joint Flow-SDE chains
and GRPO groups on LIBERO states"; docs/method.md (Samplers).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

# (label, sampler kind, options): the ODE, Flow-SDE as hybrid (one stochastic step, RLinf's
# rollout default) and as joint (every step stochastic) chains, Flow-Noise's initial noise net
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("ODE", "ode", {}),
    ("Flow-SDE hybrid a=0.5", "flow_sde", {"noise_level": 0.5, "hybrid": True}),
    ("Flow-SDE hybrid a=1.0", "flow_sde", {"noise_level": 1.0, "hybrid": True}),
    ("Flow-SDE joint a=0.25", "flow_sde", {"noise_level": 0.25, "hybrid": False}),
    ("Flow-SDE joint a=0.5", "flow_sde", {"noise_level": 0.5, "hybrid": False}),
    ("Flow-SDE joint a=1.0", "flow_sde", {"noise_level": 1.0, "hybrid": False}),
    # a fresh noise net (its std bounded to [sampler.min_std, sampler.max_std]); a trained one
    # lives in an RL checkpoint's sampler state, which this script does not load
    ("Flow-Noise, untrained net", "flow_noise", {}),
]


def chunk_spread(policy, sampler, obs: dict[str, Any], samples: int, seed: int = 0) -> float:
    """Std over ``samples`` chunks drawn at each observation of ``obs`` (``[N, ...]``), averaged
    over the N observations and the ``[H, A]`` chunk elements.  Each draw is one sampler call
    over the N observations, as a rollout's chunk step is (a hybrid chain draws its stochastic
    step once per call)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        prefix = policy.encode_prefix(obs)
        a = torch.stack([sampler.sample(policy, prefix).actions.float() for _ in range(samples)])
    return float(a.std(0).mean())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from pirl.config.loading import apply_overrides, from_dict
    from pirl.config.schema import TrainConfig
    from pirl.runners.checkpoint import load_checkpoint, load_module_state
    from pirl.runners.train import make_policy, make_sampler, make_train_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a pirl checkpoint (RUN/checkpoints/{sft,last}.pt)")
    ap.add_argument("--samples", type=int, default=32, help="chunks drawn per observation")
    ap.add_argument("--observations", type=int, default=50, help="initial observations")
    args = ap.parse_args(argv)

    state = load_checkpoint(args.checkpoint)
    cfg = from_dict(TrainConfig, state["config"])  # the run's own settings
    env = make_train_env(cfg, num_envs=args.observations)
    try:
        obs = env.reset(seed=0)
        policy = make_policy(cfg, env)
    finally:
        env.close()
    load_module_state(policy, state["policy"], "policy")
    policy.eval()
    rows = []
    for label, kind, opts in SETTINGS:
        cfg_s = apply_overrides(cfg, [f"sampler.{k}={v}" for k, v in opts.items()])
        sampler = make_sampler(cfg_s, policy, kind=kind)
        if kind == "flow_noise":
            label += f", std {cfg_s.sampler.min_std:g}-{cfg_s.sampler.max_std:g}"
        rows.append({"sampler": label,
                     "spread": chunk_spread(policy, sampler, obs, args.samples)})
    ode = rows[0]["spread"]
    print(f"\n{args.checkpoint}: {args.observations} observations x {args.samples} chunks, "
          f"{cfg.sampler.num_steps} denoise steps\n")
    print("| sampler | chunk std (model units) | / ODE |\n|---|---|---|")
    for r in rows:
        r["ratio"] = r["spread"] / ode
        print(f"| {r['sampler']} | {r['spread']:.3f} | {r['ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
