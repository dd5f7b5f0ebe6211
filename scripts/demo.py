#!/usr/bin/env python
"""The main job: a real federation on loopback — one researcher server and three node processes.

Steps (every one through the real CLIs or the public API):
1. generate a deterministic non-IID data set split over three sites (examples/demo_data.py);
2. `fedserver certs` creates a project CA and the server's TLS certificate; `fedserver nodes enroll`
   issues one token per node;
3. each node registers its slice with `fednode dataset add` and starts with `fednode start` (TLS, the CA
   pinned, its token; `--auto-approve` because this is a demo — real nodes approve plans by hand);
4. this process is the researcher: an `Experiment` runs 10 rounds of Scaffold, then 10 of FedAvg, on the
   torch MLP of examples/demo_plan.py, printing per-round loss and accuracy;
5. it compares the two, writes `demo-output/compare.png` and each run's curves, and stops every process.

Usage: python scripts/demo.py [--out demo-output] [--rounds 10] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import demo_data
import numpy as np
from demo_plan import DemoPlan

from fedcore.aggregators import FedAverage, Scaffold
from fedcore.plans import ArrayDataset
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore
from fedserver.plot import compare_experiments, plot_history
from fedserver.rounds import RoundReport
from fedserver.server import FedServer

TRAINING_ARGS = {"num_updates": 100, "lr": 0.05, "batch_size": 32, "seed": 3,
                 "test_ratio": 0.2, "test_on_global_updates": True, "test_on_local_updates": True}
N_SITES = 3


def cli(*args: str, capture: bool = False) -> str:
    """Run a fedstream CLI (``python -m fedserver ...`` / ``python -m fednode ...``) and fail loudly."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluator(test: ArrayDataset):
    """The researcher's own balanced test set (a demo convenience): accuracy of each round's global model."""
    plan = DemoPlan()
    plan.post_init({"num_updates": 1, "seed": 0})
    scores: list[dict[str, float]] = []

    def on_round(report: RoundReport) -> None:
        plan.set_model_params(report.params)
        scores.append(plan.evaluate(test))
        m = report.metrics
        print(f"  round {report.round:2d}  nodes {len(report.succeeded)}/{len(report.selected)}"
              f"  train loss {m.get('train_loss', float('nan')):.4f}"
              f"  node-val acc {m.get('val_after_accuracy', float('nan')):.3f}"
              f"  test loss {scores[-1]['loss']:.4f}  test acc {scores[-1]['accuracy']:.3f}"
              f"  ({report.duration_s:.2f} s)", flush=True)

    return on_round, scores


