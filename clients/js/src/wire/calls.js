"use strict";
/**
 * NodeCalls: the channel to the server and the calls on it. Every call carries the identity metadata
 * (`authorization: Bearer <token>` in token modes, `fedstream-instance-id` always: docs/protocol.md §2) and a
 * deadline; the streams in progress are tracked by kind ("poll", "upload") so that stop() can end the polls
 * at once and give the uploads a grace.
 *
 * `reopen()` replaces the channel by a fresh one (its own subchannel, `grpc.use_local_subchannel_pool`):
 * after a silent stream or an UNAVAILABLE the old connection may be half-open (the peer gone, nothing
 * closed), and every call on it would wait for keepalive to give up; a fresh channel dials at once, as
 * fednode's fresh channel per session.
 *
 * A unary call other than Register refused ERROR_REASON_UNKNOWN_NODE reached a server that has no
 * registration of this node (it restarted while the node went on calling without noticing: a task was
 * running, no stream broke): `registerAgain()` (NodeClient's register(), set by it) runs, once for every call
 * refused meanwhile, and the call is made once more (docs/protocol.md §7), so the node counts as connected,
 * with its datasets, at once, and the retried call says what the server knows of its task.
 */
const grpc = require("@grpc/grpc-js");
const { loadFedstream } = require("./proto.js");
const { callMetadata } = require("./connection.js");

const UNKNOWN_NODE_REASON = "ERROR_REASON_UNKNOWN_NODE";

class NodeCalls {
  /**
   * @param {object} o
   * @param {string} o.server host:port
   * @param {grpc.ChannelCredentials} o.credentials
   * @param {string|null} o.token node token (token modes), null with mutual TLS
   * @param {string} o.instanceId this process's RegisterRequest.instance_id
   * @param {number} o.maxMessageBytes max gRPC message size, both directions
   * @param {number} o.callTimeoutSeconds deadline of unary calls
   * @param {object} [o.channelOptions] extra grpc channel options
   * @param {string} [o.protosDir] where protos/ is (default: the repository's)
   */
  constructor(o) {
    this.server = o.server;
    this.credentials = o.credentials;
    this.token = o.token || null;
    this.instanceId = o.instanceId;
    this.callTimeoutSeconds = o.callTimeoutSeconds;
    this.NodeService = loadFedstream(o.protosDir).NodeService;
    this.options = {
      "grpc.max_receive_message_length": o.maxMessageBytes,
      "grpc.max_send_message_length": o.maxMessageBytes,
      "grpc.keepalive_time_ms": 30000,
      "grpc.keepalive_timeout_ms": 20000,
      "grpc.use_local_subchannel_pool": 1,
      ...(o.channelOptions || {}),
    };
    this.open = new Map(); // call -> kind ("poll" | "upload"), while it runs
    this.channels = 0; // channels opened so far
    this.stub = this.newStub();
    /** () => Promise: registers this process again (null: a refusal for an unknown node is returned as is). */
    this.registerAgain = null;
    this.registering = null; // the Register in progress for calls refused ERROR_REASON_UNKNOWN_NODE
  }

  newStub() {
    this.channels += 1;
    return new this.NodeService(this.server, this.credentials, this.options);
  }

  /** Close the channel (its calls are cancelled) and open a fresh one. */
  reopen() {
    this.cancel();
    this.stub.close();
    this.stub = this.newStub();
  }

  metadata() {
    return callMetadata(this.token, this.instanceId);
  }

  deadline(seconds) {
    return new Date(Date.now() + seconds * 1000);
  }

  /** A unary call; resolves to the response, rejects with the grpc-js error (code, details, metadata). One
   * refused ERROR_REASON_UNKNOWN_NODE registers again and is made once more (see the module comment). */
  async unary(method, request, timeoutSeconds = this.callTimeoutSeconds) {
    try {
      return await this.unaryOnce(method, request, timeoutSeconds);
    } catch (err) {
      if (method === "Register" || !this.registerAgain || !isUnknownNode(err)) throw err;
      this.registering ??= Promise.resolve().then(() => this.registerAgain()).finally(() => {
        this.registering = null;
      });
      await this.registering;
      return this.unaryOnce(method, request, timeoutSeconds);
    }
  }

  unaryOnce(method, request, timeoutSeconds) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata(), { deadline: this.deadline(timeoutSeconds) },
        (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  /** A PollTask stream (tracked as "poll" until release()). */
  pollStream(request, timeoutSeconds) {
    return this.track(this.stub.PollTask(request, this.metadata(), { deadline: this.deadline(timeoutSeconds) }), "poll");
  }

  /** An UploadResult stream (tracked as "upload" until release()); `callback(err, response)` at its end. */
  uploadStream(timeoutSeconds, callback) {
    return this.track(this.stub.UploadResult(this.metadata(), { deadline: this.deadline(timeoutSeconds) }, callback), "upload");
  }

  track(call, kind) {
    this.open.set(call, kind);
    return call;
  }

  /** Forget a call that ended (read to its end, failed, or cancelled by us). */
  release(call) {
    this.open.delete(call);
  }

  /** Streams of `kind` still running ("poll" or "upload"; null: any). */
  running(kind = null) {
    return [...this.open.values()].filter((k) => kind === null || k === kind).length;
  }

  /** Cancel the running streams of `kind` (null: all). */
  cancel(kind = null) {
    for (const [call, k] of [...this.open]) {
      if (kind === null || k === kind) {
        this.open.delete(call);
        call.cancel();
      }
    }
  }

  close() {
    this.cancel();
    this.stub.close();
  }
}

/** Whether a failed call carries the reason ERROR_REASON_UNKNOWN_NODE (trailer `fedstream-error-reason`). */
function isUnknownNode(err) {
  const values = err && err.metadata && typeof err.metadata.get === "function"
    ? err.metadata.get("fedstream-error-reason") : [];
  return values.length > 0 && String(values[0]) === UNKNOWN_NODE_REASON;
}

module.exports = { NodeCalls };
