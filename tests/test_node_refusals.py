"""How fednode answers a poll the server refuses or aborts, before or after the task header.

The server names each refusal in the trailer ``fedstream-error-reason``; the node decides by it, by the
status code when there is none (an older server), never by the status message.

* A refusal of one task (TASK_CLOSED, UNKNOWN_TASK, TASK_NOT_SENT_TO_NODE), on a resumed poll or in the
  middle of a download (a round cancelling a slow node): the node drops that task, its partial buffer goes
  back to the receive pool, and it polls again on the same connection.
* A refusal that ends the node (:func:`fednode.transport.fatal_refusal`: UNAUTHENTICATED, VERSION_MISMATCH,
  NODE_SUPERSEDED: a poll of a process a newer one replaced) ends ``run()`` with it, wherever it comes: a
  fresh poll, a resumed poll, mid-download.
* ABORTED (the server ends a stale poll and asks for another): the node polls again at once, resuming a
  partial download; a second ABORTED in a row counts as a lost connection (reconnect with backoff).

The real FedServer on loopback where a scenario can be staged there (through a proxy that holds the
server's bytes back mid-download); the fake NodeService for the statuses the real server sends only in
races (a resumed poll superseded before its header, ABORTED).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from fake_node_service import (
    FakeNodeService,
    FakeTask,
    arun,
    node_config,
    run_until_refused,
    run_until_t1_done,
    running,
    start_server,
)
from server_testkit import WireNode, channel_options
from tcp_proxy import PausingProxy
from test_node_client_fedserver import Trainer, server_config

from fedcore.errors import ServerRefusedError
from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind
from fednode.client import ClientState, NodeClient
from fednode.handler import EchoHandler
from fednode.transport import superseded
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskState

CHUNK = 64 * 1024
NEW = "b" * 32
SUPERSEDED = re.compile(r"PollTask stream of node (\S+) superseded by a newer instance of the node: instance (\S+) "
                        r"registered at \d\d:\d\d:\d\d\.\d{3} in place of instance (\S+); this stream belongs to "
                        r"an earlier process")
#: What the real server sends (fedserver.task_board.TaskBoard.node_restarted), for the fake service.
SUPERSEDED_MESSAGE = ("PollTask stream of node node-n1 superseded by a newer instance of the node: instance "
                      f"{NEW} registered at 10:11:12.345 in place of instance {'a' * 32}; this stream belongs to "
                      "an earlier process")
SUPERSEDED_STATUS = (grpc.StatusCode.FAILED_PRECONDITION, SUPERSEDED_MESSAGE, "ERROR_REASON_NODE_SUPERSEDED")


# -- the real FedServer ---------------------------------------------------------------------------------
def _big_params(seed: int) -> dict:
    """32 MB: more than the HTTP/2 window and socket buffers hold, so the server is still sending when the
    proxy pauses (each test checks the node saw the stream end mid-task)."""
    return {"params": {"w": np.random.default_rng(seed).standard_normal(8 << 20).astype(np.float32)}}


async def _register_new_process(port: int, token: str) -> None:
    """Another process of the node registers (another instance id), straight to the server."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    try:
        await WireNode(channel, token).register(instance_id=NEW)
    finally:
        await channel.close()


