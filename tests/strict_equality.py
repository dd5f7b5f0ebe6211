"""``assert_deep_equal``: equality for serializer round-trips that also checks types, dtypes and shapes.

``==`` would let ``(1, 2)`` equal ``[1, 2]``, ``True`` equal ``1``, ``np.float32(1)`` equal ``1.0`` and a
``>f4`` array equal a ``<f4`` one. Here every node must have the identical type; arrays and numpy scalars
must have the identical dtype string (byte order included), shape and raw bytes (so NaN payloads and -0.0
count); floats compare NaN-aware and sign-aware; dicts compare keys in order.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Any

import numpy as np


def tensor_bytes(tensor: Any) -> bytes:
    """The raw element bytes of a torch tensor in C order (bfloat16 through its int16 view)."""
    torch = sys.modules["torch"]
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def assert_deep_equal(got: Any, want: Any, path: str = "obj") -> None:
    """Raise AssertionError naming the first path where ``got`` differs from ``want``."""
    assert type(got) is type(want), f"{path}: type {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} is not NaN"
        else:
            assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want), (
                f"{path}: {got!r} != {want!r}"
            )
    elif isinstance(want, (dict, OrderedDict)):
        assert list(got) == list(want), f"{path}: keys {list(got)!r} != {list(want)!r} (order counts)"
        for (kg, vg), (kw, vw) in zip(got.items(), want.items(), strict=True):
            assert type(kg) is type(kw), f"{path}: key {kg!r} has type {type(kg).__name__}"
            assert_deep_equal(vg, vw, f"{path}[{kw!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_deep_equal(g, w, f"{path}[{i}]")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype.str == want.dtype.str, f"{path}: dtype {got.dtype.str} != {want.dtype.str}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert got.tobytes() == want.tobytes(), f"{path}: values differ"
    elif type(want).__module__.startswith("torch"):
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert tuple(got.shape) == tuple(want.shape), (
            f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        )
        assert got.device.type == "cpu", f"{path}: decoded on {got.device}"
        assert not got.requires_grad, f"{path}: decoded tensor requires grad"
        assert tensor_bytes(got) == tensor_bytes(want), f"{path}: values differ"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
