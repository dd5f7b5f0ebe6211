"""What a node wrote, as fedserver shows it: a failed task's error text (up to 8192 characters on the wire),
metric names, node ids. ``fedserver history``, ``fedserver run``'s lines and the server's log lines escape
non-printable characters (no terminal control, no forged line) and cut long text saying how long it was;
the history row keeps the text as received.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re

import numpy as np
import pytest
from server_testkit import running_server

from fedcore.aggregators import FedAverage
from fedcore.errors import RoundFailedError
from fedcore.tasks import EvaluateTask, PlanSource, TrainResult, TrainTask
from fedcore.wire import TaskOutcome
from fedcore.wire.messages import MAX_ERROR_MESSAGE
from fedserver import cli_history
from fedserver.cli_run import format_round
from fedserver.evaluation import evaluate_model
from fedserver.history import HistoryStore
from fedserver.history_records import SHOWN_TEXT_CHARS, EvaluationRecord, NodeResultRecord, shown_text
from fedserver.rounds import NodeOutcome, RoundReport, collect_round

#: What a node may send as a failed task's error: escapes that clear the screen and forge a log line, then
#: padding up to the wire's limit.
FORGED = "boom\x1b[2J\r\n2024-01-01 INFO fedserver: all good\u2028"
ERROR = FORGED + "x" * (MAX_ERROR_MESSAGE - len(FORGED))
ESCAPED = "boom\\x1b[2J\\r\\n2024-01-01 INFO fedserver: all good\\u2028"


def assert_shown(text: str) -> None:
    """``text`` holds the error escaped, cut and saying so; no raw control character, no line over the cap."""
    assert ESCAPED in text, text[:400]
    assert re.search(r"x\.\.\. \[\d{4,} more characters cut\]", text), text[-400:]  # the error, or a message with it
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text
    assert max(len(line) for line in text.splitlines()) < 2 * SHOWN_TEXT_CHARS + 500


def test_shown_text_escapes_then_cuts() -> None:
    assert shown_text("plain") == "plain"
    assert shown_text("a\nb") == "a\\nb"
    assert shown_text("x" * 10, 4) == "xxxx... [6 more characters cut]"
    assert shown_text("\x1b" * 3, 2) == "\\x1b\\x1b... [1 more characters cut]"  # cut, then escaped


# -- fedserver history ---------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedserver")
    cli_history.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv).func(parser.parse_args(argv))


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "history.db"
    long_name = "lo\nss" + "y" * 500
    with HistoryStore(path) as store:
        exp = store.start_experiment("e", {})
        store.start_round(exp, 1, ["a\x1b[31m"])
        store.record_node_result(NodeResultRecord(exp, 1, "a\x1b[31m", "failed", error=ERROR,
                                                  training_metrics={long_name: 1.0}))
        store.finish_round(exp, 1, "failed", error=f"round 1 failed: missing: a (failed: {ERROR})")
        store.record_evaluation(EvaluationRecord(exp, 1, "a", "t", "failed", error=ERROR))
        store.finish_experiment(exp, "failed", f"RoundFailedError: {ERROR}")
    return path


@pytest.mark.parametrize("argv", [[], ["--experiment", "1"], ["--experiment", "1", "--round", "1"]])
def test_history_escapes_and_cuts_what_nodes_sent(db, capsys, argv) -> None:
    assert run_cli(["history", "--db", str(db), *argv]) == 0
    out = capsys.readouterr().out
    assert_shown(out)
    if "--round" in argv:
        assert "a\\x1b[31m" in out and "lo\\nssyyy" in out and "\n" + "y" * 80 not in out
        assert "... [441 more characters cut]" in out  # the metric name, cut at 64 characters


def test_the_stored_rows_keep_the_text_as_received(db) -> None:
    with HistoryStore(db) as store:
        (result,) = store.node_results(1)
        (evaluation,) = store.evaluations(1)
    assert result.error == ERROR and evaluation.error == ERROR
    assert result.node_id == "a\x1b[31m" and list(result.training_metrics) == ["lo\nss" + "y" * 500]


# -- the server's logs and the failure messages of a round and an evaluation ------------------------------


async def failed_by_the_node(tmp_path, start) -> tuple[list, BaseException]:
    """Start a round or an evaluation with node 'a' (``start(server, outcomes)``), which fails its task with
    ERROR; the outcomes given to ``on_outcome`` and the error raised."""
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        outcomes: list = []
        running = asyncio.create_task(start(kit.server, outcomes.append))
        polled = await node.poll(wait=10)
        assert polled.descriptor is not None
        await node.upload(polled.descriptor.task_id, outcome=TaskOutcome.FAILED, error_message=ERROR)
        with pytest.raises(RoundFailedError) as failed:
            await asyncio.wait_for(running, 30)
        return outcomes, failed.value


PLAN = PlanSource.from_source("P", "x = 1")
PARAMS = {"w": np.zeros(2, np.float32)}


def test_a_round_logs_and_fails_with_the_node_error_escaped_and_cut(tmp_path, caplog) -> None:
    def start(server, on_outcome):
        task = TrainTask("e", 1, PLAN, {"num_updates": 1}, PARAMS)
        return collect_round(server, FedAverage(), task, ["a"], ["a"], min_nodes=1, inactivity_timeout=30,
                             experiment_key="e", on_outcome=on_outcome)

    with caplog.at_level(logging.INFO, logger="fedserver.rounds"):
        outcomes, error = asyncio.run(failed_by_the_node(tmp_path, start))
    (line,) = [r.getMessage() for r in caplog.records if "outcome=failed" in r.getMessage()]
    assert line.startswith("round=1 node=a outcome=failed error: boom\\x1b")
    assert_shown(line)
    assert_shown(str(error))
    assert [o.error for o in outcomes] == [ERROR]  # what the history stores: as received


def test_an_evaluation_logs_and_fails_with_the_node_error_escaped_and_cut(tmp_path, caplog) -> None:
    def start(server, on_outcome):
        task = EvaluateTask("e", 1, PLAN, {"num_updates": 1}, PARAMS)
        return evaluate_model(server, task, ["a"], min_nodes=1, inactivity_timeout=30, on_outcome=on_outcome)

    with caplog.at_level(logging.INFO, logger="fedserver.evaluation"):
        outcomes, error = asyncio.run(failed_by_the_node(tmp_path, start))
    (line,) = [r.getMessage() for r in caplog.records if "outcome=failed" in r.getMessage()]
    assert line.startswith("evaluation of round 1: node=a outcome=failed error: boom\\x1b")
    assert_shown(line)
    assert_shown(str(error))
    assert [o.error for o in outcomes] == [ERROR]


def test_a_round_line_escapes_the_metric_names_nodes_chose() -> None:
    result = TrainResult(params={}, num_samples=3, num_steps=1, lr=None, metrics={"loss\x1b[2J": 0.5})
    report = RoundReport(1, ["a"], [NodeOutcome("a", "t", "succeeded", result=result)], {},
                         {"train_loss\x1b[2J\n" + "z" * 200: 0.5}, 1.0)
    line = format_round(report, 3)
    assert "train_loss\\x1b[2J\\nzzz" in line and "\x1b" not in line and "\n" not in line
    assert "... [151 more characters cut]" in line
