"""History schema version 2: the evaluations table, the migration of version-1 files, records and reads (version 3,
which gives each evaluation an id: tests/test_history_evaluation_ids.py)."""

from __future__ import annotations

import argparse
import sqlite3

import numpy as np
import pytest

from fedcore.errors import HistoryError
from fedcore.tasks import EvaluateResult
from fedserver import cli_history
from fedserver.evaluation import EvaluationOutcome, weighted_metrics
from fedserver.history import SCHEMA_VERSION, HistoryStore
from fedserver.history_evaluations import EvaluationSummary, summarize_evaluations
from fedserver.history_records import EvaluationRecord, NodeResultRecord

# The schema of version 1, as fedserver wrote it before evaluations were stored (frozen here on purpose:
# the migration must keep reading files made by that code, whatever history.py becomes).
V1_SCHEMA = """
CREATE TABLE experiments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    ended_at    TEXT,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'stopped')),
    error       TEXT
);
CREATE TABLE rounds (
    experiment_id  INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    round          INTEGER NOT NULL CHECK (round >= 0),
    started_at     TEXT NOT NULL,
    ended_at       TEXT,
    status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    selected_nodes TEXT NOT NULL,
    metrics        TEXT NOT NULL,
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
    duration_s        REAL,
    bytes_in          INTEGER NOT NULL,
    bytes_out         INTEGER NOT NULL,
    training_metrics  TEXT NOT NULL,
    validation_before TEXT,
    validation_after  TEXT,
    error             TEXT,
    received_at       TEXT NOT NULL,
    FOREIGN KEY (experiment_id, round) REFERENCES rounds(experiment_id, round) ON DELETE CASCADE
);
CREATE INDEX node_results_by_round ON node_results (experiment_id, round);
PRAGMA user_version = 1;
INSERT INTO experiments VALUES (1, 'fedavg', '2024-01-01T00:00:00.000+00:00', '2024-01-01T00:05:00.000+00:00',
                                '{"rounds": 2}', 'completed', NULL);
INSERT INTO experiments VALUES (2, 'scaffold', '2024-01-02T00:00:00.000+00:00', NULL, '{}', 'running', NULL);
INSERT INTO rounds VALUES (1, 1, '2024-01-01T00:01:00.000+00:00', '2024-01-01T00:02:00.000+00:00',
                           'completed', '["a", "b"]', '{"loss": 0.5}', NULL);
INSERT INTO rounds VALUES (1, 2, '2024-01-01T00:03:00.000+00:00', '2024-01-01T00:04:00.000+00:00', 'failed',
                           '["a", "b"]', '{}', 'quorum not reached');
INSERT INTO node_results VALUES (1, 1, 1, 'a', 't1', 'succeeded', 10, 3, 1.5, 2048, 4096, '{"loss": 0.4}',
                                 NULL, '{"accuracy": 0.8}', NULL, '2024-01-01T00:01:30.000+00:00');
INSERT INTO node_results VALUES (2, 1, 1, 'b', 't2', 'timeout', NULL, NULL, NULL, 0, 4096, '{}', NULL, NULL,
                                 'no reply in 30 s', '2024-01-01T00:02:00.000+00:00');
INSERT INTO node_results VALUES (3, 1, 2, 'b', 't3', 'late', 5, 1, 9.0, 100, 0, '{"loss": 0.9}', NULL, NULL,
                                 NULL, '2024-01-01T00:04:30.000+00:00');
"""


def write_v1_file(path, extra_sql: str = "") -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(V1_SCHEMA + extra_sql)
    finally:
        conn.close()


def dump(path) -> dict[str, list[tuple]]:
    """Every row of the version-1 tables, and the schema version, read with plain sqlite3."""
    conn = sqlite3.connect(path)
    try:
        out = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("experiments", "rounds", "node_results")
        }
        out["version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        out["tables"] = sorted(
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )
        out["indexes"] = sorted(
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        )
        return out
    finally:
        conn.close()


# -- schema and migration ------------------------------------------------------------------------------


def test_a_new_file_is_created_at_the_current_version_with_the_evaluations_table(tmp_path):
    path = tmp_path / "h.db"
    HistoryStore(path).close()
    assert SCHEMA_VERSION == 3
    after = dump(path)
    assert after["version"] == 3
    assert {"experiments", "rounds", "node_results", "evaluations", "evaluation_runs"} <= set(after["tables"])
    assert "evaluations_by_round" in after["indexes"]


