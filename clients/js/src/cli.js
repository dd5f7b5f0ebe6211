#!/usr/bin/env node
"use strict";
/**
 * fedstream-js node: joins a fedstream federation and trains a linear least-squares model on a local CSV
 * or JSON file. See `node src/cli.js --help`.
 */
const os = require("node:os");
const { parseArgs } = require("node:util");
const { NodeClient, BUSY_UPLOAD_RETRY_MS } = require("./wire/node_client.js");
const { QUEUED_UPLOAD_RETRY_MS } = require("./wire/delivery.js");
const { channelCredentials, readToken, TLS_MODES } = require("./wire/connection.js");
const { loadDataset } = require("./training/dataset.js");
const { LinearTrainer } = require("./training/train_task.js");
const { ConfigError } = require("./errors.js");
const { version } = require("../package.json");

const HELP = `NAME
    fedstream-js — a fedstream node written in JavaScript

SYNOPSIS
    node clients/js/src/cli.js --server HOST:PORT --data FILE --target COLUMN
         [--tls tls|mtls|insecure] [--ca-cert ca.crt] [--token-file FILE]
         [--client-cert NODE.crt --client-key NODE.key] [--tags a,b] [--approve-plan SHA256]...

DESCRIPTION
    Dials out to a fedstream server (a node never opens a port), registers its dataset, long-polls for
    tasks and runs TRAIN tasks with a built-in linear model (least squares, full-batch gradient descent,
    params "coef" (d, 1) and "intercept" (1,)), then uploads the result in chunks with its SHA-256.
    The task's test_ratio and seed hold samples out (the split every fedstream node makes): it trains on
    the rest, reports its validation loss on them when asked, and runs EVALUATE tasks on them (on every
    sample when test_ratio is 0). It never runs the plan's Python source: it trains only for plans
    approved by their SHA-256.

OPTIONS
    --server HOST:PORT      the researcher's fedserver (required)
    --tls MODE              tls (default: server certificate checked against --ca-cert, token identity),
                            mtls (client certificate identity), insecure (plaintext, token identity)
    --ca-cert FILE          project CA certificate (fedserver certs init), for tls and mtls
    --client-cert FILE      node certificate (fedserver certs node NODE_ID), for mtls
    --client-key FILE       its private key, for mtls
    --tls-server-name NAME  expected server name when it differs from HOST
    --token-file FILE       file holding the node token (fedserver nodes enroll NODE_ID), tls/insecure
    --data FILE             local dataset, .csv (header row) or .json (array of records) (required)
    --target COLUMN         the column to predict (required); features: every other column
    --features A,B,...      feature columns, in this order (default: all but the target, file order)
    --tags A,B,...          tags of the dataset; the researcher selects datasets by tag
    --approve-plan SHA256   train and evaluate for the plan with this source digest (repeatable); others are
                            REFUSED
    --name NAME             display name (default: <hostname>-js)
    --poll-wait SECONDS     long-poll wait (default 30, capped by the server)
    --chunk-size BYTES      upload chunk size (default 1048576, capped by the server)
    --stop-grace SECONDS    on SIGINT/SIGTERM, how long an upload in flight may finish (default 10)
    --busy-upload-retry SECONDS
                            how long a result the server refuses as busy (no upload buffer free) is
                            tried again before the task is reported FAILED (default ${BUSY_UPLOAD_RETRY_MS / 1000}, as fednode)
    --queued-upload-retry SECONDS
                            how long a result whose upload waits its turn in a moving line is sent again
                            before the task is reported FAILED (default ${QUEUED_UPLOAD_RETRY_MS / 1000}, as fednode)
    --max-tasks N           exit after N tasks (default 0: run until SIGINT/SIGTERM)
    --protos DIR            directory holding fedstream/v1/*.proto (default: the repository's protos/)
    -h, --help              this text

SIGNALS
    SIGINT, SIGTERM: the poll in progress ends at once; a result being uploaded, and the FAILED report
    that replaces a result the server refuses meanwhile, get --stop-grace seconds; a result still not
    delivered is logged with its task (the server ends that task after its reconnect grace, or at once
    when the node starts again). A second signal kills the process.

EXIT STATUS
    0 stopped by a signal or --max-tasks; 2 bad configuration; 3 the server refused this node
    (UNAUTHENTICATED, protocol version).
`;

