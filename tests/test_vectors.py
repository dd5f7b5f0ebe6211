"""The conformance vectors in tests/vectors, checked both ways against fedcore.Serializer.

Each vector is a .msgpack file and a .json description (format in scripts/gen_vectors.py). Decoding the
file must give the described value (types, dtypes with byte order, shapes, raw bytes, key order), and
encoding the described value must give the file's bytes exactly. The JavaScript suite
(clients/js/test/vectors.test.js) checks the same files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore import Serializer
from tests.strict_equality import assert_deep_equal

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
_spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "scripts" / "gen_vectors.py")
assert _spec is not None and _spec.loader is not None
gen_vectors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_vectors)

NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    data = (VECTORS / f"{name}.msgpack").read_bytes()
    return data, json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))


def nodes(desc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a description, depth first."""
    out = [desc]
    for item in desc.get("items", []):
        for child in item if isinstance(item, list) else [item]:
            out += nodes(child)
    return out


def needs_torch(desc: dict[str, Any]) -> None:
    if any(n["type"] == "tensor" for n in nodes(desc)):
        pytest.importorskip("torch")


def readable_to_number(v: Any) -> Any:
    if isinstance(v, list):
        return complex(readable_to_number(v[0]), readable_to_number(v[1]))
    if isinstance(v, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(v, None) or int(v)
    return v


@pytest.mark.parametrize("name", NAMES)
def test_decode_file_gives_the_description(name: str) -> None:
    data, doc = load(name)
    needs_torch(doc["value"])
    want = gen_vectors.build(doc["value"])
    assert_deep_equal(Serializer().loads(data), want)
    assert_deep_equal(Serializer().loads(bytearray(data)), want)  # zero-copy views path


@pytest.mark.parametrize("name", NAMES)
def test_encode_description_gives_the_file_bytes(name: str) -> None:
    data, doc = load(name)
    needs_torch(doc["value"])
    assert doc["byte_exact"] is True
    assert Serializer().dumps(gen_vectors.build(doc["value"])) == data


@pytest.mark.parametrize("name", NAMES)
def test_readable_values_match_the_raw_data(name: str) -> None:
    """The "values" lists other languages compare with say the same as the exact "data" hex."""
    _, doc = load(name)
    for node in nodes(doc["value"]):
        if node["type"] in ("ndarray", "scalar", "tensor"):
            dtype = "<f4" if node["dtype"] == "<bf2" else node["dtype"]
            raw = np.frombuffer(bytes.fromhex(node["data"]), dtype="<u2" if node["dtype"] == "<bf2" else dtype)
            if node["dtype"] == "<bf2":
                raw = (raw.astype("<u4") << 16).view("<f4")
            want = np.array([readable_to_number(v) for v in node["values"]], dtype=dtype)
            assert raw.shape == want.shape and len(raw) == math.prod(node["shape"]), node
            assert raw.tobytes() == want.tobytes(), f"{name}: {node['dtype']} values do not match data"
        if node["type"] == "float" and isinstance(node["value"], float):
            assert struct.unpack(">d", bytes.fromhex(node["hex"]))[0] == node["value"]


def test_committed_vectors_are_what_the_script_writes() -> None:
    assert gen_vectors.main(["--check", "--out", str(VECTORS)]) == 0, "run: python scripts/gen_vectors.py"


def test_vectors_cover_every_dtype_in_both_orders_and_every_ext_type() -> None:
    arrays = [n for name in NAMES for n in nodes(load(name)[1]["value"])]
    numpy_dtypes = {n["dtype"] for n in arrays if n["type"] == "ndarray"}
    assert set(gen_vectors.ALL_DTYPES) <= numpy_dtypes
    kinds = {n["type"] for n in arrays}
    assert {"ndarray", "scalar", "tensor", "tuple", "ordered_dict", "dict", "list"} <= kinds
    shapes = [n["shape"] for n in arrays if "shape" in n]
    assert [] in shapes and any(0 in s for s in shapes) and any(len(s) == 32 for s in shapes)
    int_keys = [k for n in arrays if n["type"] in ("dict", "ordered_dict") for k, _ in n["items"]
                if k["type"] == "int"]
    assert int_keys
