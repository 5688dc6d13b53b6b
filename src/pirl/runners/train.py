"""The whole pi_RL recipe in one run folder: demos -> few-shot SFT -> online RL -> evaluation.

``RUN/`` holds ``config.yaml``, ``demos/``, ``checkpoints/{sft,last}.pt``, ``metrics.jsonl``,
``tb/`` (TensorBoard), ``success.png``, ``videos/`` and ``results.json``.  :func:`run` resumes a
run folder exactly: the last checkpoint holds the model, the noise net, the optimiser, every RNG
state and the counters; completed stages are skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pirl.config.loading import ConfigError, load_yaml, save_yaml, to_dict
from pirl.runners.checkpoint import (CheckpointError, load_checkpoint, load_module_state,
                                     save_checkpoint)
from pirl.config.schema import TrainConfig
from pirl.models.precision import precision_name, resolve_precision
from pirl.runners.logger import RunLogger, hardware_info, plot_success


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def make_train_env(cfg: TrainConfig, split: str | None = None, num_envs: int | None = None):
    """The training env of ``cfg`` (``split`` and ``num_envs`` override the config's)."""
    from pirl.envs import make_env

    kw = dict(cfg.env.kwargs)
    if split is not None:
        kw["split"] = split
    env = make_env(cfg.env.name, num_envs or cfg.env.num_envs, device=cfg.device, **kw)
    return env


def make_policy(cfg: TrainConfig, env) -> Any:
    from pirl.models import build_policy

    kw = dict(cfg.model.kwargs)
    kw.setdefault("action_dim", env.action_dim)
    kw.setdefault("state_dim", env.state_dim)
    if hasattr(env, "num_cameras"):
        kw.setdefault("num_cameras", env.num_cameras)
    if hasattr(env, "image_size"):
        kw.setdefault("image_size", env.image_size)
    if hasattr(env, "vocabulary"):
        kw.setdefault("vocabulary", list(env.vocabulary()))
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.model.name, **kw).to(cfg.device)
    return policy.set_precision(resolve_precision(cfg.precision, cfg.device))


def make_sampler(cfg: TrainConfig, policy, kind: str | None = None, num_steps: int | None = None):
    from pirl.flow import build_sampler

    s = cfg.sampler
    torch.manual_seed(cfg.seed + 1)
    return build_sampler(kind or s.kind, num_steps=num_steps or s.num_steps,
                         feature_dim=policy.feature_dim, action_dim=policy.action_dim,
                         config=s).to(cfg.device)


def load_sft_data(cfg: TrainConfig, demo_dir: Path, horizon: int):
    from pirl.algos.sft import SFTData
    from pirl.envs.demos import load_demos

    ds = load_demos(demo_dir)
    obs, actions, mask = ds.sft_samples(horizon=horizon,
                                        episodes_per_task=cfg.demos.episodes_per_task)
    return SFTData(obs=obs, actions=actions, mask=mask)


def sft_frozen_parameters(policy, freeze: list[str]) -> list[Any]:
    """The parameters ``sft.freeze`` names: ``"prefix"`` = ``policy.prefix_parameter_names()``,
    any other entry = the parameters whose name starts with it (each entry must match one)."""
    named = dict(policy.named_parameters())
    prefix = set(policy.prefix_parameter_names())
    out: dict[str, Any] = {}
    for entry in freeze:
        hit = [n for n in named if (n in prefix if entry == "prefix" else n.startswith(entry))]
        if not hit:
            raise ConfigError(f"sft.freeze: {entry!r} names no parameter of the policy")
        out.update((n, named[n]) for n in hit)
    return list(out.values())


