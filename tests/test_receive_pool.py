"""Receive buffers reused across tasks over real gRPC: node downloads, server uploads, configs and budgets."""

from __future__ import annotations

import asyncio
import gc
import hashlib

import numpy as np
import pytest
from fake_node_service import (
    FakeNodeService,
    arun,
    node_config,
    run_until_t1_done,
    running,
)

from fedcore.errors import NodeConfigError, ServerConfigError
from fedcore.framing import OutgoingPayload, PayloadInfo
from fedcore.wire import TaskKind
from fednode.cli_start import config_from_args
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedserver.uploads import UploadSessions
from fedstream.v1 import node_service_pb2 as pb

MiB = 1 << 20
N = 1_000_000  # float32 params: 4 MB payloads, pooled (>= 1 MiB)


class Keeper:
    """Records where each task's array lives; keeps it (as a plan keeping its weights) when asked to."""

    def __init__(self, keep: bool, reply: bool = False) -> None:
        self.keep = keep
        self.reply = reply
        self.addresses: list[int] = []
        self.kept: list[np.ndarray] = []
        self.snapshots: list[bytes] = []

    def handle(self, task, reporter):
        w = task.payload["params"]["w"]
        self.addresses.append(w.ctypes.data)
        if self.keep:
            self.kept.append(w)
            self.snapshots.append(w.tobytes())
        out = {"params": {"w": w + 1}} if self.reply else {}
        return TaskReply.succeeded(out)


async def _two_tasks(tmp_path, handler: Keeper, **node_overrides) -> tuple[NodeClient, FedServer, list]:
    store = NodeStore(tmp_path / "nodes.db")
    token = store.enroll("site-a")
    server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=2.0, chunk_size=256 * 1024),
                       store)
    port = await server.start()
    client = NodeClient(node_config(port, token=token, **node_overrides), handler)
    outcomes = []
    try:
        async with running(client):
            await server.wait_for_nodes(1, timeout=10)
            for value in (1.0, 2.0):
                payload = server.encode_payload({"params": {"w": np.full(N, value, np.float32)}})
                handle = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="e", round=int(value))
                result = await handle.result(timeout=20)
                assert result.outcome is TaskState.SUCCEEDED, result.error_message
                outcomes.append(result.payload)
                del payload, handle, result
                gc.collect()
            await asyncio.sleep(0.1)  # the second result's buffer: freed once the loop drops it
    finally:
        await server.stop(grace=1)
    return client, server, outcomes


def test_two_downloads_to_one_node_client_reuse_the_receive_buffer(tmp_path):
    handler = Keeper(keep=False)
    client, _, _ = arun(_two_tasks(tmp_path, handler))
    stats = client.receive_pool.stats()
    assert stats.allocated == 1 and stats.reused == 1, stats
    assert handler.addresses[0] == handler.addresses[1], "round 2's array sits where round 1's was"


def test_a_kept_array_is_never_overwritten_by_the_next_download(tmp_path):
    handler = Keeper(keep=True)
    client, _, _ = arun(_two_tasks(tmp_path, handler))
    assert client.receive_pool.stats().reused == 0, "round 1's array is alive: no reuse"
    assert handler.addresses[0] != handler.addresses[1]
    assert handler.kept[0].tobytes() == handler.snapshots[0] and float(handler.kept[0][0]) == 1.0
    assert float(handler.kept[1][-1]) == 2.0


def test_receive_pool_zero_turns_reuse_off(tmp_path):
    client, _, _ = arun(_two_tasks(tmp_path, Keeper(keep=False), receive_pool_bytes=0))
    stats = client.receive_pool.stats()
    assert stats.reused == 0 and stats.idle_bytes == 0


def test_server_reuses_the_upload_buffer_of_a_freed_result(tmp_path):
    _, server, outcomes = arun(_two_tasks(tmp_path, Keeper(keep=False, reply=True)))
    stats = server.uploads.pool.stats()
    assert stats.reused == 0, "both results are alive in `outcomes`"
    first = outcomes[0]["params"]["w"]
    np.testing.assert_array_equal(first, np.full(N, 2.0, np.float32))
    np.testing.assert_array_equal(outcomes[1]["params"]["w"], np.full(N, 3.0, np.float32))
    del first, outcomes
    gc.collect()
    assert server.uploads.pool.stats().idle_blocks == 2


def test_server_uploads_reuse_when_results_are_dropped(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=2.0), store)
        port = await server.start()
        try:
            async with running(NodeClient(node_config(port, token=token), Keeper(keep=False, reply=True))):
                await server.wait_for_nodes(1, timeout=10)
                for value in (1.0, 2.0, 3.0):
                    payload = server.encode_payload({"params": {"w": np.full(N, value, np.float32)}})
                    handle = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="e", round=1)
                    result = await handle.result(timeout=20)
                    assert float(result.payload["params"]["w"][7]) == value + 1
                    del payload, handle, result
                    gc.collect()
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(grace=1)
        return server.uploads.pool.stats()

    stats = arun(scenario())
    assert stats.allocated == 1 and stats.reused == 2, stats


