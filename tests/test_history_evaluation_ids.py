"""History schema version 3: each federated evaluation has its own id (``evaluation_runs``), so the same model
evaluated twice is two evaluations in ``fedserver history``, not one merged line; version-2 files migrate in place.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3

import pytest
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan
from test_history_evaluations import V1_SCHEMA

from fedcore.errors import HistoryError
from fedserver import cli_history
from fedserver.experiment import Experiment
from fedserver.history import SCHEMA_VERSION, HistoryStore
from fedserver.history_evaluations import summarize_evaluations
from fedserver.history_records import EvaluationRecord

# The evaluations table of version 2 as fedserver wrote it before evaluations had ids (frozen here on purpose:
# the migration must keep reading files made by that code), on top of the frozen version-1 file.
V2_SCHEMA = V1_SCHEMA + """
CREATE TABLE evaluations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round         INTEGER NOT NULL CHECK (round >= 1),
    node_id       TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'refused', 'timeout')),
    num_samples   INTEGER,
    split         TEXT CHECK (split IN ('validation', 'all')),
    metrics       TEXT NOT NULL,
    error         TEXT,
    duration_s    REAL,
    received_at   TEXT NOT NULL
);
CREATE INDEX evaluations_by_round ON evaluations (experiment_id, round);
PRAGMA user_version = 2;
INSERT INTO evaluations VALUES (1, 1, 1, 'a', 't1', 'succeeded', 10, 'validation', '{"loss": 1.0}', NULL, 0.5,
                                '2024-01-01T00:06:00.000+00:00');
INSERT INTO evaluations VALUES (2, 1, 1, 'b', 't2', 'succeeded', 30, 'all', '{"loss": 2.0}', NULL, 0.7,
                                '2024-01-01T00:06:01.000+00:00');
INSERT INTO evaluations VALUES (3, 1, 1, 'c', 't3', 'timeout', NULL, NULL, '{}', 'no activity for 30 s', NULL,
                                '2024-01-01T00:06:30.000+00:00');
INSERT INTO evaluations VALUES (4, 1, 2, 'a', 't4', 'succeeded', 10, 'validation', '{"loss": 0.5}', NULL, 0.5,
                                '2024-01-01T00:07:00.000+00:00');
INSERT INTO evaluations VALUES (5, 1, 1, 'b', 't5', 'succeeded', 30, 'all', '{"loss": 4.0}', NULL, 0.6,
                                '2024-01-01T00:08:00.000+00:00');
INSERT INTO evaluations VALUES (6, 1, 1, 'a', 't6', 'failed', NULL, NULL, '{}', 'boom', NULL,
                                '2024-01-01T00:08:01.000+00:00');
INSERT INTO evaluations VALUES (7, 2, 1, 'a', 't7', 'succeeded', 5, 'all', '{"loss": 3.0}', NULL, 0.1,
                                '2024-01-02T00:01:00.000+00:00');
