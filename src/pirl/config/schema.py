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
from pirl.runners.self_imitation import BufferKeep


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _default_env_kwargs() -> dict[str, Any]:
    # no distractors (with 1 or 2 the few-shot tiny VLA starts at ~6%) and a wrist camera beside
    # the top view, as pi0 gets on LIBERO: it lifted the default job's SFT start from 46% to 69%
    # (docs/experiments.md#2026-11-25--wrist-camera-default-the-95-target-not-reached)
    return {"num_distractors": 0, "num_cameras": 2}


@dataclass
class EnvConfig:
    """Training environment: ``pirl.envs.make_env(name, num_envs, **kwargs)``."""

    name: str = "tabletop"
    # 512: late in training few rollout episodes fail and only those carry a gradient; 512 x 20
    # iterations ended 3.6 points above 256 x 40 for the same env steps
    # (docs/experiments.md#2026-12-04--512-envs-per-ppo-iteration-from-the-701-start)
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

    # 6: with the default's 500 SFT steps the start lies in the few-shot 20-70% band (57-64%);
    # 1000 steps on the same demos reach 92.5%
    # (docs/experiments.md#2026-12-01--an-in-band-start-by-a-shorter-sft-from-the-pretrained-prefix)
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

    # 2000 (0: off), the stand-in for a pretrained VLM: it lifts what RL from a few-shot start
    # reaches; ~6 min on 2 cores (docs/experiments.md#2026-12-01--grounding-pretraining-of-the-prefix).
    # tabletop_headline's 4000 sharpen the prefix further; 2000 keeps the default job short
    # (docs/experiments.md#2026-12-04--longer-grounding-pretraining-the-prefix-cap-follows-the-sft-length)
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
    # 4: it lifts the frozen prefix's cap on push from 75.7% to 92.4% and the mean end of RL
    # over three seeds from 84.3% to 91.0%
    # (docs/experiments.md#2026-12-03--frozen-prefix-cap-and-the-relational-pretraining-target)
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

    # 500: a start in the few-shot 20-70% band from the pretrained prefix (400 steps start
    # lower and end lower; 1000 start above the band)
    # (docs/experiments.md#2026-12-01--an-in-band-start-by-a-shorter-sft-from-the-pretrained-prefix)
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 100
    # parameters kept fixed during SFT: "prefix" (every prefix / VLM parameter, as RL's
    # expert_only mode freezes them) or leading parts of parameter names ("image_encoder");
    # [] trains everything.  A diagnostic: with model.checkpoint it asks how far the expert
    # gets on a given prefix
    # (docs/experiments.md#2026-12-01--why-rl-stops-at-85-the-frozen-few-shot-prefix)
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check(self.steps >= 0, "sft.steps", "must be >= 0")
        _check(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        _check(self.lr > 0, "sft.lr", f"must be > 0, got {self.lr}")


@dataclass
class RLConfig:
    """Online RL: PPO (with critic, GAE at chunk level) or GRPO (group-relative, no critic)."""

    algo: Literal["ppo", "grpo"] = "ppo"
    # 20 at 512 envs: the env steps of 40 at 256
    # (docs/experiments.md#2026-12-04--512-envs-per-ppo-iteration-from-the-701-start).  The lr
    # decays (cosine, below): a constant lr peaked at iteration 20 and fell back
    # (docs/experiments.md#2026-11-25--top-camera-film-default-rl-variants-and-longer-training)
    iterations: int = 20
    action_chunk: int | None = None  # executed steps of each predicted chunk (None: all H)
    max_chunks: int | None = None  # chunk steps per episode (None: ceil(max_episode_steps/chunk))
    # policy lr 3e-4: the best measured on the tabletop with Flow-SDE (1e-3 did worse); Flow-Noise
    # drifts at that rate: use 1e-4 with it
    # (docs/experiments.md#2026-11-25--top-camera-film-default-rl-variants-and-longer-training)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(lr_policy=3e-4,
                                                             lr_schedule="cosine"))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_every: int = 20
    # rollouts collected (each with fresh episode seeds) before one update on all of them, RLinf's
    # rollout epochs: more episodes per update on the same envs and memory, for benchmarks whose
    # envs are few and costly (LIBERO, Meta-World).  An iteration = these rollouts + one update
    rollouts_per_update: int = 1
    reward: Literal["env", "success"] = "env"
    # "expert_only": the prefix (VLM) is frozen during RL, as in pi_RL; "full": everything trains
    train_mode: Literal["full", "expert_only"] = "expert_only"
    # expert_only: keep each rollout step's frozen prefix cache (policy.frozen_prefix) and reuse
    # it in every update epoch instead of re-encoding the observations (same numbers, faster)
    reuse_prefix: bool = True
    # which task each env runs: "uniform", or "failure": a share task_sampling_mix of the envs
    # draws tasks in proportion to their estimated failure rate (decayed per-task counts of the
    # rollout episodes, factor task_sampling_decay per iteration; pirl.runners.curriculum), or
    # "round_robin": env i always runs task i mod T (an env that rebuilds its simulation when
    # its task changes, LIBERO, builds it once; every task gets the same number of episodes;
    # GRPO: group g of rl.grpo.group_size envs always runs task g mod T)
    task_sampling: Literal["uniform", "failure", "round_robin"] = "uniform"
    task_sampling_mix: float = 0.5
    task_sampling_decay: float = 0.8
    # the sampler's noise over the iterations: its std is multiplied by a factor that goes from
    # 1 at the first iteration towards noise_final at the end ("linear" / "cosine", the lr
    # schedules' shapes, pirl.algos.ppo.lr_scale; "constant": always 1).  Set before each
    # rollout, so that the rollout and its update use the same noise.
    # Measured from the default's start
    # (cosine to 0.25): level with the constant noise in-distribution, lower OOD, so it is off
    # by default (docs/experiments.md#2026-12-01--more-rl-levers-from-the-in-band-default-start)
    noise_schedule: LRSchedule = "constant"
    noise_final: float = 1.0
    # failure replay (PPO): a share replay_failures of the envs restarts from
    # the initial states (task id + episode seed) of recently failed rollout episodes, kept in a
    # buffer of the newest replay_capacity failures (pirl.runners.curriculum.FailureReplay); the
    # task curriculum counts only the fresh episodes.  0: off.  Measured at 0.5 from the
    # default's start: level with plain PPO (86.1% against 85.9% at iteration 40), so it is off
    # (docs/experiments.md#2026-12-02--failure-replay-a-shorter-discount-and-the-push-failure-traced)
    replay_failures: float = 0.0
    replay_capacity: int = 512
    # demo-augmented RL (PPO-ptx / DAPG style): bc_coef weights a flow-matching loss on a
    # minibatch of bc_batch_size (observation, action chunk) pairs of the run's few-shot SFT
    # demos, added to every PPO / GRPO minibatch loss.  0: off, plain RL.
    # From the default's start 0.2 ended level with plain PPO and 1.0 lower (the demo term then
    # makes most of the gradient), so it is off by default
    # (docs/experiments.md#2026-12-02--demos-in-the-rl-loss-critic-variants-80-iterations-rl-seeds)
    bc_coef: float = 0.0
    bc_batch_size: int = 64
    # self-imitation (ppo.sil_coef / grpo.sil_coef > 0) from a buffer of the newest
    # sil_buffer_per_task successful rollout episodes of every task, sil_batch_size chunk steps
    # per minibatch drawn task-balanced (pirl.runners.self_imitation.SuccessBuffer); 0: the
    # self-imitation term uses the current rollout's successful episodes only
    sil_buffer_per_task: int = 0
    sil_batch_size: int = 64
    # which episodes a full task keeps: its newest successes, or its shortest (the fewest chunk
    # steps; a success that wandered to the time limit is a poor demo)
    sil_buffer_keep: BufferKeep = "newest"
    # and / or sil_steps supervised flow-matching steps per iteration on the buffer alone, after
    # the policy update, with their own Adam at sil_lr over the actor (not the critic or the
    # noise net): the buffer fitted at SFT's pace, where inside the PPO minibatches the term
    # moves at the policy lr (0: off)
    sil_steps: int = 0
    sil_lr: float = 1e-3
    # hindsight relabelling: each failed episode of a task whose goal is a free point (the env's
    # hindsight_episode; Meta-World's reach / push / pick-place tasks) also enters the buffer as
    # the success it is for the goal where its hand / object went, replayed in the simulator
    sil_hindsight: bool = False
    # envs with fixed initial states (LIBERO: 50 per task): the ones RL's rollouts start from
    # (None: all of them).  LIBERO's protocol trains and evaluates on the same fixed states
    # (RLinf resets to them); evaluation's k-th episode of a task starts from state k, so
    # [0, ..., 9] are the states of a 10-episode-per-task evaluation
    init_states: list[int] | None = None

    def __post_init__(self):
        _check(self.iterations >= 0, "rl.iterations", "must be >= 0")
        _check(self.task_sampling in ("uniform", "failure", "round_robin"), "rl.task_sampling",
               f"must be 'uniform', 'failure' or 'round_robin', got {self.task_sampling!r}")
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
        _check(self.sil_buffer_per_task >= 0, "rl.sil_buffer_per_task",
               f"must be >= 0, got {self.sil_buffer_per_task}")
        _check(self.sil_batch_size >= 1, "rl.sil_batch_size",
               f"must be >= 1, got {self.sil_batch_size}")
        _check(self.sil_steps >= 0, "rl.sil_steps", f"must be >= 0, got {self.sil_steps}")
        _check(self.sil_steps == 0 or self.sil_buffer_per_task > 0, "rl.sil_steps",
               "self-imitation steps need the success buffer (rl.sil_buffer_per_task > 0)")
        _check(self.sil_lr > 0, "rl.sil_lr", f"must be > 0, got {self.sil_lr}")
        _check(not self.sil_hindsight or self.sil_buffer_per_task > 0, "rl.sil_hindsight",
               "relabelled episodes go to the success buffer (rl.sil_buffer_per_task > 0)")
        _check(self.init_states is None or (len(self.init_states) > 0
                                            and min(self.init_states) >= 0),
               "rl.init_states", f"must be a non-empty list of indices >= 0, got "
               f"{self.init_states}")
        _check(self.action_chunk is None or self.action_chunk >= 1, "rl.action_chunk",
               "must be >= 1")
        _check(self.eval_every >= 1, "rl.eval_every", "must be >= 1")
        _check(self.rollouts_per_update >= 1, "rl.rollouts_per_update",
               f"must be >= 1, got {self.rollouts_per_update}")


