"""Every error status fedserver produces names a fedstream.v1.ErrorReason in its trailing metadata
``fedstream-error-reason`` (docs/protocol.md §7), over real grpc.aio on loopback: identity, version, a
replaced node process, tasks closed / unknown / of another node, and every refusal of an upload.

The raw generated stub (server_testkit.WireNode) is the client, so these tests pin the wire itself.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from server_testkit import async_test, encoded, running_server, sha256, version

from fedcore.errors import RoundFailedError, ServerStateError, TaskClosedError
from fedcore.framing import OutgoingPayload, PayloadInfo
from fedcore.wire import TaskOutcome
from fedserver.errors import (
    REASON_METADATA_KEY,
    STATUS_OF_ERROR,
    status_for,
    translate_stream,
    translate_unary,
)
from fedstream.v1 import common_pb2, node_service_pb2_grpc
from fedstream.v1 import node_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode
OLD, NEW = "a" * 32, "b" * 32
RESULT = {"params": {"w": np.arange(5000, dtype=np.float64)}, "num_samples": 3}  # ~40 kB


def reason_of(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and the reason trailer of a call the server refuses."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), reason_of(err.value)


# -- the table ------------------------------------------------------------------------------------------
def test_every_reason_has_one_status_code_and_a_line_in_the_protocol_document() -> None:
    names = [n for n in common_pb2.ErrorReason.DESCRIPTOR.values_by_name if n != "ERROR_REASON_UNSPECIFIED"]
    codes: dict[str, set[grpc.StatusCode]] = {}
    for _, code, reason in STATUS_OF_ERROR:
        codes.setdefault(common_pb2.ErrorReason.Name(reason), set()).add(code)
    codes.setdefault(status_for(RuntimeError("bug"))[1], set()).add(status_for(RuntimeError("bug"))[0])
    assert sorted(codes) == sorted(names)  # every reason is produced, and only these
    assert all(len(c) == 1 for c in codes.values()), codes
    assert codes["ERROR_REASON_INTERNAL"] == {Code.INTERNAL}
    section = (ROOT / "docs" / "protocol.md").read_text().split("## 7. Error codes")[1].split("\n## 8.")[0]
    for name in names:
        code = next(iter(codes[name])).name
        assert re.search(rf"`{code}`.*`{name}`", section), f"docs/protocol.md §7 lists {name} with {code}"


def test_a_subclass_gets_its_own_reason_before_its_base() -> None:
    assert status_for(TaskClosedError("x")) == (Code.FAILED_PRECONDITION, "ERROR_REASON_TASK_CLOSED")
    assert status_for(RoundFailedError("x")) == (Code.INTERNAL, "ERROR_REASON_INTERNAL")  # not a call's error
    assert status_for(ServerStateError("x")) == (Code.UNAVAILABLE, "ERROR_REASON_SERVER_STOPPING")


# -- identity, version, process -----------------------------------------------------------------------------
@async_test
async def test_identity_and_protocol_version(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        assert await refused(kit.node(token="no-such-token").heartbeat()) == (
            Code.UNAUTHENTICATED, "ERROR_REASON_UNAUTHENTICATED")
        assert await refused(kit.node().heartbeat()) == (Code.UNAUTHENTICATED, "ERROR_REASON_UNAUTHENTICATED")
        node = kit.node("a")
        assert await refused(node.register(ver=version(2, 0))) == (
            Code.FAILED_PRECONDITION, "ERROR_REASON_VERSION_MISMATCH")
        assert await refused(node.stub.Heartbeat(pb.HeartbeatRequest(version=version(0, 9)),
                                                 metadata=node.metadata, timeout=10)) == (
            Code.FAILED_PRECONDITION, "ERROR_REASON_VERSION_MISMATCH")
        await node.register()
        call = node.stub.Heartbeat(pb.HeartbeatRequest(version=version()), metadata=node.metadata, timeout=10)
        await call
        assert REASON_METADATA_KEY not in dict(await call.trailing_metadata() or ())  # only on errors


@async_test
async def test_a_replaced_process_is_refused_superseded_on_every_call(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        old, new = kit.node(token=token), kit.node(token=token)
        old.metadata = (*old.metadata, ("fedstream-instance-id", OLD))
        await old.register(instance_id=OLD)
        poll = asyncio.create_task(refused(old.poll(wait=10)))
        await eventually(lambda: kit.server.registry.get("n").open_polls == 1, 10, "the old process's poll open")
        await new.register(instance_id=NEW)
        superseded = (Code.FAILED_PRECONDITION, "ERROR_REASON_NODE_SUPERSEDED")
        assert await asyncio.wait_for(poll, 10) == superseded  # the open poll ends
        assert await refused(old.heartbeat()) == superseded
        assert await refused(old.report("t", [])) == superseded
        assert await refused(old.register(instance_id=OLD)) == superseded
        bad = kit.node(token=token)
        bad.metadata = (*bad.metadata, ("fedstream-instance-id", "a/b"))
        assert await refused(bad.heartbeat()) == (Code.INVALID_ARGUMENT, "ERROR_REASON_MALFORMED_MESSAGE")


# -- tasks ------------------------------------------------------------------------------------------------------
@async_test
async def test_closed_unknown_and_foreign_tasks(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task("a")
        intruder = await kit.registered_node("b")
        doc = encoded(RESULT)
        foreign = (Code.PERMISSION_DENIED, "ERROR_REASON_TASK_NOT_SENT_TO_NODE")
        for call in (intruder.upload(handle.task_id, doc), intruder.status(handle.task_id),
                     intruder.report(handle.task_id, []), intruder.poll(resume_task_id=handle.task_id)):
            assert await refused(call) == foreign
        unknown = (Code.NOT_FOUND, "ERROR_REASON_UNKNOWN_TASK")
        for call in (node.upload("no-such-task", doc), node.status("no-such-task"),
                     node.poll(resume_task_id="no-such-task")):
            assert await refused(call) == unknown
        handle.cancel("round cancelled by the test")
        closed = (Code.FAILED_PRECONDITION, "ERROR_REASON_TASK_CLOSED")
        for call in (node.upload(handle.task_id, doc), node.status(handle.task_id), node.report(handle.task_id, []),
                     node.poll(resume_task_id=handle.task_id)):
            assert await refused(call) == closed


# -- uploads ------------------------------------------------------------------------------------------------------
@async_test
async def test_every_refusal_of_an_upload(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_payload_size=1 << 20, max_chunk_size=1 << 16, chunk_size=1 << 16) as kit:
        node, handle = await kit.running_task()
        task = handle.task_id
        doc = encoded(RESULT, chunk_size=4096)
        assert doc.total_size > 3 * 4096
        too_large = (Code.RESOURCE_EXHAUSTED, "ERROR_REASON_PAYLOAD_TOO_LARGE")
        assert await refused(node.upload(task, info=PayloadInfo(2 << 20, bytes(32), 4096), chunks=[])) == too_large
        assert await refused(node.upload(task, info=PayloadInfo(100, bytes(32), 1 << 17), chunks=[])) == too_large
        framing = (Code.INVALID_ARGUMENT, "ERROR_REASON_FRAMING")
        assert await refused(node.upload(task, doc, start_offset=8192)) == framing  # nothing held to resume
        data = b"abcdefghij"
        assert await refused(node.upload(task, info=PayloadInfo(10, sha256(data), 4),
                                         chunks=[(0, b"abcd"), (8, b"ij")])) == framing
        assert await refused(node.upload(task, doc, stop_after_chunks=2)) == (
            Code.INVALID_ARGUMENT, "ERROR_REASON_UPLOAD_INCOMPLETE")
        assert await refused(node.upload(task, doc, start_offset=4096)) == framing  # held 8192, not 4096
        bad_digest = PayloadInfo(doc.total_size, sha256(b"other"), 4096)
        assert await refused(node.upload(task, doc, info=bad_digest)) == (
            Code.DATA_LOSS, "ERROR_REASON_DIGEST_MISMATCH")

        async def chunk_first():
            yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=0, data=b"x"))

        malformed = (Code.INVALID_ARGUMENT, "ERROR_REASON_MALFORMED_MESSAGE")
        assert await refused(node.stub.UploadResult(chunk_first(), metadata=node.metadata, timeout=10)) == malformed
        assert await refused(node.upload(task, outcome=TaskOutcome.FAILED, error_message="boom",
                                         chunks=[(0, b"x")])) == malformed  # a FAILED result carries no chunks
        session = OutgoingPayload.from_bytes(bytes(8192), 4096)
        kit.server.uploads.begin(task, "a", session.info())  # an upload of the task already running
        assert await refused(node.upload(task, session)) == (Code.ABORTED, "ERROR_REASON_UPLOAD_IN_PROGRESS")
        kit.server.uploads.end(kit.server.uploads.session(task))
        assert await refused(node.upload(task, b"\xc1" * 10, chunk_size=4096)) == (  # not msgpack: the task ends FAILED
            Code.INVALID_ARGUMENT, "ERROR_REASON_BAD_RESULT_DOCUMENT")
        assert handle.done()


@async_test
async def test_busy_uploads_are_told_from_a_payload_over_the_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, max_payload_size=1 << 20) as kit:
        (first, parked), (node, handle) = await kit.running_task("n1"), await kit.running_task("n2")
        doc = encoded(RESULT, chunk_size=4096)
        await refused(first.upload(parked.task_id, doc, stop_after_chunks=1))  # its buffer waits for a resume
        assert await refused(node.upload(handle.task_id, doc)) == (Code.RESOURCE_EXHAUSTED, "ERROR_REASON_UPLOADS_BUSY")
        over = PayloadInfo(2 << 20, bytes(32), 4096)
        assert await refused(node.upload(handle.task_id, info=over, chunks=[])) == (
            Code.RESOURCE_EXHAUSTED, "ERROR_REASON_PAYLOAD_TOO_LARGE")


# -- the wrappers: every handler's failures, the unexpected ones included -----------------------------------------
class _FailingService(node_service_pb2_grpc.NodeServiceServicer):
    """Handlers that raise what :attr:`error` holds, through the same wrappers as fedserver's."""

    def __init__(self) -> None:
        self.error: Exception = RuntimeError("a bug")

    @translate_unary
    async def Heartbeat(self, request, context):
        raise self.error

    @translate_stream
    async def PollTask(self, request, context):
        yield pb.PollTaskResponse(no_task=pb.NoTask())
        raise self.error


@pytest.mark.parametrize(("error", "status"), [
    (RuntimeError("a bug"), (Code.INTERNAL, "ERROR_REASON_INTERNAL")),
    (ServerStateError("not serving"), (Code.UNAVAILABLE, "ERROR_REASON_SERVER_STOPPING")),
    (TaskClosedError("task t is no longer accepted"), (Code.FAILED_PRECONDITION, "ERROR_REASON_TASK_CLOSED")),
])
@async_test
async def test_unary_and_streaming_handlers_send_the_reason(error: Exception, status: tuple) -> None:
    service = _FailingService()
    service.error = error
    server = grpc.aio.server()
    node_service_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = node_service_pb2_grpc.NodeServiceStub(channel)
            assert await refused(stub.Heartbeat(pb.HeartbeatRequest(), timeout=10)) == status

            async def poll() -> None:
                async for _ in stub.PollTask(pb.PollTaskRequest(), timeout=10):
                    pass

            assert await refused(poll()) == status  # after a message was sent
    finally:
        await server.stop(None)
