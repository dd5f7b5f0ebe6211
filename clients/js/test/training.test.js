"use strict";
/**
 * The local update (least_squares.js) recomputed from its docstring's formulas, its convergence to the
 * normal equations' solution, dataset loading, and LinearTrainer's answers to good and bad TRAIN and
 * EVALUATE tasks, with the held-out split (split.js) and the validation it fills.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const crypto = require("node:crypto");
const { leastSquaresGD, meanSquaredError } = require("../src/training/least_squares.js");
const { loadDataset } = require("../src/training/dataset.js");
const { LinearTrainer } = require("../src/training/train_task.js");
const { heldOutIndices } = require("../src/training/split.js");
const { encode, decode, NDArray, Float64 } = require("../src/codec");
const { ConfigError } = require("../src/errors.js");

// y = 2 x0 − x1 + 0.5, exactly, on 6 points
const X = Float64Array.from([1, 0, 0, 1, 1, 1, 2, 0, 0, 3, 2, 2]);
const Y = Float64Array.from([2.5, -0.5, 1.5, 4.5, -2.5, 2.5]);
const DATA = { X, y: Y, n: 6, d: 2 };

test("one step is W -= lr (X^T G - delta), b -= lr (sum G - delta) with G = 2 (XW + b - y) / n", () => {
  const W0 = [0.3, -0.2];
  const b0 = [0.1];
  const delta = { coef: [0.05, -0.01], intercept: [0.02] };
  const lr = 0.1;
  const G = [];
  for (let i = 0; i < 6; i++) G.push((2 * (X[2 * i] * W0[0] + X[2 * i + 1] * W0[1] + b0[0] - Y[i])) / 6);
  const gW = [0, 1].map((j) => G.reduce((s, g, i) => s + X[2 * i + j] * g, 0));
  const gb = G.reduce((s, g) => s + g, 0);
  const out = leastSquaresGD(DATA, { coef: W0, intercept: b0 }, { lr, steps: 1, correction: delta });
  assert.ok(Math.abs(out.coef[0] - (W0[0] - lr * (gW[0] - delta.coef[0]))) < 1e-15);
  assert.ok(Math.abs(out.coef[1] - (W0[1] - lr * (gW[1] - delta.coef[1]))) < 1e-15);
  assert.ok(Math.abs(out.intercept[0] - (b0[0] - lr * (gb - delta.intercept[0]))) < 1e-15);
  assert.ok(Math.abs(out.losses[0] - meanSquaredError(DATA, W0, b0)) < 1e-15, "loss before the update");
});

test("many steps converge to the exact least-squares solution", () => {
  const out = leastSquaresGD(DATA, { coef: [0, 0], intercept: [0] }, { lr: 0.05, steps: 3000 });
  assert.ok(Math.abs(out.coef[0] - 2) < 1e-6 && Math.abs(out.coef[1] + 1) < 1e-6 && Math.abs(out.intercept[0] - 0.5) < 1e-6,
    `${out.coef} ${out.intercept}`);
  assert.ok(out.losses.every((l, i) => i === 0 || l <= out.losses[i - 1] + 1e-15), "loss never increases at this lr");
});

test("a diverging run stops with the step that produced a non-finite loss", () => {
  assert.throws(() => leastSquaresGD(DATA, { coef: [0, 0], intercept: [0] }, { lr: 50, steps: 2000 }),
    /non-finite loss .* at step \d+; that step's update was not applied/);
});

function tmpFile(name, text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fedstream-js-"));
  const file = path.join(dir, name);
  fs.writeFileSync(file, text);
  return file;
}

test("CSV and JSON datasets load features in file order, the target apart", () => {
  const csv = loadDataset(tmpFile("site.csv", "a,y,b\n1,10,2\n3,30,4\n"), "y");
  assert.deepEqual([csv.name, csv.format, csv.n, csv.d, csv.features, [...csv.X], [...csv.y]],
    ["site", "csv", 2, 2, ["a", "b"], [1, 2, 3, 4], [10, 30]]);
  const json = loadDataset(tmpFile("d.json", JSON.stringify([{ b: 1, a: 2, y: 3 }])), "y", { features: ["a", "b"] });
  assert.deepEqual([...json.X], [2, 1]);
});

test("bad dataset files are ConfigErrors naming the line, column or key", () => {
  const cases = [
    [tmpFile("x.csv", "a,y\n1,2\n3\n"), "y", /line 3 has 1 fields, the header has 2/],
    [tmpFile("x.csv", "a,y\n1,abc\n"), "y", /line 2, column y: "abc" is not a finite number/],
    [tmpFile("x.csv", "a,y\n1,2\n"), "z", /no target column "z"; columns: a, y/],
    [tmpFile("x.json", "[{\"a\": \"1\", \"y\": 2}]"), "y", /record 0, key a: "1" is not a finite number/],
    [tmpFile("x.txt", "a"), "y", /unknown format ".txt"/],
    ["/nonexistent/file.csv", "y", /does not exist/],
  ];
  for (const [file, target, why] of cases) assert.throws(() => loadDataset(file, target), (e) => e instanceof ConfigError && why.test(e.message));
});

// -- LinearTrainer on TRAIN task documents -------------------------------------------------------
const SOURCE = "class LinearPlan(NumpyTrainingPlan): ...\n";
const SHA = crypto.createHash("sha256").update(SOURCE).digest("hex");
const TRAIN = { kind: "TASK_KIND_TRAIN", task_id: "t1", round: 1 };

function task(overrides = {}) {
  return {
    format: 1,
    experiment_id: "e",
    round: 1,
    plan: { name: "LinearPlan", source: SOURCE, sha256: SHA },
    training_args: { lr: new Float64(0.05), num_updates: 50, batch_size: 32 },
    model_args: {},
    params: { coef: NDArray.zeros([2, 1], ">f4"), intercept: NDArray.zeros([1], ">f4") },
    aggregator: "fedavg",
    aggregator_state: {},
    dataset_tags: ["lsq"],
    ...overrides,
  };
}

const trainer = new LinearTrainer({ ...DATA, name: "site", format: "csv" }, { tags: ["lsq", "other"], approvedPlans: [SHA.toUpperCase()] });

test("a TRAIN task gives a TRAIN result: same names, shapes and dtypes, samples, steps, lr, metrics", async () => {
  const events = [];
  const out = await trainer.run(TRAIN, Buffer.from(encode(task())), async (e) => { events.push(...e); });
  assert.equal(out.outcome, "TASK_OUTCOME_SUCCEEDED", out.errorMessage);
  const result = decode(Buffer.from(out.payload));
  assert.deepEqual(Object.keys(result), ["format", "params", "num_samples", "num_steps", "lr", "metrics", "validation", "duration_s"]);
  assert.equal(result.format, 1);
  assert.deepEqual([result.params.coef.dtype, result.params.coef.shape, result.params.intercept.shape], [">f4", [2, 1], [1]]);
  const expected = leastSquaresGD(DATA, { coef: [0, 0], intercept: [0] }, { lr: 0.05, steps: 50 });
  assert.deepEqual([...result.params.coef.values], [...Float32Array.from(expected.coef)]);
  assert.deepEqual([result.num_samples, result.num_steps, result.lr], [300, 50, 0.05]);
  const tail = expected.losses.slice(-10);
  assert.ok(Math.abs(result.metrics.loss - tail.reduce((a, b) => a + b) / 10) < 1e-12);
  assert.ok(events.some((e) => e.log) && events.filter((e) => e.progress).length === 5, "a log line, progress every 10 steps");
  assert.equal(events.at(-1).progress.iteration, 50);
});

test("dry_run runs exactly one step", async () => {
  const out = await trainer.run(TRAIN, Buffer.from(encode(task({ training_args: { lr: 0.1, num_updates: 40, dry_run: true } }))));
  assert.equal(decode(Buffer.from(out.payload)).num_steps, 1);
});

test("lr is written as a float 64 even when integral (1.0), as the schema says", async () => {
  const out = await trainer.run(TRAIN, Buffer.from(encode(task({ training_args: { lr: 1, num_updates: 1 } }))));
  const bytes = Buffer.from(out.payload);
  const at = bytes.indexOf(Buffer.from("a26c72", "hex")); // "lr"
  assert.equal(bytes[at + 3], 0xcb);
});

test("tasks this node will not run are REFUSED, broken ones FAILED, each with the reason", async () => {
  const other = "print('hi')\n";
  const cases = [
    [{ kind: "TASK_KIND_UNSPECIFIED" }, {}, "REFUSED", /TRAIN and EVALUATE tasks only, got TASK_KIND_UNSPECIFIED/],
    [TRAIN, { plan: { name: "P", source: other, sha256: crypto.createHash("sha256").update(other).digest("hex") } }, "REFUSED",
      /training plan P \(sha256 [0-9a-f]{64}\) is not approved on this node; .*--approve-plan/],
    [TRAIN, { plan: { name: "P", source: SOURCE, sha256: "0".repeat(64) } }, "FAILED", /does not match the source's SHA-256/],
    [TRAIN, { dataset_tags: ["lsq", "eu"] }, "REFUSED", /no dataset with tags \[lsq, eu\]: dataset site has tags \[lsq, other\]/],
    [TRAIN, { aggregator: "fedprox" }, "REFUSED", /aggregator fedprox is not supported/],
    [TRAIN, { training_args: { lr: 0.1, num_updates: 5, momentum: 0.9 } }, "REFUSED", /momentum = 0.9: this node runs plain gradient descent only/],
    [TRAIN, { training_args: { lr: 0.1 } }, "FAILED", /needs num_updates \(or epochs\) >= 1/],
    [TRAIN, { params: { coef: NDArray.zeros([3, 1], "<f4"), intercept: NDArray.zeros([1], "<f4") } }, "FAILED",
      /params.coef must have shape \(2, 1\), got \(3, 1\)/],
    [TRAIN, { params: { coef: NDArray.zeros([2, 1], "<i4"), intercept: NDArray.zeros([1], "<f4") } }, "FAILED", /float dtype .* got <i4/],
    [TRAIN, { params: { coef: NDArray.zeros([2, 1], "<f4"), intercept: NDArray.zeros([1], "<f4"), w: 1 } }, "FAILED", /params has w/],
    [TRAIN, { aggregator: "scaffold" }, "FAILED", /Scaffold task without a correction/],
    [TRAIN, { format: 2 }, "FAILED", /unsupported task format 2/],
    [TRAIN, { training_args: { lr: 1e6, num_updates: 3000 } }, "FAILED", /non-finite loss .* at step \d+/],
  ];
  for (const [header, overrides, outcome, why] of cases) {
    const out = await trainer.run(header, Buffer.from(encode(task(overrides))));
    assert.equal(out.outcome, `TASK_OUTCOME_${outcome}`, `${why}: ${out.errorMessage}`);
    assert.match(out.errorMessage, why);
    assert.equal(out.payload, null);
  }
  const garbage = await trainer.run(TRAIN, Buffer.from([0xc1]));
  assert.equal(garbage.outcome, "TASK_OUTCOME_FAILED");
});

test("Scaffold: the correction delta_i enters every step as g - delta_i", async () => {
  const correction = { coef: new NDArray(Float32Array.from([0.5, -0.25]), [2, 1], "<f4"), intercept: new NDArray(Float32Array.from([0.125]), [1], "<f4") };
  const doc = task({ aggregator: "scaffold", aggregator_state: { correction }, training_args: { lr: 0.05, num_updates: 7 } });
  const out = await trainer.run(TRAIN, Buffer.from(encode(doc)));
  assert.equal(out.outcome, "TASK_OUTCOME_SUCCEEDED", out.errorMessage);
  const want = leastSquaresGD(DATA, { coef: [0, 0], intercept: [0] }, { lr: 0.05, steps: 7, correction: { coef: [0.5, -0.25], intercept: [0.125] } });
  assert.deepEqual([...decode(Buffer.from(out.payload)).params.coef.values], [...Float32Array.from(want.coef)]);
});

// -- the held-out split: validation in TRAIN results, EVALUATE tasks ----------------------------------
// 20 rows of y = x0 - 2 x1 + 1 + a wobble, so that no model fits every split exactly
const N20 = 20;
const X20 = Float64Array.from({ length: 2 * N20 }, (_, k) => Math.sin(1.7 * k) * 3);
const Y20 = Float64Array.from({ length: N20 }, (_, i) => X20[2 * i] - 2 * X20[2 * i + 1] + 1 + 0.3 * Math.cos(5 * i));
const SITE20 = { X: X20, y: Y20, n: N20, d: 2, name: "site20", format: "csv" };
const trainer20 = new LinearTrainer(SITE20, { tags: ["lsq"], approvedPlans: [SHA] });
const EVALUATE = { kind: "TASK_KIND_EVALUATE", task_id: "e1", round: 3 };
const START = { coef: [0.5, -1], intercept: [0.25] };

function rows(indices) {
  return { X: Float64Array.from(indices.flatMap((i) => [X20[2 * i], X20[2 * i + 1]])), y: Float64Array.from(indices.map((i) => Y20[i])), n: indices.length, d: 2 };
}

function mseByHand(indices, coef, b) {
  return indices.reduce((s, i) => s + (X20[2 * i] * coef[0] + X20[2 * i + 1] * coef[1] + b - Y20[i]) ** 2, 0) / indices.length;
}

const startParams = () => ({ coef: new NDArray(Float64Array.from(START.coef), [2, 1], "<f8"), intercept: new NDArray(Float64Array.from(START.intercept), [1], "<f8") });

test("TRAIN with test_ratio and seed: trains on the rest, validation before / after on the held-out samples", async () => {
  const args = { lr: new Float64(0.05), num_updates: 30, test_ratio: new Float64(0.25), seed: 11, test_on_global_updates: true, test_on_local_updates: true };
  const out = await trainer20.run(TRAIN, Buffer.from(encode(task({ training_args: args, params: startParams() }))));
  assert.equal(out.outcome, "TASK_OUTCOME_SUCCEEDED", out.errorMessage);
  const result = decode(Buffer.from(out.payload));
  const { train, heldOut } = heldOutIndices(N20, 0.25, 11n);
  assert.equal(heldOut.length, 5);
  const want = leastSquaresGD(rows(train), START, { lr: 0.05, steps: 30 });
  assert.deepEqual([...result.params.coef.values], [...want.coef]);
  assert.deepEqual([result.num_samples, result.num_steps], [30 * 15, 30], "num_samples counts training samples only");
  assert.deepEqual(Object.keys(result.validation), ["before", "after"]);
  assert.equal(result.validation_samples, 5, "the held-out count: the server's weight for the validation metrics");
  assert.ok(Math.abs(result.validation.before.loss - mseByHand(heldOut, START.coef, START.intercept[0])) < 1e-12);
  assert.ok(Math.abs(result.validation.after.loss - mseByHand(heldOut, want.coef, want.intercept[0])) < 1e-12);
  assert.ok(result.validation.after.loss < result.validation.before.loss);
});

test("validation has only the sides asked for, none without held-out samples", async () => {
  const cases = [
    [{ test_ratio: 0.25, seed: 11, test_on_local_updates: true }, ["after"]],
    [{ test_ratio: 0.25, seed: 11, test_on_global_updates: true }, ["before"]],
    [{ test_ratio: 0.25, seed: 11 }, []],
    [{ test_ratio: 0, seed: 11, test_on_global_updates: true, test_on_local_updates: true }, []],
    [{ test_ratio: 0.01, seed: 11, test_on_global_updates: true }, []], // floor(0.2) = 0 held out
  ];
  for (const [extra, keys] of cases) {
    const out = await trainer20.run(TRAIN, Buffer.from(encode(task({ training_args: { lr: 0.05, num_updates: 2, ...extra } }))));
    const result = decode(Buffer.from(out.payload));
    assert.deepEqual(Object.keys(result.validation), keys, JSON.stringify(extra));
    const held = heldOutIndices(N20, extra.test_ratio, 11n).heldOut.length;
    assert.equal(result.num_samples, 2 * (N20 - held));
    assert.equal(result.validation_samples, keys.length ? held : undefined, "validation_samples only with validation");
  }
});

test("without a seed every task draws its own split", async () => {
  const seen = new Set();
  for (let i = 0; i < 6; i++) {
    const args = { lr: 0.05, num_updates: 1, test_ratio: 0.5, test_on_global_updates: true };
    const out = await trainer20.run(TRAIN, Buffer.from(encode(task({ training_args: args, params: startParams() }))));
    seen.add(decode(Buffer.from(out.payload)).validation.before.loss);
  }
  assert.ok(seen.size > 1, [...seen].join(", "));
});

test("EVALUATE: the sent model's loss on the held-out split, or on every sample with test_ratio 0", async () => {
  const doc = (args) => { const t = task({ training_args: args, params: startParams() }); delete t.aggregator; delete t.aggregator_state; return t; };
  const held = await trainer20.run(EVALUATE, Buffer.from(encode(doc({ lr: 0.05, num_updates: 5, test_ratio: 0.3, seed: 4 }))));
  assert.equal(held.outcome, "TASK_OUTCOME_SUCCEEDED", held.errorMessage);
  const result = decode(Buffer.from(held.payload));
  assert.deepEqual(Object.keys(result), ["format", "num_samples", "metrics", "split", "duration_s"]);
  const { heldOut } = heldOutIndices(N20, 0.3, 4n);
  assert.deepEqual([result.format, result.num_samples, result.split, Object.keys(result.metrics)], [1, 6, "validation", ["loss"]]);
  assert.ok(Math.abs(result.metrics.loss - mseByHand(heldOut, START.coef, START.intercept[0])) < 1e-12);
  assert.ok(result.duration_s >= 0);

  const all = decode(Buffer.from((await trainer20.run(EVALUATE, Buffer.from(encode(doc({ lr: 0.05, test_ratio: 0 }))))).payload));
  const every = [...Array(N20).keys()];
  assert.deepEqual([all.num_samples, all.split], [N20, "all"]);
  assert.ok(Math.abs(all.metrics.loss - mseByHand(every, START.coef, START.intercept[0])) < 1e-12);
  const bytes = Buffer.from(encode(all));
  assert.equal(bytes[bytes.indexOf(Buffer.from("a46c6f7373", "hex")) + 5], 0xcb, "metrics are float 64");
});

test("EVALUATE tasks are refused and failed as TRAIN tasks are", async () => {
  const other = "print('hi')\n";
  const cases = [
    [{ plan: { name: "P", source: other, sha256: crypto.createHash("sha256").update(other).digest("hex") } }, "REFUSED", /not approved on this node/],
    [{ dataset_tags: ["eu"] }, "REFUSED", /no dataset with tags \[eu\]/],
    [{ format: 2 }, "FAILED", /unsupported task format 2/],
    [{ params: { coef: NDArray.zeros([3, 1], "<f4"), intercept: NDArray.zeros([1], "<f4") } }, "FAILED", /params.coef must have shape \(2, 1\), got \(3, 1\)/],
    [{ training_args: { test_ratio: 0.3, seed: -1 } }, "FAILED", /training_args.seed must be nil or an integer in \[0, 2\*\*64\), got -1/],
    [{ training_args: { test_ratio: 1.5 } }, "FAILED", /test_ratio must be a number in \[0, 1\), got 1.5/],
    [{ training_args: { test_ratio: 0.9999999999999999, seed: 1 } }, "FAILED", /test_ratio=0.9999999999999999 of 20 samples leaves no training sample/],
    [{ params: { coef: new NDArray(Float64Array.from([Infinity, 0]), [2, 1], "<f8"), intercept: NDArray.zeros([1], "<f8") } }, "FAILED",
      /evaluation of the sent model produced non-finite metrics: \[loss\]/],
  ];
  for (const [overrides, outcome, why] of cases) {
    const out = await trainer20.run(EVALUATE, Buffer.from(encode(task(overrides))));
    assert.equal(out.outcome, `TASK_OUTCOME_${outcome}`, `${why}: ${out.errorMessage}`);
    assert.match(out.errorMessage, why);
    assert.equal(out.payload, null);
  }
});