def test_a_task_cancelled_while_the_node_downloads_it_is_dropped_and_the_next_task_runs(
        tmp_path: Path, caplog) -> None:
    """A round cancels the slow node's task mid-download: the server ends the stream FAILED_PRECONDITION
    "no longer accepted". The node drops the task (its buffer back to the pool), keeps its session, polls
    again and trains the next task, received into the same buffer."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        proxy = PausingProxy(port)
        client = NodeClient(node_config(await proxy.start(), token=token), Trainer())
        try:
            async with running(client) as run:
                await server.wait_for_nodes(1, timeout=10)
                proxy.pause_after(1 << 20)
                first = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload(_big_params(1)),
                                        experiment_id="exp", round=1, inactivity_timeout=60)
                await asyncio.wait_for(proxy.paused.wait(), 10)
                state = client.state
                first.cancel("round cancelled by the test")
                proxy.resume()
                sent = _big_params(2)
                second = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload(sent),
                                         experiment_id="exp", round=2, inactivity_timeout=60)
                result = await second.result(timeout=60)
                still_running = not run.done()
                stats = client.receive_pool.stats()
        finally:
            await proxy.stop()
            await server.stop(grace=1)
        return state, first, result, sent, still_running, stats, client

    state, first, result, sent, still_running, stats, client = arun(scenario(), timeout=120)
    assert state is ClientState.DOWNLOADING
    assert first.state is TaskState.CANCELLED
    dropped = [r.getMessage() for r in caplog.records if "dropped, the server refused it" in r.getMessage()]
    reason = f"task {first.task_id} is no longer accepted (round cancelled by the test)"
    assert dropped == [f"n1: task {first.task_id} dropped, the server refused it: {reason}; polling again"], caplog.text
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    np.testing.assert_array_equal(result.payload["params"]["w"], 2 * sent["params"]["w"])
    assert still_running and client.sessions == 1  # a refusal of one task: no reconnect, no exit
    assert stats.reused >= 1  # the dropped download's buffer went back to the pool and held the next task
    assert "reconnecting" not in caplog.text


def test_a_node_superseded_while_it_waits_in_its_poll_stops(tmp_path: Path) -> None:
    """Another process of the node registers while this one waits in its long poll: the server ends the
    poll "superseded"; run() ends with that refusal at once instead of polling again."""

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(max_poll_wait_seconds=30.0), store)
        port = await server.start()
        client = NodeClient(node_config(port, token=token, poll_wait_seconds=30.0), EchoHandler())
        run = asyncio.create_task(client.run())
        try:
            await eventually(lambda: "site-a" in server.registry and server.registry.get("site-a").open_polls == 1,
                             10, "the node's long poll")
            await _register_new_process(port, token)
            with pytest.raises(ServerRefusedError) as err:
                await asyncio.wait_for(asyncio.shield(run), 5)
            open_polls = server.registry.get("site-a").open_polls
        finally:
            client.stop()
            await asyncio.gather(run, return_exceptions=True)
            await server.stop(grace=1)
        return err.value, client, open_polls

    error, client, open_polls = arun(scenario())
    assert superseded(error) and error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert SUPERSEDED.fullmatch(error.details).groups() == ("site-a", NEW, client.registration.instance_id)
    assert client.state is ClientState.STOPPED and open_polls == 0  # it did not poll again


def test_a_node_superseded_mid_download_stops(tmp_path: Path, caplog) -> None:
    """The new process registers while the old one downloads a task: the server fails the task
    ("restarted") and ends the stream "superseded" before its next chunk; run() ends with that refusal."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        proxy = PausingProxy(port)
        client = NodeClient(node_config(await proxy.start(), token=token), Trainer())
        run = asyncio.create_task(client.run())
        try:
            await server.wait_for_nodes(1, timeout=10)
            proxy.pause_after(1 << 20)
            handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload(_big_params(3)),
                                     experiment_id="exp", round=1, inactivity_timeout=60)
            await asyncio.wait_for(proxy.paused.wait(), 10)
            state = client.state
            await _register_new_process(port, token)
            proxy.resume()
            with pytest.raises(ServerRefusedError) as err:
                await asyncio.wait_for(asyncio.shield(run), 10)
            result = await handle.result(timeout=5)
        finally:
            client.stop()
            await asyncio.gather(run, return_exceptions=True)
            await proxy.stop()
            await server.stop(grace=1)
        return state, err.value, result, client

    state, error, result, client = arun(scenario(), timeout=90)
    assert state is ClientState.DOWNLOADING
    assert superseded(error)
    assert SUPERSEDED.fullmatch(error.details).groups() == ("site-a", NEW, client.registration.instance_id)
    assert result.outcome is TaskState.FAILED and "restarted" in result.error_message
    assert "dropped, the server refused it" not in caplog.text


# -- the fake service: statuses the real server sends only in races ----------------------------------------
def _payload() -> OutgoingPayload:
    return OutgoingPayload.from_object({"w": np.arange(300_000, dtype=np.float32)}, CHUNK)  # ~1.2 MB, 19 chunks


def test_a_node_superseded_on_a_resumed_poll_stops() -> None:
    """The download breaks; the poll resuming it is refused "superseded" (before the TaskHeader) and ends
    run(): FAILED_PRECONDITION on a resumed poll is "cannot resume, poll afresh" except for that."""

    async def scenario():
        service = FakeNodeService()
        service.break_download_after = 3
        service.refuse_resumes.append(SUPERSEDED_STATUS)
        return service, await run_until_refused(service, _payload())

    service, error = arun(scenario())
    assert superseded(error) and error.details == SUPERSEDED_MESSAGE
    assert [(p.resume_task_id, p.resume_offset) for p in service.polls] == [("", 0), ("t1", 3 * CHUNK)]
    assert service.results == {}


def test_without_reasons_a_superseded_download_is_dropped_then_the_fresh_poll_refusal_stops_the_node() -> None:
    """An older server (no reason trailer) says "superseded" with FAILED_PRECONDITION only, which mid-download
    reads as "this task is gone": the node drops the download and polls afresh. That poll, about no task, is
    refused too, and any refusal of a fresh poll ends run(): the node stops one poll later, whatever the text."""

    async def scenario():
        service = FakeNodeService()
        service.break_download_after = 3
        service.break_download_status = SUPERSEDED_STATUS[:2]
        service.refuse_polls.extend([None, SUPERSEDED_STATUS[:2]])  # the first poll gets t1
        return service, await run_until_refused(service, _payload())

    service, error = arun(scenario())
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "")
    assert not superseded(error)  # the message says so, but only a reason counts
    assert [(p.resume_task_id, p.resume_offset) for p in service.polls] == [("", 0), ("", 0)]
    assert service.results == {}


