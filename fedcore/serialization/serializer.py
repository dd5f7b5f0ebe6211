"""``Serializer``: the one way fedstream turns parameters and state into bytes and back (never pickle)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import DecodeError
from fedcore.serialization.decoder import decode
from fedcore.serialization.encoder import EncodedDocument, encode


@dataclass(frozen=True)
class SerializerLimits:
    """Bounds applied while encoding and decoding (hostile input must not exhaust memory or the stack)."""

    max_depth: int = 100  # nested containers (lists, dicts, tuples, OrderedDicts)
    max_objects: int = 10_000_000  # values inside containers, counted before they are allocated
    max_size: int | None = None  # bytes of one document read by ``load``; None: no limit here


DEFAULT_LIMITS = SerializerLimits()


class Serializer:
    """msgpack with fedstream's extension types for arrays, tensors, tuples and OrderedDicts.

    All methods are static: ``Serializer.dumps(obj)``, ``Serializer.loads(data)``, ``Serializer.dump(obj,
    path)``, ``Serializer.load(path)``. See docs/serialization.md for the wire format and the rules:

    - decoded arrays are writable; they are zero-copy views of ``data`` when it is a writable buffer
      (``bytearray``, a numpy ``uint8`` array, what ``load`` and the chunk assembler produce), and copies when
      it is read-only (``bytes``);
    - torch tensors decode as detached CPU tensors of the same dtype (bfloat16 included);
    - an unsupported object raises :class:`fedcore.errors.EncodeError` (a ``TypeError``) naming its type
      and path; bad bytes raise :class:`fedcore.errors.DecodeError` (a ``ValueError``).
    """

    @staticmethod
    def encode(obj: Any, limits: SerializerLimits = DEFAULT_LIMITS) -> EncodedDocument:
        """Encode into segments without joining them (large arrays stay views of their own memory)."""
        return encode(obj, max_depth=limits.max_depth)

    @staticmethod
    def dumps(obj: Any, limits: SerializerLimits = DEFAULT_LIMITS) -> bytes:
        """Encode ``obj`` into one ``bytes`` document."""
        return encode(obj, max_depth=limits.max_depth).tobytes()

    @staticmethod
    def loads(data: Any, *, copy: bool | None = None, limits: SerializerLimits = DEFAULT_LIMITS) -> Any:
        """Decode one document from a bytes-like object (see the class docstring for copy semantics)."""
        if limits.max_size is not None:
            try:
                size = memoryview(data).nbytes
            except TypeError:
                name = type(data).__name__
                raise DecodeError(f"cannot decode an object of type {name}; expected bytes-like") from None
            if size > limits.max_size:
                raise DecodeError(f"document of {size} bytes exceeds max_size {limits.max_size}")
        return decode(data, copy=copy, max_depth=limits.max_depth, max_objects=limits.max_objects)

    @staticmethod
    def dump(obj: Any, path: str | os.PathLike[str], limits: SerializerLimits = DEFAULT_LIMITS) -> int:
        """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename); return the byte count.

        A crash mid-write leaves any previous file at ``path`` untouched.
        """
        doc = encode(obj, max_depth=limits.max_depth)
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for segment in doc.segments:
                    fh.write(segment)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return doc.nbytes

    @staticmethod
    def load(path: str | os.PathLike[str], limits: SerializerLimits = DEFAULT_LIMITS) -> Any:
        """Read a document written by :meth:`dump`; arrays are zero-copy views of one private buffer."""
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if limits.max_size is not None and size > limits.max_size:
                raise DecodeError(f"{path}: {size} bytes exceeds max_size {limits.max_size}")
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise DecodeError(f"{path}: file shrank while reading ({got} of {size} bytes)")
                got += n
        try:
            return decode(buf, max_depth=limits.max_depth, max_objects=limits.max_objects)
        except DecodeError as exc:
            raise DecodeError(f"{path}: {exc}") from None
