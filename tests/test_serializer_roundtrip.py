"""Serializer round-trips: value, type, dtype (byte order included) and shape survive; zero-copy holds."""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict

import msgpack
import numpy as np
import pytest
from serialization_reference import TORCH_DTYPES, array_payload, unpack
from strict_equality import assert_deep_equal

from fedcore.errors import DecodeError, EncodeError
from fedcore.serialization import EncodedDocument, Serializer, SerializerLimits

try:
    import torch
except ImportError:  # the numpy half of the suite must run without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# Every supported numpy dtype, in both byte orders where byte order means something.
ONE_BYTE = ["|b1", "|i1", "|u1"]
MULTI_BYTE = ["i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
ALL_DTYPES = ONE_BYTE + [order + code for code in MULTI_BYTE for order in "<>"]


def roundtrip(obj, **kwargs):
    return Serializer.loads(Serializer.dumps(obj), **kwargs)


def random_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, subnormals, -0.0 ...) of ``dtype``; bools are 0 or 1."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dt)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def buffer_range(buf) -> tuple[int, int]:
    base = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    return base, base + len(buf)


# -- plain values ---------------------------------------------------------------------------------
PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    255,
    256,
    -32,
    -33,
    -128,
    -129,
    65535,
    65536,
    -32769,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    -(2**63) + 1,
    0.0,
    -0.0,
    1.5,
    -2.25,
    1e308,
    5e-324,
    -5e-324,
    math.inf,
    -math.inf,
    math.nan,
    0.1,
    "",
    "a",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🎉🧬",
    "\x00nul\x00",
    "x" * 31,
    "y" * 32,
    "z" * 70_000,
    b"",
    b"\x00",
    bytes(range(256)),
    b"\xff" * 70_000,
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: repr(v)[:30])
def test_plain_value_roundtrips_with_its_type(value):
    assert_deep_equal(roundtrip(value), value)
    # Plain values are plain msgpack, byte for byte what the reference packer writes.
    assert Serializer.dumps(value) == msgpack.packb(value, use_bin_type=True)


def test_float_is_written_as_float64_and_keeps_negative_zero_and_nan():
    blob = Serializer.dumps(-0.0)
    assert blob[0] == 0xCB and len(blob) == 9
    out = roundtrip([-0.0, math.nan, math.inf])
    assert math.copysign(1.0, out[0]) == -1.0
    assert math.isnan(out[1]) and out[2] == math.inf


