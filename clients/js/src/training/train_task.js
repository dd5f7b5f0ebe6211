"use strict";
/**
 * Runs TRAIN and EVALUATE tasks (docs/protocol.md §6) on this node's dataset with the built-in linear
 * least-squares model (least_squares.js), and builds their result documents.
 *
 * A JavaScript node does not execute the plan's Python source: it trains its own linear model, and only
 * for plans its operator approved by SHA-256 (`--approve-plan`), like fednode's plan approvals. What it
 * needs from the task: params `coef` (d × 1) and `intercept` (1,) of a float dtype, d = the number of
 * feature columns; `training_args.lr` and `num_updates` (or `epochs`: one full-batch step per epoch;
 * `dry_run`: one step). `test_ratio` and `seed` hold samples out with the split every node makes (split.js;
 * no seed: a fresh one per task); it trains on the rest, and `test_on_global_updates` /
 * `test_on_local_updates` fill `validation.before` / `.after` with the mean squared error on the held-out
 * samples (`loss`, as a Python NumpyTrainingPlan's testing_step names it). EVALUATE: the sent model's `loss`
 * on the held-out samples (split "validation"), or on every sample when none are held out ("all").
 * Other training args (batch_size, shuffle, ...) do not apply to full-batch gradient descent; momentum,
 * weight_decay and fedprox_mu must be 0.
 *
 * Outcomes: REFUSED when the node will not run the task (plan not approved, no dataset with the tags,
 * an unsupported kind, aggregator or optimizer option), FAILED when the task is broken (bad payload,
 * shapes, dtypes, a split leaving nothing to train on, non-finite loss). Never an exception: the node
 * always answers.
 */
const { NDArray, Float64, decode, encode } = require("../codec");
const { sha256 } = require("../wire/chunks.js");
const { TaskError } = require("../errors.js");
const { leastSquaresGD, meanSquaredError } = require("./least_squares.js");
const { heldOutIndices } = require("./split.js");

const PAYLOAD_FORMAT = 1;
const FLOAT_CODES = new Set(["f2", "f4", "f8"]);
const CAPABILITIES = ["js", "linear-least-squares", "fedavg", "scaffold", "evaluate"];

class Refusal extends TaskError {}

function isMap(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof NDArray);
}

function get(map, key) {
  return map instanceof Map ? map.get(key) : map[key];
}

function keysOf(map) {
  return map instanceof Map ? [...map.keys()] : Object.keys(map);
}

function argNumber(args, key, fallback) {
  const v = get(args, key);
  if (v === undefined || v === null) return fallback;
  const n = typeof v === "bigint" ? Number(v) : Number(v);
  if (!Number.isFinite(n)) throw new TaskError(`training_args.${key} must be a number, got ${JSON.stringify(String(v))}`);
  return n;
}

/** The float array `name` of shape `shape`, as float64 values. */
function floatParam(params, name, shape, where) {
  const a = get(params, name);
  if (!(a instanceof NDArray)) throw new TaskError(`${where}.${name} must be an array, got ${a === undefined ? "nothing" : typeof a}`);
  if (!FLOAT_CODES.has(a.dtype.slice(1))) throw new TaskError(`${where}.${name} must have a float dtype (f2, f4, f8), got ${a.dtype}`);
  if (a.shape.length !== shape.length || a.shape.some((s, i) => s !== shape[i])) {
    throw new TaskError(`${where}.${name} must have shape (${shape.join(", ")}), got (${a.shape.join(", ")})`);
  }
  return a;
}

/** The rows `indices` of a dataset {X, y, n, d} (copies). */
function subset(ds, indices) {
  const { d } = ds;
  const X = new Float64Array(indices.length * d);
  const y = new Float64Array(indices.length);
  indices.forEach((row, i) => {
    X.set(ds.X.subarray(row * d, (row + 1) * d), i * d);
    y[i] = ds.y[row];
  });
  return { ...ds, X, y, n: indices.length };
}

/** {loss}: the mean squared error of coef / intercept on `data`, a finite number (else a TaskError). */
function lossMetrics(data, coef, intercept, what) {
  const loss = meanSquaredError(data, coef, intercept);
  if (!Number.isFinite(loss)) throw new TaskError(`${what} produced non-finite metrics: [loss] (${loss})`);
  return { loss: new Float64(loss) };
}

class LinearTrainer {
  /**
   * @param {object} dataset from loadDataset()
   * @param {{tags: string[], approvedPlans: Iterable<string>}} options
   */
  constructor(dataset, { tags = [], approvedPlans = [] } = {}) {
    this.dataset = dataset;
    this.tags = [...tags];
    this.approved = new Set([...approvedPlans].map((s) => s.toLowerCase()));
  }

