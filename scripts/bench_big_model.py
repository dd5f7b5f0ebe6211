"""A 600M-parameter (2.4 GB float32) FedAvg round with 2 node processes, and the server's peak memory.

::

    python scripts/bench_big_model.py                           # 600M params, FedAverage(accumulator="param_dtype")
    python scripts/bench_big_model.py --accumulator float64     # the exact float64 sum: one more model of RSS
    python scripts/bench_big_model.py --params 50000000 --json out.json
    python scripts/bench_big_model.py --low-memory              # Experiment(low_memory=True): x released mid-round

The server (FedServer + Experiment, port 0, insecure) runs in this process and measures itself: peak RSS
from the kernel (``VmHWM``) and a 20 ms sampler that says when it was reached; the model is a plan whose
parameters are a few float32 arrays. Each node is a separate process running a real
:class:`fednode.client.NodeClient` whose in-memory handler adds 1e-3 to the received parameters in place
(views of the download buffer, no copy) and returns them as a :class:`fedcore.tasks.TrainResult`.

``--low-memory`` runs ``Experiment(low_memory=True, checkpoint_dir=...)`` (checkpoints in the temporary
folder): x is checkpointed as round 0 before the round and released once both nodes have downloaded it,
so the server holds about 2 models instead of 3. The output's ``mode`` says which ran.

Needs about 3x the model on the server (2x with ``--low-memory``) and 1x per node (some 12.5 GB of free
RAM at 600M parameters), and with ``--low-memory`` 2 models of free disk for the checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore.aggregators import FedAverage
from fedcore.tasks import PlanSource, TrainResult
from fedcore.wire import DatasetInfo, TaskKind
from fednode.client import NodeClient
from fednode.config import NodeConfig
from fednode.handler import ReceivedTask, TaskReply
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle

PLAN_NAME = "BigPlan"
PLAN_SOURCE = '''
"""A linear model plus extra float32 blocks: ``model_args['blocks']`` arrays of ``model_args['block']`` params."""
import numpy as np
from fedcore.models import NumpyModel
from fedcore.plans import NumpyTrainingPlan


class BigModel(NumpyModel):
    def __init__(self, blocks, block):
        super().__init__(n_features=block, n_outputs=1, dtype=np.float32)
        for i in range(blocks - 1):
            self._weights[f"block{i}"] = np.zeros(block, np.float32)


class BigPlan(NumpyTrainingPlan):
    def init_model(self):
        return BigModel(int(self.model_args["blocks"]), int(self.model_args["block"]))
'''
CHANGE = np.float32(1e-3)
TAG = "big"


class InPlaceShiftHandler:
    """Node work without copies: add ``CHANGE`` to the received arrays in place and send them back."""

    def handle(self, task: ReceivedTask, reporter: Any) -> TaskReply:
        params = task.payload["params"]
        for value in params.values():
            value += CHANGE
        return TaskReply.succeeded(TrainResult(params=params, num_samples=100, num_steps=1, lr=0.01).to_payload())


def status_bytes(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class RssSampler(threading.Thread):
    """Samples this process's resident memory every ``period`` seconds (``time.monotonic()`` stamps)."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        with open("/proc/self/statm", "rb") as statm:
            while not self._stop_event.is_set():
                statm.seek(0)
                self.samples.append((time.monotonic(), int(statm.read().split()[1]) * self._page))
                self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def at(self, when: float) -> int:
        """The last sample taken at or before ``when``."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else 0

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, int]:
        window = [(t, rss) for t, rss in self.samples if start <= t <= end]
        return max(window, key=lambda s: s[1]) if window else (0.0, 0)


class RecordingServer(FedServer):
    """A FedServer that keeps the handles it dispatches, to report each node's transfer times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handles: list[TaskHandle] = []

    def dispatch(self, node_id: str, kind: TaskKind, *args: Any, **kwargs: Any) -> TaskHandle:
        handle = super().dispatch(node_id, kind, *args, **kwargs)
        self.handles.append(handle)
        return handle


# -- node processes ----------------------------------------------------------------------------------------
async def run_node(port: int, node_id: str, token: str) -> None:
    config = NodeConfig(server=f"127.0.0.1:{port}", tls="insecure", token=token, node_name=node_id,
                        poll_wait_seconds=30.0, idle_stream_timeout_seconds=600.0)
    dataset = DatasetInfo(name="d", tags=(TAG,), num_samples=100, shape=(1,), dtype="float32", format="npz")
    client = NodeClient(config, InPlaceShiftHandler(), [dataset], ["numpy"])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, client.stop)
    await client.run()
    print(json.dumps({"node": node_id, "delivered": client.results_delivered,
                      "peak_rss_mb": round(status_bytes("VmHWM") / 2**20)}), flush=True)


