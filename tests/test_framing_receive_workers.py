"""The receiving side's worker threads start with its BufferPool, not inside a fresh process's first transfer.

Created by the first download instead, each cost the node's event loop 0.3-2.5 ms.
"""

from __future__ import annotations

import subprocess
import sys

_FIRST_TRANSFER_PROBE = """
import threading

import numpy as np
from fedcore.framing import BufferPool, ChunkAssembler, OutgoingPayload

pool = BufferPool(1 << 30)  # what NodeClient and the server's UploadSessions make at set-up
at_setup = set(threading.enumerate())
payload = OutgoingPayload.from_bytes(np.random.default_rng(0).integers(0, 256, 48 << 20, dtype=np.uint8).tobytes())
assembler = ChunkAssembler(payload.info(), max_payload_size=1 << 30, max_chunk_size=1 << 20, pool=pool)
for offset, data in payload.iter_chunks():
    assembler.add(offset, data)
assembler.finish()
started = set(threading.enumerate()) - at_setup
print("setup:", *sorted(t.name.rsplit("_", 1)[0] for t in at_setup))
print("transfer:", *sorted(t.name for t in started))
"""


def test_the_first_transfer_of_a_process_starts_no_thread() -> None:
    """In a fresh process, the pool's creation starts the prefault and SHA-256 workers; a 48 MiB transfer
    (prefaulted, hashed in the background) then finds them running and creates none."""
    out = subprocess.run([sys.executable, "-c", _FIRST_TRANSFER_PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    setup, transfer = out[0].split()[1:], out[1].split()[1:]
    assert "fedstream-sha256" in setup and "fedstream-prefault" in setup
    assert transfer == [], f"threads started by the first transfer: {transfer}"
