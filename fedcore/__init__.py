"""fedcore: the library shared by the researcher (fedserver) and the nodes (fednode).

Importable without gRPC or torch. Public entry points:

- :class:`Serializer` — msgpack encoding of parameters and state (never pickle).
- :class:`TrainingArgs` — validated training arguments.
- :class:`MiniBatchTrainingIterationsAccountant` — epochs / num_updates / batch_maxnum bookkeeping.
- ``fedcore.models``, ``fedcore.plans``, ``fedcore.aggregators``, ``fedcore.strategies``, ``fedcore.framing``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MiniBatchTrainingIterationsAccountant", "Serializer", "TrainingArgs", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that ``import fedcore.errors`` stays cheap and partial checkouts import cleanly.
    if name == "Serializer":
        from fedcore.serialization import Serializer

        return Serializer
    if name == "TrainingArgs":
        from fedcore.training_args import TrainingArgs

        return TrainingArgs
    if name == "MiniBatchTrainingIterationsAccountant":
        from fedcore.accountant import MiniBatchTrainingIterationsAccountant

        return MiniBatchTrainingIterationsAccountant
    raise AttributeError(f"module 'fedcore' has no attribute {name!r}")
