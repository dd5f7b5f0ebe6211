"""Run one EVALUATE task on local data: the sent model's metrics, no training (docs/protocol.md, "EVALUATE").

The plan is built exactly as for training (same training args, so ``test_ratio`` and ``seed`` hold out the
same split); the model is evaluated on that held-out split, or on every local sample when ``test_ratio`` is 0
(the result's ``split`` says which). The sent model is evaluated as it is, persistent buffers included: a
BatchNorm model normalises with the running statistics the rounds averaged (the model ``fedserver export``
writes), not with statistics of this node's data (``TrainingPlan.refresh_local_statistics`` would recompute
those; nodes did before the statistics travelled, when the task held only their initial values).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from fedcore.errors import PlanError
from fedcore.plans import ArrayDataset
from fedcore.plans.loader import load_plan_class
from fedcore.tasks import EvaluateResult, EvaluateTask
from fedcore.training_args import TrainingArgs
from fednode.training import RunStage


def run_evaluation(task: EvaluateTask, dataset: ArrayDataset, *,
                   should_stop: Callable[[], bool] | None = None, stage: RunStage | None = None) -> EvaluateResult:
    """Evaluate ``task.params`` with ``task.plan`` on ``dataset`` (its held-out split when ``test_ratio`` > 0).

    ``should_stop`` is handed to ``TrainingPlan.evaluate``, which asks it before each batch (the node: "has the
    server closed this task?", as in training). ``stage`` (optional) is kept up to date with where the run is,
    for the message of a failure (:class:`fednode.training.RunStage`).

    Raises:
        TrainingStoppedError: ``should_stop()`` returned True (a PlanError naming the batches done).
        PlanError: the plan fails to load or evaluate, or its metrics are not finite.
        WeightsMismatchError: the parameters and buffers do not fit the plan's model.
        TrainingArgsError / DatasetError: invalid training arguments, or a split that leaves nothing.
    """
    started = time.perf_counter()
    stage = RunStage() if stage is None else stage
    stage.enter("reading the training arguments")
    args = TrainingArgs.from_dict(task.training_args)
    stage.enter("loading the plan")
    plan = load_plan_class(task.plan)()
    plan.model_args = dict(task.model_args)
    plan.post_init(args)
    stage.enter("loading the dataset into the plan")
    plan.set_dataset(dataset)
    stage.enter("loading the sent model")
    plan.set_model_params(task.params)  # parameters and persistent buffers, strictly
    held_out = plan.validation_dataset
    if held_out is not None and len(held_out) > 0:
        target, split = held_out, "validation"
    else:
        target, split = dataset, "all"
    stage.enter("evaluating")
    metrics = plan.evaluate(target, should_stop=stage.counting(should_stop))
    stage.enter("checking the metrics")
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise PlanError(f"evaluation of the sent model produced non-finite metrics: {bad}")
    return EvaluateResult(num_samples=len(target), metrics={k: float(v) for k, v in metrics.items()}, split=split,
                          duration_s=time.perf_counter() - started)
