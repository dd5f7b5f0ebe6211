"""fedstream's side of ``scripts/bench_rounds.py``: a researcher process and N ``fednode start`` processes.

Everything runs on loopback WITHOUT TLS (``tls="insecure"``, ``fednode start --insecure``): the benchmark
measures the framework, and Flower's side runs insecure too. Each node gets a token from the server's
node store, a one-sample dataset tagged ``bench`` and ``--auto-approve`` (the plan is this repository's
``benchmarks/rounds_plan.py``). The researcher's memory is its own ``VmHWM`` over the rounds (exact peak);
a sampler also follows it as a cross-check.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rss import RssSampler

ROOT = Path(__file__).resolve().parents[1]
RESEARCHER = Path(os.environ.get("BENCH_RESEARCHER", Path(__file__).resolve().parent / "fedstream_researcher.py"))


@dataclass
class Measurement:
    """One framework's figures for one (params, nodes) configuration."""

    framework: str
    params: int
    nodes: int
    round_seconds: list[float]
    idle_rss: int
    peak_rss: int
    notes: dict = field(default_factory=dict)

    @property
    def median_seconds(self) -> float:
        rest = self.round_seconds[1:] or self.round_seconds
        return float(np.median(rest))

    @property
    def peak_above_idle(self) -> int:
        return max(self.peak_rss - self.idle_rss, 0)


def prepare(workdir: Path, nodes: int) -> list[tuple[Path, Path]]:
    """Enrol ``nodes`` nodes and register their dataset; return (node home, token file) pairs."""
    sys.path.insert(0, str(ROOT))
    from fednode.datasets import DatasetRegistry
    from fednode.home import db_path
    from fedserver.auth import NodeStore

    data = workdir / "bench.npz"
    np.savez(data, X=np.zeros((2, 1), dtype=np.float32), y=np.zeros(2, dtype=np.float32))
    store = NodeStore(workdir / "server" / "nodes.db")
    out = []
    for i in range(nodes):
        home = workdir / f"node{i}"
        home.mkdir(parents=True)
        token = home / "token"
        token.write_text(store.enroll(f"bench-{i}"))
        token.chmod(0o600)
        DatasetRegistry(db_path(home)).add("bench", data, tags=["bench"])
        out.append((home, token))
    return out


def run(params: int, nodes: int, rounds: int, workdir: Path, upload_buffer_mb: int = 0,
        accumulator: str = "float64", receive_window_kib: int = 0, timeout: float = 1800.0) -> Measurement:
    """One fedstream run of ``rounds`` FedAvg rounds of ``params`` float32 parameters with ``nodes`` nodes."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "server").mkdir(exist_ok=True)
    homes = prepare(workdir, nodes)
    out = workdir / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        log = files.enter_context(open(workdir / "researcher.log", "w"))
        researcher = subprocess.Popen(
            [sys.executable, str(RESEARCHER), "--home", str(workdir / "server"), "--nodes", str(nodes),
             "--params", str(params), "--rounds", str(rounds), "--out", str(out),
             "--upload-buffer-mb", str(upload_buffer_mb), "--accumulator", accumulator,
             "--receive-window-kib", str(receive_window_kib)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        sampler = RssSampler([researcher.pid]).start()
        try:
            line = researcher.stdout.readline() if researcher.stdout else ""
            if not line.startswith("PORT "):
                raise RuntimeError(f"researcher did not start (see {workdir / 'researcher.log'}): {line!r}")
            port = int(line.split()[1])
            for i, (home, token) in enumerate(homes):
                node_log = files.enter_context(open(home / "node.log", "w"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fednode", "start", "--home", str(home), "--server",
                     f"127.0.0.1:{port}", "--insecure", "--token-file", str(token), "--name", f"bench-{i}",
                     "--auto-approve"],
                    cwd=ROOT, stdout=node_log, stderr=subprocess.STDOUT, env=env))
            node_cpu = _node_cpu_during_rounds(researcher, [proc.pid for proc in procs], timeout)
            code = researcher.wait(timeout=timeout)
            if code != 0:
                raise RuntimeError(f"researcher exited with {code}; see {workdir / 'researcher.log'}")
        finally:
            sampler_peak = sampler.stop()
            if researcher.poll() is None:
                researcher.kill()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for proc in procs:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
    result = json.loads(out.read_text())
    return Measurement("fedstream", params, nodes, result["round_seconds"], result["idle_rss"], result["peak_rss"],
                       notes={"sampled_peak_rss": sampler_peak, "server_cpu_seconds": result["cpu_seconds"],
                              "nodes_cpu_seconds": node_cpu,
                              "round_internal_seconds": result["round_internal_seconds"]})


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _node_cpu_during_rounds(researcher: subprocess.Popen, pids: list[int], timeout: float) -> float:
    """CPU seconds the node processes spend between the researcher's ROUNDS START and ROUNDS END lines."""
    deadline = time.monotonic() + timeout
    start = None
    for line in researcher.stdout or ():
        if line.startswith("ROUNDS START"):
            start = sum(_cpu_seconds(pid) for pid in pids)
        elif line.startswith("ROUNDS END") and start is not None:
            return sum(_cpu_seconds(pid) for pid in pids) - start
        if time.monotonic() > deadline:
            break
    return float("nan")
