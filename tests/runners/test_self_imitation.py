"""The success buffer of replayed self-imitation: which rows it keeps, its capacity, its
task-balanced draws and its state."""

import pytest
import torch

from pirl.runners.self_imitation import SuccessBuffer


def _rollout(t=3, n=4, offset=0.0):
    """Obs rows ``[t * n]`` whose state holds the row number (+ offset), chunks ``[t * n, 2, 1]``
    holding minus it."""
    rows = torch.arange(t * n, dtype=torch.float32) + offset
    obs = {"state": rows[:, None].repeat(1, 2), "instruction": [f"r{int(r)}" for r in rows]}
    actions = -rows[:, None, None].repeat(1, 2, 1)
    return obs, actions


def test_add_keeps_the_valid_rows_of_successful_episodes_per_task():
    obs, actions = _rollout()
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 2] = False  # env 2's episode ended after 2 chunk steps
    buf = SuccessBuffer(num_tasks=2, capacity_per_task=5)
    added = buf.add(obs, actions, valid, task_ids=torch.tensor([0, 1, 0, 1]),
                    success=torch.tensor([True, False, True, True]))
    assert added == 3 and len(buf) == 3
    assert buf.episodes_per_task().tolist() == [2, 1]
    (o0, a0), (o2, a2) = buf.episodes[0]
    # row = chunk step * N + env
    assert o0["state"][:, 0].tolist() == [0.0, 4.0, 8.0] and o0["instruction"] == ["r0", "r4", "r8"]
    assert o2["state"][:, 0].tolist() == [2.0, 6.0]
    assert a2[:, 0, 0].tolist() == [-2.0, -6.0]
    o3, _ = buf.episodes[1][0]
    assert o3["state"][:, 0].tolist() == [3.0, 7.0, 11.0]


def test_capacity_keeps_each_tasks_newest_episodes():
    buf = SuccessBuffer(num_tasks=2, capacity_per_task=2)
    valid = torch.ones(1, 2, dtype=torch.bool)
    for k in range(3):  # three rollouts, each with one success of task 0 and one of task 1
        obs, actions = _rollout(1, 2, offset=10.0 * k)
        buf.add(obs, actions, valid, torch.tensor([0, 1]), torch.tensor([True, True]))
    assert buf.episodes_per_task().tolist() == [2, 2]
    assert [float(o["state"][0, 0]) for o, _ in buf.episodes[0]] == [10.0, 20.0]
    assert [float(o["state"][0, 0]) for o, _ in buf.episodes[1]] == [11.0, 21.0]


def test_shortest_keeps_each_tasks_shortest_episodes_newest_first_among_equals():
    """keep="shortest": a full task keeps its episodes with the fewest chunk steps; of two of
    the same length the later one; the kept ones stay in the order they came."""
    buf = SuccessBuffer(num_tasks=1, capacity_per_task=2, keep="shortest")
    # four rollouts of one env each; episode lengths 3, 1, 2, 1 chunk steps
    for k, length in enumerate([3, 1, 2, 1]):
        obs, actions = _rollout(3, 1, offset=10.0 * k)
        valid = (torch.arange(3) < length)[:, None]
        buf.add(obs, actions, valid, torch.tensor([0]), torch.tensor([True]))
        lengths = [a.shape[0] for _, a in buf.episodes[0]]
        assert lengths == [[3], [3, 1], [1, 2], [1, 1]][k]
    # the two one-step episodes, the second rollout's then the fourth's
    assert [float(o["state"][0, 0]) for o, _ in buf.episodes[0]] == [10.0, 30.0]
    newest = SuccessBuffer(num_tasks=1, capacity_per_task=2)
    with pytest.raises(ValueError, match="kept its shortest episodes, not the newest"):
        newest.load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="keep must be one of"):
        SuccessBuffer(num_tasks=1, capacity_per_task=2, keep="longest")


def test_draws_are_balanced_over_tasks_not_episodes():
    """Task 0 holds 5 one-step episodes, task 1 one: each task is drawn with probability 1/2
    (4000 draws: standard error 0.008), and within task 0 every episode about equally."""
    buf = SuccessBuffer(num_tasks=3, capacity_per_task=8)
    obs, actions = _rollout(1, 6)
    buf.add(obs, actions, torch.ones(1, 6, dtype=torch.bool),
            torch.tensor([0, 0, 0, 0, 0, 1]), torch.ones(6, dtype=torch.bool))
    o, a = buf.draw(4000, torch.Generator().manual_seed(0))
    assert o["state"].shape == (4000, 2) and a.shape == (4000, 2, 1) and len(o["instruction"]) == 4000
    torch.testing.assert_close(a[:, 0, 0], -o["state"][:, 0])  # rows stay paired
    row = o["state"][:, 0].long()
    assert abs(float((row == 5).float().mean()) - 0.5) < 0.04
    per_episode = torch.bincount(row[row < 5], minlength=5).float() / 4000
    assert torch.all((per_episode - 0.1).abs() < 0.03), per_episode
    # the same generator state gives the same draw
    o2, _ = buf.draw(4000, torch.Generator().manual_seed(0))
    assert torch.equal(o2["state"], o["state"])


def test_state_dict_round_trip_and_errors():
    buf = SuccessBuffer(num_tasks=2, capacity_per_task=3)
    obs, actions = _rollout()
    buf.add(obs, actions, torch.ones(3, 4, dtype=torch.bool), torch.tensor([0, 1, 1, 0]),
            torch.tensor([True, True, False, False]))
    other = SuccessBuffer(num_tasks=2, capacity_per_task=3)
    other.load_state_dict(buf.state_dict())
    g = torch.Generator().manual_seed(1)
    d1 = buf.draw(16, g)
    d2 = other.draw(16, g.manual_seed(1))
    assert torch.equal(d1[0]["state"], d2[0]["state"]) and torch.equal(d1[1], d2[1])
    with pytest.raises(ValueError, match="3 tasks"):
        SuccessBuffer(num_tasks=3, capacity_per_task=3).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="capacity_per_task"):
        small = SuccessBuffer(num_tasks=2, capacity_per_task=1)
        buf.add(obs, actions, torch.ones(3, 4, dtype=torch.bool), torch.tensor([0, 0, 0, 0]),
                torch.ones(4, dtype=torch.bool))
        small.load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="empty"):
        SuccessBuffer(num_tasks=1, capacity_per_task=1).draw(4)
    with pytest.raises(ValueError, match="task id 2"):
        buf.add(obs, actions, torch.ones(3, 4, dtype=torch.bool), torch.tensor([0, 2, 0, 0]),
                torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 12 action rows"):
        buf.add(obs, actions[:5], torch.ones(3, 4, dtype=torch.bool), torch.zeros(4).long(),
                torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="capacity_per_task"):
        SuccessBuffer(num_tasks=1, capacity_per_task=0)
