"""``fedserver export``: the global model of a checkpoint as a ``.npz`` file, for use outside fedstream.

Checkpoints hold the model in fedstream's own files (msgpack, verified by a manifest); a researcher who
wants the trained model in a notebook, another framework or a model registry needs a plain, safe format.
An ``.npz`` (numpy's zip of ``.npy`` arrays, one per parameter name) loads anywhere numpy does, without
pickle: ``np.load(path)`` then, for a torch plan, ``model.load_state_dict({k: torch.from_numpy(v) ...})``.
The file is written to a temporary name beside it and renamed, so a failed export leaves no partial file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import CheckpointError
from fedcore.text_output import format_bytes
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import resumable_checkpoint_dir

__all__ = ["export_checkpoint", "register"]

_DESCRIPTION = """\
Write the global model of a checkpoint (the latest, or --round N) to FILE.npz: one array per parameter
and persistent buffer (BatchNorm running statistics), by name, dtypes and shapes as trained (bfloat16 models are stored as float32, which holds every bfloat16
value exactly). The checkpoint is verified against its manifest first; FILE is replaced only with
--force, and never left half-written."""

_EPILOG = """\
examples:
  fedserver export --checkpoint-dir runs/mlp --out mlp.npz
  fedserver export --checkpoint-dir runs/mlp --round 5 --out mlp-round5.npz --force

loading it:
  params = dict(np.load("mlp.npz"))                                          # numpy
  model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})  # a torch plan's model
"""


def register(subparsers: Any) -> None:
    """Add ``export`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    export = subparsers.add_parser("export", help="write a checkpoint's global model to a .npz file",
                                   description=_DESCRIPTION, epilog=textwrap.dedent(_EPILOG),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="the checkpoints of a run (fedserver run --checkpoint-dir)")
    export.add_argument("--round", type=int, metavar="N", help="the model after round N (default: the latest)")
    export.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="the file to write")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    export.set_defaults(func=_export, usage_error=export.error)


def _export(args: argparse.Namespace) -> int:
    if args.out.suffix != ".npz":
        args.usage_error(f"argument --out: {str(args.out)!r} must name a .npz file (numpy's format), e.g. model.npz")
    try:  # a mistyped DIR is bad usage (exit 2), and must not become a new, empty directory
        resumable_checkpoint_dir(args.checkpoint_dir)
    except CheckpointError as exc:
        args.usage_error(f"argument --checkpoint-dir: {str(exc).replace('cannot resume: ', '')}")
    round, arrays = export_checkpoint(args.checkpoint_dir, args.out, round=args.round, force=args.force)
    total = sum(a.nbytes for a in arrays.values())
    print(f"wrote {args.out}: the global model after round {round}, {len(arrays)} arrays, {format_bytes(total)}")
    return 0


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, *, round: int | None = None,
                      force: bool = False) -> tuple[int, dict[str, np.ndarray]]:
    """Write the params of ``checkpoint_dir``'s checkpoint of ``round`` (None: the latest) to ``out`` (.npz);
    returns the round and the arrays. CheckpointError when there is no such checkpoint, it is damaged, or
    ``out`` exists (without ``force``) or cannot be written."""
    directory = resumable_checkpoint_dir(checkpoint_dir)  # only looks: a typo must not create a directory
    store = CheckpointStore(directory)
    if round is None:
        round = store.latest_round()
    elif round not in store.rounds():
        raise CheckpointError(f"{str(directory)!r} holds no checkpoint of round {round}; it holds rounds "
                              f"{store.rounds()}")
    params = store.load_params(round)
    clashes = sorted(name for name in params if name.endswith(".npy") and name[:-4] in params)
    if clashes:  # numpy's reader finds entry 'x.npy' (parameter x) when asked for parameter 'x.npy'
        raise CheckpointError(f"cannot export to .npz: parameters {clashes} and {[n[:-4] for n in clashes]} would "
                              "read back as one another (numpy strips '.npy' from entry names)")
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{str(out)!r} exists: add --force to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # as open() would create it: mkstemp's 0600 would hide the model
        with os.fdopen(handle, "wb") as stream:
            _write_npz(stream, params)
        with np.load(temporary, allow_pickle=False) as written:  # every name is listed as itself
            if sorted(written.files) != sorted(params):
                raise CheckpointError(f"cannot export to .npz: parameter names {sorted(params)} read back as "
                                      f"{sorted(written.files)}")
        os.replace(temporary, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return round, params


def _write_npz(stream: Any, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (a zip of ``NAME.npy`` entries, pickle refused), without passing the names as
    keyword arguments: a parameter named ``file`` or ``allow_pickle`` would be taken for savez's own."""
    with zipfile.ZipFile(stream, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
