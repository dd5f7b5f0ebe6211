"""The node database ``node.db``: one SQLite file for the dataset registry and the plan approvals.

Both stores share one schema, versioned with ``PRAGMA user_version``: ``MIGRATIONS[v]`` takes the
database from version ``v - 1`` to ``v`` and runs once, inside an ``IMMEDIATE`` transaction, so two
processes opening a fresh file at once (the node and the operator's CLI) do not both migrate it. A
database newer than this code is refused rather than misread. WAL journaling lets the running node read
while the operator approves a plan; a busy timeout absorbs short write contention.

Connections are opened per operation (:func:`connect`) and closed at once: the stores are used from the
node's event loop, its worker threads and short CLI processes alike, and sqlite3 connections must not
cross threads.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedcore.errors import NodeStoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "connect", "transaction"]

#: Seconds a connection waits for a lock held by another process before failing.
BUSY_TIMEOUT_S = 10.0

#: Statements taking the schema from version ``i`` to ``i + 1`` (index 0 builds version 1).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # One row per registered dataset; tags, shapes as JSON arrays. ``path`` is absolute and local.
        """CREATE TABLE datasets (
            name        TEXT PRIMARY KEY,
            path        TEXT NOT NULL,
            format      TEXT NOT NULL CHECK (format IN ('csv', 'npz')),
            tags        TEXT NOT NULL,
            target      TEXT,
            dtype       TEXT NOT NULL,
            shape       TEXT NOT NULL,
            y_dtype     TEXT NOT NULL,
            y_shape     TEXT NOT NULL,
            num_samples INTEGER NOT NULL CHECK (num_samples >= 0),
            sha256      TEXT NOT NULL,
            size        INTEGER NOT NULL,
            mtime_ns    INTEGER NOT NULL,
            added_at    REAL NOT NULL
        )""",
        # One row per training plan source ever seen, keyed by the SHA-256 of its UTF-8 text.
        """CREATE TABLE plans (
            sha256       TEXT PRIMARY KEY CHECK (length(sha256) = 64),
            name         TEXT NOT NULL,
            origin       TEXT NOT NULL,
            source       TEXT NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
            note         TEXT NOT NULL DEFAULT '',
            submitted_at REAL NOT NULL,
            decided_at   REAL
        )""",
        "CREATE INDEX plans_status ON plans (status, submitted_at)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


@contextmanager
def connect(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """An autocommit connection to the node database at ``path``, migrated to :data:`SCHEMA_VERSION`.

    Creates the parent directory and the file if needed; closes the connection on exit. Use
    :func:`transaction` around statements that must apply together.

    Raises:
        NodeStoreError: the file is not an SQLite database, its schema is newer than this code, or
            SQLite fails (the message names the path).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise NodeStoreError(f"cannot open the node database {path}: {exc}") from exc
    try:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            _migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            raise NodeStoreError(f"node database {path} is unusable: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise NodeStoreError(f"node database {path}: {exc}") from exc
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    if _user_version(conn) == SCHEMA_VERSION:
        return
    with transaction(conn):
        version = _user_version(conn)  # re-read under the write lock: another process may have migrated
        if version > SCHEMA_VERSION:
            raise NodeStoreError(
                f"node database {path} has schema version {version} but this fednode knows versions up to "
                f"{SCHEMA_VERSION}: upgrade fednode, or point --home at another directory"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
