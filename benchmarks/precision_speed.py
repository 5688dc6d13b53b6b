"""Precision and compilation levers on the default job's TinyVLA: ms per step, ratio to fp32.

    PYTHONPATH=src python benchmarks/precision_speed.py [--threads 1] [--rounds 7]
        [--variants fp32 bf16 fp32_compile bf16_compile fp32_channels_last bf16_channels_last]

The policy, sampler and PPO trainer are the default ``pirl train`` job's (TinyVLA with the
tabletop's two cameras, Flow-SDE with K=4, expert-only PPO), on real tabletop observations.
Three steps are timed per variant:

- ``rollout``: one chunk step of the rollout at the env batch (512): ``encode_prefix`` + the
  K-step Flow-SDE chain + the critic, no grad (what ``collect`` does per chunk step);
- ``update``: one PPO minibatch step (``--minibatch`` rows, the default job's ~1/4 of a
  rollout): thaw the frozen prefix, recompute the chain's log-prob and the value
  (``RLTrainer.minibatch_loss``), backward, gradient clip, Adam step;
- ``pretrain``: one grounding-pretraining step (64 observations: the prefix with grad, the
  grounding head, backward, AdamW step).

Variants: ``fp32`` eager; ``bf16`` autocast (``precision=bf16``); ``*_compile``:
``torch.compile`` of the hot modules (the image encoder and prefix blocks of the prefix
encoder, the expert blocks of ``velocity``);
``*_channels_last``: the conv image encoder's weights in channels-last memory format.  The
machine is shared with other jobs, so the variants are timed interleaved, round by round
(A B C A B C ...), each cell is the median over rounds, and the ratios use the process's CPU
time (with one thread: the step's compute, whatever else runs; wall times are shown too).
Ratios are to ``fp32`` of the same run.  One step of each kind per variant is warm-up (and
compilation) before the rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(threads: int | None, minibatch: int, num_envs: int | None = None):
    from pirl.algos.pretrain import GroundingHead
    from pirl.config.schema import TrainConfig
    from pirl.runners.rl import RLTrainer
    from pirl.runners.rollout import policy_obs
    from pirl.runners.train import make_policy, make_sampler, make_train_env

    cfg = TrainConfig(precision="fp32")
    if num_envs:
        cfg.env.num_envs = num_envs
    if threads:
        torch.set_num_threads(threads)
    env = make_train_env(cfg)
    policy = make_policy(cfg, env)
    sampler = make_sampler(cfg, policy)
    obs = policy_obs(env.reset(seed=0))
    big = make_train_env(cfg, num_envs=minibatch)
    mb_obs = policy_obs(big.reset(seed=1))
    pre_obs = {k: v[:cfg.pretrain.num_envs] for k, v in obs.items()}
    head = GroundingHead(policy.feature_dim, 4)
    return cfg, env, policy, sampler, obs, mb_obs, pre_obs, head, RLTrainer


class Variant:
    def __init__(self, name, base, sampler, env, cfg, trainer_cls, head):
        self.name = name
        self.policy = copy.deepcopy(base)
        self.sampler = sampler
        if name.startswith("bf16"):
            self.policy.set_precision(torch.bfloat16)
        if name.endswith("channels_last"):
            self.policy.image_encoder.to(memory_format=torch.channels_last)
        self.trainer = trainer_cls(self.policy, sampler, env, cfg.rl, seed=0)
        if name.endswith("compile"):
            # the hot modules (tensor in, tensor out): the conv image encoder and the prefix
            # transformer blocks (prefix encoder), the expert blocks (velocity); the methods
            # around them hold Python-side tokenisation that compiles poorly
            pol = self.policy
            pol.image_encoder = torch.compile(pol.image_encoder, dynamic=False)
            for blocks in (pol.prefix_blocks, pol.expert_blocks):
                for i in range(len(blocks)):
                    blocks[i] = torch.compile(blocks[i], dynamic=False)
        self.head = copy.deepcopy(head)
        names = set(self.policy.prefix_parameter_names())
        self.prefix_params = [p for n, p in self.policy.named_parameters() if n in names]
        self.pre_opt = torch.optim.AdamW(self.prefix_params + list(self.head.parameters()),
                                         lr=1e-4)
        self.gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def rollout_step(self, obs):
        prefix = self.policy.encode_prefix(obs)
        chain = self.sampler.sample(self.policy, prefix, generator=self.gen)
        v = self.policy.value(prefix).float()
        return chain, v

    def prepare_update(self, mb_obs):
        with torch.no_grad():
            self.policy.eval()
            prefix = self.policy.encode_prefix(mb_obs)
            chain = self.sampler.sample(self.policy, prefix, generator=self.gen)
            old = self.trainer._aggregate(chain)
            frozen = self.policy.frozen_prefix(prefix)
        m = old.shape[0]
        g = torch.Generator().manual_seed(3)
        adv, ret = torch.randn(m, generator=g), torch.rand(m, generator=g)
        self.batch = (mb_obs, chain, old, adv, ret, ret + 0.1 * torch.randn(m, generator=g),
                      frozen)

    def update_step(self):
        self.policy.train()
        tr = self.trainer
        loss, _ = tr.minibatch_loss(*self.batch)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        tr.optimizer.step()

    def pretrain_step(self, obs, points):
        from pirl.algos.pretrain import grounding_loss

        for p in self.prefix_params:
            p.requires_grad_(True)
        self.policy.train()
        loss, _ = grounding_loss(self.policy, self.head, obs, points)
        self.pre_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.pre_opt.step()
        for p in self.prefix_params:  # RL's expert-only mode freezes them again
            p.requires_grad_(False)


def timed(fn, *a) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) of ``fn(*a)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*a)
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--minibatch", type=int, default=2048)
    ap.add_argument("--num-envs", type=int, default=None,
                    help="rollout batch (default: the default job's env.num_envs, 512)")
    ap.add_argument("--variants", nargs="+",
                    default=["fp32", "bf16", "fp32_compile", "bf16_compile",
                             "fp32_channels_last", "bf16_channels_last"])
    args = ap.parse_args(argv)
    cfg, env, base, sampler, obs, mb_obs, pre_obs, head, trainer_cls = build(
        args.threads, args.minibatch, args.num_envs)
    points = torch.rand(len(pre_obs["instruction"]), 4, 2,
                        generator=torch.Generator().manual_seed(5))
    variants = []
    for name in args.variants:
        t0 = time.perf_counter()
        v = Variant(name, base, sampler, env, cfg, trainer_cls, head)
        v.prepare_update(mb_obs)
        # warm-up (compilation happens here): one of each step
        v.rollout_step(obs)
        v.update_step()
        v.pretrain_step(pre_obs, points)
        print(f"{name}: set-up and warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        variants.append(v)
    steps = ("rollout", "update", "pretrain")
    times = {v.name: {k: [] for k in steps} for v in variants}
    for r in range(args.rounds):
        for v in variants:  # interleaved: every variant once per round
            times[v.name]["rollout"].append(timed(v.rollout_step, obs))
            times[v.name]["update"].append(timed(v.update_step))
            times[v.name]["pretrain"].append(timed(v.pretrain_step, pre_obs, points))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    # per variant and step: (median wall ms, median CPU ms)
    med = {n: {k: (statistics.median(w for w, _ in x), statistics.median(c for _, c in x))
               for k, x in d.items()} for n, d in times.items()}
    ref = med.get("fp32")
    print(f"\nTinyVLA (default job), torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), rollout batch {env.num_envs}, update minibatch {args.minibatch}, "
          f"pretrain batch {len(pre_obs['instruction'])}; medians of {args.rounds} interleaved "
          "rounds.  CPU ms = the process's CPU time (robust to other jobs on a shared machine; "
          "= compute time with 1 thread), wall ms in brackets")
    print("| variant | rollout step CPU ms (wall) | x fp32 | update step CPU ms (wall) | x fp32 "
          "| pretrain step CPU ms (wall) | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for n, d in med.items():
        cells = []
        for k in steps:
            ratio = f"{ref[k][1] / d[k][1]:.2f}x" if ref else "-"
            cells += [f"{d[k][1]:.0f} ({d[k][0]:.0f})", ratio]
        print(f"| {n} | " + " | ".join(cells) + " |")
    return {n: {k: c for k, (_, c) in d.items()} for n, d in med.items()}


if __name__ == "__main__":
    main()
