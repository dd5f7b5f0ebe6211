"use strict";
/**
 * NodeClient: the node side of fedstream.v1.NodeService (docs/protocol.md §4), step by step:
 *
 *   register()                      RegisterRequest → keeps the server's limits
 *   poll()                          one PollTask long poll → NoTask | ServerShutdown | a verified task payload
 *                                   (chunks into one preallocated Buffer, SHA-256 checked; a broken
 *                                   download resumes with resume_task_id / resume_offset)
 *   report(taskId, events)          Report: progress and log lines
 *   upload(taskId, outcome, ...)    UploadResult in chunks with the digest; resumes via GetUploadStatus
 *   run(trainer)                    the loop: register, poll, run, report, upload; reconnects with backoff
 *
 * Every call carries the protocol version, the `fedstream-instance-id` metadata (this client's instance id)
 * and, in token modes, `authorization: Bearer <token>`. A refusal is read by its reason, the ErrorReason
 * name in the trailer `fedstream-error-reason` (docs/protocol.md §7; classify()), by its status code when
 * there is none, never by its message. A result the server refuses for itself is replaced by a FAILED
 * report naming the refusal (handleTask, refusedResultMessage; docs/protocol.md §4 step 4).
 */
const crypto = require("node:crypto");
const { once } = require("node:events");
const grpc = require("@grpc/grpc-js");
const { loadFedstream, PROTOCOL_VERSION } = require("./proto.js");
const { callMetadata } = require("./connection.js");
const { ChunkAssembler, payloadHeader, chunksOf, sha256, MiB } = require("./chunks.js");
const { PayloadError, ProtocolError } = require("../errors.js");

const Status = grpc.status;
/** Trailing metadata entry of the server's error statuses: the name of an ErrorReason (common.proto). */
const REASON_METADATA_KEY = "fedstream-error-reason";
/** Every ErrorReason name this client knows (from the protos); another name counts as no reason. */
const KNOWN_REASONS = loadFedstream().errorReasons;
/** Reasons that stop the node, whatever call they answer. */
const FATAL_REASONS = new Set(["ERROR_REASON_UNAUTHENTICATED", "ERROR_REASON_VERSION_MISMATCH",
  "ERROR_REASON_NODE_SUPERSEDED"]);
/** Reasons that end the task the call named: drop it (its partial download, its result), keep running. */
const TASK_REASONS = new Set(["ERROR_REASON_TASK_CLOSED", "ERROR_REASON_UNKNOWN_TASK",
  "ERROR_REASON_TASK_NOT_SENT_TO_NODE"]);
/** Reasons a new attempt may cure (backoff with jitter; an upload resumes where GetUploadStatus says).
 * ERROR_REASON_UNKNOWN_NODE (reserved: not sent by this server version) means "register again": run()
 * forgets its registration and registers before its next poll. */
const RETRYABLE_REASONS = new Set(["ERROR_REASON_UPLOAD_INCOMPLETE", "ERROR_REASON_DIGEST_MISMATCH",
  "ERROR_REASON_UPLOADS_BUSY", "ERROR_REASON_UPLOAD_IN_PROGRESS", "ERROR_REASON_SERVER_STOPPING",
  "ERROR_REASON_INTERNAL", "ERROR_REASON_UNKNOWN_NODE"]);
/** Without a known reason (gRPC's own statuses, older servers): codes a new attempt may cure... */
const RETRYABLE = new Set([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.RESOURCE_EXHAUSTED, Status.ABORTED,
  Status.DATA_LOSS, Status.CANCELLED, Status.INTERNAL, Status.UNKNOWN]); // the last three: a broken call, as fednode
/** ...and codes of a task-level refusal (the task is gone for this node). */
const TASK_GONE = new Set([Status.FAILED_PRECONDITION, Status.NOT_FOUND, Status.PERMISSION_DENIED]);


/** Exponential backoff with full jitter: uniform in [0.5, 1] × min(cap, base · 2^(attempt−1)). */
function backoffMs(attempt, baseMs = 500, capMs = 15000) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return ceiling * (0.5 + Math.random() / 2);
}

/** The ErrorReason name of a failed call's `fedstream-error-reason` trailer (grpc-js: `err.metadata`), or ""
 * when there is none or this client does not know it (a newer server's: then the status code decides). */
