"use strict";
/**
 * Result delivery: an upload refused ERROR_REASON_UPLOADS_BUSY is tried again for busyUploadRetryMs from its
 * first busy refusal (not a number of attempts), then given up and the task reported FAILED naming the
 * refusal; stop() lets an upload in flight, and the FAILED report that replaces a result refused meanwhile,
 * finish within stopGraceMs; what is left is cancelled and logged, naming the task. The command line does the
 * same on SIGTERM.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { spawn } = require("node:child_process");
const grpc = require("@grpc/grpc-js");
const { encode, NDArray, Float64 } = require("../src/codec");
const { FakeServer, fail, sendTask, client } = require("./fake_server.js");
const { QUEUED_JITTER_MS } = require("../src/wire/delivery.js");

const busy = () => fail(grpc.status.RESOURCE_EXHAUSTED, "too many concurrent uploads (16, limit 16)", "ERROR_REASON_UPLOADS_BUSY");
const tooLarge = () => fail(grpc.status.RESOURCE_EXHAUSTED, "announced payload of 3000 bytes exceeds this server's "
  + "limit of 1024 bytes", "ERROR_REASON_PAYLOAD_TOO_LARGE");
const task = (taskId) => ({ header: { task_id: taskId, round: 1, kind: "TASK_KIND_TRAIN" }, payload: Buffer.alloc(0) });
const succeeding = (result) => ({ run: async () => ({ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: result }) });
const headers = (fake, taskId) => fake.uploadHeaders.filter((h) => h.task_id === taskId)
  .map((h) => [h.outcome, h.error_message, h.payload ? h.payload.total_size : 0]);

test("UPLOADS_BUSY is tried again for busyUploadRetryMs, however many attempts, then reported FAILED", async () => {
  let busyLeft = 2; // busy refusals still to give (counted, not timed: a slow start must not use them up)
  const fake = await new FakeServer({ onUploadHeader: (h) => (h.payload && busyLeft-- > 0 ? busy() : null) }).start();
  const waits = []; // [task, ms] of each busy wait, as logged ("retrying task t2 in 0.37 s")
  const log = (level, msg) => {
    const m = msg.match(/^server busy with other uploads .*; retrying task (\S+) in (\d+\.\d\d) s/);
    if (m) waits.push([m[1], Number(m[2]) * 1000]);
  };
  const c = client(fake, { maxUploadAttempts: 1, busyUploadRetryMs: 5000, log });
  const result = crypto.randomBytes(3000);
  try {
    await c.register();
    // busy twice: more attempts than maxUploadAttempts (which bounds broken uploads only), then accepted
    assert.equal((await c.handleTask(task("t1"), succeeding(result))).received_bytes, 3000);
    const attempts = headers(fake, "t1");
    assert.ok(attempts.length === 3 && attempts.every((h) => h[0] === "TASK_OUTCOME_SUCCEEDED"), JSON.stringify(attempts));
    assert.ok(fake.uploads.get("t1").complete);

    // busy for longer than busyUploadRetryMs: given up after that time, the task reported FAILED
    busyLeft = Infinity;
    c.delivery.busyUploadRetryMs = 600;
    const t0 = Date.now();
    await c.handleTask(task("t2"), succeeding(result));
    const elapsed = Date.now() - t0;
    assert.ok(elapsed >= 600, `${elapsed} ms`);
    // the waits stop at the window's end (the last one is cut to what is left of it): they add up to at most
    // 600 ms (logged to 10 ms), however long the attempts between them took
    const waited = waits.filter(([id]) => id === "t2").map(([, ms]) => ms);
    assert.ok(waited.length >= 1 && waited.reduce((a, b) => a + b) <= 600 + 5 * waited.length, `waits ${waited} ms`);
    const sent = headers(fake, "t2");
    const [outcome, message] = sent.at(-1);
    assert.equal(outcome, "TASK_OUTCOME_FAILED");
    assert.match(message, new RegExp(`^the server refused the result of 3000 bytes after ${sent.length - 1} attempts `
      + "over (\\d+\\.\\d) s \\(ERROR_REASON_UPLOADS_BUSY\\): too many concurrent uploads \\(16, limit 16\\)$"));
    const over = Number(message.match(/over (\d+\.\d) s/)[1]);
    assert.ok(over >= 0.6 && over * 1000 <= elapsed + 50, `${over} s of ${elapsed} ms`);
    assert.ok(sent.length - 1 >= 2);
    const beats = fake.calls.filter((x) => x.method === "Heartbeat").length;
    assert.equal(beats, fake.uploadHeaders.length - 3, "one Heartbeat naming the task per busy wait: each is shorter than the announced 1 s");
    assert.ok(fake.uploads.get("t2").complete, "the FAILED report was accepted");
    assert.deepEqual([...c.held], []);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("stop() lets the upload in flight finish within stopGraceMs, and the FAILED report replacing a refused result", async () => {
  const fake = await new FakeServer({ answerDelayMs: 300 }).start();
  const lines = [];
  const c = client(fake, { stopGraceMs: 3000, log: (level, msg) => lines.push(msg) });
  fake.script.polls.push(sendTask("t3", crypto.randomBytes(100)));
  fake.script.onUploadHeader = (h) => {
    c.stop(); // SIGTERM while the result goes out
    return h.payload ? tooLarge() : null;
  };
  try {
    await c.run(succeeding(crypto.randomBytes(3000)));
    assert.deepEqual(headers(fake, "t3"), [["TASK_OUTCOME_SUCCEEDED", "", 3000], ["TASK_OUTCOME_FAILED",
      "the server refused the result of 3000 bytes (ERROR_REASON_PAYLOAD_TOO_LARGE): announced payload of 3000 bytes "
      + "exceeds this server's limit of 1024 bytes", 0]]);
    assert.ok(fake.uploads.get("t3").complete, "the FAILED report was delivered after stop()");
    assert.ok(!lines.some((l) => /not delivered/.test(l)), lines.join("\n"));
  } finally {
    c.close();
    await fake.stop();
  }
});

test("stop(): an upload still running after stopGraceMs is cancelled, and its task logged as not delivered", async () => {
  const answerDelayMs = 5000;
  const fake = await new FakeServer({ answerDelayMs }).start();
  const lines = [];
  const c = client(fake, { stopGraceMs: 200, log: (level, msg) => lines.push(`${level} ${msg}`) });
  fake.script.polls.push(sendTask("t4", crypto.randomBytes(100)));
  fake.script.onUploadHeader = () => { setTimeout(() => c.stop(), 50); };
  try {
    const t0 = Date.now();
    await c.run(succeeding(crypto.randomBytes(3000)));
    assert.ok(Date.now() - t0 < answerDelayMs, "cancelled, not answered"); // stopGraceMs 200 after stop()
    assert.equal(fake.uploads.get("t4").complete, false);
    assert.ok(lines.includes("WARNING task t4: stopping with its result of 3000 bytes not delivered; the server ends the "
      + "task when this node's reconnect grace expires, or at once when a new process of the node registers"), lines.join("\n"));
    assert.deepEqual([...c.delivery.pending.keys()], ["t4"]);
  } finally {
    c.close();
    await fake.stop();
  }
});

test("the command line on SIGTERM delivers the FAILED report that replaces a refused result, then exits 0", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fedstream-js-"));
  const data = path.join(dir, "site.csv");
  fs.writeFileSync(data, "x,y\n1,2\n2,4\n3,6\n");
  const source = "class LinearPlan: ...\n";
  const sha = crypto.createHash("sha256").update(source).digest("hex");
  const doc = encode({
    format: 1, experiment_id: "e", round: 1, plan: { name: "LinearPlan", source, sha256: sha },
    training_args: { lr: new Float64(0.1), num_updates: 3 }, model_args: {},
    params: { coef: NDArray.zeros([1, 1], "<f4"), intercept: NDArray.zeros([1], "<f4") },
    aggregator: "fedavg", aggregator_state: {}, dataset_tags: [],
  });
  const fake = await new FakeServer({ answerDelayMs: 200 }).start();
  fake.script.polls.push(sendTask("t5", Buffer.from(doc)));
  fs.writeFileSync(path.join(dir, "token"), "tok-123\n");
  const child = spawn(process.execPath, [path.join(__dirname, "..", "src", "cli.js"), "--server", fake.address,
    "--tls", "insecure", "--token-file", path.join(dir, "token"), "--data", data, "--target", "y",
    "--approve-plan", sha, "--poll-wait", "1"], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (b) => { stderr += b; });
  fake.script.onUploadHeader = (h) => {
    if (!h.payload) return null;
    child.kill("SIGTERM");
    return fail(grpc.status.RESOURCE_EXHAUSTED, "announced payload too large (test)", "ERROR_REASON_PAYLOAD_TOO_LARGE");
  };
  try {
    const [code] = await Promise.race([
      new Promise((resolve) => child.on("exit", (c, signal) => resolve([c, signal]))),
      new Promise((resolve) => setTimeout(() => resolve(["timeout"]), 15000)),
    ]);
    assert.equal(code, 0, stderr);
    assert.match(stderr, /SIGTERM: stopping/);
    const last = fake.uploadHeaders.at(-1);
    assert.equal(last.outcome, "TASK_OUTCOME_FAILED");
    assert.match(last.error_message, /\(ERROR_REASON_PAYLOAD_TOO_LARGE\): announced payload too large \(test\)$/);
    assert.ok(fake.uploads.get("t5").complete, stderr);
  } finally {
    if (child.exitCode === null) child.kill("SIGKILL");
    await fake.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("UPLOAD_QUEUED is sent again at once, outside busyUploadRetryMs, and ends a run of busy refusals", async () => {
  const queued = () => fail(grpc.status.RESOURCE_EXHAUSTED, "upload queued: waited 0.5 s in line, the longest an upload "
    + "waits, while the line moved (too many concurrent uploads (16, limit 16)); its place is kept for 120 s: upload "
    + "again now", "ERROR_REASON_UPLOAD_QUEUED");
  // busy once (within the 0.4 s window), then queued at least 4 times and for at least 1 s (2.5 windows: the
  // window would have run out), busy once more (a fresh window: it started afresh after the queued refusals),
  // then accepted. The phases follow the refusals, not a clock started with the test: a slow start shortens none.
  let phase = "busy";
  let queuedSince = null;
  let queuedCount = 0;
  const refusal = () => {
    if (phase === "busy") {
      phase = "queued";
      return busy();
    }
    if (phase === "queued") {
      queuedSince ??= Date.now();
      queuedCount += 1;
      if (queuedCount <= 4 || Date.now() - queuedSince < 1000) return queued();
      phase = "busy again";
      return busy();
    }
    return null;
  };
  const fake = await new FakeServer({ onUploadHeader: (h) => (h.payload ? refusal() : null) }).start();
  const lines = [];
  const c = client(fake, { maxUploadAttempts: 1, busyUploadRetryMs: 400, log: (level, msg) => lines.push(msg) });
  const result = crypto.randomBytes(3000);
  try {
    await c.register();
    assert.equal((await c.handleTask(task("t1"), succeeding(result))).received_bytes, 3000);
    const attempts = headers(fake, "t1");
    assert.ok(attempts.every((h) => h[0] === "TASK_OUTCOME_SUCCEEDED"), JSON.stringify(attempts));
    assert.ok(fake.uploads.get("t1").complete);
    const queuedLines = lines.filter((l) => l.includes("still queued on the server"));
    // at once: a jitter under 0.1 s between queued attempts, so many more than backoffs would allow
    assert.ok(queuedLines.length >= 4, `${queuedLines.length} queued attempts in 1 s`);
    assert.match(queuedLines[0], /^result of task t1 still queued on the server after 1 wait in line \(upload queued: .*\); uploading again in \d\.\d\d s$/);
    // a jitter drawn in [0, QUEUED_JITTER_MS), printed to 10 ms: 0.10 s when it rounds up from 0.0995 s
    for (const line of queuedLines) {
      const delay = Number(line.match(/uploading again in (\d\.\d\d) s$/)[1]);
      assert.ok(delay <= QUEUED_JITTER_MS / 1000, line);
    }
  } finally {
    c.close();
    await fake.stop();
  }
});
