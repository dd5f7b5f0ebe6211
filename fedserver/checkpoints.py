"""``CheckpointStore``: one verified folder per round, and a ``latest.json`` pointer switched atomically.

Layout of ``directory``::

    round-0007/params.msgpack      global params x (Serializer)
    round-0007/aggregator.msgpack  {"name", "config", "state"} of the aggregator (Serializer)
    round-0007/experiment.json     experiment state: rng, strategy, round index, config (JSON)
    round-0007/manifest.json       format version, round, created_at, each file's size and SHA-256
    latest.json                    {"format_version", "round", "folder"}

Crash safety: a round is written into a hidden temporary folder, every file and the folder fsynced,
the folder renamed to ``round-NNNN``, and only then ``latest.json`` replaced (temp file, fsync,
``os.replace``, fsync of the directory). A crash at any point leaves ``latest.json`` naming a complete
earlier checkpoint. One writer per directory.

Loading checks the manifest, then each file's size and digest before decoding it, and raises
:class:`CheckpointError` naming the file and the fault (missing, truncated, digest mismatch, corrupt
msgpack, invalid JSON, unknown format version) — never a bare KeyError or JSONDecodeError.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import CheckpointError, DecodeError, EncodeError
from fedcore.serialization import Serializer

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "CheckpointStore"]

FORMAT_VERSION = 1
LATEST = "latest.json"
MANIFEST = "manifest.json"
PARAMS = "params.msgpack"
AGGREGATOR = "aggregator.msgpack"
EXPERIMENT = "experiment.json"
_FILES = (PARAMS, AGGREGATOR, EXPERIMENT)
_FOLDER = re.compile(r"round-(\d{4,})")
_TEMP_PREFIX = ".incomplete-"
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to resume after ``round``: x, the aggregator and the experiment's own state."""

    round: int
    params: dict[str, np.ndarray]
    aggregator_name: str
    aggregator_config: dict[str, Any]
    aggregator_state: dict[str, Any]
    experiment_state: dict[str, Any]
    created_at: str
    folder: Path


