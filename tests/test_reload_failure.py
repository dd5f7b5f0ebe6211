"""A low-memory round whose checkpoint no longer holds x: the task that needed the reload fails at once.

Over real gRPC: the node asking for a payload that can only be rebuilt from a bad checkpoint gets its
task closed (FAILED, with the reload's message) instead of an error status that leaves the task open, so
the node's retries (each a multi-second reload at scale) cannot keep it alive and hang the round. The
round model remembers the failed reload: later requests fail at once with the same message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from low_memory_support import ARGS, CHUNK, DATASET, fresh_x
from plans_lsq import LinearPlan
from server_testkit import async_test, running_server

from fedcore.errors import CheckpointError
from fedcore.serialization import Serializer
from fedcore.tasks import PlanSource, TrainResult, TrainTask
from fedcore.wire import TaskKind
from fedserver.experiment import Experiment
from fedserver.round_model import RoundModel
from fedserver.tasks import TaskState


def round_model(reload) -> RoundModel:
    task = TrainTask("e", 1, PlanSource.from_class(LinearPlan), {"num_updates": 1}, fresh_x())
    return RoundModel(task, CHUNK, reload=reload)


def test_a_resumed_download_from_a_replaced_checkpoint_fails_its_task_and_the_round_goes_on(tmp_path: Path) -> None:
    """Both nodes download (x released); x's checkpoint is then replaced; wire-0 resumes its download."""

    async def main():
        async with running_server(tmp_path, chunk_size=CHUNK) as kit:
            nodes = [kit.node(f"wire-{i}") for i in range(2)]
            for i, node in enumerate(nodes):
                await node.register(f"wire-{i}", datasets=(DATASET,))
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=1, round_timeout=30,
                             server=kit.server, progress=False, low_memory=True, checkpoint_dir=tmp_path / "ckpt")
            exp.params = fresh_x()
            running = asyncio.create_task(exp.run_async())
            first = [await node.poll(wait=10) for node in nodes]
            await eventually(lambda: len(kit.server.board.open_tasks()) == 2
                             and all(h.state is TaskState.RUNNING for h in kit.server.board.open_tasks()), 10,
                             "both tasks delivered (RUNNING)")
            checkpoint = exp.checkpoints.load(0)  # x, saved before the round to be reloadable
            exp.checkpoints.save(0, fresh_x(shift=1.0), checkpoint.aggregator_name, checkpoint.aggregator_config,
                                 checkpoint.aggregator_state, checkpoint.experiment_state)
            task_id = first[0].descriptor.task_id
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await nodes[0].poll(wait=1, resume_task_id=task_id, resume_offset=2 * CHUNK)
            lost = kit.server.board.closed_record(task_id)
            params = first[1].assemble()["params"]
            reply = TrainResult(params={k: v + 1 for k, v in params.items()}, num_samples=10, num_steps=1, lr=0.01)
            await nodes[1].upload(first[1].descriptor.task_id, Serializer.dumps(reply.to_payload()))
            await asyncio.wait_for(running, 10)  # without the failed task the round waits for round_timeout
            return refused.value, lost, exp

    refused, lost, exp = asyncio.run(asyncio.wait_for(main(), 60))
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION, refused
    assert "cannot rebuild the task payload of node wire-0" in refused.details()
    assert lost is not None and lost.state is TaskState.FAILED
    outcomes = {o.node_id: o for o in exp.reports[0].outcomes}
    assert outcomes["wire-1"].outcome == "succeeded" and outcomes["wire-0"].outcome == "failed"
    assert "not the one this round started from" in outcomes["wire-0"].error
    assert exp.completed_round == 1


@async_test
async def test_a_queued_task_whose_payload_cannot_be_rebuilt_fails_and_the_poll_gets_no_task(tmp_path: Path) -> None:
    async with running_server(tmp_path, chunk_size=CHUNK) as kit:
        node = await kit.registered_node("n")
        model = round_model(reload=lambda: fresh_x(shift=1.0))  # not x: the reload is refused
        handle = kit.server.dispatch("n", TaskKind.TRAIN, model.payload({"aggregator_state": {}}), experiment_id="e",
                                     round=1, inactivity_timeout=60)
        model.release()
        polled = await node.poll(wait=1)
        result = await handle.result(timeout=5)
        assert polled.no_task and polled.descriptor is None  # the node never saw the task
        assert result.outcome is TaskState.FAILED and "not the one this round started from" in result.error_message
        again = await node.poll(wait=0.2)  # nothing left for it: the failed task is not handed out again
        assert again.no_task


def test_a_failed_reload_is_remembered_even_if_the_checkpoint_comes_back() -> None:
    answers = [fresh_x(shift=1.0), fresh_x()]  # replaced, then put back: the round does not trust it again
    model = round_model(reload=lambda: answers.pop(0))
    payload = model.payload({"aggregator_state": {}})
    model.release()
    with pytest.raises(CheckpointError, match="not the one this round started from") as first:
        model.params()

    async def later_requests() -> None:
        with pytest.raises(CheckpointError) as again:
            await model.params_async()
        assert str(again.value) == str(first.value)
        with pytest.raises(CheckpointError, match="not the one this round started from"):
            await payload.open_chunks()

    asyncio.run(later_requests())
