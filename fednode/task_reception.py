"""``TaskReception``: how a node process receives a polled task's payload, and keeps it across reconnects.

After a poll's task header, the chunks are written into one preallocated buffer from the client's
:class:`~fedcore.framing.BufferPool` (the next task reuses the memory of the previous one once nothing
references it). A download that breaks off stays (:attr:`TaskReception.current`): the next poll asks the
server to resume it where it stopped (:meth:`TaskReception.resume_point`). Once the last chunk is in, the
stream is read to its end, so the server records the task as delivered (not to resend), and the payload's
size and digest are checked. A task the node cannot take is answered without running it
(:attr:`PolledTask.early_reply`): REFUSED when its payload is over this node's limits, FAILED when its stream
or payload is misframed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConnectionLostError, FramingError, MessageError, NodeError, PayloadSizeError
from fedcore.framing import BufferPool
from fedcore.wire import TaskDescriptor
from fednode.config import NodeConfig
from fednode.log_text import log_text
from fednode.transfers import PendingUpload, TaskDownload
from fednode.transport import EOF, PollStream

#: A child of the client's logger: receiving tasks is part of the node's loop, and a level or filter set on
#: ``fednode.client`` (an operator's, a test's) covers it too.
log = logging.getLogger("fednode.client.reception")


@dataclass(frozen=True)
class PolledTask:
    """A downloaded task: its verified buffer, or the reply the node gives without running it (then
    ``descriptor`` may be None: a task header the node could not decode, see :class:`fednode.transport.UnknownKindTask`)."""

    descriptor: TaskDescriptor | None
    buffer: np.ndarray | None = None
    early_reply: PendingUpload | None = None


class TaskReception:
    """Receives the tasks of one client into buffers from ``pool``, within ``config``'s size limits."""

    def __init__(self, config: NodeConfig, pool: BufferPool) -> None:
        self.config = config
        self.pool = pool
        self.current: TaskDownload | None = None  # the download in progress or broken off, to resume

    def resume_point(self) -> tuple[str, int]:
        """``(resume_task_id, resume_offset)`` for the next poll; ``("", 0)`` when nothing is worth resuming."""
        return self.current.resume_point() if self.current else ("", 0)

    def drop(self) -> None:
        """Forget the partial download (its buffer goes back to the pool once nothing references it)."""
        self.current = None

    async def receive(self, stream: PollStream, descriptor: TaskDescriptor) -> PolledTask:
        """Receive the payload ``descriptor`` announces from ``stream`` (resuming the current download when
        it continues it). Connection failures propagate, the partial download kept for the next poll."""
        task_id = descriptor.task_id
        try:
            download = self._begin(descriptor)
        except PayloadSizeError as exc:
            log.warning("%s: refusing task %s: %s", self.config.node_name, task_id, exc)
            return PolledTask(descriptor, early_reply=PendingUpload.refused(task_id, f"node refuses the task: {exc}"))
        assembler = download.assembler
        idle = self.config.idle_stream_timeout_seconds
        while not assembler.complete:
            event = await stream.next(idle)
            if event is EOF:
                raise ConnectionLostError(f"PollTask ended after {assembler.received} of "
                                          f"{assembler.info.total_size} bytes of task {task_id}")
            if not isinstance(event, tuple):
                raise MessageError(f"PollTask sent {type(event).__name__} in the middle of task {task_id}'s chunks")
            try:
                assembler.add(*event)
                del event  # not held while the next chunk is read (receiver peak RSS)
            except FramingError as exc:
                self.current = None
                return PolledTask(descriptor, early_reply=PendingUpload.failed(task_id, f"bad task stream: {exc}"))
        self.current = None
        await self._read_stream_end(stream, task_id)
        try:
            buffer = assembler.finish()
        except FramingError as exc:
            return PolledTask(descriptor, early_reply=PendingUpload.failed(task_id, f"bad task payload: {exc}"))
        return PolledTask(descriptor, buffer=buffer)

    def _begin(self, descriptor: TaskDescriptor) -> TaskDownload:
        current = self.current
        if current is not None and current.accepts_resume(descriptor):
            current.assembler.resume(descriptor.payload)
            log.info("%s: resuming task %s at byte %d", self.config.node_name, descriptor.task_id,
                     descriptor.payload.start_offset)
            return current
        current = self.current = None  # a different task, or a fresh start: free the old buffer first
        self.current = TaskDownload.start(descriptor, max_payload_size=self.config.max_payload_size,
                                          max_chunk_size=self.config.max_chunk_size, pool=self.pool)
        return self.current

    async def _read_stream_end(self, stream: PollStream, task_id: str) -> None:
        """Wait for the server to end the stream, so it records the task as delivered (not to resend).

        The payload is complete by now: a failure here is logged, never a reason to download again.
        """
        try:
            tail = await stream.next(self.config.idle_stream_timeout_seconds)
        except (NodeError, MessageError) as exc:
            log.info("%s: task %s stream did not end cleanly (%s)", self.config.node_name, task_id, log_text(exc))
            return
        if tail is not EOF:
            log.warning("%s: ignoring %s after the last chunk of task %s", self.config.node_name,
                        type(tail).__name__, task_id)
