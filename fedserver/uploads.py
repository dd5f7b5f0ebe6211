"""Result uploads in progress, keyed by task id, resumable from the last acknowledged offset.

Each session holds one :class:`~fedcore.framing.ChunkAssembler` (one preallocated buffer). Limits are
checked on the announced header before the buffer exists: payload size and chunk size against the
server's maxima, and the number of sessions holding a buffer (running or waiting for a resume) against
``max_sessions``. A broken stream leaves its session parked: ``acknowledged(task_id)`` says where to
resume, and an UploadResult whose header starts there continues into the same buffer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedcore.errors import ChunkOrderError, LimitExceededError, UploadConflictError
from fedcore.framing import ChunkAssembler, PayloadInfo


@dataclass
class UploadSession:
    task_id: str
    node_id: str
    assembler: ChunkAssembler
    active: bool = True  # a stream is writing into it now
    started_at: float = field(default_factory=time.monotonic)

    @property
    def received(self) -> int:
        return self.assembler.received


class UploadSessions:
    """Open upload sessions and the limits that bound them."""

    def __init__(self, *, max_payload_size: int, max_chunk_size: int, max_sessions: int) -> None:
        self.max_payload_size = max_payload_size
        self.max_chunk_size = max_chunk_size
        self.max_sessions = max_sessions
        self._sessions: dict[str, UploadSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def check_limits(self, info: PayloadInfo) -> None:
        """Refuse a header over the configured limits (before anything is allocated)."""
        if info.total_size > self.max_payload_size:
            raise LimitExceededError(
                f"announced payload of {info.total_size} bytes exceeds this server's limit of "
                f"{self.max_payload_size} bytes")
        if info.chunk_size > self.max_chunk_size:
            raise LimitExceededError(
                f"announced chunk size of {info.chunk_size} bytes exceeds this server's limit of "
                f"{self.max_chunk_size} bytes")

    def begin(self, task_id: str, node_id: str, info: PayloadInfo) -> UploadSession:
        """Start (``start_offset`` 0) or resume (``start_offset`` = acknowledged offset) an upload."""
        self.check_limits(info)
        existing = self._sessions.get(task_id)
        if existing is not None and existing.active:
            raise UploadConflictError(f"an upload for task {task_id} is already running; retry when it ends")
        if info.start_offset > 0:
            if existing is None:
                raise ChunkOrderError(
                    f"cannot resume the upload of task {task_id} at offset {info.start_offset}: the server "
                    "holds no bytes of it (GetUploadStatus says 0); start again at offset 0")
            existing.assembler.resume(info)
            existing.active = True
            return existing
        if existing is not None:
            del self._sessions[task_id]  # a fresh start replaces the parked bytes
        if len(self._sessions) >= self.max_sessions:
            raise LimitExceededError(
                f"too many concurrent uploads ({len(self._sessions)}, limit {self.max_sessions}); "
                "retry later")
        assembler = ChunkAssembler(info, max_payload_size=self.max_payload_size,
                                   max_chunk_size=self.max_chunk_size)
        session = self._sessions[task_id] = UploadSession(task_id, node_id, assembler)
        return session

    def end(self, session: UploadSession) -> None:
        """The stream writing into ``session`` ended (the session stays for a resume)."""
        session.active = False

    def discard(self, task_id: str) -> None:
        """Forget the session (completed, digest mismatch, task closed); its buffer is freed."""
        self._sessions.pop(task_id, None)

    def session(self, task_id: str) -> UploadSession | None:
        return self._sessions.get(task_id)

    def acknowledged(self, task_id: str) -> int:
        """Contiguous bytes received and kept for ``task_id`` (0 when there is no session)."""
        session = self._sessions.get(task_id)
        return 0 if session is None else session.received
