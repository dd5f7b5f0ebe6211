"use strict";
/**
 * ResultDelivery: the results this node still has to deliver, and their uploads (docs/protocol.md §4 step
 * 4, §5 "Resuming an upload").
 *
 * A result (SUCCEEDED with its encoded document, or FAILED / REFUSED without one) stays pending until the
 * server acknowledges it (UploadResultResponse, or GetUploadStatus.complete) or the task is gone; a broken
 * connection keeps it, and run() delivers it on the next connection before it polls, resuming where
 * GetUploadStatus says, as fednode's pending upload. Its task counts as held meanwhile (`held`, reported on
 * every poll: §5 "Tasks lost in a dead connection").
 *
 * Attempts: a broken upload is tried again in place up to `maxUploadAttempts` times (backoff with jitter,
 * resuming from the acknowledged offset; after DATA_LOSS from 0), then left to run()'s reconnect. An upload
 * refused ERROR_REASON_UPLOADS_BUSY (no upload buffer free on the server) is tried again in place for
 * `busyUploadRetryMs` from its first busy refusal, however many attempts that takes, as fednode. A busy
 * refusal is no activity on the server, so each wait says the task is alive: a Heartbeat naming it when the
 * wait starts, then at least every heartbeat interval the server announced (RegisterResponse
 * .heartbeat_interval_seconds; `heartbeatIntervalMs` before it announced one), the wait slept in slices of
 * that interval that stop() cuts short (docs/protocol.md §4 step 3); otherwise a wait longer than the task's
 * inactivity timeout (a backoff ceiling is 15 s) would lose the result. A heartbeat whose answer says the task
 * is gone (task_state TASK_STATE_CLOSED or TASK_STATE_UNKNOWN: its round is over, it timed out, it was
 * cancelled, or the server knows no such task for this node) ends the wait at once and drops the result, as
 * an upload refused for its task does; so does a heartbeat refused for its task. A heartbeat refused for the
 * node is fatal; any other failure leaves the wait going (a server older than task_state answers
 * UNSPECIFIED: the wait runs to its end and the next upload is refused for the task). A result the
 * server refuses for itself (too large, malformed, misframed, or still busy after that time) is replaced by a
 * FAILED report naming the refusal (refusedResultMessage), delivered the same way; a refusal that ends the
 * task (closed, unknown, not ours, a result document that does not decode) drops it.
 *
 * An upload refused ERROR_REASON_UPLOAD_QUEUED (it waited the server's longest in an upload line that moved
 * meanwhile; its place is kept) is sent again at once, after a jitter of at most QUEUED_JITTER_MS: no backoff,
 * no heartbeat (the server counts the task active while it waits in line), not counted toward
 * busyUploadRetryMs; it ends a run of busy refusals instead (the line moved: the busy window starts afresh at
 * the next one), as fednode. The line is oldest first and keeps the place, so each wait brings the turn
 * nearer; once the task ends the upload is refused for the task ("task"), which drops the result, and stop()
 * ends the retries too. As a defence against a server whose line never lets the result in, queued retries are
 * bounded by `queuedUploadRetryMs` from the first queued refusal (QUEUED_UPLOAD_RETRY_MS, 1800 s, by default,
 * as fednode's queued_upload_retry_seconds): past it the result is replaced by a FAILED report naming the
 * refusal, as after busyUploadRetryMs.
 *
 * Stopping: once stop() is called, an upload in flight, and the FAILED report that replaces a result refused
 * meanwhile, get `stopGraceMs` from stop() (or from the start of a later delivery) to finish; no new attempt
 * is made after a failure. What is still pending is then cancelled and logged as not delivered (the server
 * ends such a task when the node's reconnect grace expires, or at once when a new process of the node
 * registers: fednode keeps nothing on disk either).
 */
const { once } = require("node:events");
const grpc = require("@grpc/grpc-js");
const { PROTOCOL_VERSION } = require("./proto.js");
const { payloadHeader, chunksOf, sha256, MiB } = require("./chunks.js");
const { backoffMs, classify, errorReason, isBusy, isQueued, refusedResultMessage, taskGone } = require("./refusals.js");
const { PayloadError } = require("../errors.js");

/** Longest pause before sending again an upload refused UPLOAD_QUEUED, ms (uniform jitter from 0, as fednode). */
const QUEUED_JITTER_MS = 100;
/** How long an upload refused UPLOAD_QUEUED is sent again by default, ms, from its first queued refusal (as
 * fednode's NodeConfig.queued_upload_retry_seconds): a generous multiple of a long line's clearing time. */
const QUEUED_UPLOAD_RETRY_MS = 1_800_000;
/** Heartbeat interval of a busy wait while the server announced none (fednode's heartbeat_interval_seconds). */
const DEFAULT_HEARTBEAT_INTERVAL_MS = 10_000;

