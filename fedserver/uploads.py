"""Result uploads in progress, keyed by task id, resumable from the last acknowledged offset.

Each session holds one :class:`~fedcore.framing.ChunkAssembler` (one preallocated buffer). Limits are
checked on the announced header before the buffer exists: payload size and chunk size against the
server's maxima, and the sessions holding a buffer (running or waiting for a resume) against
``max_sessions`` and ``max_buffered_bytes``. A broken stream leaves its session parked:
``acknowledged(task_id)`` says where to resume, and an UploadResult whose header starts there continues
into the same buffer.

Buffers come from the server's :class:`~fedcore.framing.BufferPool` (``pool_bytes``, at most
``max_buffered_bytes``): the replies of a round are all the size of the model, and a block whose result
was aggregated and freed is reused by the next reply instead of faulting in fresh memory. Once a round's
replies are all in, the round frees the idle blocks (:meth:`UploadSessions.release_idle`) before it
finalizes, so none sits beside the sum and x⁺ nor waits through the next downloads. Idle pooled blocks
count against ``max_buffered_bytes`` too: a new upload releases those it has no room for before its
buffer is allocated, and a reused block counts what its pages hold (its footprint). A forgotten
session's bytes count until its buffer is really gone (:meth:`UploadSessions.discard`), and an upload
restarted from offset 0 frees its parked buffer before taking one (reusing its block). So buffers in
use, finished ones not yet freed and idle ones never hold more than the budget together; the one
exception is an upload larger than the whole budget, admitted when nothing else holds any bytes.

An upload that finds no room waits in line (:meth:`UploadSessions.wait_for_room`, oldest first) while a
running upload may free some, instead of being refused: a thousand nodes replying at once queue behind
``max_sessions`` buffers, and two 2.4 GB replies are received one after the other when
``max_buffered_bytes`` holds only one. Only when nothing running can free room is the upload refused.
Room that frees is handed to one waiter at a time, and only :meth:`UploadSessions.begin` hands it on to
the next; an upload let through that does not begin (its task closed while it waited, any error) passes
its turn on, which :meth:`UploadSessions.line` does by construction (:class:`LineTurn`). A wait lasts at
most ``line_wait_seconds`` (:data:`LINE_WAIT_SECONDS` by default; ServerConfig.upload_line_wait_seconds),
so the server answers before its node's own idle timeout gives up the silent call; an upload that left the
line without its turn keeps its place for the next upload of its task (``place_kept_seconds``,
:data:`PLACE_KEPT_SECONDS`), so the line stays oldest first across a node's retries. How a wait that ran
out is refused depends on whether the line moved meanwhile (:meth:`UploadSessions.progress`: an upload
began or resumed, one ended for good, or a running one received bytes): it did, UploadQueuedError (call
again now, the place is kept: a long line that moves is no reason to give up a result); it did not,
UploadsBusyError (nothing running got nearer to freeing room: the node's busy window counts).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from fedcore.errors import (
    ChunkOrderError,
    LimitExceededError,
    UploadConflictError,
    UploadQueuedError,
    UploadsBusyError,
)
from fedcore.framing import BufferPool, ChunkAssembler, PayloadInfo

#: Longest an upload waits in line by default, seconds (:meth:`UploadSessions.line`; then it is refused, queued
#: or busy; ServerConfig.upload_line_wait_seconds). A node's
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


@dataclass
class UploadSession:
    task_id: str
    node_id: str
    assembler: ChunkAssembler
    active: bool = True  # a stream is writing into it now
    started_at: float = field(default_factory=time.monotonic)

    @property
    def received(self) -> int:
        return self.assembler.received


class UploadSessions:
    """Open upload sessions and the limits that bound them."""

    def __init__(self, *, max_payload_size: int, max_chunk_size: int, max_sessions: int,
                 max_buffered_bytes: int | None = None, pool_bytes: int = 0,
                 line_wait_seconds: float = LINE_WAIT_SECONDS, place_kept_seconds: float = PLACE_KEPT_SECONDS) -> None:
        self.max_payload_size = max_payload_size
        self.max_chunk_size = max_chunk_size
        self.max_sessions = max_sessions
        self.max_buffered_bytes = max_buffered_bytes  # None: no byte budget; one upload always fits
        idle_cap = pool_bytes if max_buffered_bytes is None else min(pool_bytes, max_buffered_bytes)
        self.pool = BufferPool(idle_cap)  # idle upload buffers kept for the next round's replies
        self._sessions: dict[str, UploadSession] = {}
        self._buffered = 0  # bytes of the open sessions' buffers, and of finished ones not yet freed
        self._unfreed = 0  # finished uploads whose buffers are still alive (their result being aggregated)
        self.line_wait_seconds = line_wait_seconds  # longest wait in line() by default
        self.place_kept_seconds = place_kept_seconds  # how long a place in line outlives the wait that left it
        self._moves = 0  # uploads begun or resumed, sessions ended for good, buffers freed: see progress()
        self._line: list[_Waiter] = []  # a heap: the oldest ticket first
        self._tickets = itertools.count()
        self._places: dict[str, tuple[int, float]] = {}  # task id -> (ticket, kept until: time.monotonic())

    def __len__(self) -> int:
        return len(self._sessions)

    def check_limits(self, info: PayloadInfo) -> None:
        """Refuse a header over the configured limits (before anything is allocated)."""
        if info.total_size > self.max_payload_size:
            raise LimitExceededError(
                f"announced payload of {info.total_size} bytes exceeds this server's limit of "
                f"{self.max_payload_size} bytes")
        if info.chunk_size > self.max_chunk_size:
            raise LimitExceededError(
                f"announced chunk size of {info.chunk_size} bytes exceeds this server's limit of "
                f"{self.max_chunk_size} bytes")

    def _room_for(self, task_id: str, size: int) -> bool:
        """Whether a fresh upload of ``size`` bytes for ``task_id`` fits now (its own parked bytes excluded)."""
        own = self._sessions.get(task_id)
        count = len(self._sessions) - (own is not None)
        held = self._buffered - (own.assembler.held_bytes if own is not None else 0)
        if count >= self.max_sessions:
            return False
        return self.max_buffered_bytes is None or held == 0 or held + size <= self.max_buffered_bytes

    def _running(self) -> bool:
        """Whether room will free itself: a stream is writing, or a finished buffer is about to be freed."""
        return self._unfreed > 0 or any(s.active for s in self._sessions.values())

    def _wake(self, everyone: bool = False) -> None:
        """Let the oldest waiter (or all of them) look for room again."""
        while self._line:
            waiter = heapq.heappop(self._line).future
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    async def wait_for_room(self, task_id: str, size: int, timeout: float) -> bool:
        """Wait in line until a fresh upload of ``size`` bytes fits; True when it does.

        Returns False at once when no running upload could free room (only parked sessions hold the
        buffers: :meth:`begin` then refuses), and after ``timeout`` seconds. Call :meth:`begin` right
        after, with no ``await`` in between, so the room is still there; a caller that does not (its task
        closed meanwhile, an error) must :meth:`pass_turn`: :meth:`line` does both for you. A wait that
        ends otherwise (its timeout, a cancellation) passes on a turn it was handed meanwhile itself.
        """
        return await self._wait(task_id, size, timeout) == "admitted"

    def progress(self) -> tuple[int, int]:
        """Where the uploads stand, compared before and after a wait in line: it changes when an upload begins
        or resumes (:meth:`begin`), a session ends for good (:meth:`discard`), a finished buffer is freed, or a
        session receives bytes. Equal values mean the line did not move in between: nothing running got
        nearer to freeing room."""
        return self._moves, sum(s.received for s in self._sessions.values())

    async def _wait(self, task_id: str, size: int, timeout: float) -> str:
        """:meth:`wait_for_room`, saying how it ended: "admitted", "hopeless" (nothing running), or its time
        ran out: "queued" when the line moved meanwhile (:meth:`progress`), else "timed out"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ticket = self._place_of(task_id)
        start = self.progress()

        def ran_out() -> str:
            return "queued" if self.progress() != start else "timed out"

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
            waiter.cancel()  # skipped by _wake, not counted as waiting

    def pass_turn(self) -> None:
        """Hand the turn on to the next upload in line.

        A turn is handed to one waiter at a time (:meth:`_wake`), and only :meth:`begin` hands on the
        next one. An upload let through by :meth:`wait_for_room` that does not call :meth:`begin` (its task
        closed while it waited, any error before) calls this instead; otherwise the next waiter would sit
        until some other upload frees room, or its wait runs out."""
        if self._line:
            self._wake()

    def line(self, task_id: str, size: int, timeout: float | None = None) -> LineTurn:
        """A wait in line for a fresh upload of ``size`` bytes (at most ``timeout`` seconds, by default
        ``line_wait_seconds``), as an async context manager: its block calls :meth:`LineTurn.begin`; when it
        ends without (an exception, or no call), the turn passes on."""
        return LineTurn(self, task_id, size, self.line_wait_seconds if timeout is None else timeout)

    def begin(self, task_id: str, node_id: str, info: PayloadInfo) -> UploadSession:
        """Start (``start_offset`` 0) or resume (``start_offset`` = acknowledged offset) an upload.

        Raises LimitExceededError for a header over a limit (:meth:`check_limits`), and its subclass
        UploadsBusyError when the upload is within the limits but no buffer is free now (``max_sessions``
        sessions, or no room in ``max_buffered_bytes``): a refusal worth retrying later."""
        self.check_limits(info)
        existing = self._sessions.get(task_id)
        if existing is not None and existing.active:
            raise UploadConflictError(f"an upload for task {task_id} is already running; retry when it ends")
        if info.start_offset > 0:
            if existing is None:
                raise ChunkOrderError(
                    f"cannot resume the upload of task {task_id} at offset {info.start_offset}: the server "
                    "holds no bytes of it (GetUploadStatus says 0); start again at offset 0")
            existing.assembler.resume(info)
            existing.active = True
            self._moves += 1
            return existing
        if existing is not None:
            existing = None  # no reference of ours keeps the parked buffer alive: discard frees it, its block is reused
            self.discard(task_id)  # a fresh start replaces the parked bytes
        if len(self._sessions) >= self.max_sessions:
            raise UploadsBusyError(
                f"too many concurrent uploads ({len(self._sessions)}, limit {self.max_sessions}); "
                "retry later")
        if not self._room_for(task_id, info.total_size):
            raise UploadsBusyError(
                f"uploads in progress hold {self._buffered} bytes; {info.total_size} more exceed this server's "
                f"upload buffer limit of {self.max_buffered_bytes} bytes; retry later")
        room = None if self.max_buffered_bytes is None else self.max_buffered_bytes - self._buffered
        assembler = ChunkAssembler(info, max_payload_size=self.max_payload_size,
                                   max_chunk_size=self.max_chunk_size, pool=self.pool, pool_room=room)
        session = self._sessions[task_id] = UploadSession(task_id, node_id, assembler)
        self._buffered += assembler.held_bytes
        self._moves += 1
        self._places.pop(task_id, None)
        if self._line:
            self._wake()  # the next in line may fit too (a byte budget can hold several small uploads)
        return session

    def end(self, session: UploadSession) -> None:
        """The stream writing into ``session`` ended (the session stays for a resume)."""
        session.active = False
        if self._line:  # looked at on the next loop step, once a finished upload was discarded
            asyncio.get_running_loop().call_soon(self._wake_if_hopeless)

    def _wake_if_hopeless(self) -> None:
        if self._line and not self._running():
            self._wake(everyone=True)  # only parked sessions are left: waiting cannot help any more

    def discard(self, task_id: str, *, held_until_freed: object = None) -> None:
        """Forget the session (completed, digest mismatch, task closed, restarted from offset 0).

        Its assembler lets go of the buffer (:meth:`ChunkAssembler.close`), so a session object still
        referenced (by a traceback, by a stream about to notice its task closed) holds no bytes. Those bytes
        count against ``max_buffered_bytes`` as long as the memory is alive, since the next upload must not
        be received into memory the previous one still occupies: they are freed at once when nothing
        else references the buffer, else when the last reference dies (on the event loop), e.g.
        ``held_until_freed`` (the assembled buffer, whose decoded arrays live on until the result is
        aggregated) or a hashing job still reading it. Until then they count as about to be freed
        (:meth:`wait_for_room` waits for them).
        """
        session = self._sessions.pop(task_id, None)
        if session is None:
            return
        self._moves += 1
        size = session.assembler.held_bytes
        holder = weakref.ref(session.assembler.buffer if held_until_freed is None else held_until_freed)
        session.assembler.close()
        del session, held_until_freed
        alive = holder()
        if alive is None:
            self._freed(size, finished=False)
            return
        self._unfreed += 1
        weakref.finalize(alive, _call_soon, _running_loop(), self._freed, size)
        self._wake()  # its session slot is free already

    def _freed(self, size: int, finished: bool = True) -> None:
        self._moves += 1
        self._buffered -= size
        self._unfreed -= finished
        self._wake()

    def release_idle(self) -> None:
        """Free the idle pooled buffers (the replies a caller waited for are all in).

        A round calls it before ``finalize``: an idle reply-sized block kept through ``finalize`` (sum and
        x⁺ alive together) and on to the next round's downloads would add one model to the server's peak
        for the price of faulting in one buffer per round; within a round the replies still reuse it.
        """
        self.pool.trim(0)

    @property
    def waiting(self) -> int:
        """Uploads waiting in line for room now."""
        return sum(not waiter.future.done() for waiter in self._line)

    @property
    def buffered_bytes(self) -> int:
        """Bytes counted against ``max_buffered_bytes``: open sessions' buffers and discarded ones still alive."""
        return self._buffered

    def session(self, task_id: str) -> UploadSession | None:
        return self._sessions.get(task_id)

    def acknowledged(self, task_id: str) -> int:
        """Contiguous bytes received and kept for ``task_id`` (0 when there is no session)."""
        session = self._sessions.get(task_id)
        return 0 if session is None else session.received


