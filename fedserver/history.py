"""``HistoryStore``: what happened in each experiment, round and node reply, in one SQLite file.

The orchestrator writes (``start_experiment`` → ``start_round`` → ``record_node_result`` per outcome →
``finish_round`` → … → ``finish_experiment``, and ``record_evaluation`` per node of a federated
evaluation); the CLI and the plots read (``experiments``, ``rounds``, ``node_results``, ``evaluations``,
``metric_series``, ``global_series``). The store only stores: a late reply is recorded
with outcome ``'late'``; whether it is applied is the orchestrator's business (it is not).

A real SQLite file in WAL mode with foreign keys on; the schema version sits in ``PRAGMA user_version``.
An older file is migrated in place when opened (``MIGRATIONS``: version 2 adds the ``evaluations`` table
of ``fedserver.history_evaluations``, version 3 gives each evaluation its own id), in one transaction; a file
written by a newer fedserver is refused rather than misread. Times are ISO 8601 UTC strings.
JSON columns hold configs and metrics (numpy scalars are stored as plain numbers).
"""

from __future__ import annotations

import json
import numbers
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedserver.history_evaluations import EVALUATION_IDS_SCHEMA, EVALUATIONS_SCHEMA, EvaluationHistory
from fedserver.history_records import (
    EXPERIMENT_STATUSES,
    METRIC_SOURCES,
    EvaluationRecord,
    ExperimentRecord,
    HistoryError,
    NodeResultRecord,
    RoundRecord,
    check_count,
    check_metrics,
)

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "EvaluationRecord",
    "HistoryError",
    "HistoryStore",
    "NodeResultRecord",
    "stored_experiment",
]

_SCHEMA_1 = """
CREATE TABLE experiments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    ended_at    TEXT,
    config      TEXT NOT NULL,              -- JSON object
    status      TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'stopped')),
    error       TEXT
);
CREATE TABLE rounds (
    experiment_id  INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round          INTEGER NOT NULL CHECK (round >= 0),
    started_at     TEXT NOT NULL,
    ended_at       TEXT,
    status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    selected_nodes TEXT NOT NULL,           -- JSON list of node ids
    metrics        TEXT NOT NULL,           -- JSON object: aggregated (global) metrics
    error          TEXT,
    PRIMARY KEY (experiment_id, round)
);
CREATE TABLE node_results (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id     INTEGER NOT NULL,
    round             INTEGER NOT NULL,
    node_id           TEXT NOT NULL,
    task_id           TEXT,
    outcome           TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'refused', 'timeout', 'late')),
    num_samples       INTEGER,
    num_steps         INTEGER,
    duration_s        REAL,                 -- task sent -> result received, seconds
    bytes_in          INTEGER NOT NULL,     -- payload bytes received from the node
    bytes_out         INTEGER NOT NULL,     -- payload bytes sent to the node
    training_metrics  TEXT NOT NULL,        -- JSON object
    validation_before TEXT,                 -- JSON object or NULL
    validation_after  TEXT,                 -- JSON object or NULL
    error             TEXT,
    received_at       TEXT NOT NULL,
    FOREIGN KEY (experiment_id, round) REFERENCES rounds(experiment_id, round) ON DELETE CASCADE
);
CREATE INDEX node_results_by_round ON node_results (experiment_id, round)
"""

#: Steps taking the schema from version ``v`` to ``v + 1`` (index 0 builds version 1 in a new file): SQL
#: statements, or functions of the open transaction (a migration that moves rows).
MIGRATIONS: tuple[tuple[str | Callable[[sqlite3.Connection], None], ...], ...] = (
    tuple(statement for statement in _SCHEMA_1.split(";") if statement.strip()),
    EVALUATIONS_SCHEMA,
    EVALUATION_IDS_SCHEMA,
)
SCHEMA_VERSION = len(MIGRATIONS)

_NODE_COLUMNS = (
    "experiment_id", "round", "node_id", "outcome", "task_id", "num_samples", "num_steps", "duration_s",
    "bytes_in", "bytes_out", "training_metrics", "validation_before", "validation_after", "error",
    "received_at",
)  # fmt: skip
_JSON_COLUMNS = {"config", "selected_nodes", "metrics", "training_metrics", "validation_before",
                 "validation_after"}  # fmt: skip


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    raise TypeError(f"a value of type {type(value).__name__} is not JSON-able")


