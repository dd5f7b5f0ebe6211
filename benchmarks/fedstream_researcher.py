"""The researcher process of the fedstream benchmark: a FedServer and an Experiment of ``--rounds`` FedAvg rounds.

Started by :mod:`benchmarks.fedstream_rounds` (one process, so its memory is the server's alone). It prints
``PORT <n>`` once listening, waits for ``--nodes`` nodes, resets its peak RSS (``VmHWM``) and records its
idle RSS, prints ``ROUNDS START``, runs the rounds, prints ``ROUNDS END`` and writes a JSON summary to
``--out``: seconds per round (each round from the end of the previous one, so between-round work
counts), idle RSS, peak RSS and CPU seconds during the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rounds_plan import BenchPlan
from rss import peak_bytes, reset_peak, rss_bytes

from fedcore.aggregators import FedAverage
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.rounds import RoundReport
from fedserver.server import FedServer

TRAINING_ARGS = {"num_updates": 1, "batch_size": 1, "lr": 1e-3, "shuffle": False}


async def researcher(args: argparse.Namespace) -> dict:
    limits = {"max_upload_buffer_bytes": args.upload_buffer_mb << 20} if args.upload_buffer_mb else {}
    if args.receive_window_kib:
        limits["receive_window_bytes"] = args.receive_window_kib << 10
    config = ServerConfig(address="127.0.0.1", port=args.port, tls="insecure", max_poll_wait_seconds=30.0, **limits)
    server = FedServer(config, NodeStore(args.home / "nodes.db"))
    port = await server.start()
    print(f"PORT {port}", flush=True)
    try:
        await server.wait_for_nodes(args.nodes, timeout=120.0)
        ends: list[float] = []
        internal: list[float] = []

        def on_round(report: RoundReport) -> None:
            ends.append(time.perf_counter())
            internal.append(report.duration_s)
            if len(report.succeeded) != args.nodes:
                raise SystemExit(f"round {report.round}: only {report.succeeded} replied")

        exp = Experiment(BenchPlan, TRAINING_ARGS, aggregator=FedAverage(accumulator=args.accumulator),
                         rounds=args.rounds, dataset_tags=["bench"], min_nodes=args.nodes, round_timeout=300.0,
                         node_wait_timeout=120.0, model_args={"num_params": args.params}, name="bench",
                         server=server, on_round=on_round, progress=False, keep_round_params=False)
        # idle = the server up, the nodes connected and the initial model built, as run() would build it
        exp.params = {k: np.array(v, copy=True) for k, v in exp.initial_params().items()}
        await asyncio.sleep(0.5)  # let the nodes' first long polls settle
        reset_peak()
        idle = rss_bytes()
        print("ROUNDS START", flush=True)
        cpu0, started = time.process_time(), time.perf_counter()
        await exp.run_async()
        cpu = time.process_time() - cpu0
        peak = peak_bytes()
        print("ROUNDS END", flush=True)
        rounds = [b - a for a, b in zip([started, *ends], ends)]
        return {"round_seconds": rounds, "round_internal_seconds": internal, "idle_rss": idle, "peak_rss": peak,
                "cpu_seconds": cpu}
    finally:
        await server.stop(grace=2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--accumulator", default="float64", help="FedAverage(accumulator=...)")
    ap.add_argument("--receive-window-kib", type=int, default=0,
                    help="ServerConfig.receive_window_bytes in KiB (0: its default, auto)")
    ap.add_argument("--upload-buffer-mb", type=int, default=0,
                    help="ServerConfig.max_upload_buffer_bytes in MiB (0: the server's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedserver.server").setLevel(logging.ERROR)  # the insecure-mode warning, known here
    result = asyncio.run(researcher(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
