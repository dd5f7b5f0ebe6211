"""SCAFFOLD server side (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging", option II)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedcore.aggregators._api import Aggregator, NodeReply, ParamSpec, cast_back, frozen_view
from fedcore.aggregators.weighted_mean import WeightedMean
from fedcore.errors import AggregationError, TrainingArgsError

__all__ = ["Scaffold", "check_plain_sgd_args"]

_F64 = np.float64


def check_plain_sgd_args(training_args: Mapping[str, Any]) -> None:
    """Raise TrainingArgsError, naming the arguments, unless ``momentum`` and ``weight_decay`` are 0: Scaffold's
    correction assumes local steps y ← y − η_l (g_i(y) − δ_i), which momentum and weight decay change."""
    given = [f"{key}={training_args.get(key)}" for key in ("momentum", "weight_decay") if training_args.get(key)]
    if given:
        raise TrainingArgsError(f"Scaffold's control variates assume plain SGD: {', '.join(given)} must be 0 "
                                "(set momentum=0 and weight_decay=0, or use FedAvg)")


class Scaffold(Aggregator):
    """SCAFFOLD with control variates, option II, server learning rate η_g = ``server_lr``.

    Server state: the global model x (passed in by ``begin_round``), the server control variate c and
    one control variate c_i per known node; N is the number of known nodes. A round with participants S:

    - node i receives x and δ_i = c_i − c (``node_task_state(i)["correction"]``); from y = x it takes
      K local steps y ← y − η_l (g_i(y) − δ_i) and returns y_i, K and η_l;
    - c_i⁺ = c_i − c + (x − y_i) / (K η_l)
    - x⁺ = x + η_g · (1/|S|) Σ_{i∈S} (y_i − x)
    - c⁺ = c + (|S|/N) · (1/|S|) Σ_{i∈S} (c_i⁺ − c_i); nodes outside S keep c_i.

    S is the set of nodes whose replies were accumulated. c and the c_i of this round are those at
    round start; the c_i⁺ stay pending until ``finalize``. Because c starts at 0 = mean_j c_j and each
    update adds exactly (1/N) Σ_j (c_j⁺ − c_j), c stays the mean over all N nodes of the c_j.

    Known nodes: N counts every node ever listed in ``known_nodes`` (a node is never forgotten, so the
    mean stays consistent). A node first known gets c_i = c: that is 0 when it is known from the start
    (the paper's initialisation), and keeps c = mean_j c_j true when it joins later (a late node
    starting at 0 would bias c forever). Control variates are stored in the parameter dtype
    (floating dtypes only), all arithmetic is float64. A reply without η_l or with K = 0 is an error
    for that node, never a silent FedAvg.

    Buffers (``begin_round(..., buffers=...)``: BatchNorm's running statistics) are no SGD iterates, so the
    maths above does not describe them: x, c, c_i and δ_i cover the parameters only (a frozen parameter
    keeps its control variates, which stay 0 since y_i = x there), and a buffer b gets FedAvg's
    sample-weighted mean b⁺ = Σ_{i∈S} n_i b_i / Σ_{i∈S} n_i (n_i = ``num_samples``; integer buffers exactly,
    rounded half to even: ``fedcore.aggregators.weighted_mean``), whatever η_g. The checkpointed state holds
    no buffer, so a state saved before buffers were federated is the same state.
    """

    name: ClassVar[str] = "scaffold"
    supported_kinds: ClassVar[str] = "f"  # parameters; buffers: any of Aggregator.buffer_kinds
    keeps_global_params: ClassVar[bool] = True  # x⁺ = x + η_g · mean(y_i − x) and c_i⁺ need x

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        if (
            isinstance(server_lr, bool)
            or not isinstance(server_lr, numbers.Real)
            or not math.isfinite(server_lr)
            or server_lr <= 0
        ):
            raise AggregationError(f"Scaffold server_lr must be a finite float > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)
        # Between rounds: c and every c_i (node id -> name -> array), in parameter dtype.
        self._server_control: dict[str, np.ndarray] = {}
        self._node_controls: dict[str, dict[str, np.ndarray]] = {}
        # During a round.
        self._specs: dict[str, ParamSpec] = {}
        self._x: dict[str, np.ndarray] = {}
        self._sum_dx: dict[str, np.ndarray] = {}
        self._sum_dc: dict[str, np.ndarray] = {}
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._order: list[str] = []  # every name of x, parameters and buffers, in x's order
        self._buffers: WeightedMean | None = None

    def config(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def check_training_args(self, training_args: Mapping[str, Any]) -> None:
        """The local steps above are plain SGD: ``momentum`` and ``weight_decay`` must be 0 (see
        :func:`check_plain_sgd_args`, which nodes apply to every Scaffold task too)."""
        check_plain_sgd_args(training_args)

    @property
    def known_nodes(self) -> list[str]:
        """Every node this aggregator holds a control variate for, in order of first appearance."""
        return list(self._node_controls)

    # -- round ------------------------------------------------------------------------------------

    def _open(
        self,
        round_index: int,
        global_params: Mapping[str, np.ndarray],
        specs: dict[str, ParamSpec],
        participants: list[str],
        known_nodes: list[str],
    ) -> None:
        buffers = {key: s for key, s in specs.items() if s.buffer}
        specs = {key: s for key, s in specs.items() if not s.buffer}
        if self._server_control:
            held = {key: ParamSpec.of(value) for key, value in self._server_control.items()}
            if held != specs:
                raise AggregationError(
                    "Scaffold control variates do not match the global params: "
                    + _describe_difference(held, specs, "control variates", "global params")
                )
        else:
            self._server_control = {key: np.zeros(s.shape, dtype=s.dtype) for key, s in specs.items()}
        for node_id in known_nodes:
            if node_id not in self._node_controls:
                self._node_controls[node_id] = {k: v.copy() for k, v in self._server_control.items()}
        self._specs = specs
        self._x = {key: np.array(global_params[key], copy=True) for key in specs}
        self._sum_dx = {key: np.zeros(s.shape, dtype=_F64) for key, s in specs.items()}
        self._sum_dc = {key: np.zeros(s.shape, dtype=_F64) for key, s in specs.items()}
        self._pending = {}
        self._order = list(global_params)
        self._buffers = WeightedMean(buffers) if buffers else None

    def _task_state(self, node_id: str) -> dict[str, Any]:
        c_i = self._node_controls[node_id]
        return {"correction": {key: c_i[key] - c for key, c in self._server_control.items()}}

    def _check_reply(self, reply: NodeReply) -> None:
        if reply.lr is None or reply.num_steps == 0:
            raise AggregationError(
                f"Scaffold needs the local learning rate and steps: node {reply.node_id!r} sent "
                f"lr={reply.lr!r}, num_steps={reply.num_steps!r} (need lr > 0 and num_steps >= 1)"
            )

    def _add(self, reply: NodeReply) -> None:
        assert reply.lr is not None  # checked in _check_reply
        inv_step = _F64(1.0) / (_F64(reply.num_steps) * _F64(reply.lr))
        c_i = self._node_controls[reply.node_id]
        updated: dict[str, np.ndarray] = {}
        for key, spec in self._specs.items():
            x = self._x[key].astype(_F64, copy=False)
            y = reply.params[key].astype(_F64, copy=False)
            old = c_i[key].astype(_F64, copy=False)
            new = old - self._server_control[key].astype(_F64, copy=False) + (x - y) * inv_step
            new_stored = cast_back(new, spec)
            self._sum_dx[key] += y - x
            self._sum_dc[key] += new_stored.astype(_F64, copy=False) - old
            updated[key] = new_stored
        self._pending[reply.node_id] = updated
        if self._buffers is not None:
            self._buffers.add(reply.params, reply.num_samples)

    def _result(self) -> dict[str, np.ndarray]:
        new_buffers = {} if self._buffers is None else self._buffers.result("Scaffold (buffers, averaged by samples)")
        n_s = _F64(len(self._pending))
        n_known = _F64(len(self._node_controls))
        eta_g = _F64(self.server_lr)
        new_x = {}
        new_c = {}
        for key, spec in self._specs.items():
            x = self._x[key].astype(_F64, copy=False)
            new_x[key] = cast_back(x + eta_g * (self._sum_dx[key] / n_s), spec)
            c = self._server_control[key].astype(_F64, copy=False)
            new_c[key] = cast_back(c + (n_s / n_known) * (self._sum_dc[key] / n_s), spec)
        self._server_control = new_c
        self._node_controls.update(self._pending)
        order = self._order
        self._discard()
        return {key: new_x[key] if key in new_x else new_buffers[key] for key in order}

    def _discard(self) -> None:
        self._x, self._sum_dx, self._sum_dc, self._pending = {}, {}, {}, {}
        self._order, self._buffers = [], None

    # -- checkpoint -------------------------------------------------------------------------------

    def _export_state(self) -> dict[str, Any]:
        return {
            "server_control": {key: frozen_view(v) for key, v in self._server_control.items()},
            "node_controls": {
                node_id: {key: frozen_view(v) for key, v in controls.items()}
                for node_id, controls in self._node_controls.items()
            },
            "known_nodes": list(self._node_controls),
        }

    def _import_state(self, state: Mapping[str, Any]) -> None:
        server = _read_arrays(state.get("server_control"), "server_control")
        known = state.get("known_nodes")
        if not isinstance(known, (list, tuple)) or not all(isinstance(n, str) and n for n in known):
            raise AggregationError(f"Scaffold state: known_nodes must be a list of node ids, got {known!r}")
        if len(set(known)) != len(known):
            raise AggregationError(f"Scaffold state: known_nodes lists a node twice: {list(known)}")
        nodes = state.get("node_controls")
        if not isinstance(nodes, Mapping) or set(nodes) != set(known):
            got = sorted(nodes) if isinstance(nodes, Mapping) else nodes
            raise AggregationError(
                f"Scaffold state: node_controls must hold one entry per known node {sorted(known)}, got {got}"
            )
        if known and not server:
            raise AggregationError("Scaffold state: known nodes without a server control variate")
        specs = {key: ParamSpec.of(value) for key, value in server.items()}
        controls: dict[str, dict[str, np.ndarray]] = {}
        for node_id in known:
            arrays = _read_arrays(nodes[node_id], f"node_controls[{node_id!r}]")
            got_specs = {key: ParamSpec.of(value) for key, value in arrays.items()}
            if got_specs != specs:
                raise AggregationError(
                    f"Scaffold state: control variate of node {node_id!r} does not match server_control: "
                    + _describe_difference(specs, got_specs, "server_control", node_id)
                )
            controls[node_id] = arrays
        self._server_control = server
        self._node_controls = controls


def _read_arrays(value: Any, where: str) -> dict[str, np.ndarray]:
    """Copy a name -> floating array mapping out of a loaded state."""
    if not isinstance(value, Mapping):
        raise AggregationError(f"Scaffold state: {where} must be a mapping, got {type(value).__name__}")
    out = {}
    for key, array in value.items():
        if not isinstance(key, str) or not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            raise AggregationError(
                f"Scaffold state: {where}[{key!r}] must be a floating numpy array, got {type(array).__name__}"
            )
        out[key] = np.array(array, copy=True)
    return out


def _describe_difference(
    left: dict[str, ParamSpec], right: dict[str, ParamSpec], left_name: str, right_name: str
) -> str:
    only_left = sorted(set(left) - set(right))
    only_right = sorted(set(right) - set(left))
    if only_left or only_right:
        return f"names only in {left_name}: {only_left}, only in {right_name}: {only_right}"
    for key, spec in left.items():
        if spec != right[key]:
            return (
                f"parameter {key!r} is {spec.shape} {spec.dtype} in {left_name}, "
                f"{right[key].shape} {right[key].dtype} in {right_name}"
            )
    return "no difference"
