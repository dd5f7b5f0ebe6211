"use strict";
/** fedstream-js: a fedstream node in JavaScript. The public API of its modules. */
const codec = require("./codec");
const errors = require("./errors.js");
const { NodeClient } = require("./wire/node_client.js");
const { channelCredentials, readToken, callMetadata } = require("./wire/connection.js");
const { ChunkAssembler, payloadHeader, chunksOf, sha256 } = require("./wire/chunks.js");
const { loadFedstream, PROTOCOL_VERSION } = require("./wire/proto.js");
const { loadDataset } = require("./training/dataset.js");
const { leastSquaresGD, meanSquaredError } = require("./training/least_squares.js");
const { LinearTrainer } = require("./training/train_task.js");

module.exports = {
  ...codec,
  ...errors,
  NodeClient, channelCredentials, readToken, callMetadata,
  ChunkAssembler, payloadHeader, chunksOf, sha256,
  loadFedstream, PROTOCOL_VERSION,
  loadDataset, leastSquaresGD, meanSquaredError, LinearTrainer,
};
