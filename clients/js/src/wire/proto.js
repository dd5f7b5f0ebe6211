"use strict";
/**
 * The fedstream.v1 service, loaded at run time from the repository's protos/ (never a copy):
 * `protosDir` defaults to ../../../../protos from this file, i.e. <repo>/protos.
 *
 * Loader options: field names as in the .proto (snake_case), enums as their names
 * ("TASK_KIND_TRAIN"), 64-bit integers as JavaScript numbers (payload sizes stay far below 2⁵³),
 * bytes as Buffers, defaults filled in, and a virtual `event` field naming the oneof member that is set.
 */
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTOS_DIR = path.resolve(__dirname, "../../../../protos");
/** The protocol version this client speaks (docs/protocol.md §3). */
const PROTOCOL_VERSION = Object.freeze({ major: 1, minor: 0 });

const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
};

/**
 * {NodeService: client constructor, packageDefinition, errorReasons} for fedstream.v1. `errorReasons`: the
 * names of every `ErrorReason` value (common.proto) but ERROR_REASON_UNSPECIFIED, i.e. the reasons the
 * server may name in the `fedstream-error-reason` trailer of an error status that this client knows.
 */
function loadFedstream(protosDir = DEFAULT_PROTOS_DIR) {
  const packageDefinition = protoLoader.loadSync(
    ["fedstream/v1/common.proto", "fedstream/v1/node_service.proto"],
    { ...LOADER_OPTIONS, includeDirs: [protosDir] },
  );
  const pkg = grpc.loadPackageDefinition(packageDefinition);
  const errorReasons = new Set(packageDefinition["fedstream.v1.ErrorReason"].type.value
    .map((v) => v.name).filter((name) => name !== "ERROR_REASON_UNSPECIFIED"));
  return { NodeService: pkg.fedstream.v1.NodeService, packageDefinition, errorReasons };
}

module.exports = { loadFedstream, PROTOCOL_VERSION, DEFAULT_PROTOS_DIR };
