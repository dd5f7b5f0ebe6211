"""The held-out split (fedcore.plans.split): SplitMix64 keys, the smallest held out, checked by hand and in bulk.

The formula is recomputed with plain Python integers (no numpy), so a slip in the vectorized uint64 code cannot
hide behind itself; the conformance vectors (test_split_vectors.py) pin the resulting indices for other
languages.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from fedcore.errors import DatasetError
from fedcore.plans import ArrayDataset
from fedcore.plans.split import GAMMA, held_out_count, held_out_indices, split_keys

MASK = 2**64 - 1


def mix_by_hand(z: int) -> int:
    """SplitMix64's output function on Python ints, every product reduced mod 2⁶⁴."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def key_by_hand(i: int, seed: int) -> int:
    return mix_by_hand((seed + (i + 1) * GAMMA) & MASK)


def test_a_key_recomputed_by_hand() -> None:
    assert GAMMA == 0x9E3779B97F4A7C15
    # SplitMix64's published first output for seed 0 (Vigna's splitmix64.c): the keys are its stream
    assert key_by_hand(0, 0) == 0xE220A8397B1DCDAF == int(split_keys(1, 0)[0])
    for seed in (0, 1, 7, 2**32 - 1, 2**63, 2**64 - 1):
        keys = split_keys(300, seed)
        assert keys.dtype == np.uint64
        assert [int(k) for k in keys[[0, 1, 2, 150, 299]]] == [key_by_hand(i, seed) for i in (0, 1, 2, 150, 299)]


def test_the_worked_example_of_the_docs() -> None:
    """protocol.md: n = 10, test_ratio = 0.3, seed = 1 holds out samples 3, 4 and 8."""
    keys = [key_by_hand(i, 1) for i in range(10)]
    smallest = sorted(sorted(range(10), key=keys.__getitem__)[:3])
    assert smallest == [3, 4, 8]
    train, held_out = held_out_indices(10, 0.3, 1)
    assert held_out.tolist() == [3, 4, 8] and train.tolist() == [0, 1, 2, 5, 6, 7, 9]
    data = ArrayDataset(np.arange(20.0).reshape(10, 2), np.arange(10))
    train_set, test_set = data.split(0.3, seed=1)
    assert test_set.y.tolist() == [3, 4, 8] and train_set.y.tolist() == [0, 1, 2, 5, 6, 7, 9]
    np.testing.assert_array_equal(test_set.X[:, 0], 2 * test_set.y)  # rows stay paired


@pytest.mark.parametrize(("n", "ratio", "seed"), [(1, 0.5, 0), (37, 0.29, 3), (500, 0.5, 2**64 - 1), (1200, 0.9, 11)])
def test_smallest_keys_held_out_both_lists_ascending(n: int, ratio: float, seed: int) -> None:
    train, held_out = held_out_indices(n, ratio, seed)
    k = held_out_count(n, ratio)
    assert len(held_out) == k and len(train) == n - k
    assert train.dtype == held_out.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held_out) > 0)
    assert sorted([*train.tolist(), *held_out.tolist()]) == list(range(n))
    keys = [key_by_hand(i, seed) for i in range(n)]
    assert held_out.tolist() == sorted(sorted(range(n), key=keys.__getitem__)[:k])
    if k and len(train):
        assert max(keys[i] for i in held_out) < min(keys[i] for i in train)


def test_the_keys_are_distinct() -> None:
    """No tie rule is needed: i ↦ seed + (i + 1)γ is injective (γ odd) and mix is a bijection."""
    for seed in (0, 5, 2**64 - 1):
        assert len(np.unique(split_keys(100_000, seed))) == 100_000


def test_seeds_and_sizes_give_a_spread_of_splits() -> None:
    """Each sample is held out about ratio of the time over seeds; the split of a prefix is no prefix rule."""
    counts = np.zeros(40)
    for seed in range(2000):
        counts[held_out_indices(40, 0.25, seed)[1]] += 1
    share = counts / 2000
    assert np.all(np.abs(share - 0.25) < 0.05), share  # binomial sd ≈ 0.0097: 5 sd
    a = held_out_indices(100, 0.3, 9)[1]
    assert not np.array_equal(a, held_out_indices(100, 0.3, 10)[1])


def test_no_seed_draws_a_fresh_split() -> None:
    splits = {tuple(held_out_indices(200, 0.5)[1].tolist()) for _ in range(5)}
    assert len(splits) > 1
    assert held_out_indices(200, 0.5, 3)[1].tolist() == held_out_indices(200, 0.5, 3)[1].tolist()


def test_ratio_zero_and_empty() -> None:
    train, held_out = held_out_indices(5, 0.0, 1)
    assert train.tolist() == [0, 1, 2, 3, 4] and held_out.tolist() == []
    assert [a.tolist() for a in held_out_indices(0, 0.5, 1)] == [[], []]
    assert len(split_keys(0, 1)) == 0


def test_numpy_integers_are_accepted() -> None:
    assert held_out_indices(np.int64(10), 0.3, np.uint64(1))[1].tolist() == [3, 4, 8]


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, "1", True])
def test_a_bad_seed_is_refused_naming_it(seed: object) -> None:
    with pytest.raises(DatasetError, match=r"seed must be None or an int in \[0, 2\*\*64\), got " + repr(seed)):
        held_out_indices(10, 0.3, seed)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="seed must be None or an int"):
        held_out_indices(10, 0.0, seed)  # type: ignore[arg-type]  # refused even when nothing is held out
    with pytest.raises(DatasetError, match="seed must be None or an int"):
        ArrayDataset(np.zeros((10, 1)), np.zeros(10)).split(0.3, seed)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "ratio", "message"), [
    (-1, 0.3, "number of samples must be an int >= 0, got -1"),
    (3.0, 0.3, "number of samples must be an int >= 0, got 3.0"),
    (10, 1.0, r"test_ratio must be a number in \[0, 1\), got 1.0"),
    (10, -0.1, "got -0.1"),
    (10, "0.3", "got '0.3'"),
    (10, True, "got True"),
])
def test_bad_sizes_and_ratios_are_refused(n: object, ratio: object, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        held_out_indices(n, ratio, 1)  # type: ignore[arg-type]


def test_no_overflow_warning_and_fast_for_a_million_samples() -> None:
    """uint64 products wrap on purpose; pyproject makes warnings errors, so any RuntimeWarning would fail here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held_out_indices(1000, 0.5, 2**64 - 1)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            train, held_out = held_out_indices(10**6, 0.2, 2**32 - 1)
            best = min(best, time.perf_counter() - started)
    assert len(held_out) == 200_000 and len(train) == 800_000
    assert best < 0.5, f"held_out_indices(10**6) took {best:.3f} s"  # ~0.02 s measured on 2 cores
