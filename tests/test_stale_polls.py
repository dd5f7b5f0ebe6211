"""A poll of an abandoned connection that reaches the server late is refused by its ``poll_sequence``.

A node process numbers its polls (``PollTaskRequest.poll_sequence``: 1, 2, ... across its connections); the
server keeps the highest seen from the node's current process (:meth:`NodeRegistry.check_poll_sequence`,
kept across a Register of the same instance, forgotten at another's) and refuses a poll that does not exceed
it with ABORTED, ERROR_REASON_STALE_POLL, before anything else: its ``held_task_ids`` (older than the newer
poll's) would otherwise send the task that poll delivered back to the queue (trained twice), and it could
take a task into a connection nobody reads. docs/protocol.md §5 "Stale polls".

Unit level on :class:`NodeRegistry`; over real grpc.aio on loopback with raw-stub nodes (one channel per
connection of the process); fednode against the fake service (its counter grows across reconnects, and a
stale refusal is only a dead call).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from fake_node_service import FakeNodeService, FakeTask, arun, node_config, running, start_server
from server_testkit import PolledTask, ServerKit, WireNode, async_test, running_server
from test_lost_delivery import LOST

from fedcore.errors import ConnectionLostError, StalePollError
from fedcore.framing import OutgoingPayload
from fedcore.wire import DatasetInfo, NodeRegistration, TaskKind, convert
from fedcore.wire.metadata_keys import REASON_METADATA_KEY
from fednode.client import NodeClient
from fednode.handler import EchoHandler
from fednode.transport import RETRYABLE_REASONS, translate
from fedserver.registry import NodeRegistry
from fedserver.tasks import TaskHandle, TaskState

X, Y = "a" * 32, "b" * 32  # instance ids of two processes of node n
STALE = (grpc.StatusCode.ABORTED, "ERROR_REASON_STALE_POLL")


def _registration(instance: str) -> NodeRegistration:
    return NodeRegistration("site", (DatasetInfo("d", ("t",), 3, (3, 1), "<f4", "npz"),), (), "test/1",
                            instance_id=instance)


# -- unit level ---------------------------------------------------------------------------------------------
def test_the_registry_keeps_the_highest_sequence_of_the_current_process() -> None:
    registry = NodeRegistry(liveness_timeout=10)
    registry.check_poll_sequence("n", X, 5)  # unknown node: nothing to compare with, nothing kept
    registry.register("n", _registration(X))
    registry.check_poll_sequence("n", X, 2)
    registry.check_poll_sequence("n", X, 3)
    for stale in (3, 2, 1):  # equal or lower: stale
        with pytest.raises(StalePollError, match=f"its poll_sequence {stale} is not greater than 3, the highest "
                                                 f"this process \\(instance {X}\\) has sent"):
            registry.check_poll_sequence("n", X, stale)
    registry.check_poll_sequence("n", X, 0)  # not sent (an older node): never stale
    registry.check_poll_sequence("n", "", 1)  # a call naming no process: not checked
    registry.check_poll_sequence("n", Y, 1)  # not the registered process (check_instance refuses it)
    registry.register("n", _registration(X))  # the same process on a new connection: the order holds
    with pytest.raises(StalePollError):
        registry.check_poll_sequence("n", X, 3)
    registry.check_poll_sequence("n", X, 4)
    registry.register("n", _registration(Y))  # a new process: it starts again at 1
    registry.check_poll_sequence("n", Y, 1)
    assert registry.get("n").poll_sequence == 1


# -- over real gRPC ------------------------------------------------------------------------------------------
async def _poll(node: WireNode, sequence: int, held: list[str] | None, wait: float = 0.2,
                instance: str = X) -> PolledTask:
    """One poll of process ``instance`` numbered ``sequence`` (0: not sent), reporting ``held``."""
    request = convert.poll_request_to_pb(wait, held_task_ids=held, poll_sequence=sequence)
    return await node.poll(request=request, instance=instance)


async def _refused(node: WireNode, sequence: int, held: list[str] | None) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _poll(node, sequence, held)
    reason = dict(err.value.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")
    return err.value.code(), reason, err.value.details() or ""


def _dispatch(kit: ServerKit, name: str) -> TaskHandle:
    return kit.server.dispatch("n", TaskKind.TRAIN, OutgoingPayload.from_bytes(name.encode() * 1000, 16 << 10),
                               experiment_id="e", round=1, inactivity_timeout=120)


async def _connection(kit: ServerKit, token: str) -> WireNode:
    """A new connection of process X, registered on it (the same instance again after the first)."""
    node = kit.node(token=token)
    await node.register(instance_id=X)
    return node


@async_test
async def test_a_late_poll_of_an_abandoned_connection_is_refused_and_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Poll 2 of process X, sent on its first connection, arrives after the process registered again and
    its poll 3 delivered task T on a new connection: refused STALE_POLL; T stays RUNNING (its empty held
    list would have queued T again), a queued task stays queued, the open poll 4 goes on and gets it."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        token = kit.store.enroll("n")
        first = await _connection(kit, token)
        assert (await _poll(first, 1, held=[])).no_task
        second = await _connection(kit, token)  # the process came back on a new connection
        t = _dispatch(kit, "t")
        got = await _poll(second, 3, held=[])
        assert got.descriptor is not None and got.descriptor.task_id == t.task_id
        assert t.state is TaskState.RUNNING and t.delivered_to == X
        sent, generation = t.bytes_sent, kit.server.board.poll_generation("n")
        waiting = asyncio.create_task(_poll(second, 4, held=[t.task_id], wait=10))
        await asyncio.sleep(0.2)  # poll 4 is open and waiting
        last_seen = kit.server.registry.get("n").last_seen
        with caplog.at_level(logging.WARNING, logger="fedserver.task_board"):
            code, reason, details = await _refused(first, 2, held=[])  # the late poll, older than 3 and 4
            assert (code, reason) == STALE
            assert "its poll_sequence 2 is not greater than 4" in details and f"instance {X}" in details
            assert await _refused(second, 4, held=[]) == (*STALE, details.replace("sequence 2", "sequence 4"))
        assert kit.server.registry.get("n").last_seen == last_seen  # no sign of life: it says nothing of now
        assert t.state is TaskState.RUNNING and t.bytes_sent == sent and t.delivered_to == X  # not queued again
        assert LOST not in caplog.text
        assert kit.server.board.poll_generation("n") == generation and not waiting.done()  # no poll ended
        u = _dispatch(kit, "u")
        polled = await asyncio.wait_for(waiting, 10)
        assert polled.descriptor is not None and polled.descriptor.task_id == u.task_id  # poll 4 took it
        assert (await _poll(second, 5, held=[t.task_id, u.task_id])).no_task


@async_test
async def test_a_new_process_starts_again_at_one_and_polls_without_a_sequence_are_never_stale(
        tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        old = await _connection(kit, token)
        assert (await _poll(old, 7, held=[])).no_task
        new = kit.node(token=token)
        await new.register(instance_id=Y)  # another process of the node
        assert (await _poll(new, 1, held=[], instance=Y)).no_task
        assert (await _poll(new, 2, held=[], instance=Y)).no_task
        legacy = kit.node(token=token)  # an older node: no instance id, no sequence
        await legacy.register()
        for _ in range(2):
            assert (await legacy.poll(wait=0.1)).no_task


@async_test
async def test_without_a_sequence_a_late_poll_still_sends_the_task_again(tmp_path: Path) -> None:
    """The gap the sequence closes, as it stays for nodes that do not send one: the late poll's empty held
    list takes the task the process runs for lost, and the server queues it again."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        token = kit.store.enroll("n")
        first = await _connection(kit, token)
        second = await _connection(kit, token)
        t = _dispatch(kit, "t")
        assert (await _poll(second, 0, held=[])).descriptor is not None
        again = await _poll(first, 0, held=[])  # late, but nothing tells it from a current poll
        assert again.descriptor is not None and again.descriptor.task_id == t.task_id


