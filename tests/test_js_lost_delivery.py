"""The JavaScript node (clients/js) gets again a task the server sent whole into its dead connection.

Like fednode (tests/test_lost_delivery.py): the node's connection goes through a :class:`FreezingProxy` that
freezes while its poll waits; the task dispatched then fits the buffers, so the server counts it delivered
though the node never saw it. The JS node gives up the silent poll (its wait plus the call timeout),
reconnects on a fresh channel, registers again and polls saying what it holds (nothing): the server sends the
task again from offset 0 and the round gets the node's result, long before the task's 120 s inactivity
timeout. Without ``reports_held_tasks`` the task would stay RUNNING (test_lost_delivery's old-style poll).
The polls carry ``poll_sequence`` the server accepts (the highest it saw is the JS node's last).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import eventually
from js_node_support import JS, NODE, echo_script, js_node, need_npm_deps, needs_node
from server_testkit import async_test, running_server
from tcp_proxy import FreezingProxy

from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind
from fednode.config import NodeConfig
from fedserver.tasks import TaskState

pytestmark = needs_node
LOST = "sending it again from offset 0"  # words of the server's log line (fedserver.task_board)

#: A JS node that answers one task with {format, sha256, size} of the payload it received, then prints what
#: its client did and exits.
SCRIPT = echo_script("pollWaitSeconds: 2, callTimeoutSeconds: 1",
                     "{ channels: c.calls.channels, polls: c.poller.pollsSent }",
                     reply='{ format: 1, sha256: sha256(payload).toString("hex"), size: payload.length }',
                     requires='const { sha256 } = require("./src/wire/chunks.js");')


@async_test
async def test_the_javascript_node_gets_a_task_lost_in_its_dead_connection_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = bytes(range(256)) * 160  # 40 KiB in 3 chunks: fits the buffers of the frozen connection
    async with running_server(tmp_path, max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit:
        token = kit.store.enroll("js-1")
        proxy = FreezingProxy(kit.server.port)
        try:
            async with js_node(SCRIPT, f"127.0.0.1:{await proxy.start()}", token, tmp_path / "js-node.log") as node:
                registry = kit.server.registry
                record = None
                while record is None or not (record.open_polls == 1 and time.monotonic() - record.last_seen < 0.2):
                    await asyncio.sleep(0.005)  # until a poll opened just now: it waits 2 s for a task
                    assert node.proc.returncode is None, node.log()
                    record = registry.get("js-1") if "js-1" in registry else None
                proxy.freeze()
                with caplog.at_level(logging.WARNING, logger="fedserver.task_board"):
                    handle = kit.server.dispatch("js-1", TaskKind.TRAIN, OutgoingPayload.from_bytes(data, 16 << 10),
                                                 experiment_id="e", round=1, inactivity_timeout=120)
                    await eventually(lambda: handle.state is TaskState.RUNNING, 1.5, "the task counted delivered")
                    sent = handle.bytes_sent
                    assert sent == len(data)
                    await eventually(lambda: "PollTask: no message from the server for 3 s" in node.log(), 10,
                                     "the JS node giving up its silent poll", node.log)
                    proxy.thaw()
                    result = await handle.result(timeout=20)
                summary = await node.summary()
        finally:
            await proxy.stop()
        assert registry.get("js-1").poll_sequence == summary["polls"] >= 2  # the server took the JS numbering
    assert result.outcome is TaskState.SUCCEEDED, (result.error_message, node.log())
    assert result.payload == {"format": 1, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert result.bytes_sent == 2 * sent
    assert summary["channels"] >= 2, "it came back on a fresh channel"
    assert any(LOST in r.getMessage() and handle.task_id in r.getMessage() for r in caplog.records)


def test_the_javascript_node_waits_for_a_busy_server_as_long_as_fednode() -> None:
    """busyUploadRetryMs defaults to fednode's busy_upload_retry_seconds (a time, not a number of attempts)."""
    need_npm_deps()
    script = 'console.log(require("./src/wire/node_client.js").BUSY_UPLOAD_RETRY_MS)'
    out = subprocess.run([NODE, "-e", script], cwd=JS, check=True, capture_output=True, text=True, timeout=30)
    default = NodeConfig.__dataclass_fields__["busy_upload_retry_seconds"].default
    assert int(out.stdout.strip()) == round(default * 1000)
