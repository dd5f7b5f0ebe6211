"""NodeClient against a real grpc.aio NodeService on loopback: round trip, resumed transfers, failures."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fake_node_service import (
    FakeNodeService,
    FakeTask,
    arun,
    node_config,
    run_until_t1_done,
    running,
    start_server,
)

from fedcore.errors import ServerRefusedError
from fedcore.framing import OutgoingPayload
from fedcore.serialization import Serializer
from fedcore.wire import DatasetInfo, TaskKind, TrainingProgress
from fednode.client import NodeClient
from fednode.config import BackoffPolicy
from fednode.handler import EchoHandler, ReceivedTask, TaskReply
from fedstream.v1 import common_pb2

CHUNK = 64 * 1024


def params(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"w": rng.standard_normal(n).astype(np.float32), "b": np.arange(3, dtype=np.int64)}}


def decoded(service: FakeNodeService, task_id: str):
    return Serializer.loads(bytes(service.results[task_id].data))


class RecordingHandler:
    """Echoes the payload, remembers what it was given; raises for task ids listed in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail
        self.tasks: list[ReceivedTask] = []
        self.threads: list[str] = []

    def handle(self, task, reporter):
        self.tasks.append(task)
        self.threads.append(threading.current_thread().name)
        reporter.progress(TrainingProgress(epoch=1, iteration=1, total_iterations=1, loss=0.5))
        if task.task_id in self.fail:
            raise ValueError(f"boom in {task.task_id}")
        return TaskReply.succeeded(task.payload)


