"""``fedserver serve``: run the transport server alone until interrupted (manual tests, grpcurl)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from fedcore.command_line import parse_grace_seconds, parse_receive_window, parse_seconds, parse_size
from fedcore.errors import ServerConfigError
from fedserver.auth import NodeStore
from fedserver.config import TLS_MODES, ServerConfig
from fedserver.home import FILES_HELP, add_home_option, certs_dir, home_from_args, nodes_db
from fedserver.server import FedServer

_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Start the gRPC server nodes connect to and wait until SIGINT or SIGTERM, then stop gracefully: waiting
polls get a ServerShutdown message, running transfers get --grace seconds. No experiment runs; nodes can
register and poll, and standard tools work against it:

  grpc_health_probe -addr=HOST:PORT -tls -tls-ca-cert=HOME/certs/ca.crt
  grpcurl -cacert HOME/certs/ca.crt HOST:PORT list

security (--tls):
  tls       (default) server certificate HOME/certs/server.crt; nodes authenticate with a token
  mtls      nodes present a certificate signed by HOME/certs/ca.crt; its common name is the node id
  insecure  plaintext, tokens still required; only for loopback experiments

server memory (--max-upload-buffer, --receive-window):
  A round's replies arrive together. Their upload buffers hold at most --max-upload-buffer bytes
  together (one reply always fits; the others wait in line until one is aggregated and freed), and
  each waiting reply can still have up to its HTTP/2 receive window of chunks buffered inside gRPC.
  --receive-window auto (default) fixes that window at one chunk message (chunk size + 64KiB) while
  the server listens on a loopback address (nodes on this machine: it costs no speed there), and lets
  gRPC probe the bandwidth-delay product once it listens on a network (fast on long links, but ~10-30 MB
  per waiting reply on fast near ones). bdp: always probe (e.g. a loopback server that remote nodes
  reach through a TCP tunnel). A size fixes the window: it bounds that memory but caps an upload at
  SIZE per network round trip; give at least one chunk message (1088KiB for 1 MiB chunks), else every
  chunk waits for window updates. To bound memory with many nodes or large models, e.g.
  --max-upload-buffer 64MiB --receive-window 1088KiB (replies then arrive one after another; see
  docs/performance.md, "Rounds vs Flower" and "Transport").

sizes accept the suffixes KiB, MiB, GiB (e.g. 4GiB)."""



def parse_positive_size(text: str) -> int:
    """A :func:`parse_size` size > 0 (argparse names the flag in front of the message)."""
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be more than 0 bytes")
    return size


def parse_grace(text: str) -> float | None:
    """``none`` -> None (no grace: tasks wait for their own timeout), else finite seconds >= 0."""
    if text.strip().lower() == "none":
        return None
    try:
        return parse_grace_seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid grace {text!r}: must be seconds >= 0, or none") from None


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be an integer > 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be an integer > 0")
    return value


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the transport server until interrupted",
                                  description=DESCRIPTION, epilog=FILES_HELP, formatter_class=_RAW)
    add_home_option(serve)
    add_server_options(serve)
    serve.add_argument("--grace", type=parse_grace_seconds, default=5.0, help="seconds given to transfers on stop (default: %(default)s)")
    serve.set_defaults(func=_serve)


