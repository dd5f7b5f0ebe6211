"""BufferPool: a block is handed out again only once nothing references what was handed out; bounded; threads."""

from __future__ import annotations

import gc
import hashlib
import random
import threading
import weakref

import numpy as np
import pytest

from fedcore.errors import FramingError
from fedcore.framing import BufferPool, ChunkAssembler, PayloadInfo, memory
from fedcore.framing.buffer_pool import MIN_BLOCK, block_capacity
from fedcore.serialization import Serializer

MiB = 1 << 20


def address(buffer: np.ndarray) -> int:
    return buffer.ctypes.data


def taken(pool: BufferPool, size: int, **kwargs) -> tuple[np.ndarray, int]:
    """A leased buffer filled with a known pattern, and its address."""
    buffer = pool.take(size, **kwargs).buffer
    buffer[:] = 7
    return buffer, address(buffer)


def test_a_block_is_reused_once_the_buffer_and_its_views_are_gone() -> None:
    pool = BufferPool(64 * MiB)
    first = pool.take(4 * MiB)
    assert first.buffer.shape == (4 * MiB,) and first.buffer.flags.writeable and not first.reused
    view = first.buffer[10:20]
    where = address(first.buffer)
    del first
    gc.collect()
    assert pool.stats().idle_blocks == 0, "a view is alive: the block is still leased"
    del view
    assert pool.stats().idle_bytes == 4 * MiB
    again = pool.take(4 * MiB)
    assert again.reused and address(again.buffer) == where
    stats = pool.stats()
    assert (stats.reused, stats.allocated, stats.leased_blocks, stats.idle_blocks) == (1, 1, 1, 0)


def _views(buffer: np.ndarray) -> dict[str, object]:
    """Every way a decoded array or a plan may hold on to the buffer's memory."""
    torch = pytest.importorskip("torch")
    view = buffer[MiB:]
    return {
        "view": buffer[100:200],
        "view of a view": view[5:50],
        "reinterpreted view": buffer[: 4 * 1000].view(np.float32).reshape(10, 100),
        "memoryview slice": memoryview(buffer)[64:128],
        "frombuffer of a memoryview": np.frombuffer(memoryview(buffer)[256:512], dtype=np.float64),
        "torch.from_numpy": torch.from_numpy(view[1000:2000]),
    }


@pytest.mark.parametrize("kind", ["view", "view of a view", "reinterpreted view", "memoryview slice",
                                  "frombuffer of a memoryview", "torch.from_numpy"])
def test_a_block_is_never_handed_out_while_anything_derived_from_it_lives(kind: str) -> None:
    pool = BufferPool(64 * MiB)
    buffer, where = taken(pool, 4 * MiB)
    kept = _views(buffer)[kind]
    snapshot = bytes(memoryview(np.asarray(kept)).cast("B"))
    del buffer
    gc.collect()
    fresh, fresh_at = taken(pool, 4 * MiB)
    assert fresh_at != where and pool.stats().reused == 0
    fresh[:] = 0xEE  # writing the new buffer must not change what the old holder sees
    assert bytes(memoryview(np.asarray(kept)).cast("B")) == snapshot
    del kept, fresh
    gc.collect()
    assert pool.stats().idle_blocks == 2


