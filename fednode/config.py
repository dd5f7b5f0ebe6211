"""Node configuration: where the server is, how to trust it, who we are, and the limits we enforce.

Config is read-only and checked when built: a wrong TLS mode, a missing CA file or an absent token fails
at start with a :class:`fedcore.errors.NodeConfigError` naming the field, not minutes later in a call.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedcore.errors import NodeConfigError
from fedcore.framing import DEFAULT_CHUNK_SIZE
from fedcore.wire import ServerSettings
from fedcore.wire.flow_control import MESSAGE_OVERHEAD, RECEIVE_WINDOW_CHOICES, valid_receive_window

TlsMode = Literal["insecure", "tls", "mtls"]
TLS_MODES: tuple[str, ...] = ("insecure", "tls", "mtls")
#: Prefixes of gRPC's own target syntax (naming.md in grpc/grpc), left to gRPC; any other server is HOST:PORT.
GRPC_TARGET_SCHEMES: tuple[str, ...] = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")



#: A token file longer than this is not a token (one ``secrets.token_urlsafe`` word); read no further.
TOKEN_FILE_MAX_BYTES = 4096
_ASCII_SPACE = " \t\n\r\v\f"
_TOKEN_HINT = "put only the token `fedserver nodes enroll NODE_ID --quiet` printed in it"


def read_token_file(path: Path, where: str) -> str:
    """The token in file ``path``: one word of printable ASCII, surrounding whitespace and a leading UTF-8
    byte order mark dropped. The one rule for every token file the node reads (``fednode start`` checks it
    before its banner, :meth:`NodeConfig.resolve_token` reads it for the calls).

    ``where`` starts each error message: how the operator named the file (``argument --token-file``,
    ``token_file``). At most ``TOKEN_FILE_MAX_BYTES + 1`` bytes are read (``/dev/zero`` is not a token).

    Raises:
        NodeConfigError: unreadable, too long, not UTF-8, empty, only whitespace, more than one word, or a
            character that is not printable ASCII (gRPC refuses it as a header value), named by position.
    """
    try:
        with open(path, "rb") as stream:
            raw = stream.read(TOKEN_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise NodeConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > TOKEN_FILE_MAX_BYTES:
        raise NodeConfigError(f"{where}: {path} is not a token (over {TOKEN_FILE_MAX_BYTES} bytes); {_TOKEN_HINT}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = len(raw[:exc.start].decode("utf-8")) + 1
        raise NodeConfigError(f"{where}: {path} is not text: byte 0x{raw[exc.start]:02x} at character {at} is "
                              f"not UTF-8; {_TOKEN_HINT}") from None
    if not text:
        raise NodeConfigError(f"{where}: {path} holds no token (the file is empty); {_TOKEN_HINT}")
    # Windows Notepad saves UTF-8 with a byte order mark (U+FEFF) first: a marker of the encoding, not part
    # of the token (and an illegal gRPC header value if it were sent).
    start = 1 if text.startswith("\ufeff") else 0
    body = text[start:]
    token = body.strip(_ASCII_SPACE)
    if not token:
        raise NodeConfigError(f"{where}: {path} holds no token (the file holds only whitespace); {_TOKEN_HINT}")
    first = start + len(body) - len(body.lstrip(_ASCII_SPACE)) + 1
    check_token(token, f"{where}: {path}", first)
    return token


def check_token(token: str, where: str, first: int = 1) -> None:
    """Refuse a token that is not one word of printable ASCII (``!`` to ``~``), as ``secrets.token_urlsafe``
    writes and gRPC accepts as a header value. ``first``: the position of the token's first character in
    what ``where`` names (1-based), so that the message points at the offending one.

    Raises:
        NodeConfigError: ``WHERE does not hold one token`` (whitespace inside) or ``WHERE holds 'ESCAPE' at
            character N, which a token cannot hold``.
    """
    if any(char in _ASCII_SPACE for char in token):
        raise NodeConfigError(f"{where} does not hold one token (one word, no spaces or line breaks); "
                              f"{_TOKEN_HINT}")
    for index, char in enumerate(token):
        if not "!" <= char <= "~":
            shown = char.encode("unicode_escape").decode("ascii")  # ' ' never comes here: \x01, \xe9, \ufeff
            raise NodeConfigError(f"{where} holds '{shown}' at character {first + index}, which a token cannot "
                                  f"hold (printable ASCII only, no spaces); {_TOKEN_HINT}")


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff and Jitter").

    Attempt ``n`` (from 0) sleeps ``uniform(0, min(maximum, initial * multiplier**n))`` seconds, so a
    thousand nodes cut off by the same server restart do not all come back in the same millisecond.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise NodeConfigError(f"backoff initial must be > 0 seconds, got {self.initial}")
        if not self.maximum >= self.initial:
            raise NodeConfigError(f"backoff maximum {self.maximum} must be >= initial {self.initial}")
        if not self.multiplier >= 1:
            raise NodeConfigError(f"backoff multiplier must be >= 1, got {self.multiplier}")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry ``attempt`` (0-based)."""
        # cap the exponent so huge attempt counts do not overflow a float
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter delay before retry ``attempt``: uniform in [0, ceiling(attempt)]."""
        return rng.uniform(0.0, self.ceiling(attempt))


@dataclass(frozen=True)
class KeepaliveOptions:
    """HTTP/2 keepalive so a silently dead connection (NAT timeout, cut cable) is noticed in seconds.

    ``max_pings_without_data=0`` lets pings flow during a long idle poll; the server must permit pings
    this frequent (``grpc.http2.min_ping_interval_without_data_ms`` <= ``time_ms``).
    """

    time_ms: int = 20_000
    timeout_ms: int = 10_000
    permit_without_calls: bool = True
    max_pings_without_data: int = 0


@dataclass(frozen=True)
class NodeConfig:
    """Everything a :class:`fednode.client.NodeClient` needs to reach and serve its server.

    ``tls``: ``"insecure"`` (plain TCP; only when asked for explicitly), ``"tls"`` (server certificate
    checked against the pinned ``ca_cert``) or ``"mtls"`` (plus our ``client_cert``/``client_key``; the
    identity then comes from the certificate and the token is optional). The CA is always pinned: there
    is no trust-on-first-use and no fallback to the system store.
    """

    server: str
    tls: TlsMode = "tls"
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    node_name: str = "fednode"
    #: Expected host name in the server certificate when it differs from the dialled host (tests, IPs).
    server_name_override: str | None = None
    poll_wait_seconds: float = 30.0  # long-poll duration asked of the server (it may cap it)
    upload_chunk_size: int = DEFAULT_CHUNK_SIZE  # bytes per uploaded chunk (the server may lower it)
    max_payload_size: int = 4 << 30  # largest task payload accepted, bytes (checked before allocating)
    max_chunk_size: int = 4 << 20  # largest chunk accepted, bytes
    #: Bytes of idle download buffers kept for the next task (0: off). A node receives the same-sized model
    #: every round: a kept buffer skips faulting in fresh memory (~0.55 CPU s/GB, more on a VM that handed
    #: idle memory back to its host), at the price of that much more RSS between rounds. A buffer is reused
    #: only once nothing (a plan's arrays included) references the previous task's payload.
    receive_pool_bytes: int = 1 << 30
    call_timeout_seconds: float = 30.0  # deadline of unary calls (Register, Report, Heartbeat, status)
    idle_stream_timeout_seconds: float = 120.0  # a task stream silent this long is considered broken
    report_interval_seconds: float = 0.5  # batching period of progress/log events
    heartbeat_interval_seconds: float = 10.0  # used until the server announces its own at Register
    stop_grace_seconds: float = 10.0  # how long stop() lets an upload in flight finish
    #: How long a result refused ERROR_REASON_UPLOADS_BUSY is retried in place (with ``backoff``, each wait
    #: cut to the time left) before the node gives it up and reports its task FAILED, counted from the
    #: first busy refusal, seconds. Busy means the server's upload buffers are taken, possibly by *parked*
    #: uploads (broken, kept for their resume), which it frees only when their task ends: by fedserver's
    #: defaults within its reconnect grace (30 s) of their node's drop, or, for a node that fell silent,
    #: its liveness window (max poll wait 30 s + 2 x heartbeat 10 s) plus that grace: 80 s. 120 s outlasts
    #: that by more than one backoff ceiling (30 s), so an attempt comes after the room is free (the former
    #: rule, eight attempts, gave up after ~31 s on average, 61.5 s at most, and lost a good result).
    #: Meanwhile a Heartbeat naming the task keeps it from counting as inactive.
    busy_upload_retry_seconds: float = 120.0
    #: How long a result refused ERROR_REASON_UPLOAD_QUEUED is uploaded again (at once each time: its place in
    #: the server's line is kept, the line is oldest first and moving) before the node gives it up and reports
    #: its task FAILED naming the refusal, counted from the first queued refusal, seconds. Queued refusals do
    #: not count toward ``busy_upload_retry_seconds``; this bound is a defence against a server whose line
    #: never lets the result in. 1800 s is a generous multiple of a long line's clearing time (100 nodes x
    #: 1 GB through 16 slots: minutes) and of the server's line wait (60 s).
    queued_upload_retry_seconds: float = 1800.0
    #: HTTP/2 receive window for task downloads, bytes: how much the server may send ahead of what the node
    #: has read. "auto" (default): measured after every Register (fednode.receive_window) - one chunk
    #: message fixed when the round-trip time is short enough for it to move >= 1 GB/s, else gRPC's
    #: bandwidth-delay probing. None: always probing (it grows to 16-33 MB on a fast near link, held in
    #: memory beside the model). An int: that many bytes fixed - it caps downloads at window / round-trip
    #: time; give at least one chunk message (chunk size + 64 KiB, e.g. 1114112 for 1 MiB chunks), or
    #: every chunk waits for window updates.
    receive_window_bytes: int | Literal["auto"] | None = "auto"
    backoff: BackoffPolicy = BackoffPolicy()
    keepalive: KeepaliveOptions = KeepaliveOptions()

    def __post_init__(self) -> None:
        if not self.server or ":" not in self.server:
            raise NodeConfigError(f"server must be HOST:PORT, got {self.server!r}")
        if not self.server.startswith(GRPC_TARGET_SCHEMES):  # those (unix:PATH, dns:///h:p, ...) are gRPC's
            host, port = self.server.rsplit(":", 1)
            # gRPC takes a bad HOST:PORT for a name it cannot resolve yet: the node would retry it forever
            if not port.lstrip("-").isdigit():
                raise NodeConfigError(f"server port must be a number 1..65535, got {port!r} in {self.server!r}")
            if not 1 <= int(port) <= 65535:
                raise NodeConfigError(f"server port must be 1..65535, got {port} in {self.server!r}")
            if not host.strip("[]") or not host.isprintable() or any(c.isspace() for c in host):
                raise NodeConfigError(f"server host is empty or not a host name or address: {host!r} in "
                                      f"{self.server!r}")
        if self.tls not in TLS_MODES:
            raise NodeConfigError(f"tls must be one of {', '.join(TLS_MODES)}; got {self.tls!r}")
        if self.tls != "insecure" and self.ca_cert is None:
            raise NodeConfigError(f"tls={self.tls!r} needs ca_cert (the pinned CA of the server certificate)")
        if self.tls == "mtls" and (self.client_cert is None or self.client_key is None):
            raise NodeConfigError("tls='mtls' needs both client_cert and client_key")
        if self.tls != "mtls" and self.token is None and self.token_file is None:
            raise NodeConfigError(f"tls={self.tls!r} needs a token or token_file (identity of the node, from "
                                  f"`fedserver nodes enroll`), or tls='mtls' with client_cert and client_key")
        if self.token is not None and self.token_file is not None:
            raise NodeConfigError("give either token or token_file, not both")
        for name in ("upload_chunk_size", "max_payload_size", "max_chunk_size"):
            if getattr(self, name) <= 0:
                raise NodeConfigError(f"{name} must be > 0 bytes, got {getattr(self, name)}")
        for name in ("upload_chunk_size", "max_chunk_size"):  # one chunk is one gRPC message (an int channel arg)
            if getattr(self, name) > (1 << 31) - 1 - MESSAGE_OVERHEAD:
                raise NodeConfigError(f"{name} must be below 2 GiB (gRPC message limit), got {getattr(self, name)}")
        pool = self.receive_pool_bytes
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
            raise NodeConfigError(f"receive_pool_bytes must be an int >= 0 bytes (0: off), got {pool!r}")
        for name in ("poll_wait_seconds", "call_timeout_seconds", "idle_stream_timeout_seconds",
                     "report_interval_seconds", "heartbeat_interval_seconds", "busy_upload_retry_seconds",
                     "queued_upload_retry_seconds"):
            if not getattr(self, name) > 0:
                raise NodeConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
            if getattr(self, name) == math.inf:  # every wait is finite
                raise NodeConfigError(f"{name} must be a finite number of seconds, got inf")
        if not valid_receive_window(self.receive_window_bytes):
            raise NodeConfigError(
                f"receive_window_bytes must be {RECEIVE_WINDOW_CHOICES}, got {self.receive_window_bytes!r}")
        if not 0 <= self.stop_grace_seconds < math.inf:
            raise NodeConfigError(f"stop_grace_seconds must be finite and >= 0, got {self.stop_grace_seconds}")

    def heartbeat_interval(self, settings: ServerSettings | None) -> float:
        """Seconds between Heartbeats while holding a task: the server's (RegisterResponse), else ours."""
        if settings is not None and settings.heartbeat_interval_seconds > 0:
            return settings.heartbeat_interval_seconds
        return self.heartbeat_interval_seconds

    def resolve_token(self) -> str | None:
        """The bearer token: ``token``, or read from ``token_file`` by :func:`read_token_file`; None under mTLS
        without one. Either must be a valid gRPC header value (:func:`check_token`)."""
        if self.token is not None:
            if not self.token:
                raise NodeConfigError("token is empty: give the token `fedserver nodes enroll` printed")
            check_token(self.token, "token")
            return self.token
        if self.token_file is not None:
            return read_token_file(Path(self.token_file), "token_file")
        return None

    def initial_receive_window(self) -> int | None:
        """The window of a first channel: the fixed one configured, else None (probing; "auto" decides later)."""
        window = self.receive_window_bytes
        return window if isinstance(window, int) else None

    def channel_options(self, receive_window: int | None) -> list[tuple[str, int | str]]:
        """gRPC channel options: keepalive, message sizes just above one chunk, and the receive window
        (bytes fixed, or None: gRPC's bandwidth-delay probing)."""
        ka = self.keepalive
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", ka.time_ms),
            ("grpc.keepalive_timeout_ms", ka.timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(ka.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", ka.max_pings_without_data),
            ("grpc.max_receive_message_length", self.max_chunk_size + MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", self.upload_chunk_size + MESSAGE_OVERHEAD),
            # a private subchannel per channel: a fresh channel after a failure must dial at once, not
            # inherit the process-wide subchannel stuck in gRPC's own reconnect backoff (1 s, x1.6, 120 s)
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if receive_window is not None:  # fixed window, BDP probing off
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", receive_window)]
        if self.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        return options
