"""Session 8, bad inputs: a node's Report (training progress, log lines) that makes no sense.

A Report is refused whole with MALFORMED_MESSAGE naming the event and the field (iteration over
total_iterations, an infinite loss or timestamp, an unknown level), after the task lookup (a closed task is
what the node learns first), and still resets the task's inactivity timeout. Log text is escaped and cut,
never refused. fednode's Reporter never lets a plan's bad progress raise into the training, and never sends it.
Real grpc.aio on loopback for the wire; a real NodeClient end to end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time

import grpc
import numpy as np
import pytest
from fake_node_service import arun, node_config, running
from server_testkit import async_test, running_server, version

from fedcore.errors import MessageError
from fedcore.plans import TrainingProgress as PlanProgress
from fedcore.wire import LogLine, ReportEvent, TaskKind, TaskOutcome, TrainingProgress, convert
from fedcore.wire.messages import MAX_LOG_MESSAGE
from fedcore.wire.metadata_keys import REASON_METADATA_KEY
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fednode.reporter import Reporter
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import node_service_pb2 as pb

MALFORMED = "ERROR_REASON_MALFORMED_MESSAGE"


def reason_of(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")


def progress_pb(timestamp: float = 1.0, **fields: float) -> pb.ReportEvent:
    return pb.ReportEvent(timestamp=timestamp, progress=pb.TrainingProgress(**fields))


async def send_report(node, task_id: str, events: list[pb.ReportEvent]) -> pb.ReportResponse:
    request = pb.ReportRequest(version=version(), task_id=task_id, events=events)
    return await node.stub.Report(request, metadata=node.metadata, timeout=10)


# -- the domain messages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "names"), [
    ({"iteration": 11, "total_iterations": 10}, "TrainingProgress.iteration 11 exceeds total_iterations 10"),
    ({"iteration": -1}, "TrainingProgress.iteration must be an int >= 0"),
    ({"epoch": -2}, "TrainingProgress.epoch must be an int >= 0"),
    ({"epoch": 1 << 32}, "TrainingProgress.epoch must be at most 4294967295"),
    ({"num_samples": 1 << 64}, "TrainingProgress.num_samples must be at most"),
    ({"total_iterations": 2.5}, "TrainingProgress.total_iterations must be an int"),
    ({"iteration": True}, "TrainingProgress.iteration must be an int"),
    ({"loss": math.inf}, "TrainingProgress.loss must be finite, or NaN when not known, got inf"),
    ({"loss": -math.inf}, "TrainingProgress.loss must be finite"),
    ({"loss": "0.5"}, "TrainingProgress.loss must be a float, got str"),
])
def test_training_progress_refuses_nonsense_naming_the_field(fields, names):
    with pytest.raises(MessageError, match=names.replace(".", r"\.")):
        TrainingProgress(**fields)


def test_training_progress_accepts_what_counting_produces():
    assert math.isnan(TrainingProgress().loss)  # NaN: loss not known
    assert TrainingProgress(iteration=7, total_iterations=0).iteration == 7  # total not known
    assert TrainingProgress(iteration=10, total_iterations=10).iteration == 10
    # the plan's samples estimate (batch size x batches) can be below what the batches held until the last one
    assert TrainingProgress(num_samples=130, num_samples_max=128).num_samples == 130
    assert TrainingProgress(epoch=500, iteration=500, total_iterations=500).epoch == 500  # full batch: epoch = step
    assert TrainingProgress(epoch=0).epoch == 0  # a num_updates run has no epochs
    loss = TrainingProgress(loss=np.float32(0.25)).loss
    assert type(loss) is float and loss == 0.25


@pytest.mark.parametrize("stamp", [math.nan, math.inf, -math.inf, -1.0, "now"])
def test_report_event_refuses_a_timestamp_that_is_no_time(stamp):
    with pytest.raises(MessageError, match=r"ReportEvent\.timestamp must be finite Unix seconds >= 0"):
        ReportEvent(stamp, LogLine("INFO", "x"))


def test_log_line_escapes_control_characters_then_cuts():
    line = LogLine("ERROR", "Traceback:\n  File \"plan.py\"\tline 3\x1b[31mred\u2028end")
    assert line.message == 'Traceback:\\n  File "plan.py"\\tline 3\\x1b[31mred\\u2028end'
    assert line.message.isprintable()
    assert LogLine("ERROR", line.message) == line  # escaping twice changes nothing
    long = LogLine("INFO", "\n" * MAX_LOG_MESSAGE)  # escaped, it is twice as long: cut to the bound
    assert long.message == "\\n" * (MAX_LOG_MESSAGE // 2)
    assert LogLine("INFO", "é" * 5000).message == "é" * MAX_LOG_MESSAGE  # printable text is only cut


def test_report_events_from_pb_names_the_bad_event_and_refuses_too_many():
    request = pb.ReportRequest(version=version(), events=[progress_pb(iteration=1, total_iterations=2),
                                                          progress_pb(iteration=3, total_iterations=2)])
    with pytest.raises(MessageError, match=r"ReportRequest\.events\[1\]: TrainingProgress\.iteration 3 exceeds"):
        convert.report_events_from_pb(request)
    many = pb.ReportRequest(version=version(), events=[progress_pb()] * (convert.MAX_REPORT_EVENTS + 1))
    with pytest.raises(MessageError, match=rf"{convert.MAX_REPORT_EVENTS + 1} events: at most "
                                           rf"{convert.MAX_REPORT_EVENTS}"):
        convert.report_events_from_pb(many)


# -- the server ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "names"), [
    (progress_pb(iteration=12, total_iterations=10), r"events\[1\]: TrainingProgress\.iteration 12 exceeds total_it"),
    (progress_pb(loss=math.inf), r"events\[1\]: TrainingProgress\.loss must be finite"),
    (progress_pb(timestamp=math.nan), r"events\[1\]: ReportEvent\.timestamp must be finite"),
    (progress_pb(timestamp=-5.0), r"events\[1\]: ReportEvent\.timestamp must be finite Unix seconds >= 0"),
    (pb.ReportEvent(timestamp=1.0, log=pb.LogLine(level="TRACE", message="x")), r"events\[1\]: log level"),
    (pb.ReportEvent(timestamp=1.0), r"events\[1\]: report event carries neither progress nor log"),
])
@async_test
async def test_server_refuses_a_report_with_bad_progress_whole(tmp_path, bad, names):
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task("a")
        good = progress_pb(iteration=5, total_iterations=10, loss=0.5)
        await send_report(node, handle.task_id, [good])
        before = handle.last_activity
        await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send_report(node, handle.task_id, [progress_pb(iteration=6, total_iterations=10), bad])
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err.value) == MALFORMED
        assert re.search(names, err.value.details()), err.value.details()
        # taken whole or not at all: the good event before the bad one was not applied
        assert handle.latest_progress == TrainingProgress(0, 5, 10, 0, 0, 0.5)
        # the node is alive and working on the task: a refused Report still counts as its activity
        assert handle.last_activity > before
        assert not handle.done()


@async_test
async def test_a_refused_report_keeps_the_task_alive_past_its_inactivity_timeout(tmp_path):
    """A node whose every Report is refused (here: an unknown log level) but which keeps calling does not lose its
    task to the inactivity timeout (before: each refusal left the timer running, the task TIMED_OUT)."""
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, kit.server.encode_payload({"round": 1}),
                                     experiment_id="e", round=1, inactivity_timeout=1.5)
        await node.poll(wait=1)
        bad = pb.ReportEvent(timestamp=1.0, log=pb.LogLine(level="VERBOSE", message="step"))
        # a refused report every 0.1 s for twice the timeout; each resets the timer (last_activity moves): a
        # pause of the machine shorter than the 1.5 s timeout between two of them costs nothing (0.6 s left
        # little room on a loaded machine)
        until = time.monotonic() + 2 * 1.5
        while time.monotonic() < until:
            before = handle.last_activity
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await send_report(node, handle.task_id, [bad])
            assert reason_of(err.value) == MALFORMED
            assert handle.last_activity > before, "a refused report must reset the inactivity timeout"
            await asyncio.sleep(0.1)
        assert not handle.done(), handle.close_reason
        await node.upload(handle.task_id, outcome=TaskOutcome.FAILED, error_message="done")
        assert (await handle.result(timeout=5)).outcome is TaskState.FAILED


@async_test
async def test_a_malformed_report_on_a_closed_task_says_the_task_is_closed(tmp_path):
    """The task lookup comes first: a node reporting nonsense on a task the server closed learns that the task
    is closed (drop it), not that its message is malformed (fix the node), which would leave it training."""
    async with running_server(tmp_path) as kit:
        node, handle = await kit.running_task("a")
        handle.cancel("round finished")
        bad = pb.ReportEvent(timestamp=1.0, log=pb.LogLine(level="TRACE", message="x"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send_report(node, handle.task_id, [bad])
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(err.value) == "ERROR_REASON_TASK_CLOSED"


@async_test
async def test_node_log_lines_cannot_forge_server_log_lines(tmp_path, caplog):
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        forged = "ok\n2026-01-01 INFO fedserver.service node b registered\x1b[2K"
        with caplog.at_level(logging.INFO, logger="fedserver.service"):
            await send_report(node, "", [pb.ReportEvent(timestamp=1.0, log=pb.LogLine(level="INFO", message=forged))])
        lines = [r.getMessage() for r in caplog.records if r.name == "fedserver.service" and "[INFO]" in r.getMessage()]
        assert lines == ["node a [INFO] ok\\n2026-01-01 INFO fedserver.service node b registered\\x1b[2K"]


# -- fednode ---------------------------------------------------------------------------------------------------

def test_reporter_never_raises_on_bad_progress_and_never_queues_it(caplog):
    reporter = Reporter("t1")
    with caplog.at_level(logging.DEBUG, logger="fednode.reporter"):
        reporter.progress(PlanProgress(epoch=1, iteration=3, total_iterations=10, num_samples=30,
                                       num_samples_max=100, loss=0.5))
        reporter.progress(PlanProgress(epoch=1, iteration=11, total_iterations=10, num_samples=0,
                                       num_samples_max=0, loss=0.5))
        reporter.progress(PlanProgress(epoch=-1, iteration=1, total_iterations=10, num_samples=0,
                                       num_samples_max=0, loss=0.5))
        reporter.progress(PlanProgress(epoch=None, iteration=1, total_iterations=10, num_samples=0,
                                       num_samples_max=0, loss=math.inf))
        reporter.progress(object())  # not progress at all
        reporter.progress(PlanProgress(epoch=None, iteration=4, total_iterations=10, num_samples=40,
                                       num_samples_max=100, loss=None))
    events = [e.event for e in reporter.drain()]
    assert [(p.epoch, p.iteration) for p in events] == [(1, 3), (0, 4)]
    assert math.isnan(events[1].loss)
    assert reporter.refused == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "task t1: progress not reported" in warnings[0]
    assert "TrainingProgress.iteration 11 exceeds total_iterations 10" in warnings[0]


class MiscountingTrainer:
    """Reports progress a buggy plan might: some of it nonsense; and a multi-line log line."""

    def handle(self, task, reporter):
        reporter.progress(PlanProgress(epoch=1, iteration=2, total_iterations=4, num_samples=0,
                                       num_samples_max=0, loss=0.5))
        reporter.progress(PlanProgress(epoch=1, iteration=9, total_iterations=4, num_samples=0,
                                       num_samples_max=0, loss=0.5))
        reporter.progress(PlanProgress(epoch=1, iteration=-3, total_iterations=4, num_samples=0,
                                       num_samples_max=0, loss=0.5))
        reporter.progress(PlanProgress(epoch=1, iteration=3, total_iterations=4, num_samples=0,
                                       num_samples_max=0, loss=float("inf")))
        reporter.log("WARNING", "line one\nline two")
        return TaskReply.succeeded({"params": {"w": task.payload["w"] + 1}})


def test_a_plan_reporting_nonsense_still_delivers_its_result(tmp_path):
    """Before: a negative count was taken by the Reporter and broke the pump's Report conversion (ValueError:
    no more Reports nor heartbeats for the task), and iteration > total reached the server as the latest
    progress. Now the bad progress stays on the node, the good progress and the (escaped) log line arrive, and
    the result is delivered."""
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=2.0,
                                        heartbeat_interval_seconds=0.5), store)
        port = await server.start()
        client = NodeClient(node_config(port, token=token), MiscountingTrainer())
        try:
            async with running(client):
                assert await server.wait_for_nodes(1, timeout=10) == ["site-a"]
                handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"w": np.zeros(3)}),
                                         experiment_id="e", round=1, inactivity_timeout=30)
                result = await handle.result(timeout=20)
        finally:
            await server.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED, result.error_message
        np.testing.assert_array_equal(result.payload["params"]["w"], np.ones(3))
        assert handle.latest_progress == TrainingProgress(1, 2, 4, 0, 0, 0.5)
        assert [line.message for _, line in handle.logs] == ["line one\\nline two"]

    arun(scenario())
