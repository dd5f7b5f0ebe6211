"""Chunk framing shared by both sides: cut an encoded payload into chunks, assemble and verify them."""

from fedcore.framing.assembler import ChunkAssembler, assemble
from fedcore.framing.buffer_pool import BufferPool, Lease, PoolStats
from fedcore.framing.payload import DEFAULT_CHUNK_SIZE, OutgoingPayload, PayloadInfo, SharedMapPayload

__all__ = ["DEFAULT_CHUNK_SIZE", "BufferPool", "ChunkAssembler", "Lease", "OutgoingPayload", "PayloadInfo", "PoolStats",
           "SharedMapPayload", "assemble"]
