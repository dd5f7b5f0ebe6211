"""One training round, the only place the round loop lives.

    select nodes → begin_round → send each node its task (the global model encoded once, plus its own
    aggregator state) → accumulate every reply into the aggregator as it arrives (:func:`collect_round`)
    → finalize (:func:`finish_round`).

With a releasable :class:`~fedserver.round_model.RoundModel` (``Experiment(low_memory=True)``) the round
releases x as soon as every selected node has downloaded its task (or ended without needing it): from
then on the server holds the running sum and the uploads, not x; a resumed download reloads it.

What a round holds goes with it, by reference counting alone: the round model is freed once its
payloads' tasks have closed (payloads refer to it, it refers to them weakly), the releaser lets go of the
model and the handles when the round ends (a timed-out handle is kept to record a late result), and the
idle upload buffers the replies were received into are freed before ``finalize``, which holds the sum
and x⁺ together (one model less at the server's peak; the next round's first reply faults in a fresh one).

A node that fails, refuses, times out (no activity for ``inactivity_timeout`` seconds — a slow but
moving transfer is activity) or sends an unusable reply is recorded and left out; the round completes if
at least ``min_nodes`` replies were aggregated, else :class:`RoundFailedError` names the missing nodes
and the aggregator drops the round, so nothing of it is applied.

Stragglers: by default a round waits for every node it sent a task to (each bounded by the inactivity
timeout only, so a node that trains slowly but reports progress is waited for). With
``wait_after_quorum=W`` the round waits at most W seconds more once ``min_nodes`` replies are aggregated,
then closes the tasks still open (outcome ``timeout``): their nodes learn it from their next heartbeat or
report (``HeartbeatResponse.task_state``), stop training and upload nothing; a result that arrives anyway
is refused and recorded as late. W = 0 closes them as soon as the quorum is in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from fedcore.aggregators import Aggregator, NodeReply
from fedcore.errors import FedstreamError, RoundFailedError
from fedcore.tasks import TrainResult, TrainTask
from fedcore.wire import TaskKind
from fedserver.history_records import shown_text
from fedserver.off_loop import run_off_loop
from fedserver.round_model import RoundModel
from fedserver.server import FedServer
from fedserver.stragglers import StragglerCloser, finished_tasks
from fedserver.tasks import TaskHandle, TaskResult, TaskState, TransferProgress

log = logging.getLogger(__name__)

R = TypeVar("R")

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
    """Sample-weighted means over the aggregated replies: ``train_<m>``, ``val_before_<m>``, ``val_after_<m>``.

    ``train_<m> = Σ_i w_i m_i / Σ_i w_i`` with ``w_i = max(num_samples_i, 1)`` (samples processed in training);
    ``val_<when>_<m> = Σ_i v_i m_i / Σ_i v_i`` with ``v_i = max(validation_samples_i, 1)``, the node's held-out
    count, or ``w_i`` when its reply does not say (older nodes). Sums run over the nodes reporting ``m``.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for outcome in outcomes:
        result = outcome.result
        if result is None:
            continue
        train_weight = float(max(result.num_samples, 1))
        held_out = result.num_samples if result.validation_samples is None else result.validation_samples
        val_weight = float(max(held_out, 1))
        sources: list[tuple[str, Mapping[str, float], float]] = [("train_", result.metrics, train_weight)]
        sources += [(f"val_{when}_", metrics, val_weight) for when, metrics in result.validation.items()]
        for prefix, metrics, weight in sources:
            for name, value in metrics.items():
                key = prefix + name
                sums[key] = sums.get(key, 0.0) + weight * value
                weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sorted(sums)}


@dataclass(frozen=True)
class CollectedRound:
    """A round whose replies are all in and summed, quorum met: what :func:`finish_round` averages."""

    round: int
    selected: list[str]
    outcomes: list[NodeOutcome]  # sorted by node id
    started: float  # time.perf_counter() when the round began


