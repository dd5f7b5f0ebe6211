"""Seeded random sampling of a fraction of the candidates."""

from __future__ import annotations

import hashlib
import math
import numbers

from fedcore.errors import StrategyError
from fedcore.strategies._api import NodeInfo, NodeSelector

__all__ = ["RandomFraction"]


class RandomFraction(NodeSelector):
    """A seeded random subset of k = max(min_nodes, ⌊fraction · n⌋) of the n candidates.

    Each candidate gets the score SHA-256(seed, round_index, node_id) and the k lowest scores win.
    The choice is a pure function of (seed, round_index, set of candidate ids): it does not depend on
    candidate order, numpy's generator algorithms or the Python version, and it changes from round to
    round. Fewer than ``min_nodes`` candidates is an error.
    """

    def __init__(
        self,
        fraction: float,
        seed: int,
        min_nodes: int = 1,
        base: NodeSelector | None = None,
    ) -> None:
        super().__init__(base)
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not math.isfinite(fraction)
            or not 0 < fraction <= 1
        ):
            raise StrategyError(f"RandomFraction fraction must be in (0, 1], got {fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise StrategyError(f"RandomFraction seed must be an int, got {seed!r}")
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, numbers.Integral) or min_nodes < 1:
            raise StrategyError(f"RandomFraction min_nodes must be an int >= 1, got {min_nodes!r}")
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.min_nodes = int(min_nodes)

    def sample_size(self, num_candidates: int) -> int:
        """k for ``num_candidates`` candidates (the 1e-9 absorbs float error, e.g. 0.29 · 100)."""
        return min(num_candidates, max(self.min_nodes, math.floor(self.fraction * num_candidates + 1e-9)))

    def _choose(self, candidates: list[NodeInfo], round_index: int) -> list[str]:
        if len(candidates) < self.min_nodes:
            raise StrategyError(
                f"RandomFraction needs at least min_nodes={self.min_nodes} candidates, "
                f"got {len(candidates)}: {[info.node_id for info in candidates]}"
            )
        k = self.sample_size(len(candidates))
        scored = sorted((self._score(info.node_id, round_index), info.node_id) for info in candidates)
        return [node_id for _, node_id in scored[:k]]

    def _score(self, node_id: str, round_index: int) -> bytes:
        return hashlib.sha256(f"{self.seed}\x00{round_index}\x00{node_id}".encode()).digest()

    def __repr__(self) -> str:
        return (
            f"RandomFraction({self.fraction!r}, seed={self.seed!r}, min_nodes={self.min_nodes!r}"
            f"{self._base_repr()})"
        )
