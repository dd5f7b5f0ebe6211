"""Receive buffers reused across transfers: already-faulted memory instead of a fresh allocation.

A node receives the same-sized model every round and a server the same-sized replies. Writing into a
fresh buffer first faults every page in: ~0.55 CPU-seconds per GB on the measured VM, more once idle
memory went back to the host (docs/performance.md, "Transport"), a quarter of what a receiver spends
per byte. A :class:`BufferPool` keeps the blocks of finished transfers and hands them out again.

**When a block may be reused.** Decoded arrays are zero-copy views of the receive buffer and may outlive
the task (a plan may keep them), so a block is handed out again only once nothing references what was
handed out. The pool owns its blocks (``uint8`` arrays); a lease is a new array
``np.frombuffer(memoryview(block), count=size)`` whose base is a ``memoryview``, not an ndarray. numpy
collapses a view's ``base`` only through ndarrays, so every view of the lease array (and views of views,
``memoryview`` slices and ``np.frombuffer`` of them, ``torch.from_numpy`` tensors, which hold their numpy
array) keeps the lease array itself alive. A ``weakref.finalize`` on it returns the block to the idle
list when the last of them is gone. (``lease.base``, the bare memoryview, is the one handle that does not:
do not keep it alone.)

**Bounds.** ``max_idle_bytes`` caps what idle blocks hold, counted as each block's *footprint*: the
largest payload it has served, i.e. the pages written (its headroom is never touched, so it costs no
RSS). A returned block evicts the least recently returned idle blocks beyond the cap; a block whose
footprint alone exceeds the cap is released at once; ``max_idle_bytes=0`` turns pooling off.
:meth:`BufferPool.take` can also be given ``room`` (bytes the new lease and the idle blocks may hold
together) so a caller with a memory budget (the server's upload buffers) never holds idle blocks it
has no room for. A fresh block is faulted in by a worker thread
(:func:`~fedcore.framing.memory.fresh_block`) that holds it only during each step, so a block released
while its job is queued or running (by ``trim``, the cap or ``room``) is populated no further and
unmapped at once, or once the step in progress (at most 16 MiB) ends.

**Fit.** A request takes the smallest idle block that holds it and leaves at most ``max_waste`` of the
block unused; otherwise a fresh block of ``size + size/64`` (rounded up to 64 KiB) is allocated, so next
round's payload, a few bytes longer, still fits. Requests under ``min_block_bytes`` are not pooled.
A reused block skips the fresh-buffer work of :func:`~fedcore.framing.memory.fresh_block` (huge-page
opt-out, background prefault): its pages are already there.

**Before the first transfer.** A pool stands for a process's receiving side (the node's downloads, the
server's uploads), so creating one starts the worker threads its transfers use: the prefault worker of
:func:`~fedcore.framing.memory.fresh_block` and a SHA-256 worker of
:class:`~fedcore.framing.digest.PrefixDigest` (once per process; later pools find them running). Created by
the first transfer instead, each cost its event loop 0.3-2.5 ms in a fresh node's first download. The
first transfer's real extra cost is its fresh block, whose pages it must fault in; :meth:`BufferPool.prewarm`
pays that ahead of time for a payload size known in advance.

**Threads.** Leases end wherever the last reference dies (any thread, inside the garbage collector);
the finalizer only appends to a queue and drains it when the lock is free, so it never waits for (or
deadlocks with) a thread inside the pool; whoever holds the lock drains the queue before leaving.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fedcore.errors import FramingError
from fedcore.framing.digest import start_hash_worker
from fedcore.framing.memory import fresh_block, start_prefault_worker

MIN_BLOCK = 1 << 20  # bytes: smaller buffers come from the heap, pooling them saves nothing
MAX_WASTE = 0.125  # fraction of a block a request may leave unused
HEADROOM_DIVISOR = 64  # fresh blocks get size / 64 more, virtual only
ALIGN = 64 << 10


def block_capacity(size: int) -> int:
    """Capacity of a fresh block for ``size`` bytes: ``size + size // 64`` rounded up to 64 KiB."""
    return -(-(size + size // HEADROOM_DIVISOR) // ALIGN) * ALIGN


@dataclass(eq=False)
class _Block:
    array: np.ndarray  # owns the memory
    footprint: int  # largest size handed out from it: the bytes its pages hold


@dataclass(frozen=True)
class Lease:
    """A buffer from :meth:`BufferPool.take`: ``buffer`` (exactly the requested size), ``held_bytes`` (the
    memory it stands for: its block's footprint, >= the size) and whether the block was ``reused``."""

    buffer: np.ndarray
    held_bytes: int
    reused: bool


@dataclass(frozen=True)
class PoolStats:
    """Counters of a pool: idle blocks now, leases out now, and totals since it was made."""

    idle_bytes: int
    idle_blocks: int
    leased_blocks: int
    reused: int  # requests served by an idle block
    allocated: int  # requests that needed a fresh block (pooled sizes only), and prewarm()ed blocks
    released: int  # blocks dropped: evicted beyond the cap or the room, or over the cap on return


class BufferPool:
    """Blocks of receive memory kept between transfers; see the module docstring for the rules."""

    def __init__(self, max_idle_bytes: int, *, min_block_bytes: int = MIN_BLOCK,
                 max_waste: float = MAX_WASTE) -> None:
        if isinstance(max_idle_bytes, bool) or not isinstance(max_idle_bytes, int) or max_idle_bytes < 0:
            raise FramingError(f"max_idle_bytes must be an int >= 0 (0: no pooling), got {max_idle_bytes!r}")
        if isinstance(min_block_bytes, bool) or not isinstance(min_block_bytes, int) or min_block_bytes < 1:
            raise FramingError(f"min_block_bytes must be an int >= 1, got {min_block_bytes!r}")
        if not 0.0 <= max_waste < 1.0:
            raise FramingError(f"max_waste must be in [0, 1), got {max_waste!r}")
        self.max_idle_bytes = max_idle_bytes
        self.min_block_bytes = min_block_bytes
        self.max_waste = max_waste
        self._lock = threading.Lock()
        self._idle: list[_Block] = []  # least recently returned first
        self._idle_bytes = 0
        self._returned: deque[_Block] = deque()  # appended by finalizers, drained under the lock
        self._leased = 0
        self._reused = self._allocated = self._released = 0
        start_prefault_worker()  # before the first transfer, not inside it (module docstring)
        start_hash_worker()

    # -- handing out --------------------------------------------------------------------------------
    def take(self, size: int, *, room: int | None = None) -> Lease:
        """A writable, uninitialised ``uint8`` buffer of ``size`` bytes, from an idle block when one fits.

        ``room``: bytes this lease and the idle blocks may hold together (a lease always gets ``size``):
        only a block whose footprint fits is reused, and idle blocks beyond the rest are released before
        a fresh block is allocated (None: only ``max_idle_bytes`` bounds them).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FramingError(f"buffer size must be an int >= 0, got {size!r}")
        if size < self.min_block_bytes or self.max_idle_bytes == 0:
            return Lease(fresh_block(size, size), size, False)
        with self._locked():
            block = self._best_fit(size, max(size, room) if room is not None else None)
            if block is not None:
                self._idle.remove(block)
                self._idle_bytes -= block.footprint
                block.footprint = max(block.footprint, size)
                self._reused += 1
            else:
                self._allocated += 1
            held = size if block is None else block.footprint
            if room is not None:
                self._evict(max(0, room - held))
            self._leased += 1
        reused = block is not None
        if block is None:  # outside the lock: np.empty of a big block is an mmap
            try:
                block = _Block(fresh_block(block_capacity(size), size), size)
            except MemoryError:  # no lease was made: the counters must not say otherwise
                with self._locked():
                    self._leased -= 1
                    self._allocated -= 1
                raise
        buffer = np.frombuffer(memoryview(block.array), dtype=np.uint8, count=size)
        weakref.finalize(buffer, self._give_back, block).atexit = False
        return Lease(buffer, held, reused)

    def prewarm(self, size: int) -> bool:
        """Keep an idle block ready for a payload of about ``size`` bytes, its pages faulted in from now on
        (in the background, by the prefault worker) instead of inside the first transfer that needs them.

        A fresh process's first download otherwise writes into fresh memory, and that first touch is the
        whole difference between it and the later downloads: ~12-20 ms at 40 MB on the measured VM. A node
        that knows its model's size pays it at start, and holds the block idle until its first task, as the
        pool holds one between rounds. True when a block for ``size`` is idle
        (perhaps one that was already); False, keeping nothing, when pooling is off, ``size`` is under
        ``min_block_bytes`` or a block for it alone exceeds ``max_idle_bytes``.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FramingError(f"buffer size must be an int >= 0, got {size!r}")
        if size < self.min_block_bytes or size > self.max_idle_bytes:
            return False
        with self._locked():
            if self._best_fit(size, None) is not None:
                return True
        block = _Block(fresh_block(block_capacity(size), size), size)  # outside the lock: an mmap
        with self._locked():
            self._allocated += 1
            self._idle.append(block)  # the most recently returned: evicted last
            self._idle_bytes += block.footprint
            self._evict(self.max_idle_bytes)
        return True

    def _best_fit(self, size: int, max_held: int | None) -> _Block | None:
        """The smallest idle block holding ``size`` within the waste allowed (and ``max_held`` of footprint)."""
        best = None
        for block in self._idle:
            capacity = block.array.nbytes
            if size <= capacity and size >= capacity * (1.0 - self.max_waste) and (
                    max_held is None or block.footprint <= max_held) and (
                    best is None or capacity < best.array.nbytes):
                best = block
        return best

    # -- giving back --------------------------------------------------------------------------------
    def _give_back(self, block: _Block) -> None:
        """Finalizer of a lease array (any thread, possibly inside the garbage collector)."""
        self._returned.append(block)
        self._settle()

    def _settle(self) -> None:
        while self._returned and self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._drain()
            yield
            self._drain()
        self._settle()  # blocks returned by another thread while we held the lock

    def _drain(self) -> None:
        while self._returned:
            block = self._returned.popleft()
            self._leased -= 1
            if block.footprint > self.max_idle_bytes:
                self._released += 1
                continue
            self._idle.append(block)
            self._idle_bytes += block.footprint
            self._evict(self.max_idle_bytes)

    def _evict(self, limit: int) -> None:
        while self._idle_bytes > limit:
            block = self._idle.pop(0)
            self._idle_bytes -= block.footprint
            self._released += 1

    # -- inspection and trimming ----------------------------------------------------------------------
    def trim(self, max_idle_bytes: int = 0) -> None:
        """Release idle blocks, least recently returned first, until they hold <= ``max_idle_bytes``."""
        with self._locked():
            self._evict(max(0, max_idle_bytes))

    @property
    def idle_bytes(self) -> int:
        with self._locked():
            return self._idle_bytes

    def stats(self) -> PoolStats:
        with self._locked():
            return PoolStats(self._idle_bytes, len(self._idle), self._leased, self._reused, self._allocated,
                             self._released)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"BufferPool(max_idle_bytes={self.max_idle_bytes}, idle={s.idle_bytes} bytes in {s.idle_blocks} "
                f"blocks, leased={s.leased_blocks})")
