"use strict";
/**
 * What a failed call means for the node (docs/protocol.md §7), decided by its reason: the ErrorReason name
 * in the trailer `fedstream-error-reason` (common.proto); by its status code only when there is none or
 * this client does not know the name (gRPC's own statuses, an older or a newer server); never by its
 * message. Also the FAILED report that replaces a result the server refused for itself (§4 step 4), and
 * the backoff of every retry.
 */
const grpc = require("@grpc/grpc-js");
const { loadFedstream } = require("./proto.js");
const { PayloadError } = require("../errors.js");

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
/** A poll the server saw after a newer poll of this process (PollTaskRequest.poll_sequence not greater: a
 * late poll of a connection the process abandoned, docs/protocol.md §5 "Stale polls"): that call is dead,
 * nothing else is (no task dropped, a download kept to resume); run() polls again at once. */
const STALE_POLL_REASON = "ERROR_REASON_STALE_POLL";
/** Reasons a new attempt may cure (backoff with jitter; an upload resumes where GetUploadStatus says).
 * ERROR_REASON_UNKNOWN_NODE (the server has no registration of this node: it restarted) means "register
 * again": a unary call does it and is made once more (NodeCalls.unary, calls.js); after a refused stream, run()
 * forgets its registration and registers before its next poll. */
const RETRYABLE_REASONS = new Set(["ERROR_REASON_UPLOAD_INCOMPLETE", "ERROR_REASON_DIGEST_MISMATCH",
  "ERROR_REASON_UPLOADS_BUSY", "ERROR_REASON_UPLOAD_QUEUED", "ERROR_REASON_UPLOAD_IN_PROGRESS",
  "ERROR_REASON_SERVER_STOPPING", "ERROR_REASON_INTERNAL", "ERROR_REASON_UNKNOWN_NODE", STALE_POLL_REASON]);
/** The refusal of an upload while the server has no upload buffer free: retried in place for a while. */
const BUSY_REASON = "ERROR_REASON_UPLOADS_BUSY";
/** The refusal of an upload that waited the server's longest in a line that moved meanwhile: its place is
 * kept; uploaded again at once, outside the busy window (docs/protocol.md §4 step 4). Its code is
 * RESOURCE_EXHAUSTED: a client that does not know the reason takes it for busy and retries too. */
const QUEUED_REASON = "ERROR_REASON_UPLOAD_QUEUED";
/** The refusal of a result document that does not decode: the server ended the task FAILED already. */
const BAD_RESULT_REASON = "ERROR_REASON_BAD_RESULT_DOCUMENT";
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

/** True for errors that stop the node (classify() says "fatal"). */
function isFatal(err, options) {
  return classify(err, options) === "fatal";
}

/** Whether an upload was refused UPLOAD_QUEUED: it waited its longest in a moving line, its place is kept. */
function isQueued(err) {
  return errorReason(err) === QUEUED_REASON;
}

/** Whether an upload was refused for "no upload buffer free now" (UPLOADS_BUSY; from a server without reasons,
 * RESOURCE_EXHAUSTED, which a result over the announced max_payload_size never gets here: it is not sent). */
function isBusy(err) {
  const reason = errorReason(err);
  return reason ? reason === BUSY_REASON : err.code === Status.RESOURCE_EXHAUSTED;
}

/** HeartbeatResponse.task_state values that end the task (docs/protocol.md §8 "Closed tasks"): the server no
 * longer accepts its result. Other values (UNSPECIFIED: no task named or an older server; ACTIVE; a value of a
 * newer server) mean carry on. */
const GONE_TASK_STATES = new Map([
  ["TASK_STATE_CLOSED", { code: Status.FAILED_PRECONDITION, reason: "ERROR_REASON_TASK_CLOSED" }],
  ["TASK_STATE_UNKNOWN", { code: Status.NOT_FOUND, reason: "ERROR_REASON_UNKNOWN_TASK" }],
]);

/**
 * The error that stands for a task a Heartbeat answered CLOSED or UNKNOWN (`response.task_state`), shaped as
 * the server's refusal of a call about that task (TASK_CLOSED / UNKNOWN_TASK, so classify() says "task" and
 * whoever handles a task refusal drops what belongs to the task), or null when the answer says nothing of the
 * kind. `heartbeat` is true on it.
 */
function taskGone(taskId, response) {
  const state = response && response.task_state;
  const gone = GONE_TASK_STATES.get(state);
  if (!gone) return null;
  const details = `task ${taskId} closed by the server (a heartbeat answered task_state ${state})`;
  const metadata = new grpc.Metadata();
  metadata.set(REASON_METADATA_KEY, gone.reason);
  return Object.assign(new Error(details), { code: gone.code, details, metadata, heartbeat: true });
}

/**
 * The error_message of the FAILED report that replaces a result of `size` bytes refused by `err`, as
 * fednode words it ("the server refused the result of N bytes[ after K attempts over S s] (REASON): details"; the
 * attempts from `err.busy`, set when the busy retries are used up), or
 * null when no report is due. Due for a refusal of the result for itself, which leaves its task open on the
 * server (§4 step 4): any "refused" one (PAYLOAD_TOO_LARGE, MALFORMED_MESSAGE, FRAMING, ...; a result over
 * max_payload_size refused here before sending, PayloadError) but BAD_RESULT_DOCUMENT (the server ended the
 * task FAILED already), and UPLOADS_BUSY (without a reason: RESOURCE_EXHAUSTED) once the busy retries are
 * used up. Not due when the refusal ends the task ("task"), stops the node ("fatal") or is a broken
 * connection or a cancelled call (CANCELLED, INTERNAL, UNKNOWN without a reason).
 */
function refusedResultMessage(err, size) {
  const reason = errorReason(err);
  if (!isBusy(err) && (classify(err) !== "refused" || reason === BAD_RESULT_REASON)) return null;
  if (err instanceof PayloadError) return `the result of ${size} bytes was not sent: ${err.message}`;
  const name = reason || Object.keys(Status).find((k) => Status[k] === err.code) || "no status code";
  const n = err.busy ? err.busy.attempts : 0;
  const after = err.busy ? ` after ${n} attempt${n === 1 ? "" : "s"} over ${(err.busy.ms / 1000).toFixed(1)} s` : "";
  return `the server refused the result of ${size} bytes${after} (${name}): ${err.details || err.message}`;
}

module.exports = {
  REASON_METADATA_KEY, BUSY_REASON, QUEUED_REASON, STALE_POLL_REASON, backoffMs, errorReason, classify, isFatal, isBusy,
  isQueued, refusedResultMessage, taskGone,
};
