"""A node process that restarts (``RegisterRequest.instance_id`` changes) gets none of the old process's
tasks: those it holds (a stream is sending it, or it was delivered) end FAILED at its Register, with an
error naming both instances, and the old upload's bytes are discarded; queued tasks no stream is sending
(never sent, or their download cut) stay queued for the new process. The old process's polls still open
(a half-open connection) end at that Register with FAILED_PRECONDITION "superseded" and take nothing.
The same process coming back (same id) keeps its tasks; its polls from before that Register end quietly
(NoTask) and take nothing, so the next task goes to the poll it opens anew. An older node sending no id
keeps everything, its open poll included, as before.

Unit level on :class:`NodeRegistry` and :class:`TaskBoard`; over real grpc.aio on loopback (the raw-stub
nodes of :mod:`server_testkit`, the real NodeClient behind a proxy that cuts its connection); and with
real ``fednode start`` processes, one SIGKILLed while its handler runs and started again. The reconnect
grace (60 s) and inactivity timeouts (120 s) are long there, so a task ending within seconds can only be
the restart at work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import Federation, eventually, least_squares_sites
from fake_node_service import arun, node_config, running
from plans_gated import GatedLinearPlan
from server_testkit import ServerKit, WireNode, async_test, channel_options, encoded, running_server, version
from tcp_proxy import CuttingProxy, FreezingProxy
from test_node_client_fedserver import Trainer, server_config

from fedcore.aggregators import FedAverage
from fedcore.errors import NodeSupersededError
from fedcore.framing import OutgoingPayload
from fedcore.wire import NodeRegistration, TaskKind
from fednode.client import NodeClient
from fedserver.auth import NodeStore
from fedserver.experiment import Experiment
from fedserver.registry import NodeRegistry
from fedserver.server import FedServer
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import node_service_pb2 as pb

RESTARTED = re.compile(r"node (\S+) restarted at \d\d:\d\d:\d\d\.\d{3}: a new process \(instance (\S+)\) registered "
                       r"in place of instance (\S+), which held this task \((\w+)\)")
SUPERSEDED = re.compile(r"PollTask stream of node (\S+) superseded by a newer instance of the node: instance (\S+) "
                        r"registered at \d\d:\d\d:\d\d\.\d{3} in place of instance (\S+); this stream belongs to "
                        r"an earlier process")
OLD, NEW = "a" * 32, "b" * 32
#: Channel options of a node whose downloads must stay in flight: a fixed 64 KiB receive window, no probing.
FIXED_64K_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 << 10)]


# -- unit level ------------------------------------------------------------------------------------------
def test_registry_tells_a_restart_from_the_same_process_and_from_an_unknown_instance() -> None:
    registry = NodeRegistry(liveness_timeout=60.0)
    assert registry.restarted("n", OLD) is None  # never seen: nothing sent to an earlier process
    registry.register("n", NodeRegistration("N", instance_id=OLD))
    assert registry.get("n").instance_id == OLD
    assert registry.restarted("n", OLD) is None  # the same process again (a reconnect)
    assert registry.restarted("n", "") is None  # unknown (an older node): as before, nothing ends
    assert registry.restarted("n", NEW) == OLD
    registry.register("n", NodeRegistration("N"))  # a process that sends no id: recorded as unknown
    assert registry.get("n").instance_id == ""
    assert registry.restarted("n", "") is None
    assert registry.restarted("n", NEW) == ""  # it cannot be the process that sent none


def _handle(board: TaskBoard, task_id: str, node_id: str = "n") -> TaskHandle:
    handle = TaskHandle(task_id=task_id, node_id=node_id, experiment_id="e", round=1, kind=TaskKind.TRAIN,
                        payload=encoded({"x": 1}), inactivity_timeout=None, on_close=board.closed)
    board.add(handle)
    return handle


@async_test
async def test_board_ends_only_the_tasks_a_stream_took_when_the_node_restarts() -> None:
    board = TaskBoard(reconnect_grace=None)
    delivered, streaming, broken, unsent = (_handle(board, f"t{i}") for i in range(4))
    other = _handle(board, "o", node_id="m")
    assert await board.next_for("n", 0) is delivered
    board.release(delivered, delivered=True)  # RUNNING on the node
    assert await board.next_for("n", 0) is streaming  # its stream is still open (senders 1)
    assert await board.next_for("n", 0) is broken
    board.release(broken, delivered=False)  # a download cut midway: queued again, but it was sent
    assert [h.state for h in (delivered, streaming, broken)] == [TaskState.RUNNING, TaskState.QUEUED,
                                                                 TaskState.QUEUED]

    lost = board.node_restarted("n", OLD, NEW)

    assert lost == [delivered, streaming]
    for handle, state in zip(lost, ("running", "queued"), strict=True):
        result = await handle.result(timeout=1)
        assert result.outcome is TaskState.FAILED and not handle.result_received
        assert RESTARTED.fullmatch(result.error_message).groups() == ("n", NEW, OLD, state)
    # the cut download is held by no process: it stays queued, like the task never sent
    assert board.open_tasks("n") == [broken, unsent] and board.open_tasks("m") == [other]
    assert broken.state is TaskState.QUEUED and broken.senders == 0
    board.release(streaming, delivered=False)  # the old stream notices and ends: the task stays ended
    assert streaming.state is TaskState.FAILED
    assert await board.next_for("n", 0) is broken  # the new process downloads it afresh, in dispatch order
    board.release(broken, delivered=True)
    assert await board.next_for("n", 0) is unsent  # then gets what was never sent
    assert board.node_restarted("n", "", "c" * 32) == [broken, unsent]  # ... and loses both if it restarts too
    message = (await unsent.result(timeout=1)).error_message  # "": the process it replaced sent no id
    assert RESTARTED.fullmatch(message).groups() == ("n", "c" * 32, "(unknown)", "queued")
    assert board.node_restarted("n", NEW, OLD) == []  # nothing open any more


@async_test
async def test_board_ends_the_waiting_polls_of_a_restarted_node_before_they_take_a_task() -> None:
    board = TaskBoard(reconnect_grace=None)
    old_generation, other_generation = board.poll_generation("n"), board.poll_generation("m")
    assert old_generation == other_generation == 0
    old_poll = asyncio.create_task(board.next_for("n", 30, generation=old_generation))
    other_poll = asyncio.create_task(board.next_for("m", 30, generation=other_generation))
    await asyncio.sleep(0)  # both wait for a task

    assert board.node_restarted("n", OLD, NEW) == []  # nothing was sent: no task ends, the polls still do
    task = _handle(board, "t")  # dispatched right after the new process registered, before it polls

    with pytest.raises(NodeSupersededError) as err:
        await asyncio.wait_for(old_poll, 1)
    assert SUPERSEDED.fullmatch(str(err.value)).groups() == ("n", NEW, OLD)
    assert task.state is TaskState.QUEUED and task.senders == 0  # the old poll took nothing
    new_generation = board.poll_generation("n")
    assert new_generation == 1
    with pytest.raises(NodeSupersededError):
        board.check_poll("n", old_generation)  # a stream of the old process sending a task ends too
    board.check_poll("n", new_generation)
    assert await board.next_for("n", 0, generation=new_generation) is task  # the new process's poll gets it
    assert not other_poll.done()  # another node's poll waits on
    board.node_restarted("n", "", "c" * 32)  # a restart after a process that sent no id supersedes too
    with pytest.raises(NodeSupersededError) as err:
        board.check_poll("n", new_generation)
    assert SUPERSEDED.fullmatch(str(err.value)).groups() == ("n", "c" * 32, "(unknown)")
    board.stop()
    assert await asyncio.wait_for(other_poll, 1) is None


@async_test
async def test_board_ends_the_earlier_polls_of_a_node_registering_again_quietly() -> None:
    board = TaskBoard(reconnect_grace=None)
    first = board.poll_generation("n")
    stale = asyncio.create_task(board.next_for("n", 30, generation=first))
    await asyncio.sleep(0)  # it waits for a task

    board.node_reregistered("n")  # the same process registers again (a new connection after a blip)
    assert await asyncio.wait_for(stale, 1) is None  # no task, no error: the node just polls again
    second = board.poll_generation("n")
    assert second == first + 1
    assert board.check_poll("n", first) is False and board.check_poll("n", second) is True
    task = _handle(board, "t")
    assert await board.next_for("n", 0, generation=first) is None  # an earlier poll never takes a task
    assert task.senders == 0
    assert await board.next_for("n", 0, generation=second) is task  # the poll opened after the Register does

    board.node_restarted("n", OLD, NEW)  # a new process: every poll opened before ends "superseded"
    for generation in (first, second):
        with pytest.raises(NodeSupersededError):
            board.check_poll("n", generation)
    third = board.poll_generation("n")
    board.node_reregistered("n")  # ... and NEW registering again ends its own earlier polls quietly,
    assert board.check_poll("n", third) is False
    with pytest.raises(NodeSupersededError) as err:  # while those of the replaced process stay superseded
        board.check_poll("n", second)
    assert SUPERSEDED.fullmatch(str(err.value)).groups() == ("n", NEW, OLD)
    assert board.check_poll("n", board.poll_generation("n")) is True


# -- over real gRPC: raw-stub nodes ---------------------------------------------------------------------
@async_test
async def test_a_register_with_a_malformed_instance_id_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = kit.node("n")
        await node.register(instance_id=OLD)
        for bad in ("z" * 65, "new instance"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.register(instance_id=bad)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "RegisterRequest.instance_id must be at most 64 characters of [0-9A-Za-z_.-]" in err.value.details()
        assert kit.server.registry.get("n").instance_id == OLD  # no restart was recorded
        await node.register(instance_id="z" * 64)


@async_test
async def test_a_restarted_node_loses_what_the_old_process_held_and_keeps_what_it_never_got(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        kit.server.board.reconnect_grace = 60.0
        token = kit.store.enroll("n")
        # the old process cuts a download after 2 of its 16 chunks: the server must not be able to hand every
        # chunk to gRPC before that cancel arrives (the task would count as delivered, RUNNING, and end at the
        # restart). A probed receive window grows past the 1 MiB payload (2 failures in 8 runs under load),
        # so the old process's channel has a fixed 64 KiB window (probing off)
        channel = grpc.aio.insecure_channel(kit.target, options=channel_options() + FIXED_64K_WINDOW)
        kit.channels.append(channel)
        old = WireNode(channel, token)
        await old.register(instance_id=OLD)

        def dispatch(payload: OutgoingPayload) -> TaskHandle:
            return kit.server.dispatch("n", TaskKind.TRAIN, payload, experiment_id="e", round=1,
                                       inactivity_timeout=120)

        running_task = dispatch(encoded({"x": 1}))
        assert (await old.poll(wait=5)).descriptor.task_id == running_task.task_id
        uploading = dispatch(encoded({"x": 2}))
        assert (await old.poll(wait=5)).descriptor.task_id == uploading.task_id
        reply = encoded({"w": np.arange(100_000, dtype=np.float32)}, chunk_size=4096)
        with pytest.raises(grpc.aio.AioRpcError, match="resume at offset 12288"):  # parks 3 chunks
            await old.upload(uploading.task_id, reply, chunk_size=4096, stop_after_chunks=3)
        assert kit.server.uploads.buffered_bytes >= reply.total_size
        downloading = dispatch(OutgoingPayload.from_bytes(bytes(1 << 20), 64 << 10))
        got = await old.poll(wait=5, stop_after_chunks=2)
        assert got.descriptor.task_id == downloading.task_id
        await eventually(lambda: downloading.senders == 0, 5, "the cut download released")
        assert downloading.bytes_sent < (1 << 20) // 2, downloading.bytes_sent
        queued = dispatch(encoded({"x": 3}))
        states = [h.state for h in (running_task, uploading, downloading, queued)]
        assert states == [TaskState.RUNNING, TaskState.UPLOADING, TaskState.QUEUED, TaskState.QUEUED]

        again = kit.node(token=token)  # the same process on a new connection: nothing ends
        await again.register(instance_id=OLD)
        assert kit.server.board.open_tasks("n") == [running_task, uploading, downloading, queued]
        assert kit.server.uploads.acknowledged(uploading.task_id) == 12288

        new = kit.node(token=token)
        await new.register(instance_id=NEW)  # a new process: the old one's tasks end now

        for handle, state in ((running_task, "running"), (uploading, "uploading")):
            result = await handle.result(timeout=1)
            assert result.outcome is TaskState.FAILED
            assert RESTARTED.fullmatch(result.error_message).groups() == ("n", NEW, OLD, state)
        # the cut download is held by no process any more: queued for the new one, like the task never sent
        assert kit.server.board.open_tasks("n") == [downloading, queued]
        assert kit.server.registry.get("n").in_flight == {downloading.task_id, queued.task_id}
        assert len(kit.server.uploads) == 0 and kit.server.uploads.buffered_bytes == 0  # the parked bytes freed

        with pytest.raises(grpc.aio.AioRpcError) as err:  # the old process's upload, resumed: refused
            await old.status(uploading.task_id)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "restarted" in err.value.details()

        fresh = await new.poll(wait=5)  # the new process downloads the cut task afresh, in dispatch order
        assert fresh.descriptor.task_id == downloading.task_id and fresh.descriptor.payload.start_offset == 0
        assert b"".join(data for _, data in fresh.chunks) == bytes(1 << 20)
        fresh = await new.poll(wait=5)  # then the task never sent
        assert fresh.descriptor.task_id == queued.task_id and fresh.assemble() == {"x": 3}
        for handle in (downloading, queued):  # and completes both
            await new.upload(handle.task_id, encoded({"ok": handle.task_id}))
            assert (await handle.result(timeout=5)).payload == {"ok": handle.task_id}


def _open_poll(node: WireNode, wait: float = 30.0) -> grpc.aio.UnaryStreamCall:
    """A PollTask call that nobody reads (yet): the process that opened it is gone, or is not listening."""
    return node.stub.PollTask(pb.PollTaskRequest(version=version(), wait_seconds=wait), metadata=node.metadata,
                              timeout=wait + 30)


@contextlib.asynccontextmanager
async def _poll_left_frozen(kit: ServerKit,
                            token: str) -> AsyncIterator[tuple[FreezingProxy, grpc.aio.UnaryStreamCall]]:
    """A process of node ``n`` (instance OLD) registers through a :class:`FreezingProxy` and opens a poll,
    then the proxy freezes: nothing flows on that connection any more and no socket closes (the machine
    died, or a network blip). Yields the proxy (to thaw it) and the unread poll; stops the proxy after."""
    proxy = FreezingProxy(kit.server.port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}", options=channel_options())
    kit.channels.append(channel)
    try:
        node = WireNode(channel, token)
        await node.register(instance_id=OLD)
        stale = _open_poll(node)
        await eventually(lambda: kit.server.registry.get("n").open_polls == 1, 5, "the frozen poll open")
        proxy.freeze()
        yield proxy, stale
    finally:
        await proxy.stop()


@async_test
async def test_a_restart_ends_the_old_process_s_half_open_poll_and_its_task_goes_to_the_new_one(
        tmp_path: Path) -> None:
    """The old process's poll hangs on a frozen connection (keepalive 60 + 20 s would drop it). The new
    process registers and a task is dispatched at once: the server has ended the old poll (it took
    nothing), the new process's poll gets the task and completes it; once the connection thaws, the old
    call shows FAILED_PRECONDITION "superseded"."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        registry = kit.server.registry
        token = kit.store.enroll("n")
        async with _poll_left_frozen(kit, token) as (proxy, stale):  # the old process's machine dies
            new = kit.node(token=token)
            await new.register(instance_id=NEW)
            registered = time.monotonic()
            handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"x": 1}), experiment_id="e", round=1,
                                         inactivity_timeout=120)
            # at the Register, not by keepalive (60 + 20 s): a bound far below that proves it without timing
            # the machine (1 s, the bound before, is what a loaded machine can take for a few calls)
            await eventually(lambda: registry.get("n").open_polls == 0, 10, "the old poll ended by the server")
            ended = time.monotonic() - registered
            assert handle.state is TaskState.QUEUED and handle.senders == 0  # the old poll took nothing

            fresh = await new.poll(wait=5)
            assert fresh.descriptor.task_id == handle.task_id and fresh.assemble() == {"x": 1}
            await new.upload(handle.task_id, encoded({"ok": 1}))
            result = await handle.result(timeout=5)
            assert result.outcome is TaskState.SUCCEEDED and result.payload == {"ok": 1}

            proxy.thaw()  # the network comes back: the status the server sent long ago arrives
            assert await asyncio.wait_for(stale.code(), 10) is grpc.StatusCode.FAILED_PRECONDITION
            assert SUPERSEDED.fullmatch(await stale.details()).groups() == ("n", NEW, OLD)
        assert ended < 10.0, ended
        record = registry.get("n")
        assert record.open_polls == 0 and record.connected and record.drops == 0  # a refusal, not a drop
        assert registry.get("n").instance_id == NEW


