"""``TaskExecution``: how a node process runs one downloaded task and turns it into the result to deliver.

The handler runs in a worker thread (the client's executor, or the loop's default one) with the payload
decoding before it and the reply's encoding and hashing after it: all CPU-bound, off the event loop. Meanwhile
a :class:`~fednode.reporter.ReportPump` on the loop sends the handler's reports and heartbeats naming the
task (at the server's announced heartbeat interval when it gives one), so a long task is not taken for
inactivity. Whatever goes wrong in the handler (an exception, a ``sys.exit()``, a reply of the wrong type) or
with the payload (not decodable, the reply not encodable or over the server's ``max_payload_size``) becomes a
FAILED result: a plan's bug never kills the node.

The client says whether it is stopping (``stopping``) and forwards its stop() to :meth:`request_stop`, which
a running handler sees as ``reporter.stop_requested``.

When the server closes the task meanwhile (a heartbeat answers CLOSED or UNKNOWN, or a Report is refused for
its task: the pump cancels the reporter), the handler sees ``reporter.cancelled`` (the training handler stops
at the next batch) and, whatever it then returns or raises, nothing is uploaded: :meth:`TaskExecution.run`
returns None and the client polls for its next task (the task is no longer held).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from fedcore.errors import EncodeError, SerializationError
from fedcore.framing import OutgoingPayload
from fedcore.framing.memory import compute_memory
from fedcore.serialization import Serializer
from fedcore.wire import HeartbeatAnswer, ServerSettings, TaskDescriptor, TaskOutcome
from fednode.config import NodeConfig
from fednode.handler import ReceivedTask, TaskHandler, TaskReply
from fednode.log_text import log_text
from fednode.reporter import Reporter, ReportPump
from fednode.transfers import PendingUpload
from fednode.transport import NodeConnection

#: A child of the client's logger: running tasks is part of the node's loop, and a level or filter set on
#: ``fednode.client`` (an operator's, a test's) covers it too.
log = logging.getLogger("fednode.client.execution")


class TaskExecution:
    """Runs the client's tasks with its ``handler`` on ``executor`` (None: the loop's default executor).

    ``stopping()`` tells whether the client was asked to stop (a task started then sees it at once).
    """

    def __init__(self, config: NodeConfig, handler: TaskHandler, executor: Executor | None,
                 stopping: Callable[[], bool]) -> None:
        self.config = config
        self.handler = handler
        self._executor = executor
        self._stopping = stopping
        self._reporter: Reporter | None = None  # the running task's, while one runs

    def request_stop(self) -> None:
        """Tell the running handler, if any, that the client is stopping (safe from any thread)."""
        reporter = self._reporter
        if reporter is not None:
            reporter.request_stop()

    async def run(self, conn: NodeConnection, descriptor: TaskDescriptor, buffer: np.ndarray,
                  settings: ServerSettings | None) -> PendingUpload | None:
        """Run the handler in a worker thread while a pump sends its reports and heartbeats; the result to
        deliver, or None when the server closed the task meanwhile (nothing to upload)."""
        reporter = Reporter(descriptor.task_id)
        self._reporter = reporter
        if self._stopping():
            reporter.request_stop()
        heartbeat = self.config.heartbeat_interval(settings)

        async def send_heartbeat(task_id: str) -> HeartbeatAnswer:
            answer = await conn.heartbeat(task_id)
            if answer.shutting_down:
                log.info("%s: server is shutting down; finishing task %s", self.config.node_name, task_id)
            return answer

        pump = ReportPump(reporter, send_report=conn.report, send_heartbeat=send_heartbeat,
                          interval=self.config.report_interval_seconds, heartbeat_interval=heartbeat)
        pump_task = asyncio.create_task(pump.run())
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self._work, descriptor, buffer, reporter, settings)
        finally:
            pump.finish()
            await asyncio.gather(pump_task, return_exceptions=True)  # its final flush may learn of the closing
            self._reporter = None
        if reporter.cancelled:
            outcome = result.outcome.name + (f", {result.total_size} bytes" if result.payload is not None else "")
            log.info("%s: task %s is over on the server (%s): its result (%s) is dropped, nothing uploaded",
                     self.config.node_name, descriptor.task_id, log_text(reporter.cancel_reason), outcome)
            return None
        return result

    def _work(self, d: TaskDescriptor, buffer: np.ndarray, reporter: Reporter,
              settings: ServerSettings | None) -> PendingUpload:
        """Worker thread: decode, handle, encode and hash the reply (all CPU-bound, off the event loop)."""
        try:
            payload = Serializer.loads(buffer)
        except SerializationError as exc:
            return PendingUpload.failed(d.task_id, f"task payload cannot be decoded: {exc}")
        task = ReceivedTask(d.task_id, d.experiment_id, d.round, d.kind, payload)
        try:
            with compute_memory():  # training's 4-32 MiB tensors stay on the heap, reused step after step
                reply = self.handler.handle(task, reporter)
            if not isinstance(reply, TaskReply):
                raise TypeError(f"the handler returned {type(reply).__name__}, not a TaskReply")
            outcome = TaskOutcome(reply.outcome)  # ValueError for a value that is no outcome
        except Exception as exc:  # a plan's bug must never kill the node: it becomes the reply
            # the plan's text: capped and escaped (the reply carries up to MAX_ERROR_MESSAGE of it, unescaped)
            log.warning("%s: task %s failed: %s: %s", self.config.node_name, d.task_id, type(exc).__name__,
                        log_text(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            return PendingUpload.failed(d.task_id, f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a plan (argparse, exit()) must not end the node
            # SystemExit (KeyboardInterrupt cannot reach a worker thread) would cross run_in_executor and end
            # asyncio.run: the node process would exit, with the plan's status (2: "refused by the server")
            log.warning("%s: task %s tried to exit the node process: %s(%s)", self.config.node_name, d.task_id,
                        type(exc).__name__, log_text(exc))
            return PendingUpload.failed(d.task_id, f"{type(exc).__name__}: {exc} (the task tried to exit the node "
                                                   "process; a training plan must raise an exception instead)")
        if outcome is not TaskOutcome.SUCCEEDED:
            return PendingUpload(d.task_id, outcome, reply.error_message)
        try:
            out = OutgoingPayload.from_object(reply.payload, self._upload_chunk_size(settings))
        except EncodeError as exc:
            return PendingUpload.failed(d.task_id, f"result payload cannot be encoded: {exc}")
        limit = settings.max_payload_size if settings else 0
        if limit and out.total_size > limit:
            return PendingUpload.failed(
                d.task_id, f"result payload of {out.total_size} bytes exceeds the server's limit of {limit} bytes")
        return PendingUpload(d.task_id, TaskOutcome.SUCCEEDED, "", out)

    def _upload_chunk_size(self, settings: ServerSettings | None) -> int:
        server_max = settings.max_chunk_size if settings else 0
        size = self.config.upload_chunk_size
        return min(size, server_max) if server_max > 0 else size
