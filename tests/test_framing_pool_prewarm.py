"""BufferPool.prewarm: a block faulted in before the first transfer, handed out to it like any idle block."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import FramingError
from fedcore.framing import BufferPool, memory

MiB = 1 << 20


def _drain_prefault() -> None:
    memory._prefault_pool().submit(int).result(timeout=60)  # one worker: jobs run in order


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_the_first_take_after_a_prewarm_reuses_the_block() -> None:
    pool = BufferPool(256 * MiB)
    assert pool.prewarm(40 * MiB)
    stats = pool.stats()
    assert (stats.idle_blocks, stats.idle_bytes, stats.allocated, stats.reused) == (1, 40 * MiB, 1, 0)
    lease = pool.take(40 * MiB + 12345)  # next round's payload is a few bytes longer: it still fits
    assert lease.reused and lease.held_bytes == 40 * MiB + 12345
    assert pool.stats().allocated == 1 and pool.stats().reused == 1
    data = np.random.default_rng(0).integers(0, 256, lease.buffer.size, dtype=np.uint8)
    lease.buffer[:] = data  # an ordinary writable buffer, whatever the prefault worker is doing
    _drain_prefault()
    assert np.array_equal(lease.buffer, data)


@pytest.mark.skipif(memory._madvise is None, reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")
def test_a_prewarmed_block_is_resident_before_anything_writes_it() -> None:
    pool = BufferPool(1 << 30)
    _drain_prefault()
    before = _rss()
    assert pool.prewarm(128 * MiB)
    _drain_prefault()
    if memory._madvise is None:
        pytest.skip("the kernel refused MADV_POPULATE_WRITE")
    assert _rss() - before >= 0.9 * 128 * MiB  # faulted in now, not by the first transfer
    pool.trim()
    assert _rss() - before < 0.5 * 128 * MiB  # an idle block like any other: trimming frees it


def test_a_prewarm_is_a_no_op_when_a_block_already_fits() -> None:
    pool = BufferPool(256 * MiB)
    assert pool.prewarm(40 * MiB)
    assert pool.prewarm(39 * MiB)  # within the allowed waste of the idle block
    assert pool.stats().allocated == 1 and pool.stats().idle_blocks == 1


def test_prewarmed_blocks_stay_within_the_idle_cap_oldest_released_first() -> None:
    pool = BufferPool(100 * MiB)
    assert pool.prewarm(30 * MiB)
    assert pool.prewarm(60 * MiB)
    assert pool.prewarm(20 * MiB)  # 110 MiB idle would exceed the cap: the 30 MiB block goes
    stats = pool.stats()
    assert (stats.idle_blocks, stats.idle_bytes, stats.released) == (2, 80 * MiB, 1)
    assert pool.take(30 * MiB).reused is False


@pytest.mark.parametrize(("pool", "size"), [(BufferPool(0), 40 * MiB),  # pooling off
                                            (BufferPool(64 * MiB), 65 * MiB),  # alone over the cap
                                            (BufferPool(64 * MiB), 1000)])  # under min_block_bytes
def test_a_prewarm_that_could_not_be_kept_keeps_nothing(pool: BufferPool, size: int) -> None:
    assert not pool.prewarm(size)
    stats = pool.stats()
    assert (stats.idle_blocks, stats.allocated) == (0, 0)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "40"])
def test_a_bad_size_is_refused(bad: object) -> None:
    with pytest.raises(FramingError, match="buffer size must be an int >= 0"):
        BufferPool(64 * MiB).prewarm(bad)  # type: ignore[arg-type]