@async_test
async def test_the_same_process_registering_again_ends_its_earlier_poll_quietly(tmp_path: Path) -> None:
    """A Register with the recorded instance id (the same process, on another connection) ends the poll it
    had open with NoTask and status OK, which both node clients take as "poll again"; a Register with no id
    (an older node) and another node's restart leave the poll alone, and it still gets the next task. A
    new process of the node then ends its poll FAILED_PRECONDITION "superseded"."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        registry = kit.server.registry
        token = kit.store.enroll("n")
        node = kit.node(token=token)
        await node.register(instance_id=OLD)
        other_token = kit.store.enroll("m")
        await kit.node(token=other_token).register(instance_id=OLD)

        earlier = _open_poll(node)
        await eventually(lambda: registry.get("n").open_polls == 1, 5, "the poll open")
        await kit.node(token=token).register(instance_id=OLD)  # the same process on another connection
        answer = await asyncio.wait_for(earlier.read(), 5)
        assert answer.WhichOneof("event") == "no_task"
        assert await asyncio.wait_for(earlier.read(), 5) is grpc.aio.EOF
        assert await earlier.code() is grpc.StatusCode.OK
        await eventually(lambda: registry.get("n").open_polls == 0, 5, "the earlier poll closed")
        assert registry.get("n").connected and registry.get("n").drops == 0

        poll = _open_poll(node)
        await eventually(lambda: registry.get("n").open_polls == 1, 5, "the poll open")
        await node.register(instance_id="")  # as an older node: unknown instance, no poll ends
        await kit.node(token=other_token).register(instance_id=NEW)  # node m restarted, not n
        await asyncio.sleep(0.1)
        assert registry.get("n").open_polls == 1 and not poll.done()

        handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"x": 2}), experiment_id="e", round=1,
                                     inactivity_timeout=120)
        header = await asyncio.wait_for(poll.read(), 5)
        assert header.WhichOneof("event") == "task" and header.task.task_id == handle.task_id
        while (await asyncio.wait_for(poll.read(), 5)) is not grpc.aio.EOF:
            pass  # its chunk: the whole task goes out on this poll
        assert await poll.code() is grpc.StatusCode.OK

        second = _open_poll(node)
        await eventually(lambda: registry.get("n").open_polls == 1, 5, "the next poll open")
        await kit.node(token=token).register(instance_id=NEW)  # now a new process of n registers
        assert await asyncio.wait_for(second.code(), 5) is grpc.StatusCode.FAILED_PRECONDITION
        assert SUPERSEDED.fullmatch(await second.details()).groups() == ("n", NEW, "(unknown)")  # sent none last
        assert (await handle.result(timeout=5)).outcome is TaskState.FAILED  # it held the task it was sent
        assert registry.get("n").open_polls == 0


@async_test
async def test_a_stale_poll_of_the_same_process_takes_no_task_after_it_registers_again(tmp_path: Path) -> None:
    """A network blip: the process's poll is left on a frozen connection (unread, keepalive would drop it
    only after 60 + 20 s). The process registers again with the same instance id on a new connection and
    polls anew; a task dispatched then goes to the new poll, not to the stale one that has waited longer.
    Once the connection thaws, the stale call shows the NoTask it was answered with, and status OK."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0, heartbeat_interval_seconds=10.0) as kit:
        registry = kit.server.registry
        token = kit.store.enroll("n")
        async with _poll_left_frozen(kit, token) as (proxy, stale):  # the blip
            after = kit.node(token=token)  # the same process, reconnected
            await after.register(instance_id=OLD)
            await eventually(lambda: registry.get("n").open_polls == 0, 5, "the stale poll ended by the Register")
            polling = asyncio.ensure_future(after.poll(wait=5))
            # the new poll waits too before the task comes (a fixed 0.2 s sleep did not make sure of it)
            await eventually(lambda: registry.get("n").open_polls == 1, 5, "the new poll open")
            handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"x": 1}), experiment_id="e", round=1,
                                         inactivity_timeout=120)
            fresh = await polling
            assert fresh.descriptor is not None, f"the stale poll took the task ({handle.state.value})"
            assert fresh.descriptor.task_id == handle.task_id and fresh.assemble() == {"x": 1}
            assert registry.get("n").open_polls == 0  # the stale poll ended at the Register, the new one since
            await after.upload(handle.task_id, encoded({"ok": 1}))
            assert (await handle.result(timeout=5)).payload == {"ok": 1}

            proxy.thaw()  # the old connection thaws: what the server answered long ago arrives
            answer = await asyncio.wait_for(stale.read(), 10)
            assert answer.WhichOneof("event") == "no_task"
            assert await asyncio.wait_for(stale.code(), 10) is grpc.StatusCode.OK
        record = registry.get("n")
        assert record.open_polls == 0 and record.connected and record.drops == 0
        assert record.instance_id == OLD


