"""A wait in the upload line that runs out while the line moves is refused ERROR_REASON_UPLOAD_QUEUED, not busy.

In a long line that moves (a hundred nodes replying 1 GB each to 16 upload slots: minutes to clear) every node
at the back waited the line's longest (``upload_line_wait_seconds``) and was refused UPLOADS_BUSY; its retries
counted toward its busy window (``busy_upload_retry_seconds``), and after it the node gave up a good result
although the line was progressing. Now the wait ends UPLOAD_QUEUED when the line moved during it (a running
upload received bytes, one ended for good, a buffer was freed: :meth:`UploadSessions.progress`); the node
uploads again at once, keeping its place, outside its busy window, for at most its
``queued_upload_retry_seconds``. A line that does not move still ends busy.

Over real grpc.aio on loopback with one upload slot, a line wait of 0.5 s and a busy window of 1 s; the slot is
held for about 3 s by an upload that trickles its chunks (moving) or sends none (not moving).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import node_config, running
from server_testkit import ServerKit, WireNode, async_test, encoded, running_server
from test_error_reasons import reason_of
from test_upload_line_turns import _running_task

from fedcore.errors import NodeConfigError, ServerConfigError, UploadQueuedError, UploadsBusyError
from fedcore.framing import PayloadInfo
from fedcore.wire import ResultDescriptor, TaskKind, TaskOutcome, convert
from fednode.client import NodeClient
from fednode.config import BackoffPolicy, NodeConfig
from fednode.handler import EchoHandler
from fedserver.cli import build_parser
from fedserver.cli_serve import config_from_args
from fedserver.config import NODE_IDLE_STREAM_TIMEOUT_SECONDS, ServerConfig
from fedserver.tasks import TaskHandle, TaskState
from fedserver.upload_service import RESULT_REFUSALS
from fedserver.uploads import LINE_WAIT_SECONDS, PLACE_KEPT_SECONDS, UploadSessions
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

CHUNK = 4096
HOLD_CHUNKS = 16  # the slot holder's chunks, one every TRICKLE seconds: the slot is held ~3 s
TRICKLE = 0.2


# -- the objects -----------------------------------------------------------------------------------------------
def _info(size: int) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(bytes(size)).digest(), CHUNK)


@async_test
async def test_a_wait_that_runs_out_while_a_running_upload_receives_bytes_is_queued_and_keeps_its_place() -> None:
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1, place_kept_seconds=7)
    running_upload = uploads.begin("t0", "n", _info(4 * CHUNK))

    async def trickle() -> None:
        await asyncio.sleep(0.1)
        running_upload.assembler.add(0, bytes(CHUNK))

    feeding = asyncio.ensure_future(trickle())
    with pytest.raises(UploadQueuedError) as queued:
        async with uploads.line("t1", 10, timeout=0.3) as turn:
            turn.begin("n", _info(10))
    await feeding
    assert str(queued.value) == (
        "upload queued: waited 0.3 s in line, the longest an upload waits, while the line moved (too many "
        "concurrent uploads (1, limit 1)); its place is kept for 7 s: upload again now")
    assert not isinstance(queued.value, UploadsBusyError)  # a sibling: "busy" handlers do not catch it
    # the place is kept: t1's next wait goes ahead of t2, which joined after t1's first
    later = asyncio.ensure_future(uploads.wait_for_room("t2", 10, timeout=5))
    await eventually(lambda: uploads.waiting == 1, 1, "t2 in line")
    again = asyncio.ensure_future(uploads.wait_for_room("t1", 10, timeout=5))
    await eventually(lambda: uploads.waiting == 2, 1, "t1 back in line")
    uploads.discard("t0")
    assert await asyncio.wait_for(again, 1) is True and not later.done()
    later.cancel()


@async_test
async def test_a_wait_that_runs_out_while_nothing_moves_is_busy() -> None:
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1)
    uploads.begin("t0", "n", _info(4 * CHUNK))  # running, silent
    before = uploads.progress()
    with pytest.raises(UploadsBusyError, match=r"\(waited 0.2 s in line, the longest an upload waits; an upload "
                                               r"of this task within 120 s keeps its place\)$"):
        async with uploads.line("t1", 10, timeout=0.2) as turn:
            turn.begin("n", _info(10))
    assert uploads.progress() == before


def test_progress_moves_with_a_chunk_and_a_discard_not_a_begin() -> None:
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=2)
    seen = [uploads.progress()]
    session = uploads.begin("t0", "n", _info(2 * CHUNK))
    assert uploads.progress() == seen[-1]  # a begin takes room, frees none: no progress by itself
    session.assembler.add(0, bytes(CHUNK))
    seen.append(uploads.progress())
    uploads.end(session)  # a stream that ended (parked for a resume) is no progress by itself
    assert uploads.progress() == seen[-1]
    uploads.discard("t0")
    seen.append(uploads.progress())
    assert len(set(seen)) == 3, seen


def test_the_queued_refusal_is_remembered_for_get_upload_status() -> None:
    assert "ERROR_REASON_UPLOAD_QUEUED" in RESULT_REFUSALS  # grpc.aio may hide it from the node (grpc/grpc#36066)


# -- configuration ---------------------------------------------------------------------------------------------
def test_the_line_bounds_are_server_config_fields_with_the_former_defaults() -> None:
    config = ServerConfig(tls="insecure")
    assert (config.upload_line_wait_seconds, config.upload_place_kept_seconds) == (LINE_WAIT_SECONDS,
                                                                                 PLACE_KEPT_SECONDS) == (60, 120)


def test_the_line_wait_bound_is_fednodes_default_idle_stream_timeout() -> None:
    """The server refuses a line wait a default node would not sit through (it gives up the silent call)."""
    idle = NodeConfig("h:1", tls="insecure", token="t").idle_stream_timeout_seconds
    assert NODE_IDLE_STREAM_TIMEOUT_SECONDS == idle
    js = (Path(__file__).resolve().parents[1] / "clients" / "js" / "src" / "wire" / "node_client.js").read_text()
    assert f"idleStreamTimeoutSeconds ?? {idle:g}" in js
    ServerConfig(tls="insecure", upload_line_wait_seconds=idle - 1)
    with pytest.raises(ServerConfigError, match=r"upload_line_wait_seconds must be below 120 s, a node's idle "
                                                r"stream timeout by default .*got 120"):
        ServerConfig(tls="insecure", upload_line_wait_seconds=idle)


@pytest.mark.parametrize("name", ["upload_line_wait_seconds", "upload_place_kept_seconds"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "60"])
def test_the_line_bounds_must_be_finite_positive_seconds(name: str, value: object) -> None:
    with pytest.raises(ServerConfigError, match=f"{name} must be a finite number of seconds > 0, got"):
        ServerConfig(tls="insecure", **{name: value})


def test_serve_flags_set_the_line_bounds(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--home", str(tmp_path), "--tls", "insecure",
                                      "--upload-line-wait", "30", "--upload-place-kept", "90"])
    config = config_from_args(args)
    assert (config.upload_line_wait_seconds, config.upload_place_kept_seconds) == (30.0, 90.0)
    defaults = config_from_args(build_parser().parse_args(["serve", "--home", str(tmp_path), "--tls", "insecure"]))
    assert (defaults.upload_line_wait_seconds, defaults.upload_place_kept_seconds) == (60.0, 120.0)


# -- over gRPC -------------------------------------------------------------------------------------------------
def _holder(node: WireNode, task_id: str, trickle: bool) -> asyncio.Future[pb.UploadResultResponse]:
    """An upload that takes the one slot for ~``HOLD_CHUNKS × TRICKLE`` seconds: sending a chunk every ``TRICKLE``
    seconds (a moving line), or (``trickle`` False) its first chunk, then nothing until that time is over."""
    document = encoded({"params": bytes(HOLD_CHUNKS * CHUNK)}, CHUNK)
    header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, TaskOutcome.SUCCEEDED, "", document.info(0)))

    async def requests() -> AsyncIterator[pb.UploadResultRequest]:
        yield pb.UploadResultRequest(header=header)
        for index, (offset, data) in enumerate(document.iter_chunks(0)):
            if index == 1 and not trickle:
                await asyncio.sleep(HOLD_CHUNKS * TRICKLE)
            elif index > 0 and trickle:
                await asyncio.sleep(TRICKLE)
            yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=bytes(data)))

    return asyncio.ensure_future(node.stub.UploadResult(requests(), metadata=node.metadata, timeout=30))


async def _slot_taken(kit: ServerKit, trickle: bool) -> tuple[TaskHandle, asyncio.Future[pb.UploadResultResponse]]:
    node, handle = await _running_task(kit, "holder", 30.0)
    call = _holder(node, handle.task_id, trickle)
    await eventually(lambda: kit.server.uploads.acknowledged(handle.task_id) >= CHUNK, 5, "the holder has the slot")
    return handle, call


@async_test
async def test_the_queued_refusal_over_grpc(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, upload_line_wait_seconds=0.5) as kit:
        _, holder_call = await _slot_taken(kit, trickle=True)
        node, waiting = await _running_task(kit, "n", 30.0)
        document = encoded({"r": bytes(10)}, CHUNK)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.upload(waiting.task_id, document)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert reason_of(refused.value) == "ERROR_REASON_UPLOAD_QUEUED"
        assert refused.value.details() == (
            "upload queued: waited 0.5 s in line, the longest an upload waits, while the line moved (too many "
            "concurrent uploads (1, limit 1)); its place is kept for 120 s: upload again now")
        assert waiting.state is TaskState.RUNNING
        await asyncio.wait_for(holder_call, 10)


async def _fednode_result_behind(tmp_path: Path, trickle: bool,
                                 queued_upload_retry_seconds: float = 1800.0) -> tuple[TaskHandle, NodeClient, float]:
    """A fednode result arriving behind the holder: line wait 0.5 s, busy window 1 s, task timeout 2 s."""
    async with running_server(tmp_path, max_concurrent_uploads=1, upload_line_wait_seconds=0.5,
                              max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit:
        config = node_config(kit.server.port, token=kit.store.enroll("n"), busy_upload_retry_seconds=1.0,
                             backoff=BackoffPolicy(initial=0.05, maximum=0.2),
                             queued_upload_retry_seconds=queued_upload_retry_seconds)
        client = NodeClient(config, EchoHandler())
        async with running(client):
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            loop = asyncio.get_running_loop()
            start = loop.time()
            _, holder_call = await _slot_taken(kit, trickle)
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=2.0)
            await handle.result(timeout=20)
            took = loop.time() - start
            await asyncio.wait_for(holder_call, 10)
        return handle, client, took


@async_test
async def test_a_fednode_result_at_the_back_of_a_moving_line_is_delivered(tmp_path: Path) -> None:
    """The line moves for ~3 s: six line waits and three busy windows long. Before UPLOAD_QUEUED the node's
    busy window ran out after ~1.5 s and it reported the task FAILED."""
    handle, client, took = await _fednode_result_behind(tmp_path, trickle=True)
    result = await handle.result(timeout=1)
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    assert result.payload == {"params": {"w": 3}} and client.results_delivered == 1
    assert took > 0.5 + 1.0 + 0.5, took  # it outwaited a line wait, the busy window and one more wait


@async_test
async def test_a_fednode_result_behind_a_line_that_does_not_move_ends_busy(tmp_path: Path) -> None:
    handle, _client, took = await _fednode_result_behind(tmp_path, trickle=False)
    result = await handle.result(timeout=1)
    assert result.outcome is TaskState.FAILED, result
    assert "(ERROR_REASON_UPLOADS_BUSY): too many concurrent uploads (1, limit 1); retry later (waited 0.5 s in " \
           "line" in result.error_message, result.error_message
    assert took < HOLD_CHUNKS * TRICKLE, took  # given up while the holder still held the slot


@async_test
async def test_a_fednode_result_queued_past_its_bound_ends_failed(tmp_path: Path) -> None:
    """Queued retries are bounded (defence in depth against a line that never lets the result in): with
    queued_upload_retry_seconds 0.9 the node gives the result up after its second queued refusal (~1 s after
    the first), while the line still moves, and reports the task FAILED naming the refusal."""
    handle, client, took = await _fednode_result_behind(tmp_path, trickle=True, queued_upload_retry_seconds=0.9)
    result = await handle.result(timeout=1)
    assert result.outcome is TaskState.FAILED, result
    assert "attempts over" in result.error_message and "(ERROR_REASON_UPLOAD_QUEUED): upload queued: waited 0.5 s" \
           in result.error_message, result.error_message
    assert client.results_delivered == 1  # the FAILED report
    assert took < HOLD_CHUNKS * TRICKLE, took  # given up while the holder still held the slot


def test_the_queued_bound_is_a_validated_node_config_field() -> None:
    assert NodeConfig("h:1", tls="insecure", token="t").queued_upload_retry_seconds == 1800.0
    with pytest.raises(NodeConfigError, match="queued_upload_retry_seconds must be > 0 seconds, got 0"):
        NodeConfig("h:1", tls="insecure", token="t", queued_upload_retry_seconds=0)
