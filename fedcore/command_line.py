"""The frame both command lines share: subcommands from a registry of modules, logging, exit statuses.

``fedserver`` and ``fednode`` are each a thin argparse front over modules that expose
``register(subparsers)``; each registered command sets ``func`` (``args -> exit status``). Errors of the
fedstream family are printed as ``PROG: error: ...`` (exit 1); errors the caller lists as *refusals*
(the server said no) as ``PROG: refused by the server: ...`` (exit 2, like bad usage); an interrupt
exits 130. Tracebacks are for bugs, never for expected failures.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcore.errors import FedstreamError
from fedcore.wire.flow_control import AUTO_WINDOW, MIN_RECEIVE_WINDOW

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"4MiB"`` -> 4194304: a non-negative integer with an optional unit (B, KiB, MiB, GiB, K, M, G).

    An argparse ``type``: a bad value raises ``ArgumentTypeError``, which argparse reports naming the flag.
    """
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: a size cannot be negative")
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1048576, 512KiB, 4MiB or 4GiB")
    return int(match.group(1)) * _UNITS[unit]


def home_source(given_home: str | None, home: Path, env_var: str) -> tuple[str, str]:
    """Where a home directory came from, for a message refusing it: ``(source, option)``, the message's prefix
    (``"argument --home: "``, ``"$FEDNODE_HOME: "``, or that neither was given) and the ``--home DIR`` to repeat
    in the commands it suggests ("" when the home came from the environment or the default)."""
    if given_home:
        return "argument --home: ", f" --home {shlex.quote(str(home))}"
    if os.environ.get(env_var):
        return f"${env_var}: ", ""
    return f"no --home given and ${env_var} unset: ", ""


def parse_seconds(text: str) -> float:
    """A duration option: finite seconds > 0 (``"1.5"``). An argparse ``type``, like :func:`parse_size`."""
    return _parse_duration(text, zero_ok=False, example="120")


def parse_grace_seconds(text: str) -> float:
    """A grace period: finite seconds >= 0 (0: none). An argparse ``type``, like :func:`parse_seconds`."""
    return _parse_duration(text, zero_ok=True, example="10")


def _parse_duration(text: str, *, zero_ok: bool, example: str) -> float:
    bound = ">= 0" if zero_ok else "> 0"
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be seconds {bound}, e.g. {example}") from None
    if not (math.isfinite(seconds) and (seconds >= 0 if zero_ok else seconds > 0)):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be finite seconds {bound}, e.g. {example}")
    return seconds


def parse_receive_window(text: str) -> int | str | None:
    """A ``--receive-window``: ``auto`` (each side's own choice, fedcore.wire.flow_control), ``bdp`` -> None
    (gRPC's bandwidth-delay probing), else a :func:`parse_size` of at least 65535 bytes."""
    word = text.strip().lower()
    if word == AUTO_WINDOW:
        return AUTO_WINDOW
    if word == "bdp":
        return None
    try:
        size = parse_size(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or auto or bdp") from None
    if size < MIN_RECEIVE_WINDOW:
        raise argparse.ArgumentTypeError(
            f"invalid window {text!r}: must be 'auto', 'bdp' or at least {MIN_RECEIVE_WINDOW} bytes (64KiB)")
    return size


def add_subcommands(parser: argparse.ArgumentParser, modules: Sequence[str]) -> None:
    """Add ``-v/--verbose`` and the commands of each module in ``modules`` (in ``--help`` order)."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr (-v: info, -vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                refusals: tuple[type[FedstreamError], ...] = ()) -> int:
    """Parse ``argv``, set up logging from ``-v``, run the chosen command and map errors to exit statuses."""
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or EXIT_OK)
    except refusals as exc:
        print(f"{parser.prog}: refused by the server: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except FedstreamError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
