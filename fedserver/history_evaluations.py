"""The ``evaluations`` of the history database (schema versions 2 and 3) and what is read from them.

One row per node per federated evaluation (``Experiment.evaluate``): the node's outcome and, when it
replied, ``num_samples``, ``split`` and its metrics on the global model after round ``round``. The rows
reference their experiment (deleted with it) but not a row of ``rounds``: a resumed run that replaces a
round does not erase what the earlier model was measured at.

Version 3 gives each evaluation its own identity: a row of ``evaluation_runs`` (id, experiment, round,
started_at) that every node row of that evaluation references by ``evaluation_id``, so the same model
evaluated twice shows as two evaluations, not one merged. A writer either opens one with
``start_evaluation`` and records into it (as ``Experiment.evaluate`` does: one id per evaluation, which its
report carries), or leaves ``evaluation_id`` None: the store then opens one per (experiment, round) the first
time it records for it, and another when a node it already holds a row for comes again (an evaluation asks
each node once).
The v2 → v3 migration groups the rows it finds the same way, in arrival order: per (experiment, round),
a new evaluation starts where a node repeats (v2 kept nothing more to tell them apart).

:class:`EvaluationHistory` gives :class:`~fedserver.history.HistoryStore` its ``start_evaluation``,
``record_evaluation`` and ``evaluations``; :func:`summarize_evaluations` reduces the rows of each evaluation
to what ``fedserver history`` prints: nodes replied / selected and each metric's sample-weighted mean.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcore.errors import HistoryError
from fedserver.history_records import EvaluationRecord, check_count

__all__ = ["EVALUATIONS_SCHEMA", "EVALUATION_IDS_SCHEMA", "EvaluationHistory", "EvaluationSummary",
           "summarize_evaluations"]

#: Statements taking a version-1 history database to version 2.
EVALUATIONS_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE evaluations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round         INTEGER NOT NULL CHECK (round >= 1),  -- the round whose global model was evaluated
    node_id       TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'refused', 'timeout')),
    num_samples   INTEGER,                              -- samples evaluated; NULL without a reply
    split         TEXT CHECK (split IN ('validation', 'all')),
    metrics       TEXT NOT NULL,                        -- JSON object of finite numbers
    error         TEXT,
    duration_s    REAL,                                 -- the node's evaluation time, as it reported it
    received_at   TEXT NOT NULL
)""",
    "CREATE INDEX evaluations_by_round ON evaluations (experiment_id, round)",
)


def _group_v2_rows(tx: sqlite3.Connection) -> None:
    """Open one ``evaluation_runs`` row per evaluation found among the version-2 rows (module docstring: per
    (experiment, round) in arrival order, a new one where a node repeats) and copy every row, same id, into
    ``evaluations_v3`` with its ``evaluation_id``."""
    current: dict[tuple[int, int], tuple[int, set[str]]] = {}
    for row in tx.execute("SELECT id, experiment_id, round, node_id, received_at FROM evaluations ORDER BY id")\
            .fetchall():
        row_id, experiment_id, round_, node_id, received_at = row
        opened = current.get((experiment_id, round_))
        if opened is None or node_id in opened[1]:
            cursor = tx.execute("INSERT INTO evaluation_runs (experiment_id, round, started_at) VALUES (?, ?, ?)",
                                (experiment_id, round_, received_at))
            opened = current[(experiment_id, round_)] = (int(cursor.lastrowid), set())  # type: ignore[arg-type]
        opened[1].add(node_id)
        tx.execute(f"INSERT INTO evaluations_v3 (evaluation_id, {', '.join(('id', *_COLUMNS))}) "
                   f"SELECT ?, {', '.join(('id', *_COLUMNS))} FROM evaluations WHERE id = ?", (opened[0], row_id))


