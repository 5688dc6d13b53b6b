"""Where the pieces of an RL run execute: ``local``, ``colocated`` or ``disaggregated``.

pirl scales out on Ray (process placement, object store, fault reporting) and torch.distributed
(the learner's gradient all-reduce / FSDP2 sharding); this module holds the placement config and
the small helpers both modes share.  The modes (RLinf's names, pi_RL Sec. 5):

``local``
    One process: env, rollout and learner in the driver (what ``pirl train`` does without Ray).
``colocated``
    ``learner.ranks`` Ray actors; each owns a contiguous slice of the N envs, a replica of the
    policy and one torch.distributed rank.  Each iteration every actor rolls out its slice, the
    slices are all-gathered, and the ranks run the data-parallel update; the phases share the
    actor's device (with FSDP2 the parameters are unsharded for the rollout and resharded for the
    update: the "swap" between phases).
``disaggregated``
    ``env_workers`` CPU actors each own a slice of the envs; ``rollout_workers`` inference actors
    each drive a contiguous group of them, pipelined in ``pipeline_stages`` stages (while stage
    A's envs step, the rollout worker infers for stage B); ``learner.ranks`` learner actors
    train; after each update the weights go from learner rank 0 to the rollout workers through
    the Ray object store.

Every mode produces the same rollout data as ``local`` for the same seed (per-env episode seeds,
and the sampler's noise drawn for the full batch then sliced: see
:func:`pirl.runners.distributed.draw_chain_noise`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

PlacementMode = Literal["local", "colocated", "disaggregated"]


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass
class LearnerPlacement:
    """The learner: ``ranks`` torch.distributed processes (Ray actors).

    backend: ``"auto"`` (NCCL when the learner has a GPU, else gloo), ``"gloo"`` or ``"nccl"``.
    fsdp: shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``) instead
        of replicating them (DDP).
    cpus / gpus: Ray resources per rank (fractions allowed; the default 0.5 CPU lets every
        placement's defaults fit a 2-CPU machine, the smallest one pirl's tests run on).
    timeout_s: torch.distributed collective timeout (a dead peer fails the run after this).
    """

    ranks: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    fsdp: bool = False
    cpus: float = 0.5
    gpus: float = 0.0
    timeout_s: float = 300.0

    def __post_init__(self):
        _check(self.ranks >= 1, "placement.learner.ranks", f"must be >= 1, got {self.ranks}")
        _check(self.cpus >= 0 and self.gpus >= 0, "placement.learner",
               "cpus and gpus must be >= 0")
        _check(self.timeout_s > 0, "placement.learner.timeout_s", "must be > 0")


@dataclass
class PlacementConfig:
    """Placement of env workers, rollout workers and the learner (see module docstring).

    mode: ``"local" | "colocated" | "disaggregated"``.
    env_workers: env actors of the disaggregated mode (each owns ``num_envs / env_workers``).
    rollout_workers: inference actors of the disaggregated mode; each drives a contiguous group
        of ``env_workers / rollout_workers`` env workers.
    pipeline_stages: disaggregated mode: env/inference pipeline stages per rollout worker
        (1 = no pipelining); ``env_workers`` must be a multiple of
        ``rollout_workers * pipeline_stages`` (stage s = the s-th group of its env workers).
    env_cpus / rollout_cpus / rollout_gpus: Ray resources per env worker / rollout worker.  The
        defaults (2 x 0.25 + 0.5 + a 0.5-CPU learner rank = 1.5 CPUs) fit a 2-CPU machine; Ray
        counts the fractions only for scheduling, a worker uses what it needs.
    threads: torch intra-op threads inside every actor (None: torch's default).
    cluster: where Ray runs: ``None`` / ``"local"`` (start a local Ray if none is running),
        ``"auto"`` (an existing cluster found through ``RAY_ADDRESS`` or ``ray start``), or an
        address like ``"ray://head:10001"``.  ``pirl train --cluster`` sets it.
    ray_num_cpus: CPUs of a Ray started locally (None: all of the machine's).
    sync_driver: copy the trained weights back into the driver's policy after every iteration
        (needed for the driver's evaluations and checkpoints; costs one state-dict transfer).
    startup_timeout_s: give up (naming the workers) if the workers are not up after this long.
    """

    mode: PlacementMode = "local"
    env_workers: int = 2
    rollout_workers: int = 1
    pipeline_stages: int = 2
    env_cpus: float = 0.25
    rollout_cpus: float = 0.5
    rollout_gpus: float = 0.0
    threads: int | None = 1
    learner: LearnerPlacement = field(default_factory=LearnerPlacement)
    cluster: str | None = None
    ray_num_cpus: int | None = None
    sync_driver: bool = True
    startup_timeout_s: float = 300.0

    def __post_init__(self):
        _check(self.mode in ("local", "colocated", "disaggregated"), "placement.mode",
               f"must be local, colocated or disaggregated, got {self.mode!r}")
        _check(self.env_workers >= 1, "placement.env_workers", "must be >= 1")
        _check(self.pipeline_stages >= 1, "placement.pipeline_stages", "must be >= 1")
        _check(self.rollout_workers >= 1, "placement.rollout_workers", "must be >= 1")
        _check(self.env_workers % (self.rollout_workers * self.pipeline_stages) == 0,
               "placement.pipeline_stages",
               f"env_workers={self.env_workers} must be a multiple of rollout_workers="
               f"{self.rollout_workers} x pipeline_stages={self.pipeline_stages}")
        _check(self.threads is None or self.threads >= 1, "placement.threads", "must be >= 1")

    def validate_for(self, num_envs: int) -> None:
        """Check that ``num_envs`` can be split as this placement needs."""
        parts = {"colocated": self.learner.ranks, "disaggregated": self.env_workers}.get(self.mode, 1)
        _check(num_envs >= parts, "env.num_envs",
               f"{num_envs} envs cannot be split over {parts} {self.mode} workers")


def shard_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """Split rows ``[0, n)`` into ``parts`` contiguous ``(start, stop)`` ranges whose sizes differ
    by at most one (the first ``n % parts`` ranges get the extra row)."""
    if parts < 1 or n < parts:
        raise ValueError(f"cannot split {n} rows into {parts} non-empty parts")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def free_port() -> int:
    """A TCP port that is free on this host now (for torch.distributed's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """This node's IP as Ray sees it (falls back to 127.0.0.1 outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray / not connected
        return "127.0.0.1"


def connect(cluster: str | None = None, num_cpus: int | None = None,
            runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Connect to Ray (idempotent) and return ``ray.cluster_resources()``.

    cluster: ``None`` / ``"local"``: reuse a Ray already initialised in this process, else start a
    local one (``num_cpus`` CPUs, no dashboard).  ``"auto"`` or ``"ray://HOST:PORT"`` /
    ``"HOST:PORT"``: join an existing cluster (``ray.init(address=cluster)``).

    For a local Ray the driver's ``src`` folder is added to ``PYTHONPATH`` (inherited by the
    workers), so actors import the same pirl as the driver.
    """
    try:
        import ray
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise RuntimeError("placement modes other than 'local' need Ray: "
                           "pip install 'pirl[dist]'") from e
    if not ray.is_initialized():
        if cluster in (None, "local"):
            # workers of a local Ray inherit the driver's environment: make pirl importable there
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            if src not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join([src, *paths])
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
        else:
            ray.init(address=cluster, runtime_env=runtime_env)
    return dict(ray.cluster_resources())
