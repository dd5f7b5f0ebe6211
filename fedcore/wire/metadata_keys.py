"""gRPC metadata keys of fedstream.v1 that both ends read or write (docs/protocol.md §2, §7)."""

from __future__ import annotations

REASON_METADATA_KEY = "fedstream-error-reason"
"""Trailing metadata key of every error status the server sends: the name of a ``fedstream.v1.ErrorReason``
value (``ERROR_REASON_TASK_CLOSED``, ...), which tells a node what to do without reading the message."""

INSTANCE_METADATA_KEY = "fedstream-instance-id"
"""Call metadata naming the node process on every call after Register (docs/protocol.md §2): the server refuses
calls of a process superseded by a newer one of the same node."""
