"""A node the server has no registration of is asked to register again: ERROR_REASON_UNKNOWN_NODE.

A server restarted while a node trained used to accept that node's heartbeats, reports and polls (its token
or certificate is enrolled) without counting it as connected (no Register: datasets unknown): a resumed run
waited out --node-wait with "only 0 connected node(s)" while the node polled and got NoTask forever. Now
every call but Register from a node this server process has no registration of is refused NOT_FOUND with
the reason ERROR_REASON_UNKNOWN_NODE and a message saying what to do, after the identity and version checks;
fednode registers again on its channel and retries the call, so a training node shows up, with its datasets,
at its next heartbeat, and learns there that the restarted server knows nothing of its task.

Over real grpc.aio on loopback: raw-stub nodes of :mod:`server_testkit`, and the real NodeClient across a
restart of the server on the same port (reconnect grace and inactivity timeouts long, so what happens within
seconds is the re-registration at work).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import arun, node_config, running
from server_testkit import WireNode, async_test, running_server, version
from test_node_client_fedserver import server_config

from fedcore.wire import DatasetInfo, LogLine, ReportEvent, TaskKind, TaskOutcome
from fednode.client import ClientState, NodeClient
from fednode.handler import TaskReply
from fednode.transport import INSTANCE_METADATA_KEY
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import node_service_pb2 as pb

UNKNOWN = "node n has not registered with this server (it restarted?): register again"
INSTANCE = "c" * 32


def reason(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("fedstream-error-reason", "")


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def every_call(node: WireNode, task_id: str) -> dict[str, object]:
    """Each NodeService call but Register, as a fresh awaitable (a heartbeat and a report with and without a task)."""
    line = [ReportEvent(time.time(), LogLine("INFO", "hello"))]
    return {"PollTask": node.poll(wait=0.2), "Heartbeat": node.heartbeat(),
            "Heartbeat naming a task": node.heartbeat(task_id), "Report": node.report("", line),
            "Report naming a task": node.report(task_id, line), "UploadResult": node.upload(task_id, b"result"),
            "UploadResult FAILED": node.upload(task_id, outcome=TaskOutcome.FAILED, error_message="x"),
            "GetUploadStatus": node.status(task_id)}


@async_test
async def test_every_call_of_a_node_that_has_not_registered_is_refused_until_it_registers(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = kit.node("n")
        for what, call in every_call(node, "t" * 32).items():
            err = await refused(call)
            assert (err.code(), reason(err), err.details()) == (
                grpc.StatusCode.NOT_FOUND, "ERROR_REASON_UNKNOWN_NODE", UNKNOWN), what
        assert "n" not in kit.server.registry and kit.server.registry.connected() == []

        await node.register(name="site n")
        assert kit.server.registry.connected() == ["n"]
        handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"round": 1}),
                                     experiment_id="e", round=1)
        assert (await node.poll(wait=1)).descriptor.task_id == handle.task_id
        assert (await node.heartbeat()).task_state == pb.TASK_STATE_UNSPECIFIED  # nothing asked about a task
        assert (await node.heartbeat(handle.task_id)).task_state == pb.TASK_STATE_ACTIVE
        await node.report(handle.task_id, [ReportEvent(time.time(), LogLine("INFO", "training"))])
        assert (await node.status(handle.task_id)).acknowledged_offset == 0
        await node.upload(handle.task_id, kit.server.encode_payload({"w": 1}))
        assert (await handle.result(timeout=5)).outcome is TaskState.SUCCEEDED
        assert (await node.poll(wait=0.2)).no_task
        # and what is refused after the Register is about the task now, never about the node
        for what, call in every_call(node, "u" * 32).items():
            try:
                await call
            except grpc.aio.AioRpcError as err:
                assert reason(err) == "ERROR_REASON_UNKNOWN_TASK", (what, err.details())


@async_test
async def test_identity_version_and_metadata_are_checked_before_the_registration(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        kit.store.enroll("n")
        stranger = kit.node(token="no-such-token")
        err = await refused(stranger.heartbeat())
        assert (err.code(), reason(err)) == (grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_UNAUTHENTICATED")

        node = kit.node("m")
        request = pb.HeartbeatRequest(version=version(major=99))
        err = await refused(node.stub.Heartbeat(request, metadata=node.metadata, timeout=10))
        assert (err.code(), reason(err)) == (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_VERSION_MISMATCH")

        node.metadata = (*node.metadata, (INSTANCE_METADATA_KEY, "not an id"))
        err = await refused(node.heartbeat())
        assert (err.code(), reason(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_MALFORMED_MESSAGE")


@async_test
async def test_a_node_process_registered_with_an_earlier_server_is_told_to_register_again(tmp_path: Path) -> None:
    """The same process (instance id in its metadata, its polls numbered) after a restart of the server: refused
    UNKNOWN_NODE, not superseded nor stale; once registered again its next poll number is accepted."""
    async with running_server(tmp_path) as kit:
        node = kit.node("n")
        node.metadata = (*node.metadata, (INSTANCE_METADATA_KEY, INSTANCE))
        request = pb.PollTaskRequest(version=version(), wait_seconds=0.2, poll_sequence=7, reports_held_tasks=True,
                                     held_task_ids=["t" * 32])
        err = await refused(node.poll(request=request))
        assert (err.code(), reason(err), err.details()) == (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_UNKNOWN_NODE",
                                                            UNKNOWN)
        await node.register(instance_id=INSTANCE)
        assert (await node.poll(request=request)).no_task
        assert kit.server.registry.get("n").poll_sequence == 7


class HeldTrainer:
    """Trains (sends nothing but heartbeats) until the test releases it; records whether its task was cancelled."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.cancelled: list[bool] = []

    def handle(self, task, reporter):
        if task.round == 1:
            self.started.set()
            assert self.release.wait(30), "never released"
            self.cancelled.append(reporter.cancelled)
        return TaskReply.succeeded({"round": task.round})


