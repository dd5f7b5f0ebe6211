"""Who is calling: node identity from the connection, and the enrolled-node store behind tokens.

Identity never comes from a request field. With ``tls="mtls"`` it is the common name of the client
certificate (which the TLS handshake has already checked against the project CA); otherwise every call
carries the metadata entry ``authorization: Bearer <token>`` and the token is looked up in the
:class:`NodeStore`. The store keeps only the SHA-256 of each token, so a copy of the database does not
let anyone impersonate a node. Revoking a node blocks its token and, in mTLS mode, its certificate.

Which *process* of a node is calling travels beside the identity: the metadata entry
``fedstream-instance-id`` (:data:`INSTANCE_METADATA_KEY`, read by :func:`call_instance_id`) carries the
``instance_id`` the process registers with, so the server can refuse the calls of a process that a newer
process of the same node replaced (:meth:`fedserver.registry.NodeRegistry.check_instance`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import AuthenticationError, ServerConfigError, UnknownNodeError
from fedcore.wire import INSTANCE_METADATA_KEY
from fedcore.wire.convert import check_instance_id
from fedserver.config import TlsMode

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PREFIX = "fsn1_"  # makes leaked tokens greppable (secret scanners) and versions the format
_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id      TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at  REAL NOT NULL,
    revoked_at   REAL
);
"""


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a valid node id (letters, digits, ``.``, ``_``, ``-``; 1-64 chars)."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise ServerConfigError(
            f"invalid node id {node_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit")
    return node_id


def call_instance_id(context: Any) -> str:
    """The node process's instance id from the call metadata (``context`` is a ``grpc.aio.ServicerContext``),
    "" when the call carries none (an older node). Raises MessageError (INVALID_ARGUMENT) for a value that is
    not at most 64 characters of ``[0-9A-Za-z_.-]``, the rule of ``RegisterRequest.instance_id``."""
    for key, value in context.invocation_metadata() or ():
        if key == INSTANCE_METADATA_KEY:
            check_instance_id(value, f"metadata {INSTANCE_METADATA_KEY!r}")
            return value
    return ""


