"""Decode a fedstream msgpack document, zero-copy for arrays, bounded in depth and size.

A small pure-Python msgpack reader is used instead of ``msgpack.unpackb`` because the C unpacker copies
every bin/ext payload into a new ``bytes`` object: for a model that is one full copy of the parameters.
Here arrays are ``np.frombuffer`` views of the input (when it is writable), every length is checked
against the bytes that remain before anything is allocated, and nesting depth and object counts are capped.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

import numpy as np

from fedcore.errors import DecodeError
from fedcore.serialization import _format as fmt

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")

_FIXED_INTS = {0xCC: (1, None), 0xCD: (2, _U16), 0xCE: (4, _U32), 0xCF: (8, _U64),
               0xD0: (1, _I8), 0xD1: (2, _I16), 0xD2: (4, _I32), 0xD3: (8, _I64)}
_FIXEXT_SIZES = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


class _Decoder:
    def __init__(self, buf: memoryview, *, copy: bool, max_depth: int, max_objects: int) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.copy = copy
        self.max_depth = max_depth
        self.objects_left = max_objects

    # -- primitives ----------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise DecodeError(
                f"truncated document: {what} needs {n} bytes at offset {start}, only {self.end - start} left"
            )
        self.pos = start + n
        return start

    def _uint(self, size: int, what: str) -> int:
        at = self._need(size, what)
        if size == 1:
            return self.buf[at]
        return (_U16 if size == 2 else _U32).unpack_from(self.buf, at)[0]

    def _count(self, n: int, min_item_bytes: int, what: str) -> int:
        if n * min_item_bytes > self.end - self.pos:
            raise DecodeError(
                f"{what} claims {n} items but only {self.end - self.pos} bytes remain at offset {self.pos}"
            )
        self.objects_left -= n
        if self.objects_left < 0:
            raise DecodeError("document holds more objects than the configured limit")
        return n

    # -- values --------------------------------------------------------------------------------
    def value(self, depth: int) -> Any:
        at = self._need(1, "a type byte")
        b = self.buf[at]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if b <= 0x9F:
            return self._list(b & 0x0F, depth)
        if b <= 0xBF:
            return self._str(b & 0x1F)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b in _FIXED_INTS:
            size, st = _FIXED_INTS[b]
            at = self._need(size, "an integer")
            return self.buf[at] if st is None else st.unpack_from(self.buf, at)[0]
        if b == 0xCA:
            return _F32.unpack_from(self.buf, self._need(4, "a float32"))[0]
        if b == 0xCB:
            return _F64.unpack_from(self.buf, self._need(8, "a float64"))[0]
        if 0xC4 <= b <= 0xC6:
            n = self._uint(1 << (b - 0xC4), "a bin length")
            at = self._need(n, "bin data")
            return bytes(self.buf[at : at + n])
        if 0xD9 <= b <= 0xDB:
            return self._str(self._uint(1 << (b - 0xD9), "a str length"))
        if b == 0xDC or b == 0xDD:
            return self._list(self._uint(2 if b == 0xDC else 4, "an array length"), depth)
        if b == 0xDE or b == 0xDF:
            return self._map(self._uint(2 if b == 0xDE else 4, "a map length"), depth)
        if b in _FIXEXT_SIZES:
            return self._ext(_FIXEXT_SIZES[b], depth)
        if 0xC7 <= b <= 0xC9:
            return self._ext(self._uint(1 << (b - 0xC7), "an ext length"), depth)
        raise DecodeError(f"invalid msgpack type byte 0x{b:02x} at offset {at}")

    def _str(self, n: int) -> str:
        at = self._need(n, "str data")
        try:
            return str(self.buf[at : at + n], "utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"str at offset {at} is not valid UTF-8") from None

    def _enter(self, depth: int) -> int:
        if depth >= self.max_depth:
            raise DecodeError(f"nesting deeper than the limit of {self.max_depth} levels at offset {self.pos}")
        return depth + 1

    def _list(self, n: int, depth: int) -> list:
        depth = self._enter(depth)
        self._count(n, 1, "an array")
        value = self.value
        return [value(depth) for _ in range(n)]

    def _map(self, n: int, depth: int, cls: type = dict) -> Any:
        depth = self._enter(depth)
        self._count(n, 2, "a map")
        out = cls()
        for _ in range(n):
            at = self.pos
            key = self.value(depth)
            if type(key) not in (str, int, bool):
                raise DecodeError(f"map key at offset {at} is a {type(key).__name__}; only str and int keys")
            if key in out:
                raise DecodeError(f"duplicate map key {key!r} at offset {at}")
            out[key] = self.value(depth)
        return out

    def _ext(self, n: int, depth: int) -> Any:
        code = _I8.unpack_from(self.buf, self._need(1, "an ext type"))[0]
        start = self._need(n, "ext data")
        stop = start + n
        if code in (fmt.EXT_NDARRAY, fmt.EXT_NPSCALAR, fmt.EXT_TORCH):
            return self._array(code, start, stop)
        if code in (fmt.EXT_TUPLE, fmt.EXT_ORDEREDDICT):
            saved_end, self.end, self.pos = self.end, stop, start
            at = self._need(1, "a container type byte")
            b = self.buf[at]
            if code == fmt.EXT_TUPLE:
                if 0x90 <= b <= 0x9F:
                    n_items = b & 0x0F
                elif b in (0xDC, 0xDD):
                    n_items = self._uint(2 if b == 0xDC else 4, "an array length")
                else:
                    raise DecodeError(f"tuple ext at offset {start} does not hold a msgpack array")
                result: Any = tuple(self._list(n_items, depth))
            else:
                if 0x80 <= b <= 0x8F:
                    n_items = b & 0x0F
                elif b in (0xDE, 0xDF):
                    n_items = self._uint(2 if b == 0xDE else 4, "a map length")
                else:
                    raise DecodeError(f"OrderedDict ext at offset {start} does not hold a msgpack map")
                result = self._map(n_items, depth, OrderedDict)
            if self.pos != stop:
                raise DecodeError(f"ext at offset {start} has {stop - self.pos} trailing bytes")
            self.end = saved_end
            return result
        raise DecodeError(f"unknown msgpack ext type {code} at offset {start}")

    def _array(self, code: int, start: int, stop: int) -> Any:
        payload = self.buf[start:stop]
        try:
            header = fmt.parse_array_header(payload)
        except ValueError as exc:
            raise DecodeError(f"bad array at offset {start}: {exc}") from None
        is_bf16 = header.dtype in (fmt.BFLOAT16_LE, fmt.BFLOAT16_BE)
        if is_bf16 and code != fmt.EXT_TORCH:
            raise DecodeError(f"bfloat16 array at offset {start} is only valid as a torch tensor")
        np_dtype = np.dtype(header.dtype[0] + "i2") if is_bf16 else np.dtype(header.dtype)
        arr = np.frombuffer(payload[header.data_offset :], dtype=np_dtype).reshape(header.shape)
        if header.dtype == "|b1" and arr.size and arr.view(np.uint8).max() > 1:
            raise DecodeError(f"bool array at offset {start} holds bytes other than 0 and 1")
        if self.copy or not arr.flags.writeable or not arr.flags.aligned:
            arr = arr.copy()
        if code == fmt.EXT_NDARRAY:
            return arr
        if code == fmt.EXT_NPSCALAR:
            if header.shape != ():
                raise DecodeError(f"numpy scalar at offset {start} has shape {header.shape}, expected ()")
            return arr[()]
        return _to_tensor(arr, is_bf16, start)


def _to_tensor(arr: np.ndarray, is_bf16: bool, offset: int) -> Any:
    try:
        import torch
    except ImportError:
        raise DecodeError(
            f"the document holds a torch tensor at offset {offset} but torch is not installed"
        ) from None
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    tensor = torch.from_numpy(arr)
    return tensor.view(torch.bfloat16) if is_bf16 else tensor


def decode(data: Any, *, copy: bool | None = None, max_depth: int = 100, max_objects: int = 10_000_000) -> Any:
    """Decode one document from a bytes-like object.

    ``copy=None`` (default): arrays are zero-copy views when ``data`` is writable (they then share its
    memory), copies otherwise, so returned arrays are always writable. ``copy=True`` always copies.
    """
    try:
        buf = memoryview(data)
    except TypeError:
        raise DecodeError(f"cannot decode an object of type {type(data).__name__}; expected bytes-like") from None
    if buf.ndim != 1 or buf.itemsize != 1 or not buf.contiguous:
        buf = buf.cast("B") if buf.c_contiguous else memoryview(buf.tobytes())
    if buf.format != "B":
        buf = buf.cast("B")
    must_copy = bool(copy) if copy is not None else buf.readonly
    dec = _Decoder(buf, copy=must_copy, max_depth=max_depth, max_objects=max_objects)
    try:
        obj = dec.value(0)
    except RecursionError:
        raise DecodeError("document nests too deeply for the interpreter") from None
    if dec.pos != len(buf):
        raise DecodeError(f"{len(buf) - dec.pos} trailing bytes after the document (offset {dec.pos})")
    return obj
