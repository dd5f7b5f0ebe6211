"""Write the serialization conformance vectors: tests/vectors/<name>.msgpack + <name>.json.

Each .msgpack file is ``fedcore.Serializer().dumps(value)``; the .json file next to it describes the value
in a language-neutral way, so any implementation can check itself both ways: decode the .msgpack file and
compare with the description, and encode the description and compare with the .msgpack bytes (every
vector here is byte-exact: the encoding rules of docs/serialization.md fix every byte).

Description format (the "value" field, recursive; every node has a "type"):

    {"type": "nil"} · {"type": "bool", "value": true} · {"type": "str", "value": "..."}
    {"type": "int", "value": "-12"}                    decimal string: exact beyond 2**53
    {"type": "float", "hex": "3ff8000000000000", "value": 1.5}
                                                       hex: the IEEE double, big-endian (exact, keeps
                                                       -0.0 and NaN); value: readable (a string for
                                                       "nan", "inf", "-inf")
    {"type": "bin", "hex": "00ff"}
    {"type": "list" | "tuple", "items": [node, ...]}
    {"type": "dict" | "ordered_dict", "items": [[key node, value node], ...]}   in order
    {"type": "ndarray" | "scalar" | "tensor", "dtype": "<f4", "shape": [2, 3],
     "data": "<hex of the raw C-order element bytes, in the dtype's byte order>",
     "values": [flat C-order elements: numbers; "nan"/"inf"/"-inf"; 8-byte ints as decimal strings;
                complex as [real, imag]; bool as true/false]}

Usage: python scripts/gen_vectors.py [--out DIR] [--check]   (--check: fail if DIR differs)
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore import Serializer

DEFAULT_OUT = ROOT / "tests" / "vectors"
ONE_BYTE = ["b1", "i1", "u1"]
MULTI_BYTE = ["i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"]
ALL_DTYPES = [f"|{c}" for c in ONE_BYTE] + [f"{o}{c}" for c in MULTI_BYTE for o in "<>"]


# -- description <-> Python value ------------------------------------------------------------------
def _readable_float(x: float) -> Any:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _readable_values(kind: str, flat: list[Any], itemsize: int) -> list[Any]:
    if kind == "b":
        return [bool(v) for v in flat]
    if kind in "iu":
        return [str(int(v)) if itemsize == 8 else int(v) for v in flat]
    if kind == "c":
        return [[_readable_float(float(v.real)), _readable_float(float(v.imag))] for v in flat]
    return [_readable_float(float(v)) for v in flat]


def _describe_array(kind: str, arr: np.ndarray) -> dict[str, Any]:
    arr = np.array(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    return {"type": kind, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes().hex(),
            "values": _readable_values(arr.dtype.kind, arr.reshape(-1).tolist() if arr.dtype.kind != "c"
                                       else list(arr.reshape(-1)), arr.dtype.itemsize)}


def _describe_tensor(t: Any) -> dict[str, Any]:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
        values = [_readable_float(v) for v in t.float().reshape(-1).tolist()]
        return {"type": "tensor", "dtype": "<bf2", "shape": list(t.shape), "data": raw.hex(), "values": values}
    return {**_describe_array("tensor", t.numpy()), "type": "tensor"}


def describe(value: Any) -> dict[str, Any]:
    """The JSON description of a value (see the module docstring)."""
    if value is None:
        return {"type": "nil"}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "hex": struct.pack(">d", value).hex(), "value": _readable_float(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes):
        return {"type": "bin", "hex": value.hex()}
    if isinstance(value, (list, tuple)):
        return {"type": "tuple" if isinstance(value, tuple) else "list", "items": [describe(v) for v in value]}
    if isinstance(value, dict):
        kind = "ordered_dict" if isinstance(value, OrderedDict) else "dict"
        return {"type": kind, "items": [[describe(k), describe(v)] for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        return _describe_array("ndarray", value)
    if isinstance(value, np.generic):
        return _describe_array("scalar", np.asarray(value))
    if type(value).__module__.startswith("torch"):
        return _describe_tensor(value)
    raise TypeError(f"no description for {type(value).__name__}")


def build(desc: dict[str, Any]) -> Any:
    """The Python value a description stands for (arrays from their exact "data" bytes)."""
    kind = desc["type"]
    simple: dict[str, Callable[[dict[str, Any]], Any]] = {
        "nil": lambda d: None,
        "bool": lambda d: d["value"],
        "int": lambda d: int(d["value"]),
        "float": lambda d: struct.unpack(">d", bytes.fromhex(d["hex"]))[0],
        "str": lambda d: d["value"],
        "bin": lambda d: bytes.fromhex(d["hex"]),
        "list": lambda d: [build(i) for i in d["items"]],
        "tuple": lambda d: tuple(build(i) for i in d["items"]),
        "dict": lambda d: {build(k): build(v) for k, v in d["items"]},
        "ordered_dict": lambda d: OrderedDict((build(k), build(v)) for k, v in d["items"]),
    }
    if kind in simple:
        return simple[kind](desc)
    raw = bytes.fromhex(desc["data"])
    if kind == "tensor":
        import torch

        if desc["dtype"] == "<bf2":
            ints = np.frombuffer(raw, dtype="<i2").reshape(tuple(desc["shape"])).copy()
            return torch.from_numpy(ints).view(torch.bfloat16)
        return torch.from_numpy(np.frombuffer(raw, dtype=desc["dtype"]).reshape(tuple(desc["shape"])).copy())
    arr = np.frombuffer(raw, dtype=desc["dtype"]).reshape(tuple(desc["shape"])).copy()
    if kind == "scalar":
        return arr[()]
    if kind == "ndarray":
        return arr
    raise ValueError(f"unknown description type {kind!r}")


# -- the vectors ----------------------------------------------------------------------------------------
def _dtype_samples(dtype: str) -> np.ndarray:
    """A few values per dtype that exercise its range: extremes, sign, zero, NaN/inf for floats."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return np.array([True, False, True, True, False], dtype=dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        vals = [0, 1, info.max, info.min, info.max - 1, 42] + ([-1, info.min + 1] if dt.kind == "i" else [])
        return np.array(vals, dtype=dt)
    if dt.kind == "f":
        fi = np.finfo(dt)
        vals = [0.0, -0.0, 1.5, -2.25, float(fi.max), float(fi.smallest_subnormal), float(fi.tiny),
                math.inf, -math.inf, math.nan, 0.1]
        return np.array(vals, dtype=dt)
    return np.array([0, 1 + 2j, -1.5 - 0.25j, complex(math.inf, math.nan), 0.1j], dtype=dt)


