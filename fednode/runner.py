"""The node's real task handler: approval check, dataset lookup, local training or evaluation, reply.

Everything that can go wrong in a task becomes a reply, never a dead node: an unapproved plan or a missing
dataset is REFUSED with a message that says how to fix it, and a plan exception, NaN loss, shape mismatch
or changed data file is FAILED with the error's message. A dataset that cannot be loaded (its file gone,
changed, unreadable; the node database unusable) is FAILED naming the dataset and what is wrong, but not the
store's own message, which holds local paths (the file, node.db) that never leave the node: that one goes
to the node's log, with the commands that fix it.
"""

from __future__ import annotations

import logging

from fedcore.errors import (
    DatasetFileError,
    DatasetFormatError,
    DatasetRegistryError,
    FedstreamError,
    NodeStoreError,
    PlanNotApprovedError,
    TrainingStoppedError,
)
from fedcore.tasks import EvaluateTask, PlanSource, TrainTask
from fednode.approvals import PlanApprovals
from fednode.datasets import DatasetRecord, DatasetRegistry
from fednode.evaluation import run_evaluation
from fednode.handler import ReceivedTask, TaskReply
from fednode.log_text import log_text
from fednode.reporter import Reporter
from fednode.training import run_training

log = logging.getLogger(__name__)

_TASK_CLASSES: dict[str, type[TrainTask | EvaluateTask]] = {"train": TrainTask, "evaluate": EvaluateTask}


class TrainingTaskHandler:
    """Runs TRAIN and EVALUATE tasks with the plans this node approved, on the datasets it registered."""

    def __init__(self, datasets: DatasetRegistry, approvals: PlanApprovals, origin: str = "") -> None:
        self.datasets = datasets
        self.approvals = approvals
        self.origin = origin  # recorded with newly seen plans (e.g. the server address)

    def handle(self, task: ReceivedTask, reporter: Reporter) -> TaskReply:
        if task.kind not in _TASK_CLASSES:
            return TaskReply.refused(f"this node runs 'train' and 'evaluate' tasks only, not {task.kind!r}")
        noun, verb = ("training", "training") if task.kind == "train" else ("evaluation", "evaluating")
        try:
            work = _TASK_CLASSES[task.kind].from_payload(task.payload)
        except FedstreamError as exc:
            return TaskReply.failed(f"malformed {noun} task: {exc}")
        try:
            record, refusal = self._admit(work.plan, work.dataset_tags, reporter)
        except NodeStoreError as exc:  # its message names node.db's path: the log's only
            log.warning("task %s: %s", task.task_id, exc)
            return TaskReply.failed(f"{type(exc).__name__}: {_unusable(exc)} (the node's log tells its operator "
                                    "what and how to fix)")
        if refusal is not None:
            return refusal
        try:
            dataset = self.datasets.load(record.name)
        except (DatasetRegistryError, NodeStoreError) as exc:  # its message names local paths: the log's only
            log.warning("task %s: dataset %r cannot be loaded: %s", task.task_id, record.name, exc)
            return TaskReply.failed(f"{type(exc).__name__}: dataset {record.name!r} cannot be loaded on this node: "
                                    f"{_unusable(exc)} (the node's log tells its operator what and how to fix)")
        try:
            reporter.log("INFO", f"round {work.round}: {verb} {work.plan.name} on dataset {record.name!r} "
                                 f"({len(dataset)} samples)")
            result = _run_once_more_on_interpreter_glitch(lambda: _run(work, dataset, reporter), task.task_id)
        except TrainingStoppedError as exc:  # the server closed the task: the reply is dropped, not uploaded
            log.info("task %s: %s (%s)", task.task_id, exc, log_text(reporter.cancel_reason))
            return TaskReply.failed(f"{type(exc).__name__}: {exc} ({reporter.cancel_reason})")
        except Exception as exc:  # noqa: BLE001 - a plan's bug must never kill the node: it becomes the reply
            log.warning("task %s failed: %s: %s", task.task_id, type(exc).__name__, log_text(exc))  # the plan's text
            return TaskReply.failed(f"{type(exc).__name__}: {exc}")
        return TaskReply.succeeded(result.to_payload())

    def _admit(self, plan: PlanSource, dataset_tags: list[str],
               reporter: Reporter) -> tuple[DatasetRecord | None, TaskReply | None]:
        """The dataset a task runs on, or the refusal: its plan is not approved, or no dataset has its tags."""
        try:
            self.approvals.require_approved(plan.source, plan.name, self.origin)
        except PlanNotApprovedError as exc:
            reporter.log("WARNING", str(exc))
            return None, TaskReply.refused(str(exc))
        matches = self.datasets.find_by_tags(dataset_tags)
        if not matches:
            message = (f"no dataset on this node has all the tags {sorted(dataset_tags)}; "
                       "register one with `fednode dataset add --tags ...`")
            return None, TaskReply.refused(message)
        return min(matches, key=lambda r: r.name), None


def _unusable(exc: FedstreamError) -> str:
    """What is wrong with a dataset the node cannot load, without the store's message (local paths)."""
    if isinstance(exc, DatasetFormatError):
        return "its file no longer parses as a dataset"
    if isinstance(exc, DatasetFileError):
        return "its file is gone, unreadable or changed since registration (the node trains on registered bytes only)"
    if isinstance(exc, DatasetRegistryError):
        return "it is no longer registered"
    return "the node database is unusable"


def _run(work: TrainTask | EvaluateTask, dataset, reporter: Reporter):  # -> TrainResult | EvaluateResult
    # only a task the server closed stops early (its result would be refused): a node being stopped lets it finish
    if isinstance(work, TrainTask):
        return run_training(work, dataset, progress=reporter.progress, should_stop=lambda: reporter.cancelled)
    return run_evaluation(work, dataset, should_stop=lambda: reporter.cancelled)


#: CPython 3.11 (before the fix of python/cpython#106905) can raise this SystemError in one thread while
#: another builds AST objects (a traceback's caret anchors, a parse); it says nothing about the task.
_AST_GLITCH = "AST constructor recursion depth mismatch"


def _run_once_more_on_interpreter_glitch(run, task_id: str):
    """``run()``; run again, once, if it failed on the interpreter's AST bookkeeping glitch (the task starts
    from its own inputs, so a second run gives what the first would have)."""
    try:
        return run()
    except SystemError as exc:
        if _AST_GLITCH not in str(exc):
            raise
        log.warning("task %s: the interpreter raised %r (python/cpython#106905); running the task again", task_id,
                    str(exc))
        return run()
