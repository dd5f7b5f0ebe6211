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


_HEAP_PROBE = """
import sys
from fedcore.framing import memory

def heap() -> int:
    with open("/proc/self/maps") as f:
        return sum(int(hi, 16) - int(lo, 16) for lo, hi in
                   (line.split()[0].split("-") for line in f if line.rstrip().endswith("[heap]")))

if sys.argv[1] == "keep":
    assert memory.keep_chunk_memory(1 << 20)
before = heap()
block = bytes(2 << 20)  # a 2 MiB chunk-sized block
grown = heap() - before
del block
print(grown, heap() - before)
"""


def _heap_growth(mode: str) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, timeout=60,
                         check=True)
    grown, kept = out.stdout.split()
    return int(grown), int(kept)


@pytest.mark.skipif(not memory._glibc(), reason="glibc malloc only")
def test_kept_chunk_memory_comes_from_the_heap_and_stays_there() -> None:
    grown, kept = _heap_growth("default")  # fresh process: glibc maps a 2 MiB block apart
    assert grown < (512 << 10)
    grown, kept = _heap_growth("keep")
    assert grown >= (3 << 19)  # served from the heap (the top may already have had some room)...
    assert kept == grown  # ...and not trimmed away when freed, so the next chunk reuses it


_TRAINING_PROBE = """
import ctypes, sys
from fedcore.framing import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped() -> int:
    # bytes a 12 MiB block (a torch activation of a CNN at batch 256) adds in separate mappings: 0 on the heap
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(12 << 20)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grown

assert memory.keep_chunk_memory(1 << 20)  # as NodeClient.run and FedServer.start
out = [mapped()]  # transfers: its own mapping
with memory.compute_memory():  # a handler computing
    out.append(mapped())
    with memory.compute_memory():  # a second client's handler, ending first
        pass
    out.append(mapped())
memory.return_free_heap()  # the heap's free top (the blocks above) goes back, as after each task
out.append(mapped())  # transfers again
print(*out)
"""


@pytest.mark.skipif(not memory._glibc(), reason="glibc malloc only")
def test_a_node_computes_with_tensor_sized_blocks_on_the_heap_and_transfers_without() -> None:
    """Under keep_chunk_memory's 4 MiB threshold a 12 MiB block is its own mapping (faulted in afresh every
    training step); inside compute_memory it comes from the heap (``TRAINING_MMAP_THRESHOLD``, what glibc's
    dynamic threshold reaches) as long as any section is open; after the last one, mappings again."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRAINING_PROBE], capture_output=True, text=True, timeout=60,
                         check=True)
    before, computing, still_computing, after = (int(n) for n in out.stdout.split())
    assert before >= 12 << 20 and after >= 12 << 20
    assert computing == still_computing == 0


_RAISE_PROBE = """
from fedcore.framing import memory
if not memory.keep_chunk_memory(1 << 20):
    raise SystemExit(3)
assert memory._kept >= memory.MMAP_THRESHOLD  # model-sized blocks keep their own mappings
assert memory.keep_chunk_memory(6 << 20)  # larger chunks: just above a chunk message
assert memory._kept == (6 << 20) + (64 << 10)
assert memory.keep_chunk_memory(1 << 10)  # a smaller request keeps the larger setting
assert memory._kept == (6 << 20) + (64 << 10)
assert memory.keep_chunk_memory(1 << 40)  # capped at glibc's maximum instead of failing
assert memory._kept == memory._MMAP_THRESHOLD_MAX
"""


def test_keep_chunk_memory_only_raises_the_thresholds() -> None:
    import subprocess
    import sys

    # in a child: the settings are process-wide and must not leak into the other tests
    proc = subprocess.run([sys.executable, "-c", _RAISE_PROBE], check=False, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode == 3:
        pytest.skip("not glibc")
    assert proc.returncode == 0, proc.stderr


_ARENA_PROBE = """
import ctypes, sys, threading
from fedcore.framing import memory

if sys.argv[1] == "keep":
    assert memory.keep_chunk_memory(1 << 20)

def work():
    for _ in range(20):
        block = bytes(1 << 20)  # a chunk-sized malloc in this thread
        del block

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()  # glibc: one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not memory._glibc(), reason="glibc malloc only")
def test_kept_chunk_memory_keeps_threads_on_the_main_arena() -> None:
    import subprocess
    import sys

    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], capture_output=True, text=True,
                             timeout=60, check=True)
        return sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert arenas("default") >= 2, "by default a thread that allocates gets an arena of its own"
    assert arenas("keep") == 1, "every thread allocates from the main arena"


_TRIM_PROBE = """
import ctypes
from fedcore.framing import memory

def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
assert memory.keep_chunk_memory(1 << 20)
before = rss()
with memory.compute_memory():  # a task computing: 32 MiB thresholds
    blocks = [libc.malloc(1 << 20) for _ in range(24)]  # 24 chunk-sized blocks from the heap, written
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
kept = rss() - before  # under the 32 MiB trim threshold glibc kept them all
with memory.compute_memory():  # another client's handler computing: its memory stays
    assert not memory.return_free_heap()
assert rss() - before >= kept - (1 << 20)
assert memory.return_free_heap()
print(kept, rss() - before)
"""


@pytest.mark.skipif(not memory._glibc(), reason="glibc malloc only")
def test_return_free_heap_hands_back_what_the_kept_thresholds_hold() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, timeout=60, check=True)
    kept, after = (int(n) for n in out.stdout.split())
    assert kept >= 20 << 20  # 24 MiB freed but still resident
    assert after <= 4 << 20  # back to the kernel
