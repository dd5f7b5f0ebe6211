"use strict";
/**
 * TaskPoller: one PollTask long poll at a time (docs/protocol.md §4 step 2, §5), and what the process holds.
 *
 * A task's payload is written chunk by chunk into one preallocated Buffer and its SHA-256 checked; a broken
 * download keeps its whole chunks (`partial`) and the next poll resumes it (`resume_task_id`,
 * `resume_offset`). A task the node cannot take comes back with the reply that stands for it, as fednode's:
 * over this node's limits, REFUSED "node refuses the task: ..."; a misframed stream or a payload whose
 * SHA-256 differs, FAILED "bad task stream: ..." / "bad task payload: ...".
 *
 * Held tasks (§5 "Tasks lost in a dead connection"): every poll says which tasks this process holds
 * (`reports_held_tasks = true`, `held_task_ids`): the download it resumes, and every task it received whole
 * (or answers without running) whose result the server has not acknowledged yet (`held`, shared with the
 * result delivery, which forgets a task once its result is acknowledged or the task is gone). A task the
 * server sent whole into a dead connection is then sent again at once. The promise that goes with the list
 * holds by construction: a reporting poll starts only when no other PollTask stream of this client is
 * running (each is read to its end or cancelled before poll() returns); a poll started while another one
 * runs (two poll() at once) does not report.
 *
 * Poll sequence (§5 "Stale polls"): every poll carries its number among this client's polls (1, 2, ...,
 * across reconnects, never repeated), so a poll of an abandoned connection that reaches the server late is
 * refused (ERROR_REASON_STALE_POLL: that call is dead) instead of sending back a task the process holds.
 *
 * A stream silent for longer than the poll's wait plus the call timeout (first message), or than
 * `idleStreamTimeoutSeconds` (between chunks), is cancelled and fails with ConnectionLostError: the
 * connection is taken as dead (half-open), as fednode's idle timeouts do.
 */
const { PROTOCOL_VERSION } = require("./proto.js");
const { ChunkAssembler, sha256 } = require("./chunks.js");
const { classify } = require("./refusals.js");
const { ConnectionLostError, PayloadError, ProtocolError } = require("../errors.js");

/** At most this many held_task_ids in one poll, each at most MAX_TASK_ID_LENGTH characters (§9). */
const MAX_HELD_TASK_IDS = 1024;
const MAX_TASK_ID_LENGTH = 64;
const EMPTY_PAYLOAD = Object.freeze({ total_size: 0, sha256: sha256(Buffer.alloc(0)), chunk_size: 1, chunk_count: 0, start_offset: 0 });

class TaskPoller {
  /**
   * @param {import("./calls.js").NodeCalls} calls
   * @param {object} o
   * @param {Set<string>} o.held task ids this process holds besides a download (received whole, result not
   *   acknowledged); poll() adds each task it returns, the result delivery removes them
   * @param {{maxPayloadSize: number, maxChunkSize: number}} o.limits what this node accepts of a task
   * @param {number} o.pollWaitSeconds long-poll wait asked for (capped by the server's maximum)
   * @param {number} o.callTimeoutSeconds margin on the first message after the wait
   * @param {number} o.idleStreamTimeoutSeconds longest silence between two messages of a task's stream
   * @param {number} o.streamAllowanceSeconds deadline of a poll: its wait plus this
   */
  constructor(calls, o) {
    this.calls = calls;
    this.held = o.held;
    this.limits = o.limits;
    this.pollWaitSeconds = o.pollWaitSeconds;
    this.callTimeoutSeconds = o.callTimeoutSeconds;
    this.idleStreamTimeoutSeconds = o.idleStreamTimeoutSeconds;
    this.streamAllowanceSeconds = o.streamAllowanceSeconds;
    this.partial = null; // {taskId, assembler} of a broken download
    /** PollTasks this client (one node process) has sent, over all its connections: the next one carries
     * this + 1 as PollTaskRequest.poll_sequence, so the server refuses a late poll of an abandoned
     * connection (ERROR_REASON_STALE_POLL) instead of acting on its older held_task_ids. */
    this.pollsSent = 0;
  }

  /** The wait of the next poll: ours, capped by the server's max_poll_wait_seconds (0: no cap). */
  wait(registration) {
    const cap = registration ? registration.max_poll_wait_seconds : 0;
    return cap > 0 ? Math.min(this.pollWaitSeconds, cap) : this.pollWaitSeconds;
  }

  /** The download worth resuming: whole chunks kept ({taskId, assembler}), or null. */
  resumable() {
    return this.partial && this.partial.assembler.keptOffset > 0 ? this.partial : null;
  }

  /** PollTaskRequest.held_task_ids of a poll resuming `resuming` (or null): that download and `held`. */
  heldTaskIds(resuming) {
    const ids = new Set(resuming ? [resuming.taskId] : []);
    for (const id of this.held) ids.add(id);
    return [...ids];
  }

