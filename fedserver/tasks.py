"""One task sent to one node: its lifecycle, inactivity timeout, progress events and final result.

A :class:`TaskHandle` is what :meth:`FedServer.dispatch` returns. Its payload is anything
:class:`SendablePayload` describes: an :class:`~fedcore.framing.OutgoingPayload` shared by every node of
the round (encoded once, streamed many times), or a round's :class:`~fedserver.round_model.TaskPayload`
(which can rebuild its bytes after the round released x); the handle drops its reference when it closes,
so the global model is freed after the round.

Lifecycle (``TaskState``)::

    QUEUED ──(payload fully streamed)──▶ RUNNING ──(first result chunk)──▶ UPLOADING
       └─────────────┴───────────────────────┴──▶ SUCCEEDED | FAILED | REFUSED | TIMED_OUT | CANCELLED
    RUNNING ──(its node process polls naming the tasks it holds, not this one)──▶ QUEUED

The last edge (:meth:`TaskHandle.requeue`, decided by the task board) is a payload that went whole into a
dead connection: the server sent it, the process never got it, and it is sent again from offset 0.

``last_activity`` moves on every sign of life for the task (a poll that waits for it, chunks sent or
received, a Report or Heartbeat naming it); when it stays still for ``inactivity_timeout`` seconds the
task ends TIMED_OUT. A slow but moving upload therefore never times out, nor does a result waiting in the
server's upload line for a buffer (:meth:`TaskHandle.kept_active`). A task whose node disconnected
and did not come back within the task board's reconnect grace ends FAILED sooner (:meth:`TaskHandle.lose`);
one whose payload the server cannot rebuild (a low-memory round's checkpoint gone bad) ends FAILED at once
(:meth:`TaskHandle.fail`). Listeners are dropped when the task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from fedcore.errors import TaskClosedError
from fedcore.event_wait import within
from fedcore.framing import PayloadInfo
from fedcore.wire import LogLine, ReportEvent, TaskDescriptor, TaskKind, TaskOutcome, TrainingProgress

log = logging.getLogger(__name__)


class SendablePayload(Protocol):
    """What the server streams to a node: size, digest and chunking, then ``(offset, data)`` chunks.

    :class:`~fedcore.framing.OutgoingPayload` is one; so is :class:`~fedserver.round_model.TaskPayload`.
    """

    chunk_size: int
    total_size: int
    sha256: bytes

    def info(self, start_offset: int = 0) -> PayloadInfo: ...

    def iter_chunks(self, start_offset: int = 0) -> Iterator[tuple[int, memoryview | bytes]]: ...


@runtime_checkable
class PreparedPayload(Protocol):
    """A payload whose chunks may need slow preparation first (a reload): the server awaits
    :meth:`open_chunks`, which does that work off the event loop, instead of calling ``iter_chunks``."""

    async def open_chunks(self, start_offset: int = 0) -> Iterator[tuple[int, memoryview | bytes]]: ...


class TaskState(str, enum.Enum):
    QUEUED = "queued"  # waiting for the node to poll (or for its download to complete, or lost in a dead connection)
    RUNNING = "running"  # payload delivered; the node works on it
    UPLOADING = "uploading"  # result bytes are arriving
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the node ran the task and it failed, or its result was unusable
    REFUSED = "refused"  # the node refused to run it (plan not approved, no dataset)
    TIMED_OUT = "timed_out"  # no activity for inactivity_timeout seconds
    CANCELLED = "cancelled"  # cancelled by the researcher (round finished) or the server stopped

    @property
    def terminal(self) -> bool:
        return self not in (TaskState.QUEUED, TaskState.RUNNING, TaskState.UPLOADING)


_STATE_OF_OUTCOME = {TaskOutcome.SUCCEEDED: TaskState.SUCCEEDED, TaskOutcome.FAILED: TaskState.FAILED,
                     TaskOutcome.REFUSED: TaskState.REFUSED}


def state_of_outcome(outcome: TaskOutcome) -> TaskState:
    return _STATE_OF_OUTCOME[outcome]


@dataclass(frozen=True)
class TransferProgress:
    """Bytes of a payload moved so far; ``direction`` is from the node's side (download = to the node)."""

    direction: Literal["download", "upload"]
    done: int
    total: int


