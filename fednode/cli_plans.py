"""``fednode plans list|show|approve|reject``: the operator reviews the training plans tasks brought.

:func:`register` adds the ``plans`` command to the top-level ``fednode`` subparsers. Each leaf sets
``func`` (``args -> exit status``); store errors propagate as :class:`fedcore.errors.FedstreamError` for
the top-level ``main`` to print.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from fedcore.text_output import format_time, key_values, text_table
from fednode.approvals import MIN_PREFIX, STATUSES, PlanApprovals, PlanRecord
from fednode.home import FILES_HELP, add_home_options, existing_db_path_from_args
from fednode.plan_files import imported_base_classes, plan_class_names, plan_file

__all__ = ["register"]

_RAW = argparse.RawDescriptionHelpFormatter

_DESCRIPTION = f"""\
A node runs only training plans its operator approved. A plan is the exact source text of the
researcher's plan module, identified by its SHA-256: changing one character makes a new plan.

The first task that brings an unknown plan records it as pending (with its source) and is refused; the
researcher is told to ask you. Read the code with `fednode plans show ID`, then approve or reject it.
Or approve the plan's file before any task brings it: `fednode plans approve --file PLAN.py`.
ID is the SHA-256 or any unique prefix of it (at least {MIN_PREFIX} hex digits); listings show 12.

What a plan's sender wrote is printed with its invisible characters made visible: terminal control
sequences, bidirectional-text overrides and zero-width characters appear as escapes (\\x1b, \\u202e),
and a lone carriage return, a line break for Python, as \\r at the end of a line. They cannot hide code
from the review (`show` says how many there are)."""


_FILE_HELP = """\
{heading} (--file):
  `fednode plans {verb} --file PLAN.py` records the plan the researcher will send from PLAN.py and
  {effect}.
  A server sends the whole file as Python reads it: decoded (UTF-8 unless it declares another
  coding), line endings made \\n, a final newline added; the SHA-256 printed is of that text. For a
  UTF-8 file with Unix line endings that ends in a newline, it is what `sha256sum PLAN.py` prints;
  compare it with the researcher's (`fedserver run` prints its first 12 digits). The file is parsed
  to find the class name, never run.
"""


def register(subparsers: Any) -> None:
    """Add ``plans`` and its subcommands to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "plans", help="review, approve and reject the training plans this node may run",
        description=_DESCRIPTION, formatter_class=_RAW,
        epilog=textwrap.dedent("""\
            examples:
              fednode plans list --status pending
              fednode plans show 3fa2c1d9e0b7
              fednode plans approve 3fa2c1d9e0b7 --note "reviewed by J. Doe, no file or network access"
              fednode plans approve --file plans/mlp.py --note "v2, reviewed before the run"
              fednode plans reject 3fa2c1d9e0b7 --note "writes outside the working directory"
            """) + "\n" + FILES_HELP,
    )
    commands = parser.add_subparsers(dest="plans_command", metavar="COMMAND", required=True)

    listing = commands.add_parser(
        "list", help="list known plans and their status", formatter_class=_RAW,
        description="List the plans tasks have brought to this node, oldest first.", epilog=FILES_HELP,
    )
    listing.add_argument("--status", choices=STATUSES, default=None, help="only plans with this status")
    listing.add_argument("--json", action="store_true", help="print a JSON array (without sources)")
    add_home_options(listing, existing=True)
    listing.set_defaults(func=_list)

    show = commands.add_parser(
        "show", help="print a plan's status and full source", formatter_class=_RAW,
        description="Print what the node knows about plan ID, then its full source text.", epilog=FILES_HELP,
    )
    show.add_argument("plan_id", metavar="ID", help="SHA-256 or a unique prefix (>= 8 hex digits)")
    show.add_argument("--json", action="store_true", help="print a JSON object, source included")
    add_home_options(show, existing=True)
    show.set_defaults(func=_show)

    for verb, status, summary, heading, effect in (
        ("approve", "approved", "allow tasks to run plan ID (or the plan in --file) on this node",
         "approving ahead of the first task",
         "approves it now, so its first task runs without being refused as pending"),
        ("reject", "rejected", "refuse plan ID (also revokes an approval)",
         "rejecting ahead of the first task",
         "rejects it now, so its first task is refused as rejected (never recorded as pending)"),
    ):
        epilog = _FILE_HELP.format(verb=verb, heading=heading, effect=effect) + "\n" + FILES_HELP
        decide = commands.add_parser(
            verb, help=summary, formatter_class=_RAW, epilog=epilog,
            description=f"Mark plan ID {status}; the decision applies to tasks from now on. Repeatable.\n"
                        f"With --file instead of ID: the plan in that file, known or not (see below).",
        )
        decide.add_argument("plan_id", metavar="ID", nargs="?",
                            help="SHA-256 or a unique prefix (>= 8 hex digits) of a plan the node knows")
        decide.add_argument("--file", type=Path, metavar="PLAN.py",
                            help="the plan's file, as the researcher sends it: record and decide it now")
        decide.add_argument("--name", metavar="CLASS",
                            help="with --file: the plan class, one deriving from a TrainingPlan (default: the only one in it)")
        decide.add_argument("--note", default="", help="why; kept with the decision and shown by list/show")
        add_home_options(decide, existing=True)
        decide.set_defaults(func=_decide, decision=verb)


