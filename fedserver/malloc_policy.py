"""The server process's allocation policy: model-sized blocks get their own mappings, returned when freed.

glibc serves allocations below its mmap threshold from the heap and raises that threshold (up to 32 MiB)
each time a larger mapped block is freed. After a first round, every array between 128 KiB and 32 MiB —
most tensors of a real model, each of the four 10 MB arrays of a 10M-parameter one — comes from the heap,
where the holes freed arrays leave are not always reusable by the next round's arrays of other sizes: the
process keeps its high-water mark plus the fragmentation. Fixing the threshold (``mallopt``
``M_MMAP_THRESHOLD``, which also stops the dynamic raise) gives every block of ``threshold`` bytes or more
its own mapping, handed back to the OS on free; smaller blocks (gRPC's 1 MiB chunk messages) stay on the
heap, where reuse is cheap. Measured with scripts/bench_rounds.py (10M float32 parameters, 8 nodes, uploads
one at a time): peak RSS above idle 334 -> 214 MB, round time unchanged.

Process-wide and applied once, by :meth:`fedserver.server.FedServer.start`. Outside glibc it does nothing;
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`` set by the user wins (the policy is then left alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 4 << 20

_applied: bool | None = None


def release_large_blocks(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap from now on; True when in effect.

    The first call decides for the process (later calls return its answer): False when the C library is
    not glibc or the user tuned the threshold through ``GLIBC_TUNABLES``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it: mallopt numbers are glibc's
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
    log.debug("malloc mmap threshold %d bytes: %s", threshold, "set" if _applied else "refused")
    return _applied