def test_a_version_1_file_is_migrated_in_place_without_losing_a_row(tmp_path):
    path = tmp_path / "v1.db"
    write_v1_file(path)
    before = dump(path)
    assert before["version"] == 1 and "evaluations" not in before["tables"]
    assert len(before["node_results"]) == 3

    with HistoryStore(path) as store:  # migrates
        assert [e.name for e in store.experiments()] == ["fedavg", "scaffold"]
        assert [(r.round, r.status, r.metrics) for r in store.rounds(1)] == [
            (1, "completed", {"loss": 0.5}),
            (2, "failed", {}),
        ]
        results = store.node_results(1)
        assert [(r.node_id, r.outcome, r.num_samples) for r in results] == [
            ("a", "succeeded", 10),
            ("b", "timeout", None),
            ("b", "late", 5),
        ]
        assert results[0].validation_after == {"accuracy": 0.8}
        assert store.evaluations(1) == []
        store.start_round(2, 1, ["a"])  # the migrated file takes new writes as a new one does
        assert store.experiment(2).status == "running"

    after = dump(path)
    assert after["version"] == SCHEMA_VERSION  # 1 -> 2 -> 3 in one transaction
    assert "evaluations" in after["tables"] and "evaluations_by_round" in after["indexes"]
    for table in ("experiments", "node_results"):
        assert after[table] == before[table]
    assert after["rounds"][: len(before["rounds"])] == before["rounds"]
    with HistoryStore(path) as reopened:  # current version now: opens as is, nothing migrated twice
        assert len(reopened.node_results(1)) == 3


def test_a_failing_migration_changes_nothing(tmp_path):
    # An index of the version-2 name already in a version-1 file: CREATE TABLE evaluations succeeds, then
    # CREATE INDEX fails; the whole migration must roll back (no table, still version 1, every row kept).
    path = tmp_path / "v1.db"
    write_v1_file(path, "CREATE INDEX evaluations_by_round ON rounds (status);")
    before = dump(path)
    with pytest.raises(HistoryError, match="evaluations_by_round already exists"):
        HistoryStore(path)
    after = dump(path)
    assert after == before
    assert "evaluations" not in after["tables"] and after["version"] == 1


def test_newer_and_foreign_files_are_still_refused(tmp_path):
    newer = tmp_path / "newer.db"
    write_v1_file(newer, "PRAGMA user_version = 4;")
    with pytest.raises(HistoryError, match="schema version 4, newer than the version 3 this fedserver reads"):
        HistoryStore(newer)
    assert dump(newer)["version"] == 4 and "evaluations" not in dump(newer)["tables"]

    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE evaluations (x)")
    conn.commit()
    conn.close()
    with pytest.raises(
        HistoryError,
        match=r"not a fedserver history database \(schema version 0, 1 tables\); "
        r"expected a new file or schema version 1 to 3",
    ):
        HistoryStore(foreign)


# -- records: write, read, refuse ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_704_067_200.0  # 2024-01-01T00:00:00Z

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    with HistoryStore(tmp_path / "history.db", clock=FakeClock()) as history:
        yield history


def reply(
    num_samples: int, metrics: dict, split: str = "validation", duration_s: float = 0.25
) -> EvaluateResult:
    return EvaluateResult(num_samples=num_samples, metrics=metrics, split=split, duration_s=duration_s)


def evaluated(store: HistoryStore) -> int:
    """An experiment whose round-1 model was evaluated on 3 nodes (one timed out) and round-2 on 2."""
    exp = store.start_experiment("eval-demo", {"rounds": 2})
    outcomes = {
        1: [
            EvaluationOutcome("a", "t-a1", "succeeded", result=reply(10, {"loss": 0.5, "accuracy": 0.9})),
            EvaluationOutcome(
                "b", "t-b1", "succeeded", result=reply(30, {"loss": 1.0, "accuracy": 0.5}, "all")
            ),
            EvaluationOutcome("c", "t-c1", "timeout", "no activity for 30 s"),
        ],
        2: [
            EvaluationOutcome("a", "t-a2", "succeeded", result=reply(10, {"loss": 0.25})),
            EvaluationOutcome("b", "t-b2", "refused", "plan not approved"),
        ],
    }
    for round, per_node in outcomes.items():
        for outcome in per_node:
            store.record_evaluation(EvaluationRecord.from_outcome(exp, round, outcome))
    return exp


