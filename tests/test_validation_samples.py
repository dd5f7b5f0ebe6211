"""``validation_samples`` in the TRAIN result: parsed and checked (fedcore.tasks), filled by the Python node
(fednode.training), and the weight of the round's val_* metrics (fedserver.rounds.round_metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from plans_lsq import LinearPlan

from fedcore.errors import TaskPayloadError
from fedcore.plans import ArrayDataset
from fedcore.tasks import PlanSource, TrainResult, TrainTask
from fednode.training import run_training
from fedserver.rounds import NodeOutcome, round_metrics


def _payload(**extra) -> dict:
    return {**TrainResult(params={}, num_samples=120, num_steps=4, lr=0.1, metrics={"loss": 0.5},
                          validation={"after": {"loss": 0.7}}).to_payload(), **extra}


@pytest.mark.parametrize("count", [0, 1, 37, 2**63 - 1])
def test_validation_samples_round_trips(count: int) -> None:
    result = TrainResult.from_payload(_payload(validation_samples=count))
    assert result.validation_samples == count
    assert TrainResult.from_payload(result.to_payload()) == result


def test_absent_validation_samples_is_none_and_is_not_written() -> None:
    payload = _payload()
    assert "validation_samples" not in payload  # older servers see the payload they always saw
    assert TrainResult.from_payload(payload).validation_samples is None


@pytest.mark.parametrize("bad", [-1, 2**63, 3.0, True, "20", None, [20]])
def test_bad_validation_samples_refuses_the_result_naming_the_key(bad) -> None:
    with pytest.raises(TaskPayloadError, match=r"result\.validation_samples must be an integer from 0 to 2\*\*63-1"):
        TrainResult.from_payload(_payload(validation_samples=bad))


def _outcome(node: str, num_samples: int, train_loss: float, validation: dict, held_out: int | None) -> NodeOutcome:
    result = TrainResult(params={}, num_samples=num_samples, num_steps=10, lr=0.1, metrics={"loss": train_loss},
                         validation=validation, validation_samples=held_out)
    return NodeOutcome(node_id=node, task_id=f"t-{node}", outcome="succeeded", result=result)


def test_round_metrics_weight_validation_by_held_out_counts_and_training_by_num_samples() -> None:
    """Same num_samples (num_updates × batch), 10 vs 10 000 held-out samples: val_* follow the big node."""
    outcomes = [_outcome("a", 320, 1.0, {"before": {"loss": 4.0}, "after": {"loss": 2.0, "acc": 0.1}}, 10),
                _outcome("b", 320, 3.0, {"before": {"loss": 8.0}, "after": {"loss": 6.0, "acc": 0.9}}, 10_000),
                NodeOutcome(node_id="c", task_id="t-c", outcome="failed", error="boom")]
    held = np.array([10.0, 10_000.0])
    expected = {
        "train_loss": float(np.average([1.0, 3.0], weights=[320, 320])),
        "val_before_loss": float(np.average([4.0, 8.0], weights=held)),
        "val_after_loss": float(np.average([2.0, 6.0], weights=held)),
        "val_after_acc": float(np.average([0.1, 0.9], weights=held)),
    }
    got = round_metrics(outcomes)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    assert got["val_after_loss"] > 5.99  # not 4.0, the num_samples-weighted mean


def test_round_metrics_fall_back_to_num_samples_for_older_nodes() -> None:
    """A reply without validation_samples weighs its val_* by num_samples, as before; mixed with a newer one."""
    old = _outcome("old", 300, 1.0, {"after": {"loss": 2.0}}, None)
    new = _outcome("new", 100, 1.0, {"after": {"loss": 6.0}}, 50)
    np.testing.assert_allclose(round_metrics([old])["val_after_loss"], 2.0)
    np.testing.assert_allclose(round_metrics([old, new])["val_after_loss"], (300 * 2.0 + 50 * 6.0) / 350, rtol=1e-12)
    np.testing.assert_allclose(round_metrics([old, new])["train_loss"], 1.0, rtol=1e-12)


def _lsq_task(args: dict) -> TrainTask:
    params = {"coef": np.zeros((3, 1), np.float32), "intercept": np.zeros((1,), np.float32)}
    return TrainTask("e", 1, PlanSource.from_class(LinearPlan), args, params)


def _lsq_data(n: int) -> ArrayDataset:
    X = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return ArrayDataset(X, X @ np.array([[1.0], [-2.0], [0.5]], np.float32))


def test_python_node_reports_its_held_out_count_with_validation() -> None:
    args = {"num_updates": 3, "lr": 0.01, "batch_size": 8, "test_ratio": 0.25, "seed": 5,
            "test_on_local_updates": True}
    result = run_training(_lsq_task(args), _lsq_data(40))
    assert set(result.validation) == {"after"} and result.validation_samples == 10
    assert TrainResult.from_payload(result.to_payload()).validation_samples == 10
    without = run_training(_lsq_task({**args, "test_on_local_updates": False}), _lsq_data(40))
    assert without.validation == {} and without.validation_samples is None
