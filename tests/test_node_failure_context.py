"""What a node says when a task fails or waits: enough for the researcher and the node's operator to act.

A TRAIN or EVALUATE task's FAILED message names what ran where ("training LinearPlan on dataset 'data-0'
(round 1, step 3): IndexError: ...") and the node logs the same line at WARNING; it used to be the bare
exception ("IndexError: Target 7 is out of bounds."), naming neither plan nor dataset. A plan waiting for
review is logged at WARNING on the node (plan, digest prefix, the commands to review and approve it), once per
plan digest per process; it used to reach only the researcher. Real FedServer and NodeClients with the real
TrainingTaskHandler over loopback gRPC (tests/experiment_harness.py), logs via caplog.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from pathlib import Path

import numpy as np
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.models import weights_to_numpy
from fedcore.tasks import EvaluateTask, PlanSource, TrainTask
from fedcore.wire import TaskKind
from fednode.training import RunStage
from fedserver.tasks import TaskState

ARGS = {"num_updates": 5, "lr": 0.01, "batch_size": 8}
LSQ_SOURCE = inspect.getsource(sys.modules[LinearPlan.__module__])
# the 3rd training step raises, as torch's cross-entropy does for a label out of range
THIRD_STEP_RAISES = LSQ_SOURCE + (
    "\n    def training_step(self, data, target):\n"
    "        self.steps = getattr(self, 'steps', 0) + 1\n"
    "        if self.steps == 3:\n"
    "            raise IndexError('Target 7 is out of bounds.')\n"
    "        return super().training_step(data, target)\n")
SECOND_BATCH_RAISES = LSQ_SOURCE + (
    "\n    def testing_step(self, data, target):\n"
    "        self.batches = getattr(self, 'batches', 0) + 1\n"
    "        if self.batches == 2:\n"
    "            raise ValueError('bad metric')\n"
    "        return super().testing_step(data, target)\n")


def _params() -> dict[str, np.ndarray]:
    plan = LinearPlan()
    plan.post_init(ARGS)
    return weights_to_numpy(plan.get_model_params())


def _train(round: int, source: str, params: dict | None = None) -> dict:
    return TrainTask("e", round, PlanSource.from_source("LinearPlan", source), ARGS,
                     _params() if params is None else params, "fedavg", {}, ["lsq"]).to_payload()


def _node_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("fednode") and r.levelno == logging.WARNING]


def test_a_failed_task_names_plan_dataset_round_and_step_to_the_researcher_and_in_the_node_log(
        tmp_path: Path, caplog) -> None:
    async def scenario():
        async with federation(tmp_path, least_squares_sites(1)) as (server, _, _):
            await server.wait_for_nodes(1, timeout=10)
            tasks = [(TaskKind.TRAIN, _train(1, THIRD_STEP_RAISES)),
                     (TaskKind.EVALUATE, EvaluateTask("e", 2, PlanSource.from_source("LinearPlan", SECOND_BATCH_RAISES),
                                                      {**ARGS, "test_ratio": 0.0}, _params(), ["lsq"]).to_payload()),
                     (TaskKind.TRAIN, _train(3, LSQ_SOURCE, {"weight": np.zeros((9, 9), np.float32)}))]
            results = []
            for round, (kind, payload) in enumerate(tasks, start=1):
                handle = server.dispatch("site-0", kind, server.encode_payload(payload), experiment_id="e",
                                         round=round, inactivity_timeout=30)
                results.append(await handle.result(timeout=20))
        return results

    with caplog.at_level(logging.INFO, logger="fednode"):
        trained, evaluated, mismatched = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert trained.outcome is TaskState.FAILED
    assert trained.error_message == ("training LinearPlan on dataset 'data-0' (round 1, step 3): "
                                     "IndexError: Target 7 is out of bounds.")
    assert evaluated.outcome is TaskState.FAILED
    assert evaluated.error_message == "evaluating LinearPlan on dataset 'data-0' (round 2, batch 2): ValueError: bad metric"
    assert mismatched.outcome is TaskState.FAILED
    assert mismatched.error_message.startswith(
        "training LinearPlan on dataset 'data-0' (round 3, loading the global model): WeightsMismatchError: ")
    warnings = _node_warnings(caplog)
    for result in (trained, evaluated, mismatched):
        assert any(result.error_message in line for line in warnings), (result.error_message, warnings)


def test_run_stage_says_the_step_or_batch_running_and_the_stage_before_any() -> None:
    stage = RunStage()
    assert stage.describe() == "loading the plan"
    stage.enter("training")
    assert stage.describe() == "training, before the first step"
    asked = stage.counting(lambda: False)
    assert [asked(), asked()] == [False, False] and stage.describe() == "step 2"
    stage.enter("validating the local model")
    asked()
    assert stage.describe() == "validating the local model, batch 1"
    stage.enter("evaluating")
    stage.counting(None)()
    assert stage.describe() == "batch 1"


def test_a_plan_waiting_for_review_is_logged_for_the_operator_once_per_digest(tmp_path: Path, caplog) -> None:
    other = LSQ_SOURCE + "\n# another revision\n"

    async def scenario():
        async with federation(tmp_path, least_squares_sites(1), auto_approve=False) as (server, _, _):
            await server.wait_for_nodes(1, timeout=10)
            results = []
            for round, source in ((1, LSQ_SOURCE), (2, LSQ_SOURCE), (3, other), (4, LSQ_SOURCE)):
                handle = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(_train(round, source)),
                                         experiment_id="e", round=round, inactivity_timeout=30)
                results.append(await handle.result(timeout=20))
        return results

    with caplog.at_level(logging.INFO, logger="fednode"):
        results = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [r.outcome for r in results] == [TaskState.REFUSED] * 4
    waiting = [line for line in _node_warnings(caplog) if "is not approved on this node" in line]
    first, second = (PlanSource.from_source("LinearPlan", s).sha256[:12] for s in (LSQ_SOURCE, other))
    assert len(waiting) == 2, waiting  # one per digest, not one per task
    for line, short in zip(waiting, (first, second)):
        assert f"training plan 'LinearPlan' (sha256 {short})" in line and "waiting for the node operator's review" in line
        assert f"`fednode plans show {short}`" in line and f"`fednode plans approve {short}`" in line
    assert results[0].error_message in waiting[0]  # the same text as the researcher's
