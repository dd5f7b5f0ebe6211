"use strict";
/**
 * A server that has no registration of this node (it restarted while the node trained: no stream broke)
 * refuses its calls NOT_FOUND ERROR_REASON_UNKNOWN_NODE (docs/protocol.md §7). A unary call so refused
 * registers again and is made once more (NodeCalls.unary), so a Report of a running task re-registers the node
 * at once and then learns that the restarted server knows no such task (the trainer is aborted, nothing is
 * uploaded); a refused poll makes run() register before its next poll. (tests/test_js_unknown_node.py: the
 * same against a real fedserver restarted on its port.)
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const grpc = require("@grpc/grpc-js");
const { FakeServer, fail, sendTask, client } = require("./fake_server.js");
const { encode } = require("../src/codec");

const UNKNOWN = "node js-1 has not registered with this server (it restarted?): register again";
const unknownNode = () => fail(grpc.status.NOT_FOUND, UNKNOWN, "ERROR_REASON_UNKNOWN_NODE");
const unknownTask = (id) => fail(grpc.status.NOT_FOUND, `no task with id ${id}`, "ERROR_REASON_UNKNOWN_TASK");

/** A fake server that forgets its registrations on restart() (and refuses the node's calls until it registers
 * again); it knows no task after a restart. */
function restartingServer({ registerDelayMs = 0 } = {}) {
  const fake = new FakeServer({
    register: (call, cb) => setTimeout(() => {
      fake.known = true;
      cb(null, { node_id: "js-1", server_version: { major: 1, minor: 0 }, max_poll_wait_seconds: 2,
        max_chunk_size: 4096, max_payload_size: 1 << 20, heartbeat_interval_seconds: 1 });
    }, registerDelayMs),
    onReport: (request, f) => (!f.known ? unknownNode() : f.restarts && request.task_id ? unknownTask(request.task_id) : null),
    onHeartbeat: (request, f) => (f.known ? null : unknownNode()),
  });
  fake.known = false;
  fake.restarts = 0;
  fake.restart = () => {
    fake.known = false;
    fake.restarts += 1;
  };
  return fake;
}

test("a Report refused UNKNOWN_NODE during a task registers again, then the unknown task aborts the trainer", async () => {
  const lines = [];
  const fake = restartingServer();
  await fake.start();
  const c = client(fake, { log: (level, msg) => lines.push(`${level} ${msg}`) });
  try {
    await c.register();
    fake.restart(); // while the task runs
    let aborted = null;
    let reports = 0;
    const trainer = {
      run: async (header, payload, report, { signal }) => {
        for (; reports < 50 && !signal.aborted; reports++) await report([]);
        aborted = signal.aborted ? signal.reason : null;
        return { outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: encode({ trained: true }) };
      },
    };
    const answer = await c.handleTask({ header: { task_id: "t1", round: 2, kind: "TASK_KIND_TRAIN" },
      payload: Buffer.alloc(0) }, trainer);
    assert.equal(answer, null); // dropped: the restarted server knows no such task
    assert.equal(reports, 1, "the first report already re-registered and learned that the task is unknown");
    assert.equal(aborted.details, "no task with id t1");
    assert.equal(fake.registers, 2);
    assert.deepEqual(fake.calls.map((x) => x.method), ["Register", "Report", "Register", "Report"]);
    assert.equal(fake.uploadHeaders.length, 0, "nothing uploaded");
    assert.ok(lines.some((l) => l === "WARNING registered again as js-1: the server no longer knew this node (it restarted?)"),
      lines.join("\n"));
  } finally {
    c.close();
    await fake.stop();
  }
});

test("calls refused UNKNOWN_NODE at the same time register again once, and each is made once more", async () => {
  const fake = restartingServer({ registerDelayMs: 200 }); // every refusal is in before the Register ends
  await fake.start();
  const c = client(fake);
  try {
    const answers = await Promise.all([c.heartbeat(), c.heartbeat("t9"), c.report("", [])]);
    assert.equal(answers.length, 3);
    assert.equal(fake.registers, 1);
    assert.equal(c.registration.node_id, "js-1");
    assert.equal(fake.calls.filter((x) => x.method !== "Register").length, 6); // each refused once, then answered
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a Register is never retried for UNKNOWN_NODE, and a second refusal of the retried call is returned", async () => {
  const fake = new FakeServer({ onHeartbeat: () => unknownNode() }); // never knows the node
  await fake.start();
  const c = client(fake);
  try {
    await assert.rejects(c.heartbeat(), (err) => err.code === grpc.status.NOT_FOUND && err.details === UNKNOWN);
    assert.equal(fake.registers, 1); // registered once, the call retried once, then the refusal
    assert.deepEqual(fake.calls.map((x) => x.method), ["Heartbeat", "Register", "Heartbeat"]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a poll refused UNKNOWN_NODE makes run() register again before its next poll", async () => {
  const fake = restartingServer();
  fake.script.polls.push((call) => call.emit("error", unknownNode()), sendTask("t1", encode({ round: 1 })));
  await fake.start();
  const c = client(fake);
  try {
    const trainer = { run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: encode({ ok: 1 }) }) };
    await c.run(trainer, { maxTasks: 1 });
    assert.deepEqual(fake.calls.map((x) => x.method).slice(0, 4), ["Register", "PollTask", "Register", "PollTask"]);
    assert.equal(fake.uploads.get("t1").complete, true);
  } finally {
    c.close();
    await fake.stop();
  }
});
