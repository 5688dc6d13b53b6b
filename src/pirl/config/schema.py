"""The configuration of a pirl run (``pirl train``): typed dataclasses, YAML presets, overrides.

Sections: ``env`` (which batched env, how many in parallel), ``model`` (which policy and its
kwargs), ``sampler`` (ODE / Flow-Noise / Flow-SDE), ``pretrain`` (grounding pretraining of the
tiny VLA's prefix on the tabletop, on by default; other envs and models set ``pretrain.steps=0``),
``demos`` + ``sft`` (few-shot SFT), ``rl`` (PPO or GRPO), ``eval`` and the run-level fields.
Every section validates itself in ``__post_init__``; errors name the field (see
:mod:`pirl.config.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pirl.algos.grpo import GRPOConfig
from pirl.algos.ppo import LRSchedule, PPOConfig
from pirl.envs import env_key
from pirl.flow import SamplerConfig
from pirl.runners.placement import PlacementConfig


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _default_env_kwargs() -> dict[str, Any]:
    # The default recipe runs the tabletop without distractor objects (with 1 or 2 the few-shot
    # tiny VLA starts at ~6%) and with the gripper-centred wrist camera besides the top view, as
    # pi0 on LIBERO: train / OOD success of the default job went from 46.1% / 45.8% (SFT) and
    # 60.9% / 55.7% (after RL) with the top camera only to 68.8% / 63.3% and 79.7% / 72.7%
    # (README; pick-and-place SFT 29% -> 67%)
    return {"num_distractors": 0, "num_cameras": 2}


@dataclass
class EnvConfig:
    """Training environment: ``pirl.envs.make_env(name, num_envs, **kwargs)``."""

    name: str = "tabletop"
    # 512: with 64-128 envs per iteration PPO did not move the multitask tabletop policy, and
    # 512 envs x 20 iterations ended 3.6 points above 256 x 40 for the same env steps from one
    # start (93.4% against 89.8% / 90.1%; the default job 59.9% -> 92.5% against 87.4%; README,
    # session 25): late in training few rollout episodes fail, and only those carry a gradient
    num_envs: int = 512
    kwargs: dict[str, Any] = field(default_factory=_default_env_kwargs)

    def __post_init__(self):
        _check(self.num_envs >= 1, "env.num_envs", f"must be >= 1, got {self.num_envs}")


@dataclass
class ModelConfig:
    """Policy: ``pirl.models.build_policy(name, **kwargs)``; ``checkpoint`` loads weights."""

    name: str = "tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class DemoConfig:
    """Scripted-expert demos for few-shot SFT (generated once per run folder)."""

    # 6 (random-init prefix, 1000 SFT steps, rl.action_chunk=4: 8 demos per task start SFT at
    # 76.7%, 6 at 66.8%, 4 at 45.0% train).  With the grounding-pretrained prefix 6 demos reach
    # 92.5% in 1000 steps, 57.0% in the default 500 (README, sessions 16-17)
    episodes_per_task: int = 6
    noise: float = 0.1
    seed: int = 12345
    path: str | None = None  # an existing demo folder; None = generate into RUN/demos

    def __post_init__(self):
        _check(self.episodes_per_task >= 1, "demos.episodes_per_task", "must be >= 1")
        _check(self.noise >= 0, "demos.noise", "must be >= 0")


@dataclass
class PretrainConfig:
    """Grounding pretraining of the prefix before SFT (:mod:`pirl.algos.pretrain`; the tiny
    VLA's stand-in for pi0's pretrained VLM): ``steps`` > 0 turns it on.  The env (``split``,
    ``num_envs`` parallel copies of the training env) is driven by its scripted controller with
    action noise ``noise``; the prefix learns to localise the instruction's object and place and
    the gripper.  Needs an env with ``scene_points()`` and a scripted expert (the tabletop)."""

    # 2000 (on by default; 0 turns it off): 6-demo few-shot SFT then reaches 92.5% train in
    # 1000 steps where the random-init prefix reached 66.8%, and PPO from the pretrained
    # in-band default start ended at 86.4% where the random-init default's ended at 82.7%
    # (README, sessions 16-17); 605-654 s on one core, ~390 s on two.  4000 steps (with
    # relative=4) lower every grounding error; with 400 SFT steps (start 70.1%) the frozen
    # prefix's supervised cap is 96.4%; PPO from it ended at 89.8% / 90.1% with 256 envs x 40
    # iterations (sessions 22-24), at 95.7% / 91.7% with 512 x 40 (session 25, seeds 0 / 1)
    # and at 96.0% / 94.6% / 95.8% with 512 x 60 (session 26, seeds 0-2), the tabletop_headline
    # preset; 2000 stays the default for the job's time (README)
    steps: int = 2000
    num_envs: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    noise: float = 0.5
    split: str = "train"
    seed: int = 777
    # > 0: a fourth grounding target, the object's offset from the gripper squashed as
    # tanh(relative * offset) per coordinate (pirl.algos.pretrain.with_relative_offset): the
    # relation a push needs most precisely near contact, where tanh is steepest.  0: off.
    # 4 (default since session 21): the expert on the frozen prefix of the 500-step SFT start,
    # supervised with 24 demos per task, reached push 92.4% where the prefix pretrained without
    # it held push at 75.7%, and PPO + Flow-SDE from that in-band start (61.3%) ended at 94.8%,
    # 87.3% and 91.0% train over three RL seeds (mean 91.0%, the old start's three: 84.3%;
    # README, session 21)
    relative: float = 4.0

    def __post_init__(self):
        _check(self.steps >= 0, "pretrain.steps", "must be >= 0")
        _check(self.relative >= 0, "pretrain.relative", f"must be >= 0, got {self.relative}")
        _check(self.num_envs >= 1, "pretrain.num_envs", "must be >= 1")
        _check(self.lr > 0, "pretrain.lr", f"must be > 0, got {self.lr}")
        _check(self.noise >= 0, "pretrain.noise", "must be >= 0")


@dataclass
class SFTConfig:
    """Few-shot flow-matching SFT (the RL starting point)."""

    # 500 from the grounding-pretrained prefix with 6 demos per task: the default job started at
    # 57.0% / 58.9% train / OOD and PPO took it to 86.4% / 85.2% (400 steps: 48.4% -> 75.1%;
    # 1000: 92.5%, above the few-shot 20-70% band; README, session 17)
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 100
    # parameters kept fixed during SFT: "prefix" (every prefix / VLM parameter, as RL's
    # expert_only mode freezes them) or leading parts of parameter names ("image_encoder");
    # [] trains everything.  A diagnostic: with model.checkpoint it asks how far the expert
    # gets on a given prefix (README, session 15)
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check(self.steps >= 0, "sft.steps", "must be >= 0")
        _check(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        _check(self.lr > 0, "sft.lr", f"must be > 0, got {self.lr}")


@dataclass
class RLConfig:
    """Online RL: PPO (with critic, GAE at chunk level) or GRPO (group-relative, no critic)."""

    algo: Literal["ppo", "grpo"] = "ppo"
    # 20 at 512 envs (env.num_envs): the env steps of 40 at 256 (session 25).  A cosine-decayed
    # lr: measured better than 80 iterations at a constant lr, which peaked at iteration 20 and
    # fell back (README: final 62.9% / 57.6% vs 51.1% / 44.0% train / OOD)
    iterations: int = 20
    action_chunk: int | None = None  # executed steps of each predicted chunk (None: all H)
    max_chunks: int | None = None  # chunk steps per episode (None: ceil(max_episode_steps/chunk))
    # policy lr 3e-4: the best measured on the tabletop with Flow-SDE (README); Flow-Noise's
    # chain drifted at that rate (KL up to 0.5 per iteration): use 1e-4 or less with it
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(lr_policy=3e-4,
                                                             lr_schedule="cosine"))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_every: int = 20
    reward: Literal["env", "success"] = "env"
    # "expert_only": the prefix (VLM) is frozen during RL, as in pi_RL; "full": everything trains
    train_mode: Literal["full", "expert_only"] = "expert_only"
    # expert_only: keep each rollout step's frozen prefix cache (policy.frozen_prefix) and reuse
    # it in every update epoch instead of re-encoding the observations (same numbers, faster)
    reuse_prefix: bool = True
    # which task each env runs: "uniform", or "failure": a share task_sampling_mix of the envs
    # draws tasks in proportion to their estimated failure rate (decayed per-task counts of the
    # rollout episodes, factor task_sampling_decay per iteration; pirl.runners.curriculum)
    task_sampling: Literal["uniform", "failure"] = "uniform"
    task_sampling_mix: float = 0.5
    task_sampling_decay: float = 0.8
    # the sampler's noise over the iterations: its std is multiplied by a factor that goes from
    # 1 at the first iteration towards noise_final at the end ("linear" / "cosine", the lr
    # schedules' shapes, pirl.algos.ppo.lr_scale; "constant": always 1).  Set before each
    # rollout, so that the rollout and its update use the same noise (local placement only).
    # Measured from the default's start
    # (cosine to 0.25): 82.1% / 84.9% train at iterations 20 / 40 against the constant noise's
    # 80.7% / 85.9% (OOD 69.8% against 78.6% at 40; README, session 18), so it is off by default
    noise_schedule: LRSchedule = "constant"
    noise_final: float = 1.0
    # failure replay (PPO, local placement): a share replay_failures of the envs restarts from
    # the initial states (task id + episode seed) of recently failed rollout episodes, kept in a
    # buffer of the newest replay_capacity failures (pirl.runners.curriculum.FailureReplay); the
    # task curriculum counts only the fresh episodes.  0: off.  Measured at 0.5 from the
    # default's start: 86.1% / 79.2% at iteration 40 against 85.9% / 78.6% without it (push up,
    # pick-and-place down; README, session 19), so it is off by default
    replay_failures: float = 0.0
    replay_capacity: int = 512
    # demo-augmented RL (PPO-ptx / DAPG style): bc_coef weights a flow-matching loss on a
    # minibatch of bc_batch_size (observation, action chunk) pairs of the run's few-shot SFT
    # demos, added to every PPO / GRPO minibatch loss (local placement).  0: off, plain RL.
    # Measured from the default's start (README, session 20): 0.2 ended level with plain PPO
    # (86.5% / 78.6% against 85.9% / 78.6% at iteration 40), 1.0 lower (79.3% / 74.5%; the
    # demo term then makes most of the gradient), so it is off by default
    bc_coef: float = 0.0
    bc_batch_size: int = 64

    def __post_init__(self):
        _check(self.iterations >= 0, "rl.iterations", "must be >= 0")
        _check(self.task_sampling in ("uniform", "failure"), "rl.task_sampling",
               f"must be 'uniform' or 'failure', got {self.task_sampling!r}")
        _check(0.0 <= self.task_sampling_mix <= 1.0, "rl.task_sampling_mix",
               f"must be in [0, 1], got {self.task_sampling_mix}")
        _check(0.0 < self.task_sampling_decay <= 1.0, "rl.task_sampling_decay",
               f"must be in (0, 1], got {self.task_sampling_decay}")
        _check(self.noise_schedule in ("constant", "cosine", "linear"), "rl.noise_schedule",
               f"must be 'constant', 'cosine' or 'linear', got {self.noise_schedule!r}")
        _check(self.noise_final > 0, "rl.noise_final", f"must be > 0, got {self.noise_final}")
        _check(0.0 <= self.replay_failures < 1.0, "rl.replay_failures",
               f"must be in [0, 1), got {self.replay_failures}")
        _check(self.replay_capacity >= 1, "rl.replay_capacity",
               f"must be >= 1, got {self.replay_capacity}")
        _check(self.replay_failures == 0 or self.algo == "ppo", "rl.replay_failures",
               "replaying failed states needs rl.algo=ppo (GRPO draws its own groups of seeds)")
        _check(self.bc_coef >= 0, "rl.bc_coef", f"must be >= 0, got {self.bc_coef}")
        _check(self.bc_batch_size >= 1, "rl.bc_batch_size",
               f"must be >= 1, got {self.bc_batch_size}")
        _check(self.action_chunk is None or self.action_chunk >= 1, "rl.action_chunk",
               "must be >= 1")
        _check(self.eval_every >= 1, "rl.eval_every", "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation with deterministic ODE sampling, per task and per split."""

    episodes_per_task: int = 16
    num_envs: int = 128
    splits: list[str] = field(default_factory=lambda: ["train", "ood"])
    num_steps: int | None = None  # denoise steps at eval (None: sampler.num_steps)
    videos: int = 8  # episodes recorded into a video grid at each final eval (0: none)
    # executed steps of each predicted chunk at evaluation, i.e. how often the policy re-plans
    # (None: rl.action_chunk, the rollouts' own); an episode gets ceil(max_episode_steps /
    # action_chunk) chunk steps.  Re-planning more often than in training is a deployment
    # choice (openpi / LeRobot's n_action_steps); evaluate the start and the end alike
    action_chunk: int | None = None

    def __post_init__(self):
        _check(self.episodes_per_task >= 1, "eval.episodes_per_task", "must be >= 1")
        _check(self.num_envs >= 1, "eval.num_envs", "must be >= 1")
        _check(self.action_chunk is None or self.action_chunk >= 1, "eval.action_chunk",
               f"must be >= 1 or null, got {self.action_chunk}")