class LineTurn:
    """One fresh upload's wait in line and the turn it gets (:meth:`UploadSessions.line`)::

        async with uploads.line(task_id, size) as turn:
            ...  # checks that may raise
            session = turn.begin(node_id, info)

    ``admitted`` says whether room was there when the wait ended (False: its ``timeout`` ran out, or nothing
    running could free room; :meth:`begin` then refuses, queued or busy, unless room appeared meanwhile). A
    block that
    ends without a successful :meth:`begin` passes the turn on (:meth:`UploadSessions.pass_turn`): an upload
    that leaves the line never stalls the uploads behind it.
    """

    def __init__(self, sessions: UploadSessions, task_id: str, size: int, timeout: float) -> None:
        self.task_id = task_id
        self.size = size
        self.timeout = timeout
        self.admitted = False
        self._sessions = sessions
        self._ending = ""
        self._taken = False

    async def __aenter__(self) -> Self:
        self._ending = await self._sessions._wait(self.task_id, self.size, self.timeout)
        self.admitted = self._ending == "admitted"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.admitted and not self._taken:
            self._sessions.pass_turn()

    def begin(self, node_id: str, info: PayloadInfo) -> UploadSession:
        """:meth:`UploadSessions.begin` for this upload; the turn is taken once it returns. Still no room after
        the longest wait: UploadQueuedError when the line moved during the wait (call again now), else
        UploadsBusyError, each saying so."""
        try:
            session = self._sessions.begin(self.task_id, node_id, info)
        except UploadsBusyError as exc:
            kept = self._sessions.place_kept_seconds
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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # called outside a loop (a synchronous caller): no waiters to wake
        return None


def _call_soon(loop: asyncio.AbstractEventLoop | None, callback: Callable[..., None], *args: object) -> None:
    """Run ``callback`` on ``loop`` from wherever the buffer was freed (nothing to do once it is closed);
    directly without a loop."""
    if loop is None:
        callback(*args)
    elif not loop.is_closed():
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # closed in between
            pass