def test_evaluations_round_trip_from_the_outcomes(store):
    exp = evaluated(store)
    rows = store.evaluations(exp)
    assert [(r.round, r.node_id, r.task_id, r.outcome) for r in rows] == [
        (1, "a", "t-a1", "succeeded"),
        (1, "b", "t-b1", "succeeded"),
        (1, "c", "t-c1", "timeout"),
        (2, "a", "t-a2", "succeeded"),
        (2, "b", "t-b2", "refused"),
    ]
    assert rows[1] == EvaluationRecord(
        experiment_id=exp,
        round=1,
        node_id="b",
        task_id="t-b1",
        outcome="succeeded",
        num_samples=30,
        split="all",
        metrics={"loss": 1.0, "accuracy": 0.5},
        error=None,
        duration_s=0.25,
        received_at="2024-01-01T00:00:00.000+00:00",
        evaluation_id=1,
    )
    assert [r.evaluation_id for r in rows] == [1, 1, 1, 2, 2]  # one per round's evaluation
    assert rows[2].num_samples is None and rows[2].split is None and rows[2].metrics == {}
    assert rows[2].error == "no activity for 30 s" and rows[2].duration_s is None
    assert [r.node_id for r in store.evaluations(exp, round=2)] == ["a", "b"]
    assert store.evaluations(exp, round=3) == []
    other = store.start_experiment("other", {})
    assert store.evaluations(other) == []  # experiments are kept apart


def test_numpy_metrics_and_an_explicit_time_are_stored_as_given(store):
    exp = store.start_experiment("e", {})
    store.record_evaluation(
        EvaluationRecord(
            exp,
            4,
            "a",
            "t",
            "succeeded",
            num_samples=np.int64(7),
            split="validation",
            metrics={"loss": np.float32(0.5), "n": 3},
            received_at="2024-05-01T10:00:00+00:00",
        )
    )
    (row,) = store.evaluations(exp)
    assert row.metrics == {"loss": 0.5, "n": 3.0} and row.num_samples == 7
    assert row.received_at == "2024-05-01T10:00:00+00:00"


def test_numpy_counts_of_a_node_result_are_stored_as_ints(store):
    # sqlite3 binds a numpy integer as an 8-byte BLOB: node_results then refused its own row when read
    exp = store.start_experiment("e", {})
    store.start_round(exp, 1, ["a"])
    store.record_node_result(
        NodeResultRecord(
            exp,
            1,
            "a",
            "succeeded",
            num_samples=np.int64(7),
            num_steps=np.uint32(3),
            bytes_in=np.int64(5),
            duration_s=np.float32(0.5),
        )
    )
    (row,) = store.node_results(exp)
    assert (row.num_samples, row.num_steps, row.bytes_in, row.duration_s) == (7, 3, 5, 0.5)
    assert type(row.num_samples) is int and type(row.duration_s) is float


