"""Model-sized work of the server's rounds, run in a worker thread so the event loop keeps serving nodes
(:func:`run_off_loop`), and steps that must run whole whatever cancellations arrive (:func:`to_completion`:
a round's average, checkpoint and report).

The final average of a round, a checkpoint of the new model (GBs written and fsynced): on the event loop
each would hold up every other node's poll, heartbeat and stream for as long. numpy and file writes release
the GIL, so the loop runs meanwhile. (Each reply's sum stays on the loop on purpose: see
``fedserver.rounds.collect_round``.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def run_off_loop(work: Callable[[], T]) -> T:
    """``work()`` in a worker thread, awaited to its end even when the caller is cancelled meanwhile.

    A cancelled round resets its aggregator (``abort_round``) and an interrupted experiment may be resumed
    from its checkpoints: neither may happen while a thread is still adding into the sums or writing a
    checkpoint, so a cancellation (however many arrive) is delivered once ``work`` has returned (see
    :func:`to_completion`).
    """
    # a Future, not a Task: the loop's shutdown, which cancels every remaining task, leaves the thread's job be
    return await to_completion(asyncio.get_running_loop().run_in_executor(None, work))


async def to_completion(work: Awaitable[T]) -> T:
    """Await ``work`` (a coroutine runs as its own task) to its end even if the caller is cancelled meanwhile.

    For a step that must happen whole or not at all, e.g. a round's average, checkpoint and report: a
    cancellation (however many arrive) is delivered as ``CancelledError`` once ``work`` is done, never in
    its middle. An error of ``work`` that ends after a cancellation is logged (the cancellation wins).
    """
    running = asyncio.ensure_future(work)
    interrupted = False
    while not running.done():
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            interrupted = True  # delivered below, once the work is done
        except BaseException:  # noqa: BLE001 - work's own error: raised by result() below
            break
    if interrupted:
        if not running.cancelled() and running.exception() is not None:
            log.warning("work interrupted by a cancellation failed meanwhile: %r", running.exception())
        raise asyncio.CancelledError
    return running.result()
