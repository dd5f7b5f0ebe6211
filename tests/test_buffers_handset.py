"""Params set by hand without buffers (e.g. a model exported before buffers travelled) on an Experiment that
already knows its buffer names (resumed, or run once): the run completes them with the plan's initial buffers,
as a fresh Experiment does. Before, the round failed inside the aggregator ("buffers [...] are not among the
global params"). Real FedServer and nodes (experiment_harness), a BatchNorm plan."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from experiment_harness import federation
from plans_batchnorm import BatchNormPlan

from fedcore.aggregators import FedAverage
from fedserver.experiment import Experiment

ARGS = {"epochs": 1, "lr": 0.01, "batch_size": 16, "seed": 5, "shuffle": False}
BUFFERS = ["0.num_batches_tracked", "0.running_mean", "0.running_var"]


def _sites() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.normal(50, 1, size=(n, 3)), rng.normal(size=(n, 1))) for n in (40, 72)]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def _one_round_without_buffers(tmp_path: Path) -> dict[str, np.ndarray]:
    """One round checkpointed in tmp_path/ck; its model without the buffers (an export from before them)."""
    async def first():
        async with federation(tmp_path / "a", _sites(), tags=("bn",)) as (server, _, _):
            exp = Experiment(BatchNormPlan, ARGS, aggregator=FedAverage(), rounds=1, dataset_tags=["bn"],
                             min_nodes=2, server=server, progress=False, checkpoint_dir=tmp_path / "ck")
            await exp.run_async()
            return {k: v for k, v in exp.params.items() if k not in BUFFERS}

    (tmp_path / "a").mkdir()
    return _run(first())


@pytest.mark.parametrize("what", ["fresh", "resumed"])
def test_handset_params_without_buffers_are_completed(tmp_path: Path, what: str) -> None:
    hand = _one_round_without_buffers(tmp_path)

    async def second():
        async with federation(tmp_path / "a", _sites(), tags=("bn",)) as (server, _, _):
            if what == "fresh":
                exp = Experiment(BatchNormPlan, ARGS, aggregator=FedAverage(), rounds=1, dataset_tags=["bn"],
                                 min_nodes=2, server=server, progress=False)
            else:
                exp = Experiment.resume(tmp_path / "ck", server=server, rounds=2, progress=False)
                assert exp.buffer_names is not None
            exp.params = dict(hand)
            reports = await exp.run_async()
            return exp, reports

    exp, reports = _run(second())
    assert reports[-1].succeeded == ["site-0", "site-1"]
    assert sorted(k for k in exp.params if k in BUFFERS) == BUFFERS


def test_evaluating_handset_params_without_buffers_sends_a_complete_model(tmp_path: Path) -> None:
    """evaluate() of a resumed run whose params were set by hand without buffers: nodes load the model strictly,
    so each failed with a missing-entries error before."""
    hand = _one_round_without_buffers(tmp_path)

    async def second():
        async with federation(tmp_path / "a", _sites(), tags=("bn",)) as (server, _, _):
            exp = Experiment.resume(tmp_path / "ck", server=server, progress=False)
            exp.params = dict(hand)
            return await exp.evaluate_async()

    report = _run(second())
    assert [o.result is not None for o in report.outcomes] == [True, True], report.outcomes
