"""The JavaScript node reads fedserver's error reasons: grpc-js ``err.metadata`` carries the
``fedstream-error-reason`` trailer a Python grpc.aio server sends, and ``classify`` turns it into
fatal / task (docs/protocol.md §7). A small ``node`` script drives clients/js's NodeClient against a real
FedServer on loopback; the cases whose code alone would mislead (FAILED_PRECONDITION: an upgrade, a closed
task, a superseded process) are the point.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from js_node_support import JS, NODE, needs_node
from server_testkit import running_server

from fedcore.wire import TaskKind

pytestmark = needs_node

SCRIPT = r"""
const grpc = require("@grpc/grpc-js");
const { NodeClient, classify, errorReason } = require("./src/wire/node_client.js");
const args = JSON.parse(process.argv[1]);
const make = (token) => new NodeClient({ server: args.server, credentials: grpc.credentials.createInsecure(), token,
  nodeName: "js" });
(async () => {
  const out = {};
  const call = async (name, fn) => {
    try { await fn(); out[name] = "ok"; } catch (e) { out[name] = [e.code, errorReason(e), classify(e)]; }
  };
  const c = make(args.token);
  const other = make(args.token); // another process of the same node
  const stranger = make("no-such-token");
  await c.register();
  await call("unknown", () => c.uploadStatus("no-such-task"));
  await call("foreign", () => c.uploadStatus(args.foreign));
  await call("closed", () => c.report(args.closed, []));
  await call("version", () => c.unary("Heartbeat", { version: { major: 2, minor: 0 }, task_id: "" }));
  await call("unauthenticated", () => stranger.heartbeat());
  await other.register();
  await call("superseded", () => c.heartbeat());
  for (const x of [c, other, stranger]) x.close();
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_the_javascript_node_reads_the_reason_of_each_refusal(tmp_path: Path) -> None:
    if not (JS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/js/node_modules is missing: run (cd clients/js && npm ci)")

    async def scenario():
        async with running_server(tmp_path) as kit:
            token = kit.store.enroll("js-1")
            await kit.registered_node("js-1", token=token)  # registered, so tasks can be dispatched to it
            await kit.registered_node("js-2")
            payload = kit.server.encode_payload({"round": 1})
            closed = kit.server.dispatch("js-1", TaskKind.TRAIN, payload, experiment_id="e", round=1)
            closed.cancel("round cancelled by the test")
            other = kit.server.dispatch("js-2", TaskKind.TRAIN, payload, experiment_id="e", round=1)
            args = json.dumps({"server": kit.target, "token": token, "closed": closed.task_id,
                               "foreign": other.task_id})
            proc = await asyncio.create_subprocess_exec(NODE, "-e", SCRIPT, args, cwd=JS,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            return json.loads(out.decode().strip().splitlines()[-1])

    got = asyncio.run(asyncio.wait_for(scenario(), 90))
    code = {c.name: c.value[0] for c in grpc.StatusCode}
    assert got == {
        "unknown": [code["NOT_FOUND"], "ERROR_REASON_UNKNOWN_TASK", "task"],
        "foreign": [code["PERMISSION_DENIED"], "ERROR_REASON_TASK_NOT_SENT_TO_NODE", "task"],
        "closed": [code["FAILED_PRECONDITION"], "ERROR_REASON_TASK_CLOSED", "task"],
        "version": [code["FAILED_PRECONDITION"], "ERROR_REASON_VERSION_MISMATCH", "fatal"],
        "unauthenticated": [code["UNAUTHENTICATED"], "ERROR_REASON_UNAUTHENTICATED", "fatal"],
        "superseded": [code["FAILED_PRECONDITION"], "ERROR_REASON_NODE_SUPERSEDED", "fatal"],
    }
