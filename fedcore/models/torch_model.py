"""``TorchModel``: a ``torch.nn.Module`` behind the fedcore ``Model`` API (imports torch)."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore.errors import ModelError
from fedcore.models._api import Model, WeightSpec, check_weights

__all__ = ["TorchModel"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the same spelling numpy uses, so names compare directly."""
    return str(dtype).removeprefix("torch.")


class TorchModel(Model):
    """Named parameters (and, on request, persistent buffers) of a ``torch.nn.Module``.

    Names are the module's ``state_dict`` keys. Buffers are the persistent non-parameter entries of the
    state dict (e.g. batch-norm running statistics); non-persistent buffers are never exchanged.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"TorchModel wraps a torch.nn.Module, got {type(module).__name__}")
        self._module = module

    @property
    def model(self) -> torch.nn.Module:
        return self._module

    def _entries(self, only_trainable: bool, exclude_buffers: bool) -> dict[str, torch.Tensor]:
        """The live tensors ``get_weights`` copies, in ``state_dict`` order."""
        params = dict(self._module.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self._module.state_dict(keep_vars=True).items():
            if name in params:
                if only_trainable and not params[name].requires_grad:
                    continue
            elif exclude_buffers:
                continue
            out[name] = tensor
        return out

    def get_weights(self, only_trainable: bool = False, exclude_buffers: bool = True) -> dict[str, torch.Tensor]:
        """``{name: tensor.detach().clone()}``; see :func:`fedcore.models.weights_to_numpy` for the wire."""
        return {
            name: tensor.detach().clone()
            for name, tensor in self._entries(only_trainable, exclude_buffers).items()
        }

    def set_weights(
        self, weights: Mapping[str, Any], *, only_trainable: bool = False, exclude_buffers: bool = True
    ) -> None:
        """Copy torch tensors or numpy arrays into the module, under ``torch.no_grad()``.

        The names must be exactly those of ``get_weights(only_trainable, exclude_buffers)``; every value
        must have the target's shape and dtype, with one exception: numpy has no bfloat16, so the wire
        carries bfloat16 weights as float32 (:func:`fedcore.models.weights_to_numpy`), and a bfloat16
        target also takes a float32 *numpy array*, narrowed by torch (``copy_``, as ``.to(torch.bfloat16)``: round to
        nearest, ties to even; exact for values that came from bfloat16, e.g. an unchanged round trip).
        Any other dtype mismatch, a float32 torch tensor for a bfloat16 target included, is refused. The byte
        order of a numpy array is free (the wire keeps it, docs/serialization.md): ``>f4`` is float32, converted
        to native order (same values) before the copy.

        Raises:
            WeightsMismatchError: listing every unknown, missing, mis-shaped or mis-typed entry; no
                tensor is modified when it is raised.
        """
        targets = self._entries(only_trainable, exclude_buffers)
        specs: dict[str, WeightSpec] = {
            name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in targets.items()
        }
        params = dict(self._module.named_parameters(remove_duplicate=False))
        hints = {
            name: "a frozen parameter: pass only_trainable=False to set it"
            if name in params
            else "a buffer: pass exclude_buffers=False to set it"
            for name in self._entries(only_trainable=False, exclude_buffers=False)
            if name not in targets
        }
        check_weights(specs, weights, _describe_value(targets), hints)
        with torch.no_grad():
            for name, target in targets.items():
                value = weights[name]
                if isinstance(value, np.ndarray):
                    value = _readonly_tensor(value)
                # a float32 array for a bfloat16 target (its wire form) is narrowed by copy_ itself: round to
                # nearest, ties to even, on the float32 bits b: (b + 0x7FFF + ((b >> 16) & 1)) >> 16 (finite
                # values; beyond bfloat16's range: ±inf; NaN stays NaN); widened bfloat16 comes back bit for bit
                target.copy_(value)

    def buffer_names(self) -> list[str]:
        """The persistent buffers' ``state_dict`` names (non-persistent buffers are not in the state dict)."""
        params = dict(self._module.named_parameters(remove_duplicate=False))
        return [name for name in self._module.state_dict(keep_vars=True) if name not in params]

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self._module.parameters()))

    def export(self, path: str | Path) -> None:
        """``torch.save`` of the whole module (pickle: LOCAL use only, see Model.export)."""
        torch.save(self._module, path)

    def reload(self, path: str | Path) -> None:
        """Replace the module with the one pickled at ``path`` by :meth:`export`.

        UNSAFE: unpickling runs arbitrary code; only reload files you exported yourself.

        Raises:
            ModelError: the file cannot be unpickled or does not hold a ``torch.nn.Module``.
            OSError: the file cannot be opened.
        """
        try:
            module = torch.load(path, weights_only=False)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, AttributeError, ImportError) as exc:
            # garbage, empty, a damaged zip archive, or a class the pickle names that cannot be found
            raise ModelError(f"TorchModel.reload: cannot load {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"TorchModel.reload: {path} holds a {type(module).__name__}, not a torch.nn.Module")
        self._module = module

    def __repr__(self) -> str:
        return f"TorchModel({type(self._module).__name__}, {self.num_parameters()} parameters)"


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of ``array`` that will only be read (zero-copy decoded arrays are read-only); a copy in
    native byte order when it has the other one (torch.from_numpy refuses it)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # torch warns that writing through a view of a read-only array is undefined; we only read.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        # not np.ascontiguousarray: it turns a 0-d array (e.g. BatchNorm's num_batches_tracked) into 1-d
        return torch.from_numpy(np.require(array, requirements="C"))


def _describe_value(targets: Mapping[str, torch.Tensor]) -> Callable[[str, Any], WeightSpec]:
    def describe(name: str, value: Any) -> WeightSpec:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), dtype_name(value.dtype)
        if isinstance(value, np.ndarray):
            native = value.dtype.newbyteorder("=")  # either byte order: converted in _readonly_tensor
            if targets[name].dtype == torch.bfloat16:
                if native == np.float32:  # the wire form of bfloat16: narrowed in set_weights
                    return value.shape, "bfloat16"
                raise TypeError(
                    f"expected a bfloat16 torch tensor or a float32 numpy array (narrowed to bfloat16), got "
                    f"a numpy {value.dtype} array (numpy has no bfloat16; convert with "
                    "torch.from_numpy(a).to(torch.bfloat16))"
                )
            return value.shape, str(native)
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")

    return describe
