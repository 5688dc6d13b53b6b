"""A real multi-node run, simulated on one machine: a Ray head and a second Ray node started as
separate processes (``ray start --head``, ``ray start --address=...`` with its own resources),
the tiny default recipe run with ``pirl train --cluster auto`` in the disaggregated placement
across both, the second node killed mid-RL, then ``pirl train --resume`` on a restored cluster.

Checked: the killed run stops with exit status 2 and one ``pirl: error:`` line naming the dead
worker; the checkpoint written before the kill still loads (sha256 verified) and holds the
iteration it was saved at; the resumed run ends with the same metrics, bit for bit, and the same
final weights as an uninterrupted run on the same cluster.

The head has 1 CPU and the defaults ask for 1.5, so the workers must use both nodes.  Marked
``slow`` and ``cluster`` (about 4 min on 2 shared cores): ``pytest -m cluster`` runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pirl.runners.placement import free_port
from tests.runners.tiny_run import TINY_RUN_OVERRIDES

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
RAY = Path(sys.executable).parent / "ray"
PIRL = Path(sys.executable).parent / "pirl"
RL_ITERS = 12


class Cluster:
    """Ray nodes as process groups of ``ray start --block`` (so that one node can be killed
    without ``ray stop``, which would stop every Ray on the machine)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS=self.address,
                        OMP_NUM_THREADS="1")
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, head: bool, cpus: int, name: str, worker_ports: int) -> subprocess.Popen:
        args = [str(RAY), "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}",
                f"--resources={json.dumps({name: 1})}", "--node-ip-address=127.0.0.1",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 499}"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}", f"--temp-dir={self.root}/ray"]
        else:
            args += [f"--address={self.address}"]
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.nodes.append(p)
        return p

    def wait_nodes(self, names: set[str], timeout: float = 180.0) -> None:
        """Wait until the alive nodes are exactly those started with ``names`` (a killed node
        stays "alive" until Ray's health check gives up on it)."""
        code = ("import ray, sys; ray.init(); sys.stdout.write(' '.join(sorted("
                "k for x in ray.nodes() if x['Alive'] for k in x['Resources'] if k in "
                f"{sorted(names | {'node2'})!r})))")
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            out = subprocess.run([sys.executable, "-c", code], env=self.env,
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.split() == sorted(names):
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray cluster did not reach the nodes {sorted(names)}")

    def kill(self, p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def shutdown(self) -> None:
        for p in self.nodes:
            self.kill(p)


def train(cluster: Cluster, *args: str, watch: Path | None = None, kill_after: int = 0,
          node=None) -> tuple[int, str, float]:
    """Run ``pirl train``; with ``watch``, kill ``node`` once the run's metrics file holds
    ``kill_after`` RL iterations.  Returns (exit status, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(PIRL), "train", *args], env=cluster.env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if watch is not None:
        while p.poll() is None:
            if watch.exists() and watch.read_text().count("rollout/success") >= kill_after:
                cluster.kill(node)
                break
            time.sleep(0.1)
    _, err = p.communicate(timeout=600)
    return p.returncode, err, time.monotonic() - t0


def rl_metrics(run_dir: Path) -> dict[float, dict]:
    """The RL metrics by env step (a resumed run's repeated iterations: the last entry)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "rollout/success" in d:
            out[d["step"]] = {k: v for k, v in d.items() if not k.startswith("perf/")}
    return out


def test_kill_a_node_mid_rl_then_resume_on_a_restored_cluster():
    import torch

    from pirl.runners.checkpoint import load_checkpoint

    root = Path(tempfile.mkdtemp(prefix="pirl_mn_", dir="/tmp"))  # short: Ray's socket paths
    cluster = Cluster(root)
    recipe = ["--cluster", "auto", "placement.mode=disaggregated", *TINY_RUN_OVERRIDES,
              f"rl.iterations={RL_ITERS}", "checkpoint_every=2", "threads=1"]
    try:
        cluster.start_node(head=True, cpus=1, name="head", worker_ports=23000)
        cluster.wait_nodes({"head"})
        node = cluster.start_node(head=False, cpus=2, name="node2", worker_ports=23500)
        cluster.wait_nodes({"head", "node2"})

        ref_dir, run_dir = root / "uninterrupted", root / "killed"
        rc, err, secs = train(cluster, *recipe, f"run_dir={ref_dir}")
        assert rc == 0, err[-2000:]
        print(f"uninterrupted run: {secs:.0f} s")

        rc, err, secs = train(cluster, *recipe, f"run_dir={run_dir}",
                              watch=run_dir / "metrics.jsonl", kill_after=3, node=node)
        errors = [line for line in err.splitlines() if line.startswith("pirl: error:")]
        print(f"killed run: exit {rc} after {secs:.0f} s\n" + "\n".join(errors))
        assert rc == 2 and len(errors) == 1, err[-2000:]
        assert "died" in errors[0] and "Traceback" not in err
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # verifies its sha256
        assert state["stage"] == "rl" and state["trainer"]["iter"] % 2 == 0
        assert 2 <= state["trainer"]["iter"] < RL_ITERS
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            json.loads(line)  # every line written is whole

        cluster.start_node(head=False, cpus=2, name="node2_restored", worker_ports=24000)
        cluster.wait_nodes({"head", "node2_restored"})
        rc, err, secs = train(cluster, "--resume", str(run_dir))
        print(f"resumed run: exit {rc} after {secs:.0f} s")
        assert rc == 0, err[-2000:]
    finally:
        cluster.shutdown()
    ref, got = rl_metrics(ref_dir), rl_metrics(run_dir)
    assert len(ref) == RL_ITERS and ref == got
    a = load_checkpoint(ref_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert b["stage"] == "done" and b["trainer"]["iter"] == RL_ITERS
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    assert (json.loads((ref_dir / "results.json").read_text())["final"]
            == json.loads((run_dir / "results.json").read_text())["final"])
