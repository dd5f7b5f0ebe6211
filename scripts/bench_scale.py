"""A thousand nodes against one FedServer: registration, one FedAvg round, every reply aggregated.

::

    python scripts/bench_scale.py                      # 1000 nodes in 4 processes, 100K params, 3 rounds
    python scripts/bench_scale.py --nodes 200 --procs 1 --rounds 1 --json out.json

The server (a real :class:`fedserver.FedServer`, port 0, insecure, tokens from ``NodeStore.enroll_many``)
and an :class:`fedserver.Experiment` (FedAvg, ``min_nodes`` = every node, SQLite history) run in this
process, which measures itself: round seconds, CPU seconds (``getrusage``) and peak RSS (``VmHWM``).
The nodes are real :class:`fednode.client.NodeClient` objects (real gRPC, one TCP connection each),
several hundred per worker process on one event loop, with an in-memory handler that returns the
received parameters plus 1e-3 as a valid :class:`fedcore.tasks.TrainResult`: the time is the framework's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore.tasks import PlanSource, TrainResult
from fedcore.wire import DatasetInfo
from fednode.client import NodeClient
from fednode.config import NodeConfig
from fednode.handler import ReceivedTask, TaskReply
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.server import FedServer

PLAN_NAME = "ScalePlan"
PLAN_SOURCE = '''
"""A linear model of ``model_args['n_features']`` float32 weights (plus one bias): only its size matters."""
import numpy as np
from fedcore.models import NumpyModel
from fedcore.plans import NumpyTrainingPlan


class ScalePlan(NumpyTrainingPlan):
    def init_model(self):
        return NumpyModel(n_features=int(self.model_args["n_features"]), n_outputs=1, dtype=np.float32)
'''
CHANGE = np.float32(1e-3)
TAG = "scale"


class ShiftHandler:
    """In-memory node work: reply with the received params plus ``CHANGE`` (a valid TrainResult)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def handle(self, task: ReceivedTask, reporter: Any) -> TaskReply:
        params = {name: value + CHANGE for name, value in task.payload["params"].items()}
        result = TrainResult(params=params, num_samples=self.num_samples, num_steps=1, lr=0.01)
        return TaskReply.succeeded(result.to_payload())


