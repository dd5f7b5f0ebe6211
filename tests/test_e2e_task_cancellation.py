"""End to end with a real ``python -m fednode start`` process: the server closes a task mid-training and the
node stops at its next batch, uploads nothing and takes its next task.

The node trains tests/plans_slow.py (0.2 s per step, 200 steps: 40 s); the server (heartbeat interval 0.5 s)
cancels the task once the node reported 10 steps. The node learns it from its next heartbeat (task_state
CLOSED) or Report (refused TASK_CLOSED), so the next task reaches it within about one heartbeat interval, one
report interval and one batch of the close, not when the 40 s of training would have ended.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from e2e_support import Federation, eventually, least_squares_sites
from plans_slow import STEP_SECONDS, SlowLinearPlan

from fedcore.models import weights_to_numpy
from fedcore.tasks import PlanSource, TrainTask
from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

ARGS = {"num_updates": 200, "lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}
TEST_TIMEOUT = 60.0


def _task(round: int, num_updates: int) -> dict:
    plan = SlowLinearPlan()
    plan.post_init(ARGS)
    params = weights_to_numpy(plan.get_model_params())
    args = {**ARGS, "num_updates": num_updates}
    return TrainTask("e", round, PlanSource.from_class(SlowLinearPlan), args, params, "fedavg", {}, ["lsq"]).to_payload()


def test_a_task_closed_mid_training_stops_at_the_next_batch_and_the_node_takes_the_next_task(tmp_path: Path) -> None:
    async def scenario():
        async with Federation(tmp_path, least_squares_sites(1), heartbeat_interval=0.5) as fed:
            fed.prepare([0])
            node = fed.start_node(0)
            await fed.wait_registered(["site-0"])
            server = fed.server
            first = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(_task(1, 200)),
                                    experiment_id="e", round=1, inactivity_timeout=30)

            def trained_a_while() -> bool:
                progress = first.latest_progress
                return progress is not None and progress.iteration >= 10

            await eventually(trained_a_while, 20, "10 steps of training reported", fed.logs)
            closed_at = time.monotonic()
            first.cancel("experiment cancelled by the test")
            second = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(_task(2, 3)),
                                     experiment_id="e", round=2, inactivity_timeout=30)
            await fed.wait_task("site-0", TaskState.RUNNING, timeout=20, round=2)
            took = time.monotonic() - closed_at
            result = await second.result(timeout=20)
            record = server.board.closed_record(first.task_id)
            return took, result, record.late_uploads, first.task_id, node.log()

    took, result, late_uploads, first_id, log = asyncio.run(asyncio.wait_for(scenario(), TEST_TIMEOUT))
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    # the heartbeat (0.5 s, sent from a pump that wakes every 0.5 s) or a report, one batch, a poll; + slack
    assert took < 1.0 + STEP_SECONDS + 2.0, (took, log[-3000:])
    stopped = re.search(rf"task {first_id}: training stopped after (\d+) of 200 steps", log)
    assert stopped and 10 <= int(stopped.group(1)) < 200, log[-3000:]
    assert f"task {first_id} is over on the server (" in log and "nothing uploaded" in log, log[-3000:]
    assert late_uploads == 0  # the node never tried to upload the closed task's result
