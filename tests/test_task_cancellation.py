"""fednode stops working on a task the server has closed ("task cancellation").

The pump of a running task cancels its reporter when a Heartbeat answers ``task_state`` CLOSED or UNKNOWN or
a Report is refused for the task; the handler sees ``reporter.cancelled`` (and ``stop_requested``), and
whatever it returns is not uploaded: the node polls again and takes its next task. A result waiting for upload
room (UPLOADS_BUSY) is dropped as soon as a heartbeat of the wait answers CLOSED or UNKNOWN.

Against the real FedServer over gRPC on loopback (the task closed with ``TaskHandle.cancel``), and the fake
NodeService where the server must answer what fedserver cannot be made to (UNKNOWN for an open task, the held
tasks reported by the next poll). Training stopped at its next batch, in a real ``fednode start`` process:
tests/test_e2e_task_cancellation.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import FakeNodeService, FakeTask, arun, node_config, running, start_server
from server_testkit import async_test, running_server
from test_busy_upload_window import _parked_upload
from test_busy_wait_heartbeats import BusyHeartbeatService, CeilingRandom
from test_node_client_fedserver import server_config
from test_node_upload_refusals import _payload

from fedcore.errors import ConnectionLostError, ServerRefusedError
from fedcore.wire import HeartbeatAnswer, HeartbeatTaskState, ReportEvent, TaskKind
from fednode.client import ClientState, NodeClient
from fednode.config import BackoffPolicy
from fednode.handler import EchoHandler, TaskReply
from fednode.reporter import Reporter, ReportPump
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

SUCCEEDED = common_pb2.TASK_OUTCOME_SUCCEEDED
FP = grpc.StatusCode.FAILED_PRECONDITION


# -- Reporter and ReportPump ------------------------------------------------------------------------------------
def test_reporter_cancel_is_thread_safe_keeps_the_first_reason_and_requests_a_stop() -> None:
    reporter = Reporter("t1")
    reporter.request_stop()  # the node stopping is no cancellation: the reply is still sent
    assert reporter.stop_requested and not reporter.cancelled and reporter.cancel_reason == ""
    reporter = Reporter("t1")
    start = threading.Barrier(8)

    def cancel(i: int) -> None:
        start.wait()
        reporter.cancel(f"reason {i}")

    threads = [threading.Thread(target=cancel, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert reporter.cancelled and reporter.stop_requested
    first = reporter.cancel_reason
    assert first in {f"reason {i}" for i in range(8)}
    reporter.cancel("later")
    assert reporter.cancel_reason == first


async def _pump_with(answers: list[HeartbeatAnswer | None] | None = None,
                     report_error: Exception | None = None) -> tuple[Reporter, list[str]]:
    """A pump of task t1 (reports every 20 ms, heartbeat after 50 ms of quiet) whose heartbeats answer
    ``answers`` in turn (then UNSPECIFIED) and whose Reports raise ``report_error``; one log line first,
    then quiet for 0.4 s. Returns the reporter and what was sent ("report" / "heartbeat", in order)."""
    answers = list(answers or [])
    sent: list[str] = []
    reporter = Reporter("t1")

    async def send_report(task_id: str, events: list[ReportEvent]) -> None:
        sent.append("report")
        if report_error is not None:
            raise report_error

    async def send_heartbeat(task_id: str) -> HeartbeatAnswer | None:
        sent.append("heartbeat")
        return answers.pop(0) if answers else HeartbeatAnswer()

    pump = ReportPump(reporter, send_report=send_report, send_heartbeat=send_heartbeat, interval=0.02,
                      heartbeat_interval=0.05)
    task = asyncio.create_task(pump.run())
    reporter.log("INFO", "training")
    await asyncio.sleep(0.4)
    reporter.log("INFO", "after the close")  # not sent once cancelled
    pump.finish()
    await asyncio.wait_for(task, 2)
    return reporter, sent


@pytest.mark.parametrize("state", [HeartbeatTaskState.CLOSED, HeartbeatTaskState.UNKNOWN])
def test_a_heartbeat_answering_closed_or_unknown_cancels_and_nothing_more_is_sent(state) -> None:
    reporter, sent = arun(_pump_with([HeartbeatAnswer(), HeartbeatAnswer(False, HeartbeatTaskState.ACTIVE),
                                         HeartbeatAnswer(False, state)]))
    assert reporter.cancelled and reporter.cancel_reason == f"a heartbeat answered task_state {state.name}"
    assert sent == ["report", "heartbeat", "heartbeat", "heartbeat"]  # nothing after the third answer


@pytest.mark.parametrize("answer", [None, HeartbeatAnswer(), HeartbeatAnswer(True, HeartbeatTaskState.ACTIVE)])
def test_other_heartbeat_answers_leave_the_task_running(answer) -> None:
    reporter, sent = arun(_pump_with([answer] * 20))
    assert not reporter.cancelled and not reporter.stop_requested
    assert sent.count("heartbeat") >= 3 and sent[-1] == "report"  # the final flush went out


@pytest.mark.parametrize(("error", "cancelled"), [
    (ServerRefusedError("Report refused", FP, "task t1 is no longer accepted (timed out)",
                        "ERROR_REASON_TASK_CLOSED"), True),
    (ServerRefusedError("Report refused", grpc.StatusCode.PERMISSION_DENIED, "not sent to node n1",
                        "ERROR_REASON_TASK_NOT_SENT_TO_NODE"), True),
    (ServerRefusedError("Report refused", FP, "task t1 is no longer accepted"), True),  # older server: the code
    (ServerRefusedError("Report refused", FP, "a newer process", "ERROR_REASON_NODE_SUPERSEDED"), True),
    (ServerRefusedError("Report refused", grpc.StatusCode.INVALID_ARGUMENT, "bad", "ERROR_REASON_MALFORMED_MESSAGE"),
     False),
    (ConnectionLostError("Report failed with UNAVAILABLE", grpc.StatusCode.UNAVAILABLE), False),
])
def test_a_report_refused_for_its_task_or_the_node_cancels(error: Exception, cancelled: bool) -> None:
    """Refused for the task (closed, not ours) or for the node (replaced by a newer process of it): whatever the
    handler computes would be refused, so it is asked to stop; a malformed report or a lost connection is not."""
    reporter, _ = arun(_pump_with(report_error=error))
    assert reporter.cancelled is cancelled
    if cancelled:
        superseded = error.reason == "ERROR_REASON_NODE_SUPERSEDED"
        refused = "Report refused, the node cannot go on" if superseded else "Report refused for the task"
        assert reporter.cancel_reason == f"{refused}: {error.details}"


# -- a running handler, against the real FedServer --------------------------------------------------------------
class PatientHandler:
    """Task 1 works in 20 ms slices until ``reporter.cancelled`` (``heed``) or for ``seconds``, logging a line
    per slice when ``chatty``; then answers SUCCEEDED. Later tasks are echoed at once."""

    def __init__(self, *, heed: bool = True, seconds: float = 20.0, chatty: bool = False) -> None:
        self.heed, self.seconds, self.chatty = heed, seconds, chatty
        self.started = threading.Event()
        self.saw_cancel_at: float | None = None
        self.saw_stop_requested = False
        self.cancel_reason = ""
        self.returned_at: float | None = None
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        if len(self.tasks) > 1:
            return EchoHandler().handle(task, reporter)
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if reporter.cancelled and self.saw_cancel_at is None:
                self.saw_cancel_at = time.monotonic()
                self.saw_stop_requested = reporter.stop_requested
                self.cancel_reason = reporter.cancel_reason
                if self.heed:
                    break
            if self.chatty:
                reporter.log("INFO", "still working")
            time.sleep(0.02)
        self.returned_at = time.monotonic()
        return TaskReply.succeeded({"params": {"w": 1}})


async def _serve(tmp_path: Path, handler, **config) -> tuple[FedServer, NodeClient]:
    store = NodeStore(tmp_path / "nodes.db")
    server = FedServer(server_config(**config), store)
    port = await server.start()
    client = NodeClient(node_config(port, token=store.enroll("site-a")), handler)
    return server, client


async def _close_first_task(server: FedServer, client: NodeClient, handler: PatientHandler):
    """Run ``client`` until its handler took task 1; close that task (cancelled by the test) once the handler
    has worked 0.3 s, queue task 2, and return (task 1, task 2's outcome, the closing time)."""
    async with running(client):
        await server.wait_for_nodes(1, timeout=10)
        first = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"round": 1}), experiment_id="e",
                                round=1, inactivity_timeout=60)
        assert await asyncio.to_thread(handler.started.wait, 10)
        await asyncio.sleep(0.3)
        closed_at = time.monotonic()
        first.cancel("round cancelled by the test")
        second = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"params": {"w": 2}}),
                                 experiment_id="e", round=2, inactivity_timeout=60)
        outcome = await second.result(timeout=30)
    return first, outcome, closed_at