def test_decoded_arrays_keep_the_block_and_stay_unchanged_when_the_next_payload_arrives() -> None:
    pool = BufferPool(256 * MiB)
    params = {"w": np.arange(2_000_000, dtype=np.float32), "b": np.ones(10, np.float32)}

    def receive(doc: dict) -> tuple[ChunkAssembler, dict]:
        data = Serializer.dumps(doc)
        info = PayloadInfo(len(data), hashlib.sha256(data).digest(), MiB)
        asm = ChunkAssembler(info, max_payload_size=1 << 30, max_chunk_size=MiB, pool=pool)
        for offset in range(0, len(data), MiB):
            asm.add(offset, data[offset : offset + MiB])
        return asm, asm.decode()

    asm, decoded = receive({"params": params, "round": 1})
    assert not asm.reused and asm.held_bytes == asm.info.total_size
    kept = decoded["params"]["w"]  # a plan keeps one array: the whole block stays leased
    del asm, decoded
    gc.collect()
    second, decoded2 = receive({"params": {k: -v for k, v in params.items()}, "round": 2})
    assert not second.reused, "the first payload's array is alive"
    np.testing.assert_array_equal(kept, params["w"])
    del kept, second, decoded2
    gc.collect()
    third, decoded3 = receive({"params": params, "round": 300})  # a few bytes longer: fits the headroom
    assert third.reused
    np.testing.assert_array_equal(decoded3["params"]["w"], params["w"])


def test_idle_blocks_beyond_the_cap_are_released_least_recently_returned_first() -> None:
    pool = BufferPool(10 * MiB)
    leases = [pool.take(4 * MiB).buffer for _ in range(3)]
    addresses = [address(b) for b in leases]
    for i in range(3):
        leases[i] = None  # returned in order 0, 1, 2
    stats = pool.stats()
    assert (stats.idle_bytes, stats.idle_blocks, stats.released) == (8 * MiB, 2, 1)
    kept = {address(pool.take(4 * MiB).buffer) for _ in range(1)}
    assert kept <= set(addresses[1:]), "block 0, returned first, was the one released"


def test_a_block_larger_than_the_cap_is_never_kept_and_zero_turns_pooling_off() -> None:
    small = BufferPool(2 * MiB)
    buffer = small.take(4 * MiB).buffer
    del buffer
    assert small.stats().idle_bytes == 0 and small.stats().released == 1
    off = BufferPool(0)
    for _ in range(3):
        lease = off.take(4 * MiB)
        assert not lease.reused and lease.held_bytes == 4 * MiB
        del lease
    assert off.stats() == small.stats().__class__(0, 0, 0, 0, 0, 0)


def test_best_fit_by_size_within_the_allowed_waste() -> None:
    pool = BufferPool(64 * MiB)
    four, eight = pool.take(4 * MiB).buffer, pool.take(8 * MiB).buffer
    at4, at8 = address(four), address(eight)
    del four, eight
    assert block_capacity(4 * MiB) > 4 * MiB
    assert address(pool.take(4 * MiB - 4096).buffer) == at4, "smallest block holding it"
    assert address(pool.take(4 * MiB + 1000).buffer) == at4, "a few bytes more fit the headroom"
    assert address(pool.take(7 * MiB + 512 * 1024).buffer) == at8  # wastes < 1/8 of the 8 MiB block
    five = pool.take(5 * MiB)
    assert not five.reused and address(five.buffer) not in (at4, at8), "5 MiB would waste > 1/8 of 8 MiB"


def test_a_smaller_payload_in_a_reused_block_counts_the_block_footprint() -> None:
    pool = BufferPool(64 * MiB)
    pool.take(8 * MiB)  # leased and returned at once
    lease = pool.take(7 * MiB + 600 * 1024)
    assert lease.reused and lease.held_bytes == 8 * MiB  # its pages still hold 8 MiB
    del lease
    assert pool.idle_bytes == 8 * MiB


def test_room_releases_idle_blocks_before_a_fresh_allocation() -> None:
    pool = BufferPool(64 * MiB)
    pool.take(8 * MiB)  # leased and returned at once
    assert pool.idle_bytes == 8 * MiB
    lease = pool.take(4 * MiB, room=10 * MiB)  # 4 new + 8 idle > 10: the idle block goes
    assert not lease.reused and pool.stats().idle_bytes == 0 and pool.stats().released == 1
    del lease
    reused = pool.take(4 * MiB, room=4 * MiB)  # the block itself is the room it needs
    assert reused.reused


