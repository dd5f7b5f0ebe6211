"use strict";
/**
 * NodeClient: the node side of fedstream.v1.NodeService (docs/protocol.md §4), step by step:
 *
 *   register()                      RegisterRequest → keeps the server's limits
 *   poll()                          one PollTask long poll (TaskPoller, poller.js) → NoTask | ServerShutdown |
 *                                   a verified task payload; reports the tasks this process holds
 *   report(taskId, events)          Report: progress and log lines
 *   upload(taskId, outcome, ...)    UploadResult in chunks with the digest, resumed via GetUploadStatus
 *   handleTask(task, trainer)       run one task, then deliver its result (ResultDelivery, delivery.js)
 *   run(trainer)                    the loop: register, deliver what is pending, poll, run; reconnects
 *
 * Every call carries the protocol version, the `fedstream-instance-id` metadata (this client's instance id)
 * and, in token modes, `authorization: Bearer <token>` (NodeCalls, calls.js). A refusal is read by its
 * reason, the ErrorReason name in the trailer `fedstream-error-reason` (docs/protocol.md §7; classify() in
 * refusals.js), by its status code when there is none, never by its message. A result the server refuses
 * for itself is replaced by a FAILED report naming the refusal (refusedResultMessage; §4 step 4).
 */
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { PROTOCOL_VERSION } = require("./proto.js");
const { MiB } = require("./chunks.js");
const { NodeCalls } = require("./calls.js");
const { TaskPoller } = require("./poller.js");
const { ResultDelivery, PendingResult } = require("./delivery.js");
const { ConfigError } = require("../errors.js");
const {
  REASON_METADATA_KEY, STALE_POLL_REASON, backoffMs, classify, errorReason, isFatal, refusedResultMessage,
} = require("./refusals.js");

