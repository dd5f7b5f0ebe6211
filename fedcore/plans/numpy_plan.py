"""``NumpyTrainingPlan``: a training plan over a :class:`~fedcore.models.NumpyModel`, no torch needed.

Only ``init_model`` is required::

    class LinearPlan(NumpyTrainingPlan):
        def init_model(self):
            return NumpyModel(n_features=8, n_outputs=1, task="linear")

``training_step(data, target)`` returns ``(loss, grads)`` (numpy has no autograd); the default is the
model's ``loss_and_grads``. The optimizer is :class:`~fedcore.plans.numpy_sgd.NumpySGD` (torch's SGD rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedcore.errors import PlanError
from fedcore.models._api import Model, weights_to_numpy
from fedcore.models.numpy_model import NumpyModel
from fedcore.plans._api import TrainingPlan
from fedcore.plans.data import ArrayDataset, NumpyDataLoader
from fedcore.plans.numpy_sgd import NumpySGD

__all__ = ["NumpyTrainingPlan"]


class NumpyTrainingPlan(TrainingPlan):
    """Training plan for a NumpyModel trained by mini-batch SGD (loop and maths: ``fedcore.plans._api``)."""

    def __init__(self) -> None:
        super().__init__()
        self._rng = np.random.default_rng()

    @property
    def rng(self) -> np.random.Generator:
        """A generator seeded from ``training_args['seed']`` by ``post_init``, for ``init_model`` to use."""
        return self._rng

    @property
    def model(self) -> NumpyModel:
        return super().model  # type: ignore[return-value]

    # ------------------------------------------------------------------ default hooks
    def training_step(self, data: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """``(loss, {"coef": ∂L/∂W, "intercept": ∂L/∂b})`` of the batch: the model's ``loss_and_grads``."""
        return self.model.loss_and_grads(data, target)

    def init_optimizer(self) -> NumpySGD:
        """``NumpySGD(lr, momentum, weight_decay)`` from the training args."""
        args = self.training_args
        return NumpySGD(args["lr"], args["momentum"], args["weight_decay"])

    def training_data(self, dataset: ArrayDataset) -> NumpyDataLoader:
        """``NumpyDataLoader`` with ``batch_size``, ``shuffle`` and ``seed`` from the training args."""
        args = self.training_args
        return NumpyDataLoader(dataset, args["batch_size"], shuffle=args["shuffle"], seed=args["seed"])

    def testing_step(self, data: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """``loss``, plus ``accuracy`` for logistic models."""
        metrics = {"loss": self.model.loss(data, target)}
        if self.model.is_classifier:
            labels = np.asarray(target).reshape(len(data))
            metrics["accuracy"] = float(np.mean(self.model.predict(data) == labels))
        return metrics

    # ------------------------------------------------------------------ framework hooks
    def _seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)

    def _wrap_model(self, native: Any) -> Model:
        if not isinstance(native, NumpyModel):
            raise PlanError(
                f"{type(self).__name__}.init_model must return a NumpyModel, got {type(native).__name__}"
            )
        return native

    def _check_optimizer(self, optimizer: Any) -> Any:
        if not callable(getattr(optimizer, "step", None)) or not isinstance(getattr(optimizer, "lr", None), float):
            raise PlanError(
                f"{type(self).__name__}.init_optimizer must return an optimizer with step(model, grads) and a "
                f"float lr (e.g. NumpySGD), got {type(optimizer).__name__}"
            )
        return optimizer

    def _learning_rate(self) -> float:
        return self.optimizer.lr

    def _testing_batches(self, dataset: ArrayDataset) -> Iterable[tuple[Any, Any]]:
        return NumpyDataLoader(dataset, self.training_args["batch_size"], shuffle=False)

    def _as_named_arrays(self, what: str, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        dtype = self.model.dtype
        return {name: np.asarray(value, dtype=dtype) for name, value in weights_to_numpy(values).items()}

    def _batch_loss(
        self, data: Any, target: Any, anchor: Mapping[str, np.ndarray] | None
    ) -> tuple[float, float, dict[str, np.ndarray]]:
        out = self.training_step(data, target)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise PlanError(
                f"{type(self).__name__}.training_step must return (loss, grads dict), got {type(out).__name__}"
            )
        loss, grads = float(out[0]), dict(out[1])
        expected = self.model.get_weights().keys()
        if grads.keys() != expected:
            raise PlanError(
                f"{type(self).__name__}.training_step returned gradients for {sorted(grads)}, "
                f"expected exactly {sorted(expected)}"
            )
        objective = loss
        if anchor is not None and math.isfinite(loss):
            mu = self.training_args["fedprox_mu"]
            weights = self.model.get_weights()
            for name, w0 in anchor.items():
                diff = weights[name] - w0
                objective += 0.5 * mu * float(np.sum(diff * diff))
                grads[name] = grads[name] + mu * diff
        return loss, objective, grads

    def _batch_update(self, handle: dict[str, np.ndarray], correction: Mapping[str, np.ndarray] | None) -> None:
        grads = handle
        if correction is not None:
            grads = {name: g - correction[name] if name in correction else g for name, g in grads.items()}
        self.optimizer.step(self.model, grads)
