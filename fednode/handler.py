"""What a node does with a task: the :class:`TaskHandler` protocol, its input and its reply.

The client downloads and decodes a task, then calls ``handler.handle(task, reporter)`` in a worker thread
(the event loop keeps heartbeating meanwhile) and uploads the returned :class:`TaskReply`. A handler that
raises is answered for: the exception becomes a FAILED reply carrying its message, and the node goes on
serving. The real training handler lives elsewhere; :class:`EchoHandler` is for manual and wire tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedcore.tasks import TrainResult
from fedcore.wire import TaskKind, TaskOutcome

if TYPE_CHECKING:
    from fednode.reporter import Reporter


@dataclass(frozen=True)
class ReceivedTask:
    """A downloaded, verified and decoded task (``payload`` is the decoded msgpack document)."""

    task_id: str
    experiment_id: str
    round: int
    kind: TaskKind
    payload: Any


@dataclass(frozen=True)
class TaskReply:
    """What the handler sends back. Only a SUCCEEDED reply carries a payload (any Serializer-able object)."""

    outcome: TaskOutcome
    error_message: str = ""
    payload: Any = None

    @classmethod
    def succeeded(cls, payload: Any) -> TaskReply:
        return cls(TaskOutcome.SUCCEEDED, "", payload)

    @classmethod
    def failed(cls, message: str) -> TaskReply:
        return cls(TaskOutcome.FAILED, message, None)

    @classmethod
    def refused(cls, message: str) -> TaskReply:
        return cls(TaskOutcome.REFUSED, message, None)


class TaskHandler(Protocol):
    """Runs one task. Called in a worker thread; may block for as long as training takes.

    ``reporter`` is thread-safe: call ``reporter.progress(...)`` and ``reporter.log(...)`` freely; check
    ``reporter.stop_requested`` to give up early when the node is asked to stop, or when the server closed the
    task (then ``reporter.cancelled`` is True too, with ``reporter.cancel_reason``, and whatever the handler
    returns is dropped, never uploaded: docs/protocol.md §8 "Closed tasks").
    """

    def handle(self, task: ReceivedTask, reporter: Reporter) -> TaskReply: ...


class EchoHandler:
    """Replies with the received parameters unchanged, so a deployment can be tested end to end.

    A training task (a map with ``format`` and ``params``, see :class:`fedcore.tasks.TrainTask`) is answered
    with a valid :class:`fedcore.tasks.TrainResult` holding the same params, one sample and no steps; any
    other payload is sent back as is.
    """

    def handle(self, task: ReceivedTask, reporter: Reporter) -> TaskReply:
        reporter.log("INFO", f"echoing task {task.task_id} (round {task.round}, {task.kind.value})")
        payload = task.payload
        if isinstance(payload, dict) and "format" in payload and "params" in payload:
            result = TrainResult(params=payload["params"], num_samples=1, num_steps=0, lr=None)
            return TaskReply.succeeded(result.to_payload())
        return TaskReply.succeeded(payload)
