"""The node's real task handler: approval check, dataset lookup, local training or evaluation, reply.

Everything that can go wrong in a task becomes a reply, never a dead node: an unapproved plan or a missing
dataset is REFUSED with a message that says how to fix it, and a plan exception, NaN loss, shape mismatch
or changed data file is FAILED with the error's message, after what was running where ("training BNPlan on
dataset 'clinic-a' (round 1, step 3): IndexError: ..."), also logged on the node at WARNING. A task still
running when the node's stop grace ends (:mod:`fednode.task_execution`, "Stopping") stops at its next batch and
is FAILED the same way, naming the reason. A plan waiting for review is logged at WARNING once per plan digest
and process, with the commands that show and approve it, so the node's operator learns it without the
researcher. A dataset that cannot be loaded (its file gone,
changed, unreadable; the node database unusable) is FAILED naming the dataset and what is wrong, but not the
store's own message, which holds local paths (the file, node.db) that never leave the node: that one goes
to the node's log, with the commands that fix it.
"""

from __future__ import annotations

import logging
import threading

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
from fednode.training import RunStage, run_training

log = logging.getLogger(__name__)

_TASK_CLASSES: dict[str, type[TrainTask | EvaluateTask]] = {"train": TrainTask, "evaluate": EvaluateTask}


class TrainingTaskHandler:
    """Runs TRAIN and EVALUATE tasks with the plans this node approved, on the datasets it registered."""

    def __init__(self, datasets: DatasetRegistry, approvals: PlanApprovals, origin: str = "") -> None:
        self.datasets = datasets
        self.approvals = approvals
        self.origin = origin  # recorded with newly seen plans (e.g. the server address)
        self._told: set[str] = set()  # SHA-256 of the plans whose refusal this process has logged for the operator
        self._told_lock = threading.Lock()

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
        stage = RunStage()
        try:
            reporter.log("INFO", f"round {work.round}: {verb} {work.plan.name} on dataset {record.name!r} "
                                 f"({len(dataset)} sample{'' if len(dataset) == 1 else 's'})")
            result = _run_once_more_on_interpreter_glitch(lambda: _run(work, dataset, reporter, stage),
                                                          task.task_id)
        except TrainingStoppedError as exc:
            where = f"{verb} {work.plan.name} on dataset {record.name!r} (round {work.round}, {stage.describe()})"
            if reporter.cancelled:  # the server closed the task: the reply is dropped, not uploaded
                log.info("task %s: %s (%s)", task.task_id, exc, log_text(reporter.cancel_reason))
                return TaskReply.failed(f"{type(exc).__name__}: {exc} ({reporter.cancel_reason})")
            message = f"{where}: stopped, {reporter.stop_reason or 'the node is stopping'} ({exc})"
            log.warning("task %s failed: %s", task.task_id, log_text(message))
            return TaskReply.failed(message)
        except Exception as exc:  # noqa: BLE001 - a plan's bug must never kill the node: it becomes the reply
            where = f"{verb} {work.plan.name} on dataset {record.name!r} (round {work.round}, {stage.describe()})"
            # the plan's text: capped and escaped in the log (the reply carries up to MAX_ERROR_MESSAGE of it)
            log.warning("task %s failed: %s: %s: %s", task.task_id, log_text(where), type(exc).__name__, log_text(exc))
            return TaskReply.failed(f"{where}: {type(exc).__name__}: {exc}")
        return TaskReply.succeeded(result.to_payload())

    def _admit(self, plan: PlanSource, dataset_tags: list[str],
               reporter: Reporter) -> tuple[DatasetRecord | None, TaskReply | None]:
        """The dataset a task runs on, or the refusal: its plan is not approved, or no dataset has its tags."""
        try:
            self.approvals.require_approved(plan.source, plan.name, self.origin)
        except PlanNotApprovedError as exc:
            reporter.log("WARNING", str(exc))
            self._tell_operator(plan, str(exc), reporter.task_id)
            return None, TaskReply.refused(str(exc))
        matches = self.datasets.find_by_tags(dataset_tags)
        if not matches:
            message = (f"no dataset on this node has all the tags {sorted(dataset_tags)}; "
                       "register one with `fednode dataset add --tags ...`")
            return None, TaskReply.refused(message)
        return min(matches, key=lambda r: r.name), None


    def _tell_operator(self, plan: PlanSource, refusal: str, task_id: str) -> None:
        """Log a plan's refusal for the node's operator: at WARNING the first time this process refuses the
        plan (its digest), at DEBUG afterwards (every round brings it again)."""
        with self._told_lock:
            first = plan.sha256 not in self._told
            self._told.add(plan.sha256)
        if first:
            log.warning("task %s refused: %s (logged once per plan; `fednode plans list --status pending` lists "
                        "the plans waiting)", task_id, log_text(refusal))
        else:
            log.debug("task %s refused: %s", task_id, log_text(refusal))


def _unusable(exc: FedstreamError) -> str:
    """What is wrong with a dataset the node cannot load, without the store's message (local paths)."""
    if isinstance(exc, DatasetFormatError):
        return "its file no longer parses as a dataset"
    if isinstance(exc, DatasetFileError):
        return "its file is gone, unreadable or changed since registration (the node trains on registered bytes only)"
    if isinstance(exc, DatasetRegistryError):
        return "it is no longer registered"
    return "the node database is unusable"


def _run(work: TrainTask | EvaluateTask, dataset, reporter: Reporter, stage: RunStage):
    """The task's TrainResult or EvaluateResult. It stops early when the server closed it (its result would be
    refused) or when the node's stop grace ran out: both set ``reporter.stop_requested``."""
    stage.enter("loading the plan")  # a second run (the interpreter's glitch) starts over
    if isinstance(work, TrainTask):
        return run_training(work, dataset, progress=reporter.progress,
                            should_stop=lambda: reporter.stop_requested, stage=stage)
    return run_evaluation(work, dataset, should_stop=lambda: reporter.stop_requested, stage=stage)


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
