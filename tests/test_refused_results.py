"""A result the server refuses for itself (on its header: too large, misframed, malformed; or busy after the
node's retries) leaves its task open and RUNNING. Before, fednode dropped the result, its next poll did not
name the task, :meth:`TaskBoard.requeue_lost` took it for lost in a dead connection and sent it again, and a
refusal that repeats (too large) made the node train the same task forever while the round waited.

Now the server flags a task whose upload header came from the process it was delivered to
(``TaskHandle.result_offered``, :meth:`TaskBoard.result_offered`) and never sends it again, and fednode
reports such a task FAILED, naming the refusal, so the round counts it at once.

Unit level on :class:`TaskBoard`; over real grpc.aio on loopback with a raw-stub node (the server's side);
fednode against a real FedServer (the node's side, end to end).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from fake_node_service import node_config, running
from server_testkit import ServerKit, WireNode, async_test, encoded, running_server, version
from test_lost_delivery import LOST, X, Y, _deliver, _handle, _poll

from fedcore.framing import PayloadInfo
from fedcore.wire import TaskKind, TaskOutcome
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fedserver.task_board import TaskBoard
from fedserver.tasks import TaskHandle, TaskState
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

INSTANCE = (("fedstream-instance-id", X),)


# -- unit level --------------------------------------------------------------------------------------------
@async_test
async def test_a_task_whose_upload_header_came_from_its_process_is_never_queued_again() -> None:
    board = TaskBoard(reconnect_grace=None)
    offered, other_process, anonymous, foreign, plain = (_handle(board, t) for t in ("o", "p", "a", "f", "l"))
    for task in (offered, other_process, anonymous, foreign, plain):
        await _deliver(board, task)
    board.result_offered("o", "n", X)  # from the process it was delivered to: flagged
    board.result_offered("p", "n", Y)  # from another process of the node: not that one's task
    board.result_offered("a", "n", "")  # from a call naming no process: proves nothing
    board.result_offered("f", "other-node", X)  # another node's call
    board.result_offered("unknown", "n", X)  # no such task: nothing happens (the upload's checks refuse it)
    assert [t.result_offered for t in (offered, other_process, anonymous, foreign, plain)] == [
        True, False, False, False, False]
    assert board.requeue_lost("n", X, frozenset()) == [other_process, anonymous, foreign, plain]
    assert offered.state is TaskState.RUNNING and offered.delivered_to == X
    assert not offered.requeue()  # the handle refuses too, whoever asks


@async_test
async def test_an_upload_header_of_a_task_not_delivered_yet_flags_nothing() -> None:
    board = TaskBoard(reconnect_grace=None)
    queued = _handle(board, "q")
    board.result_offered("q", "n", X)
    assert not queued.result_offered and queued.state is TaskState.QUEUED


# -- the server, over real gRPC ------------------------------------------------------------------------------
async def _delivered(kit: ServerKit) -> tuple[WireNode, TaskHandle]:
    """Process X of node ``n`` registers and polls (naming itself on every call); a task is delivered to it."""
    node = kit.node("n")
    node.metadata = (*node.metadata, *INSTANCE)
    await node.register(instance_id=X)
    handle = kit.server.dispatch("n", TaskKind.TRAIN, encoded({"round": 1}), experiment_id="e", round=1,
                                 inactivity_timeout=120)
    got = await _poll(node, 5, held=[])
    assert got.descriptor is not None and got.descriptor.task_id == handle.task_id
    assert handle.state is TaskState.RUNNING and handle.delivered_to == X
    return node, handle


def _header_only(node: WireNode, task_id: str, chunk_count: int) -> object:
    """An UploadResult of one header whose chunk_count disagrees with its sizes (refused before its task is
    even looked up)."""
    header = pb.UploadHeader(version=version(), task_id=task_id, outcome=common_pb2.TASK_OUTCOME_SUCCEEDED,
                             payload=common_pb2.PayloadHeader(total_size=10_000, sha256=bytes(32), chunk_size=4096,
                                                              chunk_count=chunk_count))

    async def requests():
        yield pb.UploadResultRequest(header=header)

    return node.stub.UploadResult(requests(), metadata=node.metadata, timeout=10)


#: UploadResults the server refuses on the header, and their reasons
REFUSALS: dict[str, tuple[Callable[[WireNode, str], object], str]] = {
    "too large": (lambda node, task: node.upload(task, info=PayloadInfo(1 << 20, bytes(32), 4096), chunks=[]),
                  "ERROR_REASON_PAYLOAD_TOO_LARGE"),
    "chunk count": (lambda node, task: _header_only(node, task, chunk_count=2), "ERROR_REASON_FRAMING"),
    "resume of nothing": (lambda node, task: node.upload(task, encoded({"r": bytes(20_000)}, 4096), start_offset=8192),
                          "ERROR_REASON_FRAMING"),
    "chunks after FAILED": (lambda node, task: node.upload(task, outcome=TaskOutcome.FAILED, error_message="x",
                                                           chunks=[(0, b"x")]), "ERROR_REASON_MALFORMED_MESSAGE"),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
@async_test
async def test_a_task_whose_result_was_refused_on_its_header_is_not_sent_again(
        refusal: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The node drops the refused result and polls holding nothing: no task comes (before the fix, the
    same task came again from offset 0); its FAILED report then ends the task with the node's message."""
    upload, reason = REFUSALS[refusal]
    async with running_server(tmp_path, max_payload_size=64 << 10, max_poll_wait_seconds=30.0) as kit:
        node, handle = await _delivered(kit)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(node, handle.task_id)
        assert dict(refused.value.trailing_metadata())["fedstream-error-reason"] == reason
        assert handle.state is TaskState.RUNNING and handle.result_offered
        with caplog.at_level(logging.WARNING, logger="fedserver.task_board"):
            assert (await _poll(node, 0.3, held=[])).no_task
        assert handle.state is TaskState.RUNNING and handle.bytes_sent == handle.payload.total_size
        assert LOST not in caplog.text
        message = f"the server refused the result ({reason}): {refused.value.details()}"
        await node.upload(handle.task_id, outcome=TaskOutcome.FAILED, error_message=message)
        result = await handle.result(timeout=5)
    assert result.outcome is TaskState.FAILED and result.error_message == message


