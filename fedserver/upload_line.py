"""The line of fresh uploads waiting for room (a session slot, buffer bytes) in the upload sessions.

:class:`~fedserver.uploads.UploadSessions` owns one :class:`UploadLine` and delegates to it.

An upload that finds no room waits in line (:meth:`UploadLine.wait`, oldest first) while a running upload
may free some, instead of being refused: a thousand nodes replying at once queue behind ``max_sessions``
buffers, and two 2.4 GB replies are received one after the other when ``max_buffered_bytes`` holds only
one. Only when nothing running can free room is the upload refused. Room that frees is handed to one
waiter at a time, and only :meth:`UploadSessions.begin <fedserver.uploads.UploadSessions.begin>` hands it
on to the next (:meth:`UploadLine.began`); an upload let through that does not begin (its task closed while
it waited, any error) passes its turn on, which :meth:`UploadSessions.line
<fedserver.uploads.UploadSessions.line>` does by construction (:class:`LineTurn`). A wait lasts at most
``wait_seconds`` (:data:`LINE_WAIT_SECONDS` by default; ServerConfig.upload_line_wait_seconds), so the
server answers before its node's own idle timeout gives up the silent call; an upload that left the line
without its turn keeps its place for the next upload of its task (``place_kept_seconds``,
:data:`PLACE_KEPT_SECONDS`), so the line stays oldest first across a node's retries. How a wait that ran
out is refused depends on whether the line moved meanwhile (:meth:`UploadSessions.progress
<fedserver.uploads.UploadSessions.progress>`: an upload began or resumed, one ended for good, or a running
one received bytes): it did, UploadQueuedError (call again now, the place is kept: a long line that moves
is no reason to give up a result); it did not, UploadsBusyError (nothing running got nearer to freeing
room: the node's busy window counts).

The line knows the sessions only through three callables (is there room, is anything running, where the
uploads stand), so the room's rules stay in :mod:`fedserver.uploads`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from fedcore.errors import UploadQueuedError, UploadsBusyError
from fedcore.framing import PayloadInfo

if TYPE_CHECKING:
    from fedserver.uploads import UploadSession

#: Longest an upload waits in line by default, seconds (:meth:`UploadSessions.line
#: <fedserver.uploads.UploadSessions.line>`; then it is refused, queued or busy;
#: ServerConfig.upload_line_wait_seconds). A node's
#: UploadResult call makes no progress while it waits (the server reads nothing more), and fednode gives up a
#: call silent for ``NodeConfig.idle_stream_timeout_seconds`` (120 s by default) and rejoins at the back: the
#: server answers well before that, and keeps the upload's place for its retry (:data:`PLACE_KEPT_SECONDS`).
LINE_WAIT_SECONDS = 60.0
#: How long the place of an upload that left the line without its turn (its wait ran out, nothing running
#: could free room, its call ended) is kept for the next upload of its task by default, seconds
#: (ServerConfig.upload_place_kept_seconds): more than a busy retry's backoff (fednode: at most 30 s by
#: default) plus its Heartbeat.
PLACE_KEPT_SECONDS = 120.0


@dataclass(order=True)
class _Waiter:
    """An upload waiting in line; the line is ordered by ``ticket`` (its task's first arrival): oldest first."""

    ticket: int
    future: asyncio.Future[None] = field(compare=False)


class UploadLine:
    """Fresh uploads waiting for room, oldest first, one turn handed out at a time.

    ``room_for(task_id, size)`` says whether a fresh upload fits now, ``running()`` whether room will free
    itself (a stream is writing, a finished buffer is about to be freed), and ``progress()`` where the
    uploads stand (equal before and after a wait: the line did not move).
    """

    def __init__(self, *, room_for: Callable[[str, int], bool], running: Callable[[], bool],
                 progress: Callable[[], tuple[int, int]], wait_seconds: float = LINE_WAIT_SECONDS,
                 place_kept_seconds: float = PLACE_KEPT_SECONDS) -> None:
        self.wait_seconds = wait_seconds  # longest wait in UploadSessions.line() by default
        self.place_kept_seconds = place_kept_seconds  # how long a place in line outlives the wait that left it
        self._room_for = room_for
        self._running = running
        self._progress = progress
        self._line: list[_Waiter] = []  # a heap: the oldest ticket first
        self._tickets = itertools.count()
        self._places: dict[str, tuple[int, float]] = {}  # task id -> (ticket, kept until: time.monotonic())

    def __bool__(self) -> bool:
        """Whether anyone may be in line (woken or departed waiters not yet popped included)."""
        return bool(self._line)

    @property
    def waiting(self) -> int:
        """Uploads waiting in line for room now."""
        return sum(not waiter.future.done() for waiter in self._line)

    def wake(self, everyone: bool = False) -> None:
        """Let the oldest waiter (or all of them) look for room again."""
        while self._line:
            waiter = heapq.heappop(self._line).future
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def wake_if_hopeless(self) -> None:
        """Wake everyone when nothing running can free room (only parked sessions are left)."""
        if self._line and not self._running():
            self.wake(everyone=True)  # only parked sessions are left: waiting cannot help any more

    def began(self, task_id: str) -> None:
        """``task_id``'s upload began (its turn taken): its kept place goes, and the next in line looks for
        room too (a byte budget can hold several small uploads)."""
        self._places.pop(task_id, None)
        if self._line:
            self.wake()

    def pass_turn(self) -> None:
        """Hand the turn on to the next upload in line.

        A turn is handed to one waiter at a time (:meth:`wake`), and only :meth:`began` hands on the next
        one. An upload let through by :meth:`wait` that does not begin (its task closed while it waited, any
        error before) calls this instead; otherwise the next waiter would sit until some other upload frees
        room, or its wait runs out."""
        if self._line:
            self.wake()

    async def wait(self, task_id: str, size: int, timeout: float) -> str:
        """Wait in line until a fresh upload of ``size`` bytes fits, saying how it ended: "admitted",
        "hopeless" (nothing running), or its time ran out: "queued" when the line moved meanwhile
        (``progress()``), else "timed out". A wait that ends otherwise (its timeout, a cancellation) passes
        on a turn it was handed meanwhile itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ticket = self._place_of(task_id)
        start = self._progress()

        def ran_out() -> str:
            return "queued" if self._progress() != start else "timed out"

        while not self._room_for(task_id, size):
            remaining = deadline - loop.time()
            if not self._running() or remaining <= 0:
                self._keep_place(task_id, ticket)
                return "hopeless" if remaining > 0 else ran_out()
            waiter = _Waiter(ticket, loop.create_future())
            heapq.heappush(self._line, waiter)  # woken but beaten to the room: back at our place
            try:
                async with asyncio.timeout(remaining):
                    await waiter.future
            except TimeoutError:
                if _handed(waiter.future) and self._room_for(task_id, size):
                    return "admitted"  # its turn came as the clock ran out
                self._leave_line(waiter.future)
                self._keep_place(task_id, ticket)
                return ran_out()
            except BaseException:  # the call ended while it waited (cancelled)
                self._leave_line(waiter.future)
                self._keep_place(task_id, ticket)
                raise
        return "admitted"

    def _place_of(self, task_id: str) -> int:
        """The ticket of ``task_id``'s upload in line: the one kept from its last wait, else a new one at the back."""
        kept = self._places.pop(task_id, None)
        return kept[0] if kept is not None and kept[1] > time.monotonic() else next(self._tickets)

    def _keep_place(self, task_id: str, ticket: int) -> None:
        now = time.monotonic()
        while self._places:  # in the order they expire: the places kept longest ago first
            oldest = next(iter(self._places))
            if self._places[oldest][1] > now:
                break
            del self._places[oldest]
        self._places.pop(task_id, None)
        self._places[task_id] = (ticket, now + self.place_kept_seconds)

    def _leave_line(self, waiter: asyncio.Future[None]) -> None:
        """``waiter`` leaves the line without its turn: a turn it was handed as it left goes to the next one."""
        if _handed(waiter):
            self.pass_turn()
        else:
            waiter.cancel()  # skipped by wake, not counted as waiting


class LineTurn:
    """One fresh upload's wait in line and the turn it gets (:meth:`UploadSessions.line
    <fedserver.uploads.UploadSessions.line>`)::

        async with uploads.line(task_id, size) as turn:
            ...  # checks that may raise
            session = turn.begin(node_id, info)

    ``admitted`` says whether room was there when the wait ended (False: its ``timeout`` ran out, or nothing
    running could free room; :meth:`begin` then refuses, queued or busy, unless room appeared meanwhile). A
    block that ends without a successful :meth:`begin` passes the turn on (:meth:`UploadLine.pass_turn`): an
    upload that leaves the line never stalls the uploads behind it.
    """

    def __init__(self, line: UploadLine, begin: Callable[[str, str, PayloadInfo], UploadSession], task_id: str,
                 size: int, timeout: float) -> None:
        self.task_id = task_id
        self.size = size
        self.timeout = timeout
        self.admitted = False
        self._line = line
        self._begin = begin  # UploadSessions.begin(task_id, node_id, info)
        self._ending = ""
        self._taken = False

    async def __aenter__(self) -> Self:
        self._ending = await self._line.wait(self.task_id, self.size, self.timeout)
        self.admitted = self._ending == "admitted"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.admitted and not self._taken:
            self._line.pass_turn()

    def begin(self, node_id: str, info: PayloadInfo) -> UploadSession:
        """:meth:`UploadSessions.begin <fedserver.uploads.UploadSessions.begin>` for this upload; the turn is
        taken once it returns. Still no room after the longest wait: UploadQueuedError when the line moved
        during the wait (call again now), else UploadsBusyError, each saying so."""
        try:
            session = self._begin(self.task_id, node_id, info)
        except UploadsBusyError as exc:
            kept = self._line.place_kept_seconds
            if self._ending == "queued":
                raise UploadQueuedError(
                    f"upload queued: waited {self.timeout:g} s in line, the longest an upload waits, while the line "
                    f"moved ({str(exc).removesuffix('; retry later')}); its place is kept for {kept:g} s: "
                    "upload again now") from None
            if self._ending != "timed out":
                raise
            raise UploadsBusyError(
                f"{exc} (waited {self.timeout:g} s in line, the longest an upload waits; an upload of this task "
                f"within {kept:g} s keeps its place)") from None
        self._taken = True
        return session


def _handed(waiter: asyncio.Future[None]) -> bool:
    """Whether a waiter was handed a turn (woken, not cancelled)."""
    return waiter.done() and not waiter.cancelled()
