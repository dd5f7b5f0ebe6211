#!/usr/bin/env python
"""Does the node's process-wide glibc setting slow local torch training? Same workload with and without it.

``NodeClient.run`` calls :func:`fedcore.framing.memory.keep_chunk_memory`, which sets glibc's
``M_ARENA_MAX`` to 1 and raises ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` for the whole node process;
the node then trains torch models in that same process, so torch's intra-op threads, the training thread
and the DataLoader all allocate from one malloc arena. This measures what that costs.

Each run is a fresh process (``multiprocessing`` spawn) that first puts glibc in one setting (--settings):
"node" calls ``keep_chunk_memory(1 << 20)`` as ``NodeClient.run`` does with the default 1 MiB chunks (4 MiB
thresholds, one arena) and trains inside ``compute_memory()`` as ``NodeClient`` runs its handler (thresholds
at glibc's 32 MiB maximum while it computes), "none" leaves glibc's defaults
(the baseline every ratio is against); two diagnostic ones split it apart: "arena1" sets only
``M_ARENA_MAX`` to 1, "chunk-4mib" is ``keep_chunk_memory(1 << 20)`` with the 4 MiB thresholds the server
keeps (and the node had before this benchmark: a CNN at batch 256 trained 2.3-2.5x slower under it). Then every process does exactly what a node does with a TRAIN task,
in a worker thread as ``NodeClient`` runs its handler: ``fednode.training.run_training`` of a ``TrainTask``
whose plan is the ``TorchTrainingPlan`` source below (loaded by ``load_plan_class``, the node's loader), on
a synthetic MNIST-like ``ArrayDataset`` (60,000 × 784 float32 in [0, 1), 10 classes). One short warm-up
task (--warmup updates) precedes the timed one, so the figure is a node's steady round, not torch's
first-call setup. Settings take turns (A/B/A/B...) and each one's median is reported.

Workloads (plain SGD, --updates optimizer steps each): an MLP 784-256-128-10 and a small CNN (two 3×3
convolutions of 16 and 32 channels, max-pooling, a linear layer), at batch sizes 32 and 256, through the
plan's default DataLoader (num_workers=0); and the MLP at batch 256 with a DataLoader of 2 worker
processes. Per workload and setting: median seconds per task (all of ``run_training``: tensor conversion
of the data, training, parameters out) and of the training loop alone (``TrainingResult.duration_s``),
their ratio to "none" (> 1: the setting slows training), the median peak RSS (VmHWM of the training
process, DataLoader workers not included) and minor page faults per optimizer step in the training loop
(each is a fresh 4 KiB page the kernel hands over: ~0.55 CPU-s/GB on the measured VM, docs/performance.md).

Usage: python scripts/bench_node_malloc.py [--repeat 5] [--updates 500] [--warmup 20] [--workloads ...]
       [--settings node,none,arena1,chunk-4mib]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK_SIZE = 1 << 20  # NodeConfig's default upload chunk: what NodeClient.run passes to keep_chunk_memory
N_SAMPLES, N_FEATURES, N_CLASSES = 60_000, 784, 10
RUN_TIMEOUT = 900.0  # seconds one process may take before the benchmark gives up on it
M_ARENA_MAX = -8  # glibc malloc.h
BASELINE = "none"
SETTINGS = {  # name -> what the process does before anything else
    "node": "keep_chunk_memory(1 MiB chunks) as NodeClient.run, training inside compute_memory() as its "
            "handler: thresholds 32 MiB while training, one arena",
    "none": "glibc's defaults (dynamic mmap/trim thresholds, up to 8 arenas per core)",
    "arena1": "only M_ARENA_MAX = 1 (thresholds left dynamic)",
    "chunk-4mib": "keep_chunk_memory(1 MiB chunks): 4 MiB thresholds (the server's), one arena",
}

# The plan a node receives (self-contained source, like any plan). model_args: arch "mlp" | "cnn",
# workers (DataLoader worker processes; 0 = the plan's default loader).
PLAN_SOURCE = '''
import resource

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedcore.plans import TorchTrainingPlan


class MallocBenchPlan(TorchTrainingPlan):
    loops = []  # (TrainingResult.duration_s, minor page faults) of every train() in this process

    def init_model(self):
        if self.model_args["arch"] == "mlp":
            return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.module(data), target)

    def training_data(self, dataset):
        workers = self.model_args.get("workers", 0)
        if not workers:
            return super().training_data(dataset)
        args = self.training_args
        return DataLoader(self._tensor_dataset(dataset), batch_size=args["batch_size"], shuffle=args["shuffle"],
                          generator=torch.Generator().manual_seed(args["seed"]), num_workers=workers)

    def train(self, *args, **kwargs):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        result = super().train(*args, **kwargs)
        type(self).loops.append((result.duration_s, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        return result
'''


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str
    batch_size: int
    workers: int = 0


WORKLOADS = {w.name: w for w in (
    Workload("mlp-b32", "mlp", 32),
    Workload("mlp-b256", "mlp", 256),
    Workload("cnn-b32", "cnn", 32),
    Workload("cnn-b256", "cnn", 256),
    Workload("mlp-b256-w2", "mlp", 256, workers=2),
)}


# -- the training process ----------------------------------------------------------------------------------
def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _train(workload: Workload, updates: int, warmup: int) -> dict[str, Any]:
    """The node's worker thread: warm-up task, then the timed task, both through ``run_training``."""
    import numpy as np

    from fedcore.models import weights_to_numpy
    from fedcore.plans import ArrayDataset
    from fedcore.plans.loader import load_plan_class
    from fedcore.tasks import PlanSource, TrainTask
    from fednode.training import run_training

    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.random((N_SAMPLES, N_FEATURES), dtype=np.float32),
                           rng.integers(0, N_CLASSES, N_SAMPLES))
    plan = PlanSource.from_source("MallocBenchPlan", PLAN_SOURCE)
    model_args = {"arch": workload.arch, "workers": workload.workers}
    cls = load_plan_class(plan)
    builder = cls()
    builder.model_args = model_args
    builder.post_init({"num_updates": 1, "seed": 0})
    params = weights_to_numpy(builder.get_model_params())
    del builder

    def task(n: int) -> TrainTask:
        args = {"num_updates": n, "batch_size": workload.batch_size, "lr": 0.01, "seed": 0, "shuffle": True}
        return TrainTask("bench", 1, plan, args, params, model_args=model_args)

    if warmup:
        run_training(task(warmup), dataset)
    t0 = time.perf_counter()
    result = run_training(task(updates), dataset)
    elapsed = time.perf_counter() - t0
    if result.num_steps != updates:
        raise RuntimeError(f"expected {updates} steps, the plan took {result.num_steps}")
    loop_s, faults = cls.loops[-1]
    return {"run_s": elapsed, "loop_s": loop_s, "faults_per_step": faults / updates}


