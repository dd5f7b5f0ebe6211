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

An upload that finds no room waits in line (:class:`~fedserver.upload_line.UploadLine`, oldest first)
while a running upload may free some, instead of being refused: :meth:`UploadSessions.line` and
:meth:`UploadSessions.wait_for_room` wait there, the line owned by the sessions, which tell it whether
there is room, whether anything running can free some, and whether the uploads moved
(:meth:`UploadSessions.progress`); :meth:`UploadSessions.begin` hands the turn on.

A newer UploadResult of the same task from the same node *process* takes a running session over
(:meth:`UploadSessions.begin`): a process uploads a task over one call at a time, so its newer call means it
gave the older one up (its connection died silently and gRPC keepalive would keep that stream "running" for
up to 80 s). The older stream stops writing at once, before the newer one starts: each stream that begins
gets the next ``UploadSession.writer`` number and writes only while the session is active under its number
(:meth:`UploadSession.written_by`), and its wait for the next chunk is woken (``wake_writer``) so that it ends
with a status naming the takeover. Everything runs on the event loop and a chunk is written without an
``await`` in between, so no chunk of the older stream lands after the takeover. The process is the calling
one's ``fedstream-instance-id`` (checked by the service to be the node's registered process): a call without
one (an older node) or of another process never takes over (UploadConflictError, as before the takeover).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcore.errors import (
    ChunkOrderError,
    LimitExceededError,
    UploadConflictError,
    UploadsBusyError,
)
from fedcore.framing import BufferPool, ChunkAssembler, PayloadInfo
from fedserver.upload_line import LINE_WAIT_SECONDS, PLACE_KEPT_SECONDS, LineTurn, UploadLine


