"""The node's dataset registry: named, tagged CSV/NPZ files, checked at registration and at every load.

``add`` reads the file once to validate it (formats: :mod:`fednode.dataset_formats`) and records its
shape, dtype, sample count, SHA-256, size and mtime in ``node.db``. ``load`` hashes the file again and
refuses to train on anything but the registered bytes: a missing or changed file is an error that names
the path and the ``fednode dataset`` commands that fix it. A file whose mtime changed but whose bytes did
not (a restore from backup) loads fine: the SHA-256 is the authority.

The path is local knowledge: :class:`DatasetRecord` (local) holds it; :meth:`DatasetRegistry.metadata`
gives the :class:`fedcore.wire.DatasetInfo` a node announces at Register, which does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcore.errors import DatasetFileError, DatasetRegistryError, NodeStoreError
from fedcore.plans.data import ArrayDataset
from fedcore.wire import DatasetInfo
from fednode import node_db
from fednode.dataset_formats import infer_format, parse_dataset_bytes, read_file_bytes, resolve_dtype

__all__ = ["DatasetRecord", "DatasetRegistry", "check_name", "check_tags", "read_dataset"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[^\s,]{1,64}")


@dataclass(frozen=True)
class DatasetRecord:
    """A registered dataset as the node knows it, path and file identity included (never sent)."""

    name: str
    path: Path
    format: str
    tags: tuple[str, ...]
    target: str | None  # CSV: header name of the target column; NPZ: None
    dtype: str  # numpy dtype string of X
    shape: tuple[int, ...]  # of X, samples first
    y_dtype: str
    y_shape: tuple[int, ...]
    num_samples: int
    sha256: str
    size: int  # bytes
    mtime_ns: int
    added_at: float  # unix time

    @property
    def info(self) -> DatasetInfo:
        """The shareable part of this record (name, tags, sample count, X shape and dtype, format)."""
        return DatasetInfo(self.name, self.tags, self.num_samples, self.shape, self.dtype, self.format)

    def add_command(self) -> str:
        """The ``fednode dataset add`` command line that registers this file again with the same options."""
        parts = ["fednode dataset add", self.name, shlex.quote(str(self.path))]
        if self.tags:
            parts.append(f"--tags {shlex.quote(','.join(self.tags))}")
        if self.target is not None:
            parts.append(f"--target {shlex.quote(self.target)}")
        dtype = np.dtype(self.dtype)
        parts.append(f"--dtype {dtype.name if dtype.kind == 'f' else 'keep'}")
        return " ".join(parts)


def check_name(name: object) -> str:
    """``name`` if it is a valid dataset name: 1-128 of ``A-Z a-z 0-9 _ . -``, starting alphanumeric."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DatasetRegistryError(
            f"invalid dataset name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit"
        )
    return name


def check_tags(tags: Iterable[str] | str) -> tuple[str, ...]:
    """Tags sorted and deduplicated; a bare str is one tag. Tags are ≤ 64 printable characters without
    whitespace or comma (a server refuses a Register announcing a control or invisible character)."""
    if isinstance(tags, str):
        tags = (tags,)
    try:
        items = list(tags)
    except TypeError:
        raise DatasetRegistryError(f"tags must be an iterable of str, got {type(tags).__name__}") from None
    for tag in items:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag) or not tag.isprintable():
            raise DatasetRegistryError(
                f"invalid tag {tag!r}: a tag is 1-64 printable characters without whitespace or comma"
            )
    return tuple(sorted(set(items)))


def read_dataset(
    name: str,
    path: str | os.PathLike[str],
    tags: Iterable[str] | str = (),
    fmt: str | None = None,
    target_column: str | int | None = None,
    dtype: str | np.dtype | None = "float32",
) -> DatasetRecord:
    """Validate the file at ``path`` and return the record that registers it as ``name``, touching no database
    (``fednode dataset add`` checks its input before it creates a node home).

    ``fmt`` is ``"csv"`` or ``"npz"`` (None: from the suffix). CSV needs ``target_column`` (header name
    or 0-based index). ``dtype`` is the features' floating dtype (None: NPZ keeps its own, CSV float64).

    Raises:
        DatasetRegistryError: invalid name/tags/options.
        DatasetFileError: the file is missing or unreadable, or its path does not resolve.
        DatasetFormatError: the content is not a valid dataset (the message says where).
    """
    return _read_record(name, _checked_options(name, path, tags, fmt, dtype), target_column)


@dataclass(frozen=True)
class _Options:
    tags: tuple[str, ...]
    file_path: Path
    file_format: str
    dtype: np.dtype | None


