"""The upload line's turns (:class:`fedserver.upload_line.LineTurn`), on UploadSessions and over real grpc.aio on
loopback with one upload slot (``max_concurrent_uploads=1``).

Room that frees is handed to one waiter at a time; a waiter that does not take it (its task closed while it
waited, an error, its call cancelled) passes it on to the next: waiters that leave never stall the line
(review R2: two closed waiters in a row left the next one waiting until its task timed out).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from server_testkit import ServerKit, WireNode, async_test, encoded, running_server

from fedcore.errors import TaskClosedError
from fedcore.framing import PayloadInfo
from fedcore.wire import ResultDescriptor, TaskKind, TaskOutcome, convert
from fedserver.tasks import TaskHandle, TaskState
from fedserver.uploads import UploadSessions
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

CHUNK = 4096


def _info(size: int = 10) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(bytes(size)).digest(), 1 << 20)


def _one_slot() -> UploadSessions:
    return UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1)


async def _take_turn(uploads: UploadSessions, task_id: str, admitted: list[str], closed: bool = False) -> None:
    """Wait in line for ``task_id``; then take the slot, or (``closed``) leave as a closed task does."""
    async with uploads.line(task_id, 10, timeout=5) as turn:
        if closed:
            raise TaskClosedError(f"task {task_id} is no longer accepted (round finished)")
        turn.begin(task_id, _info())
        admitted.append(task_id)


# -- UploadSessions --------------------------------------------------------------------------------------------
@async_test
async def test_a_turn_left_untaken_goes_to_the_next_waiter() -> None:
    uploads = _one_slot()
    uploads.begin("t0", "n", _info())
    admitted: list[str] = []
    leaving = [asyncio.ensure_future(_take_turn(uploads, t, admitted, closed=True)) for t in ("t1", "t2")]
    staying = asyncio.ensure_future(_take_turn(uploads, "t3", admitted))
    await eventually(lambda: uploads.waiting == 3, 1, "three uploads in line")
    uploads.discard("t0")  # one wake-up only: t1 gets it, passes it to t2, which passes it to t3
    for closed in leaving:
        with pytest.raises(TaskClosedError):
            await asyncio.wait_for(closed, 1)
    await asyncio.wait_for(staying, 1)
    assert admitted == ["t3"] and uploads.session("t3") is not None and uploads.waiting == 0


@async_test
async def test_a_waiter_cancelled_after_its_turn_came_passes_it_on() -> None:
    """The call of a woken waiter ends (cancelled) before the waiter ran: its turn goes to the next."""
    uploads = _one_slot()
    uploads.begin("t0", "n", _info())
    admitted: list[str] = []
    first = asyncio.ensure_future(_take_turn(uploads, "t1", admitted))
    second = asyncio.ensure_future(_take_turn(uploads, "t2", admitted))
    await eventually(lambda: uploads.waiting == 2, 1, "two uploads in line")
    uploads.discard("t0")  # t1's turn: handed, but t1 has not run yet
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert first.cancelled() and admitted == ["t2"]


@async_test
async def test_a_turn_taken_is_not_passed_on() -> None:
    """begin() takes the turn: leaving the block after it wakes nobody (the next waiter stays in line)."""
    uploads = _one_slot()
    uploads.begin("t0", "n", _info())
    admitted: list[str] = []
    first = asyncio.ensure_future(_take_turn(uploads, "t1", admitted))
    second = asyncio.ensure_future(_take_turn(uploads, "t2", admitted))
    await eventually(lambda: uploads.waiting == 2, 1, "two uploads in line")
    uploads.discard("t0")
    await asyncio.wait_for(first, 1)
    await asyncio.sleep(0.05)
    assert admitted == ["t1"] and not second.done() and uploads.waiting == 1
    uploads.discard("t1")
    await asyncio.wait_for(second, 1)
    assert admitted == ["t1", "t2"]


# -- over gRPC -------------------------------------------------------------------------------------------------


async def _running_task(kit: ServerKit, node_id: str, inactivity_timeout: float) -> tuple[WireNode, TaskHandle]:
    node = await kit.registered_node(node_id)
    handle = kit.server.dispatch(node_id, TaskKind.TRAIN, kit.server.encode_payload({"round": 1}),
                                 experiment_id="e", round=1, inactivity_timeout=inactivity_timeout)
    assert (await node.poll(wait=2)).descriptor is not None
    return node, handle


def _upload(node: WireNode, task_id: str, gate: asyncio.Event | None = None) -> asyncio.Future[pb.UploadResultResponse]:
    """An UploadResult of three chunks; with ``gate``, the stream waits for it after its first chunk (holding its
    slot while it runs)."""
    document = encoded({"params": bytes(3 * CHUNK)}, CHUNK)
    header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, TaskOutcome.SUCCEEDED, "", document.info(0)))

    async def requests() -> AsyncIterator[pb.UploadResultRequest]:
        yield pb.UploadResultRequest(header=header)
        for index, (offset, data) in enumerate(document.iter_chunks(0)):
            if index == 1 and gate is not None:
                await gate.wait()
            yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=bytes(data)))

    return asyncio.ensure_future(node.stub.UploadResult(requests(), metadata=node.metadata, timeout=30))


@async_test
async def test_two_waiters_whose_tasks_closed_in_line_pass_the_turn_on(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1) as kit:
        uploads = kit.server.uploads
        running = {name: await _running_task(kit, name, 30.0) for name in ("a", "b1", "b2", "c")}
        gate = asyncio.Event()
        calls = {"a": _upload(*_node_and_id(running["a"]), gate)}
        await eventually(lambda: uploads.acknowledged(running["a"][1].task_id) == CHUNK, 5, "a holds the slot")
        for position, name in enumerate(("b1", "b2", "c"), start=1):  # in this order
            calls[name] = _upload(*_node_and_id(running[name]))
            await eventually(lambda n=position: uploads.waiting == n, 5, f"{name} waiting in line")
        assert running["b1"][1].cancel("round 1 finished without this node")  # closed while in line
        assert running["b2"][1].cancel("round 1 finished without this node")
        gate.set()  # a completes: its slot is free, b1 and b2 get their turns in order and refuse them
        assert (await asyncio.wait_for(calls["a"], 5)).received_bytes > 0
        for name in ("b1", "b2"):
            refused = await asyncio.wait_for(asyncio.gather(calls[name], return_exceptions=True), 5)
            assert isinstance(refused[0], grpc.aio.AioRpcError), refused
            assert refused[0].code() is grpc.StatusCode.FAILED_PRECONDITION, refused[0].details()
        # c's turn comes at once, not when its wait runs out
        response = await asyncio.wait_for(calls["c"], 3)
        result = await running["c"][1].result(timeout=1)
        assert result.outcome is TaskState.SUCCEEDED, result.error_message
        assert response.received_bytes == result.bytes_received
        assert uploads.waiting == 0


def _node_and_id(running: tuple[WireNode, TaskHandle]) -> tuple[WireNode, str]:
    return running[0], running[1].task_id
