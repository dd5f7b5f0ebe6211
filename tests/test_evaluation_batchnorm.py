"""An EVALUATE task of a BatchNorm model: the global model carries its running statistics (persistent
buffers, averaged by the rounds), and the node evaluates it with them, as sent: the metrics are those of the
model ``fedserver export`` writes. Before the statistics travelled the task held their initial mean 0 /
variance 1 and the node recomputed them from its training split (``refresh_local_statistics``, still there
for a node-adapted variant); a model trained on inputs near 50 scored a loss in the hundreds otherwise."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from plans_batchnorm import BatchNormPlan

from fedcore.models import weights_to_numpy
from fedcore.plans import ArrayDataset
from fedcore.tasks import EvaluateTask, PlanSource
from fedcore.training_args import TrainingArgs
from fednode.evaluation import run_evaluation

ARGS = TrainingArgs.from_dict({"num_updates": 300, "lr": 0.05, "batch_size": 32, "seed": 3,
                               "test_ratio": 0.25}).to_dict()


def _data() -> ArrayDataset:
    rng = np.random.default_rng(0)
    X = rng.normal(loc=50.0, scale=2.0, size=(400, 3))
    y = (X - 50.0) @ np.array([[1.0], [-2.0], [0.5]]) + 0.01 * rng.normal(size=(400, 1))
    return ArrayDataset(X, y)


def _trained() -> tuple[BatchNormPlan, float]:
    trained = BatchNormPlan()
    trained.post_init(ARGS)
    trained.set_dataset(_data())
    trained.train()
    return trained, trained.evaluate()["loss"]  # the trained module, with the statistics training accumulated


def test_the_node_evaluates_the_sent_model_with_its_statistics() -> None:
    trained, own = _trained()
    params = weights_to_numpy(trained.get_model_params())  # what the server holds: parameters and buffers
    assert {"0.running_mean", "0.running_var", "0.num_batches_tracked"} <= set(params)
    result = run_evaluation(EvaluateTask("e", 1, PlanSource.from_class(BatchNormPlan), ARGS, params), _data())
    assert result.split == "validation" and result.num_samples == 100
    assert result.metrics["loss"] == own  # the same model on the same held-out split
    # statistics that do not fit the data are used as sent: the node no longer replaces them with its own
    initial = {**params, "0.running_mean": np.zeros(3), "0.running_var": np.ones(3)}
    bad = run_evaluation(EvaluateTask("e", 1, PlanSource.from_class(BatchNormPlan), ARGS, initial), _data())
    assert bad.metrics["loss"] > 100 * own


def test_refresh_local_statistics_recomputes_them_from_the_training_split() -> None:
    trained, own = _trained()
    plan = BatchNormPlan()
    plan.post_init(ARGS)
    plan.set_dataset(_data())
    plan.set_model_params(weights_to_numpy(trained.get_model_params(exclude_buffers=True)), exclude_buffers=True)
    initial = plan.evaluate()["loss"]  # the initial statistics: mean 0, variance 1
    assert plan.refresh_local_statistics() is True
    refreshed = plan.evaluate()["loss"]
    assert refreshed < 2 * own + 0.05 and initial > 100 * refreshed, (initial, refreshed, own)


def test_a_numpy_plan_has_no_statistics_to_refresh() -> None:
    from plans_lsq import LinearPlan

    plan = LinearPlan()
    plan.post_init({"num_updates": 1})
    plan.set_dataset(_data())
    assert plan.refresh_local_statistics() is False
