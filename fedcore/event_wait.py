"""Waiting for an ``asyncio.Event`` with a time limit, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns normally when the awaited event fires in the same loop iteration
as a cancellation of the waiter (CPython gh-86296, rewritten in 3.12): a Ctrl-C that lands just as a node
registers was swallowed, and ``fedserver run`` waited out its whole ``--node-wait``. ``asyncio.timeout``
raises ``TimeoutError`` only for its own deadline and lets every cancellation through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["wait_event", "within"]


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds pass (False); None waits without a limit.
    A cancellation of the waiter always raises ``CancelledError``, even if the event fires at that moment."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable``, raising ``TimeoutError`` after ``timeout`` seconds (None: no limit); the awaited
    task is cancelled on time-out unless shielded, as with ``asyncio.wait_for``, and a cancellation of the
    caller is never swallowed."""
    async with asyncio.timeout(timeout):
        return await awaitable
