"""receive_buffer: pages faulted in the background, contents written meanwhile never disturbed."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.framing import memory


def _drain_prefault() -> None:
    """Wait for every populate job queued so far (the pool has one worker, so jobs run in order)."""
    memory._prefault_pool().submit(lambda: None).result(timeout=60)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_buffer_shape_and_writes_racing_the_prefault_survive() -> None:
    size = 48 << 20
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    buf = memory.receive_buffer(size)
    assert buf.shape == (size,) and buf.dtype == np.uint8 and buf.flags.writeable
    for start in range(0, size, 1 << 20):  # written while the worker populates the same pages
        buf[start : start + (1 << 20)] = data[start : start + (1 << 20)]
    _drain_prefault()
    assert np.array_equal(buf, data)


def test_small_and_empty_buffers() -> None:
    assert memory.receive_buffer(0).shape == (0,)
    small = memory.receive_buffer(1000)
    small[:] = 7
    assert int(small.sum()) == 7000


@pytest.mark.skipif(memory._madvise is None, reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")
def test_pages_become_resident_without_being_written() -> None:
    size = 128 << 20
    _drain_prefault()
    before = _rss()
    buf = memory.receive_buffer(size)
    _drain_prefault()
    if memory._madvise is None:
        pytest.skip("the kernel refused MADV_POPULATE_WRITE")
    assert _rss() - before >= 0.9 * size  # nothing wrote to buf: only the prefault made it resident
    del buf


def _smaps_field(address: int, field: str) -> int:
    """``field`` (e.g. THPeligible) of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not found for address {address:#x}")


@pytest.mark.skipif(memory._madvise is None, reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")
def test_receive_buffers_opt_out_of_transparent_huge_pages() -> None:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" in f.read():
            pytest.skip("transparent huge pages are disabled on this machine")
    plain = np.empty(64 << 20, dtype=np.uint8)  # numpy opts large arrays in
    buf = memory.receive_buffer(64 << 20)
    _drain_prefault()
    assert _smaps_field(plain.ctypes.data + (32 << 20), "THPeligible") == 1
    assert _smaps_field(buf.ctypes.data + (32 << 20), "THPeligible") == 0
    assert _smaps_field(buf.ctypes.data + (32 << 20), "AnonHugePages") == 0
