"""A task the server sent whole into a dead connection is sent again as soon as the node process polls
naming the tasks it holds without it, instead of waiting for its inactivity timeout (or forever).

The server counts a task delivered once gRPC accepted its last chunk; on a half-open connection a small
payload fits into the socket and HTTP/2 buffers, so the task is RUNNING on the server and nowhere on the
node. ``PollTaskRequest.reports_held_tasks`` / ``held_task_ids`` say what the polling process holds
(:meth:`TaskBoard.requeue_lost`): a task delivered to that process (``TaskHandle.delivered_to``), whose
upload has not begun and which the list does not name goes back on the node's queue and is sent again
from offset 0. A poll without the field (older nodes, the JS node) changes nothing.

Unit level on :class:`TaskBoard`; over real grpc.aio on loopback with a raw-stub node whose first
connection goes through a :class:`FreezingProxy` (nothing flows, no socket closes); and a real
:class:`NodeClient` whose poll connection freezes just as a task is sent to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from fake_node_service import node_config, running
from server_testkit import (
    PolledTask,
    ServerKit,
    WireNode,
    async_test,
    channel_options,
    encoded,
    running_server,
    version,
)
from tcp_proxy import FreezingProxy
from test_node_client_fedserver import Trainer

from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind, convert
from fednode.client import ClientState, NodeClient
from fedserver.service import MAX_HELD_TASK_IDS, MAX_TASK_ID_LENGTH
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import node_service_pb2 as pb

X, Y = "c0ffee" * 5 + "00", "d" * 32  # instance ids of two node processes
LOST = "sending it again from offset 0"  # words of the server's log line


def _handle(board: TaskBoard, task_id: str, node_id: str = "n") -> TaskHandle:
    handle = TaskHandle(task_id=task_id, node_id=node_id, experiment_id="e", round=1, kind=TaskKind.TRAIN,
                        payload=encoded({"x": task_id}), inactivity_timeout=None, on_close=board.closed)
    board.add(handle)
    return handle


async def _deliver(board: TaskBoard, task: TaskHandle, instance: str = X) -> None:
    """A poll of process ``instance`` takes ``task`` and streams it whole."""
    gen = board.poll_generation(task.node_id)
    assert await board.next_for(task.node_id, 0, generation=gen) is task
    board.release(task, delivered=True, generation=gen, instance_id=instance)
    assert task.state is TaskState.RUNNING and task.delivered_to == instance


# -- unit level --------------------------------------------------------------------------------------------
@async_test
async def test_a_task_delivered_to_the_process_that_does_not_hold_it_is_queued_again_in_dispatch_order(
        caplog: pytest.LogCaptureFixture) -> None:
    board = TaskBoard(reconnect_grace=None)
    lost, later = _handle(board, "t"), _handle(board, "u")
    await _deliver(board, lost)
    with caplog.at_level(logging.WARNING, logger="fedserver.task_board"):
        assert board.requeue_lost("n", X, frozenset()) == [lost]
    assert lost.state is TaskState.QUEUED and lost.delivered_at is None and lost.delivered_to == ""
    [record] = [r for r in caplog.records if LOST in r.getMessage()]
    assert "task t" in record.getMessage() and f"instance {X}" in record.getMessage()
    gen = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=gen) is lost  # before u: dispatched first
    board.release(lost, delivered=True, generation=gen, instance_id=X)
    assert await board.next_for("n", 0, generation=gen) is later
    assert board.requeue_lost("n", X, frozenset({"t"})) == []  # held now: stays RUNNING
    assert lost.state is TaskState.RUNNING


@async_test
async def test_nothing_is_queued_again_that_the_process_holds_uploads_or_never_got() -> None:
    board = TaskBoard(reconnect_grace=None)
    held, uploading, elsewhere, unknown, queued = (_handle(board, t) for t in ("h", "up", "y", "anon", "q"))
    await _deliver(board, held)
    await _deliver(board, uploading)
    uploading.mark_uploading()  # its result has begun arriving: the node has it
    await _deliver(board, elsewhere, instance=Y)  # delivered to another process of the node
    await _deliver(board, unknown, instance="")  # to a poll that named no process
    assert board.requeue_lost("n", X, frozenset({"h"})) == []
    assert board.requeue_lost("n", "", frozenset()) == []  # a poll naming no process proves nothing
    assert board.requeue_lost("other", X, frozenset()) == []  # another node's poll
    assert [t.state for t in (held, uploading, elsewhere, unknown, queued)] == [
        TaskState.RUNNING, TaskState.UPLOADING, TaskState.RUNNING, TaskState.RUNNING, TaskState.QUEUED]
    assert board.requeue_lost("n", Y, frozenset()) == [elsewhere]


@async_test
async def test_a_poll_is_never_given_a_task_it_names_as_held() -> None:
    board = TaskBoard(reconnect_grace=None)
    first, second = _handle(board, "t"), _handle(board, "u")
    gen = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=gen, held={"t"}) is second
    assert await board.next_for("n", 0, generation=gen, held={"t"}) is None
    assert await board.next_for("n", 0, generation=gen) is first


# -- over real gRPC ------------------------------------------------------------------------------------------
async def _poll(node: WireNode, wait: float, held: list[str] | None, resume_task_id: str = "",
                resume_offset: int = 0) -> PolledTask:
    """One poll of process X (its instance id in the metadata), reporting ``held`` (None: not reported)."""
    request = convert.poll_request_to_pb(wait, resume_task_id, resume_offset, held_task_ids=held)
    return await node.poll(request=request, instance=X)


def _dispatch(kit: ServerKit, data: bytes, chunk_size: int = 16 << 10) -> TaskHandle:
    return kit.server.dispatch("n", TaskKind.TRAIN, OutgoingPayload.from_bytes(data, chunk_size),
                               experiment_id="e", round=1, inactivity_timeout=120)


@contextlib.asynccontextmanager
async def _task_sent_into_a_frozen_poll(kit: ServerKit, token: str, data: bytes) -> AsyncIterator[TaskHandle]:
    """Process X of node ``n`` registers through a :class:`FreezingProxy` and opens a poll it does not read;
    the proxy freezes (the network vanished), then a task carrying ``data`` (small enough for the buffers) is
    dispatched: the poll streams it whole into the frozen connection and the server counts it delivered.
    Yields the task; stops the proxy after (which breaks the connection)."""
    proxy = FreezingProxy(kit.server.port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}", options=channel_options())
    kit.channels.append(channel)
    try:
        node = WireNode(channel, token)
        await node.register(instance_id=X)
        request = pb.PollTaskRequest(version=version(), wait_seconds=30)
        unread = node.stub.PollTask(request, metadata=(*node.metadata, ("fedstream-instance-id", X)), timeout=60)
        await eventually(lambda: kit.server.registry.get("n").open_polls == 1, 5, "the poll open")
        proxy.freeze()
        handle = _dispatch(kit, data)
        await eventually(lambda: handle.state is TaskState.RUNNING, 5, "the task counted delivered")
        assert handle.bytes_sent == len(data) and handle.delivered_to == X and handle.senders == 0
        yield handle
        unread.cancel()
    finally:
        await proxy.stop()


@async_test
async def test_a_task_sent_whole_into_a_dead_connection_is_sent_again_on_the_next_poll(tmp_path: Path) -> None:
    """The node never got the task; it registers again (same process) on a new connection and polls saying
    it holds nothing: it gets the whole task from offset 0 at once, and its result is accepted."""
    data = bytes(range(256)) * 160  # 40 KiB in 3 chunks: fits the buffers of the frozen connection
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        token = kit.store.enroll("n")
        async with _task_sent_into_a_frozen_poll(kit, token, data) as handle:
            again = kit.node(token=token)
            await again.register(instance_id=X)
            got = await _poll(again, 5, held=[])  # a poll that did not get it again would end NoTask after 5 s
            assert got.descriptor is not None and got.descriptor.task_id == handle.task_id, got
            assert got.descriptor.payload.start_offset == 0 and b"".join(d for _, d in got.chunks) == data
            assert handle.state is TaskState.RUNNING and handle.bytes_sent == 2 * len(data)
            assert (await _poll(again, 0.2, held=[handle.task_id])).no_task  # held now: not a third time
            await again.upload(handle.task_id, encoded({"ok": 1}))
            result = await handle.result(timeout=5)
            assert result.outcome is TaskState.SUCCEEDED and result.payload == {"ok": 1}


@async_test
async def test_an_old_style_poll_leaves_a_lost_task_delivered(tmp_path: Path) -> None:
    """Without reports_held_tasks (nodes older than it, the JS node) the server infers nothing: the lost task
    stays RUNNING (until its inactivity timeout), the poll gets no task."""
    data = bytes(range(256)) * 160
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        token = kit.store.enroll("n")
        async with _task_sent_into_a_frozen_poll(kit, token, data) as handle:
            again = kit.node(token=token)
            await again.register(instance_id=X)
            assert (await _poll(again, 0.3, held=None)).no_task
            assert handle.state is TaskState.RUNNING and handle.bytes_sent == len(data)


@async_test
async def test_a_task_the_node_holds_is_not_sent_again_and_one_it_does_not_is(tmp_path: Path) -> None:
    """On one live connection, no Register in between: a poll naming the delivered task gets nothing; a
    poll that leaves it out (the process lost it: it abandoned that stream) gets it again from offset 0."""
    data = bytes(range(256)) * 160
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        token = kit.store.enroll("n")
        node = kit.node(token=token)
        await node.register(instance_id=X)
        handle = _dispatch(kit, data)
        first = await _poll(node, 5, held=[])
        assert first.descriptor is not None and first.descriptor.task_id == handle.task_id
        assert handle.state is TaskState.RUNNING
        assert (await _poll(node, 0.3, held=[handle.task_id])).no_task
        assert handle.state is TaskState.RUNNING and handle.bytes_sent == len(data)
        again = await _poll(node, 5, held=[])
        assert again.descriptor is not None and again.descriptor.task_id == handle.task_id
        assert b"".join(d for _, d in again.chunks) == data and handle.state is TaskState.RUNNING


@async_test
async def test_a_task_whose_upload_began_is_never_sent_again(tmp_path: Path) -> None:
    """A broken upload leaves the task UPLOADING with its bytes kept: a poll that does not name it (a node
    that got it wrong) does not get it again; the upload resumes and completes."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        token = kit.store.enroll("n")
        node = kit.node(token=token)
        await node.register(instance_id=X)
        handle = _dispatch(kit, b"p" * 1000)
        assert (await _poll(node, 5, held=[])).descriptor is not None
        result = OutgoingPayload.from_object({"r": bytes(200_000)}, chunk_size=64 << 10)
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await node.upload(handle.task_id, result, stop_after_chunks=1)
        assert broken.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # ended early, bytes kept
        assert handle.state is TaskState.UPLOADING
        assert (await _poll(node, 0.3, held=[])).no_task
        assert handle.state is TaskState.UPLOADING
        acknowledged = (await node.status(handle.task_id)).acknowledged_offset
        await node.upload(handle.task_id, result, start_offset=acknowledged)
        assert (await handle.result(timeout=5)).outcome is TaskState.SUCCEEDED


