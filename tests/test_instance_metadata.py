"""Every call of a node process names the process (metadata ``fedstream-instance-id``), and the server refuses
the calls of a process that a newer process of the same node replaced: FAILED_PRECONDITION "superseded by a
newer instance", the words fednode and the JS node stop on. It closes the gap left by the instance id of
Register alone: an old process that was training or uploading at the restart (not polling) would otherwise
poll again later, take the node's new poll generation and compete with the new process for its tasks.

Over real grpc.aio on loopback: raw-stub processes of :mod:`server_testkit` with the metadata added (and
without it, as older nodes), and the real fednode NodeClient with a handler held until the restart.
Reconnect grace (60 s) and inactivity timeouts (120 s) are long, so anything ending within seconds is the
instance check at work.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import eventually
from fake_node_service import node_config, running
from server_testkit import ServerKit, WireNode, async_test, encoded, running_server
from test_node_client_fedserver import Trainer, server_config

from fedcore.errors import ServerRefusedError
from fedcore.wire import LogLine, ReportEvent, TaskKind
from fednode.client import NodeClient
from fednode.handler import TaskReply
from fednode.transport import INSTANCE_METADATA_KEY, fatal_refusal, superseded
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle, TaskState

SUPERSEDED = re.compile(r"call of node (\S+) superseded by a newer instance of the node: instance (\S+) registered "
                        r"at \d\d:\d\d:\d\d\.\d{3} in place of instance (\S+); this call belongs to an earlier process")
OLD, NEW = "a" * 32, "b" * 32


def process(kit: ServerKit, token: str, instance_id: str) -> WireNode:
    """A node process on its own connection that sends ``instance_id`` in the metadata of every call."""
    node = kit.node(token=token)
    node.metadata = (*node.metadata, (INSTANCE_METADATA_KEY, instance_id))
    return node


def dispatch(kit: ServerKit, obj: dict) -> TaskHandle:
    return kit.server.dispatch("n", TaskKind.TRAIN, encoded(obj), experiment_id="e", round=1, inactivity_timeout=120)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


# -- raw gRPC ----------------------------------------------------------------------------------------------
@async_test
async def test_every_call_of_a_replaced_process_is_refused_and_the_new_process_works(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        kit.server.board.reconnect_grace = 60.0
        token = kit.store.enroll("n")
        old = process(kit, token, OLD)
        await old.register(instance_id=OLD)
        held = dispatch(kit, {"x": 1})
        assert (await old.poll(wait=5)).descriptor.task_id == held.task_id  # the old process trains it

        new = process(kit, token, NEW)
        await new.register(instance_id=NEW)  # restart: the task the old process held fails
        assert (await held.result(timeout=1)).outcome is TaskState.FAILED
        waiting = dispatch(kit, {"x": 2})  # no poll open: without the check the old process's poll takes it

        calls = {
            "PollTask": old.poll(wait=5),
            "Heartbeat": old.heartbeat(held.task_id),
            "UploadResult": old.upload(held.task_id, encoded({"w": 1})),
            "GetUploadStatus": old.status(held.task_id),
            "Report": old.report(held.task_id, [ReportEvent(0.0, LogLine("INFO", "still here"))]),
            "Heartbeat without task": old.heartbeat(),
        }
        for name, call in calls.items():
            err = await refused(call)
            assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, (name, err.details())
            assert SUPERSEDED.fullmatch(err.details()).groups() == ("n", NEW, OLD), (name, err.details())
        assert waiting.state is TaskState.QUEUED and waiting.senders == 0  # the old poll took nothing
        assert kit.server.uploads.buffered_bytes == 0  # the old upload took no buffer

        got = await new.poll(wait=5)  # the new process gets the node's task and completes it
        assert got.descriptor.task_id == waiting.task_id and got.assemble() == {"x": 2}
        assert not (await new.heartbeat(waiting.task_id)).shutting_down
        await new.report(waiting.task_id, [ReportEvent(0.0, LogLine("INFO", "training"))])
        await new.upload(waiting.task_id, encoded({"ok": 2}))
        assert (await new.status(waiting.task_id)).complete
        assert (await waiting.result(timeout=5)).payload == {"ok": 2}

        err = await refused(old.register(instance_id=OLD))  # reconnecting does not take the node back
        assert SUPERSEDED.fullmatch(err.details()).groups() == ("n", NEW, OLD)
        assert kit.server.registry.get("n").instance_id == NEW
        await new.heartbeat()
        third = process(kit, token, "c" * 32)  # a newer process replaces the new one: same rules
        await third.register(instance_id="c" * 32)
        for replaced in (old, new):
            assert "superseded" in (await refused(replaced.register(instance_id=replaced.metadata[-1][1]))).details()
            assert "superseded" in (await refused(replaced.heartbeat())).details()
        await third.heartbeat()


@async_test
async def test_calls_without_the_metadata_work_as_before(tmp_path: Path) -> None:
    """Older nodes send no instance metadata: nothing is checked, whatever registered since."""
    async with running_server(tmp_path, max_poll_wait_seconds=30.0) as kit:
        token = kit.store.enroll("n")
        older = kit.node(token=token)  # no metadata at all, but an instance id in its Register
        await older.register(instance_id=OLD)
        await process(kit, token, NEW).register(instance_id=NEW)
        assert not (await older.heartbeat()).shutting_down
        task = dispatch(kit, {"x": 1})
        assert (await older.poll(wait=5)).descriptor.task_id == task.task_id
        await older.report(task.task_id, [ReportEvent(0.0, LogLine("INFO", "training"))])
        await older.upload(task.task_id, encoded({"ok": 1}))
        assert (await older.status(task.task_id)).complete
        assert (await task.result(timeout=5)).payload == {"ok": 1}


@async_test
async def test_a_call_naming_a_process_is_not_refused_while_the_server_knows_no_other(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        node = process(kit, token, OLD)
        # not registered since the server started (a server restart): asked to register again, not superseded
        err = await refused(node.heartbeat())
        assert err.code() is grpc.StatusCode.NOT_FOUND, err.details()
        assert ("fedstream-error-reason", "ERROR_REASON_UNKNOWN_NODE") in tuple(err.trailing_metadata()), err
        await kit.node(token=token).register(instance_id="")  # an older node registered last: id unknown
        await node.heartbeat()
        assert kit.server.registry.get("n").instance_id == ""


@async_test
async def test_a_malformed_instance_metadata_is_refused_naming_the_key(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        token = kit.store.enroll("n")
        await process(kit, token, OLD).register(instance_id=OLD)
        for bad in ("z" * 65, "new instance", "a/b"):
            node = process(kit, token, bad)
            for call in (node.heartbeat(), node.poll(wait=1), node.register(instance_id=bad)):
                err = await refused(call)
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert err.details().startswith("metadata 'fedstream-instance-id' must be at most 64 characters "
                                                "of [0-9A-Za-z_.-], got "), err.details()
        err = await refused(process(kit, token, NEW).register(instance_id=OLD))  # metadata and field differ
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"metadata 'fedstream-instance-id' is '{NEW}' but RegisterRequest.instance_id is '{OLD}'" in err.details()
        assert kit.server.registry.get("n").instance_id == OLD  # nothing was recorded
        at_limit = process(kit, token, "z" * 64)
        await at_limit.register(instance_id="z" * 64)
        await at_limit.heartbeat()


# -- the real NodeClient -------------------------------------------------------------------------------------
class HeldTrainer(Trainer):
    """Trainer whose first task waits until :attr:`release` is set; counts the tasks it got."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.tasks: list[str] = []

    def handle(self, task, reporter) -> TaskReply:
        self.tasks.append(task.task_id)
        self.started.set()
        assert self.release.wait(30), "never released"
        return super().handle(task, reporter)


