"use strict";
/**
 * A busy upload's wait keeps its task alive: a Heartbeat naming the task when the wait starts and then at
 * least every heartbeat interval the server announced (not once per wait: a busy refusal is no activity, and
 * a backoff wait may outlast the task's inactivity timeout). A heartbeat refused for its task drops the
 * result; one refused for the node rejects; any other failure leaves the wait going; stop() ends the wait at
 * once. (tests/test_js_busy_wait.py runs the same against a real fedserver whose upload slot is held.)
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { FakeServer, fail, client } = require("./fake_server.js");
const { DEFAULT_HEARTBEAT_INTERVAL_MS } = require("../src/wire/delivery.js");

const busy = () => fail(grpc.status.RESOURCE_EXHAUSTED, "too many concurrent uploads (1, limit 1)", "ERROR_REASON_UPLOADS_BUSY");
const task = (taskId) => ({ header: { task_id: taskId, round: 1, kind: "TASK_KIND_TRAIN" }, payload: Buffer.alloc(0) });
const succeeding = (result) => ({ run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) });
const outcomes = (fake, taskId) => fake.uploadHeaders.filter((h) => h.task_id === taskId).map((h) => h.outcome);
const beatsOf = (fake, taskId) => fake.heartbeats.filter((b) => b.taskId === taskId);

/** A fake server refusing the first `count` SUCCEEDED uploads UPLOADS_BUSY, noting for each refusal how many
 * heartbeats it had received by then (the client waits for each heartbeat's answer before it goes on: a wait's
 * heartbeats reach the server between its refusal and the next attempt). */
function busyServer(count, script = {}) {
  const refusedAfter = [];
  const fake = new FakeServer({
    ...script,
    onUploadHeader: (h, f) => {
      if (!h.payload || refusedAfter.length >= count) return null;
      refusedAfter.push(f.heartbeats.length);
      return busy();
    },
  });
  return { fake, refusedAfter };
}

test("heartbeats come at the announced interval all through each busy wait", async () => {
  const intervalMs = 100;
  const { fake, refusedAfter } = busyServer(3, { heartbeatIntervalSeconds: intervalMs / 1000 });
  await fake.start();
  const waits = []; // each busy wait's length, ms, as the client logs it ("retrying task t1 in 0.37 s")
  const log = (level, msg) => {
    const m = msg.match(/^server busy with other uploads .*; retrying task t1 in (\d+\.\d\d) s/);
    if (m) waits.push(Number(m[1]) * 1000);
  };
  const c = client(fake, { heartbeatIntervalMs: 60_000, log }); // the announced interval wins
  try {
    await c.register();
    const t0 = Date.now();
    assert.equal((await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000)))).received_bytes, 3000);
    assert.deepEqual(outcomes(fake, "t1"), Array(4).fill("TASK_OUTCOME_SUCCEEDED"));
    // backoff waits of 250-500, 500-1000 and 1000-2000 ms: several slices each
    assert.ok(Date.now() - t0 >= 1750, `${Date.now() - t0} ms`);
    assert.equal(waits.length, 3);
    assert.equal(beatsOf(fake, "t1").length, fake.heartbeats.length, "every heartbeat names the task");
    // a wait of W ms is slept in slices of at most the interval, with a heartbeat before each: ceil(W / interval)
    // heartbeats (W is logged to 10 ms: ±0.05 slice). Counted, not timed: a loaded machine stretches the slices
    // (each gap is a slice plus the heartbeat's round trip) but never changes how many there are. Once per wait,
    // or at heartbeatIntervalMs, would be one heartbeat per wait.
    for (const [i, ms] of waits.entries()) {
      const beats = (refusedAfter[i + 1] ?? fake.heartbeats.length) - refusedAfter[i];
      const slices = ms / intervalMs;
      assert.ok(beats >= slices - 0.05 && beats < slices + 1.05, `wait ${i} of ${ms} ms: ${beats} heartbeats`);
    }
  } finally {
    c.close();
    await fake.stop();
  }
});