def test_evaluations_go_with_their_experiment(store):
    exp = evaluated(store)
    with sqlite3.connect(store.path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM experiments WHERE id = ?", (exp,))
    conn.close()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 0
    conn.close()


def test_unknown_experiments_and_wrong_types_are_refused(store):
    with pytest.raises(HistoryError, match=r"no experiment with id 5 in .*; known ids: \[\]"):
        store.record_evaluation(EvaluationRecord(5, 1, "a", "t", "failed", error="boom"))
    with pytest.raises(HistoryError, match=r"no experiment with id 5"):
        store.evaluations(5)
    exp = store.start_experiment("e", {})
    with pytest.raises(HistoryError, match="record_evaluation expects an EvaluationRecord, got dict"):
        store.record_evaluation({"experiment_id": exp})  # type: ignore[arg-type]
    with pytest.raises(HistoryError, match="round must be an int >= 0, got -1"):
        store.evaluations(exp, round=-1)
    assert store.evaluations(exp) == []


GOOD = {
    "experiment_id": 1,
    "round": 1,
    "node_id": "a",
    "task_id": "t",
    "outcome": "succeeded",
    "num_samples": 5,
    "split": "validation",
    "metrics": {"loss": 0.5},
}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"outcome": "late"},
            r"outcome must be one of \['succeeded', 'failed', 'refused', 'timeout'\], got 'late'",
        ),
        ({"round": 0}, r"round must be an int >= 1 \(the round whose model was evaluated\), got 0"),
        ({"round": True}, "round must be an int >= 0, got True"),
        ({"experiment_id": 2**63}, r"experiment_id must be at most 2\*\*63-1 \(SQLite INTEGER\)"),
        (
            {"num_samples": 2**63},
            r"num_samples must be at most 2\*\*63-1 \(SQLite INTEGER\), got 9223372036854775808",
        ),
        ({"num_samples": -1}, "num_samples must be an int >= 0, got -1"),
        ({"node_id": ""}, "node_id must be a non-empty str, got ''"),
        ({"task_id": None}, "task_id must be a non-empty str, got None"),
        ({"split": "train"}, r"split must be one of \['validation', 'all'\] or None, got 'train'"),
        ({"metrics": {"loss": float("nan")}}, r"metrics\['loss'\] must be a finite number, got nan"),
        ({"metrics": {"loss": float("-inf")}}, r"metrics\['loss'\] must be a finite number, got -inf"),
        ({"metrics": {"ok": True}}, r"metrics\['ok'\] must be a finite number, got True"),
        ({"metrics": {"name": "x"}}, r"metrics\['name'\] must be a finite number, got 'x'"),
        ({"metrics": {1: 0.5}}, "metrics must be a mapping with str keys"),
        ({"duration_s": -0.5}, "duration_s must be a finite number >= 0 or None, got -0.5"),
        ({"error": 3}, "error must be a str or None, got int"),
        ({"received_at": 1.0}, "received_at must be a str or None, got float"),
        (
            {"num_samples": None},
            r"a 'succeeded' evaluation of node 'a' needs num_samples and split, got num_samples=None",
        ),
        ({"split": None}, r"a 'succeeded' evaluation of node 'a' needs num_samples and split, .* split=None"),
        ({"outcome": "failed"}, r"a 'failed' evaluation of node 'a' carries no reply, got num_samples=5"),
        (
            {"outcome": "timeout", "num_samples": None, "split": None},
            r"a 'timeout' evaluation of node 'a' carries no reply, .* metrics=\{'loss': 0.5\}",
        ),
    ],
)
def test_bad_evaluation_records_are_refused(fields, message):
    with pytest.raises(HistoryError, match=message):
        EvaluationRecord(**{**GOOD, **fields})


def test_from_outcome_refuses_what_a_record_would(store):
    bad = EvaluationOutcome("a", "t", "succeeded", result=reply(3, {"loss": float("inf")}))
    with pytest.raises(HistoryError, match=r"metrics\['loss'\] must be a finite number, got inf"):
        EvaluationRecord.from_outcome(1, 1, bad)
    with pytest.raises(HistoryError, match="round must be an int >= 1"):
        EvaluationRecord.from_outcome(1, 0, EvaluationOutcome("a", "t", "failed", "boom"))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("metrics", "not json", "Expecting value"),
        ("metrics", "[1, 2]", r"metrics must be a JSON object, got '\[1, 2\]'"),
        ("metrics", '{"loss": NaN}', r"metrics\['loss'\] must be a finite number, got nan"),
        ("metrics", "[" * 100_000, "maximum recursion depth"),
        ("num_samples", "many", "num_samples must be an int >= 0, got 'many'"),
        ("num_samples", None, "needs num_samples and split"),
        ("outcome", "late", r"outcome must be one of \['succeeded'"),
        ("split", "train", "split must be one of"),
        ("duration_s", "slow", "duration_s must be a finite number >= 0 or None, got 'slow'"),
    ],
)
def test_damaged_rows_are_named(store, column, value, message):
    exp = evaluated(store)
    with sqlite3.connect(store.path) as conn:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute(f"UPDATE evaluations SET {column} = ? WHERE node_id = 'b' AND round = 1", (value,))
    conn.close()
    expected = rf"evaluation row 2 \(experiment {exp}, round 1, node 'b'\) is damaged: .*{message}"
    with pytest.raises(HistoryError, match=expected):
        store.evaluations(exp)
    with pytest.raises(HistoryError, match=expected):
        store.evaluations(exp, round=1)
    assert [r.node_id for r in store.evaluations(exp, round=2)] == ["a", "b"]  # the other rows still read