@dataclass(frozen=True)
class TaskTimings:
    """``time.monotonic()`` stamps of a task's life; None for stages it never reached."""

    dispatched_at: float
    delivered_at: float | None
    upload_started_at: float | None
    finished_at: float

    @property
    def total_seconds(self) -> float:
        return self.finished_at - self.dispatched_at

    @property
    def download_seconds(self) -> float | None:
        """From dispatch to the payload fully streamed (includes waiting for the node's poll)."""
        return None if self.delivered_at is None else self.delivered_at - self.dispatched_at

    @property
    def compute_seconds(self) -> float | None:
        """From delivery to the first result byte (the node's work)."""
        if self.delivered_at is None or self.upload_started_at is None:
            return None
        return self.upload_started_at - self.delivered_at

    @property
    def upload_seconds(self) -> float | None:
        return None if self.upload_started_at is None else self.finished_at - self.upload_started_at


@dataclass(frozen=True)
class TaskResult:
    """How a task ended. ``payload`` is the decoded result document (SUCCEEDED only, else None)."""

    task_id: str
    node_id: str
    experiment_id: str
    round: int
    kind: TaskKind
    outcome: TaskState
    error_message: str
    payload: Any
    bytes_sent: int  # payload bytes streamed to the node, retransmissions included
    bytes_received: int  # result bytes accepted from the node, resumed uploads counted once
    timings: TaskTimings

    @property
    def succeeded(self) -> bool:
        return self.outcome is TaskState.SUCCEEDED


@dataclass(frozen=True)
class LateUpload:
    """A result that arrived after its task closed; refused with FAILED_PRECONDITION, kept for the record."""

    outcome: TaskOutcome
    at: float  # time.monotonic()
    closed_because: str


TaskListener = Callable[["TaskHandle", "ReportEvent | TransferProgress"], None]