async def researcher(out: Path, port: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    home = out / "server"
    config = ServerConfig(address="127.0.0.1", port=port, tls="tls", cert_file=home / "certs" / "server.crt",
                          key_file=home / "certs" / "server.key", max_poll_wait_seconds=10)
    server = FedServer(config, NodeStore(home / "nodes.db"))
    await server.start()
    X_test, y_test = np.load(out / "data" / "test.npz").values()
    test = ArrayDataset(X_test, y_test)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for name, aggregator in (("scaffold", Scaffold(server_lr=1.0)), ("fedavg", FedAverage())):
            print(f"\n== {name}: {rounds} rounds, {N_SITES} nodes, {TRAINING_ARGS['num_updates']} local steps", flush=True)
            on_round, scores = evaluator(test)
            exp = Experiment(DemoPlan, TRAINING_ARGS, aggregator=aggregator, rounds=rounds, dataset_tags=["demo"],
                             min_nodes=N_SITES, round_timeout=60, node_wait_timeout=60, name=name,
                             checkpoint_dir=out / "checkpoints" / name, history_db=out / "history.db",
                             server=server, on_round=on_round, progress=False)
            started = time.perf_counter()
            await exp.run_async()
            seconds = (time.perf_counter() - started) / rounds
            print(f"   {name}: {seconds:.2f} s per round", flush=True)
            evaluation = await exp.evaluate_async()  # the final model on each node's held-out split
            per_node = "  ".join(f"{o.node_id} {o.result.metrics['accuracy']:.3f}" for o in evaluation.outcomes
                                 if o.result is not None)
            print(f"   {name}: federated evaluation of round {evaluation.round}: accuracy "
                  f"{evaluation.metrics.get('accuracy', float('nan')):.3f} over {evaluation.num_samples} node samples "
                  f"({per_node})", flush=True)
            results[name] = scores
            with HistoryStore(out / "history.db") as history:
                plot_history(history, exp.history_id, out / f"{name}.png")
    finally:
        await server.stop(grace=2.0)
    return results


#: written into every output folder the demo makes: only such a folder is ever deleted by a later run.
OUTPUT_MARK = ".fedstream-demo-output"


def prepare_output(out: Path, default: Path = ROOT / "demo-output") -> None:
    """Make ``out`` an empty folder for this run. The default folder (git-ignored, the demo's own) or one an
    earlier demo made (it holds OUTPUT_MARK) is replaced; an empty or missing one is used; anything else is
    refused (ValueError naming it): ``--out .`` or ``--out ~/results`` must never wipe the user's files."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if out == default.resolve() or (out / OUTPUT_MARK).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise ValueError(f"--out {out} is a non-empty folder the demo did not make; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARK).write_text("made by scripts/demo.py: replaced by the next demo run\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-output",
                    help="output folder (default: demo-output/ in the repository); a folder an earlier demo made is "
                         "replaced, any other non-empty folder is refused")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--port", type=int, default=0, help="server port (0: pick a free one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out: Path = args.out.resolve()
    try:
        prepare_output(out)
    except ValueError as exc:
        ap.error(str(exc))
    port = args.port or free_port()
    server_home = out / "server"

    print("== data: deterministic non-IID split over 3 sites")
    paths = demo_data.write(out / "data")
    print("== certificates and node enrolment")
    cli("fedserver", "certs", "init", "--home", str(server_home))
    cli("fedserver", "certs", "server", "--home", str(server_home))
    tokens = []
    for i in range(N_SITES):
        token_file = out / f"site{i}.token"
        token_file.write_text(cli("fedserver", "nodes", "enroll", f"site-{i}", "--quiet", "--home", str(server_home)).strip())
        os.chmod(token_file, 0o600)
        tokens.append(token_file)

    nodes: list[subprocess.Popen] = []
    try:
        for i, path in enumerate(paths[:N_SITES]):
            home = out / f"site{i}"
            cli("fednode", "dataset", "add", f"site{i}", str(path), "--tags", "demo", "--home", str(home))
            # Popen hands the child its own copy of the descriptor, so the parent's handle can close at once
            with open(out / f"site{i}.log", "w") as log:
                nodes.append(subprocess.Popen(
                    [sys.executable, "-m", "fednode", os.environ.get("FEDSTREAM_DEMO_NODE_VERBOSITY", "-v"), "start", "--home", str(home), "--server", f"127.0.0.1:{port}",
                     "--ca-cert", str(server_home / "certs" / "ca.crt"), "--token-file", str(tokens[i]),
                     "--name", f"site-{i}", "--auto-approve"],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": "1"}))  # 3 nodes + server share 2 cores
        print(f"== started {len(nodes)} fednode processes (pids {[p.pid for p in nodes]}), server on port {port}")
        results = asyncio.run(researcher(out, port, args.rounds))
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    history = HistoryStore(out / "history.db")
    ids = {e.name: e.id for e in history.experiments()}
    compare_experiments(history, [ids["scaffold"], ids["fedavg"]], out / "compare.png",
                        metrics=("train_loss", "val_before_accuracy"))
    history.close()
    acc = {name: scores[-1]["accuracy"] for name, scores in results.items()}
    print(f"\n== final test accuracy: Scaffold {acc['scaffold']:.3f}  FedAvg {acc['fedavg']:.3f}")
    print(f"== plots: {out / 'compare.png'}, {out / 'scaffold.png'}, {out / 'fedavg.png'}; history: {out / 'history.db'}")
    if acc["scaffold"] < acc["fedavg"]:
        print("!! Scaffold ended below FedAvg on this run")
        return 1
    print("== Scaffold's accuracy >= FedAvg's: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
