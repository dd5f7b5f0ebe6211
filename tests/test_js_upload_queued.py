"""The JavaScript node (clients/js) at the back of an upload line that moves delivers its result, as fednode
(tests/test_upload_line_queued.py): a wait that runs out while the line moves is refused
ERROR_REASON_UPLOAD_QUEUED, which the node sends again at once, outside its busy window (``busyUploadRetryMs``).

A real FedServer with one upload slot and a line wait of 0.5 s; the slot is held for ~3 s by an upload that
sends a chunk every 0.2 s; the JS node's busy window is 1 s. Busy refusals alone would have made it give up
its result (reported FAILED) after ~1.5 s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from e2e_support import eventually
from js_node_support import echo_script, js_node, needs_node
from server_testkit import async_test, running_server
from test_upload_line_queued import HOLD_CHUNKS, TRICKLE, _slot_taken

from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

pytestmark = needs_node

#: A JS node that answers one task with its payload's size, then prints how many results are still pending.
SCRIPT = echo_script("pollWaitSeconds: 2, busyUploadRetryMs: 1000", "{ pending: c.delivery.pending.size }")


@async_test
async def test_the_javascript_node_at_the_back_of_a_moving_line_delivers_its_result(tmp_path: Path) -> None:
    async with (running_server(tmp_path, max_concurrent_uploads=1, upload_line_wait_seconds=0.5,
                               max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit,
                js_node(SCRIPT, f"127.0.0.1:{kit.server.port}", kit.store.enroll("js-1"),
                        tmp_path / "js-node.log") as node):
        await eventually(lambda: "js-1" in kit.server.registry, 10, "the JS node registered", node.log)
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, holder_call = await _slot_taken(kit, trickle=True)
        handle = kit.server.dispatch("js-1", TaskKind.TRAIN, kit.server.encode_payload({"w": 3}),
                                     experiment_id="e", round=1, inactivity_timeout=2.0)
        result = await handle.result(timeout=30)
        took = loop.time() - start
        await asyncio.wait_for(holder_call, 10)
        summary = await node.summary()
    assert result.outcome is TaskState.SUCCEEDED, (result.error_message, node.log())
    assert result.payload["format"] == 1 and result.payload["size"] > 0
    assert took > 0.5 + 1.0 + 0.5 and took >= HOLD_CHUNKS * TRICKLE * 0.8, took
    assert "still queued on the server" in node.log()
    assert summary == {"pending": 0}
