"""``fedserver certs init|server|node``: the project CA and the certificates signed by it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedserver.certs import (
    CA_NAME,
    SERVER_NAME,
    CertificateBundle,
    create_ca,
    create_node_certificate,
    create_server_certificate,
)
from fedserver.home import FILES_HELP, add_home_option, certs_dir, home_from_args

_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Create the certificates of a federation, with ECDSA P-256 keys:

  init          a project certificate authority (CA): DIR/ca.crt and DIR/ca.key
  server        the server certificate signed by the CA: DIR/server.crt, DIR/server.key, valid for
                localhost, 127.0.0.1, ::1 and every --host (the names nodes dial)
  node ID       a node certificate signed by the CA, common name ID: DIR/nodes/ID.crt, .key
                (mutual TLS: the server identifies the node by this name)

Every node needs DIR/ca.crt to check the server; with mutual TLS it also needs its own ID.crt and
ID.key. Send keys over a secure channel. DIR is --dir, else HOME/certs."""


def register(subparsers: Any) -> None:
    certs = subparsers.add_parser("certs", help="create the project CA, server and node certificates",
                                  description=DESCRIPTION, epilog=FILES_HELP, formatter_class=_RAW)
    add_home_option(certs)
    sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="create the project CA", formatter_class=_RAW, epilog=FILES_HELP,
                          description="Create a self-signed project CA (DIR/ca.crt, DIR/ca.key).")
    init.add_argument("--name", default="fedstream project CA", help="common name of the CA (default: %(default)s)")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default: %(default)s)")
    init.set_defaults(func=_init)
    server = sub.add_parser("server", help="create the server certificate", formatter_class=_RAW,
                            epilog=FILES_HELP,
                            description="Create the server certificate, signed by the CA in DIR.")
    server.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP address nodes use to reach the server (repeatable)")
    server.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    server.set_defaults(func=_server)
    node = sub.add_parser("node", help="create a node certificate (mutual TLS)", formatter_class=_RAW,
                          epilog=FILES_HELP,
                          description="Create a client certificate whose common name is NODE_ID.")
    node.add_argument("node_id", metavar="NODE_ID", help="1-64 letters, digits, '.', '_' or '-'")
    node.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    node.set_defaults(func=_node)
    for parser in (init, server, node):
        add_home_option(parser)
        parser.add_argument("--dir", type=Path, default=None, help="certificate directory (default: HOME/certs)")
        parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _dir(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else certs_dir(home_from_args(args))


def _init(args: argparse.Namespace) -> int:
    cert, key = create_ca(args.name, args.days).write(_dir(args), CA_NAME, overwrite=args.force)
    print(f"CA written: {cert} (give to every node) and {key} (secret)")
    return 0


def _server(args: argparse.Namespace) -> int:
    folder = _dir(args)
    ca = CertificateBundle.load(folder, CA_NAME)
    cert, key = create_server_certificate(ca, args.host, args.days).write(folder, SERVER_NAME, overwrite=args.force)
    print(f"server certificate written: {cert}, {key}")
    return 0


def _node(args: argparse.Namespace) -> int:
    folder = _dir(args)
    ca = CertificateBundle.load(folder, CA_NAME)
    cert, key = create_node_certificate(ca, args.node_id, args.days).write(
        folder / "nodes", args.node_id, overwrite=args.force)
    print(f"node certificate written: {cert}, {key}; the node also needs {folder / 'ca.crt'}")
    return 0
