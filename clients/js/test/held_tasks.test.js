"use strict";
/**
 * Held tasks (docs/protocol.md §5 "Tasks lost in a dead connection"): every poll of the JS node says which
 * tasks its process holds (reports_held_tasks, held_task_ids): the download it resumes, the tasks it got
 * whole whose result the server has not acknowledged; never on a poll started while another poll stream of
 * the client runs. A silent poll is given up after its wait plus the call timeout, and run() comes back on a
 * fresh channel, registered again, reporting what it holds; a result it could not deliver stays pending
 * and held, and goes before the next poll.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { FakeServer, fail, sendTask, client, checkIdentity } = require("./fake_server.js");

const failedTrainer = { run: async () => ({ outcome: "TASK_OUTCOME_FAILED", errorMessage: "test", payload: null }) };
const until = async (predicate, what, ms = 3000) => {
  const t0 = Date.now();
  while (!predicate()) {
    if (Date.now() - t0 > ms) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

test("every poll reports what the process holds: the download it resumes, a task until its result is acknowledged", async () => {
  const doc = crypto.randomBytes(5 * 1024);
  const fake = await new FakeServer().start();
  fake.script.polls.push(
    sendTask("t1", doc, { cutAfter: 2 }),
    sendTask("t1", doc, { from: 2 * 1024 }),
  );
  const c = client(fake);
  try {
    await c.register();
    await assert.rejects(c.poll(), (e) => e.code === grpc.status.UNAVAILABLE);
    const task = await c.poll(); // resumes t1
    assert.ok(task.payload.equals(doc));
    assert.equal((await c.poll()).kind, "no_task"); // t1 runs: held
    await c.handleTask(task, failedTrainer); // its FAILED report is acknowledged: no longer held
    assert.equal((await c.poll()).kind, "no_task");
    assert.deepEqual(fake.polls.map(({ reports, held, resume }) => [reports, held, resume]), [
      [true, [], ""],
      [true, ["t1"], "t1"],
      [true, ["t1"], ""],
      [true, [], ""],
    ]);
    checkIdentity(fake, c);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a poll started while another poll stream of the client runs does not report held tasks", async () => {
  const fake = await new FakeServer().start();
  fake.script.polls.push(() => {}); // the first poll never answers
  const c = client(fake);
  try {
    const first = c.poll().catch((e) => e);
    await until(() => fake.polls.length === 1, "the first poll");
    assert.equal((await c.poll()).kind, "no_task");
    assert.deepEqual(fake.polls.map(({ reports, held }) => [reports, held]), [[true, []], [false, []]]);
    c.stop(); // cancels the first
    assert.equal((await first).code, grpc.status.CANCELLED);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("run(): a silent poll is given up after wait + call timeout; a fresh channel, Register, and a poll reporting", async () => {
  const fake = await new FakeServer().start();
  fake.script.polls.push(() => {}, sendTask("t2", crypto.randomBytes(3000))); // silent: a dead connection
  const lines = [];
  const c = client(fake, { pollWaitSeconds: 0.2, callTimeoutSeconds: 0.3, log: (level, msg) => lines.push(msg) });
  try {
    const t0 = Date.now();
    await c.run(failedTrainer, { maxTasks: 1 });
    assert.ok(Date.now() - t0 >= 500, "gave up after 0.2 + 0.3 s");
    assert.ok(lines.some((l) => /PollTask: no message from the server for 0.5 s/.test(l)), lines.join("\n"));
    assert.deepEqual(fake.calls.map((x) => x.method), ["Register", "PollTask", "Register", "PollTask", "UploadResult"]);
    assert.equal(c.calls.channels, 2, "registered again on a fresh channel");
    assert.deepEqual(fake.polls.map(({ reports, held }) => [reports, held]), [[true, []], [true, []]]);
    assert.deepEqual([...c.held], []);
    checkIdentity(fake, c);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a result whose upload broke stays pending and held; run() delivers it on a fresh connection before polling", async () => {
  const fake = await new FakeServer({ refuseUploads: [fail(grpc.status.UNAVAILABLE, "connection cut (test)")] }).start();
  fake.script.polls.push(sendTask("t3", crypto.randomBytes(2000)));
  const result = crypto.randomBytes(3000);
  const trainer = { run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) };
  const c = client(fake, { maxUploadAttempts: 1 });
  try {
    await c.register();
    const task = await c.poll();
    await assert.rejects(c.handleTask(task, trainer), (e) => e.code === grpc.status.UNAVAILABLE);
    assert.deepEqual([...c.delivery.pending.keys()], ["t3"]);
    assert.equal((await c.poll()).kind, "no_task");
    assert.deepEqual(fake.polls.at(-1).held, ["t3"], "held while its result is pending");

    const running = c.run(trainer);
    await until(() => fake.uploads.get("t3") && fake.uploads.get("t3").complete, "the delivery");
    await until(() => fake.polls.length === 3, "the next poll");
    c.stop();
    await running;
    assert.deepEqual(fake.calls.map((x) => x.method), ["Register", "PollTask", "UploadResult", "PollTask",
      "GetUploadStatus", "UploadResult", "PollTask"], "delivered before the next poll");
    assert.deepEqual(fake.polls.at(-1).held, []);
    assert.ok(fake.uploads.get("t3").complete && fake.uploads.get("t3").buffer.equals(result));
    assert.deepEqual([...c.held], []);
    assert.equal(c.delivery.pending.size, 0);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("polls are numbered 1, 2, 3 across reconnects; one refused STALE_POLL keeps the download and is made again at once", async () => {
  const { classify } = require("../src/wire/node_client.js");
  const doc = crypto.randomBytes(5 * 1024);
  const stale = fail(grpc.status.ABORTED, "stale PollTask of node js-1: its poll_sequence 2 is not greater than 7",
    "ERROR_REASON_STALE_POLL");
  assert.equal(classify(stale), "retry", "never fatal, never a task drop");
  const fake = await new FakeServer().start();
  const at = [];
  fake.script.polls.push(
    sendTask("t6", doc, { cutAfter: 2 }), // a broken connection: run() reconnects (fresh channel, Register)
    (call) => { at.push(Date.now()); call.emit("error", stale); },
    (call) => { at.push(Date.now()); sendTask("t6", doc, { from: 2 * 1024 })(call); },
  );
  const lines = [];
  const c = client(fake, { log: (level, msg) => lines.push(msg) });
  try {
    await c.run(failedTrainer, { maxTasks: 1 });
    assert.deepEqual(fake.polls.map(({ sequence, resume, held }) => [sequence, resume, held]),
      [[1, "", []], [2, "t6", ["t6"]], [3, "t6", ["t6"]]]);
    assert.equal(fake.registers, 2);
    assert.equal(at.length, 2);
    // polled again at once: no backoff after the stale refusal (the one "retrying in" is the cut connection's);
    // read from the log, not timed: a loaded machine may take longer than a backoff to make the next call
    assert.ok(lines.some((l) => /poll_sequence 2 is not greater than 7; polling again/.test(l)), lines.join("\n"));
    assert.equal(lines.filter((l) => /retrying in/.test(l)).length, 1, lines.join("\n"));
    assert.equal(fake.uploadHeaders.at(-1).task_id, "t6");
  } finally {
    c.close();
    await fake.stop();
  }
});