@async_test
async def test_held_ids_without_reports_held_tasks_are_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("n")
        request = pb.PollTaskRequest(version=version(), wait_seconds=0.1, held_task_ids=["t"])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in node.stub.PollTask(request, metadata=node.metadata, timeout=10):
                pass
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "held_task_ids names 1 task(s) but reports_held_tasks is false" in refused.value.details()


@pytest.mark.parametrize(("held", "words"), [
    ([f"{i:032x}" for i in range(MAX_HELD_TASK_IDS + 1)], "held_task_ids names 1025 tasks: at most 1024 are accepted"),
    (["a" * 32, "b" * 65], "held_task_ids[1] has 65 characters: a task id has at most 64"),
])
@async_test
async def test_a_held_list_over_its_limits_is_refused_and_one_at_them_is_read(
        held: list[str], words: str, tmp_path: Path) -> None:
    """At most 1024 ids of at most 64 characters (the server issues 32): more is refused INVALID_ARGUMENT
    (MALFORMED_MESSAGE) before the server builds anything from the list."""
    assert (MAX_HELD_TASK_IDS, MAX_TASK_ID_LENGTH) == (1024, 64)
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("n")
        request = convert.poll_request_to_pb(0.1, held_task_ids=held)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in node.stub.PollTask(request, metadata=node.metadata, timeout=10):
                pass
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
        assert dict(refused.value.trailing_metadata())["fedstream-error-reason"] == "ERROR_REASON_MALFORMED_MESSAGE"
        at_the_limits = [f"{i:064x}" for i in range(MAX_HELD_TASK_IDS)]
        assert (await _poll(node, 0.1, held=at_the_limits)).no_task


