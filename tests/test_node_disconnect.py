"""A node whose PollTask stream drops is disconnected at once; one that merely polls again never flaps.

Over real grpc.aio on loopback (the raw-stub test node of :mod:`server_testkit`, the real
:class:`fednode.client.NodeClient`) and with a real ``fednode start`` process killed with SIGKILL. The
server's liveness window is long in these tests (30 s polls), so "disconnected within 1 s" can only
come from the dropped stream.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from e2e_support import Federation, eventually, least_squares_sites
from fake_node_service import node_config, running
from server_testkit import async_test, running_server, version

from fedcore.framing import OutgoingPayload
from fedcore.wire import NodeRegistration, TaskKind
from fednode.client import NodeClient
from fednode.handler import EchoHandler
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.registry import NodeRegistry
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import node_service_pb2 as pb

LONG_POLL = {"max_poll_wait_seconds": 30.0, "heartbeat_interval_seconds": 10.0}  # liveness window 50 s


def test_a_dropped_poll_disconnects_unless_another_poll_is_open() -> None:
    registry = NodeRegistry(liveness_timeout=60.0)
    registry.register("a", NodeRegistration("A"))
    registry.poll_opened("a")
    registry.poll_closed("a")  # a normal end: connected while it polls again
    assert registry.connected() == ["a"]
    registry.poll_opened("a")
    registry.poll_opened("a")
    registry.poll_closed("a", dropped=True)  # the other poll is still open
    assert registry.connected() == ["a"]
    registry.poll_closed("a", dropped=True)
    record = registry.get("a")
    assert registry.connected() == [] and registry.node_infos() == []
    assert record.drops == 2 and record.dropped_at is not None
    registry.touch("a")  # any authenticated call: alive again
    assert registry.connected() == ["a"] and record.dropped_at is None
    registry.poll_opened("a")
    registry.poll_closed("a", dropped=True)
    registry.register("a", NodeRegistration("A"))  # a reconnecting node registers first
    assert registry.connected() == ["a"] and registry.get("a").drops == 3


@async_test
async def test_closed_channel_disconnects_at_once_and_a_queued_task_waits(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LONG_POLL) as kit:
        token = kit.store.enroll("a")
        node = kit.node(token=token)
        await node.register()
        other = await kit.registered_node("b")
        polls = [asyncio.create_task(n.poll(wait=30)) for n in (node, other)]
        await eventually(lambda: kit.server.registry.get("a").open_polls == 1, 5, "a's poll open")
        await node.channel.close(grace=None)  # abrupt: the call is cancelled, as when the process dies
        # at once: the dropped poll, not the 50 s liveness window (5 s leaves slack for a loaded machine)
        await eventually(lambda: not kit.server.registry.get("a").connected, 5.0, "a disconnected")
        assert kit.server.registry.connected() == ["b"]
        assert [i.node_id for i in kit.server.registry.node_infos()] == ["b"]  # what rounds select from

        # a task dispatched to it meanwhile is kept for it, and delivered when it comes back
        data = np.arange(1000, dtype=np.float32).tobytes()
        handle = kit.server.dispatch("a", TaskKind.TRAIN, OutgoingPayload.from_bytes(data, 1024),
                                     experiment_id="e", round=1, inactivity_timeout=30)
        assert handle.state is TaskState.QUEUED and handle.task_id in kit.server.registry.get("a").in_flight
        back = kit.node(token=token)  # the node restarted: a new connection, same identity
        await back.register()
        assert kit.server.registry.get("a").connected
        got = await back.poll(wait=5)
        assert got.descriptor.task_id == handle.task_id and b"".join(d for _, d in got.chunks) == data
        assert handle.state is TaskState.RUNNING
        polls[0].cancel()
        await asyncio.gather(polls[0], return_exceptions=True)
        kit.server.board.stop()  # ends b's long poll
        await asyncio.wait_for(polls[1], 5)


@async_test
async def test_a_download_broken_midway_disconnects_and_keeps_the_task_queued(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LONG_POLL) as kit:
        node = await kit.registered_node("a")
        payload = OutgoingPayload.from_bytes(bytes(8 << 20), 64 << 10)  # far beyond the HTTP/2 windows
        handle = kit.server.dispatch("a", TaskKind.TRAIN, payload, experiment_id="e", round=1)
        call = node.stub.PollTask(pb.PollTaskRequest(version=version(), wait_seconds=30), metadata=node.metadata)
        await call.read()  # the header: the server is streaming
        await node.channel.close(grace=None)
        await eventually(lambda: not kit.server.registry.get("a").connected, 1.0, "a disconnected")
        await eventually(lambda: handle.senders == 0, 5, "the broken stream released")
        assert handle.state is TaskState.QUEUED and kit.server.board.open_tasks("a") == [handle]


def test_a_node_that_polls_again_never_flaps(tmp_path: Path) -> None:
    """fednode's client cancels each poll once it has read NoTask: that must not count as a drop."""

    async def scenario() -> tuple[int, list[float], int]:
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        config = ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=0.02, heartbeat_interval_seconds=0.5)
        server = FedServer(config, store)
        port = await server.start()
        client = NodeClient(node_config(port, token=token, poll_wait_seconds=0.02), EchoHandler())
        gaps: list[float] = []  # when the server saw the node disconnected
        results = []
        try:
            async with running(client):
                await server.wait_for_nodes(1, timeout=10)
                record = server.registry.get("site-a")
                payload = server.encode_payload({"x": np.ones(10_000, np.float32)})
                start = time.monotonic()
                while (elapsed := time.monotonic() - start) < 3.0:  # ~100 polls (20 ms), sampled every ms
                    if not record.connected:
                        gaps.append(elapsed)
                    if elapsed > 0.5 + len(results):  # a task at 0.5, 1.5 and 2.5 s: polls that stream one
                        handle = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="e",
                                                 round=len(results) + 1)
                        results.append(await handle.result(timeout=10))
                    await asyncio.sleep(0.001)
                drops = record.drops  # before the client stops (its last poll is then cancelled: a drop)
        finally:
            await server.stop(grace=1)
        return drops, gaps, [r.outcome for r in results]

    drops, gaps, outcomes = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert outcomes == [TaskState.SUCCEEDED] * 3 and drops == 0 and gaps == []


def test_killed_node_process_is_disconnected_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Federation(tmp_path, least_squares_sites(2), heartbeat_interval=10.0) as fed:
            # Federation's liveness window: 2 s polls + 2 x 10 s heartbeats = 22 s
            fed.prepare(range(2))
            fed.start_node(0)
            fed.start_node(1)
            await fed.wait_registered(["site-0", "site-1"])
            registry = fed.server.registry
            watch_until = time.monotonic() + 4.5  # both re-poll twice (2 s polls): never disconnected
            while time.monotonic() < watch_until:
                assert registry.connected() == ["site-0", "site-1"], fed.logs()
                await asyncio.sleep(0.005)
            await eventually(lambda: registry.get("site-0").open_polls == 1, 5, "site-0 polling")
            fed.nodes["site-0"].kill()
            # at once: the dropped poll, not the 22 s liveness window (5 s leaves slack for a loaded machine)
            await eventually(lambda: registry.connected() == ["site-1"], 5.0, "site-0 disconnected", fed.logs)
            assert [r.drops for r in registry.nodes()] == [1, 0]

    asyncio.run(asyncio.wait_for(scenario(), 60))