"""

V2_COLUMNS = ("id, experiment_id, round, node_id, task_id, outcome, num_samples, split, metrics, error, duration_s, "
              "received_at")


def write_v2_file(path, extra_sql: str = "") -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(V2_SCHEMA + extra_sql)
    finally:
        conn.close()


def read(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def dump(path) -> dict[str, object]:
    conn = sqlite3.connect(path)
    try:
        out: dict[str, object] = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("experiments", "rounds", "node_results", "evaluations")
        }
        out["version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out["schema"] = {  # columns (name, type, not null, default, pk), foreign keys and indexes of each table
            name: (conn.execute(f"PRAGMA table_info({name})").fetchall(),
                   conn.execute(f"PRAGMA foreign_key_list({name})").fetchall(),
                   sorted(conn.execute(f"PRAGMA index_list({name})").fetchall()))
            for name in names if name != "sqlite_sequence"
        }
        return out
    finally:
        conn.close()


# -- schema and migration ------------------------------------------------------------------------------


def test_a_version_2_file_is_migrated_in_place_keeping_every_row(tmp_path):
    path = tmp_path / "v2.db"
    write_v2_file(path)
    before = dump(path)
    assert before["version"] == 2 and len(before["evaluations"]) == 7

    with HistoryStore(path) as store:
        rows = store.evaluations(1)
        assert [(r.round, r.node_id, r.task_id) for r in rows] == [
            (1, "a", "t1"), (1, "b", "t2"), (1, "c", "t3"), (1, "b", "t5"), (1, "a", "t6"), (2, "a", "t4")]
        # per (experiment, round), in arrival order, a new evaluation where a node comes again (b at row 5)
        assert [r.evaluation_id for r in rows] == [1, 1, 1, 3, 3, 2]
        assert [r.evaluation_id for r in store.evaluations(2)] == [4]
        assert rows[2].error == "no activity for 30 s" and rows[3].metrics == {"loss": 4.0}

    assert SCHEMA_VERSION == 3
    after = dump(path)
    assert after["version"] == 3
    for table in ("experiments", "rounds", "node_results"):
        assert after[table] == before[table]
    assert read(path, f"SELECT {V2_COLUMNS} FROM evaluations ORDER BY id") == before["evaluations"]  # same ids
    # each evaluation starts when its first row arrived
    assert read(path, "SELECT id, experiment_id, round, started_at FROM evaluation_runs ORDER BY id") == [
        (1, 1, 1, "2024-01-01T00:06:00.000+00:00"), (2, 1, 2, "2024-01-01T00:07:00.000+00:00"),
        (3, 1, 1, "2024-01-01T00:08:00.000+00:00"), (4, 2, 1, "2024-01-02T00:01:00.000+00:00")]
    with HistoryStore(path) as reopened:  # version 3 now: opens as is, new evaluations get new ids
        assert reopened.record_evaluation(EvaluationRecord(1, 1, "a", "t8", "failed", error="x")) == 5


def test_a_new_file_and_a_migrated_one_have_the_same_schema(tmp_path):
    HistoryStore(tmp_path / "new.db").close()
    write_v2_file(tmp_path / "old.db")
    HistoryStore(tmp_path / "old.db").close()
    new, old = dump(tmp_path / "new.db")["schema"], dump(tmp_path / "old.db")["schema"]
    assert new == old
    columns, foreign_keys, _ = new["evaluations"]
    assert (12, "evaluation_id", "INTEGER", 1, None, 0) in columns  # NOT NULL
    assert {(fk[2], fk[3], fk[6]) for fk in foreign_keys} == {("experiments", "experiment_id", "CASCADE"),
                                                              ("evaluation_runs", "evaluation_id", "CASCADE")}


def test_a_migration_failing_after_the_rows_moved_changes_nothing(tmp_path):
    # an index of a version-3 name on another table: the rows are copied, the old table dropped, then the last
    # CREATE INDEX fails; the whole migration must roll back (version 2, every row and table as it was)
    path = tmp_path / "v2.db"
    write_v2_file(path, "CREATE INDEX evaluation_runs_by_experiment ON rounds (status);")
    before = dump(path)
    with pytest.raises(HistoryError, match="evaluation_runs_by_experiment already exists"):
        HistoryStore(path)
    assert dump(path) == before


def test_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "v4.db"
    write_v2_file(path, "PRAGMA user_version = 4;")
    with pytest.raises(HistoryError, match="schema version 4, newer than the version 3 this fedserver reads"):
        HistoryStore(path)


# -- writing: which evaluation a row goes into ---------------------------------------------------------


def test_each_store_opens_its_own_evaluation_and_a_node_repeating_opens_another(tmp_path):
    path = tmp_path / "h.db"
    with HistoryStore(path) as first:
        exp = first.start_experiment("e", {})
        ids = [first.record_evaluation(EvaluationRecord(exp, 2, n, f"t-{n}", "failed", error="x")) for n in "ab"]
        ids.append(first.record_evaluation(EvaluationRecord(exp, 3, "a", "t", "failed", error="x")))
        ids.append(first.record_evaluation(EvaluationRecord(exp, 2, "a", "t", "failed", error="x")))  # a again
    with HistoryStore(path) as second:  # what Experiment.evaluate does: one store per evaluation
        ids.append(second.record_evaluation(EvaluationRecord(exp, 2, "c", "t", "failed", error="x")))
        assert [r.evaluation_id for r in second.evaluations(exp, round=2)] == [1, 1, 3, 4]
    assert ids == [1, 1, 2, 3, 4]


def test_an_explicit_evaluation_must_exist_and_match(tmp_path):
    with HistoryStore(tmp_path / "h.db") as store:
        exp = store.start_experiment("e", {})
        evaluation = store.start_evaluation(exp, 4)
        record = EvaluationRecord(exp, 4, "a", "t", "failed", error="x", evaluation_id=evaluation)
        assert store.record_evaluation(record) == evaluation
        assert store.record_evaluation(EvaluationRecord(exp, 4, "a", "t2", "failed", error="again",
                                                        evaluation_id=evaluation)) == evaluation
        with pytest.raises(HistoryError, match=r"evaluation 1 is of experiment 1, round 4; the record of node 'a' "
                                               r"is of experiment 1, round 5"):
            store.record_evaluation(EvaluationRecord(exp, 5, "a", "t", "failed", error="x", evaluation_id=1))
        with pytest.raises(HistoryError, match=r"no evaluation with id 9: open one with start_evaluation\(\)"):
            store.record_evaluation(EvaluationRecord(exp, 4, "a", "t", "failed", error="x", evaluation_id=9))
        with pytest.raises(HistoryError, match="round must be an int >= 1"):
            store.start_evaluation(exp, 0)
        with pytest.raises(HistoryError, match="no experiment with id 7"):
            store.start_evaluation(7, 1)
        with pytest.raises(HistoryError, match="evaluation_id must be an int >= 0, got 'x'"):
            EvaluationRecord(exp, 4, "a", "t", "failed", evaluation_id="x")  # type: ignore[arg-type]
        assert len(store.evaluations(exp)) == 2


# -- reading: fedserver history and a real Experiment evaluated twice ---------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedserver")
    cli_history.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_history_shows_a_model_evaluated_twice_as_two_evaluations(tmp_path, capsys):
    path = tmp_path / "v2.db"
    write_v2_file(path)
    assert run_cli(["history", "--db", str(path), "--experiment", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("evaluations of the model after each round (metrics weighted by samples):")
    assert [line.split() for line in lines[at + 1:]] == [
        ["EVALUATION", "ROUND", "REPLIED", "SAMPLES", "SPLIT", "METRICS"],
        ["1", "1", "2/3", "40", "all+validation", f"loss={(10 * 1.0 + 30 * 2.0) / 40:.4g}"],
        ["3", "1", "1/2", "30", "all", "loss=4"],  # not merged into evaluation 1
        ["2", "2", "1/1", "10", "validation", "loss=0.5"],
    ]
    assert run_cli(["history", "--db", str(path), "--experiment", "1", "--round", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines.index("evaluation 1 of the model after round 1: 2/3 nodes replied, 40 samples, loss=1.75")
    assert [line.split()[:2] for line in lines[first + 2:first + 5]] == [["a", "succeeded"], ["b", "succeeded"],
                                                                         ["c", "timeout"]]
    assert lines[first + 5] == ""
    assert lines[first + 6] == "evaluation 3 of the model after round 1: 1/2 nodes replied, 30 samples, loss=4"
    assert [line.split()[:2] for line in lines[first + 8:]] == [["b", "succeeded"], ["a", "failed"]]


def test_two_evaluations_of_one_model_by_an_experiment_are_told_apart(tmp_path):
    sites = least_squares_sites()
    args = {"num_updates": 5, "lr": 0.02, "batch_size": 16, "seed": 7, "test_ratio": 0.25}

    async def main():
        async with federation(tmp_path, sites) as (server, _nodes, _):
            await server.wait_for_nodes(3, 30)
            exp = Experiment(LinearPlan, args, rounds=1, dataset_tags=["lsq"], min_nodes=3, server=server,
                             progress=False, history_db=tmp_path / "history.db")
            await exp.run_async()
            return await exp.evaluate_async(), await exp.evaluate_async(), exp

    first, second, exp = asyncio.run(asyncio.wait_for(main(), timeout=120))
    with HistoryStore(tmp_path / "history.db") as history:
        rows = history.evaluations(exp.history_id, round=1)
    by_evaluation: dict[int, set[str]] = {}
    for row in rows:
        by_evaluation.setdefault(row.evaluation_id, set()).add(row.task_id)
    assert list(by_evaluation.values()) == [{o.task_id for o in first.outcomes}, {o.task_id for o in second.outcomes}]
    one, two = summarize_evaluations(rows)
    assert (one.replied, one.selected, two.replied, two.selected) == (3, 3, 3, 3)
    assert one.metrics == pytest.approx(first.metrics) and two.metrics == pytest.approx(second.metrics)