# -- fednode ---------------------------------------------------------------------------------------------------
@async_test
async def test_fednode_gets_a_task_lost_in_its_dead_connection_again_after_reconnecting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """fednode's connection freezes while its poll waits; the task dispatched then goes whole into it. The
    node notices the silent poll (poll wait + call timeout), reconnects and polls reporting what it holds
    (nothing): the task comes again and the round gets the result, long before the 120 s inactivity
    timeout."""
    async with running_server(tmp_path, max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5,
                              chunk_size=16 << 10) as kit:
        token = kit.store.enroll("n")
        proxy = FreezingProxy(kit.server.port)
        config = node_config(await proxy.start(), token=token, poll_wait_seconds=2.0, call_timeout_seconds=1.0)
        client = NodeClient(config, Trainer())
        try:
            async with running(client):
                record = None
                while record is None or not (record.open_polls == 1 and client.state is ClientState.POLLING
                                             and time.monotonic() - record.last_seen < 0.2):
                    await asyncio.sleep(0.005)  # until a poll opened just now: it waits 2 s for a task
                    record = kit.server.registry.get("n") if "n" in kit.server.registry else None
                proxy.freeze()
                w = np.arange(2000, dtype=np.float32)  # 8 KB: fits the frozen connection's buffers
                with caplog.at_level(logging.WARNING, logger="fedserver.task_board"):
                    handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": w}}),
                                                 experiment_id="e", round=1, inactivity_timeout=120)
                    await eventually(lambda: handle.state is TaskState.RUNNING, 1.5, "the task counted delivered")
                    sent = handle.bytes_sent
                    await eventually(lambda: client.state is not ClientState.POLLING, 10, "the node giving up the poll")
                    proxy.thaw()
                    result = await handle.result(timeout=20)
        finally:
            await proxy.stop()
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    np.testing.assert_array_equal(result.payload["params"]["w"], 2 * w)
    assert result.bytes_sent == 2 * sent and client.sessions >= 2
    assert any(LOST in r.getMessage() and handle.task_id in r.getMessage() for r in caplog.records)
