"""Print the max abs difference between pirl and LeRobot's stored outputs, per stage and model,
in float32 and under bf16 autocast (the table in docs/models.md).  Runs in pirl's venv:

    .venv/bin/python tools/parity/measure_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))
import test_lerobot_parity as t  # noqa: E402  (the tests' loading / preprocessing path)

STAGES = ["state_norm", "image_0", "image_1", "image_2", "demo_actions_norm", "velocity_t1", "actions_3",
          "actions_10", "env_actions_10", "loss_per_element"]


def main() -> None:
    torch.set_num_threads(1)
    rows = {}
    for kind in t.KINDS:
        folder = t.ART / kind
        ref, meta = t.reference(folder)
        for prec in ("float32", "bf16"):
            pol = t.load(folder)
            pol.cfg.train.autocast_bf16 = prec == "bf16"
            got = t.stage_outputs(pol, ref, meta)
            for s in STAGES:
                rows.setdefault(s, {})[(kind, prec)] = ((got[s] - ref[s]).abs().max().item()
                                                        if s in got else float("nan"))
    cols = [(k, p) for k in t.KINDS for p in ("float32", "bf16")]
    print("| stage | " + " | ".join(f"{k} {p}" for k, p in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for s in STAGES:
        print(f"| {s} | " + " | ".join(f"{rows[s][c]:.1e}" for c in cols) + " |")


if __name__ == "__main__":
    main()
