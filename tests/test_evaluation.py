"""Federated evaluation (EVALUATE tasks): ``Experiment.evaluate_async`` over real gRPC with real node clients.

The nodes evaluate the global model on the split ``test_ratio`` and ``seed`` hold out (every sample when
``test_ratio`` is 0); the test recomputes each node's mean squared error in numpy from the data, the split's
formula (fedcore.plans.data.ArrayDataset.split) and the parameters, and the report's sample-weighted mean.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.errors import ExperimentError, MessageError, PlanError, RoundFailedError, TaskPayloadError
from fedcore.plans import ArrayDataset
from fedcore.plans.split import split_keys
from fedcore.tasks import EvaluateResult, EvaluateTask, PlanSource
from fedcore.training_args import TrainingArgs
from fedcore.wire import TaskKind
from fednode.evaluation import run_evaluation
from fedserver.evaluation import weighted_metrics
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore

ARGS = {"num_updates": 10, "lr": 0.02, "batch_size": 16, "seed": 7, "test_ratio": 0.25}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def mse(X: np.ndarray, y: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """L = 1/(n k) Σ (X W + b − Y)² in float64."""
    z = X.astype(np.float64) @ params["coef"].astype(np.float64) + params["intercept"].astype(np.float64)
    return float(np.mean((z - y.astype(np.float64)) ** 2))


def held_out(n: int, ratio: float, seed: int) -> np.ndarray:
    """The indices ArrayDataset.split holds out: the floor(n·ratio) of smallest SplitMix64 keys, sorted."""
    return np.sort(np.argsort(split_keys(n, seed))[:math.floor(n * ratio)])


async def _train_then_evaluate(tmp: Path, sites, args, *, rounds: int = 2, **kwargs):
    async with federation(tmp, sites, **kwargs) as (server, _nodes, _):
        await server.wait_for_nodes(len(sites), 30)
        exp = Experiment(LinearPlan, args, rounds=rounds, dataset_tags=["lsq"], min_nodes=len(sites),
                         server=server, progress=False)
        await exp.run_async()
        return await exp.evaluate_async(), exp


def test_the_trained_model_is_evaluated_on_each_held_out_split(tmp_path: Path) -> None:
    sites = least_squares_sites()
    report, exp = run(_train_then_evaluate(tmp_path, sites, ARGS))
    assert report.round == 2 and sorted(report.succeeded) == ["site-0", "site-1", "site-2"]
    expected = {}
    for i, (X, y) in enumerate(sites):
        rows = held_out(len(X), ARGS["test_ratio"], ARGS["seed"])
        expected[f"site-{i}"] = (len(rows), mse(X[rows], y[rows], exp.params))
    for outcome in report.outcomes:
        n, loss = expected[outcome.node_id]
        assert outcome.result is not None and outcome.result.split == "validation"
        assert outcome.result.num_samples == n == 20
        assert outcome.result.metrics["loss"] == pytest.approx(loss, rel=1e-5)
    total = sum(n for n, _ in expected.values())
    assert report.num_samples == total
    assert report.metrics["loss"] == pytest.approx(sum(n * loss for n, loss in expected.values()) / total, rel=1e-5)


def test_without_a_held_out_split_every_sample_is_evaluated(tmp_path: Path) -> None:
    sites = least_squares_sites()
    args = {**ARGS, "test_ratio": 0.0}
    report, exp = run(_train_then_evaluate(tmp_path, sites, args, rounds=1))
    for outcome in report.outcomes:
        X, y = sites[int(outcome.node_id.split("-")[1])]
        assert outcome.result.split == "all" and outcome.result.num_samples == len(X)
        assert outcome.result.metrics["loss"] == pytest.approx(mse(X, y, exp.params), rel=1e-5)


def test_a_plan_rejected_after_training_is_refused_and_the_evaluation_fails_naming_the_nodes(tmp_path: Path) -> None:
    sites = least_squares_sites()
    sha = PlanSource.from_class(LinearPlan).sha256

    async def main():
        async with federation(tmp_path, sites) as (server, nodes, _):
            await server.wait_for_nodes(3, 30)
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, server=server,
                             progress=False)
            with pytest.raises(ExperimentError, match="no round has completed yet"):
                await exp.evaluate_async()
            await exp.run_async()
            for node in nodes[:2]:
                node.approvals.reject(sha, note="withdrawn")
            with pytest.raises(RoundFailedError) as info:
                await exp.evaluate_async()
            return str(info.value)

    message = run(main())
    assert message.startswith("evaluation of round 1 failed: 1 of 3 selected nodes replied, quorum is 2")
    assert "site-0 (refused: " in message and "site-1 (refused: " in message


def test_a_task_round_below_1_is_refused_at_dispatch(tmp_path: Path) -> None:
    """Not at the node's poll (which answered INVALID_ARGUMENT for the server's own header)."""

    async def main():
        async with federation(tmp_path, least_squares_sites(1)) as (server, _nodes, _):
            await server.wait_for_nodes(1, 30)
            payload = server.encode_payload({"x": 1})
            with pytest.raises(MessageError, match="round of task .* must be an int >= 1, got 0"):
                server.dispatch("site-0", TaskKind.EVALUATE, payload, experiment_id="e", round=0)
            assert server.board.open_tasks("site-0") == []

    run(main())


def test_run_evaluation_refuses_non_finite_metrics(tmp_path: Path) -> None:
    X, y = least_squares_sites()[0]
    plan = PlanSource.from_class(LinearPlan)
    task = EvaluateTask("e", 1, plan, TrainingArgs.from_dict(ARGS).to_dict(),
                        {"coef": np.full((3, 1), np.inf, np.float32), "intercept": np.zeros(1, np.float32)})
    with pytest.raises(PlanError, match="non-finite metrics"):
        run_evaluation(task, ArrayDataset(X, y))


def test_payloads_round_trip_and_bad_ones_name_the_field() -> None:
    plan = PlanSource.from_class(LinearPlan)
    task = EvaluateTask("e", 3, plan, {"batch_size": 4}, {"w": np.arange(3.0)}, ["a"], {"k": 1})
    back = EvaluateTask.from_payload(task.to_payload())
    assert back.round == 3 and back.dataset_tags == ["a"] and back.model_args == {"k": 1}
    assert np.array_equal(back.params["w"], np.arange(3.0))
    result = EvaluateResult(20, {"loss": 0.5}, "validation", 0.1)
    assert EvaluateResult.from_payload(result.to_payload()) == result
    with pytest.raises(TaskPayloadError, match="result.split 'test' is not one of"):
        EvaluateResult.from_payload({**result.to_payload(), "split": "test"})
    with pytest.raises(TaskPayloadError, match=r"metrics\['loss'\] is nan"):
        EvaluateResult.from_payload({**result.to_payload(), "metrics": {"loss": float("nan")}})
    with pytest.raises(TaskPayloadError, match="result.num_samples must be an integer"):
        EvaluateResult.from_payload({**result.to_payload(), "num_samples": -1})


def test_weighted_metrics_weigh_by_samples_and_skip_missing_metrics() -> None:
    results = [EvaluateResult(10, {"loss": 1.0, "accuracy": 0.5}), EvaluateResult(30, {"loss": 3.0})]
    assert weighted_metrics(results) == {"accuracy": 0.5, "loss": 2.5}


def test_a_resumed_finished_run_evaluates_its_checkpointed_model(tmp_path: Path) -> None:
    """``Experiment.resume(dir)`` of a finished run (``fedserver run --resume ... --evaluate``): the model of
    the latest checkpoint is evaluated, as the run that wrote it would have."""
    sites = least_squares_sites()

    async def main():
        async with federation(tmp_path, sites) as (server, _nodes, _):
            await server.wait_for_nodes(3, 30)
            exp = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=3, server=server,
                             progress=False, checkpoint_dir=tmp_path / "ckpt")
            await exp.run_async()
            first = await exp.evaluate_async()
            resumed = Experiment.resume(tmp_path / "ckpt", server=server, progress=False)
            assert await resumed.run_async() == []  # nothing left to train
            return first, await resumed.evaluate_async()

    first, again = run(main())
    assert again.round == first.round == 2
    assert again.metrics == first.metrics
    assert [o.result.metrics for o in again.outcomes] == [o.result.metrics for o in first.outcomes]


def test_each_node_outcome_is_stored_in_the_history(tmp_path: Path) -> None:
    sites = least_squares_sites()
    sha = PlanSource.from_class(LinearPlan).sha256

    async def main():
        async with federation(tmp_path, sites) as (server, nodes, _):
            await server.wait_for_nodes(3, 30)
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, server=server,
                             progress=False, history_db=tmp_path / "history.db")
            await exp.run_async()
            nodes[2].approvals.reject(sha)
            return await exp.evaluate_async(), exp

    report, exp = run(main())
    with HistoryStore(tmp_path / "history.db") as history:
        rows = {r.node_id: r for r in history.evaluations(exp.history_id, round=1)}
    assert sorted(rows) == ["site-0", "site-1", "site-2"]
    assert rows["site-2"].outcome == "refused" and rows["site-2"].num_samples is None
    for outcome in report.outcomes[:2]:
        row = rows[outcome.node_id]
        assert row.outcome == "succeeded" and row.task_id == outcome.task_id
        assert row.num_samples == outcome.result.num_samples == 20 and row.split == "validation"
        assert row.metrics == outcome.result.metrics
