"""``FedServer``: the researcher's gRPC server and the API the round orchestration is built on.

::

    server = FedServer(ServerConfig(port=0, tls="insecure"), NodeStore(path))
    port = await server.start()
    nodes = await server.wait_for_nodes(2, timeout=60)
    payload = server.encode_payload({"params": ..., "round": 1})   # encoded once, shared by every node
    handles = [server.dispatch(n, TaskKind.TRAIN, payload, experiment_id="exp", round=1,
                               inactivity_timeout=120) for n in nodes]
    for done in asyncio.as_completed([h.result() for h in handles]):
        result = await done          # TaskResult: outcome, error_message, payload, bytes, timings
    server.cancel_round("exp", 1)    # late results are now refused and recorded
    await server.stop(grace=5)

The server also serves gRPC health checking (``grpc.health.v1.Health``: SERVING, NOT_SERVING while
stopping) and server reflection, so grpcurl and grpc_health_probe work against it.
"""

from __future__ import annotations

import enum
import logging
import uuid
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedcore.errors import LimitExceededError, ServerConfigError, ServerStateError
from fedcore.framing import OutgoingPayload
from fedcore.framing.memory import keep_chunk_memory
from fedcore.serialization import DEFAULT_LIMITS, SerializerLimits
from fedcore.wire import TaskDescriptor, TaskKind
from fedserver.auth import Authenticator, NodeStore
from fedserver.config import MESSAGE_OVERHEAD, ServerConfig
from fedserver.malloc_policy import release_large_blocks
from fedserver.registry import NodeRegistry
from fedserver.service import NodeService, add_node_service
from fedserver.task_board import TaskBoard
from fedserver.tasks import SendablePayload, TaskHandle
from fedserver.uploads import UploadSessions
from fedstream.v1 import node_service_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


