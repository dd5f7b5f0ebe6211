"""One training round, the only place the round loop lives.

    select nodes → begin_round → send each node its task (the global model encoded once, plus its own
    aggregator state) → accumulate every reply into the aggregator as it arrives → finalize.

A node that fails, refuses, times out (no activity for ``inactivity_timeout`` seconds — a slow but
moving transfer is activity) or sends an unusable reply is recorded and left out; the round completes if
at least ``min_nodes`` replies were aggregated, else :class:`RoundFailedError` names the missing nodes
and the aggregator drops the round, so nothing of it is applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedcore.aggregators import Aggregator, NodeReply
from fedcore.errors import FedstreamError, RoundFailedError
from fedcore.framing import SharedMapPayload
from fedcore.tasks import TrainResult, TrainTask
from fedcore.wire import TaskKind
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle, TaskResult, TaskState

log = logging.getLogger(__name__)

#: TaskState of a finished task -> outcome word of the history database.
OUTCOME_OF_STATE = {TaskState.SUCCEEDED: "succeeded", TaskState.FAILED: "failed", TaskState.REFUSED: "refused",
                    TaskState.TIMED_OUT: "timeout", TaskState.CANCELLED: "failed"}


@dataclass(frozen=True)
class NodeOutcome:
    """What became of one node's task in a round."""

    node_id: str
    task_id: str
    outcome: str  # 'succeeded', 'failed', 'refused' or 'timeout' (history vocabulary)
    error: str = ""
    result: TrainResult | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class RoundReport:
    """A completed round: who took part, what each did, the new global parameters and round metrics."""

    round: int
    selected: list[str]
    outcomes: list[NodeOutcome]
    params: dict[str, np.ndarray] = field(repr=False)
    metrics: dict[str, float]
    duration_s: float

    @property
    def succeeded(self) -> list[str]:
        return [o.node_id for o in self.outcomes if o.outcome == "succeeded"]


def round_metrics(outcomes: Sequence[NodeOutcome]) -> dict[str, float]:
    """Sample-weighted means over the aggregated replies: ``train_<m>``, ``val_before_<m>``, ``val_after_<m>``."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for outcome in outcomes:
        if outcome.result is None:
            continue
        weight = float(max(outcome.result.num_samples, 1))
        sources: list[tuple[str, Mapping[str, float]]] = [("train_", outcome.result.metrics)]
        sources += [(f"val_{when}_", metrics) for when, metrics in outcome.result.validation.items()]
        for prefix, metrics in sources:
            for name, value in metrics.items():
                key = prefix + name
                sums[key] = sums.get(key, 0.0) + weight * value
                weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sorted(sums)}


async def run_round(
    server: FedServer,
    aggregator: Aggregator,
    task: TrainTask,
    selected: Sequence[str],
    known_nodes: Sequence[str],
    *,
    min_nodes: int,
    inactivity_timeout: float,
    experiment_key: str,
    on_outcome: Callable[[NodeOutcome], None] | None = None,
    on_dispatch: Callable[[TaskHandle], None] | None = None,
) -> RoundReport:
    """Run round ``task.round`` with ``selected`` nodes, starting from ``task.params`` (x).

    ``on_outcome`` is called as each node's outcome is known (history, progress bars); ``on_dispatch``
    with each task handle (progress subscriptions).
    """
    started = time.perf_counter()
    aggregator.begin_round(task.round, task.params, list(selected), list(known_nodes))
    try:
        shared = SharedMapPayload(task.shared_entries(), list(TrainTask.OWN_KEYS), server.config.chunk_size)
        handles: dict[str, TaskHandle] = {}
        for node_id in selected:
            payload = shared.build({"aggregator_state": aggregator.node_task_state(node_id)})
            handle = server.dispatch(node_id, TaskKind.TRAIN, payload, experiment_id=experiment_key,
                                     round=task.round, inactivity_timeout=inactivity_timeout)
            handles[node_id] = handle
            if on_dispatch is not None:
                on_dispatch(handle)
        del shared
        outcomes: list[NodeOutcome] = []
        for next_done in asyncio.as_completed([h.result() for h in handles.values()]):
            outcome = _accept(aggregator, await next_done)
            outcomes.append(outcome)
            log.info("round=%d node=%s outcome=%s%s", task.round, outcome.node_id, outcome.outcome,
                     f" error={outcome.error!r}" if outcome.error else "")
            if on_outcome is not None:
                on_outcome(outcome)
    except BaseException:
        aggregator.abort_round()
        server.cancel_round(experiment_key, task.round, "round aborted")
        raise
    ok = [o for o in outcomes if o.outcome == "succeeded"]
    if len(ok) < min_nodes:
        aggregator.abort_round()
        missing = sorted(f"{o.node_id} ({o.outcome}: {o.error})" for o in outcomes if o.outcome != "succeeded")
        raise RoundFailedError(
            f"round {task.round} failed: {len(ok)} of {len(selected)} selected nodes replied, quorum is "
            f"{min_nodes}; missing: {', '.join(missing)}")
    params = aggregator.finalize()
    outcomes.sort(key=lambda o: o.node_id)
    return RoundReport(task.round, list(selected), outcomes, params, round_metrics(ok),
                       time.perf_counter() - started)


def _accept(aggregator: Aggregator, result: TaskResult) -> NodeOutcome:
    """Turn a finished task into an outcome, accumulating a usable reply into the aggregator."""
    common: dict[str, Any] = {"node_id": result.node_id, "task_id": result.task_id,
                              "bytes_in": result.bytes_received, "bytes_out": result.bytes_sent,
                              "duration_s": result.timings.total_seconds}
    if not result.succeeded:
        error = result.error_message or result.outcome.value
        return NodeOutcome(outcome=OUTCOME_OF_STATE.get(result.outcome, "failed"), error=error, **common)
    try:
        reply = TrainResult.from_payload(result.payload)
        aggregator.accumulate(NodeReply(result.node_id, reply.params, reply.num_samples, reply.num_steps,
                                        reply.lr, reply.metrics))
    except FedstreamError as exc:
        return NodeOutcome(outcome="failed", error=f"unusable reply: {exc}", **common)
    finally:
        _drop_params(result.payload)
    # the outcome outlives the round (reports, history): it keeps the counts and metrics, not the params
    return NodeOutcome(outcome="succeeded", result=replace(reply, params={}), **common)


def _drop_params(payload: Any) -> None:
    """Forget the reply's arrays once they are accumulated (or refused): they are views of the upload
    buffer, which the task handle's result would otherwise keep alive until the round's handles go."""
    if isinstance(payload, dict):
        payload.pop("params", None)
