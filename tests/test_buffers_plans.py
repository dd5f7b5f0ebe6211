"""A plan's federated state is its parameters and persistent buffers: what ``get_model_params`` returns, what
``set_model_params`` requires, what a node trains from and sends back (EVALUATE: tests/test_evaluation_batchnorm.py).
Non-persistent buffers never travel; numpy plans (no buffers) are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from plans_batchnorm import BatchNormPlan
from plans_lsq import LinearPlan
from torch import nn

from fedcore.errors import WeightsMismatchError
from fedcore.models import TorchModel, weights_to_numpy
from fedcore.plans import ArrayDataset, TorchTrainingPlan
from fedcore.tasks import PlanSource, TrainTask
from fednode.training import run_training

ARGS = {"num_updates": 6, "lr": 0.01, "batch_size": 16, "seed": 3, "test_ratio": 0.25}
BUFFERS = ["0.running_mean", "0.running_var", "0.num_batches_tracked"]


class WithScratch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _data(n: int = 64) -> ArrayDataset:
    rng = np.random.default_rng(0)
    X = rng.normal(loc=50.0, scale=2.0, size=(n, 3))
    return ArrayDataset(X, (X - 50.0) @ np.array([[1.0], [-2.0], [0.5]]))


def _plan() -> BatchNormPlan:
    plan = BatchNormPlan()
    plan.post_init(ARGS)
    return plan


def test_model_params_hold_persistent_buffers_never_non_persistent_ones() -> None:
    plan = _plan()
    assert sorted(plan.get_model_params()) == sorted(["0.weight", "0.bias", "1.weight", "1.bias", *BUFFERS])
    assert plan.model.buffer_names() == BUFFERS
    assert sorted(plan.get_model_params(exclude_buffers=True)) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    model = TorchModel(WithScratch())
    assert model.buffer_names() == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert "scratch" not in model.get_weights(exclude_buffers=False)
    linear = LinearPlan()
    linear.post_init({"num_updates": 1})
    assert linear.model.buffer_names() == [] and sorted(linear.get_model_params()) == ["coef", "intercept"]


def test_set_model_params_needs_the_buffers_and_sets_them() -> None:
    plan = _plan()
    params = weights_to_numpy(plan.get_model_params())
    with pytest.raises(WeightsMismatchError, match=r"missing names \['0.running_mean', '0.running_var', "
                                                   r"'0.num_batches_tracked'\]"):
        plan.set_model_params({k: v for k, v in params.items() if k not in BUFFERS})
    sent = {**params, "0.running_mean": np.full(3, 50.0), "0.num_batches_tracked": np.array(7, np.int64)}
    plan.set_model_params(sent)
    got = weights_to_numpy(plan.get_model_params())
    np.testing.assert_array_equal(got["0.running_mean"], np.full(3, 50.0))
    assert int(got["0.num_batches_tracked"]) == 7


def test_a_node_trains_from_the_sent_buffers_and_sends_them_back() -> None:
    x = weights_to_numpy(_plan().get_model_params())
    x["0.running_mean"] = np.full(3, 49.0)
    x["0.num_batches_tracked"] = np.array(10, np.int64)
    result = run_training(TrainTask("e", 2, PlanSource.from_class(BatchNormPlan), ARGS, x), _data())
    assert sorted(result.params) == sorted(x)
    assert int(result.params["0.num_batches_tracked"]) == 10 + 6  # went on from the sent count
    # running mean after K steps of momentum m from the sent one: (1 − m)^K of it is still there
    fresh = dict(x, **{"0.running_mean": np.zeros(3)})
    from_zero = run_training(TrainTask("e", 2, PlanSource.from_class(BatchNormPlan), ARGS, fresh), _data())
    np.testing.assert_allclose(result.params["0.running_mean"] - from_zero.params["0.running_mean"],
                               0.9**6 * np.full(3, 49.0), rtol=1e-12)


class NoRunningStats(TorchTrainingPlan):
    def init_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))

    def training_step(self, data, target):
        return nn.functional.mse_loss(self.module(data)[:, :1], target)


def test_batchnorm_without_running_statistics_has_no_buffers() -> None:
    plan = NoRunningStats()
    plan.post_init(ARGS)
    assert plan.model.buffer_names() == []
