"""The fedstream wire format rebuilt from docs/serialization.md alone, with stock msgpack (no fedcore import).

Tests use it to hand-craft documents the way another language would, and to read the encoder's output
without the package's own decoder.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import msgpack
import numpy as np


def array_payload(
    dtype: str | bytes, shape: tuple[int, ...], data: bytes, pad: int = 0, ndim: int | None = None
) -> bytes:
    """Ext 1/2/3 payload: u8 L, dtype, u8 ndim, ndim x u64 big-endian shape, u8 P, P zeros, data.

    ``ndim`` overrides the written dimension count (to build malformed headers).
    """
    raw = dtype.encode("ascii") if isinstance(dtype, str) else dtype
    nd = len(shape) if ndim is None else ndim
    dims = b"".join(struct.pack(">Q", d) for d in shape)
    return bytes([len(raw)]) + raw + bytes([nd]) + dims + bytes([pad]) + bytes(pad) + data


def ext(code: int, payload: bytes) -> bytes:
    """One msgpack ext object (any code, negative ones included)."""
    if code < 0:  # msgpack.ExtType refuses negative codes: write an ext 8 by hand
        return b"\xc7" + bytes([len(payload)]) + struct.pack(">b", code) + payload
    return msgpack.packb(msgpack.ExtType(code, payload))


def ext_hook(code: int, payload: bytes):
    """A stock-msgpack ext handler for ext types 1, 2, 4 and 5 (numpy only)."""
    if code == 4:
        return tuple(msgpack.unpackb(payload, ext_hook=ext_hook, strict_map_key=False))
    if code == 5:
        unpacker = msgpack.Unpacker(ext_hook=ext_hook, strict_map_key=False)
        unpacker.feed(payload)
        n = unpacker.read_map_header()
        return OrderedDict((unpacker.unpack(), unpacker.unpack()) for _ in range(n))
    assert code in (1, 2), f"unexpected ext code {code}"
    n = payload[0]
    dtype = payload[1 : 1 + n].decode("ascii")
    ndim = payload[1 + n]
    pos = 2 + n
    shape = struct.unpack(f">{ndim}Q", payload[pos : pos + 8 * ndim])
    pos += 8 * ndim
    pos += 1 + payload[pos]
    arr = np.frombuffer(payload[pos:], dtype=dtype).reshape(shape).copy()
    return arr if code == 1 else arr[()]


def unpack(document: bytes):
    """Decode a fedstream document (numpy content only) with stock msgpack and :func:`ext_hook`."""
    return msgpack.unpackb(document, ext_hook=ext_hook, strict_map_key=False)

#: torch dtypes the serializer must round-trip (shared by the round-trip and property tests).
TORCH_DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
]