test("without an announced interval a busy wait heartbeats every heartbeatIntervalMs", async () => {
  const { fake } = busyServer(2, { heartbeatIntervalSeconds: 0 });
  await fake.start();
  const c = client(fake, { heartbeatIntervalMs: 100 });
  try {
    await c.register();
    await c.handleTask(task("t1"), succeeding(crypto.randomBytes(100)));
    assert.ok(beatsOf(fake, "t1").length >= 5, `${beatsOf(fake, "t1").length} heartbeats over 750-1500 ms of waits`);
    assert.equal(DEFAULT_HEARTBEAT_INTERVAL_MS, 10_000, "fednode's default heartbeat_interval_seconds");
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a heartbeat refused for its task drops the result: no further attempt, no FAILED report", async () => {
  const lines = [];
  const { fake } = busyServer(Infinity, { heartbeatIntervalSeconds: 0.05 });
  fake.script.onHeartbeat = (request, f) => (beatsOf(f, request.task_id).length >= 3
    ? fail(grpc.status.FAILED_PRECONDITION, `task ${request.task_id} is no longer accepted (timed out)`, "ERROR_REASON_TASK_CLOSED")
    : null);
  await fake.start();
  const c = client(fake, { log: (level, msg) => lines.push(`${level} ${msg}`) });
  try {
    await c.register();
    assert.equal(await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000))), null);
    assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED"]);
    assert.equal(beatsOf(fake, "t1").length, 3);
    assert.deepEqual([...c.held], []);
    assert.deepEqual([...c.delivery.pending.keys()], []);
    assert.ok(lines.some((l) => /task t1: result not accepted \(task t1 is no longer accepted \(timed out\)\); dropped/.test(l)),
      lines.join("\n"));
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a heartbeat that fails otherwise leaves the wait going", async () => {
  for (const refusal of [fail(grpc.status.UNAVAILABLE, "heartbeat cut (test)"),
    fail(grpc.status.INVALID_ARGUMENT, "bad heartbeat (test)", "ERROR_REASON_MALFORMED_MESSAGE")]) {
    const { fake } = busyServer(1, { heartbeatIntervalSeconds: 0.05 });
    fake.script.onHeartbeat = (request, f) => (beatsOf(f, request.task_id).length % 2 ? refusal : null);
    await fake.start();
    const c = client(fake);
    try {
      await c.register();
      assert.equal((await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000)))).received_bytes, 3000);
      assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED", "TASK_OUTCOME_SUCCEEDED"]);
      assert.ok(beatsOf(fake, "t1").length >= 3);
      assert.equal(fake.registers, 1);
    } finally {
      c.close();
      await fake.stop();
    }
  }
});

test("a heartbeat refused for the node rejects the delivery, the result kept pending", async () => {
  const { fake } = busyServer(Infinity, { heartbeatIntervalSeconds: 0.05 });
  fake.script.onHeartbeat = () => fail(grpc.status.FAILED_PRECONDITION, "a newer process registered (test)",
    "ERROR_REASON_NODE_SUPERSEDED");
  await fake.start();
  const c = client(fake);
  try {
    await c.register();
    await assert.rejects(c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000))),
      (err) => err.details === "a newer process registered (test)");
    assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED"]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("stop() ends a sliced busy wait at once", async () => {
  const { fake } = busyServer(Infinity, { heartbeatIntervalSeconds: 0.05 });
  await fake.start();
  const c = client(fake, { stopGraceMs: 5000 });
  try {
    await c.register();
    const delivery = c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000)));
    const settled = delivery.then(() => "resolved", () => "rejected");
    while (beatsOf(fake, "t1").length < 3) await new Promise((resolve) => setTimeout(resolve, 5));
    const t0 = Date.now();
    c.stop();
    assert.equal(await settled, "rejected", "the result stays pending");
    assert.ok(Date.now() - t0 < 500, `${Date.now() - t0} ms`);
    const beats = beatsOf(fake, "t1").length;
    await new Promise((resolve) => setTimeout(resolve, 150));
    assert.equal(beatsOf(fake, "t1").length, beats, "no heartbeat after stop()");
    assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED"]);
    assert.deepEqual([...c.delivery.pending.keys()], ["t1"]);
  } finally {
    c.close();
    await fake.stop();
  }
});