@dataclass
class EvalConfig:
    """Evaluation with deterministic ODE sampling, per task and per split."""

    episodes_per_task: int = 16
    # episodes per task of the evaluations during RL (every rl.eval_every iterations); the
    # start (after SFT) and the final evaluation use episodes_per_task.  None: episodes_per_task.
    # With the same eval.num_envs they are the first seeds of each task's full evaluation.
    intermediate_episodes_per_task: int | None = None
    # eval.num_envs == env.num_envs: the "train" split is evaluated on the training env's own
    # objects (no second set of simulators; Meta-World's MuJoCo envs take ~25 MB each)
    num_envs: int = 128
    splits: list[str] = field(default_factory=lambda: ["train", "ood"])
    num_steps: int | None = None  # denoise steps at eval (None: sampler.num_steps)
    videos: int = 8  # episodes recorded into a video grid at each final eval (0: none)
    # executed steps of each predicted chunk at evaluation, i.e. how often the policy re-plans
    # (None: rl.action_chunk, the rollouts' own); an episode gets ceil(max_episode_steps /
    # action_chunk) chunk steps.  Re-planning more often than in training is a deployment
    # choice (openpi / LeRobot's n_action_steps); evaluate the start and the end alike
    action_chunk: int | None = None
    # envs with fixed initial states (LIBERO): the k-th episode of a task starts from state
    # first_init_state + k (0: the benchmark's protocol; e.g. 10 to read states that RL with
    # rl.init_states=[0..9] never started from)
    first_init_state: int = 0

    def __post_init__(self):
        _check(self.episodes_per_task >= 1, "eval.episodes_per_task", "must be >= 1")
        _check(self.first_init_state >= 0, "eval.first_init_state",
               f"must be >= 0, got {self.first_init_state}")
        _check(self.intermediate_episodes_per_task is None
               or self.intermediate_episodes_per_task >= 1,
               "eval.intermediate_episodes_per_task",
               f"must be >= 1 or null, got {self.intermediate_episodes_per_task}")
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
    # compute precision of every policy forward (pretraining, SFT, rollouts, updates,
    # evaluation): "bf16" = torch.autocast to bfloat16 (weights, gradients, optimiser state,
    # chains, log-probs and losses stay float32; docs/method.md#precision), "fp32", or "auto" =
    # bf16 on CUDA or a CPU with AMX / AVX512-BF16, else fp32 (pirl.models.precision).  "auto":
    # the default job, same seed, took 14.2 min in bf16 for 94.0% train success against fp32's
    # 92.5% (docs/experiments.md#2026-12-06--the-default-job-in-bf16-against-fp32-on-an-idle-machine);
    # presets measured in fp32 say so.  A run folder whose config.yaml predates the field
    # resumes in fp32, as it ran
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # hybrid Flow-SDE (RLinf's pi0 / LIBERO default): measured to learn on the tabletop, and its
    # update re-evaluates one denoise step (Flow-Noise: all K)
    # noise level 1.0 (RLinf: 0.5): with rl.action_chunk=4 PPO ended 1.2 and 4.3 points higher
    # from two starts
    # (docs/experiments.md#2026-12-01--re-planning-after-half-a-chunk-and-a-larger-sde-noise-level)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="flow_sde",
                                                                         noise_level=1.0))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    # action_chunk=4: the policy re-plans after 4 of its 8 predicted steps, which lifted one SFT
    # checkpoint's success from 63.5% (all 8) to 76.7%
    # (docs/experiments.md#2026-12-01--re-planning-after-half-a-chunk-and-a-larger-sde-noise-level).
    # Re-planning every 2 pays in RL at ~2x the cost (tabletop_headline,
    # docs/experiments.md#2026-12-04--re-planning-every-2-steps-in-rl); the default keeps 4 for time
    # task_sampling="failure": 3.8 / 4.6 points above uniform at iteration 40
    # (docs/experiments.md#2026-12-01--model-capacity-sft-on-more-demos-against-few-shot-sft--rl)
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
        _check(self.rl.algo != "grpo" or self.env.num_envs % self.rl.grpo.group_size == 0,
               "rl.grpo.group_size", f"GRPO's groups split the {self.env.num_envs} envs "
               f"(env.num_envs): {self.rl.grpo.group_size} does not divide them")
        _check(self.rl.rollouts_per_update == 1 or self.placement.mode == "local",
               "rl.rollouts_per_update", f"several rollouts per update run with "
               f"placement.mode=local only, got {self.placement.mode!r}")
        _check(self.precision in ("auto", "fp32", "bf16"), "precision",
               f"must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.pretrain.steps > 0 and not self.model.checkpoint:
            _check(env_key(self.env.name) == "tabletop" and self.model.name == "tiny",
                   "pretrain.steps", f"grounding pretraining (on by default) is the tiny VLA's "
                   f"stand-in for a pretrained VLM on the tabletop; with env {self.env.name!r} "
                   f"and model {self.model.name!r} set pretrain.steps=0")
