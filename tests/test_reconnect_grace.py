"""A node that disconnects mid-round has ``TaskBoard.reconnect_grace`` seconds to come back; past it, its
tasks fail with an error saying when it disconnected, so a round no longer waits for the task's
inactivity timeout. A node that comes back in time carries on; one that merely polls again is never failed.

Over real grpc.aio on loopback (raw-stub nodes of :mod:`server_testkit`, the real NodeClient) and with
real ``fednode start`` processes killed with SIGKILL. Inactivity timeouts are long (60-120 s) in these
tests, so a task ending within seconds can only be the grace at work.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import Federation, eventually, least_squares_sites
from fake_node_service import node_config, running
from plans_gated import GatedLinearPlan
from server_testkit import async_test, encoded, running_server, version

from fedcore.aggregators import FedAverage
from fedcore.framing import OutgoingPayload
from fedcore.wire import ResultDescriptor, TaskKind, TaskOutcome, convert
from fednode.client import NodeClient
from fednode.handler import EchoHandler, ReceivedTask, TaskReply
from fednode.reporter import Reporter
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.server import FedServer
from fedserver.tasks import TaskState
from fedstream.v1 import common_pb2
from fedstream.v1 import node_service_pb2 as pb

LONG_POLL = {"max_poll_wait_seconds": 30.0, "heartbeat_interval_seconds": 10.0}  # liveness window 50 s
DISCONNECTED = re.compile(r"node (\S+) disconnected at \d\d:\d\d:\d\d\.\d{3} \((.*)\) and did not reconnect "
                          r"within ([\d.]+) s \((\w+)\)")


async def _broken_download(kit, node, grace: float):
    """Dispatch 8 MiB to node "a", read the header and one chunk, then close its channel abruptly."""
    kit.server.board.reconnect_grace = grace
    payload = OutgoingPayload.from_bytes(np.arange(2 << 20, dtype=np.int32).tobytes(), 64 << 10)
    handle = kit.server.dispatch("a", TaskKind.TRAIN, payload, experiment_id="e", round=1, inactivity_timeout=120)
    call = node.stub.PollTask(pb.PollTaskRequest(version=version(), wait_seconds=30), metadata=node.metadata)
    await call.read()  # the header
    first = await call.read()
    await node.channel.close(grace=None)  # as when the process dies
    return handle, payload, first.chunk, time.monotonic()


@async_test
async def test_a_node_gone_mid_download_fails_its_task_after_the_grace(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LONG_POLL) as kit:
        token = kit.store.enroll("a")
        node = kit.node(token=token)
        await node.register()
        handle, _, _, dropped = await _broken_download(kit, node, grace=0.5)
        result = await handle.result(timeout=10)
        waited = time.monotonic() - dropped
        assert result.outcome is TaskState.FAILED and not handle.result_received
        match = DISCONNECTED.search(result.error_message)
        assert match, result.error_message
        assert match.groups() == ("a", "its last open stream was cancelled or broken", "0.5", "queued")
        assert 0.45 <= waited < 3.0, waited  # the grace, not the 120 s inactivity timeout
        assert kit.server.board.open_tasks("a") == [] and not kit.server.registry.get("a").in_flight

        back = kit.node(token=token)  # comes back too late: the task is refused, saying why
        await back.register()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await back.poll(wait=1, resume_task_id=handle.task_id, resume_offset=64 << 10)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "did not reconnect within 0.5 s" in err.value.details()


@async_test
async def test_a_node_back_within_the_grace_resumes_its_download_and_completes(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LONG_POLL) as kit:
        token = kit.store.enroll("a")
        node = kit.node(token=token)
        await node.register()
        grace = 1.0
        handle, payload, first, dropped = await _broken_download(kit, node, grace=grace)
        assert first.offset == 0
        back = kit.node(token=token)  # the same node on a new connection
        await back.register()
        got = await back.poll(wait=5, resume_task_id=handle.task_id, resume_offset=len(first.data))
        assert got.descriptor.task_id == handle.task_id and handle.state is TaskState.RUNNING
        assert first.data + b"".join(d for _, d in got.chunks) == payload.tobytes()
        while time.monotonic() < dropped + grace + 0.3:  # past the grace: the task lives on
            await back.heartbeat(handle.task_id)
            await asyncio.sleep(0.1)
        assert not handle.done()
        await back.upload(handle.task_id, encoded({"ok": 1}))
        result = await handle.result(timeout=5)
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"ok": 1}
        assert kit.server.registry.get("a").drops == 1


@async_test
async def test_a_broken_upload_disconnects_and_fails_after_the_grace_unless_resumed(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LONG_POLL) as kit:
        kit.server.board.reconnect_grace = 0.5
        doc = encoded({"w": np.arange(100_000, dtype=np.float32)}, chunk_size=4096)
        chunks = [(o, bytes(d)) for o, d in doc.iter_chunks()]
        outcomes = {}
        for node_id, resume in (("a", False), ("b", True)):
            token = kit.store.enroll(node_id)
            node = kit.node(token=token)
            await node.register()
            handle = kit.server.dispatch(node_id, TaskKind.TRAIN, encoded({"x": 1}), experiment_id="e", round=1,
                                         inactivity_timeout=120)
            await node.poll(wait=5)
            sent = asyncio.Event()

            async def requests(task_id=handle.task_id, sent=sent):
                header = convert.result_descriptor_to_pb(ResultDescriptor(task_id, TaskOutcome.SUCCEEDED, "",
                                                                          doc.info()))
                yield pb.UploadResultRequest(header=header)
                for offset, data in chunks[:3]:
                    yield pb.UploadResultRequest(chunk=common_pb2.Chunk(offset=offset, data=data))
                sent.set()
                await asyncio.Event().wait()  # hangs until the connection goes

            call = node.stub.UploadResult(requests(), metadata=node.metadata, timeout=60)
            await sent.wait()
            await eventually(lambda h=handle: h.bytes_received or kit.server.uploads.acknowledged(h.task_id) > 0,
                             5, "chunks received")
            assert kit.server.registry.get(node_id).open_uploads == 1
            await node.channel.close(grace=None)
            dropped = time.monotonic()
            call.cancel()  # already dead with its channel
            await eventually(lambda n=node_id: not kit.server.registry.get(n).connected, 2, f"{node_id} dropped")
            if resume:
                back = kit.node(token=token)
                status = await back.status(handle.task_id)
                assert status.acknowledged_offset > 0
                await asyncio.sleep(max(0.0, dropped + 0.7 - time.monotonic()))  # past the grace: still open
                assert not handle.done()
                await back.upload(handle.task_id, doc, chunk_size=4096, start_offset=status.acknowledged_offset)
            result = await handle.result(timeout=10)
            outcomes[node_id] = (result.outcome, result.error_message, time.monotonic() - dropped)
        state, error, waited = outcomes["a"]
        assert state is TaskState.FAILED and DISCONNECTED.search(error).group(4) == "uploading", error
        assert waited < 3.0
        assert outcomes["b"][0] is TaskState.SUCCEEDED


@async_test
async def test_a_silent_node_with_a_running_task_fails_after_its_liveness_window_and_the_grace(
        tmp_path: Path) -> None:
    # liveness window: 0.2 s polls + 2 x 0.2 s heartbeats = 0.6 s
    async with running_server(tmp_path, max_poll_wait_seconds=0.2, heartbeat_interval_seconds=0.2) as kit:
        kit.server.board.reconnect_grace = 0.4
        silent, beating = await kit.registered_node("silent"), await kit.registered_node("beating")
        handles = {}
        for node_id, node in (("silent", silent), ("beating", beating)):
            handles[node_id] = kit.server.dispatch(node_id, TaskKind.TRAIN, encoded({"x": 1}), experiment_id="e",
                                                   round=1, inactivity_timeout=60)
            await node.poll(wait=5)
            assert handles[node_id].state is TaskState.RUNNING
        started = time.monotonic()
        while not handles["silent"].done():  # "beating" heartbeats as fednode does while it trains
            await beating.heartbeat(handles["beating"].task_id)
            await asyncio.sleep(0.1)
            assert time.monotonic() - started < 10
        result = await handles["silent"].result()
        assert DISCONNECTED.search(result.error_message).groups()[1:] == ("no call for 0.6 s", "0.4", "running")
        assert 0.9 <= time.monotonic() - started < 5
        for _ in range(15):  # 1.5 s, well past window + grace: the beating node keeps its task
            await beating.heartbeat(handles["beating"].task_id)
            await asyncio.sleep(0.1)
        assert handles["beating"].state is TaskState.RUNNING


class SlowEcho:
    """EchoHandler after ``seconds`` of "training" (the client heartbeats meanwhile)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self, task: ReceivedTask, reporter: Reporter) -> TaskReply:
        threading.Event().wait(self.seconds)
        return EchoHandler().handle(task, reporter)


