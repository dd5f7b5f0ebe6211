"""A task whose header went into a dead connection just before its node process registered again (the same
instance id) is taken over by the process's next poll and sent again from offset 0, instead of waiting for
keepalive (60 + 20 s) to drop the stale stream that still "sends" it.

The rule (:class:`TaskBoard`): a process polls one task at a time and abandons every poll it opened before
its latest Register, so a stream of an earlier poll generation no longer holds its task; a poll of the
current generation takes a queued task unless a stream of its own generation sends it. Each handle keeps
the generation of every stream sending it (``TaskHandle.sender_generations``); whichever stream delivers
first marks the task delivered, the other's end changes nothing — except that a stale stream's delivery
while a newer copy is still being sent does not count (the newer copy decides, so a second blip cannot
orphan the task). A restart (another instance id) still
fails every task a stream is sending (test_node_restart.py).

Unit level on :class:`TaskBoard`; over real grpc.aio on loopback with a raw-stub node whose first
connection goes through a :class:`FreezingProxy` (a half-open connection: nothing flows, no socket closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from server_testkit import ServerKit, WireNode, async_test, channel_options, encoded, running_server, version
from tcp_proxy import FreezingProxy

from fedcore.errors import NodeSupersededError
from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import node_service_pb2 as pb

X = "c0ffee" * 5 + "00"  # the node process's instance id (32 hex characters)


def _handle(board: TaskBoard, task_id: str, node_id: str = "n") -> TaskHandle:
    handle = TaskHandle(task_id=task_id, node_id=node_id, experiment_id="e", round=1, kind=TaskKind.TRAIN,
                        payload=encoded({"x": task_id}), inactivity_timeout=None, on_close=board.closed)
    board.add(handle)
    return handle


async def _taken_over(board: TaskBoard, task: TaskHandle) -> tuple[int, int]:
    """A stream of the node's current generation takes ``task``, the same process registers again, and a
    poll of the new generation takes it over: ``(stale generation, current generation)``."""
    stale_gen = board.poll_generation(task.node_id)
    assert await board.next_for(task.node_id, 0, generation=stale_gen) is task
    board.node_reregistered(task.node_id)
    gen = board.poll_generation(task.node_id)
    assert await board.next_for(task.node_id, 0, generation=gen) is task
    return stale_gen, gen


# -- unit level: the sender generations ------------------------------------------------------------------
@async_test
async def test_a_task_sent_only_by_streams_of_an_earlier_generation_goes_to_the_current_poll() -> None:
    board = TaskBoard(reconnect_grace=None)
    task, later = _handle(board, "t"), _handle(board, "u")
    first = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=first) is task
    assert task.sender_generations == [first]
    assert await board.next_for("n", 0, generation=first) is later  # the same generation: t is held
    board.release(later, delivered=False, generation=first)

    board.node_reregistered("n")  # the same process on a new connection: the stream sending t is abandoned
    second = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=first) is None  # an earlier poll still takes nothing
    assert await board.next_for("n", 0, generation=second) is task  # t first (dispatch order), sent again
    assert task.sender_generations == [first, second] and task.senders == 2
    assert await board.next_for("n", 0, generation=second) is later  # now t is held by this generation
    board.release(later, delivered=False, generation=second)
    assert await board.next_for("n", 0, generation=second) is later  # u only had a released sender

    board.node_reregistered("n")  # and again: both streams of t are abandoned now
    third = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=third) is task
    assert sorted(task.sender_generations) == [first, second, third]


@async_test
async def test_the_copy_sent_again_delivers_and_the_stale_stream_ends_without_effect() -> None:
    board = TaskBoard(reconnect_grace=None)
    task = _handle(board, "t")
    stale_gen, gen = await _taken_over(board, task)

    board.release(task, delivered=True, generation=gen)  # the copy sent again delivered
    delivered_at = task.delivered_at
    assert task.state is TaskState.RUNNING and task.sender_generations == [stale_gen]
    assert await board.next_for("n", 0, generation=gen) is None  # off the queue

    board.release(task, delivered=True, generation=stale_gen)  # the stale stream thawed and delivered too
    assert task.state is TaskState.RUNNING and task.delivered_at == delivered_at and task.senders == 0
    board.release(task, delivered=False, generation=stale_gen)  # one release too many: nothing goes negative
    assert task.senders == 0 and task.state is TaskState.RUNNING
    assert await board.next_for("n", 0, generation=gen) is None  # it is not queued again
    assert board.open_tasks("n") == [task]
    task.finish(TaskState.SUCCEEDED, payload={"ok": 1})
    assert (await task.result(timeout=1)).payload == {"ok": 1} and board.open_tasks("n") == []


@async_test
async def test_the_stale_stream_delivering_first_or_breaking_keeps_the_task_consistent() -> None:
    board = TaskBoard(reconnect_grace=None)
    first, second = _handle(board, "t"), _handle(board, "u")
    stale_gen, gen = await _taken_over(board, first)

    board.release(first, delivered=True, generation=stale_gen)  # the stale stream got its last chunk out first,
    # into a connection the process abandoned, while the copy sent again is still going: it does not count
    assert first.state is TaskState.QUEUED and first.sender_generations == [gen]
    board.release(first, delivered=False, generation=gen)  # and the copy breaks too (a second blip)
    assert first.state is TaskState.QUEUED and first.senders == 0
    assert await board.next_for("n", 0, generation=gen) is first  # not orphaned: sent again
    board.release(first, delivered=True, generation=gen)  # this copy delivers: that counts
    assert first.state is TaskState.RUNNING and first.senders == 0
    assert await board.next_for("n", 0, generation=gen) is second  # the queue moved on, once

    board.release(second, delivered=False, generation=gen)  # the new copy's download broke
    assert second.state is TaskState.QUEUED and second.senders == 0
    board.acquire(second, generation=gen)  # the process resumes it on this generation
    assert await board.next_for("n", 0, generation=gen) is None  # held: no second copy on this generation
    board.release(second, delivered=True, generation=gen)
    assert second.state is TaskState.RUNNING and board.open_tasks("n") == [first, second]


@async_test
async def test_a_stale_stream_breaking_before_the_copy_sent_again_delivers_leaves_it_held() -> None:
    board = TaskBoard(reconnect_grace=None)
    task = _handle(board, "t")
    stale_gen, gen = await _taken_over(board, task)
    board.release(task, delivered=False, generation=stale_gen)  # keepalive dropped the dead connection
    assert task.state is TaskState.QUEUED and task.sender_generations == [gen]
    assert await board.next_for("n", 0, generation=gen) is None  # the current copy still holds it
    board.release(task, delivered=True, generation=gen)
    assert task.state is TaskState.RUNNING and task.senders == 0


@async_test
async def test_without_a_register_in_between_a_task_being_sent_is_never_sent_twice() -> None:
    board = TaskBoard(reconnect_grace=None)
    task = _handle(board, "t")
    gen = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=gen) is task
    assert await board.next_for("n", 0, generation=gen) is None
    assert await board.next_for("n", 0) is None  # no generation given: the node's current one
    board.release(task, delivered=False, generation=gen)
    assert await board.next_for("n", 0) is task  # released: free again


@async_test
async def test_a_restart_still_fails_a_task_that_only_an_abandoned_stream_is_sending() -> None:
    board = TaskBoard(reconnect_grace=None)
    task = _handle(board, "t")
    stale_gen = board.poll_generation("n")
    assert await board.next_for("n", 0, generation=stale_gen) is task
    board.node_reregistered("n")
    assert board.node_restarted("n", X, "d" * 32) == [task]  # unchanged: a stream was sending it
    assert (await task.result(timeout=1)).outcome is TaskState.FAILED
    with pytest.raises(NodeSupersededError):
        board.check_poll("n", stale_gen)
    board.release(task, delivered=True, generation=stale_gen)
    assert task.state is TaskState.FAILED and task.senders == 0


# -- over real gRPC --------------------------------------------------------------------------------------
def _dispatch(kit: ServerKit, payload: OutgoingPayload) -> TaskHandle:
    return kit.server.dispatch("n", TaskKind.TRAIN, payload, experiment_id="e", round=1, inactivity_timeout=120)


@contextlib.asynccontextmanager
async def _task_stuck_in_a_frozen_poll(
        kit: ServerKit, token: str, data: bytes,
) -> AsyncIterator[tuple[FreezingProxy, grpc.aio.UnaryStreamCall, TaskHandle]]:
    """Process X of node ``n`` registers through a :class:`FreezingProxy` and opens a poll that it does not
    read; the proxy freezes (the network vanished), then a task carrying ``data`` is dispatched: the stale
    poll takes it and its header and first chunks go into the frozen connection, where the stream blocks.
    Yields the proxy, the stale call and the task; stops the proxy after (which breaks the connection)."""
    proxy = FreezingProxy(kit.server.port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}", options=channel_options())
    kit.channels.append(channel)
    try:
        node = WireNode(channel, token)
        await node.register(instance_id=X)
        stale = node.stub.PollTask(pb.PollTaskRequest(version=version(), wait_seconds=30),
                                   metadata=node.metadata, timeout=60)
        await eventually(lambda: kit.server.registry.get("n").open_polls == 1, 5, "the stale poll open")
        proxy.freeze()
        handle = _dispatch(kit, OutgoingPayload.from_bytes(data, 64 << 10))
        await eventually(lambda: handle.bytes_sent > 0, 5, "the stale stream sending")
        sent = -1
        while handle.bytes_sent != sent:  # until the stream blocks on the full connection
            sent = handle.bytes_sent
            await asyncio.sleep(0.3)
        assert sent < len(data) and handle.state is TaskState.QUEUED and handle.senders == 1
        yield proxy, stale, handle
    finally:
        await proxy.stop()


@async_test
async def test_a_task_stuck_in_a_dead_connection_goes_to_the_process_s_next_poll_at_once(tmp_path: Path) -> None:
    """The node never saw the header; it registers again (same id) on a new connection and polls: it gets
    the whole task within seconds (keepalive would take 80 s), completes it, and the round gets the
    result. The stale stream ends when its connection breaks, without touching the finished task."""
    data = bytes(range(256)) * (32 << 10)  # 8 MiB in 128 chunks of 64 KiB
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        kit.server.board.reconnect_grace = 60.0
        token = kit.store.enroll("n")
        async with _task_stuck_in_a_frozen_poll(kit, token, data) as (_proxy, _stale, handle):
            again = kit.node(token=token)  # the same process, on a direct connection
            await again.register(instance_id=X)
            started = time.monotonic()
            fresh = await again.poll(wait=5)
            took = time.monotonic() - started
            assert fresh.descriptor is not None and fresh.descriptor.task_id == handle.task_id, fresh
            assert fresh.descriptor.payload.start_offset == 0 and fresh.descriptor.payload.total_size == len(data)
            assert [o for o, _ in fresh.chunks] == list(range(0, len(data), 64 << 10))
            assert b"".join(d for _, d in fresh.chunks) == data
            assert took < 3.0, took
            assert handle.state is TaskState.RUNNING and handle.senders == 1  # the stale stream still blocks
            await again.upload(handle.task_id, encoded({"ok": 1}))
            result = await handle.result(timeout=5)
            assert result.outcome is TaskState.SUCCEEDED and result.payload == {"ok": 1}
            assert result.bytes_sent >= len(data)
        # the proxy stopped: the dead connection breaks and the stale stream ends
        await eventually(lambda: handle.senders == 0, 5, "the stale stream released")
        assert handle.state is TaskState.SUCCEEDED and kit.server.board.open_tasks("n") == []
        assert kit.server.registry.get("n").open_polls == 0


@async_test
async def test_a_stale_stream_that_thaws_and_delivers_after_the_copy_sent_again_changes_nothing(
        tmp_path: Path) -> None:
    """As above, but the old connection comes back and its unread poll is read to the end: the stale stream
    goes on (a same-process Register does not stop a stream sending a task) and delivers a second copy;
    the task stays RUNNING with its first delivery time, is not queued again, and completes."""
    data = bytes(range(256)) * (16 << 10)  # 4 MiB
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        token = kit.store.enroll("n")
        async with _task_stuck_in_a_frozen_poll(kit, token, data) as (proxy, stale, handle):
            again = kit.node(token=token)
            await again.register(instance_id=X)
            fresh = await again.poll(wait=5)
            assert fresh.descriptor is not None and fresh.descriptor.task_id == handle.task_id
            assert b"".join(d for _, d in fresh.chunks) == data
            delivered_at = handle.delivered_at
            assert handle.state is TaskState.RUNNING and delivered_at is not None

            proxy.thaw()
            got = bytearray()
            async for message in stale:
                if message.WhichOneof("event") == "chunk":
                    got += message.chunk.data
                else:
                    assert message.WhichOneof("event") == "task"
            assert bytes(got) == data and await stale.code() is grpc.StatusCode.OK
            await eventually(lambda: handle.senders == 0, 5, "the stale stream released")
            assert handle.state is TaskState.RUNNING and handle.delivered_at == delivered_at
            assert (await again.poll(wait=0.2)).no_task  # not queued again
            await again.upload(handle.task_id, encoded({"ok": 2}))
            assert (await handle.result(timeout=5)).payload == {"ok": 2}