def _info(size: int) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(b"").digest(), MiB)


async def _freed_upload(uploads: UploadSessions, task_id: str, size: int) -> None:
    session = uploads.begin(task_id, "n", _info(size))
    buffer = session.assembler._buffer
    uploads.end(session)
    uploads.discard(task_id, held_until_freed=buffer)
    del session, buffer
    gc.collect()
    await asyncio.sleep(0.01)  # the budget is credited on the loop


def test_idle_pooled_upload_buffers_count_against_the_upload_budget():
    async def scenario():
        uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=MiB, max_sessions=8,
                                 max_buffered_bytes=12 * MiB, pool_bytes=1 << 30)
        assert uploads.pool.max_idle_bytes == 12 * MiB, "the pool never keeps more than the budget"
        await _freed_upload(uploads, "a", 8 * MiB)
        assert uploads.pool.idle_bytes == 8 * MiB
        small = uploads.begin("b", "n", _info(6 * MiB))  # 6 in use + 8 idle > 12: the idle block goes
        assert not small.assembler.reused and uploads.pool.idle_bytes == 0
        uploads.end(small)
        uploads.discard("b")
        del small
        gc.collect()
        await asyncio.sleep(0.01)
        again = uploads.begin("c", "n", _info(6 * MiB))
        assert again.assembler.reused and again.assembler.held_bytes == 6 * MiB
        return uploads

    arun(scenario())


def test_pool_settings_are_validated_and_reach_the_node_cli(tmp_path):
    with pytest.raises(NodeConfigError, match="receive_pool_bytes must be an int >= 0"):
        node_config(1, receive_pool_bytes=-1)
    with pytest.raises(ServerConfigError, match="upload_pool_bytes must be an int >= 0"):
        ServerConfig(tls="insecure", upload_pool_bytes=-5)
    import argparse

    from fednode.cli_start import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    token = tmp_path / "node.token"
    token.write_text("abc\n")
    base = ["start", "--server", "h:1", "--insecure", "--token-file", str(token)]
    args = parser.parse_args([*base, "--receive-pool", "0"])
    assert config_from_args(args).receive_pool_bytes == 0
    args = parser.parse_args([*base, "--receive-pool", "256MiB"])
    assert config_from_args(args).receive_pool_bytes == 256 << 20
    args = parser.parse_args(base)
    assert config_from_args(args).receive_pool_bytes == 1 << 30


def test_node_receive_window_is_a_fixed_grpc_window_and_is_validated():
    fixed = node_config(1, receive_window_bytes=2 << 20)
    options = dict(fixed.channel_options(fixed.initial_receive_window()))
    assert options["grpc.http2.bdp_probe"] == 0 and options["grpc.http2.lookahead_bytes"] == 2 << 20
    for window in (None, "auto"):  # "auto" starts probing and decides after Register (test_receive_window)
        config = node_config(1, receive_window_bytes=window)
        probing = dict(config.channel_options(config.initial_receive_window()))
        assert "grpc.http2.bdp_probe" not in probing and "grpc.http2.lookahead_bytes" not in probing
    assert node_config(1).receive_window_bytes == "auto"  # the default
    for bad in (0, 1000, True, 1.5e6, "bdp", "Auto"):
        with pytest.raises(NodeConfigError, match="receive_window_bytes must be 'auto', None .BDP probing. or an "
                                                  "int >= 65535, got"):
            node_config(1, receive_window_bytes=bad)


class _RestartingService(FakeNodeService):
    """Ignores the node's resume point: a cut download is sent again from offset 0 (a restarted server)."""

    def __init__(self) -> None:
        super().__init__()
        self.resume_offsets: list[int] = []  # what the node asked for

    async def PollTask(self, request, context):
        if request.resume_task_id:
            self.resume_offsets.append(request.resume_offset)
        fresh = pb.PollTaskRequest()
        fresh.CopyFrom(request)
        fresh.resume_task_id, fresh.resume_offset = "", 0
        async for response in super().PollTask(fresh, context):
            yield response


def test_a_download_restarted_from_zero_reuses_the_abandoned_partial_buffer():
    async def scenario() -> NodeClient:
        service = _RestartingService()
        payload = OutgoingPayload.from_object({"params": {"w": np.full(N, 1.0, np.float32)}}, 64 * 1024)
        service.break_download_after = 5  # 320 KiB of 4 MB received, then the call is cut
        client = await run_until_t1_done(service, payload, Keeper(keep=False))
        assert service.resume_offsets == [5 * 64 * 1024]
        return client

    stats = arun(scenario()).receive_pool.stats()
    assert stats.allocated == 1 and stats.reused == 1, f"the partial download's buffer was still alive: {stats}"
