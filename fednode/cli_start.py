"""``fednode start``: connect to a researcher's server and serve its tasks until stopped.

:func:`register` adds the command. What answers the tasks is chosen with ``--handler`` from
:data:`HANDLERS` (name -> setup function), so other task runners plug in with one entry.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shlex
import socket
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.command_line import (
    EXIT_REFUSED,
    parse_grace_seconds,
    parse_receive_window,
    parse_seconds,
    parse_size,
)
from fedcore.errors import NodeConfigError, ServerRefusedError
from fedcore.wire import DatasetInfo
from fednode.config import NodeConfig
from fednode.handler import EchoHandler, TaskHandler
from fednode.home import DB_FILENAME, FILES_HELP, HOME_ENV_VAR, add_home_options, db_path_from_args
from fednode.launch import run_node
from fednode.log_text import log_text
from fednode.start_checks import certificate_common_name, check_start_files
from fednode.transport import superseded

__all__ = ["HANDLERS", "NodeSetup", "register"]

TOKEN_ENV_VAR = "FEDNODE_TOKEN_FILE"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSetup:
    """What ``start`` runs: the task handler, the datasets announced at Register, the capabilities."""

    handler: TaskHandler
    datasets: list[DatasetInfo] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # lines printed before the banner ("fednode: " + line)


def _train_setup(args: argparse.Namespace) -> NodeSetup:
    from fednode.approvals import PlanApprovals
    from fednode.datasets import DatasetRegistry
    from fednode.runner import TrainingTaskHandler

    db = db_path_from_args(args)
    in_home = db.name == DB_FILENAME
    where = db.parent if in_home else db
    option = f"--home {shlex.quote(str(db.parent))}" if in_home else f"--db {shlex.quote(str(db))}"
    notices = []
    if not db.exists():  # a mistyped --home would otherwise start an empty node without a word
        notices.append(f"created a new node {'home' if in_home else 'database'} at {where} (check --home, --db "
                       f"or ${HOME_ENV_VAR} if you meant an existing one)")
    registry = DatasetRegistry(db)
    approvals = PlanApprovals(db, auto_approve=args.auto_approve)
    if args.auto_approve:
        log.warning("--auto-approve: every training plan this node receives is approved and RUN without review "
                    "(demos only; plans are Python code)")
    handler = TrainingTaskHandler(registry, approvals, origin=args.server)
    capabilities = ["numpy", "scaffold", "fedprox"]
    if importlib.util.find_spec("torch") is not None:
        capabilities.append("torch")
    datasets = registry.metadata()
    if not datasets:
        notices.append(f"warning: no datasets registered in {where}: this node can train nothing (every task is "
                       f"refused); register one with `fednode dataset add NAME FILE {option}` and restart the node")
    return NodeSetup(handler, datasets, capabilities, notices)


def _echo_setup(args: argparse.Namespace) -> NodeSetup:
    return NodeSetup(EchoHandler(), [], ["echo"])


#: ``--handler`` choices: name -> function building the node's setup from the parsed arguments.
HANDLERS: dict[str, Callable[[argparse.Namespace], NodeSetup]] = {"train": _train_setup, "echo": _echo_setup}

_DESCRIPTION = """\
Connect to the researcher's fedserver at --server and serve its tasks until stopped. The node dials
out (it never listens), registers with its name, datasets and capabilities, then long-polls for tasks.
A task's payload is received in chunks and checked (size limit before anything is allocated, SHA-256
after), the task runs, and the result is uploaded in chunks. Broken transfers resume where they
stopped; if the server is down or restarts, the node reconnects with exponential backoff and jitter
(0.5 s doubling up to 30 s). The datasets announced are those registered when the node starts.

security:
  The server certificate is checked against the CA given with --ca-cert (pinned: no system store, no
  trust on first use). The node proves its identity with the token issued by `fedserver nodes enroll`
  (--token-file, sent as 'authorization: Bearer' metadata) or, for mutual TLS, with --cert and --key
  signed by the project CA (`fedserver certs`). --insecure sends everything, token included, in clear
  text: use it only on loopback or for tests.

handlers (--handler):
  train   run approved training plans on the registered datasets (default); unapproved plans are
          refused and recorded as pending for `fednode plans approve`
  echo    send the received parameters back unchanged, to test a deployment end to end

