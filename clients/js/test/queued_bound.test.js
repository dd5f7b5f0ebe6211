"use strict";
/**
 * Queued retries are bounded (review R3, defence in depth): an upload refused ERROR_REASON_UPLOAD_QUEUED is
 * sent again at once, but for at most queuedUploadRetryMs from the first queued refusal; past it the result is
 * given up and the task reported FAILED naming the refusal, as after busyUploadRetryMs. Before, there was no
 * bound but the task's life, and a server whose line never let the result in got re-sends without end.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { FakeServer, fail, client } = require("./fake_server.js");
const { QUEUED_JITTER_MS, QUEUED_UPLOAD_RETRY_MS } = require("../src/wire/delivery.js");

const queued = () => fail(grpc.status.RESOURCE_EXHAUSTED, "upload queued: waited 0.5 s in line, the longest an upload "
  + "waits, while the line moved (too many concurrent uploads (16, limit 16)); its place is kept for 120 s: upload "
  + "again now", "ERROR_REASON_UPLOAD_QUEUED");
const task = (taskId) => ({ header: { task_id: taskId, round: 1, kind: "TASK_KIND_TRAIN" }, payload: Buffer.alloc(0) });
const succeeding = (result) => ({ run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) });

test("UPLOAD_QUEUED past queuedUploadRetryMs is reported FAILED naming the refusal", async () => {
  const fake = await new FakeServer({ onUploadHeader: (h) => (h.payload ? queued() : null) }).start();
  const delays = []; // the pause before each queued re-send, ms, as logged ("uploading again in 0.04 s")
  const log = (level, msg) => {
    const m = msg.match(/still queued on the server .*; uploading again in (\d\.\d\d) s$/);
    if (m) delays.push(Number(m[1]) * 1000);
  };
  const c = client(fake, { maxUploadAttempts: 1, busyUploadRetryMs: 100, log });
  assert.equal(c.delivery.queuedUploadRetryMs, QUEUED_UPLOAD_RETRY_MS);
  assert.equal(QUEUED_UPLOAD_RETRY_MS, 1_800_000);
  c.delivery.queuedUploadRetryMs = 500;
  try {
    await c.register();
    const t0 = Date.now();
    await c.handleTask(task("t1"), succeeding(crypto.randomBytes(3000)));
    const elapsed = Date.now() - t0;
    assert.ok(elapsed >= 500, `${elapsed} ms`);
    const sent = fake.uploadHeaders.filter((h) => h.task_id === "t1");
    // sent again past busyUploadRetryMs (0.1 s) until queuedUploadRetryMs (0.5 s), each time at once: a jitter
    // under QUEUED_JITTER_MS, no backoff (how many attempts fit depends on the machine's speed, not the rule)
    assert.ok(sent.length - 1 >= 2, `${sent.length - 1} queued attempts`);
    assert.equal(delays.length, sent.length - 2, "a pause before every re-send, none after the last refusal");
    assert.ok(delays.every((ms) => ms <= QUEUED_JITTER_MS), `pauses ${delays} ms`);
    const last = sent.at(-1);
    assert.equal(last.outcome, "TASK_OUTCOME_FAILED");
    assert.match(last.error_message, new RegExp(`^the server refused the result of 3000 bytes after ${sent.length - 1} `
      + "attempts over \\d+\\.\\d s \\(ERROR_REASON_UPLOAD_QUEUED\\): upload queued: waited 0\\.5 s in line"));
    assert.ok(fake.uploads.get("t1").complete, "the FAILED report was accepted");
    assert.deepEqual([...c.held], []);
  } finally {
    c.close();
    await fake.stop();
  }
});
