"""The JavaScript node (clients/js) registers again when a restarted FedServer no longer knows it, as fednode.

The server is stopped while the JS node trains (it reports progress every 0.1 s, no stream open) and a new one
starts on the same port: the node's next Report is refused ERROR_REASON_UNKNOWN_NODE, the client registers
again (with its datasets) and sends the Report again, which the new server refuses for the task (unknown
there): the trainer is aborted, nothing is uploaded, and the node serves the new server's next task.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import eventually
from fake_node_service import arun
from js_node_support import js_node, needs_node
from test_node_client_fedserver import server_config

from fedcore.wire import DatasetInfo, TaskKind
from fedserver.auth import NodeStore
from fedserver.server import FedServer
from fedserver.tasks import TaskState

pytestmark = needs_node

SCRIPT = r"""
const grpc = require("@grpc/grpc-js");
const { NodeClient } = require("./src/wire/node_client.js");
const { encode } = require("./src/codec");
const args = JSON.parse(process.argv[1]);
const log = (level, msg) => process.stderr.write(`${level} ${msg}\n`);
const c = new NodeClient({ server: args.server, credentials: grpc.credentials.createInsecure(), token: args.token,
  nodeName: "js", log, pollWaitSeconds: 1,
  datasets: [{ name: "lsq", tags: ["lsq"], num_samples: 40, shape: [40, 3], dtype: "float32", format: "npz" }] });
let aborted = null;
const trainer = { run: async (header, payload, report, { signal }) => {
  if (header.round === 1) {
    log("INFO", "training round 1");
    const until = Date.now() + 30000;
    while (!signal.aborted && Date.now() < until) {
      await report([]);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    aborted = signal.aborted ? signal.reason.details : null;
  }
  return { outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: encode({ round: header.round }) };
} };
c.run(trainer, { maxTasks: 2 }).then(() => {
  console.log(JSON.stringify({ aborted, pending: c.delivery.pending.size }));
  c.close();
}, (e) => { console.error(e); process.exit(1); });
"""


def test_the_javascript_node_registers_again_with_a_server_restarted_while_it_trains(tmp_path: Path) -> None:
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("js-1")
        first = FedServer(server_config(), store)
        port = await first.start()
        second = None
        try:
            async with js_node(SCRIPT, f"127.0.0.1:{port}", token, tmp_path / "js-node.log") as node:
                await first.wait_for_nodes(1, timeout=10)
                lost = first.dispatch("js-1", TaskKind.TRAIN, first.encode_payload({"w": 1}), experiment_id="e",
                                      round=1)
                await eventually(lambda: "training round 1" in node.log(), 10, "the JS node to train", node.log)
                await first.stop(grace=0.5)
                second = FedServer(server_config(port=port), store)
                await second.start()
                assert await second.wait_for_nodes(1, timeout=5) == ["js-1"], node.log()
                record = second.registry.get("js-1")
                assert record.datasets == (DatasetInfo("lsq", ("lsq",), 40, (40, 3), "float32", "npz"),)
                handle = second.dispatch("js-1", TaskKind.TRAIN, second.encode_payload({"w": 2}),
                                         experiment_id="e", round=2)
                result = await handle.result(timeout=10)
                summary = await node.summary()
                log = node.log()
        finally:
            await first.stop(grace=0.5)
            if second is not None:
                await second.stop(grace=0.5)
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"round": 2}, log
        assert summary["pending"] == 0 and summary["aborted"].startswith(f"no task with id {lost.task_id!r}"), summary
        assert "registered again as js-1: the server no longer knew this node (it restarted?)" in log, log

    arun(scenario())
