"""Training plans: the researcher's training code and the one local training loop.

- :class:`TrainingPlan`, :class:`TrainingProgress`, :class:`TrainingResult` — the base (``_api``).
- :class:`NumpyTrainingPlan` — over a NumpyModel, with :class:`NumpySGD` (no torch needed).
- :class:`TorchTrainingPlan` — over a ``torch.nn.Module``; imported lazily so this package works without torch.
- :class:`ArrayDataset`, :class:`NumpyDataLoader` — in-memory data and mini-batches.
"""

from __future__ import annotations

from typing import Any

from fedcore.plans._api import TrainingPlan, TrainingProgress, TrainingResult
from fedcore.plans.data import ArrayDataset, NumpyDataLoader
from fedcore.plans.numpy_plan import NumpyTrainingPlan
from fedcore.plans.numpy_sgd import NumpySGD

__all__ = [
    "ArrayDataset",
    "NumpyDataLoader",
    "NumpySGD",
    "NumpyTrainingPlan",
    "TorchTrainingPlan",
    "TrainingPlan",
    "TrainingProgress",
    "TrainingResult",
]


def __getattr__(name: str) -> Any:
    if name == "TorchTrainingPlan":
        from fedcore.plans.torch_plan import TorchTrainingPlan

        return TorchTrainingPlan
    raise AttributeError(f"module 'fedcore.plans' has no attribute {name!r}")
