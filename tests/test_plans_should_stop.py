"""``TrainingPlan.train(should_stop=...)``: asked before every batch; True ends the run there with
TrainingStoppedError naming the steps done, and the model keeps exactly the updates of those steps (the same
weights as a run of that many steps), for the numpy and the torch plan (one loop in ``fedcore.plans._api``).
This is how a node stops training for a task the server closed.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import PlanError, TrainingStoppedError
from fedcore.models import NumpyModel, weights_to_numpy
from fedcore.plans import ArrayDataset, NumpyTrainingPlan


class LinearPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(3, 1)


def _data(n: int = 32) -> ArrayDataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3))
    return ArrayDataset(X, X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3)


def _plan(cls: type, args: dict):
    plan = cls()
    plan.post_init({"batch_size": 8, "lr": 0.05, "seed": 3, "shuffle": False, **args})
    plan.set_dataset(_data())
    return plan


class StopAfter:
    """``should_stop`` that answers False ``k`` times, then True; counts its calls (pins "asked before every
    batch": k + 1 calls when k batches were taken)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.k


def _stop_then_compare(cls: type, args: dict, k: int, total: int, where: str) -> None:
    stopped = _plan(cls, args)
    start = weights_to_numpy(stopped.get_model_params())
    should_stop = StopAfter(k)
    with pytest.raises(TrainingStoppedError) as err:
        stopped.train(should_stop=should_stop)
    assert isinstance(err.value, PlanError) and err.value.steps_done == k
    assert str(err.value) == f"training stopped after {k} of {total} steps, {where}: should_stop() returned True"
    assert should_stop.calls == k + 1  # once before each batch taken, once more before the one not taken
    reference = _plan(cls, {**args, "num_updates": k, "epochs": None} if k else args)
    if k:
        reference.train()
    expected = weights_to_numpy(reference.get_model_params()) if k else start
    for name, value in weights_to_numpy(stopped.get_model_params()).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize(("args", "k", "total", "where"), [
    ({"num_updates": 10}, 3, 10, "before batch 4 of epoch 1"),  # 4 batches per epoch: 2 + 3 in the last
    ({"num_updates": 10}, 6, 10, "before batch 3 of epoch 2"),
    ({"epochs": 2}, 5, 8, "before batch 2 of epoch 2"),
    ({"num_updates": 10}, 0, 10, "before batch 1 of epoch 1"),  # stops before any update: weights untouched
])
def test_numpy_plan_stops_before_the_next_batch(args: dict, k: int, total: int, where: str) -> None:
    _stop_then_compare(LinearPlan, args, k, total, where)


def test_a_should_stop_that_never_says_stop_changes_nothing() -> None:
    plain, asked = _plan(LinearPlan, {"num_updates": 7}), _plan(LinearPlan, {"num_updates": 7})
    should_stop = StopAfter(10**6)
    assert plain.train().num_steps == asked.train(should_stop=should_stop).num_steps == 7
    assert should_stop.calls == 7
    for name, value in weights_to_numpy(plain.get_model_params()).items():
        np.testing.assert_array_equal(value, weights_to_numpy(asked.get_model_params())[name])


def test_torch_plan_stops_before_the_next_batch() -> None:
    torch = pytest.importorskip("torch")
    from fedcore.plans import TorchTrainingPlan

    class TorchLinear(TorchTrainingPlan):
        def init_model(self):
            return torch.nn.Linear(3, 1).to(torch.float64)

        def training_step(self, data, target):
            return torch.nn.functional.mse_loss(self.module(data), target)

    _stop_then_compare(TorchLinear, {"num_updates": 10}, 6, 10, "before batch 3 of epoch 2")
