"""Outgoing payloads: a msgpack document cut into chunks without first joining it into one buffer.

A payload is encoded once (``Serializer.encode`` segments, arrays as views of their own memory), its
SHA-256 computed once, and then streamed as many times as needed — the researcher sends one encoded
global model to every node. Chunks that fall inside one segment are zero-copy memoryviews; only chunks
that straddle segment boundaries are small joined copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fedcore.errors import FramingError, PayloadSizeError
from fedcore.serialization import DEFAULT_LIMITS, Serializer, SerializerLimits
from fedcore.serialization.encoder import encode_map_entries, map_header

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: gRPC streams run at memory-copy speed with chunks this size


@dataclass(frozen=True)
class PayloadInfo:
    """Domain twin of the protobuf ``PayloadHeader``: size, digest and chunking of one payload."""

    total_size: int
    sha256: bytes
    chunk_size: int
    start_offset: int = 0

    def __post_init__(self) -> None:
        if self.total_size < 0:
            raise FramingError(f"payload total_size must be >= 0, got {self.total_size}")
        if len(self.sha256) != 32:
            raise FramingError(f"payload sha256 must be 32 bytes, got {len(self.sha256)}")
        if self.chunk_size <= 0:
            raise FramingError(f"payload chunk_size must be > 0, got {self.chunk_size}")
        if not 0 <= self.start_offset <= self.total_size:
            raise FramingError(f"start_offset {self.start_offset} outside the payload of {self.total_size} bytes")
        if self.start_offset % self.chunk_size and self.start_offset != self.total_size:
            raise FramingError(f"start_offset {self.start_offset} is not a multiple of chunk_size {self.chunk_size}")

    @property
    def chunk_count(self) -> int:
        """Chunks that follow the header: ceil((total_size - start_offset) / chunk_size)."""
        return -(-(self.total_size - self.start_offset) // self.chunk_size)


class OutgoingPayload:
    """An encoded document with its size and digest, ready to be streamed in chunks (repeatedly)."""

    def __init__(self, segments: list[Any], chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                 _hashed: tuple[Any, int] | None = None) -> None:
        if chunk_size <= 0:
            raise PayloadSizeError(f"chunk_size must be > 0, got {chunk_size}")
        views = [memoryview(s).cast("B") for s in segments]
        self._segments = [s for s in views if len(s)]
        self.chunk_size = chunk_size
        self.total_size = sum(len(s) for s in self._segments)
        # ``_hashed`` = (sha256 state over the first k segments, k): lets a shared prefix be hashed once.
        digest, done = (_hashed[0].copy(), _hashed[1]) if _hashed else (hashlib.sha256(), 0)
        for segment in views[done:]:
            digest.update(segment)
        self.sha256 = digest.digest()

    @classmethod
    def from_object(cls, obj: Any, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    limits: SerializerLimits = DEFAULT_LIMITS) -> OutgoingPayload:
        """Encode ``obj`` with the Serializer (no giant copy: array memory is streamed in place)."""
        return cls(Serializer.encode(obj, limits).segments, chunk_size)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> OutgoingPayload:
        """Wrap an already encoded document."""
        return cls([data], chunk_size)

    def info(self, start_offset: int = 0) -> PayloadInfo:
        """The header describing this payload when sending from ``start_offset``."""
        return PayloadInfo(self.total_size, self.sha256, self.chunk_size, start_offset)

    def iter_chunks(self, start_offset: int = 0) -> Iterator[tuple[int, memoryview | bytes]]:
        """Yield ``(offset, data)`` pairs of at most ``chunk_size`` bytes from ``start_offset`` to the end."""
        self.info(start_offset)  # validates the offset
        size = self.chunk_size
        offset = start_offset
        seg_index, seg_pos = self._locate(offset)
        segments = self._segments
        while offset < self.total_size:
            want = min(size, self.total_size - offset)
            seg = segments[seg_index]
            if len(seg) - seg_pos >= want:
                piece: memoryview | bytes = seg[seg_pos : seg_pos + want]
                seg_pos += want
            else:
                parts = []
                need = want
                while need:
                    seg = segments[seg_index]
                    take = min(need, len(seg) - seg_pos)
                    parts.append(seg[seg_pos : seg_pos + take])
                    seg_pos += take
                    need -= take
                    if seg_pos == len(seg) and need:
                        seg_index += 1
                        seg_pos = 0
                piece = b"".join(parts)
            if seg_pos == len(segments[seg_index]) and seg_index + 1 < len(segments):
                seg_index += 1
                seg_pos = 0
            yield offset, piece
            offset += want

    def tobytes(self) -> bytes:
        """The whole document as one ``bytes`` (one copy; for small payloads and tests)."""
        return b"".join(self._segments)

    def _locate(self, offset: int) -> tuple[int, int]:
        for index, seg in enumerate(self._segments):
            if offset < len(seg):
                return index, offset
            offset -= len(seg)
        return max(len(self._segments) - 1, 0), len(self._segments[-1]) if self._segments else 0


class SharedMapPayload:
    """Payloads that are msgpack maps sharing most of their entries (the global model) across receivers.

    The shared entries are encoded and hashed once; :meth:`build` adds one receiver's own entries (e.g.
    its Scaffold correction) and returns an :class:`OutgoingPayload` whose chunks of the shared part are
    views of the same memory for every receiver. Every receiver gets a complete, ordinary map.
    """

    def __init__(self, shared: dict[str, Any], own_keys: list[str], chunk_size: int = DEFAULT_CHUNK_SIZE,
                 limits: SerializerLimits = DEFAULT_LIMITS) -> None:
        overlap = sorted(set(shared) & set(own_keys))
        if overlap:
            raise FramingError(f"keys both shared and per-receiver: {overlap}")
        self.own_keys = list(own_keys)
        self.chunk_size = chunk_size
        self._limits = limits
        head = map_header(len(shared) + len(own_keys))
        body = encode_map_entries(shared, max_depth=limits.max_depth, base_offset=len(head))
        self._prefix = [head, *body.segments]
        self._prefix_size = len(head) + body.nbytes
        self._prefix_hash = hashlib.sha256()
        for segment in self._prefix:
            self._prefix_hash.update(segment)

    @property
    def shared_size(self) -> int:
        """Bytes of the shared part (map header included)."""
        return self._prefix_size

    def build(self, own: dict[str, Any]) -> OutgoingPayload:
        """The full payload for one receiver whose own entries are ``own`` (exactly ``own_keys``)."""
        if sorted(own) != sorted(self.own_keys):
            raise FramingError(f"per-receiver entries must be exactly {sorted(self.own_keys)}, got {sorted(own)}")
        own_doc = encode_map_entries(own, max_depth=self._limits.max_depth, base_offset=self._prefix_size)
        return OutgoingPayload([*self._prefix, *own_doc.segments], self.chunk_size,
                               _hashed=(self._prefix_hash, len(self._prefix)))
