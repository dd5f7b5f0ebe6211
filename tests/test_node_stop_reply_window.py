"""A node asked to stop delivers the reply of its running task however the task ends: just inside the stop
grace, just after it, or at once with a grace of 0 (each reply gets at least STOPPED_REPORT_SECONDS). A task
that finished just inside the grace used to lose its result, and with --stop-grace 0 the FAILED report of a
stopped task was never sent."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from fake_node_service import FakeNodeService, FakeTask, arun, node_config, start_server

from fedcore.framing import OutgoingPayload
from fednode.client import ClientState, NodeClient
from fednode.handler import TaskReply

GRACE = 1.5


class SlowUploadService(FakeNodeService):
    """A server (or link) that takes 0.4 s to take an upload in."""

    async def UploadResult(self, request_iterator, context):
        await asyncio.sleep(0.4)
        return await super().UploadResult(request_iterator, context)


def _scenario(handler_seconds: float):
    async def scenario():
        service = SlowUploadService()
        server, port = await start_server(service)

        class Handler:
            def handle(self, task, reporter):
                time.sleep(handler_seconds)  # ignores stop_requested, like any handler that is not training
                return TaskReply.succeeded({"done": True})

        client = NodeClient(node_config(port, stop_grace_seconds=GRACE), Handler())
        run = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", OutgoingPayload.from_object({"w": np.zeros(3)}, 4096)))
            await service.wait_for(lambda: client.state is ClientState.RUNNING)
            client.stop()
            await asyncio.wait_for(run, 15.0)
        finally:
            await server.stop(None)
        return service.results.get("t1"), len(service.upload_headers)

    return arun(scenario())


@pytest.mark.parametrize("handler_seconds", [GRACE + 0.2, GRACE - 0.2])
def test_a_result_is_delivered_whether_the_task_ends_just_before_or_just_after_the_grace(handler_seconds):
    stored, attempts = _scenario(handler_seconds)
    assert stored is not None and stored.complete, (handler_seconds, attempts, stored)


def test_with_stop_grace_0_the_stopped_task_is_still_reported_failed():
    """guide §3.5 / start --help: the stopped task 'is reported FAILED, naming why', with --stop-grace 0 too."""
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)

        class Training:
            def handle(self, task, reporter):
                deadline = time.monotonic() + 20
                while not reporter.stop_requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                return TaskReply.failed(f"stopped: {reporter.stop_reason}")

        client = NodeClient(node_config(port, stop_grace_seconds=0.0), Training())
        run = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", OutgoingPayload.from_object({"w": np.zeros(3)}, 4096)))
            await service.wait_for(lambda: client.state is ClientState.RUNNING)
            client.stop()
            await asyncio.wait_for(run, 15.0)
        finally:
            await server.stop(None)
        return service.results.get("t1")

    stored = arun(scenario())
    assert stored is not None and stored.complete, stored