def test_round_trip_register_poll_task_upload():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        datasets = [DatasetInfo("mnist", ("images",), 60000, (60000, 28, 28), "<f4", "npz")]
        handler = RecordingHandler()
        client = NodeClient(node_config(port, node_name="site-a"), handler, datasets, ["numpy", "scaffold"])
        sent = params(200_000)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(sent, CHUNK), round=3,
                                          kind=common_pb2.TASK_KIND_EVALUATE, experiment_id="exp-9"))
                await service.wait_results(1)
                assert client.node_id == "node-site-a"
        finally:
            await server.stop(None)
        reg = service.registrations[0]
        assert reg.node_name == "site-a" and list(reg.capabilities) == ["numpy", "scaffold"]
        assert reg.datasets[0].name == "mnist" and list(reg.datasets[0].shape) == [60000, 28, 28]
        assert (reg.version.major, reg.version.minor) == (1, 0)
        task = handler.tasks[0]
        assert (task.task_id, task.experiment_id, task.round, task.kind) == ("t1", "exp-9", 3, TaskKind.EVALUATE)
        assert handler.threads[0] != threading.main_thread().name  # the handler ran off the event loop
        header = service.results["t1"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_SUCCEEDED and header.payload.start_offset == 0
        back = decoded(service, "t1")
        np.testing.assert_array_equal(back["params"]["w"], sent["params"]["w"])
        np.testing.assert_array_equal(back["params"]["b"], sent["params"]["b"])
        events = [e for r in service.reports for e in r.events]
        assert all(r.task_id == "t1" for r in service.reports)
        assert events[0].progress.loss == 0.5 and events[0].progress.total_iterations == 1
        assert client.results_delivered == 1

    arun(scenario())


def test_broken_download_resumes_from_received_offset():
    async def scenario():
        service = FakeNodeService()
        handler = RecordingHandler()
        sent = params(300_000)  # ~1.2 MB: 19 chunks of 64 KiB
        payload = OutgoingPayload.from_object(sent, CHUNK)
        service.break_download_after = 5
        await run_until_t1_done(service, payload, handler)
        resumed = [p for p in service.polls if p.resume_task_id]
        assert [(p.resume_task_id, p.resume_offset) for p in resumed] == [("t1", 5 * CHUNK)]
        assert service.download_bytes_sent == payload.total_size  # no byte sent twice
        assert len(handler.tasks) == 1
        np.testing.assert_array_equal(decoded(service, "t1")["params"]["w"], sent["params"]["w"])

    arun(scenario())


def test_broken_upload_resumes_from_acknowledged_offset():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port, upload_chunk_size=CHUNK), EchoHandler())
        sent = params(250_000, seed=1)
        service.break_upload_after = 4
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(sent, CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        # asked after reconnecting; once more before, when grpc.aio reported the cut as INTERNAL without reason
        assert [r.task_id for r in service.status_requests] in (["t1"], ["t1", "t1"])
        starts = [h.payload.start_offset for h in service.upload_headers]
        assert starts == [0, 4 * CHUNK]
        total = service.upload_headers[0].payload.total_size
        assert service.upload_bytes_received == total  # nothing resent
        np.testing.assert_array_equal(decoded(service, "t1")["params"]["w"], sent["params"]["w"])

    arun(scenario())


def test_handler_exception_becomes_failed_reply_and_node_keeps_serving():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        handler = RecordingHandler(fail=("bad",))
        client = NodeClient(node_config(port), handler)
        try:
            async with running(client):
                service.add_task(FakeTask("bad", OutgoingPayload.from_object(params(10), CHUNK)))
                service.add_task(FakeTask("good", OutgoingPayload.from_object(params(10, 2), CHUNK)))
                await service.wait_results(2)
        finally:
            await server.stop(None)
        bad = service.results["bad"].header
        assert bad.outcome == common_pb2.TASK_OUTCOME_FAILED
        assert bad.error_message == "ValueError: boom in bad"
        assert bad.payload.total_size == 0 and not service.results["bad"].data
        assert service.results["good"].header.outcome == common_pb2.TASK_OUTCOME_SUCCEEDED
        assert [t.task_id for t in handler.tasks] == ["bad", "good"]

    arun(scenario())


def test_handler_returning_a_non_reply_is_a_failed_task():
    class Wrong:
        def handle(self, task, reporter):
            return {"params": 1}

    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port), Wrong())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(params(10), CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        header = service.results["t1"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_FAILED
        assert "returned dict, not a TaskReply" in header.error_message

    arun(scenario())


def test_busy_server_upload_is_retried_not_dropped():
    """RESOURCE_EXHAUSTED for a result within the server's limits means "no buffer free now": retry."""
    async def scenario():
        service = FakeNodeService()
        service.busy_uploads = 2
        server, port = await start_server(service)
        handler = RecordingHandler()
        client = NodeClient(node_config(port, backoff=BackoffPolicy(initial=0.01, maximum=0.05)), handler)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(params(1000), CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        assert len(service.upload_headers) == 3, "two refusals, then the accepted upload"
        assert len(handler.tasks) == 1, "the result was kept and resent, not dropped and recomputed"
        assert client.results_delivered == 1
        np.testing.assert_array_equal(decoded(service, "t1")["params"]["w"], params(1000)["params"]["w"])

    arun(scenario())


def test_oversized_payload_is_refused_before_allocation():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        handler = RecordingHandler()
        client = NodeClient(node_config(port), handler)  # default limit: 4 GiB
        small = OutgoingPayload.from_object(params(10), CHUNK)
        try:
            async with running(client):
                # announces 1 TiB: allocating before checking would raise MemoryError (or swap the host)
                service.add_task(FakeTask("huge", small, announced_size=1 << 40))
                service.add_task(FakeTask("next", small))
                await service.wait_results(2)
        finally:
            await server.stop(None)
        header = service.results["huge"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_REFUSED
        assert f"payload of {1 << 40} bytes exceeds the limit of {4 << 30} bytes" in header.error_message
        assert [t.task_id for t in handler.tasks] == ["next"]  # refused without running, node keeps serving

    arun(scenario())


def test_payload_over_configured_limit_is_refused():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port, max_payload_size=1000), RecordingHandler())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(params(1000), CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        header = service.results["t1"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_REFUSED
        assert "exceeds the limit of 1000 bytes" in header.error_message

    arun(scenario())


def test_chunk_size_over_node_limit_is_refused():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port, max_chunk_size=32 * 1024), RecordingHandler())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(params(100_000), CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        header = service.results["t1"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_REFUSED
        assert f"chunk size {CHUNK} exceeds the limit of {32 * 1024} bytes" in header.error_message

    arun(scenario())


def test_undecodable_payload_is_a_failed_task():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        handler = RecordingHandler()
        client = NodeClient(node_config(port), handler)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_bytes(b"\xc1 not msgpack", CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        header = service.results["t1"].header
        assert header.outcome == common_pb2.TASK_OUTCOME_FAILED
        assert header.error_message.startswith("task payload cannot be decoded:")
        assert handler.tasks == []

    arun(scenario())


def test_wrong_token_ends_run_with_server_refused():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port, token="wrong"), EchoHandler())
        try:
            with pytest.raises(ServerRefusedError, match="UNAUTHENTICATED") as info:
                await asyncio.wait_for(client.run(), 10)
        finally:
            await server.stop(None)
        assert info.value.details == "missing or invalid bearer token"
        assert service.registrations == []

    arun(scenario())


def test_node_reads_the_task_stream_to_its_end():
    """Cancelling right after the last chunk would make the server think the task was not delivered."""

    async def scenario():
        service = FakeNodeService()
        service.linger_after_last_chunk = 0.3
        server, port = await start_server(service)
        client = NodeClient(node_config(port), EchoHandler())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", OutgoingPayload.from_object(params(1000), CHUNK)))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        assert (service.streams_completed, service.streams_cancelled) == (1, 0)

    arun(scenario())