@pytest.mark.parametrize("make", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_bytearray_and_memoryview_decode_as_bytes(make):
    out = roundtrip({"b": make(b"\x01\x02\xff")})
    assert type(out["b"]) is bytes and out["b"] == b"\x01\x02\xff"


def test_lists_nest_and_stay_lists():
    obj = [[], [1, [2, [3, []]]], ["a", b"b", None, 1.5]]
    assert_deep_equal(roundtrip(obj), obj)


def test_tuples_stay_tuples_at_every_level():
    obj = ((), (1,), (1, (2, (3, ()))), [(4, [5, (6,)])], {"t": (None, "x", b"y", (1.5,))})
    out = roundtrip(obj)
    assert_deep_equal(out, obj)
    assert type(out[2][1][1]) is tuple and type(out[3][0][1]) is list


def test_dicts_with_str_and_int_keys_keep_key_types_and_insertion_order():
    obj = {"b": 1, 3: "three", "a": [1], -7: {0: "zero", 2**63: "big", -(2**63): "small"}, "": None}
    out = roundtrip(obj)
    assert_deep_equal(out, obj)
    assert list(out) == ["b", 3, "a", -7, ""]


def test_ordereddict_keeps_type_and_order_nested():
    inner = OrderedDict([("z", 1), ("a", 2), (5, 3)])
    obj = OrderedDict([("second", inner), ("first", {"plain": OrderedDict()}), (0, (inner,))])
    out = roundtrip(obj)
    assert_deep_equal(out, obj)
    assert type(out["first"]) is dict and type(out["first"]["plain"]) is OrderedDict
    assert list(out["second"]) == ["z", "a", 5]


def test_user_dict_that_looks_like_an_encoded_array_roundtrips_as_a_dict():
    data = np.array([1.0, 2.0], "<f4").tobytes()
    lookalike = {"__type__": "np.ndarray", "dtype": "<f4", "shape": [2], "data": data}
    obj = {"user": lookalike, "ordered": OrderedDict(lookalike), "nested": [lookalike, (lookalike,)]}
    assert_deep_equal(roundtrip(obj), obj)
    # No meaning is given to keys: the dict is a plain msgpack map, identical to msgpack's own bytes.
    assert Serializer.dumps(lookalike) == msgpack.packb(lookalike, use_bin_type=True)
    assert_deep_equal(
        roundtrip({"__tuple__": [1, 2], "__ordered__": True}), {"__tuple__": [1, 2], "__ordered__": True}
    )


def test_nesting_up_to_the_depth_limit_roundtrips():
    obj: list = []
    for _ in range(99):  # 100 nested lists in all: the default limit
        obj = [obj]
    assert_deep_equal(roundtrip(obj), obj)
    limits = SerializerLimits(max_depth=3)
    shallow = [[[1]]]
    assert_deep_equal(Serializer.loads(Serializer.dumps(shallow, limits), limits=limits), shallow)


# -- numpy arrays ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(5,), (2, 3), (), (0,), (0, 3), (3, 0, 2), (1, 1, 1, 1)], ids=str)
def test_every_dtype_and_byte_order_roundtrips(dtype, shape):
    arr = random_array(dtype, shape, seed=len(shape))
    out = roundtrip(arr)
    assert type(out) is np.ndarray
    assert out.dtype.str == np.dtype(dtype).str  # byte order survives: '>f4' comes back '>f4'
    assert out.shape == shape and out.ndim == len(shape)
    assert out.tobytes() == arr.tobytes()
    assert out.flags.writeable and out.flags.c_contiguous


def test_big_endian_float32_keeps_its_byte_order_and_values():
    arr = np.array([1.5, -2.0, np.inf], dtype=">f4")
    out = roundtrip(arr)
    assert out.dtype.str == ">f4" and out.dtype.byteorder == ">"
    np.testing.assert_array_equal(out, [1.5, -2.0, np.inf])


def test_zero_d_array_stays_a_zero_d_ndarray_not_a_scalar():
    out = roundtrip(np.array(3.25, dtype="<f8"))
    assert type(out) is np.ndarray and out.shape == () and out[()] == 3.25


def test_empty_arrays_keep_their_shape():
    for shape in [(0,), (0, 3), (3, 0), (2, 0, 4)]:
        out = roundtrip(np.zeros(shape, dtype="<f4"))
        assert type(out) is np.ndarray and out.shape == shape and out.dtype.str == "<f4"


@pytest.mark.parametrize("size", [18, 60_000], ids=["small", "large"])
def test_non_contiguous_and_fortran_arrays_come_back_c_contiguous_and_equal(size):
    base = random_array("<f8", (size // 6, 6), seed=3)
    variants = {
        "strided": base[:, ::2],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
        "reversed": base[::-1],
        "big_endian_fortran": np.asfortranarray(random_array(">i4", base.shape, seed=5)),
        "broadcast": np.broadcast_to(base[0], (4, 6)),  # zero strides, read-only
    }
    out = roundtrip(variants)
    for name, arr in variants.items():
        got = out[name]
        assert type(got) is np.ndarray and got.flags.c_contiguous and got.flags.writeable, name
        assert got.dtype.str == arr.dtype.str and got.shape == arr.shape, name
        assert got.tobytes() == np.ascontiguousarray(arr).tobytes(), name


NUMPY_SCALARS = [
    np.bool_(True),
    np.bool_(False),
    np.int8(-128),
    np.uint8(255),
    np.int16(-2),
    np.uint16(65535),
    np.int32(-(2**31)),
    np.uint32(2**32 - 1),
    np.int64(-(2**63)),
    np.uint64(2**64 - 1),
    np.float16(1.5),
    np.float32(-0.0),
    np.float64(np.nan),
    np.float32(np.inf),
    np.complex64(1 - 2j),
    np.complex128(complex(np.nan, -0.0)),
]


@pytest.mark.parametrize("scalar", NUMPY_SCALARS, ids=lambda s: f"{type(s).__name__}({s})")
def test_numpy_scalars_stay_numpy_scalars_of_the_same_dtype(scalar):
    blob = Serializer.dumps(scalar)
    assert msgpack.unpackb(blob).code == 2  # the numpy-scalar ext, not an array or a Python number
    out = Serializer.loads(blob)
    assert type(out) is type(scalar) and out.dtype == scalar.dtype
    assert out.tobytes() == scalar.tobytes()
    assert_deep_equal(roundtrip({"s": [scalar]}), {"s": [scalar]})


def test_numpy_float64_is_not_confused_with_float_nor_bool_with_numpy_bool():
    obj = [np.float64(1.0), 1.0, np.bool_(True), True, np.int64(1), 1]
    out = roundtrip(obj)
    assert [type(v) for v in out] == [np.float64, float, np.bool_, bool, np.int64, int]


# -- zero-copy and copy rules ---------------------------------------------------------------------
BIG = 1 << 20  # one million elements: 4-8 MB arrays


@pytest.fixture(scope="module")
def big_doc() -> tuple[dict, bytes]:
    obj = {
        "w": random_array("<f4", (BIG // 4, 4), seed=1),
        "b": random_array(">f8", (BIG,), seed=2),
        "c": random_array("<c16", (1000,), seed=3),
        "t": (np.arange(BIG, dtype="<i8"),),
        "small": np.arange(3, dtype="<i2"),
    }
    return obj, Serializer.dumps(obj)


def test_big_arrays_roundtrip_exactly(big_doc):
    obj, blob = big_doc
    assert len(blob) > 20_000_000
    assert_deep_equal(Serializer.loads(blob), obj)


@pytest.mark.parametrize("as_numpy", [False, True], ids=["bytearray", "uint8-array"])
def test_loads_from_a_writable_buffer_is_zero_copy_and_writable(big_doc, as_numpy):
    obj, blob = big_doc
    buf = bytearray(blob)
    data = np.frombuffer(buf, np.uint8) if as_numpy else buf
    out = Serializer.loads(data)
    assert_deep_equal(out, obj)
    whole = np.frombuffer(buf, np.uint8)
    lo, hi = buffer_range(buf)
    for arr in (out["w"], out["b"], out["c"], out["t"][0]):
        assert np.shares_memory(arr, whole)
        ptr = arr.__array_interface__["data"][0]
        assert lo <= ptr and ptr + arr.nbytes <= hi
        assert (ptr - lo) % 64 == 0  # the encoder pads big arrays to 64 bytes from the document start
        assert arr.flags.writeable
    out["w"][0, 0] = 42.0  # a view: writing through it changes the buffer
    w_off = out["w"].__array_interface__["data"][0] - lo
    assert np.frombuffer(buf, dtype="<f4", count=1, offset=w_off)[0] == 42.0


def test_loads_from_bytes_copies_once_and_arrays_are_writable(big_doc):
    obj, blob = big_doc
    out = Serializer.loads(blob)
    source = np.frombuffer(blob, np.uint8)
    for arr in (out["w"], out["b"], out["c"], out["t"][0], out["small"]):
        assert arr.flags.writeable and not np.shares_memory(arr, source)
    out["w"][:] = 0  # must not touch the immutable input
    assert Serializer.loads(blob)["w"].tobytes() == obj["w"].tobytes()


def test_copy_true_always_copies(big_doc):
    obj, blob = big_doc
    buf = bytearray(blob)
    out = Serializer.loads(buf, copy=True)
    whole = np.frombuffer(buf, np.uint8)
    for arr in (out["w"], out["b"], out["c"], out["t"][0], out["small"]):
        assert arr.flags.writeable and not np.shares_memory(arr, whole)
    assert_deep_equal(out, obj)


def test_encode_segments_join_to_dumps_and_keep_big_arrays_as_views(big_doc):
    obj, blob = big_doc
    doc = Serializer.encode(obj)
    assert isinstance(doc, EncodedDocument)
    assert doc.tobytes() == blob and doc.nbytes == len(blob)
    assert sum(memoryview(s).nbytes for s in doc.segments) == doc.nbytes
    assert any(
        np.shares_memory(np.frombuffer(s, np.uint8), obj["w"])
        for s in doc.segments
        if isinstance(s, memoryview)
    )


def test_worked_alignment_holds_inside_tuples_and_ordereddicts():
    arr = random_array("<f8", (300,), seed=4)  # 2400 bytes: padded
    obj = OrderedDict([("x", "odd-length-key-to-shift-offsets"), ("t", (1, "a", arr))])
    buf = bytearray(Serializer.dumps(obj))
    out = Serializer.loads(buf)
    lo, _ = buffer_range(buf)
    got = out["t"][2]
    assert np.shares_memory(got, np.frombuffer(buf, np.uint8))
    assert (got.__array_interface__["data"][0] - lo) % 64 == 0
    assert_deep_equal(out, obj)


@pytest.mark.parametrize("nbytes, padded", [(1024, True), (4096, True), (1016, False), (504, False)])
def test_encoder_layout_of_a_top_level_array_follows_the_doc(nbytes, padded):
    arr = random_array("<f8", (nbytes // 8,), seed=6)
    blob = Serializer.dumps(arr)
    if nbytes >= 512:  # arrays of 512 bytes or more are written as ext 32
        assert blob[0] == 0xC9 and struct.unpack(">I", blob[1:5])[0] == len(blob) - 6 and blob[5] == 1
        head = 6
    else:
        assert blob[0] == 0xC8 and blob[3] == 1  # ext 16
        head = 4
    assert blob[head : head + 4] == b"\x03<f8" and blob[head + 4] == 1
    assert struct.unpack(">Q", blob[head + 5 : head + 13])[0] == nbytes // 8
    pad = blob[head + 13]
    data_at = head + 14 + pad
    assert blob[head + 14 : data_at] == bytes(pad)  # padding is zeros
    assert blob[data_at:] == arr.tobytes()
    if padded:
        assert data_at % 64 == 0
    else:
        assert pad == 0


def test_views_that_would_be_misaligned_are_copied():
    obj = {
        "big": random_array("<f8", (1000,), seed=8),
        "small": np.arange(5, dtype="<i8"),
        "c": np.ones(3, "<c16"),
    }
    blob = Serializer.dumps(obj)
    for shift in range(1, 8):
        buf = bytearray(bytes(shift) + blob)
        out = Serializer.loads(memoryview(buf)[shift:])
        assert_deep_equal(out, obj)
        whole = np.frombuffer(buf, np.uint8)
        for name, arr in out.items():
            assert arr.flags.aligned and arr.flags.writeable, (shift, name)
            if not np.shares_memory(arr, whole):
                continue
            assert arr.__array_interface__["data"][0] % arr.dtype.alignment == 0, (shift, name)
        assert not np.shares_memory(out["big"], whole) or shift % 8 == 0


def test_fortran_ordered_input_buffer_is_read_in_logical_order():
    blob = Serializer.dumps([1, 2, 3, 4, 5])
    assert len(blob) == 6
    fortran = np.asfortranarray(np.frombuffer(blob, np.uint8).reshape(2, 3))
    assert Serializer.loads(fortran) == [1, 2, 3, 4, 5]


# -- files ----------------------------------------------------------------------------------------
def test_dump_and_load_roundtrip_through_a_file(tmp_path, big_doc):
    obj, blob = big_doc
    path = tmp_path / "state.msgpack"
    written = Serializer.dump(obj, path)
    assert written == path.stat().st_size == len(blob)
    assert path.read_bytes() == blob
    out = Serializer.load(path)
    assert_deep_equal(out, obj)
    assert out["w"].flags.writeable and out["t"][0].flags.writeable
    assert_deep_equal(Serializer.load(str(path)), obj)  # str paths too


def test_dump_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "state.msgpack"
    Serializer.dump({"round": 1, "w": np.ones(3)}, path)
    Serializer.dump({"round": 2}, path)
    assert Serializer.load(path) == {"round": 2}
    assert os.listdir(tmp_path) == ["state.msgpack"]


def test_dump_is_atomic_when_encoding_fails(tmp_path):
    path = tmp_path / "state.msgpack"
    Serializer.dump({"round": 1}, path)
    before = path.read_bytes()
    bad = {"w": np.ones(1000), "params": {"fc.weight": {1, 2}}}
    with pytest.raises(EncodeError, match=r"set"):
        Serializer.dump(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.msgpack"]  # no temporary file left behind
    with pytest.raises(EncodeError):
        Serializer.dump(bad, tmp_path / "never.msgpack")
    assert os.listdir(tmp_path) == ["state.msgpack"]


def test_load_names_the_file_when_it_is_corrupt(tmp_path):
    path = tmp_path / "broken.msgpack"
    path.write_bytes(Serializer.dumps({"w": np.ones(4)})[:-3])
    with pytest.raises(DecodeError, match=r"broken\.msgpack"):
        Serializer.load(path)


# -- torch ----------------------------------------------------------------------------------------


def make_tensor(dtype_name: str, shape: tuple[int, ...], seed: int = 0):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return (
            torch.randn(shape, generator=gen, dtype=torch.complex64 if dtype.is_complex else torch.float32)
            * 100
        ).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


@needs_torch
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (), (0, 3), (700,)], ids=str)
def test_torch_tensors_roundtrip_with_dtype_and_shape(dtype_name, shape):
    t = make_tensor(dtype_name, shape)
    blob = Serializer.dumps(t)
    assert msgpack.unpackb(blob).code == 3
    out = Serializer.loads(blob)
    assert type(out) is torch.Tensor and out.dtype == t.dtype and tuple(out.shape) == shape
    assert_deep_equal(out, t)


@needs_torch
def test_tensor_requiring_grad_decodes_detached_with_the_same_values():
    t = torch.randn(4, 5, requires_grad=True)
    y = t * 2  # a non-leaf with a grad_fn
    out = roundtrip({"leaf": t, "nonleaf": y})
    for got, want in ((out["leaf"], t), (out["nonleaf"], y)):
        assert not got.requires_grad and got.grad_fn is None and got.is_leaf
        assert torch.equal(got, want.detach())


@needs_torch
def test_non_contiguous_and_conjugated_tensors_roundtrip_as_values():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    z = torch.randn(3, 3, dtype=torch.complex64)
    variants = {"t": base.t(), "strided": base[:, ::3], "expanded": base[0].expand(4, 10), "conj": z.conj()}
    out = roundtrip(variants)
    for name, want in variants.items():
        assert out[name].is_contiguous(), name
        assert torch.equal(out[name], want.resolve_conj()), name
    assert not out["conj"].is_conj()


@needs_torch
def test_parameter_decodes_as_a_plain_tensor_with_the_same_values():
    p = torch.nn.Parameter(torch.randn(3, 2))
    out = roundtrip(p)
    assert type(out) is torch.Tensor and not out.requires_grad
    assert_deep_equal(out, p.detach())


@needs_torch
def test_state_dict_roundtrips_as_an_ordered_dict_of_tensors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 8))  # moves the BatchNorm running statistics
    sd = model.state_dict()
    out = roundtrip(sd)
    assert type(out) is OrderedDict and list(out) == list(sd)
    assert out["1.num_batches_tracked"].dtype == torch.int64 and out["1.num_batches_tracked"].shape == ()
    assert_deep_equal(out, OrderedDict((k, v) for k, v in sd.items()))
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    fresh.load_state_dict(out)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True))


@needs_torch
def test_big_tensors_are_zero_copy_views_of_a_writable_buffer():
    tensors = {"f": torch.randn(BIG), "bf": torch.randn(BIG // 2).to(torch.bfloat16)}
    buf = bytearray(Serializer.dumps(tensors))
    out = Serializer.loads(buf)
    lo, hi = buffer_range(buf)
    for name in tensors:
        ptr = out[name].data_ptr()
        assert lo <= ptr and ptr + out[name].numel() * out[name].element_size() <= hi, name
    assert_deep_equal(out, tensors)
    from_bytes = Serializer.loads(bytes(buf))
    assert not lo <= from_bytes["f"].data_ptr() < hi
    assert_deep_equal(from_bytes, tensors)


# -- interop with stock msgpack, from docs/serialization.md alone ---------------------------------
def test_worked_example_bytes_from_the_doc_decode():
    doc = bytes.fromhex("c7 16 01 03 3c 66 34 01 00 00 00 00 00 00 00 02 00 00 00 80 3f 00 00 00 40")
    out = Serializer.loads(doc)
    assert_deep_equal(out, np.array([1.0, 2.0], "<f4"))
    assert Serializer.dumps(np.array([1.0, 2.0], "<f4")) == doc  # and the encoder writes exactly that


@pytest.mark.parametrize(
    "dtype, shape, values, first_byte",
    [
        ("|i1", (), [-5], 0xD7),  # 6-byte header + 1 byte + 1 pad byte = 8: fixext 8
        ("|u1", (2,), [7, 250], 0xD8),  # 14 + 2 = 16: fixext 16
        ("<f4", (2,), [1.0, 2.0], 0xC7),  # ext 8
        (">f8", (5, 8), list(range(40)), 0xC8),  # 334 bytes: ext 16
        (">i2", (3,), [-1, 256, 7], 0xC7),
        ("<c8", (1,), [1 - 1j], 0xC7),
        ("|b1", (2, 2), [True, False, False, True], 0xC7),
    ],
)
def test_handcrafted_ext_formats_decode_to_the_right_arrays(dtype, shape, values, first_byte):
    want = np.array(values, dtype=dtype).reshape(shape)
    pad = 1 if first_byte == 0xD7 else 0
    payload = array_payload(dtype, shape, want.tobytes(), pad=pad)
    doc = msgpack.packb(msgpack.ExtType(1, payload))
    assert doc[0] == first_byte
    assert_deep_equal(Serializer.loads(doc), want)
    assert_deep_equal(Serializer.loads(bytearray(doc)), want)


def test_handcrafted_padding_and_exts_inside_plain_containers_decode():
    w = np.arange(6, dtype=">i4").reshape(2, 3)
    arr_ext = msgpack.ExtType(1, array_payload(">i4", (2, 3), w.tobytes(), pad=13))
    scalar = msgpack.ExtType(2, array_payload("<u2", (), b"\x01\x02"))
    tup = msgpack.ExtType(4, msgpack.packb([1, arr_ext]))
    od = msgpack.ExtType(5, msgpack.packb({"b": scalar, "a": tup}))
    out = Serializer.loads(msgpack.packb({"od": od, 3: [tup]}))
    want = {"od": OrderedDict(b=np.uint16(0x0201), a=(1, w)), 3: [(1, w)]}
    assert_deep_equal(out, want)


@needs_torch
@pytest.mark.parametrize(
    "dtype, raw, want",
    [
        (">f4", struct.pack(">2f", 1.5, -2.0), lambda: torch.tensor([1.5, -2.0])),
        ("<bf2", b"\xc0\x3f\x00\xc0", lambda: torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),
        (">bf2", b"\x3f\xc0\xc0\x00", lambda: torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),
        ("<i8", struct.pack("<2q", -1, 2**40), lambda: torch.tensor([-1, 2**40])),
        ("|b1", b"\x01\x00", lambda: torch.tensor([True, False])),
    ],
)
def test_handcrafted_torch_ext_decodes_to_a_native_cpu_tensor(dtype, raw, want):
    doc = msgpack.packb(msgpack.ExtType(3, array_payload(dtype, (2,), raw)))
    out = Serializer.loads(doc)
    assert type(out) is torch.Tensor and out.dtype == want().dtype
    assert torch.equal(out, want())


def test_encoder_output_reads_with_stock_msgpack_and_a_doc_ext_handler():
    obj = {
        "w": random_array(">f4", (50, 30), seed=7),  # padded ext 32
        "small": np.arange(3, dtype="<i2"),
        "s": np.float16(0.5),
        "t": (1, "a", (np.zeros((0, 2), "<c16"),)),
        "od": OrderedDict([(2, "x"), ("k", [np.bool_(False)])]),
        7: [b"bin", None, 2**64 - 1],
    }
    out = unpack(Serializer.dumps(obj))
    assert_deep_equal(out, obj)
