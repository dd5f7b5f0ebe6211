"""The held-out split of a node's samples: which ``test_ratio`` of them validation uses, in any language.

Every node holds out the same samples for the same ``(n, test_ratio, seed)``, whatever its language
(docs/protocol.md §6, "The held-out split"):

- the COUNT is :func:`held_out_count` ``(n, test_ratio)``: ``floor(n · ratio)``, a ratio written as a short
  decimal counting as written (0.29 of 100 is 29);
- the ORDER is SplitMix64's stream from ``seed``. With γ = 0x9E3779B97F4A7C15 and SplitMix64's output function
  ``mix(z) = z₃`` where ``z₁ = (z ⊕ (z ≫ 30)) · 0xBF58476D1CE4E5B9``, ``z₂ = (z₁ ⊕ (z₁ ≫ 27)) · 0x94D049BB133111EB``,
  ``z₃ = z₂ ⊕ (z₂ ≫ 31)`` (all mod 2⁶⁴), sample i (from 0) gets the key ``mix(seed + (i + 1) · γ mod 2⁶⁴)``;
  the ``held_out_count`` samples with the smallest keys are held out.

The keys are all distinct (i ↦ seed + (i + 1) γ is injective mod 2⁶⁴ for i < 2⁶⁴ since γ is odd, and ``mix`` is
a bijection of 64-bit words), so no tie rule is needed. Both index lists come back in ascending order. Unlike
``numpy.random.Generator.permutation`` (the split of fedstream before this module), the formula fits in a few
lines of any language and no library version can change it.
"""

from __future__ import annotations

import math
import numbers
import secrets

import numpy as np

from fedcore.errors import DatasetError

__all__ = ["GAMMA", "HELD_OUT_TOLERANCE", "held_out_count", "held_out_indices", "split_keys"]

#: SplitMix64's increment (the odd integer nearest 2⁶⁴ / φ).
GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_WORD = 2**64

#: Relative tolerance of :func:`held_out_count`: far above float64's rounding (2⁻⁵³ per operation), far below
#: the gap between a product n · ratio and the next integer for ratios written with a few decimals.
HELD_OUT_TOLERANCE = 1e-12


def held_out_count(n: int, ratio: float) -> int:
    """``floor(n · ratio)``, where a float product just below an integer k counts as k.

    ``ratio`` is a decimal the user wrote (0.29) stored as the nearest binary float (0.28999999999999998),
    and ``n * ratio`` rounds again: 100 × 0.29 gives 28.999999999999996 where the user means 29. With
    x = n · ratio (float) and k its nearest integer, the count is k when x < k ≤ x + 10⁻¹² · x, else floor(x).
    Why 10⁻¹²: the two roundings err by at most about 2 · 2⁻⁵³ · x ≈ 2.2·10⁻¹⁶ · x, which the tolerance covers
    with room. For a ratio of d decimals, a / 10^d, the exact product n · a / 10^d is an integer or at least
    10^-d below the next one, more than 10⁻¹² · x whenever n · a < 10¹² (0.29: any n below 3·10¹⁰): no other
    count moves.
    """
    x = n * ratio
    nearest = round(x)
    if x < nearest <= x + HELD_OUT_TOLERANCE * x:
        return nearest
    return math.floor(x)


def split_keys(n: int, seed: int) -> np.ndarray:
    """The n keys ``mix(seed + (i + 1) · γ mod 2⁶⁴)``, i = 0 .. n−1, as uint64 (SplitMix64's first n outputs).

    Raises:
        DatasetError: ``n`` is not an int >= 0, or ``seed`` not an int in [0, 2⁶⁴).
    """
    n = _count(n)
    seed = _seed(seed)
    z = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2⁶⁴ on purpose
        z *= np.uint64(GAMMA)
        z += np.uint64(seed)
        z ^= z >> np.uint64(30)
        z *= _MIX_1
        z ^= z >> np.uint64(27)
        z *= _MIX_2
        z ^= z >> np.uint64(31)
    return z


def held_out_indices(n: int, test_ratio: float, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)``: the indices 0 .. n−1 split as the module docstring says, each ascending (int64).

    ``held_out`` holds the :func:`held_out_count` ``(n, test_ratio)`` indices of smallest :func:`split_keys`;
    ``seed`` None draws a fresh 64-bit seed from the OS (another split at each call). O(n) time and memory:
    n = 10⁶ takes about 25 ms.

    Raises:
        DatasetError: ``n`` not an int >= 0, ``test_ratio`` not a number in [0, 1), ``seed`` not None or an int
            in [0, 2⁶⁴) (each named with its value).
    """
    n = _count(n)
    if isinstance(test_ratio, bool) or not isinstance(test_ratio, numbers.Real) or not 0 <= test_ratio < 1:
        raise DatasetError(f"test_ratio must be a number in [0, 1), got {test_ratio!r}")
    seed = secrets.randbits(64) if seed is None else _seed(seed)
    k = held_out_count(n, float(test_ratio))
    if k == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    keys = split_keys(n, seed)
    chosen = np.argpartition(keys, k - 1)[:k] if k < n else np.arange(n)
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return np.flatnonzero(~mask).astype(np.int64, copy=False), np.flatnonzero(mask).astype(np.int64, copy=False)


def _count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise DatasetError(f"the number of samples must be an int >= 0, got {n!r}")
    return int(n)


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _WORD:
        raise DatasetError(f"the split's seed must be None or an int in [0, 2**64), got {seed!r}")
    return int(seed)
