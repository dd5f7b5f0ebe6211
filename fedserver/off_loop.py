"""Model-sized work of the server's rounds, run in a worker thread so the event loop keeps serving nodes.

A weighted sum of a reply (~0.2 s/GB), the final average, a checkpoint of the new model (GBs written and
fsynced): on the event loop each would hold up every other node's upload, poll and heartbeat for as long.
numpy and file writes release the GIL, so the loop runs meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_off_loop(work: Callable[[], T]) -> T:
    """``work()`` in a worker thread, awaited to its end even when the caller is cancelled meanwhile.

    A cancelled round resets its aggregator (``abort_round``) and an interrupted experiment may be resumed
    from its checkpoints: neither may happen while a thread is still adding into the sums or writing a
    checkpoint, so the cancellation is delivered once ``work`` has returned.
    """
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise
