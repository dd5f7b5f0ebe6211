"""fedserver answers a Heartbeat naming a task with where the task stands (HeartbeatResponse.task_state), over
real gRPC: ACTIVE for an open task of the caller (and the heartbeat keeps it alive past its inactivity
timeout), CLOSED once its round ended (cancelled, timed out, its result in), UNKNOWN for an id never issued,
for another node's task (open or closed: the answer does not tell a node which ids exist) and for a task the
server forgot; UNSPECIFIED when no task is named. None of these is an error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from server_testkit import async_test, encoded, running_server

from fedcore.wire import TaskKind
from fedserver.tasks import TaskState
from fedstream.v1 import node_service_pb2 as pb

ACTIVE, CLOSED, UNKNOWN = pb.TASK_STATE_ACTIVE, pb.TASK_STATE_CLOSED, pb.TASK_STATE_UNKNOWN


@async_test
async def test_an_open_task_is_active_and_its_heartbeats_keep_it_past_its_timeout(tmp_path: Path) -> None:
    """Inactivity timeout 0.6 s; heartbeats every 0.2 s for 1.5 s: still RUNNING, every answer ACTIVE. Then
    silence: TIMED_OUT, and the next heartbeat answers CLOSED."""
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1,
                                     inactivity_timeout=0.6)
        await node.poll(wait=1)
        answers = []
        for _ in range(8):
            answers.append(await node.heartbeat(handle.task_id))
            await asyncio.sleep(0.2)
        assert handle.state is TaskState.RUNNING
        assert {a.task_state for a in answers} == {ACTIVE} and not any(a.shutting_down for a in answers)
        outcome = await handle.result(timeout=5)
        assert outcome.outcome is TaskState.TIMED_OUT
        assert (await node.heartbeat(handle.task_id)).task_state == CLOSED


@async_test
async def test_a_cancelled_or_finished_task_is_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, cancelled = await kit.running_task("a")
        cancelled.cancel("round cancelled by the test")
        assert (await node.heartbeat(cancelled.task_id)).task_state == CLOSED
        finished = kit.server.dispatch("a", TaskKind.TRAIN, encoded(2), experiment_id="e", round=2)
        await node.poll(wait=1)
        await node.upload(finished.task_id, encoded({"w": 1}))
        assert (await finished.result(timeout=5)).succeeded
        assert (await node.heartbeat(finished.task_id)).task_state == CLOSED


@async_test
async def test_no_task_is_unspecified_and_an_unknown_or_foreign_task_is_unknown(tmp_path: Path) -> None:
    """Another node's task reads UNKNOWN whether it is open or closed, exactly like an id never issued, and the
    intruder's heartbeat does not keep that task alive (no touch)."""
    async with running_server(tmp_path) as kit:
        _, handle = await kit.running_task("a")
        intruder = await kit.registered_node("b")
        answer = await intruder.heartbeat()
        assert (answer.task_state, answer.shutting_down) == (pb.TASK_STATE_UNSPECIFIED, False)
        assert (await intruder.heartbeat("no-such-task")).task_state == UNKNOWN
        before = handle.last_activity
        assert (await intruder.heartbeat(handle.task_id)).task_state == UNKNOWN
        assert handle.last_activity == before and handle.state is TaskState.RUNNING
        handle.cancel()
        assert (await intruder.heartbeat(handle.task_id)).task_state == UNKNOWN


@async_test
async def test_a_task_the_server_forgot_is_unknown(tmp_path: Path) -> None:
    """The board keeps the records of closed tasks up to ``max_closed``; beyond, the oldest are forgotten and
    a heartbeat naming one answers UNKNOWN (as after a server restart)."""
    async with running_server(tmp_path) as kit:
        kit.server.board.max_closed = 1
        node, first = await kit.running_task("a")
        first.cancel()
        assert (await node.heartbeat(first.task_id)).task_state == CLOSED
        second = kit.server.dispatch("a", TaskKind.TRAIN, encoded(2), experiment_id="e", round=2)
        second.cancel()  # its record pushes out the first one's
        assert (await node.heartbeat(second.task_id)).task_state == CLOSED
        assert (await node.heartbeat(first.task_id)).task_state == UNKNOWN
