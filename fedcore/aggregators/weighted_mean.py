"""``WeightedMean``: the streaming sample-weighted mean x⁺ = Σ n_i y_i / Σ n_i of named arrays.

FedAverage averages every entry with it; Scaffold its buffers (BatchNorm's running statistics), which are no
SGD iterates. Float entries are summed as ``fedcore.aggregators._api.add_scaled`` does (float64, or a sum dtype
the caller picks) and divided once. Integer entries (``num_batches_tracked``: int64) are averaged exactly:

    x⁺ = round_half_even(S / N),   S = Σ_i n_i y_i,   N = Σ_i n_i   (exact integers)

computed as q = ⌊S / N⌋, r = S − q N ∈ [0, N), x⁺ = q + 1 if 2r > N or (2r = N and q is odd), else q. No float
takes part, so values beyond 2⁵³ (float64's integers) are not rounded, and since min_i y_i ≤ S / N ≤ max_i y_i
the result fits the entry's dtype. S lives in an int64 array while Σ_i n_i · max|y_i| and N stay below 2⁶²
(so neither S, q N nor 2r can overflow), and in Python integers (an object array, exact at any size, ~30x
slower) from the reply that would pass that bound: integer entries are small buffers in practice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedcore.aggregators._api import ParamSpec, add_scaled, cast_back
from fedcore.errors import AggregationError

__all__ = ["WeightedMean"]

#: Σ n_i · max|y_i| and N below this keep an integer sum in int64 (2·S must fit too).
INT64_SAFE = 1 << 62


def _float64(spec: ParamSpec) -> np.dtype:
    return np.dtype(np.float64)


class _IntegerSum:
    """S = Σ n_i y_i of one integer entry, exact: int64 while the bound allows, Python integers after.

    Held flat (a 0-d entry as one element), so every step is an array operation."""

    def __init__(self, spec: ParamSpec) -> None:
        self.spec = spec
        self.total = np.zeros(int(np.prod(spec.shape, dtype=np.int64)), dtype=np.int64)
        self.bound = 0  # Σ n_i · max|y_i| so far: |S| <= bound

    def add(self, value: np.ndarray, weight: int, total_weight: int) -> None:
        flat = value.reshape(-1)
        peak = max(abs(int(flat.min())), abs(int(flat.max()))) if flat.size else 0
        self.bound += weight * peak
        if self.total.dtype != object and (self.bound >= INT64_SAFE or total_weight >= INT64_SAFE):
            self.total = self.total.astype(object)  # int64 elements become Python ints, exactly
        if self.total.dtype == object:
            self.total += flat.astype(object) * weight
        else:
            self.total += flat.astype(np.int64) * np.int64(weight)

    def mean(self, total_weight: int) -> np.ndarray:
        s = self.total
        n = total_weight if s.dtype == object else np.int64(total_weight)
        q = s // n
        twice_r = 2 * (s - q * n)
        up = (twice_r > n) | ((twice_r == n) & (q % 2 == 1))
        return (q + up.astype(s.dtype)).astype(self.spec.dtype).reshape(self.spec.shape)


class WeightedMean:
    """Σ n_i y_i / Σ n_i over the entries of ``specs`` (module docstring for integers).

    ``float_sum_dtype(spec)``: where a float entry's sum lives (default float64; FedAverage's
    ``accumulator="param_dtype"`` passes its own). Replies with n_i = 0 weigh nothing.
    """

    def __init__(self, specs: Mapping[str, ParamSpec],
                 float_sum_dtype: Callable[[ParamSpec], np.dtype] = _float64) -> None:
        self.specs = dict(specs)
        self._floats = {key: np.zeros(s.shape, dtype=float_sum_dtype(s))
                        for key, s in self.specs.items() if s.dtype.kind == "f"}
        self._integers = {key: _IntegerSum(s) for key, s in self.specs.items() if s.dtype.kind in "iu"}
        self.total_weight = 0

    def add(self, params: Mapping[str, np.ndarray], weight: int) -> None:
        """Fold in ``weight`` · ``params[key]`` for every entry (the names were checked by the aggregator)."""
        if weight == 0:
            return
        self.total_weight += weight
        w = np.float64(weight)
        for key, total in self._floats.items():
            add_scaled(total, params[key], w)
        for key, integer_sum in self._integers.items():
            integer_sum.add(params[key], weight, self.total_weight)

    def result(self, what: str) -> dict[str, np.ndarray]:
        """The means, in ``specs`` order and dtypes; the float sums are divided in place (call once).

        Raises AggregationError, naming ``what`` averages, when Σ n_i = 0."""
        if self.total_weight == 0:
            raise AggregationError(f"{what}: every reply reported num_samples=0, the weighted mean is undefined")
        total = np.float64(self.total_weight)
        out = {}
        for key, spec in self.specs.items():
            if key in self._floats:
                acc = self._floats.pop(key)
                np.divide(acc, total, out=acc)  # in place: the sum is dropped here, no second model
                out[key] = cast_back(acc, spec)
            else:
                out[key] = self._integers.pop(key).mean(self.total_weight)
        return out