class Run:
    """State of one run folder (see module docstring)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.dir = cfg, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.env = make_train_env(cfg, split="train")
        self.policy = make_policy(cfg, self.env)
        self.precision = precision_name(self.policy.autocast_dtype)
        print(f"precision: {self.precision}" + (" (auto)" if cfg.precision == "auto" else ""))
        if (cfg.eval.action_chunk or 0) > self.policy.action_horizon:  # before any training
            raise ConfigError(f"eval.action_chunk: {cfg.eval.action_chunk} steps exceed the "
                              f"policy's action horizon {self.policy.action_horizon}")
        self.sampler = make_sampler(cfg, self.policy)
        self.eval_sampler = make_sampler(cfg, self.policy, kind="ode",
                                         num_steps=cfg.eval.num_steps)
        self.logger = RunLogger(run_dir)
        self.trainer = None
        self.stage = "start"
        self.results: dict[str, Any] = {}
        self._eval_envs: dict[str, Any] = {}
        # wall seconds per phase, summed over the run folder's invocations (PHASES; saved with
        # the checkpoints, written to results.json as "timing")
        self.timing: dict[str, float] = {}

    def add_time(self, phase: str, seconds: float) -> None:
        self.timing[phase] = self.timing.get(phase, 0.0) + float(seconds)

    def write_results(self, total: float | None = None) -> None:
        """``RUN/results.json``: every evaluation (by tag), the precision and the phase times
        (:func:`phase_times`; with ``total`` the run folder's wall-clock and the rest)."""
        out = dict(self.results) | {"precision": self.precision,
                                    "timing": phase_times(self.timing, total)}
        (self.dir / "results.json").write_text(json.dumps(out, indent=2))

    # ----------------------------------------------------------------- eval
    def evaluate(self, tag: str, videos: bool = False,
                 episodes_per_task: int | None = None) -> dict[str, Any]:
        """Evaluate every split of ``cfg.eval`` (``episodes_per_task``: None =
        ``cfg.eval.episodes_per_task``); the results go under ``tag``."""
        from pirl.runners.evaluate import evaluate_env, format_table

        cfg = self.cfg
        episodes_per_task = episodes_per_task or cfg.eval.episodes_per_task
        out = {}
        t0 = time.perf_counter()
        action_chunk = cfg.eval.action_chunk or cfg.rl.action_chunk or self.policy.action_horizon
        # rl.max_chunks counts the rollouts' chunks: it holds when evaluation re-plans as they do
        max_chunks = None if cfg.eval.action_chunk else cfg.rl.max_chunks
        for split in cfg.eval.splits:
            if split not in self._eval_envs:
                # the same env as training's: share its objects (every rollout resets them all)
                same = split == "train" and cfg.eval.num_envs == cfg.env.num_envs
                self._eval_envs[split] = (self.env if same else
                                          make_train_env(cfg, split=split,
                                                         num_envs=cfg.eval.num_envs))
            env = self._eval_envs[split]
            num_chunks = max_chunks or -(-env.max_episode_steps // action_chunk)
            vid = None
            if videos and cfg.eval.videos > 0:
                (self.dir / "videos").mkdir(exist_ok=True)
                vid = self.dir / "videos" / f"{tag}_{split}.mp4"
            out[split] = evaluate_env(self.policy, self.eval_sampler, env,
                                      episodes_per_task=episodes_per_task,
                                      seed=10_000 + cfg.seed, action_chunk=action_chunk,
                                      num_chunks=num_chunks, video_path=vid,
                                      video_episodes=cfg.eval.videos,
                                      first_init_state=cfg.eval.first_init_state)
        self.results[tag] = out
        self.add_time("eval", time.perf_counter() - t0)
        self.write_results()
        step = self.trainer.env_steps if self.trainer else 0
        self.logger.log(step, {f"{s}_success": r["success"] for s, r in out.items()} |
                        {"env_steps": step}, prefix="eval/")
        print(f"\n[{tag}] success per task (%), deterministic ODE sampling:\n" + format_table(out))
        return out

    # ----------------------------------------------------------------- state
    def save(self, name: str = "last.pt") -> None:
        state = {"config": to_dict(self.cfg), "stage": self.stage,
                 "policy": self.policy.state_dict(), "sampler": self.sampler.state_dict(),
                 "results": self.results, "torch_rng": torch.get_rng_state(),
                 "timing": self.timing}
        if self.trainer is not None:
            state["trainer"] = self.trainer.state_dict()
        save_checkpoint(self.ckpt_dir / name, state)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state["config"].get("model") != to_dict(self.cfg).get("model"):
            raise CheckpointError(f"checkpoint {path} was made for model "
                                  f"{state['config'].get('model')}, not {to_dict(self.cfg)['model']}")
        load_module_state(self.policy, state["policy"], "policy")
        load_module_state(self.sampler, state["sampler"], "sampler")
        self.stage = state["stage"]
        self.results = state.get("results", {})
        self.timing = dict(state.get("timing", {}))
        torch.set_rng_state(state["torch_rng"])
        if "trainer" in state:
            self._make_trainer()
            self.trainer.load_state_dict(state["trainer"])

    def _make_trainer(self):
        from pirl.runners.distributed import trainer_from_config

        # RLTrainer for placement.mode=local, else a Ray DistributedTrainer (same interface)
        demos = None
        if self.cfg.rl.bc_coef > 0:  # the few-shot SFT demos, for the demo loss
            demos = load_sft_data(self.cfg, self.demos(), self.policy.action_horizon)
        self.trainer = trainer_from_config(self.cfg, self.policy, self.sampler, self.env,
                                           demos=demos)

    def extend(self) -> None:
        """Reopen the RL stage of a loaded run for ``cfg.rl.iterations`` (raised by the caller):
        a finished run's final evaluation becomes the ``rl_<iteration>`` one."""
        done = self.trainer.iter if self.trainer is not None else 0
        if self.stage in ("rl_done", "done") and self.cfg.rl.iterations > done:
            if "final" in self.results:
                self.results[f"rl_{done}"] = self.results.pop("final")
            self.stage = "rl"
        # (the trainer was built from this config, so its lr schedule spans the new total)
        print(f"extended to {self.cfg.rl.iterations} RL iterations")

    # ----------------------------------------------------------------- stages
    def demos(self) -> Path:
        cfg = self.cfg
        if cfg.demos.path:
            return Path(cfg.demos.path)
        out = self.dir / "demos"
        if not (out / "meta" / "info.json").exists() and not any(out.glob("*")):
            from pirl.envs.demos import generate_demos

            print(f"generating {cfg.demos.episodes_per_task} scripted demos per task -> {out}")
            t0 = time.perf_counter()
            generate_demos(env_name=cfg.env.name, episodes_per_task=cfg.demos.episodes_per_task,
                           out_dir=out, seed=cfg.demos.seed, noise=cfg.demos.noise,
                           env_kwargs=dict(cfg.env.kwargs))
            self.add_time("demos", time.perf_counter() - t0)
        return out

    def _stage_progress(self, steps: int, desc: str, prefix: str):
        """A progress bar over ``steps`` and ``callback(step, metrics)`` that advances it, logs
        ``metrics`` (with a ``"loss"``) under ``prefix`` every 25 steps and shows the loss."""
        bar = _progress(range(steps), self.cfg.progress, desc=desc, leave=False)
        it = iter(bar)

        def callback(step: int, metrics: dict[str, float]) -> None:
            next(it, None)
            if step % 25 == 0:
                self.logger.log(step, metrics, prefix=prefix)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")

        return bar, callback

    def pretrain(self) -> None:
        """Grounding pretraining of the prefix (``cfg.pretrain``; :mod:`pirl.algos.pretrain`)."""
        from pirl.algos.pretrain import pretrain_grounding, with_relative_offset

        from pirl.envs import env_key

        cfg, pc = self.cfg, self.cfg.pretrain
        if env_key(cfg.env.name) != "tabletop":
            raise ConfigError(f"pretrain.steps: grounding pretraining needs the tabletop env's "
                              f"scene annotation and scripted expert, not {cfg.env.name!r}; set "
                              "pretrain.steps=0")
        from pirl.envs.tabletop import ScriptedExpert, TabletopEnv

        # (pretrain_grounding resets the env with pc.seed, which seeds its task draws)
        kw = dict(cfg.env.kwargs) | {"split": pc.split, "auto_reset": True}
        env = TabletopEnv(pc.num_envs, device=cfg.device, **kw)
        expert = ScriptedExpert(env, noise=pc.noise,
                                generator=torch.Generator().manual_seed(pc.seed))
        bar, cb = self._stage_progress(pc.steps, "pretrain (grounding)", "pretrain/")
        t0 = time.perf_counter()
        def points() -> torch.Tensor:  # the grounding targets [N, Q, 2] of the current state
            pts = env.scene_points()
            return with_relative_offset(pts, pc.relative) if pc.relative > 0 else pts

        out = pretrain_grounding(self.policy, env, expert.act, points, steps=pc.steps,
                                 lr=pc.lr, weight_decay=pc.weight_decay,
                                 warmup_steps=pc.warmup_steps, seed=pc.seed, callback=cb)
        if hasattr(bar, "close"):
            bar.close()
        self.add_time("pretrain", time.perf_counter() - t0)
        err = ", ".join(f"{name} {e:.3f}" for name, e in
                        zip(("object", "place", "gripper", "relative"), out["error"].tolist()))
        print(f"grounding pretraining: {pc.steps} steps in {time.perf_counter() - t0:.0f}s; "
              f"mean error (table units, last 10%): {err}")

    def sft(self) -> None:
        from pirl.algos.sft import train_sft

        cfg = self.cfg
        if cfg.model.checkpoint:
            # an SFT checkpoint's critic is untrained: a critic with inputs the checkpoint's
            # model lacked (critic_time) starts from its own initialisation
            kept = load_module_state(self.policy, load_checkpoint(cfg.model.checkpoint)["policy"],
                                     "policy", allow_missing=self.policy.critic_parameter_names())
            if kept:
                print(f"critic parameters not in {cfg.model.checkpoint} keep their "
                      f"initialisation: {kept}")
        elif cfg.pretrain.steps > 0:
            self.pretrain()
        if cfg.sft.steps > 0:
            data = load_sft_data(cfg, self.demos(), self.policy.action_horizon)
            if not cfg.model.checkpoint:  # a loaded checkpoint keeps its own normaliser
                with torch.no_grad():
                    if self.policy.fit_normalization(data.obs.get("state"), data.actions,
                                                     data.mask):
                        print("normaliser: state / action mean-std fitted on the SFT demos")
            gen = torch.Generator().manual_seed(cfg.seed * 7 + 3)
            bar, log = self._stage_progress(cfg.sft.steps, "SFT", "sft/")

            def cb(step, loss):
                log(step, {"loss": loss})

            t0 = time.perf_counter()
            frozen = sft_frozen_parameters(self.policy, cfg.sft.freeze)
            # each parameter's own flag comes back afterwards (a pi0's LoRA / train mode freezes
            # some for good; RL's train_mode decides about the rest)
            was = [p.requires_grad for p in frozen]
            try:
                for p in frozen:
                    p.requires_grad_(False)
                train_sft(self.policy, data, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
                          lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay,
                          grad_clip=cfg.sft.grad_clip, warmup_steps=cfg.sft.warmup_steps,
                          generator=gen, callback=cb)
            finally:
                for p, flag in zip(frozen, was):
                    p.requires_grad_(flag)
            if hasattr(bar, "close"):
                bar.close()
            self.add_time("sft", time.perf_counter() - t0)
            print(f"SFT: {cfg.sft.steps} steps on {len(data)} samples in "
                  f"{time.perf_counter() - t0:.0f}s")
        self.evaluate("sft")
        self.stage = "sft_done"
        self.save("sft.pt")
        self.save()

    def rl(self) -> None:
        cfg = self.cfg
        if self.trainer is None:
            self._make_trainer()
        tr = self.trainer
        bar = _progress(range(tr.iter, cfg.rl.iterations), cfg.progress,
                        desc=f"RL ({cfg.rl.algo}, {cfg.sampler.kind})", initial=tr.iter,
                        total=cfg.rl.iterations)
        for _ in bar:
            t_it, t_eval = time.perf_counter(), self.timing.get("eval", 0.0)
            m = tr.iteration()
            roll, upd = m.get("perf/rollout_s", 0.0), m.get("perf/update_s", 0.0)
            for phase, key in (("rl_rollout", "perf/rollout_s"), ("rl_update", "perf/update_s"),
                               ("rl_rollout_env", "perf/rollout_env_s"),
                               ("rl_rollout_policy", "perf/rollout_policy_s")):
                self.add_time(phase, m.get(key, 0.0))
            self.logger.log(tr.env_steps, m)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(success=f"{m['rollout/success']:.2f}",
                                kl=f"{m.get('policy/approx_kl', 0):.3f}")
            if tr.iter % cfg.rl.eval_every == 0 and tr.iter < cfg.rl.iterations:
                self.evaluate(f"rl_{tr.iter}",
                              episodes_per_task=cfg.eval.intermediate_episodes_per_task)
            self.stage = "rl"
            # advantages, logging, checkpoints (the iteration's evaluation counts as eval)
            self.add_time("rl_other", time.perf_counter() - t_it - roll - upd
                          - (self.timing.get("eval", 0.0) - t_eval))
            if tr.iter % cfg.checkpoint_every == 0 or tr.iter == cfg.rl.iterations:
                self.save()
        self.stage = "rl_done"
        self.save()
        if hasattr(tr, "close"):  # stop Ray workers (their final state stays readable)
            tr.close()

    def final(self) -> dict[str, Any]:
        res = self.evaluate("final", videos=True)
        plot_success(self.dir)
        self.stage = "done"
        self.save()
        self.logger.close()
        return res


# the phases of Run.timing, in order: (key, label); rl_rollout_env / rl_rollout_policy split
# rl_rollout (the env's steps / the policy's forwards, the rest is the rollout's bookkeeping)
PHASES = (("pretrain", "grounding pretraining"), ("demos", "demo generation"), ("sft", "SFT"),
          ("rl_rollout", "RL rollouts"), ("rl_update", "RL updates"),
          ("rl_other", "RL advantages, logging, checkpoints"), ("eval", "evaluation"))


def phase_times(timing: dict[str, float], total: float | None = None) -> dict[str, float]:
    """Seconds per phase (``timing``'s, 0 for a phase that did not run); with the run's
    wall-clock ``total`` also ``"total"`` and ``"other"`` (setup, checkpoints, plots: the
    total less the phases)."""
    out = {k: float(timing.get(k, 0.0)) for k, _ in PHASES}
    out |= {k: float(timing.get(k, 0.0)) for k in ("rl_rollout_env", "rl_rollout_policy")}
    if total is not None:
        out["other"] = max(0.0, total - sum(out[k] for k, _ in PHASES))
        out["total"] = float(total)
    return out


def format_phase_times(times: dict[str, float]) -> str:
    """A markdown table of :func:`phase_times` (minutes and share of the total)."""
    total = times.get("total") or sum(times.get(k, 0.0) for k, _ in PHASES) or 1.0
    rows = ["| phase | s | min | share |", "|---|---|---|---|"]
    for k, label in PHASES + (("other", "other (setup, checkpoints, plots)"),):
        if k not in times:
            continue
        if k == "rl_rollout" and times[k] > 0:
            label += (f" (env {times.get('rl_rollout_env', 0) / 60:.1f} min, policy "
                      f"{times.get('rl_rollout_policy', 0) / 60:.1f} min)")
        rows.append(f"| {label} | {times[k]:.0f} | {times[k] / 60:.1f} | "
                    f"{100 * times[k] / total:.0f}% |")
    if "total" in times:
        rows.append(f"| **total** | **{times['total']:.0f}** | **{times['total'] / 60:.1f}** | "
                    "100% |")
    return "\n".join(rows)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run folder (``RUN/config.yaml``, then ``overrides``).  A config saved
    before the ``precision`` field existed gets ``precision=fp32``: the run computed in float32,
    and a resumed or re-evaluated run keeps doing so, whatever the field's default."""
    path = Path(run_dir) / "config.yaml"
    cfg = load_yaml(TrainConfig, path)
    if "precision" not in (yaml.safe_load(path.read_text()) or {}):
        cfg.precision = "fp32"
    from pirl.config.loading import apply_overrides

    return apply_overrides(cfg, overrides or [])


def resolve_config(config: str | None, overrides: list[str]) -> TrainConfig:
    if config:
        return load_yaml(TrainConfig, config, overrides)
    from pirl.config.loading import apply_overrides

    return apply_overrides(TrainConfig(), overrides)


def check_placement(cfg: TrainConfig) -> None:
    """Fail before work: a Ray placement is checked against the cluster (resources, env split,
    the simulator on every node) before pretraining, demos or SFT start
    (:func:`pirl.runners.distributed.check_cluster`; a ConfigError naming the field)."""
    if cfg.placement.mode != "local":
        from pirl.runners.distributed import check_cluster

        check_cluster(cfg)


def run(cfg: TrainConfig | None = None, resume: str | Path | None = None,
        iterations: int | None = None, command: dict[str, Any] | None = None,
        cluster: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole recipe; return the results dict (per tag and split).

    ``iterations`` (with ``resume`` only) raises ``rl.iterations`` of the run folder, so that a
    finished (or unfinished) run continues to that many RL iterations; the config file is
    rewritten and the previous final evaluation is kept as ``rl_<iteration>``.  A decaying lr
    schedule then decays over the new total from where it stands (a constant one continues as
    if the run had been planned that long).

    ``cluster`` (with ``resume`` only; ``pirl train --resume RUN --cluster ADDR``) continues the
    run on that Ray cluster (a local run switches to the disaggregated placement; local and DDP
    trainer states have the same layout, so the run continues where it stopped).

    Each completed invocation appends a line to ``RUN/invocations.jsonl``: its wall-clock, the
    hardware (:func:`pirl.runners.logger.hardware_info`), the process's command line (``argv``)
    and ``command`` as the CLI gives it (``preset``: the --config given, ``overrides``), which
    ``benchmarks/report.py`` puts in the README's results table."""
    if iterations is not None and resume is None:
        raise ConfigError("iterations= extends a resumed run; give rl.iterations in the config")
    if cluster is not None and resume is None:
        raise ConfigError("cluster= moves a resumed run; give placement.cluster in the config")
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise CheckpointError(f"{run_dir} is not a pirl run folder (no config.yaml)")
        cfg = load_run_config(run_dir)
        if iterations is not None:
            if iterations < cfg.rl.iterations:
                raise ConfigError(f"rl.iterations: a resumed run can be extended, not shortened "
                                  f"({iterations} < the run's {cfg.rl.iterations})")
            cfg.rl.iterations = iterations
            save_yaml(cfg, run_dir / "config.yaml")
        if cluster is not None:  # resume on another (e.g. a restored) Ray cluster
            cfg.placement.cluster = cluster
            if cfg.placement.mode == "local":
                print("pirl: --cluster given with placement.mode=local: using "
                      "placement.mode=disaggregated")
                cfg.placement.mode = "disaggregated"
            save_yaml(cfg, run_dir / "config.yaml")
        check_placement(cfg)
    else:
        assert cfg is not None
        run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"run_dir {run_dir} already holds a run; use --resume {run_dir} "
                              "or another run_dir")
        check_placement(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    r = Run(cfg, run_dir)
    if resume is not None and (run_dir / "checkpoints" / "last.pt").exists():
        r.load(run_dir / "checkpoints" / "last.pt")
        print(f"resumed {run_dir} at stage {r.stage}"
              + (f", iteration {r.trainer.iter}" if r.trainer else ""))
        if iterations is not None:
            r.extend()
    if r.stage == "start":
        r.sft()
    if r.stage in ("sft_done", "rl"):
        r.rl()
    if r.stage == "rl_done":
        r.final()
    wall = time.perf_counter() - t0
    # one line per completed invocation: a resumed run's wall-clock is their sum
    with open(run_dir / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"started": started, "wall_s": wall, "stage": r.stage,
                            "resumed": resume is not None, "hardware": hardware_info(),
                            "argv": [Path(sys.argv[0]).name] + sys.argv[1:],
                            **(command or {})}) + "\n")
    times = phase_times(r.timing, run_wall_clock(run_dir))
    r.write_results(times["total"])
    print(f"\ntime per phase (precision {r.precision}; all invocations of the run folder):\n"
          + format_phase_times(times))
    print(f"run folder: {run_dir}  ({wall / 60:.1f} min this invocation)")
    return r.results


def run_wall_clock(run_dir: str | Path) -> float | None:
    """Seconds spent by the run folder's completed invocations (``invocations.jsonl``), or None
    if it has none recorded."""
    path = Path(run_dir) / "invocations.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(x["wall_s"] for x in lines) if lines else None
