"""Federated averaging (McMahan et al., 2017), weighted by the samples each node saw."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedcore.aggregators._api import Aggregator, NodeReply, ParamSpec
from fedcore.aggregators.weighted_mean import WeightedMean
from fedcore.errors import AggregationError

__all__ = ["FedAverage"]


#: Valid ``accumulator`` values of :class:`FedAverage`.
ACCUMULATORS = ("float64", "param_dtype")


class FedAverage(Aggregator):
    """x⁺ = Σ_{i∈S} n_i y_i / Σ_{i∈S} n_i.

    y_i are the params node i returns, n_i its ``num_samples``, S the nodes whose replies were
    accumulated. The server holds only the running sum Σ n_i y_i and the integer Σ n_i, so memory is
    one accumulator model whatever the number of replies. A reply with n_i = 0 is accepted and weighs
    nothing; a round whose Σ n_i is 0 cannot be averaged. FedAvg keeps no state between rounds.

    Parameters and persistent buffers (BatchNorm's running mean and variance) are averaged alike. Integer
    entries (``num_batches_tracked``, int64) are averaged exactly, with integers only:
    x⁺ = round_half_even(Σ n_i y_i / Σ n_i), i.e. q = ⌊S/N⌋, r = S − qN, x⁺ = q + 1 if 2r > N or
    (2r = N and q odd), else q (S = Σ n_i y_i, N = Σ n_i; ``fedcore.aggregators.weighted_mean``): no float
    rounding (float64 has 53 bits; counts beyond 2⁵³ stay exact), no overflow (int64 sums switch to Python
    integers before they could), and the result lies between the nodes' values, so it fits the dtype.

    ``accumulator`` chooses where the sum lives:

    - ``"float64"`` (default): a float64 sum, cast back once in ``finalize``; for float32 or narrower
      parameters the result does not depend on the order replies arrived in (see the module
      ``fedcore.aggregators._api``). Costs 2x a float32 model.
    - ``"param_dtype"``: float parameters are summed in their own dtype, in place, and divided in place:
      one model's worth of memory, which is what lets a 2.4 GB float32 model be averaged by a server
      holding 3 models (global, sum, one upload) instead of 4. Each reply is added as
      s ← fl(s + n_i y_i) (the product exact in float64, one rounding per reply, one more for the
      division), so the result carries at most about (|S| + 1) float32 roundings of relative error and
      its last bits depend on the reply order (float sums are not associative). Integer entries keep
      their exact rule above, and float16 parameters get a float32 sum: a float16 sum overflows to inf as soon
      as Σ n_i |y_i| passes 65504 (70000 samples of weights near 1 do) and rounds to 2⁻¹¹ per reply.
    """

    name: ClassVar[str] = "fedavg"
    keeps_global_params: ClassVar[bool] = False  # x⁺ needs only the replies

    def __init__(self, accumulator: str = "float64") -> None:
        super().__init__()
        if accumulator not in ACCUMULATORS:
            raise AggregationError(f"FedAverage accumulator must be one of {ACCUMULATORS}, got {accumulator!r}")
        self.accumulator = accumulator
        self._mean: WeightedMean | None = None

    def config(self) -> dict[str, Any]:
        return {"accumulator": self.accumulator}

    def _sum_dtype(self, spec: ParamSpec) -> np.dtype:
        if self.accumulator == "param_dtype" and spec.dtype.kind == "f":
            return spec.dtype if spec.dtype.itemsize >= 4 else np.dtype(np.float32)
        return np.dtype(np.float64)

    def _open(
        self,
        round_index: int,
        global_params: Mapping[str, np.ndarray],
        specs: dict[str, ParamSpec],
        participants: list[str],
        known_nodes: list[str],
    ) -> None:
        self._mean = WeightedMean(specs, self._sum_dtype)

    def _add(self, reply: NodeReply) -> None:
        assert self._mean is not None
        self._mean.add(reply.params, reply.num_samples)

    def _result(self) -> dict[str, np.ndarray]:
        assert self._mean is not None
        result = self._mean.result("FedAverage")  # each sum divided in place and dropped: no second model
        self._mean = None
        return result

    def _discard(self) -> None:
        self._mean = None
