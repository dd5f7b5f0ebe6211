"""Server-side aggregators: streaming ``begin_round`` → ``accumulate`` → ``finalize``, with checkpointable state.

Members: :class:`FedAverage` (``"fedavg"``), :class:`Scaffold` (``"scaffold"``). ``build_aggregator(name,
config)`` rebuilds one from its ``name`` and ``config()``, e.g. when resuming from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcore.aggregators._api import Aggregator, NodeReply
from fedcore.aggregators.fedavg import FedAverage
from fedcore.aggregators.scaffold import Scaffold
from fedcore.errors import AggregationError

__all__ = ["AGGREGATORS", "Aggregator", "FedAverage", "NodeReply", "Scaffold", "build_aggregator"]

AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAverage, Scaffold)}


def build_aggregator(name: str, config: Mapping[str, Any] | None = None) -> Aggregator:
    """Build the aggregator called ``name`` from its ``config()`` dict."""
    try:
        cls = AGGREGATORS[name]
    except (KeyError, TypeError):
        raise AggregationError(f"unknown aggregator {name!r}; choices: {sorted(AGGREGATORS)}") from None
    try:
        return cls(**dict(config or {}))
    except TypeError as exc:
        raise AggregationError(f"bad config for aggregator {name!r}: {exc}") from None
