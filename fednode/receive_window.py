"""The node's HTTP/2 receive window for task downloads, chosen from the measured round-trip time.

The receive window is how many bytes the server may send ahead of what the node has read. gRPC's default
(bandwidth-delay probing) grows it to its estimate of the link's bandwidth-delay product; on a near, fast
link the estimate comes out far too large (its pings wait behind busy CPUs), 16-33 MB at 1 GB/s, and that
much of the model then sits in gRPC's buffers beside the node's receive buffer: 1.3-1.7x a 40 MB model in
memory. A fixed window of one chunk message keeps only the chunk being read in flight, but caps the
download at window / round-trip time: nothing on a LAN, a twentieth of a 1 Gbit/s link 50 ms away.

``receive_window_bytes="auto"`` (the default) therefore measures: after each Register, the fastest of a
few Heartbeats is the round-trip time. It includes both ends' processing, so it overestimates the
network's and errs towards probing. When one chunk message still allows :data:`NEAR_LINK_RATE` at that
time, the node fixes its window there; otherwise it keeps probing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fedcore.wire.flow_control import chunk_message_window

#: Download rate (bytes/s) a fixed window must still allow at the measured round-trip time for "auto" to
#: fix it: about what a node that verifies SHA-256 can take on one core (hashing alone runs at ~1.8 GB/s).
NEAR_LINK_RATE = 1e9
#: Heartbeats timed per measurement (the fastest counts: the others waited on something else).
RTT_SAMPLES = 5


def auto_window(rtt_seconds: float, task_chunk_size: int) -> int | None:
    """The fixed window "auto" picks: one chunk message if it allows NEAR_LINK_RATE over ``rtt_seconds``,
    else None (gRPC's probing). None too when the server did not announce its chunk size (0)."""
    if task_chunk_size <= 0 or not math.isfinite(rtt_seconds):
        return None
    window = chunk_message_window(task_chunk_size)
    return window if window >= NEAR_LINK_RATE * rtt_seconds else None


async def measure_rtt(call: Callable[[], Awaitable[Any]], samples: int = RTT_SAMPLES) -> float:
    """The fastest of ``samples`` awaited ``call()`` round trips, in seconds."""
    best = math.inf
    for _ in range(samples):
        start = time.perf_counter()
        await call()
        best = min(best, time.perf_counter() - start)
    return best


def describe(window: int | None) -> str:
    """A window as logged: ``1114112 bytes fixed`` or ``BDP probing``."""
    return "BDP probing" if window is None else f"{window} bytes fixed"
