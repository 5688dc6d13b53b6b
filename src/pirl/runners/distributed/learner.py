"""The data-parallel learner: :class:`DataParallelRLTrainer` (an RLTrainer whose update runs on
torch.distributed ranks, DDP or FSDP2) and the Ray actor bodies that hold one rank:
:class:`LearnerWorker` (disaggregated) and :class:`ColocatedWorker` (env slice + rollout + rank).

Every learner rank holds the full rollout (it is small next to the model: obs, chains,
rewards), computes the same advantages, draws the same minibatch permutation, and takes its
contiguous share of each minibatch; the share's loss is scaled by ``world * n_rank /
n_minibatch`` so that the gradient average equals the full minibatch's mean gradient (also for
unequal or empty shares).  The update is therefore the local one up to float summation order.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from pirl.runners.distributed.remote import (WorkerSpec, _build_modules, _resolve, _set_threads,
                                             cpu_state)
from pirl.runners.distributed.stages import EnvSlice, LocalStage, cat_rollouts, collect_staged
from pirl.runners.placement import LearnerPlacement
from pirl.runners.rl import RLTrainer


class _LossModule(nn.Module):
    """Policy + sampler as one module whose ``forward`` is the minibatch loss, so DDP's gradient
    hooks and FSDP2's unshard / reshard hooks run around it."""

    def __init__(self, trainer: "DataParallelRLTrainer"):
        super().__init__()
        self.policy = trainer.policy
        self.sampler = trainer.sampler
        self._trainer = [trainer]  # a list: not registered as a submodule

    def forward(self, o, c, old_logp, adv, ret, old_values, *rest):
        # rest: (frozen_prefix, sil, bc, scale)
        scale, extra = rest[-1], rest[:-1]
        loss, stats = self._trainer[0].minibatch_loss(o, c, old_logp, adv, ret, old_values,
                                                      *extra)
        return loss * scale, stats


def _graph_leaves(t: torch.Tensor) -> set[int]:
    """``id`` s of the leaf tensors (parameters) whose gradient ``t.backward()`` would fill."""
    out: set[int] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            out.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return out


