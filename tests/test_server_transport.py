"""FedServer over real grpc.aio on loopback: register, long poll, task delivery, results, lifecycle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from server_testkit import WireNode, async_test, channel_options, encoded, running_server, sha256

from fedcore.errors import ServerStateError, UnknownNodeError
from fedcore.framing import OutgoingPayload
from fedcore.wire import (
    PROTOCOL_VERSION,
    DatasetInfo,
    LogLine,
    ReportEvent,
    TaskKind,
    TaskOutcome,
    TrainingProgress,
)
from fedserver.tasks import TaskState, TransferProgress


@async_test
async def test_register_returns_identity_and_limits(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_poll_wait_seconds=7.0, heartbeat_interval_seconds=3.0) as kit:
        node = kit.node("hospital-a")
        ds = (DatasetInfo("mri", ("brain", "t1"), 120, (120, 64, 64), "<f4", "npz"),)
        reply = await node.register(name="Hospital A", datasets=ds)
        assert reply.node_id == "hospital-a"
        assert (reply.server_version.major, reply.server_version.minor) == PROTOCOL_VERSION
        assert (reply.max_poll_wait_seconds, reply.heartbeat_interval_seconds) == (7.0, 3.0)
        assert reply.max_chunk_size == 4 << 20 and reply.max_payload_size == 4 << 30
        record = kit.server.registry.get("hospital-a")
        assert (record.name, record.datasets, record.connected) == ("Hospital A", ds, True)
        assert record.node_info().tags == {"brain", "t1"} and record.node_info().num_samples == 120


@async_test
async def test_poll_without_task_returns_no_task_after_the_wait(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        start = time.monotonic()
        got = await node.poll(wait=0.3)
        elapsed = time.monotonic() - start
        assert got.no_task and got.descriptor is None
        assert 0.25 <= elapsed < 3.0


@async_test
async def test_poll_wait_is_capped_by_the_server(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_poll_wait_seconds=0.2) as kit:
        node = await kit.registered_node("a")
        start = time.monotonic()
        assert (await node.poll(wait=20)).no_task
        assert time.monotonic() - start < 5


@async_test
async def test_waiting_poll_wakes_when_a_task_is_dispatched(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        poll = asyncio.create_task(node.poll(wait=10))
        await eventually(lambda: kit.server.registry.get("a").open_polls == 1, 10, "the poll waiting on the server")
        handle = kit.server.dispatch("a", TaskKind.EVALUATE, encoded({"x": 1}), experiment_id="e", round=2)
        got = await poll  # woken: a poll that was not would end NoTask after its 10 s
        assert got.descriptor is not None and got.descriptor.task_id == handle.task_id
        assert (got.descriptor.kind, got.descriptor.round, got.descriptor.experiment_id) == (
            TaskKind.EVALUATE, 2, "e")
        assert got.assemble() == {"x": 1}
        assert handle.state is TaskState.RUNNING


@pytest.mark.parametrize("size", [0, 5, 3 * 1024 + 17])
@async_test
async def test_dispatched_bytes_arrive_in_chunks_that_assemble_to_the_payload(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        payload = OutgoingPayload.from_bytes(data, chunk_size=1024)
        kit.server.dispatch("a", TaskKind.TRAIN, payload, experiment_id="e", round=1)
        got = await node.poll(wait=1)
        info = got.descriptor.payload
        assert (info.total_size, info.sha256, info.chunk_size) == (size, sha256(data), 1024)
        assert [o for o, _ in got.chunks] == list(range(0, size, 1024))
        assert all(len(d) == 1024 for _, d in got.chunks[:-1])
        assert b"".join(d for _, d in got.chunks) == data


@async_test
async def test_result_round_trip_decodes_the_uploaded_object(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float64(0.5)}
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded({"params": params}), experiment_id="e",
                                     round=1, inactivity_timeout=30)
        got = await node.poll(wait=1)
        reply = {"params": {k: v * 2 for k, v in got.assemble()["params"].items()}, "num_samples": 10}
        response = await node.upload(handle.task_id, encoded(reply, chunk_size=64))
        result = await handle.result(timeout=5)
        assert response.task_id == handle.task_id and response.received_bytes == result.bytes_received > 0
        assert result.outcome is TaskState.SUCCEEDED and result.succeeded
        np.testing.assert_array_equal(result.payload["params"]["w"], params["w"] * 2)
        assert result.payload["num_samples"] == 10
        assert result.bytes_sent == handle.bytes_sent > 0
        t = result.timings
        assert t.dispatched_at <= t.delivered_at <= t.upload_started_at <= t.finished_at
        assert kit.server.registry.get("a").in_flight == set()
        assert kit.server.uploads.acknowledged(handle.task_id) == 0 and len(kit.server.uploads) == 0


@pytest.mark.parametrize("outcome", [TaskOutcome.FAILED, TaskOutcome.REFUSED])
@async_test
async def test_failed_and_refused_results_carry_the_node_message(tmp_path: Path, outcome: TaskOutcome) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded({}), experiment_id="e", round=1)
        await node.poll(wait=1)
        await node.upload(handle.task_id, outcome=outcome, error_message="plan abc not approved")
        result = await handle.result(timeout=5)
        assert result.outcome is TaskState(outcome.value)
        assert (result.error_message, result.payload) == ("plan abc not approved", None)


@async_test
async def test_empty_success_payload_is_not_a_document(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded({}), experiment_id="e", round=1)
        await node.poll(wait=1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.upload(handle.task_id, b"")
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded" in err.value.details()
        result = await handle.result(timeout=5)
        assert result.outcome is TaskState.FAILED and "could not be decoded" in result.error_message


@async_test
async def test_reports_reach_the_handle_and_its_listeners(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded({"z": bytes(5000)}, chunk_size=1024),
                                     experiment_id="e", round=1)
        seen: list[object] = []
        handle.subscribe(lambda h, event: seen.append(event))
        await node.poll(wait=1)
        progress = TrainingProgress(1, 5, 10, 320, 640, 0.75)
        await node.report(handle.task_id, [ReportEvent(1.0, progress), ReportEvent(2.0, LogLine("INFO", "hi"))])
        assert handle.latest_progress == progress
        assert list(handle.logs) == [(2.0, LogLine("INFO", "hi"))]
        downloads = [e for e in seen if isinstance(e, TransferProgress)]
        assert downloads[-1].done == downloads[-1].total == handle.bytes_sent
        assert [e.event for e in seen if isinstance(e, ReportEvent)] == [progress, LogLine("INFO", "hi")]
        assert (await node.heartbeat(handle.task_id)).shutting_down is False


@async_test
async def test_tasks_are_delivered_one_per_poll_in_dispatch_order(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        first = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1)
        second = kit.server.dispatch("a", TaskKind.EVALUATE, encoded(2), experiment_id="e", round=1)
        assert (await node.poll(wait=1)).descriptor.task_id == first.task_id
        assert (await node.poll(wait=1)).descriptor.task_id == second.task_id
        assert (await node.poll(wait=0.1)).no_task


@async_test
async def test_broken_download_is_sent_again_and_can_resume(tmp_path: Path) -> None:
    # The node reads 3 chunks, then cancels. The server must not be able to hand every chunk to gRPC before
    # the cancel arrives (it would then count the task delivered): with gRPC's default, probed receive
    # window a small payload fits in flight whole, so the node's channel has a fixed 64 KiB window
    # (probing off) and the payload is 8 times that.
    data = bytes(range(256)) * 2048  # 512 KiB in 512 chunks
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 << 10)]
    async with running_server(tmp_path) as kit:
        channel = grpc.aio.insecure_channel(kit.target, options=channel_options() + window)
        kit.channels.append(channel)
        node = WireNode(channel, kit.store.enroll("a"))
        await node.register()
        handle = kit.server.dispatch("a", TaskKind.TRAIN, OutgoingPayload.from_bytes(data, 1024),
                                     experiment_id="e", round=1)
        partial = await node.poll(wait=1, stop_after_chunks=3)
        assert len(partial.chunks) == 3
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while handle.senders and loop.time() < deadline:  # the server sees the cancel asynchronously
            await asyncio.sleep(0.01)
        assert handle.senders == 0 and handle.bytes_sent < len(data) // 2
        assert handle.state is TaskState.QUEUED
        resumed = await node.poll(wait=1, resume_task_id=handle.task_id, resume_offset=3072)
        assert resumed.descriptor.payload.start_offset == 3072
        assert b"".join(d for _, d in partial.chunks + resumed.chunks) == data
        assert handle.state is TaskState.RUNNING
        again = await node.poll(wait=1, resume_task_id=handle.task_id, resume_offset=0)
        assert b"".join(d for _, d in again.chunks) == data


@async_test
async def test_dispatch_needs_a_registered_node_and_a_serving_server(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        with pytest.raises(UnknownNodeError, match="'ghost' has not registered"):
            kit.server.dispatch("ghost", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1)
        await kit.registered_node("a")
        await kit.server.stop(grace=0.5)
        with pytest.raises(ServerStateError, match="needs a serving server; this one is stopped"):
            kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1)


@async_test
async def test_wait_for_nodes_wakes_on_registration_and_times_out(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        waiter = asyncio.create_task(kit.server.wait_for_nodes(2, timeout=10))
        await kit.registered_node("a")
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await kit.registered_node("b")
        assert await asyncio.wait_for(waiter, 2) == ["a", "b"]
        start = time.monotonic()
        assert await kit.server.wait_for_nodes(3, timeout=0.2) == ["a", "b"]
        assert 0.15 < time.monotonic() - start < 5  # its timeout, then it returns (the bound is generous)


@async_test
async def test_inactivity_timeout_ends_a_silent_task_but_not_a_talking_one(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        silent = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1,
                                     inactivity_timeout=0.3)
        talking = kit.server.dispatch("a", TaskKind.TRAIN, encoded(2), experiment_id="e", round=1,
                                      inactivity_timeout=0.3)
        await node.poll(wait=1)
        await node.poll(wait=1)
        for _ in range(8):  # 0.8 s of reports, each well inside the timeout
            await node.report(talking.task_id, [ReportEvent(0.0, TrainingProgress())])
            await asyncio.sleep(0.1)
        result = await silent.result(timeout=2)
        assert result.outcome is TaskState.TIMED_OUT and "0.3 s without activity" in result.error_message
        assert not talking.done()
        await node.upload(talking.task_id, encoded("done"))
        assert (await talking.result(timeout=2)).payload == "done"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.upload(silent.task_id, encoded("late"))
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "timed out" in err.value.details()


@async_test
async def test_late_result_after_cancel_is_refused_and_recorded(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=4)
        other = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=5)
        await node.poll(wait=1)
        assert kit.server.cancel_round("e", 4) == 1
        result = await handle.result(timeout=1)
        assert (result.outcome, result.error_message) == (TaskState.CANCELLED, "round finished")
        assert not other.done()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.upload(handle.task_id, encoded({"params": {}}))
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == f"task {handle.task_id} is no longer accepted (round finished)"
        assert [late.outcome for late in handle.late_uploads] == [TaskOutcome.SUCCEEDED]
        assert kit.server.board.closed_record(handle.task_id).late_uploads == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.report(handle.task_id, [ReportEvent(0.0, TrainingProgress())])
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert handle.payload is None  # the shared payload is released with the task


@async_test
async def test_graceful_stop_sends_shutdown_to_waiting_polls_and_cancels_open_tasks(tmp_path: Path) -> None:
    async with running_server(tmp_path, shutdown_retry_after_seconds=7.0) as kit:
        node_a = await kit.registered_node("a")
        node_b = await kit.registered_node("b")
        handle = kit.server.dispatch("b", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1)
        await node_b.poll(wait=1)
        waiting = asyncio.create_task(node_a.poll(wait=25))
        await eventually(lambda: kit.server.registry.get("a").open_polls == 1, 10, "a's poll waiting on the server")
        start = time.monotonic()
        await kit.server.stop(grace=2.0)
        got = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - start < 5  # within the grace (2 s) and some slack, not the poll's 25 s
        assert got.shutdown is not None and got.shutdown.retry_after_seconds == 7.0
        result = await handle.result(timeout=1)
        assert (result.outcome, result.error_message) == (TaskState.CANCELLED, "server stopped")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node_a.poll(wait=0.1)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
@async_test
async def test_300_mb_both_ways(tmp_path: Path) -> None:
    params = {"w": np.random.default_rng(0).standard_normal(75_000_000, dtype=np.float32)}  # 300 MB
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        start = time.monotonic()
        handle = kit.server.dispatch("a", TaskKind.TRAIN, kit.server.encode_payload({"params": params}),
                                     experiment_id="e", round=1)
        got = await node.poll(wait=1)
        received = got.assemble()["params"]["w"]
        np.testing.assert_array_equal(received, params["w"])
        del got
        await node.upload(handle.task_id, encoded({"params": {"w": received}}))
        result = await handle.result(timeout=30)
        np.testing.assert_array_equal(result.payload["params"]["w"], params["w"])
        assert result.bytes_received > 300_000_000
        assert time.monotonic() - start < 30
