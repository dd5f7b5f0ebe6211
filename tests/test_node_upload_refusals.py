"""How fednode answers a refused upload: by the server's error reason (``fedstream-error-reason``), by the
status code when there is none, never by the status message.

* :func:`fednode.transport.translate` keeps the trailer's reason (a name the node does not know counts as
  none) and decides from it what is retryable; fatal_refusal / task_refusal / superseded read it.

* NODE_SUPERSEDED ends ``run()``; TASK_CLOSED, UNKNOWN_TASK, TASK_NOT_SENT_TO_NODE and BAD_RESULT_DOCUMENT
  (refusals that end the task) drop the result and the node goes on; PAYLOAD_TOO_LARGE, MALFORMED_MESSAGE,
  FRAMING (refusals of the result itself, which leave the task open) drop it too and report the task FAILED
  in its place, naming the refusal, as does UPLOADS_BUSY once the retries are spent; UPLOAD_INCOMPLETE
  reconnects and resumes, and UPLOADS_BUSY retries in place, although their codes (INVALID_ARGUMENT,
  RESOURCE_EXHAUSTED) are those of refusals that drop the result. The fake NodeService scripts these statuses
  (it reads each upload to its end before refusing it, so grpc.aio reports its status).
* Against the real FedServer, which refuses an upload on its header while the node is still writing chunks,
  grpc.aio reports a local INTERNAL without reason instead of the server's status (grpc/grpc#36066): the node
  asks GetUploadStatus on the same connection and learns the refusal there: a closed task is dropped and a
  superseded node stops, without reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from fake_node_service import (
    FakeNodeService,
    arun,
    node_config,
    run_until_refused,
    run_until_t1_done,
    running,
)
from server_testkit import WireNode, channel_options
from test_node_client_fedserver import server_config

from fedcore.errors import ConnectionLostError, ServerRefusedError
from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind
from fednode.client import NodeClient
from fednode.handler import EchoHandler, TaskReply
from fednode.transport import (
    BUSY_REASON,
    FATAL_REASONS,
    KNOWN_REASONS,
    RETRYABLE_REASONS,
    TASK_REASONS,
    fatal_refusal,
    superseded,
    task_refusal,
    translate,
)
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2

CHUNK = 64 * 1024
FP, INVALID, EXHAUSTED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.mark.parametrize(("code", "reason", "kind", "fatal", "task"), [
    (FP, "ERROR_REASON_NODE_SUPERSEDED", ServerRefusedError, True, False),
    (FP, "ERROR_REASON_VERSION_MISMATCH", ServerRefusedError, True, False),
    (FP, "ERROR_REASON_TASK_CLOSED", ServerRefusedError, False, True),
    (FP, "", ServerRefusedError, False, True),  # an older server: the code (a task, unless the call names none)
    (FP, "ERROR_REASON_FROM_THE_FUTURE", ServerRefusedError, False, True),  # unknown: as no reason
    (grpc.StatusCode.UNAUTHENTICATED, "", ServerRefusedError, True, False),
    (INVALID, "ERROR_REASON_UPLOAD_INCOMPLETE", ConnectionLostError, None, None),  # retryable by its reason
    (INVALID, "ERROR_REASON_FRAMING", ServerRefusedError, False, False),
    (EXHAUSTED, "ERROR_REASON_UPLOADS_BUSY", ServerRefusedError, False, False),  # retried in place by _deliver
    (grpc.StatusCode.INTERNAL, "", ConnectionLostError, None, None),
    # reserved (not sent by this server version): "register again", i.e. reconnect, whose session registers
    (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_UNKNOWN_NODE", ConnectionLostError, None, None),
    (grpc.StatusCode.NOT_FOUND, "", ServerRefusedError, False, True),  # without a reason: NOT_FOUND is a task's
])
def test_translate_reads_the_reason_trailer(code, reason, kind, fatal, task) -> None:
    trailer = grpc.aio.Metadata(("fedstream-error-reason", reason)) if reason else grpc.aio.Metadata()
    error = translate(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailer, details="words"), "Call")
    assert type(error) is kind and error.code is code
    assert error.reason == (reason if reason in KNOWN_REASONS else "")
    if kind is ServerRefusedError:
        assert (fatal_refusal(error), task_refusal(error)) == (fatal, task)
        assert superseded(error) is (reason == "ERROR_REASON_NODE_SUPERSEDED")


def test_the_node_names_only_reasons_of_the_protos() -> None:
    assert FATAL_REASONS | TASK_REASONS | RETRYABLE_REASONS | {BUSY_REASON} <= KNOWN_REASONS


class CountingHandler(EchoHandler):
    """EchoHandler that counts the tasks it ran."""

    def __init__(self) -> None:
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        return super().handle(task, reporter)


def _payload() -> OutgoingPayload:
    return OutgoingPayload.from_object({"w": np.arange(100_000, dtype=np.float32)}, CHUNK)  # ~400 kB, 7 chunks


def _uploaded(service: FakeNodeService) -> tuple[FakeNodeService, NodeClient, CountingHandler]:
    """A node runs task t1 against ``service`` until t1's result is kept (the fake sends t1 again to a node
    that dropped its result)."""
    handler = CountingHandler()
    client = arun(run_until_t1_done(service, _payload(), handler, upload_chunk_size=CHUNK))
    return service, client, handler


def _refused_upload(status: tuple) -> tuple[FakeNodeService, NodeClient, CountingHandler]:
    """:func:`_uploaded`, the first upload of t1 refused with ``status``."""
    service = FakeNodeService()
    service.refuse_upload = status
    return _uploaded(service)


@pytest.mark.parametrize("status", [
    (FP, "task t1 is no longer accepted (round cancelled)", "ERROR_REASON_TASK_CLOSED"),
    (grpc.StatusCode.NOT_FOUND, "no task with id 't1'", "ERROR_REASON_UNKNOWN_TASK"),
    (grpc.StatusCode.PERMISSION_DENIED, "task t1 was not sent to node n1", "ERROR_REASON_TASK_NOT_SENT_TO_NODE"),
    (INVALID, "result of task t1 could not be decoded", "ERROR_REASON_BAD_RESULT_DOCUMENT"),  # the server failed it
    (FP, "task t1 is no longer accepted (round cancelled)"),  # no reason: by the code
])
def test_a_result_refused_with_its_task_is_dropped_and_the_node_goes_on(status, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fednode.client")
    service, client, handler = _refused_upload(status)
    assert f"n1: result of task t1 dropped: UploadResult refused by the server with {status[0].name}" in caplog.text
    assert "reporting the task FAILED" not in caplog.text
    assert handler.tasks == ["t1", "t1"]  # dropped, so computed again when the fake sent t1 again
    assert [h.outcome for h in service.upload_headers] == [common_pb2.TASK_OUTCOME_SUCCEEDED] * 2
    assert [h.payload.start_offset for h in service.upload_headers] == [0, 0] and service.status_requests == []
    assert len(service.registrations) == 1 and client.sessions == 1


@pytest.mark.parametrize("status", [
    (EXHAUSTED, "announced payload of 400000 bytes exceeds this server's limit of 1000 bytes",
     "ERROR_REASON_PAYLOAD_TOO_LARGE"),
    (INVALID, "only Chunk messages may follow the UploadHeader", "ERROR_REASON_MALFORMED_MESSAGE"),
    (INVALID, "chunk at offset 0 has 5 bytes: ...", "ERROR_REASON_FRAMING"),
    (INVALID, "chunk at offset 0 has 5 bytes: ..."),  # no reason: by the code (a closed task would refuse the report)
])
def test_a_result_refused_for_itself_is_reported_failed_and_never_computed_again(status, caplog) -> None:
    """The task stays open on the server, which will not send it again: the node reports it FAILED, naming the
    refusal (its reason, else its code, and the server's message), once."""
    caplog.set_level(logging.INFO, logger="fednode.client")
    service, client, handler = _refused_upload(status)
    assert f"n1: result of task t1 dropped: UploadResult refused by the server with {status[0].name}" in caplog.text
    assert handler.tasks == ["t1"]
    first, report = service.upload_headers
    assert first.outcome == common_pb2.TASK_OUTCOME_SUCCEEDED
    size = first.payload.total_size
    assert report.task_id == "t1" and report.outcome == common_pb2.TASK_OUTCOME_FAILED
    refusal = status[2] if len(status) == 3 else status[0].name
    assert report.error_message == f"the server refused the result of {size} bytes ({refusal}): {status[1]}"
    assert report.payload.total_size == 0 and service.results["t1"].complete and not service.results["t1"].data
    assert len(service.registrations) == 1 and client.sessions == 1 and client.results_delivered == 1


class BusyService(FakeNodeService):
    """Refuses the first ``busy`` uploads of a SUCCEEDED result with UPLOADS_BUSY, each read to its end first
    (see the module doc); FAILED and REFUSED reports go through."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy

    async def UploadResult(self, request_iterator, context):
        first = await request_iterator.__anext__()
        if self.busy > 0 and first.header.outcome == common_pb2.TASK_OUTCOME_SUCCEEDED:
            self.busy -= 1
            self.refuse_upload = (EXHAUSTED, "too many concurrent uploads (16, limit 16)", "ERROR_REASON_UPLOADS_BUSY")

        async def replayed():
            yield first
            async for message in request_iterator:
                yield message

        return await super().UploadResult(replayed(), context)


def test_a_server_still_busy_past_the_window_gets_the_task_reported_failed() -> None:
    """Busy is retried in place while the refusals last less than busy_upload_retry_seconds; then the task is
    reported FAILED, naming the attempts, the time spent and the refusal."""
    service = BusyService(10**6)
    client = arun(run_until_t1_done(service, _payload(), upload_chunk_size=CHUNK, busy_upload_retry_seconds=0.4))
    *attempts, report = service.upload_headers
    assert len(attempts) >= 2 and {a.outcome for a in attempts} == {common_pb2.TASK_OUTCOME_SUCCEEDED}
    assert report.outcome == common_pb2.TASK_OUTCOME_FAILED
    words = re.fullmatch(rf"the server refused the result of {attempts[0].payload.total_size} bytes after (\d+) "
                         r"attempts over (\d+\.\d) s \(ERROR_REASON_UPLOADS_BUSY\): too many concurrent uploads "
                         r"\(16, limit 16\)", report.error_message)
    assert words is not None, report.error_message
    assert int(words[1]) == len(attempts) and 0.4 <= float(words[2]) < 3.0, report.error_message
    assert len(service.registrations) == 1 and client.sessions == 1


def test_an_incomplete_upload_resumes_by_its_reason_although_its_code_is_invalid_argument(caplog) -> None:
    caplog.set_level(logging.INFO, logger="fednode.client")
    service, client, handler = _refused_upload(
        (INVALID, "upload of task t1 ended after 0 of 400000 bytes; resume at offset 0", "ERROR_REASON_UPLOAD_INCOMPLETE"))
    assert handler.tasks == ["t1"]  # kept and sent again
    assert [r.task_id for r in service.status_requests] == ["t1"]
    assert len(service.registrations) == 2 and client.sessions == 2  # a retryable failure: a new session
    assert "UploadResult failed with INVALID_ARGUMENT" in caplog.text and "reconnecting" in caplog.text


def test_busy_is_retried_in_place_by_its_reason_whatever_the_sizes() -> None:
    service, client, handler = _refused_upload((EXHAUSTED, "too many concurrent uploads (16, limit 16)",
                                                "ERROR_REASON_UPLOADS_BUSY"))
    assert handler.tasks == ["t1"] and len(service.upload_headers) == 2
    assert len(service.registrations) == 1 and client.results_delivered == 1


def test_a_superseded_upload_ends_run() -> None:
    async def scenario():
        service = FakeNodeService()
        service.refuse_upload = (FP, "call of node n1 superseded by a newer instance of the node: ...",
                                 "ERROR_REASON_NODE_SUPERSEDED")
        return service, await run_until_refused(service, _payload())

    service, error = arun(scenario())
    assert superseded(error) and error.reason == "ERROR_REASON_NODE_SUPERSEDED"
    assert len(service.registrations) == 1 and len(service.polls) == 1


# -- the real FedServer: a refusal hidden by grpc.aio --------------------------------------------------------
class GatedTrainer:
    """The first task waits for :attr:`release`, then answers 16 MB (256 upload chunks of 64 KiB: the node is
    still writing when the server refuses the header); later tasks answer at once."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        if len(self.tasks) == 1:
            self.started.set()
            assert self.release.wait(30), "never released"
        return TaskReply.succeeded({"params": {"w": np.ones(4 << 20, dtype=np.float32)}})


async def _served_node(tmp_path: Path) -> tuple[FedServer, str, GatedTrainer, NodeClient]:
    """A started FedServer with node site-a enrolled (its token), and a NodeClient of site-a (not running)
    whose handler is a :class:`GatedTrainer`. The server announces a 30 s heartbeat interval: no heartbeat
    goes out while the trainer is held, so the node learns that its task closed from its upload (the path
    under test), never from a heartbeat answering CLOSED (tests/test_task_cancellation.py)."""
    store = NodeStore(tmp_path / "nodes.db")
    token = store.enroll("site-a")
    server = FedServer(server_config(heartbeat_interval_seconds=30.0), store)
    port = await server.start()
    trainer = GatedTrainer()
    return server, token, trainer, NodeClient(node_config(port, token=token, upload_chunk_size=CHUNK), trainer)


async def _first_task_held(server: FedServer, trainer: GatedTrainer):
    await server.wait_for_nodes(1, timeout=10)
    handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"round": 1}), experiment_id="e",
                             round=1, inactivity_timeout=60)
    assert await asyncio.to_thread(trainer.started.wait, 10)
    return handle


