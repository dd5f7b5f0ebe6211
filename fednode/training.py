"""Run one training task on local data: the node's side of a round, independent of the transport.

Order of operations (docs/protocol.md, "TRAIN task"): load the approved plan, build it with the task's
training args, load the global model (strictly: names, shapes, dtypes; its parameters and persistent buffers,
so BatchNorm's running statistics start from the averaged ones), optionally evaluate it, train through the
accountant with the Scaffold correction or FedProx anchor the task asks for (the correction names parameters
only), optionally evaluate the local model, and return parameters and buffers as numpy arrays with K, η_l and
the metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcore.aggregators.scaffold import check_plain_sgd_args
from fedcore.errors import PlanError
from fedcore.models import weights_to_numpy
from fedcore.plans import ArrayDataset, TrainingProgress
from fedcore.plans.loader import load_plan_class
from fedcore.tasks import TrainResult, TrainTask
from fedcore.training_args import TrainingArgs

ProgressCallback = Callable[[TrainingProgress], None]


@dataclass
class RunStage:
    """Where a training or evaluation run is, so that its failure can say it ("step 3", "validating the local
    model, batch 2"). The run sets :attr:`doing` as it goes; the plan's ``should_stop``, asked before each
    batch (``TrainingPlan.train`` / ``evaluate``), counts the batches begun in :attr:`batches`."""

    doing: str = "loading the plan"
    batches: int = 0  # batches begun in the current stage (the one running, or the one that failed)

    def enter(self, doing: str) -> None:
        self.doing, self.batches = doing, 0

    def counting(self, should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
        """``should_stop`` (None: never) counting each call as one more batch begun."""
        def asked() -> bool:
            self.batches += 1
            return should_stop is not None and should_stop()
        return asked

    def describe(self) -> str:
        """The stage in a few words: "step 3" (the step that was running), "batch 2", "loading the plan"."""
        if self.doing == "training":
            return f"step {self.batches}" if self.batches else "training, before the first step"
        if self.batches:
            return f"batch {self.batches}" if self.doing == "evaluating" else f"{self.doing}, batch {self.batches}"
        return self.doing


def run_training(task: TrainTask, dataset: ArrayDataset, progress: ProgressCallback | None = None, *,
                 should_stop: Callable[[], bool] | None = None, stage: RunStage | None = None) -> TrainResult:
    """Train ``task.plan`` on ``dataset`` from ``task.params`` and return the result payload.

    ``should_stop`` is handed to ``TrainingPlan.train`` and to the validations before and after it, which ask
    it before each batch (the node: "has the server closed this task, or did its stop grace run out?").
    ``stage`` (optional) is kept up to date with where the run is, for the message of a failure.

    Raises:
        TrainingStoppedError: ``should_stop()`` returned True (a PlanError: the steps done are named).
        PlanError: the plan fails to load or train (NaN loss, bad shapes, ...), or Scaffold is asked
            for with an optimizer its maths does not describe.
        WeightsMismatchError: the global parameters and buffers do not fit the plan's model.
        TrainingArgsError: invalid training arguments.
    """
    started = time.perf_counter()
    stage = RunStage() if stage is None else stage
    asked = stage.counting(should_stop)
    stage.enter("reading the training arguments")
    args = TrainingArgs.from_dict(task.training_args)
    correction = None
    if task.aggregator == "scaffold":
        correction = task.aggregator_state.get("correction")
        if correction is None:
            raise PlanError("Scaffold task without a correction (aggregator_state.correction is missing)")
        check_plain_sgd_args(args)  # TrainingArgsError naming momentum / weight_decay
    stage.enter("loading the plan")
    plan = load_plan_class(task.plan)()
    plan.model_args = dict(task.model_args)
    plan.post_init(args)
    stage.enter("loading the dataset into the plan")
    plan.set_dataset(dataset)
    stage.enter("loading the global model")
    plan.set_model_params(task.params)
    validation: dict[str, dict[str, float]] = {}
    held_out = 0 if plan.validation_dataset is None else len(plan.validation_dataset)
    evaluate = held_out > 0
    if evaluate and args["test_on_global_updates"]:
        stage.enter("validating the global model")
        validation["before"] = _finite(plan.evaluate(should_stop=asked), "validation of the global model")
    stage.enter("training")
    result = plan.train(progress=progress, correction=correction,
                        global_params=task.params if args["fedprox_mu"] > 0 else None, should_stop=asked)
    if evaluate and args["test_on_local_updates"]:
        stage.enter("validating the local model")
        validation["after"] = _finite(plan.evaluate(should_stop=asked), "validation of the local model")
    stage.enter("reading the trained parameters")
    params = weights_to_numpy(plan.after_training_params())
    tail = result.losses[-10:]
    metrics = {"loss": float(np.mean(tail))} if tail else {}
    return TrainResult(
        params=params,
        num_samples=result.num_samples,
        num_steps=result.num_steps,
        lr=result.lr,
        metrics=metrics,
        validation=validation,
        duration_s=time.perf_counter() - started,
        validation_samples=held_out if validation else None,
    )


def _finite(metrics: dict[str, float], what: str) -> dict[str, float]:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise PlanError(f"{what} produced non-finite metrics: {bad}")
    return {k: float(v) for k, v in metrics.items()}
