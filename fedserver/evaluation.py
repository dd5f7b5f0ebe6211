"""Federated evaluation: the global model's metrics on every selected node's local data, no training.

Each node receives an EVALUATE task (docs/protocol.md, "EVALUATE task and result") with the model and the
experiment's training arguments, evaluates on its held-out split (``test_ratio``; every local sample when it
is 0) and replies with ``num_samples`` and its metrics. The report averages each metric over the nodes that
replied, weighted by ``num_samples``. It waits for every node it sent a task to (each bounded by its
inactivity timeout), unless given a grace period after the quorum (``wait_after_quorum``, as a training round):
evaluating is cheap, and a node that straggled in the last round needs a moment to stop that task first.
Quorum as in a round; nothing is aggregated or checkpointed. An evaluation cancelled midway (Ctrl-C) reports
each node it had not heard from as ``failed`` ("evaluation aborted") to ``on_outcome``, so a history shows
that it was cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedcore.errors import ExperimentError, RoundFailedError
from fedcore.tasks import EvaluateResult, EvaluateTask
from fedcore.training_args import TrainingArgs
from fedcore.wire import TaskKind
from fedserver.history_records import shown_text
from fedserver.rounds import OUTCOME_OF_STATE, read_reply
from fedserver.server import FedServer
from fedserver.stragglers import StragglerCloser, finished_tasks
from fedserver.tasks import TaskHandle, TaskResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationOutcome:
    """What became of one node's evaluation task."""

    node_id: str
    task_id: str
    outcome: str  # 'succeeded', 'failed', 'refused' or 'timeout' (as in a round)
    error: str = ""
    result: EvaluateResult | None = None


@dataclass(frozen=True)
class EvaluationReport:
    """The model after round ``round`` evaluated on the nodes: per node, and averaged."""

    round: int
    selected: list[str]
    outcomes: list[EvaluationOutcome]  # sorted by node id
    metrics: dict[str, float] = field(default_factory=dict)  # sample-weighted means over the replies
    num_samples: int = 0  # samples evaluated, over the replies
    duration_s: float = 0.0
    evaluation_id: int | None = None  # its id in the history (HistoryStore.start_evaluation); None without one

    @property
    def succeeded(self) -> list[str]:
        return [o.node_id for o in self.outcomes if o.outcome == "succeeded"]


async def evaluate_model(
    server: FedServer,
    task: EvaluateTask,
    selected: Sequence[str],
    *,
    min_nodes: int,
    inactivity_timeout: float,
    wait_after_quorum: float | None = None,
    on_outcome: Callable[[EvaluationOutcome], None] | None = None,
) -> EvaluationReport:
    """Send ``task`` to every node of ``selected`` and collect their metrics (RoundFailedError when fewer than
    ``min_nodes`` reply usable results; the other outcomes are named)."""
    started = time.perf_counter()
    what = f"evaluation of round {task.round}"
    payload = await asyncio.to_thread(server.encode_payload, task.to_payload())  # model-sized: off the loop
    handles: list[TaskHandle] = []
    outcomes: list[EvaluationOutcome] = []
    closer = StragglerCloser(what, min_nodes, wait_after_quorum)
    try:
        for node_id in selected:
            handles.append(server.dispatch(node_id, TaskKind.EVALUATE, payload, experiment_id=task.experiment_id,
                                           round=task.round, inactivity_timeout=inactivity_timeout))
        del payload  # the handles hold it, and let go of it as their tasks end
        async with contextlib.aclosing(finished_tasks(handles, closer)) as results:
            async for result in results:
                outcome = _outcome(result)
                if outcome.outcome == "succeeded":
                    closer.replied()
                elif closer.was_closed(outcome.task_id):
                    outcome = EvaluationOutcome(outcome.node_id, outcome.task_id, "timeout", outcome.error)
                outcomes.append(outcome)
                log.info("%s: node=%s outcome=%s%s", what, outcome.node_id, outcome.outcome,
                         f" error: {shown_text(outcome.error)}" if outcome.error else "")
                if on_outcome is not None:
                    on_outcome(outcome)
    except BaseException:
        reported = {o.task_id for o in outcomes}
        for handle in handles:
            handle.cancel(f"{what} aborted")
            if on_outcome is not None and handle.task_id not in reported:
                with contextlib.suppress(Exception):  # the abort's own error is what propagates
                    on_outcome(EvaluationOutcome(handle.node_id, handle.task_id, "failed", f"{what} aborted"))
        raise
    ok = [o.result for o in outcomes if o.result is not None]
    if len(ok) < min_nodes:
        missing = sorted(f"{o.node_id} ({o.outcome}: {shown_text(o.error)})"  # a node's text, escaped and cut
                         for o in outcomes if o.result is None)
        raise RoundFailedError(f"{what} failed: {len(ok)} of {len(selected)} selected nodes replied, quorum is "
                               f"{min_nodes}; missing: {', '.join(missing)}")
    outcomes.sort(key=lambda o: o.node_id)
    return EvaluationReport(task.round, list(selected), outcomes, weighted_metrics(ok),
                            sum(r.num_samples for r in ok), time.perf_counter() - started)


def weighted_metrics(results: Sequence[EvaluateResult]) -> dict[str, float]:
    """Each metric's mean over ``results``, weighted by their ``num_samples``: Σ (n_i / Σn) · m_i, the
    weights first, so finite metrics give a finite mean (Σ n_i · m_i can overflow). A metric some nodes lack
    is averaged over those that have it; one whose nodes all evaluated 0 samples is left out."""
    totals: dict[str, int] = {}
    for result in results:
        for name in result.metrics:
            totals[name] = totals.get(name, 0) + result.num_samples
    means: dict[str, float] = {}
    for result in results:
        for name, value in result.metrics.items():
            if totals[name] > 0:
                means[name] = means.get(name, 0.0) + (result.num_samples / totals[name]) * value
    return {name: means[name] for name in sorted(means)}


def check_evaluable(training_args: TrainingArgs) -> None:
    """ExperimentError unless an evaluation with these training arguments scores held-out samples only:
    with ``test_ratio`` > 0 the split is drawn from ``seed``, so without one every task (each round's training,
    each evaluation) holds out other samples."""
    if training_args["test_ratio"] > 0 and training_args["seed"] is None:
        raise ExperimentError(
            f"evaluation needs a seed: test_ratio {training_args['test_ratio']} holds samples out with "
            "training_args['seed'], and without one each task draws its own split, so the evaluation would score "
            "samples the model was trained on; set a seed (e.g. 'seed': 1), or test_ratio 0 to evaluate on every "
            "local sample")


def _outcome(result: TaskResult) -> EvaluationOutcome:
    if not result.succeeded:
        return EvaluationOutcome(result.node_id, result.task_id, OUTCOME_OF_STATE.get(result.outcome, "failed"),
                                 result.error_message or result.outcome.value)
    reply, error = read_reply(EvaluateResult.from_payload, result)
    if reply is None:
        return EvaluationOutcome(result.node_id, result.task_id, "failed", error)
    return EvaluationOutcome(result.node_id, result.task_id, "succeeded", result=reply)
