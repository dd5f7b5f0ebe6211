"""``fedserver nodes enroll|list|revoke``: who may connect in token mode (and who is blocked in mTLS)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from fedcore.command_line import home_source
from fedcore.errors import UnknownNodeError
from fedserver.auth import NodeStore
from fedserver.home import FILES_HELP, HOME_ENV_VAR, add_home_option, home_from_args, nodes_db

_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Manage the nodes allowed to connect. In token mode (--tls tls or insecure) a node proves who it is
with the token printed by `enroll`; the server stores only the token's SHA-256, so a lost token cannot
be shown again: enrol the node again to issue a new one (the old token stops working at once). In
mutual-TLS mode the node's certificate is its identity, and `revoke` still blocks it.

commands:
  enroll ID    issue a token for node ID and print it once (also lifts a revocation)
  list         enrolled nodes: id, enrolment time, revoked or active
  revoke ID    block node ID's token (and certificate) from its next call on"""


def register(subparsers: Any) -> None:
    nodes = subparsers.add_parser("nodes", help="enroll, list and revoke nodes", description=DESCRIPTION,
                                  epilog=FILES_HELP, formatter_class=_RAW)
    add_home_option(nodes)
    sub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION", required=True)
    enroll = sub.add_parser("enroll", help="issue a token for a node and print it once",
                            description="Issue a new token for NODE_ID and print it on stdout (only once).",
                            epilog=FILES_HELP, formatter_class=_RAW)
    enroll.add_argument("node_id", metavar="NODE_ID", help="1-64 letters, digits, '.', '_' or '-'")
    enroll.add_argument("--quiet", "-q", action="store_true", help="print the token only (for scripts)")
    enroll.set_defaults(func=_enroll)
    listing = sub.add_parser("list", help="list enrolled nodes", description="List enrolled nodes.",
                             epilog=FILES_HELP, formatter_class=_RAW)
    listing.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="block a node", description="Block NODE_ID from its next call on.",
                            epilog=FILES_HELP, formatter_class=_RAW)
    revoke.add_argument("node_id", metavar="NODE_ID")
    revoke.set_defaults(func=_revoke)
    for parser in (enroll, listing, revoke):
        add_home_option(parser)
        parser.set_defaults(usage_error=parser.error)


def _store(args: argparse.Namespace) -> NodeStore:
    return NodeStore(nodes_db(home_from_args(args)))


def _enroll(args: argparse.Namespace) -> int:
    token = _store(args).enroll(args.node_id)
    if args.quiet:
        print(token)
    else:
        print(f"node {args.node_id} enrolled; its token (shown once, keep it secret):\n\n  {token}\n\n"
              "give it to the node's operator over a secure channel; the node sends it on every call as "
              "'authorization: Bearer <token>'")
    return 0


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _existing_home(args: argparse.Namespace) -> Path:
    """The server home of a command that only reads or changes enrolments (list, revoke): a home that does not
    exist (a mistyped --home or $FEDSERVER_HOME) is bad usage, exit 2, naming it; nothing is created."""
    home = home_from_args(args)
    if not home.is_dir():
        source, option = home_source(getattr(args, "home", None), home, HOME_ENV_VAR)
        args.usage_error(f"{source}no server home at {home} (no such directory): check the path, or create the "
                         f"home by enrolling a node (`fedserver{option} nodes enroll ID`) or making the project CA "
                         f"(`fedserver{option} certs init`)")
    return home


def _list(args: argparse.Namespace) -> int:
    path = nodes_db(_existing_home(args))
    if not path.exists():  # listing reads: it never creates a database (a home with certificates only: mTLS)
        print(f"no nodes enrolled: no node database at {path} (see `fedserver nodes enroll --help`)")
        return 0
    nodes = NodeStore(path).list()
    if not nodes:
        print("no nodes enrolled (see `fedserver nodes enroll --help`)")
        return 0
    width = max(7, *(len(n.node_id) for n in nodes))
    print(f"{'NODE ID':<{width}}  {'ENROLLED':<19}  STATUS")
    for node in nodes:
        status = "active" if node.active else f"revoked {_when(node.revoked_at)}"
        print(f"{node.node_id:<{width}}  {_when(node.enrolled_at):<19}  {status}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = nodes_db(_existing_home(args))
    if not path.exists():  # no enrolment to revoke: say so without creating the database
        raise UnknownNodeError(f"node {args.node_id!r} is not enrolled: no node database at {path} (see "
                               "`fedserver nodes enroll --help`)")
    NodeStore(path).revoke(args.node_id)
    print(f"node {args.node_id} revoked")
    return 0
