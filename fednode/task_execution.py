"""``TaskExecution``: how a node process runs one downloaded task and turns it into the result to deliver.

The handler runs in a worker thread (the client's executor, or the loop's default one) with the payload
decoding before it and the reply's encoding and hashing after it: all CPU-bound, off the event loop. Meanwhile
a :class:`~fednode.reporter.ReportPump` on the loop sends the handler's reports and heartbeats naming the
task (at the server's announced heartbeat interval when it gives one), so a long task is not taken for
inactivity. Whatever goes wrong in the handler (an exception, a ``sys.exit()``, a reply of the wrong type) or
with the payload (not decodable, the reply not encodable or over the server's ``max_payload_size``) becomes a
FAILED result: a plan's bug never kills the node.

Stopping (docs/guide.md §3.5). The client says whether it is stopping (``stopping``) and forwards its stop() to
:meth:`request_stop`, which starts the stop grace: the running task has ``config.stop_grace_seconds`` from then
to finish and have its result uploaded (:meth:`grace_left` bounds the upload's wait). A task still running when
the grace runs out is told to stop (``reporter.stop_requested``, with ``reporter.stop_reason`` saying why: the
training handler stops at its next batch, as for a closed task, and answers FAILED naming the reason); its reply
then gets :data:`STOPPED_REPORT_SECONDS` more to reach the server, so the round counts the task at once.

When the server closes the task meanwhile (a heartbeat answers CLOSED or UNKNOWN, or a Report is refused for
its task: the pump cancels the reporter), the handler sees ``reporter.cancelled`` (the training handler stops
at the next batch) and, whatever it then returns or raises, nothing is uploaded: :meth:`TaskExecution.run`
returns None and the client polls for its next task (the task is no longer held).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

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

T = TypeVar("T")

#: Seconds the reply of a task stopped at the end of its stop grace (a FAILED report, a few hundred bytes) gets
#: to reach the server before the node exits without it.
STOPPED_REPORT_SECONDS = 2.0


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
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # the running task's, ditto
        self._stop_deadline: float | None = None  # time.monotonic() the stop grace ends; None: not stopping

    def request_stop(self) -> None:
        """The client is stopping: start the stop grace (the first call only) and wake the wait on the running
        task, if any, so it is told to stop once the grace ends (safe from any thread and signal handlers)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.config.stop_grace_seconds
        wake = self._wake
        if wake is not None:
            loop, event = wake
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nothing runs on it any more
                pass

    def grace_left(self, grace: float) -> float:
        """How long a wait the client's stop() interrupts may go on: ``grace`` before any stop, then what is
        left of the stop grace (:data:`STOPPED_REPORT_SECONDS` for the reply of a task stopped when it ran out)."""
        if self._stop_deadline is None:
            return grace
        return max(0.0, self._stop_deadline - time.monotonic())

    async def run(self, conn: NodeConnection, descriptor: TaskDescriptor, buffer: np.ndarray,
                  settings: ServerSettings | None) -> PendingUpload | None:
        """Run the handler in a worker thread while a pump sends its reports and heartbeats; the result to
        deliver, or None when the server closed the task meanwhile (nothing to upload)."""
        reporter = Reporter(descriptor.task_id)
        self._reporter = reporter
        wake = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), wake)
        if self._stopping() or self._stop_deadline is not None:
            wake.set()
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
            work = loop.run_in_executor(self._executor, self._work, descriptor, buffer, reporter, settings)
            result = await self._within_stop_grace(work, wake, reporter)
        finally:
            pump.finish()
            await asyncio.gather(pump_task, return_exceptions=True)  # its final flush may learn of the closing
            self._reporter, self._wake = None, None
        if reporter.cancelled:
            outcome = result.outcome.name + (f", {result.total_size} bytes" if result.payload is not None else "")
            log.info("%s: task %s is over on the server (%s): its result (%s) is dropped, nothing uploaded",
                     self.config.node_name, descriptor.task_id, log_text(reporter.cancel_reason), outcome)
            return None
        return result

    async def _within_stop_grace(self, work: asyncio.Future[PendingUpload], wake: asyncio.Event,
                                 reporter: Reporter) -> PendingUpload:
        """The handler's result: waited for as long as it takes, unless the client stops. Then the task has
        what is left of the stop grace; past it the handler is told to stop and waited for (it cannot be
        interrupted: a second signal ends the process, :mod:`fednode.launch`)."""
        waiter = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if work.done() or self._stop_deadline is None:
            return self._with_reply_window(await work)
        name, task_id, grace = self.config.node_name, reporter.task_id, self.config.stop_grace_seconds
        left = self.grace_left(grace)
        log.info("%s: stopping: task %s has %.1f s more to finish and upload its result", name, task_id, left)
        done, _ = await asyncio.wait({work}, timeout=left)
        if done:
            return self._with_reply_window(await work)
        reason = (f"the node was asked to stop and the task did not finish within its stop grace of {grace:g} s "
                  f"(fednode start --stop-grace)")
        log.warning("%s: task %s did not finish within the stop grace of %g s: telling it to stop (it ends FAILED "
                    "at its next batch; send the signal again to exit now)", name, task_id, grace)
        reporter.request_stop(reason)
        return self._with_reply_window(await work)

    def _with_reply_window(self, result: T) -> T:
        """A task that ended while the node stops (within its grace, at its end, or with a grace of 0): its reply
        gets at least :data:`STOPPED_REPORT_SECONDS` to reach the server, so a task that finished just inside
        the grace is not worse off than one stopped when it ran out."""
        if self._stop_deadline is not None:
            self._stop_deadline = max(self._stop_deadline, time.monotonic() + STOPPED_REPORT_SECONDS)
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
