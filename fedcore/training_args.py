"""Validated, read-only training arguments sent by the researcher to every node.

``TrainingArgs`` is a :class:`~collections.abc.Mapping` that always holds every known key: the ones given,
validated and normalised to plain Python types, and defaults for the rest. It rejects unknown keys (the
error lists the valid ones), wrong types (``True`` is not one epoch) and out-of-range values (integers
must also fit in 64 bits, as on the wire), so a typo in
a researcher's notebook fails at once, on the researcher's side, instead of silently on every node.

How many local iterations to run is said by ``num_updates`` or ``epochs`` (optionally with
``batch_maxnum``), all ``None`` by default so one can tell which the researcher chose. Precedence:
``num_updates`` wins over ``epochs`` and ``batch_maxnum``; ``batch_maxnum`` only applies with ``epochs``.
Whatever is given but ignored triggers a :class:`~fedcore.errors.TrainingArgsWarning`. Both may be
``None`` here (a server may fill them in later); the iterations accountant refuses to train without one.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedcore.errors import TrainingArgsError, TrainingArgsWarning

__all__ = ["TrainingArgs"]


@dataclass(frozen=True)
class _ArgSpec:
    """Type, default and allowed range of one training argument."""

    kind: type  # int, float or bool
    default: Any
    doc: str
    optional: bool = False  # None allowed
    low: float | None = None
    low_open: bool = False  # True: value > low, False: value >= low
    high: float | None = None
    high_open: bool = True  # True: value < high, False: value <= high

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any value"

    def in_range(self, value: float) -> bool:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (below or above)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_SPECS: dict[str, _ArgSpec] = {
    # how long to train
    "epochs": _ArgSpec(int, None, "full passes over the local data; ignored if num_updates is set", True, 1),
    "num_updates": _ArgSpec(int, None, "local optimizer steps, same on every node; wins over epochs", True, 1),
    "batch_maxnum": _ArgSpec(int, None, "max batches per epoch; only applies with epochs", True, 1),
    # optimisation
    "batch_size": _ArgSpec(int, 32, "samples per mini-batch", low=1),
    "lr": _ArgSpec(float, 0.01, "optimizer learning rate (eta_l)", low=0, low_open=True),
    "momentum": _ArgSpec(float, 0.0, "SGD momentum", low=0, high=1),
    "weight_decay": _ArgSpec(float, 0.0, "L2 penalty added by the optimizer", low=0),
    "fedprox_mu": _ArgSpec(float, 0.0, "FedProx proximal term weight mu; 0 turns it off", low=0),
    # run control
    "log_interval": _ArgSpec(int, 10, "report progress every this many batches", low=1),
    "dry_run": _ArgSpec(bool, False, "run exactly one iteration, to check a plan end to end"),
    "seed": _ArgSpec(int, None, "random seed for the node's generators; None = not seeded", True, 0, False, 2**32),
    "shuffle": _ArgSpec(bool, True, "shuffle the training data each epoch"),
    # validation
    "test_ratio": _ArgSpec(float, 0.0, "fraction of local data held out for validation", low=0, high=1),
    "test_on_global_updates": _ArgSpec(bool, False, "evaluate the received global model before training"),
    "test_on_local_updates": _ArgSpec(bool, False, "evaluate the local model after training"),
}

_VALID_KEYS: tuple[str, ...] = tuple(sorted(_SPECS))


def _validate_one(key: str, value: Any) -> Any:
    """Check ``value`` for argument ``key`` and return it as a plain Python int, float, bool or None."""
    spec = _SPECS[key]
    if value is None:
        if spec.optional:
            return None
        raise TrainingArgsError(f"training argument {key!r} must not be None (expected {spec.kind.__name__})")
    got = f"got {type(value).__name__} {_shown(value)}"
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise TrainingArgsError(f"training argument {key!r} expects bool, {got}")
        return value
    if isinstance(value, bool):  # bool is an int subclass: True must not mean one epoch
        raise TrainingArgsError(f"training argument {key!r} expects {spec.kind.__name__}, not bool; {got}")
    if spec.kind is int:
        if not isinstance(value, numbers.Integral):
            raise TrainingArgsError(f"training argument {key!r} expects int, {got}")
        value = int(value)
        if not -(2**63) <= value < 2**63:  # msgpack and every node's loop counters are 64-bit
            raise TrainingArgsError(f"training argument {key!r} must fit in a signed 64-bit integer, {got}")
    else:
        if not isinstance(value, numbers.Real):
            raise TrainingArgsError(f"training argument {key!r} expects float (or int), {got}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range (float('inf') would be refused below anyway)
            value = math.inf
        if not math.isfinite(value):
            raise TrainingArgsError(f"training argument {key!r} must be finite, {got}")
    if not spec.in_range(value):
        raise TrainingArgsError(f"training argument {key!r} must be {spec.range_text()}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, except for an int too long to print (repr raises past 4300 digits): its size."""
    if isinstance(value, numbers.Integral) and int(value).bit_length() > 256:
        return f"of {int(value).bit_length()} bits"
    return repr(value)


