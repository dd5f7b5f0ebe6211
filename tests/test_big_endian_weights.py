"""Big-endian arrays, which the wire carries (docs/serialization.md: ``>f4`` ... ``>c16``, "arrays keep their
byte order"), are weights of their dtype: ``set_weights`` takes them and stores the same values in native order.

Before: the Serializer decoded a ``>f4`` array as a big-endian array and ``set_weights`` refused it ("expected
dtype float32, got >f4"), so a node or researcher on a big-endian peer's parameters failed a round. Arrays go
through the real Serializer; values are compared with the native arrays they were made from.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import WeightsMismatchError
from fedcore.models import NumpyModel
from fedcore.serialization import Serializer

torch = pytest.importorskip("torch")
from fedcore.models import TorchModel


def over_the_wire(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` in big-endian order, encoded and decoded (into a writable buffer: zero-copy views)."""
    decoded = Serializer.loads(bytearray(Serializer.dumps({k: v.astype(v.dtype.newbyteorder(">"))
                                                           for k, v in weights.items()})))
    for value in decoded.values():
        assert value.dtype.byteorder in ">|"  # the wire kept the order: this is what set_weights receives
    return decoded


def test_numpy_model_takes_big_endian_weights_with_their_values() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.float16):
        model = NumpyModel(3, 2, dtype=dtype)
        sent = {"coef": rng.normal(size=(3, 2)).astype(dtype), "intercept": rng.normal(size=2).astype(dtype)}
        model.set_weights(over_the_wire(sent))
        got = model.get_weights()
        for name, value in sent.items():
            assert got[name].dtype == np.dtype(dtype) and got[name].dtype.isnative
            np.testing.assert_array_equal(got[name], value)
        model.apply_grads(over_the_wire(sent), lr=1.0)  # the same check: big-endian gradients are gradients
        np.testing.assert_array_equal(model.get_weights()["coef"], np.zeros((3, 2), dtype))


def test_numpy_model_still_refuses_another_kind_or_size_in_either_order() -> None:
    model = NumpyModel(3, 2, dtype=np.float32)
    wrong = {"coef": np.zeros((3, 2), ">f8"), "intercept": np.zeros(2, ">i4")}
    with pytest.raises(WeightsMismatchError) as info:
        model.set_weights(wrong)
    assert "'coef': expected dtype float32, got float64" in str(info.value)
    assert "'intercept': expected dtype float32, got int32" in str(info.value)


class WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)  # running_mean/var float32, num_batches_tracked 0-d int64
        self.scale = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))


def test_torch_model_takes_big_endian_weights_and_buffers_with_their_values() -> None:
    rng = np.random.default_rng(1)
    model = TorchModel(WithBuffers())
    native = {name: (rng.normal(size=t.shape) * 10).astype(t.numpy().dtype)
              for name, t in model.get_weights(exclude_buffers=False).items()}
    native["norm.num_batches_tracked"] = np.array(2**40 + 3, dtype=np.int64)  # bytes that differ when swapped
    model.set_weights(over_the_wire(native), exclude_buffers=False)
    for name, tensor in model.get_weights(exclude_buffers=False).items():
        np.testing.assert_array_equal(tensor.numpy(), native[name], err_msg=name)
        assert tensor.numpy().dtype == native[name].dtype


def test_torch_bfloat16_target_takes_big_endian_float32() -> None:
    model = TorchModel(torch.nn.Linear(2, 2).to(torch.bfloat16))
    native = {name: np.array(np.arange(t.numel()).reshape(t.shape) + 0.5, dtype=np.float32)
              for name, t in model.get_weights().items()}
    model.set_weights(over_the_wire(native))
    for name, tensor in model.get_weights().items():
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(tensor.to(torch.float32).numpy(), native[name])  # exact in bfloat16
    with pytest.raises(WeightsMismatchError, match="got a numpy >f8 array"):
        model.set_weights({name: value.astype(">f8") for name, value in native.items()})