def add_server_options(parser: argparse._ActionsContainer) -> None:
    """Add the options :func:`config_from_args` reads (address, port, TLS files, limits) to a parser or an
    argument group; shared by ``serve`` and ``run``."""
    d = ServerConfig.__dataclass_fields__
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (default: %(default)s; "
                        "0.0.0.0 or [::] for every interface)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind, 0 for any free port (default: %(default)s)")
    parser.add_argument("--tls", choices=TLS_MODES, default="tls", help="connection security (default: %(default)s)")
    parser.add_argument("--cert", type=Path, help="server certificate (default: HOME/certs/server.crt)")
    parser.add_argument("--key", type=Path, help="server private key (default: HOME/certs/server.key)")
    parser.add_argument("--ca", type=Path, help="CA of node certificates, mtls (default: HOME/certs/ca.crt)")
    parser.add_argument("--max-payload-size", type=parse_positive_size, default=d["max_payload_size"].default,
                        metavar="SIZE", help="largest result a node may upload (default: 4GiB)")
    parser.add_argument("--max-chunk-size", type=parse_positive_size, default=d["max_chunk_size"].default,
                        metavar="SIZE", help="largest chunk a node may upload (default: 4MiB)")
    parser.add_argument("--chunk-size", type=parse_positive_size, default=d["chunk_size"].default,
                        metavar="SIZE", help="chunk size the server sends with (default: 1MiB)")
    parser.add_argument("--max-concurrent-uploads", type=parse_positive_int,
                        default=d["max_concurrent_uploads"].default, metavar="N",
                        help="uploads holding a buffer at once (default: %(default)s)")
    parser.add_argument("--max-upload-buffer", type=parse_positive_size,
                        default=d["max_upload_buffer_bytes"].default, metavar="SIZE",
                        help="bytes all upload buffers may hold together; one reply always fits, the others "
                             "wait in line until it is aggregated. Lower bounds the server's memory, but "
                             "replies are then received one after another (default: 4GiB)")
    parser.add_argument("--receive-window", type=parse_receive_window, default=d["receive_window_bytes"].default,
                        metavar="auto|bdp|SIZE",
                        help="HTTP/2 receive window of each upload: how much of a reply waiting for upload "
                             "room gRPC still accepts. auto (default): one chunk message fixed while listening on "
                             "loopback, bandwidth-delay probing on a network address; bdp: always probing (fast "
                             "on long links but ~10-30 MB per waiting reply); a fixed size (>= 64KiB; best >= one "
                             "chunk message, e.g. 1088KiB for 1 MiB chunks) bounds that memory but caps an upload "
                             "at SIZE per network round trip")
    parser.add_argument("--upload-line-wait", type=parse_seconds, default=d["upload_line_wait_seconds"].default,
                        metavar="SECONDS",
                        help="longest an upload waits in line for a buffer; then it is refused, UPLOAD_QUEUED (the "
                             "line moved: the node calls again at once, keeping its place) or UPLOADS_BUSY "
                             "(nothing moved). Below 120, a node's idle stream timeout (default: %(default)s)")
    parser.add_argument("--upload-place-kept", type=parse_seconds, default=d["upload_place_kept_seconds"].default,
                        metavar="SECONDS",
                        help="how long the place in line of a refused upload is kept for its task's next "
                             "upload (default: %(default)s)")
    parser.add_argument("--max-poll-wait", type=parse_seconds, default=d["max_poll_wait_seconds"].default,
                        help="longest long poll, seconds (default: %(default)s)")
    parser.add_argument("--reconnect-grace", type=parse_grace, default=d["reconnect_grace_seconds"].default,
                        metavar="SECONDS|none",
                        help="how long a disconnected node keeps its open tasks to reconnect and resume them; "
                             "then they fail and a round goes on without it. none: tasks wait for their own "
                             "inactivity timeout (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from ``serve``-style arguments, with certificate paths defaulting to HOME/certs."""
    certs = certs_dir(home_from_args(args))
    secure = args.tls != "insecure"
    return ServerConfig(
        address=args.address, port=args.port, tls=args.tls,
        cert_file=args.cert or (certs / "server.crt" if secure else None),
        key_file=args.key or (certs / "server.key" if secure else None),
        ca_file=args.ca or (certs / "ca.crt" if args.tls == "mtls" else None),
        max_payload_size=args.max_payload_size, max_chunk_size=args.max_chunk_size, chunk_size=args.chunk_size,
        max_concurrent_uploads=args.max_concurrent_uploads, max_upload_buffer_bytes=args.max_upload_buffer,
        receive_window_bytes=args.receive_window, max_poll_wait_seconds=args.max_poll_wait,
        reconnect_grace_seconds=args.reconnect_grace, upload_line_wait_seconds=args.upload_line_wait,
        upload_place_kept_seconds=args.upload_place_kept)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = NodeStore(nodes_db(home_from_args(args)))
    if config.tls != "mtls" and not store.list():
        raise ServerConfigError("no node is enrolled, so no node could connect: run `fedserver nodes enroll ID`")
    asyncio.run(_run(FedServer(config, store), args.grace))
    return 0


async def _run(server: FedServer, grace: float) -> None:
    port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # only now: whoever waits for this line may signal at once and get a graceful stop
    print(f"fedserver serving on {server.config.address}:{port} ({server.config.tls}); Ctrl-C to stop", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(grace)
