"""The UploadResult and GetUploadStatus calls of NodeService: receiving a node's result, and where it stands.

:class:`fedserver.service.NodeService` keeps the gRPC methods (their names, their status translation) and
hands their bodies to :class:`UploadService`, with its checks of the caller (identity, protocol version,
calling process) as callbacks; the rules live in the task board and the upload sessions.

An UploadResult is a header, then chunks written into one preallocated buffer (:mod:`fedserver.uploads`):
a header over a limit is refused at once, a fresh one (offset 0) waits in line while running uploads hold
every buffer (at most ServerConfig.upload_line_wait_seconds, its task counted active meanwhile: its node has
nothing to send; then refused ERROR_REASON_UPLOAD_QUEUED if the line moved meanwhile, its node calling again
at once, else ERROR_REASON_UPLOADS_BUSY), and a stream that ends before its last byte leaves its session parked for a
resume at the offset GetUploadStatus acknowledges. The header first marks its task as offered by the calling process
(:meth:`fedserver.task_board.TaskBoard.result_offered`), so a task whose result was refused is never sent
to that process again. A refusal of the header for the result itself (:data:`RESULT_REFUSALS`) is kept on
the task for GetUploadStatus (``refused_reason``): grpc.aio may hide it from the node (grpc/grpc#36066).
Like a poll, an upload stream that ends early is a drop of the node (the registry's upload count), which
then has the task board's reconnect grace to call again.

A newer UploadResult of the task from the same node process (its ``fedstream-instance-id``) takes over a
session that an older stream still writes into (:meth:`fedserver.uploads.UploadSessions.begin`): a
connection that died without a reset keeps its stream open until gRPC keepalive gives up (up to 80 s), and
the process that reconnected and resumed must not be refused meanwhile. The older stream writes no chunk
after the takeover (it checks its ``writer`` number before each), is woken from its wait for the next chunk
(a cancellation of its handler marked :data:`_TAKEN_OVER`, which it alone turns into its status) and ends
ABORTED ``ERROR_REASON_UPLOAD_IN_PROGRESS`` naming the takeover, refused rather than dropped, and leaving
the session, which is the newer stream's now, alone.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

from fedcore.errors import (
    ChunkOrderError,
    DecodeError,
    DigestMismatchError,
    LimitExceededError,
    MessageError,
    PermissionDeniedError,
    TaskClosedError,
    UnknownTaskError,
    UploadConflictError,
    UploadIncompleteError,
)
from fedcore.serialization import DEFAULT_LIMITS, Serializer, SerializerLimits
from fedcore.wire import TaskOutcome, convert
from fedserver.auth import call_instance_id
from fedserver.config import ServerConfig
from fedserver.errors import status_for
from fedserver.registry import NodeRegistry
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskState, state_of_outcome
from fedserver.uploads import UploadSessions
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

#: The refusals of an UploadResult header that refuse the result itself and leave its task open (the node
#: reports the task FAILED, or retries when busy or queued); GetUploadStatus tells the last one (refused_reason).
RESULT_REFUSALS = frozenset({"ERROR_REASON_PAYLOAD_TOO_LARGE", "ERROR_REASON_UPLOADS_BUSY", "ERROR_REASON_UPLOAD_QUEUED",
                             "ERROR_REASON_FRAMING", "ERROR_REASON_MALFORMED_MESSAGE"})

#: The message of the cancellation that wakes an upload stream taken over by a newer one of its process.
_TAKEN_OVER = "upload taken over by a newer stream of the same node process"

#: The caller's node id from the call's credentials alone (before anything is read from an unknown caller).
Authenticate = Callable[[Any], str]
#: The caller's node id once its identity, protocol version (the request's) and calling process are accepted.
Identify = Callable[[Any, common_pb2.ProtocolVersion], str]


class UploadService:
    """Bodies of NodeService's UploadResult and GetUploadStatus, on the server's registry, board and uploads."""

    def __init__(self, config: ServerConfig, registry: NodeRegistry, board: TaskBoard, uploads: UploadSessions,
                 authenticate: Authenticate, identify: Identify,
                 decode_limits: SerializerLimits = DEFAULT_LIMITS) -> None:
        self.config = config
        self.registry = registry
        self.board = board
        self.uploads = uploads
        self._authenticate = authenticate
        self._identify = identify
        self.decode_limits = decode_limits

    # -- UploadResult ---------------------------------------------------------------------------------
    async def upload_result(self, request_iterator: AsyncIterator[pb.UploadResultRequest],
                            context: Any) -> pb.UploadResultResponse:
        node_id = self._authenticate(context)  # before reading anything from an unknown caller
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or type(first) is tuple or first.WhichOneof("event") != "header":
            raise MessageError("an UploadResult stream must start with an UploadHeader")
        self._identify(context, first.header.version)
        # like a poll, an upload stream that ends before its last byte is a drop (gRPC shows a broken
        # connection to this handler as an early end of the request stream, or as a cancellation): the
        # node has to call again to finish it, within the task board's reconnect grace
        self.registry.upload_opened(node_id)
        dropped = True
        try:
            response = await self._receive_result(node_id, call_instance_id(context), first, messages)
        except Exception:
            dropped = False  # refused by the server (a status goes back): the node is alive
            raise
        else:
            if isinstance(response, str):  # ended early
                raise UploadIncompleteError(response)
            dropped = False
            return response
        finally:
            if self.registry.upload_closed(node_id, dropped=dropped):
                self.board.watch(node_id)

    async def _receive_result(self, node_id: str, instance: str, first: pb.UploadResultRequest,
                              messages: AsyncIterator[Any]) -> pb.UploadResultResponse | str:
        """Receive one result; a message saying where to resume if the stream ended before its last byte.

        First of all, the header marks its task as offered by the calling process (``instance``,
        :meth:`TaskBoard.result_offered`): a header refused below (malformed, too large, busy) still shows
        that the process got the task, so a poll of it that no longer names the task does not get it again.
        """
        self.board.result_offered(first.header.task_id, node_id, instance)
        self._forget_refused_header(first.header.task_id, node_id, instance)
        try:
            desc = convert.result_descriptor_from_pb(first.header)
        except Exception as exc:
            self._note_refused_header(first.header.task_id, node_id, instance, exc)
            raise
        handle = self.board.lookup(desc.task_id, node_id, late_outcome=desc.outcome)
        if desc.outcome is not TaskOutcome.SUCCEEDED:
            if await anext(messages, None) is not None:
                raise MessageError(f"a {desc.outcome.name} result carries no chunks")
            self.uploads.discard(desc.task_id)
            handle.finish(state_of_outcome(desc.outcome),
                          desc.error_message or f"the node reported {desc.outcome.name} without a reason")
            return pb.UploadResultResponse(task_id=desc.task_id, received_bytes=0)

        info = desc.payload
        assert info is not None  # ResultDescriptor guarantees it for SUCCEEDED
        try:
            self.uploads.check_limits(info)  # over a limit: refused at once, not after waiting in line for room
            if info.start_offset == 0:  # wait in line while running uploads hold every buffer (resumes need none)
                # the node waits on its open call meanwhile, sending nothing: its task is active all along. At
                # most line_wait_seconds, well within a node's idle timeout; leaving the block without
                # turn.begin (the task closed, any error) passes the turn on
                with handle.kept_active():
                    async with self.uploads.line(desc.task_id, info.total_size) as turn:
                        if handle.done():  # ended while in line (a round gave up on it, the node restarted)
                            raise handle.closed_error()
                        session = turn.begin(node_id, info, instance)  # UploadQueuedError / UploadsBusyError
            else:
                session = self.uploads.begin(desc.task_id, node_id, info, instance)
        except Exception as exc:
            self._note_refused_header(desc.task_id, node_id, instance, exc)
            raise
        writer = session.writer  # this stream's number: a newer stream of the process may take the session over
        handle.mark_uploading()
        max_chunk = self.config.max_chunk_size
        task = asyncio.current_task()
        kept = True  # the session stayed this stream's to the end (not taken over)
        try:
            if session.written_by(writer):  # a takeover wakes this stream from its wait for the next chunk
                session.wake_writer = functools.partial(task.cancel, _TAKEN_OVER) if task is not None else None
            async for message in messages:
                if type(message) is tuple:  # a chunk, decoded zero-copy by convert.upload_request_from_bytes
                    offset, data = message
                elif message.WhichOneof("event") == "chunk":
                    offset, data = message.chunk.offset, message.chunk.data
                else:
                    raise MessageError("only Chunk messages may follow the UploadHeader")
                n = len(data)
                if n > max_chunk:
                    raise LimitExceededError(f"chunk of {n} bytes exceeds this server's limit of {max_chunk} bytes")
                if handle.done():
                    raise handle.closed_error()
                if n < info.chunk_size and offset + n != info.total_size:  # larger: the assembler refuses
                    raise ChunkOrderError(
                        f"chunk at offset {offset} has {n} bytes: every chunk but the last must have "
                        f"chunk_size {info.chunk_size} bytes")
                if not session.written_by(writer):  # taken over while this chunk was read: not written
                    break
                session.assembler.add(offset, data)
                del message, data  # not held while the next chunk is read (receiver peak RSS)
                handle.transferred("upload", n, session.received, info.total_size)
        except asyncio.CancelledError:
            if session.written_by(writer) or task is None:
                raise  # gRPC cancelled the call (the node went away): the session is parked below
            task.uncancel()  # woken by the takeover (_TAKEN_OVER): this call ends with the takeover's status
        finally:
            kept = session.written_by(writer)
            if kept:  # else the session belongs to the newer stream: nothing here may park or discard it
                session.wake_writer = None
                self.uploads.end(session)
                if handle.done():  # no resume will come: free the buffer now rather than park it for nobody
                    self.uploads.discard(desc.task_id)
        if not kept:
            raise UploadConflictError(
                f"the upload of task {desc.task_id} was taken over by a newer UploadResult of the same node "
                f"process (instance {instance}); this stream ends, the {session.received} bytes the server held "
                "are kept for the newer one")
        if handle.done():  # ended during the stream, after its last chunk or before it broke off
            raise handle.closed_error()
        if not session.assembler.complete:
            return (f"upload of task {desc.task_id} ended after {session.received} of {info.total_size} bytes; "
                    f"resume at offset {session.received}")
        try:
            buffer = session.assembler.finish()
        except DigestMismatchError:
            self.uploads.discard(desc.task_id)  # garbage: the node must start again from offset 0
            raise
        self.uploads.discard(desc.task_id, held_until_freed=buffer)  # counted until the result is aggregated
        try:
            result = Serializer.loads(buffer, limits=self.decode_limits)
        except DecodeError as exc:
            message = f"result of task {desc.task_id} could not be decoded: {exc}"
            handle.finish(TaskState.FAILED, message, bytes_received=info.total_size)
            raise DecodeError(message) from None
        handle.finish(TaskState.SUCCEEDED, desc.error_message, result, bytes_received=info.total_size)
        return pb.UploadResultResponse(task_id=desc.task_id, received_bytes=info.total_size)

    def _note_refused_header(self, task_id: str, node_id: str, instance: str, exc: BaseException) -> None:
        """Remember on the open task the refusal of an UploadResult header for the result itself
        (:data:`RESULT_REFUSALS`) when the header came from the process the task was delivered to: that
        process's grpc.aio may have hidden the status (grpc/grpc#36066) and asks GetUploadStatus."""
        _, reason = status_for(exc)
        if reason not in RESULT_REFUSALS or not instance:
            return
        try:
            handle = self.board.lookup(task_id, node_id)
        except (UnknownTaskError, PermissionDeniedError, TaskClosedError):  # nothing to remember it on
            return
        if handle.delivered_to == instance:
            handle.refused_header = (reason, str(exc))

    def _forget_refused_header(self, task_id: str, node_id: str, instance: str) -> None:
        """A new header for the task was read from the process the task was delivered to: the refusal of an
        earlier one no longer stands, whatever becomes of this one (accepted, refused anew, or its call
        cancelled while it waits in line). Kept, an old UPLOAD_QUEUED would make that process take a later
        broken stream (a bare INTERNAL, grpc/grpc#36066) for a queued refusal and upload again at once instead
        of reconnecting with backoff."""
        if not instance:
            return
        try:
            handle = self.board.lookup(task_id, node_id)
        except (UnknownTaskError, PermissionDeniedError, TaskClosedError):  # refused below, as it should be
            return
        if handle.delivered_to == instance:
            handle.refused_header = None

    # -- GetUploadStatus ---------------------------------------------------------------------------------
    async def upload_status(self, request: pb.GetUploadStatusRequest, context: Any) -> pb.GetUploadStatusResponse:
        node_id = self._identify(context, request.version)
        try:
            handle = self.board.lookup(request.task_id, node_id)
        except TaskClosedError:
            record = self.board.closed_record(request.task_id)
            if record is not None and record.result_received:
                return pb.GetUploadStatusResponse(acknowledged_offset=record.bytes_received, complete=True)
            raise
        acknowledged = self.uploads.acknowledged(request.task_id)
        refused = handle.refused_header if acknowledged == 0 else None
        if refused is None:
            return pb.GetUploadStatusResponse(acknowledged_offset=acknowledged)
        return pb.GetUploadStatusResponse(acknowledged_offset=0, refused_message=refused[1],
                                          refused_reason=common_pb2.ErrorReason.Value(refused[0]))