function errorReason(err) {
  const metadata = err && err.metadata;
  const values = metadata && typeof metadata.get === "function" ? metadata.get(REASON_METADATA_KEY) : [];
  const name = values.length ? String(values[0]) : "";
  return KNOWN_REASONS.has(name) ? name : "";
}

/**
 * What a failed call means for the node: "fatal" (stop: bad identity, a protocol major version the server
 * refuses, a call of this process superseded by a newer process of the same node), "task" (drop the task
 * the call named), "retry" (a new attempt may work) or "refused" (this request will fail again as sent).
 * By the reason; without one, by the code: then a FAILED_PRECONDITION of a call about no task (a Register, a
 * fresh poll: `aboutTask` false) can only be another protocol version or a newer process, so it is fatal.
 */
function classify(err, { aboutTask = true } = {}) {
  const reason = errorReason(err);
  if (reason) {
    if (FATAL_REASONS.has(reason)) return "fatal";
    if (TASK_REASONS.has(reason)) return "task";
    return RETRYABLE_REASONS.has(reason) ? "retry" : "refused";
  }
  if (err.code === Status.UNAUTHENTICATED) return "fatal";
  if (TASK_GONE.has(err.code)) return aboutTask || err.code !== Status.FAILED_PRECONDITION ? "task" : "fatal";
  return RETRYABLE.has(err.code) ? "retry" : "refused";
}

/**
 * The error_message of the FAILED report that replaces a result of `size` bytes refused by `err`, as
 * fednode words it ("the server refused the result of N bytes[ after K attempts] (REASON): details"), or
 * null when no report is due. Due for a refusal of the result for itself, which leaves its task open on the
 * server (§4 step 4): any "refused" one (PAYLOAD_TOO_LARGE, MALFORMED_MESSAGE, FRAMING, ...; a result over
 * max_payload_size refused here before sending, PayloadError) but BAD_RESULT_DOCUMENT (the server ended the
 * task FAILED already), and UPLOADS_BUSY (without a reason: RESOURCE_EXHAUSTED) once the retries are used
 * up. Not due when the refusal ends the task ("task"), stops the node ("fatal") or is a broken connection
 * or a cancelled call (CANCELLED, INTERNAL, UNKNOWN without a reason; handleTask: nor after stop()).
 */
function refusedResultMessage(err, size) {
  const reason = errorReason(err);
  const busy = reason ? reason === "ERROR_REASON_UPLOADS_BUSY" : err.code === Status.RESOURCE_EXHAUSTED;
  if (!busy && (classify(err) !== "refused" || reason === "ERROR_REASON_BAD_RESULT_DOCUMENT")) return null;
  if (err instanceof PayloadError) return `the result of ${size} bytes was not sent: ${err.message}`;
  const name = reason || Object.keys(Status).find((k) => Status[k] === err.code) || "no status code";
  const after = err.uploadAttempts > 1 ? ` after ${err.uploadAttempts} attempts` : "";
  return `the server refused the result of ${size} bytes${after} (${name}): ${err.details || err.message}`;
}

/** True for errors that stop the node (classify() says "fatal"). */
function isFatal(err, options) {
  return classify(err, options) === "fatal";
}

