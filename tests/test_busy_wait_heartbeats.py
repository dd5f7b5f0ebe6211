"""While a result waits for upload room (refused ERROR_REASON_UPLOADS_BUSY), fednode says its task is alive at
least every heartbeat interval the server announced, not once per wait: a busy refusal is no activity on the
server, and a backoff wait (up to 30 s) longer than the task's inactivity timeout lost a good result
(TIMED_OUT) although the node was alive and retrying.

Against a real FedServer whose one upload slot a parked upload holds, with a task timeout (2 s) shorter than
every wait (4 s): the result is delivered. Against the fake service: the heartbeats come at the announced
interval during each wait; a heartbeat refused for its task drops the result (no FAILED report, no further
attempt); any other failed heartbeat leaves the wait going; a refusal of the node ends run(); stop() ends a
sliced wait at once.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import (
    FakeTask,
    Status,
    arun,
    node_config,
    refuse,
    run_until_refused,
    running,
    start_server,
)
from server_testkit import async_test, running_server
from test_busy_upload_window import _parked_upload
from test_node_upload_refusals import BusyService, _payload

from fedcore.errors import ServerRefusedError
from fedcore.wire import TaskKind
from fednode.client import NodeClient
from fednode.config import BackoffPolicy
from fednode.handler import EchoHandler
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2

SUCCEEDED = common_pb2.TASK_OUTCOME_SUCCEEDED


class CeilingRandom(random.Random):
    """Full-jitter backoff that always draws its ceiling: every busy wait lasts the whole backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


class BusyHeartbeatService(BusyService):
    """Refuses the first ``busy`` SUCCEEDED uploads UPLOADS_BUSY (recording when); records when each Heartbeat
    naming a task came, and answers the next ones with ``refuse_heartbeats`` (None: answered) in order (a
    FAILED_PRECONDITION closes the task: it is not sent again).
    Heartbeats naming no task (the node times a few after Register) are only answered."""

    def __init__(self, busy: int, heartbeat_interval: float) -> None:
        super().__init__(busy)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_times: list[float] = []
        self.refusal_times: list[float] = []
        self.refuse_heartbeats: list[Status | None] = []

    async def UploadResult(self, request_iterator, context):
        try:
            return await super().UploadResult(request_iterator, context)
        except BaseException:  # context.abort() raises: here only the busy refusals
            self.refusal_times.append(time.monotonic())
            raise

    async def Heartbeat(self, request, context):
        if request.task_id:
            self.heartbeat_times.append(time.monotonic())
            status = self.refuse_heartbeats.pop(0) if self.refuse_heartbeats else None
            if status is not None:
                if status[0] is grpc.StatusCode.FAILED_PRECONDITION:
                    self.assigned.pop(request.task_id, None)  # closed: never sent again
                await refuse(context, status)
        return await super().Heartbeat(request, context)


def _settings(backoff: float, **config: Any) -> dict[str, Any]:
    """NodeConfig values of these tests: a fixed backoff, a long busy window, ``config`` over them."""
    values = {"backoff": BackoffPolicy(initial=backoff, maximum=backoff), "busy_upload_retry_seconds": 60.0,
              "heartbeat_interval_seconds": 30.0}  # the announced interval must win over this one
    return {**values, **config}


async def _node_against(service: BusyHeartbeatService, backoff: float, **config) -> tuple[grpc.aio.Server, NodeClient]:
    server, port = await start_server(service)
    return server, NodeClient(node_config(port, **_settings(backoff, **config)), EchoHandler(), rng=CeilingRandom(0))


# -- a real server ---------------------------------------------------------------------------------------------
@async_test
async def test_a_busy_wait_longer_than_the_task_timeout_keeps_the_task_alive(tmp_path: Path) -> None:
    """Each wait (4 s) is twice the task's inactivity timeout (2 s); the parked upload frees the slot ~5 s after
    its node dropped. With one heartbeat per wait the task timed out; with one per announced interval (0.5 s)
    it stays active and its result is delivered."""
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5, reconnect_grace_seconds=5.0) as kit:
        parked = await _parked_upload(kit)
        config = node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0,
                             backoff=BackoffPolicy(initial=4.0, maximum=4.0), busy_upload_retry_seconds=60.0)
        client = NodeClient(config, EchoHandler(), rng=CeilingRandom(0))
        run = asyncio.create_task(client.run())
        try:
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=2.0)
            result = await handle.result(timeout=30)
            freed = await parked.result(timeout=5)
        finally:
            client.stop()
            await asyncio.wait_for(run, 10)
    assert freed.outcome is TaskState.FAILED and "did not reconnect within 5 s" in freed.error_message
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    assert result.payload == {"params": {"w": 3}} and client.results_delivered == 1