async def collect_round(
    server: FedServer,
    aggregator: Aggregator,
    task: TrainTask | RoundModel,
    selected: Sequence[str],
    known_nodes: Sequence[str],
    *,
    min_nodes: int,
    inactivity_timeout: float,
    experiment_key: str,
    on_outcome: Callable[[NodeOutcome], None] | None = None,
    on_dispatch: Callable[[TaskHandle], None] | None = None,
    wait_after_quorum: float | None = None,
) -> CollectedRound:
    """Run round ``task.round`` with ``selected`` nodes, starting from x (``task.params``), up to the average:
    every reply summed, the quorum checked (:class:`RoundFailedError` otherwise). Interrupted or failed,
    the aggregator drops the round (``abort_round``). :func:`finish_round` then averages.

    ``task``: the round's TrainTask, or its RoundModel; a releasable one is released once every node
    has its task, if the aggregator does not keep x (``Aggregator.keeps_global_params``).
    ``on_outcome`` is called as each node's outcome is known (history, progress bars); ``on_dispatch``
    with each task handle (progress subscriptions). ``wait_after_quorum``: seconds to wait for the other
    nodes once ``min_nodes`` replies are in, then close their tasks (None: wait for every node).
    """
    started = time.perf_counter()
    model = task if isinstance(task, RoundModel) else await RoundModel.create(task, server.config.chunk_size)
    del task  # x lives in ``model`` only: releasing it there frees it
    aggregator.begin_round(model.round, model.params(), list(selected), list(known_nodes), buffers=model.buffers)
    try:
        handles: dict[str, TaskHandle] = {}
        for node_id in selected:
            payload = await model.payload_async({"aggregator_state": aggregator.node_task_state(node_id)})
            handle = server.dispatch(node_id, TaskKind.TRAIN, payload, experiment_id=experiment_key,
                                     round=model.round, inactivity_timeout=inactivity_timeout)
            handles[node_id] = handle
            if on_dispatch is not None:
                on_dispatch(handle)
        payload = None  # the handles hold the payloads
        releaser = _ReleaseWhenDownloaded(model, list(handles.values()), aggregator)
        outcomes: list[NodeOutcome] = []
        closer = StragglerCloser(f"round {model.round}", min_nodes, wait_after_quorum)
        try:
            async with contextlib.aclosing(finished_tasks(list(handles.values()), closer)) as results:
                async for result in results:
                    # on the loop, not in a thread: while it sums (~0.2 s/GB) no further reply is received, which
                    # is what keeps a round at one sum + one upload; in a thread the next reply arrived meanwhile
                    # (tests/test_model_memory.py under load: 3.05 models instead of 2)
                    outcome = _accept(aggregator, result)
                    if outcome.outcome == "succeeded":
                        closer.replied()
                    elif closer.was_closed(outcome.task_id):
                        outcome = replace(outcome, outcome="timeout")
                    releaser.check()
                    outcomes.append(outcome)
                    log.info("round=%d node=%s outcome=%s%s", model.round, outcome.node_id, outcome.outcome,
                             f" error: {shown_text(outcome.error)}" if outcome.error else "")
                    if on_outcome is not None:
                        on_outcome(outcome)
        finally:
            releaser.detach()
    except BaseException:
        aggregator.abort_round()
        server.cancel_round(experiment_key, model.round, "round aborted")
        raise
    server.uploads.release_idle()  # every reply is in: no idle upload block beside the sum and x⁺
    ok = [o for o in outcomes if o.outcome == "succeeded"]
    if len(ok) < min_nodes:
        aggregator.abort_round()
        missing = sorted(f"{o.node_id} ({o.outcome}: {shown_text(o.error)})"  # a node's text, escaped and cut
                         for o in outcomes if o.outcome != "succeeded")
        raise RoundFailedError(
            f"round {model.round} failed: {len(ok)} of {len(selected)} selected nodes replied, quorum is "
            f"{min_nodes}; missing: {', '.join(missing)}")
    outcomes.sort(key=lambda o: o.node_id)
    return CollectedRound(model.round, list(selected), outcomes, started)


async def finish_round(aggregator: Aggregator, collected: CollectedRound) -> RoundReport:
    """Average a collected round (``aggregator.finalize``, in a worker thread) into its report.

    ``finalize`` moves the aggregator to the next round (Scaffold's control variates): a caller that must
    not lose that step to a cancellation runs this, and what it records of the round, as one step
    (:func:`fedserver.off_loop.to_completion`, as ``Experiment`` does).
    """
    params = await run_off_loop(aggregator.finalize)
    ok = [o for o in collected.outcomes if o.outcome == "succeeded"]
    return RoundReport(collected.round, collected.selected, collected.outcomes, params, round_metrics(ok),
                       time.perf_counter() - collected.started)


