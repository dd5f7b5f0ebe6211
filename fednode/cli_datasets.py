"""``fednode dataset add|list|show|remove``: the operator's commands for the node's dataset registry.

:func:`register` adds the ``dataset`` command to the top-level ``fednode`` subparsers. Each leaf sets
``func`` (``args -> exit status``); store errors propagate as :class:`fedcore.errors.FedstreamError` for
the top-level ``main`` to print.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

import numpy as np

from fedcore.text_output import format_bytes, format_time, key_values, text_table
from fednode.datasets import DatasetRecord, DatasetRegistry, read_dataset
from fednode.home import FILES_HELP, add_home_options, db_path_from_args, existing_db_path_from_args

__all__ = ["register"]

_RAW = argparse.RawDescriptionHelpFormatter

_DESCRIPTION = """\
Register the data this node trains on. A dataset is a named, tagged file: CSV (a header row, numeric
columns only, one of them the target) or NPZ (arrays X and y, as written by numpy.savez). Researchers
select datasets by tag; they see the name, tags, sample count, feature shape, dtype and format, never
the path.

The file is read and checked once at registration (header, numeric cells, no NaN/inf, matching X/y
lengths), and its SHA-256 is recorded: a task never trains on a file that changed since. If you edit
or move the file on purpose, remove the dataset and add it again."""



def register(subparsers: Any) -> None:
    """Add ``dataset`` and its subcommands to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "dataset", help="register, list, show and remove the datasets this node trains on",
        description=_DESCRIPTION, epilog=FILES_HELP, formatter_class=_RAW,
    )
    commands = parser.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)

    add = commands.add_parser(
        "add", help="validate a CSV/NPZ file and register it under a name", formatter_class=_RAW,
        description="Read FILE once, check it, and register it as NAME with its shape, dtype, sample "
        "count and SHA-256.\nThe file stays where it is; the node reads it at each task.",
        epilog=textwrap.dedent("""\
            examples:
              fednode dataset add heart-2024 data/heart.csv --target disease --tags heart,tabular
              fednode dataset add mnist-site1 data/mnist.npz --tags mnist --dtype float32
              fednode dataset add raw data/raw.npz --dtype keep      # keep the NPZ's own X dtype
            """) + "\n" + FILES_HELP,
    )
    add.add_argument("name", metavar="NAME", help="unique name: letters, digits, '_', '.', '-' (max 128)")
    add.add_argument("path", metavar="FILE", help="the .csv or .npz file")
    add.add_argument(
        "--tags", "-t", metavar="TAG[,TAG...]", action="append", default=[],
        help="tags researchers select datasets by; comma separated, repeatable",
    )
    add.add_argument(
        "--format", dest="fmt", choices=("csv", "npz"), default=None,
        help="file format (default: from the suffix, .csv or .npz)",
    )
    add.add_argument(
        "--target", metavar="COLUMN", default=None,
        help="CSV only, required: the target column, by header name or 0-based index (-1: last)",
    )
    add.add_argument(
        "--dtype", choices=("float16", "float32", "float64", "keep"), default="float32",
        help="dtype of the features X (default float32; 'keep': the NPZ's own dtype, float64 for CSV)",
    )
    add_home_options(add)
    add.set_defaults(func=_add)

    listing = commands.add_parser(
        "list", help="list the registered datasets", formatter_class=_RAW,
        description="List the registered datasets, by name.", epilog=FILES_HELP,
    )
    listing.add_argument(
        "--tags", "-t", metavar="TAG[,TAG...]", action="append", default=[],
        help="only datasets carrying all these tags",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    add_home_options(listing, existing=True)
    listing.set_defaults(func=_list)

    show = commands.add_parser(
        "show", help="show one dataset, path and SHA-256 included", formatter_class=_RAW,
        description="Show everything the node records about dataset NAME.", epilog=FILES_HELP,
    )
    show.add_argument("name", metavar="NAME")
    show.add_argument(
        "--verify", action="store_true",
        help="also read the file and check it is unchanged and valid (exit status 1 if not)",
    )
    show.add_argument("--json", action="store_true", help="print a JSON object")
    add_home_options(show, existing=True)
    show.set_defaults(func=_show)

    remove = commands.add_parser(
        "remove", help="unregister a dataset (the file is left alone)", formatter_class=_RAW,
        description="Unregister dataset NAME. The file itself is not touched.", epilog=FILES_HELP,
    )
    remove.add_argument("name", metavar="NAME")
    add_home_options(remove, existing=True)
    remove.set_defaults(func=_remove)


def _split_tags(values: list[str]) -> list[str]:
    return [tag.strip() for value in values for tag in value.split(",") if tag.strip()]


def _add(args: argparse.Namespace) -> int:
    db = db_path_from_args(args)
    options = {"fmt": args.fmt, "target_column": args.target, "dtype": None if args.dtype == "keep" else args.dtype}
    if db.exists():
        record = DatasetRegistry(db).add(args.name, args.path, _split_tags(args.tags), **options)
    else:  # a new home: the file is checked first, so a command failing on its input creates nothing
        record = read_dataset(args.name, args.path, _split_tags(args.tags), **options)
        record = DatasetRegistry(db).add_record(record)
    print(
        f"registered dataset {record.name!r}: {_samples(record.num_samples)}, features {list(record.shape)} "
        f"{_dtype_name(record.dtype)}, {record.format}, tags {','.join(record.tags) or '-'}, "
        f"sha256 {record.sha256[:12]}"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    registry = DatasetRegistry(existing_db_path_from_args(args))
    records = registry.find_by_tags(_split_tags(args.tags))
    if args.json:
        print(json.dumps([_as_json(record) for record in records], indent=2))
        return 0
    if not records:
        hint = " with these tags" if args.tags else "; add one with `fednode dataset add`"
        print("no datasets registered" + hint)
        return 0
    rows = [
        (r.name, r.format, r.num_samples, "x".join(map(str, r.shape)), _dtype_name(r.dtype),
         ",".join(r.tags) or "-")
        for r in records
    ]
    print(text_table(("NAME", "FORMAT", "SAMPLES", "SHAPE", "DTYPE", "TAGS"), rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    registry = DatasetRegistry(existing_db_path_from_args(args))
    record = registry.get(args.name)
    if args.json:
        print(json.dumps(_as_json(record), indent=2))
    else:
        fields = [
            ("name", record.name),
            ("path", record.path),
            ("format", record.format),
            ("tags", ",".join(record.tags) or "-"),
            ("samples", record.num_samples),
            ("features", f"{list(record.shape)} {_dtype_name(record.dtype)}"),
            ("target", f"{record.target or 'y'} {list(record.y_shape)} {_dtype_name(record.y_dtype)}"),
            ("file size", format_bytes(record.size)),
            ("sha256", record.sha256),
            ("registered", format_time(record.added_at)),
        ]
        print(key_values(fields))
    if args.verify:
        registry.load(record.name)  # raises DatasetFileError / DatasetFormatError with the fix
        print(f"verified: {record.path} is unchanged and loads ({_samples(record.num_samples)})")
    return 0


def _remove(args: argparse.Namespace) -> int:
    record = DatasetRegistry(existing_db_path_from_args(args)).remove(args.name)
    if record is None:
        print(f"removed dataset {args.name!r}, whose record was damaged (its file was left in place)")
    else:
        print(f"removed dataset {record.name!r} (the file {record.path} was left in place)")
    return 0


def _samples(n: int) -> str:
    return f"{n} sample{'' if n == 1 else 's'}"


def _dtype_name(dtype: str) -> str:
    return np.dtype(dtype).name


def _as_json(record: DatasetRecord) -> dict[str, object]:
    return {
        "name": record.name,
        "path": str(record.path),
        "format": record.format,
        "tags": list(record.tags),
        "num_samples": record.num_samples,
        "shape": list(record.shape),
        "dtype": record.dtype,
        "target": record.target,
        "y_shape": list(record.y_shape),
        "y_dtype": record.y_dtype,
        "size": record.size,
        "sha256": record.sha256,
        "added_at": record.added_at,
    }