stopping:
  SIGINT (Ctrl-C) or SIGTERM stops the node: a poll or download is abandoned at once; a running task
  has --stop-grace seconds to finish and upload its result. A task still running then is told to stop:
  training stops at its next batch and the task is reported FAILED, naming why. Then the connection
  closes and the node exits. A second signal exits immediately, the task unfinished."""

_EPILOG = f"""\
examples:
  fednode start --server fl.example.org:50051 --ca-cert ca.crt --token-file node.token --name clinic-a
  fednode start --server fl.example.org:50051 --ca-cert ca.crt --cert clinic-a.crt --key clinic-a.key
  fednode -v start --server 127.0.0.1:50051 --insecure --token-file node.token --handler echo

exit status:
  0 stopped by a signal, 1 configuration or other error, 2 bad usage (options that do not go together,
  no identity, a --ca-cert/--cert/--key/--token-file that cannot be read or parsed: all checked before
  the node starts), refused by the server (bad or revoked token, certificate not accepted, incompatible
  protocol version) or replaced by another process of this node (same token or certificate) that
  registered since and now gets its tasks; a supervisor should not restart it on that status, or the
  two would keep replacing each other

{FILES_HELP}
  {TOKEN_ENV_VAR}   token file when --token-file is not given"""


def register(subparsers: Any) -> None:
    """Add ``start`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "start", help="connect to a researcher's server and serve its tasks",
        description=_DESCRIPTION, epilog=textwrap.dedent(_EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--server", required=True, metavar="HOST:PORT", help="address of the researcher's fedserver")
    server.add_argument("--server-name", metavar="NAME",
                        help="host name expected in the server certificate when it differs from HOST")
    security = parser.add_argument_group("security (one of --insecure or --ca-cert)")
    mode = security.add_mutually_exclusive_group(required=True)
    mode.add_argument("--insecure", action="store_true", help="plain TCP without TLS (loopback and tests only)")
    mode.add_argument("--ca-cert", type=Path, metavar="FILE", help="PEM of the CA that signed the server certificate")
    security.add_argument("--cert", type=Path, metavar="FILE", help="this node's certificate (PEM), for mutual TLS")
    security.add_argument("--key", type=Path, metavar="FILE", help="this node's private key (PEM), for mutual TLS")
    security.add_argument("--token-file", type=Path, metavar="FILE",
                          help=f"file holding this node's token (default: ${TOKEN_ENV_VAR}); not needed with --cert")
    node = parser.add_argument_group("node")
    node.add_argument("--name", default=None,
                      help="name shown to the researcher (default: with --cert, the certificate's common name, which "
                           "is the node's id under mutual TLS; else the host name)")
    node.add_argument("--handler", choices=sorted(HANDLERS), default="train", help="what answers tasks (default: train)")
    node.add_argument("--auto-approve", action="store_true",
                      help="approve every training plan received, without review: FOR DEMOS ONLY (plans are "
                           "Python code that runs on this machine); the default requires `fednode plans approve`")
    add_home_options(parser)
    tuning = parser.add_argument_group("tuning")
    defaults = NodeConfig.__dataclass_fields__
    tuning.add_argument("--poll-wait", type=parse_seconds, default=30.0, metavar="SECONDS",
                        help="long-poll duration asked of the server (default: 30)")
    tuning.add_argument("--chunk-size", type=parse_size, default=1 << 20, metavar="BYTES",
                        help="upload chunk size, e.g. 1MiB (default: 1MiB; the server may lower it)")
    tuning.add_argument("--max-payload", type=parse_size, default=4 << 30, metavar="BYTES",
                        help="largest task payload accepted, e.g. 4GiB (default: 4GiB)")
    tuning.add_argument("--receive-pool", type=parse_size, default=1 << 30, metavar="BYTES",
                        help="idle download buffers kept for the next task, e.g. 512MiB; 0 turns reuse off. "
                             "Saves faulting in fresh memory every round, for as much more memory held between "
                             "rounds (default: 1GiB, i.e. a model up to 1 GiB is received in place)")
    tuning.add_argument("--receive-window", type=parse_receive_window, default="auto", metavar="auto|bdp|SIZE",
                        help="HTTP/2 receive window of downloads: how much of a task the server may send ahead of "
                             "what the node has read. auto (default): one chunk message fixed when the measured "
                             "round trip lets it move >= 1 GB/s (a LAN), else bandwidth-delay probing; bdp: always "
                             "probing (on a fast near link it grows to 16-33 MB held in memory); a size (>= 64KiB, "
                             "best >= one chunk message, e.g. 1088KiB) caps a download at SIZE per round trip")
    tuning.add_argument("--busy-upload-retry", type=parse_seconds, default=defaults["busy_upload_retry_seconds"].default,
                        metavar="SECONDS",
                        help="how long a result the server refuses as busy (its upload buffers all taken) is retried "
                             "before its task is reported FAILED; keep it above the server's parked-upload lifetime "
                             "(80 s with fedserver's defaults) (default: %(default)s)")
    tuning.add_argument("--queued-upload-retry", type=parse_seconds,
                        default=defaults["queued_upload_retry_seconds"].default, metavar="SECONDS",
                        help="how long a result waiting in the server's upload line (UPLOAD_QUEUED: the line moves, "
                             "the node keeps its place) is sent again before its task is reported FAILED "
                             "(default: %(default)s)")
    tuning.add_argument("--stop-grace", type=parse_grace_seconds, default=10.0, metavar="SECONDS",
                        help="after a stop signal, the time a running task gets to finish and upload its result "
                             "before it is told to stop and reported FAILED (default: 10)")
    parser.set_defaults(func=_start, usage_error=parser.error)


def check_option_combinations(args: argparse.Namespace) -> None:
    """Refuse ``fednode start`` options that cannot go together, naming the flags.

    Raises:
        NodeConfigError: TLS client files without TLS, half of --cert/--key, or no identity at all.
    """
    if args.insecure and (args.cert or args.key):
        raise NodeConfigError("--cert/--key need TLS: give --ca-cert instead of --insecure")
    if bool(args.cert) != bool(args.key):
        raise NodeConfigError("mutual TLS needs both --cert and --key")
    if not args.cert and _token_file(args) is None:
        raise NodeConfigError(f"the node needs an identity: give --token-file FILE (from `fedserver nodes enroll`) "
                              f"or --cert/--key for mutual TLS (or set ${TOKEN_ENV_VAR})")


def _token_file(args: argparse.Namespace) -> Path | None:
    if args.token_file is None and os.environ.get(TOKEN_ENV_VAR):
        return Path(os.environ[TOKEN_ENV_VAR])
    return args.token_file


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig that ``fednode start`` options describe (files are read later: :func:`_start`)."""
    check_option_combinations(args)
    tls = "insecure" if args.insecure else ("mtls" if args.cert else "tls")
    token_file = _token_file(args)
    return NodeConfig(
        server=args.server, tls=tls, ca_cert=args.ca_cert, client_cert=args.cert, client_key=args.key,
        token_file=token_file, node_name=args.name or _default_name(args), server_name_override=args.server_name,
        poll_wait_seconds=args.poll_wait, upload_chunk_size=args.chunk_size, max_payload_size=args.max_payload,
        stop_grace_seconds=args.stop_grace, receive_pool_bytes=args.receive_pool,
        receive_window_bytes=args.receive_window, busy_upload_retry_seconds=args.busy_upload_retry,
        queued_upload_retry_seconds=args.queued_upload_retry)


def _default_name(args: argparse.Namespace) -> str:
    """The certificate's common name with --cert (the id mutual TLS gives the node), else the host name."""
    common_name = certificate_common_name(args.cert) if args.cert else None
    return common_name or socket.gethostname()


def _datasets(n: int) -> str:
    return f"{n} dataset{'' if n == 1 else 's'}"


def _identity(config: NodeConfig) -> str:
    """How the node is known, for the banner: its id when it is known before Register (mutual TLS)."""
    if config.tls == "mtls":
        common_name = certificate_common_name(config.client_cert)
        if common_name:
            return f"node id {common_name!r} from its certificate, "
    return ""


def _start(args: argparse.Namespace) -> int:
    try:  # bad usage (exit 2) naming the flag, before anything is created or printed
        check_option_combinations(args)
    except NodeConfigError as exc:
        args.usage_error(str(exc))
    config = config_from_args(args)  # a value NodeConfig refuses (e.g. --server's port): exit 1
    try:
        warnings = check_start_files(config, "--token-file" if args.token_file is not None else f"${TOKEN_ENV_VAR}")
    except NodeConfigError as exc:
        args.usage_error(str(exc))
    setup = HANDLERS[args.handler](args)
    for line in [f"warning: {warning}" for warning in warnings] + setup.notices:
        print(f"fednode: {line}", file=sys.stderr)
    print(f"fednode: serving {config.server} as {config.node_name!r} ({_identity(config)}{config.tls}, handler "
          f"{args.handler}, {_datasets(len(setup.datasets))}); Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        asyncio.run(run_node(config, setup.handler, setup.datasets, setup.capabilities))
    except ServerRefusedError as exc:
        if not superseded(exc):
            raise
        print(f"fednode: stopped: another process of this node registered with the server {config.server} "
              f"(same token or certificate) and serves the node now; this one stops rather than compete for "
              f"its tasks. Run one fednode per node identity. Server: {log_text(exc.details)}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
