"""Where a node keeps its state: the node home directory and the ``node.db`` inside it.

The home is, in order: the path given (``--home``, before or after the command: after it wins), else
``$FEDNODE_HOME``, else ``./fednode-home``.
It holds ``node.db``, the SQLite database of the dataset registry and the plan approvals (one file, one
schema version, see :mod:`fednode.node_db`). The directory is created when the database is first opened,
by the commands that put something in it (``fednode dataset add``, ``fednode start``). Commands that touch
node state take ``--home DIR`` or ``--db FILE`` (:func:`add_home_options`); those that only read or change
what is there (list, show, remove, approve, reject) take :func:`existing_db_path_from_args`: a mistyped
``--home`` is bad usage naming the directory, not a fresh empty home that answers "no datasets registered".
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from fedcore.command_line import home_source
from fedcore.errors import NodeStoreError

__all__ = [
    "DB_FILENAME", "DEFAULT_HOME", "FILES_HELP", "HOME_ENV_VAR",
    "add_global_home_options", "add_home_options", "chosen_location", "db_path", "db_path_from_args",
    "existing_db_path_from_args", "missing_db_message", "node_home",
]

HOME_ENV_VAR = "FEDNODE_HOME"
DEFAULT_HOME = "fednode-home"
DB_FILENAME = "node.db"

#: The FILES / ENVIRONMENT part of the man-page-like help of commands that use the node home.
FILES_HELP = f"""\
files:
  HOME/{DB_FILENAME}   the node database (registered datasets, plan approvals), SQLite

environment:
  {HOME_ENV_VAR}   node home directory when --home is not given (default ./{DEFAULT_HOME})"""


def node_home(path: str | os.PathLike[str] | None = None) -> Path:
    """The node home: ``path`` if given, else ``$FEDNODE_HOME`` if set and non-empty, else ``./fednode-home``.

    Relative paths are resolved against the current directory, so the result is absolute.

    Raises:
        NodeStoreError: the path starts with ``~user`` and there is no such user.
    """
    what = "node home"
    if path is None or str(path) == "":
        what = f"node home ${HOME_ENV_VAR}" if os.environ.get(HOME_ENV_VAR) else what
        path = os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME
    return _expanded(path, what)


def _expanded(path: str | os.PathLike[str], what: str) -> Path:
    try:
        return Path(path).expanduser().absolute()
    except RuntimeError as exc:  # "Could not determine home directory.": ~user names no user here
        raise NodeStoreError(f"{what} {str(path)!r}: cannot expand '~' ({exc})") from None


def _path_option(text: str) -> str:
    """An argparse ``type`` for ``--home``/``--db``: a path whose ``~`` expands (else a usage error naming the
    flag, not a traceback)."""
    try:
        Path(text).expanduser()
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"cannot expand {text!r}: no user of that name on this machine") from None
    return text


def db_path(home: str | os.PathLike[str]) -> Path:
    """``node.db`` inside the node home ``home``."""
    return Path(home) / DB_FILENAME


def add_home_options(parser: argparse.ArgumentParser, *, existing: bool = False) -> None:
    """Add ``--home`` and ``--db`` to a (sub)command parser.

    Defaults are suppressed so that a command's ``--home``/``--db`` is told from one not given (then the
    top-level ones, :func:`add_global_home_options`, apply).
    ``existing``: the command needs a node database that exists (:func:`existing_db_path_from_args`); the
    parser's ``error`` is kept as ``args.usage_error`` to refuse a missing one (exit 2).
    """
    if existing:
        parser.set_defaults(usage_error=parser.error)
    group = parser.add_argument_group("node state")
    group.add_argument(
        "--home", metavar="DIR", default=argparse.SUPPRESS, type=_path_option,
        help=f"node home directory holding {DB_FILENAME} (default: ${HOME_ENV_VAR}, else ./{DEFAULT_HOME})",
    )
    group.add_argument(
        "--db", metavar="FILE", default=argparse.SUPPRESS, type=_path_option,
        help=f"node database file, overriding --home (default: HOME/{DB_FILENAME})",
    )


def add_global_home_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--home`` and ``--db`` to the top-level ``fednode`` parser, so they may come before the command.

    They are kept apart (``global_home``, ``global_db``) from the command's own: options given after the
    command replace those given before it, so a command's ``--home`` or ``--db`` wins over both global ones
    (:func:`chosen_location`).
    """
    parser.add_argument("--home", dest="global_home", metavar="DIR", default=None, type=_path_option,
                        help=f"node home directory holding {DB_FILENAME} (default: ${HOME_ENV_VAR}, else "
                             f"./{DEFAULT_HOME}); before or after the command (after it wins)")
    parser.add_argument("--db", dest="global_db", metavar="FILE", default=None, type=_path_option,
                        help=f"node database file, overriding --home (default: HOME/{DB_FILENAME}); before or "
                             f"after the command (after it wins)")


def chosen_location(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(home, db)`` as given on the command line: the command's own ``--home``/``--db`` if it was given
    either, else those given before the command (:func:`add_global_home_options`); None when not given."""
    home, db = getattr(args, "home", None), getattr(args, "db", None)
    if home or db:
        return home, db
    return getattr(args, "global_home", None), getattr(args, "global_db", None)


def db_path_from_args(args: argparse.Namespace) -> Path:
    """The node database chosen on the command line: ``--db``, else ``--home``/``$FEDNODE_HOME``/default."""
    home, db = chosen_location(args)
    if db:
        return _expanded(db, "node database")
    return db_path(node_home(home))


def existing_db_path_from_args(args: argparse.Namespace) -> Path:
    """:func:`db_path_from_args` for a command that reads or changes what the node database holds: it must
    exist. Otherwise nothing is created and ``args.usage_error`` (the subcommand parser's ``error``, set by
    ``add_home_options(parser, existing=True)``) exits 2 with :func:`missing_db_message`.
    """
    path = db_path_from_args(args)
    if not path.exists():
        _usage_error(args, missing_db_message(args, path))
    return path


def missing_db_message(args: argparse.Namespace, path: Path) -> str:
    """Why ``path`` (the node database chosen by ``args``, which does not exist) is refused, naming where the
    path came from and the commands that create a node home there."""
    given_home, given_db = chosen_location(args)
    if given_db:
        return (f"argument --db: no node database at {path}: check the path (`fednode dataset add NAME FILE "
                f"--db {shlex.quote(str(path))}` or `fednode start --db ...` creates one)")
    home = path.parent
    source, option = home_source(given_home, home, HOME_ENV_VAR)
    where = (f"no node home at {home} (no such directory)" if not home.exists()
             else f"{home} holds no {DB_FILENAME}, so it is no node home")
    return (f"{source}{where}: check the path, or create the home by registering a dataset "
            f"(`fednode dataset add NAME FILE{option}`) or starting the node (`fednode start{option} ...`)")


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    error = getattr(args, "usage_error", None)
    if error is None:  # a parser without add_home_options(existing=True): still refuse, still exit 2
        print(f"fednode: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    error(message)
    raise AssertionError("ArgumentParser.error returned")  # pragma: no cover - it exits