/** A task's result waiting to be delivered. `doc` is the encoded document (SUCCEEDED) or null. */
class PendingResult {
  constructor(taskId, outcome, errorMessage = "", doc = null) {
    this.taskId = taskId;
    this.outcome = outcome;
    this.errorMessage = errorMessage;
    this.doc = doc;
    this.digest = doc ? sha256(doc) : null;
    this.chunkSize = 0; // fixed by the first attempt: a resume must describe the same payload
    this.attempted = false; // an UploadResult was started: ask GetUploadStatus before the next one
  }

  get size() {
    return this.doc ? this.doc.byteLength : 0;
  }

  /** What the pending result is, for log lines. */
  describe() {
    const what = this.doc ? `result of ${this.size} bytes` : `${this.outcome} report`;
    return this.errorMessage ? `${what} (${this.errorMessage})` : what;
  }
}

class ResultDelivery {
  /**
   * @param {import("./calls.js").NodeCalls} calls
   * @param {object} o
   * @param {Set<string>} o.held the tasks the process holds (TaskPoller); a task leaves it once delivered or gone
   * @param {() => object|null} o.registration the RegisterResponse in force (max_chunk_size, max_payload_size)
   * @param {(ms: number) => Promise<void>} o.sleep a wait that stop() cuts short
   * @param {() => boolean} o.stopping whether stop() was called
   * @param {(level: string, msg: string) => void} o.log
   * @param {number} o.uploadChunkSize chunk size of uploads (≤ the server's max_chunk_size)
   * @param {number} o.maxUploadAttempts attempts in place of a broken upload before run() reconnects
   * @param {number} o.busyUploadRetryMs how long an upload refused UPLOADS_BUSY is tried again in place
   * @param {number} [o.queuedUploadRetryMs=1800000] how long an upload refused UPLOAD_QUEUED is sent again
   *   (at once each time) before the result is reported FAILED, from the first queued refusal
   * @param {number} [o.heartbeatIntervalMs=10000] heartbeat interval of busy waits while the server announced
   *   none (fednode's default heartbeat_interval_seconds)
   * @param {number} o.stopGraceMs how long an upload in flight may finish after stop()
   * @param {number} o.streamAllowanceSeconds deadline of an upload stream beyond the call timeout
   */
  constructor(calls, o) {
    this.calls = calls;
    this.held = o.held;
    this.registration = o.registration;
    this.sleep = o.sleep;
    this.stopping = o.stopping;
    this.log = o.log;
    this.uploadChunkSize = o.uploadChunkSize ?? MiB;
    this.maxUploadAttempts = o.maxUploadAttempts;
    this.busyUploadRetryMs = o.busyUploadRetryMs;
    this.queuedUploadRetryMs = o.queuedUploadRetryMs ?? QUEUED_UPLOAD_RETRY_MS;
    this.heartbeatIntervalMs = o.heartbeatIntervalMs ?? DEFAULT_HEARTBEAT_INTERVAL_MS;
    this.stopGraceMs = o.stopGraceMs;
    this.streamAllowanceSeconds = o.streamAllowanceSeconds;
    this.pending = new Map(); // task id -> PendingResult, in the order they came
    this.delivering = 0; // deliveries in progress
    this.graceTimer = null;
    this.graceOver = false; // stopGraceMs passed since stop(): uploads are cancelled, none starts
  }

  /** Queue a task's result (replacing an earlier one of the same task); its task stays held. */
  add(taskId, outcome, errorMessage = "", doc = null) {
    const result = new PendingResult(taskId, outcome, errorMessage, doc);
    this.pending.set(taskId, result);
    this.held.add(taskId);
    return result;
  }

  /** The task is done for this node (its result acknowledged, or the task gone): no longer pending nor held. */
  forget(taskId) {
    this.pending.delete(taskId);
    this.held.delete(taskId);
  }

  /** Deliver every pending result, oldest first; rejects with the first failure that keeps one pending. */
  async deliverAll() {
    for (const result of [...this.pending.values()]) await this.deliver(result);
  }

