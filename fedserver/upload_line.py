"""The line of fresh uploads waiting for room (a session slot, buffer bytes) in the upload sessions.

:class:`~fedserver.uploads.UploadSessions` owns one :class:`UploadLine` and delegates to it.

An upload that finds no room waits in line (:meth:`UploadLine.wait`) while a running upload may free some,
instead of being refused: a thousand nodes replying at once queue behind ``max_sessions`` buffers, and two
2.4 GB replies are received one after the other when ``max_buffered_bytes`` holds only one. Only when nothing
running can free room is the upload refused. The line is strictly oldest first: an upload is admitted only
when it fits and no upload in line holds an older ticket, so younger small uploads that would fit never
overtake a big one at the head (review R3: they did, and the big one was refused queued without end). Room
that frees wakes the head, which stays in line (its claim stands) until it begins or leaves, so a newcomer
cannot slip in between the wake and the head's look at the room; only :meth:`UploadSessions.begin
<fedserver.uploads.UploadSessions.begin>` wakes the next one (:meth:`UploadLine.began`), and an upload let
through that does not begin (its task closed while it waited, any error) passes its turn on, which
:meth:`UploadSessions.line <fedserver.uploads.UploadSessions.line>` does by construction (:class:`LineTurn`).
No deadlock: the head fits once every running upload drained (room is there on an empty buffer), and when
nothing running can free room every waiter is woken and refused. A wait lasts at most ``wait_seconds``
(:data:`LINE_WAIT_SECONDS` by default; ServerConfig.upload_line_wait_seconds), so the server answers before
its node's own idle timeout gives up the silent call; an upload that left the line without its turn keeps its
place (its ticket) for the next upload of its task (``place_kept_seconds``, :data:`PLACE_KEPT_SECONDS`), so
the line stays oldest first across a node's retries. How a wait that ran out is refused depends on whether
the line moved meanwhile (:meth:`UploadSessions.progress <fedserver.uploads.UploadSessions.progress>`: real
progress only, a running upload received bytes, one ended for good, a buffer was freed; an upload that began
or resumed is none by itself): it did, UploadQueuedError (call again now, the place is kept: a long line that
moves is no reason to give up a result); it did not, UploadsBusyError (nothing running got nearer to freeing
room: the node's busy window counts).

The line knows the sessions only through three callables (is there room, is anything running, where the
uploads stand), so the room's rules stay in :mod:`fedserver.uploads`.
"""

from __future__ import annotations

import asyncio
import bisect
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


@dataclass(eq=False)
class _Waiter:
    """An upload waiting in line; the line is ordered by ``ticket`` (its task's first arrival): oldest first.

    It stays in line from its arrival until it is admitted or leaves: a woken waiter keeps its claim while it
    looks for room, so no upload that arrived after it can take the room handed to it. ``future`` is the
    current wake-up (a new one each time it waits again)."""

    ticket: int
    future: asyncio.Future[None] = field(compare=False)