const Status = grpc.status;
/** Codes after which run() opens a fresh channel and registers again: the connection may be dead. */
const RECONNECT_CODES = new Set([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]);
/** How long an upload refused ERROR_REASON_UPLOADS_BUSY is tried again in place (fednode's default). */
const BUSY_UPLOAD_RETRY_MS = 120_000;

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
   * @param {number} [o.callTimeoutSeconds=30] deadline of unary calls; also the margin on a poll's wait
   *   before its silence counts as a dead connection
   * @param {number} [o.idleStreamTimeoutSeconds=120] longest silence between two messages of a task download
   * @param {number} [o.maxPayloadSize] largest task payload accepted, bytes
   * @param {number} [o.maxChunkSize] largest chunk accepted, bytes
   * @param {number} [o.uploadChunkSize] chunk size of uploads (≤ the server's max_chunk_size)
   * @param {number} [o.maxUploadAttempts=8] attempts in place of a broken upload before reconnecting
   * @param {number} [o.busyUploadRetryMs] how long an upload refused UPLOADS_BUSY is tried again in place
   *   before the result is given up and the task reported FAILED (default: fednode's)
   * @param {number} [o.queuedUploadRetryMs=1800000] how long an upload refused UPLOAD_QUEUED (its place in a moving
   *   line kept) is sent again at once before the result is given up and the task reported FAILED (fednode's)
   * @param {number} [o.heartbeatIntervalMs=10000] how often a busy upload's wait sends a Heartbeat naming its
   *   task while the server announced no heartbeat_interval_seconds (fednode's default)
   * @param {number} [o.stopGraceMs=10000] how long stop() lets an upload in flight finish
   * @param {object} [o.channelOptions] extra grpc channel options (e.g. grpc.ssl_target_name_override)
   * @param {(level: string, msg: string) => void} [o.log]
   */
  constructor(o) {
    this.server = o.server;
    this.nodeName = o.nodeName || "";
    this.datasets = o.datasets || [];
    this.capabilities = o.capabilities || [];
    this.clientVersion = o.clientVersion || "fedstream-js/0.1.0";
    if (o.instanceId !== undefined) {
      throw new ConfigError("NodeClient: the instanceId option was removed: every client draws its own instance id, "
        + "because its poll_sequence starts again at 1 and the server refuses the polls of a known instance numbered "
        + "no higher than its last (ERROR_REASON_STALE_POLL); a new client is a new process of the node");
    }
    /** RegisterRequest.instance_id: 128 random bits in hex, drawn once per client (never set, never reused: a
     * client numbers its polls from 1, docs/protocol.md §5 "Stale polls"), sent on every Register and as
     * `fedstream-instance-id` on every call, so the server tells a reconnect (same id) from a restarted node and
     * refuses this client once a newer one registered. */
    this.instanceId = crypto.randomBytes(16).toString("hex");
    this.callTimeoutSeconds = o.callTimeoutSeconds ?? 30;
    const streamAllowanceSeconds = o.streamAllowanceSeconds ?? 600;
    this.limits = { maxPayloadSize: o.maxPayloadSize ?? 4 * 1024 * MiB, maxChunkSize: o.maxChunkSize ?? 16 * MiB };
    this.log = o.log || (() => {});
    this.calls = new NodeCalls({ server: o.server, credentials: o.credentials, token: o.token,
      instanceId: this.instanceId, maxMessageBytes: this.limits.maxChunkSize + 64 * 1024,
      callTimeoutSeconds: this.callTimeoutSeconds, channelOptions: o.channelOptions, protosDir: o.protosDir });
    /** Tasks this process holds besides a download: received whole (or answered unrun), result not acknowledged. */
    this.held = new Set();
    this.poller = new TaskPoller(this.calls, { held: this.held, limits: this.limits,
      pollWaitSeconds: o.pollWaitSeconds ?? 30, callTimeoutSeconds: this.callTimeoutSeconds,
      idleStreamTimeoutSeconds: o.idleStreamTimeoutSeconds ?? 120, streamAllowanceSeconds });
    this.delivery = new ResultDelivery(this.calls, { held: this.held, registration: () => this.registration,
      sleep: (ms) => this.sleep(ms), stopping: () => this.stopped, log: this.log,
      uploadChunkSize: o.uploadChunkSize ?? MiB, maxUploadAttempts: o.maxUploadAttempts ?? 8,
      busyUploadRetryMs: o.busyUploadRetryMs ?? BUSY_UPLOAD_RETRY_MS, heartbeatIntervalMs: o.heartbeatIntervalMs,
      queuedUploadRetryMs: o.queuedUploadRetryMs,
      stopGraceMs: o.stopGraceMs ?? 10_000, streamAllowanceSeconds });
    this.registration = null; // RegisterResponse once registered
    // a unary call refused ERROR_REASON_UNKNOWN_NODE (a server restarted during a task) registers again
    this.calls.registerAgain = async () => {
      const r = await this.register();
      this.log("WARNING", `registered again as ${r.node_id}: the server no longer knew this node (it restarted?)`);
    };
    this.freshChannel = false; // the next Register first opens a fresh channel (the old one may be dead)
    this.stopped = false;
    this.wakeUp = null; // resolves the sleep in progress on stop()
  }

  /** The broken download kept to resume ({taskId, assembler}), or null. */
  get partial() {
    return this.poller.partial;
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

  unary(method, request, timeoutSeconds = this.callTimeoutSeconds) {
    return this.calls.unary(method, request, timeoutSeconds);
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
   * One long poll (TaskPoller.poll): {kind: "no_task"}, {kind: "shutdown", reason, retryAfterSeconds} or
   * {kind: "task", header, payload, reply} (payload: the verified Buffer; reply: what stands for a task this
   * node cannot take, payload null).
   */
  poll() {
    return this.poller.poll(this.registration);
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

  /**
   * Upload a task's result once (with the attempts in place of ResultDelivery.send): `doc` is the encoded
   * result (SUCCEEDED) or null (FAILED / REFUSED: no payload). Rejects with the refusal; nothing stays pending.
   */
  upload(taskId, outcome, errorMessage = "", doc = null) {
    return this.delivery.send(new PendingResult(taskId, outcome, errorMessage, doc));
  }

  /**
   * Run one task with `trainer` (see training/train_task.js), reporting, then deliver its result (or the
   * reply poll() gave for a task this node cannot take). Resolves to the server's answer, or null when the
   * task is gone; rejects when the result stays pending (run() delivers it after reconnecting) or on a
   * fatal refusal. A Report refused for the task (closed, unknown, not ours) or for the node aborts the
   * AbortSignal handed to `trainer.run(header, payload, report, { signal })`, so the trainer can stop early:
   * whatever it then answers is dropped, never uploaded.
   */
  async handleTask(task, trainer) {
    const { header, payload } = task;
    const taskId = header.task_id;
    let answer = task.reply;
    if (!answer) {
      this.log("INFO", `task ${taskId}: round ${header.round}, ${header.kind}, ${payload.length} bytes`);
      let gone = null;
      const abort = new AbortController();
      const report = async (events) => {
        if (gone) return;
        try {
          await this.report(taskId, events);
        } catch (err) {
          const kind = classify(err);
          if (kind === "task" || kind === "fatal") {
            gone = err;
            abort.abort(err);
          } else this.log("WARNING", `report for task ${taskId} failed: ${err.details || err.message}`);
        }
      };
      try {
        answer = await trainer.run(header, payload, report, { signal: abort.signal });
      } catch (err) { // a trainer's bug must never kill the node: it becomes the reply
        answer = { outcome: "TASK_OUTCOME_FAILED", errorMessage: `${err.name || "Error"}: ${err.message}`, payload: null };
      }
      if (gone) {
        if (isFatal(gone)) throw gone; // a newer process of this node registered: it serves the node now
        this.delivery.forget(taskId);
        this.log("WARNING", `task ${taskId} is no longer accepted (${gone.details}); result dropped, nothing uploaded`);
        return null;
      }
    }
    const { outcome, errorMessage } = answer;
    this.log(outcome === "TASK_OUTCOME_SUCCEEDED" ? "INFO" : "WARNING",
      `task ${taskId}: ${outcome}${errorMessage ? ` (${errorMessage})` : ""}`);
    this.delivery.add(taskId, outcome, errorMessage, answer.payload || null);
    return this.delivery.deliver(taskId);
  }

  /**
   * The node loop until stop() (or `maxTasks` tasks handled, 0: no limit): register, deliver the results
   * still pending, poll, run tasks. Retryable failures back off with jitter; those that may mean a dead
   * connection (UNAVAILABLE, a deadline, a silent stream) open a fresh channel and register again; a poll
 * refused as stale (ERROR_REASON_STALE_POLL: that call is dead) is made again at once (backoff after a second).
   * UNAUTHENTICATED, a refused protocol version and a call superseded by a newer process of this node
   * (isFatal) end the loop with the error. Results still pending when it ends are logged.
   */
  async run(trainer, { maxTasks = 0 } = {}) {
    let failures = 0;
    let handled = 0;
    let stale = false; // the last poll was refused as stale: polled again at once; a second one backs off
    try {
      while (!this.stopped) {
        try {
          if (!this.registration) {
            if (this.freshChannel) this.calls.reopen();
            this.freshChannel = false;
            const r = await this.register();
            this.log("INFO", `registered as ${r.node_id} with ${this.server} (server protocol ${r.server_version.major}.${r.server_version.minor})`);
          }
          await this.delivery.deliverAll(); // a result left by a broken connection goes before any poll
          if (maxTasks && handled >= maxTasks) break;
          // stop() during the Register or a delivery above found no poll to cancel: none may start now
          if (this.stopped) break;
          const event = await this.poll();
          failures = 0;
          stale = false;
          if (event.kind === "task") {
            handled += 1;
            await this.handleTask(event, trainer);
          } else if (event.kind === "shutdown") {
            this.log("INFO", `server stopping (${event.reason}); reconnecting in ${event.retryAfterSeconds} s`);
            this.registration = null;
            await this.sleep(event.retryAfterSeconds * 1000 * (1 + Math.random() / 2));
          }
        } catch (err) {
          if (this.stopped) break;
          const kind = classify(err, { aboutTask: Boolean(err.taskId) }); // Register, a fresh poll: about no task
          if (kind === "fatal") throw err;
          if (errorReason(err) === STALE_POLL_REASON && !stale) { // that call is dead, nothing else: poll again
            stale = true;
            this.log("INFO", `${err.details || err.message}; polling again`);
            continue;
          }
          failures += 1;
          if (RECONNECT_CODES.has(err.code)) {
            this.registration = null;
            this.freshChannel = true;
          } else if (errorReason(err) === "ERROR_REASON_UNKNOWN_NODE") this.registration = null;
          const delay = kind === "task" ? 0 : backoffMs(failures);
          this.log("WARNING", `${err.details || err.message}; retrying in ${(delay / 1000).toFixed(1)} s`);
          await this.sleep(delay);
        }
      }
    } finally {
      this.delivery.logUndelivered();
    }
  }

  /** Stop the loop: end the poll in progress at once, give an upload in flight stopGraceMs; run() resolves. */
  stop() {
    this.stopped = true;
    this.calls.cancel("poll");
    this.delivery.startGrace();
    if (this.wakeUp) this.wakeUp();
  }

  close() {
    this.stop();
    this.calls.close();
  }
}

module.exports = {
  NodeClient, backoffMs, isFatal, classify, errorReason, refusedResultMessage, REASON_METADATA_KEY, BUSY_UPLOAD_RETRY_MS,
};