def test_a_training_node_registers_again_at_its_next_heartbeat_after_a_server_restart(tmp_path, caplog):
    """The user's walk-through in one process: the server restarts on the same port while the node trains (no
    stream is open: nothing breaks on the node's side). Its next heartbeat is refused UNKNOWN_NODE, the
    connection registers again (datasets and all) while the handler still runs, the retried heartbeat learns
    that the restarted server knows no such task (the result is dropped), and the node serves the new server."""
    caplog.set_level(logging.INFO, logger="fednode.client")
    datasets = [DatasetInfo("lsq", ("lsq", "train"), 40, (40, 3), "float32", "npz")]

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("n")
        first = FedServer(server_config(), store)  # heartbeats every 0.5 s
        port = await first.start()
        trainer = HeldTrainer()
        client = NodeClient(node_config(port, token=token, node_name="Site N"), trainer, datasets)
        async with running(client):
            await first.wait_for_nodes(1, timeout=10)
            first.dispatch("n", TaskKind.TRAIN, first.encode_payload({"round": 1}), experiment_id="e", round=1)
            await eventually(trainer.started.is_set, 10, "the handler to start")
            await first.stop(grace=0.5)
            second = FedServer(server_config(port=port), store)
            await second.start()
            try:
                started = time.monotonic()
                assert await second.wait_for_nodes(1, timeout=5) == ["n"]
                seen_after = time.monotonic() - started
                assert client.state is ClientState.RUNNING and not trainer.release.is_set()  # still training
                record = second.registry.get("n")
                assert (record.name, record.datasets, record.instance_id) == (
                    "Site N", tuple(datasets), client.registration.instance_id)
                reporter = client._execution._reporter
                await eventually(lambda: reporter is not None and reporter.cancelled, 5,
                                 "the heartbeat after the Register to tell the task is unknown")
                trainer.release.set()
                handle = second.dispatch("n", TaskKind.TRAIN, second.encode_payload({"round": 2}),
                                         experiment_id="e", round=2)
                result = await handle.result(timeout=10)
            finally:
                await second.stop(grace=1)
        assert seen_after < 3, seen_after
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"round": 2}
        assert trainer.cancelled == [True]
        assert client.sessions == 2  # the first session's Register, and the one its heartbeat made
        assert "registered again as n: the server no longer knew this node (it restarted?)" in caplog.text
        assert "task_state UNKNOWN" in caplog.text

    arun(scenario())


def test_a_result_finished_after_a_server_restart_is_dropped_as_after_a_restart_between_rounds(tmp_path,
                                                                                              caplog) -> None:
    """No heartbeat falls in the training (its interval is long): the result's upload is the first call to reach
    the restarted server. Refused UNKNOWN_NODE (a stream: the session ends), the node reconnects, registers, and
    learns that the task is unknown there: the result is dropped, nothing stays pending, the node serves on."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("n")
        first = FedServer(server_config(heartbeat_interval_seconds=60.0), store)
        port = await first.start()
        trainer = HeldTrainer()
        client = NodeClient(node_config(port, token=token), trainer)
        async with running(client):
            await first.wait_for_nodes(1, timeout=10)
            first.dispatch("n", TaskKind.TRAIN, first.encode_payload({"round": 1}), experiment_id="e", round=1)
            await eventually(trainer.started.is_set, 10, "the handler to start")
            await first.stop(grace=0.5)
            second = FedServer(server_config(port=port), store)
            await second.start()
            try:
                trainer.release.set()
                assert await second.wait_for_nodes(1, timeout=5) == ["n"]
                handle = second.dispatch("n", TaskKind.TRAIN, second.encode_payload({"round": 2}),
                                         experiment_id="e", round=2)
                result = await handle.result(timeout=10)
            finally:
                await second.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"round": 2}
        assert trainer.cancelled == [False]  # nothing told it during the training
        assert client._upload is None and client.results_delivered == 1  # round 2's; round 1's dropped
        assert "UploadResult failed with NOT_FOUND: " + UNKNOWN in caplog.text
        assert "dropped" in caplog.text and "no task with id" in caplog.text, caplog.text

    arun(scenario())
