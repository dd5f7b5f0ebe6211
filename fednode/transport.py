"""The node's end of the gRPC connection: channel, credentials, typed calls, translation of failures.

Identity travels as ``authorization: Bearer <token>`` metadata (or as the mTLS client certificate).
Over TLS the token is attached by call credentials; gRPC refuses call credentials on an insecure channel,
so there the same entry is added to every call's metadata instead. Every call also names the node process
(metadata ``fedstream-instance-id``, its RegisterRequest.instance_id): the server refuses the calls of a
process that a newer process of the same node replaced. Every ``grpc.aio.AioRpcError`` is
translated here, once, into a :class:`fedcore.errors.NodeError`: retrying can fix it
(:class:`ConnectionLostError`) or it cannot (:class:`ServerRefusedError`). Among refusals,
:func:`fatal_refusal` tells those that end the node (bad identity, another protocol version, a newer
process of this node) from those about one task only. Messages are built and read only through
:mod:`fedcore.wire.convert`; callers see domain objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from fedcore.errors import ConnectionLostError, MessageError, NodeConfigError, ServerRefusedError
from fedcore.wire import (
    NodeRegistration,
    ReportEvent,
    ResultDescriptor,
    ServerSettings,
    check_version,
    convert,
)
from fednode.config import NodeConfig
from fedstream.v1 import node_service_pb2, node_service_pb2_grpc

#: What :meth:`PollStream.next` returns when the server ended the stream normally.
EOF = grpc.aio.EOF

#: Status codes a new attempt (after reconnecting, with backoff) may cure.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,  # server down, restarting, network cut
    grpc.StatusCode.DEADLINE_EXCEEDED,  # our own call deadline: server or network too slow this time
    grpc.StatusCode.CANCELLED,  # stream torn down under us (server stopping)
    grpc.StatusCode.ABORTED,  # server asks to retry
    grpc.StatusCode.INTERNAL,  # RST_STREAM, broken HTTP/2 framing mid-transfer
    grpc.StatusCode.UNKNOWN,  # server-side exception; a later attempt may meet a healthy server
    grpc.StatusCode.DATA_LOSS,  # corrupted transfer; resending cures it
})

Metadata = tuple[tuple[str, str], ...]
#: Call metadata naming the node process (docs/protocol.md §2; fedserver.auth reads it).
INSTANCE_METADATA_KEY = "fedstream-instance-id"
_SERVICE = "/" + node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NodeConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise NodeConfigError(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data


def channel_credentials(config: NodeConfig, token: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials pinned to ``config.ca_cert`` (plus client cert under mTLS, plus token); None if insecure."""
    if config.tls == "insecure":
        return None
    ssl = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(config.ca_cert, "ca_cert"),
        private_key=_read_pem(config.client_key, "client_key") if config.tls == "mtls" else None,
        certificate_chain=_read_pem(config.client_cert, "client_cert") if config.tls == "mtls" else None,
    )
    if token is None:
        return ssl
    return grpc.composite_channel_credentials(ssl, grpc.access_token_call_credentials(token))


