"""UploadResult rules over real grpc.aio: resume, digest, framing, limits, ownership."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from server_testkit import async_test, encoded, running_server, sha256

from fedcore.framing import OutgoingPayload, PayloadInfo
from fedserver.tasks import TaskState
from fedstream.v1 import node_service_pb2 as pb

RESULT = {"params": {"w": np.arange(5000, dtype=np.float64)}, "num_samples": 3}  # ~40 kB


async def _expect(code: grpc.StatusCode, call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() is code, err.value.details()
    return err.value.details()


@async_test
async def test_broken_upload_resumes_from_the_acknowledged_offset(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        doc = encoded(RESULT, chunk_size=4096)
        assert doc.total_size > 5 * 4096
        assert (await node.status(handle.task_id)).acknowledged_offset == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the stream ends early: the bytes are kept
            await node.upload(handle.task_id, doc, stop_after_chunks=3)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"ended after 12288 of {doc.total_size} bytes; resume at offset 12288" in err.value.details()
        status = await node.status(handle.task_id)
        assert (status.acknowledged_offset, status.complete) == (12288, False)
        assert handle.state is TaskState.UPLOADING and not handle.done()
        response = await node.upload(handle.task_id, doc, start_offset=status.acknowledged_offset)
        assert response.received_bytes == doc.total_size
        result = await handle.result(timeout=5)
        np.testing.assert_array_equal(result.payload["params"]["w"], RESULT["params"]["w"])
        assert result.bytes_received == doc.total_size
        status = await node.status(handle.task_id)
        assert (status.acknowledged_offset, status.complete) == (doc.total_size, True)


@async_test
async def test_upload_cut_by_the_client_keeps_its_bytes(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        doc = encoded(RESULT, chunk_size=4096)
        chunks = [(o, bytes(d)) for o, d in doc.iter_chunks()]
        sent = asyncio.Event()

        async def requests():  # header + 2 chunks, then the client hangs until cancelled
            from fedcore.wire import ResultDescriptor, TaskOutcome, convert
            from fedstream.v1 import common_pb2
            from fedstream.v1 import node_service_pb2 as pb

            header = convert.result_descriptor_to_pb(ResultDescriptor(handle.task_id, TaskOutcome.SUCCEEDED,
                                                                      "", doc.info()))
            yield pb.UploadResultRequest(header=header)
            for offset, data in chunks[:2]:
                yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=data))
            sent.set()
            await asyncio.sleep(30)

        call = node.stub.UploadResult(requests(), metadata=node.metadata, timeout=30)
        await sent.wait()
        await eventually(lambda: kit.server.uploads.acknowledged(handle.task_id) == 8192, 10,
                         "the server received both chunks")
        call.cancel()
        # the server learns of the cancellation asynchronously (gRPC cancels its handler, which parks the
        # session); a resume before that is refused ABORTED "already running", as it should be. So the test
        # waits for the parked session itself, not a fixed 2 s after which it resumed whatever the server's state
        await eventually(lambda: not kit.server.uploads.session(handle.task_id).active, 10,
                         "the server parking the cancelled upload's session")
        assert (await node.status(handle.task_id)).acknowledged_offset == 8192
        await node.upload(handle.task_id, doc, start_offset=8192)
        assert (await handle.result(timeout=5)).succeeded


@async_test
async def test_resume_without_held_bytes_or_at_the_wrong_offset_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        doc = encoded(RESULT, chunk_size=4096)
        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT, node.upload(handle.task_id, doc, start_offset=8192))
        assert "holds no bytes of it" in details
        await _expect(grpc.StatusCode.INVALID_ARGUMENT, node.upload(handle.task_id, doc, stop_after_chunks=2))
        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT, node.upload(handle.task_id, doc, start_offset=4096))
        assert "starts at offset 4096, expected 8192" in details
        other = encoded({"other": 1}, chunk_size=4096)
        info = PayloadInfo(doc.total_size, other.sha256, 4096, 8192)
        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT,
                                node.upload(handle.task_id, doc, start_offset=8192, info=info))
        assert "different payload" in details
        await node.upload(handle.task_id, doc)  # a fresh start at 0 always works
        assert (await handle.result(timeout=5)).succeeded


@async_test
async def test_wrong_digest_is_data_loss_and_the_task_stays_open(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        doc = encoded(RESULT, chunk_size=4096)
        bad = PayloadInfo(doc.total_size, sha256(b"something else"), 4096)
        details = await _expect(grpc.StatusCode.DATA_LOSS, node.upload(handle.task_id, doc, info=bad))
        assert "SHA-256 mismatch" in details
        assert not handle.done() and (await node.status(handle.task_id)).acknowledged_offset == 0
        assert kit.server.uploads.buffered_bytes == 0, "the garbage buffer is freed though a traceback holds its session"
        await node.upload(handle.task_id, doc)
        assert (await handle.result(timeout=5)).succeeded


@async_test
async def test_chunk_past_the_announced_size_is_invalid(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        data = bytes(10)
        info = PayloadInfo(10, sha256(data), 4)
        chunks = [(0, data[:4]), (4, data[4:8]), (8, b"\0\0\0\0")]
        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT,
                                node.upload(handle.task_id, info=info, chunks=chunks))
        assert "ends past the announced size 10" in details
        assert not handle.done()


@pytest.mark.parametrize(("chunks", "message"), [
    ([(0, b"abcd"), (8, b"ij")], "out of order (gap): expected offset 4"),
    ([(0, b"abcd"), (0, b"abcd")], "duplicated or overlapping"),
    ([(0, b"ab"), (2, b"cdefgh")], "every chunk but the last must have chunk_size 4 bytes"),
    ([(0, b"abcdefgh")], "exceeds the chunk size 4"),
])
@async_test
async def test_misframed_chunks_are_invalid(tmp_path: Path, chunks: list, message: str) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        data = b"abcdefghij"
        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT, node.upload(
            handle.task_id, info=PayloadInfo(10, sha256(data), 4), chunks=chunks))
        assert message in details


@async_test
async def test_stream_must_start_with_a_header(tmp_path: Path) -> None:
    from fedstream.v1 import common_pb2
    from fedstream.v1 import node_service_pb2 as pb

    async with running_server(tmp_path) as kit:
        node, _ = await kit.running_task()

        async def chunk_first():
            yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=0, data=b"x"))

        details = await _expect(grpc.StatusCode.INVALID_ARGUMENT,
                                node.stub.UploadResult(chunk_first(), metadata=node.metadata, timeout=5))
        assert "must start with an UploadHeader" in details


@async_test
async def test_announced_payload_over_the_limit_is_refused_before_allocation(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_payload_size=1 << 20) as kit:
        node, handle = await kit.running_task()
        huge = PayloadInfo(1 << 50, sha256(b""), 1 << 20)  # 1 PiB: allocating it would fail loudly
        details = await _expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                node.upload(handle.task_id, info=huge, chunks=[]))
        assert details == f"announced payload of {1 << 50} bytes exceeds this server's limit of 1048576 bytes"
        assert len(kit.server.uploads) == 0 and not handle.done()


@async_test
async def test_announced_chunk_size_over_the_limit_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_chunk_size=1 << 16, chunk_size=1 << 16) as kit:
        node, handle = await kit.running_task()
        data = bytes(100)
        details = await _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, node.upload(
            handle.task_id, info=PayloadInfo(100, sha256(data), 1 << 17), chunks=[(0, data)]))
        assert "announced chunk size of 131072 bytes exceeds this server's limit of 65536" in details


@async_test
async def test_too_many_concurrent_uploads(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=2) as kit:
        nodes = [await kit.running_task(f"n{i}") for i in range(3)]
        doc = encoded(RESULT, chunk_size=4096)
        for node, handle in nodes[:2]:  # two parked sessions hold buffers
            await _expect(grpc.StatusCode.INVALID_ARGUMENT, node.upload(handle.task_id, doc, stop_after_chunks=1))
        node, handle = nodes[2]
        details = await _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, node.upload(handle.task_id, doc))
        assert "too many concurrent uploads (2, limit 2)" in details
        first_node, first = nodes[0]
        await first_node.upload(first.task_id, doc, start_offset=4096)  # a resume needs no new slot
        await node.upload(handle.task_id, doc)  # the finished session freed one
        assert (await handle.result(timeout=5)).succeeded


@async_test
async def test_node_cannot_touch_a_task_sent_to_another_node(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        _, handle = await kit.running_task("a")
        intruder = await kit.registered_node("b")
        doc = encoded(RESULT)
        details = await _expect(grpc.StatusCode.PERMISSION_DENIED, intruder.upload(handle.task_id, doc))
        assert details == f"task {handle.task_id} was not sent to node b"
        await _expect(grpc.StatusCode.PERMISSION_DENIED, intruder.status(handle.task_id))
        await _expect(grpc.StatusCode.PERMISSION_DENIED, intruder.report(handle.task_id, []))
        await _expect(grpc.StatusCode.PERMISSION_DENIED, intruder.poll(resume_task_id=handle.task_id))
        # a heartbeat is no refusal: its task_state says UNKNOWN, as for an id never issued (test_heartbeat_task_state)
        assert (await intruder.heartbeat(handle.task_id)).task_state == pb.TASK_STATE_UNKNOWN
        assert not handle.done() and handle.late_uploads == []
        handle.cancel()
        await _expect(grpc.StatusCode.PERMISSION_DENIED, intruder.upload(handle.task_id, doc))
        assert handle.late_uploads == []


@async_test
async def test_unknown_task_is_not_found(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        details = await _expect(grpc.StatusCode.NOT_FOUND, node.upload("no-such-task", encoded(1)))
        assert details == "no task with id 'no-such-task'"
        await _expect(grpc.StatusCode.NOT_FOUND, node.status("no-such-task"))
        await _expect(grpc.StatusCode.NOT_FOUND, node.poll(resume_task_id="no-such-task"))


@async_test
async def test_concurrent_streams_for_one_task_conflict(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task()
        session_doc = OutgoingPayload.from_bytes(bytes(8192), 4096)
        kit.server.uploads.begin(handle.task_id, "a", session_doc.info())  # an upload already running
        details = await _expect(grpc.StatusCode.ABORTED, node.upload(handle.task_id, session_doc))
        assert "already running" in details