def _to_json(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise HistoryError(f"{what} must be JSON-able (numbers, str, lists, dicts): {exc}") from None


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    """A row as a dict, JSON columns parsed."""
    out = dict(row)
    for key in _JSON_COLUMNS.intersection(out):
        try:
            out[key] = None if out[key] is None else json.loads(out[key])
        except (TypeError, ValueError, RecursionError):
            raise HistoryError(f"history column {key!r} does not hold JSON: {str(out[key])[:80]!r}") from None
    return out


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class HistoryStore(EvaluationHistory):
    """Experiments, rounds, per-node results and evaluations in the SQLite file ``db_path`` (created if
    missing; an older schema is migrated).

    One connection guarded by a lock, so the store may be called from worker threads (e.g. through
    ``asyncio.to_thread``); every write is one transaction. ``clock`` returns seconds since the epoch
    (injectable for tests). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, db_path: str | PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(db_path)
        self._clock = clock
        self._lock = threading.Lock()
        self._open_evaluations: dict[tuple[int, int], int] = {}  # fedserver.history_evaluations
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open history database {str(self.path)!r}: {exc}") from None
        self._conn.row_factory = sqlite3.Row
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise HistoryError(f"{str(self.path)!r} is not a usable history database: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit is not fsynced (checkpoints are), so recording a node's result costs
        # ~0.2 ms instead of ~2.5 ms on the event loop (a 1000-node round: 0.2 s, not 2.5 s). The file
        # stays consistent; a power cut (not a crash of fedserver) may lose the last results recorded.
        conn.execute("PRAGMA synchronous = NORMAL")
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return
        self._refuse_newer(version)  # before BEGIN IMMEDIATE: a read-only file is refused too
        with self._transaction() as tx:  # statement by statement: executescript() would commit early
            # re-read under the write lock: another process may have migrated meanwhile
            version = self._schema_version()
            self._refuse_newer(version)
            tables = tx.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if version == 0 and tables:
                raise HistoryError(
                    f"{str(self.path)!r} is not a fedserver history database (schema version {version}, "
                    f"{tables} tables); expected a new file or schema version 1 to {SCHEMA_VERSION}"
                )
            for steps in MIGRATIONS[version:]:  # e.g. a version-1 file gains the evaluations table
                for step in steps:
                    if isinstance(step, str):
                        tx.execute(step)
                    else:
                        step(tx)
            tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"history database {str(self.path)!r} has schema version {version}, newer than the "
                f"version {SCHEMA_VERSION} this fedserver reads; upgrade fedserver"
            )

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """Turn a SQLite failure after opening (a page damaged since, disk full, locked past the busy
        timeout) into a HistoryError naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise HistoryError(f"history database {str(self.path)!r}: {type(exc).__name__}: {exc}") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one write transaction; roll back on any exception."""
        with self._lock, self._sqlite_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock, self._sqlite_errors():
            return self._conn.execute(sql, params).fetchall()

    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), tz=UTC).isoformat(timespec="milliseconds")

    def _require_experiment(self, experiment_id: int) -> None:
        check_count(experiment_id, "experiment_id")
        if not self._read("SELECT 1 FROM experiments WHERE id = ?", (experiment_id,)):
            known = [row[0] for row in self._read("SELECT id FROM experiments ORDER BY id")]
            raise HistoryError(
                f"no experiment with id {experiment_id!r} in {str(self.path)!r}; known ids: {known}"
            )

    def _round_status(self, experiment_id: int, round: int) -> str | None:
        check_count(round, "round")
        rows = self._read(
            "SELECT status FROM rounds WHERE experiment_id = ? AND round = ?", (experiment_id, round)
        )
        return rows[0][0] if rows else None

    # -- writes -----------------------------------------------------------------------------------

    def start_experiment(self, name: str, config: Mapping[str, Any]) -> int:
        """Record a new running experiment; returns its id (1, 2, ...)."""
        if not isinstance(name, str) or not name:
            raise HistoryError(f"experiment name must be a non-empty str, got {name!r}")
        if not isinstance(config, Mapping):
            raise HistoryError(f"experiment config must be a mapping, got {type(config).__name__}")
        with self._transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO experiments (name, created_at, config, status) VALUES (?, ?, ?, 'running')",
                (name, self._now(), _to_json(dict(config), "experiment config")),
            )
        return int(cursor.lastrowid)  # type: ignore[arg-type]

    def finish_experiment(
        self, experiment_id: int, status: str = "completed", error: str | None = None
    ) -> None:
        """Close an experiment with ``status``: 'completed', 'failed' or 'stopped'."""
        if status not in EXPERIMENT_STATUSES[1:]:
            raise HistoryError(
                f"finish_experiment status must be one of {list(EXPERIMENT_STATUSES[1:])}, got {status!r}"
            )
        self._require_experiment(experiment_id)
        with self._transaction() as tx:
            tx.execute(
                "UPDATE experiments SET status = ?, ended_at = ?, error = ? WHERE id = ?",
                (status, self._now(), error, experiment_id),
            )

    def reopen_experiment(self, experiment_id: int) -> None:
        """Mark an experiment running again (a run resumed from a checkpoint)."""
        self._require_experiment(experiment_id)
        with self._transaction() as tx:
            tx.execute(
                "UPDATE experiments SET status = 'running', ended_at = NULL, error = NULL WHERE id = ?",
                (experiment_id,),
            )

    def start_round(
        self, experiment_id: int, round: int, selected_nodes: Sequence[str], *, replace: bool = False
    ) -> None:
        """Open ``round`` of an experiment with the nodes chosen for it.

        A round that already exists is an error unless ``replace`` is true: then the earlier attempt and
        its node results are discarded (a run resumed from the checkpoint taken before that round).
        """
        self._require_experiment(experiment_id)
        if isinstance(selected_nodes, str) or not all(isinstance(n, str) for n in selected_nodes):
            raise HistoryError(
                f"selected_nodes must be a sequence of node id strings, got {selected_nodes!r}"
            )
        status = self._round_status(experiment_id, round)
        if status is not None and not replace:
            raise HistoryError(
                f"round {round} of experiment {experiment_id} already exists (status {status!r}); "
                "pass replace=True to discard that attempt"
            )
        with self._transaction() as tx:
            tx.execute("DELETE FROM rounds WHERE experiment_id = ? AND round = ?", (experiment_id, round))
            tx.execute(
                "INSERT INTO rounds (experiment_id, round, started_at, status, selected_nodes, metrics)"
                " VALUES (?, ?, ?, 'running', ?, '{}')",
                (experiment_id, round, self._now(), json.dumps(list(selected_nodes))),
            )

    def record_node_result(self, record: NodeResultRecord) -> None:
        """Store one node's outcome; its round must have been started (and may have ended: late replies)."""
        if not isinstance(record, NodeResultRecord):
            raise HistoryError(f"record_node_result expects a NodeResultRecord, got {type(record).__name__}")
        self._require_experiment(record.experiment_id)
        if self._round_status(record.experiment_id, record.round) is None:
            raise HistoryError(
                f"round {record.round} of experiment {record.experiment_id} was never started; "
                f"cannot record the result of node {record.node_id!r}"
            )
        values = {name: getattr(record, name) for name in _NODE_COLUMNS}
        for name in _JSON_COLUMNS.intersection(values):
            metrics = values[name]
            values[name] = _to_json(None if metrics is None else dict(metrics), name)
        values["received_at"] = record.received_at or self._now()
        with self._transaction() as tx:
            tx.execute(
                f"INSERT INTO node_results ({', '.join(_NODE_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(_NODE_COLUMNS))})",
                [values[name] for name in _NODE_COLUMNS],
            )

    def finish_round(
        self,
        experiment_id: int,
        round: int,
        status: str = "completed",
        metrics: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Close a running round with ``status`` ('completed' or 'failed') and its aggregated metrics."""
        if status not in ("completed", "failed"):
            raise HistoryError(f"finish_round status must be 'completed' or 'failed', got {status!r}")
        checked = check_metrics({} if metrics is None else metrics, "round metrics")
        self._require_experiment(experiment_id)
        current = self._round_status(experiment_id, round)
        if current is None:
            raise HistoryError(f"round {round} of experiment {experiment_id} was never started")
        if current != "running":
            raise HistoryError(f"round {round} of experiment {experiment_id} is already {current!r}")
        with self._transaction() as tx:
            tx.execute(
                "UPDATE rounds SET status = ?, ended_at = ?, metrics = ?, error = ?"
                " WHERE experiment_id = ? AND round = ?",
                (status, self._now(), _to_json(checked, "round metrics"), error, experiment_id, round),
            )

    # -- reads ------------------------------------------------------------------------------------

    def experiments(self) -> list[ExperimentRecord]:
        """Every experiment, oldest first."""
        rows = self._read("SELECT * FROM experiments ORDER BY id")
        return [ExperimentRecord(**_decoded(r)) for r in rows]

    def experiment(self, experiment_id: int) -> ExperimentRecord:
        """One experiment by id."""
        self._require_experiment(experiment_id)
        return ExperimentRecord(
            **_decoded(self._read("SELECT * FROM experiments WHERE id = ?", (experiment_id,))[0])
        )

    def rounds(self, experiment_id: int) -> list[RoundRecord]:
        """The rounds of one experiment, in round order."""
        self._require_experiment(experiment_id)
        rows = self._read("SELECT * FROM rounds WHERE experiment_id = ? ORDER BY round", (experiment_id,))
        return [RoundRecord(**_decoded(r)) for r in rows]

    def node_results(self, experiment_id: int, round: int | None = None) -> list[NodeResultRecord]:
        """Per-node results of an experiment (of one round when given), by round then arrival order."""
        rows = self._rows_by_round("node_results", _NODE_COLUMNS, experiment_id, round)
        return [NodeResultRecord(**_decoded(r)) for r in rows]

    def _rows_by_round(self, table: str, columns: Sequence[str], experiment_id: int,
                       round: int | None) -> list[sqlite3.Row]:
        """``columns`` of ``table``'s rows of an experiment (of one round when given), by round then arrival
        (``id``); the experiment must exist."""
        self._require_experiment(experiment_id)
        sql = f"SELECT {', '.join(columns)} FROM {table} WHERE experiment_id = ?"
        params: list[Any] = [experiment_id]
        if round is not None:
            check_count(round, "round")
            sql += " AND round = ?"
            params.append(round)
        return self._read(sql + " ORDER BY round, id", params)

    def metric_series(
        self, experiment_id: int, metric: str, source: str = "training"
    ) -> dict[str, list[tuple[int, float]]]:
        """``{node_id: [(round, value), ...]}`` of one metric from the nodes' succeeded replies.

        ``source`` picks the metrics: 'training', 'validation_before' or 'validation_after'. Results that
        lack the metric or hold a non-numeric value for it are skipped; late, failed, refused and
        timed-out results are never part of a series. Nodes come in order of first appearance.
        """
        if source not in METRIC_SOURCES:
            raise HistoryError(f"metric source must be one of {list(METRIC_SOURCES)}, got {source!r}")
        attribute = "training_metrics" if source == "training" else source
        series: dict[str, list[tuple[int, float]]] = {}
        for record in self.node_results(experiment_id):
            metrics = getattr(record, attribute)
            value = _numeric(metrics.get(metric)) if record.outcome == "succeeded" and metrics else None
            if value is not None:
                series.setdefault(record.node_id, []).append((record.round, value))
        return series

    def global_series(self, experiment_id: int, metric: str) -> list[tuple[int, float]]:
        """``[(round, value), ...]`` of one aggregated (global) metric over the completed rounds."""
        series = []
        for record in self.rounds(experiment_id):
            value = _numeric(record.metrics.get(metric)) if record.status == "completed" else None
            if value is not None:
                series.append((record.round, value))
        return series


def stored_experiment(db_path: str | PathLike[str], experiment_id: int) -> ExperimentRecord | None:
    """Experiment ``experiment_id`` of the history database at ``db_path``, read only: no file is created and
    no schema migrated (what a resume checks before it writes anything). None when the file or the experiment
    does not exist; HistoryError when the file is no readable history database. The ``experiments`` table
    is the same in every schema version."""
    path = Path(db_path)
    check_count(experiment_id, "experiment_id")
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot open history database {str(path)!r}: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchall()
        return ExperimentRecord(**_decoded(rows[0])) if rows else None
    except (sqlite3.Error, TypeError) as exc:
        raise HistoryError(f"{str(path)!r} is not a readable history database: {exc}") from None
    finally:
        conn.close()
