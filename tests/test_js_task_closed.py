"""The JavaScript node (clients/js) drops a result waiting for upload room as soon as a Heartbeat of its wait
answers task_state TASK_STATE_CLOSED, as fednode (tests/test_task_cancellation.py), against a real FedServer.

The server's one upload slot is held by a parked upload of another node (its reconnect grace: 60 s), so the JS
node's result is refused UPLOADS_BUSY and waits, heartbeating every 0.25 s (the announced interval). The test
cancels the task mid-wait: the node drops the result without another upload attempt (the server records no
late upload), and its run ends with nothing pending.

Mid-wait means a heartbeat comes next: the cancel must not fall in a wait's last slice (up to 0.25 s before
the next attempt, which would meet the closed task first). So the test cancels during a wait of at least 1 s
(the third, 1-2 s), as soon as the node logs it: it has at least 1 - 0.25 s to look, not 0.25 s as at the
first wait (250-500 ms).
"""

from __future__ import annotations

import re
import time
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
HEARTBEAT_INTERVAL = 0.25
LONG_WAIT = 1.0  # seconds: a busy wait this long leaves LONG_WAIT - HEARTBEAT_INTERVAL to cancel before its last slice


def long_wait_logged(log: str, task_id: str) -> bool:
    """The node logged a busy wait of at least LONG_WAIT for ``task_id`` ("retrying task T in 1.37 s")."""
    waits = re.findall(rf"retrying task {re.escape(task_id)} in (\d+\.\d+) s", log)
    return any(float(w) >= LONG_WAIT for w in waits)


@async_test
async def test_the_javascript_node_drops_a_waiting_result_when_its_task_closes(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=HEARTBEAT_INTERVAL, reconnect_grace_seconds=60.0) as kit:
        await _parked_upload(kit)
        async with js_node(SCRIPT, f"127.0.0.1:{kit.server.port}", kit.store.enroll("js-1"),
                           tmp_path / "js-node.log") as node:
            await eventually(lambda: "js-1" in kit.server.registry, 10, "the JS node registered", node.log)
            handle = kit.server.dispatch("js-1", TaskKind.TRAIN, kit.server.encode_payload({"w": 3}),
                                         experiment_id="e", round=1, inactivity_timeout=60)
            await eventually(lambda: long_wait_logged(node.log(), handle.task_id), 10,
                             f"a busy wait of {LONG_WAIT:g} s or more", node.log)
            closed_at = time.monotonic()
            handle.cancel("round cancelled by the test")
            summary = await node.summary()
            took = time.monotonic() - closed_at
            record = kit.server.board.closed_record(handle.task_id)
    log = node.log()
    assert handle.state is TaskState.CANCELLED and summary == {"pending": 0}
    assert (f"task {handle.task_id}: result not accepted (task {handle.task_id} closed by the server (a heartbeat "
            "answered task_state TASK_STATE_CLOSED)); dropped") in log, log
    assert record.late_uploads == 0, log  # dropped on the heartbeat's answer, not refused at a later upload
    assert took < 5.0, took
