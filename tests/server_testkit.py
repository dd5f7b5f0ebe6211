"""Test kit for the fedserver tests: a real FedServer on port 0 and a tiny node built on the raw stub.

The node side deliberately uses the generated ``NodeServiceStub`` and :mod:`fedcore.wire` directly (not
fednode), so these tests pin the wire protocol itself.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedcore.framing import ChunkAssembler, OutgoingPayload, PayloadInfo
from fedcore.serialization import Serializer
from fedcore.wire import (
    PROTOCOL_VERSION,
    DatasetInfo,
    NodeRegistration,
    ResultDescriptor,
    TaskDescriptor,
    TaskKind,
    TaskOutcome,
    convert,
)
from fedcore.wire.metadata_keys import INSTANCE_METADATA_KEY
from fedserver.auth import NodeStore
from fedserver.config import MESSAGE_OVERHEAD, ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle
from fedstream.v1 import common_pb2, node_service_pb2_grpc
from fedstream.v1 import node_service_pb2 as pb

TEST_TIMEOUT = 60.0


def async_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async test function in a fresh event loop, with a finite overall timeout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


def version(major: int = PROTOCOL_VERSION[0], minor: int = PROTOCOL_VERSION[1]) -> common_pb2.ProtocolVersion:
    return common_pb2.ProtocolVersion(major=major, minor=minor)


@dataclass
class PolledTask:
    """What one PollTask stream carried."""

    descriptor: TaskDescriptor | None = None
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    no_task: bool = False
    shutdown: pb.ServerShutdown | None = None

    def assemble(self, max_size: int = 1 << 40) -> Any:
        assert self.descriptor is not None
        asm = ChunkAssembler(self.descriptor.payload, max_payload_size=max_size, max_chunk_size=64 << 20)
        for offset, data in self.chunks:
            asm.add(offset, data)
        return asm.decode()


class WireNode:
    """A node speaking fedstream.v1 through the raw generated stub."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None) -> None:
        self.channel = channel
        self.stub = node_service_pb2_grpc.NodeServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def register(self, name: str = "site", datasets: tuple[DatasetInfo, ...] = (),
                       ver: common_pb2.ProtocolVersion | None = None, instance_id: str = "") -> pb.RegisterResponse:
        """Register; ``instance_id`` "" as an older node (no instance id), else as that node process."""
        request = convert.registration_to_pb(NodeRegistration(name, datasets, ("numpy",), "testkit/1",
                                                              instance_id=instance_id))
        if ver is not None:
            request.version.CopyFrom(ver)
        return await self.stub.Register(request, metadata=self.metadata, timeout=10)

    async def poll(self, wait: float = 0.2, resume_task_id: str = "", resume_offset: int = 0,
                   stop_after_chunks: int | None = None, *, request: pb.PollTaskRequest | None = None,
                   instance: str | None = None) -> PolledTask:
        """One PollTask call read to its end (or ``stop_after_chunks``); ``request`` in place of the one built
        from the other arguments; ``instance``: the process's id sent in the metadata."""
        if request is None:
            request = pb.PollTaskRequest(version=version(), wait_seconds=wait, resume_task_id=resume_task_id,
                                         resume_offset=resume_offset)
        metadata = self.metadata if instance is None else (*self.metadata, (INSTANCE_METADATA_KEY, instance))
        call = self.stub.PollTask(request, metadata=metadata, timeout=request.wait_seconds + 30)
        got = PolledTask()
        async for message in call:
            which = message.WhichOneof("event")
            if which == "task":
                got.descriptor = convert.task_descriptor_from_pb(message.task)
            elif which == "chunk":
                got.chunks.append((message.chunk.offset, message.chunk.data))
                if stop_after_chunks is not None and len(got.chunks) >= stop_after_chunks:
                    call.cancel()
                    break
            elif which == "no_task":
                got.no_task = True
            else:
                got.shutdown = message.shutdown
        return got

    async def upload(self, task_id: str, document: bytes | OutgoingPayload | None = None, *,
                     outcome: TaskOutcome = TaskOutcome.SUCCEEDED, error_message: str = "",
                     chunk_size: int = 1 << 20, start_offset: int = 0, stop_after_chunks: int | None = None,
                     info: PayloadInfo | None = None, chunks: list[tuple[int, bytes]] | None = None,
                     ver: common_pb2.ProtocolVersion | None = None) -> pb.UploadResultResponse:
        """Upload a result. ``info``/``chunks`` override what is derived from ``document`` (to misbehave)."""
        if isinstance(document, bytes):
            document = OutgoingPayload.from_bytes(document, chunk_size)
        if document is not None and info is None:
            info = document.info(start_offset)
        header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, outcome, error_message, info))
        if ver is not None:
            header.version.CopyFrom(ver)
        if chunks is None:
            chunks = [] if document is None else [(o, bytes(d)) for o, d in document.iter_chunks(start_offset)]
        if stop_after_chunks is not None:
            chunks = chunks[:stop_after_chunks]

        async def requests() -> AsyncIterator[pb.UploadResultRequest]:
            yield pb.UploadResultRequest(header=header)
            for offset, data in chunks:
                yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=data))

        return await self.stub.UploadResult(requests(), metadata=self.metadata, timeout=60)

    async def status(self, task_id: str) -> pb.GetUploadStatusResponse:
        return await self.stub.GetUploadStatus(pb.GetUploadStatusRequest(version=version(), task_id=task_id),
                                               metadata=self.metadata, timeout=10)

    async def report(self, task_id: str, events: list[Any]) -> pb.ReportResponse:
        request = pb.ReportRequest(version=version(), task_id=task_id,
                                   events=[convert.report_event_to_pb(e) for e in events])
        return await self.stub.Report(request, metadata=self.metadata, timeout=10)

    async def heartbeat(self, task_id: str = "") -> pb.HeartbeatResponse:
        return await self.stub.Heartbeat(pb.HeartbeatRequest(version=version(), task_id=task_id),
                                         metadata=self.metadata, timeout=10)


