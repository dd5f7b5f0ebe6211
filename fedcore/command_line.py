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
import sys
from collections.abc import Sequence

from fedcore.errors import FedstreamError

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


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
