#!/usr/bin/env python
"""Round latency and server memory: fedstream against Flower 1.42, same machine, same run.

For each model size P (float32 parameters in four arrays) and node count N it runs, one after the other:

* fedstream: a researcher process (FedServer + Experiment, FedAvg) and N ``python -m fednode start``
  processes on loopback, WITHOUT TLS (``--insecure``; Flower runs insecure too). The plan
  (``benchmarks/rounds_plan.py``) returns the received weights plus 1e-3 on one element per array, so
  a round's time is the framework's own;
* Flower: ``flwr==1.42.0`` in its own venv under the cache folder (installed on first use, never into
  this environment), deployment mode: ``flower-superlink --insecure`` + N ``flower-supernode --insecure``
  (HTTP with protobuf bodies, Flower's default in 1.42), ``flwr run`` of ``benchmarks/flower_app``
  (Flower's FedAvg; clients return the weights unchanged; federated evaluation off).

Reported per configuration: median seconds per round excluding the first, and the server's peak RSS
during the rounds (fedstream: the researcher process's own VmHWM; Flower: SuperLink + SuperExec +
ServerApp, summed, sampled every 10 ms) with the idle RSS before round 1 (fedstream: server up, nodes
connected, initial model built; Flower: SuperLink up, SuperNodes connected). Ratios are fedstream/Flower
from the same run. Each measurement first waits (``--quiet-wait``) for the cores to be >= 85% idle and
the idle fraction seen is printed: other work on the machine slows either side, so repeat noisy rows.

Targets (issue "performance and scale"): seconds per round <= 0.1x Flower's at 1M and 10M parameters and
<= 0.15x at 50M; fedstream's peak RSS at 10M parameters with 8 nodes <= 4x the model size above idle.
Exit status 1 when a measured target is missed.

fedstream's server runs with two memory bounds (``--server-defaults`` drops both): replies are received
into at most ``--upload-buffer`` MiB of buffers (64; one reply always fits), the others wait in line, and
a waiting reply holds at most ``--receive-window`` KiB (256) inside gRPC. Together they keep the server's
memory O(model) whatever the number of nodes.

Usage: python scripts/bench_rounds.py [--params 1M 10M 50M] [--nodes 2 8] [--rounds 5]
                                      [--only fedstream|flower] [--upload-buffer 64] [--receive-window 256]
                                      [--server-defaults] [--accumulator float64] [--cache DIR] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fedstream_rounds
import flower_rounds
from fedstream_rounds import Measurement
from rss import wait_until_quiet

MB = 1e6
TIME_TARGETS = {1_000_000: 0.10, 10_000_000: 0.10, 50_000_000: 0.15}
MEMORY_TARGET = (10_000_000, 8, 4.0)  # params, nodes, peak above idle in model sizes


def count(text: str) -> int:
    """``1M``, ``10m``, ``500k``, ``2500000`` -> int."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 1M, 500k, 2000000)")
    return int(float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[match.group(2).lower()])


def human(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n / 1e6:g}M"


