"""Serializer failures: what cannot be encoded raises EncodeError naming type and path; every bad,
truncated or hostile document raises DecodeError with a specific reason, fast and without big allocations."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections import OrderedDict
from pathlib import Path

import msgpack
import numpy as np
import pytest
from serialization_reference import array_payload, ext

from fedcore.errors import DecodeError, EncodeError, FedstreamError, SerializationError
from fedcore.serialization import Serializer, SerializerLimits

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
ROOT = Path(__file__).resolve().parents[1]


def decode_error(data, match: str, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError, match=match) as info:
        Serializer.loads(data, **kwargs)
    return info.value


def test_error_classes_sit_in_the_fedcore_tree():
    assert issubclass(EncodeError, TypeError) and issubclass(EncodeError, SerializationError)
    assert issubclass(DecodeError, ValueError) and issubclass(DecodeError, SerializationError)
    assert issubclass(SerializationError, FedstreamError)


# -- EncodeError: type and path ---------------------------------------------------------------------
def test_set_in_nested_dict_names_type_and_path():
    with pytest.raises(EncodeError) as info:
        Serializer.dumps({"params": {"fc.weight": {1, 2}}})
    assert str(info.value) == "cannot encode object of type builtins.set at obj['params']['fc.weight']"


def test_object_in_a_list_in_a_tuple_gets_an_index_path():
    with pytest.raises(EncodeError, match=r"builtins\.object at obj\['a'\]\[0\]\[2\]\[1\]$"):
        Serializer.dumps({"a": ([0, 1, [2, object()]],)})
    with pytest.raises(EncodeError, match=r"at obj\[3\]\['k'\]$"):
        Serializer.dumps(OrderedDict([(3, OrderedDict(k=object()))]))
    with pytest.raises(EncodeError, match=r"builtins\.object at obj$"):
        Serializer.dumps(object())


@pytest.mark.parametrize(
    "key, type_name",
    [
        ((1, 2), "tuple"),
        (None, "NoneType"),
        (1.5, "float"),
        (b"k", "bytes"),
        (np.int64(1), "int64"),
        (frozenset({1}), "frozenset"),
        (np.str_("k"), "str_"),
    ],
    ids=lambda v: repr(v),
)
def test_bad_dict_key_types_name_the_key_type_and_the_dict(key, type_name):
    with pytest.raises(EncodeError, match=rf"{type_name}.*is not a str or int at obj\['outer'\]$"):
        Serializer.dumps({"outer": {"ok": 1, key: 2}})


def test_integers_outside_64_bits_are_refused_with_their_path():
    for value in (2**64, -(2**63) - 1, 10**30):
        with pytest.raises(
            EncodeError, match=rf"integer {value} does not fit in 64 bits at obj\['a'\]\[1\]$"
        ):
            Serializer.dumps({"a": [0, value]})
    with pytest.raises(
        EncodeError, match=r"dict key 18446744073709551616 does not fit in 64 bits at obj\['m'\]"
    ):
        Serializer.dumps({"m": {2**64: 1}})


def test_strings_that_are_not_valid_utf8_are_refused_not_crashed():
    with pytest.raises(EncodeError, match=r"UTF-8.*at obj\['s'\]\[0\]$"):
        Serializer.dumps({"s": ["lone \ud800 surrogate"]})
    with pytest.raises(EncodeError, match=r"UTF-8.*at obj\['d'\]$"):
        Serializer.dumps({"d": {"\udfff": 1}})


Point = collections.namedtuple("Point", "x y")


class Custom:
    pass


@dataclasses.dataclass
class Record:
    x: int = 1


class DictSubclass(dict):
    pass


class ListSubclass(list):
    pass


@pytest.mark.parametrize(
    "value, names",
    [
        (Point(1, 2), "Point"),
        (collections.defaultdict(list), "defaultdict"),
        (collections.Counter("ab"), "Counter"),
        (DictSubclass(a=1), "DictSubclass"),
        (ListSubclass([1]), "ListSubclass"),
        (Custom(), "Custom"),
        (Record(), "Record"),
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (1 + 2j, "complex"),
        (decimal.Decimal("1.5"), "Decimal"),
        (fractions.Fraction(1, 3), "Fraction"),
        (datetime.datetime(2024, 1, 1), "datetime"),
        (range(3), "range"),
        (len, "builtin_function_or_method"),
        (type, "type"),
        (iter([]), "list_iterator"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_objects_name_their_type_and_path(value, names):
    with pytest.raises(EncodeError, match=rf"{names}.* at obj\['x'\]\[0\]$"):
        Serializer.dumps({"x": (value,)})


@pytest.mark.parametrize(
    "arr, names",
    [
        (np.zeros(2, np.longdouble), "float128"),
        (np.zeros(2, np.clongdouble), "complex256"),
        (np.array([1, "a"], dtype=object), "object"),
        (np.array(["ab", "c"]), "<U2"),
        (np.array([b"ab"]), "S2"),
        (np.zeros(2, "datetime64[ns]"), "datetime64"),
        (np.zeros(2, "timedelta64[s]"), "timedelta64"),
        (np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]), "structured"),
        (np.zeros(2, dtype="V8"), "V8"),
        (np.longdouble(1), "float128"),
        (np.str_("text"), "<U4"),
        (np.datetime64("2024-01-01"), "datetime64"),
    ],
    ids=lambda v: str(getattr(v, "dtype", v)),
)
def test_unsupported_numpy_dtypes_name_the_dtype_and_path(arr, names):
    with pytest.raises(EncodeError, match=rf"(?s){names}.* at obj\['w'\]$"):
        Serializer.dumps({"w": arr})


def test_masked_array_is_refused_because_its_mask_would_be_lost():
    with pytest.raises(EncodeError, match=r"MaskedArray.* at obj\['m'\]$"):
        Serializer.dumps({"m": np.ma.masked_array([1.0, 2.0], mask=[0, 1])})


def test_array_with_more_than_32_dimensions_is_refused():
    with pytest.raises(EncodeError, match=r"33 dimensions.*limit of 32 at obj$"):
        Serializer.dumps(np.zeros((1,) * 33))


@needs_torch
@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: torch.zeros(3, 3).to_sparse(), "sparse_coo"),
        (lambda: torch.eye(3).to_sparse_csr(), "sparse_csr"),
        (lambda: torch.empty(3, device="meta"), "meta"),
        (lambda: torch.zeros(2, dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
        (lambda: torch.zeros(2, dtype=torch.complex32), "complex32"),
        (lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8), "quint8"),
    ],
    ids=["sparse_coo", "sparse_csr", "meta", "float8", "complex32", "quantized"],
)
def test_unsupported_torch_tensors_are_refused_with_their_path(make, names):
    with warnings.catch_warnings():  # torch warns that these layouts/dtypes are beta or deprecated
        warnings.simplefilter("ignore", UserWarning)
        tensor = make()
    with pytest.raises(EncodeError, match=rf"{names}.* at obj\['sd'\]\['w'\]$"):
        Serializer.dumps({"sd": OrderedDict(w=tensor)})


def test_too_deep_nesting_is_an_encode_error():
    obj: list = [1]
    for _ in range(100):  # 101 levels, one over the default limit
        obj = [obj]
    with pytest.raises(EncodeError, match=r"nesting deeper than the limit of 100 levels at obj(\[0\]){100}$"):
        Serializer.dumps(obj)
    with pytest.raises(EncodeError, match=r"limit of 2 levels at obj\['a'\]\[0\]$"):
        Serializer.dumps({"a": ([1],)}, SerializerLimits(max_depth=2))


@pytest.mark.parametrize("kind", ["list", "dict", "tuple-list", "ordereddict"])
def test_self_referencing_containers_raise_encode_error_not_recursion_error(kind):
    if kind == "list":
        obj: object = []
        obj.append(obj)
    elif kind == "dict":
        obj = {}
        obj["me"] = obj
    elif kind == "tuple-list":
        inner: list = []
        obj = (inner,)
        inner.append(obj)
    else:
        obj = OrderedDict()
        obj["me"] = [obj]
    with pytest.raises(EncodeError, match="nesting deeper than the limit"):
        Serializer.dumps(obj)


# -- DecodeError: truncation, corruption ------------------------------------------------------------
def moderate_document() -> object:
    """A few KB touching every construct: small and padded arrays, tuples, OrderedDicts, scalars, tensors."""
    rng = np.random.default_rng(0)
    doc = OrderedDict(
        round=7,
        big=2**64 - 1,
        neg=-(2**63),
        lr=0.01,
        name="modèle-α",
        blob=bytes(range(40)),
        nothing=None,
        flags=[True, False],
        params=OrderedDict(
            [
                ("fc.weight", rng.standard_normal((20, 20)).astype("<f4")),  # 1600 bytes: padded
                ("fc.bias", rng.standard_normal(5).astype(">f8")),
                ("mask", np.array([True, False, True])),
                ("empty", np.zeros((0, 3), "<i2")),
                ("zero_d", np.array(5, "<u8")),
            ],
        ),
        shapes=((20, 20), (5,), ()),
        scalars=[np.float32(1.5), np.bool_(True), np.complex64(1j)],
        keys={1: "one", -2: "minus two", "s": {"deep": [[[("x",)]]]}},
    )
    if torch is not None:
        doc["tensors"] = OrderedDict(
            w=torch.arange(12, dtype=torch.float32).reshape(3, 4), bf=torch.ones(3, dtype=torch.bfloat16)
        )
    return doc


@pytest.mark.timeout(60)
def test_every_truncation_of_a_valid_document_is_a_decode_error():
    blob = Serializer.dumps(moderate_document())
    assert 1500 < len(blob) < 8000
    Serializer.loads(blob)  # the whole document is valid
    start = time.perf_counter()
    for cut in range(len(blob)):
        for data in (blob[:cut], bytearray(blob[:cut])):
            try:
                Serializer.loads(data)
            except DecodeError as exc:
                assert "truncated" in str(exc) or "remain" in str(exc), (cut, str(exc))
            else:
                pytest.fail(f"prefix of {cut} bytes decoded without error")
    assert time.perf_counter() - start < 20


def test_trailing_bytes_are_an_error():
    blob = Serializer.dumps({"w": np.ones(3)})
    decode_error(blob + b"\x00", r"1 trailing bytes after the document \(offset \d+\)")
    decode_error(blob + blob, r"trailing bytes")
    decode_error(b"\xc0\xc0", r"1 trailing bytes .*offset 1")


@pytest.mark.parametrize(
    "data", [b"", bytearray(), memoryview(b"")], ids=["bytes", "bytearray", "memoryview"]
)
def test_empty_input_is_a_decode_error(data):
    decode_error(data, r"truncated document: a type byte needs 1 bytes at offset 0")


@pytest.mark.parametrize("data", ["text", None, 12, 1.5, [1, 2], {"a": 1}], ids=repr)
def test_non_bytes_input_is_a_decode_error(data):
    decode_error(data, r"expected bytes-like")
    decode_error(data, r"expected bytes-like", limits=SerializerLimits(max_size=10))


def test_never_used_type_byte_is_refused():
    decode_error(b"\xc1", r"invalid msgpack type byte 0xc1 at offset 0")
    decode_error(b"\x92\x01\xc1", r"invalid msgpack type byte 0xc1 at offset 2")


# -- hostile sizes: fail fast, allocate nothing -------------------------------------------------------
def assert_fast_and_small(data, match: str) -> None:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        decode_error(data, match)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20, (elapsed, peak)


def test_array_header_claiming_2_to_the_60_elements_fails_fast_without_allocating():
    doc = ext(1, array_payload("<f4", (2**60,), b"\x00" * 8))
    assert_fast_and_small(doc, r"array data is 8 bytes but dtype <f4 and shape \(1152921504606846976,\) need")
    many_dims = ext(1, array_payload("<f8", (2**20, 2**20, 2**20), b"\x00" * 8))
    assert_fast_and_small(many_dims, r"exceeds numpy's size limit")


@pytest.mark.parametrize("shape", [(0, 2**63), (0, 2**64 - 1), (2**40, 0, 2**40), (0,) + (2**62,) * 3])
def test_empty_array_with_absurd_dimensions_is_a_decode_error(shape):
    assert_fast_and_small(ext(1, array_payload("<f4", shape, b"")), r"exceeds numpy's size limit")


@pytest.mark.parametrize(
    "head, what",
    [
        (b"\xdd\xff\xff\xff\xff", "an array claims 4294967295 items"),
        (b"\xdf\xff\xff\xff\xff", "a map claims 4294967295 items"),
        (b"\xdb\xff\xff\xff\xff", "str data needs 4294967295 bytes"),
        (b"\xc6\xff\xff\xff\xff", "bin data needs 4294967295 bytes"),
        (b"\xc9\xff\xff\xff\xff\x01", "ext data needs 4294967295 bytes"),
        (b"\xdc\xff\xff", "an array claims 65535 items"),
    ],
    ids=["array32", "map32", "str32", "bin32", "ext32", "array16"],
)
def test_length_headers_beyond_the_document_fail_fast(head, what):
    doc = (head + b"\x00" * 10)[:10]
    assert_fast_and_small(doc, what)
    assert_fast_and_small(b"\x9f" + doc * 15, r"claims|needs")  # nested inside a list too


def test_object_count_limit_is_checked_before_allocating():
    doc = b"\xdd" + struct.pack(">I", 100_000) + b"\x00" * 100_000
    assert Serializer.loads(doc) == [0] * 100_000
    with pytest.raises(DecodeError, match="more objects than the configured limit"):
        Serializer.loads(doc, limits=SerializerLimits(max_objects=99_999))


def test_max_size_limit_refuses_big_documents(tmp_path):
    blob = Serializer.dumps({"w": np.ones(100)})
    limits = SerializerLimits(max_size=len(blob) - 1)
    decode_error(blob, rf"document of {len(blob)} bytes exceeds max_size {len(blob) - 1}", limits=limits)
    path = tmp_path / "doc.msgpack"
    path.write_bytes(blob)
    with pytest.raises(DecodeError, match=r"doc\.msgpack.*exceeds max_size"):
        Serializer.load(path, limits=limits)
    assert Serializer.loads(blob, limits=SerializerLimits(max_size=len(blob)))["w"].shape == (100,)


@pytest.mark.parametrize(
    "bomb",
    [b"\x91" * 100_000, b"\x81\xa0" * 50_000, b"\x81" * 100_000, b"\xdc\x00\x01" * 30_000],
    ids=["fixarray", "fixmap-values", "fixmap-keys", "array16"],
)
def test_depth_bombs_fail_at_the_nesting_limit(bomb):
    assert_fast_and_small(bomb, r"nesting deeper than the limit of 100 levels")


@pytest.mark.parametrize("code", [4, 5])
def test_depth_bombs_through_tuple_and_ordereddict_exts_fail_at_the_limit(code):
    inner = b"\xc0"
    for _ in range(150):
        inner = ext(code, (b"\x91" if code == 4 else b"\x81\xa1k") + inner)
    decode_error(inner, r"nesting deeper than the limit of 100 levels")


def test_nesting_limit_is_configurable_and_matches_the_encoder():
    ok = b"\x91" * 99 + b"\x90"  # 100 nested arrays: the default limit
    assert Serializer.loads(ok) is not None
    decode_error(b"\x91" * 100 + b"\x90", r"limit of 100 levels")
    decode_error(b"\x91\x91\x91\x90", r"limit of 3 levels", limits=SerializerLimits(max_depth=3))


# -- bad msgpack content ----------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0, 6, 15, 16, 42, 127, -2, -128])
def test_unknown_ext_codes_are_refused(code):
    decode_error(ext(code, b"\x00\x01\x02"), rf"unknown msgpack ext type {code} at offset \d+")


def test_msgpack_timestamp_ext_is_refused():
    decode_error(msgpack.packb(msgpack.Timestamp(1_700_000_000, 5)), r"unknown msgpack ext type -1")
    decode_error(
        msgpack.packb({"t": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)}, datetime=True),
        r"unknown msgpack ext type -1",
    )


def test_non_utf8_strings_are_refused():
    decode_error(b"\xa2\xff\xfe", r"str at offset 1 is not valid UTF-8")
    decode_error(b"\x81\xa1\x80\x01", r"str at offset 2 is not valid UTF-8")  # as a map key
    decode_error(b"\xa3\xed\xa0\x80", r"not valid UTF-8")  # an encoded surrogate


@pytest.mark.parametrize(
    "doc, key",
    [
        (b"\x82\xa1a\x01\xa1a\x02", "'a'"),
        (b"\x82\x07\x01\x07\x02", "7"),
        (b"\x82\x01\x00\xc3\x00", "True"),  # 1 and True are the same Python key
        (ext(5, b"\x82\xa1k\x01\xa1k\x02"), "'k'"),
    ],
    ids=["str", "int", "int-and-bool", "ordereddict"],
)
def test_duplicate_map_keys_are_refused(doc, key):
    decode_error(doc, rf"duplicate map key {key} at offset \d+")


@pytest.mark.parametrize(
    "key, type_name",
    [
        (b"\x90", "list"),
        (b"\xcb" + struct.pack(">d", 1.5), "float"),
        (b"\xca" + struct.pack(">f", 1.5), "float"),
        (b"\xc0", "NoneType"),
        (b"\xc4\x01k", "bytes"),
        (b"\x80", "dict"),
        (ext(4, b"\x90"), "tuple"),
        (ext(1, array_payload("<f4", (), b"\x00" * 4)), "ndarray"),
        (ext(2, array_payload("<i8", (), b"\x00" * 8)), "int64"),
        (ext(5, b"\x80"), "OrderedDict"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_map_keys_other_than_str_and_int_are_refused(key, type_name):
    decode_error(b"\x81" + key + b"\x00", rf"map key at offset 1 is a {type_name}; only str and int keys")


@pytest.mark.parametrize(
    "dtype",
    [
        "<f16",
        "|f4",
        "<O8",
        "xyz",
        "",
        "<f4 ",
        "<i08",
        "<i+8",
        "=f4",
        "<b1",
        ">u1",
        "|i2",
        "<M8",
        "<U4",
        "|V8",
        "|S4",
        "<c32",
        "<f1",
        "<i3",
        "f4",
        "<f",
        "<bf4",
        "|bf2",
        "<f\x004",
    ],
    ids=repr,
)
def test_invalid_dtype_strings_in_a_handcrafted_ext_are_refused(dtype):
    err = decode_error(ext(1, array_payload(dtype, (1,), b"\x00" * 4)), r"bad array at offset \d+: ")
    assert repr(dtype) in str(err)


def test_non_ascii_dtype_string_is_refused():
    decode_error(ext(1, array_payload(b"<f\xb4", (1,), b"\x00" * 4)), r"dtype string is not ASCII")


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty array payload"),
        (b"\x09<f4", "truncated in its dtype string"),
        (b"\x03<f4", "truncated in its dtype string"),
        (b"\x03<f4\x02" + b"\x00" * 8, "truncated in its shape"),
        (b"\x03<f4\x01" + struct.pack(">Q", 1), "truncated in its shape"),
        (b"\x03<f4\x00\x05\x00\x00", "truncated in its padding"),
        (
            array_payload("<f4", (2,), b"\x00" * 7),
            r"array data is 7 bytes but dtype <f4 and shape \(2,\) need 8",
        ),
        (array_payload("<f4", (2,), b"\x00" * 9), r"array data is 9 bytes .* need 8"),
        (array_payload("<f4", (), b""), r"array data is 0 bytes .* need 4"),
        (array_payload("<f4", (1,) * 33, b"\x00" * 4), "33 dimensions, more than the limit of 32"),
        (array_payload("<f4", (), b"\x00" * 4, ndim=255), "255 dimensions"),
    ],
    ids=[
        "empty",
        "dtype-long",
        "no-ndim",
        "shape-short",
        "no-pad-byte",
        "pad-beyond",
        "data-short",
        "data-long",
        "0d-no-data",
        "33-dims",
        "255-dims",
    ],
)
@pytest.mark.parametrize("code", [1, 2, 3])
def test_malformed_array_headers_are_refused(payload, reason, code):
    decode_error(ext(code, payload), reason)


def test_bfloat16_is_only_valid_as_a_torch_tensor():
    for code in (1, 2):
        decode_error(
            ext(code, array_payload("<bf2", (), b"\x80\x3f")),
            r"bfloat16 array at offset \d+ is only valid as a torch tensor",
        )
        decode_error(ext(code, array_payload(">bf2", (2,), b"\x3f\x80" * 2)), r"bfloat16")


@pytest.mark.parametrize("shape", [(1,), (0,), (1, 1)], ids=str)
def test_numpy_scalar_ext_with_a_non_empty_shape_is_refused(shape):
    data = b"\x00" * (4 * int(np.prod(shape)))
    decode_error(
        ext(2, array_payload("<f4", shape, data)), r"numpy scalar at offset \d+ has shape .*expected \(\)"
    )


def test_bool_data_other_than_0_and_1_is_refused():
    for code in (1, 2, 3) if torch is not None else (1, 2):
        shape = () if code == 2 else (3,)
        data = b"\x02" if code == 2 else b"\x00\x01\xff"
        decode_error(
            ext(code, array_payload("|b1", shape, data)),
            r"bool array at offset \d+ holds bytes other than 0 and 1",
        )


@pytest.mark.parametrize(
    "payload",
    [b"\x80", b"\x01", b"\xa1x", b"\xc0", b"\xdf\x00\x00\x00\x00", ext(4, b"\x90")],
    ids=["map", "int", "str", "nil", "map32", "nested-tuple"],
)
def test_tuple_ext_not_holding_an_array_is_refused(payload):
    decode_error(ext(4, payload), r"tuple ext at offset \d+ does not hold a msgpack array")


@pytest.mark.parametrize(
    "payload", [b"\x90", b"\x01", b"\xdd\x00\x00\x00\x00"], ids=["array", "int", "array32"]
)
def test_ordereddict_ext_not_holding_a_map_is_refused(payload):
    decode_error(ext(5, payload), r"OrderedDict ext at offset \d+ does not hold a msgpack map")


@pytest.mark.parametrize("code", [4, 5])
def test_container_exts_are_bounded_by_their_own_length(code):
    empty, one = (b"\x90", b"\x91\x01") if code == 4 else (b"\x80", b"\x81\x01\x02")
    decode_error(ext(code, b""), r"truncated document: a container type byte")
    decode_error(ext(code, empty + b"\x00"), r"ext at offset \d+ has 1 trailing bytes")
    decode_error(ext(code, one + one), r"ext at offset \d+ has \d+ trailing bytes")
    # The container claims an item beyond the ext's end, although the bytes follow in the document.
    short = ext(code, one[:-1])
    decode_error(b"\x92" + short + one[-1:], r"truncated|remain")


def test_decoding_a_tensor_without_torch_names_the_offset():
    doc = msgpack.packb([1, msgpack.ExtType(3, array_payload("<f4", (2,), b"\x00" * 8))])
    script = f"""
import sys
sys.modules["torch"] = None  # "import torch" now raises ImportError
import numpy as np
from fedcore.errors import DecodeError
from fedcore.serialization import Serializer
arr = Serializer.loads(Serializer.dumps({{"w": np.arange(3.0)}}))["w"]
assert arr.tolist() == [0.0, 1.0, 2.0]
try:
    Serializer.loads({doc!r})
except DecodeError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "torch tensor at offset" in result.stdout and "torch is not installed" in result.stdout


def test_serializer_imports_and_works_without_importing_torch():
    script = """
import sys
import numpy as np
from fedcore import Serializer
Serializer.loads(Serializer.dumps({"w": np.ones(2), "t": (1, 2)}))
assert "torch" not in sys.modules, "fedcore.serialization imported torch"
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
