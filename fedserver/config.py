"""Server configuration: where to listen, how to secure the connection, and the limits enforced.

A :class:`ServerConfig` is read-only and checked when built: a wrong TLS mode, a missing certificate or a
chunk limit smaller than the chunk size fails at start with :class:`~fedcore.errors.ServerConfigError`
naming the field, not minutes later inside a call.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedcore.errors import ServerConfigError
from fedcore.framing import DEFAULT_CHUNK_SIZE
from fedcore.wire.flow_control import (
    AUTO_WINDOW,
    MESSAGE_OVERHEAD,
    RECEIVE_WINDOW_CHOICES,
    chunk_message_window,
    valid_receive_window,
)
from fedserver.upload_line import LINE_WAIT_SECONDS, PLACE_KEPT_SECONDS

TlsMode = Literal["insecure", "tls", "mtls"]
TLS_MODES: tuple[str, ...] = ("insecure", "tls", "mtls")

def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1 (bracketed or not), localhost."""
    host = address.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


GiB = 1 << 30
MiB = 1 << 20
#: Largest size a node is told (RegisterResponse.max_payload_size is a uint64; int64 for other languages).
MAX_WIRE_SIZE = 2**63 - 1
#: The idle stream timeout of a node by default, seconds (fednode's NodeConfig.idle_stream_timeout_seconds, the
#: JS node's idleStreamTimeoutSeconds): a node gives up an upload call silent this long. A wait in the upload
#: line is such a silence, so ``upload_line_wait_seconds`` must stay below it (the server answers first).
NODE_IDLE_STREAM_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of a :class:`~fedserver.server.FedServer` (constructor arguments, never state).

    Security: ``tls`` is ``"tls"`` by default (server certificate; nodes authenticate with a token),
    ``"mtls"`` (nodes authenticate with a client certificate signed by ``ca_file``; the node id is the
    certificate's common name) or ``"insecure"`` (plaintext, tokens still required; only when asked for).

    Sizes are bytes, durations seconds. ``max_payload_size`` and ``max_chunk_size`` bound what nodes may
    upload and are checked on the header, before any buffer is allocated; ``chunk_size`` is what the
    server sends with. gRPC's own message limits are set just above the larger chunk size.
    """

    address: str = "127.0.0.1"
    port: int = 50051
    tls: TlsMode = "tls"
    cert_file: Path | None = None  # server certificate (PEM), tls and mtls
    key_file: Path | None = None  # its private key (PEM), tls and mtls
    ca_file: Path | None = None  # CA that signs node certificates (PEM), mtls
    max_payload_size: int = 4 * GiB
    max_chunk_size: int = 4 * MiB
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_concurrent_uploads: int = 16  # upload sessions holding a buffer (active or waiting for a resume)
    max_upload_buffer_bytes: int = 4 * GiB  # bytes those buffers may hold together (one upload always fits)
    # idle upload buffers kept for the round's later replies (0: off), within max_upload_buffer_bytes: a reply
    # received into memory a freed one already faulted in skips ~0.55 CPU s/GB; released before finalize, so
    # no idle block sits beside the sum and the new model (the first reply of each round allocates afresh)
    upload_pool_bytes: int = 1 * GiB
    max_send_buffer_bytes: int = 64 * MiB  # task chunk bytes handed to gRPC and not yet sent, all streams
    # longest an upload waits in line for a buffer; then it is refused ERROR_REASON_UPLOAD_QUEUED (the line
    # moved meanwhile: its node calls again at once) or ERROR_REASON_UPLOADS_BUSY (nothing moved). Below a
    # node's idle stream timeout (NODE_IDLE_STREAM_TIMEOUT_SECONDS), which gives up the silent call
    upload_line_wait_seconds: float = LINE_WAIT_SECONDS
    # how long the place in line of an upload refused after its wait is kept for its task's next upload
    upload_place_kept_seconds: float = PLACE_KEPT_SECONDS
    # HTTP/2 receive window for uploads: how much a node may send ahead of what the server has read. None:
    # gRPC's bandwidth-delay probing (fast on long links, but it grows to 16-33 MB on a fast near one, and
    # each reply waiting for upload room may sit that deep in gRPC); bytes: fixed, probing off - caps an
    # upload at window / round-trip time, so give at least one chunk message (chunk + 64 KiB), or each chunk
    # waits for window updates. "auto" (default): one chunk message (chunk_size + 64 KiB) fixed while the
    # server listens on a loopback address only (nodes are on this machine: a round trip is microseconds),
    # probing once it listens on a network (see receive_window())
    receive_window_bytes: int | Literal["auto"] | None = AUTO_WINDOW
    max_poll_wait_seconds: float = 30.0
    # a node that disconnected (dropped its stream or fell silent) keeps its open tasks this long to come
    # back and resume them; then they fail, so a round waits this, not the task's inactivity timeout.
    # None: they wait for their own timeout. 30 s matches fednode's reconnect backoff cap.
    reconnect_grace_seconds: float | None = 30.0
    heartbeat_interval_seconds: float = 10.0
    shutdown_retry_after_seconds: float = 5.0  # told to nodes in ServerShutdown
    keepalive_time_seconds: float = 60.0  # server pings an idle connection this often
    keepalive_timeout_seconds: float = 20.0  # ...and drops it when the ping is not answered in time
    min_client_ping_interval_seconds: float = 10.0  # clients may ping at most this often

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ServerConfigError(f"tls must be one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be an int in 0..65535 (0: any free port), got {self.port!r}")
        if not self.address:
            raise ServerConfigError("address must not be empty (e.g. 127.0.0.1, 0.0.0.0 or [::])")
        for name in ("cert_file", "key_file", "ca_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        needed = {"tls": ("cert_file", "key_file"), "mtls": ("cert_file", "key_file", "ca_file")}.get(self.tls, ())
        for name in needed:
            path = getattr(self, name)
            if path is None:
                raise ServerConfigError(f"tls={self.tls!r} needs {name} (see `fedserver certs --help`)")
            if not path.is_file():
                raise ServerConfigError(f"{name} {path} does not exist or is not a file")
        for name in ("max_payload_size", "max_chunk_size", "chunk_size", "max_concurrent_uploads",
                     "max_upload_buffer_bytes", "max_send_buffer_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ServerConfigError(f"{name} must be an int > 0, got {value!r}")
        if self.max_payload_size > MAX_WIRE_SIZE:  # RegisterResponse.max_payload_size: every Register would fail
            raise ServerConfigError(f"max_payload_size must be at most 2**63-1 bytes, got {self.max_payload_size}")
        pool = self.upload_pool_bytes
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
            raise ServerConfigError(f"upload_pool_bytes must be an int >= 0 (0: off), got {pool!r}")
        if not valid_receive_window(self.receive_window_bytes):
            raise ServerConfigError(
                f"receive_window_bytes must be {RECEIVE_WINDOW_CHOICES}, got {self.receive_window_bytes!r}")
        if self.chunk_size > self.max_chunk_size:
            raise ServerConfigError(
                f"chunk_size {self.chunk_size} must not exceed max_chunk_size {self.max_chunk_size}")
        if self.max_chunk_size > (1 << 31) - 1 - MESSAGE_OVERHEAD:
            raise ServerConfigError(f"max_chunk_size {self.max_chunk_size} must be below 2 GiB (gRPC message limit)")
        for name in ("max_poll_wait_seconds", "heartbeat_interval_seconds", "keepalive_time_seconds",
                     "keepalive_timeout_seconds", "min_client_ping_interval_seconds", "upload_line_wait_seconds",
                     "upload_place_kept_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ServerConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.upload_line_wait_seconds >= NODE_IDLE_STREAM_TIMEOUT_SECONDS:
            raise ServerConfigError(
                f"upload_line_wait_seconds must be below {NODE_IDLE_STREAM_TIMEOUT_SECONDS:g} s, a node's idle "
                f"stream timeout by default (the node would give up the silent call first), got "
                f"{self.upload_line_wait_seconds!r}")
        grace = self.reconnect_grace_seconds
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                                  or not math.isfinite(grace) or grace < 0):
            raise ServerConfigError(
                f"reconnect_grace_seconds must be None or a finite number of seconds >= 0, got {grace!r}")
        if self.shutdown_retry_after_seconds < 0:
            raise ServerConfigError(
                f"shutdown_retry_after_seconds must be >= 0, got {self.shutdown_retry_after_seconds!r}")

    @property
    def target(self) -> str:
        """``address:port`` as given to ``add_*_port`` (IPv6 addresses keep their brackets)."""
        return f"{self.address}:{self.port}"

    def receive_window(self) -> int | None:
        """The upload window gRPC gets: bytes fixed, or None (probing). "auto" resolves by ``address``: a
        loopback address (127.0.0.0/8, ::1, localhost) can only be reached from this machine, so one chunk
        message of ``chunk_size`` suffices there; any other address may face a WAN, so probing. (A loopback
        server that remote nodes reach through a TCP tunnel should set None: the tunnel makes it far.)
        Sized for nodes uploading chunks of ``chunk_size`` (fednode's default, 1 MiB, is the default
        ``chunk_size``): larger upload chunks still arrive, gRPC opening the window for a message it
        waits on, but each waits for that update."""
        window = self.receive_window_bytes
        if window != AUTO_WINDOW:
            return window
        return chunk_message_window(self.chunk_size) if is_loopback(self.address) else None

    @property
    def max_message_size(self) -> int:
        """gRPC send/receive message limit: the larger chunk size plus framing overhead."""
        return max(self.max_chunk_size, self.chunk_size) + MESSAGE_OVERHEAD

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel arguments of the gRPC server: message limits and keepalive policy."""
        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        return [
            ("grpc.max_receive_message_length", self.max_message_size),
            ("grpc.max_send_message_length", self.max_message_size),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_seconds)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_seconds)),
            ("grpc.keepalive_permit_without_calls", 1),
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS is spelled like this; an unknown name is
            # silently ignored and the 5-minute default then answers keepalive pings with GOAWAY too_many_pings
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_interval_seconds)),
            ("grpc.http2.max_ping_strikes", 2),
            # gRPC sets SO_REUSEPORT by default: a second fedserver on a port in use (a resume while the old run
            # still serves) would bind silently and the two would split the nodes between them
            ("grpc.so_reuseport", 0),
        ] + ([] if (window := self.receive_window()) is None else [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", window),
        ])
