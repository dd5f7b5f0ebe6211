"""Waiting in the upload line: the waiting task is active, the wait is bounded, and its place is kept.

- Every task whose result waits in line counts as active (:meth:`TaskHandle.kept_active`): its node waits on
  an open UploadResult call and sends nothing, not even a Heartbeat, so a waiter behind the head of the line
  timed out although the line moved (review R3).
- The wait lasts at most ``UploadSessions.line_wait_seconds`` (60 s by default), below fednode's idle stream
  timeout (120 s), which would otherwise give up the silent call and rejoin at the back of the line (a drop of
  the node); the upload is refused ERROR_REASON_UPLOADS_BUSY instead, and its retry keeps its place.

Over real grpc.aio on loopback with one upload slot (``max_concurrent_uploads=1``), and on the objects.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import node_config, running
from server_testkit import async_test, running_server
from test_error_reasons import reason_of
from test_upload_line_turns import CHUNK, _node_and_id, _running_task, _upload

from fedcore.framing import PayloadInfo
from fedcore.wire import TaskKind
from fednode.client import NodeClient
from fednode.config import BackoffPolicy, NodeConfig
from fednode.handler import EchoHandler
from fedserver.tasks import TaskHandle, TaskState
from fedserver.uploads import LINE_WAIT_SECONDS, PLACE_KEPT_SECONDS, UploadSessions


# -- the objects -----------------------------------------------------------------------------------------------
@async_test
async def test_a_task_kept_active_does_not_time_out_and_counts_from_the_end_of_the_block() -> None:
    handle = TaskHandle(task_id="t", node_id="n", experiment_id="e", round=1, kind=TaskKind.TRAIN,
                        payload=None, inactivity_timeout=0.3)  # type: ignore[arg-type]
    with handle.kept_active():
        await asyncio.sleep(1.0)  # three timeouts long
        assert not handle.done()
    left = asyncio.get_running_loop().time()
    result = await handle.result(timeout=2)
    assert result.outcome is TaskState.TIMED_OUT
    assert asyncio.get_running_loop().time() - left >= 0.29  # counted from the end of the block


def test_the_longest_wait_in_line_is_well_below_fednodes_idle_stream_timeout() -> None:
    idle = NodeConfig("h:1", tls="insecure", token="t").idle_stream_timeout_seconds
    assert LINE_WAIT_SECONDS <= idle / 2, (LINE_WAIT_SECONDS, idle)


def test_the_protocol_document_states_the_lines_bounds_as_the_server_has_them() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    step = text.split("**Waiting in line.**")[1].split("\n4.")[0].split("\n   - ")[0]
    assert f"up to **{LINE_WAIT_SECONDS:g} s**" in step and f"within {PLACE_KEPT_SECONDS:g} s keeps its place" in step


@async_test
async def test_an_upload_whose_wait_ran_out_keeps_its_place_for_its_retry() -> None:
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1)
    info = PayloadInfo(10, hashlib.sha256(bytes(10)).digest(), 1 << 20)
    uploads.begin("t0", "n", info)
    assert await uploads.wait_for_room("early", 10, timeout=0.05) is False  # its wait ran out: refused busy
    admitted: list[str] = []

    async def upload(task_id: str) -> None:
        async with uploads.line(task_id, 10, timeout=5) as turn:
            turn.begin(task_id, info)
            admitted.append(task_id)

    later = asyncio.ensure_future(upload("later"))  # arrived after "early" first did
    await eventually(lambda: uploads.waiting == 1, 1, "later in line")
    retry = asyncio.ensure_future(upload("early"))  # its retry comes back after "later" joined
    await eventually(lambda: uploads.waiting == 2, 1, "early back in line")
    uploads.discard("t0")
    await asyncio.wait_for(retry, 1)
    assert admitted == ["early"] and not later.done()
    uploads.discard("early")
    await asyncio.wait_for(later, 1)
    assert admitted == ["early", "later"]


# -- over gRPC -------------------------------------------------------------------------------------------------
@async_test
async def test_a_waiter_behind_the_head_of_the_line_does_not_time_out(tmp_path: Path) -> None:
    """Tasks with a 2 s inactivity timeout; c waits in line for 3.6 s behind a and b (each holding the slot for
    1.8 s), its node sending nothing meanwhile: waiting in line is activity."""
    async with running_server(tmp_path, max_concurrent_uploads=1) as kit:
        uploads = kit.server.uploads
        running_tasks = {name: await _running_task(kit, name, 2.0) for name in ("a", "b", "c")}
        c = running_tasks["c"][1]
        gates = {"a": asyncio.Event(), "b": asyncio.Event()}
        calls = {"a": _upload(*_node_and_id(running_tasks["a"]), gates["a"])}
        await eventually(lambda: uploads.acknowledged(running_tasks["a"][1].task_id) == CHUNK, 5, "a holds the slot")
        calls["b"] = _upload(*_node_and_id(running_tasks["b"]), gates["b"])
        await eventually(lambda: uploads.waiting == 1, 5, "b waiting in line")
        calls["c"] = _upload(*_node_and_id(running_tasks["c"]))
        await eventually(lambda: uploads.waiting == 2, 5, "c waiting in line")
        await asyncio.sleep(1.8)
        gates["a"].set()
        await asyncio.wait_for(calls["a"], 5)
        await eventually(lambda: uploads.acknowledged(running_tasks["b"][1].task_id) == CHUNK, 5, "b holds the slot")
        await asyncio.sleep(1.8)
        assert not c.done(), c.state  # 3.6 s in line
        gates["b"].set()
        await asyncio.wait_for(calls["b"], 5)
        await asyncio.wait_for(calls["c"], 5)
        result = await c.result(timeout=1)
    assert result.outcome is TaskState.SUCCEEDED, result.error_message


@async_test
async def test_a_wait_that_runs_out_is_refused_busy_and_the_retry_goes_first(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1) as kit:
        uploads = kit.server.uploads
        uploads.line_wait_seconds = 1.0
        running_tasks = {name: await _running_task(kit, name, 30.0) for name in ("a", "b", "c")}
        a, b, c = (running_tasks[name][1] for name in ("a", "b", "c"))
        gate = asyncio.Event()
        a_call = _upload(*_node_and_id(running_tasks["a"]), gate)
        await eventually(lambda: uploads.acknowledged(a.task_id) == CHUNK, 5, "a holds the slot")

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(_upload(*_node_and_id(running_tasks["b"])), 5)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert reason_of(refused.value) == "ERROR_REASON_UPLOADS_BUSY"
        assert refused.value.details() == (
            "too many concurrent uploads (1, limit 1); retry later (waited 1 s in line, the longest an upload "
            "waits; an upload of this task within 120 s keeps its place)")
        assert b.state is TaskState.RUNNING  # refused for now, the task stays open

        uploads.line_wait_seconds = 10.0
        c_call = _upload(*_node_and_id(running_tasks["c"]))
        await eventually(lambda: uploads.waiting == 1, 5, "c waiting in line")
        b_gate = asyncio.Event()
        b_call = _upload(*_node_and_id(running_tasks["b"]), b_gate)  # b's retry, after c joined
        await eventually(lambda: uploads.waiting == 2, 5, "b waiting in line again")
        gate.set()
        await asyncio.wait_for(a_call, 5)
        await eventually(lambda: uploads.acknowledged(b.task_id) == CHUNK, 5, "b gets the slot before c")
        assert uploads.session(c.task_id) is None and uploads.waiting == 1
        b_gate.set()
        await asyncio.wait_for(asyncio.gather(b_call, c_call), 5)
        assert (await c.result(timeout=1)).outcome is TaskState.SUCCEEDED


@async_test
async def test_a_fednode_result_outwaits_the_line_without_dropping_its_call(tmp_path: Path) -> None:
    """fednode gives up an upload call silent for its idle stream timeout (2.5 s here) and rejoins the line at
    the back: a drop of the node. The line answers first (busy after 1 s), fednode retries in place (a Heartbeat
    naming the task, its backoff) keeping its place, and its result goes in once the slot frees (4 s)."""
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.5) as kit:
        uploads = kit.server.uploads
        uploads.line_wait_seconds = 1.0
        a_node, a = await _running_task(kit, "a", 30.0)
        gate = asyncio.Event()
        a_call = _upload(a_node, a.task_id, gate)
        await eventually(lambda: uploads.acknowledged(a.task_id) == CHUNK, 5, "a holds the slot")
        config = node_config(kit.server.port, token=kit.store.enroll("n"), idle_stream_timeout_seconds=2.5,
                             backoff=BackoffPolicy(initial=0.05, maximum=0.2), busy_upload_retry_seconds=30.0)
        client = NodeClient(config, EchoHandler())
        async with running(client):
            await eventually(lambda: "n" in kit.server.registry, 10, "the node registered")
            handle = kit.server.dispatch("n", TaskKind.TRAIN, kit.server.encode_payload({"params": {"w": 3}}),
                                         experiment_id="e", round=1, inactivity_timeout=2.0)
            await eventually(lambda: uploads.waiting == 1, 5, "n's result waiting in line")
            await asyncio.sleep(4.0)
            assert not handle.done(), handle.state
            gate.set()
            await asyncio.wait_for(a_call, 5)
            result = await handle.result(timeout=10)
        assert result.outcome is TaskState.SUCCEEDED, result.error_message
        assert result.payload == {"params": {"w": 3}} and client.results_delivered == 1
        assert kit.server.registry.get("n").drops == 0  # no call given up by the node