class TaskHandle:
    """A task dispatched to one node. Await :meth:`result`; :meth:`cancel` refuses any later result.

    Progress: :meth:`subscribe` a callback ``(handle, event)`` called with each
    :class:`~fedcore.wire.ReportEvent` the node reports and each :class:`TransferProgress` (per chunk);
    ``latest_progress`` and ``logs`` keep the last values for polling-style consumers.
    """

    def __init__(self, *, task_id: str, node_id: str, experiment_id: str, round: int, kind: TaskKind,
                 payload: SendablePayload, inactivity_timeout: float | None,
                 on_close: Callable[[TaskHandle], None] | None = None, max_logs: int = 1000) -> None:
        self.task_id = task_id
        self.node_id = node_id
        self.experiment_id = experiment_id
        self.round = round
        self.kind = TaskKind(kind)
        self.inactivity_timeout = inactivity_timeout
        self.state = TaskState.QUEUED
        self.close_reason = ""
        self.dispatched_at = self.last_activity = time.monotonic()
        self.delivered_at: float | None = None
        self.delivered_to = ""  # instance id of the node process the delivery went to ("": not delivered, or unknown)
        self.upload_started_at: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.latest_progress: TrainingProgress | None = None
        self.logs: deque[tuple[float, LogLine]] = deque(maxlen=max_logs)
        self.late_uploads: list[LateUpload] = []
        self.sender_generations: list[int] = []  # the node's poll generation of each stream sending the payload
        self.result_received = False  # the node's own outcome ended the task (finish()), not the server
        # an UploadResult header naming the task came from the process it was delivered to (even one refused on
        # that header: too large, malformed, busy): that process plainly got the task, never sent it again
        self.result_offered = False
        # (ErrorReason name, message) of the last UploadResult header of the task refused for the result itself
        # (too large, busy, framing, malformed) from the process it was delivered to; None once a header passes.
        # GetUploadStatus tells it to a node whose grpc.aio hid the refusal (grpc/grpc#36066)
        self.refused_header: tuple[str, str] | None = None
        self._payload: SendablePayload | None = payload
        self._listeners: list[TaskListener] = []
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[TaskResult] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._kept_active = 0  # blocks of kept_active() running now
        self._arm_timer()

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r}, node={self.node_id!r}, round={self.round}, {self.state.value})"

    # -- public API ----------------------------------------------------------------------------
    @property
    def payload(self) -> SendablePayload | None:
        """The payload being sent; None once the task has closed."""
        return self._payload

    def descriptor(self, start_offset: int = 0) -> TaskDescriptor:
        """The TaskHeader sent before the chunks (from ``start_offset`` when resuming)."""
        if self._payload is None:
            raise RuntimeError(f"task {self.task_id} is closed; its payload is gone")
        return TaskDescriptor(self.task_id, self.experiment_id, self.round, self.kind,
                              self._payload.info(start_offset), float(self.inactivity_timeout or 0.0))

    def done(self) -> bool:
        return self.state.terminal

    def closed_error(self) -> TaskClosedError:
        """The refusal of a call naming this task once it has ended: ``task <id> is no longer accepted (<why>)``."""
        return TaskClosedError(f"task {self.task_id} is no longer accepted ({self.close_reason})")

    @property
    def senders(self) -> int:
        """How many poll streams are sending this task's payload now (kept by the task board)."""
        return len(self.sender_generations)

    async def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task to end (``TimeoutError`` after ``timeout`` seconds; the task goes on)."""
        return await within(asyncio.shield(self._future), timeout)

    def cancel(self, reason: str = "round finished") -> bool:
        """End the task as CANCELLED; a later result is refused. False if it had already ended."""
        return self._finish(TaskState.CANCELLED, reason, close_reason=reason)

    def subscribe(self, listener: TaskListener) -> None:
        """Call ``listener`` with each event until :meth:`unsubscribe` or the task ends (a finished handle,
        kept for its late result, keeps none of its listeners alive)."""
        if not self.state.terminal:
            self._listeners.append(listener)

    def unsubscribe(self, listener: TaskListener) -> None:
        """Stop calling ``listener`` (no error if it is not subscribed)."""
        self._listeners = [known for known in self._listeners if known != listener]

    def touch(self) -> None:
        """Record activity (resets the inactivity timeout)."""
        self.last_activity = time.monotonic()

    @contextlib.contextmanager
    def kept_active(self) -> Iterator[None]:
        """Count the task as active for as long as the block runs, and its inactivity timeout from the block's
        end: e.g. while its result waits in the server's upload line, its node waits on an open call and has
        nothing to send (:meth:`fedserver.uploads.UploadSessions.line`)."""
        self._kept_active += 1
        self.touch()
        try:
            yield
        finally:
            self._kept_active -= 1
            self.touch()

    @property
    def delivering(self) -> bool:
        """Whether the task's result is arriving now: its upload runs, or waits in the server's upload line."""
        return self.state is TaskState.UPLOADING or self._kept_active > 0

    # -- used by the server ----------------------------------------------------------------------
    def report(self, event: ReportEvent) -> None:
        self.touch()
        if isinstance(event.event, TrainingProgress):
            self.latest_progress = event.event
        else:
            self.logs.append((event.timestamp, event.event))
        self._emit(event)

    def transferred(self, direction: Literal["download", "upload"], nbytes: int, done: int, total: int) -> None:
        self.touch()
        if direction == "download":
            self.bytes_sent += nbytes
        self._emit(TransferProgress(direction, done, total))

    def mark_delivered(self, instance_id: str = "") -> None:
        """The payload's last chunk went out, to the node process ``instance_id`` ("" if the poll named none)."""
        if self.state is TaskState.QUEUED:
            self.state = TaskState.RUNNING
            self.delivered_at = time.monotonic()
            self.delivered_to = instance_id
        self.touch()

    def requeue(self) -> bool:
        """RUNNING back to QUEUED: the process it was delivered to does not hold it (it went whole into a dead
        connection), so the board sends it again from offset 0. False (nothing changes) unless RUNNING with
        no result offered: a task whose result has begun arriving, or whose upload header came from the
        process (``result_offered``, refused or not), is the node's."""
        if self.state is not TaskState.RUNNING or self.result_offered:
            return False
        self.state = TaskState.QUEUED
        self.delivered_at, self.delivered_to = None, ""
        self.touch()
        return True

    def mark_uploading(self) -> None:
        if self.state in (TaskState.QUEUED, TaskState.RUNNING):
            self.state = TaskState.UPLOADING
            if self.delivered_at is None:
                self.delivered_at = time.monotonic()
        if self.upload_started_at is None:
            self.upload_started_at = time.monotonic()
        self.touch()

    def finish(self, state: TaskState, error_message: str = "", payload: Any = None,
               bytes_received: int = 0) -> bool:
        """End the task with the node's outcome; False if it had already ended."""
        if bytes_received:
            self.bytes_received = bytes_received
        if not self.state.terminal:
            self.result_received = True  # before _finish: its on_close records it
        return self._finish(state, error_message, payload, close_reason="result already received")

    def lose(self, message: str) -> bool:
        """End the task FAILED because its node is gone (``message`` says since when); a later result is
        refused. False if it had already ended."""
        return self._finish(TaskState.FAILED, message, close_reason=message)

    def fail(self, message: str) -> bool:
        """End the task FAILED because the server cannot go on with it (e.g. its payload cannot be rebuilt:
        ``message`` says why); a later result is refused. False if it had already ended."""
        return self._finish(TaskState.FAILED, message, close_reason=message)

    def record_late(self, outcome: TaskOutcome) -> None:
        self.late_uploads.append(LateUpload(outcome, time.monotonic(), self.close_reason))
        log.warning("late result (%s) for task %s from node %s refused: %s", outcome.value, self.task_id,
                    self.node_id, self.close_reason)

    # -- internals ------------------------------------------------------------------------------
    def _finish(self, state: TaskState, error_message: str, payload: Any = None, *, close_reason: str) -> bool:
        if self.state.terminal:
            return False
        self.state = state
        self.close_reason = close_reason
        now = time.monotonic()
        timings = TaskTimings(self.dispatched_at, self.delivered_at, self.upload_started_at, now)
        self._future.set_result(TaskResult(
            self.task_id, self.node_id, self.experiment_id, self.round, self.kind, state, error_message,
            payload, self.bytes_sent, self.bytes_received, timings))
        self._payload = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._listeners = []  # events end with the task; listeners must not live as long as a kept handle
        if self._on_close is not None:
            self._on_close(self)
        return True

    def _emit(self, event: ReportEvent | TransferProgress) -> None:
        for listener in self._listeners:
            try:
                listener(self, event)
            except Exception:  # a broken progress bar must not break the transfer
                log.exception("task listener %r failed on %s", listener, type(event).__name__)

    def _arm_timer(self) -> None:
        if self.inactivity_timeout is None or self.state.terminal:
            return
        delay = self.last_activity + self.inactivity_timeout - time.monotonic()
        self._timer = self._loop.call_later(max(delay, 0.0), self._check_inactivity)

    def _check_inactivity(self) -> None:
        self._timer = None
        if self.state.terminal or self.inactivity_timeout is None:
            return
        if self._kept_active:  # e.g. waiting in the upload line: active all along
            self.touch()
        if time.monotonic() - self.last_activity >= self.inactivity_timeout - 1e-3:  # timers may fire early
            reason = f"timed out after {self.inactivity_timeout:g} s without activity"
            self._finish(TaskState.TIMED_OUT, f"node {self.node_id} {reason} ({self.state.value})",
                         close_reason=reason)
        else:
            self._arm_timer()