def test_a_task_closed_while_the_node_trains_is_dropped_without_reconnecting(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        server, _, trainer, client = await _served_node(tmp_path)
        try:
            async with running(client):
                first = await _first_task_held(server, trainer)
                first.cancel("round cancelled by the test")
                trainer.release.set()
                second = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"round": 2}),
                                         experiment_id="e", round=2, inactivity_timeout=60)
                result = await second.result(timeout=30)
        finally:
            trainer.release.set()
            await server.stop(grace=1)
        return first, result, client

    first, result, client = arun(scenario(), timeout=90)
    assert first.state is TaskState.CANCELLED and result.outcome is TaskState.SUCCEEDED, result.error_message
    assert f"n1: result of task {first.task_id} dropped" in caplog.text
    assert client.sessions == 1 and "reconnecting" not in caplog.text  # learned on the same connection


def test_a_node_superseded_while_it_trains_stops_without_reconnecting(tmp_path: Path) -> None:
    async def scenario():
        server, token, trainer, client = await _served_node(tmp_path)
        run = asyncio.create_task(client.run())
        try:
            first = await _first_task_held(server, trainer)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options())
            await WireNode(channel, token).register(instance_id="b" * 32)  # a new process of the node
            await channel.close()
            trainer.release.set()
            with pytest.raises(ServerRefusedError) as err:
                await asyncio.wait_for(asyncio.shield(run), 30)
            failed = await first.result(timeout=5)
        finally:
            trainer.release.set()
            client.stop()
            await asyncio.gather(run, return_exceptions=True)
            await server.stop(grace=1)
        return failed, err.value

    failed, error = arun(scenario(), timeout=90)
    assert failed.outcome is TaskState.FAILED and "restarted" in failed.error_message
    assert superseded(error) and error.reason == "ERROR_REASON_NODE_SUPERSEDED"
    # refused on the connection it uploaded on, not at the Register of a reconnect
    assert str(error).startswith(("UploadResult refused", "GetUploadStatus refused")), error
