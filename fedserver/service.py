"""The NodeService handlers: authenticate, check the version, translate, call the domain objects.

Handlers stay thin: every rule lives in the task board, the upload sessions, the registry or
:mod:`fedcore.wire`; every error is a domain exception turned into a status by :mod:`fedserver.errors`.
Order of checks on each call: identity (UNAUTHENTICATED), protocol version (FAILED_PRECONDITION), on any call
but Register a registration of the node by this server process (NOT_FOUND ERROR_REASON_UNKNOWN_NODE: a node
that went on calling across a server restart without noticing it, e.g. training meanwhile, registers again),
the calling process (metadata ``fedstream-instance-id``: INVALID_ARGUMENT if malformed; FAILED_PRECONDITION if
a newer process of the node registered since, on a Register if a newer process replaced this one), on a
PollTask its ``poll_sequence`` (ABORTED if the process sent a later poll already), then the request itself.

A Heartbeat naming a task is more than a sign of life: its answer says whether the task is still open
(``task_state``: ACTIVE, CLOSED, UNKNOWN), so a node stops training for, or waiting to upload, a result the
server would refuse.

The bodies of UploadResult and GetUploadStatus live in :mod:`fedserver.upload_service`
(:class:`~fedserver.upload_service.UploadService`, which this service owns and hands its caller checks);
the gRPC methods stay here, under their names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory

from fedcore.errors import (
    CheckpointError,
    MessageError,
    PermissionDeniedError,
    TaskClosedError,
    UnknownNodeError,
    UnknownTaskError,
)
from fedcore.event_wait import wait_event
from fedcore.serialization import DEFAULT_LIMITS, SerializerLimits
from fedcore.wire import (
    PROTOCOL_VERSION,
    HeartbeatAnswer,
    HeartbeatTaskState,
    LogLine,
    ServerSettings,
    ShutdownNotice,
    check_version,
    convert,
)
from fedserver.auth import INSTANCE_METADATA_KEY, Authenticator, call_instance_id
from fedserver.config import ServerConfig
from fedserver.errors import translate_stream, translate_unary
from fedserver.registry import NodeRegistry
from fedserver.send_budget import SendBudget
from fedserver.task_board import NodeLiveness, TaskBoard
from fedserver.tasks import PreparedPayload, TaskHandle
from fedserver.upload_service import UploadService
from fedserver.uploads import UploadSessions
from fedstream.v1 import common_pb2, node_service_pb2_grpc
from fedstream.v1 import node_service_pb2 as pb

log = logging.getLogger(__name__)


class NodeService(node_service_pb2_grpc.NodeServiceServicer):
    """fedstream.v1.NodeService on top of the server's registry, task board and upload sessions."""

    def __init__(self, config: ServerConfig, auth: Authenticator, registry: NodeRegistry, board: TaskBoard,
                 uploads: UploadSessions, is_stopping: Callable[[], bool],
                 decode_limits: SerializerLimits = DEFAULT_LIMITS) -> None:
        self.config = config
        self.auth = auth
        self.registry = registry
        self.board = board
        self.is_stopping = is_stopping
        self.send_budget = SendBudget(config.max_send_buffer_bytes)
        self.upload_service = UploadService(config, registry, board, uploads, auth.identify, self._identify,
                                            decode_limits)
        board.liveness = self._liveness  # the board gives up the tasks of nodes gone for its reconnect grace
        self.open_polls = 0
        self._polls_idle = asyncio.Event()
        self._polls_idle.set()

    async def wait_polls_closed(self, timeout: float) -> bool:
        """Wait until no PollTask stream is open (True) or ``timeout`` seconds pass (False)."""
        return await wait_event(self._polls_idle, timeout)

    def _liveness(self, node_id: str) -> NodeLiveness | None:
        if node_id not in self.registry:
            return None
        record = self.registry.get(node_id)
        return NodeLiveness(record.disconnected_since, record.disconnect_cause,
                            record.last_seen + record.liveness_timeout)

    def _identify(self, context: grpc.aio.ServicerContext, version: common_pb2.ProtocolVersion, *,
                  registering: str | None = None, poll_sequence: int = 0) -> str:
        """The caller's node id, once its identity, protocol version and process are accepted. Any call but a
        Register from a node this server process has no registration of (it restarted since the node's last
        Register) is refused UnknownNodeError (NOT_FOUND, ERROR_REASON_UNKNOWN_NODE): the node registers again,
        so it counts as connected with its datasets. The call's instance id (metadata) must be the one the node registered last (NodeSupersededError otherwise),
        except on a Register (``registering``: its RegisterRequest.instance_id), where it must equal the
        request's field: that call is what makes the process the node's current one, unless a later
        process replaced it already (NodeSupersededError). A PollTask's ``poll_sequence`` must be newer than
        any of its process's (StalePollError): a late poll of an abandoned connection is refused before it
        counts as a sign of life (it says nothing about the node now)."""
        node_id = self.auth.identify(context)
        check_version(version, side="server")
        instance = call_instance_id(context)
        if registering is None:
            if node_id not in self.registry:
                raise UnknownNodeError(
                    f"node {node_id} has not registered with this server (it restarted?): register again")
            if instance:
                self.registry.check_instance(node_id, instance)
        else:
            if instance and instance != registering:
                raise MessageError(f"metadata {INSTANCE_METADATA_KEY!r} is {instance!r} but "
                                   f"RegisterRequest.instance_id is {registering[:80]!r}: they must be equal")
            if registering:
                self.registry.check_instance(node_id, registering, registering=True)
        self.registry.check_poll_sequence(node_id, instance, poll_sequence)  # nothing to check for 0
        self.registry.touch(node_id)
        return node_id

    # -- Register ------------------------------------------------------------------------------------
    @translate_unary
    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        node_id = self._identify(context, request.version, registering=request.instance_id)
        registration = convert.registration_from_pb(request)
        earlier = self.registry.restarted(node_id, registration.instance_id)
        record = self.registry.register(node_id, registration)
        count = len(record.datasets)
        log.info("node %s registered (%s, %d dataset%s, %s)", node_id, record.name or "unnamed",
                 count, "" if count == 1 else "s", record.client_version or "unknown client")
        if earlier is not None:  # a new process: the tasks sent to the earlier one are gone with it
            self.board.node_restarted(node_id, earlier, registration.instance_id)
        elif registration.instance_id:  # the same process again: its polls from before (a dead connection?) end
            self.board.node_reregistered(node_id)
        cfg = self.config
        return convert.server_settings_to_pb(ServerSettings(
            node_id, PROTOCOL_VERSION, cfg.max_poll_wait_seconds, cfg.max_chunk_size, cfg.max_payload_size,
            cfg.heartbeat_interval_seconds, cfg.chunk_size))

    # -- PollTask --------------------------------------------------------------------------------------
    @translate_stream
    async def PollTask(self, request: pb.PollTaskRequest,
                       context: Any) -> AsyncIterator[pb.PollTaskResponse | bytes]:
        # a late poll of a connection the process abandoned (a newer poll of it came first) is refused before
        # anything else: its held_task_ids are older than that poll's, it must take no task nor end others
        node_id = self._identify(context, request.version, poll_sequence=request.poll_sequence)
        instance = call_instance_id(context)
        held = _held_tasks(request)
        if self.is_stopping():
            yield self._shutdown_message()
            return
        wait = request.wait_seconds
        wait = self.config.max_poll_wait_seconds if wait <= 0 else min(wait, self.config.max_poll_wait_seconds)
        # a Register of a newer process of the node ends this poll (NodeSupersededError, FAILED_PRECONDITION);
        # one of the same process ends it with NoTask unless it is sending a task already, and lets the
        # process's next poll take that task over (the board counts each sender with its generation)
        generation = self.board.poll_generation(node_id)
        if held is not None:  # tasks sent whole to this process that it does not hold were lost: sent again
            self.board.requeue_lost(node_id, instance, held)
        self.registry.poll_opened(node_id)
        self.open_polls += 1
        self._polls_idle.clear()
        # a poll "drops" when it ends by cancellation (the node went away, its connection broke: gRPC
        # cancels this handler) before the server finished it; any other end leaves the node connected
        dropped = True
        try:
            if request.resume_task_id:
                handle: TaskHandle | None = self.board.lookup(request.resume_task_id, node_id)
                start = int(request.resume_offset)
                handle.descriptor(start)  # validates the offset before anything is sent
                self.board.acquire(handle, generation=generation)
            else:
                handle = await self.board.next_for(node_id, wait, generation=generation, held=held or ())
                start = 0
            if handle is None:
                dropped = False  # before the yield: fednode cancels the call once it has read the answer
                yield self._shutdown_message() if self.is_stopping() else pb.PollTaskResponse(no_task=pb.NoTask())
                return
            delivered = False
            chunks = None
            try:
                chunks = await self._open_chunks(handle, start)
                current = self.board.check_poll(node_id, generation)  # a reload may take a while
                closed = handle.done()  # failed by a reload that did not work, or ended while it ran
                if not closed and current:
                    assert chunks is not None  # None only for a task it failed
                    async for message in self._stream_task(handle, start, chunks, generation):
                        yield message
                    delivered, dropped = True, False
            finally:
                if chunks is not None:
                    _close(chunks)
                self.board.release(handle, delivered=delivered, generation=generation, instance_id=instance)
            if closed:  # nothing was sent
                if request.resume_task_id:  # the node knows the task: it learns that it is closed
                    raise handle.closed_error()
                dropped = False  # a fresh poll never saw it: nothing for the node this time
                yield pb.PollTaskResponse(no_task=pb.NoTask())
            elif not current:  # the same process registered again meanwhile: it polls anew (nothing was sent)
                dropped = False
                yield pb.PollTaskResponse(no_task=pb.NoTask())
        except Exception:
            dropped = False  # refused by the server (a status goes back): the node is alive
            raise
        finally:
            if self.registry.poll_closed(node_id, dropped=dropped):
                self.board.watch(node_id)  # its tasks now have reconnect_grace seconds
            self.open_polls -= 1
            if self.open_polls == 0:
                self._polls_idle.set()

    def _shutdown_message(self) -> pb.PollTaskResponse:
        notice = ShutdownNotice("server stopping", self.config.shutdown_retry_after_seconds)
        return pb.PollTaskResponse(shutdown=convert.shutdown_to_pb(notice))

    @staticmethod
    async def _open_chunks(handle: TaskHandle, start: int) -> Iterator[tuple[int, memoryview | bytes]] | None:
        """The chunks of ``handle``'s payload from ``start``; None when the payload cannot be rebuilt.

        A payload that must reload x first (a low-memory round after its release) does it off the event
        loop, before the header: the node's wait for a header is the long one (poll wait + call timeout).
        A reload that fails (CheckpointError: the checkpoint holding x is gone, damaged or replaced) ends
        the task FAILED with that message, so the round counts it at once; left open, the task would
        stay alive through the node's retries, each costing another reload, and the round would hang.
        """
        payload = handle.payload
        handle.descriptor(start)  # validates the offset (and that the task is open) before any reload
        assert payload is not None
        if not isinstance(payload, PreparedPayload):
            return payload.iter_chunks(start)
        try:
            return await payload.open_chunks(start)
        except CheckpointError as exc:
            message = f"the server cannot rebuild the task payload of node {handle.node_id}: {exc}"
            log.error("task %s: %s", handle.task_id, message)
            handle.fail(message)
            return None

    async def _stream_task(self, handle: TaskHandle, start: int,
                           chunks: Iterator[tuple[int, memoryview | bytes]], generation: int,
                           ) -> AsyncIterator[pb.PollTaskResponse | bytes]:
        payload = handle.payload
        assert payload is not None  # open: the caller checked
        header = convert.task_descriptor_to_pb(handle.descriptor(start))
        total = payload.total_size
        started = asyncio.get_running_loop().time()  # older streams get the send budget first
        offset = start
        yield pb.PollTaskResponse(task=header)
        while offset < total:
            # budget first, then the chunk: a chunk straddling segments is a joined copy, made only now
            size = min(payload.chunk_size, total - offset)
            await self.send_budget.acquire(size, started)
            try:
                self.board.check_poll(handle.node_id, generation)  # raises after a restart (its task ended too)
                if handle.done():
                    raise handle.closed_error()
                offset, data = next(chunks)
                yield convert.encode_chunk_event(offset, data)  # pre-serialized: one copy per chunk
            finally:
                self.send_budget.release(size)  # gRPC has sent it (or the stream is gone)
            offset += len(data)
            handle.transferred("download", len(data), offset, total)

    # -- UploadResult and GetUploadStatus (fedserver.upload_service) ---------------------------------------
    @translate_unary
    async def UploadResult(self, request_iterator: AsyncIterator[pb.UploadResultRequest],
                           context: Any) -> pb.UploadResultResponse:
        return await self.upload_service.upload_result(request_iterator, context)

    @translate_unary
    async def GetUploadStatus(self, request: pb.GetUploadStatusRequest,
                              context: Any) -> pb.GetUploadStatusResponse:
        return await self.upload_service.upload_status(request, context)

    # -- Report and Heartbeat -----------------------------------------------------------------------------
    @translate_unary
    async def Report(self, request: pb.ReportRequest, context: Any) -> pb.ReportResponse:
        """Progress and log lines of a task (or of the node, without a task id). The task is looked up first, so
        a closed or unknown task is what the node learns even from a malformed Report. The events are taken
        whole or refused whole (MALFORMED_MESSAGE naming the first bad one); a refused Report naming an open
        task still resets that task's inactivity timeout: its node is alive and working on it, and a plan's
        bad progress must not cost the node its result."""
        node_id = self._identify(context, request.version)
        if request.task_id:
            handle = self.board.lookup(request.task_id, node_id)
            try:
                events = convert.report_events_from_pb(request)
            except MessageError:
                handle.touch()
                raise
            for event in events:
                handle.report(event)
        else:
            events = convert.report_events_from_pb(request)
            for event in events:
                if isinstance(event.event, LogLine):
                    log.info("node %s [%s] %s", node_id, event.event.level, event.event.message)
        return pb.ReportResponse()

    @translate_unary
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        """A node's sign of life; for a named task also where it stands (HeartbeatResponse.task_state), so a
        node stops working on a task whose result would be refused. A task sent to another node reads as
        UNKNOWN, like one never issued: the answer does not tell a node which ids exist."""
        node_id = self._identify(context, request.version)
        state = HeartbeatTaskState.UNSPECIFIED
        if request.task_id:
            try:
                self.board.lookup(request.task_id, node_id).touch()
                state = HeartbeatTaskState.ACTIVE
            except (UnknownTaskError, PermissionDeniedError):
                state = HeartbeatTaskState.UNKNOWN
            except TaskClosedError:
                state = HeartbeatTaskState.CLOSED
        return convert.heartbeat_response_to_pb(HeartbeatAnswer(self.is_stopping(), state))