const OPTIONS = {
  server: { type: "string" },
  tls: { type: "string", default: "tls" },
  "ca-cert": { type: "string" },
  "client-cert": { type: "string" },
  "client-key": { type: "string" },
  "tls-server-name": { type: "string" },
  "token-file": { type: "string" },
  data: { type: "string" },
  target: { type: "string" },
  features: { type: "string" },
  tags: { type: "string", default: "" },
  "approve-plan": { type: "string", multiple: true, default: [] },
  name: { type: "string" },
  "poll-wait": { type: "string", default: "30" },
  "chunk-size": { type: "string", default: String(1024 * 1024) },
  "stop-grace": { type: "string", default: "10" },
  "busy-upload-retry": { type: "string", default: String(BUSY_UPLOAD_RETRY_MS / 1000) },
  "queued-upload-retry": { type: "string", default: String(QUEUED_UPLOAD_RETRY_MS / 1000) },
  "max-tasks": { type: "string", default: "0" },
  protos: { type: "string" },
  help: { type: "boolean", short: "h", default: false },
};

function log(level, message) {
  process.stderr.write(`${new Date().toISOString()} ${level.padEnd(7)} ${message}\n`);
}

function positiveNumber(value, flag, integer = false) {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (integer && !Number.isInteger(n))) {
    throw new ConfigError(`${flag} must be a non-negative ${integer ? "integer" : "number"}, got ${JSON.stringify(value)}`);
  }
  return n;
}

const list = (s) => (s ? s.split(",").map((x) => x.trim()).filter(Boolean) : []);

/** Build the client and trainer from parsed options. */
function setup(v) {
  for (const flag of ["server", "data", "target"]) if (!v[flag]) throw new ConfigError(`--${flag} is required (see --help)`);
  if (!TLS_MODES.includes(v.tls)) throw new ConfigError(`--tls must be one of ${TLS_MODES.join(", ")}, got ${v.tls}`);
  if (v.tls !== "mtls" && !v["token-file"]) throw new ConfigError(`--tls ${v.tls} needs --token-file (the token from fedserver nodes enroll)`);
  for (const sha of v["approve-plan"]) {
    if (!/^[0-9a-fA-F]{64}$/.test(sha)) throw new ConfigError(`--approve-plan needs a hex SHA-256 (64 characters), got ${JSON.stringify(sha)}`);
  }
  const dataset = loadDataset(v.data, v.target, { features: v.features ? list(v.features) : null });
  const trainer = new LinearTrainer(dataset, { tags: list(v.tags), approvedPlans: v["approve-plan"] });
  const client = new NodeClient({
    server: v.server,
    credentials: channelCredentials({ tls: v.tls, caCert: v["ca-cert"], clientCert: v["client-cert"], clientKey: v["client-key"] }),
    token: v["token-file"] ? readToken(v["token-file"]) : null,
    nodeName: v.name || `${os.hostname()}-js`,
    datasets: [trainer.datasetInfo()],
    capabilities: trainer.capabilities,
    clientVersion: `fedstream-js/${version}`,
    pollWaitSeconds: positiveNumber(v["poll-wait"], "--poll-wait"),
    uploadChunkSize: positiveNumber(v["chunk-size"], "--chunk-size", true) || 1024 * 1024,
    stopGraceMs: positiveNumber(v["stop-grace"], "--stop-grace") * 1000,
    busyUploadRetryMs: positiveNumber(v["busy-upload-retry"], "--busy-upload-retry") * 1000,
    queuedUploadRetryMs: positiveNumber(v["queued-upload-retry"], "--queued-upload-retry") * 1000,
    channelOptions: v["tls-server-name"] ? { "grpc.ssl_target_name_override": v["tls-server-name"] } : {},
    protosDir: v.protos,
    log,
  });
  return { client, trainer, dataset, maxTasks: positiveNumber(v["max-tasks"], "--max-tasks", true) };
}

async function main(argv) {
  let values;
  try {
    ({ values } = parseArgs({ args: argv, options: OPTIONS, strict: true }));
  } catch (err) {
    log("ERROR", `${err.message} (see --help)`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  let built;
  try {
    built = setup(values);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    log("ERROR", err.message);
    return 2;
  }
  const { client, trainer, dataset, maxTasks } = built;
  log("INFO", `dataset ${dataset.name}: ${dataset.n} samples, features [${dataset.features.join(", ")}], target ${dataset.target}`);
  const stop = (signal) => {
    log("INFO", `${signal}: stopping`);
    client.stop();
  };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
  try {
    await client.run(trainer, { maxTasks });
    return 0;
  } catch (err) {
    log("ERROR", `server refused this node: ${err.details || err.message}`);
    return 3;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { main, HELP };