def token_digest(token: str) -> str:
    """Hex SHA-256 of a token, the only form the store keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EnrolledNode:
    """One row of the node store (Unix timestamps)."""

    node_id: str
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class NodeStore:
    """Enrolled nodes in a SQLite file: ``enroll`` issues a token, ``lookup`` checks one, ``revoke`` ends it.

    Writes open their own short connection, so the CLI and a running server can share the file. The
    checks made on every call (:meth:`lookup`, :meth:`is_revoked`) answer from a cache kept on one
    long-lived read connection and emptied whenever ``PRAGMA data_version`` says that anyone (this
    object, the CLI, another process) committed to the file: a revocation still counts from the very
    next call, and a thousand nodes polling cost a dictionary look-up each, not a SQLite connection.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServerConfigError(f"cannot create the folder of the node store {self.path}: {exc}") from None
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
            conn.execute("SELECT node_id, token_sha256, enrolled_at, revoked_at FROM nodes LIMIT 0")  # ours?
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._seen_version: int | None = None
        self._active: dict[str, str] = {}  # token SHA-256 -> id of the active node holding it
        self._revoked: dict[str, bool] = {}  # enrolled node id -> revoked?

    def close(self) -> None:
        """Close the read connection (the store reopens it if used again)."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
                self._seen_version = None

    def _cached_reader(self) -> sqlite3.Connection:
        """The read connection, the caches emptied first if the file changed since the last call."""
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            self._active.clear()
            self._revoked.clear()
            self._seen_version = version
        return self._reader

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._sqlite_errors():
            conn = sqlite3.connect(self.path, timeout=10.0)
            try:
                with conn:  # one transaction, committed on success
                    yield conn
            finally:
                conn.close()

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """A node store that is not one (a directory, another SQLite file, damaged) as a ServerConfigError."""
        try:
            yield
        except sqlite3.Error as exc:
            raise ServerConfigError(f"node store {self.path} is unusable ({type(exc).__name__}: {exc}); "
                                    "expected the nodes.db `fedserver nodes enroll` writes") from None

    def enroll(self, node_id: str) -> str:
        """Issue a new token for ``node_id`` and return it (shown once, never stored in clear).

        Enrolling a node again replaces its token (the old one stops working) and lifts a revocation.
        """
        return self.enroll_many([node_id])[node_id]

    def enroll_many(self, node_ids: list[str]) -> dict[str, str]:
        """:meth:`enroll` each of ``node_ids`` in one transaction (one commit for a thousand nodes)."""
        for node_id in node_ids:
            check_node_id(node_id)
        tokens = {node_id: TOKEN_PREFIX + secrets.token_urlsafe(32) for node_id in node_ids}
        now = time.time()
        with self._connect() as conn:
            conn.executemany(
                "INSERT INTO nodes (node_id, token_sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, NULL) "
                "ON CONFLICT(node_id) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                "enrolled_at = excluded.enrolled_at, revoked_at = NULL",
                [(node_id, token_digest(token), now) for node_id, token in tokens.items()])
        return tokens

    def revoke(self, node_id: str) -> None:
        """Block ``node_id``'s token (and certificate in mTLS mode) until it is enrolled again."""
        with self._connect() as conn:
            cur = conn.execute("UPDATE nodes SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
                               (time.time(), node_id))
            if cur.rowcount == 0 and self.get(node_id) is None:
                raise UnknownNodeError(f"node {node_id!r} is not enrolled (see `fedserver nodes list`)")

    def lookup(self, token: str) -> str | None:
        """The id of the active node holding ``token``, or None."""
        digest = token_digest(token)
        with self._lock, self._sqlite_errors():
            reader = self._cached_reader()
            node_id = self._active.get(digest)
            if node_id is None:
                row = reader.execute("SELECT node_id FROM nodes WHERE token_sha256 = ? AND revoked_at IS NULL",
                                     (digest,)).fetchone()
                if row is None:
                    return None  # unknown tokens are not cached: a flood of them cannot grow the cache
                node_id = self._active[digest] = row[0]
        return node_id

    def get(self, node_id: str) -> EnrolledNode | None:
        with self._connect() as conn:
            row = conn.execute("SELECT node_id, enrolled_at, revoked_at FROM nodes WHERE node_id = ?",
                               (node_id,)).fetchone()
        return EnrolledNode(*row) if row else None

    def is_revoked(self, node_id: str) -> bool:
        """Whether ``node_id`` is enrolled and revoked (an unknown node is not revoked)."""
        with self._lock, self._sqlite_errors():
            reader = self._cached_reader()
            revoked = self._revoked.get(node_id)
            if revoked is None:
                row = reader.execute("SELECT revoked_at FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
                if row is None:
                    return False
                revoked = self._revoked[node_id] = row[0] is not None
        return revoked

    def list(self) -> list[EnrolledNode]:
        """Every enrolled node, revoked ones included, by id."""
        with self._connect() as conn:
            rows = conn.execute("SELECT node_id, enrolled_at, revoked_at FROM nodes ORDER BY node_id").fetchall()
        return [EnrolledNode(*row) for row in rows]


class Authenticator:
    """Derive the calling node's id from a gRPC call context, or raise :class:`AuthenticationError`."""

    def __init__(self, mode: TlsMode, store: NodeStore | None) -> None:
        if mode != "mtls" and store is None:
            raise ServerConfigError(f"tls={mode!r} authenticates nodes by token and needs a NodeStore")
        self.mode = mode
        self.store = store

    def identify(self, context: Any) -> str:
        """The node id of the caller (``context`` is a ``grpc.aio.ServicerContext``)."""
        if self.mode == "mtls":
            return self._from_certificate(context)
        return self._from_token(context)

    def _from_certificate(self, context: Any) -> str:
        auth = context.auth_context()
        names = auth.get("x509_common_name") or []
        if not names:
            raise AuthenticationError("no client certificate: this server requires mutual TLS")
        node_id = names[0].decode("utf-8", "replace")
        if not NODE_ID_RE.fullmatch(node_id):
            raise AuthenticationError(f"client certificate common name {node_id!r} is not a valid node id")
        if self.store is not None and self.store.is_revoked(node_id):
            raise AuthenticationError(f"node {node_id!r} is revoked")
        return node_id

    def _from_token(self, context: Any) -> str:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if not values:
            raise AuthenticationError("missing metadata 'authorization: Bearer <token>' "
                                      "(get a token with `fedserver nodes enroll <node-id>`)")
        scheme, _, token = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("authorization metadata must read 'Bearer <token>'")
        assert self.store is not None
        node_id = self.store.lookup(token.strip())
        if node_id is None:
            raise AuthenticationError("unknown or revoked node token")
        return node_id