class NodeConnection:
    """One channel to the server, its stub, and the metadata every call must carry.

    Cheap to create: the client opens a fresh one per session, so a reconnect never inherits a channel
    stuck in gRPC's own (slow, un-jittered) reconnect backoff.
    """

    def __init__(self, config: NodeConfig, token: str | None = None, instance_id: str = "", *,
                 receive_window: int | None) -> None:
        """``instance_id``: the process's RegisterRequest.instance_id, sent on every call ("": none).
        ``receive_window``: the channel's download window, bytes fixed, or None: gRPC's probing."""
        if token is None:
            token = config.resolve_token()
        credentials = channel_credentials(config, token)
        self.receive_window = receive_window
        options = config.channel_options(self.receive_window)
        instance: Metadata = ((INSTANCE_METADATA_KEY, instance_id),) if instance_id else ()
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(config.server, options=options)
            self.metadata: Metadata = ((("authorization", f"Bearer {token}"),) if token else ()) + instance
        else:
            self.channel = grpc.aio.secure_channel(config.server, credentials, options=options)
            self.metadata = instance
        self.stub = node_service_pb2_grpc.NodeServiceStub(self.channel)
        # the bulk calls bypass protobuf for chunks: pre-serialized on the way out, zero-copy views on the
        # way in (fedcore.wire.convert.encode_chunk_event / decode_chunk_event); other messages as usual
        self._poll_call = self.channel.unary_stream(
            f"{_SERVICE}/PollTask", request_serializer=node_service_pb2.PollTaskRequest.SerializeToString,
            response_deserializer=convert.poll_response_from_bytes)
        self._upload_call = self.channel.stream_unary(
            f"{_SERVICE}/UploadResult", request_serializer=convert.message_to_bytes,
            response_deserializer=node_service_pb2.UploadResultResponse.FromString)
        self.call_timeout = config.call_timeout_seconds

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running are cancelled after ``grace`` seconds."""
        await self.channel.close(grace)

    # -- calls ---------------------------------------------------------------------------------
    async def _unary(self, method: Callable[..., Awaitable[Any]], request: Any, what: str) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, what) from None

    async def register(self, registration: NodeRegistration) -> ServerSettings:
        """Announce the node; raise VersionMismatchError if the server speaks another major version."""
        response = await self._unary(self.stub.Register, convert.registration_to_pb(registration), "Register")
        check_version(response.server_version, side="node")
        return convert.server_settings_from_pb(response)

    def poll(self, wait_seconds: float, resume_task_id: str = "", resume_offset: int = 0, *,
             held_task_ids: Iterable[str] | None = None) -> PollStream:
        """Start a long poll; read its events with :meth:`PollStream.next`. ``held_task_ids``: every task the
        process holds (PollTaskRequest.reports_held_tasks; None: not reported)."""
        request = convert.poll_request_to_pb(wait_seconds, resume_task_id, resume_offset,
                                             held_task_ids=held_task_ids)
        return PollStream(self._poll_call(request, metadata=self.metadata))

    async def upload(self, result: ResultDescriptor, chunks: Iterable[tuple[int, Any]],
                     idle_timeout: float) -> None:
        """Stream a result header then its chunks; each write must progress within ``idle_timeout`` s."""
        call = self._upload_call(metadata=self.metadata)
        try:
            await asyncio.wait_for(call.write(convert.upload_header_request_to_pb(result)), idle_timeout)
            for offset, data in chunks:
                async with asyncio.timeout(idle_timeout):  # cheaper than wait_for: no task per chunk
                    await call.write(convert.encode_chunk_event(offset, data))
            await asyncio.wait_for(call.done_writing(), idle_timeout)
            await asyncio.wait_for(call, idle_timeout)
        except asyncio.InvalidStateError:
            # the server ended the call while we were still writing: its status says why
            try:
                await asyncio.wait_for(call, idle_timeout)
            except grpc.aio.AioRpcError as exc:
                raise translate(exc, "UploadResult") from None
            raise MessageError(f"server closed the upload of task {result.task_id} before the last chunk") from None
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "UploadResult") from None
        except asyncio.TimeoutError:
            raise ConnectionLostError(f"UploadResult made no progress for {idle_timeout} s") from None
        finally:
            if not call.done():
                call.cancel()

    async def upload_status(self, task_id: str) -> tuple[int, bool]:
        """``(acknowledged_offset, complete)`` of an interrupted upload."""
        response = await self._unary(self.stub.GetUploadStatus, convert.upload_status_request_to_pb(task_id),
                                     "GetUploadStatus")
        return convert.upload_status_from_pb(response)

    async def report(self, task_id: str, events: list[ReportEvent]) -> None:
        await self._unary(self.stub.Report, convert.report_request_to_pb(task_id, events), "Report")

    async def heartbeat(self, task_id: str = "") -> bool:
        """Send a heartbeat; True when the server says it is shutting down."""
        response = await self._unary(self.stub.Heartbeat, convert.heartbeat_request_to_pb(task_id), "Heartbeat")
        return bool(response.shutting_down)


class PollStream:
    """One PollTask call, read message by message with an idle timeout per message."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def next(self, timeout: float) -> convert.PollEvent | object:
        """The next event (see :data:`fedcore.wire.convert.PollEvent`), or :data:`EOF` at the normal end."""
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per message
                message = await self._call.read()
        except asyncio.TimeoutError:
            raise ConnectionLostError(f"PollTask: no message from the server for {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "PollTask") from None
        if message is EOF:
            return EOF
        return convert.poll_event_from_pb(message)

    def cancel(self) -> None:
        """End the call if it is still running (a refused or abandoned download)."""
        if not self._call.done():
            self._call.cancel()


def translate(error: grpc.aio.AioRpcError, what: str) -> ConnectionLostError | ServerRefusedError:
    """The node error for a failed call; ``what`` names the call in the message ("Register", ...)."""
    code = error.code()
    details = error.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    if code in RETRYABLE_CODES:
        return ConnectionLostError(f"{what} failed with {name}: {details}", code)
    return ServerRefusedError(f"{what} refused by the server with {name}: {details}", code, details)


#: Words of a FAILED_PRECONDITION status saying the protocol major versions differ (fedcore.wire.check_version).
VERSION_REFUSAL = "protocol version"
#: Words of the FAILED_PRECONDITION status ending a poll of a node process a newer one replaced
#: (fedcore.errors.NodeSupersededError; docs/protocol.md, §4 and error codes).
SUPERSEDED_REFUSAL = "superseded by a newer instance"


def superseded(error: ServerRefusedError) -> bool:
    """True when the server refused a call (or ended a poll) because another process of this node
    registered since (with another instance id): that process serves the node now."""
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and SUPERSEDED_REFUSAL in error.details


def fatal_refusal(error: ServerRefusedError) -> bool:
    """True for a refusal that ends the node, whatever call or task it came with: UNAUTHENTICATED (bad,
    revoked or missing identity), another protocol major version, or a call superseded by a newer process
    of this node (competing with it would fail its tasks in turn). Other refusals concern one request or
    one task."""
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return True
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and (
        VERSION_REFUSAL in error.details or superseded(error))
