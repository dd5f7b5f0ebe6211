"""The ``Model`` interface every fedcore model wrapper implements, and the weight checks they share.

A ``Model`` wraps a framework-native model (a numpy linear model, a ``torch.nn.Module``) behind one
API: named weights in and out (``get_weights`` / ``set_weights``), a parameter count, and a local,
*unsafe* save/restore (``export`` / ``reload``). Weights travel between node and researcher as
``dict[str, numpy.ndarray]`` (see :func:`weights_to_numpy`) so that the researcher needs no torch.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import WeightsMismatchError

__all__ = ["Model", "WeightSpec", "check_weights", "weights_to_numpy"]

WeightSpec = tuple[tuple[int, ...], str]
"""What a model expects for one named weight: ``(shape, dtype name)``, e.g. ``((3, 2), "float32")``."""


class Model(ABC):
    """A framework-native model behind the API the training plans and the node runner use.

    ``only_trainable`` keeps only weights that training updates; ``exclude_buffers`` drops non-trainable
    state such as batch-norm running statistics. ``set_weights`` takes the same flags and requires
    *exactly* the names ``get_weights`` would return with them, so a round trip is always accepted.
    """

    @property
    @abstractmethod
    def model(self) -> Any:
        """The wrapped framework-native model."""

    @abstractmethod
    def get_weights(self, only_trainable: bool = False, exclude_buffers: bool = True) -> dict[str, Any]:
        """Return copies of the named weights (mutating them never changes the model)."""

    @abstractmethod
    def set_weights(
        self, weights: Mapping[str, Any], *, only_trainable: bool = False, exclude_buffers: bool = True
    ) -> None:
        """Assign weights after checking all of them (names, shapes, dtypes).

        Raises:
            WeightsMismatchError: naming every unknown, missing, mis-shaped or mis-typed weight;
                nothing is assigned when it is raised.
        """

    def buffer_names(self) -> list[str]:
        """Names of the persistent buffers (BatchNorm's running statistics) among ``get_weights(exclude_buffers=
        False)``, in its order; models without buffers (``NumpyModel``) have none."""
        return []

    @abstractmethod
    def num_parameters(self) -> int:
        """Number of scalar parameters (trainable or not, buffers excluded)."""

    @abstractmethod
    def export(self, path: str | Path) -> None:
        """Save the whole model to ``path`` in the framework's native format, for LOCAL re-use only.

        UNSAFE: the formats may execute code when loaded (pickle for torch). Never send an exported
        file over the wire and never reload a file you did not write yourself.
        """

    @abstractmethod
    def reload(self, path: str | Path) -> None:
        """Replace the wrapped model with one written by :meth:`export` (same UNSAFE caveat)."""


def check_weights(
    expected: Mapping[str, WeightSpec],
    weights: Any,
    describe: Callable[[str, Any], WeightSpec],
    hints: Mapping[str, str] | None = None,
    context: str = "set_weights",
) -> None:
    """Check ``weights`` against ``expected`` and raise one error that lists every problem.

    ``describe(name, value)`` returns the ``(shape, dtype name)`` of a given value, or raises
    ``TypeError`` with a message when the value is not an acceptable array. ``hints`` optionally
    explains why a name is unknown (e.g. it is a buffer and buffers were excluded); ``context`` names
    the operation in the message.

    Raises:
        WeightsMismatchError: unknown names, missing names, shape or dtype mismatches.
    """
    if not isinstance(weights, Mapping):
        raise WeightsMismatchError(
            f"weights must be a mapping of name -> array, got {type(weights).__name__}"
        )
    problems: list[str] = []
    unknown = [name for name in weights if name not in expected]
    missing = [name for name in expected if name not in weights]
    for name in unknown:
        hint = (hints or {}).get(name) if isinstance(name, str) else None
        problems.append(f"unknown name {name!r}" + (f" ({hint})" if hint else ""))
    if missing:
        problems.append(f"missing names {missing}")
    for name, (shape, dtype) in expected.items():
        if name not in weights:
            continue
        try:
            got_shape, got_dtype = describe(name, weights[name])
        except TypeError as exc:
            problems.append(f"{name!r}: {exc}")
            continue
        if tuple(got_shape) != tuple(shape):
            problems.append(f"{name!r}: expected shape {tuple(shape)}, got {tuple(got_shape)}")
        if got_dtype != dtype:
            problems.append(f"{name!r}: expected dtype {dtype}, got {got_dtype}")
    if problems:
        raise WeightsMismatchError(
            f"{context} refused ({len(problems)} problem(s)), nothing was assigned: " + "; ".join(problems)
        )


def weights_to_numpy(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Return ``weights`` as numpy arrays, ready for the wire (the researcher needs no torch).

    numpy arrays pass through unchanged; torch tensors are detached and moved to the CPU (a CPU tensor
    shares its memory with the returned array: no copy, so pass copies such as ``get_weights()``'s).
    Note: numpy has no bfloat16, so bfloat16 tensors become float32 arrays. That widening is exact
    (every bfloat16 value is a float32 value). ``TorchModel.set_weights`` takes such float32 arrays for
    bfloat16 targets and narrows them (round to nearest even): exact for unchanged values, rounded for
    float32 results computed from them (an aggregate, say).

    Raises:
        WeightsMismatchError: a value is neither a numpy array nor a torch tensor.
    """
    torch = sys.modules.get("torch")  # no tensor can exist unless torch was imported
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif torch is not None and isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.to(torch.float32)
            out[name] = tensor.numpy()
        else:
            raise WeightsMismatchError(
                f"weight {name!r}: expected a numpy array or a torch tensor, got {type(value).__name__}"
            )
    return out