# -- summaries -----------------------------------------------------------------------------------------


def test_summaries_are_sample_weighted_means_per_evaluation(store):
    exp = evaluated(store)
    # the same round-1 model asked again: node c replies this time, a fails (a second evaluation: c repeats)
    store.record_evaluation(
        EvaluationRecord(
            exp, 1, "c", "t-c1b", "succeeded", num_samples=60, split="all", metrics={"loss": 2.0, "f1": 0.3}
        )
    )
    store.record_evaluation(EvaluationRecord(exp, 1, "a", "t-a1b", "failed", error="boom"))
    first, again, second = summarize_evaluations(store.evaluations(exp))

    n = np.array([10, 30], dtype=np.float64)
    loss = np.array([0.5, 1.0])
    assert (first.evaluation, first.round, first.selected, first.replied, first.num_samples) == (1, 1, 3, 2, 40)
    assert first.metrics["loss"] == pytest.approx(float(np.sum(n * loss) / np.sum(n)), rel=1e-12)
    assert first.metrics["accuracy"] == pytest.approx(
        float(np.average([0.9, 0.5], weights=[10, 30])), rel=1e-12
    )
    assert list(first.metrics) == ["accuracy", "loss"]
    assert (again.evaluation, again.round, again.selected, again.replied, again.num_samples) == (3, 1, 2, 1, 60)
    assert again.metrics == {"f1": pytest.approx(0.3), "loss": pytest.approx(2.0)}  # only node c replied
    assert (second.evaluation, second.round, second.selected, second.replied, second.num_samples) == (2, 2, 2, 1, 10)
    assert second.metrics == {"loss": pytest.approx(0.25)}

    # the same numbers as the evaluation report's weighted_metrics over the replies
    results = [reply(10, {"loss": 0.5, "accuracy": 0.9}), reply(30, {"loss": 1.0, "accuracy": 0.5})]
    assert first.metrics == pytest.approx(weighted_metrics(results), rel=1e-12)


def test_summaries_without_samples_or_replies(store):
    exp = store.start_experiment("e", {})
    store.record_evaluation(
        EvaluationRecord(exp, 3, "a", "t1", "succeeded", num_samples=0, split="all", metrics={"loss": 1.0})
    )
    store.record_evaluation(EvaluationRecord(exp, 3, "b", "t2", "failed", error="boom"))
    (summary,) = summarize_evaluations(store.evaluations(exp))
    assert summary == EvaluationSummary(round=3, selected=2, replied=1, num_samples=0, metrics={}, evaluation=1)
    assert summarize_evaluations([]) == []
    huge = [
        EvaluationRecord(1, 1, node, "t", "succeeded", num_samples=2**62, split="all", metrics={"m": 1e308})
        for node in "ab"
    ]
    assert summarize_evaluations(huge)[0].metrics == {"m": pytest.approx(1e308)}  # n·m would overflow


# -- fedserver history ---------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedserver")
    cli_history.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def db(tmp_path):
    """Experiment 1: two training rounds, the model of each evaluated (as ``evaluated`` writes them)."""
    path = tmp_path / "history.db"
    with HistoryStore(path) as store:
        exp = evaluated(store)
        for round in (1, 2):
            store.start_round(exp, round, ["a", "b", "c"])
            store.record_node_result(
                NodeResultRecord(
                    exp, round, "a", "succeeded", num_samples=50, training_metrics={"loss": 1.0 / round}
                )
            )
            store.finish_round(exp, round, metrics={"loss": 1.0 / round})
        store.finish_experiment(exp)
        store.start_experiment("plain", {})
    return path


