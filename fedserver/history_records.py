"""The rows of the history database as dataclasses, with the checks applied before anything is written, and
how the text of a row that came from a node is shown (:func:`shown_text`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import HistoryError
from fedcore.tasks import EVALUATION_SPLITS
from fedcore.text_output import printable_excerpt

__all__ = [
    "EVALUATION_OUTCOMES",
    "EVALUATION_SPLITS",
    "EXPERIMENT_STATUSES",
    "METRIC_SOURCES",
    "OUTCOMES",
    "ROUND_STATUSES",
    "EvaluationRecord",
    "ExperimentRecord",
    "HistoryError",
    "NodeResultRecord",
    "RoundRecord",
    "shown_text",
]

#: What became of a task sent to a node. 'late': the reply came after the round closed (never applied).
OUTCOMES = ("succeeded", "failed", "refused", "timeout", "late")
#: What became of an evaluation task (no 'late': a reply after the evaluation closed is not recorded).
EVALUATION_OUTCOMES = ("succeeded", "failed", "refused", "timeout")
#: 'running' while a round is open; ``finish_round`` sets one of the other two.
ROUND_STATUSES = ("running", "completed", "failed")
EXPERIMENT_STATUSES = ("running", "completed", "failed", "stopped")
#: Which metrics of a node result a series is read from.
METRIC_SOURCES = ("training", "validation_before", "validation_after")
#: SQLite stores a signed 64-bit INTEGER; a larger Python int raises a bare OverflowError on insert.
MAX_INTEGER = 2**63 - 1
#: Characters of a node's text (a failed task's error, up to 8192 on the wire) that a table cell or a log line
#: shows; the stored row keeps the text as received.
SHOWN_TEXT_CHARS = 300
#: Characters of one metric name shown (a node names its metrics).
SHOWN_NAME_CHARS = 64


def shown_text(text: str, limit: int = SHOWN_TEXT_CHARS) -> str:
    """``text`` from a node as one printable line: its first ``limit`` characters, then ``... [N more characters
    cut]`` if longer, every non-printable character escaped (:func:`fedcore.text_output.printable_excerpt`, which
    fednode's ``log_text`` uses too, with the history's limit): a node cannot move the cursor, recolour or forge
    a line of ours."""
    return printable_excerpt(text, limit)


def check_count(value: Any, what: str) -> int:
    """``value`` as an int from 0 to 2**63-1 (SQLite's INTEGER), or HistoryError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise HistoryError(f"{what} must be an int >= 0, got {value!r}")
    if value > MAX_INTEGER:
        raise HistoryError(f"{what} must be at most 2**63-1 (SQLite INTEGER), got {value!r}")
    return int(value)


def check_metrics(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a dict with str keys, or HistoryError naming ``what``."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise HistoryError(f"{what} must be a mapping with str keys, got {value!r}")
    return dict(value)


def check_finite_metrics(value: Any, what: str) -> dict[str, float]:
    """``value`` as a dict of str to finite numbers (as floats), or HistoryError naming ``what`` and key."""
    out: dict[str, float] = {}
    for name, number in check_metrics(value, what).items():
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
            raise HistoryError(f"{what}[{name!r}] must be a finite number, got {number!r}")
        out[name] = float(number)
    return out


def _set_counts(record: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Check the count fields of a frozen ``record`` (``optional`` ones may be None) and store them as Python
    ints: sqlite3 binds a numpy integer as an 8-byte BLOB, which no read would accept as a count."""
    for name in (*required, *optional):
        value = getattr(record, name)
        if value is not None or name in required:
            object.__setattr__(record, name, check_count(value, name))


def _set_duration(record: Any) -> None:
    """Check ``record.duration_s`` (a finite number >= 0, or None) and store it as a Python float."""
    duration = record.duration_s
    if duration is None:
        return
    if (
        isinstance(duration, bool)
        or not isinstance(duration, numbers.Real)
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise HistoryError(f"duration_s must be a finite number >= 0 or None, got {duration!r}")
    object.__setattr__(record, "duration_s", float(duration))


def _check_optional_str(record: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(record, name) is not None and not isinstance(getattr(record, name), str):
            raise HistoryError(f"{name} must be a str or None, got {type(getattr(record, name)).__name__}")


@dataclass(frozen=True)
class NodeResultRecord:
    """One node's outcome in one round: a reply, a refusal, a failure, a timeout or a late reply.

    ``duration_s``: wall time from task sent to result received. ``bytes_in`` / ``bytes_out``: payload
    bytes received from / sent to the node. ``validation_before`` / ``validation_after``: the node's
    validation metrics on the global model it received and on its trained model. ``received_at`` is
    set by the store (time of writing) when None.
    """

    experiment_id: int
    round: int
    node_id: str
    outcome: str
    task_id: str | None = None
    num_samples: int | None = None
    num_steps: int | None = None
    duration_s: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    training_metrics: Mapping[str, Any] = field(default_factory=dict)
    validation_before: Mapping[str, Any] | None = None
    validation_after: Mapping[str, Any] | None = None
    error: str | None = None
    received_at: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise HistoryError(f"outcome must be one of {list(OUTCOMES)}, got {self.outcome!r}")
        if not isinstance(self.node_id, str) or not self.node_id:
            raise HistoryError(f"node_id must be a non-empty str, got {self.node_id!r}")
        _set_counts(self, ("experiment_id", "round", "bytes_in", "bytes_out"), ("num_samples", "num_steps"))
        _set_duration(self)
        check_metrics(self.training_metrics, "training_metrics")
        for name in ("validation_before", "validation_after"):
            if getattr(self, name) is not None:
                check_metrics(getattr(self, name), name)
        _check_optional_str(self, ("task_id", "error", "received_at"))


@dataclass(frozen=True)
class EvaluationRecord:
    """One node's part in the evaluation of the global model after round ``round`` (>= 1).

    A 'succeeded' record carries the node's reply: ``num_samples`` evaluated on ``split`` ('validation':
    its held-out split; 'all': every local sample) and ``metrics`` (finite numbers); ``duration_s`` is the
    node's own evaluation time as it reported it. Any other outcome carries none of these, and ``error``
    says why. ``received_at`` is set by the store (time of writing) when None. ``evaluation_id``: the
    evaluation (one ``Experiment.evaluate``) the row is part of; None lets the store choose
    (``fedserver.history_evaluations``), and every row read back carries it.
    """

    experiment_id: int
    round: int
    node_id: str
    task_id: str
    outcome: str
    num_samples: int | None = None
    split: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    duration_s: float | None = None
    received_at: str | None = None
    evaluation_id: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in EVALUATION_OUTCOMES:
            raise HistoryError(f"outcome must be one of {list(EVALUATION_OUTCOMES)}, got {self.outcome!r}")
        for name in ("node_id", "task_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise HistoryError(f"{name} must be a non-empty str, got {getattr(self, name)!r}")
        _set_counts(self, ("experiment_id", "round"), ("num_samples", "evaluation_id"))
        if self.round < 1:
            raise HistoryError(
                f"round must be an int >= 1 (the round whose model was evaluated), got {self.round!r}"
            )
        if self.split is not None and self.split not in EVALUATION_SPLITS:
            raise HistoryError(f"split must be one of {list(EVALUATION_SPLITS)} or None, got {self.split!r}")
        _set_duration(self)
        object.__setattr__(self, "metrics", check_finite_metrics(self.metrics, "metrics"))
        _check_optional_str(self, ("error", "received_at"))
        replied = self.outcome == "succeeded"
        if replied and (self.num_samples is None or self.split is None):
            raise HistoryError(
                f"a 'succeeded' evaluation of node {self.node_id!r} needs num_samples and split, got "
                f"num_samples={self.num_samples!r}, split={self.split!r}"
            )
        if not replied and (self.num_samples is not None or self.split is not None or self.metrics):
            raise HistoryError(
                f"a {self.outcome!r} evaluation of node {self.node_id!r} carries no reply, got "
                f"num_samples={self.num_samples!r}, split={self.split!r}, metrics={dict(self.metrics)!r}"
            )

    @classmethod
    def from_outcome(
        cls, experiment_id: int, round: int, outcome: Any, *, received_at: str | None = None,
        evaluation_id: int | None = None,
    ) -> EvaluationRecord:
        """The record of one ``fedserver.evaluation.EvaluationOutcome`` (read by attribute: ``node_id``,
        ``task_id``, ``outcome``, ``error`` and ``result``, an ``EvaluateResult`` or None)."""
        result = outcome.result
        return cls(
            experiment_id=experiment_id,
            round=round,
            node_id=outcome.node_id,
            task_id=outcome.task_id,
            outcome=outcome.outcome,
            num_samples=None if result is None else result.num_samples,
            split=None if result is None else result.split,
            metrics={} if result is None else result.metrics,
            error=outcome.error or None,
            duration_s=None if result is None else result.duration_s,
            received_at=received_at,
            evaluation_id=evaluation_id,
        )


@dataclass(frozen=True)
class ExperimentRecord:
    """One experiment: its name, JSON config and status ('running', 'completed', 'failed', 'stopped')."""

    id: int
    name: str
    created_at: str
    ended_at: str | None
    config: dict[str, Any]
    status: str
    error: str | None


@dataclass(frozen=True)
class RoundRecord:
    """One round: the nodes selected, status, and the aggregated (global) metrics of the round."""

    experiment_id: int
    round: int
    started_at: str
    ended_at: str | None
    status: str
    selected_nodes: list[str]
    metrics: dict[str, Any]
    error: str | None
