"""``NumpySGD``: the update rule of ``torch.optim.SGD`` (no dampening, no Nesterov) for a NumpyModel.

For each weight w with gradient g, learning rate η, momentum μ and weight decay λ:

    g ← g + λ w
    b ← g at the first step, then b ← μ b + g      (only when μ > 0; else b = g)
    w ← w − η b

so with μ = λ = 0 it is plain SGD, w ← w − η g.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcore.errors import PlanError
from fedcore.models.numpy_model import NumpyModel

__all__ = ["NumpySGD"]


class NumpySGD:
    """Stochastic gradient descent with optional momentum and weight decay (rule in the module docstring)."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        for name, value, low_open in (("lr", lr, True), ("momentum", momentum, False),
                                      ("weight_decay", weight_decay, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise PlanError(f"NumpySGD: {name} must be a finite number, got {value!r}")
            if value < 0 or (low_open and value == 0):
                raise PlanError(f"NumpySGD: {name} must be {'> 0' if low_open else '>= 0'}, got {value!r}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._buffers: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        """Forget the momentum buffers."""
        self._buffers = {}

    def step(self, model: NumpyModel, grads: Mapping[str, np.ndarray]) -> None:
        """Apply one update to ``model`` from ``grads`` (every weight name; see WeightsMismatchError)."""
        direction = dict(grads)
        if self.weight_decay:
            weights = model.get_weights()
            direction = {name: g + self.weight_decay * weights[name] if name in weights else g
                         for name, g in direction.items()}  # unknown names: apply_grads says so
        if self.momentum:
            for name, g in direction.items():
                buffer = self._buffers.get(name)
                buffer = np.array(g, copy=True) if buffer is None else self.momentum * buffer + g
                self._buffers[name] = buffer
                direction[name] = buffer
        model.apply_grads(direction, self.lr)