def apply_setting(setting: str) -> None:
    """Put this (fresh) process's allocator in ``setting`` (see :data:`SETTINGS`)."""
    if setting == BASELINE:
        return
    if setting == "arena1":
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = mallopt(M_ARENA_MAX, 1) == 1
    else:
        from fedcore.framing.memory import keep_chunk_memory

        ok = keep_chunk_memory(CHUNK_SIZE)
    if not ok:
        raise RuntimeError(f"glibc refused setting {setting!r} (not glibc?): nothing to compare")


def _train_as(setting: str, workload: Workload, updates: int, warmup: int) -> dict[str, Any]:
    """The handler thread's work: under "node", inside ``compute_memory()`` as NodeClient runs a handler."""
    import contextlib

    from fedcore.framing.memory import compute_memory

    with compute_memory() if setting == "node" else contextlib.nullcontext():
        return _train(workload, updates, warmup)


def training_process(conn: Any, workload: Workload, setting: str, updates: int, warmup: int) -> None:
    """Process target: apply the malloc ``setting`` first, then train in a worker thread like a node."""
    try:
        apply_setting(setting)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-handler") as executor:
            out = executor.submit(_train_as, setting, workload, updates, warmup).result()
        conn.send({**out, "peak_rss": _peak_rss()})
    except BaseException:  # noqa: BLE001 - reported to the orchestrator, which stops
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# -- orchestration -----------------------------------------------------------------------------------------
def run_once(workload: Workload, setting: str, updates: int, warmup: int) -> dict[str, Any]:
    """One fresh spawned process; its measurements."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=training_process, args=(child, workload, setting, updates, warmup))
    proc.start()
    child.close()
    try:
        if not parent.poll(RUN_TIMEOUT):
            raise RuntimeError(f"{workload.name} ({setting}) took over {RUN_TIMEOUT:.0f} s")
        out = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in out:
        raise RuntimeError(f"{workload.name} ({setting}) failed:\n{out['error']}")
    return out


def at_least(minimum: int, what: str):
    """argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} ({what}), got {value}")
        return value

    return parse


