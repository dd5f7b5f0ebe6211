"""The JavaScript node (clients/js) keeps its task alive while a busy server makes its result wait, as fednode
(tests/test_busy_wait_heartbeats.py): a Heartbeat naming the task at least every announced heartbeat interval
through each backoff wait, not once before it.

A real FedServer whose one upload slot a parked upload of another node holds (until that node's reconnect
grace, 4 s, runs out); the JS node's task has an inactivity timeout of 0.8 s, shorter than its third backoff
wait (1-2 s) and maybe its second (0.5-1 s); the server announces a heartbeat interval of 0.25 s. With one
heartbeat per wait the task timed out while the node was alive and retrying; now its result is delivered.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import eventually
from js_node_support import echo_script, js_node, needs_node
from server_testkit import async_test, running_server
from test_busy_upload_window import _parked_upload

from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

pytestmark = needs_node

#: A JS node that answers one task with its payload's size, then prints how many results are still pending.
SCRIPT = echo_script("pollWaitSeconds: 2", "{ pending: c.delivery.pending.size }")


@async_test
async def test_the_javascript_node_keeps_its_task_alive_through_busy_waits(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.25, reconnect_grace_seconds=4.0) as kit:
        parked = await _parked_upload(kit)
        async with js_node(SCRIPT, f"127.0.0.1:{kit.server.port}", kit.store.enroll("js-1"),
                           tmp_path / "js-node.log") as node:
            await eventually(lambda: "js-1" in kit.server.registry, 10, "the JS node registered", node.log)
            handle = kit.server.dispatch("js-1", TaskKind.TRAIN, kit.server.encode_payload({"w": 3}),
                                         experiment_id="e", round=1, inactivity_timeout=0.8)
            result = await handle.result(timeout=30)
            freed = await parked.result(timeout=5)
            summary = await node.summary()
    assert freed.outcome is TaskState.FAILED and "did not reconnect within 4 s" in freed.error_message
    assert result.outcome is TaskState.SUCCEEDED, (result.error_message, node.log())
    assert result.payload["format"] == 1 and result.payload["size"] > 0
    assert "server busy with other uploads" in node.log()
    assert summary == {"pending": 0}