  /**
   * Deliver `result` (a PendingResult, or a task id of a pending one). Resolves to the UploadResultResponse
   * (or {task_id, received_bytes} when GetUploadStatus says the server has it), or null when the result was
   * dropped: its task is gone, or the refused report could not be replaced. Rejects (the result stays
   * pending) on a failure a later attempt may cure, on stop, and on a fatal refusal.
   */
  async deliver(result) {
    if (typeof result === "string") result = this.pending.get(result);
    if (!result) return null;
    this.delivering += 1;
    if (this.stopping()) this.startGrace();
    try {
      for (;;) {
        if (this.graceOver) throw Object.assign(new Error("stopping: the grace for uploads is over"), { stopped: true });
        try {
          const response = await this.send(result);
          this.forget(result.taskId);
          return response;
        } catch (err) {
          const kind = classify(err);
          const busy = isBusy(err);
          if (kind === "fatal" || this.stopping() && busy) throw err;
          const report = result.doc ? (queuedOutMessage(err, result.size) ?? refusedResultMessage(err, result.size)) : null;
          if (kind === "retry" && !report) throw err; // run() reconnects and delivers it again
          this.log("WARNING", `task ${result.taskId}: result not accepted (${err.details || err.message})`
            + (report ? "; reporting the task FAILED" : "; dropped"));
          if (!report) {
            this.forget(result.taskId);
            return null;
          }
          // the server refused the result for itself and left the task open: without this report the round
          // would wait for the task's inactivity timeout (the server never sends it again: §4 step 4, §5)
          result = this.add(result.taskId, "TASK_OUTCOME_FAILED", report, null);
        }
      }
    } finally {
      this.delivering -= 1;
      if (this.delivering === 0) this.endGrace();
    }
  }

  /**
   * Send `result` with the attempts in place (see the module docstring); resolves to the server's answer,
   * rejects with the last failure (`busy` = {attempts, ms} set when the busy retries are used up).
   */
  async send(result) {
    const registration = this.registration();
    const maxPayload = registration ? registration.max_payload_size : 0;
    if (result.doc && maxPayload > 0 && result.size > maxPayload) {
      throw new PayloadError(`result of ${result.size} bytes is over the server's max_payload_size ${maxPayload}`);
    }
    if (!result.chunkSize) {
      const serverMax = registration ? registration.max_chunk_size : 0;
      result.chunkSize = serverMax > 0 ? Math.min(this.uploadChunkSize, serverMax) : this.uploadChunkSize;
    }
    let start = result.attempted ? await this.resumePoint(result) : 0;
    let busySince = null;
    let busy = 0;
    let queued = 0;
    let queuedSince = null;
    let broken = 0;
    for (let attempt = 1; ; attempt++) {
      if (start === null) return { task_id: result.taskId, received_bytes: result.size }; // the server has it
      result.attempted = true;
      try {
        return await this.uploadOnce(result, start);
      } catch (err) {
        if (classify(err) !== "retry" || this.stopping()) throw err;
        if (isQueued(err)) {
          queued += 1;
          busy = 0; // the line moved: not busy, a busy run starts afresh
          busySince = null;
          queuedSince ??= Date.now();
          const waited = Date.now() - queuedSince;
          if (waited >= this.queuedUploadRetryMs) { // a line that never lets it in: give the result up
            err.queuedOut = { attempts: queued, ms: waited }; // for queuedOutMessage: "after N attempts over S s"
            throw err;
          }
          const delay = Math.random() * QUEUED_JITTER_MS;
          this.log("INFO", `result of task ${result.taskId} still queued on the server after ${queued} wait`
            + `${queued === 1 ? "" : "s"} in line (${err.details || err.message}); uploading again in ${(delay / 1000).toFixed(2)} s`);
          await this.sleep(delay);
        } else if (isBusy(err)) {
          busy += 1;
          busySince ??= Date.now();
          const waited = Date.now() - busySince;
          if (waited >= this.busyUploadRetryMs) {
            err.busy = { attempts: busy, ms: waited }; // for refusedResultMessage: "after N attempts over S s"
            throw err;
          }
          const delay = Math.min(backoffMs(busy), this.busyUploadRetryMs - waited);
          this.log("INFO", `server busy with other uploads (${err.details || err.message}); retrying task `
            + `${result.taskId} in ${(delay / 1000).toFixed(2)} s (${((this.busyUploadRetryMs - waited) / 1000).toFixed(0)} s left to wait)`);
          // waiting for room is not inactivity: Heartbeats naming the task keep it alive on the server
          const gone = await this.waitBusy(result.taskId, delay);
          if (gone) throw gone; // the task is gone: deliver() drops the result
        } else {
          broken += 1;
          if (broken >= this.maxUploadAttempts) throw err;
          this.log("WARNING", `upload of task ${result.taskId} broke (${err.details || err.message}); attempt ${attempt + 1}`);
          if (errorReason(err) ? errorReason(err) === "ERROR_REASON_DIGEST_MISMATCH" : err.code === grpc.status.DATA_LOSS) {
            start = 0; // the server discarded the bytes: from 0, at once
            continue;
          }
          await this.sleep(backoffMs(broken));
        }
        if (this.stopping()) throw err;
        start = await this.resumePoint(result);
      }
    }
  }

  /** The heartbeat interval of a busy wait, ms: the server's announced one, else heartbeatIntervalMs. */
  busyHeartbeatMs() {
    const registration = this.registration();
    const announced = registration ? Number(registration.heartbeat_interval_seconds) : 0;
    return announced > 0 ? announced * 1000 : this.heartbeatIntervalMs;
  }