def test_small_requests_bypass_the_pool() -> None:
    pool = BufferPool(64 * MiB)
    for _ in range(2):
        lease = pool.take(MIN_BLOCK - 1)
        assert not lease.reused and lease.buffer.shape == (MIN_BLOCK - 1,)
        del lease
    assert pool.take(0).buffer.shape == (0,)
    assert pool.stats().idle_blocks == 0 and pool.stats().allocated == 0


def test_trim_releases_idle_blocks() -> None:
    pool = BufferPool(64 * MiB)
    buffers = [pool.take(4 * MiB).buffer for _ in range(3)]
    del buffers
    pool.trim(5 * MiB)
    assert pool.idle_bytes == 4 * MiB
    pool.trim()
    assert pool.idle_bytes == 0


@pytest.mark.parametrize("bad", [{"max_idle_bytes": -1}, {"max_idle_bytes": 1.5}, {"max_idle_bytes": True},
                                 {"max_idle_bytes": 1, "min_block_bytes": 0},
                                 {"max_idle_bytes": 1, "max_waste": 1.0}])
def test_bad_settings_are_refused(bad: dict) -> None:
    name = next(k for k in bad if k != "max_idle_bytes") if len(bad) > 1 else "max_idle_bytes"
    with pytest.raises(FramingError, match=name):
        BufferPool(**bad)
    with pytest.raises(FramingError, match="buffer size must be an int >= 0, got -1"):
        BufferPool(1).take(-1)


def test_threads_never_share_a_live_block() -> None:
    pool = BufferPool(24 * MiB, min_block_bytes=64 * 1024)
    sizes = [64 * 1024, 200 * 1024, 1 * MiB, 2 * MiB]
    errors: list[str] = []
    keep: list[np.ndarray] = []  # some views outlive their task, as a plan's arrays may
    keep_lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(150):
            buffer = pool.take(rng.choice(sizes)).buffer
            mark = (seed * 31 + i) % 251
            buffer[:] = mark
            if i % 7 == 0:
                with keep_lock:
                    keep.append(buffer[: 4096])
                    if len(keep) > 6:
                        old = keep.pop(0)
                        if not (old == old[0]).all():
                            errors.append("a kept view changed")
            threading.Event().wait(rng.random() / 2000)
            if not (buffer == mark).all():
                errors.append(f"thread {seed}: buffer overwritten while leased")
            del buffer

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    keep.clear()
    gc.collect()
    stats = pool.stats()
    assert stats.leased_blocks == 0 and stats.idle_bytes <= 24 * MiB and stats.reused > 0


def test_a_failed_allocation_leaves_no_lease_counted() -> None:
    pool = BufferPool(64 * MiB)
    with pytest.raises(MemoryError):
        pool.take(1 << 60)  # 1 EiB: numpy cannot allocate it
    stats = pool.stats()
    assert (stats.leased_blocks, stats.allocated, stats.reused) == (0, 0, 0), stats
    lease = pool.take(2 * MiB)
    del lease
    assert pool.stats().idle_blocks == 1 and pool.stats().leased_blocks == 0


@pytest.mark.skipif(memory._madvise is None, reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")
def test_a_block_evicted_while_its_prefault_waits_is_unmapped_at_once() -> None:
    gate = threading.Event()
    memory._prefault_pool().submit(gate.wait, 30)  # the single prefault worker is busy: jobs queue behind it
    try:
        pool = BufferPool(256 * MiB)
        lease = pool.take(64 * MiB)
        block = weakref.ref(lease.buffer.base.obj)  # the pool's block array behind the lease
        del lease
        assert pool.stats().idle_blocks == 1
        pool.trim(0)
        assert block() is None, "the queued prefault job kept the evicted block mapped"
        fresh = memory.receive_buffer(64 * MiB)
        unpooled = weakref.ref(fresh)
        del fresh
        assert unpooled() is None, "the queued prefault job kept a dropped receive buffer mapped"
    finally:
        gate.set()
    memory._prefault_pool().submit(lambda: None).result(timeout=60)