class NodeClient {
  /**
   * @param {object} o
   * @param {string} o.server host:port
   * @param {grpc.ChannelCredentials} o.credentials from connection.channelCredentials()
   * @param {string|null} o.token node token (token modes), null with mutual TLS
   * @param {string} o.nodeName display name
   * @param {object[]} o.datasets DatasetInfo messages
   * @param {string[]} o.capabilities
   * @param {number} [o.pollWaitSeconds=30] long-poll wait asked for (capped by the server)
   * @param {number} [o.maxPayloadSize] largest task payload accepted, bytes
   * @param {number} [o.maxChunkSize] largest chunk accepted, bytes
   * @param {number} [o.uploadChunkSize] chunk size of uploads (≤ the server's max_chunk_size)
   * @param {object} [o.channelOptions] extra grpc channel options (e.g. grpc.ssl_target_name_override)
   * @param {string} [o.instanceId] RegisterRequest.instance_id (default: 128 random bits in hex, drawn once
   *   per client and sent on every Register and as `fedstream-instance-id` metadata on every call, so the
   *   server tells a reconnect from a restarted node and refuses this client once a newer one registered)
   * @param {(level: string, msg: string) => void} [o.log]
   */
  constructor(o) {
    this.server = o.server;
    this.token = o.token || null;
    this.nodeName = o.nodeName || "";
    this.datasets = o.datasets || [];
    this.capabilities = o.capabilities || [];
    this.clientVersion = o.clientVersion || "fedstream-js/0.1.0";
    this.instanceId = o.instanceId || crypto.randomBytes(16).toString("hex");
    this.pollWaitSeconds = o.pollWaitSeconds ?? 30;
    this.callTimeoutSeconds = o.callTimeoutSeconds ?? 30;
    this.streamAllowanceSeconds = o.streamAllowanceSeconds ?? 600;
    this.limits = { maxPayloadSize: o.maxPayloadSize ?? 4 * 1024 * MiB, maxChunkSize: o.maxChunkSize ?? 16 * MiB };
    this.uploadChunkSize = o.uploadChunkSize ?? MiB;
    this.maxUploadAttempts = o.maxUploadAttempts ?? 8;
    this.log = o.log || (() => {});
    const { NodeService } = loadFedstream(o.protosDir);
    const message = this.limits.maxChunkSize + 64 * 1024;
    this.stub = new NodeService(this.server, o.credentials, {
      "grpc.max_receive_message_length": message,
      "grpc.max_send_message_length": message,
      "grpc.keepalive_time_ms": 30000,
      "grpc.keepalive_timeout_ms": 20000,
      ...(o.channelOptions || {}),
    });
    this.registration = null; // RegisterResponse once registered
    this.partial = null; // {taskId, assembler} of a broken download
    this.currentCall = null;
    this.stopped = false;
    this.wakeUp = null; // resolves the sleep in progress on stop()
  }