def test_a_task_closed_while_its_handler_runs_is_abandoned_and_the_next_task_runs(tmp_path: Path, caplog) -> None:
    """Heartbeat interval 0.5 s: the handler sees ``cancelled`` (and ``stop_requested``) within about one interval
    of the close; nothing is uploaded for task 1 (no late upload on the server); task 2 runs on the same
    connection."""
    caplog.set_level(logging.INFO, logger="fednode")
    handler = PatientHandler()

    async def scenario():
        server, client = await _serve(tmp_path, handler)
        try:
            return (*await _close_first_task(server, client, handler), server.board, client)
        finally:
            await server.stop(grace=1)

    first, second, closed_at, board, client = arun(scenario())
    assert first.state is TaskState.CANCELLED and second.outcome is TaskState.SUCCEEDED, second.error_message
    assert handler.saw_cancel_at is not None and handler.saw_stop_requested
    assert handler.saw_cancel_at - closed_at < 0.5 + 1.0, handler.saw_cancel_at - closed_at  # interval + slack
    assert board.closed_record(first.task_id).late_uploads == 0  # no upload attempt at all
    assert client.results_delivered == 1 and client.sessions == 1
    assert (f"n1: task {first.task_id} is over on the server (a heartbeat answered task_state CLOSED): its result "
            "(SUCCEEDED, ") in caplog.text and "nothing uploaded" in caplog.text


