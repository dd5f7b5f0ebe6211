"""Memory for chunk streaming: receive buffers faulted in by a worker thread, chunk blocks kept for reuse.

The first write to each page of a fresh allocation is a page fault; on the measured VM (Firecracker, free
pages handed back to the host) that costs ~0.55 CPU-seconds per GB with 4 KiB pages, more than receiving
the bytes. Faulting the pages in a worker with ``madvise(MADV_POPULATE_WRITE)`` (Linux >= 5.14) does
the same work in one system call per step, without the GIL (ctypes releases it) and ahead of the event
loop thread that copies chunks in. The advice populates page tables only: it never changes the
contents, so it may run behind or ahead of the writer without coordination.

Each call holds the process's mmap lock (for reading) until it returns: heap growth (``brk``), new
mappings and unmappings wait for it. In a fresh node's first download gRPC's reading thread sat in ``brk``
for whole 16 MiB calls (``perf sched``), and the first chunk reached the event loop 15-20 ms after dispatch
(medians) instead of 3-5 ms in later downloads. 2 MiB calls brought it to 8-11 ms but the download ended no
sooner: the first touch is CPU the transfer pays either way on 2 cores. And the worker needs the GIL
between calls, so where the event loop holds it, 2 MiB calls populated 1.5-4x slower. Hence
:data:`PREFAULT_STEP` stays at 16 MiB.

The worker threads are started with the process's receiving side (:func:`start_prefault_worker`, called by
:class:`~fedcore.framing.buffer_pool.BufferPool`), not by its first transfer: a thread's creation maps its
stack, which is also a write of the mmap lock, and took 0.3-2.5 ms of the event loop there.

Receive buffers opt out of transparent huge pages (``MADV_NOHUGEPAGE``; numpy opts large arrays in).
Huge pages come from the large free blocks a VM with free page reporting has handed back to its host,
so every one is a cold host fault: measured 1.1-2.0 CPU-s/GB after a few idle seconds, against a
steady 0.55 with small pages (``scripts/bench_transport.py``, docs/performance.md). Elsewhere, or on
older kernels, the buffer is simply faulted by its writer as before.

Every chunk also passes through a few chunk-sized blocks (the message ``bytes``, gRPC's copy, the
received ``bytes``), allocated and freed about a thousand times per GB. glibc's default thresholds
let them bounce between a fresh ``brk``/``mmap`` and a trim back to the kernel on every chunk (two
``brk`` calls per chunk measured on the server), so each chunk faulted its pages in again: ~0.5 CPU
s/GB on each side. :func:`keep_chunk_memory` sets the thresholds once per process (``FedServer``
and ``NodeClient`` call it) so those blocks come from and return to the heap.

It also keeps every thread on glibc's main arena (``M_ARENA_MAX`` 1). gRPC's threads allocate the
chunks they read; each thread otherwise gets its own arena, and each arena keeps up to the trim
threshold of freed chunks: three arenas held 10.5 MB of a 40 MB download's receiver (0.26x of the
payload, docs/performance.md "Transport"); on one arena the receiver peak fell from 1.40-1.64x to
1.30-1.41x with throughput unchanged. The cost is one arena lock for all threads' small allocations,
which are few here (arrays above the 4 MiB mmap threshold are mmapped — 32 MiB while a node trains,
:func:`compute_memory` — and Python objects come from pymalloc).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PREFAULT_MIN = 8 << 20  # bytes: smaller buffers are faulted by their writer (cheaper than a thread hop)
PREFAULT_STEP = 16 << 20  # bytes per madvise call (the mmap lock is held for each: see the module docstring)
_MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14+)
_MADV_NOHUGEPAGE = 15
_PAGE = mmap.PAGESIZE

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _prefault_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedstream-prefault")
        return _pool


def start_prefault_worker() -> None:
    """Start the process's prefault worker thread now if it is not running (once per process is enough).

    Otherwise the first receive buffer of :data:`PREFAULT_MIN` bytes or more creates it, inside a transfer.
    """
    try:
        _prefault_pool().submit(int)  # the executor starts a thread for its first job
    except RuntimeError:  # interpreter shutting down: buffers are faulted by their writers
        pass


def _pages(buffer: np.ndarray) -> tuple[int, int]:
    """``(first, end)`` addresses of the whole pages inside ``buffer``."""
    start = buffer.ctypes.data
    return -(-start // _PAGE) * _PAGE, (start + buffer.nbytes) // _PAGE * _PAGE


def _populate(ref: weakref.ref[np.ndarray], used: int) -> None:
    """Fault in the whole pages of the first ``used`` bytes of the array behind ``ref``, front to back.

    The job holds the array only during each step (one ``madvise`` call of at most
    :data:`PREFAULT_STEP`): an array dropped while its job waits or runs (a transfer abandoned early, a
    :class:`~fedcore.framing.buffer_pool.BufferPool` block evicted before it was ever written) is unmapped
    at once instead of being kept alive and populated for nothing. Stops quietly if the kernel refuses.
    """
    global _madvise
    buffer = ref()
    if buffer is None:
        return
    addr, end = _pages(buffer[:used])
    del buffer
    while addr < end:
        alive = ref()
        if alive is None:  # freed or evicted meanwhile: its pages are gone, populate nothing more
            return
        n = min(PREFAULT_STEP, end - addr)
        failed = _madvise is None or _madvise(addr, n, _MADV_POPULATE_WRITE) != 0
        del alive
        if failed:
            if ctypes.get_errno() == 22:  # EINVAL: kernel without MADV_POPULATE_WRITE; stop trying
                _madvise = None
            return
        addr += n


def receive_buffer(size: int) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``size`` bytes whose pages a worker thread starts faulting in."""
    return fresh_block(size, size)


