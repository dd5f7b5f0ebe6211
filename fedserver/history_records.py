"""The rows of the history database as dataclasses, with the checks applied before anything is written."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import HistoryError

__all__ = [
    "EXPERIMENT_STATUSES",
    "METRIC_SOURCES",
    "OUTCOMES",
    "ROUND_STATUSES",
    "ExperimentRecord",
    "HistoryError",
    "NodeResultRecord",
    "RoundRecord",
]

#: What became of a task sent to a node. 'late': the reply came after the round closed (never applied).
OUTCOMES = ("succeeded", "failed", "refused", "timeout", "late")
#: 'running' while a round is open; ``finish_round`` sets one of the other two.
ROUND_STATUSES = ("running", "completed", "failed")
EXPERIMENT_STATUSES = ("running", "completed", "failed", "stopped")
#: Which metrics of a node result a series is read from.
METRIC_SOURCES = ("training", "validation_before", "validation_after")
#: SQLite stores a signed 64-bit INTEGER; a larger Python int raises a bare OverflowError on insert.
MAX_INTEGER = 2**63 - 1


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
        for name in ("experiment_id", "round", "bytes_in", "bytes_out"):
            check_count(getattr(self, name), name)
        for name in ("num_samples", "num_steps"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        duration = self.duration_s
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, numbers.Real)
            or not math.isfinite(duration)
            or duration < 0
        ):
            raise HistoryError(f"duration_s must be a finite number >= 0 or None, got {duration!r}")
        check_metrics(self.training_metrics, "training_metrics")
        for name in ("validation_before", "validation_after"):
            if getattr(self, name) is not None:
                check_metrics(getattr(self, name), name)
        for name in ("task_id", "error", "received_at"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise HistoryError(f"{name} must be a str or None, got {type(getattr(self, name)).__name__}")


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