def _list(args: argparse.Namespace) -> int:
    records = PlanApprovals(existing_db_path_from_args(args)).list(args.status)
    if args.json:
        print(json.dumps([_as_json(record, source=False) for record in records], indent=2))
        return 0
    if not records:
        print("no training plans" + (f" with status {args.status}" if args.status else " seen yet"))
        return 0
    rows = [
        (r.short_id, r.status, _shown_text(r.name), _shown_text(r.origin) or "-", format_time(r.submitted_at),
         _shown_text(r.note))
        for r in records
    ]
    print(text_table(("ID", "STATUS", "NAME", "ORIGIN", "FIRST SEEN", "NOTE"), rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    record = PlanApprovals(existing_db_path_from_args(args)).get(args.plan_id)
    if args.json:
        print(json.dumps(_as_json(record, source=True), indent=2))
        return 0
    source, escaped = shown_source(record.source)
    lines = source.count("\n") + (0 if source.endswith("\n") or not source else 1)
    fields = [
        ("sha256", record.sha256),
        ("name", _shown_text(record.name)),
        ("origin", _shown_text(record.origin) or "-"),
        ("status", record.status),
        ("note", _shown_text(record.note) or "-"),
        ("first seen", format_time(record.submitted_at)),
        ("decided", format_time(record.decided_at)),
        ("source", f"{lines} lines"),
    ]
    if escaped:
        plural = "s" if escaped != 1 else ""
        fields.append(("WARNING", (f"the source holds {escaped} invisible or control character{plural} (terminal "
                                   "escapes, bidirectional overrides, lone carriage returns...), shown below as "
                                   "escapes such as \\x1b or \\u202e: read what they surround with care")))
    print(key_values(fields))
    print("-" * 78)
    print(source, end="" if source.endswith("\n") else "\n")
    return 0


def _decide(args: argparse.Namespace) -> int:
    if (args.plan_id is None) == (args.file is None):
        args.usage_error("give the plan's ID or --file FILE" + (", not both" if args.file else ""))
    if args.name is not None and args.file is None:
        args.usage_error("argument --name: only with --file (a known plan keeps the name its task gave)")
    db = existing_db_path_from_args(args)
    if args.file is not None:
        return _decide_file(args, db)
    approvals = PlanApprovals(db)
    decide = approvals.approve if args.decision == "approve" else approvals.reject
    record = decide(args.plan_id, args.note)
    print(f"plan {record.short_id} ({_shown_text(record.name)}) is now {record.status}")
    return 0


def _decide_file(args: argparse.Namespace, db: Path) -> int:
    """``approve/reject --file``: the source a server sends for that file, recorded and decided now."""
    try:
        raw = args.file.read_bytes()
    except OSError as exc:
        args.usage_error(f"argument --file: cannot read {args.file}: {exc.strerror or exc}")
    plan = plan_file(args.file, raw)
    plans, classes = plan_class_names(plan.source, args.file)
    name = args.name
    if name is None:
        if len(plans) != 1:
            found = f"{len(plans)} training plan classes ({', '.join(plans)})" if plans else \
                "no class deriving from a TrainingPlan"
            args.usage_error(f"argument --name: {args.file} defines {found}: give --name CLASS, the class the "
                             f"researcher runs")
        name = plans[0]
    elif name not in plans and name not in imported_base_classes(plan.source):
        # a plain class would be recorded, and listed for ever, as the plan's name
        listed = f"give one of its training plan classes ({', '.join(plans)})" if plans else \
            "it defines no class deriving from a TrainingPlan"
        problem = f"class {name!r} in {args.file} does not derive from a TrainingPlan" if name in classes else \
            f"no class {name!r} in {args.file}"
        args.usage_error(f"argument --name: {problem}: {listed}")
    status = "approved" if args.decision == "approve" else "rejected"
    record = PlanApprovals(db).decide_source(plan.source, status, args.note, name=name,
                                            origin=f"file {args.file.absolute()}")
    print(f"plan {record.short_id} ({_shown_text(record.name)}) is now {record.status}")
    print(f"sha256 {record.sha256}")
    if not plan.same_as_bytes:
        print(f"note: this is the SHA-256 of {args.file} as Python reads it and a server sends it (decoded, "
              "line endings made \\n, a final newline added), not the SHA-256 of the file's bytes that "
              "sha256sum prints")
    return 0


def _as_json(record: PlanRecord, source: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "sha256": record.sha256,
        "name": record.name,
        "origin": record.origin,
        "status": record.status,
        "note": record.note,
        "submitted_at": record.submitted_at,
        "decided_at": record.decided_at,
    }
    if source:
        out["source"] = record.source
    return out


def shown_source(source: str) -> tuple[str, int]:
    """``source`` as printed for review, and how many characters in it are shown escaped.

    Line breaks (``\\n``, ``\\r\\n``) and tabs stay; a lone ``\\r``, which Python reads as a line break but a
    terminal as "back to the start of this line" (the rest overprints what came before), is shown as ``\\r``
    ending the line; every other non-printable character (terminal escapes, bidirectional overrides as in
    "Trojan Source", CVE-2021-42574, zero-width characters) as its Python escape. The text printed is then
    what Python executes, with nothing the terminal would hide or reorder.
    """
    parts: list[str] = []
    escaped = 0
    for char in source.replace("\r\n", "\n"):
        if char in "\n\t" or char.isprintable():
            parts.append(char)
            continue
        escaped += 1
        parts.append("\\r\n" if char == "\r" else _escape(char))
    return "".join(parts), escaped


def _shown_text(text: str) -> str:
    """A one-line field (plan name, origin, note) with every non-printable character escaped, newlines too."""
    return text if text.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")
