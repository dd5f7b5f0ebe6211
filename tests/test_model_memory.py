"""Server memory of a FedAvg round on a big model: global model + one sum + one upload, nothing per reply.

``scripts/bench_big_model.py`` runs the 600M-parameter (2.4 GB) figure. Here a 25M-parameter (100 MB)
round with 2 node processes (the script's node mode), uploads received one at a time
(``max_upload_buffer_bytes`` = one model) and ``FedAverage(accumulator="param_dtype")``.

What is measured is what the bound means: the model-sized buffers the server allocates during the round
on top of the global model x it already holds. ``tracemalloc`` sees every numpy buffer and Python object
allocated in the server process (numpy reports its buffers to it) but not gRPC's C-core buffers, glibc's
heap slack or the pages other processes push out, which made the former RSS measurement wander from
3.24 to 3.62 models under load. The round must allocate the sum and one upload buffer, ~2 models (plus a
few 1 MiB chunks); an upload buffer kept after accumulation, a float64 sum, or both uploads buffered at
once each add a whole model (>= 3). The script run keeps a coarse RSS check of its own figures.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import numpy as np

from fedcore.aggregators import FedAverage
from fedcore.tasks import PlanSource
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.server import FedServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_big_model.py"
PARAMS = 25_000_000
MODEL_BYTES = 4 * PARAMS


def _bench() -> ModuleType:
    """scripts/bench_big_model.py as a module: its plan, node handler and node-process launcher."""
    spec = importlib.util.spec_from_file_location("bench_big_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _round_allocations(tmp_path: Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """Run one round; return (peak bytes allocated during it, bytes still allocated after it, x+)."""
    bench = _bench()
    store = NodeStore(tmp_path / "nodes.db")
    tokens = store.enroll_many(["node-0", "node-1"])
    server = FedServer(ServerConfig(port=0, tls="insecure", max_upload_buffer_bytes=MODEL_BYTES), store)
    port = await server.start()
    blocks = 4
    exp = Experiment(PlanSource.from_source(bench.PLAN_NAME, bench.PLAN_SOURCE), {"num_updates": 1, "lr": 0.01},
                     aggregator=FedAverage(accumulator="param_dtype"), rounds=1, dataset_tags=[bench.TAG],
                     min_nodes=2, round_timeout=120, node_wait_timeout=120,
                     model_args={"blocks": blocks, "block": PARAMS // blocks}, server=server, progress=False,
                     keep_round_params=False)
    exp.params = exp.initial_params()
    procs = bench.start_nodes(port, tokens)
    try:
        await server.wait_for_nodes(2, timeout=120)
        tracemalloc.start()
        try:
            await exp.run_async()
            _, peak = tracemalloc.get_traced_memory()
            exp.reports.clear()
            left, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=120)
        await server.stop(grace=2.0)
    return peak, left, exp.params


def test_a_big_model_round_allocates_one_sum_and_one_upload(tmp_path: Path) -> None:
    peak, left, params = asyncio.run(asyncio.wait_for(_round_allocations(tmp_path), 240))
    for name, value in params.items():  # every node added 1e-3 to zeros: the mean is 1e-3
        np.testing.assert_allclose(value[:: max(1, value.size // 1000)], np.float32(1e-3), rtol=0, atol=1e-7,
                                   err_msg=name)
    models = peak / MODEL_BYTES
    assert 1.9 < models < 2.2, f"the round allocated {models:.3f} models at its peak on top of x"
    # x+ is the sum divided in place (the old x is freed when exp.params is replaced): ~1 model stays
    assert left / MODEL_BYTES < 1.1, f"{left / MODEL_BYTES:.3f} models still allocated after the round"


def test_the_big_model_script_runs_a_round(tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    cmd = [sys.executable, str(SCRIPT), "--params", str(PARAMS), "--upload-buffer", str(MODEL_BYTES),
           "--timeout", "120", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["aggregated"] == 2  # and the script checked the averaged values
    above_idle = (result["server_peak_rss_gb"] - result["server_idle_rss_gb"]) / result["model_gb"]
    # RSS also holds gRPC's buffers and heap slack (3.24-3.62 models measured under load): a coarse
    # guard only; the exact bound is the allocation test above
    assert above_idle < 4.5, result