#: Steps taking a version-2 history database to version 3 (SQL statements, and one function of the open
#: transaction): the ``evaluation_runs`` table and ``evaluations.evaluation_id``, every row kept with its id.
EVALUATION_IDS_SCHEMA: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """CREATE TABLE evaluation_runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round         INTEGER NOT NULL CHECK (round >= 1),  -- the round whose global model was evaluated
    started_at    TEXT NOT NULL
)""",
    """CREATE TABLE evaluations_v3 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round         INTEGER NOT NULL CHECK (round >= 1),  -- the round whose global model was evaluated
    node_id       TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'refused', 'timeout')),
    num_samples   INTEGER,                              -- samples evaluated; NULL without a reply
    split         TEXT CHECK (split IN ('validation', 'all')),
    metrics       TEXT NOT NULL,                        -- JSON object of finite numbers
    error         TEXT,                                 -- as the node sent it (the wire bounds its length)
    duration_s    REAL,                                 -- the node's evaluation time, as it reported it
    received_at   TEXT NOT NULL,
    evaluation_id INTEGER NOT NULL REFERENCES evaluation_runs(id) ON DELETE CASCADE  -- the evaluation it is part of
)""",
    _group_v2_rows,
    "DROP TABLE evaluations",  # its index goes with it
    "ALTER TABLE evaluations_v3 RENAME TO evaluations",
    "CREATE INDEX evaluations_by_round ON evaluations (experiment_id, round)",
    "CREATE INDEX evaluations_by_evaluation ON evaluations (evaluation_id)",
    "CREATE INDEX evaluation_runs_by_experiment ON evaluation_runs (experiment_id, round)",
)

_COLUMNS = (
    "experiment_id", "round", "node_id", "task_id", "outcome", "num_samples", "split", "metrics", "error",
    "duration_s", "received_at",
)  # fmt: skip


