"""Every task of a running server: open handles, per-node delivery queues, and records of closed tasks.

Delivery is a long poll: :meth:`TaskBoard.next_for` waits on the node's ``asyncio.Event`` with a finite
timeout and hands out the oldest undelivered task that no other stream is sending. A task stays queued
until its payload has been streamed completely, so a poll after a broken download gets it again.

Closed tasks leave a small record (node id, why it closed, a weak reference to the handle) so a late
result is refused with FAILED_PRECONDITION rather than NOT_FOUND, and noted on the handle if the caller
still holds it. The oldest records are forgotten beyond ``max_closed``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fedcore.errors import PermissionDeniedError, TaskClosedError, UnknownTaskError
from fedcore.wire import TaskOutcome
from fedserver.tasks import TaskHandle, TaskState


@dataclass
class ClosedTask:
    node_id: str
    state: TaskState
    reason: str
    handle: weakref.ReferenceType[TaskHandle]
    bytes_received: int = 0
    late_uploads: int = 0

    @property
    def result_received(self) -> bool:
        """The node's result (any outcome) reached the server before the task closed."""
        return self.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REFUSED)


class TaskBoard:
    """Open and closed tasks by id, and a delivery queue per node."""

    def __init__(self, on_close: Callable[[TaskHandle], None] | None = None, max_closed: int = 100_000) -> None:
        self._open: dict[str, TaskHandle] = {}
        self._closed: OrderedDict[str, ClosedTask] = OrderedDict()
        self._queues: dict[str, list[TaskHandle]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._on_close = on_close
        self.max_closed = max_closed
        self.stopping = False

    # -- adding and closing ------------------------------------------------------------------------
    def add(self, handle: TaskHandle) -> None:
        """Queue ``handle`` for its node and wake that node's polls."""
        self._open[handle.task_id] = handle
        self._queues.setdefault(handle.node_id, []).append(handle)
        self._wakeup(handle.node_id).set()

    def closed(self, handle: TaskHandle) -> None:
        """Called by a handle when it ends (its ``on_close``)."""
        self._open.pop(handle.task_id, None)
        queue = self._queues.get(handle.node_id)
        if queue and handle in queue:
            queue.remove(handle)
        self._closed[handle.task_id] = ClosedTask(handle.node_id, handle.state, handle.close_reason,
                                                  weakref.ref(handle), handle.bytes_received)
        while len(self._closed) > self.max_closed:
            self._closed.popitem(last=False)
        if self._on_close is not None:
            self._on_close(handle)

    def open_tasks(self, node_id: str | None = None) -> list[TaskHandle]:
        return [h for h in self._open.values() if node_id is None or h.node_id == node_id]

    def cancel_all(self, reason: str, *, experiment_id: str | None = None, round: int | None = None) -> int:
        """Cancel the open tasks matching ``experiment_id`` / ``round`` (all if None); return how many."""
        victims = [h for h in self._open.values()
                   if (experiment_id is None or h.experiment_id == experiment_id)
                   and (round is None or h.round == round)]
        return sum(h.cancel(reason) for h in victims)

    # -- lookups with the protocol's checks ------------------------------------------------------------
    def lookup(self, task_id: str, node_id: str, *, late_outcome: TaskOutcome | None = None) -> TaskHandle:
        """The open task ``task_id`` if it was sent to ``node_id``.

        Raises UnknownTaskError (no such task), PermissionDeniedError (sent to another node, open or not),
        TaskClosedError (closed; with ``late_outcome`` the refused late result is recorded).
        """
        handle = self._open.get(task_id)
        if handle is not None:
            if handle.node_id != node_id:
                raise PermissionDeniedError(f"task {task_id} was not sent to node {node_id}")
            return handle
        record = self._closed.get(task_id)
        if record is None:
            raise UnknownTaskError(f"no task with id {task_id!r}")
        if record.node_id != node_id:
            raise PermissionDeniedError(f"task {task_id} was not sent to node {node_id}")
        if late_outcome is not None:
            record.late_uploads += 1
            closed_handle = record.handle()
            if closed_handle is not None:
                closed_handle.record_late(late_outcome)
        raise TaskClosedError(f"task {task_id} is no longer accepted ({record.reason})")

    def closed_record(self, task_id: str) -> ClosedTask | None:
        return self._closed.get(task_id)

    # -- delivery --------------------------------------------------------------------------------------
    def _wakeup(self, node_id: str) -> asyncio.Event:
        event = self._wakeups.get(node_id)
        if event is None:
            event = self._wakeups[node_id] = asyncio.Event()
        return event

    def _take(self, node_id: str) -> TaskHandle | None:
        for handle in self._queues.get(node_id, ()):
            if handle.state is TaskState.QUEUED and handle.senders == 0:
                handle.senders += 1
                return handle
        return None

    async def next_for(self, node_id: str, wait_seconds: float) -> TaskHandle | None:
        """The next task to stream to ``node_id`` (its ``senders`` count taken), or None after the wait.

        Returns None at once when the board is stopping. The caller must :meth:`release` the handle when
        its stream ends, whether or not the payload went through.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        event = self._wakeup(node_id)
        while not self.stopping:
            for handle in self._queues.get(node_id, ()):
                handle.touch()  # the node is polling for it: alive
            handle = self._take(node_id)
            if handle is not None:
                return handle
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                continue  # one more look, then the deadline check returns None
        return None

    def acquire(self, handle: TaskHandle) -> None:
        """Count one more stream sending ``handle`` (a resumed download)."""
        handle.senders += 1

    def release(self, handle: TaskHandle, *, delivered: bool) -> None:
        """A stream sending ``handle`` ended; ``delivered`` when its last chunk went out."""
        handle.senders = max(0, handle.senders - 1)
        if delivered and not handle.done():
            handle.mark_delivered()
            queue = self._queues.get(handle.node_id)
            if queue and handle in queue:
                queue.remove(handle)
        elif not handle.done():
            self._wakeup(handle.node_id).set()  # let another poll pick it up

    def stop(self) -> None:
        """Make every waiting poll return None now (the server is shutting down)."""
        self.stopping = True
        for event in self._wakeups.values():
            event.set()