def fresh_block(capacity: int, used: int) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``capacity`` bytes, out of huge pages; a worker thread starts
    faulting in its first ``used`` bytes (the rest, headroom of :class:`~fedcore.framing.buffer_pool.BufferPool`
    blocks, stays untouched: no page, no RSS). The worker keeps no reference between steps: dropping the
    array stops its population and frees it at once."""
    buffer = np.empty(capacity, dtype=np.uint8)
    if _madvise is not None and used >= PREFAULT_MIN:
        first, end = _pages(buffer)
        _madvise(first, end - first, _MADV_NOHUGEPAGE)  # before any page is touched; best effort
        try:
            _prefault_pool().submit(_populate, weakref.ref(buffer), used)
        except RuntimeError:  # interpreter shutting down: the writer faults the pages itself
            pass
    return buffer


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc malloc.h
MALLOC_ARENAS = 1  # glibc arenas: every thread allocates from the main arena (see the module docstring)
MMAP_THRESHOLD = 4 << 20  # bytes: blocks this large get their own mapping (as fedserver.malloc_policy sets)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger (HEAP_MAX_SIZE / 2 on 64-bit)
#: thresholds while a node computes (compute_memory): glibc's own dynamic threshold climbs to this maximum
#: once a freed block was that large; a fixed 4 MiB made every 4-32 MiB torch activation a fresh mapping,
#: faulted in each step (a CNN at batch 256: 2.3-2.5x slower, ``scripts/bench_node_malloc.py``)
TRAINING_MMAP_THRESHOLD = _MMAP_THRESHOLD_MAX
_kept = 0  # mmap threshold set so far
_compute_sections = 0  # compute_memory() sections open


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a GNU libc
        return False


def keep_chunk_memory(chunk_size: int, *, floor: int = MMAP_THRESHOLD) -> bool:
    """Let glibc serve chunk messages from its heap and keep freed ones for the next chunk (process-wide).

    Sets ``M_MMAP_THRESHOLD`` to ``floor`` (4 MiB), or just above a chunk message when chunks are larger, so a
    chunk is never a fresh ``mmap`` while model-sized arrays still get their own mapping, returned to
    the kernel when freed (the policy of ``fedserver.malloc_policy``); and ``M_TRIM_THRESHOLD`` to the
    same, so freeing a chunk does not hand the top of the heap back to the kernel only for the next
    chunk to fault it in again (measured: 2 MiB still trims ~once per 5 chunks; 8 MiB keeps ~10 MB more
    of the in-flight chunks after a transfer than 4 MiB); and ``M_ARENA_MAX`` to :data:`MALLOC_ARENAS`,
    so threads created afterwards (gRPC's) do not each keep their own arena of freed chunks. Setting a
    threshold turns off glibc's dynamic one, which a training step needs: a node runs its tasks'
    computation inside :func:`compute_memory`. Only ever raises the thresholds; a setting the user made
    through ``GLIBC_TUNABLES`` is left alone. True when glibc took them.
    """
    global _kept
    threshold = min(max(floor, chunk_size + (64 << 10)), _MMAP_THRESHOLD_MAX)
    with _pool_lock:
        if threshold <= _kept:
            return True
        if not _glibc():
            return False
        ok = _compute_sections > 0 or _set_thresholds(threshold)  # a computation running keeps its higher ones
        if ok and not _kept and "arena_max" not in os.environ.get("GLIBC_TUNABLES", ""):
            _mallopt(_M_ARENA_MAX, MALLOC_ARENAS)  # best effort: the thresholds are what matters most
        if ok:
            _kept = threshold
        return ok


@contextlib.contextmanager
def compute_memory() -> Iterator[None]:
    """Raise glibc's thresholds to :data:`TRAINING_MMAP_THRESHOLD` while a task's computation runs, then
    put back what :func:`keep_chunk_memory` set for transfers (process-wide; concurrent sections share it).

    The two want opposite things. Training allocates the same 4-32 MiB tensors every step: glibc's own
    dynamic threshold would keep them on the heap, where they are reused, and a fixed 4 MiB one made each
    a fresh mapping faulted in every step (a CNN at batch 256 ran 2.3-2.5x slower,
    ``scripts/bench_node_malloc.py``). Receiving wants the heap small: under 32 MiB thresholds gRPC's
    buffers and their fragments grew a node's heap by ~10-11.5 MiB during a 40 MB download, against
    ~6-10 MiB under 4 MiB (receiver peak 1.26-1.31x vs 1.14-1.27x of the payload). Does nothing when
    :func:`keep_chunk_memory` fixed no threshold (glibc's dynamic one then serves both).
    """
    global _compute_sections
    with _pool_lock:
        _compute_sections += 1
        if _compute_sections == 1 and _kept:
            _set_thresholds(max(_kept, TRAINING_MMAP_THRESHOLD))
    try:
        yield
    finally:
        with _pool_lock:
            _compute_sections -= 1
            if _compute_sections == 0 and _kept:
                _set_thresholds(_kept)


def _mallopt(param: int, value: int) -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1


def _set_thresholds(threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds, except where ``GLIBC_TUNABLES`` already does."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("mmap_threshold" in tunables or _mallopt(_M_MMAP_THRESHOLD, threshold)) and (
        "trim_threshold" in tunables or _mallopt(_M_TRIM_THRESHOLD, threshold))


def return_free_heap() -> bool:
    """Hand the free pages of glibc's heap back to the kernel (``malloc_trim(0)``); False outside glibc.

    The thresholds keep freed memory in the heap (up to 4 MiB at its top, 32 MiB of a task's tensors
    inside :func:`compute_memory`), and fragmentation can keep more anywhere in it: right for the next
    chunk or training step, wasted while a node waits a round for its next task, and added to the next
    round's peak (a 40 MB download's steady peak 1.26x -> 1.21x of the payload, docs/performance.md). The
    node calls this after each task; it takes a few milliseconds and leaves the thresholds alone. Skipped
    (False) while a :func:`compute_memory` section is open: another client's handler in the process is
    reusing that memory step after step.
    """
    if not _glibc():
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    with _pool_lock:
        if _compute_sections:  # another handler of the process computes: its tensors are reused from the heap
            return False
        trim(0)
    return True