class EvaluationHistory:
    """``HistoryStore``'s evaluation rows: mixed into the store, which provides the members declared below."""

    if TYPE_CHECKING:

        def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...
        def _now(self) -> str: ...
        def _require_experiment(self, experiment_id: int) -> None: ...
        def _rows_by_round(self, table: str, columns: Sequence[str], experiment_id: int,
                           round: int | None) -> list[sqlite3.Row]: ...

    _open_evaluations: dict[tuple[int, int], int]  # (experiment, round) -> evaluation this store recorded into

    def start_evaluation(self, experiment_id: int, round: int) -> int:
        """Open a new evaluation of the model after ``round`` of an experiment; returns its id (for
        ``EvaluationRecord.evaluation_id``)."""
        self._require_experiment(experiment_id)
        if check_count(round, "round") < 1:
            raise HistoryError(f"round must be an int >= 1 (the round whose model is evaluated), got {round!r}")
        with self._transaction() as tx:
            return self._insert_evaluation(tx, experiment_id, round)

    def _insert_evaluation(self, tx: sqlite3.Connection, experiment_id: int, round: int) -> int:
        cursor = tx.execute("INSERT INTO evaluation_runs (experiment_id, round, started_at) VALUES (?, ?, ?)",
                            (experiment_id, round, self._now()))
        return int(cursor.lastrowid)  # type: ignore[arg-type]

    def record_evaluation(self, record: EvaluationRecord) -> int:
        """Store one node's evaluation outcome (its experiment must exist) and return the id of the evaluation
        it went into: ``record.evaluation_id``, which must be an evaluation of the same experiment and round,
        or, when None, the one this store records that (experiment, round) into, a new one if there is none
        yet or it holds a row of this node already (module docstring)."""
        if not isinstance(record, EvaluationRecord):
            raise HistoryError(f"record_evaluation expects an EvaluationRecord, got {type(record).__name__}")
        self._require_experiment(record.experiment_id)
        values = {name: getattr(record, name) for name in _COLUMNS}
        values["metrics"] = json.dumps(dict(record.metrics))  # finite floats only: checked by the record
        values["received_at"] = record.received_at or self._now()
        key = (record.experiment_id, record.round)
        with self._transaction() as tx:
            evaluation_id = record.evaluation_id
            if evaluation_id is not None:
                self._check_evaluation(tx, record)
            else:
                evaluation_id = self._open_evaluations.get(key)
                if evaluation_id is None or tx.execute(
                        "SELECT 1 FROM evaluations WHERE evaluation_id = ? AND node_id = ?",
                        (evaluation_id, record.node_id)).fetchone():
                    evaluation_id = self._insert_evaluation(tx, *key)
            tx.execute(
                f"INSERT INTO evaluations (evaluation_id, {', '.join(_COLUMNS)}) "
                f"VALUES (?, {', '.join('?' * len(_COLUMNS))})",
                [evaluation_id, *(values[name] for name in _COLUMNS)],
            )
        if record.evaluation_id is None:  # committed: later rows of this (experiment, round) join it
            self._open_evaluations[key] = evaluation_id
        return evaluation_id

    @staticmethod
    def _check_evaluation(tx: sqlite3.Connection, record: EvaluationRecord) -> None:
        row = tx.execute("SELECT experiment_id, round FROM evaluation_runs WHERE id = ?",
                         (record.evaluation_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no evaluation with id {record.evaluation_id}: open one with start_evaluation()")
        if tuple(row) != (record.experiment_id, record.round):
            raise HistoryError(
                f"evaluation {record.evaluation_id} is of experiment {row[0]}, round {row[1]}; the record of node "
                f"{record.node_id!r} is of experiment {record.experiment_id}, round {record.round}")

    def evaluations(self, experiment_id: int, round: int | None = None) -> list[EvaluationRecord]:
        """The evaluation rows of an experiment (of the model of one round when given), by round then
        arrival order, each with its ``evaluation_id``. A row that no longer reads as a valid record raises
        HistoryError naming it."""
        columns = ("id", "evaluation_id", *_COLUMNS)
        return [_record(row) for row in self._rows_by_round("evaluations", columns, experiment_id, round)]


def _record(row: sqlite3.Row) -> EvaluationRecord:
    values = dict(row)
    row_id = values.pop("id")
    try:
        metrics = json.loads(values["metrics"])
        if not isinstance(metrics, dict):
            raise HistoryError(f"metrics must be a JSON object, got {values['metrics'][:80]!r}")
        return EvaluationRecord(**{**values, "metrics": metrics})
    except (HistoryError, TypeError, ValueError, RecursionError) as exc:
        raise HistoryError(
            f"evaluation row {row_id} (experiment {values['experiment_id']}, round {values['round']!r}, node "
            f"{values['node_id']!r}) is damaged: {exc}"
        ) from None


@dataclass(frozen=True)
class EvaluationSummary:
    """One evaluation of a round's model, reduced: distinct nodes asked and replied, samples evaluated,
    and each metric's mean over the replies weighted by their ``num_samples``. ``evaluation``: its id
    (None for records that carry none)."""

    round: int
    selected: int
    replied: int
    num_samples: int
    metrics: dict[str, float]
    evaluation: int | None = None


def summarize_evaluations(records: Sequence[EvaluationRecord]) -> list[EvaluationSummary]:
    """One summary per evaluation, in round order (then in the order they were opened).

    For a metric m over the succeeded rows i that report it: mean_m = Σ n_i·m_i / Σ n_i, with n_i the
    row's ``num_samples`` (a metric whose rows all have n_i = 0 is left out), as
    ``fedserver.evaluation.weighted_metrics`` computes it for a report. Rows are grouped by their
    ``evaluation_id``: a round evaluated twice gives two summaries. Records without one (built in memory)
    are grouped by round, each node counted once in ``selected`` / ``replied``.
    """
    groups: dict[tuple[int, int], list[EvaluationRecord]] = {}
    for record in records:
        groups.setdefault((record.round, -1 if record.evaluation_id is None else record.evaluation_id),
                          []).append(record)
    summaries = []
    for (round_, evaluation), rows in sorted(groups.items()):
        replies = [r for r in rows if r.outcome == "succeeded"]
        totals: dict[str, int] = {}  # Σ n_i over the replies that report each metric
        for reply in replies:
            for name in reply.metrics:
                totals[name] = totals.get(name, 0) + (reply.num_samples or 0)
        means = {name: 0.0 for name in sorted(totals) if totals[name] > 0}
        for reply in replies:  # Σ (n_i / Σ n) · m_i: weights <= 1, so no n·m product can overflow
            for name, value in reply.metrics.items():
                if name in means:
                    means[name] += (reply.num_samples or 0) / totals[name] * value
        summaries.append(
            EvaluationSummary(
                round=round_,
                selected=len({r.node_id for r in rows}),
                replied=len({r.node_id for r in replies}),
                num_samples=sum(r.num_samples or 0 for r in replies),
                metrics=means,
                evaluation=None if evaluation < 0 else evaluation,
            )
        )
    return summaries
