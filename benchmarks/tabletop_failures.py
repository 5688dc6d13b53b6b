"""Where a tabletop policy fails: ODE episodes of every task, each failure put in a category.

    PYTHONPATH=src .venv/bin/python benchmarks/tabletop_failures.py RUN_DIR [--checkpoint X.pt]
        [--episodes 4] [--split train] [--action-chunk N] [--stochastic]

Reads the env's own state after every step (gripper, held object, object position) and prints
one row per (family, outcome): pick-and-place episodes that never grasped the object (closest
approach inside / outside the grasp radius), still held it at the time limit, or released it
off the plate; push episodes that left the object in place, moved it with no progress towards
the named edge, or fell short of the edge zone.  Then the push episodes of the second kind with
the cosine between the object's displacement and the goal direction, and where the gripper
first touched the object in each push episode (the step the object first moves): its offset
from the object in the goal frame (``a`` along the goal direction, ``|b|`` sideways, in units of
the contact distance) and its move in that step along the goal direction, for failed and
successful pushes alike.  ``--stochastic`` runs the same episodes with the run's own RL
sampler (Flow-SDE / Flow-Noise, its noise net from the checkpoint) instead of the ODE.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch


def main() -> None:
    from pirl.config.loading import load_yaml
    from pirl.envs.base import ChunkedEnv
    from pirl.envs.tabletop.render import EDGE_ZONE
    from pirl.envs.tabletop.sim import (CONTACT_DISTANCE, FAMILY_PICK_PLACE, FAMILY_PUSH,
                                        GRASP_RADIUS)
    from pirl.runners.checkpoint import load_checkpoint, load_module_state
    from pirl.config.schema import TrainConfig
    from pirl.runners.rollout import collect
    from pirl.runners.train import make_policy, make_sampler, make_train_env

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--checkpoint", help="default RUN/checkpoints/last.pt")
    ap.add_argument("--episodes", type=int, default=4, help="episodes per task")
    ap.add_argument("--split", default="train")
    ap.add_argument("--action-chunk", type=int,
                    help="executed steps per chunk (default: the run's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stochastic", action="store_true",
                    help="sample with the run's RL sampler instead of the deterministic ODE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_yaml(TrainConfig, f"{args.run}/config.yaml")
    if cfg.env.name != "tabletop":
        raise SystemExit(f"{args.run} is a {cfg.env.name} run; this script reads tabletop state")
    probe = make_train_env(cfg, split=args.split, num_envs=1)
    n = len(probe.task_names) * args.episodes
    env = make_train_env(cfg, split=args.split, num_envs=n)
    policy = make_policy(cfg, env)
    ckpt = args.checkpoint or f"{args.run}/checkpoints/last.pt"
    state = load_checkpoint(ckpt)
    load_module_state(policy, state["policy"], "policy")
    if args.stochastic:
        sampler = make_sampler(cfg, policy)
        if state.get("sampler"):
            load_module_state(sampler, state["sampler"], "sampler")
    else:
        sampler = make_sampler(cfg, policy, kind="ode", num_steps=cfg.eval.num_steps)
    chunk = args.action_chunk or cfg.rl.action_chunk or policy.action_horizon

    trace: list[dict[str, torch.Tensor]] = []
    step = env.step

    def recording_step(action):
        out = step(action)
        trace.append({"g": env.gripper.clone(), "held": env.held.clone(),
                      "o": env.obj_pos[:, 0].clone()})
        return out

    env.step = recording_step
    reset = {"seed": 0, "task_ids": torch.arange(n) % len(env.task_names),
             "episode_seeds": 777 + torch.arange(n)}
    env.reset(**reset)  # the initial object positions (collect resets to the same state)
    o0, g0 = env.obj_pos[:, 0].clone(), env.gripper.clone()
    ro = collect(policy, sampler, ChunkedEnv(env), num_chunks=-(-env.max_episode_steps // chunk),
                 reset_kwargs=reset, action_chunk=chunk,
                 generator=torch.Generator().manual_seed(0), with_values=False)
    success = ro.episode_success
    g = torch.stack([t["g"] for t in trace])                          # [T, N, 2]
    obj = torch.stack([t["o"] for t in trace])                        # [T, N, 2]
    held_ever = torch.stack([t["held"] == 0 for t in trace]).any(0)
    held_end = trace[-1]["held"] == 0
    closest = (g - obj).norm(dim=-1).min(0).values
    disp = obj[-1] - o0
    progress = (disp * env.goal_dir).sum(-1)
    gap = EDGE_ZONE - (obj[-1] * env.goal_dir).sum(-1)
    # first contact: the first step that moved the task object (pushes only; [N] step index)
    prev_o = torch.cat([o0[None], obj[:-1]])
    prev_g = torch.cat([g0[None], g[:-1]])
    moved = (obj - prev_o).norm(dim=-1) > 1e-6                      # [T, N]
    first = torch.where(moved.any(0), moved.long().argmax(0), -1)
    u = env.goal_dir
    nrm = torch.stack([-u[:, 1], u[:, 0]], 1)
    cats: Counter = Counter()
    wrong: list[str] = []
    contact: dict[str, list[tuple[float, float, float]]] = {}
    for i in range(n):
        fam = "pick_place" if int(env.family[i]) == FAMILY_PICK_PLACE else "push"
        if success[i]:
            c = "success"
        elif int(env.family[i]) == FAMILY_PUSH:
            if disp[i].norm() < 0.05:
                c = "object left in place"
            elif progress[i] < 0.05:
                c = "object moved, no progress to the edge"
                cos = float(progress[i] / disp[i].norm())
                name = env.task_names[int(env.task_id[i])]
                wrong.append(f"| {name} | {float(disp[i].norm()):.2f} | {cos:+.2f} |")
            else:
                c = "short of the edge zone by < 0.15" if gap[i] < 0.15 else \
                    "short of the edge zone by >= 0.15"
        elif not held_ever[i]:
            c = f"never grasped (closest {'<' if closest[i] < GRASP_RADIUS else '>='} " \
                f"{GRASP_RADIUS})"
        else:
            c = "holding at the time limit" if held_end[i] else "released off the plate"
        cats[(fam, c)] += 1
        if int(env.family[i]) == FAMILY_PUSH and int(first[i]) >= 0:
            t = int(first[i])
            rel = prev_g[t, i] - prev_o[t, i]
            step_move = g[t, i] - prev_g[t, i]
            key = {"success": "success",
                   "object moved, no progress to the edge": "no progress"}.get(c, "other failure")
            contact.setdefault(key, []).append(
                (float((rel * u[i]).sum() / CONTACT_DISTANCE),
                 float((rel * nrm[i]).sum().abs() / CONTACT_DISTANCE),
                 float((step_move * u[i]).sum() / env.max_speed)))
    per_family = Counter()
    for (fam, _), v in cats.items():
        per_family[fam] += v
    how = f"{cfg.sampler.kind} sampling" if args.stochastic else "ODE sampling"
    print(f"{ckpt}: {args.split} split, {n} episodes, {how}, executing {chunk} steps per chunk, "
          f"success {100 * float(success.float().mean()):.1f}%\n")
    print("| family | outcome | episodes | % of family |\n|---|---|---|---|")
    for (fam, c), v in sorted(cats.items()):
        print(f"| {fam} | {c} | {v} | {100 * v / per_family[fam]:.1f} |")
    if wrong:
        print("\n| push task, object moved without progress | displacement "
              "| cos(displacement, goal) |\n|---|---|---|")
        print("\n".join(wrong))
    if contact:
        print("\n| push episodes | first contacts | gripper on the goal side (a > 0) "
              "| moving against the goal direction | both | median a | median abs(b) |"
              "\n|---|---|---|---|---|---|---|")
        for key in ("success", "no progress", "other failure"):
            rows = contact.get(key)
            if not rows:
                continue
            a = torch.tensor([r[0] for r in rows])
            b = torch.tensor([r[1] for r in rows])
            back = torch.tensor([r[2] for r in rows]) < 0
            print(f"| {key} | {len(rows)} | {int((a > 0).sum())} | {int(back.sum())} "
                  f"| {int(((a > 0) & back).sum())} | {float(a.median()):+.2f} "
                  f"| {float(b.median()):.2f} |")


if __name__ == "__main__":
    main()