  /** DatasetInfo for RegisterRequest.datasets. */
  datasetInfo() {
    const ds = this.dataset;
    return { name: ds.name, tags: this.tags, num_samples: ds.n, shape: [ds.n, ds.d], dtype: "<f8", format: ds.format };
  }

  get capabilities() {
    return CAPABILITIES;
  }

  /**
   * Run one task. `report(events)` sends ReportEvents (awaited). Returns {outcome, errorMessage, payload}
   * with payload the encoded result document (SUCCEEDED) or null. `signal` (an AbortSignal; NodeClient
   * aborts it when the server closed the task) is checked after every report: once aborted, training stops
   * there and the task ends FAILED naming the steps done (a reply the client drops).
   */
  async run(header, payloadBytes, report = async () => {}, { signal = null } = {}) {
    try {
      const run = { TASK_KIND_TRAIN: this.train, TASK_KIND_EVALUATE: this.evaluate }[header.kind];
      if (!run) throw new Refusal(`this node runs TRAIN and EVALUATE tasks only, got ${header.kind}`);
      const task = decode(payloadBytes);
      const result = await run.call(this, task, header, report, signal);
      return { outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "", payload: encode(result) };
    } catch (err) {
      const outcome = err instanceof Refusal ? "TASK_OUTCOME_REFUSED" : "TASK_OUTCOME_FAILED";
      return { outcome, errorMessage: err.message || String(err), payload: null };
    }
  }

  checkPlan(task) {
    const plan = get(task, "plan");
    if (!isMap(plan)) throw new TaskError("task.plan must be a map {name, source, sha256}");
    const [name, source, digest] = ["name", "source", "sha256"].map((k) => get(plan, k));
    if (typeof source !== "string" || typeof digest !== "string") throw new TaskError("task.plan needs str source and sha256");
    const actual = sha256(Buffer.from(source, "utf8")).toString("hex");
    if (actual !== digest.toLowerCase()) throw new TaskError(`plan.sha256 ${digest} does not match the source's SHA-256 ${actual}`);
    if (!this.approved.has(actual)) {
      throw new Refusal(`training plan ${name} (sha256 ${actual}) is not approved on this node; `
        + `review it and restart the node with --approve-plan ${actual}`);
    }
  }

  checkTags(task) {
    const wanted = get(task, "dataset_tags") || [];
    const missing = wanted.filter((t) => !this.tags.includes(t));
    if (missing.length) {
      throw new Refusal(`no dataset with tags [${wanted.join(", ")}]: dataset ${this.dataset.name} has tags [${this.tags.join(", ")}]`);
    }
  }

  /** What TRAIN and EVALUATE tasks share, checked: {args, coef, intercept}. */
  checkTask(task) {
    if (!isMap(task)) throw new TaskError("the task payload must be a map");
    if (get(task, "format") !== PAYLOAD_FORMAT) throw new TaskError(`unsupported task format ${get(task, "format")}; this node reads format ${PAYLOAD_FORMAT}`);
    this.checkPlan(task);
    this.checkTags(task);
    const args = get(task, "training_args");
    if (!isMap(args)) throw new TaskError("task.training_args must be a map");
    const params = get(task, "params");
    if (!isMap(params)) throw new TaskError("task.params must be a map of arrays");
    const d = this.dataset.d;
    const extra = keysOf(params).filter((k) => k !== "coef" && k !== "intercept");
    if (extra.length) throw new TaskError(`params has ${extra.join(", ")}; this node trains a linear model with params coef and intercept only`);
    return { args, coef: floatParam(params, "coef", [d, 1], "params"), intercept: floatParam(params, "intercept", [1], "params") };
  }

  /** {train, heldOut}: this node's samples split by training_args test_ratio and seed (split.js). */
  splitDataset(args) {
    const ds = this.dataset;
    const ratio = argNumber(args, "test_ratio", 0);
    const { train, heldOut } = heldOutIndices(ds.n, ratio, get(args, "seed"));
    if (train.length < 1) throw new TaskError(`test_ratio=${ratio} of ${ds.n} samples leaves no training sample`);
    return heldOut.length ? { train: subset(ds, train), heldOut: subset(ds, heldOut) } : { train: ds, heldOut: null };
  }

  /** EVALUATE: the sent model's loss on the held-out samples, or on every sample when none are held out. */
  async evaluate(task) {
    const { args, coef, intercept } = this.checkTask(task);
    const started = performance.now();
    const { heldOut } = this.splitDataset(args);
    const data = heldOut || this.dataset;
    return {
      format: PAYLOAD_FORMAT,
      num_samples: data.n,
      metrics: lossMetrics(data, coef.values, intercept.values, "evaluation of the sent model"),
      split: heldOut ? "validation" : "all",
      duration_s: new Float64((performance.now() - started) / 1000),
    };
  }

