"use strict";
/**
 * Channel security and identity (docs/protocol.md §2): TLS trusting the project CA, mutual TLS with a
 * node certificate from `fedserver certs node NODE_ID`, or plaintext when asked for explicitly; and the
 * `authorization: Bearer <token>` metadata entry every call carries in the token modes, and the
 * `fedstream-instance-id` entry naming the node process (its RegisterRequest.instance_id): the server
 * refuses the calls of a process that a newer process of the same node replaced.
 */
const fs = require("node:fs");
const grpc = require("@grpc/grpc-js");
const { ConfigError } = require("../errors.js");

const TLS_MODES = ["tls", "mtls", "insecure"];

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new ConfigError(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
}

/**
 * grpc ChannelCredentials for a mode.
 * @param {{tls: string, caCert?: string, clientCert?: string, clientKey?: string}} options file paths
 */
function channelCredentials({ tls = "tls", caCert = null, clientCert = null, clientKey = null } = {}) {
  if (!TLS_MODES.includes(tls)) throw new ConfigError(`unknown TLS mode ${JSON.stringify(tls)}; valid: ${TLS_MODES.join(", ")}`);
  if (tls === "insecure") return grpc.credentials.createInsecure();
  if (!caCert) throw new ConfigError(`TLS mode ${tls} needs the project CA certificate (--ca-cert ca.crt)`);
  const ca = readFile(caCert, "CA certificate");
  if (tls === "mtls") {
    if (!clientCert || !clientKey) {
      throw new ConfigError("mutual TLS needs the node certificate and key (--client-cert NODE_ID.crt --client-key NODE_ID.key)");
    }
    return grpc.credentials.createSsl(ca, readFile(clientKey, "client key"), readFile(clientCert, "client certificate"));
  }
  return grpc.credentials.createSsl(ca);
}

/** Read a token file (the token printed by `fedserver nodes enroll`), trimmed. */
function readToken(file) {
  const token = readFile(file, "token file").toString("utf8").trim();
  if (!token) throw new ConfigError(`token file ${file} is empty`);
  if (/\s/.test(token)) throw new ConfigError(`token file ${file} holds more than one word`);
  return token;
}

/** Metadata key naming the node process on every call (docs/protocol.md §2). */
const INSTANCE_METADATA_KEY = "fedstream-instance-id";

/**
 * Call metadata: `authorization: Bearer <token>` when a token is set, `fedstream-instance-id` when an
 * instance id is.
 */
function callMetadata(token, instanceId = null) {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  if (instanceId) md.set(INSTANCE_METADATA_KEY, instanceId);
  return md;
}

module.exports = { channelCredentials, readToken, callMetadata, INSTANCE_METADATA_KEY, TLS_MODES };