# -- measurements of this process ---------------------------------------------------------------------
def status_bytes(field: str) -> int:
    """A ``kB`` line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (one socket per node on each side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        raise SystemExit(f"RLIMIT_NOFILE is {soft} (hard {hard}); {needed} file descriptors are needed")
    return soft


# -- worker processes: many NodeClients on one event loop ------------------------------------------------
async def run_worker(port: int, tokens: dict[str, str], threads: int) -> None:
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="handler")
    clients = []
    for index, (node_id, token) in enumerate(sorted(tokens.items())):
        config = NodeConfig(server=f"127.0.0.1:{port}", tls="insecure", token=token, node_name=node_id,
                            poll_wait_seconds=30.0)
        dataset = DatasetInfo(name="d", tags=(TAG,), num_samples=10 + index % 7, shape=(1,), dtype="float32",
                              format="npz")
        clients.append(NodeClient(config, ShiftHandler(10 + index % 7), [dataset], ["numpy"], executor=executor))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [c.stop() for c in clients])
    try:
        await asyncio.gather(*(c.run() for c in clients))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    delivered = sum(c.results_delivered for c in clients)
    print(json.dumps({"pid": os.getpid(), "clients": len(clients), "delivered": delivered,
                      "cpu_s": round(cpu_seconds(), 2), "peak_rss_mb": round(status_bytes("VmHWM") / 2**20)}),
          flush=True)


def start_workers(port: int, tokens: dict[str, str], procs: int, threads: int, folder: Path) -> list[subprocess.Popen]:
    ids = sorted(tokens)
    workers = []
    for w in range(procs):
        part = {i: tokens[i] for i in ids[w::procs]}
        path = folder / f"tokens-{w}.json"
        path.write_text(json.dumps(part))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--port", str(port), "--tokens", str(path),
               "--threads", str(threads)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_TRACE")}
        workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    return workers


def stop_workers(workers: list[subprocess.Popen], timeout: float = 60.0) -> list[dict[str, Any]]:
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    stats = []
    for proc in workers:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        stats.append(json.loads(lines[-1]) if lines else {"pid": proc.pid, "returncode": proc.returncode})
    return stats


# -- the server side ---------------------------------------------------------------------------------------
async def run_bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    raise_nofile(args.nodes + 256)
    started = time.perf_counter()
    store = NodeStore(folder / "nodes.db")
    tokens = store.enroll_many([f"node-{i:04d}" for i in range(args.nodes)])
    enroll_s = time.perf_counter() - started
    config = ServerConfig(port=0, tls="insecure", max_concurrent_uploads=args.max_uploads, chunk_size=args.chunk_size)
    server = FedServer(config, store)
    port = await server.start()
    idle_rss = status_bytes("VmRSS")
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    workers = start_workers(port, tokens, args.procs, args.threads, folder)
    try:
        connected = await server.wait_for_nodes(args.nodes, timeout=args.timeout)
        register_s = time.perf_counter() - t0
        if len(connected) < args.nodes:
            raise SystemExit(f"only {len(connected)} of {args.nodes} nodes registered in {args.timeout:g} s")
        register_cpu = cpu_seconds() - cpu0
        round_marks: list[float] = []
        round_rss: list[int] = []

        def on_round(report: Any) -> None:
            round_marks.append(time.perf_counter())
            round_rss.append(status_bytes("VmRSS"))

        exp = Experiment(PlanSource.from_source(PLAN_NAME, PLAN_SOURCE), {"num_updates": 1, "lr": 0.01},
                         rounds=args.rounds, dataset_tags=[TAG], min_nodes=args.nodes, round_timeout=args.timeout,
                         node_wait_timeout=args.timeout, model_args={"n_features": args.params - 1},
                         history_db=folder / "history.db" if args.history else None, server=server,
                         on_round=on_round, progress=False)
        exp.params = exp.initial_params()  # built before the clock starts (the plan is not what we measure)
        cpu1 = cpu_seconds()
        t1 = time.perf_counter()
        reports = await exp.run_async()
        run_cpu = cpu_seconds() - cpu1
        marks = [t1, *round_marks]
        round_wall = [b - a for a, b in itertools.pairwise(marks)]
    finally:
        worker_stats = stop_workers(workers)
        await server.stop(grace=2.0)
    check_average(exp, reports, args)
    return {
        "nodes": args.nodes, "procs": args.procs, "params": args.params, "rounds": args.rounds,
        "enroll_s": round(enroll_s, 2), "register_s": round(register_s, 2), "register_cpu_s": round(register_cpu, 2),
        "round_s": [round(s, 2) for s in round_wall],
        "round_loop_s": [round(r.duration_s, 2) for r in reports],
        "aggregated": [len(r.succeeded) for r in reports],
        "server_cpu_s_rounds": round(run_cpu, 2), "server_cpu_s_total": round(cpu_seconds() - cpu0, 2),
        "server_idle_rss_mb": round(idle_rss / 2**20), "server_peak_rss_mb": round(status_bytes("VmHWM") / 2**20),
        "server_rss_after_round_mb": [round(rss / 2**20) for rss in round_rss],
        "workers": worker_stats,
    }


def check_average(exp: Experiment, reports: list, args: argparse.Namespace) -> None:
    """Every node's reply must be in the average: x_r = x_0 + r * CHANGE (all nodes add the same)."""
    for r, report in enumerate(reports, start=1):
        if len(report.succeeded) != args.nodes:
            raise SystemExit(f"round {r}: {len(report.succeeded)} of {args.nodes} replies aggregated")
    expected = np.float32(0)
    for _ in reports:
        expected = np.float32(expected + CHANGE)
    got = exp.params["coef"]
    if not np.allclose(got, expected, rtol=0, atol=1e-6):
        raise SystemExit(f"aggregated params are off: expected {expected}, got {got.min()}..{got.max()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4, help="worker processes hosting the node clients")
    parser.add_argument("--threads", type=int, default=2, help="handler threads per worker process")
    parser.add_argument("--params", type=int, default=100_000, help="float32 parameters of the model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-uploads", type=int, default=16, help="ServerConfig.max_concurrent_uploads")
    parser.add_argument("--chunk-size", type=int, default=1 << 20, help="ServerConfig.chunk_size (bytes)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-history", dest="history", action="store_false", help="no SQLite history")
    parser.add_argument("--log-level", default="ERROR", help="server log level (INFO: a line per node and outcome)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level if not args.worker else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.worker:
        raise_nofile(len(json.loads(args.tokens.read_text())) + 256)
        asyncio.run(run_worker(args.port, json.loads(args.tokens.read_text()), args.threads))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedstream-scale-") as tmp:
        result = asyncio.run(run_bench(args, Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
