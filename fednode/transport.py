"""The node's end of the gRPC connection: channel, credentials, typed calls, translation of failures.

Identity travels as ``authorization: Bearer <token>`` metadata (or as the mTLS client certificate).
Over TLS the token is attached by call credentials; gRPC refuses call credentials on an insecure channel,
so there the same entry is added to every call's metadata instead. Every call also names the node process
(metadata ``fedstream-instance-id``, its RegisterRequest.instance_id): the server refuses the calls of a
process that a newer process of the same node replaced. Every ``grpc.aio.AioRpcError`` is
translated here, once, into a :class:`fedcore.errors.NodeError`: retrying can fix it
(:class:`ConnectionLostError`) or it cannot (:class:`ServerRefusedError`). The server names why it refused
a call in the trailing metadata ``fedstream-error-reason`` (a ``fedstream.v1.ErrorReason`` name, kept as
the error's ``reason``); the decisions read it first and fall back to the status code when it is absent
(gRPC's own statuses, older servers) or unknown (newer servers), never to the message text:
:func:`fatal_refusal` tells the refusals that end the node (bad identity, another protocol version, a newer
process of this node) from :func:`task_refusal`, those that end one task only. Messages are built and read
only through :mod:`fedcore.wire.convert`; callers see domain objects.

A unary call (Heartbeat, Report, GetUploadStatus) refused ERROR_REASON_UNKNOWN_NODE reached a server that has
no registration of this node: it restarted while this process went on calling without noticing (a task was
training: no stream broke). The connection then sends the process's Register again on the same channel
(registration is per process, not per channel) and makes the call once more: the server counts the node as
connected, with its datasets, at once, and the retried call tells what it knows of the task (unknown, on a
restarted server). A refused stream (PollTask, UploadResult) ends the session instead, whose reconnect
registers first.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from fedcore.errors import ConnectionLostError, MessageError, NodeConfigError, ServerRefusedError
from fedcore.wire import (
    INSTANCE_METADATA_KEY,
    REASON_METADATA_KEY,
    HeartbeatAnswer,
    NodeRegistration,
    ReportEvent,
    ResultDescriptor,
    ServerSettings,
    TaskKind,
    check_version,
    convert,
)
from fedcore.wire.flow_control import MESSAGE_OVERHEAD
from fednode.config import NodeConfig
from fednode.log_text import log_text
from fedstream.v1 import common_pb2, node_service_pb2, node_service_pb2_grpc

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

#: Every ErrorReason name this node knows; another name (a newer server's) counts as no reason.
KNOWN_REASONS = frozenset(common_pb2.ErrorReason.DESCRIPTOR.values_by_name) - {"ERROR_REASON_UNSPECIFIED"}
#: Reasons that end the node process, whatever call they answer: bad identity, another protocol version,
#: a newer process of this node registered (competing with it would fail its tasks in turn).
FATAL_REASONS = frozenset({"ERROR_REASON_UNAUTHENTICATED", "ERROR_REASON_VERSION_MISMATCH",
                           "ERROR_REASON_NODE_SUPERSEDED"})
#: Reasons that end the task the call named (closed, unknown, sent to another node): drop it and go on.
TASK_REASONS = frozenset({"ERROR_REASON_TASK_CLOSED", "ERROR_REASON_UNKNOWN_TASK",
                          "ERROR_REASON_TASK_NOT_SENT_TO_NODE"})
#: Codes that end one task, for a status without a known reason (FAILED_PRECONDITION may also be a newer
#: process of this node: a node that drops the task learns it from its next call, which is about no task).
TASK_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.PERMISSION_DENIED})
#: A poll refused for its poll_sequence: a late poll of a connection this process abandoned. Only that call is
#: dead (never a reason to stop or to drop a task): retryable, its code ABORTED makes the client poll again.
STALE_POLL_REASON = "ERROR_REASON_STALE_POLL"
#: Reasons a new attempt cures (reconnect with backoff; an upload resumes where GetUploadStatus says).
#: ERROR_REASON_UNKNOWN_NODE (the server has no registration of this node: it restarted) means "register
#: again": a unary call does it on its channel and is made once more (:meth:`NodeConnection._unary`); a stream
#: refused so ends the session, and every session starts with a Register.
UNKNOWN_NODE_REASON = "ERROR_REASON_UNKNOWN_NODE"
RETRYABLE_REASONS = frozenset({"ERROR_REASON_UPLOAD_INCOMPLETE", "ERROR_REASON_DIGEST_MISMATCH",
                               "ERROR_REASON_UPLOAD_IN_PROGRESS", "ERROR_REASON_SERVER_STOPPING",
                               "ERROR_REASON_INTERNAL", UNKNOWN_NODE_REASON, STALE_POLL_REASON})
#: The refusal of an upload while no buffer is free on the server: retried in place, with backoff.
BUSY_REASON = "ERROR_REASON_UPLOADS_BUSY"
#: The refusal of an upload that waited its longest in a line that moved meanwhile: its place is kept; uploaded
#: again at once, outside the busy window (docs/protocol.md §4 step 4). Without this reason (an older node):
#: RESOURCE_EXHAUSTED, i.e. busy.
QUEUED_REASON = "ERROR_REASON_UPLOAD_QUEUED"
#: The refusal of a result document that does not decode: the server ended the task FAILED already.
BAD_RESULT_REASON = "ERROR_REASON_BAD_RESULT_DOCUMENT"

Metadata = tuple[tuple[str, str], ...]
_SERVICE = "/" + node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
#: Called with the server's settings after every successful Register of a connection, and whether it was one
#: the connection made by itself (after ERROR_REASON_UNKNOWN_NODE) rather than asked for.
OnRegister = Callable[[ServerSettings, bool], None]

#: A child of the client's logger (a level or filter set on ``fednode.client`` covers it too).
log = logging.getLogger("fednode.client.transport")


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
                 receive_window: int | None, registration: NodeRegistration | None = None,
                 on_register: OnRegister | None = None) -> None:
        """``instance_id``: the process's RegisterRequest.instance_id, sent on every call ("": none).
        ``receive_window``: the channel's download window, bytes fixed, or None: gRPC's probing.
        ``registration``: what the process registers with, sent again when a unary call is refused
        ERROR_REASON_UNKNOWN_NODE (None: that refusal is raised as is; :meth:`register` sets it too).
        ``on_register``: told of every successful Register (:data:`OnRegister`)."""
        self.registration = registration
        self.on_register = on_register
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
        self.send_limit = send_limit(config)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running are cancelled after ``grace`` seconds."""
        await self.channel.close(grace)

    # -- calls ---------------------------------------------------------------------------------
    async def _unary(self, method: Callable[..., Awaitable[Any]], request: Any, what: str, hint: str = "") -> Any:
        """One unary call. A request over this node's own message limit is not sent (NodeConfigError); one the
        server's gRPC refuses for its size says so (:func:`too_large`). ``hint``: what to do about a too large
        request. A call refused ERROR_REASON_UNKNOWN_NODE (the server restarted since this process registered)
        registers again, if the connection knows the registration, and is made once more (module docstring)."""
        size = check_request_size(request, what, self.send_limit, hint)
        try:
            return await method(request, metadata=self.metadata, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as exc:
            error = too_large(exc, what, size, hint) or translate(exc, what)
        if error.reason != UNKNOWN_NODE_REASON or self.registration is None or what == "Register":
            raise error
        log.info("%s; registering again", log_text(error))
        await self._register(self.registration, again=True)
        try:
            return await method(request, metadata=self.metadata, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise too_large(exc, what, size, hint) or translate(exc, what) from None

    async def register(self, registration: NodeRegistration) -> ServerSettings:
        """Announce the node; raise VersionMismatchError if the server speaks another major version, and a
        NodeConfigError or ServerRefusedError naming the sizes if the Register is too large to send or for
        the server to receive (:data:`REGISTER_HINT`). The connection keeps ``registration`` to register
        again when the server no longer knows the node (ERROR_REASON_UNKNOWN_NODE)."""
        self.registration = registration
        return await self._register(registration, again=False)

    async def _register(self, registration: NodeRegistration, *, again: bool) -> ServerSettings:
        response = await self._unary(self.stub.Register, convert.registration_to_pb(registration), "Register",
                                     REGISTER_HINT)
        check_version(response.server_version, side="node")
        settings = convert.server_settings_from_pb(response)
        if self.on_register is not None:
            self.on_register(settings, again)
        return settings

    def poll(self, wait_seconds: float, resume_task_id: str = "", resume_offset: int = 0, *,
             held_task_ids: Iterable[str] | None = None, poll_sequence: int = 0) -> PollStream:
        """Start a long poll; read its events with :meth:`PollStream.next`. ``held_task_ids``: every task the
        process holds (PollTaskRequest.reports_held_tasks; None: not reported). ``poll_sequence``: the number
        of this poll among the process's (1, 2, ...; 0: not sent), so a late poll of an abandoned connection is
        refused (ERROR_REASON_STALE_POLL) instead of acting on old information."""
        request = convert.poll_request_to_pb(wait_seconds, resume_task_id, resume_offset,
                                             held_task_ids=held_task_ids, poll_sequence=poll_sequence)
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
        except TimeoutError:
            raise ConnectionLostError(f"UploadResult made no progress for {idle_timeout} s") from None
        finally:
            if not call.done():
                call.cancel()

    async def upload_status(self, task_id: str) -> UploadStatus:
        """Where an interrupted upload stands on the server (and its last header refusal, if any)."""
        response = await self._unary(self.stub.GetUploadStatus, convert.upload_status_request_to_pb(task_id),
                                     "GetUploadStatus")
        acknowledged, complete = convert.upload_status_from_pb(response)
        reason, message = convert.upload_refusal_from_pb(response)
        return UploadStatus(acknowledged, complete, reason, message)

    async def report(self, task_id: str, events: list[ReportEvent]) -> None:
        """Send ``events`` in order, in as many Report calls as keep each under
        :data:`fedcore.wire.convert.REPORT_BATCH_BYTES` (below every server's message limit); the first
        failure raises and the later batches are not sent."""
        for request in convert.report_requests_to_pb(task_id, events):
            await self._unary(self.stub.Report, request, "Report")

    async def heartbeat(self, task_id: str = "") -> HeartbeatAnswer:
        """Send a heartbeat (naming ``task_id``, if any); the server's answer: whether it is shutting down, and
        where the task stands (``task_state``: CLOSED or UNKNOWN means stop working on it, drop its result)."""
        response = await self._unary(self.stub.Heartbeat, convert.heartbeat_request_to_pb(task_id), "Heartbeat")
        return convert.heartbeat_response_from_pb(response)


@dataclass(frozen=True)
class UploadStatus:
    """A GetUploadStatusResponse: bytes the server keeps, whether it has the whole result, and the last refusal
    of the task's upload header for the result itself (``refused_reason``: an ErrorReason name, "" if none;
    the server keeps it while it holds no byte of the upload), which grpc.aio may have hidden
    (grpc/grpc#36066)."""

    acknowledged_offset: int
    complete: bool
    refused_reason: str = ""
    refused_message: str = ""


@dataclass(frozen=True)
class UnknownKindTask:
    """A task header whose kind this node does not know (a newer server's, or none): what :meth:`PollStream.next`
    returns for it, so the node refuses that task instead of taking the whole stream for malformed."""

    task_id: str
    kind: str  # the TaskKind name, or its number when it has none here

    @property
    def refusal(self) -> str:
        known = ", ".join(kind.value for kind in TaskKind)
        return f"this node does not run tasks of kind {self.kind} (it runs {known}); upgrade fednode to run them"


class PollStream:
    """One PollTask call, read message by message with an idle timeout per message."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def next(self, timeout: float) -> convert.PollEvent | object:
        """The next event (see :data:`fedcore.wire.convert.PollEvent`), or :data:`EOF` at the normal end."""
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per message
                message = await self._call.read()
        except TimeoutError:
            raise ConnectionLostError(f"PollTask: no message from the server for {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "PollTask") from None
        if message is EOF:
            return EOF
        try:
            return convert.poll_event_from_pb(message)
        except MessageError:
            unknown = _unknown_kind(message)
            if unknown is None:
                raise
            return unknown

    def cancel(self) -> None:
        """End the call if it is still running (a refused or abandoned download)."""
        if not self._call.done():
            self._call.cancel()


#: What to do about a Register too large to send or to be received (it carries every dataset's metadata).
REGISTER_HINT = ("announce fewer datasets, or shorter names, tags and capabilities (fednode datasets remove), or "
                 "raise the limit: each side's is its chunk size + 64 KiB (the node's upload_chunk_size, `fednode "
                 "start --chunk-size`; the server's max_chunk_size, `fedserver serve/run --max-chunk-size`)")
_GRPC_TOO_LARGE = re.compile(r"(Sent|Received) message larger than max \((\d+) vs\. (\d+)\)")


def send_limit(config: NodeConfig) -> int:
    """The largest gRPC message this node sends, in bytes (``grpc.max_send_message_length`` of its channels)."""
    return config.upload_chunk_size + MESSAGE_OVERHEAD


def check_request_size(request: Any, what: str, limit: int, hint: str = "") -> int:
    """The serialized size of ``request``; NodeConfigError naming the call, the size and ``limit`` when it is
    over this node's own send limit (gRPC would refuse it locally with RESOURCE_EXHAUSTED, an error that reads
    as the server's and, on an upload, as a broken stream retried forever)."""
    size = request.ByteSize()
    if size > limit:
        raise NodeConfigError(f"the {what} request is {size:,} bytes, over this node's limit of {limit:,} bytes on "
                              f"one gRPC message (upload_chunk_size + 64 KiB): not sent" + (f"; {hint}" if hint else ""))
    return size


def too_large(error: grpc.aio.AioRpcError, what: str, size: int, hint: str = "") -> ServerRefusedError | None:
    """The refusal of a unary request that was over a gRPC message limit, saying so: RESOURCE_EXHAUSTED with no
    fedstream reason is gRPC's own refusal of a message over its receive limit (the server's handler never ran;
    fedserver's own RESOURCE_EXHAUSTED refusals all carry a reason, and concern uploads). None for any other
    status. The code and reason stay those of the status, so the decisions taken on it do not change."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or error_reason(error):
        return None
    details = error.details() or ""
    match = _GRPC_TOO_LARGE.search(details)
    if match and match.group(1) == "Received" and details.startswith("SERVER"):
        over = f"over the server's limit of {int(match.group(3)):,} bytes on one received gRPC message"
    else:
        over = "over a gRPC message size limit"
    message = (f"{what} refused by the server: the request is {size:,} bytes, {over} (RESOURCE_EXHAUSTED without "
               f"a fedstream reason; gRPC: {details})" + (f"; {hint}" if hint else ""))
    return ServerRefusedError(message, error.code(), details, "")


def _unknown_kind(message: Any) -> UnknownKindTask | None:
    """The task header of ``message`` when its kind, and only that, is one this node cannot decode."""
    if type(message) is tuple or message.WhichOneof("event") != "task" or not message.task.task_id:
        return None
    header = message.task
    try:
        convert.task_kind_from_pb(header.kind)
    except MessageError:
        name = common_pb2.TaskKind.Name(header.kind) if header.kind in common_pb2.TaskKind.values() else header.kind
        return UnknownKindTask(header.task_id, str(name))
    return None


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorReason name of a failed call's ``fedstream-error-reason`` trailer; "" when there is none or
    this node does not know it (then only the status code counts)."""
    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA_KEY:
            name = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return name if name in KNOWN_REASONS else ""
    return ""


def translate(error: grpc.aio.AioRpcError, what: str) -> ConnectionLostError | ServerRefusedError:
    """The node error for a failed call; ``what`` names the call in the message ("Register", ...).

    Retryable (:class:`ConnectionLostError`) by the reason when the server gave one, else by the code."""
    code = error.code()
    details = error.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    reason = error_reason(error)
    retryable = reason in RETRYABLE_REASONS if reason else code in RETRYABLE_CODES
    if retryable:
        return ConnectionLostError(f"{what} failed with {name}: {details}", code, reason)
    return ServerRefusedError(f"{what} refused by the server with {name}: {details}", code, details, reason)


def superseded(error: ServerRefusedError) -> bool:
    """True when the server refused a call (or ended a poll) because another process of this node
    registered since (with another instance id): that process serves the node now."""
    return error.reason == "ERROR_REASON_NODE_SUPERSEDED"


def fatal_refusal(error: ServerRefusedError) -> bool:
    """True for a refusal that ends the node, whatever call or task it came with (:data:`FATAL_REASONS`;
    without a reason: UNAUTHENTICATED). Other refusals concern one request or one task. (A server without
    reasons also says "another protocol version" or "superseded" with FAILED_PRECONDITION: on a call about
    no task, Register or a fresh poll, the node stops on any refusal anyway.)"""
    if error.reason:
        return error.reason in FATAL_REASONS
    return error.code == grpc.StatusCode.UNAUTHENTICATED


def task_refusal(error: ServerRefusedError) -> bool:
    """True for a refusal that ends the task the call named, and only it (:data:`TASK_REASONS`; without a
    reason: :data:`TASK_CODES`)."""
    if error.reason:
        return error.reason in TASK_REASONS
    return error.code in TASK_CODES
