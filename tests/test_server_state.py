"""fedserver's in-memory state without the network: config, registry liveness, task handles and board."""

from __future__ import annotations

import asyncio
import time

import pytest
from server_testkit import async_test

from fedcore.errors import PermissionDeniedError, ServerConfigError, TaskClosedError, UnknownTaskError
from fedcore.framing import OutgoingPayload
from fedcore.wire import NodeRegistration, ReportEvent, TaskKind, TaskOutcome, TrainingProgress
from fedserver.config import MESSAGE_OVERHEAD, ServerConfig
from fedserver.registry import NodeRegistry
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskHandle, TaskState


def test_grpc_message_limits_sit_just_above_the_largest_chunk() -> None:
    options = dict(ServerConfig(tls="insecure", max_chunk_size=8 << 20).grpc_options())
    assert options["grpc.max_receive_message_length"] == (8 << 20) + MESSAGE_OVERHEAD
    assert options["grpc.max_send_message_length"] == (8 << 20) + MESSAGE_OVERHEAD
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"chunk_size": 2 << 20, "max_chunk_size": 1 << 20}, "chunk_size 2097152 must not exceed max_chunk_size"),
    ({"port": 70000}, "port must be an int in 0..65535"),
    ({"max_payload_size": 0}, "max_payload_size must be an int > 0, got 0"),
    ({"max_poll_wait_seconds": float("inf")}, "max_poll_wait_seconds must be a finite number"),
    ({"max_chunk_size": 3 << 30}, "must be below 2 GiB"),
])
def test_config_rejects_bad_values_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ServerConfigError, match=message):
        ServerConfig(tls="insecure", **kwargs)


@async_test
async def test_node_is_connected_while_seen_recently() -> None:
    registry = NodeRegistry(liveness_timeout=0.1)
    registry.register("a", NodeRegistration("A"))
    assert registry.connected() == ["a"]
    await asyncio.sleep(0.15)
    assert registry.connected() == []
    registry.poll_opened("a")  # an open poll keeps it connected however long it waits
    await asyncio.sleep(0.15)
    assert registry.connected() == ["a"]
    registry.poll_closed("a")
    registry.touch("a")
    assert registry.connected() == ["a"]


def _handle(board: TaskBoard, node: str = "a", timeout: float | None = None) -> TaskHandle:
    handle = TaskHandle(task_id=f"t-{node}-{len(board.open_tasks())}", node_id=node, experiment_id="e", round=1,
                        kind=TaskKind.TRAIN, payload=OutgoingPayload.from_bytes(b"abc"),
                        inactivity_timeout=timeout, on_close=board.closed)
    board.add(handle)
    return handle


@async_test
async def test_activity_postpones_the_inactivity_timeout() -> None:
    board = TaskBoard()
    handle = _handle(board, timeout=0.2)
    start = time.monotonic()
    for _ in range(5):
        await asyncio.sleep(0.1)
        handle.report(ReportEvent(0.0, TrainingProgress()))
    assert not handle.done()
    result = await handle.result(timeout=2)
    elapsed = time.monotonic() - start
    assert result.outcome is TaskState.TIMED_OUT
    assert 0.65 < elapsed < 1.5  # 5 × 0.1 s of activity, then 0.2 s of silence


@async_test
async def test_result_wait_can_time_out_without_ending_the_task() -> None:
    handle = _handle(TaskBoard())
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.05)
    assert not handle.done()
    assert handle.cancel("because")
    assert not handle.cancel("twice")
    assert (await handle.result()).error_message == "because"


@async_test
async def test_board_lookup_rules_and_forgetting_old_tasks() -> None:
    board = TaskBoard(max_closed=2)
    handles = [_handle(board) for _ in range(3)]
    assert board.lookup(handles[0].task_id, "a") is handles[0]
    with pytest.raises(PermissionDeniedError, match="was not sent to node b"):
        board.lookup(handles[0].task_id, "b")
    for h in handles:
        h.cancel()
    with pytest.raises(TaskClosedError, match=r"no longer accepted \(round finished\)"):
        board.lookup(handles[2].task_id, "a", late_outcome=TaskOutcome.FAILED)
    assert [late.outcome for late in handles[2].late_uploads] == [TaskOutcome.FAILED]
    with pytest.raises(UnknownTaskError):  # the oldest closed record was forgotten
        board.lookup(handles[0].task_id, "a")


@async_test
async def test_listener_failure_does_not_break_the_task(caplog: pytest.LogCaptureFixture) -> None:
    handle = _handle(TaskBoard())
    seen = []

    def broken(h: TaskHandle, event: object) -> None:
        raise RuntimeError("progress bar exploded")

    handle.subscribe(broken)
    handle.subscribe(lambda h, e: seen.append(e))
    handle.report(ReportEvent(1.0, TrainingProgress(iteration=3)))
    assert handle.latest_progress.iteration == 3 and len(seen) == 1
    assert "progress bar exploded" in caplog.text


@async_test
async def test_poll_wait_returns_at_once_when_the_board_stops() -> None:
    board = TaskBoard()
    waiter = asyncio.create_task(board.next_for("a", 30))
    await asyncio.sleep(0.05)
    board.stop()
    assert await asyncio.wait_for(waiter, 1) is None
