"""What the researcher and a node exchange: typed task and result payloads (TRAIN and EVALUATE).

Both are msgpack maps on the wire (docs/protocol.md, "Payload schemas"); these dataclasses are the only
place that knows their keys. ``from_payload`` validates a decoded map and raises
:class:`~fedcore.errors.TaskPayloadError` naming the first bad field, so a malformed payload is refused
before anything is applied.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.errors import TaskPayloadError

PAYLOAD_FORMAT = 1
VALIDATION_KEYS = ("before", "after")  # metrics on the global model received / on the trained model
EVALUATION_SPLITS = ("validation", "all")  # what an EVALUATE task measured: the held-out split, or every sample
MAX_COUNT = 2**63 - 1  # counts and rounds must fit a signed 64-bit integer (SQLite, other languages)


@dataclass(frozen=True)
class PlanSource:
    """A training plan as nodes see it: the class name and the full source of its module."""

    name: str
    source: str
    sha256: str

    @classmethod
    def from_source(cls, name: str, source: str) -> PlanSource:
        return cls(name, source, hashlib.sha256(source.encode("utf-8")).hexdigest())

    @classmethod
    def from_class(cls, plan_class: type) -> PlanSource:
        """The source of the module that defines ``plan_class`` (it must be self-contained: nodes run it)."""
        module = inspect.getmodule(plan_class)
        if module is None:
            raise TaskPayloadError(f"cannot find the module that defines {plan_class.__qualname__}")
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError) as exc:
            raise TaskPayloadError(
                f"cannot read the source of {plan_class.__qualname__}'s module ({exc}); "
                "define training plans in a .py file"
            ) from None
        return cls.from_source(plan_class.__name__, source)

    def to_payload(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256}

    @classmethod
    def from_payload(cls, obj: Any) -> PlanSource:
        m = _map(obj, "plan")
        plan = cls(_str(m, "name", "plan"), _str(m, "source", "plan"), _str(m, "sha256", "plan"))
        actual = hashlib.sha256(plan.source.encode("utf-8")).hexdigest()
        if actual != plan.sha256:
            raise TaskPayloadError(f"plan.sha256 {plan.sha256} does not match the source's SHA-256 {actual}")
        return plan


@dataclass(frozen=True)
class TrainTask:
    """Server → node: train ``plan`` from ``params`` on datasets tagged ``dataset_tags``.

    ``aggregator_state`` is what the aggregator sends this node (Scaffold: ``{"correction": δ_i}``).
    """

    experiment_id: str
    round: int
    plan: PlanSource
    training_args: dict[str, Any]
    params: dict[str, np.ndarray]
    aggregator: str = "fedavg"
    aggregator_state: dict[str, Any] = field(default_factory=dict)
    dataset_tags: list[str] = field(default_factory=list)
    model_args: dict[str, Any] = field(default_factory=dict)

    SHARED_KEYS = ("format", "experiment_id", "round", "plan", "training_args", "model_args", "params",
                   "aggregator", "dataset_tags")
    OWN_KEYS = ("aggregator_state",)

    def shared_entries(self) -> dict[str, Any]:
        """The entries every node of the round receives identically (encoded once, see SharedMapPayload)."""
        return {"format": PAYLOAD_FORMAT, "experiment_id": self.experiment_id, "round": self.round,
                "plan": self.plan.to_payload(), "training_args": dict(self.training_args),
                "model_args": dict(self.model_args), "params": self.params, "aggregator": self.aggregator,
                "dataset_tags": list(self.dataset_tags)}

    def own_entries(self) -> dict[str, Any]:
        """The entries specific to one node."""
        return {"aggregator_state": self.aggregator_state}

    def to_payload(self) -> dict[str, Any]:
        return {**self.shared_entries(), **self.own_entries()}

    @classmethod
    def from_payload(cls, obj: Any) -> TrainTask:
        m = _map(obj, "task")
        return cls(**_task_entries(m), aggregator=_str(m, "aggregator", "task"),
                   aggregator_state=dict(_map(m.get("aggregator_state", {}), "aggregator_state")))


@dataclass(frozen=True)
class TrainResult:
    """Node → server: locally trained ``params`` after ``num_steps`` steps (K) at learning rate ``lr`` (η_l).

    ``metrics`` are training metrics (e.g. the mean loss of the last steps); ``validation`` maps "before"
    (global model) and/or "after" (local model) to metric dicts computed on the node's held-out split.
    ``validation_samples`` is how many held-out samples those were (the server's weight for validation
    metrics); None from nodes that do not say (older ones).
    """

    params: dict[str, np.ndarray]
    num_samples: int
    num_steps: int
    lr: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    duration_s: float = 0.0
    validation_samples: int | None = None

    def to_payload(self) -> dict[str, Any]:
        return {"format": PAYLOAD_FORMAT, "params": self.params, "num_samples": self.num_samples,
                "num_steps": self.num_steps, "lr": self.lr, "metrics": dict(self.metrics),
                "validation": {k: dict(v) for k, v in self.validation.items()}, "duration_s": self.duration_s,
                **({} if self.validation_samples is None else {"validation_samples": self.validation_samples})}

    @classmethod
    def from_payload(cls, obj: Any) -> TrainResult:
        m = _map(obj, "result")
        _format(m)
        lr = m.get("lr")
        if lr is not None and not _is_number(lr):
            raise TaskPayloadError(f"result.lr must be a number or null, got {type(lr).__name__}")
        validation = _map(m.get("validation", {}), "validation")
        return cls(
            params=_arrays(m.get("params"), "params"),
            num_samples=_int(m, "num_samples", "result"),
            num_steps=_int(m, "num_steps", "result"),
            lr=None if lr is None else float(lr),
            metrics=_metrics(m.get("metrics", {}), "metrics"),
            validation={_when(k): _metrics(v, f"validation[{k!r}]") for k, v in validation.items()},
            duration_s=_seconds(m, "duration_s", "result"),
            validation_samples=_int(m, "validation_samples", "result") if "validation_samples" in m else None,
        )


@dataclass(frozen=True)
class EvaluateTask:
    """Server → node: evaluate ``params`` (no training) on the dataset tagged ``dataset_tags``.

    ``training_args`` are the experiment's: ``test_ratio`` and ``seed`` make the same held-out split as
    training did, ``batch_size`` sets the evaluation batches.
    """

    experiment_id: str
    round: int  # the round whose model is evaluated (0: the initial model)
    plan: PlanSource
    training_args: dict[str, Any]
    params: dict[str, np.ndarray]
    dataset_tags: list[str] = field(default_factory=list)
    model_args: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {"format": PAYLOAD_FORMAT, "experiment_id": self.experiment_id, "round": self.round,
                "plan": self.plan.to_payload(), "training_args": dict(self.training_args),
                "model_args": dict(self.model_args), "params": self.params, "dataset_tags": list(self.dataset_tags)}

    @classmethod
    def from_payload(cls, obj: Any) -> EvaluateTask:
        return cls(**_task_entries(_map(obj, "task")))


@dataclass(frozen=True)
class EvaluateResult:
    """Node → server: ``metrics`` of the sent model on ``num_samples`` local samples.

    ``split`` says which: ``"validation"`` (the held-out split ``test_ratio`` makes) or ``"all"`` (the whole
    local dataset, when ``test_ratio`` is 0).
    """

    num_samples: int
    metrics: dict[str, float]
    split: str = "validation"
    duration_s: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        return {"format": PAYLOAD_FORMAT, "num_samples": self.num_samples, "metrics": dict(self.metrics),
                "split": self.split, "duration_s": self.duration_s}

    @classmethod
    def from_payload(cls, obj: Any) -> EvaluateResult:
        m = _map(obj, "result")
        _format(m)
        split = _str(m, "split", "result")
        if split not in EVALUATION_SPLITS:
            raise TaskPayloadError(f"result.split {split!r} is not one of {list(EVALUATION_SPLITS)}")
        return cls(num_samples=_int(m, "num_samples", "result"), metrics=_metrics(m.get("metrics", {}), "metrics"),
                   split=split, duration_s=_seconds(m, "duration_s", "result"))


# -- validation helpers --------------------------------------------------------------------------------
def _task_entries(m: Mapping[str, Any]) -> dict[str, Any]:
    """The entries TRAIN and EVALUATE tasks share, checked (format first)."""
    _format(m)
    return {
        "experiment_id": _str(m, "experiment_id", "task"),
        "round": _int(m, "round", "task"),
        "plan": PlanSource.from_payload(m.get("plan")),
        "training_args": dict(_map(m.get("training_args"), "training_args")),
        "params": _arrays(m.get("params"), "params"),
        "dataset_tags": [_check_str(t, "dataset_tags[]") for t in _list(m.get("dataset_tags", []), "dataset_tags")],
        "model_args": dict(_map(m.get("model_args", {}), "model_args")),
    }


def _map(obj: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise TaskPayloadError(f"{what} must be a map, got {type(obj).__name__}")
    return obj


def _list(obj: Any, what: str) -> list[Any]:
    if not isinstance(obj, (list, tuple)):
        raise TaskPayloadError(f"{what} must be an array, got {type(obj).__name__}")
    return list(obj)


def _check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TaskPayloadError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _str(m: Mapping[str, Any], key: str, what: str) -> str:
    if key not in m:
        raise TaskPayloadError(f"{what}.{key} is missing")
    return _check_str(m[key], f"{what}.{key}")


def _int(m: Mapping[str, Any], key: str, what: str) -> int:
    value = m.get(key)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise TaskPayloadError(f"{what}.{key} must be an integer from 0 to 2**63-1, got {value!r}")
    return value


def _when(key: Any) -> str:
    if key not in VALIDATION_KEYS:  # anything else would become a round metric named after it
        raise TaskPayloadError(f"validation key {key!r} is not one of {list(VALIDATION_KEYS)}")
    return key


def _seconds(m: Mapping[str, Any], key: str, what: str) -> float:
    """An optional duration: absent is 0.0; present, it must be a finite number >= 0."""
    if key not in m:
        return 0.0
    value = m[key]
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise TaskPayloadError(f"{what}.{key} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) or isinstance(value, np.floating)


def _format(m: Mapping[str, Any]) -> None:
    value = m.get("format")
    if type(value) is not int or value != PAYLOAD_FORMAT:  # type first: an array or a bool is not a format
        raise TaskPayloadError(f"payload format {value!r} is not supported (expected {PAYLOAD_FORMAT})")


def _arrays(obj: Any, what: str) -> dict[str, np.ndarray]:
    m = _map(obj, what)
    out: dict[str, np.ndarray] = {}
    for name, value in m.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise TaskPayloadError(f"{what}[{name!r}] must be an n-d array keyed by a string, got {type(value).__name__}")
        out[name] = value
    return out


def _metrics(obj: Any, what: str) -> dict[str, float]:
    m = _map(obj, what)
    out: dict[str, float] = {}
    for name, value in m.items():
        if not isinstance(name, str) or not _is_number(value):
            raise TaskPayloadError(f"{what}[{name!r}] must be a number, got {type(value).__name__}")
        out[name] = float(value)
        if not math.isfinite(out[name]):
            raise TaskPayloadError(f"{what}[{name!r}] is {out[name]}; metrics must be finite")
    return out
