"""Scale-out: split-invariant sampling, staged / pipelined rollouts, Ray workers, DDP learner.

The no-Ray tests check the math that makes split placements reproduce a local run: chain noise
drawn for the full batch in the sampler's own order (replayed chains equal ``sampler.sample``
bit for bit), and staged collection equal to :func:`pirl.runners.rollout.collect`.  The Ray
tests start a 2-CPU local Ray once per module.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from pirl.envs.base import ChunkedEnv
from pirl.envs.tabletop import TabletopEnv
from pirl.flow import build_sampler
from pirl.models import build_policy
from pirl.runners.distributed import (EnvSlice, LocalStage, cat_rollouts, collect_staged,
                                      draw_chain_noise, sample_with_noise, slice_reset_kwargs)
from pirl.runners.rollout import collect

N = 6
IMG = 32


def make_env(n: int, max_steps: int = 12) -> TabletopEnv:
    return TabletopEnv(num_envs=n, image_size=IMG, max_episode_steps=max_steps)


def make_policy(env: TabletopEnv, seed: int = 0):
    torch.manual_seed(seed)
    vocab = sorted({w for s in env.instructions for w in s.split()})
    return build_policy("tiny", action_dim=3, state_dim=4, vocabulary=vocab, width=32, depth=1,
                        heads=2, image_size=IMG, action_horizon=4, conv_channels=[8, 8, 8])


def reset_kwargs(env, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"seed": seed, "task_ids": torch.randint(0, len(env.task_names), (env.num_envs,),
                                                    generator=g),
            "episode_seeds": 1000 + torch.arange(env.num_envs)}


SAMPLERS = [("flow_noise", {}), ("flow_sde", {}), ("flow_sde", {"shared_across_batch": False}),
            ("ode", {})]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    env = make_env(N)
    return env, make_policy(env).eval()


@pytest.mark.parametrize("kind,kw", SAMPLERS)
def test_replayed_chain_equals_sampler_sample_bitwise(setup, kind, kw):
    """Noise drawn in the sampler's order + replay == sampler.sample with the same generator."""
    env, policy = setup
    sampler = build_sampler(kind, num_steps=3, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim, **kw)
    obs = env.reset(**reset_kwargs(env))
    prefix = policy.encode_prefix({k: obs[k] for k in ("images", "state", "instruction")})
    with torch.no_grad():
        ref = sampler.sample(policy, prefix, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        noise = draw_chain_noise(sampler, policy, N, generator=g)
        got = sample_with_noise(sampler, policy, prefix, noise)
    for f in ("x", "mean", "std", "stochastic", "step_logp", "init_logp", "logp"):
        assert torch.equal(getattr(ref, f), getattr(got, f)), f
    # the generator is left where sampler.sample leaves it
    g_ref = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sampler.sample(policy, prefix, generator=g_ref)
    assert torch.equal(g.get_state(), g_ref.get_state())
    # rows sampled on their own get the same chain (up to batch-size float effects)
    with torch.no_grad():
        part = sample_with_noise(sampler, policy, policy.prefix_index(prefix, torch.arange(2, 5)),
                                 noise.rows(2, 5))
    torch.testing.assert_close(part.x, ref.x[2:5], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.logp, ref.logp[2:5], rtol=1e-5, atol=1e-4)


def _assert_rollouts_close(a, b, exact: bool = False):
    assert len(a.chains) == len(b.chains)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-4)
    for ca, cb in zip(a.chains, b.chains):
        for f in ("x", "logp", "std", "stochastic"):
            torch.testing.assert_close(getattr(ca, f), getattr(cb, f), **tol)
    for oa, ob in zip(a.obs, b.obs):
        assert oa["instruction"] == ob["instruction"]
        # actions differ by float rounding when batch sizes differ: states by as little
        torch.testing.assert_close(oa["state"], ob["state"], **tol)
        assert (oa["images"].int() - ob["images"].int()).abs().float().mean() < 0.5
    for f in ("rewards", "terminated", "truncated", "success", "valid"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    torch.testing.assert_close(a.values, b.values, **tol)
    torch.testing.assert_close(a.next_values, b.next_values, **tol)
    assert a.env_steps == b.env_steps


@pytest.mark.parametrize("bounds,num_chunks", [([(0, 6)], 3), ([(0, 3), (3, 6)], 3),
                                               ([(0, 2), (2, 4), (4, 6)], 6)])
def test_staged_collect_equals_local_collect(setup, bounds, num_chunks):
    """Envs split into stages (pipelined) give the local rollout; with num_chunks=6 every
    episode (12 steps = 4 chunks of 3) ends early, exercising the speculative last step."""
    env, policy = setup
    sampler = build_sampler("flow_sde", num_steps=3, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim, shared_across_batch=False)
    kw = reset_kwargs(env)
    g_local, g_staged = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = collect(policy, sampler, ChunkedEnv(env), num_chunks=num_chunks, reset_kwargs=kw,
                  action_chunk=3, generator=g_local)
    stages = [LocalStage(EnvSlice(make_env(b - a), a, b)) for a, b in bounds]
    got = collect_staged(policy, sampler, stages, num_envs=N, num_chunks=num_chunks,
                         reset_kwargs=kw, action_chunk=3, generator=g_staged)
    assert len(ref.chains) == min(num_chunks, 4)
    _assert_rollouts_close(ref, got, exact=len(bounds) == 1)
    # same generator position: the next iteration's noise is the same too
    assert torch.equal(g_local.get_state(), g_staged.get_state())


def test_slices_concatenate_to_full_rollout(setup):
    """Two processes each collecting their rows (colocated mode) == the full rollout."""
    env, policy = setup
    sampler = build_sampler("flow_noise", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    kw = reset_kwargs(env, seed=9)
    ref = collect(policy, sampler, ChunkedEnv(env), num_chunks=3, reset_kwargs=kw,
                  action_chunk=3, generator=torch.Generator().manual_seed(4))
    parts = [collect_staged(policy, sampler, [LocalStage(EnvSlice(make_env(b - a), a, b))],
                            num_envs=N, num_chunks=3, reset_kwargs=kw, action_chunk=3,
                            generator=torch.Generator().manual_seed(4))
             for a, b in [(0, 4), (4, 6)]]
    _assert_rollouts_close(ref, cat_rollouts(parts))


def test_slice_reset_kwargs_needs_episode_seeds():
    kw = {"seed": 1, "task_ids": torch.arange(4), "episode_seeds": torch.arange(4) + 10}
    s = slice_reset_kwargs(kw, 1, 3)
    assert s["task_ids"].tolist() == [1, 2] and s["episode_seeds"].tolist() == [11, 12]
    assert s["seed"] == 1 and kw["task_ids"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="episode_seeds"):
        slice_reset_kwargs({"seed": 1}, 0, 2)


# ============================================================================ Ray
try:
    import ray
except ImportError:  # the Ray tests skip without the `dist` extra; the tests above still run
    ray = None

from pirl.config.schema import RLConfig  # noqa: E402
from pirl.runners.distributed import DistributedTrainer, WorkerError  # noqa: E402
from pirl.runners.placement import LearnerPlacement, PlacementConfig, connect  # noqa: E402
from pirl.runners.rl import RLTrainer  # noqa: E402


# workers unpickle it by reference to pirl (this test module is not importable there)
env_fn = functools.partial(TabletopEnv, image_size=IMG, max_episode_steps=12)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray for this module (workers request fractions of a CPU)."""
    if ray is None:
        pytest.skip("Ray is not installed: pip install 'pirl[dist]'")
    connect("local", num_cpus=2)
    yield
    ray.shutdown()


def rl_parts(algo: str = "ppo", kind: str = "flow_noise"):
    env = make_env(N)
    policy = make_policy(env)
    sampler = build_sampler(kind, num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    cfg = RLConfig(algo=algo, iterations=3, action_chunk=3)
    cfg.ppo.num_minibatches = cfg.grpo.num_minibatches = 3
    cfg.ppo.update_epochs = cfg.grpo.update_epochs = 2
    cfg.grpo.group_size = 2
    return env, policy, sampler, cfg


def placement(mode: str, ranks: int = 2, **kw) -> PlacementConfig:
    base = dict(env_workers=2, pipeline_stages=2, env_cpus=0.2, rollout_cpus=0.2, threads=1)
    base.update(kw)
    learner = LearnerPlacement(ranks=ranks, cpus=0.2, **base.pop("learner", {}))
    return PlacementConfig(mode=mode, learner=learner, **base)


def run_local(iters: int, algo: str = "ppo"):
    env, policy, sampler, cfg = rl_parts(algo)
    tr = RLTrainer(policy, sampler, env, cfg, seed=0)
    return [tr.iteration() for _ in range(iters)], policy, tr


def assert_same_curve(ref_metrics, metrics, ref_policy, policy, atol=1e-4):
    for a, b in zip(ref_metrics, metrics):
        for k in ("rollout/return", "rollout/success", "rollout/episode_chunks", "env_steps"):
            assert a[k] == b[k], k
        for k in ("policy/loss", "policy/approx_kl", "rollout/noise_std"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=atol), k
    ref_sd, sd = ref_policy.state_dict(), policy.state_dict()
    assert max(float((ref_sd[k] - sd[k]).abs().max()) for k in ref_sd) < atol


def test_disaggregated_matches_local_and_dead_env_worker_fails(ray_local):
    """2 env workers (pipelined, 2 stages) + rollout worker + 1 learner rank: the rollout data
    and the first update equal the local run's; then an env worker killed with SIGKILL makes
    the next iteration fail naming it, with nothing trained on partial data."""
    ref_metrics, ref_policy, _ = run_local(1)
    env, policy, sampler, cfg = rl_parts()
    # the local rollout of iteration 0 (a fresh trainer with the same seed)
    local = RLTrainer(*rl_parts()[1:3], env, cfg, seed=0).rollout()
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, placement("disaggregated", ranks=1),
                            env_fn)
    try:
        start = ray.get(tr.rollout_workers[0].rollout_state.remote())
        payload = ray.get(tr.rollout_workers[0].rollout.remote())
        _assert_rollouts_close(local, payload["rollout"])
        # rewind the rollout worker (iteration counter and noise stream) and train for real
        ray.get(tr.rollout_workers[0].load_rollout_state.remote(start))
        metrics = [tr.iteration()]
        assert_same_curve(ref_metrics, metrics, ref_policy, policy)

        before = {k: v.clone() for k, v in policy.state_dict().items()}
        pids = tr.worker_pids()
        os.kill(pids["env worker 1 (envs [3, 6))"], 9)
        with pytest.raises(WorkerError, match=r"env worker 1 \(envs \[3, 6\)\) died"):
            tr.iteration()
        assert tr.iter == 1
        assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    finally:
        tr.close(keep_state=False)


TWO_ROLLOUT_WORKERS = {"rollout_workers": 2, "pipeline_stages": 1}


@pytest.mark.slow
@pytest.mark.parametrize("mode,algo,fsdp,extra", [("colocated", "ppo", False, {}),
                                                  ("disaggregated", "ppo", False, {}),
                                                  ("colocated", "grpo", False, {}),
                                                  ("disaggregated", "grpo", False, {}),
                                                  ("colocated", "ppo", True, {}),
                                                  ("disaggregated", "ppo", True, {}),
                                                  ("disaggregated", "ppo", False,
                                                   TWO_ROLLOUT_WORKERS)],
                         ids=["colocated-ddp", "disaggregated-ddp", "colocated-grpo",
                              "disaggregated-grpo", "colocated-fsdp", "disaggregated-fsdp",
                              "disaggregated-2-rollout-workers"])
def test_learning_curve_matches_local(ray_local, mode, algo, fsdp, extra):
    """3 iterations with 2 gloo learner ranks (DDP or FSDP2) == the local run: same rollout
    returns / episode lengths, same losses and KL, same final weights (float tolerance).
    Disaggregated: 2 env workers in 2 pipeline stages, or 2 rollout workers (1 env worker
    each)."""
    ref_metrics, ref_policy, _ = run_local(3, algo)
    env, policy, sampler, cfg = rl_parts(algo)
    tr = DistributedTrainer(policy, sampler, env, cfg, 0,
                            placement(mode, ranks=2, learner={"fsdp": fsdp}, **extra), env_fn)
    try:
        metrics = [tr.iteration() for _ in range(3)]
        sd = tr.state_dict()
    finally:
        tr.close(keep_state=False)
    assert_same_curve(ref_metrics, metrics, ref_policy, policy)
    assert sd["iter"] == 3 and sd["env_steps"] == ref_metrics[-1]["env_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_trainer_state_resumes(ray_local, fsdp):
    """Stop after 2 iterations, resume from the trainer state (optimizer, generators, counters)
    and the driver's synced weights: the 3rd iteration equals an uninterrupted local run's.
    DDP state has the local layout, so a local trainer resumes it; FSDP2 state resumes under
    FSDP2 (and a local trainer refuses it with a clear error)."""
    ref_metrics, ref_policy, _ = run_local(3)
    env, policy, sampler, cfg = rl_parts()
    pl = placement("colocated", learner={"fsdp": fsdp})
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn)
    try:
        [tr.iteration() for _ in range(2)]
        sd = tr.state_dict()
    finally:
        tr.close(keep_state=False)
    if not fsdp:
        resumed = RLTrainer(policy, sampler, env, cfg, seed=0)
        resumed.load_state_dict(sd)
        m = resumed.iteration()
    else:
        assert sd["optimizer_format"] == "fsdp-full"
        with pytest.raises(ValueError, match="FSDP"):
            from pirl.runners.distributed import DataParallelRLTrainer
            DataParallelRLTrainer(policy, sampler, env, cfg, seed=0).load_state_dict(sd)
        resumed = DistributedTrainer(policy, sampler, env, cfg, 0, pl, env_fn)
        try:
            resumed.load_state_dict(sd)
            m = resumed.iteration()
        finally:
            resumed.close(keep_state=False)
    assert_same_curve(ref_metrics[2:], [m], ref_policy, policy)


@pytest.mark.slow
def test_dead_learner_rank_fails_fast(ray_local):
    """A learner rank killed between iterations: the next iteration raises WorkerError naming
    it (instead of the surviving rank waiting in a collective)."""
    env, policy, sampler, cfg = rl_parts()
    tr = DistributedTrainer(policy, sampler, env, cfg, 0, placement("colocated"), env_fn)
    try:
        tr.iteration()
        ray.kill(tr.learners[1])
        with pytest.raises(WorkerError, match=r"colocated worker 1 .* died"):
            tr.iteration()
        assert tr.iter == 1
    finally:
        tr.close(keep_state=False)


def test_trainer_from_config_local_is_rl_trainer():
    """placement.mode=local (the default) keeps the one-process RLTrainer."""
    from pirl.config.schema import TrainConfig
    from pirl.runners.distributed import trainer_from_config

    env, policy, sampler, cfg = rl_parts()
    tc = TrainConfig(rl=cfg)
    assert tc.placement.mode == "local"
    tr = trainer_from_config(tc, policy, sampler, env)
    assert type(tr) is RLTrainer


@pytest.mark.slow
def test_pirl_run_disaggregated_end_to_end(ray_local, tmp_path):
    """The whole recipe (demos -> SFT -> RL -> eval) with placement.mode=disaggregated: the
    run folder, metrics and a final checkpoint whose trainer state has the local layout."""
    from pirl.runners.checkpoint import load_checkpoint
    from pirl.config.schema import (DemoConfig, EnvConfig, EvalConfig, ModelConfig,
                                     PretrainConfig, SFTConfig, TrainConfig)
    from pirl.runners.train import run

    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"), progress=False,
        env=EnvConfig(num_envs=4, kwargs={"image_size": IMG, "max_episode_steps": 12}),
        model=ModelConfig(kwargs={"width": 32, "depth": 1, "heads": 2, "action_horizon": 4,
                                  "conv_channels": [8, 8, 8]}),
        pretrain=PretrainConfig(steps=0), sft=SFTConfig(steps=3),
        demos=DemoConfig(episodes_per_task=1),
        rl=RLConfig(iterations=2, action_chunk=3),
        eval=EvalConfig(episodes_per_task=1, num_envs=8, videos=0, splits=["train"]),
        placement=placement("disaggregated", ranks=2))
    res = run(cfg)
    assert set(res) >= {"sft", "final"}
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["stage"] == "done" and state["trainer"]["iter"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("rollout/success") == 2


def test_pipeline_schedule_overlaps_env_and_inference(setup):
    """The pipelined schedule: at every chunk step, stage 1 is inferred after stage 0's chunk
    was submitted and before stage 0's result is awaited (with remote stages, stage 0's envs
    step meanwhile), and the next step's stage 0 is inferred before stage 1's result is
    awaited."""
    env, policy = setup
    sampler = build_sampler("flow_noise", num_steps=2, feature_dim=policy.feature_dim,
                            action_dim=policy.action_dim)
    log: list[tuple[str, int]] = []

    class Recording(LocalStage):
        def __init__(self, idx, a, b):
            super().__init__(EnvSlice(make_env(b - a), a, b))
            self.idx = idx

        def submit_step(self, actions):
            log.append(("submit", self.idx))
            return super().submit_step(actions)

        def wait(self, handle):
            log.append(("wait", self.idx))
            return super().wait(handle)

    class Spy(torch.nn.Module):
        """The policy, logging which stage (by batch size: 2 or 4 rows) each inference is for."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            if name == "inner":
                return super().__getattr__(name)
            return getattr(self.inner, name)

        def encode_prefix(self, obs):
            log.append(("infer", {2: 0, 4: 1}[obs["state"].shape[0]]))
            return self.inner.encode_prefix(obs)

    collect_staged(Spy(policy), sampler, [Recording(0, 0, 2), Recording(1, 2, 6)],
                   num_envs=N, num_chunks=2, reset_kwargs=reset_kwargs(env), action_chunk=3,
                   with_values=False, generator=torch.Generator().manual_seed(0))
    step = [("wait", 0), ("infer", 0), ("submit", 0), ("wait", 1), ("infer", 1), ("submit", 1)]
    assert log == step * 2 + [("wait", 0), ("wait", 1)]