def warm_memory(gib: float) -> None:
    """Touch then free ``gib`` GiB in a child process. On a VM whose guest memory is backed lazily, a page's
    first touch costs ~3 ms/MB; without this the first run to allocate a large array pays it."""
    if gib <= 0:
        return
    code = (f"import numpy as np\nfor _ in range(int({gib})):\n    a = np.ones(1 << 27); del a"
            )  # 1 GiB per array
    subprocess.run([sys.executable, "-c", code], check=True)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    head = ("| P | N | fedstream s/round | Flower s/round | time ratio | fedstream peak RSS (above idle) "
            "| Flower peak RSS (above idle) | RSS ratio | CPU idle before |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        fs, fl = r.get("fedstream"), r.get("flower")
        ratio = f"{fs.median_seconds / fl.median_seconds:.3f}" if fs and fl else "–"
        mem_ratio = f"{fs.peak_rss / fl.peak_rss:.2f}" if fs and fl else "–"
        lines.append(
            f"| {human(r['params'])} | {r['nodes']} | {_secs(fs)} | {_secs(fl)} | {ratio}{r.get('time_flag', '')} "
            f"| {_mem(fs)}{r.get('mem_flag', '')} | {_mem(fl)} | {mem_ratio} | {r['idle']} |")
    return "\n".join(lines)


def _secs(m: Measurement | None) -> str:
    return "–" if m is None else f"{m.median_seconds:.3f}"


def _mem(m: Measurement | None) -> str:
    return "–" if m is None else f"{m.peak_rss / MB:.0f} MB ({m.peak_above_idle / MB:.0f} MB)"


def check(row: dict) -> list[str]:
    """Flag the row's missed targets; return messages."""
    fs, fl, p, n = row.get("fedstream"), row.get("flower"), row["params"], row["nodes"]
    missed = []
    target = TIME_TARGETS.get(p)
    if fs and fl and target is not None:
        ratio = fs.median_seconds / fl.median_seconds
        row["time_flag"] = " ✓" if ratio <= target else " ✗"
        if ratio > target:
            missed.append(f"P={human(p)} N={n}: time ratio {ratio:.3f} > {target}")
    if fs and (p, n) == MEMORY_TARGET[:2]:
        limit = MEMORY_TARGET[2] * 4 * p
        row["mem_flag"] = " ✓" if fs.peak_above_idle <= limit else " ✗"
        if fs.peak_above_idle > limit:
            missed.append(f"P={human(p)} N={n}: fedstream peak {fs.peak_above_idle / MB:.0f} MB above idle "
                          f"> {limit / MB:.0f} MB")
    return missed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=count, nargs="+", default=[1_000_000, 10_000_000, 50_000_000],
                    help="model sizes in float32 parameters (default: 1M 10M 50M)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 8], help="node counts (default: 2 8)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per run; the first is not counted (default: 5)")
    ap.add_argument("--only", choices=("fedstream", "flower"), help="run one framework only")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "FEDSTREAM_BENCH_CACHE", Path.home() / ".cache" / "fedstream-bench")),
        help="where Flower's venv and the run folders go (default: ~/.cache/fedstream-bench)")
    ap.add_argument("--warm-memory", type=float, default=8.0, metavar="GIB",
                    help="touch and free this much memory first (VM guests back memory lazily; default 8)")
    ap.add_argument("--upload-buffer", type=int, default=64, metavar="MIB",
                    help="fedstream server's max_upload_buffer_bytes in MiB: replies beyond it are received one "
                         "after the other (default 64, like its 64 MiB send budget; 0: the server default, 4 GiB)")
    ap.add_argument("--receive-window", type=int, default=256, metavar="KIB",
                    help="fedstream server's receive_window_bytes in KiB: what a reply waiting for upload room may "
                         "hold inside gRPC (default 256; 0: the server default, 'auto': one chunk message on this loopback)")
    ap.add_argument("--server-defaults", action="store_true",
                    help="run fedstream's server with its default limits (same as --upload-buffer 0 --receive-window 0)")
    ap.add_argument("--accumulator", choices=("float64", "param_dtype"), default="float64",
                    help="fedstream's FedAverage accumulator (default float64: a float64 sum, 2x a float32 model; "
                         "param_dtype: summed in float32, 1x)")
    ap.add_argument("--quiet-wait", type=float, default=180.0, metavar="SECONDS",
                    help="each measurement first waits up to this long for the cores to be >= 85%% idle")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (the first round is not counted)")
    if args.server_defaults:
        args.upload_buffer = args.receive_window = 0
    args.cache.mkdir(parents=True, exist_ok=True)
    bin_dir = flower_rounds.ensure_flower(args.cache) if args.only != "fedstream" else None
    warm_memory(args.warm_memory)
    runs = Path(tempfile.mkdtemp(prefix="rounds-", dir=args.cache))
    print(f"machine: {machine()}\nrun folders: {runs}", flush=True)
    rows: list[dict] = []
    missed: list[str] = []
    for params in args.params:
        for nodes in args.nodes:
            row: dict = {"params": params, "nodes": nodes}
            tag = f"P={human(params)} N={nodes}"
            idle = []
            if args.only != "flower":
                idle.append(wait_until_quiet(args.quiet_wait))
                started = time.perf_counter()
                row["fedstream"] = fs = fedstream_rounds.run(params, nodes, args.rounds, runs / f"fedstream-{tag}",
                                                             upload_buffer_mb=args.upload_buffer,
                                                             receive_window_kib=args.receive_window,
                                                             accumulator=args.accumulator)
                print(f"{tag} fedstream: {fs.median_seconds:.3f} s/round {[round(s, 3) for s in fs.round_seconds]}, "
                      f"peak RSS {fs.peak_rss / MB:.0f} MB (idle {fs.idle_rss / MB:.0f} MB), CPU s/round: server "
                      f"{fs.notes['server_cpu_seconds'] / args.rounds:.2f}, nodes "
                      f"{fs.notes['nodes_cpu_seconds'] / args.rounds:.2f} "
                      f"[{time.perf_counter() - started:.0f} s, {idle[-1]:.0%} idle before]", flush=True)
            if args.only != "fedstream":
                idle.append(wait_until_quiet(args.quiet_wait))
                started = time.perf_counter()
                row["flower"] = fl = flower_rounds.run(params, nodes, args.rounds, runs / f"flower-{tag}", bin_dir)
                print(f"{tag} Flower: {fl.median_seconds:.3f} s/round {[round(s, 3) for s in fl.round_seconds]}, "
                      f"peak RSS {fl.peak_rss / MB:.0f} MB (idle {fl.idle_rss / MB:.0f} MB) "
                      f"[{time.perf_counter() - started:.0f} s, {idle[-1]:.0%} idle before]", flush=True)
            row["idle"] = " / ".join(f"{x:.0%}" for x in idle)
            missed += check(row)
            rows.append(row)
    text = table(rows)
    print("\n" + text)
    print(f"\nmachine: {machine()}")
    results = runs / "results.json"
    results.write_text(json.dumps([{k: asdict(v) if isinstance(v, Measurement) else v for k, v in r.items()}
                                   for r in rows], indent=1))
    print(f"raw figures: {results}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    for message in missed:
        print(f"TARGET MISSED: {message}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
