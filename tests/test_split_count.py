"""``ArrayDataset.split`` holds out the share of samples the ratio says as written: 0.29 of 100 is 29.

Before: ``math.floor(n * test_ratio)`` on floats, and 100 × 0.29 is 28.999999999999996 in float64, so 28 samples
were held out (likewise 0.57 × 100, 0.58 × 100, ...). Counts recomputed here with exact integer arithmetic
(``n · a // 10^d`` for a ratio a / 10^d); the held-out samples are those of smallest keys (fedcore.plans.split).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcore.plans import ArrayDataset
from fedcore.plans.data import held_out_count
from fedcore.plans.split import split_keys


def dataset(n: int) -> ArrayDataset:
    return ArrayDataset(np.arange(2.0 * n).reshape(n, 2), np.arange(n))


@pytest.mark.parametrize(("n", "ratio", "expected"), [(100, 0.29, 29), (100, 0.57, 57), (100, 0.58, 58),
                                                      (1000, 0.29, 290), (50, 0.58, 29), (10, 0.35, 3)])
def test_a_decimal_ratio_holds_out_exactly_its_share(n: int, ratio: float, expected: int) -> None:
    train, test = dataset(n).split(ratio, seed=4)
    assert (len(train), len(test)) == (n - expected, expected)
    order = np.argsort(split_keys(n, 4))  # the split's order: the first `expected` are held out
    np.testing.assert_array_equal(test.y, np.sort(order[:expected]))
    np.testing.assert_array_equal(train.y, np.sort(order[expected:]))


@pytest.mark.parametrize("digits", [2, 3])
def test_every_ratio_of_a_few_decimals_gives_the_exact_count(digits: int) -> None:
    scale = 10**digits
    wrong_before = 0
    for a in range(scale):
        ratio = a / scale
        for n in range(0, 1201, 7):
            exact = n * a // scale
            assert held_out_count(n, ratio) == exact, (n, ratio)
            wrong_before += math.floor(n * ratio) != exact
    assert wrong_before > 0  # the float floor is wrong somewhere in this sweep: the sweep tests the fix


def test_counts_that_were_right_do_not_move() -> None:
    """Ratios that are no short decimals (1/3, 2/3, 0.1 + 0.2) keep the float floor: 3 × (1/3) is 1.0 already."""
    for ratio in (1 / 3, 2 / 3, 0.1 + 0.2, 1 / 7, 0.123456789, 0.5, 0.2):
        for n in range(0, 20_000, 3):
            assert held_out_count(n, ratio) == math.floor(n * ratio), (n, ratio)
    assert held_out_count(10**15, 0.29) == math.floor(10**15 * 0.29)  # beyond n · 29 < 10¹²: the float floor