# -- the fake service ------------------------------------------------------------------------------------------
def test_heartbeats_come_at_the_announced_interval_through_each_wait() -> None:
    """Two busy refusals, waits of 1.2 s, announced interval 0.2 s (the config says 30 s): from each refusal
    to the next attempt, no gap between heartbeats (or from the refusal to the first) exceeds the interval
    by more than scheduling slack; every heartbeat names the task."""
    interval, backoff = 0.2, 1.2

    async def scenario() -> tuple[BusyHeartbeatService, NodeClient]:
        service = BusyHeartbeatService(2, heartbeat_interval=interval)
        server, client = await _node_against(service, backoff)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_results(1, timeout=20)
        finally:
            await server.stop(None)
        return service, client

    service, client = arun(scenario())
    assert [h.outcome for h in service.upload_headers] == [SUCCEEDED] * 3 and client.results_delivered == 1
    assert {h.task_id for h in service.heartbeats} <= {"t1", ""}
    assert len(service.refusal_times) == 2
    for refused in service.refusal_times:
        during = [t for t in service.heartbeat_times if refused < t < refused + backoff]
        beats = [refused, *during]
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert len(during) >= backoff / interval - 1, (len(during), during)
        assert max(gaps) < interval + 0.3, gaps


def test_a_heartbeat_refused_for_its_task_drops_the_result() -> None:
    """TASK_CLOSED on a heartbeat during the wait: the task is gone, so the result is dropped as after a refused
    upload of a closed task: no further attempt, no FAILED report; the node goes on polling."""

    async def scenario() -> BusyHeartbeatService:
        service = BusyHeartbeatService(10**6, heartbeat_interval=0.1)
        service.refuse_heartbeats = [None, (grpc.StatusCode.FAILED_PRECONDITION,
                                            "task t1 is no longer accepted (timed out)", "ERROR_REASON_TASK_CLOSED")]
        server, client = await _node_against(service, 5.0)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_for(lambda: len(service.heartbeat_times) >= 2)
                await service.wait_for(lambda: len(service.polls) >= 2)  # back to polling, well before 5 s
        finally:
            await server.stop(None)
        return service

    service = arun(scenario())
    assert [h.outcome for h in service.upload_headers] == [SUCCEEDED]  # no second attempt, no FAILED report
    assert len(service.heartbeat_times) == 2


@pytest.mark.parametrize("status", [
    (grpc.StatusCode.UNAVAILABLE, "heartbeat cut by the test"),
    (grpc.StatusCode.INVALID_ARGUMENT, "bad heartbeat", "ERROR_REASON_MALFORMED_MESSAGE"),
])
def test_a_heartbeat_that_fails_otherwise_leaves_the_wait_going(status: Status) -> None:
    async def scenario() -> tuple[BusyHeartbeatService, NodeClient]:
        service = BusyHeartbeatService(1, heartbeat_interval=0.1)
        service.refuse_heartbeats = [status, status, None, status]
        server, client = await _node_against(service, 0.5)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        return service, client

    service, client = arun(scenario())
    assert [h.outcome for h in service.upload_headers] == [SUCCEEDED, SUCCEEDED] and client.results_delivered == 1
    assert len(service.registrations) == 1 and client.sessions == 1  # no reconnect for a failed heartbeat


def test_a_heartbeat_refused_for_the_node_ends_run() -> None:
    async def scenario() -> ServerRefusedError:
        service = BusyHeartbeatService(10**6, heartbeat_interval=0.1)
        service.refuse_heartbeats = [None, (grpc.StatusCode.FAILED_PRECONDITION, "a newer process registered",
                                            "ERROR_REASON_NODE_SUPERSEDED")]
        return await run_until_refused(service, _payload(), rng=CeilingRandom(0), **_settings(5.0))

    assert arun(scenario()).reason == "ERROR_REASON_NODE_SUPERSEDED"


def test_stop_ends_a_sliced_wait_at_once() -> None:
    async def scenario() -> tuple[BusyHeartbeatService, float]:
        service = BusyHeartbeatService(10**6, heartbeat_interval=0.1)
        server, client = await _node_against(service, 20.0, busy_upload_retry_seconds=600.0)
        run = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", _payload()))
            await service.wait_for(lambda: len(service.heartbeat_times) >= 4)  # several slices into a 20 s wait
            stopped = time.monotonic()
            client.stop()
            await asyncio.wait_for(run, 5)
            return service, time.monotonic() - stopped
        finally:
            await server.stop(None)

    service, took = arun(scenario())
    assert took < 1.0, took
    assert [h.outcome for h in service.upload_headers] == [SUCCEEDED]  # no FAILED report
