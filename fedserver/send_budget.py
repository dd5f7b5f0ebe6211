"""``SendBudget``: how many bytes of task chunks every PollTask stream together may hand to gRPC at once.

Each chunk message is a fresh ``bytes`` (``encode_chunk_event``) that gRPC copies and keeps until the
socket takes it. Without a bound, dispatching a round to N nodes puts N chunks in flight at once: 1000
nodes × a 400 KB model held ~0.9 GB on the server for seconds. A stream takes budget for a chunk before
encoding it and gives it back when gRPC has sent it (the stream's ``yield`` returned), so the chunks in
flight stay within ``max_bytes`` (one chunk always fits, whatever its size).

Waiting streams are served oldest stream first (by the time the stream asked for its first chunk), not
chunk by chunk in turn: the first nodes finish their download and start training while the others are
still in line, instead of every download ending at the very end. A slow link only holds the budget of
its own chunk in flight; the other streams go on with the rest.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class SendBudget:
    """A byte budget shared by all streams, granted by priority (lower first) then arrival."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # > 0, checked by ServerConfig (max_send_buffer_bytes)
        self.in_flight = 0  # bytes granted and not yet released
        self._waiting: list[tuple[float, int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    def _fits(self, nbytes: int) -> bool:
        return self.in_flight == 0 or self.in_flight + nbytes <= self.max_bytes

    async def acquire(self, nbytes: int, priority: float) -> None:
        """Wait until ``nbytes`` fit, behind every waiter with a lower ``priority`` (e.g. an older stream)."""
        if not self._waiting and self._fits(nbytes):
            self.in_flight += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrival), nbytes, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(nbytes)  # granted just as the stream was cancelled: give it back
            raise

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`acquire` granted, and let the next waiters in."""
        self.in_flight -= nbytes
        while self._waiting:
            _, _, size, granted = self._waiting[0]
            if granted.done():  # its stream was cancelled while waiting
                heapq.heappop(self._waiting)
                continue
            if not self._fits(size):
                return
            heapq.heappop(self._waiting)
            self.in_flight += size
            granted.set_result(None)