# -- fednode against a real FedServer -----------------------------------------------------------------------
class Trainer:
    """Answers every task with 8 kB of params (one upload chunk); records the tasks it ran."""

    def __init__(self) -> None:
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        return TaskReply.succeeded({"params": {"w": np.ones(2000, dtype=np.float32)}})


def _train(kit: ServerKit, node_id: str = "n", round: int = 1) -> TaskHandle:
    return kit.server.dispatch(node_id, TaskKind.TRAIN, encoded({"round": round}), experiment_id="e", round=round,
                               inactivity_timeout=120)


TASK_SIZE = encoded({"round": 1}).total_size  # bytes of one copy of a task's payload


@async_test
async def test_fednode_reports_a_result_over_the_servers_limit_failed_and_does_not_train_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server enforces a smaller max_payload_size than it announced at Register (so fednode's own check
    of the announced limit lets the 8 kB result through): the header is refused PAYLOAD_TOO_LARGE, and the
    node reports the task FAILED with the server's message, which names the limit. Promptly, the task
    trained once and sent once; the node goes on with the next task. (grpc.aio sometimes hides the refusal
    behind a local INTERNAL, grpc/grpc#36066: the node then reconnects and learns it from the next attempt.)"""
    async with running_server(tmp_path, max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit:
        trainer = Trainer()
        client = NodeClient(node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0,
                                        busy_upload_retry_seconds=1.0), trainer)
        async with running(client):
            await kit.server.wait_for_nodes(1, timeout=10)
            announced = kit.server.uploads.max_payload_size
            kit.server.uploads.max_payload_size = 1024
            with caplog.at_level(logging.INFO):
                handle = _train(kit)
                started = time.monotonic()
                result = await handle.result(timeout=20)
                waited = time.monotonic() - started
                await asyncio.sleep(0.5)  # a poll or two after the report: nothing comes again
                kit.server.uploads.max_payload_size = announced
                after = await _train(kit, round=2).result(timeout=20)
    assert result.outcome is TaskState.FAILED and waited < 10, (result, waited)
    assert "(ERROR_REASON_PAYLOAD_TOO_LARGE)" in result.error_message
    assert "exceeds this server's limit of 1024 bytes" in result.error_message, result.error_message
    assert result.bytes_sent == TASK_SIZE and trainer.tasks.count(handle.task_id) == 1  # sent and trained once
    assert LOST not in caplog.text and "reporting the task FAILED" in caplog.text
    assert after.outcome is TaskState.SUCCEEDED and trainer.tasks[-1] == after.task_id


@async_test
async def test_fednode_reports_a_task_failed_when_the_server_stays_busy(tmp_path: Path) -> None:
    """One upload slot, held by another node's interrupted upload (parked, waiting for a resume: nothing
    running can free it, within the reconnect grace of 30 s): every attempt is refused UPLOADS_BUSY; past its
    busy window (1 s here) the node reports the task FAILED, naming the refusal, and does not train it again."""
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5) as kit:
        other = await kit.registered_node("other")
        parked = _train(kit, "other")
        assert (await other.poll(wait=2)).descriptor is not None
        with pytest.raises(grpc.aio.AioRpcError):
            await other.upload(parked.task_id, encoded({"r": bytes(20_000)}, chunk_size=4096), stop_after_chunks=1)
        assert len(kit.server.uploads) == 1
        trainer = Trainer()
        client = NodeClient(node_config(kit.server.port, token=kit.store.enroll("n"), poll_wait_seconds=2.0,
                                        busy_upload_retry_seconds=1.0), trainer)
        async with running(client):
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            handle = _train(kit)
            result = await handle.result(timeout=30)
            await eventually(lambda: client.results_delivered == 1, 5, "the FAILED report acknowledged")
            await asyncio.sleep(0.3)  # the node polls holding nothing: the task does not come again
    assert result.outcome is TaskState.FAILED, result
    assert re.search(r"after \d+ attempts over \d+\.\d s \(ERROR_REASON_UPLOADS_BUSY\)", result.error_message)
    assert "too many concurrent uploads (1, limit 1)" in result.error_message, result.error_message
    assert trainer.tasks == [handle.task_id] and result.bytes_sent == TASK_SIZE
