"""An upload waiting in line for a buffer whose task ends meanwhile (a round cancelling its stragglers, the
node restarting) is refused FAILED_PRECONDITION when its turn comes, before any buffer is taken: no session
is left parked for a closed task, so the slot it would have held serves the next upload. Over real
grpc.aio on loopback, with one upload slot (``max_concurrent_uploads=1``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from server_testkit import ServerKit, WireNode, async_test, encoded, running_server

from fedcore.wire import ResultDescriptor, TaskKind, TaskOutcome, convert
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

CHUNK = 4096


async def _running_task(kit: ServerKit, node_id: str) -> tuple[WireNode, TaskHandle]:
    node = await kit.registered_node(node_id)
    handle = kit.server.dispatch(node_id, TaskKind.TRAIN, encoded({"round": 1}), experiment_id="e", round=1,
                                 inactivity_timeout=60)
    assert (await node.poll(wait=5)).descriptor.task_id == handle.task_id
    return node, handle


def _held_upload(node: WireNode, task_id: str, document: object, go_on: asyncio.Event) -> grpc.aio.StreamUnaryCall:
    """An UploadResult that sends its header and first chunk, then waits for ``go_on`` to send the rest."""
    info = document.info()
    header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, TaskOutcome.SUCCEEDED, "", info))

    async def requests() -> AsyncIterator[pb.UploadResultRequest]:
        yield pb.UploadResultRequest(header=header)
        for offset, data in document.iter_chunks(0):
            yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=bytes(data)))
            await go_on.wait()

    return node.stub.UploadResult(requests(), metadata=node.metadata, timeout=30)


@async_test
async def test_an_upload_whose_task_ended_while_it_waited_in_line_is_refused_and_holds_no_slot(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1) as kit:
        uploads, registry = kit.server.uploads, kit.server.registry
        a_node, a = await _running_task(kit, "a")
        b_node, b = await _running_task(kit, "b")
        reply = encoded({"w": np.arange(20_000, dtype=np.float64)}, chunk_size=CHUNK)  # 160 kB, 40 chunks

        go_on = asyncio.Event()
        a_id = a.task_id
        a_upload = _held_upload(a_node, a_id, reply, go_on)  # holds the only slot, still running
        await eventually(lambda: uploads.acknowledged(a_id) == CHUNK, 5, "a's first chunk received")
        b_upload = asyncio.ensure_future(b_node.upload(b.task_id, reply, chunk_size=CHUNK))
        await eventually(lambda: registry.get("b").open_uploads == 1, 5, "b's upload waiting in line")
        assert uploads.session(b.task_id) is None  # in line: no buffer yet

        assert b.cancel("round 1 finished without this node")  # the round gives up on its straggler
        go_on.set()  # a's upload finishes: the slot frees, b's turn comes
        assert (await a_upload).received_bytes == reply.total_size

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(b_upload, 10)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert err.value.details() == f"task {b.task_id} is no longer accepted (round 1 finished without this node)"
        assert len(uploads) == 0 and uploads.session(b.task_id) is None  # no session parked for b
        assert registry.get("b").open_uploads == 0 and registry.get("b").connected  # a refusal, not a drop

        result = await a.result(timeout=5)  # a's buffer is held by its decoded result until that is dropped
        np.testing.assert_array_equal(result.payload["w"], np.arange(20_000, dtype=np.float64))
        del result, a
        gc.collect()
        await eventually(lambda: uploads.buffered_bytes == 0, 5, "the upload budget back to 0",
                         lambda: f"{uploads.buffered_bytes} bytes still counted")

        c_node, c = await _running_task(kit, "c")  # the slot serves the next upload
        assert (await c_node.upload(c.task_id, reply, chunk_size=CHUNK)).received_bytes == reply.total_size
        assert (await c.result(timeout=5)).outcome is TaskState.SUCCEEDED