def test_a_node_that_polls_again_and_trains_long_is_never_failed(tmp_path: Path) -> None:
    """fednode's real client, 20 ms polls, tasks training 10x longer than a 0.1 s grace: no task is lost."""

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        config = ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=0.02, heartbeat_interval_seconds=0.2)
        server = FedServer(config, store)
        await server.start()
        server.board.reconnect_grace = 0.1
        client = NodeClient(node_config(server.port, token=token, poll_wait_seconds=0.02), SlowEcho(1.0))
        try:
            async with running(client):
                await server.wait_for_nodes(1, timeout=10)
                payload = server.encode_payload({"x": np.ones(10_000, np.float32)})
                results = []
                for k in range(3):
                    handle = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="e", round=k + 1,
                                             inactivity_timeout=60)
                    results.append(await handle.result(timeout=20))
                drops = server.registry.get("site-a").drops
        finally:
            await server.stop(grace=1)
        return results, drops

    results, drops = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert [(r.outcome, r.error_message) for r in results] == [(TaskState.SUCCEEDED, "")] * 3 and drops == 0


SITES = least_squares_sites(3)
ARGS = {"num_updates": 5, "batch_size": 16, "lr": 0.05}


def test_a_killed_node_process_ends_its_round_within_its_window_and_the_grace(tmp_path: Path) -> None:
    """site-2 is SIGKILLed while training round 1 (no stream open: it falls silent); the round timeout is
    120 s, yet round 1 completes with the two others within the liveness window (3 s) + the 1 s grace."""

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(3))
            for i in range(3):
                fed.start_node(i, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1", "site-2"])
            fed.server.board.reconnect_grace = 1.0
            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=2, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=120, node_wait_timeout=10, server=fed.server, progress=False)
            running_exp = asyncio.create_task(exp.run_async())
            try:
                for node_id in ("site-0", "site-1", "site-2"):
                    await fed.wait_task(node_id, TaskState.RUNNING, round=1)
                fed.nodes["site-2"].kill()
                killed = time.monotonic()
                fed.open_gate("all")
                reports = await asyncio.wait_for(running_exp, 30)
            finally:
                running_exp.cancel()
            return reports, time.monotonic() - killed

    reports, elapsed = asyncio.run(asyncio.wait_for(scenario(), 120))
    first = {o.node_id: o for o in reports[0].outcomes}
    assert [first[n].outcome for n in sorted(first)] == ["succeeded", "succeeded", "failed"]
    assert DISCONNECTED.search(first["site-2"].error).groups()[1:] == ("no call for 3 s", "1", "running")
    assert reports[1].succeeded == ["site-0", "site-1"]
    assert elapsed < 15, elapsed  # two rounds; round 1 alone waits at most ~3 + 1 s for site-2


