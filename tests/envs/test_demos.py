"""Demo generation, the parquet layout, round trip, few-shot selection and SFT chunks."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from pirl.envs.demos import generate_demos, load_demos
from pirl.envs.tabletop import TabletopEnv


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    return generate_demos("tabletop", episodes_per_task=2, out_dir=out, seed=3, noise=0.1,
                          num_envs=96,
                          env_kwargs={"task_families": ("pick_place",), "num_cameras": 2,
                                      "image_size": 32})


def test_layout_and_counts(demo_dir):
    info = json.loads((demo_dir / "meta" / "info.json").read_text())
    assert info["total_tasks"] == 36 and info["total_episodes"] == 72
    assert info["image_keys"] == ["observation.images.top", "observation.images.wrist"]
    data = pq.read_table(demo_dir / info["data_path"])
    assert data.num_rows == info["total_frames"]
    assert {"index", "episode_index", "frame_index", "timestamp", "task_index", "action",
            "observation.state", "next.reward", "next.done",
            "next.success"} <= set(data.column_names)
    d = load_demos(demo_dir)
    assert d.num_episodes == 72 and set(d.episodes_per_task().values()) == {2}
    assert bool(d.ep_success.all())  # only successful demos are kept
    assert d.images.shape == (len(d), 2, 3, 32, 32) and d.images.dtype == torch.uint8
    # the reward column marks success on each episode's last frame only
    last = d.ep_start + d.ep_length - 1
    assert torch.equal(d.reward[last], torch.ones(72)) and float(d.reward.sum()) == 72


def test_round_trip_reproduces_the_episodes(demo_dir):
    """Replaying the stored (task, seed, actions) in a fresh env reproduces obs and success."""
    d = load_demos(demo_dir)
    env = TabletopEnv(4, task_families=("pick_place",), num_cameras=2, image_size=32)
    eps = torch.tensor([0, 17, 40, 71])
    env.reset(task_ids=d.ep_task[eps], episode_seeds=d.ep_seed[eps])
    obs = env._obs
    for t in range(int(d.ep_length[eps].max())):
        frames = d.ep_start[eps] + t
        live = t < d.ep_length[eps]
        assert torch.equal(obs["images"][live], d.images[frames[live]])
        assert torch.equal(obs["state"][live], d.state[frames[live]])
        act = d.actions[frames.clamp_max(len(d) - 1)]
        st = env.step(act)
        obs = st.obs
        ended = t == d.ep_length[eps] - 1
        assert bool(st.info["success"][ended].all())


def test_generation_is_deterministic(demo_dir, tmp_path):
    again = generate_demos("tabletop", episodes=2, out_dir=tmp_path / "b", seed=3, noise=0.1,
                           num_envs=96, env_kwargs={"task_families": ("pick_place",),
                                                    "num_cameras": 2, "image_size": 32})
    a, b = load_demos(demo_dir), load_demos(again)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.images, b.images)


def test_few_shot_and_action_chunks(demo_dir):
    d = load_demos(demo_dir)
    one = d.few_shot(1)
    assert one.num_episodes == 36 and set(one.episodes_per_task().values()) == {1}
    rnd = d.few_shot(1, seed=0)
    assert rnd.num_episodes == 36
    # hand-check chunks against a per-frame python loop (last-action and zero padding)
    h = 8
    frames = torch.arange(len(one))
    chunks, mask = one.action_chunks(frames, h, pad="last")
    zchunks, zmask = one.action_chunks(frames, h, pad="zero")
    assert torch.equal(mask, zmask)
    for f in [0, 5, int(one.ep_length[0]) - 1, int(one.ep_length[0]), len(one) - 1]:
        e = int(one.episode_index[f])
        end = int(one.ep_start[e] + one.ep_length[e])
        for i in range(h):
            if f + i < end:
                assert mask[f, i] and torch.equal(chunks[f, i], one.actions[f + i])
                assert torch.equal(zchunks[f, i], one.actions[f + i])
            else:
                assert not mask[f, i] and torch.equal(chunks[f, i], one.actions[end - 1])
                assert torch.equal(zchunks[f, i], torch.zeros(3))
    obs, acts, msk = one.sample_batch(16, h, generator=torch.Generator().manual_seed(0))
    assert acts.shape == (16, h, 3) and msk.shape == (16, h)
    assert obs["images"].shape == (16, 2, 3, 32, 32)
    assert obs["instruction"] == [one.instructions[t] for t in obs["task_id"].tolist()]
    # the lead's call: every frame of the first K episodes per task
    obs, acts, msk = d.sft_samples(horizon=h, episodes_per_task=1)
    assert torch.equal(acts, chunks) and torch.equal(msk, mask)
    assert torch.equal(obs["images"], one.images)


def test_maniskill_env_names_dispatch_to_motion_planning(monkeypatch, tmp_path):
    """``generate_demos`` (what ``pirl train`` calls) sends ManiSkill env names to the
    motion-planning demo generator with the env's task list and observation settings."""
    import sys
    import types

    from pirl.envs.demos import maniskill_demo_tasks

    assert maniskill_demo_tasks("maniskill/PushCube-v1") == ["PushCube-v1"]
    assert maniskill_demo_tasks("maniskill") == ["PickCube-v1"]
    assert maniskill_demo_tasks("maniskill", env_kwargs={"tasks": ["A", "B"]}) == ["A", "B"]
    assert maniskill_demo_tasks("maniskill_multitask",
                                env_kwargs={"tasks": ["PushCube-v1"]}) == ["PushCube-v1"]
    assert maniskill_demo_tasks("maniskill_multitask/test_unseen") == ["PullCube-v1"]
    calls = []

    def fake(tasks, episodes_per_task, out_dir, seed=0, **kw):
        calls.append((tasks, episodes_per_task, seed, kw))
        return out_dir, {}

    fake_mod = types.ModuleType("pirl.envs.maniskill_demos")
    fake_mod.generate_maniskill_demos = fake
    monkeypatch.setitem(sys.modules, "pirl.envs.maniskill_demos", fake_mod)
    out = generate_demos("maniskill_multitask", episodes_per_task=3, out_dir=tmp_path, seed=7,
                         env_kwargs={"tasks": ["PushCube-v1"], "obs_mode": "state",
                                     "sim_backend": "cpu", "reward_mode": "sparse"})
    assert out == tmp_path
    assert calls == [(["PushCube-v1"], 3, 7, {"obs_mode": "state"})]


def test_cli_demos_passes_env_kwargs(monkeypatch, tmp_path):
    """``pirl demos --kwarg KEY=VALUE`` reaches generate_demos as env_kwargs (YAML values)."""
    import pirl.envs.demos as D
    from pirl.cli import main

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return kw["out_dir"]

    monkeypatch.setattr(D, "generate_demos", fake)
    assert main(["demos", "--env", "maniskill/PushCube-v1", "--episodes", "3", "--out",
                 str(tmp_path), "--kwarg", "obs_mode=state", "--kwarg", "image_size=64"]) == 0
    assert seen["env_name"] == "maniskill/PushCube-v1" and seen["episodes_per_task"] == 3
    assert seen["env_kwargs"] == {"obs_mode": "state", "image_size": 64}