def channel_options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", (4 << 20) + MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", (64 << 20) + MESSAGE_OVERHEAD)]


class ServerKit:
    """A running FedServer with a node store, and factories for connected test nodes."""

    def __init__(self, server: FedServer, store: NodeStore | None) -> None:
        self.server = server
        self.store = store
        self.channels: list[grpc.aio.Channel] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def node(self, node_id: str | None = None, *, token: str | None = None,
             credentials: grpc.ChannelCredentials | None = None) -> WireNode:
        """A node; with ``node_id`` (and a store) it is enrolled and authenticates with its fresh token."""
        if node_id is not None and token is None and self.store is not None:
            token = self.store.enroll(node_id)
        if credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=channel_options())
        else:
            channel = grpc.aio.secure_channel(f"localhost:{self.server.port}", credentials,
                                              options=channel_options())
        self.channels.append(channel)
        return WireNode(channel, token)

    async def registered_node(self, node_id: str, **kwargs: Any) -> WireNode:
        node = self.node(node_id, **kwargs)
        await node.register(name=f"{node_id} site")
        return node

    async def running_task(self, node_id: str = "a") -> tuple[WireNode, TaskHandle]:
        """A registered node ``node_id`` that has polled a task dispatched to it (round 1 of experiment e)."""
        node = await self.registered_node(node_id)
        handle = self.server.dispatch(node_id, TaskKind.TRAIN, self.server.encode_payload({"round": 1}),
                                      experiment_id="e", round=1)
        await node.poll(wait=1)
        return node, handle


@asynccontextmanager
async def running_server(tmp_path: Path, **config: Any) -> AsyncIterator[ServerKit]:
    """An insecure-mode (token-authenticated) server on port 0 unless ``config`` says otherwise."""
    config.setdefault("port", 0)
    config.setdefault("tls", "insecure")
    store = NodeStore(tmp_path / "nodes.sqlite")
    server = FedServer(ServerConfig(**config), store)
    await server.start()
    kit = ServerKit(server, store)
    try:
        yield kit
    finally:
        for channel in kit.channels:
            await channel.close()
        await server.stop(grace=1.0)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encoded(obj: Any, chunk_size: int = 1 << 20) -> OutgoingPayload:
    return OutgoingPayload.from_object(obj, chunk_size=chunk_size)


def decode(data: bytes) -> Any:
    return Serializer.loads(data)