class _ReleaseWhenDownloaded:
    """Releases a releasable round model once no selected node still needs x to download its task.

    A node needs x until its payload has been streamed completely (or its task ended); :meth:`check` is
    called on every completed download (a transfer listener) and on every finished task.
    """

    def __init__(self, model: RoundModel, handles: list[TaskHandle], aggregator: Aggregator) -> None:
        self.model: RoundModel | None = model
        self.handles = handles
        self.downloaded: set[str] = set()
        self.active = model.releasable and not aggregator.keeps_global_params
        if self.active:
            for handle in handles:
                handle.subscribe(self._on_event)
            self.check()

    def _on_event(self, handle: TaskHandle, event: object) -> None:
        if isinstance(event, TransferProgress) and event.direction == "download" and event.done == event.total:
            self.downloaded.add(handle.task_id)
            self.check()

    def detach(self) -> None:
        """Stop watching: unsubscribe from the handles still open (a finished handle drops its listeners
        itself), then drop the model and the handles. Handles may outlive the round (the experiment keeps a
        timed-out one for its late result): through a releaser that kept the model, they would keep x."""
        if self.active:
            for handle in self.handles:
                handle.unsubscribe(self._on_event)
        self.active = False
        self.handles = []
        self.model = None

    def check(self) -> None:
        if not self.active or self.model is None or self.model.released:
            return
        if all(h.done() for h in self.handles):
            return  # the round is over without every download done: releasing now would only cost a reload
        if all(h.task_id in self.downloaded or h.state is not TaskState.QUEUED for h in self.handles):
            self.model.release()
            log.info("round=%d every node has its task: global model released", self.model.round)


def _accept(aggregator: Aggregator, result: TaskResult) -> NodeOutcome:
    """Turn a finished task into an outcome, accumulating a usable reply into the aggregator."""
    common: dict[str, Any] = {"node_id": result.node_id, "task_id": result.task_id,
                              "bytes_in": result.bytes_received, "bytes_out": result.bytes_sent,
                              "duration_s": result.timings.total_seconds}
    if not result.succeeded:
        error = result.error_message or result.outcome.value
        return NodeOutcome(outcome=OUTCOME_OF_STATE.get(result.outcome, "failed"), error=error, **common)
    try:
        reply, error = read_reply(TrainResult.from_payload, result)
        if reply is None:
            return NodeOutcome(outcome="failed", error=error, **common)
        try:
            aggregator.accumulate(NodeReply(result.node_id, reply.params, reply.num_samples, reply.num_steps,
                                            reply.lr, reply.metrics))
        except FedstreamError as exc:  # refused before anything is summed; any other error aborts the round
            return NodeOutcome(outcome="failed", error=f"unusable reply: {exc}", **common)
    finally:
        _drop_params(result.payload)
    # the outcome outlives the round (reports, history): it keeps the counts and metrics, not the params
    return NodeOutcome(outcome="succeeded", result=replace(reply, params={}), **common)


def read_reply(parse: Callable[[Any], R], result: TaskResult) -> tuple[R | None, str]:
    """``parse(result.payload)`` and "", or None and why it is unusable. Any error, a decoding bug included,
    costs this node's reply only, never the round or the experiment (an unexpected one is logged in full)."""
    try:
        return parse(result.payload), ""
    except FedstreamError as exc:
        return None, f"unusable reply: {exc}"
    except Exception as exc:
        log.exception("round=%d node=%s: reply of task %s could not be read", result.round, result.node_id,
                      result.task_id)
        return None, f"unusable reply: {type(exc).__name__}: {exc}"


def _drop_params(payload: Any) -> None:
    """Forget the reply's arrays once they are accumulated (or refused): they are views of the upload
    buffer, which the task handle's result would otherwise keep alive until the round's handles go."""
    if isinstance(payload, dict):
        payload.pop("params", None)