def folder_name(round: int) -> str:
    """``round-0007`` for round 7 (more digits past 9999)."""
    return f"round-{round:04d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, document: Any) -> None:
    """Write JSON to ``path`` atomically: temporary file, fsync, ``os.replace``, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check_round(round: Any) -> int:
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0:
        raise CheckpointError(f"round must be an int >= 0, got {round!r}")
    return int(round)


class CheckpointStore:
    """Round checkpoints under ``directory`` (created if missing).

    ``keep_last``: after each save, keep only the ``keep_last`` highest rounds (plus the one
    ``latest.json`` names, always); None keeps everything.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int | None = None) -> None:
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise CheckpointError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {str(self.directory)!r}: {exc}"
            ) from None

    # -- writing ----------------------------------------------------------------------------------

    def save(
        self,
        round: int,
        params: Mapping[str, np.ndarray],
        aggregator_name: str,
        aggregator_config: Mapping[str, Any],
        aggregator_state: Mapping[str, Any],
        experiment_state: Mapping[str, Any],
    ) -> Path:
        """Write the checkpoint of ``round`` and make it the latest; returns its folder.

        ``experiment_state`` must be JSON-able (it may hold ints beyond 64 bits, e.g. a numpy PCG64
        state); it comes back as JSON does (tuples as lists). Saving a round that already exists
        replaces that folder.
        """
        round = _check_round(round)
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in params.items()
        ):
            raise CheckpointError("params must be a mapping of str names to numpy arrays")
        if not isinstance(aggregator_name, str) or not aggregator_name:
            raise CheckpointError(f"aggregator_name must be a non-empty str, got {aggregator_name!r}")
        for what, value in (
            ("aggregator_config", aggregator_config),
            ("aggregator_state", aggregator_state),
            ("experiment_state", experiment_state),
        ):
            if not isinstance(value, Mapping):
                raise CheckpointError(f"{what} must be a mapping, got {type(value).__name__}")
        try:
            experiment_json = json.dumps(dict(experiment_state), indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"experiment_state must be JSON-able (finite numbers, str, lists, dicts): {exc}"
            ) from None

        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # removed since __init__: made again
            self._write_round(round, params, aggregator_name, aggregator_config, aggregator_state, experiment_json)
        except OSError as exc:  # unwritable, full, removed, or a directory where a file goes: nothing replaced
            raise CheckpointError(
                f"cannot write the checkpoint of round {round} under {str(self.directory)!r}: {exc}"
            ) from None
        self._prune(round)
        return self.directory / folder_name(round)

    def _write_round(self, round: int, params: Mapping[str, np.ndarray], aggregator_name: str,
                     aggregator_config: Mapping[str, Any], aggregator_state: Mapping[str, Any],
                     experiment_json: str) -> None:
        """Write the round's folder, install it, then switch ``latest.json`` to it (OSError on a failed write)."""
        self._remove_incomplete()
        final = self.directory / folder_name(round)
        work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}-", dir=self.directory))
        try:
            aggregator_doc = {
                "name": aggregator_name,
                "config": dict(aggregator_config),
                "state": dict(aggregator_state),
            }
            try:
                Serializer.dump(dict(params), work / PARAMS)
                Serializer.dump(aggregator_doc, work / AGGREGATOR)
            except EncodeError as exc:
                raise CheckpointError(f"round {round}: cannot serialize the checkpoint: {exc}") from None
            (work / EXPERIMENT).write_text(experiment_json + "\n", encoding="utf-8")
            _fsync_path(work / EXPERIMENT)
            manifest = {
                "format_version": FORMAT_VERSION,
                "round": round,
                "created_at": datetime.fromtimestamp(time.time(), tz=UTC).isoformat(
                    timespec="seconds"
                ),
                "files": {
                    name: {"size": (work / name).stat().st_size, "sha256": _sha256_of(work / name)}
                    for name in _FILES
                },
            }
            _write_json(work / MANIFEST, manifest)  # fsyncs the folder too
            self._install(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _write_json(
            self.directory / LATEST, {"format_version": FORMAT_VERSION, "round": round, "folder": final.name}
        )

    def _install(self, work: Path, final: Path) -> None:
        """Rename the complete folder ``work`` to ``final``, replacing an older folder of that round."""
        if final.exists():
            # An older save of this round (e.g. written before a crash, or the timeline of a run that
            # was resumed from an earlier round). Move it aside first: rename cannot replace a folder.
            stale = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}-old-", dir=self.directory))
            os.replace(final, stale / final.name)
            os.replace(work, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(work, final)
        _fsync_path(self.directory)

    def _remove_incomplete(self) -> None:
        """Delete temporary folders left by a save that crashed."""
        for path in self.directory.glob(f"{_TEMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, latest_round: int) -> None:
        if self.keep_last is None:
            return
        keep = set(self.rounds()[-self.keep_last :]) | {latest_round}
        for round in self.rounds():
            if round not in keep:
                shutil.rmtree(self.directory / folder_name(round), ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint folder (one holding a manifest), ascending."""
        found = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []  # the directory was removed since: no checkpoint left in it
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint directory {str(self.directory)!r}: {exc}") from None
        for path in entries:
            match = _FOLDER.fullmatch(path.name)
            if match and (path / MANIFEST).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_round(self) -> int | None:
        """The round ``latest.json`` names, or None when no checkpoint was ever completed here."""
        path = self.directory / LATEST
        if not path.exists():
            return None
        document = self._read_json(path)
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unknown format version {version!r} (this fedserver reads {FORMAT_VERSION})"
            )
        round, folder = document.get("round"), document.get("folder")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0 or folder != folder_name(round):
            raise CheckpointError(
                f"{path}: expected a round >= 0 and its folder name, got round={round!r}, folder={folder!r}"
            )
        return round

    def load_latest(self) -> Checkpoint:
        """The checkpoint ``latest.json`` names (CheckpointError when there is none or it is damaged)."""
        round = self.latest_round()
        if round is None:
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r}: {LATEST} is missing")
        if not (self.directory / folder_name(round)).is_dir():
            raise CheckpointError(
                f"{self.directory / LATEST} points to round {round}, "
                f"but folder {folder_name(round)} is missing"
            )
        return self.load(round)

    def load(self, round: int) -> Checkpoint:
        """The checkpoint of ``round``, every file verified against the manifest."""
        folder, manifest = self._open(round)
        params = self._read_params(folder, manifest)
        aggregator = self._read_msgpack(folder / AGGREGATOR, manifest)
        if (
            not isinstance(aggregator, dict)
            or not isinstance(aggregator.get("name"), str)
            or not isinstance(aggregator.get("config"), dict)
            or not isinstance(aggregator.get("state"), dict)
        ):
            raise CheckpointError(
                f"{folder / AGGREGATOR}: expected a map with 'name' (str), 'config' and 'state' (maps)"
            )
        experiment_state = self._read_json(folder / EXPERIMENT, manifest)
        return Checkpoint(
            round=manifest["round"],
            params=params,
            aggregator_name=aggregator["name"],
            aggregator_config=aggregator["config"],
            aggregator_state=aggregator["state"],
            experiment_state=experiment_state,
            created_at=manifest["created_at"],
            folder=folder,
        )

    def load_params(self, round: int) -> dict[str, np.ndarray]:
        """Only the global params x of ``round``'s checkpoint, verified against the manifest (size, SHA-256).

        What ``Experiment(low_memory=True)`` reloads x from: one file read, the aggregator and experiment
        files untouched. The arrays are writable views of one buffer of the file's size.
        """
        folder, manifest = self._open(round)
        return self._read_params(folder, manifest)

    def load_experiment_state(self, round: int) -> dict[str, Any]:
        """Only the experiment state of ``round``'s checkpoint (``experiment.json``), verified against the
        manifest: what a resume would read of its configuration, without reading the model."""
        folder, manifest = self._open(round)
        return self._read_json(folder / EXPERIMENT, manifest)

    def _open(self, round: int) -> tuple[Path, dict[str, Any]]:
        """The folder of ``round`` and its checked manifest."""
        round = _check_round(round)
        folder = self.directory / folder_name(round)
        if not folder.is_dir():
            raise CheckpointError(
                f"no checkpoint for round {round}: folder {folder} is missing (have {self.rounds()})"
            )
        return folder, self._read_manifest(folder, round)

    def _read_params(self, folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
        params = self._read_msgpack(folder / PARAMS, manifest)
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in params.items()
        ):
            raise CheckpointError(f"{folder / PARAMS}: expected a map of str names to arrays")
        return params

    def _read_manifest(self, folder: Path, round: int) -> dict[str, Any]:
        path = folder / MANIFEST
        manifest = self._read_json(path)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unknown format version {version!r} (this fedserver reads {FORMAT_VERSION})"
            )
        if manifest.get("round") != round:
            raise CheckpointError(
                f"{path}: manifest is for round {manifest.get('round')!r}, expected {round}"
            )
        if not isinstance(manifest.get("created_at"), str):
            raise CheckpointError(f"{path}: 'created_at' is missing or not a string")
        files = manifest.get("files")
        for name in _FILES:
            entry = files.get(name) if isinstance(files, dict) else None
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str)
            ):
                raise CheckpointError(f"{path}: no valid entry (size, sha256) for {name!r} under 'files'")
        return manifest

    def _read_verified(self, path: Path, manifest: dict[str, Any]) -> bytearray:
        """The bytes of ``path`` after checking them against the manifest's size and SHA-256."""
        expected = manifest["files"][path.name]
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(
                    f"{path}: size {size} bytes, the manifest says {expected['size']} "
                    "(truncated or overwritten)"
                )
            buffer = bytearray(size)
            with open(path, "rb") as fh:
                got = fh.readinto(buffer)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc}") from None
        if got != size:
            raise CheckpointError(f"{path}: read {got} of {size} bytes (file changed while reading)")
        digest = hashlib.sha256(buffer).hexdigest()
        if digest != expected["sha256"]:
            raise CheckpointError(
                f"{path}: SHA-256 {digest} does not match the manifest's {expected['sha256']}"
            )
        return buffer

    def _read_msgpack(self, path: Path, manifest: dict[str, Any]) -> Any:
        buffer = self._read_verified(path, manifest)
        try:
            return Serializer.loads(buffer)  # writable buffer: arrays are zero-copy views of it
        except DecodeError as exc:
            raise CheckpointError(f"{path}: corrupt or truncated msgpack: {exc}") from None

    def _read_json(self, path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JSON object from ``path`` (verified against ``manifest`` when given)."""
        try:
            raw = self._read_verified(path, manifest) if manifest else path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc}") from None
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
        except RecursionError:
            raise CheckpointError(f"{path}: invalid JSON: nested too deeply") from None
        if not isinstance(document, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(document).__name__}")
        return document
