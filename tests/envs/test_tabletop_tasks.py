"""Tabletop task family: the train / OOD split, scripted-expert and random-policy success."""

import pytest
import torch

from pirl.envs.tabletop import FAMILIES, ScriptedExpert, TabletopEnv, all_tasks, build_tasks
from pirl.envs.tabletop.tasks import COLOURS, EDGES, SHAPES


@pytest.mark.parametrize("family", FAMILIES)
def test_ood_split_shares_no_object_target_combination(family):
    train, ood = build_tasks("train", (family,)), build_tasks("ood", (family,))
    every = build_tasks("all", (family,))
    assert len(train) + len(ood) == len(every) and set(train) | set(ood) == set(every)
    pair = lambda t: (t.shape, t.target)  # noqa: E731
    triple = lambda t: (t.colour, t.shape, t.target)  # noqa: E731
    assert not {pair(t) for t in train} & {pair(t) for t in ood}
    assert not {triple(t) for t in train} & {triple(t) for t in ood}
    # compositional: every shape, colour and target word of OOD also occurs in training
    for attr in ("shape", "colour", "target"):
        assert {getattr(t, attr) for t in ood} <= {getattr(t, attr) for t in train}
    # instructions are unique and name the object and the target
    names = [t.instruction for t in every]
    assert len(set(names)) == len(names)
    for t in every:
        assert COLOURS[t.colour] in t.instruction and SHAPES[t.shape] in t.instruction
        target_word = EDGES[t.target] if family == "push" else COLOURS[t.target]
        assert t.instruction.split(" the ")[-1].startswith(target_word)


def test_task_counts_and_env_task_lists():
    assert len(all_tasks()) == 48 + 48 + 36
    env = TabletopEnv(2, split="ood", num_cameras=0)
    assert env.task_names == [t.name for t in build_tasks("ood")]
    assert len(env.instructions) == len(env.task_names) == 24
    assert len(TabletopEnv(2, split="train", num_cameras=0).task_names) == 72
    with pytest.raises(ValueError):
        TabletopEnv(2, split="test")


def _run(env, policy, steps=48):
    succ = torch.zeros(env.num_envs, dtype=torch.bool)
    for _ in range(steps):
        st = env.step(policy())
        succ |= st.info["success"]
    return succ


@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_expert_solves_every_family(family):
    n = 384
    env = TabletopEnv(n, split="all", task_families=(family,), num_cameras=0)
    expert = ScriptedExpert(env)
    tasks = torch.arange(n) % len(env.tasks)  # every task of the family, several seeds each
    env.reset(seed=0, task_ids=tasks)
    rate = float(_run(env, expert.act).float().mean())
    assert rate >= 0.95, f"{family}: expert success {rate:.3f}"
    # with the default demo noise (std 0.1) it still succeeds almost always
    expert = ScriptedExpert(env, noise=0.1, generator=torch.Generator().manual_seed(1))
    env.reset(seed=1, task_ids=tasks)
    rate = float(_run(env, expert.act).float().mean())
    assert rate >= 0.9, f"{family}: noisy expert success {rate:.3f}"


