"use strict";
/**
 * A scripted NodeService written with grpc-js from the same protos, for the NodeClient tests: PollTask
 * answers come from `script.polls`, uploads keep their bytes per task like fedserver's, every call is
 * recorded (identity metadata, version, the PollTaskRequest fields); refusals carry an ErrorReason in the
 * trailer `fedstream-error-reason`, as fedserver's do.
 */
const assert = require("node:assert/strict");
const grpc = require("@grpc/grpc-js");
const { NodeClient } = require("../src/wire/node_client.js");
const { loadFedstream } = require("../src/wire/proto.js");
const { payloadHeader, chunksOf, sha256 } = require("../src/wire/chunks.js");

const { NodeService } = loadFedstream();
const TOKEN = "tok-123";
/** A status error; with `reason`, an ErrorReason name in the trailer `fedstream-error-reason` (as fedserver). */
function fail(code, details, reason = null) {
  const metadata = new grpc.Metadata();
  if (reason) metadata.set("fedstream-error-reason", reason);
  return Object.assign(new Error(details), { code, details, metadata });
}

/**
 * A NodeService whose PollTask answers come from `script.polls` (functions (call, fake) run in turn)
 * and whose uploads keep their bytes per task, like fedserver's. Script hooks: `register(call, cb)`;
 * `refuseUpload` (every upload) or `refuseUploads` (one per upload, in turn; null accepts); `onUploadHeader
 * (header)`, `onHeartbeat(request)` and `onReport(request)` returning a refusal or nothing; `heartbeatState(request)`
 * returning the HeartbeatResponse.task_state to answer (a TaskState name; nothing: UNSPECIFIED); `breakUploadAfter` chunks;
 * `dataLossOnce`; `heartbeatIntervalSeconds` (announced at Register, 1 by default); `answerDelayMs` (the answer to a complete upload waits this long). `polls` records each
 * PollTaskRequest's held-task fields, `heartbeats` each Heartbeat's task id and time.
 */
class FakeServer {
  constructor(script = {}) {
    this.script = { polls: [], ...script };
    this.calls = [];
    this.registers = 0;
    this.instanceIds = []; // RegisterRequest.instance_id of each Register
    this.uploads = new Map();
    this.uploadHeaders = [];
    this.reports = [];
    this.heartbeats = []; // per Heartbeat: {taskId, at (Date.now())}
    this.polls = []; // per PollTask: {reports, held, resume, sequence}
  }

  seen(method, call, version = (call.request || {}).version) {
    const [auth] = call.metadata.get("authorization");
    const [instance] = call.metadata.get("fedstream-instance-id");
    this.calls.push({ method, auth, instance, version, field: (call.request || {}).instance_id });
  }

  async start() {
    this.server = new grpc.Server();
    this.server.addService(NodeService.service, {
      Register: (call, cb) => {
        this.seen("Register", call);
        this.registers += 1;
        this.instanceIds.push(call.request.instance_id);
        if (this.script.register) return this.script.register(call, cb);
        cb(null, { node_id: "js-1", server_version: { major: 1, minor: 0 }, max_poll_wait_seconds: 2,
          max_chunk_size: 4096, max_payload_size: 1 << 20, heartbeat_interval_seconds: this.script.heartbeatIntervalSeconds ?? 1 });
      },
      PollTask: (call) => {
        this.seen("PollTask", call);
        const r = call.request;
        this.polls.push({ reports: r.reports_held_tasks, held: [...r.held_task_ids], resume: r.resume_task_id,
          sequence: Number(r.poll_sequence || 0) });
        const next = this.script.polls.shift();
        if (next) next(call, this);
        else setTimeout(() => { call.write({ no_task: {} }); call.end(); }, 20);
      },
      UploadResult: (call, cb) => this.upload(call, cb),
      GetUploadStatus: (call, cb) => {
        this.seen("GetUploadStatus", call);
        const u = this.uploads.get(call.request.task_id);
        cb(null, { acknowledged_offset: u ? u.received : 0, complete: Boolean(u && u.complete) });
      },
      Report: (call, cb) => {
        this.seen("Report", call);
        this.reports.push(...call.request.events);
        const refused = this.script.onReport && this.script.onReport(call.request, this);
        if (refused) return cb(refused);
        cb(null, {});
      },
      Heartbeat: (call, cb) => {
        this.seen("Heartbeat", call);
        this.heartbeats.push({ taskId: call.request.task_id, at: Date.now() });
        const refused = this.script.onHeartbeat && this.script.onHeartbeat(call.request, this);
        if (refused) return cb(refused);
        const state = this.script.heartbeatState && this.script.heartbeatState(call.request, this);
        cb(null, { shutting_down: false, task_state: state || "TASK_STATE_UNSPECIFIED" });
      },
    });
    const port = await new Promise((resolve, reject) => {
      this.server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
    });
    this.address = `127.0.0.1:${port}`;
    return this;
  }

