"""GetUploadStatus tells the last refusal of a task's upload header (``refused_reason``/``refused_message``).

When the server refuses an UploadResult on its header while the node is still writing chunks, grpc.aio on the
node reports a local INTERNAL "Internal error from Core" without trailers (grpc/grpc#36066), hiding the
server's status. For a refusal of the result itself (too large, busy, misframed, malformed) the task stays
open, so GetUploadStatus said only "offset 0, not complete" and fednode took it for a broken stream:
reconnect, resend, forever. Now the server keeps the refusal on the task (from the process it was delivered
to, while it holds no byte of the upload; cleared by an accepted header) and GetUploadStatus returns it;
fednode handles it as the refusal with its trailer: a too-large result is reported FAILED at once.

The server over real gRPC with a raw-stub node; fednode against a real FedServer, end to end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fake_node_service import node_config, running
from server_testkit import async_test, encoded, running_server
from test_refused_results import REFUSALS, _delivered

from fedcore.framing import PayloadInfo
from fedcore.wire import TaskKind
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2

CHUNK = 64 * 1024
HEADER_REFUSALS = sorted(name for name in REFUSALS if name != "chunks after FAILED")  # a FAILED report: no result


# -- the server, over real gRPC ------------------------------------------------------------------------------
@pytest.mark.parametrize("refusal", HEADER_REFUSALS)
@async_test
async def test_get_upload_status_names_the_refused_header_until_a_header_passes(refusal: str, tmp_path: Path) -> None:
    upload, reason = REFUSALS[refusal]
    async with running_server(tmp_path, max_payload_size=64 << 10) as kit:
        node, handle = await _delivered(kit)
        before = await node.status(handle.task_id)
        assert before.refused_reason == common_pb2.ERROR_REASON_UNSPECIFIED and before.refused_message == ""
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(node, handle.task_id)
        status = await node.status(handle.task_id)
        assert common_pb2.ErrorReason.Name(status.refused_reason) == reason
        assert status.refused_message == refused.value.details() and status.refused_message
        assert status.acknowledged_offset == 0 and not status.complete
        # a header that passes (its stream then ends before any chunk) clears it
        with pytest.raises(grpc.aio.AioRpcError) as incomplete:
            await node.upload(handle.task_id, encoded({"r": bytes(20_000)}, 4096), stop_after_chunks=0)
        assert dict(incomplete.value.trailing_metadata())["fedstream-error-reason"] == "ERROR_REASON_UPLOAD_INCOMPLETE"
        after = await node.status(handle.task_id)
        assert after.refused_reason == common_pb2.ERROR_REASON_UNSPECIFIED and after.refused_message == ""
        assert not handle.done()  # the refusals left the task open


@async_test
async def test_a_refusal_of_another_process_is_not_told(tmp_path: Path) -> None:
    """Only the process the task was delivered to gets its refusal back: a call naming another process (or
    none) leaves refused_reason unset."""
    async with running_server(tmp_path, max_payload_size=64 << 10) as kit:
        node, handle = await _delivered(kit)
        own = node.metadata
        node.metadata = tuple(m for m in own if m[0] != "fedstream-instance-id")  # a call naming no process
        with pytest.raises(grpc.aio.AioRpcError):
            await node.upload(handle.task_id, info=PayloadInfo(1 << 20, bytes(32), 4096), chunks=[])
        node.metadata = own
        status = await node.status(handle.task_id)
    assert status.refused_reason == common_pb2.ERROR_REASON_UNSPECIFIED


# -- fednode against a real FedServer -----------------------------------------------------------------------
class BigTrainer:
    """Answers every task with 8 MiB of params: 128 upload chunks of 64 KiB, so the node is still writing when
    the server refuses the header (grpc.aio then hides the refusal, grpc/grpc#36066)."""

    def __init__(self) -> None:
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        return TaskReply.succeeded({"params": {"w": np.ones(2 << 20, dtype=np.float32)}})


@async_test
async def test_fednode_reports_a_multi_chunk_result_refused_as_too_large_failed_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server enforces 1 MiB after announcing its default limit: the 8 MiB result's header is refused
    PAYLOAD_TOO_LARGE while the node writes chunks. The node learns the refusal from GetUploadStatus and
    reports the task FAILED within seconds, naming the limit; the task is trained once. (Before, the node
    reconnected and resent until the task's inactivity timeout.)"""
    async with running_server(tmp_path, max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit:
        trainer = BigTrainer()
        config = node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0,
                             upload_chunk_size=CHUNK)
        client = NodeClient(config, trainer)
        async with running(client):
            await kit.server.wait_for_nodes(1, timeout=10)
            kit.server.uploads.max_payload_size = 1 << 20
            with caplog.at_level(logging.INFO):
                handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"round": 1}), experiment_id="e",
                                             round=1, inactivity_timeout=60)
                started = time.monotonic()
                result = await handle.result(timeout=30)
                waited = time.monotonic() - started
    assert result.outcome is TaskState.FAILED and waited < 5, (result, waited)
    assert "(ERROR_REASON_PAYLOAD_TOO_LARGE)" in result.error_message, result.error_message
    assert f"exceeds this server's limit of {1 << 20} bytes" in result.error_message, result.error_message
    assert trainer.tasks == [handle.task_id]  # trained once
    assert "reporting the task FAILED" in caplog.text
