"""The online RL loop: batched rollouts in parallel envs, then PPO or GRPO updates.

One :meth:`RLTrainer.iteration` = reset all N envs, run one episode each to the fixed horizon
(the outer MDP: one step = one action chunk; the inner MDP: the sampler's denoising chain whose
log-prob is the chunk's log-prob), compute advantages (chunk-level GAE with the critic for PPO;
group-relative episode returns for GRPO), then ``update_epochs`` passes of clipped-ratio updates
over minibatches (with ``rl.bc_coef`` each minibatch loss also gets the few-shot demos'
flow-matching loss).  All randomness comes from generators owned by the trainer, whose states are
part of :meth:`state_dict`, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from pirl.algos.advantages import gae
from pirl.algos.grpo import broadcast_over_time, group_advantages, make_groups
from pirl.algos.ppo import (aggregate_logp, approx_kl, explained_variance, level_mask, lr_scale,
                            policy_loss, value_loss)
from pirl.algos.sft import SFTData
from pirl.envs.base import BatchedEnv, ChunkedEnv, fixed_init_states
from pirl.flow.base import Sampler
from pirl.models.base import (FlowPolicy, cat_batch, flow_matching_loss, index_batch,
                              sample_flow_time, to_device)
from pirl.config.schema import RLConfig
from pirl.runners.curriculum import FailureCurriculum, FailureReplay
from pirl.runners.rollout import Rollout, cat_chains, collect, env_actions, stack_obs
from pirl.runners.self_imitation import SuccessBuffer


class RLTrainer:
    """PPO / GRPO on a policy + sampler + batched env (see module docstring)."""

    def __init__(self, policy: FlowPolicy, sampler: Sampler, env: BatchedEnv, cfg: RLConfig,
                 seed: int, demos: SFTData | None = None):
        """``demos``: the few-shot SFT samples of the demo loss (needed when ``cfg.bc_coef`` >
        0; see :meth:`_bc_inputs`)."""
        self.policy, self.sampler, self.cfg = policy, sampler, cfg
        if cfg.bc_coef > 0 and (demos is None or len(demos) == 0):
            raise ValueError("rl.bc_coef > 0 needs the SFT demos (RLTrainer(..., demos=...))")
        self.demos = demos if cfg.bc_coef > 0 else None
        self.env = ChunkedEnv(env)
        self.algo = cfg.algo
        self.hp = cfg.ppo if cfg.algo == "ppo" else cfg.grpo
        self.action_chunk = cfg.action_chunk or policy.action_horizon
        if self.action_chunk > policy.action_horizon:
            raise ValueError(f"rl.action_chunk={self.action_chunk} exceeds the policy's action "
                             f"horizon {policy.action_horizon}")
        self.num_chunks = cfg.max_chunks or math.ceil(env.max_episode_steps / self.action_chunk)
        self.seed = seed
        self.iter = 0
        self.env_steps = 0
        self.sample_gen = torch.Generator().manual_seed(seed * 1000 + 1)
        self.update_gen = torch.Generator().manual_seed(seed * 1000 + 2)
        self.group_gen = torch.Generator().manual_seed(seed * 1000 + 3)
        # executed part of the chunk: first action_chunk steps, first env.action_dim dims
        mask = torch.zeros(policy.action_horizon, policy.action_dim)
        mask[: self.action_chunk, : env.action_dim] = 1.0
        self.action_mask = mask
        self.optimizer = self._make_optimizer()
        # with a frozen prefix the rollout's prefix caches are reused by every update epoch
        self.reuse_prefix = cfg.train_mode == "expert_only" and cfg.reuse_prefix
        self.total_updates = max(1, cfg.iterations)
        # failure-weighted task draws (None: uniform); its counts are part of state_dict
        self.curriculum = (FailureCurriculum(len(self.env.task_names), cfg.task_sampling_mix,
                                             cfg.task_sampling_decay)
                           if cfg.task_sampling == "failure" else None)
        self._task_ids: torch.Tensor | None = None
        # failed initial states replayed in a share of the envs (None: off); part of state_dict
        self.replay = (FailureReplay(cfg.replay_capacity) if cfg.replay_failures > 0 else None)
        self._ep_seeds: torch.Tensor | None = None
        self._num_replayed = 0
        # rollouts start from these fixed initial states only (None: the env's own draw)
        self.init_states = None
        if cfg.init_states is not None:
            fixed = fixed_init_states(env)
            if not fixed:
                raise ValueError("rl.init_states: the env has no fixed initial states (only "
                                 "envs such as LIBERO, whose episode seed picks one, take it)")
            bad = [i for i in cfg.init_states if not 0 <= i < fixed]
            if bad:
                raise ValueError(f"rl.init_states {bad} out of range: the env has {fixed} "
                                 f"fixed initial states per task (0..{fixed - 1})")
            self.init_states = (torch.tensor(cfg.init_states), fixed)
        # self-imitation from each task's newest successes (None: the rollout's own); part of
        # state_dict
        self.successes = None
        self.sil_optimizer = None
        if cfg.sil_buffer_per_task > 0:
            if self.hp.sil_coef <= 0 and cfg.sil_steps == 0:
                raise ValueError(f"rl.sil_buffer_per_task={cfg.sil_buffer_per_task} needs "
                                 f"rl.{cfg.algo}.sil_coef > 0 or rl.sil_steps > 0 (a "
                                 f"self-imitation term that reads it)")
            self.successes = SuccessBuffer(len(self.env.task_names), cfg.sil_buffer_per_task,
                                           keep=cfg.sil_buffer_keep)
        if cfg.sil_hindsight and getattr(self.env, "hindsight_episode", None) is None:
            raise ValueError(f"rl.sil_hindsight: {type(env).__name__} has no hindsight "
                             f"relabelling (an env's hindsight_episode; Meta-World has one)")
        if cfg.sil_steps > 0:
            actor = next(g for g in self.optimizer.param_groups if g["name"] == "policy")
            self.sil_optimizer = torch.optim.Adam(actor["params"], lr=cfg.sil_lr,
                                                  betas=tuple(self.hp.betas), eps=self.hp.eps)
        self.ref = None
        if self.algo == "grpo" and cfg.grpo.kl_coef > 0:
            # frozen reference (the policy RL starts from) for GRPO's KL penalty
            import copy

            self.ref = (copy.deepcopy(policy).eval().requires_grad_(False),
                        copy.deepcopy(sampler).eval().requires_grad_(False))

    # ----------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hp
        # (asked of the policy only when needed: not every policy names its prefix)
        need_prefix = self.cfg.train_mode == "expert_only" or hp.lr_prefix is not None
        prefix = set(self.policy.prefix_parameter_names()) if need_prefix else set()
        if self.cfg.train_mode == "expert_only":
            for n, p in self.policy.named_parameters():
                if n in prefix:
                    p.requires_grad_(False)
        critic = set(self.policy.critic_parameter_names()) if self.algo == "ppo" else set()
        trainable = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        # with train_mode=full and lr_prefix set, the prefix gets its own (usually smaller) lr
        prefix_p = [p for n, p in trainable if n in prefix and n not in critic]
        actor_p = [p for n, p in trainable if n not in critic and n not in prefix]
        critic_p = [p for n, p in trainable if n in critic]
        noise_p = [p for p in self.sampler.parameters() if p.requires_grad]
        groups = [{"params": actor_p, "lr": hp.lr_policy, "name": "policy"}]
        if prefix_p:
            groups.append({"params": prefix_p, "lr": hp.lr_prefix, "name": "prefix"})
        if critic_p:
            groups.append({"params": critic_p, "lr": hp.lr_value, "name": "value"})
        if noise_p:
            groups.append({"params": noise_p, "lr": hp.lr_noise, "name": "noise"})
        for g in groups:
            g["base_lr"] = g["lr"]
        return torch.optim.Adam(groups, betas=tuple(hp.betas), eps=hp.eps)

    def _set_lr(self) -> None:
        scale = lr_scale(self.hp.lr_schedule, self.iter, self.total_updates,
                         self.hp.lr_warmup_iters)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale

    # ----------------------------------------------------------------- rollout
    def _reset_kwargs(self, round_: int = 0) -> dict[str, Any]:
        n = self.env.num_envs
        # every rollout of every iteration gets its own seeds (one rollout per update: iter)
        base = self.seed * 1_000_003 + (self.iter * self.cfg.rollouts_per_update
                                        + round_) * 7919
        if self.algo == "grpo":
            probs = self.curriculum.probs() if self.curriculum is not None else None
            task_ids, ep_seeds, self._groups = make_groups(
                n, self.hp.group_size, len(self.env.task_names), self.group_gen,
                task_probs=probs, round_robin=self.cfg.task_sampling == "round_robin")
            self._task_ids = task_ids
            self._ep_seeds = self._on_init_states(ep_seeds + base)
            return {"seed": base, "task_ids": task_ids, "episode_seeds": self._ep_seeds}
        g = torch.Generator().manual_seed(base)
        # the first k envs restart from replayed failed states, the others draw fresh ones
        k = 0
        if self.replay is not None:
            r_tasks, r_seeds = self.replay.draw(round(self.cfg.replay_failures * n), g)
            k = int(r_tasks.numel())
        if self.curriculum is not None:
            task_ids = self.curriculum.sample(n - k, g)
        elif self.cfg.task_sampling == "round_robin":  # env i always runs task i mod T
            task_ids = torch.arange(k, n) % len(self.env.task_names)
        else:
            task_ids = torch.randint(0, len(self.env.task_names), (n - k,), generator=g)
        ep_seeds = self._on_init_states(base + torch.arange(k, n))
        if k:
            task_ids, ep_seeds = torch.cat([r_tasks, task_ids]), torch.cat([r_seeds, ep_seeds])
        self._task_ids, self._ep_seeds, self._num_replayed = task_ids, ep_seeds, k
        return {"seed": base, "task_ids": task_ids, "episode_seeds": ep_seeds}

    def _on_init_states(self, seeds: torch.Tensor) -> torch.Tensor:
        """Episode seeds ``[N]`` moved onto ``rl.init_states``: an env with F fixed initial
        states starts from state ``seed % F``; seed s becomes ``s - s % F + init_states[s % m]``
        (m of them), so equal seeds stay equal (GRPO's groups) and the rest of s is kept."""
        if self.init_states is None:
            return seeds
        states, fixed = self.init_states
        return seeds - seeds % fixed + states[seeds % len(states)]

    def noise_scale(self) -> float:
        """The sampler's noise multiplier at the current iteration (``rl.noise_schedule``)."""
        cfg = self.cfg
        return lr_scale(cfg.noise_schedule, self.iter, self.total_updates,
                        min_ratio=cfg.noise_final)

    def begin_rollout(self, round_: int = 0) -> dict[str, Any]:
        """The trainer-state half of a rollout: set this iteration's noise scale
        (``rl.noise_schedule``) and draw the reset arguments (tasks, episode seeds, replayed
        failed states, GRPO groups) of the iteration's rollout number ``round_`` (of
        ``rl.rollouts_per_update``).  Ray placements run it on the learner ranks and hand the
        result to the env / rollout workers (:mod:`pirl.runners.distributed`)."""
        self.policy.eval()
        if hasattr(self.sampler, "noise_scale"):
            scale = self.noise_scale()
            self.sampler.noise_scale = scale
            if self.ref is not None:
                # GRPO's KL reference too: its chain log-probs then differ from the policy's by
                # the policy's drift only, not by the schedule
                self.ref[1].noise_scale = scale
        return self._reset_kwargs(round_)

    def rollout(self, round_: int = 0) -> Rollout:
        reset_kwargs = self.begin_rollout(round_)
        return collect(self.policy, self.sampler, self.env, num_chunks=self.num_chunks,
                       reset_kwargs=reset_kwargs, action_chunk=self.action_chunk,
                       generator=self.sample_gen, with_values=self.algo == "ppo",
                       keep_prefix=self.reuse_prefix)

    def _aggregate(self, chain) -> torch.Tensor:
        init = chain.init_logp if self.sampler.includes_init else None
        return aggregate_logp(chain.step_logp, chain.stochastic, init, mode=self.hp.logp_mode,
                              action_mask=self.action_mask.to(chain.step_logp.device),
                              level=self.hp.ratio_level)

    def _rewards(self, ro: Rollout) -> torch.Tensor:
        if self.cfg.reward == "success":
            return ro.success.float()
        return ro.rewards

    # ----------------------------------------------------------------- update
    def iteration(self) -> dict[str, float]:
        """``rl.rollouts_per_update`` rollouts (each with fresh reset seeds), then one update on
        all of them; returns metrics."""
        parts, t_roll = [], 0.0
        for r in range(self.cfg.rollouts_per_update):
            t0 = time.perf_counter()
            ro = self.rollout(r)
            t_roll += time.perf_counter() - t0
            parts.append(self._prepare(ro))  # (reads this rollout's task ids and groups)
        return self._learn_parts(parts, t_roll)

    def learn(self, ro: Rollout, t_roll: float = 0.0) -> dict[str, float]:
        """Advantages + update on a collected rollout (the learner's half of :meth:`iteration`;
        distributed placements run it on the learner ranks, see
        :mod:`pirl.runners.distributed`).  ``t_roll``: the rollout's wall time, for metrics."""
        return self._learn_parts([self._prepare(ro)], t_roll)

    def _prepare(self, ro: Rollout) -> dict[str, Any]:
        """One rollout's learner rows: the flattened valid chunk steps ``[M]`` (obs, chains,
        frozen prefixes, rollout log-probs), their advantages (chunk-level GAE per env for PPO,
        group-relative over this rollout's groups for GRPO; not yet normalised), returns and
        values, and the rollout's episode statistics.  Updates the task curriculum and the
        failure replay with the rollout's episodes (task ids from the latest
        :meth:`begin_rollout`)."""
        k = self._num_replayed
        if self.curriculum is not None or self.replay is not None or self.successes is not None:
            if self._task_ids is None or self._task_ids.numel() != ro.valid.shape[1]:
                raise RuntimeError("rl.task_sampling=failure, rl.replay_failures and "
                                   "rl.sil_buffer_per_task need the rollout's task ids from "
                                   "this trainer's begin_rollout")
        if self.curriculum is not None:
            # fresh episodes only: the replayed ones are a biased draw of their tasks' states
            self.curriculum.update(self._task_ids[k:], ro.episode_success[k:])
        if self.replay is not None:
            self.replay.update(self._task_ids, self._ep_seeds, ro.episode_success)
        valid = ro.valid
        idx = valid.reshape(-1).nonzero().squeeze(1)
        rewards = self._rewards(ro)
        # the episode statistics of the metrics (the rollout itself is not kept: several
        # rollouts per update would hold their observations twice)
        p: dict[str, Any] = {"num_replayed": k, "success": ro.episode_success.float(),
                             "return": ro.episode_return, "chunks": valid.sum(0).float(),
                             "env_steps": ro.env_steps, "env_s": ro.env_s,
                             "policy_s": ro.policy_s}
        obs, chain = stack_obs(ro.obs), cat_chains(ro.chains)
        p["obs"] = index_batch(obs, idx)
        p["chain"] = chain.index(idx)
        if self.successes is not None:
            # (relabelled failures first: a full task then keeps its real successes, the newer)
            p["hindsight"] = (self._add_hindsight(obs, chain.actions, valid, ro.episode_success)
                              if self.cfg.sil_hindsight else 0)
            self.successes.add(obs, chain.actions, valid, self._task_ids, ro.episode_success)
        p["frozen"] = index_batch(cat_batch(ro.prefixes), idx) if ro.prefixes else None
        p["old_logp"] = self._aggregate(p["chain"])
        if self.algo == "ppo":
            term, trunc = ro.terminated, ro.truncated
            if self.hp.truncation == "terminal":  # the time limit ends the task's return
                term, trunc = term | trunc, torch.zeros_like(trunc)
            adv, ret = gae(rewards, ro.values, ro.next_values, term, trunc,
                           gamma=self.hp.gamma, lam=self.hp.gae_lambda, valid=valid)
            p["adv"], p["ret"] = adv.reshape(-1)[idx], ret.reshape(-1)[idx]
            p["old_values"] = ro.values.reshape(-1)[idx]
        else:
            ep_ret = (rewards * valid).sum(0)
            ep_adv = group_advantages(ep_ret, self._groups, eps=self.hp.std_eps,
                                      normalize_std=self.hp.normalize_std)
            p["ep_adv"] = ep_adv
            p["adv"] = broadcast_over_time(ep_adv, valid).reshape(-1)[idx]
            p["ret"] = p["old_values"] = torch.zeros_like(p["adv"])
        # self-imitation rows: every executed chunk of an episode that succeeded (with a success
        # buffer the term draws its rows from the buffer instead)
        p["sil_w"] = (ro.episode_success[None, :].expand_as(valid).reshape(-1)[idx].float()
                      if self.hp.sil_coef > 0 and self.successes is None else None)
        return p

    def _add_hindsight(self, obs: dict[str, Any], actions: torch.Tensor, valid: torch.Tensor,
                       success: torch.Tensor) -> int:
        """Hindsight relabelling (``rl.sil_hindsight``): each failed episode is replayed by the
        env's ``hindsight_episode`` (task, episode seed, executed env actions), and what it gives
        back, the states of a success for another goal, goes to the success buffer with the
        episode's first action chunks.  ``obs`` / ``actions [T * N, H, A]`` rows as
        :meth:`SuccessBuffer.add` takes them; returns the episodes added."""
        t, n = valid.shape
        device = next(self.policy.parameters()).device
        with torch.no_grad():
            env_acts = env_actions(self.policy.postprocess_actions(actions.to(device)),
                                   self.action_chunk, self.env.action_dim).cpu()
        added = 0
        for i in (~success.bool()).nonzero().reshape(-1).tolist():
            rows = valid[:, i].nonzero().reshape(-1) * n + i
            if rows.numel() == 0:
                continue
            task = int(self._task_ids[i])
            states = self.env.hindsight_episode(
                task, int(self._ep_seeds[i]), env_acts[rows].reshape(-1, self.env.action_dim)
                .double().numpy(), self.action_chunk)
            if states is None:
                continue
            rows = rows[:len(states)]
            ep = index_batch(obs, rows)
            ep["state"] = torch.as_tensor(states, dtype=ep["state"].dtype)
            self.successes.add_episode(task, ep, actions[rows])
            added += 1
        return added

    def _learn_parts(self, parts: list[dict[str, Any]], t_roll: float) -> dict[str, float]:
        """One update on the rows of one or more prepared rollouts (:meth:`_prepare`), with
        the advantages normalised over all of them; returns the iteration's metrics."""
        env_steps = sum(p["env_steps"] for p in parts)
        self.env_steps += env_steps

        def cat(key):
            return torch.cat([p[key] for p in parts])

        obs = stack_obs([p["obs"] for p in parts])
        chain = cat_chains([p["chain"] for p in parts])
        frozen = (cat_batch([p["frozen"] for p in parts]) if parts[0]["frozen"] is not None
                  else None)
        old_logp, adv, ret, old_values = cat("old_logp"), cat("adv"), cat("ret"), cat("old_values")
        metrics: dict[str, float] = {}
        if self.algo == "ppo":
            metrics["value/explained_variance"] = float(explained_variance(old_values, ret))
        else:
            # episodes with a non-zero advantage (all-equal groups carry no learning signal)
            metrics["grpo/nonzero_adv_fraction"] = float((cat("ep_adv") != 0).float().mean())
        if self.hp.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        sil_w = cat("sil_w") if parts[0]["sil_w"] is not None else None
        if sil_w is not None:
            metrics["sil/fraction"] = float(sil_w.mean())
        if self.successes is not None:
            held = self.successes.episodes_per_task()
            metrics["sil/buffer_episodes"] = float(held.sum())
            metrics["sil/buffer_tasks"] = float((held > 0).sum())
            if self.cfg.sil_hindsight:
                metrics["sil/hindsight_added"] = float(sum(p["hindsight"] for p in parts))
        t1 = time.perf_counter()
        upd = self.update(obs, chain, old_logp, adv, ret, old_values, frozen, sil_w)
        t_upd = time.perf_counter() - t1
        if self.cfg.sil_steps > 0:
            t2 = time.perf_counter()
            upd.update(self.self_imitation_steps())
            upd["perf/sil_s"] = time.perf_counter() - t2
        self.iter += 1
        metrics.update(upd)
        if self.curriculum is not None:
            # the policy's success averaged over tasks as the curriculum estimates it (the
            # rollout's own mean is over the failure-weighted draws)
            metrics["curriculum/task_success"] = float(self.curriculum.success_rate().mean())
            metrics["curriculum/max_prob_ratio"] = float(self.curriculum.probs().max()
                                                         * self.curriculum.num_tasks)
        ok = cat("success")
        if self.replay is not None:
            replayed = torch.cat([torch.arange(p["success"].numel()) < p["num_replayed"]
                                  for p in parts])
            k = int(replayed.sum())
            metrics["replay/envs"] = float(k)
            metrics["replay/size"] = float(len(self.replay))
            if k:
                metrics["replay/success"] = float(ok[replayed].mean())
            if k < ok.numel():
                metrics["rollout/success_fresh"] = float(ok[~replayed].mean())
        stoch = chain.stochastic
        metrics.update({
            "rollout/success": float(ok.mean()),
            "rollout/return": float(cat("return").mean()),
            "rollout/episode_chunks": float(cat("chunks").mean()),
            "rollout/noise_std": float(chain.std[stoch].mean()) if bool(stoch.any()) else 0.0,
            "rollout/noise_scale": float(getattr(self.sampler, "noise_scale", 1.0)),
            "perf/env_steps_per_s": env_steps / max(t_roll, 1e-9),
            "perf/learner_samples_per_s": adv.numel() * self.hp.update_epochs / max(t_upd, 1e-9),
            "perf/rollout_s": t_roll, "perf/update_s": t_upd,
            # within the rollout: the env's steps and the policy's forwards
            "perf/rollout_env_s": sum(p["env_s"] for p in parts),
            "perf/rollout_policy_s": sum(p["policy_s"] for p in parts),
            "env_steps": float(self.env_steps),
        })
        return metrics

    def update(self, obs, chain, old_logp, adv, ret, old_values,
               frozen_prefix=None, sil_weight=None) -> dict[str, float]:
        """``update_epochs`` passes of minibatch steps; ``frozen_prefix``: the rollout's frozen
        prefix caches of the same rows (None: re-encode ``obs``); ``sil_weight [M]``: the rows'
        weights in the self-imitation loss (None: no such loss)."""
        hp = self.hp
        self.policy.train()
        self._set_lr()
        device = next(self.policy.parameters()).device
        m = adv.shape[0]
        mb = max(1, math.ceil(m / hp.num_minibatches))
        stats: dict[str, list[float]] = {}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for _ in range(hp.update_epochs):
            perm = torch.randperm(m, generator=self.update_gen)
            for start in range(0, m, mb):
                i = self._minibatch_rows(perm[start:start + mb])
                o = to_device(index_batch(obs, i), device)
                c = to_device(chain.index(i), device)
                args = (o, c, old_logp[i].to(device), adv[i].to(device), ret[i].to(device),
                        old_values[i].to(device),
                        (to_device(index_batch(frozen_prefix, i), device)
                         if frozen_prefix is not None else None),
                        self._sil_inputs(c, sil_weight[i], device) if sil_weight is not None
                        # (a buffer read only by rl.sil_steps adds no term here)
                        else self._sil_buffer_inputs(device) if hp.sil_coef > 0 else None,
                        self._bc_inputs(device) if self.demos is not None else None)
                loss, s = self._loss(*args)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                self.optimizer.step()
                s["policy/grad_norm"] = float(gn)
                s = self._reduce_stats(s)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
            kls = stats.get("policy/approx_kl", [])
            if hp.target_kl is not None and kls and sum(kls) / len(kls) > hp.target_kl:
                break  # early stop: the policy moved too far from the rollout policy
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def self_imitation_steps(self) -> dict[str, float]:
        """``rl.sil_steps`` flow-matching steps on minibatches of the success buffer
        (:meth:`_sil_buffer_inputs`, executed elements only), with the self-imitation optimizer
        (Adam at ``rl.sil_lr`` over the actor's parameters); nothing while the buffer is empty.
        Returns the mean loss."""
        if self.successes is None or len(self.successes) == 0:
            return {}
        self.policy.train()
        device = next(self.policy.parameters()).device
        params = [p for g in self.sil_optimizer.param_groups for p in g["params"]]
        losses = []
        for _ in range(self.cfg.sil_steps):
            fm = self._sil_loss(self._sil_buffer_inputs(device))
            self.sil_optimizer.zero_grad(set_to_none=True)
            fm.backward()
            torch.nn.utils.clip_grad_norm_(params, self.hp.max_grad_norm)
            self.sil_optimizer.step()
            losses.append(float(fm.detach()))
        self.sil_optimizer.zero_grad(set_to_none=True)
        return {"sil/step_loss": sum(losses) / len(losses)}

    def _sil_loss(self, sil: dict[str, Any], prefix=None) -> torch.Tensor:
        """The self-imitation flow-matching loss of :meth:`_sil_inputs` (on the minibatch's
        ``prefix``) or :meth:`_sil_buffer_inputs` (buffer rows: their own ``obs`` encoded)."""
        if "obs" in sil:
            prefix = self.policy.encode_prefix(sil["obs"])
        return flow_matching_loss(self.policy, prefix, sil["actions"], noise=sil["noise"],
                                  time=sil["time"], mask=sil["mask"])

    def _flow_draws(self, shape: torch.Size, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching noise ``shape`` and times ``[shape[0]]`` of an extra loss term, drawn
        (in that order) from the trainer's update generator."""
        noise = torch.randn(shape, generator=self.update_gen, dtype=dtype)
        return noise, sample_flow_time(shape[0], generator=self.update_gen).to(dtype)

    def _sil_inputs(self, c, weight: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The self-imitation targets of a minibatch: the sampled chunks ``c.actions [M, H, A]``
        (model units), the loss mask ``[M, H, A]`` (executed elements of successful rows) and
        the flow-matching noise and times, drawn from the trainer's update generator."""
        actions = c.actions.detach()
        noise, time_ = (x.to(device, actions.dtype)
                        for x in self._flow_draws(actions.shape, torch.float32))
        mask = self.action_mask.to(device, actions.dtype)[None] * weight.to(device)[:, None, None]
        return {"actions": actions, "mask": mask, "noise": noise, "time": time_}

    def _sil_buffer_inputs(self, device) -> dict[str, Any] | None:
        """A self-imitation minibatch from the success buffer: ``rl.sil_batch_size`` chunk steps
        (obs, actions ``[B, H, A]`` model units, the executed-elements mask ``[B, H, A]``) and
        the flow-matching noise and times, drawn from the trainer's update generator; None
        without a buffer or while it is empty."""
        if self.successes is None or len(self.successes) == 0:
            return None
        b = self.cfg.sil_batch_size
        obs, actions = self.successes.draw(b, self.update_gen)
        noise, time_ = self._flow_draws(actions.shape, actions.dtype)
        mask = self.action_mask[None].expand(b, -1, -1).to(actions.dtype)
        return to_device({"obs": obs, "actions": actions, "mask": mask, "noise": noise,
                          "time": time_}, device)

    def _bc_inputs(self, device) -> dict[str, Any]:
        """A minibatch of the demo loss: ``bc_batch_size`` demo rows drawn uniformly with
        replacement (obs, env-space actions ``[B, H, A_env]``, mask ``[B, H]``) and the
        flow-matching noise (in the model's action space ``[B, H, A]``, normalised and padded
        as ``policy.preprocess_actions`` makes it) and times, all drawn from the trainer's update
        generator."""
        b = self.cfg.bc_batch_size
        d = index_batch(self.demos, torch.randint(0, len(self.demos), (b,),
                                                  generator=self.update_gen))
        # the noise lives in the model's action space (normalised, padded): its shape
        shape = self.policy.preprocess_actions(d.actions.to(device)).shape
        noise, time_ = self._flow_draws(shape, d.actions.dtype)
        return to_device({"obs": d.obs, "actions": d.actions, "mask": d.mask,
                          "noise": noise, "time": time_}, device)

    def minibatch_loss(self, o, c, old_logp, adv, ret, old_values,
                       frozen_prefix=None, sil=None,
                       bc=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and stats of one minibatch (already on the device): obs ``o``, chains ``c``,
        rollout log-probs, advantages, returns and values ``[M]``; ``frozen_prefix``: the
        rollout's frozen prefix caches of these rows (else ``o`` is re-encoded); ``sil``: the
        self-imitation inputs, rows of this minibatch (:meth:`_sil_inputs`) or, with their own
        ``obs``, of the success buffer (:meth:`_sil_buffer_inputs`), or None; ``bc``: the
        demo-loss inputs (:meth:`_bc_inputs`) or None."""
        hp = self.hp
        device = old_logp.device
        if frozen_prefix is not None:
            prefix = self.policy.thaw_prefix(frozen_prefix)
        else:
            prefix = self.policy.encode_prefix(o)
        new = self.sampler.log_prob(self.policy, prefix, c)
        new_logp = self._aggregate(new)
        mask = level_mask(self.action_mask.to(device), adv.shape[0], hp.ratio_level)
        pg, s = policy_loss(new_logp, old_logp, adv,
                            clip_low=hp.clip_low, clip_high=hp.clip_high,
                            dual_clip=hp.dual_clip, mask=mask,
                            max_log_ratio=hp.max_log_ratio)
        # critic warm-up: the policy term is weighted 0 (zero gradients, not missing ones, so
        # that data-parallel wrappers see every parameter used)
        warm = self.algo == "ppo" and self.iter < hp.critic_warmup_iters
        loss = pg * 0.0 if warm else pg
        if self.ref is not None:
            with torch.no_grad():
                ref_pol, ref_smp = self.ref
                # a frozen prefix is the same in the reference (a copy of the starting policy)
                ref_prefix = (ref_pol.thaw_prefix(frozen_prefix) if frozen_prefix is not None
                              else ref_pol.encode_prefix(o))
                ref_logp = self._aggregate(ref_smp.log_prob(ref_pol, ref_prefix, c))
            kl = approx_kl(new_logp, ref_logp, mask)
            loss = loss + self.hp.kl_coef * kl
            s["ref_kl"] = float(kl.detach())
        s = {f"policy/{k}": float(v) for k, v in s.items()}
        s["policy/loss"] = float(pg.detach())
        if self.algo == "ppo":
            v = self.policy.value(prefix)
            vl, vs = value_loss(v, old_values, ret,
                                clip=hp.value_clip, huber_delta=hp.huber_delta)
            loss = loss + hp.value_coef * vl
            s["value/loss"] = float(vl.detach())
        if sil is not None and bool(sil["mask"].any()):
            # self-imitation (Oh et al. 2018, success as the filter): the flow-matching loss
            # on the executed part of the chunks that led to a success, averaged over them
            fm = self._sil_loss(sil, prefix)
            loss = loss + hp.sil_coef * fm
            s["sil/loss"] = float(fm.detach())
        if bc is not None:
            # demo-augmented RL: the policy's own SFT loss on few-shot demo rows (its action
            # normalisation and padded-dims mask as in SFT), with the trainer's noise and times
            # (weighted also during a critic warm-up: the demos are not the fresh critic's guess)
            fm = self.policy.sft_loss(bc["obs"], bc["actions"], mask=bc["mask"],
                                      noise=bc["noise"], time=bc["time"])
            loss = loss + self.cfg.bc_coef * fm
            s["bc/loss"] = float(fm.detach())
        ent = hp.entropy_coef
        if ent and not warm and bool(new.stochastic.any()):
            # Gaussian entropy per element = log std + const: a bonus on the noise level
            bonus = new.std[new.stochastic].clamp_min(1e-8).log().mean()
            loss = loss - ent * bonus
        return loss, s

    # hooks of data-parallel learners (pirl.runners.distributed.DataParallelRLTrainer): this
    # rank's share of a minibatch, the (DDP / FSDP-wrapped) loss, stats averaged over ranks
    def _minibatch_rows(self, i: torch.Tensor) -> torch.Tensor:
        return i

    def _loss(self, *args) -> tuple[torch.Tensor, dict[str, float]]:
        return self.minibatch_loss(*args)

    def _reduce_stats(self, s: dict[str, float]) -> dict[str, float]:
        return s

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"iter": self.iter, "env_steps": self.env_steps,
                "optimizer": self.optimizer.state_dict(),
                "sample_gen": self.sample_gen.get_state(),
                "update_gen": self.update_gen.get_state(),
                "group_gen": self.group_gen.get_state(),
                "curriculum": (self.curriculum.state_dict() if self.curriculum is not None
                               else None),
                "replay": self.replay.state_dict() if self.replay is not None else None,
                "successes": (self.successes.state_dict() if self.successes is not None
                              else None),
                "sil_optimizer": (self.sil_optimizer.state_dict()
                                  if self.sil_optimizer is not None else None)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.iter, self.env_steps = sd["iter"], sd["env_steps"]
        self.optimizer.load_state_dict(sd["optimizer"])
        self.sample_gen.set_state(sd["sample_gen"])
        self.update_gen.set_state(sd["update_gen"])
        self.group_gen.set_state(sd["group_gen"])
        # the optional parts: on / off must match the config, then their states load
        for key, part, field in (("curriculum", self.curriculum, "rl.task_sampling"),
                                 ("replay", self.replay, "rl.replay_failures"),
                                 ("successes", self.successes, "rl.sil_buffer_per_task"),
                                 ("sil_optimizer", self.sil_optimizer, "rl.sil_steps")):
            state = sd.get(key)
            if (state is None) != (part is None):
                raise ValueError(f"the checkpoint's {field} (on / off) differs from the "
                                 f"config's")
            if state is not None:
                part.load_state_dict(state)
