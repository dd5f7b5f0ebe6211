"""``fedserver history`` and ``fedserver plot``: read the history database of past experiments.

:func:`register` adds both commands to the top-level ``fedserver`` subparsers. Each sets ``func``
(``args -> exit status``); store errors propagate as :class:`fedcore.errors.FedstreamError` (here
:class:`~fedcore.errors.HistoryError`) for the top-level ``main`` to print.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

from fedcore.errors import HistoryError
from fedcore.text_output import format_bytes, text_table
from fedserver.history import HistoryStore
from fedserver.history_evaluations import summarize_evaluations
from fedserver.history_records import METRIC_SOURCES, SHOWN_NAME_CHARS, EvaluationRecord, shown_text

__all__ = ["DB_ENV_VAR", "DEFAULT_DB", "register"]

DEFAULT_DB = "history.db"
DB_ENV_VAR = "FEDSERVER_HISTORY_DB"
_RAW = argparse.RawDescriptionHelpFormatter

_FILES = f"""
files:
  {DEFAULT_DB}              default history database (SQLite), written by running experiments
environment:
  {DB_ENV_VAR}  history database when --db is not given"""

_HISTORY_DESCRIPTION = """\
Print what the history database holds. Without options: one line per experiment. With --experiment:
its configuration, one line per round (status, nodes selected and replied, aggregated metrics), then
one line per evaluation (federated evaluation of the model after a round, by its id: a model evaluated
twice shows twice; nodes replied / selected, samples evaluated, the split they came from, each metric's
mean weighted by the nodes' samples). With --round as well: one line per node result of that round
(outcome, samples, steps, duration, bytes received from / sent to the node, metrics, error), then for
each evaluation of the model of that round one line per node. Late replies are listed with outcome 'late': they arrived after
their round closed and were not aggregated. A split 'all' means the node evaluated every local sample
(it holds no validation split out), so its metrics include data the model was trained on."""

_PLOT_DESCRIPTION = """\
Write a PNG of per-round metric curves. For one experiment: a subplot per metric with one thin curve
per node (its training metrics, or --source) and the thick global (aggregated) curve. Without --source, a
metric the nodes never report in training (say accuracy, computed only on validation) is plotted from
validation after training (else before), and one line says so. With --compare: the global curves of
several experiments overlaid, e.g. Scaffold against FedAvg, each metric from the same source for all of
them (--source, or as above: the first source holding a value of it in any of them)."""


def register(subparsers: Any) -> None:
    """Add ``history`` and ``plot`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    history = subparsers.add_parser(
        "history",
        help="list experiments, their rounds and per-node results",
        description=_HISTORY_DESCRIPTION,
        formatter_class=_RAW,
        epilog=textwrap.dedent("""\
            examples:
              fedserver history
              fedserver history --experiment 3    # rounds, then evaluations
              fedserver history --db runs/history.db --experiment 3 --round 7
            """)
        + _FILES,
    )
    _add_db_option(history)
    history.add_argument("--experiment", type=int, metavar="ID", help="show this experiment's rounds")
    history.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="show the node results and evaluations of round N (needs --experiment)",
    )
    history.set_defaults(func=_history, usage_error=history.error)

    plot = subparsers.add_parser(
        "plot",
        help="write PNG curves of per-round metrics",
        description=_PLOT_DESCRIPTION,
        formatter_class=_RAW,
        epilog=textwrap.dedent("""\
            examples:
              fedserver plot --experiment 3 --out run3.png
              fedserver plot --experiment 3 --metric loss --source validation_after --out val.png
              fedserver plot --experiment 3 --compare 4 --out scaffold-vs-fedavg.png
            """)
        + _FILES,
    )
    _add_db_option(plot)
    plot.add_argument("--experiment", type=int, metavar="ID", required=True, help="experiment to plot")
    plot.add_argument(
        "--compare", type=int, metavar="ID", nargs="+", default=[], help="overlay these experiments"
    )
    plot.add_argument("--out", type=Path, metavar="FILE.png", required=True, help="PNG file to write")
    plot.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="metric to plot; repeatable (default: loss and accuracy)",
    )
    plot.add_argument(
        "--source",
        choices=METRIC_SOURCES,
        default=None,
        help="node metrics to plot (default: training, or for a metric without training values "
             "validation_after, else validation_before)",
    )
    plot.set_defaults(func=_plot, usage_error=plot.error)


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        default=None,
        help=f"history database (default: ${DB_ENV_VAR} or ./{DEFAULT_DB})",
    )


def _open(args: argparse.Namespace) -> HistoryStore:
    """The store at --db. A missing file (a mistyped --db or $FEDSERVER_HISTORY_DB) is bad usage, exit 2, naming
    it: reading must not create an empty database."""
    path = args.db or Path(os.environ.get(DB_ENV_VAR) or DEFAULT_DB)
    if not path.is_file():
        source = ("argument --db: " if args.db else f"${DB_ENV_VAR}: " if os.environ.get(DB_ENV_VAR)
                  else f"no --db given and ${DB_ENV_VAR} unset: ")
        what = f"{str(path)!r} is a directory" if path.is_dir() else f"no history database at {str(path)!r}"
        args.usage_error(f"{source}{what}: check the path (`fedserver run` writes the database, at --history-db "
                         "FILE)")
    return HistoryStore(path)


# -- fedserver history ---------------------------------------------------------------------------


def _history(args: argparse.Namespace) -> int:
    if args.round is not None and args.experiment is None:
        raise HistoryError("--round needs --experiment ID")
    with _open(args) as store:
        if args.experiment is None:
            print(_experiments_table(store))
        elif args.round is None:
            print(_rounds_view(store, args.experiment))
        else:
            print(_node_results_table(store, args.experiment, args.round))
            evaluations = store.evaluations(args.experiment, args.round)
            if evaluations:
                print(f"\n{_node_evaluations_view(evaluations)}")
    return 0


def _experiments_table(store: HistoryStore) -> str:
    experiments = store.experiments()
    if not experiments:
        return f"no experiments in {store.path}"
    rows = []
    for e in experiments:
        rounds = store.rounds(e.id)
        done = sum(r.status == "completed" for r in rounds)
        rows.append(
            (
                e.id,
                e.name,
                e.status,
                f"{done}/{len(rounds)}",
                _time(e.created_at),
                _time(e.ended_at),
                _printable(e.error),
            )
        )
    return text_table(("ID", "NAME", "STATUS", "DONE", "CREATED", "ENDED", "ERROR"), rows)


def _rounds_view(store: HistoryStore, experiment_id: int) -> str:
    e = store.experiment(experiment_id)
    header = [
        f"experiment {e.id}: {e.name} ({e.status})",
        f"created {_time(e.created_at)}, ended {_time(e.ended_at)}"
        + (f", error: {_printable(e.error)}" if e.error else ""),
        f"config: {json.dumps(e.config, sort_keys=True)}",
        "",
    ]
    rounds = store.rounds(experiment_id)
    evaluations = _evaluations_view(store.evaluations(experiment_id))
    if not rounds:
        return "\n".join([*header, "no rounds yet", *evaluations])
    succeeded: dict[int, int] = {}
    for result in store.node_results(experiment_id):
        if result.outcome == "succeeded":
            succeeded[result.round] = succeeded.get(result.round, 0) + 1
    rows = [
        (
            r.round,
            r.status,
            f"{succeeded.get(r.round, 0)}/{len(r.selected_nodes)}",
            _seconds_between(r.started_at, r.ended_at),
            _metrics(r.metrics),
            _printable(r.error),
        )
        for r in rounds
    ]
    table = text_table(("ROUND", "STATUS", "REPLIED", "DURATION", "METRICS", "ERROR"), rows)
    return "\n".join([*header[:-1], table, *evaluations])


def _evaluations_view(records: list[EvaluationRecord]) -> list[str]:
    """The lines of the evaluations section (none without evaluations): one per evaluation, by round."""
    if not records:
        return []
    splits: dict[tuple[int, int | None], set[str]] = {}
    for r in records:
        if r.split is not None:
            splits.setdefault((r.round, r.evaluation_id), set()).add(r.split)
    rows = [
        (
            s.evaluation,
            s.round,
            f"{s.replied}/{s.selected}",
            s.num_samples,
            "+".join(sorted(splits.get((s.round, s.evaluation), ()))) or None,
            _metrics(s.metrics),
        )
        for s in summarize_evaluations(records)
    ]
    table = text_table(("EVALUATION", "ROUND", "REPLIED", "SAMPLES", "SPLIT", "METRICS"), rows)
    return ["", "evaluations of the model after each round (metrics weighted by samples):", table]


def _node_evaluations_view(records: list[EvaluationRecord]) -> str:
    """One round's evaluations, each as its summary line and one line per node, a blank line between."""
    sections = []
    for summary in summarize_evaluations(records):
        title = (
            f"evaluation {'-' if summary.evaluation is None else summary.evaluation} of the model after round "
            f"{summary.round}: {summary.replied}/{summary.selected} nodes replied, {summary.num_samples} samples, "
            f"{_metrics(summary.metrics)}"
        )
        rows = [
            (
                shown_text(r.node_id, SHOWN_NAME_CHARS),
                r.outcome,
                r.num_samples,
                r.split,
                None if r.duration_s is None else f"{r.duration_s:.2f}s",
                _metrics(r.metrics) if r.outcome == "succeeded" else None,
                _printable(r.error),
            )
            for r in records
            if r.evaluation_id == summary.evaluation
        ]
        headers = ("NODE", "OUTCOME", "SAMPLES", "SPLIT", "DURATION", "METRICS", "ERROR")
        sections.append(title + "\n" + text_table(headers, rows))
    return "\n\n".join(sections)


def _node_results_table(store: HistoryStore, experiment_id: int, round: int) -> str:
    results = store.node_results(experiment_id, round)
    if not results:
        known = [r.round for r in store.rounds(experiment_id)]
        return f"no node results for round {round} of experiment {experiment_id} (rounds: {known})"
    rows = [
        (
            shown_text(r.node_id, SHOWN_NAME_CHARS),
            r.outcome,
            r.num_samples,
            r.num_steps,
            None if r.duration_s is None else f"{r.duration_s:.2f}s",
            format_bytes(r.bytes_in),
            format_bytes(r.bytes_out),
            _metrics(r.training_metrics),
            _metrics(r.validation_after or {}),
            _printable(r.error),
        )
        for r in results
    ]
    headers = (
        "NODE",
        "OUTCOME",
        "SAMPLES",
        "STEPS",
        "DURATION",
        "IN",
        "OUT",
        "TRAINING",
        "VALIDATION",
        "ERROR",
    )
    return text_table(headers, rows)


# -- fedserver plot ------------------------------------------------------------------------------


def _plot(args: argparse.Namespace) -> int:
    from fedserver.plot import compare_experiments, plot_history, sources_with_values  # matplotlib only here

    metrics = args.metric or ["loss", "accuracy"]
    experiments = [args.experiment, *args.compare]
    moved: list[str] = []  # metrics drawn from validation because they have no training values
    with _open(args) as store:
        if args.source is not None:  # chosen: never second-guessed
            sources: str | dict[str, str] = args.source
        else:
            sources = sources_with_values(store, experiments, metrics)
            moved = [f"{shown_text(m, SHOWN_NAME_CHARS)} from {s}" for m, s in sources.items() if s != "training"]
        if args.compare:
            out = compare_experiments(store, experiments, args.out, metrics, source=sources)
        else:
            out = plot_history(store, args.experiment, args.out, metrics, source=sources)
        if moved:
            print(f"no training values: plotted {', '.join(moved)} (--source to choose)")
    print(f"wrote {out}")
    return 0


# -- text output ---------------------------------------------------------------------------------


def _metrics(metrics: dict[str, Any]) -> str:
    """``loss=0.1234 accuracy=0.9`` (numbers to 4 significant digits), '-' when empty; names and values as
    :func:`~fedserver.history_records.shown_text` shows a node's text, the whole cut as one."""
    parts = [
        f"{shown_text(k, SHOWN_NAME_CHARS)}={v:.4g}" if isinstance(v, float)
        else f"{shown_text(k, SHOWN_NAME_CHARS)}={shown_text(str(v), SHOWN_NAME_CHARS)}"
        for k, v in metrics.items()
    ]
    return shown_text(" ".join(parts)) or "-"


def _printable(text: str | None) -> str | None:
    """An error message (a node's, as received) escaped and cut (``shown_text``); None when there is none
    (a table shows '-')."""
    return shown_text(text) if text else None


def _time(iso: str | None) -> str:
    """A stored UTC timestamp in local time, to the second."""
    return "-" if iso is None else datetime.fromisoformat(iso).astimezone().isoformat(timespec="seconds")


def _seconds_between(start: str, end: str | None) -> str:
    if end is None:
        return "-"
    return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f}s"