@dataclass
class TrainConfig:
    """A whole pirl run: demos -> few-shot SFT -> online RL -> evaluation."""

    seed: int = 0
    run_dir: str | None = None  # None: runs/<timestamp>
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # hybrid Flow-SDE (RLinf's pi0 / LIBERO default): measured to learn on the tabletop, and its
    # update re-evaluates one denoise step (Flow-Noise: all K)
    # noise level 1.0 (RLinf: 0.5): with rl.action_chunk=4, PPO from two SFT checkpoints ended
    # 1.2 and 4.3 points higher after 40 iterations (6.4 and 3.6 at iteration 10); with whole
    # chunks executed it ended 4.5 points lower (README)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="flow_sde",
                                                                         noise_level=1.0))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    # action_chunk=4: the policy re-plans after 4 of its 8 predicted steps.  From one few-shot
    # SFT checkpoint (8 demos per task) ODE success was 63.5% executing all 8, 76.7% executing
    # 4 and 77.8% executing 2 (train; OOD 63.0 / 74.0 / 67.2%), and PPO from it went further
    # (README); 2 doubled the policy calls for nothing more at that start.  In RL it pays:
    # from session 27's 57.3% start, PPO re-planning every 2 read 96.2% at iteration 20 against
    # 85.4% re-planning every 4 (push stalled at ~90%), at ~2x the iteration's cost, so
    # tabletop_headline re-plans every 2 (session 28); the default job keeps 4 for its time
    # and its start (76.6% re-planning every 2, above the few-shot band; README)
    # task_sampling="failure": 3.8 / 4.6 points above uniform at iteration 40 from the random-init
    # 6-demo start (session 14); every pretrained-start run since used it (sessions 16-17)
    rl: RLConfig = field(default_factory=lambda: RLConfig(action_chunk=4,
                                                          task_sampling="failure"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # local / Ray placements
    checkpoint_every: int = 10
    progress: bool = True

    def __post_init__(self):
        _check(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "device",
               f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.rl.noise_schedule == "constant" or self.placement.mode == "local",
               "rl.noise_schedule", f"a noise schedule needs placement.mode=local (the rollout "
               f"workers of {self.placement.mode!r} keep their own sampler copies)")
        _check(self.rl.replay_failures == 0 or self.placement.mode == "local",
               "rl.replay_failures", f"failure replay needs placement.mode=local (the rollout "
               f"workers of {self.placement.mode!r} draw their own resets)")
        _check(self.rl.bc_coef == 0 or self.placement.mode == "local", "rl.bc_coef",
               f"the demo loss needs placement.mode=local (the learner ranks of "
               f"{self.placement.mode!r} do not hold the demos)")
        if self.pretrain.steps > 0 and not self.model.checkpoint:
            _check(env_key(self.env.name) == "tabletop" and self.model.name == "tiny",
                   "pretrain.steps", f"grounding pretraining (on by default) is the tiny VLA's "
                   f"stand-in for a pretrained VLM on the tabletop; with env {self.env.name!r} "
                   f"and model {self.model.name!r} set pretrain.steps=0")
