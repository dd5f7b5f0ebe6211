"""A newer UploadResult of a task from the same node process takes over the stream a dead connection keeps
"running" (no RST: the server would hold it until gRPC keepalive gives up, up to 80 s, and refuse the
process's resume ABORTED "already running" meanwhile).

The rule (:meth:`fedserver.uploads.UploadSessions.begin`): a header of the same task, node and process
(``fedstream-instance-id``) stops the older stream before the newer one writes: the bytes it had written are
kept, the newer stream resumes from the offset it asks for (refused as on a parked session when that offset
is wrong), and the older call ends ABORTED ``ERROR_REASON_UPLOAD_IN_PROGRESS`` naming the takeover. A call of
another node is refused PERMISSION_DENIED, one without an instance id (an older node) ABORTED as before.

Unit level on :class:`UploadSessions`; over real grpc.aio on loopback with a raw-stub node whose first
upload goes through a :class:`FreezingProxy` (a half-open connection: nothing flows, no socket closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from fake_node_service import arun, node_config, running
from server_testkit import ServerKit, WireNode, async_test, channel_options, encoded, running_server
from tcp_proxy import FreezingProxy, TcpProxy

from fedcore.errors import ChunkOrderError, UploadConflictError
from fedcore.framing import OutgoingPayload
from fedcore.wire import ResultDescriptor, TaskKind, TaskOutcome, convert
from fedcore.wire.metadata_keys import INSTANCE_METADATA_KEY, REASON_METADATA_KEY
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle, TaskState
from fedserver.uploads import UploadSessions
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

X = "c0ffee" * 5 + "00"  # the node process's instance id (32 hex characters)
CHUNK = 64 << 10
RESULT = {"params": {"w": np.arange(100_000, dtype=np.float64)}, "num_samples": 7}  # ~800 kB: 13 chunks


# -- unit level: UploadSessions ---------------------------------------------------------------------------
def _sessions() -> UploadSessions:
    return UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=4)


def _doc(seed: int = 0, chunks: int = 6) -> OutgoingPayload:
    data = np.random.default_rng(seed).integers(0, 256, chunks * 1024, dtype=np.uint8).tobytes()
    return OutgoingPayload.from_bytes(data, 1024)


def _write(session_chunks: list[tuple[int, bytes]], uploads: UploadSessions, task_id: str) -> None:
    session = uploads.session(task_id)
    assert session is not None
    for offset, data in session_chunks:
        session.assembler.add(offset, data)


def test_the_same_process_takes_a_running_session_over_and_keeps_its_bytes() -> None:
    uploads, doc = _sessions(), _doc()
    chunks = [(o, bytes(d)) for o, d in doc.iter_chunks(0)]
    old = uploads.begin("t", "n", doc.info(), X)
    woken: list[str] = []
    old.wake_writer = lambda: woken.append("old")
    old_writer = old.writer
    _write(chunks[:3], uploads, "t")

    new = uploads.begin("t", "n", doc.info(3072), X)
    assert new is old and new.received == 3072  # the same buffer, its bytes kept
    assert woken == ["old"] and new.wake_writer is None  # the older stream woken, once
    assert not new.written_by(old_writer) and new.written_by(new.writer) and new.active
    assert new.instance == X and len(uploads) == 1
    _write(chunks[3:], uploads, "t")
    assert new.assembler.finish().tobytes() == b"".join(d for _, d in chunks)


def test_a_takeover_from_offset_0_replaces_the_running_session() -> None:
    uploads, doc = _sessions(), _doc()
    old = uploads.begin("t", "n", doc.info(), X)
    old_writer = old.writer
    _write([(0, bytes(next(doc.iter_chunks(0))[1]))], uploads, "t")
    new = uploads.begin("t", "n", doc.info(), X)
    assert new is not old and new.received == 0 and new.written_by(new.writer)
    assert not old.written_by(old_writer)
    with pytest.raises(ChunkOrderError, match="discarded"):  # the old session's buffer is gone
        old.assembler.add(1024, bytes(1024))
    assert uploads.buffered_bytes == new.assembler.held_bytes  # the old bytes no longer count


@pytest.mark.parametrize("node_id, instance", [("n", ""), ("n", "d" * 32), ("m", X)])
def test_another_process_or_an_unknown_one_does_not_take_over(node_id: str, instance: str) -> None:
    uploads, doc = _sessions(), _doc()
    old = uploads.begin("t", "n", doc.info(), X)
    old.wake_writer = lambda: pytest.fail("the running stream must not be woken")
    _write([(0, bytes(1024))], uploads, "t")
    with pytest.raises(UploadConflictError, match="already running"):
        uploads.begin("t", node_id, doc.info(1024), instance)
    assert old.written_by(1) and old.instance == X


def test_a_running_session_without_instance_is_never_taken_over() -> None:
    uploads, doc = _sessions(), _doc()
    uploads.begin("t", "n", doc.info(), "")  # an older node's stream
    with pytest.raises(UploadConflictError, match="already running"):
        uploads.begin("t", "n", doc.info(), "")


def test_a_wrong_resume_is_refused_as_on_a_parked_session_and_leaves_the_stream_writing() -> None:
    uploads, doc = _sessions(), _doc()
    old = uploads.begin("t", "n", doc.info(), X)
    old.wake_writer = lambda: pytest.fail("the running stream must not be woken")
    _write([(o, bytes(d)) for o, d in doc.iter_chunks(0)][:2], uploads, "t")
    with pytest.raises(ChunkOrderError, match="starts at offset 3072, expected 2048"):
        uploads.begin("t", "n", doc.info(3072), X)
    other = _doc(seed=1)
    with pytest.raises(ChunkOrderError, match="different payload"):
        uploads.begin("t", "n", other.info(1024), X)
    assert old.written_by(1) and old.received == 2048


def test_a_resume_behind_the_bytes_the_old_stream_delivered_meanwhile_is_retryable() -> None:
    """The older stream delivered chunks after the process asked GetUploadStatus: the takeover happens (the
    process gave that stream up) and the header is refused ABORTED-retryable naming the offset, not as a
    misframed result (which would make fednode give the result up); the next resume there works."""
    uploads, doc = _sessions(), _doc()
    chunks = [(o, bytes(d)) for o, d in doc.iter_chunks(0)]
    old = uploads.begin("t", "n", doc.info(), X)
    woken: list[str] = []
    old.wake_writer = lambda: woken.append("old")
    _write(chunks[:4], uploads, "t")
    with pytest.raises(UploadConflictError, match="resume at offset 4096"):
        uploads.begin("t", "n", doc.info(2048), X)
    assert woken == ["old"] and not old.active and uploads.acknowledged("t") == 4096  # parked, bytes kept
    new = uploads.begin("t", "n", doc.info(4096), X)
    _write(chunks[4:], uploads, "t")
    assert new.assembler.finish().tobytes() == b"".join(d for _, d in chunks)


def test_a_refused_takeover_that_parks_the_session_wakes_the_uploads_waiting_in_line() -> None:
    """The takeover refused retryable (above) leaves the task's session parked: an upload waiting in line for
    the only session slot must learn at once that nothing runs any more ("hopeless": busy, retry), not when
    its wait (here 30 s) runs out."""
    async def scenario() -> float:
        uploads, doc = _sessions(), _doc()
        uploads.max_sessions = 1
        chunks = [(o, bytes(d)) for o, d in doc.iter_chunks(0)]
        uploads.begin("t", "n", doc.info(), X)
        _write(chunks[:4], uploads, "t")

        async def wait_in_line() -> float:
            started = asyncio.get_running_loop().time()
            async with uploads.line("u", 6 * 1024, timeout=30) as turn:
                assert not turn.admitted
            return asyncio.get_running_loop().time() - started

        waiter = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0.2)  # in line: the one slot is held by the running upload of "t"
        assert not waiter.done()
        with pytest.raises(UploadConflictError, match="resume at offset 4096"):
            uploads.begin("t", "n", doc.info(2048), X)
        return await asyncio.wait_for(waiter, 10)

    assert asyncio.run(scenario()) < 5  # woken at once; it waited the whole 30 s before


# -- over real gRPC ---------------------------------------------------------------------------------------
def _process(node: WireNode, instance: str = X) -> WireNode:
    """``node`` calling as the node process ``instance`` (its metadata names it on every call)."""
    node.metadata = (*node.metadata, (INSTANCE_METADATA_KEY, instance))
    return node


def _reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class UploadCall:
    """An UploadResult call whose chunks the test feeds one by one (``send``), or never."""

    def __init__(self, node: WireNode, task_id: str, doc: OutgoingPayload, start: int = 0) -> None:
        self._queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, TaskOutcome.SUCCEEDED, "",
                                                                  doc.info(start)))

        async def requests() -> AsyncIterator[pb.UploadResultRequest]:
            yield pb.UploadResultRequest(header=header)
            while (item := await self._queue.get()) is not None:
                yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=item[0], data=item[1]))

        self.call = node.stub.UploadResult(requests(), metadata=node.metadata, timeout=50)

    def send(self, *chunks: tuple[int, bytes]) -> None:
        for chunk in chunks:
            self._queue.put_nowait(chunk)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def refusal(self) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self.call
        return err.value


async def _delivered_task(kit: ServerKit, token: str) -> tuple[WireNode, TaskHandle]:
    """Process X of node ``n`` registered on a direct connection, holding a task it polled."""
    node = _process(WireNode(kit.node(token=token).channel, token))
    await node.register(instance_id=X)
    handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"round": 1}), experiment_id="e", round=1,
                                 inactivity_timeout=120)
    polled = await node.poll(wait=5, instance=X)
    assert polled.descriptor is not None and polled.descriptor.task_id == handle.task_id
    return node, handle


@contextlib.asynccontextmanager
async def _frozen_link(kit: ServerKit, token: str) -> AsyncIterator[tuple[FreezingProxy, WireNode]]:
    """A second connection of process X through a :class:`FreezingProxy`; stopped after (breaking it)."""
    proxy = FreezingProxy(kit.server.port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}", options=channel_options())
    kit.channels.append(channel)
    try:
        yield proxy, _process(WireNode(channel, token))
    finally:
        await proxy.stop()


def _chunks(doc: OutgoingPayload) -> list[tuple[int, bytes]]:
    return [(o, bytes(d)) for o, d in doc.iter_chunks(0)]


@async_test
async def test_the_process_resumes_at_once_past_a_dead_upload_stream_which_ends_taken_over(tmp_path: Path) -> None:
    """The upload's connection freezes after 5 chunks. GetUploadStatus says 5 chunks while the dead stream
    still counts as running; another node is refused PERMISSION_DENIED and a call without instance id ABORTED,
    both leaving it running; process X resumes on a fresh connection and completes (keepalive would take
    80 s). The dead stream ends at once (no open upload left); when its link thaws, a garbage chunk it had
    queued is not written (the result decodes intact) and its call reads ABORTED naming the takeover."""
    doc = encoded(RESULT, chunk_size=CHUNK)
    chunks = _chunks(doc)
    assert len(chunks) > 8
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        node, handle = await _delivered_task(kit, token)
        async with _frozen_link(kit, token) as (proxy, linked):
            old = UploadCall(linked, handle.task_id, doc)
            old.send(*chunks[:5])
            await eventually(lambda: kit.server.uploads.acknowledged(handle.task_id) == 5 * CHUNK, 10,
                             "the server holding 5 chunks")
            proxy.freeze()  # the network vanishes: no RST, the server's stream stays open
            old.send((5 * CHUNK, b"\xff" * CHUNK))  # garbage, held in the frozen link
            session = kit.server.uploads.session(handle.task_id)
            assert session is not None and session.active
            old_writer = session.writer

            status = await node.status(handle.task_id)
            assert (status.acknowledged_offset, status.complete) == (5 * CHUNK, False)

            other = await kit.registered_node("b")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other.upload(handle.task_id, doc, start_offset=5 * CHUNK)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, err.value.details()
            older_node = WireNode(kit.node(token=token).channel, token)  # no instance id in its calls
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await older_node.upload(handle.task_id, doc, start_offset=5 * CHUNK)
            assert err.value.code() is grpc.StatusCode.ABORTED and "already running" in err.value.details()
            assert session.written_by(old_writer) and kit.server.registry.get("n").open_uploads == 1

            new = UploadCall(node, handle.task_id, doc, start=5 * CHUNK)  # the process, reconnected
            await eventually(lambda: not session.written_by(old_writer), 10, "the takeover")
            assert session.received == 5 * CHUNK and session.instance == X
            await eventually(lambda: kit.server.registry.get("n").open_uploads == 1, 10,
                             "the dead stream ended (the newer one open)")
            new.send(chunks[5])
            await eventually(lambda: kit.server.uploads.acknowledged(handle.task_id) == 6 * CHUNK, 10,
                             "the newer stream writing")
            proxy.thaw()  # the dead link comes back: its garbage chunk reaches a call that ended
            refusal = await old.refusal()
            assert refusal.code() is grpc.StatusCode.ABORTED, refusal.details()
            assert _reason(refusal) == "ERROR_REASON_UPLOAD_IN_PROGRESS"
            assert "taken over by a newer UploadResult of the same node process" in refusal.details()
            new.send(*chunks[6:])
            new.close()
            response = await new.call
            assert response.received_bytes == doc.total_size
        result = await handle.result(timeout=5)
        assert result.outcome is TaskState.SUCCEEDED
        np.testing.assert_array_equal(result.payload["params"]["w"], RESULT["params"]["w"])
        assert kit.server.uploads.session(handle.task_id) is None
        assert kit.server.registry.get("n").open_uploads == 0


@async_test
async def test_a_dead_stream_that_delivered_no_byte_is_taken_over_by_a_fresh_start(tmp_path: Path) -> None:
    """The connection froze right after the header: GetUploadStatus says 0 and the process starts over from 0;
    the running session is replaced, its buffer no longer counted."""
    doc = encoded(RESULT, chunk_size=CHUNK)
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        node, handle = await _delivered_task(kit, token)
        async with _frozen_link(kit, token) as (proxy, linked):
            old = UploadCall(linked, handle.task_id, doc)
            await eventually(lambda: kit.server.uploads.session(handle.task_id) is not None, 10, "the header read")
            proxy.freeze()
            assert (await node.status(handle.task_id)).acknowledged_offset == 0
            response = await node.upload(handle.task_id, doc)
            assert response.received_bytes == doc.total_size
            await eventually(lambda: kit.server.registry.get("n").open_uploads == 0, 10, "the dead stream ended")
            proxy.thaw()
            refusal = await old.refusal()
            assert refusal.code() is grpc.StatusCode.ABORTED and "taken over" in refusal.details()
        result = await handle.result(timeout=5)
        assert result.payload["num_samples"] == 7
        # one buffer counted: the result's (alive while its arrays are), not the replaced session's too
        assert kit.server.uploads.buffered_bytes == doc.total_size


@async_test
async def test_an_old_stream_still_delivering_while_the_newer_header_arrives_never_corrupts_the_result(
        tmp_path: Path) -> None:
    """A live older stream sends its next chunk (garbage) as the process's newer header goes out, or right
    after the server took the session over. The older stream ends ABORTED either way. Its chunk is written
    only if it came first, while the stream still owned the session; the newer header, behind it then, is
    refused retryably naming the offset reached (the process asks again and uploads from there: the
    garbage fails the digest, DATA_LOSS, and a fresh start delivers). Taken over first, the chunk is never
    written and the newer stream completes at once. The result always arrives intact."""
    doc = encoded(RESULT, chunk_size=CHUNK)
    chunks = _chunks(doc)
    garbage = (3 * CHUNK, b"\xff" * CHUNK)
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        node = _process(WireNode(kit.node(token=token).channel, token))
        await node.register(instance_id=X)
        linked = _process(WireNode(kit.node(token=token).channel, token))  # the older stream's connection
        for round_ in range(1, 7):
            after_takeover = round_ % 2 == 0
            handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"round": round_}), experiment_id="e",
                                         round=round_, inactivity_timeout=120)
            assert (await node.poll(wait=5, instance=X)).descriptor is not None
            old = UploadCall(linked, handle.task_id, doc)
            old.send(*chunks[:3])
            await eventually(lambda h=handle: kit.server.uploads.acknowledged(h.task_id) == 3 * CHUNK, 10,
                             "the server holding 3 chunks")
            session = kit.server.uploads.session(handle.task_id)
            assert session is not None
            old_writer = session.writer
            if not after_takeover:
                old.send(garbage)  # in flight while the newer header goes out
            new = UploadCall(node, handle.task_id, doc, start=3 * CHUNK)
            if after_takeover:
                await eventually(lambda s=session, w=old_writer: not s.written_by(w), 10, "the takeover")
                old.send(garbage)
            new.send(*chunks[3:])
            new.close()
            try:
                await new.call
            except grpc.aio.AioRpcError as exc:  # the older stream's chunk came first
                assert not after_takeover, exc
                assert exc.code() is grpc.StatusCode.ABORTED and "resume at offset 262144" in exc.details(), exc
                assert (await node.status(handle.task_id)).acknowledged_offset == 4 * CHUNK
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await node.upload(handle.task_id, doc, start_offset=4 * CHUNK)
                assert err.value.code() is grpc.StatusCode.DATA_LOSS, err.value.details()
                await node.upload(handle.task_id, doc)
            refusal = await old.refusal()
            assert refusal.code() is grpc.StatusCode.ABORTED and "taken over" in refusal.details()
            result = await handle.result(timeout=5)
            assert result.outcome is TaskState.SUCCEEDED
            np.testing.assert_array_equal(result.payload["params"]["w"], RESULT["params"]["w"])
        await eventually(lambda: kit.server.registry.get("n").open_uploads == 0, 10, "every stream ended")


# -- fednode end to end -----------------------------------------------------------------------------------
_LINK: contextvars.ContextVar[asyncio.Event] = contextvars.ContextVar("link")


class LinkFreezingProxy(TcpProxy):
    """Freezes the connections open so far once the node sent ``freeze_after(n)`` more bytes (a dead link:
    nothing flows, no socket closes); connections opened later flow (the node's network came back)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._links: list[asyncio.Event] = []
        self._freeze_at: int | None = None
        self.frozen = asyncio.Event()

    def freeze_after(self, nbytes: int) -> None:
        self._freeze_at = self.upstream_bytes + nbytes

    async def stop(self) -> None:
        for link in self._links:  # the held pipes see their closed sockets and end
            link.set()
        await super().stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = asyncio.Event()
        link.set()
        self._links.append(link)
        _LINK.set(link)  # this connection's two pipes (tasks of this one) see it
        await super()._handle(reader, writer)

    async def _before_read(self, upstream: bool) -> None:
        await _LINK.get().wait()

    async def _before_write(self, upstream: bool) -> bool:
        if upstream and self._freeze_at is not None and self.upstream_bytes >= self._freeze_at:
            self._freeze_at = None
            for link in self._links:
                link.clear()
            self.frozen.set()
        await _LINK.get().wait()
        return True


class Doubler:
    def handle(self, task: Any, reporter: Any) -> TaskReply:
        return TaskReply.succeeded({"params": {k: 2 * v for k, v in task.payload["params"].items()}})


def test_fednode_resumes_an_upload_whose_link_died_without_waiting_for_keepalive(tmp_path: Path) -> None:
    """A real NodeClient's upload link freezes 2 MiB into a 16 MiB result: the node gives the silent call
    up (its idle timeout), reconnects on a fresh link, asks GetUploadStatus and resumes; the server hands it
    the upload at once (keepalive, set to 300 s here, would keep the dead stream "running" past the test)."""
    async def scenario() -> None:
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=2.0,
                                        heartbeat_interval_seconds=0.5, chunk_size=64 << 10,
                                        keepalive_time_seconds=300.0), store)
        port = await server.start()
        proxy = LinkFreezingProxy(port)
        client = NodeClient(node_config(await proxy.start(), token=token, idle_stream_timeout_seconds=1.5),
                            Doubler(), capabilities=["numpy"])
        try:
            async with running(client):
                assert await server.wait_for_nodes(1, timeout=10) == ["site-a"]
                w = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
                proxy.freeze_after(2 << 20)
                handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"params": {"w": w}}),
                                         experiment_id="e", round=1, inactivity_timeout=60)
                result = await handle.result(timeout=40)
                assert proxy.frozen.is_set()
                assert result.outcome is TaskState.SUCCEEDED, result.error_message
                np.testing.assert_array_equal(result.payload["params"]["w"], 2 * w)
                await eventually(lambda: client.results_delivered == 1, 10, "the node counting its result delivered")
        finally:
            await proxy.stop()
            await server.stop(grace=1)

    arun(scenario())
