"use strict";
/**
 * The errors the fedstream JavaScript node raises. One tree, like fedcore.errors:
 *
 *   FedstreamError
 *   ├── EncodeError         (also a TypeError) a value has no fedstream encoding; names the type and path
 *   ├── DecodeError         a msgpack document is malformed or breaks a bound; names the offset
 *   ├── PayloadError        a chunked transfer is inconsistent: size, offsets, chunk size, SHA-256
 *   ├── ProtocolError       the server broke the protocol (unexpected message, unknown task kind, ...)
 *   ├── ConnectionLostError a stream went silent or ended early: the connection is taken as dead (retryable)
 *   ├── TaskError           a task cannot run here: bad payload, shapes, dataset (reported as FAILED)
 *   └── ConfigError         bad command-line or dataset configuration
 */

const { status: Status } = require("@grpc/grpc-js");

class FedstreamError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

class EncodeError extends TypeError {
  constructor(message) {
    super(message);
    this.name = "EncodeError";
  }
}
// EncodeError is a TypeError (as in Python) and still a FedstreamError for `instanceof`; subclasses keep
// the ordinary `instanceof`.
Object.defineProperty(FedstreamError, Symbol.hasInstance, {
  value(obj) {
    const ordinary = Function.prototype[Symbol.hasInstance].call(this, obj);
    return ordinary || (this === FedstreamError && obj instanceof EncodeError);
  },
});

class DecodeError extends FedstreamError {}
class PayloadError extends FedstreamError {}
class ProtocolError extends FedstreamError {}
class TaskError extends FedstreamError {}
/** Retryable like gRPC's own DEADLINE_EXCEEDED (its `code`): reconnect on a fresh channel, then go on. */
class ConnectionLostError extends FedstreamError {
  constructor(message) {
    super(message);
    this.code = Status.DEADLINE_EXCEEDED;
    this.details = message;
  }
}
class ConfigError extends FedstreamError {}

module.exports = {
  FedstreamError, EncodeError, DecodeError, PayloadError, ProtocolError, TaskError, ConfigError, ConnectionLostError,
};