  async train(task, header, report, signal = null) {
    const { args, coef, intercept } = this.checkTask(task);
    const aggregator = get(task, "aggregator");
    if (aggregator !== "fedavg" && aggregator !== "scaffold") throw new Refusal(`aggregator ${aggregator} is not supported by this node (fedavg, scaffold)`);
    for (const key of ["momentum", "weight_decay", "fedprox_mu"]) {
      if (argNumber(args, key, 0) !== 0) throw new Refusal(`training_args.${key} = ${get(args, key)}: this node runs plain gradient descent only`);
    }
    const lr = argNumber(args, "lr", 0.01);
    if (!(lr > 0)) throw new TaskError(`training_args.lr must be > 0, got ${lr}`);
    const dryRun = get(args, "dry_run") === true;
    const steps = dryRun ? 1 : argNumber(args, "num_updates", null) ?? argNumber(args, "epochs", null);
    if (!Number.isInteger(steps) || steps < 1) throw new TaskError("training_args needs num_updates (or epochs) >= 1");
    const d = this.dataset.d;
    let correction = null;
    if (aggregator === "scaffold") {
      const state = get(task, "aggregator_state");
      const corr = isMap(state) ? get(state, "correction") : undefined;
      if (!isMap(corr)) throw new TaskError("Scaffold task without a correction (aggregator_state.correction is missing)");
      correction = {};
      for (const [name, shape] of [["coef", [d, 1]], ["intercept", [1]]]) {
        if (get(corr, name) !== undefined) correction[name] = floatParam(corr, name, shape, "correction").values;
      }
    }

    const started = performance.now();
    const interval = Math.max(1, argNumber(args, "log_interval", 10));
    const { train: ds, heldOut } = this.splitDataset(args);
    const validation = {};
    if (heldOut && get(args, "test_on_global_updates") === true) {
      validation.before = lossMetrics(heldOut, coef.values, intercept.values, "validation of the global model");
    }
    const held = heldOut ? `, ${heldOut.n} held out` : "";
    await report([logEvent("INFO", `training ${steps} full-batch steps on ${ds.name} (${ds.n} samples${held}, ${d} features), lr ${lr}`)]);
    let state = { coef: coef.values, intercept: intercept.values };
    const losses = [];
    for (let done = 0; done < steps;) {
      const slice = Math.min(interval, steps - done);
      let out;
      try {
        out = leastSquaresGD(ds, state, { lr, steps: slice, correction });
      } catch (err) {
        throw new TaskError(err.message.replace(/at step (\d+)/, (_, s) => `at step ${done + Number(s)}`));
      }
      state = out;
      losses.push(...out.losses);
      done += slice;
      await report([progressEvent(done, steps, ds.n, out.losses[out.losses.length - 1])]);
      if (signal && signal.aborted && done < steps) {
        const why = signal.reason ? signal.reason.details || signal.reason.message || String(signal.reason) : "aborted";
        throw new TaskError(`training stopped after ${done} of ${steps} steps: ${why}`);
      }
    }
    const asParam = (like, values) => new NDArray(like.spec.Typed.from(values), like.shape, like.dtype);
    const params = { coef: asParam(coef, state.coef), intercept: asParam(intercept, state.intercept) };
    if (heldOut && get(args, "test_on_local_updates") === true) { // the model as sent back, in its dtype
      validation.after = lossMetrics(heldOut, params.coef.values, params.intercept.values, "validation of the local model");
    }
    const tail = losses.slice(-10);
    return {
      format: PAYLOAD_FORMAT,
      params,
      num_samples: steps * ds.n,
      num_steps: steps,
      lr: new Float64(lr),
      metrics: { loss: new Float64(tail.reduce((a, b) => a + b, 0) / tail.length) },
      validation,
      ...(Object.keys(validation).length ? { validation_samples: heldOut.n } : {}), // weight of the val_* means
      duration_s: new Float64((performance.now() - started) / 1000),
    };
  }
}

function logEvent(level, message) {
  return { timestamp: Date.now() / 1000, log: { level, message: message.slice(0, 4096) } };
}

/** TrainingProgress: full batch, so step k is epoch k and sees all n samples. */
function progressEvent(iteration, total, n, loss) {
  return {
    timestamp: Date.now() / 1000,
    progress: { epoch: iteration, iteration, total_iterations: total, num_samples: n, num_samples_max: n, loss },
  };
}

module.exports = { LinearTrainer, CAPABILITIES, logEvent };