def _checked_options(name: str, path: str | os.PathLike[str], tags: Iterable[str] | str, fmt: str | None,
                     dtype: str | np.dtype | None) -> _Options:
    """Everything about a registration that can be checked without reading the file."""
    check_name(name)
    tag_tuple = check_tags(tags)
    try:
        file_path = Path(path).expanduser().resolve()
    except RuntimeError as exc:  # ~user naming no user here, a symlink loop
        raise DatasetFileError(f"cannot resolve the dataset path {str(path)!r}: {exc}") from None
    try:
        str(file_path).encode("utf-8")  # node.db keeps it as text
    except UnicodeEncodeError:
        raise DatasetFileError(
            f"the dataset path {str(file_path)!r} is not valid UTF-8 (a name written in another encoding, "
            f"its odd bytes shown as \\udcXX); rename the file, or the folder holding it, to a UTF-8 name"
        ) from None
    named = Path(path).expanduser()  # the operator's name for it: a link's target may have no suffix (DVC)
    file_format = infer_format(named if named.suffix or not file_path.suffix else file_path, fmt)
    return _Options(tag_tuple, file_path, file_format, resolve_dtype(dtype))


def _read_record(name: str, options: _Options, target_column: str | int | None) -> DatasetRecord:
    """Read and parse the file once; the record that registers it."""
    data, mtime_ns = read_file_bytes(options.file_path)
    X, y, target = parse_dataset_bytes(options.file_path, data, options.file_format, target_column, options.dtype)
    return DatasetRecord(
        name=name,
        path=options.file_path,
        format=options.file_format,
        tags=options.tags,
        target=target,
        dtype=X.dtype.str,
        shape=tuple(int(d) for d in X.shape),
        y_dtype=y.dtype.str,
        y_shape=tuple(int(d) for d in y.shape),
        num_samples=int(X.shape[0]),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        mtime_ns=mtime_ns,
        added_at=time.time(),
    )


