"""The aggregator plug-in family: the node reply message and the streaming ``Aggregator`` base class.

A round on the server goes::

    agg.begin_round(r, global_params, participants, known_nodes, buffers=names)
    for node in participants:  task payload += agg.node_task_state(node)
    for reply as it arrives:   agg.accumulate(reply)
    new_global = agg.finalize()
    checkpoint(agg.state())    # between rounds; agg.load_state(...) on a fresh object resumes

``global_params`` is the whole federated state of the model: its parameters and its persistent buffers
(a torch plan's BatchNorm ``running_mean``, ``running_var``, ``num_batches_tracked``), the latter named by
``buffers``. Buffers are not SGD iterates: every member averages them by samples (``WeightedMean``: float
buffers as FedAvg averages parameters, integer ones exactly, rounded half to even), whatever it does with
the parameters; they may be integers where a member's parameters may not (Scaffold).

Replies are folded into running float64 sums as they arrive, so server memory does not grow with the
number of replies (FedAvg holds one float64 copy of the model, whatever the number of nodes).

Determinism: every sum is taken in float64 and cast back to the parameter dtype once, in ``finalize``.
With float32 (or narrower) parameters the terms are exact in float64 and the float64 rounding error of
the sum is far below float32 resolution, so the result does not depend on the order in which replies
arrived (in practice: a difference needs a float64 sum to sit within 1 ulp of a float32 rounding
boundary). With float64 parameters the result may differ in the last bit between reply orders.

Aggregators are pure: no I/O, no sleeps, no mutation of their arguments; what they keep, they copy.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from fedcore.errors import AggregationError

__all__ = ["Aggregator", "NodeReply", "ParamSpec"]

STATE_VERSION = 1


def _check_count(value: Any, what: str, node_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise AggregationError(f"node {node_id!r}: {what} must be an int >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class NodeReply:
    """What a node sends back after local training.

    ``params`` are the locally trained weights y_i; ``num_samples`` the samples seen (FedAvg weight);
    ``num_steps`` K, the optimizer steps actually taken; ``lr`` η_l, the local learning rate (None when
    the plan cannot say, which Scaffold refuses). The mappings are frozen shallow copies.
    """

    node_id: str
    params: Mapping[str, np.ndarray]
    num_samples: int
    num_steps: int
    lr: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise AggregationError(f"node_id must be a non-empty str, got {self.node_id!r}")
        nid = self.node_id
        if not isinstance(self.params, Mapping):
            raise AggregationError(
                f"node {nid!r}: params must be a mapping, got {type(self.params).__name__}"
            )
        params: dict[str, np.ndarray] = {}
        for key, value in self.params.items():
            if not isinstance(key, str):
                raise AggregationError(f"node {nid!r}: parameter names must be str, got {key!r}")
            if isinstance(value, np.generic):  # a numpy scalar is taken as a 0-d array
                value = np.asarray(value)
            if not isinstance(value, np.ndarray):
                raise AggregationError(
                    f"node {nid!r}: parameter {key!r} must be a numpy array, got {type(value).__name__}"
                )
            params[key] = value
        object.__setattr__(self, "params", MappingProxyType(params))
        object.__setattr__(self, "num_samples", _check_count(self.num_samples, "num_samples", nid))
        object.__setattr__(self, "num_steps", _check_count(self.num_steps, "num_steps", nid))
        if self.lr is not None:
            lr = self.lr
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
                raise AggregationError(f"node {nid!r}: lr must be a finite float > 0 or None, got {lr!r}")
            object.__setattr__(self, "lr", float(lr))
        if not isinstance(self.metrics, Mapping):
            raise AggregationError(
                f"node {nid!r}: metrics must be a mapping, got {type(self.metrics).__name__}"
            )
        metrics: dict[str, float] = {}
        for key, value in self.metrics.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise AggregationError(f"node {nid!r}: metric {key!r}={value!r} must map a str to a number")
            metrics[key] = float(value)
        object.__setattr__(self, "metrics", MappingProxyType(metrics))


@dataclass(frozen=True)
class ParamSpec:
    """Shape and dtype of one global entry; replies must match it exactly. ``buffer``: a persistent buffer
    (BatchNorm's running statistics), not a parameter."""

    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: bool = False

    @classmethod
    def of(cls, array: np.ndarray) -> ParamSpec:
        return cls(tuple(array.shape), array.dtype)


@dataclass
class _OpenRound:
    """Bookkeeping of the round between ``begin_round`` and ``finalize``."""

    index: int
    specs: dict[str, ParamSpec]
    participants: frozenset[str]
    replied: set[str] = field(default_factory=set)


def _check_ids(ids: Sequence[str], what: str) -> list[str]:
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise AggregationError(f"{what} must be a sequence of node ids, got {type(ids).__name__}")
    seen: set[str] = set()
    for node_id in ids:
        if not isinstance(node_id, str) or not node_id:
            raise AggregationError(f"{what}: node ids must be non-empty str, got {node_id!r}")
        if node_id in seen:
            raise AggregationError(f"{what}: node {node_id!r} is listed twice")
        seen.add(node_id)
    return list(ids)


#: Elements per block of :func:`add_scaled` and :func:`all_finite`: 2 MiB of float64 scratch, cache-sized.
BLOCK = 1 << 18


def add_scaled(total: np.ndarray, value: np.ndarray, weight: np.float64) -> None:
    """``total += weight · value`` in float64, block by block (``total``: a C-contiguous float array).

    With a narrower ``total`` (FedAverage(accumulator="param_dtype")) each element of the float64
    ``total + weight · value`` is rounded once into it.

    Same numbers as ``total += weight * value.astype(np.float64)`` (each element is widened exactly, then
    multiplied, then added) without that expression's two model-sized float64 temporaries: their page
    faults made it the slowest step of a large round, and they doubled the aggregator's peak memory.
    """
    flat_total = total.reshape(-1)
    flat_value = np.ascontiguousarray(value).reshape(-1)
    scratch = np.empty(min(BLOCK, flat_total.size), dtype=np.float64)
    for start in range(0, flat_total.size, BLOCK):
        stop = min(start + BLOCK, flat_total.size)
        block = scratch[: stop - start]
        np.multiply(flat_value[start:stop], weight, out=block)
        flat_total[start:stop] += block


def all_finite(value: np.ndarray) -> bool:
    """``np.isfinite(value).all()`` block by block (no model-sized boolean temporary)."""
    flat = value.reshape(-1)
    return all(np.isfinite(flat[start : start + BLOCK]).all() for start in range(0, flat.size, BLOCK))


def cast_back(total: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """Cast a float64 result to the parameter dtype (integers are rounded to nearest, not truncated)."""
    if spec.dtype.kind in "iu":
        total = np.rint(total)
    return np.asarray(total.astype(spec.dtype, copy=False)).reshape(spec.shape)


def frozen_view(array: np.ndarray) -> np.ndarray:
    """A read-only view, so state handed out cannot be changed behind the aggregator's back."""
    view = array.view()
    view.flags.writeable = False
    return view


class Aggregator(ABC):
    """Streaming aggregator: ``begin_round`` → ``accumulate`` per reply → ``finalize``.

    This base class validates everything common to all members (ids, names, shapes, dtypes,
    participation, duplicates, round lifecycle); members implement the ``_open``, ``_add``,
    ``_result``, ``_export_state`` and ``_import_state`` hooks and ``config``. A new ``begin_round``
    discards a round that was opened and never finalized, as ``abort_round`` does.
    """

    name: ClassVar[str]
    #: dtype kinds a member can aggregate as parameters ("f" float, "i"/"u" integer).
    supported_kinds: ClassVar[str] = "fiu"
    #: dtype kinds every member averages as buffers (module docstring).
    buffer_kinds: ClassVar[str] = "fiu"
    #: Whether the member keeps the global params x from ``begin_round`` to ``finalize`` (Scaffold: x⁺ = x + …).
    #: False promises that it keeps only their names, shapes and dtypes, so the server may drop x once
    #: every node has it (``Experiment(low_memory=True)``). Members must say so; True is the safe default.
    keeps_global_params: ClassVar[bool] = True

    def __init__(self) -> None:
        self._round: _OpenRound | None = None

    # -- public API -------------------------------------------------------------------------------

    def check_training_args(self, training_args: Mapping[str, Any]) -> None:
        """Raise TrainingArgsError when the nodes' training arguments contradict this aggregator's maths, so an
        experiment refuses them before sending a task (the nodes would refuse every one). Default: no limit."""

    def begin_round(
        self,
        round_index: int,
        global_params: Mapping[str, np.ndarray],
        participants: Sequence[str],
        known_nodes: Sequence[str],
        *,
        buffers: Collection[str] = (),
    ) -> None:
        """Open round ``round_index`` from the current global params x, for ``participants`` ⊆ ``known_nodes``.

        ``buffers``: the names in x that are persistent buffers, not parameters (module docstring)."""
        if isinstance(round_index, bool) or not isinstance(round_index, numbers.Integral) or round_index < 0:
            raise AggregationError(f"round_index must be an int >= 0, got {round_index!r}")
        if not isinstance(global_params, Mapping) or not global_params:
            raise AggregationError("global_params must be a non-empty mapping of name -> numpy array")
        if isinstance(buffers, (str, bytes)) or not isinstance(buffers, Collection):
            raise AggregationError(f"buffers must be a collection of names, got {buffers!r}")
        unknown = [name for name in buffers if name not in global_params]
        buffers = frozenset(buffers)
        if unknown:
            raise AggregationError(f"buffers {unknown} are not among the global params {list(global_params)}")
        specs: dict[str, ParamSpec] = {}
        for key, value in global_params.items():
            if not isinstance(key, str) or not isinstance(value, np.ndarray):
                raise AggregationError(
                    f"global parameter {key!r} must be a numpy array under a str name, got {type(value).__name__}"
                )
            is_buffer = key in buffers
            kinds = self.buffer_kinds if is_buffer else self.supported_kinds
            if value.dtype.kind not in kinds:
                raise AggregationError(
                    f"{type(self).__name__} cannot aggregate global {'buffer' if is_buffer else 'parameter'} "
                    f"{key!r} of dtype {value.dtype} (supported dtype kinds: {kinds!r})"
                )
            specs[key] = ParamSpec(tuple(value.shape), value.dtype, is_buffer)
        known = _check_ids(known_nodes, "known_nodes")
        chosen = _check_ids(participants, "participants")
        known_set = set(known)
        for node_id in chosen:
            if node_id not in known_set:
                raise AggregationError(
                    f"participant {node_id!r} is not among the known nodes {sorted(known)}"
                )
        self._round = None
        self._open(int(round_index), global_params, specs, chosen, known)
        self._round = _OpenRound(int(round_index), specs, frozenset(chosen))

    def node_task_state(self, node_id: str) -> dict[str, Any]:
        """What participant ``node_id`` must receive with its task this round (a new dict of new arrays)."""
        self._require_participant(node_id)
        return self._task_state(node_id)

    def accumulate(self, reply: NodeReply) -> None:
        """Fold one reply into the running sums; raises AggregationError naming the node and key if unusable."""
        if not isinstance(reply, NodeReply):
            raise AggregationError(f"accumulate expects a NodeReply, got {type(reply).__name__}")
        rnd = self._require_participant(reply.node_id)
        if reply.node_id in rnd.replied:
            raise AggregationError(f"node {reply.node_id!r} already replied in round {rnd.index}")
        self._check_params(reply, rnd.specs)
        self._add(reply)
        rnd.replied.add(reply.node_id)

    def finalize(self) -> dict[str, np.ndarray]:
        """Close the round and return the new global params (new arrays, same names, shapes and dtypes)."""
        rnd = self._require_open("finalize")
        if not rnd.replied:
            raise AggregationError(f"round {rnd.index}: no reply was accumulated, nothing to aggregate")
        result = self._result()
        self._round = None
        return result

    def abort_round(self) -> None:
        """Discard the open round, if any (e.g. the quorum was missed); the state stays as before it."""
        self._round = None
        self._discard()

    def state(self) -> dict[str, Any]:
        """Everything that changes between rounds, as plain dicts/lists/str/ints/arrays (read-only views)."""
        self._require_closed("state")
        return {"aggregator": self.name, "version": STATE_VERSION, **self._export_state()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state()`` returned (copies every array; the argument is left untouched)."""
        self._require_closed("load_state")
        if not isinstance(state, Mapping):
            raise AggregationError(f"{self.name} state must be a mapping, got {type(state).__name__}")
        if state.get("aggregator") != self.name:
            raise AggregationError(
                f"state was saved by aggregator {state.get('aggregator')!r}, cannot load it into {self.name!r}"
            )
        if state.get("version") != STATE_VERSION:
            raise AggregationError(
                f"{self.name} state version {state.get('version')!r} is not supported (expected {STATE_VERSION})"
            )
        self._import_state(state)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor arguments, so that ``type(agg)(**agg.config())`` builds an equivalent aggregator."""

    # -- hooks for members ------------------------------------------------------------------------

    @abstractmethod
    def _open(
        self,
        round_index: int,
        global_params: Mapping[str, np.ndarray],
        specs: dict[str, ParamSpec],
        participants: list[str],
        known_nodes: list[str],
    ) -> None:
        """Reset the running sums for a new round (arguments are validated; copy what you keep)."""

    def _task_state(self, node_id: str) -> dict[str, Any]:
        return {}

    def _check_reply(self, reply: NodeReply) -> None:
        """Member-specific reply checks (run before anything is added)."""

    @abstractmethod
    def _add(self, reply: NodeReply) -> None:
        """Fold a validated reply into the running sums."""

    @abstractmethod
    def _result(self) -> dict[str, np.ndarray]:
        """Compute the new global params and commit any pending state."""

    def _discard(self) -> None:
        """Drop the running sums of an aborted round."""

    def _export_state(self) -> dict[str, Any]:
        return {}

    def _import_state(self, state: Mapping[str, Any]) -> None:
        return None

    # -- shared checks ----------------------------------------------------------------------------

    def _require_open(self, what: str) -> _OpenRound:
        if self._round is None:
            raise AggregationError(f"{what}: no round is open; call begin_round first")
        return self._round

    def _require_closed(self, what: str) -> None:
        if self._round is not None:
            raise AggregationError(
                f"{what}: round {self._round.index} is open; state is defined between rounds only"
            )

    def _require_participant(self, node_id: str) -> _OpenRound:
        rnd = self._require_open(f"node {node_id!r}")
        if node_id not in rnd.participants:
            raise AggregationError(
                f"node {node_id!r} is not a participant of round {rnd.index} "
                f"(participants: {sorted(rnd.participants)})"
            )
        return rnd

    def _check_params(self, reply: NodeReply, specs: dict[str, ParamSpec]) -> None:
        nid = reply.node_id
        unknown = sorted(set(reply.params) - set(specs))
        if unknown:
            raise AggregationError(f"node {nid!r} sent unknown parameter(s) {unknown}")
        missing = sorted(set(specs) - set(reply.params))
        if missing:
            raise AggregationError(f"node {nid!r} did not send parameter(s) {missing}")
        for key, spec in specs.items():
            value = reply.params[key]
            if value.shape != spec.shape:
                raise AggregationError(
                    f"node {nid!r}: parameter {key!r} has shape {value.shape}, expected {spec.shape}"
                )
            if value.dtype != spec.dtype:
                raise AggregationError(
                    f"node {nid!r}: parameter {key!r} has dtype {value.dtype}, expected {spec.dtype}"
                )
            if spec.dtype.kind == "f" and not all_finite(value):
                raise AggregationError(f"node {nid!r}: parameter {key!r} contains NaN or infinite values")
        self._check_reply(reply)
