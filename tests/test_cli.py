"""The command line's argument handling (the runs it starts are tested in tests/runners)."""

import pytest

from pirl import cli


def test_resume_passes_only_an_iteration_count_on(monkeypatch):
    """``pirl train --resume RUN rl.iterations=N`` extends the run; any other override, a
    --config or a non-integer count is refused before anything runs."""
    calls = []
    monkeypatch.setattr("pirl.runners.train.run", lambda **kw: calls.append(kw) or {})
    assert cli.main(["train", "--resume", "R"]) == 0
    assert cli.main(["train", "--resume", "R", "rl.iterations=80"]) == 0
    assert calls == [{"resume": "R", "iterations": None}, {"resume": "R", "iterations": 80}]
    for bad in (["rl.ppo.lr_policy=1e-4"], ["rl.iterations=80", "seed=1"],
                ["rl.iterations=80", "rl.iterations=90"], ["rl.iterations=8.5"]):
        with pytest.raises(SystemExit):
            cli.main(["train", "--resume", "R", *bad])
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", "R", "--config", "x.yaml"])
    assert len(calls) == 2