# -- over real gRPC: the real NodeClient, its connection cut ----------------------------------------------
def test_the_same_process_reconnecting_mid_upload_keeps_its_task(tmp_path: Path, caplog) -> None:
    """A cut connection makes NodeClient register again (same instance id): its parked upload resumes."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(reconnect_grace_seconds=60.0), store)
        port = await server.start()
        proxy = CuttingProxy(port)
        proxy_port = await proxy.start()
        client = NodeClient(node_config(proxy_port, token=token, upload_chunk_size=64 * 1024), Trainer())
        try:
            async with running(client):
                await server.wait_for_nodes(1, timeout=10)
                assert server.registry.get("site-a").instance_id == client.registration.instance_id
                w = np.random.default_rng(2).standard_normal(1_000_000).astype(np.float32)  # 4 MB
                proxy.cut_after(1_500_000)  # mid-upload
                handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"params": {"w": w}}),
                                         experiment_id="exp", round=1, inactivity_timeout=120)
                result = await handle.result(timeout=30)
                instance = server.registry.get("site-a").instance_id
        finally:
            await proxy.stop()
            await server.stop(grace=1)
        return result, w, instance, client

    result, w, instance, client = arun(scenario())
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    np.testing.assert_array_equal(result.payload["params"]["w"], 2 * w)
    assert client.sessions == 2 and instance == client.registration.instance_id  # registered twice, one id
    assert re.fullmatch(r"[0-9a-f]{32}", instance)
    assert any("resuming the upload" in r.getMessage() for r in caplog.records)


# -- real fednode processes -------------------------------------------------------------------------------
SITES = least_squares_sites(2)
ARGS = {"num_updates": 5, "batch_size": 16, "lr": 0.05}


def test_a_node_process_killed_mid_task_and_started_again_ends_its_task_at_once(tmp_path: Path) -> None:
    """site-0 is SIGKILLed while its handler runs round 1 and started again at once. Grace 60 s, round
    timeout 120 s: the old task ends FAILED ("restarted") when the new process registers, round 1 goes on
    with site-1, and the new process trains round 2."""

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(2))
            for i in range(2):
                fed.start_node(i, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1"])
            registry = fed.server.registry
            fed.server.board.reconnect_grace = 60.0
            first = registry.get("site-0").instance_id
            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=2, dataset_tags=["lsq"],
                             min_nodes=1, round_timeout=120, node_wait_timeout=30, server=fed.server,
                             progress=False)
            running_exp = asyncio.create_task(exp.run_async())
            try:
                old_task = await fed.wait_task("site-0", TaskState.RUNNING, round=1)
                await fed.wait_task("site-1", TaskState.RUNNING, round=1)
                fed.nodes["site-0"].kill()
                killed = time.monotonic()
                fed.open_gate("all")  # site-1 finishes round 1; the new site-0 process trains freely
                fed.start_node(0, gate=fed.gate_dir)
                result = await old_task.result(timeout=45)
                ended = time.monotonic() - killed
                second = registry.get("site-0").instance_id
                reports = await asyncio.wait_for(running_exp, 60)
            finally:
                running_exp.cancel()
            return first, second, result, ended, reports, fed.logs()

    first, second, result, ended, reports, logs = asyncio.run(asyncio.wait_for(scenario(), 150))
    assert result.outcome is TaskState.FAILED, (result, logs)
    assert re.fullmatch(r"[0-9a-f]{32}", first) and second != first
    assert RESTARTED.fullmatch(result.error_message).groups() == ("site-0", second, first, "running")
    assert ended < 30, (ended, logs)  # the new process's start-up; the grace is 60 s, the timeout 120 s
    outcomes = {o.node_id: o for o in reports[0].outcomes}
    assert [outcomes[n].outcome for n in sorted(outcomes)] == ["failed", "succeeded"]
    assert "restarted" in outcomes["site-0"].error
    assert reports[1].succeeded == ["site-0", "site-1"], logs  # the new process got and did a fresh task