def _warn_ignored(values: Mapping[str, Any], stacklevel: int) -> None:
    """Warn about every argument that was given but will be ignored, by the precedence rules."""
    ignored: list[str] = []
    if values["num_updates"] is not None:
        if values["epochs"] is not None:
            ignored.append(f"'epochs'={values['epochs']} is ignored: 'num_updates' takes precedence")
        if values["batch_maxnum"] is not None:
            ignored.append(
                f"'batch_maxnum'={values['batch_maxnum']} is ignored: it only applies with 'epochs', "
                "and 'num_updates' takes precedence"
            )
    if values["test_ratio"] == 0.0:
        for key in ("test_on_global_updates", "test_on_local_updates"):
            if values[key]:
                ignored.append(f"{key!r}=True is ignored: 'test_ratio' is 0, so there is no validation data")
    for message in ignored:
        warnings.warn(message, TrainingArgsWarning, stacklevel=stacklevel + 1)


class TrainingArgs(Mapping[str, Any]):
    """Immutable, validated mapping of every training argument (given values, defaults for the rest).

    Build it from a mapping, keywords, or both (a key given twice is an error)::

        TrainingArgs({"num_updates": 10, "lr": 0.1})
        TrainingArgs(num_updates=10, lr=0.1)

    ``dict(args)`` / :meth:`to_dict` hold only ``int``, ``float``, ``bool`` and ``None`` values (JSON and
    msgpack safe); :meth:`from_dict` validates again on the receiving side. Two ``TrainingArgs`` are equal
    when all their values are. :meth:`replace` returns a validated copy with some values changed.

    Raises:
        TrainingArgsError: unknown key (the message lists the valid keys), wrong type or value out of range.

    Warns:
        TrainingArgsWarning: for a given value that the precedence rules ignore (``epochs`` or
        ``batch_maxnum`` next to ``num_updates``; ``test_on_*`` with ``test_ratio`` 0).
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        self._values = self._validated(values, kwargs)
        _warn_ignored(self._values, stacklevel=2)

    @staticmethod
    def _validated(values: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise TrainingArgsError(
                f"training arguments must be a mapping of name to value, got {type(values).__name__}"
            )
        given = dict(values)
        for key, value in kwargs.items():
            if key in given:
                raise TrainingArgsError(f"training argument {key!r} given both in the mapping and as a keyword")
            given[key] = value
        bad = [key for key in given if not isinstance(key, str)]
        if bad:
            raise TrainingArgsError(
                f"training argument names must be str, got {bad[0]!r} ({type(bad[0]).__name__}); "
                f"valid keys: {', '.join(_VALID_KEYS)}"
            )
        unknown = sorted(key for key in given if key not in _SPECS)
        if unknown:
            raise TrainingArgsError(
                f"unknown training argument(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(_VALID_KEYS)}"
            )
        return {key: _validate_one(key, given[key]) if key in given else spec.default
                for key, spec in _SPECS.items()}

    # -- Mapping protocol ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a training argument; valid keys: {', '.join(_VALID_KEYS)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != _SPECS[k].default}
        return f"TrainingArgs({changed!r})"

    # -- conversion ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every argument as a fresh plain ``dict`` of ``int`` / ``float`` / ``bool`` / ``None`` values."""
        return dict(self._values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingArgs:
        """Validate ``values`` (e.g. decoded from the wire) into a ``TrainingArgs``; same checks as the constructor."""
        if not isinstance(values, Mapping):
            raise TrainingArgsError(
                f"training arguments must be a mapping of name to value, got {type(values).__name__}"
            )
        return cls(values)

    def replace(self, **changes: Any) -> TrainingArgs:
        """A new ``TrainingArgs`` with ``changes`` applied on top of these values (validated again)."""
        return type(self)({**self._values, **changes})

    def check_iterations(self) -> None:
        """Raise TrainingArgsError unless these arguments say how many local iterations to run (``num_updates``
        or ``epochs``, or ``dry_run``): every training task would fail on every node otherwise."""
        if not self._values["dry_run"] and self._values["num_updates"] is None and self._values["epochs"] is None:
            raise TrainingArgsError(
                "neither 'num_updates' nor 'epochs' is set: set num_updates or epochs in the training "
                "arguments (num_updates is preferred: it gives every node the same number of steps)"
            )

    # -- introspection ---------------------------------------------------------------------------
    @staticmethod
    def valid_keys() -> tuple[str, ...]:
        """Names of every training argument, sorted."""
        return _VALID_KEYS

    @staticmethod
    def describe(key: str) -> str:
        """One line on argument ``key``: type, default, allowed range and meaning."""
        if key not in _SPECS:
            raise TrainingArgsError(f"unknown training argument {key!r}; valid keys: {', '.join(_VALID_KEYS)}")
        spec = _SPECS[key]
        kind = spec.kind.__name__ + (" | None" if spec.optional else "")
        bounds = "" if spec.kind is bool else f", {spec.range_text()}"
        return f"{key}: {kind} = {spec.default!r}{bounds} — {spec.doc}"
