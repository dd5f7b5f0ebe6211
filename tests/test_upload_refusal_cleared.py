"""GetUploadStatus forgets a refused header once a new header for the task is read (review R3), not only once
one is accepted.

Before, ``refused_reason`` stayed until a header passed: a retry cancelled while it waited in line left an old
ERROR_REASON_UPLOAD_QUEUED there, and a later bare INTERNAL (grpc.aio hiding the status, grpc/grpc#36066) made
fednode take the broken stream for a queued refusal and upload again at once instead of reconnecting with
backoff. Over real grpc.aio on loopback, one upload slot held by an upload that trickles its chunks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from server_testkit import async_test, encoded, running_server
from test_error_reasons import reason_of
from test_refused_results import _delivered
from test_upload_line_queued import _slot_taken

from fedstream.v1 import common_pb2


@async_test
async def test_a_retry_cancelled_in_line_clears_the_remembered_queued_refusal(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, upload_line_wait_seconds=0.5) as kit:
        _, holder_call = await _slot_taken(kit, trickle=True)
        node, waiting = await _delivered(kit)  # by a process naming itself: its refusals are remembered
        document = encoded({"r": bytes(10)}, 4096)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.upload(waiting.task_id, document)
        assert reason_of(refused.value) == "ERROR_REASON_UPLOAD_QUEUED"
        status = await node.status(waiting.task_id)
        assert common_pb2.ErrorReason.Name(status.refused_reason) == "ERROR_REASON_UPLOAD_QUEUED"

        retry = asyncio.ensure_future(node.upload(waiting.task_id, document))  # waits in line again...
        await eventually(lambda: kit.server.uploads.waiting == 1, 5, "the retry in line")
        retry.cancel()  # ...and its call ends there (the node gave it up)
        with pytest.raises(asyncio.CancelledError):
            await retry
        await eventually(lambda: kit.server.uploads.waiting == 0, 5, "the server saw the call end")
        status = await node.status(waiting.task_id)
        assert status.refused_reason == common_pb2.ERROR_REASON_UNSPECIFIED and status.refused_message == ""
        assert status.acknowledged_offset == 0 and not status.complete
        await asyncio.wait_for(holder_call, 10)
