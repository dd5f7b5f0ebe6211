"""``ExperimentEvaluation``: an Experiment's federated evaluation of its global model (``evaluate()``).

The model after round ``completed_round`` goes to every eligible node as an EVALUATE task
(:func:`fedserver.evaluation.evaluate_model`); nothing is aggregated or checkpointed. With a history, the
evaluation gets its id first (``HistoryStore.start_evaluation``, once) and every node's outcome is recorded
under that id as it comes, so an evaluation is one evaluation in ``fedserver history`` whatever its nodes do
(the store's implicit grouping by (experiment, round) is for other writers), and the report carries it
(``EvaluationReport.evaluation_id``).

A mixin of :class:`~fedserver.experiment.Experiment`, whose configuration, ``_serving``, ``_key`` and
``_reload_released_params`` it uses; kept apart so the experiment module holds the round loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.errors import ExperimentError
from fedcore.tasks import EvaluateTask
from fedserver.eligible_nodes import eligible_nodes
from fedserver.evaluation import EvaluationOutcome, EvaluationReport, check_evaluable, evaluate_model
from fedserver.history import HistoryStore
from fedserver.history_records import EvaluationRecord

if TYPE_CHECKING:
    import numpy as np

    from fedcore.tasks import PlanSource
    from fedcore.training_args import TrainingArgs
    from fedserver.server import FedServer


class ExperimentEvaluation:
    """``evaluate()`` / ``evaluate_async()`` of an Experiment (module docstring)."""

    if TYPE_CHECKING:
        plan: PlanSource
        training_args: TrainingArgs
        model_args: dict[str, Any]
        dataset_tags: list[str]
        min_nodes: int
        expected_nodes: int | None
        node_wait_timeout: float
        round_timeout: float
        completed_round: int
        history_path: Path | None
        history_id: int | None
        params: dict[str, np.ndarray] | None
        buffer_names: list[str] | None

        def _learn_buffers(self) -> None: ...
        def _serving(self) -> contextlib.AbstractAsyncContextManager[FedServer]: ...
        def _key(self) -> str: ...
        async def _reload_released_params(self) -> None: ...

    def evaluate(self) -> EvaluationReport:
        """Evaluate the global model on every eligible node, without training (blocking; see
        :meth:`evaluate_async`)."""
        return asyncio.run(self.evaluate_async())

    async def evaluate_async(self) -> EvaluationReport:
        """Send the global model (after round ``completed_round``) to every connected node that has the dataset
        tags as an EVALUATE task and return their metrics and the sample-weighted means
        (:mod:`fedserver.evaluation`). It waits for every node (each bounded by ``round_timeout`` of inactivity:
        a node still stopping a closed training task gets its evaluation next) and needs ``min_nodes`` replies;
        nothing is aggregated or checkpointed. With ``history_db`` (and a run recorded there), the evaluation is
        opened in the history first and each node's outcome stored under its id as it comes
        (``HistoryStore.evaluations``; ``fedserver history``); the report's ``evaluation_id`` is that id.

        Raises ExperimentError before sending anything when no round has completed, or when the training
        arguments hold samples out (``test_ratio`` > 0) without a ``seed``: each task then draws its own split,
        so no split is held out from training and the evaluation would score training samples."""
        if self.completed_round < 1:
            raise ExperimentError("evaluate() evaluates the model of the last completed round and no round has "
                                  "completed yet; for the initial model's metrics, train with "
                                  "test_on_global_updates=True (each node's validation before round 1's training)")
        check_evaluable(self.training_args)
        async with self._serving() as server:
            await self._reload_released_params()  # low_memory, interrupted round
            self._learn_buffers()  # params set by hand without buffers: nodes load the model strictly
            candidates = await eligible_nodes(server, self.dataset_tags, self.min_nodes, self.node_wait_timeout,
                                              self.expected_nodes)
            task = EvaluateTask(self._key(), self.completed_round, self.plan, self.training_args.to_dict(),
                                self.params, self.dataset_tags, self.model_args)
            async with self._evaluation_history(task.round) as (evaluation_id, record):
                report = await evaluate_model(server, task, [c.node_id for c in candidates],
                                              min_nodes=self.min_nodes, inactivity_timeout=self.round_timeout,
                                              on_outcome=record)
            return replace(report, evaluation_id=evaluation_id)

    @contextlib.asynccontextmanager
    async def _evaluation_history(self, round: int) -> AsyncIterator[tuple[int | None, Any]]:
        """The id of a new evaluation of ``round``'s model in the history and the ``on_outcome`` that records each
        node's outcome under it; (None, None) without a history (or a run recorded in it)."""
        if self.history_path is None or self.history_id is None:
            yield None, None
            return
        history, experiment_id = HistoryStore(self.history_path), self.history_id
        try:
            evaluation_id = history.start_evaluation(experiment_id, round)

            def record(outcome: EvaluationOutcome) -> None:
                history.record_evaluation(EvaluationRecord.from_outcome(experiment_id, round, outcome,
                                                                        evaluation_id=evaluation_id))

            yield evaluation_id, record
        finally:
            history.close()
