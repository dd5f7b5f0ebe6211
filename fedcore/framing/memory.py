"""Receive buffers whose pages are faulted in by a background thread, not by the thread writing chunks.

The first write to each page of a fresh allocation is a page fault; on the measured VM (Firecracker, free
pages handed back to the host) that costs ~0.55 CPU-seconds per GB with 4 KiB pages, more than receiving
the bytes. Faulting the pages in a worker with ``madvise(MADV_POPULATE_WRITE)`` (Linux >= 5.14) does
the same work in one system call per step, without the GIL (ctypes releases it) and ahead of the event
loop thread that copies chunks in. The advice populates page tables only: it never changes the
contents, so it may run behind or ahead of the writer without coordination.

Receive buffers opt out of transparent huge pages (``MADV_NOHUGEPAGE``; numpy opts large arrays in).
Huge pages come from the large free blocks a VM with free page reporting has handed back to its host,
so every one is a cold host fault: measured 1.1-2.0 CPU-s/GB after a few idle seconds, against a
steady 0.55 with small pages (``scripts/bench_transport.py``, docs/performance.md). Elsewhere, or on
older kernels, the buffer is simply faulted by its writer as before.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PREFAULT_MIN = 8 << 20  # bytes: smaller buffers are faulted by their writer (cheaper than a thread hop)
PREFAULT_STEP = 16 << 20  # bytes per madvise call
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


def _pages(buffer: np.ndarray) -> tuple[int, int]:
    """``(first, end)`` addresses of the whole pages inside ``buffer``."""
    start = buffer.ctypes.data
    return -(-start // _PAGE) * _PAGE, (start + buffer.nbytes) // _PAGE * _PAGE


def _populate(buffer: np.ndarray) -> None:
    """Fault in the whole pages inside ``buffer``, front to back; stop quietly if the kernel refuses."""
    global _madvise
    addr, end = _pages(buffer)
    while addr < end:
        n = min(PREFAULT_STEP, end - addr)
        if _madvise is None or _madvise(addr, n, _MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: kernel without MADV_POPULATE_WRITE; stop trying
                _madvise = None
            return
        addr += n


def receive_buffer(size: int) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``size`` bytes whose pages a worker thread starts faulting in."""
    buffer = np.empty(size, dtype=np.uint8)
    if _madvise is not None and size >= PREFAULT_MIN:
        first, end = _pages(buffer)
        _madvise(first, end - first, _MADV_NOHUGEPAGE)  # before any page is touched; best effort
        try:
            _prefault_pool().submit(_populate, buffer)
        except RuntimeError:  # interpreter shutting down: the writer faults the pages itself
            pass
    return buffer