  /** The PollTaskRequest of the next poll: its number (poll_sequence), the wait, the download it resumes, and
   * what the process holds when it may say so. */
  request(wait, resuming) {
    this.pollsSent += 1;
    const request = { version: PROTOCOL_VERSION, wait_seconds: wait, poll_sequence: this.pollsSent };
    if (resuming) {
      request.resume_task_id = resuming.taskId;
      request.resume_offset = resuming.assembler.keptOffset;
    }
    const held = this.heldTaskIds(resuming);
    const fits = held.length <= MAX_HELD_TASK_IDS && held.every((id) => id.length <= MAX_TASK_ID_LENGTH);
    if (this.calls.running("poll") === 0 && fits) { // the promise of §5: no earlier stream still running
      request.reports_held_tasks = true;
      request.held_task_ids = held;
    }
    return request;
  }

  /**
   * One long poll. Resolves to {kind: "no_task"}, {kind: "shutdown", reason, retryAfterSeconds}, or
   * {kind: "task", header, payload, reply}: the verified payload Buffer and reply null, or payload null and
   * the reply {outcome, errorMessage} that stands for a task this node cannot take. A task it returns is held
   * until the result delivery forgets it.
   */
  async poll(registration) {
    const wait = this.wait(registration);
    const resuming = this.resumable();
    const call = this.calls.pollStream(this.request(wait, resuming), wait + this.streamAllowanceSeconds);
    let header = null;
    let assembler = null;
    let silent = null; // the ConnectionLostError of an idle timeout
    let timer = null;
    const expect = (seconds, what) => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        silent = new ConnectionLostError(`PollTask: no message from the server for ${seconds} s (${what})`);
        call.cancel();
      }, seconds * 1000);
    };
    const task = (fields) => {
      this.held.add(header.task_id);
      return { kind: "task", header, payload: null, reply: null, ...fields };
    };
    // wait 0 asks for the server's maximum: 30 s unless it announced another
    const longest = wait > 0 ? wait : (registration && registration.max_poll_wait_seconds) || 30;
    expect(longest + this.callTimeoutSeconds, "waiting for a task");
    try {
      for await (const message of call) {
        expect(this.idleStreamTimeoutSeconds, header ? `task ${header.task_id}` : "after its first message");
        if (message.event === "no_task") return { kind: "no_task" };
        if (message.event === "shutdown") {
          return { kind: "shutdown", reason: message.shutdown.reason, retryAfterSeconds: message.shutdown.retry_after_seconds };
        }
        if (message.event === "task") {
          header = message.task;
          const p = header.payload || EMPTY_PAYLOAD;
          if (resuming && resuming.taskId === header.task_id && p.start_offset > 0) {
            resuming.assembler.resume(p);
            assembler = resuming.assembler;
          } else {
            this.partial = null; // a different task, or a fresh start
            try {
              assembler = new ChunkAssembler(p, this.limits);
            } catch (err) {
              if (!(err instanceof PayloadError)) throw err;
              return task({ reply: { outcome: "TASK_OUTCOME_REFUSED", errorMessage: `node refuses the task: ${err.message}` } });
            }
          }
          this.partial = { taskId: header.task_id, assembler };
        } else if (message.event === "chunk") {
          if (!assembler) throw new ProtocolError(`chunk at offset ${message.chunk.offset} before any TaskHeader`);
          try {
            assembler.add(message.chunk);
          } catch (err) {
            if (!(err instanceof PayloadError)) throw err;
            this.partial = null;
            return task({ reply: { outcome: "TASK_OUTCOME_FAILED", errorMessage: `bad task stream: ${err.message}` } });
          }
        }
      }
    } catch (err) {
      const failure = silent || err;
      const kind = classify(failure); // PayloadError, ProtocolError: "refused"
      if (kind === "task" || kind === "refused") this.partial = null; // gone, or cannot resume: poll afresh next time
      if (failure.taskId === undefined) failure.taskId = header ? header.task_id : resuming ? resuming.taskId : ""; // for run()
      throw failure;
    } finally {
      clearTimeout(timer);
      this.calls.release(call);
      call.cancel();
    }
    if (!assembler) throw new ProtocolError("PollTask stream ended without NoTask, TaskHeader or ServerShutdown");
    if (!assembler.complete) {
      const err = new ConnectionLostError(`PollTask stream ended after ${assembler.received} of ${assembler.header.total_size} payload bytes of task ${header.task_id}`);
      err.taskId = header.task_id;
      throw err; // the whole chunks stay: the next poll resumes
    }
    this.partial = null;
    try {
      return task({ payload: assembler.finish() });
    } catch (err) {
      if (!(err instanceof PayloadError)) throw err;
      return task({ reply: { outcome: "TASK_OUTCOME_FAILED", errorMessage: `bad task payload: ${err.message}` } });
    }
  }
}

module.exports = { TaskPoller, MAX_HELD_TASK_IDS, MAX_TASK_ID_LENGTH };