def test_a_handler_that_ignores_the_close_finishes_but_its_result_is_not_uploaded(tmp_path: Path) -> None:
    """A handler may not look at ``cancelled``: it runs to its end (3 s), then its result is dropped unsent."""
    handler = PatientHandler(heed=False, seconds=3.0)

    async def scenario():
        server, client = await _serve(tmp_path, handler)
        try:
            return (*await _close_first_task(server, client, handler), server.board)
        finally:
            await server.stop(grace=1)

    first, second, _, board = arun(scenario())
    assert handler.saw_cancel_at is not None and handler.returned_at - handler.saw_cancel_at > 1.0
    assert second.outcome is TaskState.SUCCEEDED and board.closed_record(first.task_id).late_uploads == 0


def test_a_report_refused_for_its_task_cancels_it_without_any_heartbeat(tmp_path: Path) -> None:
    """The server announces a 30 s heartbeat interval, so no heartbeat goes out; the handler logs every 20 ms,
    and the first Report after the close (report interval 50 ms) is refused TASK_CLOSED: cancelled at once."""
    handler = PatientHandler(chatty=True)

    async def scenario():
        server, client = await _serve(tmp_path, handler, heartbeat_interval_seconds=30.0)
        try:
            return await _close_first_task(server, client, handler)
        finally:
            await server.stop(grace=1)

    first, second, closed_at = arun(scenario())
    assert second.outcome is TaskState.SUCCEEDED
    assert handler.saw_cancel_at is not None and handler.saw_cancel_at - closed_at < 1.0
    assert handler.cancel_reason == f"Report refused for the task: task {first.task_id} is no longer accepted (round cancelled by the test)"


