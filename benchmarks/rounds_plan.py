"""The training plan of ``scripts/bench_rounds.py``: P float32 parameters in a few big arrays, one trivial step.

Nodes receive this module's source and run it like any plan. Training takes one step that adds 1e-3 to
the first element of every array, so the reply is the received weights plus a tiny change and a round's
time is the framework's own: transfer, checks, decoding, encoding, aggregation.

The model keeps the arrays it is given instead of copying them: on a node they are views of the task's
receive buffer, which belongs to the task and is written nowhere else, and the reply sends the same arrays
back. A real plan copies into its framework's tensors; the benchmark leaves that copy out because it
measures the framework, not the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import PlanError
from fedcore.models import Model, weights_to_numpy
from fedcore.models._api import check_weights
from fedcore.plans import NumpyDataLoader, TrainingPlan

N_ARRAYS = 4
STEP = np.float32(1e-3)


def layout(num_params: int, n_arrays: int = N_ARRAYS) -> dict[str, int]:
    """Array name -> length: ``num_params`` split over ``n_arrays`` 1-d arrays (the first takes the rest)."""
    if num_params < n_arrays:
        raise PlanError(f"num_params must be >= {n_arrays}, got {num_params}")
    size, rest = divmod(num_params, n_arrays)
    return {f"layer{i}": size + (rest if i == 0 else 0) for i in range(n_arrays)}


class BenchModel(Model):
    """Named float32 arrays held as given: ``get_weights`` returns them, ``set_weights`` keeps them (no copies)."""

    def __init__(self, num_params: int) -> None:
        # zeros: untouched pages until written, so building the plan on a node costs no memory
        self._arrays = {name: np.zeros(n, dtype=np.float32) for name, n in layout(num_params).items()}

    @property
    def model(self) -> BenchModel:
        return self

    def _specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {name: (a.shape, str(a.dtype)) for name, a in self._arrays.items()}

    def get_weights(self, only_trainable: bool = False, exclude_buffers: bool = True) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    def set_weights(self, weights: Mapping[str, Any], *, only_trainable: bool = False,
                    exclude_buffers: bool = True) -> None:
        check_weights(self._specs(), weights, lambda name, v: (np.shape(v), str(getattr(v, "dtype", type(v)))))
        self._arrays = {name: weights[name] for name in self._arrays}

    def num_parameters(self) -> int:
        return sum(a.size for a in self._arrays.values())

    def step(self) -> None:
        for array in self._arrays.values():
            array[0] += STEP

    def export(self, path: str | Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **self._arrays)

    def reload(self, path: str | Path) -> None:
        with np.load(path, allow_pickle=False) as archive:
            self._arrays = {name: archive[name] for name in archive.files}


class _NoOptimizer:
    def __init__(self, lr: float) -> None:
        self.lr = lr


class BenchPlan(TrainingPlan):
    """``model_args["num_params"]`` float32 parameters; training = one step of :meth:`BenchModel.step`."""

    def init_model(self) -> BenchModel:
        return BenchModel(int(self.model_args.get("num_params", 1000)))

    def training_step(self, data: Any, target: Any) -> float:
        return 0.0

    def init_optimizer(self) -> _NoOptimizer:
        return _NoOptimizer(float(self.training_args["lr"]))

    def training_data(self, dataset: Any) -> NumpyDataLoader:
        return NumpyDataLoader(dataset, self.training_args["batch_size"], shuffle=False)

    def testing_step(self, data: Any, target: Any) -> dict[str, float]:
        return {"loss": 0.0}

    # framework hooks: no framework here
    def _seed(self, seed: int | None) -> None:
        pass

    def _wrap_model(self, native: Any) -> Model:
        if not isinstance(native, BenchModel):
            raise PlanError(f"BenchPlan.init_model must return a BenchModel, got {type(native).__name__}")
        return native

    def _check_optimizer(self, optimizer: Any) -> Any:
        return optimizer

    def _learning_rate(self) -> float:
        return self.optimizer.lr

    def _testing_batches(self, dataset: Any) -> Iterable[tuple[Any, Any]]:
        return NumpyDataLoader(dataset, self.training_args["batch_size"], shuffle=False)

    def _as_named_arrays(self, what: str, values: Mapping[str, Any]) -> dict[str, Any]:
        return weights_to_numpy(values)

    def _batch_loss(self, data: Any, target: Any, anchor: Mapping[str, Any] | None) -> tuple[float, float, Any]:
        loss = self.training_step(data, target)
        return loss, loss, None

    def _batch_update(self, handle: Any, correction: Mapping[str, Any] | None) -> None:
        self.model.step()  # type: ignore[attr-defined]
