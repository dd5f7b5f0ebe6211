"""HistoryStore on real SQLite files: schema, writes, queries, metric series and every refusal."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from fedcore.errors import HistoryError
from fedserver.history import SCHEMA_VERSION, HistoryStore
from fedserver.history_records import NodeResultRecord


class FakeClock:
    """Seconds since the epoch, advanced by hand (2024-01-01T00:00:00Z to start)."""

    def __init__(self) -> None:
        self.now = 1_704_067_200.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    with HistoryStore(tmp_path / "history.db", clock=clock) as history:
        yield history


def result(
    experiment_id: int, round: int, node_id: str, outcome: str = "succeeded", **fields
) -> NodeResultRecord:
    return NodeResultRecord(
        experiment_id=experiment_id, round=round, node_id=node_id, outcome=outcome, **fields
    )


def run_two_rounds(store: HistoryStore) -> int:
    """An experiment with 2 rounds, 2 nodes; node b fails in round 1 and replies late afterwards."""
    exp = store.start_experiment("scaffold-demo", {"aggregator": "scaffold", "rounds": 2})
    store.start_round(exp, 0, ["a", "b"])
    store.record_node_result(
        result(exp, 0, "a", training_metrics={"loss": 0.9, "accuracy": 0.5}, num_samples=10)
    )
    store.record_node_result(
        result(exp, 0, "b", training_metrics={"loss": 1.1, "accuracy": 0.4}, num_samples=30)
    )
    store.finish_round(exp, 0, metrics={"loss": 1.05, "accuracy": 0.425})
    store.start_round(exp, 1, ["a", "b"])
    store.record_node_result(result(exp, 1, "a", training_metrics={"loss": 0.6, "accuracy": 0.7}))
    store.record_node_result(result(exp, 1, "b", "timeout", error="no reply within 30 s"))
    store.finish_round(exp, 1, metrics={"loss": 0.6})
    store.record_node_result(result(exp, 1, "b", "late", training_metrics={"loss": 0.2}))
    store.finish_experiment(exp)
    return exp


def test_schema_is_versioned_wal_with_foreign_keys(tmp_path):
    path = tmp_path / "h.db"
    HistoryStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"experiments", "rounds", "node_results"} <= tables
    finally:
        conn.close()
    with HistoryStore(path) as reopened:  # an existing file of our version opens as is
        assert reopened.experiments() == []


def test_full_run_reads_back(store, clock):
    exp = run_two_rounds(store)

    [record] = store.experiments()
    assert (record.id, record.name, record.status) == (exp, "scaffold-demo", "completed")
    assert record.config == {"aggregator": "scaffold", "rounds": 2}
    assert record.created_at == "2024-01-01T00:00:00.000+00:00"
    assert store.experiment(exp) == record

    rounds = store.rounds(exp)
    assert [(r.round, r.status, r.selected_nodes) for r in rounds] == [
        (0, "completed", ["a", "b"]),
        (1, "completed", ["a", "b"]),
    ]
    assert rounds[0].metrics == {"loss": 1.05, "accuracy": 0.425}

    results = store.node_results(exp)
    assert [(r.round, r.node_id, r.outcome) for r in results] == [
        (0, "a", "succeeded"),
        (0, "b", "succeeded"),
        (1, "a", "succeeded"),
        (1, "b", "timeout"),
        (1, "b", "late"),
    ]
    assert results[3].error == "no reply within 30 s"
    assert [r.node_id for r in store.node_results(exp, round=0)] == ["a", "b"]


def test_node_result_fields_round_trip_exactly(store, clock):
    exp = store.start_experiment("e", {})
    store.start_round(exp, 3, ["site-1"])
    clock.now += 12.5
    record = result(
        exp,
        3,
        "site-1",
        task_id="task-42",
        num_samples=640,
        num_steps=20,
        duration_s=12.25,
        bytes_in=1_234_567,
        bytes_out=7_654_321,
        training_metrics={"loss": np.float32(0.25), "steps": np.int64(20), "curve": [1.0, 0.5]},
        validation_before={"accuracy": 0.5},
        validation_after={"accuracy": 0.75},
    )
    store.record_node_result(record)
    [got] = store.node_results(exp, round=3)
    assert got.training_metrics == {"loss": 0.25, "steps": 20, "curve": [1.0, 0.5]}
    assert got.received_at == "2024-01-01T00:00:12.500+00:00"
    expected = {**record.__dict__, "training_metrics": got.training_metrics, "received_at": got.received_at}
    assert got.__dict__ == expected


def test_metric_series_per_node_and_global(store):
    exp = run_two_rounds(store)
    # b's round-1 timeout and late reply are not part of the series.
    assert store.metric_series(exp, "loss") == {"a": [(0, 0.9), (1, 0.6)], "b": [(0, 1.1)]}
    assert store.metric_series(exp, "accuracy") == {"a": [(0, 0.5), (1, 0.7)], "b": [(0, 0.4)]}
    assert store.metric_series(exp, "unknown") == {}
    assert store.global_series(exp, "loss") == [(0, 1.05), (1, 0.6)]
    assert store.global_series(exp, "accuracy") == [(0, 0.425)]


def test_metric_series_from_validation_metrics_skips_non_numbers(store):
    exp = store.start_experiment("e", {})
    for round in range(3):
        store.start_round(exp, round, ["a"])
        after = {"accuracy": 0.5 + round / 10} if round != 1 else {"accuracy": "n/a"}
        store.record_node_result(
            result(exp, round, "a", validation_before={"accuracy": 0.1}, validation_after=after)
        )
        store.finish_round(exp, round, metrics={"accuracy": True})  # a bool is not a metric value
    assert store.metric_series(exp, "accuracy", source="validation_after") == {"a": [(0, 0.5), (2, 0.7)]}
    assert store.metric_series(exp, "accuracy", source="validation_before") == {
        "a": [(0, 0.1), (1, 0.1), (2, 0.1)]
    }
    assert store.global_series(exp, "accuracy") == []
    with pytest.raises(HistoryError, match=r"metric source must be one of \['training', 'validation_before'"):
        store.metric_series(exp, "accuracy", source="test")


def test_failed_round_is_kept_but_not_in_the_global_series(store):
    exp = store.start_experiment("e", {})
    store.start_round(exp, 0, ["a", "b", "c"])
    store.record_node_result(result(exp, 0, "a", "refused", error="plan not approved"))
    store.finish_round(exp, 0, status="failed", metrics={"loss": 3.0}, error="quorum 2 not reached (1 reply)")
    [round0] = store.rounds(exp)
    assert (round0.status, round0.error) == ("failed", "quorum 2 not reached (1 reply)")
    assert store.global_series(exp, "loss") == []


def test_resumed_round_replaces_the_interrupted_attempt(store):
    exp = store.start_experiment("e", {})
    store.start_round(exp, 0, ["a"])
    store.record_node_result(result(exp, 0, "a", training_metrics={"loss": 1.0}))
    with pytest.raises(HistoryError, match=r"round 0 of experiment 1 already exists \(status 'running'\)"):
        store.start_round(exp, 0, ["a", "b"])

    store.reopen_experiment(exp)
    store.start_round(exp, 0, ["a", "b"], replace=True)
    assert store.node_results(exp) == []  # gone with the earlier attempt (foreign key, ON DELETE CASCADE)
    assert store.rounds(exp)[0].selected_nodes == ["a", "b"]
    assert store.experiment(exp).status == "running"


def test_experiments_are_kept_apart_and_survive_reopening(tmp_path):
    path = tmp_path / "h.db"
    with HistoryStore(path) as first:
        exp1 = run_two_rounds(first)
        exp2 = first.start_experiment("fedavg", {"aggregator": "fedavg"})
        first.start_round(exp2, 0, ["a"])
        first.record_node_result(result(exp2, 0, "a", training_metrics={"loss": 5.0}))
        first.finish_experiment(exp2, "stopped", error="interrupted by the researcher")
    with HistoryStore(path) as second:
        assert [(e.id, e.name, e.status) for e in second.experiments()] == [
            (exp1, "scaffold-demo", "completed"),
            (exp2, "fedavg", "stopped"),
        ]
        assert second.experiment(exp2).error == "interrupted by the researcher"
        assert second.metric_series(exp2, "loss") == {"a": [(0, 5.0)]}
        assert len(second.node_results(exp1)) == 5


def test_concurrent_writers_from_threads(store):
    exp = store.start_experiment("e", {})
    store.start_round(exp, 0, [f"n{i}" for i in range(8)])

    def write(node: str) -> None:
        for k in range(25):
            store.record_node_result(result(exp, 0, node, training_metrics={"k": k}))

    threads = [threading.Thread(target=write, args=(f"n{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(store.node_results(exp)) == 200


# -- refusals ----------------------------------------------------------------------------------------


def test_unknown_experiment_and_rounds_are_named(store):
    exp = store.start_experiment("e", {})
    with pytest.raises(HistoryError, match=r"no experiment with id 7 in .*; known ids: \[1\]"):
        store.rounds(7)
    with pytest.raises(HistoryError, match="round 0 of experiment 1 was never started; cannot record .* 'a'"):
        store.record_node_result(result(exp, 0, "a"))
    with pytest.raises(HistoryError, match="round 2 of experiment 1 was never started"):
        store.finish_round(exp, 2)
    store.start_round(exp, 0, ["a"])
    store.finish_round(exp, 0)
    with pytest.raises(HistoryError, match="round 0 of experiment 1 is already 'completed'"):
        store.finish_round(exp, 0)
    with pytest.raises(HistoryError, match="finish_round status must be 'completed' or 'failed', got 'done'"):
        store.finish_round(exp, 0, status="done")
    with pytest.raises(HistoryError, match=r"finish_experiment status must be one of \['completed'"):
        store.finish_experiment(exp, "running")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"outcome": "ok"},
            r"outcome must be one of \['succeeded', 'failed', 'refused', 'timeout', 'late'\]",
        ),
        ({"node_id": ""}, "node_id must be a non-empty str"),
        ({"round": -1}, "round must be an int >= 0, got -1"),
        ({"num_samples": 1.5}, "num_samples must be an int >= 0, got 1.5"),
        ({"bytes_in": None}, "bytes_in must be an int >= 0, got None"),
        ({"duration_s": float("inf")}, "duration_s must be a finite number >= 0"),
        ({"training_metrics": {1: 0.5}}, "training_metrics must be a mapping with str keys"),
        ({"validation_after": [0.5]}, "validation_after must be a mapping with str keys"),
        ({"error": 42}, "error must be a str or None, got int"),
    ],
)
def test_bad_node_records_are_refused(fields, message):
    base = {"experiment_id": 1, "round": 0, "node_id": "a", "outcome": "succeeded"}
    with pytest.raises(HistoryError, match=message):
        NodeResultRecord(**{**base, **fields})


def test_non_json_values_are_refused_before_anything_is_written(store):
    with pytest.raises(HistoryError, match="experiment config must be JSON-able"):
        store.start_experiment("e", {"model": object()})
    assert store.experiments() == []
    exp = store.start_experiment("e", {})
    store.start_round(exp, 0, ["a"])
    with pytest.raises(HistoryError, match="training_metrics must be JSON-able"):
        store.record_node_result(result(exp, 0, "a", training_metrics={"w": np.zeros(3)}))
    assert store.node_results(exp) == []
    with pytest.raises(HistoryError, match="selected_nodes must be a sequence of node id strings"):
        store.start_round(exp, 1, "ab")
    with pytest.raises(HistoryError, match="experiment name must be a non-empty str"):
        store.start_experiment("", {})


def test_files_that_are_not_our_database_are_refused(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite file at all" * 100)
    with pytest.raises(HistoryError, match="is not a usable history database"):
        HistoryStore(garbage)

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(
        HistoryError, match=r"is not a fedserver history database \(schema version 0, 1 tables\)"
    ):
        HistoryStore(other)

    newer = tmp_path / "newer.db"
    HistoryStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(HistoryError, match=f"schema version {SCHEMA_VERSION + 1}, newer than the version"):
        HistoryStore(newer)
