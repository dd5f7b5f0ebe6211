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
from fedcore.plans.split import held_out_count, held_out_indices

__all__ = ["ArrayDataset", "NumpyDataLoader", "held_out_count"]


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
        """Hold out ``held_out_count(n, test_ratio)`` samples chosen by ``seed``: ``(train, test)``.

        The split every node makes, whatever its language (docs/protocol.md §6, "The held-out split";
        :mod:`fedcore.plans.split`): sample i gets the key ``mix(seed + (i + 1) · 0x9E3779B97F4A7C15 mod 2⁶⁴)``
        with SplitMix64's output function ``mix``, and the samples with the smallest keys are held out; both
        sets keep the dataset's order. ``seed`` None draws a fresh 64-bit seed (another split at each call).
        fedstream before this split drew a numpy permutation: the same seed held out other samples.
        The count is that of the ratio as written (:func:`held_out_count`): 0.29 of 100 samples holds out 29,
        although the float product ``100 * 0.29`` is 28.999999999999996.
        ``test_ratio`` = 0 gives an empty test set; the train set must keep at least one sample.

        Raises:
            DatasetError: ``test_ratio`` outside [0, 1), ``seed`` not None or an int in [0, 2⁶⁴), or nothing
                left to train on.
        """
        if isinstance(test_ratio, bool) or not isinstance(test_ratio, (int, float)) or not 0 <= test_ratio < 1:
            raise DatasetError(f"ArrayDataset.split: test_ratio must be a number in [0, 1), got {test_ratio!r}")
        n = len(self)
        if n - held_out_count(n, test_ratio) < 1:
            raise DatasetError(
                f"ArrayDataset.split: test_ratio={test_ratio} of {n} samples leaves no training sample"
            )
        train, test = held_out_indices(n, test_ratio, seed)
        return self.subset(train), self.subset(test)


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