class DatasetRegistry:
    """Registered datasets in the node database at ``db_path`` (see :mod:`fednode.node_db`)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        with node_db.connect(self.db_path):
            pass  # create and migrate now, so a bad database fails at startup

    def add(
        self,
        name: str,
        path: str | os.PathLike[str],
        tags: Iterable[str] | str = (),
        fmt: str | None = None,
        target_column: str | int | None = None,
        dtype: str | np.dtype | None = "float32",
    ) -> DatasetRecord:
        """Validate the file at ``path`` and register it as ``name`` (arguments: :func:`read_dataset`).

        Raises:
            DatasetRegistryError: invalid name/tags/options, or ``name`` is already registered.
            DatasetFileError: the file is missing or unreadable, or its path does not resolve.
            DatasetFormatError: the content is not a valid dataset (the message says where).
        """
        options = _checked_options(name, path, tags, fmt, dtype)
        self._refuse_duplicate(name)  # before reading a file that may be large
        return self.add_record(_read_record(name, options, target_column))

    def add_record(self, record: DatasetRecord) -> DatasetRecord:
        """Register ``record`` as :func:`read_dataset` made it (the file is not read again).

        Raises:
            DatasetRegistryError: ``record.name`` is already registered.
        """
        with node_db.connect(self.db_path) as conn:
            try:
                conn.execute(
                    "INSERT INTO datasets (name, path, format, tags, target, dtype, shape, y_dtype, y_shape,"
                    " num_samples, sha256, size, mtime_ns, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.name, str(record.path), record.format, json.dumps(record.tags),
                        record.target, record.dtype, json.dumps(record.shape), record.y_dtype,
                        json.dumps(record.y_shape), record.num_samples, record.sha256, record.size,
                        record.mtime_ns, record.added_at,
                    ),
                )
            except sqlite3.IntegrityError:
                self._refuse_duplicate(record.name)  # registered by another process meanwhile
                raise
        return record

    def list(self) -> list[DatasetRecord]:
        """Every registered dataset, by name."""
        with node_db.connect(self.db_path) as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM datasets ORDER BY name").fetchall()
        return [_record(row, self.db_path) for row in rows]

    def get(self, name: str) -> DatasetRecord:
        """The dataset registered as ``name``.

        Raises:
            DatasetRegistryError: no such dataset (the message lists the registered names).
        """
        with node_db.connect(self.db_path) as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM datasets WHERE name = ?", (name,)).fetchone()
            known = [] if row else [r[0] for r in conn.execute("SELECT name FROM datasets ORDER BY name")]
        if row is None:
            raise DatasetRegistryError(
                f"no dataset named {name!r} on this node; registered: {known or 'none'} "
                f"(register one with `fednode dataset add`)"
            )
        return _record(row, self.db_path)

    def remove(self, name: str) -> DatasetRecord | None:
        """Unregister ``name`` and return what it was (None if its row in node.db was damaged: removing it is
        the way out of that NodeStoreError); the file itself is left alone."""
        try:
            record: DatasetRecord | None = self.get(name)
        except NodeStoreError:
            record = None
        with node_db.connect(self.db_path) as conn:
            conn.execute("DELETE FROM datasets WHERE name = ?", (name,))
        return record

    def find_by_tags(self, tags: Iterable[str] | str) -> list[DatasetRecord]:
        """The datasets carrying every one of ``tags`` (all of them when ``tags`` is empty), by name."""
        wanted = set(check_tags(tags))
        return [record for record in self.list() if wanted.issubset(record.tags)]

    def metadata(self) -> list[DatasetInfo]:
        """What the node announces at Register: one :class:`DatasetInfo` per dataset, no paths."""
        return [record.info for record in self.list()]

    def load(self, name: str) -> ArrayDataset:
        """The arrays of ``name``, after checking the file still holds the registered bytes.

        Raises:
            DatasetRegistryError: no such dataset.
            DatasetFileError: the file is gone or changed since registration (the message says how to fix).
            DatasetFormatError: the content no longer parses (only if it is unchanged, i.e. never expected).
        """
        record = self.get(name)
        if record.path.is_dir():
            raise DatasetFileError(
                f"dataset {name!r}: its path {record.path} is now a directory, not the registered file. "
                f"Put the file back, or register the new one: `fednode dataset remove {name}` then "
                f"`{record.add_command()}` with its path"
            )
        if not record.path.is_file():
            raise DatasetFileError(
                f"dataset {name!r}: its file {record.path} no longer exists. If it moved, register it again: "
                f"`fednode dataset remove {name}` then `{record.add_command()}` with the new path"
            )
        data, _mtime_ns = read_file_bytes(record.path)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record.size or digest != record.sha256:
            raise DatasetFileError(
                f"dataset {name!r}: file {record.path} changed since registration (size {record.size} -> "
                f"{len(data)} bytes, SHA-256 {record.sha256[:12]} -> {digest[:12]}); the node only trains on "
                f"the registered data. If the change is intended, register it again: "
                f"`fednode dataset remove {name}` then `{record.add_command()}`"
            )
        X, y, _target = parse_dataset_bytes(
            record.path, data, record.format, record.target, np.dtype(record.dtype)
        )
        return ArrayDataset(X, y)

    def _refuse_duplicate(self, name: str) -> None:
        with node_db.connect(self.db_path) as conn:
            row = conn.execute("SELECT path FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is not None:
            raise DatasetRegistryError(
                f"a dataset named {name!r} is already registered (file {row[0]}); choose another name or "
                f"`fednode dataset remove {name}` first"
            )


_COLUMNS = (
    "name, path, format, tags, target, dtype, shape, y_dtype, y_shape, num_samples, sha256, size, "
    "mtime_ns, added_at"
)


def _record(row: tuple, db_path: Path) -> DatasetRecord:
    (name, path, fmt, tags, target, dtype, shape, y_dtype, y_shape, n, sha, size, mtime_ns, added_at) = row

    def damaged(column: str, value: object) -> NodeStoreError:
        return NodeStoreError(
            f"node database {db_path}: dataset {name!r} has a damaged {column!r} column ({str(value)[:80]!r}); "
            f"`fednode dataset remove {name}` and add it again"
        )

    def json_list(column: str, value: object, item: type) -> tuple:
        try:
            items = json.loads(value) if isinstance(value, str) else None
        except (ValueError, RecursionError):
            items = None
        if not isinstance(items, list) or not all(type(i) is item for i in items):
            raise damaged(column, value)
        return tuple(items)

    for column, value in (("dtype", dtype), ("y_dtype", y_dtype)):
        try:
            np.dtype(value)
        except (TypeError, ValueError):
            raise damaged(column, value) from None
    if not isinstance(path, str) or not path:
        raise damaged("path", path)
    return DatasetRecord(
        name=name,
        path=Path(path),
        format=fmt,
        tags=json_list("tags", tags, str),
        target=target,
        dtype=dtype,
        shape=json_list("shape", shape, int),
        y_dtype=y_dtype,
        y_shape=json_list("y_shape", y_shape, int),
        num_samples=int(n),
        sha256=sha,
        size=int(size),
        mtime_ns=int(mtime_ns),
        added_at=float(added_at),
    )

