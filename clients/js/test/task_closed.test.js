"use strict";
/**
 * A task the server closed is abandoned (docs/protocol.md §8 "Closed tasks"): a Heartbeat of a busy upload
 * wait answering task_state TASK_STATE_CLOSED or TASK_STATE_UNKNOWN drops the result at once (no further
 * attempt, no FAILED report), as an upload refused for its task does; a Report refused for the task aborts
 * the AbortSignal the trainer runs with, so LinearTrainer stops at its next report and nothing is uploaded.
 * (tests/test_js_task_closed.py: the same drop against a real fedserver.)
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { FakeServer, fail, client } = require("./fake_server.js");
const { LinearTrainer } = require("../src/training/train_task.js");
const { encode, NDArray, Float64 } = require("../src/codec");

const busy = () => fail(grpc.status.RESOURCE_EXHAUSTED, "too many concurrent uploads (1, limit 1)", "ERROR_REASON_UPLOADS_BUSY");
const task = (taskId, payload = Buffer.alloc(0)) => ({ header: { task_id: taskId, round: 1, kind: "TASK_KIND_TRAIN" }, payload });
const succeeding = (result) => ({ run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) });
const outcomes = (fake, taskId) => fake.uploadHeaders.filter((h) => h.task_id === taskId).map((h) => h.outcome);
const beatsOf = (fake, taskId) => fake.heartbeats.filter((b) => b.taskId === taskId);

/** Always busy for SUCCEEDED uploads; heartbeats naming a task answer `state` from the `from`-th on (else ACTIVE). */
function busyServer(state, from) {
  return new FakeServer({
    heartbeatIntervalSeconds: 0.05,
    onUploadHeader: (h) => (h.payload ? busy() : null),
    heartbeatState: (request, f) => (request.task_id && beatsOf(f, request.task_id).length >= from ? state : "TASK_STATE_ACTIVE"),
  });
}

for (const state of ["TASK_STATE_CLOSED", "TASK_STATE_UNKNOWN"]) {
  test(`a busy wait's heartbeat answering ${state} drops the result at once`, async () => {
    const lines = [];
    const fake = busyServer(state, 3);
    await fake.start();
    const c = client(fake, { log: (level, msg) => lines.push(`${level} ${msg}`) });
    try {
      await c.register();
      assert.equal(await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000))), null);
      assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED"]); // no second attempt, no FAILED report
      // at once: the third heartbeat's answer ended the wait (its slices would have gone on to 250-500 ms);
      // counted, not timed (a 2 s bound only measured the machine's load)
      assert.equal(beatsOf(fake, "t1").length, 3);
      assert.deepEqual([...c.held], []);
      assert.deepEqual([...c.delivery.pending.keys()], []);
      const why = `task t1 closed by the server \\(a heartbeat answered task_state ${state}\\)`;
      assert.ok(lines.some((l) => new RegExp(`task t1: result not accepted \\(${why}\\); dropped`).test(l)), lines.join("\n"));
    } finally {
      c.close();
      await fake.stop();
    }
  });
}

test("a busy wait whose heartbeats answer ACTIVE (or a server without task_state) goes on to the upload", async () => {
  for (const state of ["TASK_STATE_ACTIVE", undefined]) {
    let refusals = 0;
    const fake = new FakeServer({
      heartbeatIntervalSeconds: 0.05,
      onUploadHeader: (h) => (h.payload && refusals++ < 1 ? busy() : null),
      heartbeatState: () => state,
    });
    await fake.start();
    const c = client(fake);
    try {
      await c.register();
      assert.equal((await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000)))).received_bytes, 3000);
      assert.deepEqual(outcomes(fake, "t1"), ["TASK_OUTCOME_SUCCEEDED", "TASK_OUTCOME_SUCCEEDED"]);
    } finally {
      c.close();
      await fake.stop();
    }
  }
});

test("a Report refused for its task aborts the trainer's signal: training stops, nothing is uploaded", async () => {
  const SOURCE = "class LinearPlan(NumpyTrainingPlan): ...\n";
  const SHA = crypto.createHash("sha256").update(SOURCE).digest("hex");
  const data = { X: Float64Array.from([1, 0, 0, 1, 1, 1]), y: Float64Array.from([1, 2, 3]), n: 3, d: 2, name: "s", format: "csv" };
  const trainer = new LinearTrainer(data, { tags: ["lsq"], approvedPlans: [SHA] });
  const answers = [];
  const watched = { run: async (...args) => { const a = await trainer.run(...args); answers.push(a); return a; } };
  const doc = encode({
    format: 1, experiment_id: "e", round: 1, plan: { name: "LinearPlan", source: SOURCE, sha256: SHA },
    training_args: { lr: new Float64(0.01), num_updates: 100000, log_interval: 10 }, model_args: {},
    params: { coef: NDArray.zeros([2, 1], "<f8"), intercept: NDArray.zeros([1], "<f8") }, aggregator: "fedavg",
    aggregator_state: {}, dataset_tags: ["lsq"],
  });
  const lines = [];
  const fake = new FakeServer({
    onReport: (request, f) => (f.reports.length >= 3 // a log line, then progress at 10 and 20 steps
      ? fail(grpc.status.FAILED_PRECONDITION, `task ${request.task_id} is no longer accepted (timed out)`, "ERROR_REASON_TASK_CLOSED")
      : null),
  });
  await fake.start();
  const c = client(fake, { log: (level, msg) => lines.push(`${level} ${msg}`) });
  try {
    await c.register();
    assert.equal(await c.handleTask(task("t1", Buffer.from(doc)), watched), null);
    assert.deepEqual(fake.uploadHeaders, []);
    assert.equal(answers[0].outcome, "TASK_OUTCOME_FAILED");
    assert.match(answers[0].errorMessage, /^training stopped after 20 of 100000 steps: task t1 is no longer accepted \(timed out\)$/);
    assert.deepEqual([...c.held], []);
    assert.ok(lines.some((l) => /task t1 is no longer accepted .*; result dropped, nothing uploaded/.test(l)), lines.join("\n"));
  } finally {
    c.close();
    await fake.stop();
  }
});
