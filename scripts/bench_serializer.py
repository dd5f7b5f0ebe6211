#!/usr/bin/env python
"""Serializer throughput and memory against pickle protocol 5, measured in the same process.

For each size (10M and 100M float32 parameters, as a dict of layer-like arrays) it times
``Serializer.dumps`` / ``Serializer.loads`` and ``pickle.dumps(protocol=5)`` / ``pickle.loads`` on the same
dict (median of --repeat runs), and the peak extra memory (tracemalloc, which sees numpy and bytes
allocations) of each call relative to the payload size. ``loads`` is measured twice: from ``bytes`` (the
arrays must be copied to be writable, like pickle) and from a writable buffer (zero-copy views, what the
chunk assembler and ``Serializer.load`` hand to it).

Targets (issue 2): dumps and loads >= 0.9x pickle's throughput; peak extra memory <= 1.1x the payload.
Usage: python scripts/bench_serializer.py [--sizes 10 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import pickle
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedcore import Serializer


def make_params(n_params: int) -> dict[str, np.ndarray]:
    """A model-like dict: a few big weight matrices and many small bias vectors."""
    rng = np.random.default_rng(0)
    params: dict[str, np.ndarray] = {}
    layer = 0
    remaining = n_params
    while remaining > 0:
        n = min(remaining, 4_000_000)
        cols = 1000
        rows = max(n // cols, 1)
        w = rng.standard_normal((rows, cols), dtype=np.float32) if rows * cols == n else rng.standard_normal(n, dtype=np.float32)
        params[f"layer{layer}.weight"] = w
        remaining -= w.size
        if remaining > 0:
            b = rng.standard_normal(min(remaining, cols), dtype=np.float32)
            params[f"layer{layer}.bias"] = b
            remaining -= b.size
        layer += 1
    return params


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times = []
    out = None
    for _ in range(repeat):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_extra(fn: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return peak - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="millions of float32 parameters")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ok = True
    for millions in args.sizes:
        params = make_params(millions * 1_000_000)
        nbytes = sum(a.nbytes for a in params.values())
        gb = nbytes / 1e9
        # partial binds each call's argument now (the loop rebinds these names and deletes the blobs below)
        t_pd, pblob = timed(partial(pickle.dumps, params, protocol=5), args.repeat)
        t_pl, _ = timed(partial(pickle.loads, pblob), args.repeat)
        t_sd, sblob = timed(partial(Serializer.dumps, params), args.repeat)
        t_sl, back = timed(partial(Serializer.loads, sblob), args.repeat)
        writable = bytearray(sblob)
        t_sz, _ = timed(partial(Serializer.loads, writable), args.repeat)
        assert all(np.array_equal(back[k], v) for k, v in params.items())
        m_pd = peak_extra(partial(pickle.dumps, params, protocol=5)) / nbytes
        m_sd = peak_extra(partial(Serializer.dumps, params)) / nbytes
        m_pl = peak_extra(partial(pickle.loads, pblob)) / nbytes
        m_sl = peak_extra(partial(Serializer.loads, sblob)) / nbytes
        m_sz = peak_extra(partial(Serializer.loads, writable)) / nbytes
        del pblob, sblob, writable, back
        r_d, r_l, r_z = t_pd / t_sd, t_pl / t_sl, t_pl / t_sz
        print(f"== {millions}M float32 parameters, {len(params)} arrays, {nbytes / 1e6:.0f} MB payload")
        print(f"  dumps   fedstream {gb / t_sd:6.2f} GB/s   pickle-5 {gb / t_pd:6.2f} GB/s   ratio {r_d:5.2f}x"
              f"   peak extra mem {m_sd:4.2f}x payload (pickle {m_pd:4.2f}x)")
        print(f"  loads   fedstream {gb / t_sl:6.2f} GB/s   pickle-5 {gb / t_pl:6.2f} GB/s   ratio {r_l:5.2f}x"
              f"   peak extra mem {m_sl:4.2f}x payload (pickle {m_pl:4.2f}x)   [from bytes: copies]")
        print(f"  loads   fedstream {gb / t_sz:6.2f} GB/s   (zero-copy from a writable buffer) ratio {r_z:7.1f}x"
              f"   peak extra mem {m_sz:4.2f}x payload")
        for name, value, target in (("dumps ratio", r_d, 0.9), ("loads ratio", r_l, 0.9),
                                    ("dumps mem", -m_sd, -1.1), ("loads mem", -m_sl, -1.1)):
            if value < target:
                ok = False
                print(f"  MISSED target: {name}")
    print("all targets met" if ok else "some targets missed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
