"""Model wrappers: one API over numpy and torch models.

- :class:`Model` — the interface (``_api``), plus :func:`weights_to_numpy` for the wire.
- :class:`NumpyModel` — linear / logistic regression in numpy (no torch needed).
- :class:`TorchModel` — a ``torch.nn.Module``; imported lazily so this package works without torch.
"""

from __future__ import annotations

from typing import Any

from fedcore.models._api import Model, weights_to_numpy
from fedcore.models.numpy_model import NumpyModel

__all__ = ["Model", "NumpyModel", "TorchModel", "weights_to_numpy"]


def __getattr__(name: str) -> Any:
    if name == "TorchModel":
        from fedcore.models.torch_model import TorchModel

        return TorchModel
    raise AttributeError(f"module 'fedcore.models' has no attribute {name!r}")
