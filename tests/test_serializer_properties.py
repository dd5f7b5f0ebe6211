"""Property tests of the Serializer (hypothesis): round-trips of arbitrary trees with arrays of every
supported dtype, byte order and shape; plain-msgpack interop; arbitrary bytes never crash the decoder."""

from __future__ import annotations

import math
from collections import OrderedDict

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from serialization_reference import TORCH_DTYPES, unpack
from strict_equality import assert_deep_equal

from fedcore.errors import DecodeError
from fedcore.serialization import Serializer

try:
    import torch
except ImportError:
    torch = None

SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

ONE_BYTE = ["|b1", "|i1", "|u1"]
MULTI_BYTE = ["i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
ALL_DTYPES = ONE_BYTE + [order + code for code in MULTI_BYTE for order in "<>"]
NATIVE_DTYPES = ONE_BYTE + ["=" + code for code in MULTI_BYTE]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@st.composite
def bit_arrays(draw, dtypes=ALL_DTYPES, shapes=SHAPES) -> np.ndarray:
    """Arrays whose elements are arbitrary bit patterns (NaN payloads, subnormals, -0.0); bools are 0/1."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(shapes)
    n = math.prod(shape)
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def strided_views(draw) -> np.ndarray:
    """Non-contiguous views: steps, reversal, transposition, Fortran order."""
    arr = draw(bit_arrays(shapes=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)))
    how = draw(st.sampled_from(["step", "reverse", "transpose", "fortran"]))
    if how == "step":
        return arr[(slice(None, None, draw(st.integers(2, 3))),) * arr.ndim]
    if how == "reverse":
        return arr[::-1]
    if how == "transpose":
        return arr.T
    return np.asfortranarray(arr)


value_arrays = hnp.arrays(dtype=st.sampled_from(ALL_DTYPES), shape=SHAPES)
numpy_scalars = bit_arrays(dtypes=NATIVE_DTYPES, shapes=st.just(())).map(lambda a: a[()])
keys = st.one_of(st.text(max_size=8), INT64)


FLOAT64 = st.floats()


def make_plain_leaves(floats=FLOAT64):
    return st.one_of(st.none(), st.booleans(), INT64, floats, st.text(max_size=20), st.binary(max_size=20))


def make_plain_trees(floats=FLOAT64):
    """JSON-like trees plus bytes and int keys: what plain msgpack carries without ext types."""
    return st.recursive(
        make_plain_leaves(floats),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=16,
    )


plain_leaves = make_plain_leaves()
leaves = st.one_of(plain_leaves, value_arrays, bit_arrays(), strided_views(), numpy_scalars)


def containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(lambda d: OrderedDict(d.items())),
    )


trees = st.recursive(leaves, containers, max_leaves=12)
plain_trees = make_plain_trees()


def contiguous_copy(obj):
    """What a round-trip should return: the same tree with every array C-contiguous."""
    if isinstance(obj, np.ndarray):
        return obj.copy(order="C")  # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    if isinstance(obj, (list, tuple)):
        return type(obj)(contiguous_copy(v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, contiguous_copy(v)) for k, v in obj.items())
    return obj


def all_arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_arrays(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_arrays(v)


@SETTINGS
@given(trees)
def test_any_tree_roundtrips_with_types_dtypes_and_shapes(tree):
    blob = Serializer.dumps(tree)
    want = contiguous_copy(tree)
    for data, kwargs in ((blob, {}), (bytearray(blob), {}), (bytearray(blob), {"copy": True})):
        out = Serializer.loads(data, **kwargs)
        assert_deep_equal(out, want)
        assert all(a.flags.writeable and a.flags.c_contiguous for a in all_arrays(out))
    doc = Serializer.encode(tree)
    assert doc.tobytes() == blob and doc.nbytes == len(blob)
    msgpack.unpackb(blob, strict_map_key=False)  # a valid msgpack document for a stock reader
    assert_deep_equal(unpack(blob), want)  # and readable from the format doc alone


@SETTINGS
@given(st.one_of(bit_arrays(), value_arrays, strided_views()))
def test_arrays_of_every_dtype_byte_order_and_shape_keep_their_exact_bytes(arr):
    out = Serializer.loads(Serializer.dumps(arr))
    assert type(out) is np.ndarray and out.dtype.str == arr.dtype.str and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()
    if arr.dtype.kind in "fc":
        assert np.array_equal(out, arr, equal_nan=True)
    else:
        assert np.array_equal(out, arr)


@SETTINGS
@given(plain_trees)
def test_plain_trees_are_byte_identical_to_msgpack_and_decode_the_same(tree):
    blob = Serializer.dumps(tree)
    assert blob == msgpack.packb(tree)
    ours = Serializer.loads(blob)
    assert_deep_equal(ours, msgpack.unpackb(blob, strict_map_key=False))
    assert_deep_equal(ours, tree)


@SETTINGS
@given(make_plain_trees(st.floats(width=32)))
def test_stock_msgpack_output_with_single_floats_decodes_like_msgpack(tree):
    blob = msgpack.packb(tree, use_single_float=True)
    assert_deep_equal(Serializer.loads(blob), msgpack.unpackb(blob, strict_map_key=False))


def decode_or_refuse(data) -> None:
    """``loads`` either returns or raises DecodeError; whatever it returns encodes and round-trips again."""
    try:
        value = Serializer.loads(data)
    except DecodeError:
        return
    again = Serializer.loads(Serializer.dumps(value))
    assert_deep_equal(again, contiguous_copy(value))


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(data):
    decode_or_refuse(data)
    decode_or_refuse(bytearray(data))


@SETTINGS
@given(trees, st.data())
def test_bit_flips_and_splices_of_valid_documents_decode_or_raise_decode_error(tree, data):
    blob = bytearray(Serializer.dumps(tree))
    how = data.draw(st.sampled_from(["flip", "byte", "delete", "insert"]))
    at = data.draw(st.integers(0, len(blob) - 1))
    if how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4)):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "byte":
        blob[at] = data.draw(st.integers(0, 255))
    elif how == "delete":
        del blob[at : at + data.draw(st.integers(1, 8))]
    else:
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    decode_or_refuse(bytes(blob))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_every_proper_prefix_of_a_document_is_a_decode_error(tree):
    blob = Serializer.dumps(tree)
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            Serializer.loads(blob[:cut])




@st.composite
def tensors(draw):
    name = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(SHAPES)
    if name == "bfloat16":
        bits = draw(bit_arrays(dtypes=["=i2"], shapes=st.just(shape)))
        t = torch.from_numpy(bits).view(torch.bfloat16)
    else:
        numpy_name = {"bool": "|b1", "complex64": "=c8", "complex128": "=c16"}.get(
            name, "=" + np.dtype(name).str[1:]
        )
        t = torch.from_numpy(draw(bit_arrays(dtypes=[numpy_name], shapes=st.just(shape))))
    if draw(st.booleans()) and t.ndim >= 2:
        t = t.transpose(0, 1)  # a non-contiguous view
    if draw(st.booleans()) and (t.dtype.is_floating_point or t.dtype.is_complex):
        t.requires_grad_(True)
    return t


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@SETTINGS
@given(
    st.lists(tensors(), max_size=3).map(lambda ts: OrderedDict((f"layer{i}", t) for i, t in enumerate(ts)))
)
def test_torch_state_dicts_roundtrip_bit_for_bit(state):
    blob = Serializer.dumps(state)
    for data in (blob, bytearray(blob)):
        out = Serializer.loads(data)
        assert type(out) is OrderedDict and list(out) == list(state)
        for name, t in state.items():
            assert type(out[name]) is torch.Tensor and out[name].is_contiguous()
            assert_deep_equal(out[name], t.detach())