class ServerState(str, enum.Enum):
    CREATED = "created"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class FedServer:
    """The researcher's transport: nodes register, poll for tasks and upload results.

    ``node_store`` authenticates token-mode nodes (``tls`` "insecure" or "tls"); in "mtls" mode it is
    optional and only used to block revoked nodes. ``decode_limits`` bound the decoding of results.
    """

    def __init__(self, config: ServerConfig, node_store: NodeStore | None = None, *,
                 decode_limits: SerializerLimits = DEFAULT_LIMITS) -> None:
        self.config = config
        self.node_store = node_store
        self.state = ServerState.CREATED
        self.port: int | None = None
        liveness = config.max_poll_wait_seconds + 2 * config.heartbeat_interval_seconds
        self.registry = NodeRegistry(liveness_timeout=liveness)
        self.uploads = UploadSessions(max_payload_size=config.max_payload_size,
                                      max_chunk_size=config.max_chunk_size,
                                      max_sessions=config.max_concurrent_uploads,
                                      max_buffered_bytes=config.max_upload_buffer_bytes,
                                      pool_bytes=config.upload_pool_bytes,
                                      line_wait_seconds=config.upload_line_wait_seconds,
                                      place_kept_seconds=config.upload_place_kept_seconds)
        self.board = TaskBoard(on_close=self._task_closed, reconnect_grace=config.reconnect_grace_seconds)
        self._auth = Authenticator(config.tls, node_store)
        self._decode_limits = decode_limits
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service: NodeService | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Bind and start serving; return the bound port (useful with ``port=0``)."""
        if self.state is not ServerState.CREATED:
            raise ServerStateError(f"start() on a server that is {self.state.value}; create a new FedServer")
        cfg = self.config
        release_large_blocks()  # model-sized arrays go back to the OS when freed (see fedserver.malloc_policy)
        keep_chunk_memory(cfg.chunk_size)  # chunk-sized blocks reused, not trimmed and refaulted per chunk
        server = grpc.aio.server(options=cfg.grpc_options())
        self._service = NodeService(cfg, self._auth, self.registry, self.board, self.uploads,
                                    is_stopping=lambda: self.state is not ServerState.SERVING,
                                    decode_limits=self._decode_limits)
        add_node_service(self._service, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = self._bind(server)
        if port == 0:
            raise ServerStateError(f"could not bind {cfg.target} (address in use or not local)")
        await server.start()
        self._grpc, self.port, self.state = server, port, ServerState.SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("fedserver listening on %s:%d (%s)", cfg.address, port, cfg.tls)
        return port

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        if cfg.tls == "insecure":
            log.warning("serving WITHOUT TLS on %s (tls='insecure'): tokens travel in clear text", cfg.target)
            try:
                return server.add_insecure_port(cfg.target)
            except RuntimeError as exc:  # gRPC says only "Failed to bind to address"
                raise ServerStateError(f"could not bind {cfg.target} ({exc}): is another server (an earlier "
                                       "fedserver run?) using the port? Stop it or choose another port") from None
        assert cfg.cert_file is not None and cfg.key_file is not None
        key, cert = _read_pem(cfg.key_file, "key_file"), _read_pem(cfg.cert_file, "cert_file")
        if cfg.tls == "mtls":
            assert cfg.ca_file is not None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=_read_pem(cfg.ca_file, "ca_file"),
                                                require_client_auth=True)
        else:
            creds = grpc.ssl_server_credentials([(key, cert)])
        try:
            return server.add_secure_port(cfg.target, creds)
        except RuntimeError as exc:  # gRPC says only "Failed to bind": a key that does not match, or the address
            raise ServerStateError(f"could not bind {cfg.target} with TLS ({exc}): is another server (an earlier "
                                   "fedserver run?) using the port? Else check that the address is local and "
                                   f"that key_file {cfg.key_file} is the key of cert_file {cfg.cert_file}") from None

    async def stop(self, grace: float = 5.0) -> None:
        """Stop gracefully: health NOT_SERVING, ServerShutdown to every waiting poll, ``grace`` seconds for
        running transfers, then every open task ends CANCELLED ("server stopped")."""
        if self.state in (ServerState.CREATED, ServerState.STOPPED):
            self.state = ServerState.STOPPED
            return
        if self.state is ServerState.STOPPING:
            return
        self.state = ServerState.STOPPING
        assert self._grpc is not None and self._health is not None and self._service is not None
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.board.stop()
        await self._service.wait_polls_closed(timeout=grace)
        await self._grpc.stop(grace)
        self.board.cancel_all("server stopped")
        self.state = ServerState.STOPPED
        log.info("fedserver stopped")

    async def wait_closed(self) -> None:
        """Wait until the server terminates (after :meth:`stop` from elsewhere)."""
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def __aenter__(self) -> FedServer:  # noqa: PYI034 - Self needs Python 3.11
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- orchestration API ------------------------------------------------------------------------------
    def encode_payload(self, obj: Any) -> OutgoingPayload:
        """Encode a task document once, chunked with ``config.chunk_size``; share it across dispatches."""
        return OutgoingPayload.from_object(obj, chunk_size=self.config.chunk_size)

    def dispatch(self, node_id: str, kind: TaskKind, payload: SendablePayload, *, experiment_id: str,
                 round: int, inactivity_timeout: float | None = None) -> TaskHandle:
        """Queue a task for ``node_id`` (a registered node) and return its handle at once.

        ``inactivity_timeout`` (seconds, None: none) ends the task TIMED_OUT when neither polls, chunks,
        reports nor heartbeats concern it for that long.
        """
        if self.state is not ServerState.SERVING:
            raise ServerStateError(f"dispatch() needs a serving server; this one is {self.state.value}")
        record = self.registry.get(node_id)
        limit = self.config.max_message_size - MESSAGE_OVERHEAD
        if payload.chunk_size > limit:
            raise LimitExceededError(
                f"payload chunk size {payload.chunk_size} exceeds the largest chunk this server sends ({limit} "
                "bytes); encode it with server.encode_payload")
        task_id = uuid.uuid4().hex
        # the header must be sendable (MessageError otherwise): a round < 1 is the caller's error, found here,
        # not by the node's poll
        TaskDescriptor(task_id, experiment_id, round, TaskKind(kind), payload.info(0), float(inactivity_timeout or 0.0))
        handle = TaskHandle(task_id=task_id, node_id=node_id, experiment_id=experiment_id,
                            round=round, kind=TaskKind(kind), payload=payload,
                            inactivity_timeout=inactivity_timeout, on_close=self.board.closed)
        record.in_flight.add(handle.task_id)
        self.board.add(handle)
        return handle

    def cancel_round(self, experiment_id: str, round: int, reason: str = "round finished") -> int:
        """Cancel every open task of a round; later results for them are refused. Returns how many."""
        return self.board.cancel_all(reason, experiment_id=experiment_id, round=round)

    async def wait_for_nodes(self, n: int, timeout: float) -> list[str]:
        """Wait for ``n`` connected nodes (see :meth:`NodeRegistry.wait_for_nodes`); returns their ids."""
        return await self.registry.wait_for_nodes(n, timeout)

    def _task_closed(self, handle: TaskHandle) -> None:
        self.uploads.discard(handle.task_id)
        if handle.node_id in self.registry:
            self.registry.get(handle.node_id).in_flight.discard(handle.task_id)


def _read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file of the TLS configuration; ServerConfigError naming ``what`` if it is not one
    (gRPC would only fail to bind, without saying which file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ServerConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ServerConfigError(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data
