"""The server's upload byte budget counts the upload memory that is really alive, pooled blocks included."""

from __future__ import annotations

import asyncio
import gc
import hashlib

import pytest
from fake_node_service import arun

from fedcore.errors import ChunkOrderError, UploadsBusyError
from fedcore.framing import PayloadInfo
from fedserver.uploads import UploadSessions

MiB = 1 << 20


def _info(size: int) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(b"").digest(), MiB)


def _uploads(budget: int, pool_bytes: int) -> UploadSessions:
    return UploadSessions(max_payload_size=1 << 30, max_chunk_size=MiB, max_sessions=8,
                          max_buffered_bytes=budget, pool_bytes=pool_bytes)


def test_an_upload_restarted_from_offset_zero_reuses_its_parked_block() -> None:
    async def scenario() -> None:
        uploads = _uploads(3 * MiB, 1 << 30)  # room for one 2 MiB upload, not two
        parked = uploads.begin("t", "n", _info(2 * MiB))
        parked.assembler.add(0, bytes(MiB))  # half received, under one hash batch: nothing else holds it
        uploads.end(parked)  # the stream broke: parked for a resume
        del parked
        again = uploads.begin("t", "n", _info(2 * MiB))  # the node starts over instead
        assert again.assembler.reused, "the parked block was still alive: a second one was allocated"
        stats = uploads.pool.stats()
        assert (stats.allocated, stats.reused, stats.leased_blocks, stats.idle_blocks) == (1, 1, 1, 0), stats
        assert uploads.buffered_bytes == 2 * MiB

    arun(scenario())


def test_discarded_upload_bytes_count_until_its_buffer_really_dies() -> None:
    async def scenario() -> None:
        uploads = _uploads(3 * MiB, 0)
        session = uploads.begin("a", "n", _info(2 * MiB))
        reader = session.assembler.buffer[:MiB]  # e.g. a hashing job still reading it
        uploads.discard("a")  # the task closed (or the digest mismatched) meanwhile
        assert uploads.buffered_bytes == 2 * MiB
        with pytest.raises(UploadsBusyError, match="hold 2097152 bytes; 2097152 more exceed"):
            uploads.begin("b", "n", _info(2 * MiB))
        waiting = asyncio.ensure_future(uploads.wait_for_room("b", 2 * MiB, timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "the discarded buffer is alive: its bytes are still in memory"
        del reader
        assert await asyncio.wait_for(waiting, 1) is True
        assert uploads.buffered_bytes == 0
        uploads.begin("b", "n", _info(2 * MiB))

    arun(scenario())


def test_a_discarded_session_still_referenced_holds_no_bytes() -> None:
    async def scenario() -> None:
        uploads = _uploads(3 * MiB, 0)
        session = uploads.begin("a", "n", _info(2 * MiB))  # kept by a stream's frame or a traceback
        uploads.discard("a")
        assert uploads.buffered_bytes == 0, "the assembler let go of its buffer: nothing holds the bytes"
        uploads.begin("b", "n", _info(2 * MiB))
        with pytest.raises(ChunkOrderError, match="chunk at offset 0 of a transfer that was discarded"):
            session.assembler.add(0, bytes(MiB))
        with pytest.raises(ChunkOrderError, match="finishing of a transfer that was discarded"):
            session.assembler.finish()

    arun(scenario())


def test_a_discarded_parked_session_is_credited_at_once() -> None:
    async def scenario() -> None:
        uploads = _uploads(3 * MiB, 0)
        uploads.end(uploads.begin("a", "n", _info(2 * MiB)))
        gc.collect()
        uploads.discard("a")
        assert uploads.buffered_bytes == 0
        uploads.begin("b", "n", _info(2 * MiB))

    arun(scenario())