  /** Wait `ms`, or less when stop() is called. */
  sleep(ms) {
    if (this.stopped) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wakeUp = done;
    }).finally(() => {
      this.wakeUp = null;
    });
  }

  deadline(seconds) {
    return new Date(Date.now() + seconds * 1000);
  }

  unary(method, request, timeoutSeconds = this.callTimeoutSeconds) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, callMetadata(this.token, this.instanceId), { deadline: this.deadline(timeoutSeconds) },
        (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  /**
   * Register (again after every reconnect, with the same instance id); keeps the server's limits. A new
   * instance id from the same node tells the server the node restarted: it fails the tasks it had sent.
   */
  async register() {
    const response = await this.unary("Register", {
      version: PROTOCOL_VERSION,
      node_name: this.nodeName,
      datasets: this.datasets,
      capabilities: this.capabilities,
      client_version: this.clientVersion,
      instance_id: this.instanceId,
    });
    this.registration = response;
    return response;
  }

  /**
   * One long poll. Resolves to {kind: "no_task"}, {kind: "shutdown", reason, retryAfterSeconds} or
   * {kind: "task", header, payload} with the verified payload Buffer.
   */
  async poll() {
    const maxWait = this.registration ? this.registration.max_poll_wait_seconds : this.pollWaitSeconds;
    const wait = maxWait > 0 ? Math.min(this.pollWaitSeconds, maxWait) : this.pollWaitSeconds;
    const request = { version: PROTOCOL_VERSION, wait_seconds: wait };
    const resuming = this.partial && this.partial.assembler.keptOffset > 0 ? this.partial : null;
    if (resuming) {
      request.resume_task_id = resuming.taskId;
      request.resume_offset = resuming.assembler.keptOffset;
    }
    const call = this.stub.PollTask(request, callMetadata(this.token, this.instanceId),
      { deadline: this.deadline(wait + this.streamAllowanceSeconds) });
    this.currentCall = call;
    let header = null;
    let assembler = null;
    try {
      for await (const message of call) {
        if (message.event === "no_task") return { kind: "no_task" };
        if (message.event === "shutdown") {
          return { kind: "shutdown", reason: message.shutdown.reason, retryAfterSeconds: message.shutdown.retry_after_seconds };
        }
        if (message.event === "task") {
          header = message.task;
          const p = header.payload || { total_size: 0, sha256: sha256(Buffer.alloc(0)), chunk_size: 1, chunk_count: 0, start_offset: 0 };
          if (resuming && resuming.taskId === header.task_id && p.start_offset > 0) {
            resuming.assembler.resume(p);
            assembler = resuming.assembler;
          } else {
            assembler = new ChunkAssembler(p, this.limits);
          }
          this.partial = { taskId: header.task_id, assembler };
        } else if (message.event === "chunk") {
          if (!assembler) throw new ProtocolError(`chunk at offset ${message.chunk.offset} before any TaskHeader`);
          assembler.add(message.chunk);
        }
      }
    } catch (err) {
      const kind = classify(err); // PayloadError, ProtocolError: "refused"
      if (kind === "task" || kind === "refused") this.partial = null; // gone, or cannot resume: poll afresh next time
      if (err.taskId === undefined) err.taskId = header ? header.task_id : resuming ? resuming.taskId : ""; // for run()
      throw err;
    } finally {
      this.currentCall = null;
      call.cancel();
    }
    if (!assembler) throw new ProtocolError("PollTask stream ended without NoTask, TaskHeader or ServerShutdown");
    if (!assembler.complete) throw new PayloadError(`PollTask stream ended after ${assembler.received} of ${assembler.header.total_size} payload bytes`);
    this.partial = null;
    const payload = assembler.finish();
    return { kind: "task", header, payload };
  }

  /** Report events (ReportEvent messages) for a task. */
  report(taskId, events) {
    return this.unary("Report", { version: PROTOCOL_VERSION, task_id: taskId, events });
  }

  heartbeat(taskId = "") {
    return this.unary("Heartbeat", { version: PROTOCOL_VERSION, task_id: taskId });
  }

  uploadStatus(taskId) {
    return this.unary("GetUploadStatus", { version: PROTOCOL_VERSION, task_id: taskId });
  }

  /** One UploadResult stream: the header, then the chunks from header.start_offset. */
  uploadOnce(taskId, outcome, errorMessage, doc, header) {
    let failed = null;
    const response = new Promise((resolve, reject) => {
      const call = this.stub.UploadResult(callMetadata(this.token, this.instanceId),
        { deadline: this.deadline(this.callTimeoutSeconds + this.streamAllowanceSeconds) },
        (err, res) => {
          if (err) {
            failed = err;
            reject(err);
          } else resolve(res);
        });
      this.currentCall = call;
      (async () => {
        call.write({ header: { version: PROTOCOL_VERSION, task_id: taskId, outcome, error_message: errorMessage, payload: header } });
        if (doc) {
          for (const chunk of chunksOf(doc, header.chunk_size, header.start_offset)) {
            if (failed) return;
            if (!call.write({ chunk })) await Promise.race([once(call, "drain"), response.catch(() => {})]);
          }
        }
        call.end();
      })().catch((err) => {
        failed = err;
        call.cancel();
      });
    });
    return response.finally(() => {
      this.currentCall = null;
    });
  }

  /**
   * Upload a task's result. `doc` is the encoded result (SUCCEEDED) or null (FAILED / REFUSED: no
   * payload). Retries broken uploads from the server's acknowledged offset; after DATA_LOSS, from 0.
   */
  async upload(taskId, outcome, errorMessage = "", doc = null) {
    const serverMax = this.registration ? this.registration.max_chunk_size : 0;
    const chunkSize = serverMax > 0 ? Math.min(this.uploadChunkSize, serverMax) : this.uploadChunkSize;
    const digest = doc ? sha256(doc) : null;
    if (doc && this.registration && this.registration.max_payload_size > 0 && doc.byteLength > this.registration.max_payload_size) {
      throw new PayloadError(`result of ${doc.byteLength} bytes is over the server's max_payload_size ${this.registration.max_payload_size}`);
    }
    let start = 0;
    for (let attempt = 1; ; attempt++) {
      const header = doc ? payloadHeader(doc, chunkSize, start, digest) : null;
      try {
        return await this.uploadOnce(taskId, outcome, errorMessage, doc, header);
      } catch (err) {
        if (attempt >= this.maxUploadAttempts || this.stopped || classify(err) !== "retry") {
          err.uploadAttempts = attempt; // for refusedResultMessage: "after N attempts"
          throw err;
        }
        this.log("WARNING", `upload of task ${taskId} broke (${err.details || err.message}); attempt ${attempt + 1}`);
        const reason = errorReason(err);
        if (reason ? reason === "ERROR_REASON_DIGEST_MISMATCH" : err.code === Status.DATA_LOSS) {
          start = 0;
          continue;
        }
        await this.sleep(backoffMs(attempt));
        const status = await this.uploadStatus(taskId).catch(() => ({ acknowledged_offset: 0, complete: false }));
        if (status.complete) return { task_id: taskId, received_bytes: doc ? doc.byteLength : 0 };
        start = doc && status.acknowledged_offset % chunkSize === 0 ? status.acknowledged_offset : 0;
      }
    }
  }

  /** Run one task with `trainer` (see training/train_task.js), reporting, then upload its result. */
  async handleTask(task, trainer) {
    const { header, payload } = task;
    const taskId = header.task_id;
    this.log("INFO", `task ${taskId}: round ${header.round}, ${header.kind}, ${payload.length} bytes`);
    let gone = null;
    const report = async (events) => {
      if (gone) return;
      try {
        await this.report(taskId, events);
      } catch (err) {
        const kind = classify(err);
        if (kind === "task" || kind === "fatal") gone = err;
        else this.log("WARNING", `report for task ${taskId} failed: ${err.details || err.message}`);
      }
    };
    const { outcome, errorMessage, payload: result } = await trainer.run(header, payload, report);
    if (gone) {
      if (isFatal(gone)) throw gone; // a newer process of this node registered: it serves the node now
      this.log("WARNING", `task ${taskId} is no longer accepted (${gone.details}); result dropped`);
      return null;
    }
    this.log(outcome === "TASK_OUTCOME_SUCCEEDED" ? "INFO" : "WARNING",
      `task ${taskId}: ${outcome}${errorMessage ? ` (${errorMessage})` : ""}`);
    let failedReport = null;
    try {
      return await this.upload(taskId, outcome, errorMessage, result);
    } catch (err) {
      const kind = classify(err);
      failedReport = result && !this.stopped ? refusedResultMessage(err, result.byteLength) : null;
      if (kind === "fatal" || (kind === "retry" && !failedReport)) throw err; // stop; or retries used up: run() backs off
      this.log("WARNING", `task ${taskId}: result not accepted (${err.details || err.message})`
        + (failedReport ? "; reporting the task FAILED" : ""));
      if (!failedReport) return null;
    }
    // the server refused the result for itself and left the task open: without this report the round would
    // wait for the task's inactivity timeout (it never sends the task again: docs/protocol.md §4 step 4)
    try {
      return await this.upload(taskId, "TASK_OUTCOME_FAILED", failedReport, null);
    } catch (err) {
      if (classify(err) === "fatal") throw err;
      this.log("WARNING", `task ${taskId}: FAILED report not accepted (${err.details || err.message})`);
      return null;
    }
  }

  /**
   * The node loop until stop() (or `maxTasks` tasks handled, 0: no limit): register, poll, run tasks.
   * Retryable failures reconnect with backoff and jitter; UNAUTHENTICATED, a refused protocol version
   * and a call superseded by a newer process of this node (isFatal) end the loop with the error.
   */
  async run(trainer, { maxTasks = 0 } = {}) {
    let failures = 0;
    let handled = 0;
    while (!this.stopped) {
      try {
        if (!this.registration) {
          const r = await this.register();
          this.log("INFO", `registered as ${r.node_id} with ${this.server} (server protocol ${r.server_version.major}.${r.server_version.minor})`);
        }
        const event = await this.poll();
        failures = 0;
        if (event.kind === "task") {
          await this.handleTask(event, trainer);
          handled += 1;
          if (maxTasks && handled >= maxTasks) break;
        } else if (event.kind === "shutdown") {
          this.log("INFO", `server stopping (${event.reason}); reconnecting in ${event.retryAfterSeconds} s`);
          this.registration = null;
          await this.sleep(event.retryAfterSeconds * 1000 * (1 + Math.random() / 2));
        }
      } catch (err) {
        if (this.stopped) break;
        const kind = classify(err, { aboutTask: Boolean(err.taskId) }); // Register, a fresh poll: about no task
        if (kind === "fatal") throw err;
        failures += 1;
        if (err.code === Status.UNAVAILABLE || errorReason(err) === "ERROR_REASON_UNKNOWN_NODE") this.registration = null;
        const delay = kind === "task" ? 0 : backoffMs(failures);
        this.log("WARNING", `${err.details || err.message}; retrying in ${(delay / 1000).toFixed(1)} s`);
        await this.sleep(delay);
      }
    }
  }

  /** Stop the loop: cancel the call in progress; run() resolves. */
  stop() {
    this.stopped = true;
    if (this.currentCall) this.currentCall.cancel();
    if (this.wakeUp) this.wakeUp();
  }

  close() {
    this.stop();
    this.stub.close();
  }
}

module.exports = { NodeClient, backoffMs, isFatal, classify, errorReason, refusedResultMessage, REASON_METADATA_KEY };
