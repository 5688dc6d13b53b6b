"""Run logging: TensorBoard scalars, a JSON-lines metrics file, and success-over-training plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes each ``log(step, metrics)`` to TensorBoard (``RUN/tb``) and ``RUN/metrics.jsonl``."""

    def __init__(self, run_dir: str | Path, enabled_tb: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if enabled_tb:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        row = {"step": step}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                key = f"{prefix}{k}"
                row[key] = float(v)
                if self.tb is not None and math.isfinite(float(v)):
                    self.tb.add_scalar(key, float(v), step)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def hardware_info() -> dict[str, Any]:
    """What a run ran on, for its record (``invocations.jsonl``): CPU model, logical cores, torch's
    intra-op threads, the GPU's name (None without CUDA) and the torch version."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "torch": torch.__version__}


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_success(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """PNG of success rate over training env steps (train rollouts and evaluations per split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    out = Path(out or Path(run_dir) / "success.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in rows for k in r if k.endswith("success") and k.startswith(("rollout/", "eval/"))})
    for k in keys:
        pts = [(r.get("env_steps", r["step"]), r[k]) for r in rows if k in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys], marker="o" if k.startswith("eval/") else None,
                    ms=3, label=k)
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