# -- fednode ---------------------------------------------------------------------------------------------------
def test_the_node_takes_a_stale_poll_for_a_dead_call() -> None:
    trailer = grpc.aio.Metadata((REASON_METADATA_KEY, "ERROR_REASON_STALE_POLL"))
    error = translate(grpc.aio.AioRpcError(grpc.StatusCode.ABORTED, grpc.aio.Metadata(), trailer, details="x"),
                      "PollTask")
    assert type(error) is ConnectionLostError and error.reason == "ERROR_REASON_STALE_POLL"
    assert "ERROR_REASON_STALE_POLL" in RETRYABLE_REASONS


def test_fednode_numbers_its_polls_across_reconnects_and_polls_again_after_a_stale_refusal() -> None:
    """Every poll carries the next number of the client (never reset by a new connection); a poll refused
    STALE_POLL is made again at once, on the same connection; the node neither stops nor drops its task."""

    async def scenario() -> tuple[FakeNodeService, NodeClient]:
        service = FakeNodeService()
        service.refuse_polls = [None, (grpc.StatusCode.UNAVAILABLE, "connection cut by the test"),
                                (grpc.StatusCode.ABORTED, "stale PollTask of node n1: ...", "ERROR_REASON_STALE_POLL")]
        server, port = await start_server(service)
        client = NodeClient(node_config(port, poll_wait_seconds=0.2), EchoHandler())
        try:
            async with running(client):
                await service.wait_for(lambda: len(service.polls) >= 3 and len(service.registrations) >= 2)
                service.add_task(FakeTask("t1", OutgoingPayload.from_object({"w": list(range(10))}, 1 << 16)))
                await service.wait_results(1)
                await service.wait_for(lambda: len(service.polls) >= 7)
        finally:
            await server.stop(None)
        return service, client

    service, client = arun(scenario())
    sequences = [p.poll_sequence for p in service.polls]
    assert sequences == list(range(1, len(sequences) + 1)), sequences
    assert len(service.registrations) == 2 and client.sessions == 2  # the stale refusal did not reconnect
    assert service.results["t1"].complete

