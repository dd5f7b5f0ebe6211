"""PrefixDigest: the background SHA-256 equals hashlib's over the same bytes, however the prefix grows."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.framing.digest import PrefixDigest


def _filled(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 50_000), cuts=st.lists(st.integers(0, 50_000), max_size=30),
       batch=st.sampled_from([1, 7, 4096, 1 << 22]))
def test_digest_matches_hashlib_for_any_growth(n: int, cuts: list[int], batch: int) -> None:
    data = _filled(n)
    buf = np.zeros(n, dtype=np.uint8)
    digest = PrefixDigest(memoryview(buf), batch=batch)
    for end in sorted({min(c, n) for c in cuts} | {n}):
        buf[:end] = data[:end]  # only bytes past the previous end change
        digest.extend(end)
    assert digest.digest() == hashlib.sha256(data.tobytes()).digest()


def test_large_buffer_hashed_in_the_background_while_it_fills() -> None:
    n = 24 << 20
    data = _filled(n, 1)
    buf = np.empty(n, dtype=np.uint8)
    digest = PrefixDigest(memoryview(buf), batch=1 << 20)
    step = (1 << 20) + 3  # not aligned with the batch
    for start in range(0, n, step):
        end = min(start + step, n)
        buf[start:end] = data[start:end]
        digest.extend(end)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digest.digest() == hashlib.sha256(data).digest()  # asking twice gives the same answer


def test_digest_of_a_partial_prefix_and_of_nothing() -> None:
    data = _filled(10 << 20, 2)
    digest = PrefixDigest(memoryview(data), batch=1 << 20)
    digest.extend(5 << 20)
    assert digest.digest() == hashlib.sha256(data[: 5 << 20]).digest()
    assert PrefixDigest(memoryview(data)).digest() == hashlib.sha256(b"").digest()


def test_many_digests_filled_from_many_threads_stay_separate() -> None:
    n = 6 << 20
    sources = [_filled(n, seed) for seed in range(6)]
    results: dict[int, bytes] = {}

    def fill(i: int) -> None:
        buf = np.empty(n, dtype=np.uint8)
        digest = PrefixDigest(memoryview(buf), batch=256 << 10)
        for start in range(0, n, 100_000):
            end = min(start + 100_000, n)
            buf[start:end] = sources[i][start:end]
            digest.extend(end)
        results[i] = digest.digest()

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: hashlib.sha256(s).digest() for i, s in enumerate(sources)}