def settings_arg(text: str) -> list[str]:
    """argparse type: comma-separated names of :data:`SETTINGS`, the baseline added when missing."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in SETTINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {unknown or [text]}; choose from {', '.join(SETTINGS)}")
    return list(dict.fromkeys([*names, BASELINE]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    choices = "\n".join(f"  {name:<11} {what}" for name, what in SETTINGS.items())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"settings (--settings):\n{choices}\n")
    ap.add_argument("--repeat", type=at_least(1, "the median needs a run"), default=5,
                    help="fresh processes per workload and setting, run in turn A/B/A/B... (default 5)")
    ap.add_argument("--updates", type=at_least(1, "a task trains at least one step"), default=500,
                    help="optimizer steps (num_updates) of the timed task (default 500)")
    ap.add_argument("--warmup", type=at_least(0, "0 = no warm-up task"), default=20,
                    help="optimizer steps of the untimed warm-up task before it (default 20; 0 = none)")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                    metavar="NAME", help=f"which workloads (default all: {' '.join(WORKLOADS)})")
    ap.add_argument("--settings", type=settings_arg, default=["node", BASELINE], metavar="A,B,...",
                    help=f"allocator settings to compare, comma-separated; ratios are against {BASELINE!r} "
                         f"(always run). Default: node,{BASELINE}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings: list[str] = args.settings
    print(f"{args.repeat} runs per workload and setting, {args.updates} updates (+{args.warmup} warm-up) per task;"
          f" ratio = setting / {BASELINE} (> 1: slower than glibc's defaults)")
    print(f"{'workload':<12} {'setting':<11} {'s/task':>7} {'ratio':>6}   {'loop s':>7} {'ratio':>6}   "
          f"{'peak RSS':>9}   {'faults/step':>11}")
    worst = (0.0, "")
    for name in args.workloads:
        workload = WORKLOADS[name]
        runs: dict[str, list[dict[str, Any]]] = {setting: [] for setting in settings}
        for _ in range(args.repeat):
            for setting in settings:
                runs[setting].append(run_once(workload, setting, args.updates, args.warmup))

        def med(setting: str, key: str, runs: dict[str, list[dict[str, Any]]] = runs) -> float:
            return statistics.median(r[key] for r in runs[setting])

        for i, setting in enumerate(settings):
            run_ratio = med(setting, "run_s") / med(BASELINE, "run_s")
            loop_ratio = med(setting, "loop_s") / med(BASELINE, "loop_s")
            print(f"{name if i == 0 else '':<12} {setting:<11} {med(setting, 'run_s'):7.3f} {run_ratio:6.3f}   "
                  f"{med(setting, 'loop_s'):7.3f} {loop_ratio:6.3f}   {med(setting, 'peak_rss') / 2**20:5.0f} MiB   "
                  f"{med(setting, 'faults_per_step'):11.0f}",
                  flush=True)
            if setting != BASELINE:
                worst = max(worst, (max(run_ratio, loop_ratio), f"{name}, {setting}"))
    print(f"largest slowdown against {BASELINE}: {100 * (worst[0] - 1):+.1f} % ({worst[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
