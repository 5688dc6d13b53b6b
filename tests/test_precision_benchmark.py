"""benchmarks/precision_speed.py runs its eager variants end to end on a small batch."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_precision_speed_runs_small():
    spec = importlib.util.spec_from_file_location("precision_speed",
                                                  ROOT / "benchmarks" / "precision_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    med = mod.main(["--num-envs", "8", "--minibatch", "16", "--rounds", "2", "--threads", "1",
                    "--variants", "fp32", "bf16", "fp32_channels_last"])
    assert list(med) == ["fp32", "bf16", "fp32_channels_last"]
    for cells in med.values():
        assert set(cells) == {"rollout", "update", "pretrain"}
        assert all(ms > 0 for ms in cells.values())