@pytest.mark.parametrize("second", ["NodeClient", "raw"])
def test_a_node_process_replaced_while_its_handler_runs_stops_at_its_next_call(tmp_path: Path, second: str) -> None:
    """Process A (fednode) trains a task when process B of the same node registers. A's task fails at that
    Register; A's next call is refused "superseded" and run() ends with that error (fatal), having taken no
    other task: its upload once the handler returns or, when a Report or Heartbeat of the running task was
    refused first (its handler is then asked to stop and the result dropped), its next poll. B completes the
    node's next task."""

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("n")
        server = FedServer(server_config(reconnect_grace_seconds=60.0), store)
        port = await server.start()
        trainer = HeldTrainer()
        a = NodeClient(node_config(port, token=token, node_name="A"), trainer)
        a_run = asyncio.create_task(a.run())
        b_client = NodeClient(node_config(port, token=token, node_name="B"), Trainer())
        try:
            await server.wait_for_nodes(1, timeout=10)
            w = {"params": {"w": np.array([1.0, 2.0])}}
            first = server.dispatch("n", TaskKind.TRAIN, server.encode_payload(w), experiment_id="e", round=1,
                                    inactivity_timeout=120)
            assert await asyncio.to_thread(trainer.started.wait, 10)
            if second == "NodeClient":
                async with running(b_client):
                    await eventually(lambda: server.registry.get("n").instance_id == b_client.registration.instance_id,
                                     10, "B registered")
                    failed = await first.result(timeout=5)
                    nxt = server.dispatch("n", TaskKind.TRAIN, server.encode_payload(w), experiment_id="e",
                                          round=2, inactivity_timeout=120)
                    trainer.release.set()
                    with pytest.raises(ServerRefusedError) as err:
                        await asyncio.wait_for(a_run, 20)
                    done = await nxt.result(timeout=20)
            else:
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                b = WireNode(channel, token)
                b.metadata = (*b.metadata, (INSTANCE_METADATA_KEY, NEW))
                await b.register(instance_id=NEW)
                failed = await first.result(timeout=5)
                nxt = server.dispatch("n", TaskKind.TRAIN, server.encode_payload(w), experiment_id="e", round=2,
                                      inactivity_timeout=120)
                trainer.release.set()
                with pytest.raises(ServerRefusedError) as err:
                    await asyncio.wait_for(a_run, 20)
                assert nxt.state is TaskState.QUEUED and nxt.senders == 0  # A took nothing more
                got = await b.poll(wait=5)
                assert got.descriptor.task_id == nxt.task_id
                await b.upload(nxt.task_id, encoded({"params": {"w": np.array([2.0, 4.0])}}))
                done = await nxt.result(timeout=5)
                await channel.close()
        finally:
            trainer.release.set()
            a.stop()
            await asyncio.gather(a_run, return_exceptions=True)
            await server.stop(grace=1)
        return failed, done, err.value, trainer.tasks, first.task_id, a.registration.instance_id

    failed, done, error, tasks, first_id, a_instance = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert failed.outcome is TaskState.FAILED and "restarted" in failed.error_message
    assert fatal_refusal(error) and superseded(error), error
    # its upload is refused, or (when grpc.aio hides that status behind INTERNAL) the GetUploadStatus it then
    # asks on the same connection, or its poll after the dropped result: never a reconnect (which would
    # Register and be refused there)
    assert re.match(r"(UploadResult|GetUploadStatus|PollTask) refused", str(error)), error
    assert a_instance in error.details, error
    assert error.reason == "ERROR_REASON_NODE_SUPERSEDED"
    assert tasks == [first_id]  # A never took another task
    assert done.outcome is TaskState.SUCCEEDED, done.error_message
    np.testing.assert_array_equal(done.payload["params"]["w"], [2.0, 4.0])
