"""A small, real NodeService for node-client tests: the generated servicer on a grpc.aio server, port 0.

It speaks the protocol from protos/fedstream/v1 with plain protobuf (no fedserver code), keeps what the
node sent for the tests to inspect, and can break a download or an upload mid-stream on request, the way
a cut network or a server crash would (the call ends with UNAVAILABLE after some chunks were kept).
A status the tests script is ``(code, details)``, as from a server that sends no error reason, or
``(code, details, reason)``: the ErrorReason name then goes in the ``fedstream-error-reason`` trailer, as
fedserver sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from fedcore.errors import ServerRefusedError
from fedcore.framing import OutgoingPayload
from fednode.client import NodeClient
from fednode.config import BackoffPolicy, NodeConfig
from fednode.handler import EchoHandler, TaskHandler
from fedstream.v1 import common_pb2, node_service_pb2_grpc
from fedstream.v1 import node_service_pb2 as pb

TOKEN = "s3cret-token"
VERSION = common_pb2.ProtocolVersion(major=1, minor=0)
REASON_METADATA_KEY = "fedstream-error-reason"
#: A scripted status: (code, details) or (code, details, ErrorReason name).
Status = tuple[grpc.StatusCode, str] | tuple[grpc.StatusCode, str, str]


async def refuse(context: grpc.aio.ServicerContext, status: Status) -> None:
    """End the call with ``status`` (its reason, if any, in the trailer)."""
    code, details, *reason = status
    await context.abort(code, details, trailing_metadata=tuple((REASON_METADATA_KEY, r) for r in reason))


@dataclass
class FakeTask:
    task_id: str
    payload: OutgoingPayload
    kind: int = common_pb2.TASK_KIND_TRAIN
    round: int = 1
    experiment_id: str = "exp-1"
    announced_size: int | None = None  # lie about the payload size in the header (limit tests)


@dataclass
class StoredResult:
    header: pb.UploadHeader
    data: bytearray = field(default_factory=bytearray)
    complete: bool = False


class FakeNodeService(node_service_pb2_grpc.NodeServiceServicer):
    """Hands out queued tasks one poll at a time; records registrations, polls, reports and results."""

    def __init__(self, *, heartbeat_interval: float = 5.0, max_chunk_size: int = 1 << 20,
                 max_payload_size: int = 1 << 30) -> None:
        self.tasks: asyncio.Queue[FakeTask] = asyncio.Queue()
        self.assigned: dict[str, FakeTask] = {}
        self.registrations: list[pb.RegisterRequest] = []
        self.polls: list[pb.PollTaskRequest] = []
        self.reports: list[pb.ReportRequest] = []
        self.heartbeats: list[pb.HeartbeatRequest] = []
        self.status_requests: list[pb.GetUploadStatusRequest] = []
        self.upload_headers: list[pb.UploadHeader] = []
        self.results: dict[str, StoredResult] = {}
        self.result_event = asyncio.Event()
        self.registered_at: list[float] = []
        self.download_bytes_sent = 0
        self.upload_bytes_received = 0
        self.heartbeat_interval = heartbeat_interval
        self.max_chunk_size = max_chunk_size
        self.max_payload_size = max_payload_size
        # fault injection: break the next download / upload after this many chunks (once); a download ends
        # with break_download_status (by default as a cut network would; a refusal of the task, ...)
        self.break_download_after: int | None = None
        self.break_download_status: Status = (grpc.StatusCode.UNAVAILABLE, "download cut by the test")
        self.break_upload_after: int | None = None
        # end the next polls, in order, with these statuses before any event (None: not that one): fresh
        # polls / resuming polls
        self.refuse_polls: list[Status | None] = []
        self.refuse_resumes: list[Status | None] = []
        # end the next upload with this status instead of keeping it (once; after reading all of it)
        self.refuse_upload: Status | None = None
        # stop sending (without ending the call) after this many chunks: the test kills the server
        self.stall_download_after: int | None = None
        # pause after the last chunk before ending the stream (a server still busy with its bookkeeping)
        self.linger_after_last_chunk = 0.0
        self.streams_completed = 0  # PollTask streams that sent a whole task and ended normally
        self.streams_cancelled = 0  # ... that the node cancelled
        # answer this many upload attempts with RESOURCE_EXHAUSTED "no upload buffer free" (then accept)
        self.busy_uploads = 0
        # answer the next poll with ServerShutdown(retry_after)
        self.shutdown_next_poll: float | None = None
        self.poll_started = asyncio.Event()

    # -- helpers for tests ------------------------------------------------------------------
    def add_task(self, task: FakeTask) -> None:
        self.tasks.put_nowait(task)

    async def wait_results(self, count: int, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while sum(r.complete for r in self.results.values()) < count:
                self.result_event.clear()
                await self.result_event.wait()
        await asyncio.wait_for(_wait(), timeout)

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while not predicate():
                await asyncio.sleep(0.01)
        await asyncio.wait_for(_wait(), timeout)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    # -- RPCs ----------------------------------------------------------------------------------
    async def Register(self, request, context):
        await self._authenticate(context)
        if request.version.major != VERSION.major:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol {request.version.major}.x not supported, server speaks 1.0")
        self.registrations.append(request)
        self.registered_at.append(asyncio.get_running_loop().time())
        return pb.RegisterResponse(
            node_id="node-" + request.node_name, server_version=VERSION, max_poll_wait_seconds=5.0,
            max_chunk_size=self.max_chunk_size, max_payload_size=self.max_payload_size,
            heartbeat_interval_seconds=self.heartbeat_interval)

    async def PollTask(self, request, context):
        await self._authenticate(context)
        self.polls.append(request)
        self.poll_started.set()
        if self.shutdown_next_poll is not None:
            retry, self.shutdown_next_poll = self.shutdown_next_poll, None
            yield pb.PollTaskResponse(shutdown=pb.ServerShutdown(reason="test", retry_after_seconds=retry))
            return
        refusals = self.refuse_resumes if request.resume_task_id else self.refuse_polls
        if refusals:
            status = refusals.pop(0)
            if status is not None:  # None: this poll goes on
                await refuse(context, status)
        start = 0
        if request.resume_task_id:
            task = self.assigned.get(request.resume_task_id)
            if task is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.resume_task_id} unknown")
            start = request.resume_offset
        elif self.assigned:
            task = next(iter(self.assigned.values()))
        else:
            try:
                task = await asyncio.wait_for(self.tasks.get(), min(request.wait_seconds, 5.0))
            except TimeoutError:
                yield pb.PollTaskResponse(no_task=pb.NoTask())
                return
            self.assigned[task.task_id] = task
        info = task.payload.info(start)
        total = info.total_size if task.announced_size is None else task.announced_size
        yield pb.PollTaskResponse(task=pb.TaskHeader(
            task_id=task.task_id, experiment_id=task.experiment_id, round=task.round, kind=task.kind,
            inactivity_timeout_seconds=60.0,
            payload=common_pb2.PayloadHeader(
                total_size=total, sha256=info.sha256, chunk_size=info.chunk_size,
                chunk_count=-(-(total - start) // info.chunk_size), start_offset=info.start_offset)))
        for sent, (offset, data) in enumerate(task.payload.iter_chunks(start)):
            if self.break_download_after is not None and sent == self.break_download_after:
                self.break_download_after = None
                if self.break_download_status[0] not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                    self.assigned.pop(task.task_id, None)  # refused: the task is closed, never sent again
                await refuse(context, self.break_download_status)
            if sent == self.stall_download_after:
                await asyncio.Event().wait()  # until the server stops and cancels this call
            yield pb.PollTaskResponse(chunk=common_pb2.Chunk(offset=offset, data=bytes(data)))
            self.download_bytes_sent += len(data)
        try:
            await asyncio.sleep(self.linger_after_last_chunk)
        except asyncio.CancelledError:
            self.streams_cancelled += 1
            raise
        self.streams_completed += 1

    async def UploadResult(self, request_iterator, context):
        await self._authenticate(context)
        first = await request_iterator.__anext__()
        header = first.header
        self.upload_headers.append(header)
        if self.busy_uploads > 0:
            self.busy_uploads -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent uploads (16, limit 16)")
        if self.refuse_upload is not None:
            status, self.refuse_upload = self.refuse_upload, None
            async for _ in request_iterator:  # read to the end first: grpc.aio would report a refusal of a
                pass  # stream still being written as a local INTERNAL (the real server's case: test_upload_refusals)
            await refuse(context, status)
        if header.task_id not in self.assigned and header.task_id not in self.results:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {header.task_id} unknown")
        stored = self.results.get(header.task_id)
        if stored is None or header.payload.start_offset == 0:
            stored = self.results[header.task_id] = StoredResult(header)
        if header.payload.start_offset != len(stored.data):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"resume at {header.payload.start_offset}, have {len(stored.data)}")
        received = 0
        async for message in request_iterator:
            if message.chunk.offset != len(stored.data):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk out of order")
            stored.data += message.chunk.data
            self.upload_bytes_received += len(message.chunk.data)
            received += 1
            if self.break_upload_after is not None and received == self.break_upload_after:
                self.break_upload_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "upload cut by the test")
        if len(stored.data) != header.payload.total_size:
            await context.abort(grpc.StatusCode.DATA_LOSS, "upload incomplete")
        if header.payload.total_size and hashlib.sha256(stored.data).digest() != header.payload.sha256:
            await context.abort(grpc.StatusCode.DATA_LOSS, "digest mismatch")
        stored.complete = True
        self.assigned.pop(header.task_id, None)
        self.result_event.set()
        return pb.UploadResultResponse(task_id=header.task_id, received_bytes=len(stored.data))

    async def GetUploadStatus(self, request, context):
        await self._authenticate(context)
        self.status_requests.append(request)
        stored = self.results.get(request.task_id)
        if stored is None:
            return pb.GetUploadStatusResponse(acknowledged_offset=0, complete=False)
        return pb.GetUploadStatusResponse(acknowledged_offset=len(stored.data), complete=stored.complete)

    async def Report(self, request, context):
        await self._authenticate(context)
        self.reports.append(request)
        return pb.ReportResponse()

    async def Heartbeat(self, request, context):
        await self._authenticate(context)
        self.heartbeats.append(request)
        return pb.HeartbeatResponse(shutting_down=False)


def free_port() -> int:
    """A loopback port nobody listens on right now (for 'server comes up later' tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_server(service: FakeNodeService, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve ``service`` on 127.0.0.1 (port 0: any free port); return the server and its port."""
    server = grpc.aio.server(options=[
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.max_receive_message_length", 8 << 20),
    ])
    node_service_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    return server, bound


def node_config(port: int, **overrides: Any) -> NodeConfig:
    """An insecure loopback NodeConfig with test-sized timeouts and a fast backoff."""
    values: dict[str, Any] = {
        "server": f"127.0.0.1:{port}", "tls": "insecure", "token": TOKEN, "node_name": "n1",
        "poll_wait_seconds": 2.0, "backoff": BackoffPolicy(initial=0.05, maximum=0.5),
        "report_interval_seconds": 0.05, "call_timeout_seconds": 5.0, "idle_stream_timeout_seconds": 5.0,
        "stop_grace_seconds": 2.0,
    }
    values.update(overrides)
    return NodeConfig(**values)


@contextlib.asynccontextmanager
async def running(client: NodeClient, timeout: float = 5.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``client`` in a task for the block; stop it afterwards and wait (bounded) for run() to end."""
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        client.stop()
        await asyncio.wait_for(task, timeout)


def arun(coro: Any, timeout: float = 60.0) -> Any:
    """Run a test coroutine in a fresh event loop with a hard timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def run_until_refused(service: FakeNodeService, payload: OutgoingPayload, *, rng: Any = None,
                            **config: Any) -> ServerRefusedError:
    """An EchoHandler node (``config`` overrides :func:`node_config`; ``rng`` drives its backoff) against
    ``service``, with task t1 (carrying ``payload``) queued: the refusal that ends its run()."""
    server, port = await start_server(service)
    client = NodeClient(node_config(port, **config), EchoHandler(), rng=rng)
    service.add_task(FakeTask("t1", payload))
    try:
        with pytest.raises(ServerRefusedError) as err:
            await asyncio.wait_for(client.run(), 10)
    finally:
        await server.stop(None)
    return err.value


async def run_until_t1_done(service: FakeNodeService, payload: OutgoingPayload, handler: TaskHandler | None = None,
                            **config: Any) -> NodeClient:
    """A node running ``handler`` (an EchoHandler if None; ``config`` overrides :func:`node_config`) against
    ``service`` until it has sent the result of task t1 (carrying ``payload``), queued once it runs."""
    server, port = await start_server(service)
    client = NodeClient(node_config(port, **config), EchoHandler() if handler is None else handler)
    try:
        async with running(client):
            service.add_task(FakeTask("t1", payload))
            await service.wait_results(1)
    finally:
        await server.stop(None)
    return client
