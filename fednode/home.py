"""Where a node keeps its state: the node home directory and the ``node.db`` inside it.

The home is, in order: the path given (``--home``), else ``$FEDNODE_HOME``, else ``./fednode-home``.
It holds ``node.db``, the SQLite database of the dataset registry and the plan approvals (one file, one
schema version, see :mod:`fednode.node_db`). The directory is created when the database is first opened.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DB_FILENAME", "DEFAULT_HOME", "HOME_ENV_VAR", "db_path", "node_home"]

HOME_ENV_VAR = "FEDNODE_HOME"
DEFAULT_HOME = "fednode-home"
DB_FILENAME = "node.db"


def node_home(path: str | os.PathLike[str] | None = None) -> Path:
    """The node home: ``path`` if given, else ``$FEDNODE_HOME`` if set and non-empty, else ``./fednode-home``.

    Relative paths are resolved against the current directory, so the result is absolute.
    """
    if path is None or str(path) == "":
        path = os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME
    return Path(path).expanduser().absolute()


def db_path(home: str | os.PathLike[str]) -> Path:
    """``node.db`` inside the node home ``home``."""
    return Path(home) / DB_FILENAME