def test_a_killed_node_process_restarted_within_the_grace_gets_its_queued_task(tmp_path: Path) -> None:
    """site-0's process dies while polling (a dropped stream: disconnected at once); a task is queued for it
    meanwhile; the restarted process registers, polls and completes it: the grace kept it."""

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare([0])
            fed.start_node(0)
            await fed.wait_registered(["site-0"])
            registry = fed.server.registry
            fed.server.board.reconnect_grace = 30.0
            await eventually(lambda: registry.get("site-0").open_polls == 1, 5, "site-0 polling")
            fed.nodes["site-0"].kill()
            await eventually(lambda: not registry.get("site-0").connected, 2, "site-0 disconnected")
            handle = fed.server.dispatch("site-0", TaskKind.TRAIN, fed.server.encode_payload({"x": 1}),
                                         experiment_id="e", round=1, inactivity_timeout=120)
            restarted = time.monotonic()
            fed.start_node(0)
            await fed.wait_registered(["site-0"], newer_than=restarted, timeout=25)
            result = await handle.result(timeout=25)
            return result, fed.nodes["site-0"].log()

    result, log = asyncio.run(asyncio.wait_for(scenario(), 120))
    # the node's handler refuses a payload that is not a training task, or fails it: either way it answered
    assert result.outcome in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REFUSED), result
    assert "disconnected" not in result.error_message, (result.error_message, log[-2000:])
