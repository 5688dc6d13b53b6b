"""The driver side of the Ray placements: :class:`DistributedTrainer` (RLTrainer's interface,
running the colocated or disaggregated placement), the resource check, and
:func:`trainer_from_config` (the trainer a :class:`~pirl.config.schema.TrainConfig` asks for).

Failures: any worker that dies (killed process, OOM, crash) makes
:meth:`DistributedTrainer.iteration` raise :class:`WorkerError` naming the worker; no update runs
on partial data, and the trainer's counters are unchanged, so ``pirl train --resume RUN_DIR``
continues from the last checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from pirl.envs.base import BatchedEnv
from pirl.flow.base import Sampler
from pirl.models.base import FlowPolicy
from pirl.runners.distributed.learner import ColocatedWorker, LearnerWorker
from pirl.runners.distributed.preflight import check_resources, env_fn_of
from pirl.runners.distributed.remote import EnvSpec, WorkerError, WorkerSpec, _split, get_all
from pirl.runners.distributed.rollout_workers import EnvWorker, RolloutWorker
from pirl.runners.placement import PlacementConfig, shard_rows


class DistributedTrainer:
    """Runs RL iterations with the colocated or disaggregated placement on Ray.

    Same interface as :class:`~pirl.runners.rl.RLTrainer` (``iteration()``, ``state_dict()``,
    ``load_state_dict()``, ``iter``, ``env_steps``), so :class:`pirl.runners.train.Run` uses
    either.  ``policy`` / ``sampler``: the driver's modules; their current weights seed every
    worker, and with ``placement.sync_driver`` they receive the trained weights after every
    iteration (for the driver's evaluations and checkpoints).

    env_fn: ``env_fn(num_envs=n)`` builds ``n`` training envs in a worker (picklable);
    ``env``: the driver's training env (only its spec is used: N, dims, tasks, horizon);
    ``demos``: the SFT demos of ``rl.bc_coef``'s loss (sent once to the learner ranks).

    The learner ranks own every piece of trainer state but the chain-noise generator of the
    rollout workers: the task statistics of failure-weighted sampling, the failure replay
    buffer, the GRPO group generator and the noise schedule (each iteration they hand the
    rollout workers the reset arguments and noise scale of
    :meth:`~pirl.runners.rl.RLTrainer.begin_rollout`).
    """

    def __init__(self, policy: FlowPolicy, sampler: Sampler, env: BatchedEnv, cfg: Any,
                 seed: int, placement: PlacementConfig, env_fn: Callable[..., BatchedEnv],
                 device: str = "cpu", demos: Any = None):
        import ray

        from pirl.runners.placement import connect

        if placement.mode == "local":
            raise ValueError("placement.mode='local' runs RLTrainer; DistributedTrainer is for "
                             "colocated / disaggregated")
        if cfg.bc_coef > 0 and (demos is None or len(demos) == 0):
            raise ValueError("rl.bc_coef > 0 needs the SFT demos (DistributedTrainer(..., "
                             "demos=...))")
        connect(placement.cluster, placement.ray_num_cpus)
        self.policy, self.sampler, self.cfg, self.placement = policy, sampler, cfg, placement
        self.iter, self.env_steps = 0, 0
        self._final_state: dict[str, Any] | None = None
        spec_env = EnvSpec.from_env(env)
        placement.validate_for(spec_env.num_envs)
        check_resources(placement, dict(ray.cluster_resources()))
        modules = ray.put({"policy": _cpu_module(policy), "sampler": _cpu_module(sampler)})
        spec = WorkerSpec(env_fn=env_fn, modules=modules, env_spec=spec_env, rl=cfg, seed=seed,
                          device=device, threads=placement.threads,
                          demos=ray.put(demos) if demos is not None else None)
        lp = placement.learner
        world = lp.ranks
        self.env_workers: list[tuple[Any, int, int, str]] = []
        self.rollout_workers: list[Any] = []
        self.rollout_names: list[str] = []
        if placement.mode == "colocated":
            actor = ray.remote(ColocatedWorker)
            rows = shard_rows(spec_env.num_envs, world)
            self.learners = [actor.options(num_cpus=lp.cpus, num_gpus=lp.gpus).remote(
                spec, r, world, lp, a, b) for r, (a, b) in enumerate(rows)]
            self.learner_names = [f"colocated worker {r} (learner rank {r}, envs [{a}, {b}))"
                                  for r, (a, b) in enumerate(rows)]
        else:
            env_actor = ray.remote(EnvWorker)
            for w, (a, b) in enumerate(shard_rows(spec_env.num_envs, placement.env_workers)):
                h = env_actor.options(num_cpus=placement.env_cpus).remote(env_fn, a, b,
                                                                          placement.threads)
                self.env_workers.append((h, a, b, f"env worker {w} (envs [{a}, {b}))"))
            use_gpu = placement.rollout_gpus > 0
            rollout_actor = ray.remote(RolloutWorker).options(
                num_cpus=placement.rollout_cpus, num_gpus=placement.rollout_gpus)
            for r, group in enumerate(_split(self.env_workers, placement.rollout_workers)):
                self.rollout_workers.append(rollout_actor.remote(
                    spec, group, placement.pipeline_stages, "cuda" if use_gpu else device))
                self.rollout_names.append(f"rollout worker {r} (envs [{group[0][1]}, "
                                          f"{group[-1][2]}))")
            actor = ray.remote(LearnerWorker)
            self.learners = [actor.options(num_cpus=lp.cpus, num_gpus=lp.gpus).remote(
                spec, r, world, lp) for r in range(world)]
            self.learner_names = [f"learner rank {r}" for r in range(world)]
        try:
            self._init_distributed()
        except WorkerError:
            self.close(keep_state=False)
            raise

    # ----------------------------------------------------------------- setup
    def _init_distributed(self) -> None:
        t = self.placement.startup_timeout_s
        addr, port = get_all([self.learners[0].rendezvous.remote()], [self.learner_names[0]],
                             timeout_s=t)[0]
        get_all([w.init_distributed.remote(addr, port) for w in self.learners],
                self.learner_names, timeout_s=t)
        if len(self.rollout_workers) > 1:
            addr, port = get_all([self.rollout_workers[0].rendezvous.remote()],
                                 self.rollout_names[:1], timeout_s=t)[0]
            world = len(self.rollout_workers)
            get_all([w.init_group.remote(addr, port, r, world, self.placement.learner.timeout_s)
                     for r, w in enumerate(self.rollout_workers)], self.rollout_names, timeout_s=t)
        if self.rollout_workers:  # start-up errors of the other workers surface here
            get_all([w.pid.remote() for w in self.rollout_workers]
                    + [w.pid.remote() for w, *_ in self.env_workers],
                    self.rollout_names + [n for *_, n in self.env_workers], timeout_s=t)
            # the rollout workers' chain noise starts where the learner's generator does
            st = get_all([self.learners[0].sample_state.remote()], self.learner_names[:1])[0]
            get_all([w.load_rollout_state.remote(st) for w in self.rollout_workers],
                    self.rollout_names)

    def _gathering_ranks(self) -> list:
        """The ranks to ask for full weights / state: all of them under FSDP (gathering is a
        collective; ranks > 0 return empty dicts), only rank 0 under DDP (replicas)."""
        return list(self.learners) if self.placement.learner.fsdp else self.learners[:1]

    def worker_pids(self) -> dict[str, int]:
        """Process ids of every worker, by name (for monitoring and the fault tests)."""
        handles = [(w, n) for (w, *_, n) in self.env_workers]
        handles += list(zip(self.rollout_workers, self.rollout_names))
        handles += list(zip(self.learners, self.learner_names))
        pids = get_all([h.pid.remote() for h, _ in handles], [n for _, n in handles])
        return {n: p for (_, n), p in zip(handles, pids)}

    def _dead_workers(self, timeout_s: float = 10.0) -> list[str]:
        """Names of the workers that do not answer a ``pid`` call within ``timeout_s``."""
        import ray

        handles = [(w, n) for (w, *_, n) in self.env_workers]
        handles += list(zip(self.rollout_workers, self.rollout_names))
        handles += list(zip(self.learners, self.learner_names))
        refs = [h.pid.remote() for h, _ in handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ok = set()
        for r in ready:
            try:
                ray.get(r)
                ok.add(r)
            except Exception:  # noqa: BLE001 - any failure: that worker is gone
                pass
        return [n for (_, n), r in zip(handles, refs) if r not in ok]

    # ----------------------------------------------------------------- iteration
    def iteration(self) -> dict[str, float]:
        """One rollout + data-parallel update; raises :class:`WorkerError` (naming the worker)
        if any worker dies, before any update is counted."""
        try:
            if not self.rollout_workers:
                metrics = get_all([w.iteration.remote() for w in self.learners],
                                  self.learner_names)[0]
            else:
                # every rank draws the same reset arguments; the rollout workers get rank 0's
                plan = get_all([w.plan.remote() for w in self.learners], self.learner_names)[0]
                payloads = [w.rollout.remote(plan) for w in self.rollout_workers]
                metrics = get_all([w.learn.remote(*payloads) for w in self.learners],
                                  self.learner_names)[0]
            weights = None
            if self.rollout_workers or self.placement.sync_driver:
                refs = [w.weights.remote() for w in self._gathering_ranks()]
                get_all(refs, self.learner_names)
                weights = refs[0]
            if self.rollout_workers:
                get_all([w.load_weights.remote(weights) for w in self.rollout_workers],
                        self.rollout_names)
            if self.placement.sync_driver:
                import ray

                w = ray.get(weights)
                self.policy.load_state_dict(w["policy"])
                self.sampler.load_state_dict(w["sampler"])
        except WorkerError as e:
            dead = self._dead_workers()
            self.close(keep_state=False)
            # the worker that reported may only have lost an input (a rollout from a dead node)
            what = f"{', '.join(dead)} died or stopped responding ({e})" if dead else str(e)
            raise WorkerError(f"{what}\n(the run stopped before using this iteration's data; "
                              "resume from the last checkpoint with pirl train --resume RUN_DIR)"
                              ) from e
        self.iter += 1
        self.env_steps = int(metrics["env_steps"])
        return metrics

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """RLTrainer-compatible state (DDP: a local run can resume it, and vice versa)."""
        if not self.learners:
            if self._final_state is None:
                raise WorkerError("the workers were stopped after a failure: no state to save")
            return self._final_state
        refs = [w.trainer_state.remote() for w in self._gathering_ranks()]
        sd = get_all(refs, self.learner_names)[0]
        if self.rollout_workers:  # identical on every rollout worker
            ro = get_all([self.rollout_workers[0].rollout_state.remote()],
                         self.rollout_names[:1])[0]
            sd["sample_gen"] = ro["sample_gen"]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        get_all([w.load_trainer_state.remote(sd) for w in self.learners], self.learner_names)
        if self.rollout_workers:
            ro = {"sample_gen": sd["sample_gen"]}
            get_all([w.load_rollout_state.remote(ro) for w in self.rollout_workers],
                    self.rollout_names)
        self.iter, self.env_steps = sd["iter"], sd["env_steps"]

    def close(self, keep_state: bool = True) -> None:
        """Stop every worker (idempotent).  ``keep_state``: first fetch :meth:`state_dict` so that
        it stays readable (final checkpoints) after the workers are gone."""
        import ray

        if keep_state and self.learners and self._final_state is None:
            self._final_state = self.state_dict()
        handles = [w for w, *_ in self.env_workers] + list(self.learners)
        handles += list(self.rollout_workers)
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.env_workers, self.learners, self.rollout_workers = [], [], []


def _cpu_module(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).cpu()


def trainer_from_config(cfg: Any, policy: FlowPolicy, sampler: Sampler, env: BatchedEnv,
                        demos: Any = None):
    """The trainer of a :class:`~pirl.config.schema.TrainConfig`: :class:`RLTrainer` for
    ``placement.mode == "local"`` (``demos``: the SFT samples of ``rl.bc_coef``'s loss), else a
    :class:`DistributedTrainer` whose env workers build the config's training env."""
    placement = getattr(cfg, "placement", None)
    if placement is None or placement.mode == "local":
        from pirl.runners.rl import RLTrainer

        return RLTrainer(policy, sampler, env, cfg.rl, cfg.seed, demos=demos)
    return DistributedTrainer(policy, sampler, env, cfg.rl, cfg.seed, placement, env_fn_of(cfg),
                              device=cfg.device, demos=demos)
