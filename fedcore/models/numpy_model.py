"""``NumpyModel``: linear and logistic regression in pure numpy, so fedstream trains without torch.

With inputs X (n × d), weights W = ``coef`` (d × k) and b = ``intercept`` (k), the outputs are
Z = X W + b and, writing G = ∂L/∂Z, the gradients are ∂L/∂W = Xᵀ G and ∂L/∂b = Σ_rows G.

- ``task="linear"`` (mean squared error, k outputs, Y of shape (n,) or (n, k)):
  L = 1/(n k) · Σ (Z − Y)²,                      G = 2 (Z − Y) / (n k)
- ``task="logistic"``, k = 1 (binary, labels y ∈ {0, 1}, p = σ(z)):
  L = 1/n · Σ [log(1 + e^z) − y z],              G = (p − y) / n
- ``task="logistic"``, k ≥ 2 (multiclass, integer labels y ∈ [0, k), P = softmax(Z)):
  L = 1/n · Σ [logsumexp(Z_i) − Z_{i, y_i}],     G = (P − onehot(y)) / n
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import ModelError
from fedcore.models._api import Model, WeightSpec, check_weights

__all__ = ["NumpyModel"]

TASKS = ("linear", "logistic")


class NumpyModel(Model):
    """A linear (MSE) or logistic (sigmoid / softmax cross-entropy) model with weights ``coef``, ``intercept``.

    Weights start at zero (both losses are convex, so this is a fine and deterministic start).
    """

    def __init__(
        self,
        n_features: int,
        n_outputs: int = 1,
        task: str = "linear",
        dtype: Any = np.float64,
    ) -> None:
        for label, value in (("n_features", n_features), ("n_outputs", n_outputs)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ModelError(f"NumpyModel: {label} must be an integer >= 1, got {value!r}")
        if task not in TASKS:
            raise ModelError(f"NumpyModel: task must be one of {TASKS}, got {task!r}")
        np_dtype = np.dtype(dtype)
        if np_dtype.kind != "f":
            raise ModelError(f"NumpyModel: dtype must be a floating dtype, got {np_dtype}")
        self._task = task
        self._weights = {
            "coef": np.zeros((int(n_features), int(n_outputs)), dtype=np_dtype),
            "intercept": np.zeros((int(n_outputs),), dtype=np_dtype),
        }

    # ----------------------------------------------------------------- description
    @property
    def model(self) -> NumpyModel:
        """A NumpyModel is its own native model."""
        return self

    @property
    def task(self) -> str:
        return self._task

    @property
    def n_features(self) -> int:
        return self._weights["coef"].shape[0]

    @property
    def n_outputs(self) -> int:
        return self._weights["coef"].shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self._weights["coef"].dtype

    @property
    def is_classifier(self) -> bool:
        return self._task == "logistic"

    def _specs(self) -> dict[str, WeightSpec]:
        return {name: (w.shape, str(w.dtype)) for name, w in self._weights.items()}

    # ----------------------------------------------------------------- weights
    def get_weights(self, only_trainable: bool = False, exclude_buffers: bool = True) -> dict[str, np.ndarray]:
        """Copies of ``coef`` (n_features × n_outputs) and ``intercept`` (n_outputs); all are trainable."""
        return {name: w.copy() for name, w in self._weights.items()}

    def set_weights(
        self, weights: Mapping[str, Any], *, only_trainable: bool = False, exclude_buffers: bool = True
    ) -> None:
        """Assign copies of ``weights`` (numpy arrays of the model's exact shapes and dtype).

        The byte order is free (the wire keeps it, docs/serialization.md): a big-endian ``>f4`` array is a
        float32 array, copied into the model's native order with the same values.

        Raises:
            WeightsMismatchError: unknown/missing names, wrong shapes, dtypes or value types.
        """
        check_weights(self._specs(), weights, _describe_ndarray)
        for name, current in self._weights.items():
            self._weights[name] = np.array(weights[name], dtype=current.dtype, copy=True)

    def num_parameters(self) -> int:
        return int(sum(w.size for w in self._weights.values()))

    def apply_grads(self, grads: Mapping[str, np.ndarray], lr: float) -> None:
        """One plain gradient step: w ← w − lr · grads[w] for every weight (all names required)."""
        check_weights(self._specs(), grads, _describe_ndarray, context="apply_grads")
        for name, weight in self._weights.items():
            weight -= lr * grads[name]

    # ----------------------------------------------------------------- maths
    def _inputs(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"NumpyModel: expected X of shape (n, {self.n_features}), got {X.shape}")
        return X.astype(self.dtype, copy=False)

    def _targets(self, y: Any, n: int) -> np.ndarray:
        """Targets as Y (n × k) for regression, y ∈ {0, 1} (n × 1) for binary, int labels (n,) for multiclass."""
        y = np.asarray(y)
        k = self.n_outputs
        if self._task == "linear" or k == 1:
            if y.shape not in ((n,), (n, k)) or (k > 1 and y.ndim == 1):
                want = f"({n},) or ({n}, 1)" if k == 1 else f"({n}, {k})"
                raise ModelError(f"NumpyModel: expected y of shape {want}, got {y.shape}")
            y = y.reshape(n, k).astype(self.dtype, copy=False)
            if self._task == "logistic" and not np.all((y == 0) | (y == 1)):
                raise ModelError("NumpyModel: binary logistic regression needs labels in {0, 1}")
            return y
        if y.shape != (n,):
            raise ModelError(f"NumpyModel: expected integer labels of shape ({n},), got {y.shape}")
        if y.dtype.kind not in "iub" and not np.all(np.mod(y, 1) == 0):
            raise ModelError("NumpyModel: multiclass labels must be integers")
        labels = y.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ModelError(
                f"NumpyModel: labels must lie in [0, {k}), got range [{labels.min()}, {labels.max()}]"
            )
        return labels

    def forward(self, X: Any) -> np.ndarray:
        """Raw outputs Z = X W + b, shape (n, n_outputs)."""
        return self._inputs(X) @ self._weights["coef"] + self._weights["intercept"]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: σ(z) of shape (n,) for binary, softmax(Z) of shape (n, k) for multiclass."""
        if self._task != "logistic":
            raise ModelError("NumpyModel: predict_proba needs task='logistic'")
        Z = self.forward(X)
        if self.n_outputs == 1:
            return _sigmoid(Z[:, 0])
        return _softmax(Z)

    def predict(self, X: Any) -> np.ndarray:
        """Regression values ((n,) when one output) or class labels (int64, shape (n,))."""
        if self._task == "linear":
            Z = self.forward(X)
            return Z[:, 0] if self.n_outputs == 1 else Z
        proba = self.predict_proba(X)
        if self.n_outputs == 1:
            return (proba >= 0.5).astype(np.int64)
        return np.argmax(proba, axis=1).astype(np.int64)

    def loss(self, X: Any, y: Any) -> float:
        """The loss L of the module docstring on (X, y)."""
        return self.loss_and_grads(X, y)[0]

    def loss_and_grads(self, X: Any, y: Any) -> tuple[float, dict[str, np.ndarray]]:
        """L and {"coef": ∂L/∂W, "intercept": ∂L/∂b}, with the formulas of the module docstring."""
        X = self._inputs(X)
        n = X.shape[0]
        if n == 0:
            raise ModelError("NumpyModel: cannot compute a loss on an empty batch")
        targets = self._targets(y, n)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._loss_and_grads(X, targets)

    def _loss_and_grads(self, X: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        # Non-finite inputs or weights give a non-finite loss, without numpy warnings: training plans
        # turn it into a PlanError naming the step.
        n = X.shape[0]
        Z = X @ self._weights["coef"] + self._weights["intercept"]
        if self._task == "linear":
            diff = Z - targets
            loss = float(np.mean(diff**2))
            G = 2.0 * diff / diff.size
        elif self.n_outputs == 1:
            loss = float(np.mean(np.logaddexp(0.0, Z) - targets * Z))
            G = (_sigmoid(Z) - targets) / n
        else:
            lse = np.logaddexp.reduce(Z, axis=1)
            loss = float(np.mean(lse - Z[np.arange(n), targets]))
            G = _softmax(Z)
            G[np.arange(n), targets] -= 1.0
            G /= n
        grads = {"coef": (X.T @ G).astype(self.dtype, copy=False), "intercept": G.sum(axis=0).astype(self.dtype)}
        return loss, grads

    # ----------------------------------------------------------------- local save / restore
    def export(self, path: str | Path) -> None:
        """Write task, weights and dtype to an ``.npz`` file at exactly ``path`` (LOCAL use only, see Model)."""
        with open(path, "wb") as handle:
            np.savez(handle, task=np.array(self._task), **self._weights)

    def reload(self, path: str | Path) -> None:
        """Replace task, shapes, dtype and weights with those of a file written by :meth:`export`.

        Raises:
            ModelError: the file is no ``.npz`` archive of plain arrays, lacks an entry or holds inconsistent ones.
            OSError: the file cannot be opened.
        """
        with open(path, "rb") as handle:
            try:
                archive = np.load(handle, allow_pickle=False)
            except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not .npy/.npz, empty, truncated
                raise ModelError(f"NumpyModel.reload: {path} is not a file written by export ({exc})") from None
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ModelError(f"NumpyModel.reload: {path} holds a single .npy array, not an export archive")
            with archive:
                missing = sorted({"task", "coef", "intercept"} - set(archive.files))
                if missing:
                    raise ModelError(f"NumpyModel.reload: {path} lacks entries {missing}")
                try:
                    task, coef, intercept = str(archive["task"]), archive["coef"], archive["intercept"]
                except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # an object (pickled) or damaged entry
                    raise ModelError(f"NumpyModel.reload: {path} has an unreadable entry ({exc})") from None
        if task not in TASKS or coef.ndim != 2 or intercept.shape != (coef.shape[1],) or coef.dtype.kind != "f":
            raise ModelError(
                f"NumpyModel.reload: inconsistent file {path}: task={task!r}, coef {coef.shape} {coef.dtype}, "
                f"intercept {intercept.shape} {intercept.dtype}"
            )
        if intercept.dtype != coef.dtype:
            raise ModelError(
                f"NumpyModel.reload: coef dtype {coef.dtype} differs from intercept dtype {intercept.dtype}"
            )
        self._task = task
        self._weights = {"coef": coef.copy(), "intercept": intercept.copy()}

    def __repr__(self) -> str:
        return (
            f"NumpyModel(n_features={self.n_features}, n_outputs={self.n_outputs}, "
            f"task={self._task!r}, dtype={self.dtype})"
        )


def _describe_ndarray(name: str, value: Any) -> WeightSpec:
    """Shape and dtype name in native byte order (``>f4`` is float32: the wire may carry either order)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(value).__name__}")
    return value.shape, str(value.dtype.newbyteorder("="))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # 0.5 (1 + tanh(z / 2)) equals 1 / (1 + e^-z) and never overflows.
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(Z: np.ndarray) -> np.ndarray:
    shifted = np.exp(Z - Z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