def test_push_clearance_keeps_the_expert_further_from_the_object():
    """A larger ``clearance`` keeps the noiseless expert's gripper further from the object while
    it goes round it (it only touches the object to push it towards the edge), and it still
    solves the push tasks."""
    n = 768
    env = TabletopEnv(n, split="all", task_families=("push",), num_cameras=0)
    tasks = torch.arange(n) % len(env.tasks)
    closest = {}
    for c in (0.04, 0.12):
        expert = ScriptedExpert(env, clearance=c)
        env.reset(seed=3, task_ids=tasks)
        succ = torch.zeros(n, dtype=torch.bool)
        near = torch.full((n,), float("inf"))
        behind = torch.zeros(n, dtype=torch.bool)
        # the episodes that start with the gripper on the goal side, less than 0.3 off the
        # object's line: it must go round the object
        rel0 = env.gripper - env.obj_pos[:, 0]
        nrm = torch.stack([-env.goal_dir[:, 1], env.goal_dir[:, 0]], 1)
        ahead = ((rel0 * env.goal_dir).sum(-1) > 0) & ((rel0 * nrm).sum(-1).abs() < 0.3)
        for _ in range(48):
            rel = env.gripper - env.obj_pos[:, 0]
            # before the gripper is behind the object (along the goal direction): going round
            behind |= (rel * env.goal_dir).sum(-1) < -0.1
            d = rel.norm(dim=-1)
            near = torch.where(behind, near, torch.minimum(near, d))
            succ |= env.step(expert.act()).info["success"]
        assert float(succ.float().mean()) >= 0.95, c
        assert int(ahead.sum()) >= 20
        closest[c] = near[ahead]
    # the closest approach while going round grows with the clearance
    assert float(closest[0.12].median()) > float(closest[0.04].median()) + 0.05
    with pytest.raises(ValueError, match="clearance"):
        ScriptedExpert(env, clearance=-0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_policy_rarely_succeeds(family):
    n = 384
    env = TabletopEnv(n, split="all", task_families=(family,), num_cameras=0)
    env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    rate = float(_run(env, lambda: torch.rand(n, 3, generator=g) * 2 - 1).float().mean())
    assert rate < 0.10, f"{family}: random success {rate:.3f}"


def test_instruction_matters_distractors_share_colour_and_shape():
    env = TabletopEnv(64, split="all", task_families=FAMILIES, num_cameras=0)
    env.reset(seed=0)
    col, shp = env.obj_colour, env.obj_shape
    pp = env.family != 2
    # pick_place / push: one distractor with the same colour, one with the same shape
    assert bool(((col[:, 1] == col[:, 0]) & (shp[:, 1] != shp[:, 0]))[pp].all())
    assert bool(((shp[:, 2] == shp[:, 0]) & (col[:, 2] != col[:, 0]))[pp].all())
    # stack: base cube of the target colour, distractor of another colour
    st = env.family == 2
    tgt = torch.tensor([t.target for t in env.tasks])[env.task_id]
    assert bool(((col[:, 1] == tgt) & (shp[:, 1] == 0))[st].all())
    assert bool(((col[:, 2] != tgt) & (col[:, 2] != col[:, 0]))[st].all())
    # pick_place: the target plate and a plate of another colour
    ppl = env.family == 0
    assert bool((env.plate_colour[:, 0] == tgt)[ppl].all())
    assert bool((env.plate_colour[:, 0] != env.plate_colour[:, 1]).all())


@pytest.mark.parametrize("d", [0, 1])
def test_fewer_distractors_variant(d):
    n = 96
    env = TabletopEnv(n, split="all", task_families=FAMILIES, num_distractors=d)
    obs = env.reset(seed=0, task_ids=torch.arange(n) % len(env.tasks))
    stack = env.family == 2
    expected = 1 + d + stack.long() - (stack & (d == 2)).long()
    assert torch.equal(env.obj_active.sum(1), expected.clamp_max(3))
    if d == 1:  # the remaining distractor shares the shape and differs in colour
        pp = ~stack
        assert bool(env.obj_active[pp, 2].all()) and not bool(env.obj_active[pp, 1].any())
        assert bool((env.obj_shape[pp, 2] == env.obj_shape[pp, 0]).all())
        assert bool((env.obj_colour[pp, 2] != env.obj_colour[pp, 0]).all())
    # absent objects are off the table: not drawn, never pushed or grasped
    parked = ~env.obj_active
    assert bool((env.obj_pos[parked].abs() > 5).all())
    full = TabletopEnv(n, split="all", task_families=FAMILIES)
    full_obs = full.reset(seed=0, task_ids=torch.arange(n) % len(env.tasks))
    assert torch.equal(env.obj_pos[~parked], full.obj_pos[~parked])
    assert bool((obs["images"] != full_obs["images"]).any())
    expert = ScriptedExpert(env)
    rate = float(_run(env, expert.act).float().mean())
    assert rate >= 0.95
    assert bool((env.obj_pos[parked].abs() > 5).all())
