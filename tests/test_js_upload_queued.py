"""The JavaScript node (clients/js) at the back of an upload line that moves delivers its result, as fednode
(tests/test_upload_line_queued.py): a wait that runs out while the line moves is refused
ERROR_REASON_UPLOAD_QUEUED, which the node sends again at once, outside its busy window (``busyUploadRetryMs``).

A real FedServer with one upload slot and a line wait of 0.5 s; the slot is held for ~3 s by an upload that
sends a chunk every 0.2 s; the JS node's busy window is 1 s. Busy refusals alone would have made it give up
its result (reported FAILED) after ~1.5 s.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from e2e_support import eventually
from server_testkit import async_test, running_server
from test_js_lost_delivery import JS, NODE, need_npm_deps
from test_upload_line_queued import HOLD_CHUNKS, TRICKLE, _slot_taken

from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH: the JavaScript node cannot run")

#: A JS node that answers one task with its payload's size, then prints how many results are still pending.
SCRIPT = r"""
const grpc = require("@grpc/grpc-js");
const { NodeClient } = require("./src/wire/node_client.js");
const { encode } = require("./src/codec");
const args = JSON.parse(process.argv[1]);
const log = (level, msg) => process.stderr.write(`${level} ${msg}\n`);
const c = new NodeClient({ server: args.server, credentials: grpc.credentials.createInsecure(), token: args.token,
  nodeName: "js", pollWaitSeconds: 2, busyUploadRetryMs: 1000, log });
const echo = { run: async (header, payload) => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "",
  payload: encode({ format: 1, size: payload.length }) }) };
c.run(echo, { maxTasks: 1 }).then(() => {
  console.log(JSON.stringify({ pending: c.delivery.pending.size }));
  c.close();
}, (e) => { console.error(e); process.exit(1); });
"""


@async_test
async def test_the_javascript_node_at_the_back_of_a_moving_line_delivers_its_result(tmp_path: Path) -> None:
    need_npm_deps()
    stderr_path = tmp_path / "js-node.log"
    async with running_server(tmp_path, max_concurrent_uploads=1, upload_line_wait_seconds=0.5,
                              max_poll_wait_seconds=2.0, heartbeat_interval_seconds=0.5) as kit:
        args = json.dumps({"server": f"127.0.0.1:{kit.server.port}", "token": kit.store.enroll("js-1")})
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(NODE, "-e", SCRIPT, args, cwd=JS,
                                                        stdout=asyncio.subprocess.PIPE, stderr=stderr)

        def js_log() -> str:
            return stderr_path.read_text(errors="replace")

        try:
            await eventually(lambda: "js-1" in kit.server.registry, 10, "the JS node registered", js_log)
            loop = asyncio.get_running_loop()
            start = loop.time()
            _, holder_call = await _slot_taken(kit, trickle=True)
            handle = kit.server.dispatch("js-1", TaskKind.TRAIN, kit.server.encode_payload({"w": 3}),
                                         experiment_id="e", round=1, inactivity_timeout=2.0)
            result = await handle.result(timeout=30)
            took = loop.time() - start
            await asyncio.wait_for(holder_call, 10)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert result.outcome is TaskState.SUCCEEDED, (result.error_message, js_log())
    assert result.payload["format"] == 1 and result.payload["size"] > 0
    assert took > 0.5 + 1.0 + 0.5 and took >= HOLD_CHUNKS * TRICKLE * 0.8, took
    assert "still queued on the server" in js_log()
    assert proc.returncode == 0, js_log()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"pending": 0}