def test_history_of_an_experiment_lists_its_evaluations_after_its_rounds(db, capsys):
    assert run_cli(["history", "--db", str(db), "--experiment", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rounds_at = next(i for i, line in enumerate(lines) if line.startswith("ROUND  STATUS"))
    assert [lines[i].split()[:3] for i in (rounds_at + 1, rounds_at + 2)] == [
        ["1", "completed", "1/3"],
        ["2", "completed", "1/3"],
    ]
    assert lines[rounds_at + 3] == ""
    assert lines[rounds_at + 4] == "evaluations of the model after each round (metrics weighted by samples):"
    assert lines[rounds_at + 5].split() == ["EVALUATION", "ROUND", "REPLIED", "SAMPLES", "SPLIT", "METRICS"]
    # round 1: a (10 samples, loss 0.5, accuracy 0.9) and b (30, loss 1.0, accuracy 0.5) replied, c timed out
    loss = (10 * 0.5 + 30 * 1.0) / 40
    accuracy = (10 * 0.9 + 30 * 0.5) / 40
    assert lines[rounds_at + 6].split() == [
        "1",
        "1",
        "2/3",
        "40",
        "all+validation",
        f"accuracy={accuracy:.4g}",
        f"loss={loss:.4g}",
    ]
    assert lines[rounds_at + 7].split() == ["2", "2", "1/2", "10", "validation", "loss=0.25"]
    assert len(lines) == rounds_at + 8


def test_an_experiment_without_evaluations_has_no_evaluations_section(db, capsys):
    assert run_cli(["history", "--db", str(db), "--experiment", "2"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\nconfig: {}\n\nno rounds yet\n") and "evaluation" not in out
    with HistoryStore(db) as store:  # evaluations without rounds in this file: shown all the same
        store.record_evaluation(
            EvaluationRecord(2, 3, "a", "t", "succeeded", num_samples=4, split="all", metrics={"loss": 2.0})
        )
    assert run_cli(["history", "--db", str(db), "--experiment", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-5:-2] == [
        "no rounds yet",
        "",
        "evaluations of the model after each round (metrics weighted by samples):",
    ]
    assert lines[-1].split() == ["3", "3", "1/1", "4", "all", "loss=2"]


def test_history_of_a_round_lists_each_node_evaluation(db, capsys):
    assert run_cli(["history", "--db", str(db), "--experiment", "1", "--round", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["NODE", "OUTCOME"] and lines[1].split()[:3] == ["a", "succeeded", "50"]
    assert lines[2] == ""
    assert (
        lines[3]
        == "evaluation 1 of the model after round 1: 2/3 nodes replied, 40 samples, accuracy=0.6 loss=0.875"
    )
    assert lines[4].split() == ["NODE", "OUTCOME", "SAMPLES", "SPLIT", "DURATION", "METRICS", "ERROR"]
    assert lines[5].split() == [
        "a",
        "succeeded",
        "10",
        "validation",
        "0.25s",
        "loss=0.5",
        "accuracy=0.9",
        "-",
    ]
    assert lines[6].split() == ["b", "succeeded", "30", "all", "0.25s", "loss=1", "accuracy=0.5", "-"]
    assert lines[7].split()[:6] == ["c", "timeout", "-", "-", "-", "-"]
    assert lines[7].endswith("no activity for 30 s")
    assert len(lines) == 8


def test_a_round_evaluated_without_node_results_still_shows_its_evaluation(db, capsys):
    with HistoryStore(db) as store:
        store.record_evaluation(
            EvaluationRecord(1, 7, "a", "t7", "failed", error="plan raised\n\x1b[2Kforged")
        )
    assert run_cli(["history", "--db", str(db), "--experiment", "1", "--round", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no node results for round 7 of experiment 1 (rounds: [1, 2])"
    assert lines[2] == "evaluation 3 of the model after round 7: 0/1 nodes replied, 0 samples, -"
    assert lines[4].split()[:2] == ["a", "failed"]
    assert lines[4].endswith("plan raised\\n\\x1b[2Kforged")  # a node's text cannot move the cursor
    assert len(lines) == 5


def test_a_damaged_evaluation_row_is_named_by_the_cli(db):
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE evaluations SET metrics = 'oops' WHERE id = 3")
    conn.close()
    with pytest.raises(
        HistoryError, match=r"evaluation row 3 \(experiment 1, round 1, node 'c'\) is damaged"
    ):
        run_cli(["history", "--db", str(db), "--experiment", "1"])
