"""The JavaScript node (clients/js) keeps its task alive while a busy server makes its result wait, as fednode
(tests/test_busy_wait_heartbeats.py): a Heartbeat naming the task at least every announced heartbeat interval
through each backoff wait, not once before it.

A real FedServer whose one upload slot a parked upload of another node holds (until that node's reconnect
grace, 4 s, runs out); the JS node's task has an inactivity timeout of 0.8 s, shorter than its third backoff
wait (1-2 s) and maybe its second (0.5-1 s); the server announces a heartbeat interval of 0.25 s. With one
heartbeat per wait the task timed out while the node was alive and retrying; now its result is delivered.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from e2e_support import eventually
from server_testkit import async_test, running_server
from test_busy_upload_window import _parked_upload
from test_js_lost_delivery import JS, NODE, need_npm_deps

from fedcore.wire import TaskKind
from fedserver.tasks import TaskState

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH: the JavaScript node cannot run")

#: A JS node that answers one task with its payload's size, then prints how many results it delivered.
SCRIPT = r"""
const grpc = require("@grpc/grpc-js");
const { NodeClient } = require("./src/wire/node_client.js");
const { encode } = require("./src/codec");
const args = JSON.parse(process.argv[1]);
const log = (level, msg) => process.stderr.write(`${level} ${msg}\n`);
const c = new NodeClient({ server: args.server, credentials: grpc.credentials.createInsecure(), token: args.token,
  nodeName: "js", pollWaitSeconds: 2, log });
const echo = { run: async (header, payload) => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "",
  payload: encode({ format: 1, size: payload.length }) }) };
c.run(echo, { maxTasks: 1 }).then(() => {
  console.log(JSON.stringify({ pending: c.delivery.pending.size }));
  c.close();
}, (e) => { console.error(e); process.exit(1); });
"""


@async_test
async def test_the_javascript_node_keeps_its_task_alive_through_busy_waits(tmp_path: Path) -> None:
    need_npm_deps()
    stderr_path = tmp_path / "js-node.log"
    async with running_server(tmp_path, max_concurrent_uploads=1, max_poll_wait_seconds=2.0,
                              heartbeat_interval_seconds=0.25, reconnect_grace_seconds=4.0) as kit:
        parked = await _parked_upload(kit)
        args = json.dumps({"server": f"127.0.0.1:{kit.server.port}", "token": kit.store.enroll("js-1")})
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(NODE, "-e", SCRIPT, args, cwd=JS,
                                                        stdout=asyncio.subprocess.PIPE, stderr=stderr)

        def js_log() -> str:
            return stderr_path.read_text(errors="replace")

        try:
            await eventually(lambda: "js-1" in kit.server.registry, 10, "the JS node registered", js_log)
            handle = kit.server.dispatch("js-1", TaskKind.TRAIN, kit.server.encode_payload({"w": 3}),
                                         experiment_id="e", round=1, inactivity_timeout=0.8)
            result = await handle.result(timeout=30)
            freed = await parked.result(timeout=5)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert freed.outcome is TaskState.FAILED and "did not reconnect within 4 s" in freed.error_message
    assert result.outcome is TaskState.SUCCEEDED, (result.error_message, js_log())
    assert result.payload["format"] == 1 and result.payload["size"] > 0
    assert "server busy with other uploads" in js_log()
    assert proc.returncode == 0, js_log()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"pending": 0}
