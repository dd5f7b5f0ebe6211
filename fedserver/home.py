"""Where the researcher's server keeps its state: the server home directory and what lives in it.

The home is, in order: ``--home DIR``, else ``$FEDSERVER_HOME``, else ``./fedserver-home``. It holds
``nodes.db`` (enrolled nodes and token digests, :class:`fedserver.auth.NodeStore`) and ``certs/`` (the
project CA, the server certificate and node certificates made by ``fedserver certs``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HOME_ENV_VAR = "FEDSERVER_HOME"
DEFAULT_HOME = "fedserver-home"
NODES_DB = "nodes.db"
CERTS_DIR = "certs"

#: The FILES / ENVIRONMENT part of the man-page-like help of commands that use the server home.
FILES_HELP = f"""\
files:
  HOME/{NODES_DB}                       enrolled nodes: id, SHA-256 of the token, enrolment, revocation
  HOME/{CERTS_DIR}/ca.crt, ca.key           the project CA (keep ca.key offline once nodes have certificates)
  HOME/{CERTS_DIR}/server.crt, server.key   the server certificate (SAN localhost, 127.0.0.1, ::1, --host)
  HOME/{CERTS_DIR}/nodes/ID.crt, ID.key     node certificates for mutual TLS (common name = node id)
  private keys are written with mode 0600 and never overwritten without --force

environment:
  {HOME_ENV_VAR}   server home directory when --home is not given (default ./{DEFAULT_HOME})"""


def server_home(path: str | os.PathLike[str] | None = None) -> Path:
    """``path`` if given, else ``$FEDSERVER_HOME`` if set and non-empty, else ``./fedserver-home`` (absolute)."""
    if path is None or str(path) == "":
        path = os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME
    return Path(path).expanduser().absolute()


def nodes_db(home: Path) -> Path:
    return home / NODES_DB


def certs_dir(home: Path) -> Path:
    return home / CERTS_DIR


def add_home_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--home`` (default suppressed so a top-level ``--home`` is not overwritten)."""
    parser.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"server home directory (default: ${HOME_ENV_VAR}, else ./{DEFAULT_HOME})")


def home_from_args(args: argparse.Namespace) -> Path:
    return server_home(getattr(args, "home", None))
