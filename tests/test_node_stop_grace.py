"""Stopping a node with a task running: the task has the stop grace to finish and upload, then it is told to
stop and ends FAILED naming why, and the node exits (docs/guide.md §3.5).

In-process (a NodeClient against tests/fake_node_service.py): the handler does not see ``stop_requested``
during the grace, only after it, with the reason. End to end (``python -m fednode start`` and a real
FedServer): SIGINT 1 s into a 40 s task of tests/plans_slow.py with ``--stop-grace 2`` ends the process
within the grace, a batch and some slack, and the researcher gets the FAILED task naming plan, dataset, round,
step and the grace; a task that ends within the grace is uploaded SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
from e2e_support import Federation, eventually, least_squares_sites
from fake_node_service import FakeNodeService, FakeTask, arun, node_config, start_server
from plans_slow import STEP_SECONDS, SlowLinearPlan

from fedcore.framing import OutgoingPayload
from fedcore.models import weights_to_numpy
from fedcore.serialization import Serializer
from fedcore.tasks import PlanSource, TrainTask
from fedcore.wire import TaskKind
from fednode.client import ClientState, NodeClient
from fednode.handler import TaskReply
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2

ARGS = {"lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}


def test_the_handler_sees_stop_requested_only_once_the_grace_is_over_then_its_reply_is_delivered():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        seen: dict[str, float | str] = {}

        class Long:
            def handle(self, task, reporter):
                deadline = time.monotonic() + 20
                while not reporter.stop_requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen["at"], seen["reason"] = time.monotonic(), reporter.stop_reason
                return TaskReply.failed(f"stopped: {reporter.stop_reason}")

        client = NodeClient(node_config(port, stop_grace_seconds=1.5), Long())
        task = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", OutgoingPayload.from_object({"w": np.zeros(3)}, 4096)))
            await service.wait_for(lambda: client.state is ClientState.RUNNING)
            stopped_at = time.monotonic()
            client.stop()
            await asyncio.wait_for(task, 10.0)
        finally:
            await server.stop(None)
        return seen, seen["at"] - stopped_at, service.results["t1"]

    seen, after, stored = arun(scenario())
    assert 1.4 <= after < 3.0, after  # not at stop(): at the end of the 1.5 s grace
    assert "did not finish within its stop grace of 1.5 s" in seen["reason"], seen
    assert stored.complete and stored.header.outcome == common_pb2.TASK_OUTCOME_FAILED, stored.header
    assert "stop grace of 1.5 s" in stored.header.error_message, stored.header


def test_a_task_that_ends_within_the_grace_is_uploaded_as_it_is():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)

        class Short:
            def handle(self, task, reporter):
                time.sleep(0.8)
                return TaskReply.succeeded({"stopped": reporter.stop_requested})

        client = NodeClient(node_config(port, stop_grace_seconds=5.0), Short())
        task = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", OutgoingPayload.from_object({"w": np.zeros(3)}, 4096)))
            await service.wait_for(lambda: client.state is ClientState.RUNNING)
            client.stop()
            await asyncio.wait_for(task, 10.0)
        finally:
            await server.stop(None)
        return service.results["t1"]

    stored = arun(scenario())
    assert stored.complete
    assert Serializer.loads(bytes(stored.data)) == {"stopped": False}


def _task(round: int, num_updates: int) -> dict:
    plan = SlowLinearPlan()
    plan.post_init({**ARGS, "num_updates": num_updates})
    params = weights_to_numpy(plan.get_model_params())
    return TrainTask("e", round, PlanSource.from_class(SlowLinearPlan), {**ARGS, "num_updates": num_updates},
                     params, "fedavg", {}, ["lsq"]).to_payload()


async def _sigint_while_training(tmp_path: Path, num_updates: int, grace: float, after_steps: int):
    """Dispatch a slow task to a real node process, SIGINT it once ``after_steps`` are reported; the task's
    result, how long the process took to exit after the signal, its exit status and its log."""
    async with Federation(tmp_path, least_squares_sites(1), heartbeat_interval=0.5) as fed:
        fed.prepare([0])
        node = fed.start_node(0, extra=["--stop-grace", f"{grace:g}"])
        await fed.wait_registered(["site-0"])
        server = fed.server
        handle = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(_task(1, num_updates)),
                                 experiment_id="e", round=1, inactivity_timeout=60)

        def trained_a_while() -> bool:
            progress = handle.latest_progress
            return progress is not None and progress.iteration >= after_steps

        await eventually(trained_a_while, 30, f"{after_steps} steps of training reported", fed.logs)
        signalled = time.monotonic()
        node.popen.send_signal(signal.SIGINT)
        await eventually(lambda: node.popen.poll() is not None, grace + 10, "the node process to exit", fed.logs)
        took = time.monotonic() - signalled
        result = await handle.result(timeout=10)
        return result, took, node.popen.returncode, node.log()


def test_sigint_during_a_long_task_stops_it_after_the_grace_and_the_researcher_gets_why(tmp_path: Path) -> None:
    result, took, status, log = asyncio.run(asyncio.wait_for(
        _sigint_while_training(tmp_path, num_updates=200, grace=2, after_steps=3), 90))
    assert "SIGINT received: finishing the current task for up to 2 s; Ctrl-C again to stop now" in log, log[-3000:]
    assert status == 0, log[-3000:]
    assert 2.0 <= took < 2.0 + STEP_SECONDS + 4.0, (took, log[-3000:])  # not the 40 s the task would take
    assert result.outcome is TaskState.FAILED, result
    message = result.error_message
    assert message.startswith("training SlowLinearPlan on dataset 'data-0' (round 1, step "), message
    assert "stopped, the node was asked to stop and the task did not finish within its stop grace of 2 s" in message
    assert "training stopped after" in message and "of 200 steps" in message, message
    assert "did not finish within the stop grace of 2 s: telling it to stop" in log, log[-3000:]


def test_sigint_during_a_task_that_ends_within_the_grace_uploads_its_result(tmp_path: Path) -> None:
    result, took, status, log = asyncio.run(asyncio.wait_for(
        _sigint_while_training(tmp_path, num_updates=25, grace=10, after_steps=2), 90))
    assert "SIGINT received: finishing the current task for up to 10 s; Ctrl-C again to stop now" in log, log[-3000:]
    assert status == 0, log[-3000:]
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    assert took < 25 * STEP_SECONDS + 3.0, (took, log[-3000:])  # the task's rest, not the grace