  /**
   * Wait `ms` before the next attempt of a busy upload, in slices of at most busyHeartbeatMs() with a
   * Heartbeat naming the task before each (none after the last: the attempt follows). stop() ends the wait
   * (the slice's sleep resolves at once, no further heartbeat). Resolves to null, or to the heartbeat's
   * refusal when it says the task is gone ("task"); rejects on a refusal of the node ("fatal").
   */
  async waitBusy(taskId, ms) {
    const sliceMs = this.busyHeartbeatMs();
    let left = ms;
    for (;;) {
      const gone = await this.keepAlive(taskId);
      if (gone || left <= 0 || this.stopping()) return gone;
      const step = Math.min(sliceMs, left);
      await this.sleep(step);
      left -= step;
      if (left <= 0 || this.stopping()) return null;
    }
  }

  /** One Heartbeat naming `taskId` during a busy wait: null, or, when the task is gone, the answer's
   * task_state CLOSED / UNKNOWN as a task refusal (taskGone) or the call's own refusal for the task. A refusal
   * of the node rejects; any other failure is logged and the wait goes on (a broken connection shows at the
   * next attempt, which reconnects). */
  async keepAlive(taskId) {
    try {
      const response = await this.calls.unary("Heartbeat", { version: PROTOCOL_VERSION, task_id: taskId });
      return taskGone(taskId, response);
    } catch (err) {
      const kind = classify(err);
      if (kind === "fatal") throw err;
      if (kind === "task") return err;
      this.log("INFO", `heartbeat for task ${taskId} failed (${err.details || err.message}); still waiting for upload room`);
      return null;
    }
  }

  /** Where a result's next attempt starts: the offset the server acknowledges (0 when it cannot say, or the
   * offset does not fit this payload), or null when the server has the whole result. A refusal of the task
   * itself (closed, unknown, not ours) or of the node rejects. */
  async resumePoint(result) {
    let status;
    try {
      status = await this.calls.unary("GetUploadStatus", { version: PROTOCOL_VERSION, task_id: result.taskId });
    } catch (err) {
      const kind = classify(err);
      if (kind === "task" || kind === "fatal") throw err;
      return 0;
    }
    if (status.complete) return null;
    const offset = status.acknowledged_offset;
    return result.doc && offset % result.chunkSize === 0 && offset <= result.size ? offset : 0;
  }

  /** One UploadResult stream: the header, then the chunks from `start`. */
  uploadOnce(result, start) {
    const header = result.doc ? payloadHeader(result.doc, result.chunkSize, start, result.digest) : null;
    let failed = null;
    let call = null;
    const response = new Promise((resolve, reject) => {
      call = this.calls.uploadStream(this.calls.callTimeoutSeconds + this.streamAllowanceSeconds, (err, res) => {
        if (err) {
          failed = err;
          reject(err);
        } else resolve(res);
      });
      (async () => {
        call.write({ header: { version: PROTOCOL_VERSION, task_id: result.taskId, outcome: result.outcome,
          error_message: result.errorMessage, payload: header } });
        if (result.doc) {
          for (const chunk of chunksOf(result.doc, header.chunk_size, header.start_offset)) {
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
    return response.finally(() => this.calls.release(call));
  }

  /** stop() was called: uploads in flight (and the FAILED reports replacing refused results) get
   * stopGraceMs, then they are cancelled. */
  startGrace() {
    if (this.graceTimer || this.graceOver || this.delivering === 0) return;
    this.graceTimer = setTimeout(() => {
      this.graceOver = true;
      this.calls.cancel("upload");
    }, this.stopGraceMs);
  }

  endGrace() {
    clearTimeout(this.graceTimer);
    this.graceTimer = null;
    this.graceOver = false;
  }

  /** Log every result still pending (at stop, or when run() ends), naming its task. */
  logUndelivered() {
    for (const result of this.pending.values()) {
      this.log("WARNING", `task ${result.taskId}: stopping with its ${result.describe()} not delivered; the server `
        + "ends the task when this node's reconnect grace expires, or at once when a new process of the node registers");
    }
  }
}

/** The FAILED report of a result whose queued retries ran past queuedUploadRetryMs (`err.queuedOut`), else null. */
function queuedOutMessage(err, size) {
  if (!err.queuedOut || !isQueued(err)) return null;
  const { attempts: n, ms } = err.queuedOut;
  return `the server refused the result of ${size} bytes after ${n} attempt${n === 1 ? "" : "s"} over `
    + `${(ms / 1000).toFixed(1)} s (ERROR_REASON_UPLOAD_QUEUED): ${err.details || err.message}`;
}

module.exports = { ResultDelivery, PendingResult, DEFAULT_HEARTBEAT_INTERVAL_MS, QUEUED_JITTER_MS, QUEUED_UPLOAD_RETRY_MS };
