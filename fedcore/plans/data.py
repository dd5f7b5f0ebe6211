"""In-memory datasets and a mini-batch loader in numpy, for training plans that need no torch.

``ArrayDataset`` pairs inputs X with targets y (same first dimension); ``NumpyDataLoader`` cuts it into
mini-batches. Both are deterministic given a seed, so two runs with the same training args match.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.errors import DatasetError

__all__ = ["ArrayDataset", "NumpyDataLoader", "held_out_count"]

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
    count moves, and a seeded split whose count was already right stays the same split.
    """
    x = n * ratio
    nearest = round(x)
    if x < nearest <= x + HELD_OUT_TOLERANCE * x:
        return nearest
    return math.floor(x)


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Inputs ``X`` (n, ...) and targets ``y`` (n, ...) as numpy arrays with the same length n (may be 0).

    Raises:
        DatasetError: X or y is not a numpy array, is 0-d, or their lengths differ.
    """

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        for name in ("X", "y"):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray):
                raise DatasetError(f"ArrayDataset: {name} must be a numpy.ndarray, got {type(value).__name__}")
            if value.ndim == 0:
                raise DatasetError(f"ArrayDataset: {name} must have at least one dimension, got a 0-d array")
        if len(self.X) != len(self.y):
            raise DatasetError(
                f"ArrayDataset: X has {len(self.X)} samples (shape {self.X.shape}) but y has {len(self.y)} "
                f"(shape {self.y.shape})"
            )

    def __len__(self) -> int:
        return len(self.X)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at ``indices`` (copies, in that order)."""
        return ArrayDataset(self.X[indices], self.y[indices])

    def split(self, test_ratio: float, seed: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
        """Shuffle with ``seed`` and hold out ``floor(n · test_ratio)`` samples: ``(train, test)``.

        The count is that of the ratio as written (:func:`held_out_count`): 0.29 of 100 samples holds out 29,
        although the float product ``100 * 0.29`` is 28.999999999999996.
        ``test_ratio`` = 0 gives an empty test set; the train set must keep at least one sample.

        Raises:
            DatasetError: ``test_ratio`` outside [0, 1), or nothing left to train on.
        """
        if isinstance(test_ratio, bool) or not isinstance(test_ratio, (int, float)) or not 0 <= test_ratio < 1:
            raise DatasetError(f"ArrayDataset.split: test_ratio must be a number in [0, 1), got {test_ratio!r}")
        n = len(self)
        n_test = held_out_count(n, test_ratio)
        if n - n_test < 1:
            raise DatasetError(
                f"ArrayDataset.split: test_ratio={test_ratio} of {n} samples leaves no training sample"
            )
        order = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(order[n_test:])), self.subset(np.sort(order[:n_test]))


class NumpyDataLoader:
    """Mini-batches ``(X_batch, y_batch)`` of an :class:`ArrayDataset`; the last batch may be smaller.

    ``len(loader)`` = ceil(n / batch_size). With ``shuffle``, every ``iter(loader)`` draws a new
    permutation from one generator seeded once with ``seed``: the sequence of epochs is reproducible.

    Raises:
        DatasetError: not an ArrayDataset, or batch_size not an integer >= 1.
    """

    def __init__(
        self, dataset: ArrayDataset, batch_size: int, shuffle: bool = True, seed: int | None = None
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise DatasetError(f"NumpyDataLoader needs an ArrayDataset, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DatasetError(f"NumpyDataLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        n = len(self.dataset)
        order = self._rng.permutation(n) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                window = slice(start, start + self.batch_size)
                yield self.dataset.X[window], self.dataset.y[window]
            else:
                indices = order[start : start + self.batch_size]
                yield self.dataset.X[indices], self.dataset.y[indices]
