"""The ``fednode`` command: a thin argparse front over subcommand modules.

Each module named in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, adding its command(s) with
``set_defaults(func=...)``; ``func(args)`` returns the exit status. Adding a command is one line here.
Errors of the fedstream family are printed as ``fednode: error: ...`` (exit 1); a node refused by its
server exits 2; an interrupted command exits 130.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from fedcore.command_line import add_subcommands, run_command
from fedcore.errors import ServerRefusedError, VersionMismatchError
from fednode.home import add_global_home_options

#: Modules that add subcommands, in --help order.
COMMAND_MODULES: tuple[str, ...] = ("fednode.cli_start", "fednode.cli_datasets", "fednode.cli_plans")

_DESCRIPTION = """\
fednode runs a federated-learning node: it dials out to a researcher's fedserver (a node never opens a
port), announces the datasets registered here, receives training tasks, runs only the training plans
its operator approved, and sends back parameters and metrics — never the data."""

_EPILOG = """\
typical session:
  fednode dataset add clinic-a data/clinic_a.csv --target outcome --tags cardio
  fednode start --server fl.example.org:50051 --ca-cert ca.crt --token-file node.token --name clinic-a
  fednode plans list --status pending      (in another terminal, when a task was refused)
  fednode plans approve 3fa2c1d9e0b7
  fednode plans approve --file plans/mlp.py (before the first task, from the researcher's plan file)

node home:
  --home DIR and --db FILE go before or after the command (`fednode --home site-a dataset list` or
  `fednode dataset list --home site-a`); given in both places, the command's own wins.

exit status:
  0 success, 1 error (message on stderr), 2 refused by the server or bad usage, 130 interrupted

Run `fednode COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fednode", description=_DESCRIPTION, epilog=textwrap.dedent(_EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_home_options(parser)
    add_subcommands(parser, COMMAND_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, refusals=(ServerRefusedError, VersionMismatchError))
