"""A result refused ERROR_REASON_UPLOADS_BUSY is retried for a time, ``NodeConfig.busy_upload_retry_seconds``,
not for a number of attempts: the server's upload buffers may be held by a *parked* upload (broken, kept for
its resume) that it frees only when that upload's task ends, up to its reconnect grace after the node went
away. Eight jittered attempts could end before and lose a good result (reported FAILED).

Against a real FedServer whose one upload slot a parked upload of another node holds until its node is given
up (its reconnect grace, 4 s here): the result is delivered; with a short window it is reported FAILED. The config's default
outlasts the server's defaults; stop() still ends the wait at once (fake service).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import FakeTask, arun, node_config, start_server
from server_testkit import ServerKit, async_test, encoded, running_server
from test_node_upload_refusals import BusyService, _payload

from fedcore.errors import NodeConfigError
from fedcore.wire import TaskKind
from fednode.client import NodeClient
from fednode.config import BackoffPolicy, NodeConfig
from fednode.handler import EchoHandler
from fedserver.config import ServerConfig
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import common_pb2

FAST = BackoffPolicy(initial=0.05, maximum=0.5)


def _eight_attempts_at_most(backoff: BackoffPolicy) -> float:
    """The longest the former rule (8 attempts: 7 waits of the full-jitter backoff) waited before giving up."""
    return sum(backoff.ceiling(n) for n in range(7))


# -- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.0, math.nan])
def test_the_window_must_be_positive(value: float) -> None:
    with pytest.raises(NodeConfigError, match=f"busy_upload_retry_seconds must be > 0 seconds, got {value}"):
        NodeConfig("h:1", tls="insecure", token="t", busy_upload_retry_seconds=value)


def test_the_default_window_outlasts_the_servers_default_parked_upload_with_a_backoff_to_spare() -> None:
    """A parked upload's buffer is freed when its task ends: by default at most the liveness window of its
    silent node (max poll wait + 2 heartbeats) plus the reconnect grace after its last call. The node's
    window covers that and one more backoff ceiling, so an attempt comes after the room is free."""
    server, node = ServerConfig(tls="insecure"), NodeConfig("h:1", tls="insecure", token="t")
    assert server.reconnect_grace_seconds is not None
    parked = server.max_poll_wait_seconds + 2 * server.heartbeat_interval_seconds + server.reconnect_grace_seconds
    assert node.busy_upload_retry_seconds >= parked + node.backoff.maximum
    assert _eight_attempts_at_most(node.backoff) < parked  # what the former rule lost


# -- a real server ---------------------------------------------------------------------------------------------
async def _parked_upload(kit: ServerKit, node_id: str = "other") -> TaskHandle:
    """Node ``node_id`` gets a task and breaks off its upload after one chunk: the server parks it for a resume,
    holding the one upload slot; the node then makes no call."""
    other = await kit.registered_node(node_id)
    parked = kit.server.dispatch(node_id, TaskKind.TRAIN, kit.server.encode_payload({"round": 1}),
                                 experiment_id="e", round=1, inactivity_timeout=120)
    assert (await other.poll(wait=2)).descriptor is not None
    with pytest.raises(grpc.aio.AioRpcError):
        await other.upload(parked.task_id, encoded({"r": bytes(20_000)}, chunk_size=4096), stop_after_chunks=1)
    assert len(kit.server.uploads) == 1
    return parked


@async_test
async def test_a_result_waits_out_a_parked_upload_and_is_delivered(tmp_path: Path) -> None:
    """The parked upload holds the slot until its node, whose upload stream dropped, is given up after the
    reconnect grace (4 s here), longer than eight attempts of this backoff last (2.25 s at most): the node keeps
    retrying within its window, and its result is delivered, not reported FAILED."""
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5, reconnect_grace_seconds=4.0) as kit:
        parked = await _parked_upload(kit)
        config = node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0, backoff=FAST,
                             busy_upload_retry_seconds=30.0)
        client = NodeClient(config, EchoHandler())
        run = asyncio.create_task(client.run())
        try:
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            started = time.monotonic()
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=120)
            result = await handle.result(timeout=30)
            waited = time.monotonic() - started
            freed = await parked.result(timeout=1)
        finally:
            client.stop()
            await asyncio.wait_for(run, 10)
    assert freed.outcome is TaskState.FAILED and "did not reconnect within 4 s" in freed.error_message
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    assert result.payload == {"params": {"w": 3}} and client.results_delivered == 1
    assert waited > _eight_attempts_at_most(FAST), waited  # the former rule would have given up by then


@async_test
async def test_a_short_window_ends_failed_naming_the_refusal(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5) as kit:  # grace 30 s: the slot stays taken
        await _parked_upload(kit)
        config = node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0, backoff=FAST,
                             busy_upload_retry_seconds=0.5)
        client = NodeClient(config, EchoHandler())
        run = asyncio.create_task(client.run())
        try:
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=120)
            result = await handle.result(timeout=30)
        finally:
            client.stop()
            await asyncio.wait_for(run, 10)
    assert result.outcome is TaskState.FAILED, result
    assert "(ERROR_REASON_UPLOADS_BUSY): too many concurrent uploads (1, limit 1)" in result.error_message
    assert " attempts over 0." in result.error_message, result.error_message


# -- stop ------------------------------------------------------------------------------------------------------
def test_stop_ends_the_busy_wait_at_once_and_reports_nothing() -> None:
    async def scenario() -> tuple[BusyService, float]:
        service = BusyService(10**6)
        server, port = await start_server(service)
        config = node_config(port, backoff=BackoffPolicy(initial=20.0, maximum=20.0), busy_upload_retry_seconds=600.0)
        client = NodeClient(config, EchoHandler())
        run = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", _payload()))
            await service.wait_for(lambda: len(service.upload_headers) >= 1 and len(service.heartbeats) >= 1)
            await asyncio.sleep(0.1)  # in its wait (up to 20 s) before the next attempt
            stopped = time.monotonic()
            client.stop()
            await asyncio.wait_for(run, 5)
            return service, time.monotonic() - stopped
        finally:
            await server.stop(None)

    service, took = arun(scenario())
    assert took < 2.0, took
    assert [h.outcome for h in service.upload_headers] == [common_pb2.TASK_OUTCOME_SUCCEEDED]  # no FAILED report
