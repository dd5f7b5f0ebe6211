"""``fedserver serve``: run the transport server alone until interrupted (manual tests, grpcurl)."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from pathlib import Path
from typing import Any

from fedcore.errors import ServerConfigError
from fedserver.auth import NodeStore
from fedserver.config import TLS_MODES, ServerConfig
from fedserver.home import FILES_HELP, add_home_option, certs_dir, home_from_args, nodes_db
from fedserver.server import FedServer

_RAW = argparse.RawDescriptionHelpFormatter
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}

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

sizes accept the suffixes KiB, MiB, GiB (e.g. 4GiB)."""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1048576, 512KiB, 4MiB or 4GiB")
    return int(match.group(1)) * _UNITS[unit]


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the transport server until interrupted",
                                  description=DESCRIPTION, epilog=FILES_HELP, formatter_class=_RAW)
    add_home_option(serve)
    add_server_options(serve)
    serve.add_argument("--grace", type=float, default=5.0, help="seconds given to transfers on stop (default: %(default)s)")
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
    parser.add_argument("--max-payload-size", type=parse_size, default=d["max_payload_size"].default,
                        help="largest result a node may upload (default: 4GiB)")
    parser.add_argument("--max-chunk-size", type=parse_size, default=d["max_chunk_size"].default,
                        help="largest chunk a node may upload (default: 4MiB)")
    parser.add_argument("--chunk-size", type=parse_size, default=d["chunk_size"].default,
                        help="chunk size the server sends with (default: 1MiB)")
    parser.add_argument("--max-concurrent-uploads", type=int, default=d["max_concurrent_uploads"].default,
                        help="uploads holding a buffer at once (default: %(default)s)")
    parser.add_argument("--max-poll-wait", type=float, default=d["max_poll_wait_seconds"].default,
                        help="longest long poll, seconds (default: %(default)s)")


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
        max_concurrent_uploads=args.max_concurrent_uploads, max_poll_wait_seconds=args.max_poll_wait)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    store = NodeStore(nodes_db(home_from_args(args)))
    if config.tls != "mtls" and not store.list():
        raise ServerConfigError("no node is enrolled, so no node could connect: run `fedserver nodes enroll ID`")
    asyncio.run(_run(FedServer(config, store), args.grace))
    return 0


async def _run(server: FedServer, grace: float) -> None:
    port = await server.start()
    print(f"fedserver serving on {server.config.address}:{port} ({server.config.tls}); Ctrl-C to stop", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(grace)
