"""fednode stops an EVALUATE task the server closed at its next batch, as it stops training (session 7).

The server closes an evaluation's straggler after ``wait_after_quorum``, at its inactivity timeout, or when the
evaluation is aborted; the node learns it from its next heartbeat (task_state CLOSED) and its result would be
refused. Before, ``run_evaluation`` ignored ``reporter.cancelled``: the node evaluated every batch to the end
(here 20 s) before it polled again, so its next task waited that long. Now ``TrainingPlan.evaluate(dataset,
should_stop)`` asks before each batch.

Real FedServer (heartbeat interval 1 s), real NodeClient with the real TrainingTaskHandler (experiment_harness);
the plan's testing_step takes 0.1 s per one-sample batch, 200 batches.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.errors import TrainingStoppedError
from fedcore.models import weights_to_numpy
from fedcore.plans import ArrayDataset
from fedcore.tasks import EvaluateTask, PlanSource
from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

BATCH_SECONDS = 0.1
SAMPLES = 200
ARGS = {"num_updates": 2, "lr": 0.01, "batch_size": 1}
SLOW_SOURCE = inspect.getsource(sys.modules[LinearPlan.__module__]) + (
    "\n    def testing_step(self, data, target):\n"
    "        import time\n"
    f"        time.sleep({BATCH_SECONDS})\n"
    "        return super().testing_step(data, target)\n")


def _evaluate(round: int, args: dict) -> dict:
    plan = LinearPlan()
    plan.post_init(args)
    return EvaluateTask("e", round, PlanSource.from_source("LinearPlan", SLOW_SOURCE), args,
                        weights_to_numpy(plan.get_model_params()), ["lsq"]).to_payload()


def test_a_closed_evaluation_stops_at_the_next_batch_and_the_node_takes_the_next_task(tmp_path: Path,
                                                                                      caplog) -> None:
    async def scenario():
        async with federation(tmp_path, least_squares_sites(1, n=SAMPLES)) as (server, _, _):
            await server.wait_for_nodes(1, timeout=10)
            first = server.dispatch("site-0", TaskKind.EVALUATE, server.encode_payload(_evaluate(1, ARGS)),
                                    experiment_id="e", round=1, inactivity_timeout=60)
            deadline = time.monotonic() + 20
            while first.state is not TaskState.RUNNING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # about 15 batches evaluated
            closed_at = time.monotonic()
            first.cancel("evaluation closed by the test")
            quick = {**ARGS, "batch_size": SAMPLES}  # one batch: 0.1 s
            second = server.dispatch("site-0", TaskKind.EVALUATE, server.encode_payload(_evaluate(2, quick)),
                                     experiment_id="e", round=2, inactivity_timeout=60)
            result = await second.result(timeout=40)
            return time.monotonic() - closed_at, result, server.board.closed_record(first.task_id).late_uploads

    with caplog.at_level(logging.INFO, logger="fednode"):
        took, result, late_uploads = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    # a heartbeat (1 s, from a pump waking every 1 s: up to 2 s), one batch, a poll, the second task's batch; + slack
    assert took < 2.0 + 2 * BATCH_SECONDS + 2.0, took  # evaluating to the end took 18 s more
    messages = "\n".join(r.getMessage() for r in caplog.records)
    stopped = re.search(rf"evaluation stopped after (\d+) batches \((\d+) of {SAMPLES} samples\)", messages)
    assert stopped, messages[-3000:]
    assert 5 <= int(stopped.group(1)) < SAMPLES and stopped.group(1) == stopped.group(2)  # one sample a batch
    assert "is over on the server (" in messages and "nothing uploaded" in messages
    assert late_uploads == 0


def test_evaluate_asks_should_stop_before_each_batch() -> None:
    plan = LinearPlan()
    plan.post_init({**ARGS, "batch_size": 3})
    data = ArrayDataset(np.ones((10, 3), np.float32), np.ones((10, 1), np.float32))
    asked = []

    def stop_at_third() -> bool:
        asked.append(len(asked))
        return len(asked) == 3

    with pytest.raises(TrainingStoppedError, match=r"evaluation stopped after 2 batches \(6 of 10 samples\)"):
        plan.evaluate(data, should_stop=stop_at_third)
    assert plan.evaluate(data, should_stop=lambda: False) == plan.evaluate(data)  # never True: same metrics


def test_a_closed_training_task_stops_during_its_validation_too(tmp_path: Path, caplog) -> None:
    """A TRAIN task validating the global model (test_on_global_updates, test_ratio 0.5: 100 slow batches)
    stops at the next validation batch once the server closed it, not after the whole validation."""
    from fedcore.tasks import TrainTask

    args = {**ARGS, "test_ratio": 0.5, "seed": 1, "test_on_global_updates": True}
    plan = LinearPlan()
    plan.post_init(args)
    task = TrainTask("e", 1, PlanSource.from_source("LinearPlan", SLOW_SOURCE), args,
                     weights_to_numpy(plan.get_model_params()), dataset_tags=["lsq"])

    async def scenario():
        async with federation(tmp_path, least_squares_sites(1, n=SAMPLES)) as (server, _, _):
            await server.wait_for_nodes(1, timeout=10)
            first = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(task.to_payload()),
                                    experiment_id="e", round=1, inactivity_timeout=60)
            deadline = time.monotonic() + 20
            while first.state is not TaskState.RUNNING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # about 15 validation batches
            closed_at = time.monotonic()
            first.cancel("round closed by the test")
            second = server.dispatch("site-0", TaskKind.EVALUATE,
                                     server.encode_payload(_evaluate(2, {**ARGS, "batch_size": SAMPLES})),
                                     experiment_id="e", round=2, inactivity_timeout=60)
            result = await second.result(timeout=40)
            return time.monotonic() - closed_at, result

    with caplog.at_level(logging.INFO, logger="fednode"):
        took, result = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    assert took < 2.0 + 2 * BATCH_SECONDS + 2.0, took  # the whole validation: 10 s more
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(r"evaluation stopped after \d+ batches", messages), messages[-3000:]
