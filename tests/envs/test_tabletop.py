"""Tabletop env: API, determinism, auto-reset, fixed horizon, physics and success rules."""

import math

import pytest
import torch

from pirl.envs.base import ChunkedEnv
from pirl.envs.tabletop import ScriptedExpert, TabletopEnv, hash_uniform
from pirl.envs.tabletop import sim as S
from pirl.envs.tabletop.render import EDGE_RGB, PALETTE, PLATE_HALF, TABLE_RGB


def _rand_actions(t, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, n, 3, generator=g) * 2 - 1


def test_hash_uniform_is_a_pure_function_of_the_seed():
    seeds = torch.tensor([0, 1, 2, 123456789, 2**40 + 5])
    u = hash_uniform(seeds, 64)
    assert u.shape == (5, 64) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # the same seed in another batch position gives the same numbers
    u2 = hash_uniform(seeds.flip(0), 64).flip(0)
    assert torch.equal(u, u2)
    assert not torch.equal(u[0], u[1])
    big = hash_uniform(torch.arange(2000), 16).flatten()
    # mean and variance of U(0, 1): 1/2 and 1/12 (32000 draws: 5-sigma bounds)
    assert abs(float(big.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / big.numel())
    assert abs(float(big.var()) - 1 / 12) < 0.003


def test_observation_format():
    env = TabletopEnv(5, num_cameras=2, image_size=48)
    obs = env.reset(seed=0)
    assert obs["images"].shape == (5, 2, 3, 48, 48) and obs["images"].dtype == torch.uint8
    assert obs["state"].shape == (5, env.state_dim) and obs["state"].dtype == torch.float32
    assert obs["task_id"].dtype == torch.int64 and len(obs["instruction"]) == 5
    for tid, text in zip(obs["task_id"].tolist(), obs["instruction"]):
        assert env.instructions[tid] == text
    step = env.step(torch.zeros(5, 3))
    assert step.reward.shape == (5,) and step.info["success"].dtype == torch.bool
    assert env.render().shape == (5, 3, 48, 48)
    state_only = TabletopEnv(3, num_cameras=0)
    o = state_only.reset(seed=0)
    assert "images" not in o and state_only.render().shape == (3, 3, 64, 64)


def test_reset_is_deterministic_and_depends_on_task_and_seed_only():
    a, b = TabletopEnv(6, num_cameras=1), TabletopEnv(6, num_cameras=1)
    oa, ob = a.reset(seed=7), b.reset(seed=7)
    assert torch.equal(oa["images"], ob["images"]) and torch.equal(oa["task_id"], ob["task_id"])
    assert not torch.equal(oa["images"], a.reset(seed=8)["images"])
    # same (task, episode seed) in different batch positions and batch sizes: same start
    tasks, seeds = torch.tensor([3, 5, 3, 9]), torch.tensor([11, 11, 11, 12])
    c = TabletopEnv(4)
    oc = c.reset(task_ids=tasks, episode_seeds=seeds)
    assert torch.equal(oc["images"][0], oc["images"][2])
    d = TabletopEnv(1)
    od = d.reset(task_ids=torch.tensor([3]), episode_seeds=torch.tensor([11]))
    assert torch.equal(od["images"][0], oc["images"][0])
    assert torch.equal(d.obj_pos[0], c.obj_pos[2])


def test_trajectories_are_deterministic_with_auto_reset():
    acts = _rand_actions(60, 8)
    runs = []
    for _ in range(2):
        env = TabletopEnv(8, auto_reset=True, max_episode_steps=10)
        env.reset(seed=3)
        rec = []
        for a in acts:
            st = env.step(a)
            rec.append((st.obs["images"].clone(), st.reward.clone(), st.done.clone(),
                        st.obs["task_id"].clone()))
        runs.append(rec)
    for (i1, r1, d1, t1), (i2, r2, d2, t2) in zip(*runs):
        assert torch.equal(i1, i2) and torch.equal(r1, r2) and torch.equal(d1, d2)
        assert torch.equal(t1, t2)


def test_auto_reset_starts_the_drawn_episode_and_reports_the_finished_one():
    env = TabletopEnv(6, auto_reset=True, max_episode_steps=5)
    env.reset(seed=0)
    acts = _rand_actions(5, 6, seed=1)
    for i, a in enumerate(acts):
        st = env.step(a)
    assert bool(st.truncated.all()) and "final_obs" in st.info  # all time out at step 5
    assert torch.equal(st.info["episode_length"], torch.full((6,), 5))
    assert not torch.equal(st.info["final_obs"]["images"], st.obs["images"])
    # the returned obs is exactly the first obs of (new task, new episode seed)
    fresh = TabletopEnv(6)
    ref = fresh.reset(task_ids=env.task_id.clone(), episode_seeds=env.episode_seed.clone())
    assert torch.equal(ref["images"], st.obs["images"])
    assert torch.equal(ref["state"], st.obs["state"])
    assert ref["instruction"] == st.obs["instruction"]
    assert bool((env.elapsed == 0).all())
    # partial resets: expert solves some envs early; the others keep running
    env = TabletopEnv(16, auto_reset=True, max_episode_steps=48)
    expert = ScriptedExpert(env)
    env.reset(seed=1)
    for _ in range(48):
        before = env.elapsed.clone()
        st = env.step(expert.act())
        done = st.done
        if bool(done.any()) and not bool(done.all()):
            assert bool((env.elapsed[done] == 0).all())
            assert torch.equal(env.elapsed[~done], before[~done] + 1)
            assert torch.equal(st.info["episode_success"], st.info["success"] & done)
            assert torch.equal(st.info["episode_return"][done], st.reward[done])
            # not-done envs: final obs equals returned obs
            nd = ~done
            assert torch.equal(st.info["final_obs"]["images"][nd], st.obs["images"][nd])
            idx = done.nonzero()[:, 0]
            assert torch.equal(env.render_cameras(idx), st.obs["images"][idx])
            return
    pytest.fail("no partial reset happened")


def test_fixed_horizon_mode_freezes_finished_envs():
    env = TabletopEnv(32, auto_reset=False, num_cameras=1)
    expert = ScriptedExpert(env)
    env.reset(seed=2)
    for _ in range(48):
        st = env.step(expert.act())
    assert bool(st.done.all()) and bool(st.terminated.any())
    snap = {k: getattr(env, k).clone() for k in ("gripper", "obj_pos", "held", "closed")}
    img = st.obs["images"].clone()
    term, trunc = st.terminated.clone(), st.truncated.clone()
    for a in _rand_actions(5, 32, seed=9):
        st = env.step(a)
        assert torch.equal(st.reward, torch.zeros(32))
        assert not bool(st.info["success"].any())
        assert torch.equal(st.terminated, term) and torch.equal(st.truncated, trunc)
    for k, v in snap.items():
        assert torch.equal(getattr(env, k), v)
    assert torch.equal(st.obs["images"], img)
    # a new reset un-freezes
    env.reset(seed=3)
    assert not bool(env.step(torch.zeros(32, 3)).done.any())


def _single(family="pick_place", **kw):
    env = TabletopEnv(1, task_families=(family,), split="all", num_cameras=0, **kw)
    env.reset(seed=0)
    env.obj_pos[:] = torch.tensor([[[0.0, 0.0], [-0.6, 0.6], [0.6, 0.6]]])
    env.plate_pos[:] = torch.tensor([[[0.5, -0.5], [-0.5, -0.5]]])
    env.gripper[:] = torch.tensor([[0.0, -0.5]])
    env.held[:] = -1
    env.closed[:] = False
    return env


def test_push_moves_object_to_contact_distance():
    env = _single()
    # gripper at (0, -0.5) moving up by 0.1 per step: first contact when the gap < 0.16
    for k in range(4):
        env.step(torch.tensor([[0.0, 1.0, -1.0]]))
    # after 4 steps the gripper is at y = -0.1; object (centre 0) is 0.1 away < 0.16: pushed
    assert torch.allclose(env.gripper, torch.tensor([[0.0, -0.1]]), atol=1e-6)
    assert torch.allclose(env.obj_pos[0, 0], torch.tensor([0.0, -0.1 + S.CONTACT_DISTANCE]),
                          atol=1e-6)
    # oblique contact: the object slides along the motion (up) until it touches the gripper,
    # keeping its lateral offset 0.1: it ends sqrt(C^2 - 0.1^2) above the gripper centre
    env = _single()
    env.gripper[:] = torch.tensor([[-0.1, -0.2]])
    env.step(torch.tensor([[0.0, 1.0, -1.0]]))  # gripper -> (-0.1, -0.1)
    expect = torch.tensor([0.0, -0.1 + math.sqrt(S.CONTACT_DISTANCE ** 2 - 0.1 ** 2)],
                          dtype=torch.float64)
    assert torch.allclose(env.obj_pos[0, 0].double(), expect, atol=1e-6)
    assert abs(float((env.obj_pos[0, 0] - env.gripper[0]).norm()) - S.CONTACT_DISTANCE) < 1e-6
    # a diagonal push moves the object along the diagonal
    env = _single()
    env.gripper[:] = torch.tensor([[-0.15, -0.15]])
    env.step(torch.tensor([[0.5, 0.5, -1.0]]))  # gripper -> (-0.1, -0.1), on the diagonal
    c = S.CONTACT_DISTANCE / math.sqrt(2)
    assert torch.allclose(env.obj_pos[0, 0].double(),
                          torch.tensor([-0.1 + c, -0.1 + c], dtype=torch.float64), atol=1e-6)
    # moving away from an overlapping object does not drag it
    before = env.obj_pos.clone()
    env.step(torch.tensor([[0.0, -1.0, -1.0]]))
    assert torch.equal(env.obj_pos, before)


def test_grasp_carry_release_and_pick_place_success():
    env = _single()
    env.gripper[:] = torch.tensor([[0.0, -0.15]])  # within grasp radius of the object
    st = env.step(torch.tensor([[0.0, 0.0, 1.0]]))  # close
    assert int(env.held) == 0 and torch.allclose(env.obj_pos[0, 0], env.gripper[0])
    assert float(st.obs["state"][0, 3]) == 1.0  # holding flag
    for _ in range(5):  # carry to the plate at (0.5, -0.5): +0.1 x, -0.07 y per step
        st = env.step(torch.tensor([[1.0, -0.7, 1.0]]))
        assert torch.allclose(env.obj_pos[0, 0], env.gripper[0])
        assert not bool(st.info["success"])  # held: not yet placed
    st = env.step(torch.tensor([[0.0, 0.0, -1.0]]))  # open on the plate
    assert int(env.held) == -1 and bool(st.info["success"]) and bool(st.terminated)
    assert float(st.reward) == 1.0
    # closing with nothing within reach grasps nothing; staying closed does not grasp later
    env = _single()
    env.step(torch.tensor([[0.0, 0.0, 1.0]]))  # gripper 0.5 away
    assert int(env.held) == -1
    env.gripper[:] = torch.tensor([[0.0, -0.15]])
    env.step(torch.tensor([[0.0, 0.0, 1.0]]))
    assert int(env.held) == -1


def test_carrying_gripper_does_not_push_and_release_off_plate_fails():
    env = _single()
    env.gripper[:] = torch.tensor([[-0.6, 0.45]])  # near distractor 1 at (-0.6, 0.6)
    env.step(torch.tensor([[0.0, 0.0, 1.0]]))
    assert int(env.held) == 1  # grasps the nearest object (the distractor)
    other = env.obj_pos[0, 0].clone()
    env.gripper[:] = torch.tensor([[0.0, -0.3]])
    env.obj_pos[0, 1] = env.gripper[0]
    env.step(torch.tensor([[0.0, 1.0, 1.0]]))  # carry through the task object
    assert torch.equal(env.obj_pos[0, 0], other)
    st = env.step(torch.tensor([[0.0, 0.0, -1.0]]))
    assert not bool(st.info["success"])


def test_push_and_stack_success_rules():
    env = _single("push")
    env.goal_dir[:] = torch.tensor([[-1.0, 0.0]])
    env.obj_pos[0, 0] = torch.tensor([-0.6, 0.0])
    env.gripper[:] = torch.tensor([[-0.33, 0.0]])
    c = S.CONTACT_DISTANCE
    for k, succ in enumerate([False, False, True]):  # gripper -0.43, -0.53, -0.63
        st = env.step(torch.tensor([[-1.0, 0.0, -1.0]]))
        assert abs(float(env.obj_pos[0, 0, 0]) - (-0.43 - 0.1 * k - c)) < 1e-5
        assert bool(st.info["success"]) == succ
    assert float(env.obj_pos[0, 0, 0]) < -S.EDGE_ZONE
    env = _single("stack")
    env.gripper[:] = torch.tensor([[0.0, -0.15]])
    env.step(torch.tensor([[0.0, 0.0, 1.0]]))
    assert int(env.held) == 0
    env.gripper[:] = env.obj_pos[0, 1] + torch.tensor([0.05, 0.0])
    env.obj_pos[0, 0] = env.gripper[0]
    st = env.step(torch.tensor([[0.0, 0.0, -1.0]]))
    assert bool(st.info["success"])  # 0.05 < STACK_TOLERANCE


def test_dense_reward_is_potential_based():
    env = TabletopEnv(64, reward="dense", dense_scale=0.5, num_cameras=0, auto_reset=False,
                      task_families=("pick_place", "push", "stack"), split="all")
    expert = ScriptedExpert(env, noise=0.3, generator=torch.Generator().manual_seed(0))
    env.reset(seed=0)
    # phi = -(|gripper - object| [not held] + goal distance), in float64 from the raw state
    def phi():
        g, o = env.gripper.double(), env.obj_pos[:, 0].double()
        reach = (g - o).norm(dim=-1) * (env.held != 0)
        plate = (o - env.plate_pos[:, 0].double()).norm(dim=-1)
        edge = (S.EDGE_ZONE - (o * env.goal_dir.double()).sum(-1)).clamp_min(0)
        stack = (o - env.obj_pos[:, 1].double()).norm(dim=-1)
        goal = torch.where(env.family == 1, edge, torch.where(env.family == 2, stack, plate))
        return -(reach + goal)
    phi0 = phi()
    total = torch.zeros(64, dtype=torch.float64)
    succ = torch.zeros(64, dtype=torch.bool)
    for _ in range(48):
        st = env.step(expert.act())
        total += st.reward.double()
        succ |= st.info["success"]
    expect = succ.double() + 0.5 * (phi() - phi0)
    assert torch.allclose(total, expect, atol=1e-4)


def test_progress_reward_shapes_the_goal_distance_only():
    """``reward="progress"``: per step, success + dense_scale * (decrease of the object's goal
    distance), from the raw state in float64; pushing the object away from its goal costs."""
    env = TabletopEnv(64, reward="progress", dense_scale=0.5, num_cameras=0, auto_reset=False,
                      task_families=("pick_place", "push", "stack"), split="all")
    expert = ScriptedExpert(env, noise=0.3, generator=torch.Generator().manual_seed(1))
    env.reset(seed=1)

    def goal_distance():
        o = env.obj_pos[:, 0].double()
        plate = (o - env.plate_pos[:, 0].double()).norm(dim=-1)
        edge = (S.EDGE_ZONE - (o * env.goal_dir.double()).sum(-1)).clamp_min(0)
        stack = (o - env.obj_pos[:, 1].double()).norm(dim=-1)
        return torch.where(env.family == 1, edge, torch.where(env.family == 2, stack, plate))

    moved_away = 0
    for _ in range(48):
        d0 = goal_distance()
        active = ~(env.terminated | env.truncated)
        st = env.step(expert.act())
        expect = (st.info["success"].double() + 0.5 * (d0 - goal_distance())) * active
        torch.testing.assert_close(st.reward.double(), expect, atol=1e-5, rtol=0)
        moved_away += int(((goal_distance() > d0 + 1e-3) & active).sum())
    assert moved_away > 0  # the noisy expert sometimes moves an object away: a negative reward
    with pytest.raises(ValueError, match="progress"):
        TabletopEnv(4, reward="shaped")


def test_chunked_env_accounting_matches_single_steps():
    n, h = 24, 8
    ref = TabletopEnv(n, num_cameras=0)
    expert = ScriptedExpert(ref, noise=0.1, generator=torch.Generator().manual_seed(4))
    ref.reset(seed=5)
    acts, rews, succs, dones = [], [], [], []
    for _ in range(48):
        a = expert.act()
        st = ref.step(a)
        acts.append(a), rews.append(st.reward), succs.append(st.info["success"])
        dones.append(st.done)
    acts, rews = torch.stack(acts, 1), torch.stack(rews, 1)  # [N, T, 3], [N, T]
    first_done = torch.stack(dones, 1).float().argmax(1)  # index of the episode's last step
    chunked = ChunkedEnv(TabletopEnv(n, num_cameras=1))
    chunked.reset(seed=5)
    total_steps = torch.zeros(n, dtype=torch.long)
    for c in range(48 // h):
        out = chunked.step_chunk(acts[:, c * h:(c + 1) * h], record=True)
        lo = c * h
        # envs still running when the chunk starts (ChunkedEnv counts one step for envs that
        # were already frozen before the chunk; the rollout masks those)
        live = first_done >= lo
        alive_steps = (first_done - lo + 1).clamp(0, h)
        assert torch.equal(out.steps[live], alive_steps[live])
        t = torch.arange(lo, lo + h)
        in_chunk = (t[None, :] <= first_done[:, None]).float()
        assert torch.allclose(out.reward, (rews[:, lo:lo + h] * in_chunk).sum(1))
        ended = (first_done >= lo) & (first_done < lo + h)
        assert torch.equal(out.done & live, ended)
        succ_in = torch.stack(succs, 1)[:, lo:lo + h].any(1)
        assert torch.equal(out.success, succ_in)
        assert len(out.frames) >= 1 and out.frames[0].shape == (n, 3, 64, 64)
        total_steps += torch.where(live, out.steps, 0)
    assert torch.equal(total_steps, first_done + 1)
    assert torch.equal(chunked.env.episode_return, rews.sum(1))


def test_rendering_colours_and_subset_rendering():
    env = TabletopEnv(4, num_cameras=2, image_size=64, task_families=("pick_place",))
    env.reset(seed=0)
    img = env.render_cameras()
    s = 64
    for i in range(4):
        top = img[i, 0]
        # plate centre pixel has the plate fill colour (objects are not on plates at reset)
        for p in range(2):
            x, y = env.plate_pos[i, p].tolist()
            r, c = int((1 - y) / 2 * s), int((x + 1) / 2 * s)
            col = PALETTE[["red", "green", "blue", "yellow"][int(env.plate_colour[i, p])]]
            fill = tuple(round(0.4 * a + 0.6 * 255) for a in col)
            assert tuple(top[:, r, c].tolist()) == fill
            # a plate covers (2 * floor(0.2 * 32) + 1)^2 = 169 pixels of its two colours
        for j in range(3):  # object centre pixel has its colour
            x, y = env.obj_pos[i, j].tolist()
            r, c = int((1 - y) / 2 * s), int((x + 1) / 2 * s)
            col = PALETTE[["red", "green", "blue", "yellow"][int(env.obj_colour[i, j])]]
            assert tuple(top[:, r, c].tolist()) == col
        assert tuple(top[:, s // 2 - 1 + 0, 0].tolist()) != TABLE_RGB  # edge band at x = -1
    # count the plate pixels in an otherwise empty scene
    env.obj_pos[:] = 5.0  # off the table: not drawn
    env.gripper[:] = 5.0
    empty = env.render_cameras()[:, 0]
    k = math.floor(PLATE_HALF * s / 2)
    bg = [torch.tensor(c, dtype=torch.uint8)[:, None, None] for c in (TABLE_RGB, EDGE_RGB)]
    plate_px = (empty != bg[0]).any(1) & (empty != bg[1]).any(1)  # [N, S, S]
    for i in range(4):
        assert int(plate_px[i].sum()) == 2 * (2 * k + 1) ** 2
    # rendering a subset equals the subset of the full rendering
    env.reset(seed=1)
    idx = torch.tensor([3, 1])
    assert torch.equal(env.render_cameras(idx), env.render_cameras()[idx])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    envs = [TabletopEnv(64, num_cameras=2, device=d, task_families=("pick_place", "push", "stack"),
                        split="all") for d in ("cpu", "cuda")]
    obs = [e.reset(seed=0) for e in envs]
    assert torch.equal(obs[0]["images"], obs[1]["images"].cpu())
    experts = [ScriptedExpert(e) for e in envs]
    for _ in range(20):
        steps = [e.step(x.act()) for e, x in zip(envs, experts)]
    assert torch.allclose(envs[0].obj_pos, envs[1].obj_pos.cpu(), atol=1e-4)
    same = (steps[0].obs["images"] == steps[1].obs["images"].cpu()).float().mean()
    assert float(same) > 0.99


def test_scene_points_name_the_object_the_place_and_the_gripper():
    """scene_points [N, 3, 2]: the task object, the named place (target plate / base cube /
    the named edge's middle), the gripper; checked against the layout per family."""
    from pirl.envs.tabletop import TabletopEnv
    from pirl.envs.tabletop.tasks import EDGE_DIRECTIONS, EDGES

    env = TabletopEnv(256, split="all", task_families=("pick_place", "push", "stack"), seed=0)
    env.reset(seed=1)
    pts = env.scene_points()
    assert pts.shape == (256, 3, 2)
    torch.testing.assert_close(pts[:, 0], env.obj_pos[:, 0])
    torch.testing.assert_close(pts[:, 2], env.gripper)
    seen = set()
    for i in range(256):
        task = env.tasks[int(env.task_id[i])]
        seen.add(task.family)
        if task.family == "pick_place":
            want = env.plate_pos[i, 0]
            assert int(env.plate_colour[i, 0]) == task.target
        elif task.family == "stack":
            want = env.obj_pos[i, 1]
            assert int(env.obj_colour[i, 1]) == task.target
        else:
            want = torch.tensor(EDGE_DIRECTIONS[task.target], dtype=pts.dtype)
            assert task.instruction.endswith(f"{EDGES[task.target]} edge")
        torch.testing.assert_close(pts[i, 1], want)
    assert seen == {"pick_place", "push", "stack"}