class DataParallelRLTrainer(RLTrainer):
    """:class:`~pirl.runners.rl.RLTrainer` whose update runs on ``world`` torch.distributed ranks.

    Every rank holds the full rollout and computes the same advantages and minibatch
    permutations; rank ``r`` takes rows ``shard_rows(M, world)[r]`` of each minibatch of ``M``
    and scales its mean loss by ``world * M_r / M``, so the averaged gradient (DDP all-reduce, or
    FSDP2 reduce-scatter) is the full minibatch's.  A rank whose share is empty (``M < world``)
    runs one row with weight 0, so collectives stay matched.  Stats are the ``M_r / M``-weighted
    sums over ranks (identical on every rank, so ``target_kl`` early stopping agrees).
    Call :meth:`parallelize` after ``torch.distributed.init_process_group``.
    """

    fsdp: bool = False
    world: int = 1
    rank: int = 0

    def parallelize(self, fsdp: bool = False) -> None:
        import torch.distributed as dist

        if self.cfg.sil_steps > 0:
            raise ValueError("rl.sil_steps runs on the local trainer only (its steps are not "
                             "data-parallel); use ppo.sil_coef with the success buffer instead")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.fsdp = fsdp
        # object / flag collectives on CPU whatever the learner's backend
        self.cpu_group = dist.new_group(backend="gloo")
        self.loss_module = _LossModule(self)
        self._scale = 1.0
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            dev = next(self.policy.parameters()).device
            mesh = init_device_mesh(dev.type, (self.world,))
            fully_shard(self.loss_module, mesh=mesh)
            self.optimizer = self._make_optimizer()  # over the sharded (DTensor) parameters
            self.wrapped = self.loss_module
        else:
            self.wrapped = None  # DDP, built at the first minibatch (see _wrap_ddp)
            self.find_unused_parameters: bool | None = None

    # --------------------------------------------------------- RLTrainer hooks
    def _minibatch_rows(self, i: torch.Tensor) -> torch.Tensor:
        m = i.shape[0]
        base, extra = divmod(m, self.world)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        if stop > start:
            self._scale = self.world * (stop - start) / m
            return i[start:stop]
        self._scale = 0.0
        return i[:1]

    def _loss(self, *args):
        if self.wrapped is None:
            self._wrap_ddp(args)
        return self.wrapped(*args, self._scale)

    def _wrap_ddp(self, args: tuple) -> None:
        """Wrap the loss module in DDP, with ``find_unused_parameters`` only if some trainable
        parameter does not reach the loss (e.g. the critic under GRPO): that option costs an
        extra graph traversal per step and makes every rank warn when nothing is unused.  The
        reached parameters are read from the autograd graph of one forward on the first
        minibatch (the global RNG is restored, so the run is unchanged); the ranks agree by
        an all-reduce."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        dev = params[0].device if params else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            loss, _ = self.loss_module(*args, self._scale)
        reached = _graph_leaves(loss)
        del loss
        unused = torch.tensor([sum(id(p) not in reached for p in params)], dtype=torch.int64)
        dist.all_reduce(unused, group=self.cpu_group)
        self.find_unused_parameters = int(unused) > 0
        self.wrapped = DDP(self.loss_module, find_unused_parameters=self.find_unused_parameters)

    def _reduce_stats(self, s: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(s)
        w = self._scale / self.world
        t = torch.tensor([s[k] * w for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=self.cpu_group)
        return dict(zip(keys, t.tolist()))

    # --------------------------------------------------------- weights / state
    def full_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Full CPU state dicts ``{"policy", "sampler"}`` (a collective under FSDP: call it on
        every rank; only rank 0's result is complete)."""
        if not self.fsdp:
            return {"policy": cpu_state(self.policy), "sampler": cpu_state(self.sampler)}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        sd = get_model_state_dict(self.loss_module,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"policy": {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")},
                "sampler": {k[len("sampler."):]: v for k, v in sd.items()
                            if k.startswith("sampler.")}}

    def state_dict(self) -> dict[str, Any]:
        """RLTrainer's state (a collective under FSDP).  DDP: the optimizer state has the local
        layout (a local run resumes it); FSDP: the full FQN-keyed layout (FSDP runs resume it)."""
        if not self.fsdp:
            return super().state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        opt = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
        return {"iter": self.iter, "env_steps": self.env_steps, "optimizer": opt,
                "optimizer_format": "fsdp-full", "sample_gen": self.sample_gen.get_state(),
                "update_gen": self.update_gen.get_state(), "group_gen": self.group_gen.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not self.fsdp:
            if sd.get("optimizer_format") == "fsdp-full":
                raise ValueError("this checkpoint's optimizer state was saved by an FSDP learner; "
                                 "resume it with placement.learner.fsdp=true")
            return super().load_state_dict(sd)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        if sd.get("optimizer_format") != "fsdp-full":
            raise ValueError("this checkpoint's optimizer state has the local/DDP layout; "
                             "resume it with placement.learner.fsdp=false")
        self.iter, self.env_steps = sd["iter"], sd["env_steps"]
        set_optimizer_state_dict(self.loss_module, self.optimizer, optim_state_dict=sd["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.sample_gen.set_state(sd["sample_gen"])
        self.update_gen.set_state(sd["update_gen"])
        self.group_gen.set_state(sd["group_gen"])


class LearnerWorker:
    """Ray actor body: learner rank ``rank`` of ``world`` (DDP or FSDP2)."""

    def __init__(self, spec: WorkerSpec, rank: int, world: int, learner: LearnerPlacement):
        _set_threads(spec.threads)
        self.rank, self.world, self.learner = rank, world, learner
        use_gpu = learner.gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else spec.device
        self.spec = spec
        self.policy, self.sampler = _build_modules(spec, self.device)
        self.trainer = DataParallelRLTrainer(self.policy, self.sampler, spec.env_spec, spec.rl,
                                             spec.seed, demos=_resolve(spec.demos))

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for rank 0's TCP store."""
        from pirl.runners.placement import free_port, node_ip

        return node_ip(), free_port()

    def init_distributed(self, addr: str, port: int) -> None:
        import datetime

        import torch.distributed as dist

        backend = self.learner.backend
        if backend == "auto":
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if self.device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU(s) as cuda:0..
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.learner.timeout_s))
        self.trainer.parallelize(fsdp=self.learner.fsdp)

    def plan(self) -> dict[str, Any]:
        """What the rollout workers collect this iteration: the reset arguments and noise scale
        of :meth:`~pirl.runners.rl.RLTrainer.begin_rollout` (which also sets this rank's task
        ids / groups for :meth:`learn`), the horizon and whether values are needed.  Every rank
        runs it (identical state, identical draws); the driver forwards rank 0's."""
        tr = self.trainer
        return {"reset_kwargs": tr.begin_rollout(),
                "noise_scale": getattr(tr.sampler, "noise_scale", None),
                "num_chunks": tr.num_chunks, "action_chunk": tr.action_chunk,
                "with_values": tr.algo == "ppo"}

    def learn(self, *payloads: dict[str, Any]) -> dict[str, float]:
        """Advantages + data-parallel update on the rollout workers' rollouts (in env order)."""
        ro = cat_rollouts([p["rollout"] for p in payloads])
        return self.trainer.learn(ro, max(p.get("time", 0.0) for p in payloads))

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.trainer.full_weights()

    def sample_state(self) -> dict[str, Any]:
        """The chain-noise generator's state (the rollout workers start from it)."""
        return {"sample_gen": self.trainer.sample_gen.get_state()}

    def trainer_state(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_trainer_state(self, sd: dict[str, Any]) -> None:
        self.trainer.load_state_dict(sd)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ColocatedWorker(LearnerWorker):
    """Ray actor body of the colocated mode: env rows ``[start, stop)`` + rollout + learner rank.

    One iteration: roll out the own env slice (chain noise drawn for all N envs, so the slice is
    the rows of the local run; "all envs done" is all-reduced), all-gather the slices into the
    full rollout, then the data-parallel update.  Under FSDP2 the parameters are unsharded for
    the rollout and resharded for the update (the phase swap of colocated placement).
    """

    def __init__(self, spec: WorkerSpec, rank: int, world: int, learner: LearnerPlacement,
                 start: int, stop: int):
        super().__init__(spec, rank, world, learner)
        self.stage = LocalStage(EnvSlice(spec.env_fn(num_envs=stop - start), start, stop))

    def _all_done(self, mine: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0 if mine else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.trainer.cpu_group)
        return int(flag) == 0

    def iteration(self) -> dict[str, float]:
        import torch.distributed as dist

        tr = self.trainer
        tr.policy.eval()
        t0 = time.perf_counter()
        if tr.fsdp:
            tr.loss_module.unshard()
        try:
            part = collect_staged(tr.policy, tr.sampler, [self.stage],
                                  num_envs=tr.env.num_envs, num_chunks=tr.num_chunks,
                                  reset_kwargs=tr.begin_rollout(), action_chunk=tr.action_chunk,
                                  generator=tr.sample_gen, with_values=tr.algo == "ppo",
                                  all_done=self._all_done)
        finally:
            if tr.fsdp:
                tr.loss_module.reshard()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part, group=tr.cpu_group)
        ro = cat_rollouts(parts)
        return tr.learn(ro, time.perf_counter() - t0)