  upload(call, cb) {
    let header = null;
    let u = null;
    let chunks = 0;
    let done = false;
    const finish = (err, res) => {
      if (!done) {
        done = true;
        cb(err, res);
      }
    };
    call.on("data", (msg) => {
      if (done) return;
      if (msg.event === "header") {
        header = msg.header;
        this.seen("UploadResult", call, header.version);
        this.uploadHeaders.push(header);
        const refused = this.script.onUploadHeader && this.script.onUploadHeader(header, this);
        if (refused) return finish(refused);
        if (this.script.refuseUpload) return finish(this.script.refuseUpload);
        const refusal = (this.script.refuseUploads || []).shift(); // one per upload, in turn
        if (refusal) return finish(refusal);
        const p = header.payload;
        u = this.uploads.get(header.task_id);
        if (!u || !p || p.start_offset === 0) {
          u = { buffer: Buffer.alloc(p ? p.total_size : 0), received: 0, complete: false, header };
          this.uploads.set(header.task_id, u);
        }
        return;
      }
      const { offset, data } = msg.chunk;
      assert.equal(offset, u.received, "chunks arrive in order from the acknowledged offset");
      data.copy(u.buffer, offset);
      u.received += data.length;
      chunks += 1;
      if (this.script.breakUploadAfter && chunks === this.script.breakUploadAfter) {
        this.script.breakUploadAfter = 0;
        finish(fail(grpc.status.UNAVAILABLE, "connection cut (test)"));
      }
    });
    call.on("end", () => {
      if (done) return;
      const p = header.payload;
      if (p && p.total_size > 0) {
        if (!sha256(u.buffer).equals(p.sha256) || this.script.dataLossOnce) {
          this.script.dataLossOnce = false;
          this.uploads.delete(header.task_id);
          return finish(fail(grpc.status.DATA_LOSS, "SHA-256 mismatch (test)"));
        }
      }
      const answer = () => {
        u.complete = true;
        finish(null, { task_id: header.task_id, received_bytes: u.received });
      };
      if (this.script.answerDelayMs) setTimeout(answer, this.script.answerDelayMs);
      else answer();
    });
  }

  stop() {
    return new Promise((resolve) => this.server.tryShutdown(resolve));
  }
}

/** Poll answer: a task header then chunks [from, to) of doc, then end (or a cut after `cutAfter` chunks). */
function sendTask(taskId, doc, { chunkSize = 1024, from = 0, cutAfter = null, cutWith = null, digest = null, kind = "TASK_KIND_TRAIN" } = {}) {
  return (call) => {
    const payload = payloadHeader(doc, chunkSize, from, digest);
    call.write({ task: { task_id: taskId, experiment_id: "e", round: 1, kind, payload, inactivity_timeout_seconds: 30 } });
    let n = 0;
    for (const chunk of chunksOf(doc, chunkSize, from)) {
      if (cutAfter !== null && n === cutAfter) {
        call.emit("error", cutWith || fail(grpc.status.UNAVAILABLE, "stream cut (test)"));
        return;
      }
      call.write({ chunk });
      n += 1;
    }
    call.end();
  };
}

function client(fake, extra = {}) {
  return new NodeClient({ server: fake.address, credentials: grpc.credentials.createInsecure(), token: TOKEN,
    nodeName: "test", datasets: [], capabilities: ["js"], pollWaitSeconds: 1, uploadChunkSize: 1024, ...extra });
}

/** Every call carried the token, version 1.0 and the client's instance id (metadata; a Register's field too). */
function checkIdentity(fake, c) {
  assert.match(c.instanceId, /^[0-9a-f]{32}$/);
  for (const call of fake.calls) {
    assert.equal(call.auth, `Bearer ${TOKEN}`, `${call.method} carries the token`);
    assert.deepEqual({ ...call.version }, { major: 1, minor: 0 }, `${call.method} carries version 1.0`);
    assert.equal(call.instance, c.instanceId, `${call.method} carries fedstream-instance-id`);
    if (call.method === "Register") assert.equal(call.field, c.instanceId, "equal to RegisterRequest.instance_id");
  }
}

module.exports = { FakeServer, fail, sendTask, client, checkIdentity, TOKEN };