@pytest.mark.parametrize("status", [
    (grpc.StatusCode.FAILED_PRECONDITION, "task t1 is no longer accepted (round cancelled)", "ERROR_REASON_TASK_CLOSED"),
    (grpc.StatusCode.NOT_FOUND, "no task with id 't1'", "ERROR_REASON_UNKNOWN_TASK"),
    (grpc.StatusCode.PERMISSION_DENIED, "task t1 was not sent to node node-n1", "ERROR_REASON_TASK_NOT_SENT_TO_NODE"),
    # the reason decides, not the message
    (grpc.StatusCode.FAILED_PRECONDITION, "superseded by a newer instance of the node", "ERROR_REASON_TASK_CLOSED"),
    # an older server (no reason): the code
    (grpc.StatusCode.FAILED_PRECONDITION, "task t1 is no longer accepted (round cancelled)"),
    (grpc.StatusCode.NOT_FOUND, "no task with id 't1'"),
    # a newer server's reason this node does not know: the code
    (grpc.StatusCode.PERMISSION_DENIED, "task t1 was not sent to node node-n1", "ERROR_REASON_FROM_THE_FUTURE"),
])
def test_a_task_refused_mid_download_is_dropped_and_the_node_polls_again(status, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fednode.client")
    details = status[1]

    async def scenario():
        service = FakeNodeService()
        service.break_download_after = 3
        service.break_download_status = status
        server, port = await start_server(service)
        client = NodeClient(node_config(port), EchoHandler())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_for(lambda: len(service.polls) >= 2)  # t1 refused, the node polls again
                service.add_task(FakeTask("t2", _payload()))
                await service.wait_results(1)
                stats = client.receive_pool.stats()
        finally:
            await server.stop(None)
        return service, client, stats

    service, client, stats = arun(scenario())
    assert list(service.results) == ["t2"]
    assert all(p.resume_task_id == "" for p in service.polls)  # nothing to resume: t1 was dropped
    assert len(service.registrations) == 1 and client.sessions == 1
    assert stats.reused == 1 and stats.allocated == 1  # t2 was received into t1's buffer
    assert f"n1: task t1 dropped, the server refused it: {details}; polling again" in caplog.text


@pytest.mark.parametrize("status", [
    SUPERSEDED_STATUS,
    (grpc.StatusCode.UNAUTHENTICATED, "token revoked", "ERROR_REASON_UNAUTHENTICATED"),
    (grpc.StatusCode.FAILED_PRECONDITION, "protocol version 2.0 is not supported", "ERROR_REASON_VERSION_MISMATCH"),
    (grpc.StatusCode.FAILED_PRECONDITION, "task t1 is no longer accepted", "ERROR_REASON_NODE_SUPERSEDED"),
    (grpc.StatusCode.UNAUTHENTICATED, "token revoked"),  # an older server: UNAUTHENTICATED is fatal by its code
])
def test_a_fatal_refusal_mid_download_ends_run(status) -> None:
    async def scenario():
        service = FakeNodeService()
        service.break_download_after = 3
        service.break_download_status = status
        return service, await run_until_refused(service, _payload())

    service, error = arun(scenario())
    code, details, *reason = status
    assert (error.code, error.details, error.reason) == (code, details, "".join(reason))
    assert len(service.polls) == 1


def test_an_aborted_poll_is_made_again_at_once_on_the_same_connection(caplog) -> None:
    """The server may end a stale poll of this very process with ABORTED: the node polls again (no new
    Register, no backoff) and gets the next task."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        service = FakeNodeService()
        service.refuse_polls.append((grpc.StatusCode.ABORTED, "stale poll of this node process"))
        return service, await run_until_t1_done(service, _payload())

    service, client = arun(scenario())
    assert list(service.results) == ["t1"] and len(service.polls) >= 2
    assert len(service.registrations) == 1 and client.sessions == 1
    assert "PollTask failed with ABORTED: stale poll of this node process; polling again" in caplog.text
    assert "reconnecting" not in caplog.text


def test_an_aborted_download_resumes_at_once_and_a_second_abort_reconnects(caplog) -> None:
    """ABORTED mid-download: the next poll resumes the download on the same connection. When that poll is
    ABORTED too, the node takes it for a lost connection: a new session (Register), then resumes."""
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        service = FakeNodeService()
        service.break_download_after = 3
        service.break_download_status = (grpc.StatusCode.ABORTED, "stale poll of this node process")
        service.refuse_resumes.append((grpc.StatusCode.ABORTED, "stale again"))
        return service, await run_until_t1_done(service, _payload())

    service, client = arun(scenario())
    assert list(service.results) == ["t1"]
    resumes = [(p.resume_task_id, p.resume_offset) for p in service.polls if p.resume_task_id]
    assert resumes == [("t1", 3 * CHUNK)] * 2  # the aborted resume, then the one after reconnecting
    assert len(service.registrations) == 2 and client.sessions == 2
    assert service.download_bytes_sent == _payload().total_size  # no byte sent twice
    assert "PollTask failed with ABORTED: stale poll of this node process; polling again" in caplog.text
    assert "PollTask failed with ABORTED: stale again; reconnecting" in caplog.text
