"use strict";
/**
 * NodeClient against a scripted NodeService written with grpc-js from the same protos: identity, instance
 * id and version on every call, a download cut mid-payload and resumed, an upload cut and resumed from
 * GetUploadStatus, DATA_LOSS, a task it cannot take (bad digest, misframed, over its limits: answered as
 * fednode), a trainer that throws, ServerShutdown, UNAUTHENTICATED, and the whole loop; refusals decided by
 * the error reason in the `fedstream-error-reason` trailer, by the code without one. The scripted server is
 * fake_server.js; held tasks and poll numbering: held_tasks.test.js; busy retries and stop: delivery.test.js.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const { loadFedstream } = require("../src/wire/proto.js");
const { sha256 } = require("../src/wire/chunks.js");
const { LinearTrainer } = require("../src/training/train_task.js");
const { encode, decode, NDArray, Float64 } = require("../src/codec");
const { ConfigError, PayloadError } = require("../src/errors.js");
const { FakeServer, fail, sendTask, client, checkIdentity } = require("./fake_server.js");

test("a download cut mid-payload resumes from the kept offset; an upload cut resumes from GetUploadStatus", async () => {
  const doc = crypto.randomBytes(10 * 1024 + 77);
  const fake = await new FakeServer({ breakUploadAfter: 4 }).start();
  fake.script.polls.push(sendTask("t1", doc, { cutAfter: 3 }), (call) => {
    assert.equal(call.request.resume_task_id, "t1");
    assert.equal(call.request.resume_offset, 3 * 1024);
    sendTask("t1", doc, { from: 3 * 1024 })(call);
  });
  const c = client(fake);
  try {
    const reg = await c.register();
    assert.equal(reg.node_id, "js-1");
    await assert.rejects(c.poll(), (e) => e.code === grpc.status.UNAVAILABLE);
    assert.equal(c.partial.assembler.keptOffset, 3 * 1024);
    const task = await c.poll();
    assert.equal(task.kind, "task");
    assert.ok(task.payload.equals(doc));
    assert.equal(c.partial, null);

    const result = crypto.randomBytes(9000);
    const res = await c.upload("t1", "TASK_OUTCOME_SUCCEEDED", "", result);
    assert.equal(res.received_bytes, 9000);
    assert.ok(fake.uploads.get("t1").buffer.equals(result));
    assert.deepEqual(fake.uploadHeaders.map((h) => h.payload.start_offset), [0, 4096]);
    assert.ok(fake.calls.some((x) => x.method === "GetUploadStatus"));
    await c.report("t1", []);
    await c.heartbeat("t1");
    assert.deepEqual([...new Set(fake.calls.map((x) => x.method))].sort(),
      ["GetUploadStatus", "Heartbeat", "PollTask", "Register", "Report", "UploadResult"]);
    checkIdentity(fake, c);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("DATA_LOSS makes the upload start over from offset 0; FAILED outcomes carry no payload", async () => {
  const fake = await new FakeServer({ dataLossOnce: true }).start();
  const c = client(fake);
  try {
    await c.register();
    const result = crypto.randomBytes(3000);
    await c.upload("t2", "TASK_OUTCOME_SUCCEEDED", "", result);
    assert.deepEqual(fake.uploadHeaders.map((h) => h.payload.start_offset), [0, 0]);
    assert.ok(fake.uploads.get("t2").buffer.equals(result));
    await c.upload("t3", "TASK_OUTCOME_FAILED", "boom");
    const h = fake.uploadHeaders.at(-1);
    assert.deepEqual([h.outcome, h.error_message, h.payload], ["TASK_OUTCOME_FAILED", "boom", null]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a payload whose SHA-256 differs is dropped and the task reported FAILED (as fednode), held until then", async () => {
  const doc = crypto.randomBytes(5000);
  const fake = await new FakeServer().start();
  fake.script.polls.push(sendTask("t4", doc, { digest: sha256(Buffer.from("other")) }));
  const c = client(fake);
  try {
    const bad = await c.poll();
    assert.equal(bad.kind, "task");
    assert.equal(bad.payload, null);
    assert.equal(bad.reply.outcome, "TASK_OUTCOME_FAILED");
    assert.match(bad.reply.errorMessage, /^bad task payload: SHA-256 mismatch/);
    assert.equal(c.partial, null);
    assert.deepEqual([...c.held], ["t4"], "held until its report is acknowledged");
    await c.register();
    assert.equal((await c.handleTask(bad, { run: async () => assert.fail("not run") })).task_id, "t4");
    assert.deepEqual([...c.held], []);
    const h = fake.uploadHeaders.at(-1);
    assert.deepEqual([h.task_id, h.outcome, h.payload], ["t4", "TASK_OUTCOME_FAILED", null]);
    assert.match(h.error_message, /^bad task payload: SHA-256 mismatch/);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("over this node's limits a task is REFUSED at its header; a misframed stream is FAILED", async () => {
  const fake = await new FakeServer().start();
  const doc = crypto.randomBytes(4096);
  fake.script.polls.push(sendTask("big", crypto.randomBytes(6000)), (call) => {
    const payload = require("../src/wire/chunks.js").payloadHeader(doc, 1024);
    call.write({ task: { task_id: "skew", experiment_id: "e", round: 1, kind: "TASK_KIND_TRAIN", payload } });
    call.write({ chunk: { offset: 0, data: doc.subarray(0, 1024) } });
    call.write({ chunk: { offset: 2048, data: doc.subarray(2048, 3072) } }); // a gap
    call.end();
  });
  const c = client(fake, { maxPayloadSize: 5000 });
  try {
    const big = await c.poll();
    assert.equal(big.reply.outcome, "TASK_OUTCOME_REFUSED");
    assert.match(big.reply.errorMessage, /^node refuses the task: payload of 6000 bytes is over this node's limit of 5000/);
    const skew = await c.poll();
    assert.equal(skew.reply.outcome, "TASK_OUTCOME_FAILED");
    assert.equal(skew.reply.errorMessage, "bad task stream: chunk at offset 2048, expected 1024");
    assert.deepEqual([...c.held].sort(), ["big", "skew"]);
    assert.equal(c.partial, null, "nothing to resume");
    assert.deepEqual(fake.polls.map((p) => p.held), [[], ["big"]]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("run(): ServerShutdown makes the node register again; a task is trained, reported and uploaded", async () => {
  const source = "class LinearPlan: ...\n";
  const sha = crypto.createHash("sha256").update(source).digest("hex");
  const task = encode({
    format: 1, experiment_id: "e", round: 1, plan: { name: "LinearPlan", source, sha256: sha },
    training_args: { lr: new Float64(0.1), num_updates: 5 }, model_args: {},
    params: { coef: NDArray.zeros([1, 1], "<f4"), intercept: NDArray.zeros([1], "<f4") },
    aggregator: "fedavg", aggregator_state: {}, dataset_tags: ["t"],
  });
  const fake = await new FakeServer().start();
  fake.script.polls.push(
    (call) => { call.write({ shutdown: { reason: "restarting", retry_after_seconds: 0.01 } }); call.end(); },
    (call) => { call.write({ no_task: {} }); call.end(); },
    sendTask("t5", Buffer.from(task)),
  );
  const data = { X: Float64Array.from([1, 2, 3]), y: Float64Array.from([2, 4, 6]), n: 3, d: 1, name: "d", format: "csv" };
  const c = client(fake);
  try {
    await c.run(new LinearTrainer(data, { tags: ["t"], approvedPlans: [sha] }), { maxTasks: 1 });
    assert.equal(fake.registers, 2);
    // the same process registers again with the same instance id: the server keeps its tasks
    assert.match(fake.instanceIds[0], /^[0-9a-f]{32}$/);
    assert.deepEqual(fake.instanceIds, [c.instanceId, c.instanceId]);
    const other = client(fake);
    other.close();
    assert.notEqual(other.instanceId, c.instanceId, "another client (process) draws another id");
    const stored = fake.uploads.get("t5");
    assert.ok(stored.complete);
    assert.equal(stored.header.outcome, "TASK_OUTCOME_SUCCEEDED");
    const result = decode(stored.buffer);
    assert.deepEqual([result.num_steps, result.num_samples], [5, 15]);
    assert.ok(result.params.coef.values[0] > 0, "moved toward y = 2x");
    assert.ok(fake.reports.some((e) => e.event === "progress" && Number(e.progress.iteration) === 5));
    checkIdentity(fake, c);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("an instance id cannot be set: each client draws its own (its polls are numbered from 1)", () => {
  const fake = { address: "127.0.0.1:1" }; // never called: the constructor refuses first
  for (const instanceId of ["0123456789abcdef0123456789abcdef", ""]) {
    assert.throws(() => client(fake, { instanceId }), (err) => err instanceof ConfigError
      && /^NodeClient: the instanceId option was removed: every client draws its own instance id, because its poll_sequence starts again at 1 .*ERROR_REASON_STALE_POLL/.test(err.message));
  }
});

test("run() stops at once with UNAUTHENTICATED instead of retrying", async () => {
  const fake = await new FakeServer({
    register: (call, cb) => cb(fail(grpc.status.UNAUTHENTICATED, "unknown or revoked token")),
  }).start();
  const c = client(fake);
  try {
    await assert.rejects(c.run({ run: async () => assert.fail("no task expected") }),
      (e) => e.code === grpc.status.UNAUTHENTICATED);
    assert.equal(fake.registers, 1);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("stop() ends a long poll and a backoff promptly", async () => {
  const fake = await new FakeServer().start();
  fake.script.polls.push(() => {}); // never answers
  const c = client(fake, { pollWaitSeconds: 30 });
  try {
    const running = c.run({ run: async () => assert.fail("no task expected") });
    while (fake.polls.length === 0) await new Promise((r) => setTimeout(r, 5)); // the long poll is open
    const t0 = Date.now();
    c.stop();
    await running;
    assert.ok(Date.now() - t0 < 1000);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("stop() during the Register: run() ends without starting a poll", async () => {
  const fake = await new FakeServer({
    register: (call, cb) => {
      c.stop(); // SIGTERM while the node registers: no poll is running for stop() to cancel
      cb(null, { node_id: "js-1", server_version: { major: 1, minor: 0 }, max_poll_wait_seconds: 30 });
    },
  }).start();
  fake.script.polls.push(() => {}); // a poll would wait its 30 s
  const c = client(fake, { pollWaitSeconds: 30 });
  try {
    await c.run({ run: async () => assert.fail("no task expected") });
    assert.deepEqual(fake.calls.map((x) => x.method), ["Register"]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("classify: by the reason in the trailer when there is one, by the code otherwise, never by the message", () => {
  const { classify, isFatal, errorReason } = require("../src/wire/node_client.js");
  const FP = grpc.status.FAILED_PRECONDITION;
  const superseded = fail(FP, "task t1 is no longer accepted", "ERROR_REASON_NODE_SUPERSEDED");
  assert.equal(errorReason(superseded), "ERROR_REASON_NODE_SUPERSEDED");
  assert.equal(isFatal(superseded), true);
  assert.equal(classify(fail(FP, "protocol version 2.0 is not supported", "ERROR_REASON_VERSION_MISMATCH")), "fatal");
  assert.equal(classify(fail(grpc.status.UNAUTHENTICATED, "token revoked", "ERROR_REASON_UNAUTHENTICATED")), "fatal");
  assert.equal(classify(fail(FP, "superseded by a newer instance of the node", "ERROR_REASON_TASK_CLOSED")), "task");
  assert.equal(classify(fail(grpc.status.NOT_FOUND, "no task", "ERROR_REASON_UNKNOWN_TASK")), "task");
  assert.equal(classify(fail(grpc.status.PERMISSION_DENIED, "not yours", "ERROR_REASON_TASK_NOT_SENT_TO_NODE")), "task");
  assert.equal(classify(fail(grpc.status.INVALID_ARGUMENT, "ended early", "ERROR_REASON_UPLOAD_INCOMPLETE")), "retry");
  assert.equal(classify(fail(grpc.status.RESOURCE_EXHAUSTED, "busy", "ERROR_REASON_UPLOADS_BUSY")), "retry");
  assert.equal(classify(fail(grpc.status.RESOURCE_EXHAUSTED, "too large", "ERROR_REASON_PAYLOAD_TOO_LARGE")), "refused");
  assert.equal(classify(fail(grpc.status.INVALID_ARGUMENT, "bad chunk", "ERROR_REASON_FRAMING")), "refused");
  // reserved (not sent by this server version): "register again", which run() does after a "retry"
  assert.equal(classify(fail(grpc.status.NOT_FOUND, "node not registered", "ERROR_REASON_UNKNOWN_NODE")), "retry");
  // no reason (gRPC's own statuses, an older server) or one this client does not know (a newer server): the code
  for (const reason of [null, "ERROR_REASON_FROM_THE_FUTURE"]) {
    assert.equal(errorReason(fail(FP, "x", reason)), "");
    assert.equal(classify(fail(FP, "superseded by a newer instance of the node", reason)), "task");
    assert.equal(classify(fail(FP, "protocol version 2.0", reason), { aboutTask: false }), "fatal"); // Register, fresh poll
    assert.equal(classify(fail(grpc.status.NOT_FOUND, "no task", reason), { aboutTask: false }), "task");
    assert.equal(classify(fail(grpc.status.UNAUTHENTICATED, "token revoked", reason)), "fatal");
    assert.equal(classify(fail(grpc.status.UNAVAILABLE, "superseded by a newer instance", reason)), "retry");
    assert.equal(classify(fail(grpc.status.INVALID_ARGUMENT, "resume at offset 0", reason)), "refused");
  }
  assert.equal(classify(new PayloadError("SHA-256 mismatch")), "refused");
});

test("every reason the client names is an ErrorReason of the protos", () => {
  const dir = path.join(__dirname, "..", "src", "wire");
  const source = fs.readdirSync(dir).map((f) => fs.readFileSync(path.join(dir, f), "utf8")).join("\n");
  const { errorReasons } = loadFedstream();
  const named = new Set(source.match(/ERROR_REASON_[A-Z_]+/g));
  assert.ok(named.size >= 10);
  named.delete("ERROR_REASON_UNSPECIFIED"); // proto.js leaves it out of the known reasons
  for (const name of named) assert.ok(errorReasons.has(name), `${name} is not in common.proto`);
});

test("run() ends with the error when an upload is refused as superseded, and polls no more", async () => {
  const superseded = fail(grpc.status.FAILED_PRECONDITION, "call of node js-1 superseded by a newer instance of the "
    + "node: instance b registered at 10:00:00.000 in place of instance a; this call belongs to an earlier process",
  "ERROR_REASON_NODE_SUPERSEDED");
  const fake = await new FakeServer({ refuseUpload: superseded }).start();
  fake.script.polls.push(sendTask("t6", crypto.randomBytes(100)));
  const c = client(fake);
  try {
    const trainer = { run: async () => ({ outcome: "TASK_OUTCOME_FAILED", errorMessage: "no data", payload: null }) };
    await assert.rejects(c.run(trainer), (e) => e.code === grpc.status.FAILED_PRECONDITION && /superseded/.test(e.details));
    assert.deepEqual(fake.calls.map((x) => x.method), ["Register", "PollTask", "UploadResult"]);
    checkIdentity(fake, c);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("an upload refused UPLOAD_INCOMPLETE resumes from GetUploadStatus; one refused PAYLOAD_TOO_LARGE is not retried", async () => {
  const fake = await new FakeServer({ refuseUploads: [
    fail(grpc.status.INVALID_ARGUMENT, "upload of task t7 ended after 0 of 5000 bytes; resume at offset 0",
      "ERROR_REASON_UPLOAD_INCOMPLETE"),
  ] }).start();
  const c = client(fake);
  try {
    await c.register();
    const result = crypto.randomBytes(5000);
    await c.upload("t7", "TASK_OUTCOME_SUCCEEDED", "", result);
    assert.ok(fake.uploads.get("t7").buffer.equals(result));
    assert.equal(fake.uploadHeaders.length, 2);
    assert.ok(fake.calls.some((x) => x.method === "GetUploadStatus"));

    // RESOURCE_EXHAUSTED is retryable by its code, but this reason says the payload will never fit
    fake.script.refuseUploads.push(fail(grpc.status.RESOURCE_EXHAUSTED, "announced payload of 5000 bytes exceeds ...",
      "ERROR_REASON_PAYLOAD_TOO_LARGE"));
    await assert.rejects(c.upload("t8", "TASK_OUTCOME_SUCCEEDED", "", result),
      (e) => e.code === grpc.status.RESOURCE_EXHAUSTED);
    assert.equal(fake.uploadHeaders.filter((h) => h.task_id === "t8").length, 1);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("run(): a download refused TASK_CLOSED mid-payload is dropped; the next poll starts afresh", async () => {
  const doc = crypto.randomBytes(6 * 1024);
  const closed = fail(grpc.status.FAILED_PRECONDITION, "task t9 is no longer accepted (round cancelled)",
    "ERROR_REASON_TASK_CLOSED");
  const fake = await new FakeServer().start();
  const trained = [];
  const resumes = [];
  fake.script.polls.push(sendTask("t9", doc, { cutAfter: 2, cutWith: closed }), (call) => {
    resumes.push([call.request.resume_task_id, call.request.resume_offset]);
    sendTask("t10", doc)(call);
  });
  const c = client(fake);
  try {
    const trainer = { run: async (header) => {
      trained.push(header.task_id);
      return { outcome: "TASK_OUTCOME_FAILED", errorMessage: "test", payload: null };
    } };
    await c.run(trainer, { maxTasks: 1 });
    assert.deepEqual(trained, ["t10"]);
    assert.deepEqual(resumes, [["", 0]], "the partial download of t9 was dropped, not resumed");
    const polls = fake.calls.filter((x) => x.method === "PollTask");
    assert.equal(polls.length, 2);
    assert.equal(fake.registers, 1, "a task refusal keeps the session");
  } finally {
    c.close();
    await fake.stop();
  }
});

test("a result the server refuses for itself is replaced by a FAILED report naming the refusal (as fednode)", async () => {
  const fake = await new FakeServer({ refuseUploads: [
    fail(grpc.status.RESOURCE_EXHAUSTED, "announced payload of 5000 bytes exceeds this server's limit of 1024 bytes",
      "ERROR_REASON_PAYLOAD_TOO_LARGE"),
    null, // one refusal per upload, in turn: the FAILED report of t11 is accepted
    fail(grpc.status.INVALID_ARGUMENT, "result of task t12 does not decode", "ERROR_REASON_BAD_RESULT_DOCUMENT"),
  ] }).start();
  const c = client(fake);
  const result = crypto.randomBytes(5000);
  const trainer = { run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) };
  const task = (taskId) => ({ header: { task_id: taskId, round: 1, kind: "TASK_KIND_TRAIN" }, payload: Buffer.alloc(0) });
  const headers = (taskId) => fake.uploadHeaders.filter((h) => h.task_id === taskId)
    .map((h) => [h.outcome, h.error_message, h.payload ? h.payload.total_size : 0]);
  try {
    await c.register();
    await c.handleTask(task("t11"), trainer);
    assert.deepEqual(headers("t11"), [["TASK_OUTCOME_SUCCEEDED", "", 5000], ["TASK_OUTCOME_FAILED",
      "the server refused the result of 5000 bytes (ERROR_REASON_PAYLOAD_TOO_LARGE): announced payload of 5000 "
      + "bytes exceeds this server's limit of 1024 bytes", 0]]);
    assert.equal(fake.uploads.get("t11").complete, true, "the FAILED report was accepted");

    // the server ended this task FAILED itself: nothing to report
    assert.equal(await c.handleTask(task("t12"), trainer), null);
    assert.deepEqual(headers("t12").map((h) => h[0]), ["TASK_OUTCOME_SUCCEEDED"]);

    // busy: delivery.test.js
    // a task the refusal ends is only dropped
    fake.script.refuseUploads.push(fail(grpc.status.FAILED_PRECONDITION, "task t14 is no longer accepted",
      "ERROR_REASON_TASK_CLOSED"));
    assert.equal(await c.handleTask(task("t14"), trainer), null);
    assert.equal(headers("t14").length, 1);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("refusedResultMessage: a report only for a result refused for itself", () => {
  const { refusedResultMessage } = require("../src/wire/node_client.js");
  const S = grpc.status;
  assert.equal(refusedResultMessage(fail(S.INVALID_ARGUMENT, "chunk out of order", "ERROR_REASON_FRAMING"), 10),
    "the server refused the result of 10 bytes (ERROR_REASON_FRAMING): chunk out of order");
  assert.match(refusedResultMessage(fail(S.INVALID_ARGUMENT, "no header", "ERROR_REASON_MALFORMED_MESSAGE"), 10),
    /\(ERROR_REASON_MALFORMED_MESSAGE\): no header$/);
  assert.match(refusedResultMessage(fail(S.RESOURCE_EXHAUSTED, "busy"), 10), /\(RESOURCE_EXHAUSTED\): busy$/); // no reason
  const busy = Object.assign(fail(S.RESOURCE_EXHAUSTED, "busy", "ERROR_REASON_UPLOADS_BUSY"), { busy: { attempts: 1, ms: 120049 } });
  assert.equal(refusedResultMessage(busy, 10), // fednode's words
    "the server refused the result of 10 bytes after 1 attempt over 120.0 s (ERROR_REASON_UPLOADS_BUSY): busy");
  assert.equal(refusedResultMessage(new PayloadError("result of 10 bytes is over the server's max_payload_size 5"), 10),
    "the result of 10 bytes was not sent: result of 10 bytes is over the server's max_payload_size 5");
  for (const [code, reason] of [[S.FAILED_PRECONDITION, "ERROR_REASON_TASK_CLOSED"], [S.UNAVAILABLE, null],
    [S.INVALID_ARGUMENT, "ERROR_REASON_BAD_RESULT_DOCUMENT"], [S.INVALID_ARGUMENT, "ERROR_REASON_UPLOAD_INCOMPLETE"],
    [S.FAILED_PRECONDITION, "ERROR_REASON_NODE_SUPERSEDED"], [S.NOT_FOUND, "ERROR_REASON_UNKNOWN_NODE"],
    [S.CANCELLED, null], [S.INTERNAL, null], [S.UNKNOWN, null]]) { // broken or cancelled calls: no verdict
    assert.equal(refusedResultMessage(fail(code, "words", reason), 10), null, `${reason || code}: no report`);
  }
});

test("a trainer that throws does not kill the node: the task is reported FAILED with the error", async () => {
  const fake = await new FakeServer().start();
  const c = client(fake);
  const task = { header: { task_id: "t15", round: 1, kind: "TASK_KIND_TRAIN" }, payload: Buffer.alloc(0) };
  try {
    await c.register();
    await c.handleTask(task, { run: async () => { throw new RangeError("index 7 out of range"); } });
    const h = fake.uploadHeaders.at(-1);
    assert.deepEqual([h.task_id, h.outcome, h.error_message], ["t15", "TASK_OUTCOME_FAILED", "RangeError: index 7 out of range"]);
    assert.deepEqual([...c.held], []);
  } finally {
    c.close();
    await fake.stop();
  }
});
