"""Fail before work: a Ray placement's config is checked against the cluster before a run spends
anything on pretraining, demos or SFT.

:func:`check_cluster` raises :class:`~pirl.config.loading.ConfigError` (the CLI prints
``pirl: error: <field>: <reason>`` and exits 2) when Ray is missing, the envs cannot be split as
the placement asks, the cluster cannot be reached, the workers ask for more CPUs / GPUs than the
cluster (or any one node, for a single worker) has, or a node cannot build the training env (a
simulator missing on the workers).
"""

from __future__ import annotations

import functools
from typing import Any

from pirl.config.loading import ConfigError
from pirl.runners.placement import PlacementConfig


def worker_requests(placement: PlacementConfig) -> list[tuple[str, float, float]]:
    """``(field prefix, CPUs, GPUs)`` of every Ray actor the placement starts."""
    lp = placement.learner
    out = [("placement.learner", lp.cpus, lp.gpus)] * lp.ranks
    if placement.mode == "disaggregated":
        out += [("placement.env", placement.env_cpus, 0.0)] * placement.env_workers
        out += [("placement.rollout", placement.rollout_cpus,
                 placement.rollout_gpus)] * placement.rollout_workers
    return out


def _field(prefix: str, unit: str) -> str:
    """The config field of a worker kind's ``cpus`` / ``gpus`` (``placement.env_cpus``,
    ``placement.learner.gpus`` ...)."""
    return f"{prefix}.{unit}" if prefix == "placement.learner" else f"{prefix}_{unit}"


def placement_resources(placement: PlacementConfig) -> dict[str, float]:
    """Total Ray CPUs / GPUs the placement's workers ask for."""
    reqs = worker_requests(placement)
    return {"CPU": sum(c for _, c, _ in reqs), "GPU": sum(g for _, _, g in reqs)}


def check_resources(placement: PlacementConfig, available: dict[str, float],
                    nodes: list[dict[str, float]] | None = None) -> None:
    """Raise :class:`ConfigError` if the workers cannot all fit on the cluster as it is now
    (Ray would otherwise wait forever for the missing resources).  ``available``: the cluster's
    total resources; ``nodes``: each alive node's (a worker must fit on one node)."""
    need = placement_resources(placement)
    for kind, unit in (("CPU", "cpus"), ("GPU", "gpus")):
        have = available.get(kind, 0.0)
        if need[kind] > have + 1e-9:
            # name the field of the largest share of the request
            shares: dict[str, float] = {}
            for prefix, c, g in worker_requests(placement):
                name = _field(prefix, unit)
                shares[name] = shares.get(name, 0.0) + (c if kind == "CPU" else g)
            fields = [f for f, v in shares.items() if v > 0]
            raise ConfigError(
                f"{max(fields, key=lambda f: shares[f])}: placement.mode={placement.mode} asks "
                f"Ray for {need[kind]:g} {kind} (the cluster has {have:g}); lower "
                f"{', '.join(sorted(fields))} (fractions are allowed) or use a larger cluster")
    if nodes:
        for prefix, c, g in worker_requests(placement):
            if not any(c <= n.get("CPU", 0.0) + 1e-9 and g <= n.get("GPU", 0.0) + 1e-9
                       for n in nodes):
                field = _field(prefix, "cpus" if c else "gpus")
                raise ConfigError(f"{field}: one worker asks for {c:g} CPU and {g:g} GPU, more "
                                  "than any node of the cluster has")


def _probe_env(env_fn) -> dict[str, Any]:
    """Build a 1-env training env on a worker node: its spec (the simulator is there)."""
    import os
    import socket

    env = env_fn(num_envs=1)
    try:
        return {"action_dim": env.action_dim, "state_dim": env.state_dim,
                "tasks": len(env.task_names), "host": socket.gethostname(), "pid": os.getpid()}
    finally:
        close = getattr(env, "close", None)
        if close is not None:
            close()


def env_fn_of(cfg: Any):
    """``env_fn(num_envs=n)``: the config's training env, built on a worker (picklable)."""
    from pirl.envs import make_env

    kw = dict(cfg.env.kwargs)
    kw.setdefault("split", "train")
    return functools.partial(make_env, cfg.env.name, device="cpu", **kw)


def check_cluster(cfg: Any) -> dict[str, float]:
    """Check a :class:`~pirl.config.schema.TrainConfig` with a Ray placement against the
    cluster (see module docstring); returns the cluster's resources.  Connects to Ray (the
    trainer reuses the connection)."""
    pl: PlacementConfig = cfg.placement
    if pl.mode == "local":
        return {}
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"placement.mode: {pl.mode} runs on Ray, which is not installed: "
                          "pip install 'pirl[dist]'") from e
    try:
        pl.validate_for(cfg.env.num_envs)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    from pirl.runners.placement import connect

    try:
        resources = connect(pl.cluster, pl.ray_num_cpus)
    except Exception as e:  # noqa: BLE001 - any failure to reach the cluster
        where = pl.cluster or "local"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"placement.cluster: cannot reach the Ray cluster {where!r}: {first}"
                          ) from e
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check_resources(pl, resources, [n.get("Resources", {}) for n in nodes])
    # every node that can host a worker builds the training env once
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_env)
    env_fn = env_fn_of(cfg)
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(env_fn)
        for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0}
    for node, ref in refs.items():
        try:
            ray.get(ref, timeout=pl.startup_timeout_s)
        except ray.exceptions.TaskUnschedulableError:
            continue  # the node left the cluster since ray.nodes() (Ray marks it dead later)
        except Exception as e:  # noqa: BLE001 - the env's own error, whatever it is
            cause = getattr(e, "cause", None) or e
            msg = " ".join(str(cause).split())[:400]
            raise ConfigError(f"env.name: the Ray node {node} cannot build the training env "
                              f"{cfg.env.name!r}: {type(cause).__name__}: {msg}") from e
    return resources
