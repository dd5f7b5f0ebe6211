"""``fedserver history`` / ``fedserver plot`` through a real argparse parser and a real history file."""

from __future__ import annotations

import argparse

import pytest

from fedcore.errors import HistoryError
from fedserver import cli_history
from fedserver.history import HistoryStore
from fedserver.history_records import NodeResultRecord


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedserver")
    cli_history.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "history.db"
    with HistoryStore(path) as store:
        for name, base in (("scaffold", 1.0), ("fedavg", 2.0)):
            exp = store.start_experiment(name, {"aggregator": name, "rounds": 2})
            for round in range(2):
                store.start_round(exp, round, ["site-a", "site-b"])
                store.record_node_result(
                    NodeResultRecord(
                        exp,
                        round,
                        "site-a",
                        "succeeded",
                        num_samples=100,
                        num_steps=10,
                        duration_s=1.5,
                        bytes_in=2048,
                        bytes_out=3 * 1024 * 1024,
                        training_metrics={"loss": base / (round + 1), "accuracy": 0.5 + round / 10},
                        validation_after={"accuracy": 0.6},
                    )
                )
                store.record_node_result(
                    NodeResultRecord(exp, round, "site-b", "timeout", error="no reply in 30 s")
                )
                store.finish_round(exp, round, metrics={"loss": base / (round + 1)})
            store.finish_experiment(exp)
    return path


def test_history_lists_experiments(db, capsys):
    assert run(["history", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "DONE", "CREATED", "ENDED", "ERROR"]
    assert lines[1].split()[:4] == ["1", "scaffold", "completed", "2/2"]
    assert lines[2].split()[:4] == ["2", "fedavg", "completed", "2/2"]


def test_history_of_one_experiment_lists_rounds(db, capsys):
    assert run(["history", "--db", str(db), "--experiment", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("experiment 2: fedavg (completed)\n")
    assert 'config: {"aggregator": "fedavg", "rounds": 2}' in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[:3] for row in rows] == [["0", "completed", "1/2"], ["1", "completed", "1/2"]]
    assert "loss=2" in rows[0] and "loss=1" in rows[1]


def test_history_of_one_round_lists_node_results(db, capsys, monkeypatch):
    monkeypatch.setenv(cli_history.DB_ENV_VAR, str(db))  # --db from the environment
    assert run(["history", "--experiment", "1", "--round", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NODE", "OUTCOME", "SAMPLES"]
    assert "site-a  succeeded  100" in lines[1]
    assert "2.0 KiB" in lines[1] and "3.0 MiB" in lines[1] and "loss=0.5 accuracy=0.6" in lines[1]
    assert lines[2].split()[:2] == ["site-b", "timeout"] and lines[2].endswith("no reply in 30 s")


def test_plot_and_compare_write_pngs(db, tmp_path, capsys):
    out = tmp_path / "run.png"
    assert run(["plot", "--db", str(db), "--experiment", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = tmp_path / "both.png"
    assert (
        run(
            [
                "plot",
                "--db",
                str(db),
                "--experiment",
                "1",
                "--compare",
                "2",
                "--metric",
                "loss",
                "--out",
                str(both),
            ]
        )
        == 0
    )
    assert both.stat().st_size > 5_000
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}", f"wrote {both}"]


def test_errors_are_named_and_no_database_is_created(db, tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(SystemExit) as exited:  # bad usage (test_cli_missing_home: the message)
        run(["history", "--db", str(missing)])
    assert exited.value.code == 2
    assert not missing.exists()
    with pytest.raises(HistoryError, match="--round needs --experiment ID"):
        run(["history", "--db", str(db), "--round", "1"])
    with pytest.raises(HistoryError, match=r"no experiment with id 9 .*known ids: \[1, 2\]"):
        run(["history", "--db", str(db), "--experiment", "9"])
    with pytest.raises(SystemExit):  # argparse: --out is required
        run(["plot", "--db", str(db), "--experiment", "1"])