#: Most ids a PollTaskRequest.held_task_ids may carry (a process holds a few tasks; the list is read on the
#: event loop of every poll), and the longest id (the server issues 32 hex characters).
MAX_HELD_TASK_IDS = 1024
MAX_TASK_ID_LENGTH = 64


def _held_tasks(request: pb.PollTaskRequest) -> frozenset[str] | None:
    """The tasks a poll's process says it holds (its resume task included), None if it does not report them
    (older nodes). Raises MessageError for ids sent without ``reports_held_tasks``, for more than
    :data:`MAX_HELD_TASK_IDS` ids and for an id over :data:`MAX_TASK_ID_LENGTH` characters, before any
    set is built."""
    ids = request.held_task_ids
    if len(ids) > MAX_HELD_TASK_IDS:
        raise MessageError(f"PollTaskRequest.held_task_ids names {len(ids)} tasks: at most {MAX_HELD_TASK_IDS} "
                           f"are accepted")
    for index, task_id in enumerate(ids):
        if len(task_id) > MAX_TASK_ID_LENGTH:
            raise MessageError(f"PollTaskRequest.held_task_ids[{index}] has {len(task_id)} characters: a task id "
                               f"has at most {MAX_TASK_ID_LENGTH}")
    if not request.reports_held_tasks:
        if request.held_task_ids:
            raise MessageError(f"PollTaskRequest.held_task_ids names {len(request.held_task_ids)} task(s) but "
                               f"reports_held_tasks is false: set it, or send no ids")
        return None
    return frozenset(request.held_task_ids) | ({request.resume_task_id} if request.resume_task_id else set())


def _close(chunks: Iterator[tuple[int, memoryview | bytes]]) -> None:
    """Close a chunk iterator that can be (generators and reloaded streams free what they hold)."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _serialize(message: Any) -> bytes:
    """Response serializer that lets pre-serialized messages (``bytes``) through unchanged."""
    return message if isinstance(message, bytes) else message.SerializeToString()


#: UploadResult chunks arrive as zero-copy ``(offset, data)`` views instead of protobuf messages (two copies fewer).
_DESERIALIZERS = {"UploadResult": convert.upload_request_from_bytes}


def add_node_service(service: NodeService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_NodeServiceServicer_to_server``, except that every
    response serializer accepts pre-serialized bytes (chunks from :func:`convert.encode_chunk_event`)."""
    descriptor = pb.DESCRIPTOR.services_by_name["NodeService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(getattr(service, method.name),
                                        request_deserializer=_DESERIALIZERS.get(method.name, request_class.FromString),
                                        response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
