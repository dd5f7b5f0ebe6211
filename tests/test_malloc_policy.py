"""fedserver.malloc_policy: with it, a freed model-sized array leaves the process's RSS (glibc)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    if sys.argv[1] == "policy":
        from fedserver.malloc_policy import release_large_blocks
        assert release_large_blocks() and release_large_blocks()
    n = 10 << 20
    x = np.ones(n // 8); del x   # a freed mapped block: glibc raises its mmap threshold to ~10 MB
    a = np.ones(n // 8)          # so this one comes from the heap, unless the policy holds
    c = np.ones((1 << 20) // 8)  # a smaller block above it keeps the heap from being trimmed
    before = rss(); del a; after = rss()
    print(before - after)
""")


def freed_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="needs Linux /proc")
def test_a_freed_10_mb_array_goes_back_to_the_os_only_with_the_policy() -> None:
    size = 10 << 20
    without = freed_bytes("default")
    with_policy = freed_bytes("policy")
    assert without < size // 2, f"glibc returned {without} bytes without the policy: this test probes nothing here"
    assert with_policy >= size * 0.9, with_policy
