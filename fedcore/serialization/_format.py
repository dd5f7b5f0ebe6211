"""The fedstream msgpack extension types and the array header layout (see docs/serialization.md).

An n-d array travels as a msgpack ext whose payload is::

    u8  L                 length of the dtype string
    L   bytes (ASCII)     dtype string: numpy array-interface typestr ('<f4', '>i8', '|b1', '<c16', ...)
                          or '<bf2' / '>bf2' for bfloat16 (torch only)
    u8  ndim              number of dimensions (0..32)
    ndim x u64 big-endian shape
    u8  P                 number of zero padding bytes that follow (aligns the data in the document)
    P   bytes             zeros
    ... raw element bytes in C order; exactly prod(shape) * itemsize of them

Every field is plain bytes, so any language with a stock msgpack library can decode it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Extension type codes owned by fedstream (0..15 reserved for it).
EXT_NDARRAY = 1  # numpy.ndarray (any shape, including 0-d)
EXT_NPSCALAR = 2  # numpy scalar (np.float32(1.0), np.bool_(True), ...): same layout, ndim 0
EXT_TORCH = 3  # torch.Tensor: same layout; decoded as a detached CPU tensor
EXT_TUPLE = 4  # payload: one msgpack array; decoded as a tuple
EXT_ORDEREDDICT = 5  # payload: one msgpack map; decoded as collections.OrderedDict
RESERVED_EXT_CODES = range(16)

MAX_NDIM = 32
ALIGNMENT = 64  # array data of at least ALIGN_MIN_BYTES starts at a multiple of this offset in the document
ALIGN_MIN_BYTES = 1024

BFLOAT16_LE = "<bf2"
BFLOAT16_BE = ">bf2"

# kind -> allowed item sizes. Longdouble (f16 / c32) is platform-specific and refused on purpose.
_KIND_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8), "c": (8, 16)}

_U64 = struct.Struct(">Q")
_MAX_INTP = 2**63 - 1  # numpy's limit on itemsize x (product of the non-zero dimensions)


@dataclass(frozen=True)
class ArrayHeader:
    """Parsed array header: dtype string, shape and where the raw data starts inside the ext payload."""

    dtype: str
    shape: tuple[int, ...]
    data_offset: int  # relative to the start of the ext payload

    @property
    def itemsize(self) -> int:
        return int(self.dtype[2:]) if self.dtype[1:3] != "bf" else 2

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


def check_dtype_string(dtype: str) -> str | None:
    """Return None when ``dtype`` is an allowed wire dtype string, else the reason it is not."""
    if dtype in (BFLOAT16_LE, BFLOAT16_BE):
        return None
    if len(dtype) < 3:
        return f"malformed dtype string {dtype!r}"
    order, kind, size = dtype[0], dtype[1], dtype[2:]
    if kind not in _KIND_SIZES:
        return f"unsupported dtype kind {kind!r} in {dtype!r} (bool, int, uint, float and complex only)"
    if size not in {str(n) for n in _KIND_SIZES[kind]}:  # canonical spelling only: no '08', no '+8'
        return f"unsupported item size in dtype {dtype!r}"
    if int(size) == 1 and order != "|":
        return f"one-byte dtype {dtype!r} must use the '|' byte order"
    if int(size) > 1 and order not in "<>":
        return f"dtype {dtype!r} must state its byte order with '<' or '>'"
    return None


def pack_array_header(dtype: str, shape: tuple[int, ...], pad: int) -> bytes:
    """Header bytes for an array; ``pad`` zero bytes are included at the end."""
    raw = dtype.encode("ascii")
    parts = [bytes((len(raw),)), raw, bytes((len(shape),))]
    parts.extend(_U64.pack(d) for d in shape)
    parts.append(bytes((pad,)))
    parts.append(bytes(pad))
    return b"".join(parts)


def array_header_size(dtype: str, ndim: int) -> int:
    """Size of the header without padding (the pad-length byte included)."""
    return 1 + len(dtype) + 1 + 8 * ndim + 1


def parse_array_header(payload: memoryview) -> ArrayHeader:
    """Parse and validate the header at the start of an ext payload; raise ValueError with the reason."""
    n = len(payload)
    if n < 1:
        raise ValueError("empty array payload")
    dlen = payload[0]
    pos = 1 + dlen
    if pos + 1 > n:
        raise ValueError("array header truncated in its dtype string")
    try:
        dtype = bytes(payload[1:pos]).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("array dtype string is not ASCII") from None
    reason = check_dtype_string(dtype)
    if reason:
        raise ValueError(reason)
    ndim = payload[pos]
    pos += 1
    if ndim > MAX_NDIM:
        raise ValueError(f"array has {ndim} dimensions, more than the limit of {MAX_NDIM}")
    if pos + 8 * ndim + 1 > n:
        raise ValueError("array header truncated in its shape")
    shape = tuple(_U64.unpack_from(payload, pos + 8 * i)[0] for i in range(ndim))
    pos += 8 * ndim
    reach = 2 if dtype[1:3] == "bf" else int(dtype[2:])  # numpy refuses this even when a dimension is 0
    for d in shape:
        reach *= d or 1
    if reach > _MAX_INTP:
        raise ValueError(f"array shape {shape} of dtype {dtype} exceeds numpy's size limit of 2**63-1 bytes")
    pad = payload[pos]
    pos += 1 + pad
    header = ArrayHeader(dtype, shape, pos)
    if pos > n:
        raise ValueError("array header truncated in its padding")
    if n - pos != header.nbytes:
        raise ValueError(
            f"array data is {n - pos} bytes but dtype {dtype} and shape {shape} need {header.nbytes}"
        )
    return header