class UploadLine:
    """Fresh uploads waiting for room, strictly oldest first.

    ``room_for(task_id, size)`` says whether a fresh upload fits now, ``running()`` whether room will free
    itself (a stream is writing, a finished buffer is about to be freed), and ``progress()`` where the
    uploads stand (equal before and after a wait: the line did not move).

    An upload is admitted only when it fits **and** no upload in line holds an older ticket: a big upload at
    the head is never overtaken by younger small ones that would fit, and a newcomer never takes room freed
    for the head. This cannot deadlock: the head fits once every running upload drained (``room_for`` is
    true on an empty buffer), and when nothing running can free room every waiter is woken and refused.
    """

    def __init__(self, *, room_for: Callable[[str, int], bool], running: Callable[[], bool],
                 progress: Callable[[], tuple[int, int]], wait_seconds: float = LINE_WAIT_SECONDS,
                 place_kept_seconds: float = PLACE_KEPT_SECONDS) -> None:
        self.wait_seconds = wait_seconds  # longest wait in UploadSessions.line() by default
        self.place_kept_seconds = place_kept_seconds  # how long a place in line outlives the wait that left it
        self._room_for = room_for
        self._running = running
        self._progress = progress
        self._line: list[_Waiter] = []  # the waiters in line, sorted by ticket: the oldest first
        self._tickets = itertools.count()
        self._places: dict[str, tuple[int, float]] = {}  # task id -> (ticket, kept until: time.monotonic())

    def __bool__(self) -> bool:
        """Whether anyone is in line."""
        return bool(self._line)

    @property
    def waiting(self) -> int:
        """Uploads waiting in line for room now."""
        return len(self._line)

    def wake(self, everyone: bool = False) -> None:
        """Let the oldest waiter (or all of them) look for room again; they stay in line meanwhile."""
        for waiter in self._line if everyone else self._line[:1]:
            if not waiter.future.done():
                waiter.future.set_result(None)

    def wake_if_hopeless(self) -> None:
        """Wake everyone when nothing running can free room (only parked sessions are left)."""
        if self._line and not self._running():
            self.wake(everyone=True)  # only parked sessions are left: waiting cannot help any more

    def began(self, task_id: str) -> None:
        """``task_id``'s upload began (its turn taken): its kept place goes, and the next in line looks for
        room too (a byte budget can hold several small uploads)."""
        self._places.pop(task_id, None)
        self.wake()

    def pass_turn(self) -> None:
        """Let the head of the line look for room again: an upload admitted by :meth:`wait` that does not
        begin (its task closed while it waited, any error before) calls this instead of :meth:`began`;
        otherwise the head would sit until some other upload frees room, or its wait runs out."""
        self.wake()

    async def wait(self, task_id: str, size: int, timeout: float) -> str:
        """Wait in line until a fresh upload of ``size`` bytes fits and no older upload waits, saying how it
        ended: "admitted", "hopeless" (no room and nothing running), or its time ran out: "queued" when the
        line moved meanwhile (``progress()``), else "timed out". An upload not admitted keeps its place for
        its task's next upload (``place_kept_seconds``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = _Waiter(self._place_of(task_id), loop.create_future())
        bisect.insort(self._line, waiter, key=_ticket)  # its claim stands from now on: nobody younger goes first
        start = self._progress()
        try:
            while True:
                if self._line[0] is waiter and self._room_for(task_id, size):
                    self._leave(waiter)
                    return "admitted"  # the caller begins at once (no await in between): the room is its own
                remaining = deadline - loop.time()
                fits = self._room_for(task_id, size)  # room taken only by older uploads: wait for them
                if (not fits and not self._running()) or remaining <= 0:
                    self._leave(waiter, task_id)
                    if remaining > 0:
                        return "hopeless"
                    return "queued" if self._progress() != start else "timed out"
                if waiter.future.done():
                    waiter.future = loop.create_future()
                try:
                    async with asyncio.timeout(remaining):
                        await waiter.future
                except TimeoutError:
                    pass  # looked at once more above: its turn may have come as the clock ran out
        except BaseException:  # the call ended while it waited (cancelled)
            if waiter in self._line:
                self._leave(waiter, task_id)
            raise

    def _leave(self, waiter: _Waiter, task_id: str | None = None) -> None:
        """``waiter`` leaves the line: admitted (``task_id`` None: its :meth:`began` or :meth:`pass_turn` wakes
        the next one), or not, then ``task_id`` keeps its place and, when it was the head, the next one looks
        for room (room it could not use, or left after it)."""
        head = self._line[0] is waiter
        self._line.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
        if task_id is not None:
            self._keep_place(task_id, waiter.ticket)
            if head:
                self.wake()

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


class LineTurn:
    """One fresh upload's wait in line and the turn it gets (:meth:`UploadSessions.line
    <fedserver.uploads.UploadSessions.line>`)::

        async with uploads.line(task_id, size) as turn:
            ...  # checks that may raise
            session = turn.begin(node_id, info)

    ``admitted`` says whether the upload got its turn (room, and nobody older in line) when the wait ended
    (False: its ``timeout`` ran out, or nothing running could free room; :meth:`begin` then refuses, queued or
    busy, even if room is there: it belongs to an older upload in line). A block that ends without a
    successful :meth:`begin` passes the turn on (:meth:`UploadLine.pass_turn`): an upload that leaves the
    line never stalls the uploads behind it.
    """

    def __init__(self, line: UploadLine, begin: Callable[[str, str, PayloadInfo, str], UploadSession],
                 busy: Callable[[str, int], UploadsBusyError], task_id: str, size: int, timeout: float) -> None:
        self.task_id = task_id
        self.size = size
        self.timeout = timeout
        self.admitted = False
        self._line = line
        self._begin = begin  # UploadSessions.begin(task_id, node_id, info, instance)
        self._busy = busy  # UploadSessions.busy_error(task_id, size): why there is no room for it now
        self._ending = ""
        self._taken = False

    async def __aenter__(self) -> Self:
        self._ending = await self._line.wait(self.task_id, self.size, self.timeout)
        self.admitted = self._ending == "admitted"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.admitted and not self._taken:
            self._line.pass_turn()

    def begin(self, node_id: str, info: PayloadInfo, instance: str = "") -> UploadSession:
        """:meth:`UploadSessions.begin <fedserver.uploads.UploadSessions.begin>` for this upload (of the node
        process ``instance``, whose newer call may take over a running upload of the task); the turn is
        taken once it returns. Not admitted after the longest wait (no room, or older uploads in line ahead):
        UploadQueuedError when the line moved during the wait (call again now), else UploadsBusyError, each
        saying so."""
        try:
            if not self.admitted:
                raise self._busy(self.task_id, self.size)
            session = self._begin(self.task_id, node_id, info, instance)
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


def _ticket(waiter: _Waiter) -> int:
    return waiter.ticket