def test_the_next_poll_does_not_report_the_dropped_task_as_held() -> None:
    """Fake service: heartbeats naming t1 answer UNKNOWN from the second on. The handler stops, no UploadResult is
    ever sent for t1, and the next poll reports no held task (reports_held_tasks, empty list)."""

    class ForgetfulService(FakeNodeService):
        async def Heartbeat(self, request, context):
            await super().Heartbeat(request, context)
            if not request.task_id:
                return pb.HeartbeatResponse()
            if sum(h.task_id == "t1" for h in self.heartbeats) < 2:
                return pb.HeartbeatResponse(task_state=pb.TASK_STATE_ACTIVE)
            self.assigned.pop("t1", None)  # gone on this server: not handed out again
            return pb.HeartbeatResponse(task_state=pb.TASK_STATE_UNKNOWN)

    handler = PatientHandler()

    async def scenario():
        service = ForgetfulService(heartbeat_interval=0.1)
        server, port = await start_server(service)
        client = NodeClient(node_config(port), handler)
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_for(lambda: len(service.polls) >= 3)
        finally:
            await server.stop(None)
        return service

    service = arun(scenario())
    assert handler.saw_cancel_at is not None and service.upload_headers == []
    later = service.polls[1:]
    assert all(p.reports_held_tasks and list(p.held_task_ids) == [] for p in later), later


# -- a result waiting for upload room ------------------------------------------------------------------------------
@async_test
async def test_a_result_waiting_for_upload_room_is_dropped_once_its_task_closes(tmp_path: Path, caplog) -> None:
    """A parked upload holds the server's one upload slot (its node's reconnect grace: 60 s); node n's result is
    refused UPLOADS_BUSY and waits 6 s (a fixed backoff) with a heartbeat every 0.5 s. Its task is cancelled
    mid-wait: the next heartbeat answers CLOSED, the result is dropped at once (well before the wait's end) and
    never uploaded again, and the node polls."""
    caplog.set_level(logging.INFO, logger="fednode")
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5, reconnect_grace_seconds=60.0) as kit:
        await _parked_upload(kit)
        config = node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0,
                             backoff=BackoffPolicy(initial=6.0, maximum=6.0), busy_upload_retry_seconds=60.0)
        client = NodeClient(config, EchoHandler(), rng=CeilingRandom(0))
        async with running(client):
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=60)
            await eventually(lambda: "server busy with other uploads" in caplog.text, 10, "a busy refusal")
            closed_at = time.monotonic()
            handle.cancel("round cancelled by the test")
            await eventually(lambda: f"result of task {handle.task_id} dropped" in caplog.text, 5, "the drop")
            dropped_after = time.monotonic() - closed_at
            await eventually(lambda: client.state is ClientState.POLLING, 5, "polling again")
            record = kit.server.board.closed_record(handle.task_id)
        assert dropped_after < 0.5 + 1.0, dropped_after  # one heartbeat interval + slack, not the 6 s wait
        assert record.late_uploads == 0 and client.results_delivered == 0
        assert "closed by the server (a heartbeat answered task_state CLOSED)" in caplog.text


def test_a_heartbeat_answering_unknown_during_a_busy_wait_drops_the_result() -> None:
    """Fake service: always busy; the second heartbeat naming t1 answers UNKNOWN. One upload attempt, two
    heartbeats, no FAILED report, and the node polls again well before the 5 s wait would end."""

    class UnknownAfterOne(BusyHeartbeatService):
        async def Heartbeat(self, request, context):
            answer = await super().Heartbeat(request, context)
            if request.task_id and len(self.heartbeat_times) >= 2:
                answer.task_state = pb.TASK_STATE_UNKNOWN
                self.assigned.pop("t1", None)  # gone on this server: not handed out again
            return answer

    async def scenario():
        service = UnknownAfterOne(10**6, heartbeat_interval=0.1)
        server, port = await start_server(service)
        client = NodeClient(node_config(port, backoff=BackoffPolicy(initial=5.0, maximum=5.0),
                                        busy_upload_retry_seconds=60.0), EchoHandler(), rng=CeilingRandom(0))
        try:
            async with running(client):
                service.add_task(FakeTask("t1", _payload()))
                await service.wait_for(lambda: len(service.polls) >= 2, timeout=4)
        finally:
            await server.stop(None)
        return service

    service = arun(scenario())
    assert [h.outcome for h in service.upload_headers] == [SUCCEEDED]
    assert len(service.heartbeat_times) == 2
