"""NodeClient lifecycle on real loopback sockets: reconnects, server shutdown, stop, heartbeats, reports."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from fake_node_service import FakeNodeService, FakeTask, arun, free_port, node_config, running, start_server

from fedcore.errors import NodeError
from fedcore.framing import OutgoingPayload
from fedcore.serialization import Serializer
from fedcore.wire import TrainingProgress
from fednode.client import ClientState, NodeClient
from fednode.handler import EchoHandler, TaskReply
from fedstream.v1 import common_pb2

SMALL = {"params": {"w": np.arange(10, dtype=np.float32)}}


def small_payload() -> OutgoingPayload:
    return OutgoingPayload.from_object(SMALL, 4096)


def test_server_down_at_start_then_up_client_connects():
    async def scenario():
        port = free_port()
        client = NodeClient(node_config(port), EchoHandler())
        async with running(client):
            await asyncio.sleep(1.0)  # several failed attempts with nothing listening
            assert client.sessions == 0 and client.state in (ClientState.CONNECTING, ClientState.WAITING)
            service = FakeNodeService()
            server, _ = await start_server(service, port)
            up = time.monotonic()
            try:
                # backoff is capped at 0.5 s in node_config: registration must follow quickly (gRPC's own
                # reconnect backoff, 1 s and growing, must not get in the way)
                await service.wait_for(lambda: service.registrations, timeout=5.0)
                assert time.monotonic() - up < 2.0
                service.add_task(FakeTask("t1", small_payload()))
                await service.wait_results(1)
            finally:
                await server.stop(None)

    arun(scenario())


def test_server_restart_while_polling_node_registers_again():
    async def scenario():
        first = FakeNodeService()
        server, port = await start_server(first)
        client = NodeClient(node_config(port, poll_wait_seconds=30.0), EchoHandler())
        async with running(client):
            await first.wait_for(lambda: first.polls)
            await server.stop(None)  # the poll in flight breaks
            second = FakeNodeService()
            server, _ = await start_server(second, port)
            try:
                await second.wait_for(lambda: second.registrations, timeout=5.0)
                second.add_task(FakeTask("t1", small_payload()))
                await second.wait_results(1)
            finally:
                await server.stop(None)
        assert len(first.registrations) == 1 and client.sessions == 2

    arun(scenario())


def test_server_restart_mid_upload_starts_over_on_the_new_server():
    """The restarted server knows nothing (GetUploadStatus says 0): the whole result is sent again."""

    async def scenario():
        first = FakeNodeService()
        server, port = await start_server(first)
        gate = asyncio.Event()

        class Slow:
            def handle(self, task, reporter):
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
                return TaskReply.succeeded(task.payload)

        loop = asyncio.get_running_loop()
        client = NodeClient(node_config(port, upload_chunk_size=4096), Slow())
        payload = OutgoingPayload.from_object({"params": {"w": np.ones(50_000, np.float32)}}, 4096)
        async with running(client):
            first.add_task(FakeTask("t1", payload))
            await first.wait_for(lambda: client.state is ClientState.RUNNING)
            await server.stop(None)  # the server dies while the node trains
            second = FakeNodeService()
            second.assigned["t1"] = FakeTask("t1", payload)  # the new server still expects t1's result
            server, _ = await start_server(second, port)
            gate.set()
            try:
                await second.wait_results(1)
            finally:
                await server.stop(None)
        assert [h.payload.start_offset for h in second.upload_headers] == [0]
        assert second.upload_bytes_received == second.upload_headers[0].payload.total_size
        assert second.results["t1"].header.outcome == common_pb2.TASK_OUTCOME_SUCCEEDED

    arun(scenario())


def test_server_shutdown_notice_reconnects_after_retry_after():
    async def scenario():
        service = FakeNodeService()
        service.shutdown_next_poll = 0.4
        server, port = await start_server(service)
        client = NodeClient(node_config(port), EchoHandler())
        try:
            async with running(client):
                await service.wait_for(lambda: len(service.registrations) >= 2, timeout=5.0)
                service.add_task(FakeTask("t1", small_payload()))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        gap = service.registered_at[1] - service.registered_at[0]
        assert 0.4 <= gap < 0.4 + 0.05 + 1.0  # retry_after, plus at most the initial backoff as jitter

    arun(scenario())


def test_stop_is_prompt_while_polling():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        client = NodeClient(node_config(port, poll_wait_seconds=30.0), EchoHandler())
        task = asyncio.create_task(client.run())
        try:
            await service.wait_for(lambda: service.polls)
            started = time.monotonic()
            client.stop()
            await asyncio.wait_for(task, 10.0)
            assert time.monotonic() - started < 5.0  # prompt: not the poll's 30 s (slack for a loaded machine)
            assert client.state is ClientState.STOPPED
        finally:
            await server.stop(None)

    arun(scenario())


def test_stop_while_server_is_down_is_prompt():
    async def scenario():
        client = NodeClient(node_config(free_port()), EchoHandler())
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.3)
        started = time.monotonic()
        client.stop()
        await asyncio.wait_for(task, 10.0)
        assert time.monotonic() - started < 2.5  # prompt: not the attempt's 5 s call timeout

    arun(scenario())


def test_stop_from_another_thread_and_before_run():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        try:
            client = NodeClient(node_config(port), EchoHandler())
            task = asyncio.create_task(client.run())
            await service.wait_for(lambda: service.polls)
            await asyncio.to_thread(client.stop)
            await asyncio.wait_for(task, 2.0)

            early = NodeClient(node_config(port), EchoHandler())
            early.stop()
            await asyncio.wait_for(early.run(), 2.0)
            assert early.sessions == 0
        finally:
            await server.stop(None)

    arun(scenario())


def test_stop_during_a_task_lets_the_handler_finish_and_delivers_its_reply():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)

        class Cooperative:
            def handle(self, task, reporter):
                deadline = time.monotonic() + 10
                while not reporter.stop_requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                return TaskReply.succeeded({"stopped_early": reporter.stop_requested})

        client = NodeClient(node_config(port), Cooperative())
        task = asyncio.create_task(client.run())
        try:
            service.add_task(FakeTask("t1", small_payload()))
            await service.wait_for(lambda: client.state is ClientState.RUNNING)
            client.stop()
            await asyncio.wait_for(task, 5.0)
        finally:
            await server.stop(None)
        assert service.results["t1"].complete
        assert Serializer.loads(bytes(service.results["t1"].data)) == {"stopped_early": True}

    arun(scenario())


def test_long_task_sends_heartbeats_and_batched_reports():
    async def scenario():
        service = FakeNodeService(heartbeat_interval=0.2)
        server, port = await start_server(service)

        class Chatty:
            def handle(self, task, reporter):
                for i in range(200):
                    reporter.progress(TrainingProgress(epoch=1, iteration=i + 1, total_iterations=200, loss=1 / (i + 1)))
                reporter.log("info", "burst done")
                time.sleep(1.2)  # quiet: heartbeats keep the server informed
                reporter.log("WARNING", "x" * 5000)
                return TaskReply.succeeded({})

        client = NodeClient(node_config(port, report_interval_seconds=0.1), Chatty())
        try:
            async with running(client):
                service.add_task(FakeTask("t1", small_payload()))
                await service.wait_results(1)
        finally:
            await server.stop(None)
        events = [e for r in service.reports for e in r.events]
        iterations = [e.progress.iteration for e in events if e.WhichOneof("event") == "progress"]
        assert iterations == list(range(1, 201))  # every event, in order
        assert len(service.reports) <= 4  # 202 events batched, not one call each
        logs = [e.log for e in events if e.WhichOneof("event") == "log"]
        assert [(entry.level, len(entry.message)) for entry in logs] == [("INFO", 10), ("WARNING", 4096)]
        beats = [h for h in service.heartbeats if h.task_id == "t1"]
        assert 3 <= len(beats) <= 8  # ~1.2 s quiet / 0.2 s interval

    arun(scenario())


def test_hundred_clients_share_one_event_loop():
    async def scenario():
        service = FakeNodeService()
        server, port = await start_server(service)
        clients = [NodeClient(node_config(port, node_name=f"n{i}"), EchoHandler()) for i in range(100)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await service.wait_for(lambda: len(service.registrations) == 100, timeout=20.0)
            for i in range(100):
                service.add_task(FakeTask(f"t{i}", small_payload()))
            await service.wait_results(100, timeout=30.0)
        finally:
            for c in clients:
                c.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 10.0)
            await server.stop(None)
        assert sorted(r.node_name for r in service.registrations) == sorted(f"n{i}" for i in range(100))

    arun(scenario(), timeout=90)


def test_server_restart_mid_download_resume_refused_then_fresh_poll():
    async def scenario():
        first = FakeNodeService()
        first.stall_download_after = 3
        server, port = await start_server(first)
        client = NodeClient(node_config(port), EchoHandler())
        async with running(client):
            first.add_task(FakeTask("old", OutgoingPayload.from_object({"w": np.ones(40_000)}, 4096)))
            await first.wait_for(lambda: first.download_bytes_sent >= 3 * 4096)
            await server.stop(None)
            second = FakeNodeService()  # knows nothing of "old"
            server, _ = await start_server(second, port)
            try:
                second.add_task(FakeTask("new", small_payload()))
                await second.wait_results(1)
            finally:
                await server.stop(None)
        assert [(p.resume_task_id, p.resume_offset) for p in second.polls[:1]] == [("old", 3 * 4096)]
        assert second.polls[1].resume_task_id == ""
        assert list(second.results) == ["new"]

    arun(scenario())


def test_run_twice_is_refused():
    async def scenario():
        client = NodeClient(node_config(free_port()), EchoHandler())
        client.stop()
        await client.run()
        with pytest.raises(NodeError, match="already called"):
            await client.run()

    arun(scenario())