def _tensor_cases() -> list[tuple[str, str, Any]]:
    import torch

    grad = torch.tensor([[1.0, -2.0], [3.5, 0.25]], requires_grad=True)
    return [
        ("tensor_float32", "torch float32 tensor 2x3 (ext 3)", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("tensor_bfloat16", "torch bfloat16 tensor, dtype <bf2 (ext 3 only)",
         torch.tensor([1.0, -2.5, 3.140625, 0.0, float("inf"), 1e-3], dtype=torch.bfloat16)),
        ("tensor_float16", "torch float16 tensor", torch.tensor([0.5, -65504.0, 6e-8], dtype=torch.float16)),
        ("tensor_int64", "torch int64 tensor", torch.tensor([-(2**63), 2**63 - 1, 7], dtype=torch.int64)),
        ("tensor_bool", "torch bool tensor", torch.tensor([True, False, True])),
        ("tensor_0d", "0-d torch tensor", torch.tensor(2.5, dtype=torch.float64)),
        ("tensor_empty", "empty torch tensor, shape (0, 4)", torch.zeros((0, 4), dtype=torch.float32)),
        ("tensor_requires_grad", "a tensor that requires grad is sent as its values (decoded without grad)",
         grad),
        ("tensor_state_dict", "a torch-like state_dict: OrderedDict of tensors",
         OrderedDict([("fc.weight", torch.ones(2, 3)), ("fc.bias", torch.zeros(2)),
                      ("bn.num_batches_tracked", torch.tensor(5))])),
    ]


def cases() -> list[tuple[str, str, Any]]:
    """(name, note, value) for every vector."""
    out: list[tuple[str, str, Any]] = []
    for dtype in ALL_DTYPES:
        order = {"<": "le", ">": "be", "|": "na"}[dtype[0]]
        out.append((f"dtype_{dtype[1:]}_{order}", f"1-d array of dtype {dtype}", _dtype_samples(dtype)))
    out += [
        ("zero_d_f4", "0-d float32 array (ext 1, ndim 0)", np.array(1.5, dtype="<f4")),
        ("zero_d_i8_be", "0-d big-endian int64 array", np.array(-7, dtype=">i8")),
        ("zero_d_bool", "0-d bool array", np.array(True)),
        ("zero_d_c16_be", "0-d big-endian complex128 array", np.array(1 - 2j, dtype=">c16")),
        ("scalar_f4", "numpy float32 scalar (ext 2)", np.float32(1.5)),
        ("scalar_f2", "numpy float16 scalar", np.float16(-0.5)),
        ("scalar_i8", "numpy int64 scalar", np.int64(-3)),
        ("scalar_u8_max", "numpy uint64 scalar 2**64-1", np.uint64(2**64 - 1)),
        ("scalar_bool", "numpy bool scalar", np.bool_(True)),
        ("scalar_c8", "numpy complex64 scalar", np.complex64(1 + 2j)),
        ("fixext8_zero_d_i2", "0-d int16 array: an 8-byte ext payload is written as fixext 8",
         np.array(-2, dtype="<i2")),
        ("fixext16_u2", "1-element uint16 array: a 16-byte ext payload is written as fixext 16",
         np.array([513], dtype="<u2")),
        ("empty_f4", "empty float32 array, shape (0,)", np.zeros((0,), dtype="<f4")),
        ("empty_i4_be_2x0x3", "empty big-endian int32 array, shape (2, 0, 3)", np.zeros((2, 0, 3), dtype=">i4")),
        ("multi_d_f8_be", "3-d big-endian float64 array (2, 3, 4), C order",
         np.arange(24, dtype=">f8").reshape(2, 3, 4)),
        ("fortran_order_i2", "a Fortran-ordered (3, 2) array is written in C order",
         np.asfortranarray(np.arange(6, dtype="<i2").reshape(3, 2))),
        ("ndim_32", "32 dimensions of size 1 (the maximum ndim)", np.ones((1,) * 32, dtype="<u2")),
        ("shape_with_ones", "shape (2, 1, 3, 1, 2)", np.arange(12, dtype="<f4").reshape(2, 1, 3, 1, 2)),
        ("array_508_bytes", "127 float32 = 508 bytes: small array, smallest ext format (ext 16)",
         np.linspace(-1, 1, 127, dtype="<f4")),
        ("array_800_bytes", "200 float32 = 800 bytes: ext 32, no padding (512 <= nbytes < 1024)",
         np.linspace(-1, 1, 200, dtype="<f4")),
        ("array_1200_bytes_padded", "300 big-endian float32 = 1200 bytes: ext 32, data 64-byte aligned",
         np.linspace(-1, 1, 300, dtype=">f4")),
        ("arrays_aligned_in_dict", ("several padded arrays behind keys of odd lengths: each data start is "
                                    "a multiple of 64 from the document start"),
         {"a": np.arange(256, dtype="<f4"), "bb": "x" * 13, "ccc": np.arange(130, dtype="<i8").reshape(13, 10),
          "d": np.ones(1024, dtype="|u1"), "e": np.arange(3, dtype="<f4")}),
        ("array_aligned_in_tuple", ("a padded array inside a tuple inside a list: the offset counts from the "
                                    "document start, through the ext 4 header"),
         [1, ("key", np.arange(300, dtype="<f8"))]),
        ("nil", "nil", None),
        ("bools", "true and false", [True, False]),
        ("ints", "int edges: fixint, 8/16/32/64-bit, signed and unsigned",
         [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**64 - 1,
          -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]),
        ("floats", "floats are float 64, integral ones included",
         [0.0, -0.0, 1.0, 1.5, -2.25, 0.1, 1e308, 5e-324, math.inf, -math.inf, math.nan, 2.0**53]),
        ("strings", "str: empty, non-ASCII, 40 chars (str 8), 300 chars (str 16)",
         ["", "héllo ☃ 🚀", "a" * 40, "b" * 300]),
        ("bins", "bin: empty, 0..255, 300 bytes", [b"", bytes(range(256)), b"\x01" * 300]),
        ("dict_int_keys", "dict with int keys (negative and 64-bit)", {0: "a", 1: "b", -5: [1], 2**40: None}),
        ("dict_int_and_str_keys", "int 1 and str '1' are different keys", {1: "int", "1": "str"}),
        ("dict_key_order", "insertion order kept, integer-like str keys included",
         {"10": 1, "2": 2, "b": 3, "a": 4}),
        ("dict_lookalike", "a user dict that looks like an encoded array stays a dict",
         {"__type__": "np.ndarray", "dtype": "<f4", "shape": [2], "data": b"\x00" * 8}),
        ("nested_tuples", "tuples inside tuples, an empty tuple, a list in a tuple",
         (1, (2, (3, ())), [4, (5,)])),
        ("ordered_dict_int_keys", "OrderedDict with int and str keys", OrderedDict([(2, "b"), ("1", None), (0, 1.5)])),
        ("ordered_dict_arrays", "OrderedDict of arrays, like a numpy state_dict",
         OrderedDict([("w", np.ones((2, 2), dtype="<f4")), ("b", np.zeros(2, dtype="<f4"))])),
        ("empty_containers", "[], (), {}, OrderedDict()", [[], (), {}, OrderedDict()]),
        ("deep_nesting", "50 nested lists", _nested(50)),
        ("mixed_document", "a training-payload-like document: params, args, metrics, tuples",
         {"params": {"coef": np.array([[0.5], [-1.0], [2.0]], dtype="<f4"), "intercept": np.zeros(1, dtype="<f4")},
          "training_args": {"lr": 0.1, "num_updates": 5, "epochs": None, "batch_size": 32},
          "metrics": {"loss": 0.25, "history": [(1, 0.5), (2, 0.25)]}, "round": 3, "flag": np.bool_(False)}),
    ]
    return out + _tensor_cases()


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _json(obj: Any, indent: str = "") -> str:
    """Indented JSON; lists of plain values (array values, shapes) and short nodes on one line."""
    flat = isinstance(obj, list) and all(not isinstance(v, (dict, list)) or
                                         (isinstance(v, list) and len(v) == 2 and not isinstance(v[0], (dict, list)))
                                         for v in obj)
    one_line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    if not isinstance(obj, (dict, list)) or flat or len(one_line) <= 100:
        return one_line
    inner = indent + " "
    if isinstance(obj, dict):
        body = [f"{inner}{json.dumps(k)}: {_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(body) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + _json(v, inner) for v in obj) + "\n" + indent + "]"


def render(name: str, note: str, value: Any) -> tuple[bytes, str]:
    """The .msgpack bytes and the .json text of one vector."""
    data = Serializer().dumps(value)
    doc = {"name": name, "note": note, "byte_exact": True, "value": describe(value)}
    text = _json(doc) + "\n"
    if json.loads(text) != json.loads(json.dumps(doc, allow_nan=False)):
        raise AssertionError(f"{name}: JSON layout changed the description")
    return data, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory (default tests/vectors)")
    parser.add_argument("--check", action="store_true", help="compare with DIR instead of writing it")
    args = parser.parse_args(argv)
    expected: dict[str, bytes] = {}
    for name, note, value in cases():
        data, text = render(name, note, value)
        expected[f"{name}.msgpack"] = data
        expected[f"{name}.json"] = text.encode("utf-8")
    if args.check:
        present = {p.name for p in args.out.glob("*") if p.suffix in (".msgpack", ".json")}
        bad = sorted(n for n in expected if n not in present or (args.out / n).read_bytes() != expected[n])
        extra = sorted(present - set(expected))
        for n in bad:
            print(f"differs or missing: {n}", file=sys.stderr)
        for n in extra:
            print(f"not produced by this script: {n}", file=sys.stderr)
        return 1 if bad or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for fname, data in expected.items():
        (args.out / fname).write_bytes(data)
    print(f"wrote {len(expected) // 2} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