@dataclass
class UploadSession:
    task_id: str
    node_id: str
    assembler: ChunkAssembler
    active: bool = True  # a stream is writing into it now
    started_at: float = field(default_factory=time.monotonic)
    instance: str = ""  # fedstream-instance-id of the process whose stream writes (or wrote last); "": unknown
    writer: int = 1  # number of the stream that writes (or wrote last): each begin or resume takes the next one
    wake_writer: Callable[[], None] | None = field(default=None, repr=False)  # ends its wait for a chunk

    @property
    def received(self) -> int:
        return self.assembler.received

    def written_by(self, writer: int) -> bool:
        """Whether the stream numbered ``writer`` still writes into this session: not ended, not taken over
        by a newer stream (:meth:`UploadSessions.begin`), not discarded."""
        return self.active and self.writer == writer


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
        self._moves = 0  # sessions ended for good, buffers freed: see progress()
        self._received_before = 0  # bytes the forgotten sessions had received: progress() never counts back
        self._line = UploadLine(room_for=self._room_for, running=self._running, progress=self.progress,
                                wait_seconds=line_wait_seconds, place_kept_seconds=place_kept_seconds)

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

    @property
    def line_wait_seconds(self) -> float:
        """Longest wait in :meth:`line` by default, seconds."""
        return self._line.wait_seconds

    @line_wait_seconds.setter
    def line_wait_seconds(self, seconds: float) -> None:
        self._line.wait_seconds = seconds

    @property
    def place_kept_seconds(self) -> float:
        """How long a place in line outlives the wait that left it, seconds."""
        return self._line.place_kept_seconds

    @place_kept_seconds.setter
    def place_kept_seconds(self, seconds: float) -> None:
        self._line.place_kept_seconds = seconds

    async def wait_for_room(self, task_id: str, size: int, timeout: float) -> bool:
        """Wait in line until a fresh upload of ``size`` bytes fits; True when it does.

        Returns False at once when no running upload could free room (only parked sessions hold the
        buffers: :meth:`begin` then refuses), and after ``timeout`` seconds. Call :meth:`begin` right
        after, with no ``await`` in between, so the room is still there; a caller that does not (its task
        closed meanwhile, an error) must :meth:`pass_turn`: :meth:`line` does both for you. A wait that
        ends otherwise (its timeout, a cancellation) passes on a turn it was handed meanwhile itself.
        """
        return await self._line.wait(task_id, size, timeout) == "admitted"

    def progress(self) -> tuple[int, int]:
        """Where the uploads stand, compared before and after a wait in line: it changes only with real
        progress towards room: a session receives bytes, ends for good (:meth:`discard`; not one replaced by a
        fresh start of its own task) or a finished buffer is freed. An upload that begins or resumes is no
        progress by itself (a parked upload that resumes and breaks at once frees nothing). Equal values mean
        the line did not move in between: nothing running got nearer to freeing room."""
        return self._moves, self._received_before + sum(s.received for s in self._sessions.values())

    def pass_turn(self) -> None:
        """Hand the turn on to the next upload in line (:meth:`UploadLine.pass_turn
        <fedserver.upload_line.UploadLine.pass_turn>`): an upload let through by :meth:`wait_for_room` that
        does not call :meth:`begin` (its task closed while it waited, any error before) calls this instead."""
        self._line.pass_turn()

    def line(self, task_id: str, size: int, timeout: float | None = None) -> LineTurn:
        """A wait in line for a fresh upload of ``size`` bytes (at most ``timeout`` seconds, by default
        ``line_wait_seconds``), as an async context manager: its block calls :meth:`LineTurn.begin
        <fedserver.upload_line.LineTurn.begin>`; when it ends without (an exception, or no call), the turn
        passes on."""
        wait = self.line_wait_seconds if timeout is None else timeout
        return LineTurn(self._line, self.begin, self.busy_error, task_id, size, wait)

    def begin(self, task_id: str, node_id: str, info: PayloadInfo, instance: str = "") -> UploadSession:
        """Start (``start_offset`` 0) or resume (``start_offset`` = acknowledged offset) an upload for the
        process ``instance`` of ``node_id`` (its ``fedstream-instance-id``; "" unknown). The returned session's
        ``writer`` numbers this stream: it writes only while :meth:`UploadSession.written_by` says so.

        A session that a stream still writes into is taken over when the same process (``instance`` not "")
        of the same node asks (:meth:`_take_over`): the older stream is stopped, the bytes it had written are
        kept, and the header resumes (or starts over) as on a parked session. Otherwise, and for a header the
        takeover would refuse, UploadConflictError (another stream of the task is running); the bytes of a
        resume must be where the session stands (ChunkOrderError otherwise, as on a parked session).
        Raises LimitExceededError for a header over a limit (:meth:`check_limits`), and its subclass
        UploadsBusyError when the upload is within the limits but no buffer is free now (``max_sessions``
        sessions, or no room in ``max_buffered_bytes``): a refusal worth retrying later."""
        self.check_limits(info)
        existing = self._sessions.get(task_id)
        if existing is not None and existing.active:
            try:
                self._take_over(existing, node_id, info, instance)
            except UploadConflictError:
                if not existing.active:  # the older stream was stopped, the header refused: the session is parked
                    self.end(existing)  # uploads waiting in line see that nothing runs (wake_if_hopeless)
                raise
        if info.start_offset > 0:
            if existing is None:
                raise ChunkOrderError(
                    f"cannot resume the upload of task {task_id} at offset {info.start_offset}: the server "
                    "holds no bytes of it (GetUploadStatus says 0); start again at offset 0")
            existing.assembler.resume(info)
            existing.active = True  # no progress by itself (a resume that breaks at once frees nothing)
            existing.writer += 1
            existing.instance = instance
            return existing
        if existing is not None:
            existing = None  # no reference of ours keeps the parked buffer alive: discard frees it, its block is reused
            moves = self._moves
            self.discard(task_id)  # a fresh start replaces the parked bytes
            self._moves = moves  # the same task takes its room again at once: no progress of the line
        if not self._room_for(task_id, info.total_size):
            raise self.busy_error(task_id, info.total_size)
        room = None if self.max_buffered_bytes is None else self.max_buffered_bytes - self._buffered
        assembler = ChunkAssembler(info, max_payload_size=self.max_payload_size,
                                   max_chunk_size=self.max_chunk_size, pool=self.pool, pool_room=room)
        session = self._sessions[task_id] = UploadSession(task_id, node_id, assembler, instance=instance)
        self._buffered += assembler.held_bytes  # a begin alone is no progress: it takes room, frees none
        self._line.began(task_id)  # the next in line may fit too (a byte budget can hold several small uploads)
        return session

    @staticmethod
    def _take_over(session: UploadSession, node_id: str, info: PayloadInfo, instance: str) -> None:
        """Stop the stream writing into ``session`` for a newer header (``info``) of the same task from the
        process ``instance`` of ``node_id``, or refuse the header (nothing changes then).

        Refused with UploadConflictError when ``instance`` is unknown ("", an older node: two calls cannot be
        told apart from two processes) or is not the writing stream's process; with ChunkOrderError, as on a
        parked session, a resume of another payload or past the bytes held. A resume from fewer bytes than held
        (at a chunk boundary of the same payload) is the older stream's chunks arriving after the process
        asked GetUploadStatus: the older stream is stopped all the same (the process gave it up), its bytes
        kept, and the header refused with UploadConflictError (retryable: ask again, resume there), not as
        misframed, which would cost the node its result."""
        task_id = session.task_id
        if not instance or instance != session.instance or node_id != session.node_id:
            raise UploadConflictError(f"an upload for task {task_id} is already running; retry when it ends")
        start, held = info.start_offset, session.received
        if 0 < start < held and start % info.chunk_size == 0 and (info.total_size, info.sha256, info.chunk_size) == (
                session.assembler.info.total_size, session.assembler.info.sha256, session.assembler.info.chunk_size):
            _stop_writer(session)
            raise UploadConflictError(
                f"the upload of task {task_id} was taken over from an older stream of this node process, which "
                f"delivered up to offset {held} after this header's start_offset {start} was asked for; the bytes "
                f"are kept: ask GetUploadStatus again and resume at offset {held}")
        if start > 0:
            session.assembler.resume(info)  # refused as on a parked session, the older stream left writing
        _stop_writer(session)

    def busy_error(self, task_id: str, size: int) -> UploadsBusyError:
        """Why a fresh upload of ``size`` bytes for ``task_id`` cannot begin now: no session slot, no room in
        the byte budget, or (room there) older uploads waiting in line, whose room it is."""
        if not self._room_for(task_id, size):
            if len(self._sessions) - (task_id in self._sessions) >= self.max_sessions:
                return UploadsBusyError(
                    f"too many concurrent uploads ({len(self._sessions)}, limit {self.max_sessions}); retry later")
            return UploadsBusyError(
                f"uploads in progress hold {self._buffered} bytes; {size} more exceed this server's upload buffer "
                f"limit of {self.max_buffered_bytes} bytes; retry later")
        ahead = self._line.waiting
        return UploadsBusyError(f"{ahead} older upload{'s' if ahead != 1 else ''} wait in line ahead of it; retry later")

    def end(self, session: UploadSession) -> None:
        """The stream writing into ``session`` ended (the session stays for a resume)."""
        session.active = False
        if self._line:  # looked at on the next loop step, once a finished upload was discarded
            asyncio.get_running_loop().call_soon(self._line.wake_if_hopeless)

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
        self._received_before += session.received
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
        self._line.wake()  # its session slot is free already

    def _freed(self, size: int, finished: bool = True) -> None:
        self._moves += 1
        self._buffered -= size
        self._unfreed -= finished
        self._line.wake()

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
        return self._line.waiting

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


def _stop_writer(session: UploadSession) -> None:
    """The stream writing into ``session`` writes no more (its number no longer owns it) and is woken from its
    wait for a chunk, to end with the takeover's status; the session stays, parked, for the newer stream."""
    session.active = False
    wake, session.wake_writer = session.wake_writer, None
    if wake is not None:
        wake()


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