def start_nodes(port: int, tokens: dict[str, str]) -> list[subprocess.Popen]:
    script = str(Path(__file__).resolve())
    return [subprocess.Popen([sys.executable, script, "--node", node_id, "--port", str(port), "--token", token],
                             stdout=subprocess.PIPE, text=True) for node_id, token in tokens.items()]


# -- the server side ---------------------------------------------------------------------------------------
async def run_bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    sampler = RssSampler()
    sampler.start()
    store = NodeStore(folder / "nodes.db")
    tokens = store.enroll_many([f"node-{i}" for i in range(args.nodes)])
    server = RecordingServer(ServerConfig(port=0, tls="insecure", max_upload_buffer_bytes=args.upload_buffer), store)
    port = await server.start()
    idle_rss = status_bytes("VmRSS")
    block = args.params // args.blocks
    exp = Experiment(PlanSource.from_source(PLAN_NAME, PLAN_SOURCE), {"num_updates": 1, "lr": 0.01},
                     aggregator=FedAverage(accumulator=args.accumulator), rounds=1, dataset_tags=[TAG],
                     min_nodes=args.nodes, round_timeout=args.timeout, node_wait_timeout=args.timeout,
                     model_args={"blocks": args.blocks, "block": block}, server=server, progress=False,
                     keep_round_params=False, low_memory=args.low_memory,
                     checkpoint_dir=folder / "ckpt" if args.low_memory else None)
    exp.params = exp.initial_params()
    model_bytes = sum(a.nbytes for a in exp.params.values())
    model_rss = status_bytes("VmRSS")
    procs = start_nodes(port, tokens)
    try:
        await server.wait_for_nodes(args.nodes, timeout=args.timeout)
        started = time.monotonic()
        reports = await exp.run_async()
        ended = time.monotonic()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        nodes = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            nodes.append(json.loads(lines[-1]) if lines else {"returncode": proc.returncode})
        await server.stop(grace=2.0)
        sampler.stop()
    got = exp.params
    expected = np.float32(np.float32(0) + CHANGE)
    for name, value in got.items():
        sample = value.reshape(-1)[:: max(1, value.size // 1000)]
        if not np.allclose(sample, expected, rtol=0, atol=1e-7):
            raise SystemExit(f"{name}: expected {expected}, got {sample.min()}..{sample.max()}")
    peak_hwm = status_bytes("VmHWM")
    peak_at, peak_sampled = sampler.peak(started, ended)
    events = []
    for handle in server.handles:
        for what, when in (("delivered", handle.delivered_at), ("upload started", handle.upload_started_at)):
            if when is not None:
                events.append({"node": handle.node_id, "event": what, "s": round(when - started, 2),
                               "server_rss_gb": round(sampler.at(when) / 1e9, 2)})
    events.sort(key=lambda e: e["s"])
    return {
        "mode": "low_memory" if args.low_memory else "normal",
        "params": sum(a.size for a in got.values()), "arrays": len(got), "model_gb": round(model_bytes / 1e9, 3),
        "accumulator": args.accumulator, "nodes": args.nodes, "upload_buffer_gb": round(args.upload_buffer / 1e9, 2),
        "round_s": round(reports[0].duration_s, 2), "run_s": round(ended - started, 2), "aggregated": len(reports[0].succeeded),
        "server_idle_rss_gb": round(idle_rss / 1e9, 3), "server_rss_with_model_gb": round(model_rss / 1e9, 3),
        "server_peak_rss_gb": round(peak_hwm / 1e9, 3), "peak_over_model": round(peak_hwm / model_bytes, 3),
        "peak_during_round_gb": round(peak_sampled / 1e9, 3), "peak_at_s": round(peak_at - started, 2),
        "events": events, "node_processes": nodes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=600_000_000, help="float32 parameters in total")
    parser.add_argument("--blocks", type=int, default=4, help="arrays the parameters are split into")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--accumulator", choices=("param_dtype", "float64"), default="param_dtype")
    parser.add_argument("--upload-buffer", type=int, default=ServerConfig.max_upload_buffer_bytes,
                        help="ServerConfig.max_upload_buffer_bytes (default: 4 GiB, one 2.4 GB upload at a time)")
    parser.add_argument("--low-memory", action="store_true",
                        help="Experiment(low_memory=True): release x once every node has it (checkpoints on)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.node:
        asyncio.run(run_node(args.port, args.node, args.token))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedstream-big-") as tmp:
        result = asyncio.run(run_bench(args, Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
